"""Llama 3.x JSON tool calls: the answer is `{"name": ..., "parameters": {...}}` (several joined by `;`
as vLLM reads them), from the first character or after `<|python_tag|>`."""

from __future__ import annotations

import json
from typing import Any

from api.tools.formats import _DECODER, _SEP, Piece, Scanner, ToolFormat, _call_json, held_from
from api.tools.lark import lit, repeat
from api.tools.types import call_from_object

PYTHON_TAG = "<|python_tag|>"
_KEYS = ("parameters", "arguments")


class _Llama3Scanner:
    """JSON objects where the answer starts with `{`, or after `<|python_tag|>`. An object that is not a
    call (a JSON answer to a question, say) is content, and so is the text after the calls."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.start = True  # nothing but whitespace read so far
        self.objects = False  # the next text continues a run of call objects
        self.tag = ""  # the marker that opened the run, given back if no call follows it

    def scan(self, text: str, final: bool) -> tuple[list[Piece], int]:
        out: list[Piece] = []
        i = 0
        while i < len(text):
            if self.objects:
                q = _SEP.match(text, i).end()  # type: ignore[union-attr]
                if q == len(text):
                    if final:
                        out.append(self.tag + text[i:])
                        i = len(text)
                    break
                if text[q] != "{":
                    out.append(self.tag + text[i:q])
                    self.objects, self.tag, i = False, "", q
                    continue
                try:
                    obj, end = _DECODER.raw_decode(text, q)
                except ValueError:
                    if not final:
                        break
                    out.append(self.tag + text[i:])
                    self.objects, self.tag, i = False, "", len(text)
                    break
                call = call_from_object(obj, self.names, _KEYS)
                if call is None:
                    out.append(self.tag + text[i:end])
                    self.objects, self.tag = False, ""
                else:
                    out.append(call)
                    self.tag = ""
                i = end
                continue
            if self.start:
                j = len(text) - len(text[i:].lstrip())
                if j == len(text):
                    if final:
                        out.append(text[i:])
                        i = len(text)
                    break
                self.start = False
                if text[j] == "{":
                    out.append(text[i:j])
                    self.objects, i = True, j
                    continue
            k = text.find(PYTHON_TAG, i)
            if k < 0:
                h = len(text) if final else held_from(text, i, (PYTHON_TAG,))
                out.append(text[i:h])
                i = h
                break
            out.append(text[i:k])
            self.objects, self.tag, i = True, PYTHON_TAG, k + len(PYTHON_TAG)
        return [p for p in out if p != ""], i


class Llama3Json(ToolFormat):
    name = "llama3_json"
    markers = (PYTHON_TAG,)

    def scanner(self, names: frozenset[str]) -> Scanner:
        return _Llama3Scanner(names)

    def _call(self, tool: dict[str, Any], args: str) -> str:
        head = '{"name": ' + json.dumps(self._index(tool), ensure_ascii=False) + ', "parameters": '
        return f"{lit(head)} {args} {lit('}')}"

    def _calls(self, call: str, parallel: bool) -> str:
        """As the templates render a call in the history: bare JSON (`<|python_tag|>` is for the
        built-in tools); parallel calls joined by "; " as vLLM's parser reads them."""
        return repeat(call, lit("; "), parallel)

    def render_calls(self, calls: list[Any]) -> str:
        return "; ".join(_call_json(c, "parameters") for c in calls)
