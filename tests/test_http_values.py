"""Values a client sends (issue #19): numbers at and past their bounds never give NaN or infinity, invalid
Unicode anywhere is a 400, and a chat's message count and rendered size are bounded.

The sampler is checked alone with hypothesis (no model: random logits, NaN and infinities included); the
limits over the real app in-process where a flag's value matters, and over a real job (uvicorn, the
official client, raw bytes through httpx) for what a client sees."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.jobs import Job, tiny_args

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
JSON = {"content-type": "application/json"}
NO_EOS = {"2": -100}  # the tiny model's <|im_end|>

# -- the sampler: any settings, any logits -> a token of the vocabulary and finite logprobs ------------

EXTREME = [0.0, -0.0, 5e-324, 1e-300, 1e-30, 1e-6, 1e-5, 0.5, 1.0, 2.0, 10.0, 1e30, 1e300, 1.7e308]
extreme = st.one_of(st.sampled_from(EXTREME + [-x for x in EXTREME]), st.floats(-1e308, 1e308))
logit = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 0.0]),
    st.floats(-1e6, 1e6, width=32),
)


@st.composite
def sampling_case(draw: st.DrawFn) -> tuple[Any, list[list[float]], int]:
    from cluster.requests import SamplingParams

    vocab = draw(st.integers(1, 24))
    rows = draw(st.lists(st.lists(logit, min_size=vocab, max_size=vocab), min_size=1, max_size=3))
    bias = draw(st.lists(st.tuples(st.integers(0, vocab - 1), extreme), max_size=4))
    params = SamplingParams(
        temperature=draw(st.one_of(st.sampled_from(EXTREME + [math.inf, math.nan]), st.floats(0, 1e308))),
        top_p=draw(st.one_of(st.sampled_from([5e-324, 1e-300, 0.5, 1.0]), st.floats(5e-324, 1.0))),
        top_k=draw(st.integers(0, vocab + 3)),
        min_p=draw(st.one_of(st.sampled_from([0.0, 5e-324, 1.0]), st.floats(0.0, 1.0))),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**63 - 1))),
        logit_bias=tuple(bias),
        logprobs=draw(st.one_of(st.none(), st.integers(0, 30))),
        presence_penalty=draw(extreme),
        frequency_penalty=draw(extreme),
        repetition_penalty=draw(
            st.one_of(st.sampled_from([5e-324, 1e-300, 1.0, 1e300]), st.floats(5e-324, 1e308))
        ),
    )
    return params, rows, draw(st.integers(1, 3))


def test_sampler_gives_valid_tokens_and_finite_logprobs_for_any_settings_and_logits() -> None:
    import mlx.core as mx

    from cluster.requests import GenerationRequest, Request
    from rank.sampler import Sampler

    sampler = Sampler()

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(case=sampling_case())
    def one(case: tuple[Any, list[list[float]], int]) -> None:
        params, rows, steps = case
        vocab = len(rows[0])
        reqs = [
            Request.from_submission(GenerationRequest(f"r{i}", (0, vocab - 1), params, print), i, str)
            for i in range(len(rows))
        ]
        logits = mx.array(rows, dtype=mx.float32)
        for _ in range(steps):  # later steps see the generated tokens' penalties
            for out in sampler.sample(reqs, logits):
                assert 0 <= out.token_id < vocab
                if params.logprobs is None:
                    assert out.logprob is None
                    continue
                lp = out.logprob
                assert lp is not None and lp.token_id == out.token_id
                assert math.isfinite(lp.logprob) and lp.logprob <= 1e-3, lp
                assert len(lp.top) == min(params.logprobs, vocab)
                assert all(0 <= t < vocab and math.isfinite(v) and v <= 1e-3 for t, v in lp.top), lp

    one()


def test_tiny_temperatures_are_greedy() -> None:
    import mlx.core as mx

    from api.schemas import GREEDY_BELOW as API_GREEDY_BELOW
    from cluster.requests import GenerationRequest, Request, SamplingParams
    from rank.sampler import GREEDY_BELOW, Sampler

    assert API_GREEDY_BELOW == GREEDY_BELOW  # the API maps these temperatures to 0 (the fast path)
    logits = mx.array([[1.0, 30.0, 29.999, -5.0]])
    for temperature in (1e-300, 1e-30, GREEDY_BELOW / 2):
        params = SamplingParams(temperature=temperature, logprobs=2)
        req = Request.from_submission(GenerationRequest("r", (0,), params, print), 0, str)
        for _ in range(20):
            out = Sampler().sample([req], logits)[0]
            assert out.token_id == 1 and out.logprob is not None and math.isfinite(out.logprob.logprob)


# -- the app in-process: flags' values, the schema ----------------------------------------------------


def make_app(model_dir: Path, **limits: Any) -> Any:
    from api.app import create_app
    from api.service import Service
    from cluster.config import ServingConfig, ServingLimits
    from cluster.engine_client import EngineClient
    from rank.tokenizer import ChatTokenizer

    tok = ChatTokenizer(model_dir)
    config = ServingConfig("tiny", context_length=2048, limits=ServingLimits(**limits))
    return create_app(Service(EngineClient(max_waiting=4), tok, config, tok.vocab_size))


def run(app: Any, scenario: Callable[[httpx.AsyncClient], Coroutine[Any, Any, None]]) -> None:
    """The app in its lifespan; errors come back as responses, as uvicorn sends them (no engine: a
    request that passes every check gets 503 "unavailable" at submission)."""

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://orchard") as http:
                await scenario(http)

    asyncio.run(main())


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def messages(n: int, content: str = "hi") -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": content} for i in range(n)]


def test_message_count_is_checked_before_validation(tiny_model: Path) -> None:
    app = make_app(tiny_model, max_messages=3)

    async def scenario(http: httpx.AsyncClient) -> None:
        r = await http.post(CHAT, json={"model": "tiny", "messages": messages(3), "max_tokens": 1})
        assert error_of(r, 503)["code"] == "unavailable"  # within the limit: rendered, refused by no engine
        over = {"model": "tiny", "messages": messages(4), "max_tokens": 1}
        err = error_of(await http.post(CHAT, json=over), 400)
        assert (
            err["code"] == "too_many_messages"
            and err["param"] == "messages"
            and "limit of 3" in err["message"]
        )
        # counted before pydantic reads a message: invalid messages over the limit get the count's 400
        bad = {"model": "tiny", "messages": [{"role": "bogus"}] * 4}
        assert error_of(await http.post(CHAT, json=bad), 400)["code"] == "too_many_messages"

    run(app, scenario)


def test_rendered_template_size_is_bounded(tiny_model: Path) -> None:
    from api.prompts import template_limit
    from cluster.config import ServingLimits

    assert template_limit(ServingLimits(max_body_bytes=1000)) == 4000  # default: relative to the body
    assert template_limit(ServingLimits(max_body_bytes=1000, max_template_chars=50)) == 50
    app = make_app(tiny_model, max_template_chars=400)

    async def scenario(http: httpx.AsyncClient) -> None:
        fits = {"model": "tiny", "messages": messages(2, "x" * 100), "max_tokens": 1}
        assert error_of(await http.post(CHAT, json=fits), 503)["code"] == "unavailable"
        # under 400 characters of content, but the template's markers take it over
        over = {"model": "tiny", "messages": messages(12, "x" * 10), "max_tokens": 1}
        err = error_of(await http.post(CHAT, json=over), 400)
        assert err["code"] == "template_output_too_large" and err["param"] == "messages"
        assert "limit of 400" in err["message"]

    run(app, scenario)


def test_openapi_schema_documents_the_bounds(tiny_model: Path) -> None:
    schemas = make_app(tiny_model).openapi()["components"]["schemas"]

    def bounds(model: str, name: str) -> tuple[Any, Any]:
        prop = schemas[model]["properties"][name]
        spec = next((s for s in prop.get("anyOf", [prop]) if s.get("type") in ("number", "integer")), prop)
        return spec.get("minimum", spec.get("exclusiveMinimum")), spec.get("maximum")

    assert bounds("ChatCompletionRequest", "temperature") == (0.0, 2.0)
    assert bounds("ChatCompletionRequest", "top_p") == (0.0, 1.0)
    assert bounds("ChatCompletionRequest", "repetition_penalty") == (0.01, 10.0)
    assert bounds("ChatCompletionRequest", "max_tokens") == (1, 2**31 - 1)
    assert bounds("ChatCompletionRequest", "top_k") == (-1, 2**31 - 1)
    assert bounds("ChatCompletionRequest", "top_logprobs") == (0, 20)
    assert bounds("CompletionRequest", "logprobs") == (0, 20)
    assert "--max-messages" in schemas["ChatCompletionRequest"]["properties"]["messages"]["description"]


def test_flags_of_the_new_limits() -> None:
    from cluster.errors import ConfigError
    from rank.cli import build_parser, validate

    args = build_parser().parse_args([])
    assert (args.max_messages, args.max_template_chars) == (4096, 0)
    for bad in (["--max-messages", "0"], ["--max-template-chars", "-1"]):
        with pytest.raises(ConfigError):
            validate(build_parser().parse_args(bad))


# -- a real job -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(job_factory, tiny_model: Path) -> Job:  # type: ignore[no-untyped-def]
    return job_factory.start(1, tiny_args(tiny_model, "--max-tokens", "64"), "values")


def raw_post(job: Job, path: str, content: bytes) -> httpx.Response:
    return httpx.post(job.url + path, content=content, headers=JSON, timeout=60)


def assert_finite_logprobs(body: dict[str, Any]) -> int:
    """How many logprobs `body` (a JSON answer, parsed strictly: NaN or Infinity fail) holds."""
    found = 0
    for choice in body["choices"]:
        lp = choice["logprobs"]
        if "content" in lp:  # chat
            values = [t["logprob"] for t in lp["content"]]
            tops = [x["logprob"] for t in lp["content"] for x in t["top_logprobs"]]
        else:
            values = lp["token_logprobs"]
            tops = [v for top in lp["top_logprobs"] for v in top.values()]
        assert all(math.isfinite(v) and v <= 0 for v in values + tops), lp
        found += len(values)
    return found


def strict_json(r: httpx.Response) -> dict[str, Any]:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a response: {r.text[:300]}")

    assert r.status_code == 200, r.text
    return dict(json.loads(r.text, parse_constant=refuse))


@pytest.mark.cluster
def test_out_of_range_numbers_get_400_naming_the_field(job: Job) -> None:
    base = b'{"model":"tiny","prompt":"x","max_tokens":2,'
    cases = {
        b'"temperature":1e400}': "temperature",
        b'"temperature":NaN}': "temperature",
        b'"top_p":-Infinity}': "top_p",
        b'"repetition_penalty":1e-300}': "repetition_penalty",
        b'"repetition_penalty":1e300}': "repetition_penalty",
        b'"presence_penalty":1e308}': "presence_penalty",
        b'"frequency_penalty":-1e400}': "frequency_penalty",
        b'"logit_bias":{"5":1e308}}': "logit_bias.5",
        b'"min_p":NaN}': "min_p",
        b'"top_k":1e100}': "top_k",
        b'"top_k":' + b"9" * 30 + b"}": "top_k",
        b'"seed":' + b"9" * 30 + b"}": "seed",
        b'"logprobs":21}': "logprobs",
        b'"max_tokens":' + b"9" * 20 + b"}": "max_tokens",
    }
    for tail, param in cases.items():
        r = raw_post(job, TEXT, base + tail)
        assert error_of(r, 400)["param"] == param, (tail, r.text)
    chat = b'{"model":"tiny","messages":[{"role":"user","content":"x"}],'
    assert error_of(raw_post(job, CHAT, chat + b'"top_logprobs":1e400,"logprobs":true}'), 400)["param"] == (
        "top_logprobs"
    )
    assert error_of(raw_post(job, TEXT, base + b'"n":' + b"9" * 5000 + b"}"), 400)["code"] == "invalid_value"


@pytest.mark.cluster
def test_in_range_extremes_answer_with_finite_logprobs(job: Job) -> None:
    import openai

    client = openai.OpenAI(base_url=job.url + "/v1", api_key="x", max_retries=0, timeout=60)
    extremes: list[dict[str, Any]] = [
        {"temperature": 1e-300},  # greedy
        {"temperature": 2.0, "top_p": 1e-300, "seed": 2**63 - 1},
        {"temperature": 2.0, "extra_body": {"min_p": 1.0, "top_k": 2**31 - 1}},
        {"extra_body": {"repetition_penalty": 0.01, "top_k": -1}, "temperature": 2.0},
        {"extra_body": {"repetition_penalty": 10.0}, "presence_penalty": -2.0, "frequency_penalty": -2.0},
        {"presence_penalty": 2.0, "frequency_penalty": 2.0, "temperature": 1e-5},
        {"logit_bias": {str(i): 100 for i in range(3, 259)}},  # the tiny model's 256 byte tokens tie at +100
        {"logit_bias": {str(i): -100 for i in range(3, 259)}, "temperature": 2.0},
    ]
    for extra in extremes:
        args = {"model": "tiny", "max_tokens": 8, "logit_bias": NO_EOS, **extra}
        chat = client.chat.completions.with_raw_response.create(
            messages=[{"role": "user", "content": "extreme"}], logprobs=True, top_logprobs=20, **args
        )
        assert assert_finite_logprobs(strict_json(chat.http_response)) >= 1, extra
        text = client.completions.with_raw_response.create(prompt="extreme", logprobs=20, **args)
        assert assert_finite_logprobs(strict_json(text.http_response)) >= 1, extra


@pytest.mark.cluster
def test_invalid_unicode_anywhere_is_a_400(job: Job) -> None:
    lone = [b"\\ud800", b"\\udfff", b"a\\ud83db", b"\\ude00\\ud83d"]  # lone, or a pair in the wrong order
    bad_bytes = [b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xc0\xaf"]
    msg = b'{"model":"tiny","max_tokens":1,"messages":[{"role":"user","content":"%s"}]}'
    places = [
        (CHAT, msg, "messages.0.content"),
        (
            CHAT,
            b'{"model":"tiny","messages":[{"role":"user","content":[{"type":"text","text":"%s"}]}]}',
            None,
        ),
        (CHAT, b'{"model":"tiny","messages":[{"role":"user","content":"x","name":"%s"}]}', None),
        (TEXT, b'{"model":"tiny","prompt":"x","stop":["%s"]}', "stop.0"),
        (TEXT, b'{"model":"tiny","prompt":"x","stop":"%s"}', "stop"),
        (TEXT, b'{"model":"tiny","prompt":"x","user":"%s"}', "user"),
        (TEXT, b'{"model":"tiny","prompt":"%s"}', "prompt"),
        (TEXT, b'{"model":"%s","prompt":"x"}', "model"),
        (TEXT, b'{"model":"tiny","prompt":"x","logit_bias":{"%s":1}}', None),
        (TEXT, b'{"model":"tiny","prompt":"x","unknown_field":{"%s":"x"}}', None),
    ]
    for path, template, param in places:
        for bad in lone:
            err = error_of(raw_post(job, path, template % bad), 400)
            assert err["code"] == "invalid_unicode" and "surrogate" in err["message"], (template, bad)
            if param is not None:
                assert err["param"] == param
        for bad in bad_bytes:
            err = error_of(raw_post(job, path, template % bad), 400)
            assert err["code"] == "invalid_unicode" and "UTF-8" in err["message"], (template, bad)
    # a valid pair, written as escapes or as UTF-8, is an emoji: answered
    for good in (b"\\ud83d\\ude00", "\U0001f600".encode()):
        r = raw_post(job, TEXT, b'{"model":"tiny","prompt":"%s","max_tokens":1,"stop":"%s"}' % (good, good))
        assert r.status_code == 200, r.text
    assert httpx.get(job.url + "/health").json()["engine"] == "ready"


@pytest.mark.cluster
def test_message_count_default_limit(job: Job) -> None:
    body = json.dumps({"model": "tiny", "max_tokens": 1, "messages": messages(4097, "")}).encode()
    err = error_of(raw_post(job, CHAT, body), 400)
    assert err["code"] == "too_many_messages" and "limit of 4096" in err["message"]
    within = json.dumps({"model": "tiny", "max_tokens": 1, "messages": messages(4096, "")}).encode()
    err = error_of(raw_post(job, CHAT, within), 400)  # rendered, then longer than the tiny context
    assert err["code"] == "context_length_exceeded"
