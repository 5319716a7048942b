"""The OpenAI surface against a real one-rank job (tiny model, real uvicorn, official client):
request fields, OpenAI's error model, auth and every configured limit."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx
import openai
import pytest

from tests.jobs import Job, tiny_args

pytestmark = pytest.mark.cluster
KEYS = ("key-one", "key-two")
NO_EOS = {"2": -100}  # the tiny model's <|im_end|>: keep generating to max_tokens


def printable_bias(model_dir: Path) -> dict[str, int]:
    """Ban every token but printable ASCII bytes, so the random tiny model writes readable text."""
    from rank.tokenizer import ChatTokenizer

    tok = ChatTokenizer(model_dir)
    allowed = {tok.encode(chr(c))[0] for c in range(32, 127)}
    return {str(i): -100 for i in range(tok.vocab_size) if i not in allowed}


@pytest.fixture(scope="module")
def job(job_factory, tiny_model: Path) -> Job:  # type: ignore[no-untyped-def]
    args = tiny_args(tiny_model, "--api-key", KEYS[0], "--api-key", KEYS[1])
    args += [
        "--max-body-bytes",
        "20000",
        "--max-tokens",
        "300",
        "--max-prompt-tokens",
        "500",
        "--max-context",
        "600",
    ]
    args += ["--max-batch", "2", "--max-queue", "2"]
    return job_factory.start(1, args, "api")


def client(job: Job, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=job.url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(job: Job, path: str, body: object, key: str | None = KEYS[0]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(job.url + path, json=body, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def greedy(job: Job, prompt: str, n: int, **extra: object) -> openai.types.Completion:
    extra = {"logit_bias": NO_EOS, "temperature": 0, **extra}
    return client(job).completions.create(model="tiny", prompt=prompt, max_tokens=n, **extra)  # type: ignore[arg-type]


def test_auth(job: Job) -> None:
    assert_error(post(job, "/v1/models", None, key=None), 401, "invalid_api_key")
    r = httpx.get(job.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401, "invalid_api_key")
    for key in KEYS:
        assert [m.id for m in client(job, key).models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        client(job, "nope").models.list()
    assert httpx.get(job.url + "/health").status_code == 200  # liveness needs no key


def test_error_shapes_and_statuses(job: Job) -> None:
    assert_error(
        post(job, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "model_not_found", "model"
    )
    assert_error(httpx.get(job.url + "/nowhere"), 404)
    r = httpx.post(
        job.url + "/v1/chat/completions", content=b"{", headers={"Authorization": f"Bearer {KEYS[0]}"}
    )
    assert_error(r, 400)
    assert_error(post(job, "/v1/chat/completions", {"model": "tiny"}), 400, param="messages")
    assert_error(
        post(job, "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 9}),
        400,
        param="temperature",
    )
    big = {"model": "tiny", "prompt": "x" * 30000}
    assert_error(post(job, "/v1/completions", big), 413, "request_too_large")
    long_prompt = {"model": "tiny", "prompt": "y" * 501, "max_tokens": 1}
    assert_error(post(job, "/v1/completions", long_prompt), 400, "context_length_exceeded")
    over = {"model": "tiny", "prompt": "y" * 400, "max_tokens": 250}
    assert_error(post(job, "/v1/completions", over), 400, "context_length_exceeded", "max_tokens")
    assert_error(
        post(job, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 301}),
        400,
        param="max_tokens",
    )
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(job, "/v1/chat/completions", {**chat, "n": 129}), 400, param="n")
    # more choices than --max-queue (2) could never be admitted: a 400, not a 429 clients retry forever
    assert_error(post(job, "/v1/chat/completions", {**chat, "n": 3}), 400, param="n")
    prompts = {"model": "tiny", "prompt": ["a", "b"], "n": 2}
    assert_error(post(job, "/v1/completions", prompts), 400, param="n")
    assert_error(
        post(job, "/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}),
        400,
        param="tools.0.function",
    )
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    rf = {**chat, "response_format": bad_schema}
    assert_error(post(job, "/v1/chat/completions", rf), 400, "invalid_schema", "response_format")
    assert_error(
        post(job, "/v1/chat/completions", {**chat, "stop": ["a", "b", "c", "d", "e"]}), 400, param="stop"
    )
    img = {
        "model": "tiny",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
    }
    assert_error(post(job, "/v1/chat/completions", img), 400, param="messages.0.content")
    with pytest.raises(openai.BadRequestError):
        client(job).chat.completions.create(model="tiny", messages=[], max_tokens=1)


def test_stop_strings_are_never_emitted_streamed_or_not(job: Job, tiny_model: Path) -> None:
    bias = printable_bias(tiny_model)
    seeded = {
        "temperature": 0.8,
        "seed": 1,
        "logit_bias": bias,
    }  # greedy text of a random model repeats itself
    full = greedy(job, "stop test", 40, **seeded).choices[0].text
    assert len(full) == 40
    start = next(i for i in range(10, 30) if full[i : i + 3] not in full[: i + 2])
    stop = full[start : start + 3]  # three characters: three byte-level tokens
    expected = full[:start]
    r = greedy(job, "stop test", 40, stop=[stop, "@@@@"], **seeded)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == start + len(stop)
    chunks = list(
        client(job).completions.create(
            model="tiny",
            prompt="stop test",
            max_tokens=40,
            stop=stop,
            stream=True,
            **seeded,  # type: ignore[arg-type]
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_logprobs_echo_token_prompts_and_seed(job: Job) -> None:
    r = client(job).chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        logit_bias=NO_EOS,  # type: ignore[arg-type]
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-5 for t in content)  # greedy picks the top token

    e = greedy(job, "echo me", 4, echo=True)
    assert e.choices[0].text.startswith("echo me") and len(e.choices[0].text) > len("echo me")
    ids = greedy(job, "abc", 4, logprobs=0, extra_body={"return_tokens_as_token_ids": True})
    tokens = ids.choices[0].logprobs.tokens  # type: ignore[union-attr]
    assert tokens is not None and len(tokens) == 4 and all(t.startswith("token_id:") for t in tokens)
    prompt_ids = [int(b) + 3 for b in b"abc"]  # byte-level ids sit after the 3 special tokens
    same = client(job).completions.create(
        model="tiny", prompt=prompt_ids, max_tokens=4, temperature=0, logit_bias=NO_EOS
    )  # type: ignore[arg-type]
    assert same.choices[0].text == greedy(job, "abc", 4).choices[0].text

    def sample(seed: int) -> str:
        return (
            client(job)
            .completions.create(model="tiny", prompt="seed", max_tokens=12, temperature=1.0, seed=seed)
            .choices[0]
            .text
        )

    assert sample(5) == sample(5)
    assert len({sample(s) for s in range(4)}) > 1


def test_queue_full_gets_429_with_retry_after(job: Job) -> None:
    body = {"model": "tiny", "prompt": "q", "max_tokens": 300, "logit_bias": NO_EOS}

    def one(_: int) -> httpx.Response:
        return post(job, "/v1/completions", body)

    with cf.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    codes = sorted(r.status_code for r in results)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    limited = next(r for r in results if r.status_code == 429)
    assert limited.headers["retry-after"] and limited.json()["error"]["type"] == "rate_limit_error"
    assert codes.count(200) >= 4  # 2 running + 2 waiting always fit


def test_request_timeout_is_504_and_a_stream_error_event(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    job = job_factory.start(1, tiny_args(tiny_model, "--request-timeout", "1"), "timeout")
    body = {"model": "tiny", "prompt": "slow", "max_tokens": 1800, "logit_bias": NO_EOS}
    assert_error(post(job, "/v1/completions", body, key=None), 504, "timeout")
    with httpx.stream("POST", job.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert any('"error"' in ln and "timed out" in ln for ln in lines)
    with pytest.raises(openai.APIError):
        list(
            openai.OpenAI(base_url=job.url + "/v1", api_key="x", max_retries=0).completions.create(
                model="tiny",
                prompt="slow",
                max_tokens=1800,
                logit_bias=NO_EOS,
                stream=True,  # type: ignore[arg-type]
            )
        )
    stats = httpx.get(job.url + "/health").json()["engine_stats"]
    assert stats["running"] == 0 and stats["sequences_on_ranks"] == 0


def test_penalties_change_repetitive_greedy_output(job: Job) -> None:
    plain = greedy(job, "The", 24).choices[0].text
    assert len(set(plain)) <= 3  # the random tiny model's greedy output repeats one or two bytes
    for extra in (
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"extra_body": {"repetition_penalty": 5.0}},
    ):
        varied = greedy(job, "The", 24, **extra).choices[0].text
        assert len(set(varied)) > len(set(plain)), extra
        assert varied == greedy(job, "The", 24, **extra).choices[0].text  # still deterministic
