"""`/v1/chat/completions`, `/v1/completions` and `/v1/models`, in OpenAI's shapes (streamed or not).

A route validates, renders the prompt off the event loop (api/prompts.py), builds the engine's settings
(api/sampling.py), and hands its choices to api/generate.py, which runs them and answers."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request

from api.chat_tools import ChatPlan, plan_chat
from api.errors import APIError
from api.generate import Choice, Run, run
from api.openapi_docs import CHAT_RESPONSES, COMPLETION_RESPONSES, MODEL_RESPONSES, MODELS_RESPONSES
from api.prompts import (
    Prompt,
    chat_prompt,
    chat_size,
    ids_prompt,
    prompt_pool,
    prompt_pool_lifespan,
    template_limit,
    text_prompt,
)
from api.sampling import build_sampling, check_sampling, warn_unknown_fields
from api.schemas import (
    MAX_PROMPTS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    screen_body,
    screen_chat_body,
)
from api.service import Service
from cluster.requests import SamplingParams

router = APIRouter(lifespan=prompt_pool_lifespan)
MAX_CHOICES = 128  # prompts x n in one request


def _svc(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


@router.get("/v1/models", responses=MODELS_RESPONSES)
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": _svc(request).model_cards()}


@router.get("/v1/models/{model_id:path}", responses=MODEL_RESPONSES)
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    return svc.model_card(svc.check_model(model_id, param=None))


@router.post("/v1/chat/completions", dependencies=[Depends(screen_chat_body)], responses=CHAT_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    svc = _svc(request)
    warn_unknown_fields(body, "/v1/chat/completions")
    adapter = svc.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    checked = check_sampling(svc, body, max_tokens)
    include_usage = _include_usage(body)
    plan: ChatPlan = plan_chat(svc, body)  # tools, tool_choice, response_format: checked before rendering
    pool = prompt_pool(request.app)
    max_chars = template_limit(svc.config.limits)
    prompt = await pool.run(
        chat_size(body.messages),
        chat_prompt,
        svc.tokenizer,
        body.messages,
        max_chars,
        plan.template,
        plan.prepare,
    )
    sampling = build_sampling(svc, body, checked, len(prompt.ids), max_tokens, logprobs)
    if plan.keep_special_tokens:
        sampling = replace(sampling, skip_special_tokens=False)  # the parser needs the call markers
    # compiling a grammar costs with the schema's size, which the body's bounds: a large one takes the
    # large lane, so short chats are not queued behind it
    schema_size = len(await request.body())
    constraint = await pool.run(schema_size, plan.constraint, svc.tokenizer, prompt.rendered)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    spec = Run(
        "chat",
        rid,
        _choices(rid, [prompt], sampling, body.n, constraint),
        body.stream,
        include_usage,
        body.return_tokens_as_token_ids,
        adapter,
        plan.outputs(prompt.rendered),
        speculative=body.speculative,
    )
    return await run(request, svc, spec)


@router.post("/v1/completions", dependencies=[Depends(screen_body)], responses=COMPLETION_RESPONSES)
async def completions(body: CompletionRequest, request: Request) -> Any:
    svc = _svc(request)
    warn_unknown_fields(body, "/v1/completions")
    adapter = svc.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
    if body.best_of not in (None, 1, body.n):
        raise APIError(400, "best_of > n is not supported", param="best_of", code="unsupported_parameter")
    checked = check_sampling(svc, body, body.max_tokens)
    include_usage = _include_usage(body)
    prompts = await _completion_prompts(request, svc, body.prompt, body.echo, body.n)
    prompt_lps = body.logprobs if body.echo and body.logprobs is not None else None
    samplings = [
        build_sampling(svc, body, checked, len(p.ids), body.max_tokens, body.logprobs, prompt_lps)
        for p in prompts
    ]
    rid = f"cmpl-{uuid.uuid4().hex}"
    spec = Run(
        "text",
        rid,
        _choices(rid, prompts, samplings, body.n),
        body.stream,
        include_usage,
        body.return_tokens_as_token_ids,
        adapter,
        speculative=body.speculative,
    )
    return await run(request, svc, spec)


def _choices(
    rid: str,
    prompts: list[Prompt],
    samplings: SamplingParams | list[SamplingParams],
    n: int,
    constraint: Any = None,
) -> list[Choice]:
    """OpenAI's order: every choice of the first prompt, then the second's. Request ids "<rid>",
    "<rid>-1", ...; each prompt's later choices fork the first one's prompt KV."""
    out: list[Choice] = []
    for p_index, prompt in enumerate(prompts):
        sampling = samplings[p_index] if isinstance(samplings, list) else samplings
        first = ""
        for j in range(n):
            index = p_index * n + j
            req_id = rid if index == 0 else f"{rid}-{index}"
            out.append(
                Choice(
                    index,
                    req_id,
                    tuple(prompt.ids),
                    sampling,  # a sibling's seed is derived from it (cluster.scheduler.fork_seed)
                    p_index,
                    fork_of=first,
                    echo=prompt.text,
                    constraint=constraint,
                )
            )
            first = first or req_id
    return out


def _include_usage(body: SamplingFields) -> bool:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    return bool(body.stream_options and body.stream_options.include_usage)


async def _completion_prompts(
    request: Request, svc: Service, prompt: Any, echo: bool, n: int
) -> list[Prompt]:
    """One prompt, or a list of them (strings or token-id lists), each tokenized off the event loop."""
    batch: list[Any] = (
        prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
    )
    if len(batch) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts are allowed in one request", param="prompt")
    if len(batch) * n > MAX_CHOICES:
        raise APIError(
            400,
            f"{len(batch)} prompts x n={n} is over this server's limit of {MAX_CHOICES} choices",
            param="n",
        )
    pool = prompt_pool(request.app)
    out = []
    for i, one in enumerate(batch):
        param = "prompt" if len(batch) == 1 else f"prompt.{i}"
        if isinstance(one, str):
            if not one:
                raise APIError(400, "prompt is empty", param=param)
            out.append(await pool.run(len(one), text_prompt, svc.tokenizer, one, echo))
            continue
        ids = list(one)
        if not ids:
            raise APIError(400, "prompt is empty", param=param)
        out.append(await pool.run(4 * len(ids), ids_prompt, svc.tokenizer, ids, svc.vocab_size, echo))
    return out
