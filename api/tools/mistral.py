"""Mistral `[TOOL_CALLS]` in its two forms: a JSON list (`[TOOL_CALLS][{"name": ..., "arguments":
{...}}, ...]`, v3 tokenizers: Mistral 7B v0.3, Nemo) and one call per marker (`[TOOL_CALLS]name[ARGS]{...}`,
v11+ tokenizers: Mistral Small 3.2, Devstral; `[CALL_ID]id` may sit before `[ARGS]`)."""

from __future__ import annotations

import json
import re
from typing import Any

from api.tools.formats import _DECODER, Piece, Scanner, ToolFormat, _call_json, held_from
from api.tools.lark import lit, marker
from api.tools.types import call_from_object, mistral_call_id

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\][A-Za-z0-9_\-]*)?\[ARGS\]")
_KEYS = ("arguments", "parameters")


class _MistralScanner:
    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def scan(self, text: str, final: bool) -> tuple[list[Piece], int]:
        out: list[Piece] = []
        i = 0
        while i < len(text):
            k = text.find(TOOL_CALLS, i)
            if k < 0:
                h = len(text) if final else held_from(text, i, (TOOL_CALLS,))
                out.append(text[i:h])
                i = h
                break
            out.append(text[i:k])
            found = self._after_marker(text, k + len(TOOL_CALLS), final)
            if found is None:  # not sure yet
                i = k
                break
            pieces, end = found
            out.extend(pieces if pieces else [text[k:end]])
            i = end
        return [p for p in out if p != ""], i

    def _after_marker(self, text: str, at: int, final: bool) -> tuple[list[Piece], int] | None:
        """The calls after one marker and where they end; ([], end) when what follows is not a call
        (it is content, marker included), None when more text is needed to tell."""
        rest = text[at:].lstrip()
        if not rest:
            return ([], len(text)) if final else None
        start = len(text) - len(rest)
        if rest[0] == "[":
            try:
                value, end = _DECODER.raw_decode(text, start)
            except ValueError:
                return ([], len(text)) if final else None
            items = value if isinstance(value, list) else []
            calls = [call_from_object(v, self.names, _KEYS) for v in items]
            if not calls or any(c is None for c in calls):
                return [], end
            return [c for c in calls if c is not None], end
        m = _NAMED.match(text, at)
        if m is None:
            return ([], len(text)) if final else None
        try:
            args, end = _DECODER.raw_decode(text, m.end())
        except ValueError:
            return ([], len(text)) if final else None
        call = call_from_object({"name": m.group(1), "arguments": args}, self.names, _KEYS)
        return ([call] if call else []), end


class Mistral(ToolFormat):
    name = "mistral"
    markers = (TOOL_CALLS,)

    def __init__(self, *args: Any, named: bool = False, **kwargs: Any) -> None:
        """`named`: the `name[ARGS]{...}` form (the template writes `[ARGS]`)."""
        super().__init__(*args, **kwargs)
        self.named = named

    def scanner(self, names: frozenset[str]) -> Scanner:
        return _MistralScanner(names)

    def new_id(self) -> str:
        return mistral_call_id()

    def _call(self, tool: dict[str, Any], args: str) -> str:
        name = self._index(tool)
        if self.named:
            return f"{marker(TOOL_CALLS, self.specials)} {lit(name)} {marker(ARGS, self.specials)} {args}"
        head = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        return f"{lit(head)} {args} {lit('}')}"

    def _calls(self, call: str, parallel: bool) -> str:
        if self.named:
            return f"{call}+" if parallel else call
        more = f" ({lit(', ')} {call})*" if parallel else ""
        return f"{marker(TOOL_CALLS, self.specials)} {lit('[')} {call}{more} {lit(']')}"

    def render_calls(self, calls: list[Any]) -> str:
        if self.named:
            return "".join(
                f"{TOOL_CALLS}{json.loads(_call_json(c, 'arguments'))['name']}{ARGS}"
                + json.dumps(json.loads(_call_json(c, "arguments"))["arguments"], ensure_ascii=False)
                for c in calls
            )
        return TOOL_CALLS + "[" + ", ".join(_call_json(c, "arguments") for c in calls) + "]"
