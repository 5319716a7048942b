"""Which tool-call format a model writes, read from its chat template (as mlx-lm's
`tokenizer_utils._infer_tool_parser` does), unless `--tool-parser` names one."""

from __future__ import annotations

import re
from collections.abc import Mapping

from api.tools.formats import Hermes, SmolLM2, ToolFormat
from api.tools.llama3 import Llama3Json
from api.tools.mistral import Mistral
from api.tools.pythonic import Pythonic

FORMATS: dict[str, type[ToolFormat]] = {
    "hermes": Hermes,
    "llama3_json": Llama3Json,
    "mistral": Mistral,
    "pythonic": Pythonic,
    "smollm2": SmolLM2,
}
# The embedded SmolLM2-Instruct's template (no tools section) names the model in its default system turn.
_SMOLLM = ("named SmolLM", "SmolLM2")
_PYTHONIC = ("<|tool_call_start|>", "<|tool_list_start|>", "<|python_start|>", "func_name1(")


def sniff(chat_template: str | None) -> str:
    """The format a template's text points to; "hermes" when it points to none (a model that was not
    trained on tools is taught Hermes' format by its system prompt)."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if any(m in t for m in _PYTHONIC):
        return "pythonic"
    if "<tool_call>[" in t or any(m in t for m in _SMOLLM):
        return "smollm2"
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or ('"parameters"' in t and "ipython" in t):
        return "llama3_json"
    return "hermes"


def renders_tools(chat_template: str | None) -> bool:
    """Whether the template reads the `tools` variable (else the format's system prompt is needed)."""
    return bool(chat_template and re.search(r"\b(tools|custom_tools)\b", chat_template))


def tool_format_for(
    chat_template: str | None, override: str | None = None, special_tokens: Mapping[str, int] | None = None
) -> ToolFormat:
    """The format for a model. `override`: a name from `FORMATS` (`--tool-parser`); ValueError if
    unknown. `special_tokens`: the tokenizer's special tokens (text -> id), so grammars force a marker
    that is one token (`[TOOL_CALLS]`, `[ARGS]`) as that token."""
    name = override or sniff(chat_template)
    cls = FORMATS.get(name)
    if cls is None:
        raise ValueError(f"unknown tool parser {name!r}: choose one of {', '.join(sorted(FORMATS))}")
    t = chat_template or ""
    common = {"template_tools": renders_tools(t), "thinks": "<think>" in t, "specials": special_tokens}
    if cls is Mistral:
        return Mistral(named="[ARGS]" in t, **common)  # type: ignore[arg-type]
    return cls(**common)  # type: ignore[arg-type]
