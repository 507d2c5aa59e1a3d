"""Built-in multilingual texts on which every exported variant is validated."""

from __future__ import annotations

VALIDATION_TEXTS: tuple[str, ...] = (
    "What is BGE M3?",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "Definition of BM25",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing in each document.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "La bibliothèque ouvre à neuf heures du matin et ferme à six heures du soir.",
    "Los investigadores midieron la velocidad del nuevo motor en tres máquinas distintas.",
    "Москва является столицей России и крупнейшим городом страны.",
    "القاهرة هي عاصمة مصر وأكبر مدنها.",
    "ירושלים היא עיר עתיקה עם היסטוריה ארוכה.",
    "नई दिल्ली भारत की राजधानी है।",
    "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "東京は日本の首都であり、最大の都市です。",
    "서울은 대한민국의 수도이자 가장 큰 도시입니다.",
    "Hà Nội là thủ đô của Việt Nam.",
    "😀 🚀 🔥 👩‍💻 🇯🇵",
    "",
    "<p>Hello <b>world</b></p>",
    "def f(x: int) -> int:\n    return x * 2",
    "3.14159 2.71828 1,000,000 -17",
    " ".join(
        [
            "Multilingual retrieval needs long passages too.",
            "Die Suche über viele Sprachen braucht auch lange Texte.",
            "多语言检索也需要长文本。",
            "Поиск на многих языках требует длинных текстов.",
        ]
        * 12
    ),
)
