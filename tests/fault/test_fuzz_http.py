"""Every HTTP route fuzzed from the gateway's own OpenAPI schema (schemathesis: valid requests and
requests that break the schema, with extra fields and odd headers): each answer is a success or a
4xx in the API's error shape, never a 5xx, while good streams run beside the fuzzing unharmed."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import given
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from fuzz_support import fuzz_settings

EXAMPLES_PER_ROUTE = 30
OPEN_ROUTES = {"/health", "/metrics"}  # not JSON APIs: 503 while no worker is a state, not an error


@pytest.fixture(scope="module")
def api_schema(fuzzed_cluster, good_traffic):
    return schemathesis.openapi.from_url(f"{fuzzed_cluster.url}/openapi.json")


def errors_are_typed(ctx, response, case) -> bool | None:
    """A refusal says what was wrong in the shape its API's clients parse."""
    if 400 <= response.status_code < 500 and case.operation.path not in OPEN_ROUTES:
        body = json.loads(response.content)
        if case.operation.path.startswith("/v1/") or case.operation.path == "/infill":  # OpenAI's, llama.cpp's
            assert set(body["error"]) >= {"message", "type", "code"}, body
        else:
            assert isinstance(body["error"], str) and isinstance(body["error_type"], str), body
    return None


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_http_routes_answer_every_request(api_schema, mode):
    # operations one by one, each with its own examples (schemathesis' pytest loader does not run
    # under this pytest)
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # a route without a request body has nothing to get wrong

        @fuzz_settings(EXAMPLES_PER_ROUTE)
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            response = case.call(timeout=60)
            case.validate_response(response, checks=[not_a_server_error, errors_are_typed])

        fuzz()
