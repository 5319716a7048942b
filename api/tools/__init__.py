"""Tool calls and reasoning in model output: per-family formats (parsers, native-format grammars, tool
system prompts), chosen from the chat template, and the parser that splits an answer whole or streamed.
Pure Python (json, ast, re): no MLX, no llguidance import (grammars are text)."""

from api.tools.formats import Hermes, SmolLM2, ToolFormat
from api.tools.llama3 import Llama3Json
from api.tools.mistral import Mistral
from api.tools.output import OutputParser, prompt_opens_thinking
from api.tools.pythonic import Pythonic
from api.tools.select import FORMATS, renders_tools, sniff, tool_format_for
from api.tools.types import Delta, Parsed, ToolCall, function_of, parameters_of, tool_names

__all__ = [
    "FORMATS",
    "Delta",
    "Hermes",
    "Llama3Json",
    "Mistral",
    "OutputParser",
    "Parsed",
    "Pythonic",
    "SmolLM2",
    "ToolCall",
    "ToolFormat",
    "function_of",
    "parameters_of",
    "prompt_opens_thinking",
    "renders_tools",
    "sniff",
    "tool_format_for",
    "tool_names",
]
