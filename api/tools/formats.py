"""Tool-call formats of the model families: how each writes its calls, read back and forced by grammar.

A format reads text through a `Scanner`: `scan(text, final)` returns the pieces (content strings and
calls) of the longest prefix of `text` it is sure about, and how many characters that prefix holds;
what it is unsure of (a call still being written, the start of a marker at the end) stays for the next
call, with more text. With `final` everything is decided: a call that does not parse is content. So a
stream cut anywhere reads the same as the whole text, and no text is ever dropped."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from api.tools.lark import json_args, lit, repeat, rule_name, selected, with_thinking
from api.tools.types import FoundCall, call_from_object, function_of, openai_call_id

Piece = str | FoundCall
_DECODER = json.JSONDecoder()
_SEP = re.compile(r"\s*;?\s*")


class Scanner(Protocol):
    def scan(self, text: str, final: bool) -> tuple[list[Piece], int]: ...


def held_from(text: str, start: int, markers: tuple[str, ...]) -> int:
    """Where a possible start of one of `markers` begins at the end of `text` (len(text) if none)."""
    longest = max(len(m) for m in markers)
    for k in range(max(start, len(text) - longest + 1), len(text)):
        tail = text[k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return len(text)


def calls_in_json(body: str, names: frozenset[str], keys: tuple[str, ...]) -> list[Piece] | None:
    """One call object, or a list of them, as the whole of `body`; None when it is anything else. An
    empty list is no call (SmolLM2's prompt asks for `[]` when no tool fits)."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [call_from_object(v, names, keys) for v in items]
    if any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


class ToolFormat:
    """A family's format. `template_tools`: the chat template renders `tools` itself (else the format's
    own system prompt tells the model about them); `thinks`: the template knows `<think>` blocks;
    `specials`: the served tokenizer's special tokens (text -> id), for grammars that must force them."""

    name: ClassVar[str] = ""
    markers: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, template_tools: bool = True, thinks: bool = False, specials: Mapping[str, int] | None = None
    ) -> None:
        self.template_tools = template_tools
        self.thinks = thinks
        self.specials: Mapping[str, int] = specials or {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(template_tools={self.template_tools}, thinks={self.thinks})"

    def scanner(self, names: frozenset[str]) -> Scanner:
        raise NotImplementedError

    def new_id(self) -> str:
        return openai_call_id()

    def parse(self, text: str) -> Any:
        """The whole text at once (`Parsed`), tools on, reasoning as the template suggests."""
        from api.tools.output import OutputParser

        return OutputParser(self, tools=True, reasoning=self.thinks, tool_names=set()).parse(text)

    def grammar(
        self, tools: list[dict[str, Any]], choice: str, parallel: bool, thinking: str | None = None
    ) -> str:
        """An llguidance Lark grammar that makes the model write calls in this format: `choice`
        "required" = one or more calls of any tool (one if not `parallel`), a tool's name = that tool.
        `thinking` ("none", "optional", "open"; default: "optional" for a thinking template)."""
        chosen = selected(tools, choice)
        rules = [f"{rule_name(i)}: {self._call(t, f'args_{i}')}" for i, t in enumerate(chosen)]
        rules += [f"args_{i}: {json_args(t)}" for i, t in enumerate(chosen)]
        calls = "(" + " | ".join(rule_name(i) for i in range(len(chosen))) + ")"
        body = self._calls(calls, parallel)
        mode = thinking or ("optional" if self.thinks else "none")
        return with_thinking(body, mode) + "\n".join(rules) + "\n"

    def _call(self, tool: dict[str, Any], args: str) -> str:
        """The rule body of one call of `tool`, whose arguments are the rule `args`."""
        raise NotImplementedError

    def _calls(self, call: str, parallel: bool) -> str:
        raise NotImplementedError

    def _index(self, tool: dict[str, Any]) -> str:
        return str(function_of(tool)["name"])

    def system_prompt(self, tools: list[dict[str, Any]]) -> str | None:
        """A system prompt that teaches a template without a tools section about `tools` (None when the
        template renders them itself)."""
        return None if self.template_tools else self._tool_prompt(tools)

    def _tool_prompt(self, tools: list[dict[str, Any]]) -> str:
        return HERMES_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))

    def prepare_messages(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]]:
        """The messages to render: unchanged when the template knows tools. Otherwise the tools' system
        prompt goes first (before the client's own system message), assistant calls in the history are
        written out in this format and tool results become user turns, since such a template renders
        neither."""
        if self.template_tools:
            return messages
        out: list[dict[str, Any]] = []
        for m in messages:
            if m.get("role") == "assistant" and m.get("tool_calls"):
                text = self.render_calls(m["tool_calls"])
                content = m.get("content")
                out.append(
                    {**_without(m, "tool_calls"), "content": f"{content}\n{text}" if content else text}
                )
            elif m.get("role") == "tool":
                out.append(
                    {"role": "user", "content": f"<tool_response>\n{m.get('content')}\n</tool_response>"}
                )
            else:
                out.append(m)
        prompt = self.system_prompt(tools or [])
        if prompt is None or not tools:
            return out
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            return [{**out[0], "content": prompt + "\n\n" + out[0]["content"]}, *out[1:]]
        return [{"role": "system", "content": prompt}, *out]

    def render_calls(self, calls: list[Any]) -> str:
        """Calls from a chat history (OpenAI's shape) written as this model writes them."""
        return "".join(f"<tool_call>\n{_call_json(c, 'arguments')}\n</tool_call>" for c in calls)


def _without(m: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != key}


def _call_json(call: Any, key: str) -> str:
    fn = function_of(call)
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return json.dumps({"name": fn.get("name"), key: args if args is not None else {}}, ensure_ascii=False)


HERMES_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
    "<args-json-object>}}\n</tool_call>"
)


class _TaggedScanner:
    """Calls inside open/close tags, anywhere in the text (Hermes, SmolLM2). A block whose tags never
    close counts when the text ends with a whole call in it (models often stop before `</tool_call>`)."""

    def __init__(self, open_tag: str, close_tag: str, names: frozenset[str]) -> None:
        self.open, self.close, self.names = open_tag, close_tag, names

    def scan(self, text: str, final: bool) -> tuple[list[Piece], int]:
        out: list[Piece] = []
        i = 0
        while i < len(text):
            j = text.find(self.open, i)
            if j < 0:
                h = len(text) if final else held_from(text, i, (self.open,))
                out.append(text[i:h])
                i = h
                break
            out.append(text[i:j])
            body_at = j + len(self.open)
            e = text.find(self.close, body_at)
            if e < 0 and not final:
                i = j
                break
            end = len(text) if e < 0 else e + len(self.close)
            calls = calls_in_json(
                text[body_at : len(text) if e < 0 else e], self.names, ("arguments", "parameters")
            )
            out.extend(calls if calls is not None else [text[j:end]])
            i = end
        return [p for p in out if p != ""], i


class Hermes(ToolFormat):
    """Qwen 2.5 / 3, Hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` per call."""

    name = "hermes"
    markers = ("<tool_call>",)

    def scanner(self, names: frozenset[str]) -> Scanner:
        return _TaggedScanner("<tool_call>", "</tool_call>", names)

    def _call(self, tool: dict[str, Any], args: str) -> str:
        head = (
            '<tool_call>\n{"name": ' + json.dumps(self._index(tool), ensure_ascii=False) + ', "arguments": '
        )
        return f"{lit(head)} {args} {lit(CLOSE_HERMES)}"

    def _calls(self, call: str, parallel: bool) -> str:
        return repeat(call, lit("\n"), parallel)


CLOSE_HERMES = "}\n</tool_call>"


SMOLLM2_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the functions can be used, point it out and refuse to answer.\n"
    "If the given question lacks the parameters required by the function, also point it out.\n\n"
    "You have access to the following tools:\n<tools>{tools}</tools>\n\n"
    "The output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
    "The example format is as follows. Please make sure the parameter type is correct. If no function call "
    "is needed, please make the tool calls an empty list '[]'.\n"
    '<tool_call>[\n{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},\n'
    "... (more tool calls as required)\n]</tool_call>"
)


class SmolLM2(Hermes):
    """SmolLM2-Instruct (the embedded model): a JSON list in one `<tool_call>` block, as its model card's
    function-calling instructions (HuggingFaceTB/SmolLM2-1.7B-Instruct, instructions_function_calling.md)
    prompt it. Its Hugging Face template has no tools section, so the prompt is ours to add."""

    name = "smollm2"

    def __init__(
        self, template_tools: bool = False, thinks: bool = False, specials: Mapping[str, int] | None = None
    ) -> None:
        super().__init__(template_tools=template_tools, thinks=thinks, specials=specials)

    def _tool_prompt(self, tools: list[dict[str, Any]]) -> str:
        return SMOLLM2_PROMPT.format(tools=json.dumps(tools))

    def _call(self, tool: dict[str, Any], args: str) -> str:
        head = '{"name": ' + json.dumps(self._index(tool), ensure_ascii=False) + ', "arguments": '
        return f"{lit(head)} {args} {lit('}')}"

    def _calls(self, call: str, parallel: bool) -> str:
        calls = repeat(call, lit(",\n"), parallel)
        return f"{lit('<tool_call>[' + chr(10))} {calls} {lit(chr(10) + ']</tool_call>')}"

    def render_calls(self, calls: list[Any]) -> str:
        return "<tool_call>[\n" + ",\n".join(_call_json(c, "arguments") for c in calls) + "\n]</tool_call>"
