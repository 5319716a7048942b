"""Hypothesis-driven fuzz of the HTTP API on a real job: no input, valid-looking or not, gets a 5xx,
crashes a rank, leaks a sequence or changes what the cluster answers afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.jobs import Job, tiny_args

pytestmark = pytest.mark.cluster

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.lists(st.integers(-5, 300), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool", "bogus"]),
        "content": st.one_of(st.text(max_size=30), junk),
    }
)
fields = {
    "model": st.sampled_from(["tiny", "tiny", "other", ""]),
    "max_tokens": st.one_of(st.integers(-2, 6), junk),
    "max_completion_tokens": st.one_of(st.integers(0, 6), junk),
    "temperature": st.one_of(st.floats(-1, 3), junk),
    "top_p": st.one_of(st.floats(-0.5, 1.5), junk),
    "top_k": st.one_of(st.integers(-3, 400), junk),
    "min_p": st.one_of(st.floats(-0.5, 1.5), junk),
    "seed": st.one_of(st.integers(-(2**64), 2**65), junk),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=6), junk),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
    "n": st.one_of(st.integers(-1, 3), junk),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 25), junk),
    "top_logprobs": st.one_of(st.integers(-1, 25), junk),
    "logit_bias": st.one_of(st.dictionaries(st.text(max_size=4), st.floats(-200, 200), max_size=3), junk),
    "echo": st.one_of(st.booleans(), junk),
    "response_format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}), junk
    ),
    "presence_penalty": st.one_of(st.floats(-3, 3), junk),
}
bodies = st.fixed_dictionaries(
    {},
    optional={
        **fields,
        "messages": st.one_of(st.lists(message, max_size=3), junk),
        "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-3, 400), max_size=6), junk),
        "extra": junk,
    },
)


@pytest.fixture(scope="module")
def job(job_factory, tiny_model: Path) -> Job:  # type: ignore[no-untyped-def]
    args = tiny_args(tiny_model, "--max-tokens", "6", "--default-max-tokens", "4")
    return job_factory.start(2, args, "fuzz")


def greedy(job: Job) -> str:
    body = {
        "model": "tiny",
        "prompt": "fuzz check",
        "max_tokens": 6,
        "temperature": 0,
        "logit_bias": {"2": -100},
    }
    return str(httpx.post(job.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"])


def test_fuzzed_bodies_never_hurt_the_cluster(job: Job) -> None:
    before = greedy(job)
    http = httpx.Client(base_url=job.url, timeout=60)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=bodies, raw=st.booleans())
    def one(path: str, body: dict, raw: bool) -> None:
        content = json.dumps(body).encode()
        if raw:
            content = content[: len(content) // 2]  # truncated JSON
        r = http.post(path, content=content, headers={"content-type": "application/json"})
        assert r.status_code < 500, (path, body, r.status_code, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")

    one()
    health = httpx.get(job.url + "/health").json()
    assert health["engine"] == "ready"
    assert health["engine_stats"]["sequences_on_ranks"] == 0
    assert greedy(job) == before
