"""The reranker's pair tokenization against FlagEmbedding 1.4.2's FlagReranker.

tests/golden/reranker/ (scripts/make_reranker_goldens.py) records, for every call
FlagReranker made on the tiny reranker, the instruction-applied pairs and the token ids
it fed the model. ``format_instruction`` + ``M3Tokenizer.encode_pairs`` must give the
same ids for every pair of every call: default 512 and 1024 tokens, short max_length,
explicit and over-long query_max_length, instructions and their formats.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from m3_runtime.tokenize import M3Tokenizer, format_instruction

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "reranker"
PLAN = json.loads((GOLDEN / "pairs.json").read_text(encoding="utf-8"))
REF = json.loads((GOLDEN / "reference.json").read_text(encoding="utf-8"))["calls"]
CALLS = {call["name"]: call for call in PLAN["calls"]}


@pytest.fixture(scope="module")
def tok() -> M3Tokenizer:
    return M3Tokenizer(ROOT / PLAN["checkpoint"] / "tokenizer.json")


def detailed(call: dict) -> list[tuple[str, str]]:
    s = call["resolved"]
    return [
        (
            format_instruction(s["query_instruction_format"], s["query_instruction_for_rerank"], q),
            format_instruction(s["passage_instruction_format"], s["passage_instruction_for_rerank"], p),
        )
        for q, p in (PLAN["pairs"][i] for i in call["pairs"])
    ]


@pytest.mark.parametrize("name", sorted(CALLS))
def test_token_ids_match_flagreranker(tok: M3Tokenizer, name: str) -> None:
    call, ref = CALLS[name], REF[name]
    pairs = detailed(call)
    if "detailed_pairs" in ref:
        assert [list(p) for p in pairs] == ref["detailed_pairs"]
    ids = tok.encode_pairs(
        pairs, max_length=call["resolved"]["max_length"], query_max_length=call["resolved"]["query_max_length"]
    )
    assert len(ids) == len(ref["input_ids"])
    for i, (got, want) in enumerate(zip(ids, ref["input_ids"], strict=True)):
        assert got == want, f"{name}: pair {call['pairs'][i]} differs"


def test_default_query_max_length_is_three_quarters(tok: M3Tokenizer) -> None:
    call = CALLS["max_length_32"]  # recorded without query_max_length: FlagReranker used 24
    assert "query_max_length" not in call["kwargs"] and call["resolved"]["query_max_length"] == 24
    assert tok.encode_pairs(detailed(call), max_length=32) == REF["max_length_32"]["input_ids"]


def test_goldens_cover_the_truncation_cases(tok: M3Tokenizer) -> None:
    """Guards the goldens' coverage: each truncation branch is hit by some recorded pair."""
    pairs = PLAN["pairs"]

    def text_len(text: str) -> int:  # ids of the text alone: <s> text </s> minus the two specials
        return len(tok.encode([text], max_length=10**6)[0]) - 2

    for name, max_length in (("default", 512), ("max_length_1024", 1024)):
        call = CALLS[name]
        assert call["resolved"]["max_length"] == max_length
        q_max = call["resolved"]["query_max_length"]
        idx = call["pairs"]
        cut = [
            k for k, i in enumerate(idx) if min(text_len(pairs[i][0]), q_max) + text_len(pairs[i][1]) + 4 > max_length
        ]
        assert cut, f"no pair of {name} needs truncation"
        for k in cut:  # cut to exactly max_length, still ending in </s>
            assert len(REF[name]["input_ids"][k]) == max_length and REF[name]["input_ids"][k][-1] == 2
        assert any(text_len(pairs[i][0]) > q_max for i in idx), f"no query of {name} is over {q_max} tokens"
    edge = CALLS["query_fills_max_length"]
    lengths = [len(ids) for ids in REF["query_fills_max_length"]["input_ids"]]
    assert max(lengths) > edge["resolved"]["max_length"]  # the passage could not absorb the cut
    # PAIRS[0]: its passage is exactly as long as the count to remove and is kept whole.
    q, p = pairs[edge["pairs"][0]]
    max_length = edge["resolved"]["max_length"]
    assert text_len(q) + 4 == max_length and text_len(p) > max_length
    assert lengths[0] == text_len(q) + max_length + 4


def test_pair_template_is_xlm_r(tok: M3Tokenizer) -> None:
    # <s> q </s></s> d </s>, by hand from the tokenizer's own ids.
    s, e = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    q, d = tok.encode(["fox"], max_length=64)[0][1:-1], tok.encode(["dog"], max_length=64)[0][1:-1]
    assert tok.encode_pairs([("fox", "dog")], max_length=64) == [[s, *q, e, e, *d, e]]
    assert tok.encode_pairs([("", "")], max_length=64) == [[s, e, e, e]]


def test_format_instruction() -> None:
    assert format_instruction("{}{}", None, "q") == "q"
    assert format_instruction("{}{}", "A: ", "q") == "A: q"
    assert format_instruction("{}\\n{}", "A", "q") == "A\nq"  # backslash-n typed literally
    with pytest.raises(ValueError, match="instruction format"):
        format_instruction("{}{}{}", "A", "q")


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([("q", "p"), ("q", None)], "pair 1 holds str and NoneType"),
        ([("q", "p"), "qp"], "pair 1 is not"),
        ([("q", "p", "x")], "pair 0 is not"),
        ([(1, "p")], "pair 0 holds int and str"),
    ],
)
def test_bad_pairs_name_their_index(tok: M3Tokenizer, pairs: list, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        tok.encode_pairs(pairs, max_length=16)


@pytest.mark.parametrize(("max_length", "query_max_length"), [(0, None), (16, 0), (-1, 4)])
def test_bad_lengths(tok: M3Tokenizer, max_length: int, query_max_length: int | None) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        tok.encode_pairs([("q", "p")], max_length=max_length, query_max_length=query_max_length)
