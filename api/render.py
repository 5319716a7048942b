"""OpenAI's response shapes for chat and text completions, whole and as stream chunks, one choice at a
time (`index`): a request with n > 1 or several prompts merges its choices into one envelope."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from api.service import Service
from cluster.requests import TokenLogprob


class Render:
    full_object = ""
    chunk_object = ""

    def __init__(self, svc: Service, as_ids: bool = False, model: str = "") -> None:
        self.svc = svc
        self.as_ids = as_ids  # vLLM's return_tokens_as_token_ids
        self.model = model or svc.config.model_name  # the name asked for: an adapter's, or the base's

    def token_text(self, tid: int) -> str:
        return f"token_id:{tid}" if self.as_ids else self.svc.tokenizer.decode([tid])

    def envelope(self, rid: str, created: int, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        return {
            "id": rid,
            "object": self.chunk_object if chunk else self.full_object,
            "created": created,
            "model": self.model,
            "choices": choices,
        }


class ChatRender(Render):
    full_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def logprobs(self, lps: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        if lps is None:
            return None

        def entry(tid: int, lp: float) -> dict[str, Any]:
            text = self.token_text(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        content = [
            {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]} for t in lps
        ]
        return {"content": content, "refusal": None}

    def full_choice(
        self, index: int, message: dict[str, Any], reason: str | None, lps: Sequence[TokenLogprob] | None
    ) -> dict[str, Any]:
        return {"index": index, "message": message, "logprobs": self.logprobs(lps), "finish_reason": reason}

    def chunk_choice(
        self, index: int, delta: dict[str, Any], reason: str | None, lps: Sequence[TokenLogprob] | None
    ) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": self.logprobs(lps), "finish_reason": reason}


class TextRender(Render):
    full_object = chunk_object = "text_completion"

    def logprobs(
        self,
        lps: Sequence[TokenLogprob] | None,
        offset: int = 0,
        prompt_ids: Sequence[int] = (),
        prompt_lps: Sequence[TokenLogprob | None] = (),
    ) -> dict[str, Any] | None:
        """OpenAI's legacy shape. With echo, the prompt's tokens come first (its first token has no
        logprob: nothing precedes it); `offset` is where this piece starts in the choice's text."""
        if lps is None:
            return None
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        for i, tid in enumerate(prompt_ids):
            lp = prompt_lps[i] if i < len(prompt_lps) else None
            tokens.append(self.token_text(tid))
            values.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else {self.token_text(a): v for a, v in lp.top})
        for t in lps:
            tokens.append(self.token_text(t.token_id))
            values.append(t.logprob)
            tops.append({self.token_text(i): v for i, v in t.top})
        offsets, pos = [], offset
        decode = self.svc.tokenizer.decode
        for tid in [*prompt_ids, *(t.token_id for t in lps)]:
            offsets.append(pos)
            pos += len(decode([tid]))  # offsets in the text, also when tokens are shown as "token_id:N"
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def choice(
        self, index: int, text: str, reason: str | None, logprobs: dict[str, Any] | None
    ) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


class OutputParser(Protocol):
    """TOOLS' `api.tools.OutputParser` as this module uses it (tool calls and reasoning out of text)."""

    def parse(self, text: str) -> Any: ...

    def feed(self, delta_text: str) -> list[Any]: ...

    def finish(self) -> list[Any]: ...


class ChatOutput:
    """One chat choice's text as OpenAI's message (whole) or deltas (streamed). Without a parser the
    text is the content; with one (tools, reasoning) it is split into content, reasoning_content and
    tool_calls, and a choice that made a call finishes with "tool_calls"."""

    def __init__(
        self, parser: OutputParser | None = None, keep_reasoning: bool = True, max_calls: int | None = None
    ) -> None:
        self.parser = parser
        self.keep_reasoning = keep_reasoning  # vLLM's include_reasoning: False drops it from the reply
        self.max_calls = max_calls  # parallel_tool_calls false: 1 (a model may write more; the first counts)
        self.called = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.parser is None:
            return [{"content": text}] if text else []
        return self._deltas(self.parser.feed(text))

    def finish(self) -> list[dict[str, Any]]:
        return [] if self.parser is None else self._deltas(self.parser.finish())

    def message(self, text: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if self.parser is None:
            return message
        parsed = self.parser.parse(text)
        message["content"] = parsed.content
        if parsed.reasoning is not None and self.keep_reasoning:
            message["reasoning_content"] = parsed.reasoning
        if parsed.tool_calls:
            self.called = True
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in parsed.tool_calls[: self.max_calls]
            ]
        return message

    def reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.called and reason == "stop" else reason

    def _deltas(self, deltas: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for d in deltas:
            if d.kind == "content":
                if d.text:
                    out.append({"content": d.text})
            elif d.kind == "reasoning":
                if d.text and self.keep_reasoning:
                    out.append({"reasoning_content": d.text})
            elif d.kind == "tool_call":
                if self.max_calls is not None and d.index >= self.max_calls:
                    continue
                self.called = True
                call: dict[str, Any] = {"index": d.index}
                if d.name is not None:  # the first delta of a call
                    call.update(id=d.id, type="function", function={"name": d.name, "arguments": d.text})
                elif d.text:
                    call["function"] = {"arguments": d.text}
                else:
                    continue
                out.append({"tool_calls": [call]})
        return out
