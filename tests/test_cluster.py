"""End to end with real parts: the venv's mpirun, `python -m rank`, uvicorn on 127.0.0.1, the official
openai client. Greedy output under tensor parallelism must equal one rank's, token for token."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx
import openai
import pytest

from tests.jobs import Job, tiny_args

pytestmark = pytest.mark.cluster

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "Orchard serves models from a cluster of Macs",
]


@pytest.fixture(scope="module")
def tiny_tp2(job_factory, tiny_model: Path) -> Job:  # type: ignore[no-untyped-def]
    return job_factory.start(2, tiny_args(tiny_model), "tiny-tp2")


@pytest.fixture(scope="module")
def tiny_tp1(job_factory, tiny_model: Path) -> Job:  # type: ignore[no-untyped-def]
    return job_factory.start(1, tiny_args(tiny_model), "tiny-tp1")


def client(job: Job) -> openai.OpenAI:
    return openai.OpenAI(base_url=job.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_ids(job: Job, prompt: str, n: int = 24, model: str = "tiny") -> list[int]:
    r = client(job).completions.create(
        model=model,
        prompt=prompt,
        max_tokens=n,
        temperature=0,
        logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    assert r.choices[0].logprobs is not None and r.choices[0].logprobs.tokens is not None
    return [int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens]


def test_openai_client_non_streaming_and_streaming(tiny_tp2: Job) -> None:
    c = client(tiny_tp2)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=10, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content  # same greedy answer streamed or not
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage


def test_raw_sse_ends_with_done(tiny_tp2: Job) -> None:
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", tiny_tp2.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"


def test_eight_concurrent_requests_of_different_lengths(tiny_tp2: Job) -> None:
    c = client(tiny_tp2)

    def one(i: int) -> tuple[int, int, str | None]:
        r = c.completions.create(
            model="tiny",
            prompt="x" * (5 + 40 * i),
            max_tokens=3 + 4 * i,
            temperature=0.7,
            seed=i,
            logit_bias={"2": -100},  # never <|im_end|>: every request runs to its own length
        )
        assert r.usage is not None
        return i, r.usage.completion_tokens, r.choices[0].finish_reason

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for i, n, reason in results:
        assert reason == "length" and n == 3 + 4 * i


def test_tp2_greedy_equals_tp1_token_for_token(tiny_tp2: Job, tiny_tp1: Job) -> None:
    for prompt in PROMPTS:
        assert greedy_ids(tiny_tp2, prompt) == greedy_ids(tiny_tp1, prompt), prompt


def test_tp2_concurrent_plain_greedy_equals_tp1(tiny_tp2: Job, tiny_tp1: Job) -> None:
    """Plain greedy requests (no logprobs) batched together: their steps gather each rank's pick, not its
    slice of the vocabulary (StepPlan.argmax); one request with logprobs among them turns a step's gather
    back to slices. Both give one rank's text, all at once."""

    def texts(job: Job) -> list[str]:
        c = client(job)

        def one(i: int) -> str:
            extra = {"logprobs": 1} if i == len(PROMPTS) else {}
            prompt = PROMPTS[i % len(PROMPTS)]
            r = c.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, **extra)  # type: ignore[call-overload]
            return str(r.choices[0].text)

        with cf.ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
            return list(pool.map(one, range(len(PROMPTS) + 1)))

    assert texts(tiny_tp2) == texts(tiny_tp1)


@pytest.fixture(scope="module")
def tiny_tp2_plain(job_factory, tiny_model: Path) -> Job:  # type: ignore[no-untyped-def]
    """TP=2 without speculation (a step with drafts is not chained, and on the tiny model's repetitive
    text the n-gram drafter drafts nearly every step) and without a prefix cache (a hit loads 8-bit
    blocks: a request repeated would not compute the same numbers)."""
    flags = ("--spec", "off", "--kv-ram-gb", "0", "--kv-ssd-dir", "none", "--log-level", "debug")
    return job_factory.start(2, tiny_args(tiny_model, *flags), "tiny-tp2-plain")


def test_top_k_sampling_gathers_k_entries_and_samples_as_from_the_slices(tiny_tp2_plain: Job) -> None:
    """Seeded sampling with top_k: without logprobs each rank sends rank 0 its k best entries a row
    (StepPlan.topk); asking for logprobs (which never change the pick) makes the step gather the
    vocabulary slices instead. Same seed, same tokens, for several k, top_p and temperatures."""
    c = client(tiny_tp2_plain)
    cases = [(5, 1.0, 1.0), (40, 0.8, 0.9), (1, 1.2, 1.0), (200, 1.5, 0.95)]
    for i, (k, temperature, top_p) in enumerate(cases):
        def text(logprobs: bool, i: int = i, k: int = k, temperature: float = temperature, top_p: float = top_p) -> str:
            r = c.completions.create(
                model="tiny", prompt=PROMPTS[i], max_tokens=24, temperature=temperature, top_p=top_p,
                seed=100 + i, logprobs=1 if logprobs else None, extra_body={"top_k": k},
            )  # fmt: skip
            return str(r.choices[0].text)

        assert text(False) == text(True), (k, temperature, top_p)
    log = tiny_tp2_plain.log_path.read_text()
    assert all(f"(top-{k} gather)" in log for k, _, _ in cases)  # the steps without logprobs took it


def test_sampling_at_a_temperature_gathers_picks_chains_and_samples_as_from_the_slices(tiny_tp2_plain: Job) -> None:
    """Seeded sampling at a temperature alone (what OpenAI clients send): without logprobs each rank adds
    its slice of the row's Gumbel noise to its logits and sends rank 0 its best entry (StepPlan.draws), and
    the decode steps chain; asking for logprobs makes the steps gather the vocabulary slices and rank 0
    sample. Same seed, same tokens, at several temperatures, and not the greedy text."""
    from tests.test_lifecycle import wait_idle

    c = client(tiny_tp2_plain)
    before = wait_idle(tiny_tp2_plain)["chained_steps"]
    sampled_differently = 0
    for i, temperature in enumerate((0.6, 1.0, 1.5)):
        def text(logprobs: bool, t: float = temperature, i: int = i) -> str:
            r = c.completions.create(
                model="tiny", prompt=PROMPTS[i], max_tokens=40, temperature=t, seed=200 + i,
                logprobs=1 if logprobs else None, extra_body={"ignore_eos": True},
            )  # fmt: skip
            return str(r.choices[0].text)

        picked = text(False)
        assert picked == text(True), temperature
        greedy = c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=40, temperature=0)
        sampled_differently += picked != greedy.choices[0].text
    assert sampled_differently >= 2
    log = tiny_tp2_plain.log_path.read_text()
    assert "(chained) (sampled picks)" in log  # the steps without logprobs gathered picks, chained
    assert wait_idle(tiny_tp2_plain)["chained_steps"] > before + 60


def test_chained_steps_with_stops_lengths_cancels_and_arrivals_equal_tp1(
    tiny_tp2_plain: Job, tiny_tp1: Job
) -> None:
    """At TP=2 plain greedy decode steps are chained (the next plan goes out while a step runs, and each
    row's input is the pick both ranks computed, rank/engine.py): rows that end on a stop string or at
    their max_tokens while a chained plan is already out, a stream closed mid-way and a request arriving
    mid-chain leave every other row's text as one rank gives it, and nothing behind on the ranks."""
    import time

    from tests.test_lifecycle import wait_idle

    tiny_tp2 = tiny_tp2_plain

    full = client(tiny_tp1).completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=40, temperature=0)
    stop = str(full.choices[0].text)[12:15]  # ends that request a dozen tokens in, on a text match
    assert stop, "the tiny model wrote nothing"

    def texts(job: Job) -> list[tuple[str, str | None]]:
        c = client(job)

        def one(i: int) -> tuple[str, str | None]:
            if i == 5:
                time.sleep(0.15)  # arrives while the others decode, chained
            extra = {"stop": [stop]} if i == 2 else {}
            r = c.completions.create(  # type: ignore[call-overload]
                model="tiny", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=(5, 17, 40, 150, 31, 25)[i],
                temperature=0, **extra,
            )  # fmt: skip
            return str(r.choices[0].text), r.choices[0].finish_reason

        def leave() -> None:  # a stream closed after a few tokens
            body = {"model": "tiny", "prompt": "leaving early", "max_tokens": 60, "temperature": 0, "stream": True}
            with httpx.stream("POST", job.url + "/v1/completions", json=body, timeout=60) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n > 6:
                        break

        with cf.ThreadPoolExecutor(7) as pool:
            gone = pool.submit(leave)
            out = list(pool.map(one, range(6)))
            gone.result()
        return out

    before = httpx.get(tiny_tp2.url + "/health", timeout=10).json()["engine_stats"]["chained_steps"]
    two, one_rank = texts(tiny_tp2), texts(tiny_tp1)
    assert two == one_rank
    assert two[2][1] == "stop" and two[0][1] == "length"
    after = wait_idle(tiny_tp2)
    assert after["chained_steps"] > before + 50  # the steps were chained (the 150-token row's alone, at least)
    assert wait_idle(tiny_tp1)["chained_steps"] == 0  # one rank has nobody to overlap with


def test_bad_input_gets_4xx_and_the_cluster_keeps_serving(tiny_tp2: Job) -> None:
    url = tiny_tp2.url
    before = greedy_ids(tiny_tp2, PROMPTS[0])
    bad = [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": []}'),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}'),
        ("/v1/completions", b'{"model": "tiny", "prompt": [999999999]}'),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": -1}'),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": 100000000}'),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": "hot"}'),
        ("/v1/completions", b'{"model": "other", "prompt": "x"}'),
        ("/v1/nope", b"{}"),
    ]
    for path, data in bad:
        r = httpx.post(url + path, content=data, headers={"content-type": "application/json"}, timeout=30)
        assert 400 <= r.status_code < 500, (path, data, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert greedy_ids(tiny_tp2, PROMPTS[0]) == before
    assert httpx.get(url + "/health").json()["engine"] == "ready"


def test_embedded_model_tp3_equals_tp1_and_knows_paris(job_factory) -> None:  # type: ignore[no-untyped-def]
    name = "SmolLM2-135M-Instruct"
    tp1 = job_factory.start(1, [], "smollm-tp1")
    tp3 = job_factory.start(3, [], "smollm-tp3")
    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    for job in (tp1, tp3):
        r = client(job).chat.completions.create(model=name, messages=question, temperature=0, max_tokens=20)
        assert "Paris" in (r.choices[0].message.content or "")
    for prompt in PROMPTS[:3]:
        assert greedy_ids(tp3, prompt, 16, name) == greedy_ids(tp1, prompt, 16, name), prompt
    tp1.stop()
    tp3.stop()


def test_launcher_with_one_rank_serves(job_factory, tiny_model: Path, tiny_tp1: Job) -> None:  # type: ignore[no-untyped-def]
    """`python -m rank --np 1` runs mpirun with one process: a world of one needs no MPI and must work
    like the plain single process, token for token."""
    job = job_factory.start(1, tiny_args(tiny_model), "launcher-np1", launcher=True)
    assert greedy_ids(job, PROMPTS[0]) == greedy_ids(tiny_tp1, PROMPTS[0])
    job.stop()
