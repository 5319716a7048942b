"""From a request body to the engine's `SamplingParams`: limits checked, omitted fields filled from the
model's defaults (api/defaults.py), vLLM's extensions validated, and body fields we do not know logged
once per name (a client that misspells `max_tokens` should find out from the log, not guess)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from api.defaults import SamplingDefaults
from api.errors import APIError
from api.schemas import GREEDY_BELOW, ChatCompletionRequest, SamplingFields
from api.service import Service
from cluster.requests import SamplingParams

log = logging.getLogger("orchard.api")

MAX_WARNED_FIELDS = 256  # distinct unknown field names logged; then one last line says we stopped
_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_unknown_fields(body: SamplingFields, route: str) -> None:
    """One warning per unknown top-level field name for the life of the process (bounded)."""
    extra = body.model_extra or {}
    if not extra:
        return
    with _warned_lock:
        for name in extra:
            if name in _warned or len(_warned) > MAX_WARNED_FIELDS:
                continue
            _warned.add(name)
            if len(_warned) > MAX_WARNED_FIELDS:
                log.warning("more unknown request fields: no longer logged (%d seen)", MAX_WARNED_FIELDS)
                continue
            shown = name if len(name) <= 64 and name.isprintable() else repr(name[:64]) + "..."
            log.warning("%s: ignoring unknown request field %r (logged once per name)", route, shown)


@dataclass(slots=True, frozen=True)
class Checked:
    """What `check_sampling` validated before the prompt was rendered."""

    stop: tuple[str, ...]
    logit_bias: tuple[tuple[int, float], ...]
    stop_token_ids: tuple[int, ...]


def check_sampling(svc: Service, body: SamplingFields, max_tokens: int | None) -> Checked:
    """The limits that need no prompt, checked before the costly render."""
    lim = svc.config.limits
    if max_tokens is not None and max_tokens > lim.max_tokens:
        raise APIError(
            400,
            f"max_tokens {max_tokens} is over this server's limit of {lim.max_tokens}",
            param="max_tokens",
        )
    if body.min_tokens > lim.max_tokens:
        raise APIError(
            400,
            f"min_tokens {body.min_tokens} is over this server's limit of {lim.max_tokens}",
            param="min_tokens",
        )
    if max_tokens is not None and body.min_tokens > max_tokens:
        raise APIError(
            400, f"min_tokens {body.min_tokens} is over max_tokens {max_tokens}", param="min_tokens"
        )
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > lim.max_stop_strings:
        raise APIError(400, f"at most {lim.max_stop_strings} stop strings are allowed", param="stop")
    if any(not s or len(s) > 256 for s in stops):
        raise APIError(400, "stop strings must be 1 to 256 characters", param="stop")
    bias: list[tuple[int, float]] = []
    for key, value in (body.logit_bias or {}).items():
        try:
            tid = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= tid < svc.vocab_size:
            raise APIError(400, f"logit_bias token {tid} is outside the vocabulary", param="logit_bias")
        bias.append((tid, float(value)))
    stop_ids = tuple(dict.fromkeys(body.stop_token_ids or ()))
    bad = next((t for t in stop_ids if t >= svc.vocab_size), None)
    if bad is not None:
        raise APIError(
            400,
            f"stop_token_ids: {bad} is outside the vocabulary (0..{svc.vocab_size - 1})",
            param="stop_token_ids",
        )
    return Checked(tuple(stops), tuple(bias), stop_ids)


def build_sampling(
    svc: Service,
    body: SamplingFields,
    checked: Checked,
    prompt_len: int,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The limits that depend on the prompt's length, then the engine's sampling settings: what the
    request says, else the model's default (generation_config.json), else OpenAI's."""
    cfg, lim = svc.config, svc.config.limits
    d: SamplingDefaults = svc.defaults
    if prompt_len > cfg.prompt_limit:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens, over this server's limit of {cfg.prompt_limit}",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    room = cfg.context_length - prompt_len
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise APIError(
            400,
            f"this model's maximum context length is {cfg.context_length} tokens; the prompt has {prompt_len} "
            f"and {max_tokens or 1} more were requested",
            param="max_tokens" if max_tokens else "messages",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        fallback = d.max_tokens if d.max_tokens is not None else lim.default_max_tokens
        kv_room = cfg.kv_room(prompt_len)  # what the KV budget leaves (cluster/memory.py), None: no budget
        max_tokens = max(1, min(fallback, lim.max_tokens, room, room if kv_room is None else kv_room))
    refusal = cfg.kv_refusal(prompt_len, max_tokens)
    if refusal is not None:  # could never run, even alone: a 400 now rather than a request queued forever
        raise APIError(400, refusal, param="max_tokens", code="kv_budget_exceeded")
    if body.min_tokens > max_tokens:
        raise APIError(
            400,
            f"min_tokens {body.min_tokens} is over the {max_tokens} tokens this request may generate",
            param="min_tokens",
        )
    temperature = _pick(body.temperature, d.temperature, 1.0)
    if temperature < GREEDY_BELOW:
        temperature = 0.0  # greedy: the engine's fast path, and no division by a tiny number
    top_k = body.top_k if body.top_k is not None else (d.top_k or 0)
    return SamplingParams(
        temperature=temperature,
        top_p=_pick(body.top_p, d.top_p, 1.0),
        top_k=top_k if top_k > 0 else 0,
        min_p=_pick(body.min_p, d.min_p, 0.0),
        seed=None if body.seed is None else body.seed % (2**63),
        max_tokens=max_tokens,
        stop=checked.stop,
        logit_bias=checked.logit_bias,
        logprobs=logprobs,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=_pick(body.repetition_penalty, d.repetition_penalty, 1.0),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        stop_token_ids=checked.stop_token_ids,
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
        prompt_logprobs=prompt_logprobs,
    )


def _pick(value: float | None, default: float | None, openai: float) -> float:
    if value is not None:
        return float(value)
    return float(default) if default is not None else openai
