"""/openapi.json against the server's real behaviour, and schemathesis fuzzing on a live loopback server.

The oracle for "the document matches what the endpoints do" is independent of the
server's own validator: the ``jsonschema`` library checks real responses against the
published response schemas and hand-written bodies against the request schemas, and
schemathesis generates bodies from the document (valid and invalid ones) and checks
status codes, content types, headers and response bodies.
"""

from __future__ import annotations

import os
import re
import time

import pytest
from m3_runtime import M3Model, M3Reranker
from m3_runtime.testing import start_server

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
jsonschema = pytest.importorskip("jsonschema")

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Small limits keep generated requests fast; the document publishes them, so schemathesis
# generates up to them and past them.
LIMITS = {"max_texts": 8, "max_chars": 2000, "max_wait_ms": 1}


_start = start_server  # url, server, thread of a live loopback server


@pytest.fixture(scope="module")
def live(package_dir, reranker_dir):
    """Embedder and reranker behind the API key."""
    from m3_runtime.server import ServerConfig, create_app

    model = M3Model(package_dir, variant="fp32")
    reranker = M3Reranker(reranker_dir, variant="fp32")
    app = create_app(model, ServerConfig(**LIMITS, api_key=KEY), reranker=reranker)
    url, srv, thread = _start(app)
    yield url, app.state.service
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def spec(live):
    url, _ = live
    res = httpx.get(url + "/openapi.json")  # open without the key, as documented
    assert res.status_code == 200
    return res.json()


def _response_schema(spec: dict, path: str, method: str, status: int) -> dict:
    responses = spec["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, which the document does not list"
    content = responses[str(status)]["content"]
    schema = next(iter(content.values()))["schema"]
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _check_response(spec: dict, path: str, method: str, res) -> None:
    schema = _response_schema(spec, path, method, res.status_code)
    # The models' nested schemas are $refs into the document's components: resolve them there.
    schema = {**schema, "components": spec["components"]}
    jsonschema.Draft202012Validator(schema).validate(res.json() if path != "/metrics" else res.text)
    assert res.headers["x-request-id"]


def test_document_is_openapi_31_with_valid_json_schemas(spec):
    from jsonschema.validators import Draft202012Validator

    assert spec["openapi"] == "3.1.0"
    assert set(spec["paths"]) == {
        "/",
        "/v1/embeddings",
        "/embeddings",
        "/embed",
        "/embed_sparse",
        "/embed_all",
        "/tokenize",
        "/decode",
        "/v1/models",
        "/encode",
        "/score",
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
        "/health",
        "/info",
        "/metrics",
        "/openapi.json",
    }
    Draft202012Validator.check_schema(spec["components"]["schemas"]["Error"])
    for path, ops in spec["paths"].items():
        for op in ops.values():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None:
                Draft202012Validator.check_schema(body)
            for status, response in op["responses"].items():
                schema = next(iter(response["content"].values()))["schema"]
                if "$ref" not in schema:
                    Draft202012Validator.check_schema(schema)
                assert response["headers"]["X-Request-ID"]["required"], (path, status)
            # /health and /openapi.json are open; everything else needs the key.
            assert ("security" in op) == (path not in ("/health", "/openapi.json")), path
            if "security" in op:
                assert "401" in op["responses"]
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}


def test_request_schemas_publish_the_server_limits_and_defaults(spec, live):
    _, service = live
    encode = spec["paths"]["/encode"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = encode["properties"]
    assert encode["required"] == ["texts"]
    assert props["texts"]["oneOf"][1]["maxItems"] == LIMITS["max_texts"]
    assert props["texts"]["oneOf"][0]["maxLength"] == LIMITS["max_chars"]
    assert encode["additionalProperties"] is False  # native endpoints refuse unknown fields
    assert props["max_length"]["maximum"] == service.model.max_length
    assert props["max_length"]["default"] == service.model.passage_max_length
    assert props["sparse_format"]["enum"] == ["dict", "indices"] and props["sparse_format"]["default"] == "dict"
    assert (props["dense"]["default"], props["sparse"]["default"], props["colbert"]["default"]) == (True, False, False)
    for status in ("400", "401", "408", "413", "415", "422", "429", "503"):
        assert status in spec["paths"]["/encode"]["post"]["responses"]


# (path, body, status): valid requests of every option, and refused ones.
CASES = [
    ("/v1/embeddings", {"input": "one text"}, 200),
    ("/v1/embeddings", {"input": ["a", "b"], "encoding_format": "base64", "model": "x", "dimensions": 64}, 200),
    ("/v1/embeddings", {"input": "x", "dimensions": 8}, 400),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 422),
    ("/encode", {"texts": ["a", ""], "sparse": True, "colbert": True}, 200),
    ("/encode", {"texts": "a", "dense": False, "sparse": True, "sparse_format": "indices"}, 200),
    ("/encode", {"texts": ["a"], "colbert": True, "colbert_format": "base64-float16", "max_length": 8}, 200),
    ("/encode", {"texts": []}, 200),
    ("/encode", {"texts": ["a"], "dense": False}, 422),
    ("/encode", {"texts": ["a"] * 9}, 413),
    ("/encode", {"texts": ["a" * 2001]}, 413),
    ("/encode", {"texts": ["a"], "max_length": 1}, 422),
    ("/score", {"pairs": [["q", "p"], ["", "x"]], "weights": [0.4, 0.2, 0.4]}, 200),
    ("/score", {"pairs": []}, 200),
    ("/score", {"pairs": [["q", "p"]], "weights": [0, 0, 1]}, 400),
    ("/score", {"pairs": [["q", "p", "r"]]}, 422),
    ("/rerank", {"query": "q", "texts": ["a", "b"], "return_text": True, "raw_scores": True}, 200),
    ("/rerank", {"query": "q", "texts": []}, 200),
    ("/rerank", {"texts": ["a"]}, 422),
    ("/v1/rerank", {"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1, "return_documents": True}, 200),
    ("/v2/rerank", {"query": "q", "documents": [], "model": "m"}, 200),
    ("/v1/rerank", {"query": "q", "documents": [{"txt": "a"}]}, 422),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422),
]


@pytest.mark.parametrize("path, body, status", CASES)
def test_real_responses_match_the_document(live, spec, path, body, status):
    """Each answer validates against the schema the document gives for its status, and the
    request schema accepts exactly the bodies the server accepts (400 is a refusal of valid
    JSON by the model, e.g. zero weights, so its bodies are schema-valid too)."""
    url, _ = live
    res = httpx.post(url + path, json=body, headers=AUTH, timeout=60)
    assert res.status_code == status, res.text
    _check_response(spec, path, "post", res)
    request = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    request = {**request, "components": spec["components"]}  # its $refs point there
    errors = list(jsonschema.Draft202012Validator(request).iter_errors(body))
    assert (not errors) == (status in (200, 400)), [e.message for e in errors]
    if status >= 400:
        assert res.json()["error"]["code"] == status


def test_get_endpoints_match_the_document(live, spec):
    url, service = live
    for path in ("/health", "/info", "/metrics", "/openapi.json"):
        res = httpx.get(url + path, headers=AUTH)
        assert res.status_code == 200
        _check_response(spec, path, "get", res)
    info = httpx.get(url + "/info", headers=AUTH).json()
    assert info["hidden_size"] == service.model.hidden_size and info["reranker"]["kind"] == "reranker", info


def test_unknown_paths_and_methods_answer_in_the_error_shape(live):
    url, _ = live
    res = httpx.get(url + "/nope", headers=AUTH)
    assert res.status_code == 404 and res.json()["error"]["code"] == 404 and res.headers["x-request-id"]
    res = httpx.delete(url + "/encode", headers=AUTH)
    assert res.status_code == 405 and "POST" in res.headers["allow"] and res.json()["error"]["code"] == 405


@pytest.mark.parametrize(
    "path, content, headers, status, words",
    [
        ("/encode", b"[1, 2]", {}, 422, "must be a JSON object, got list"),
        ("/encode", b'"texts"', {}, 422, "must be a JSON object"),
        ("/encode", b"null", {}, 422, "must be a JSON object, got null"),
        ("/encode", b'{"texts": ["a"], "max_length": NaN}', {}, 422, "NaN is not a JSON number"),
        ("/score", b'{"pairs": [["q", "p"]], "weights": [Infinity, 1, 1]}', {}, 422, "Infinity is not a JSON number"),
        (
            "/score",
            b'{"pairs": [["q", "p"]], "weights": [1e400, 1, 1]}',
            {},
            422,
            "'weights[0]' must be a finite number",
        ),
        (
            "/score",
            b'{"pairs": [["q", "p"]], "weights": [1.6e16, 1.7e308, 5e16]}',
            {},
            422,
            "'weights[0]' must be <= 1000000.0, got 1.6e+16",
        ),
        ("/encode", b'{"texts": ["a"], "max_length": 1' + b"0" * 5000 + b"}", {}, 422, "not valid JSON"),
        (
            "/encode",
            b'{"texts": ["a"], "max_length": 1' + b"0" * 400 + b"}",
            {},
            422,
            "'max_length' must be <= 8192, got 1000",
        ),
        ("/encode", b'{"texts": ["a"], "max_length": 64.0}', {}, 200, ""),
        ("/encode", b'{"texts": ["a"], "max_length": 64.5}', {}, 422, "'max_length' must be int, got number"),
        ("/encode", b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 422, "nested too deeply"),
        ("/encode", b'{"texts": ["ok", "bad \\ud800 surrogate"]}', {}, 422, "'texts[1]' is not valid Unicode"),
        ("/v1/embeddings", b'{"input": ["a"], "model": "\\udfff"}', {}, 422, "not valid Unicode"),
        ("/encode", b'{"texts": ["\xff\xfe bytes"]}', {}, 422, "not valid JSON"),
        ("/encode", b'{"texts": ["a"]}', {"Content-Type": "text/plain"}, 415, "Content-Type must be application/json"),
        ("/encode", b"texts=a", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "curl: --json"),
        ("/encode", b'{"texts": ["a"]}', {"Content-Type": "multipart/form-data; boundary=x"}, 415, "Content-Type"),
        ("/encode", b'{"texts": ["a"]}', {"Content-Type": "application/json; charset=utf-8"}, 200, ""),
        ("/encode", b'{"texts": ["a"], "sparse": 1}', {}, 422, "'sparse' must be bool, got int"),
        ("/encode", b'{"texts": {"a": 1}}', {}, 422, "'texts' must be str or list, got object"),
        ("/encode", b"", {}, 422, "not valid JSON"),
    ],
)
def test_malformed_bodies_get_4xx_naming_the_problem(live, path, content, headers, status, words):
    """What fuzzing and the brief's list found or asked for: never a 5xx."""
    url, _ = live
    res = httpx.post(url + path, content=content, headers={**AUTH, **headers})
    assert res.status_code == status, res.text
    if status != 200:
        assert words in res.json()["error"]["message"]


def test_no_server_error_in_metrics_after_the_malformed_bodies(live):
    url, _ = live
    metrics = httpx.get(url + "/metrics", headers=AUTH).text
    assert not re.search(r'status="5\d\d"', metrics), metrics


# -- fuzzing ---------------------------------------------------------------------------
_FIELDLESS = (401, 404, 405)


def _names_the_field(response, case) -> None:
    """A 4xx body is the API's error object and names what was refused: a field of this
    endpoint, the request body, or a header."""
    status = response.status_code
    if not 400 <= status < 500:
        return
    error = response.json()["error"]
    if isinstance(error, str):  # text-embeddings-inference's shape, on its routes
        assert response.json()["error_type"] in ("Validation", "Empty", "Overloaded", "Unhealthy", "Backend")
        error = {"message": error}
    else:
        assert error["code"] == status and isinstance(error["message"], str)
    if status in _FIELDLESS:
        return
    body = case.operation.definition.raw.get("requestBody", {})
    schema = body.get("content", {}).get("application/json", {}).get("schema", {})
    names = set(schema.get("properties", {}))
    message = error["message"]
    named = any(re.search(rf"\b{re.escape(n)}\b", message) for n in names)
    assert named or re.search(r"request body|Content-Type|Content-Length|body", message), message


def _fuzz(operation, mode, *, examples: int, sent: dict[str, int], failures: list[str]) -> None:
    """Run ``examples`` generated cases of one operation in one mode; failures are collected."""
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=not os.environ.get("M3_FUZZ_RANDOM"),
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        sent[operation.label] = sent.get(operation.label, 0) + 1
        try:
            response = case.call_and_validate(headers=AUTH)
            _names_the_field(response, case)
        except BaseException as exc:  # schemathesis' FailureGroup is a BaseExceptionGroup
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            failures.append(f"{operation.label} ({mode.value}): {str(exc)[:2000]}")

    run()


def test_fuzz_every_endpoint_with_schemathesis(live, capsys):
    """Every generated request, valid or not (schemathesis' positive and negative modes),
    gets a documented 2xx or a 4xx whose JSON body names the field: never a 5xx, a hang
    (30 s request timeout) or a dropped connection (those raise). ``M3_FUZZ_EXAMPLES``
    sets the cases per operation and mode (default 40, ~30 s here); ``M3_FUZZ_RANDOM=1``
    draws new ones each run instead of the same derandomized set."""
    schemathesis = pytest.importorskip("schemathesis")

    url, _ = live
    config = schemathesis.Config.from_dict(
        {
            "base-url": url,
            "request-timeout": 30,
            "checks": {
                # 400 is valid JSON the model refuses (zero weights, dimensions); 413 a pair over
                # the reranker's length with truncate=false: both schema-valid by design.
                "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "413"]},
                "negative_data_rejection": {"expected-statuses": ["400", "401", "405", "413", "415", "422"]},
            },
        }
    )
    schema = schemathesis.openapi.from_url(url + "/openapi.json", config=config)
    examples = int(os.environ.get("M3_FUZZ_EXAMPLES", "40"))
    sent: dict[str, int] = {}
    failures: list[str] = []
    start = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if "requestBody" in operation.definition.raw:  # nothing to make invalid in a GET's optional header
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            _fuzz(operation, mode, examples=examples, sent=sent, failures=failures)
    seconds = time.perf_counter() - start
    total = sum(sent.values())
    with capsys.disabled():
        print(f"\nschemathesis: {total} requests over {len(sent)} operations in {seconds:.1f} s: {sent}")
    metrics = httpx.get(url + "/metrics", headers=AUTH).text
    statuses: dict[str, int] = {}
    for status, n in re.findall(r'm3_requests_total\{path="[^"]*",status="(\d+)"\} (\d+)', metrics):
        statuses[status] = statuses.get(status, 0) + int(n)
    with capsys.disabled():
        print(f"schemathesis: statuses over the server's life {dict(sorted(statuses.items()))}")
    assert not failures, "\n\n".join(failures[:5])
    assert total >= 10 * len(sent)
    assert not any(s.startswith("5") for s in statuses), metrics
    assert statuses.get("200", 0) >= total // 10  # the generated requests do reach the model
