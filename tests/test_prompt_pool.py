"""Prompts are rendered and tokenized off the event loop (`api.prompts`): the real app, the tiny model's
real tokenizer and chat template, over httpx's ASGI transport; no engine (it stays "starting", so a
request that passes every check is answered 503 at submission)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from api.app import create_app
from api.prompts import Prompt, PromptPool, ids_prompt, prompt_pool, text_prompt
from api.service import Service
from cluster.config import ServingConfig, ServingLimits
from cluster.engine_client import EngineClient
from rank.tokenizer import ChatTokenizer

CHAT = "/v1/chat/completions"
ROLE_CHECK = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('the conversation must start with a user message') }}{% endif %}"
)


def make_app(model_dir: Path, template_prefix: str = "") -> FastAPI:
    tok = ChatTokenizer(model_dir)
    assert tok.chat_template is not None
    tok.chat_template = template_prefix + tok.chat_template
    # Room for the 55,000-message body below: this file is about where rendering runs, not that limit.
    config = ServingConfig("tiny", context_length=2048, limits=ServingLimits(max_messages=100_000))
    return create_app(Service(EngineClient(max_waiting=4), tok, config, tok.vocab_size))


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app inside its lifespan (which closes the pool), as uvicorn runs it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orchard") as http:
            yield http


def run(app: FastAPI, scenario: Callable[[httpx.AsyncClient], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        async with serving(app) as http:
            await scenario(http)

    asyncio.run(main())


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def chat(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": messages, "max_tokens": 1, **extra}


@pytest.fixture(scope="module")
def app(tiny_model: Path) -> FastAPI:
    return make_app(tiny_model, ROLE_CHECK)


def test_health_and_small_prompts_answer_while_a_large_prompt_renders(app: FastAPI) -> None:
    # 55,000 messages, 3.6 MiB: just under the 4 MiB body limit, two million tokens (over the context)
    messages = [{"role": "user", "content": f"{i}: hello there, how are you"} for i in range(55000)]
    body = json.dumps(chat(messages)).encode()
    assert len(body) < ServingConfig("tiny", 1).limits.max_body_bytes
    small_body = chat([{"role": "user", "content": "hi"}])

    async def scenario(http: httpx.AsyncClient) -> None:
        big = asyncio.ensure_future(
            http.post(CHAT, content=body, headers={"content-type": "application/json"})
        )
        deadline = time.monotonic() + 60
        while getattr(app.state, "prompt_pool", None) is None or prompt_pool(app).in_flight == 0:
            assert not big.done(), big.result().text
            assert time.monotonic() < deadline, "the large prompt never reached the pool"
            await asyncio.sleep(0.001)
        in_pool = time.monotonic()
        assert app.state.service.client.preparing() >= 1  # the engine sees a request on its way
        answered = [in_pool]  # when /health and a small prompt were last answered
        while not big.done():  # while the large prompt renders, then while it is tokenized
            health = await http.get("/health")
            small = await http.post(CHAT, json=small_body)
            answered.append(time.monotonic())
            assert health.status_code == 200 and health.json()["engine"] == "starting"
            assert error_of(small, 503)["code"] == "unavailable"  # rendered, checked, refused by the engine
            await asyncio.sleep(0.01)
        big_s = time.monotonic() - in_pool
        err = error_of(big.result(), 400)
        assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
        gap = max(b - a for a, b in pairwise(answered))
        print(
            f"large prompt {big_s * 1e3:.0f} ms in the pool: {len(answered) - 1} answers, longest gap {gap * 1e3:.0f} ms"
        )
        # loose: answers keep coming while the large prompt is in the pool; none waits for it
        assert len(answered) > 3 and gap < big_s / 3

    run(app, scenario)


def test_worker_errors_are_the_same_openai_400s(app: FastAPI) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        r = await http.post(CHAT, json=chat([{"role": "assistant", "content": "I start"}]))
        err = error_of(r, 400)
        assert err["type"] == "invalid_request_error" and err["param"] == "messages"
        assert err["message"] == (
            "the chat template rejected these messages: the conversation must start with a user message"
        )
        image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
        err = error_of(await http.post(CHAT, json=chat(image)), 400)
        assert err["param"] == "messages.0.content" and "image_url" in err["message"]
        ids = {"model": "tiny", "prompt": [5, 10**6], "max_tokens": 1}
        err = error_of(await http.post("/v1/completions", json=ids), 400)
        assert err["param"] == "prompt" and "outside the vocabulary" in err["message"]
        # cheap limits are checked before any rendering; the prompt's length after it
        big_max = chat([{"role": "user", "content": "x"}], max_tokens=10**6)
        assert error_of(await http.post(CHAT, json=big_max), 400)["param"] == "max_tokens"
        too_long = {"model": "tiny", "prompt": "y" * 3000, "max_tokens": 1}
        assert error_of(await http.post("/v1/completions", json=too_long), 400)["code"] == (
            "context_length_exceeded"
        )
        fine = chat([{"role": "user", "content": "hello"}])
        assert error_of(await http.post(CHAT, json=fine), 503)["code"] == "unavailable"
        # none of them is still counted as on its way to the engine (which waits for such requests)
        assert app.state.service.client.preparing() == 0

    run(app, scenario)


def test_the_pool_closes_with_the_app(tiny_model: Path) -> None:
    app = make_app(tiny_model)
    pools: list[PromptPool] = []

    async def scenario(http: httpx.AsyncClient) -> None:
        pools.append(prompt_pool(app))
        r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 503

    run(app, scenario)
    assert app.state.prompt_pool is None

    async def after_close() -> None:
        with pytest.raises(RuntimeError, match="shutdown"):
            await pools[0].run(1, len, "x")

    asyncio.run(after_close())


def test_encode_and_decode_agree_with_tokenizers_own_calls(tiny_model: Path) -> None:
    """`ChatTokenizer` calls the batch forms (they let go of the GIL): same ids, same text."""
    tok = ChatTokenizer(tiny_model)
    text = "héllo <|im_start|>wörld 日本語\n\t  tabs " * 200
    ids = tok.encode(text)
    assert ids == tok._tok.encode(text, add_special_tokens=False).ids and len(ids) > 4096
    assert tok.decode(ids) == tok._tok.decode(ids, skip_special_tokens=True)


def test_prompt_text_is_kept_only_to_echo(tiny_model: Path) -> None:
    tok = ChatTokenizer(tiny_model)
    assert text_prompt(tok, "abc", echo=False) == Prompt(tok.encode("abc"), "")
    assert text_prompt(tok, "abc", echo=True).text == "abc"
    ids = tok.encode("abc")
    assert ids_prompt(tok, ids, tok.vocab_size, echo=False) == Prompt(ids, "")
    assert ids_prompt(tok, ids, tok.vocab_size, echo=True).text == "abc"
