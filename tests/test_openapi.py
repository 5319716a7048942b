"""The OpenAPI document describes the server as it is (issue #15): schemathesis generates requests from it,
valid and invalid, against a real job on the embedded model, and every answer must be a status the
document lists for that route (no 5xx, no 422), with the documented content type and body schema.

Bounded so it runs in about a minute: a few dozen examples, and server limits (--max-tokens 4,
--max-prompt-tokens 48, a small queue) that turn long generations into the documented 400 or 429."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.jobs import Job

pytestmark = pytest.mark.cluster
KEY = "openapi-key"
ROUTES = r"^/(v1/|health)"


@pytest.fixture(scope="module")
def job(job_factory) -> Job:  # type: ignore[no-untyped-def]
    args = ["--api-key", KEY, "--max-tokens", "4", "--default-max-tokens", "4", "--max-prompt-tokens", "48"]
    args += ["--max-batch", "4", "--max-queue", "4", "--max-body-bytes", "65536", "--request-timeout", "30"]
    return job_factory.start(1, args, "openapi")


def test_the_document_lists_400_not_422_and_streams(job: Job) -> None:
    doc = httpx.get(job.url + "/openapi.json").json()
    assert "422" not in str(doc["paths"]) and "HTTPValidationError" not in doc["components"]["schemas"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "429", "503"} <= set(responses)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    temperature = next(s for s in props["temperature"]["anyOf"] if s.get("type") == "number")
    assert (temperature["minimum"], temperature["maximum"]) == (0.0, 2.0)
    top_p = next(s for s in props["top_p"]["anyOf"] if s.get("type") == "number")
    assert (top_p["exclusiveMinimum"], top_p["maximum"]) == (0.0, 1.0)


def test_schemathesis_finds_no_undocumented_answer(job: Job) -> None:
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(job.url + "/openapi.json").include(path_regex=ROUTES)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    auth = {"Authorization": f"Bearer {KEY}"}
    common = settings(
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )

    import collections

    seen: collections.Counter[tuple[str, int]] = collections.Counter()
    for mode, examples in ((GenerationMode.POSITIVE, 60), (GenerationMode.NEGATIVE, 30)):

        @settings(common, max_examples=examples)
        @given(case=schema.as_strategy(mode))
        def one(case: schemathesis.Case) -> None:
            r = case.call_and_validate(base_url=job.url, headers=auth, checks=checks, timeout=60)
            seen[(case.operation.path, r.status_code)] += 1

        one()
    assert seen[("/v1/chat/completions", 200)] > 0, seen  # generation ran, not only rejections
