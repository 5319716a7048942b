"""A chat answer split into reasoning, content and tool calls, whole (`parse`) or as it streams
(`feed`/`finish`).

Both ways run the same code: `parse(text)` is `feed(text)` then `finish()` on a fresh parser, and every
format's scanner decides only what more text cannot change, so a stream cut anywhere gives the same
content, reasoning and calls as the whole text. A call is sent once it is whole and parses (first delta:
index, id and name; then its arguments), so a call that turns out malformed was never half sent: it
is content, like any text that is not a call. Whitespace: reasoning is trimmed; content after a
reasoning block loses its leading whitespace; content that is only whitespace beside calls is none."""

from __future__ import annotations

from dataclasses import dataclass

from api.tools.formats import Scanner, ToolFormat, held_from
from api.tools.types import Delta, FoundCall, Parsed, ToolCall

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside a `<think>` block it opened (some templates start the
    model's thinking for it): the answer then begins with reasoning."""
    return prompt.rstrip().endswith(THINK_OPEN)


@dataclass(slots=True)
class _Text:
    """A stream of text trimmed as it goes: leading whitespace held until something else comes (and
    dropped with `lstrip`), trailing whitespace held too when `rstrip` (dropped at the end)."""

    lstrip: bool
    rstrip: bool
    started: bool = False
    held: str = ""

    def add(self, text: str) -> str:
        text = self.held + text
        self.held = ""
        if not self.started:
            if not text.strip():
                self.held = text
                return ""
            self.started = True
            if self.lstrip:
                text = text.lstrip()
        if self.rstrip:
            body = text.rstrip()
            self.held = text[len(body) :]
            return body
        return text


class OutputParser:
    """One choice's answer. `fmt` None or `tools` False: no calls are read. `reasoning`: split a leading
    `<think>...</think>` block out as reasoning (else it stays in the content). `tool_names`: the names
    a call may have (empty: any). `thinking_open`: the prompt opened the block (the answer starts in it;
    see `prompt_opens_thinking`)."""

    def __init__(
        self,
        fmt: ToolFormat | None,
        tools: bool,
        reasoning: bool,
        tool_names: set[str] | frozenset[str],
        thinking_open: bool = False,
    ) -> None:
        self._args = (fmt, tools, reasoning, frozenset(tool_names), thinking_open)
        self.fmt = fmt if tools else None
        self.scanner: Scanner | None = self.fmt.scanner(frozenset(tool_names)) if self.fmt else None
        self.phase = "think" if reasoning and thinking_open else "probe" if reasoning else "answer"
        self.saw_reasoning = self.phase == "think"
        self.buf = ""
        self.calls = 0
        self.content = _Text(lstrip=False, rstrip=False)
        self.reasoning = _Text(lstrip=True, rstrip=True)

    def parse(self, text: str) -> Parsed:
        """The whole answer at once (a fresh parser; this one's stream is left alone)."""
        fmt, tools, reasoning, names, thinking_open = self._args
        other = OutputParser(fmt, tools, reasoning, names, thinking_open)
        deltas = other.feed(text) + other.finish()
        content = "".join(d.text for d in deltas if d.kind == "content")
        reasoning_text = "".join(d.text for d in deltas if d.kind == "reasoning")
        calls: list[ToolCall] = []
        for d in deltas:
            if d.kind == "tool_call" and d.name is not None:
                calls.append(ToolCall(d.id or "", d.name, ""))
            elif d.kind == "tool_call":
                c = calls[d.index]
                calls[d.index] = ToolCall(c.id, c.name, c.arguments + d.text)
        return Parsed(
            content=None if calls and not content else content,
            reasoning=reasoning_text if other.saw_reasoning else None,
            tool_calls=tuple(calls),
        )

    def feed(self, delta_text: str) -> list[Delta]:
        self.buf += delta_text
        return self._step(final=False)

    def finish(self) -> list[Delta]:
        out = self._step(final=True)
        held = self.content.held
        if held and not self.content.started and not self.calls and not self.content.lstrip:
            out.append(Delta("content", held))  # an answer of only whitespace is kept as it is
        return out

    def _step(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while True:
            if self.phase == "probe":
                rest = self.buf.lstrip()
                if rest.startswith(THINK_OPEN):
                    self.phase, self.saw_reasoning, self.buf = "think", True, rest[len(THINK_OPEN) :]
                elif not final and THINK_OPEN.startswith(rest):
                    return out
                else:
                    self.phase = "answer"
            elif self.phase == "think":
                k = self.buf.find(THINK_CLOSE)
                if k < 0:
                    h = len(self.buf) if final else held_from(self.buf, 0, (THINK_CLOSE,))
                    out += self._reason(self.buf[:h])
                    self.buf = self.buf[h:]
                    return out
                out += self._reason(self.buf[:k])
                self.buf = self.buf[k + len(THINK_CLOSE) :]
                self.phase = "answer"
                self.content.lstrip = True
            else:
                if self.scanner is None:
                    pieces: list[str | FoundCall] = [self.buf]
                    used = len(self.buf)
                else:
                    pieces, used = self.scanner.scan(self.buf, final)
                self.buf = self.buf[used:]
                for piece in pieces:
                    out += self._call(piece) if isinstance(piece, FoundCall) else self._content(piece)
                return out

    def _reason(self, text: str) -> list[Delta]:
        text = self.reasoning.add(text)
        return [Delta("reasoning", text)] if text else []

    def _content(self, text: str) -> list[Delta]:
        text = self.content.add(text)
        return [Delta("content", text)] if text else []

    def _call(self, call: FoundCall) -> list[Delta]:
        assert self.fmt is not None
        index = self.calls
        self.calls += 1
        return [
            Delta("tool_call", "", index=index, id=self.fmt.new_id(), name=call.name),
            Delta("tool_call", call.arguments, index=index),
        ]
