"""Each endpoint's request and response, declared once as pydantic models.

The models are built when the app is (``build``), with the limits of the server's config
(``max_texts``, ``max_chars``) and of the packages (``max_length``, the vector size), so
one declaration gives the parser (``parse``) and the document (``/openapi.json``).

A JSON body is parsed by ``gateway.parse_json`` (NaN and Infinity refused) and then
validated as Python data. Scalars are strict (``1`` is not a bool, ``"64"`` not an int),
except that an integral float (``64.0``) is an int, as in JSON Schema. A refusal names
the field and the offending value: 413 for a list or a text over a limit, 422 for
anything else (a wrong type, an unknown field of a native endpoint, a lone surrogate).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union

from annotated_types import Ge, Le
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    Strict,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import RequestError

# -- scalars ------------------------------------------------------------------------------
# A lone surrogate (only reachable through a JSON \ud800 escape) cannot be encoded as UTF-8:
# the tokenizer and the response serializer would fail on it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(value: str) -> str:
    bad = _SURROGATE.search(value)
    if bad is not None:
        raise PydanticCustomError(
            "unicode",
            "is not valid Unicode: lone surrogate U+{code} at character {at}",
            {"code": f"{ord(bad.group()):04X}", "at": bad.start()},
        )
    return value


def _integral(value: Any) -> Any:
    """JSON Schema's integers include 2.0: an integral float becomes an int."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


Str = Annotated[str, Strict(), AfterValidator(_unicode)]
Bool = Annotated[bool, Strict()]


def integer(*bounds: Any) -> Any:
    """A strict int (an integral float accepted), within ``bounds`` (annotated_types' Ge, Le)."""
    return Annotated.__class_getitem__((int, Strict(), *bounds, BeforeValidator(_integral)))  # type: ignore[attr-defined]


Int = Annotated[int, Strict(), BeforeValidator(_integral)]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
# A /score weight. Bounded so that the weighted scores stay finite: with |w| <= 1e6 the
# smallest non-zero |w0 + w1| is ~1e-10, so a combined score stays below ~1e17 (fuzzing
# found [1.6e16, 1.8e308, 5e16] giving inf, which JSON cannot carry).
Weight = Annotated[float, Strict(), Field(ge=-1e6, le=1e6, allow_inf_nan=False)]

T = TypeVar("T", bound=BaseModel)


def _one_or_many(value: Any) -> str | None:
    return "<one>" if isinstance(value, str) else "<many>" if isinstance(value, list) else None


def one_or_many(single: Any, many: Any) -> Any:
    """A field that is ``single`` or a list (``many``), with one error when it is neither."""
    return Annotated[
        Union[Annotated[single, Tag("<one>")], Annotated[many, Tag("<many>")]],  # noqa: UP007 (a type expression)
        Discriminator(_one_or_many, custom_error_type="one_or_many", custom_error_message="must be str or list"),
    ]


class Native(BaseModel):
    """A native endpoint's request: an unknown field is refused (422 naming it)."""

    model_config = ConfigDict(extra="forbid")


class Compatible(BaseModel):
    """An OpenAI, Cohere or TEI request: unknown fields are ignored, as those servers do
    (text-embeddings-inference's serde structs and its OpenAI route ignore them)."""

    model_config = ConfigDict(extra="ignore")


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Limits:
    """What the models are built with: the server's limits and the packages'."""

    max_texts: int
    max_chars: int
    embedder: bool
    reranker: bool
    hidden_size: int = 1024
    max_length: int = 8192
    passage_max_length: int = 8192
    query_max_length: int = 512
    model_id: str = "m3"
    reranker_id: str = "m3-reranker"
    reranker_max_length: int = 512
    vocab_size: int = 250_002


@dataclass(frozen=True)
class Endpoint:
    """One POST route: what it does, its request model and its answer's model."""

    summary: str
    request: type[BaseModel]
    response: type[BaseModel]
    tei: bool = False  # answers errors in text-embeddings-inference's shape


def build(limits: Limits) -> dict[str, Endpoint]:
    """The POST endpoints this server has, their models built with ``limits``."""
    Text = Annotated[Str, Field(max_length=limits.max_chars)]
    Texts = one_or_many(Text, Annotated[list[Text], Field(max_length=limits.max_texts)])
    out: dict[str, Endpoint] = {}

    if limits.embedder:
        hidden, longest = limits.hidden_size, limits.max_length
        Vector = Annotated[list[float], Field(min_length=hidden, max_length=hidden)]

        def length(default: int, what: str) -> Any:
            return Field(default, ge=2, le=longest, description=f"tokens each {what} is truncated to")

        class EmbeddingsRequest(Compatible):
            input: Texts = Field(description="a text or a list of texts")  # type: ignore[valid-type]
            model: Str = Field(limits.model_id, description="echoed in the answer")
            encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32")
            dimensions: Int | None = Field(
                None, description=f"only the model's own size, {hidden}, is served (any other integer: 400)"
            )
            user: Str | None = Field(None, description="accepted and ignored, as OpenAI's field")
            max_length: Int = length(limits.passage_max_length, "text")

        class EmbeddingItem(Response):
            object: Literal["embedding"]
            index: int
            embedding: Vector | str

        class EmbeddingsUsage(Response):
            prompt_tokens: int
            total_tokens: int

        class EmbeddingsResponse(Response):
            object: Literal["list"]
            data: list[EmbeddingItem]
            model: str
            usage: EmbeddingsUsage

        out["/v1/embeddings"] = Endpoint(
            "Dense vectors, OpenAI's embeddings API (unknown fields ignored)", EmbeddingsRequest, EmbeddingsResponse
        )

        class EncodeRequest(Native):
            model_config = ConfigDict(
                json_schema_extra={
                    "anyOf": [
                        {"properties": {"dense": {"const": True}}},
                        {"properties": {"sparse": {"const": True}}, "required": ["sparse"]},
                        {"properties": {"colbert": {"const": True}}, "required": ["colbert"]},
                    ],
                }
            )
            texts: Texts = Field(description="a text or a list of texts")  # type: ignore[valid-type]
            dense: Bool = Field(True, description="the dense vector")
            sparse: Bool = Field(False, description="lexical weights (400 on a dense-only package)")
            colbert: Bool = Field(
                False, description="ColBERT vectors, one per token after <s> (400 on a dense-only package)"
            )
            sparse_format: Literal["dict", "indices"] = Field(
                "dict", description="{token_id: weight} or {indices, values}"
            )
            colbert_format: Literal["list", "base64-float32", "base64-float16"] = Field(
                "list", description="nested lists or {shape, dtype, data} with little-endian base64 data"
            )
            max_length: Int = length(limits.passage_max_length, "text")

            @model_validator(mode="after")
            def _some_output(self) -> EncodeRequest:
                if not (self.dense or self.sparse or self.colbert):
                    raise PydanticCustomError("outputs", "ask for at least one of 'dense', 'sparse', 'colbert'")
                return self

        class SparseIndices(Response):
            indices: list[int]
            values: list[float]

        class ColbertBase64(Response):
            shape: Annotated[list[int], Field(min_length=2, max_length=2)]
            dtype: Literal["float32", "float16"]
            data: str

        class EncodeRow(Response):
            dense: Vector | None = None
            sparse: dict[Annotated[str, Field(pattern="^[0-9]+$")], float] | SparseIndices | None = None
            colbert: list[Vector] | ColbertBase64 | None = None

        class EncodeUsage(Response):
            tokens: int

        class EncodeResponse(Response):
            results: list[EncodeRow]
            usage: EncodeUsage

        out["/encode"] = Endpoint(
            "Dense, sparse (lexical) and ColBERT outputs, as M3Model.encode", EncodeRequest, EncodeResponse
        )

        class ScoreRequest(Native):
            pairs: Annotated[list[tuple[Text, Text]], Field(max_length=limits.max_texts)] = Field(
                description="[query, passage] pairs"
            )
            weights: tuple[Weight, Weight, Weight] = Field(
                (1.0, 1.0, 1.0),
                description="[dense, sparse, colbert] weights; 400 if dense+sparse or all three sum to zero",
            )
            max_query_length: Int = length(limits.query_max_length, "query")
            max_passage_length: Int = length(limits.passage_max_length, "passage")

        class ScoreResponse(Response):
            colbert: list[float]
            sparse: list[float]
            dense: list[float]
            sparse_dense: list[float] = Field(alias="sparse+dense")
            all: list[float] = Field(alias="colbert+sparse+dense")

        out["/score"] = Endpoint(
            "All five compute_score scores of [query, passage] pairs (400 on a dense-only package)",
            ScoreRequest,
            ScoreResponse,
        )
        out.update(_tei_embed(limits, Texts, Vector))

    if limits.reranker:
        Query = Annotated[Text, Field(description="the query every text is scored against")]

        class RerankRequest(Compatible):
            query: Query
            texts: Texts = Field(description="the passages")  # type: ignore[valid-type]
            raw_scores: Bool = Field(False, description="the logit instead of its sigmoid")
            return_text: Bool = Field(False, description="include each passage's text")
            truncate: Bool = Field(
                True, description=f"cut pairs to {limits.reranker_max_length} tokens; false: 413 for a longer pair"
            )
            truncation_direction: Literal["right", "Right"] = Field(
                "right", description="only right (the end of the passage is cut)"
            )

        class Rank(Response):
            index: int
            score: float
            text: str | None = None

        class RerankResponse(RootModel[list[Rank]]):
            pass

        out["/rerank"] = Endpoint(
            "Cross-encoder scores, text-embeddings-inference's rerank API; best first", RerankRequest, RerankResponse
        )

        class Document(Compatible):
            text: Text

        TopN = integer(Ge(1))

        class CohereRerankRequest(Compatible):
            query: Query
            documents: Annotated[
                list[
                    Annotated[
                        Union[Annotated[Text, Tag("<one>")], Annotated[Document, Tag("<many>")]],  # noqa: UP007
                        Discriminator(
                            _document, custom_error_type="document", custom_error_message="must be str or object"
                        ),
                    ]
                ],
                Field(max_length=limits.max_texts),
            ] = Field(description="passages: strings or {text} objects")
            top_n: TopN | None = Field(None, description="keep the best n (absent: all)")  # type: ignore[valid-type]
            return_documents: Bool = Field(False, description="include each document's text")
            model: Str = Field(limits.reranker_id, description="echoed in the answer")

        class CohereDocument(Response):
            text: str

        class CohereResult(Response):
            index: int
            relevance_score: Annotated[float, Field(ge=0, le=1)]
            document: CohereDocument | None = None

        class BilledUnits(Response):
            search_units: int

        class Meta(Response):
            billed_units: BilledUnits

        class CohereRerankResponse(Response):
            id: str
            results: list[CohereResult]
            model: str
            meta: Meta

        out["/v1/rerank"] = Endpoint(
            "Cross-encoder relevance (sigmoid of the logit), Cohere's rerank API (v1 and v2); best first",
            CohereRerankRequest,
            CohereRerankResponse,
        )
    return out


def _document(value: Any) -> str | None:
    return "<one>" if isinstance(value, str) else "<many>" if isinstance(value, dict) else None


def _tei_embed(limits: Limits, Texts: Any, Vector: Any) -> dict[str, Endpoint]:
    """text-embeddings-inference's embedding routes (router/src/http/types.rs)."""
    hidden = limits.hidden_size

    class TeiRequest(Compatible):
        inputs: Texts = Field(description="a text or a list of texts")
        truncate: Bool | None = Field(
            False, description=f"cut texts to {limits.max_length} tokens; false: 413 for a longer text"
        )
        truncation_direction: Literal["right", "Right"] = Field(
            "right", description="only right (the end of the text is cut)"
        )
        prompt_name: Str | None = Field(None, description="not supported: this server's packages have no prompts")

    class EmbedRequest(TeiRequest):
        normalize: Bool = Field(True, description="unit-length vectors (BGE-M3's dense vectors already are)")
        dimensions: Int | None = Field(None, description=f"only the model's own size, {hidden}")

    class EmbedResponse(RootModel[list[Vector]]):
        pass

    class SparseValue(Response):
        index: int
        value: float

    class EmbedSparseResponse(RootModel[list[list[SparseValue]]]):
        pass

    class EmbedAllResponse(RootModel[list[list[Vector]]]):
        pass

    class TokenizeRequest(Compatible):
        inputs: Texts = Field(description="a text or a list of texts")
        add_special_tokens: Bool = Field(True, description="include <s> and </s>")
        prompt_name: Str | None = Field(None, description="not supported: this server's packages have no prompts")

    class SimpleToken(Response):
        id: int
        text: str
        special: bool
        start: int | None
        stop: int | None

    class TokenizeResponse(RootModel[list[list[SimpleToken]]]):
        pass

    Id = integer(Ge(0), Le(limits.vocab_size - 1))
    Ids = Annotated[list[Id], Field(max_length=1 << 20)]  # type: ignore[valid-type]

    class DecodeRequest(Compatible):
        ids: Annotated[
            Annotated[Ids, Tag("<one>")]
            | Annotated[Annotated[list[Ids], Field(max_length=limits.max_texts)], Tag("<many>")],
            Discriminator(_ids, custom_error_type="ids", custom_error_message="must be a list of ids or of lists"),
        ] = Field(description="token ids, or a list of lists of them")
        skip_special_tokens: Bool = Field(True, description="leave <s>, </s> and <pad> out")

    class DecodeResponse(RootModel[list[str]]):
        pass

    return {
        "/embed": Endpoint("Dense vectors, text-embeddings-inference's embed API", EmbedRequest, EmbedResponse, True),
        "/embed_sparse": Endpoint(
            "BGE-M3's lexical weights as [{index, value}] per text (text-embeddings-inference's embed_sparse API)",
            TeiRequest,
            EmbedSparseResponse,
            True,
        ),
        "/embed_all": Endpoint(
            "ColBERT vectors, one per token after <s> (text-embeddings-inference's embed_all API)",
            TeiRequest,
            EmbedAllResponse,
            True,
        ),
        "/tokenize": Endpoint("Tokens with their character offsets", TokenizeRequest, TokenizeResponse, True),
        "/decode": Endpoint("Text of token ids", DecodeRequest, DecodeResponse, True),
    }


def _ids(value: Any) -> str | None:
    if not isinstance(value, list):
        return None
    return "<many>" if value and isinstance(value[0], list) else "<one>"


# -- refusals: pydantic's errors as one message naming the field and the value -------------
_TYPES = {
    "string_type": "str",
    "int_type": "int",
    "bool_type": "bool",
    "float_type": "number",
    "list_type": "list",
    "tuple_type": "list",
    "dict_type": "object",
    "model_type": "object",
    "model_attributes_type": "object",
}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    for cls, name in ((bool, "bool"), (int, "int"), (float, "number"), (str, "str"), (list, "list"), (dict, "object")):
        if isinstance(value, cls):
            return name
    return type(value).__name__


def _show(value: Any) -> str:
    """A short, safe rendering of a refused value (no deep structures, no megabytes)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return _kind(value)


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith("<"):  # a union's tag, not a field
            out += ("." if out else "") + str(part)
    return out or "body"


def _message(error: Any) -> tuple[int, str]:
    kind, loc, value, ctx = error["type"], error["loc"], error.get("input"), error.get("ctx") or {}
    where = _where(tuple(loc))
    if kind in ("string_too_long", "too_long") and isinstance(value, str):
        return 413, f"'{where}' has {len(value)} characters (limit {ctx['max_length']})"
    if kind == "too_long" and ctx.get("field_type") == "List":
        return 413, f"'{where}' has {ctx['actual_length']} items (limit {ctx['max_length']})"
    if kind == "too_long":
        return 422, f"field '{where}' must have at most {ctx['max_length']} items, got {ctx['actual_length']}"
    if kind == "too_short":
        return 422, f"field '{where}' must have at least {ctx['min_length']} items, got {ctx['actual_length']}"
    if kind in _TYPES:
        # The type's name only, never the value: a misplaced text must not reach the access log.
        return 422, f"field '{where}' must be {_TYPES[kind]}, got {_kind(value)}"
    if kind == "missing":
        return 422, f"field '{where}' is required"
    if kind == "extra_forbidden":
        return 422, f"request body has an unknown field '{where}' (see /openapi.json for this endpoint's fields)"
    if kind == "finite_number":
        return 422, f"field '{where}' must be a finite number"
    if kind == "literal_error":
        return 422, f"field '{where}' must be {ctx['expected']}, got {_show(value)}"
    bounds = {"greater_than_equal": ">= {ge}", "less_than_equal": "<= {le}", "greater_than": "> {gt}"}
    if kind in bounds:
        return 422, f"field '{where}' must be {bounds[kind].format(**ctx)}, got {_show(value)}"
    if kind == "outputs":
        return 422, str(error["msg"])
    if kind in ("one_or_many", "document", "ids"):
        return 422, f"field '{where}' {error['msg']}, got {_kind(value)}"
    return 422, f"field '{where}' {error['msg']}" if where != "body" else str(error["msg"])


def parse(model: type[T], body: dict[str, Any]) -> T:
    """``body`` validated as ``model``; RequestError (413 before 422) naming the first refused field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        messages = [_message(e) for e in exc.errors(include_url=False)]
        status, message = min(messages, key=lambda m: -m[0])  # a limit (413) first: the request is too big
        raise RequestError(status, message) from None
