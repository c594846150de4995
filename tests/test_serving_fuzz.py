"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis, in-process over ASGI, tiny model):
schema-valid and schema-breaking requests to every endpoint never get a 5xx, and every refusal is in
OpenAI's error shape. Bounded examples keep it to seconds."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings

from metalm.serving.engine import Engine
from metalm.serving.server import ServerSettings, create_app
from tests.serving_helpers import MODEL_NAME, TEST_SETTINGS

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLES = 60  # per generation mode, over all operations


@pytest.fixture(scope="module")
def api(serving_model_dir):
    engine = Engine.from_pretrained(serving_model_dir, device="cpu", name=MODEL_NAME)
    # Short answers keep each generated request cheap; "testserver" is the in-process client's Host.
    overrides = dict(max_tokens_limit=4, default_max_tokens=2, request_timeout_s=10.0)
    app = create_app(
        engine, ServerSettings(**{**TEST_SETTINGS, **overrides, "allowed_hosts": ("testserver", "localhost")})
    )
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        engine.close()


def test_published_schema_carries_the_limits(api):
    """The schema the fuzzer draws from is the request model itself, bounded by the server's settings."""
    schemas = api.raw_schema["components"]["schemas"]
    body = api.raw_schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    fields = schemas["ChatCompletionRequest"]["properties"]
    assert fields["model"]["enum"] == [MODEL_NAME]
    assert fields["max_tokens"]["anyOf"][0]["maximum"] == 4
    assert fields["n"]["anyOf"][0]["maximum"] == ServerSettings().max_n
    assert fields["messages"]["maxItems"] == ServerSettings().max_messages
    assert "tools" not in fields  # refused when set: not offered
    assert schemas["Message"]["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant"]
    assert "ChatCompletion" in schemas and "ErrorResponse" in schemas


def _check(case, response) -> None:
    where = f"{case.method} {case.path} {case.body!r:.300}"
    assert response.status_code < 500, f"{response.status_code} for {where}: {response.text[:300]}"
    if response.status_code >= 400:
        body = json.loads(response.text)
        assert set(body) == {"error"}, where
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
        assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_fuzz_no_server_errors(api, mode):
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=api.as_strategy(generation_mode=mode))
    def run(case) -> None:
        response = case.call()
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        _check(case, response)

    run()
    if mode == GenerationMode.POSITIVE:
        assert seen.get(200, 0) > 0, seen  # schema-valid requests do reach the model
    assert sum(seen.values()) >= EXAMPLES // 2, seen
