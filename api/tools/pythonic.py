"""Pythonic tool calls (Llama 3.2 / 4, LFM2): `[get_weather(city="Paris"), get_time(zone="CET")]`,
the whole answer or inside `<|python_start|>`/`<|tool_call_start|>` markers. Read with `ast` and
`ast.literal_eval`: nothing the model writes is ever evaluated."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any

from api.tools.formats import Piece, Scanner, ToolFormat, held_from
from api.tools.lark import lit, repeat
from api.tools.types import FoundCall, function_of, parameters_of

OPENERS = {"<|python_start|>": "<|python_end|>", "<|tool_call_start|>": "<|tool_call_end|>"}
_CLOSE = {"(": ")", "[": "]", "{": "}"}
_JSON_NAMES = {"true": True, "false": False, "null": None}


@dataclass(frozen=True, slots=True)
class Brackets:
    """Where a bracket scan stopped short of the text's end: `pos` (in the text), the open brackets and
    the open quote. It stops a few characters early, so a quote or escape cut by a chunk boundary is
    read again whole when the scan resumes with more text."""

    pos: int
    stack: tuple[str, ...] = ()
    quote: str = ""


def list_end(text: str, start: int, resume: Brackets | None = None) -> int | Brackets:
    """The index after the bracket that closes the one at `start`, skipping Python strings; if the text
    ends first, where to resume (pass it back with the longer text: each character is read once)."""
    stack = list(resume.stack) if resume else []
    quote = resume.quote if resume else ""
    i = resume.pos if resume else start
    safe = Brackets(i, tuple(stack), quote)
    last = len(text) - 3  # the last position with two characters after it
    while i < len(text):
        if last - 3 <= i <= last:  # steps are at most 3 characters: one lands in this window
            safe = Brackets(i, tuple(stack), quote)
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif text.startswith(quote, i):
                i += len(quote) - 1
                quote = ""
        elif ch in "\"'":
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            i += len(quote) - 1
        elif ch in _CLOSE:
            stack.append(_CLOSE[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                return i + 1  # unbalanced: let `ast` refuse it
            if not stack:
                return i + 1
        i += 1
    return safe


def parse_calls(source: str, names: frozenset[str]) -> list[FoundCall] | None:
    """`[f(a=1), g(b="x")]` as calls, or None if it is anything else (positional arguments, values that
    are not literals, a name outside `names`)."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted(node.func)
        if name is None or (names and name not in names):
            return None
        args: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None:
                return None
            try:
                args[kw.arg] = ast.literal_eval(_JsonNames().visit(kw.value))
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
        try:
            calls.append(FoundCall(name, json.dumps(args, ensure_ascii=False, allow_nan=False)))
        except (TypeError, ValueError):
            return None
    return calls


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


class _JsonNames(ast.NodeTransformer):
    """`true`, `false`, `null` as the constants a model trained on JSON sometimes writes."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _JSON_NAMES:
            return ast.copy_location(ast.Constant(_JSON_NAMES[node.id]), node)
        return node


class _PythonicScanner:
    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.start = True
        self.offset = 0  # where this scan's text starts in the whole answer
        self.resume: tuple[int, Brackets] | None = None  # (list start, scan state), both in the answer

    def scan(self, text: str, final: bool) -> tuple[list[Piece], int]:
        out: list[Piece] = []
        i = 0
        while i < len(text):
            if self.start:
                j = len(text) - len(text[i:].lstrip())
                if j == len(text):
                    if final:
                        out.append(text[i:])
                        i = len(text)
                    break
                if text[j] == "[":
                    found = self._list(text, j, "", final)
                    if found is None:
                        break
                    out.append(text[i:j])
                    out.extend(found[0] if found[0] else [text[j : found[1]]])
                    i = found[1]
                self.start = False
                continue
            k, opener = min(((text.find(o, i), o) for o in OPENERS if text.find(o, i) >= 0), default=(-1, ""))
            if k < 0:
                h = len(text) if final else held_from(text, i, tuple(OPENERS))
                out.append(text[i:h])
                i = h
                break
            at = len(text) - len(text[k + len(opener) :].lstrip())
            if at == len(text) and not final:
                out.append(text[i:k])
                i = k
                break
            found = (
                self._list(text, at, opener, final) if at < len(text) and text[at] == "[" else ([], len(text))
            )
            if found is None:
                out.append(text[i:k])
                i = k
                break
            out.append(text[i:k])
            pieces, end = found
            out.extend(pieces if pieces else [text[k:end]])
            i = end
        self.offset += i
        return [p for p in out if p != ""], i

    def _list(self, text: str, at: int, opener: str, final: bool) -> tuple[list[Piece], int] | None:
        """The calls of the list at `at` and where they end (the closing marker included), ([], end)
        when it is not a list of calls, None when more text is needed."""
        resume = None
        if self.resume is not None and self.resume[0] == self.offset + at:
            state = self.resume[1]
            resume = Brackets(state.pos - self.offset, state.stack, state.quote)
        found = list_end(text, at, resume)
        if isinstance(found, Brackets):
            if final:
                return [], len(text)
            self.resume = (self.offset + at, Brackets(self.offset + found.pos, found.stack, found.quote))
            return None
        end = found
        calls = parse_calls(text[at:end], self.names)
        if calls is None:
            return [], end
        if opener:
            closer = OPENERS[opener]
            after = len(text) - len(text[end:].lstrip())
            if text.startswith(closer, after):
                end = after + len(closer)
            elif not final and closer.startswith(text[after:]):
                return None
        return list(calls), end


PY_RULES = r"""py_any: PY_STR | PY_NUM | "True" | "False" | "None" | py_list | py_dict
py_list: "[" (py_any (", " py_any)*)? "]"
py_dict: "{" (PY_STR ": " py_any (", " PY_STR ": " py_any)*)? "}"
PY_STR: /"([^"\\\x00-\x1f]|\\["\\nrt])*"/
PY_NUM: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/
PY_INT: /-?(0|[1-9][0-9]*)/
"""


def py_value(schema: Any) -> str:
    """A Lark expression for a Python literal of `schema` (enums, consts and scalar types exactly;
    arrays and objects as any literal of their kind)."""
    if not isinstance(schema, dict):
        return "py_any"
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        return "(" + " | ".join(lit(_py_literal(v)) for v in values) + ")"
    kind = schema.get("type")
    simple = {"string": "PY_STR", "integer": "PY_INT", "number": "PY_NUM", "boolean": '("True" | "False")'}
    if isinstance(kind, str) and kind in simple:
        return simple[kind]
    if kind == "null":
        return '"None"'
    if kind == "array":
        item = py_value(schema.get("items"))
        return f'("[" ({item} (", " {item})*)? "]")'
    if kind == "object":
        return "py_dict"
    return "py_any"


def _py_literal(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value) if isinstance(value, (bool, int, float)) or value is None else json.dumps(value)


class Pythonic(ToolFormat):
    name = "pythonic"
    markers = tuple(OPENERS)

    def scanner(self, names: frozenset[str]) -> Scanner:
        return _PythonicScanner(names)

    def grammar(
        self, tools: list[dict[str, Any]], choice: str, parallel: bool, thinking: str | None = None
    ) -> str:
        from api.tools.lark import selected, with_thinking

        chosen = selected(tools, choice)
        rules: list[str] = []
        for i, tool in enumerate(chosen):
            rules += _kwargs_rules(i, tool)
        calls = "(" + " | ".join(f"call_{i}" for i in range(len(chosen))) + ")"
        body = f'"[" {repeat(calls, lit(", "), parallel)} "]"'
        return (
            with_thinking(body, thinking or ("optional" if self.thinks else "none"))
            + "\n".join(rules)
            + "\n"
            + PY_RULES
        )

    def render_calls(self, calls: list[Any]) -> str:
        parts = []
        for c in calls:
            fn = function_of(c)
            args = fn.get("arguments")
            if isinstance(args, str):
                args = json.loads(args or "{}")
            inner = ", ".join(f"{k}={_py_literal(v)}" for k, v in (args or {}).items())
            parts.append(f"{fn.get('name')}({inner})")
        return "[" + ", ".join(parts) + "]"


def _kwargs_rules(i: int, tool: dict[str, Any]) -> list[str]:
    """`call_i: "name(" ... ")"` with the parameters in their declared order, each `name=value`,
    required ones always, optional ones maybe, commas only between those written."""
    params = parameters_of(tool)
    found = params.get("properties")
    props: dict[str, Any] = found if isinstance(found, dict) else {}
    required = set(params.get("required") or ())
    names = list(props)
    n = len(names)
    rules = [f"call_{i}: {lit(str(function_of(tool)['name']) + '(')} head_{i}_0 {lit(')')}"]
    for k, p in enumerate(names):
        item = f"{lit(p + '=')} {py_value(props[p])}"
        nxt_head, nxt_tail = f"head_{i}_{k + 1}", f"tail_{i}_{k + 1}"
        rules.append(f"item_{i}_{k}: {item}")
        if p in required:
            rules.append(f"head_{i}_{k}: item_{i}_{k} {nxt_tail}")
            rules.append(f"tail_{i}_{k}: {lit(', ')} item_{i}_{k} {nxt_tail}")
        else:
            rules.append(f"head_{i}_{k}: item_{i}_{k} {nxt_tail} | {nxt_head}")
            rules.append(f"tail_{i}_{k}: ({lit(', ')} item_{i}_{k})? {nxt_tail}")
    rules.append(f'head_{i}_{n}: ""')
    rules.append(f'tail_{i}_{n}: ""')
    return rules
