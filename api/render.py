"""OpenAI's response shapes for chat and text completions, whole and as stream chunks."""

from __future__ import annotations

from typing import Any

from api.service import Service
from cluster.requests import TokenLogprob


class Render:
    opening_chunk = False  # chat streams open with the assistant role, as OpenAI's do
    full_object = ""
    chunk_object = ""

    def __init__(self, svc: Service, as_ids: bool = False, model: str = "") -> None:
        self.svc = svc
        self.as_ids = as_ids  # vLLM's return_tokens_as_token_ids
        self.model = model or svc.config.model_name  # the name asked for: an adapter's, or the base's

    def token_text(self, tid: int) -> str:
        return f"token_id:{tid}" if self.as_ids else self.svc.tokenizer.decode([tid])

    def full(
        self, rid: str, created: int, text: str, reason: str | None, lps: list[TokenLogprob] | None
    ) -> dict[str, Any]:
        return self._envelope(rid, created, self.full_object, [self._full_choice(text, reason, lps)])

    def chunk(
        self,
        rid: str,
        created: int,
        text: str,
        reason: str | None,
        lps: list[TokenLogprob] | None,
        first: bool = False,
        usage_only: bool = False,
    ) -> dict[str, Any]:
        choices = [] if usage_only else [self._chunk_choice(text, reason, lps, first)]
        return self._envelope(rid, created, self.chunk_object, choices)

    def _envelope(self, rid: str, created: int, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": self.model,
            "choices": choices,
        }

    def _full_choice(self, text: str, reason: str | None, lps: list[TokenLogprob] | None) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk_choice(
        self, text: str, reason: str | None, lps: list[TokenLogprob] | None, first: bool
    ) -> dict[str, Any]:
        raise NotImplementedError


class ChatRender(Render):
    opening_chunk = True
    full_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _logprobs(self, lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if lps is None:
            return None

        def entry(tid: int, lp: float) -> dict[str, Any]:
            text = self.token_text(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        content = [
            {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]} for t in lps
        ]
        return {"content": content, "refusal": None}

    def _full_choice(self, text: str, reason: str | None, lps: list[TokenLogprob] | None) -> dict[str, Any]:
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": 0, "message": message, "logprobs": self._logprobs(lps), "finish_reason": reason}

    def _chunk_choice(
        self, text: str, reason: str | None, lps: list[TokenLogprob] | None, first: bool
    ) -> dict[str, Any]:
        delta: dict[str, Any] = (
            {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        )
        return {"index": 0, "delta": delta, "logprobs": self._logprobs(lps), "finish_reason": reason}


class TextRender(Render):
    full_object = chunk_object = "text_completion"

    def _logprobs(self, lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if lps is None:
            return None
        tokens = [self.token_text(t.token_id) for t in lps]
        offsets, pos = [], 0
        for tok in tokens:
            offsets.append(pos)
            pos += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{self.token_text(i): v for i, v in t.top} for t in lps],
            "text_offset": offsets,
        }

    def _full_choice(self, text: str, reason: str | None, lps: list[TokenLogprob] | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": self._logprobs(lps), "finish_reason": reason}

    def _chunk_choice(
        self, text: str, reason: str | None, lps: list[TokenLogprob] | None, first: bool
    ) -> dict[str, Any]:
        return self._full_choice(text, reason, lps)
