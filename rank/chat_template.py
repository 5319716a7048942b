"""Chat templates rendered as Hugging Face transformers' `apply_chat_template` renders them (5.x,
`utils/chat_template_utils.py`), without importing transformers (seconds to import).

The same sandboxed Jinja environment (trim_blocks, lstrip_blocks, loop controls, the `{% generation %}`
tag), the same `tojson` (not HTML-escaping, `ensure_ascii=False`), `raise_exception`, `strftime_now`,
`dict` and `namespace`; the same inputs: message keys whose value is None dropped, reasoning aliased under `reasoning_content` and `thinking`, `tools` and
`documents` always defined (None when absent), the named special tokens, then the caller's variables.
Two steps are ours, as vLLM does them: `content: null` (an assistant turn with calls) is "", which
templates that concatenate or search the content need; tool-call arguments sent as JSON text (OpenAI's
shape) become objects for templates that treat them as objects (`tojson`, `items()`, `is mapping`), as
transformers asks."""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_BARE_ARGS = re.compile(r"arguments\s*(-?\}\}|\+|~)")
_OBJECT_ARGS = re.compile(
    r"arguments\s*(\|\s*(tojson|items|dictsort|length)|\.items\(\)|is\s+(not\s+)?(mapping|string)|\[)"
    r"|in\s+[\w.\[\]'\"]*arguments\b|function\s*\|\s*tojson"
)


def load_templates(model_dir: Path, config: dict[str, Any]) -> dict[str, str]:
    """The model's templates by name ("default", "tool_use", ...): `chat_template.jinja` and
    `additional_chat_templates/*.jinja` when present (they win over the config, as in transformers),
    else `chat_template` from tokenizer_config.json (a string, or a list of {name, template})."""
    out: dict[str, str] = {}
    if (model_dir / "chat_template.jinja").exists():
        out["default"] = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    extra = model_dir / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            out[f.stem] = f.read_text(encoding="utf-8")
    if out:
        return out
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {
            t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t
        }
    return {}


def pick_template(templates: dict[str, str], tools: Any) -> str | None:
    """As `get_chat_template`: the "tool_use" template when tools are given and the model has one."""
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    return templates.get("default")


def special_token_vars(config: dict[str, Any]) -> dict[str, str]:
    """`special_tokens_map` of the tokenizer: the named special tokens that are set."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


@functools.lru_cache(maxsize=16)
def wants_object_arguments(template: str) -> bool:
    """Whether the template reads a call's arguments as an object (true of nearly all); a template that
    only prints them as they come keeps the JSON text."""
    return bool(_OBJECT_ARGS.search(template)) or not _BARE_ARGS.search(template)


def prepare_messages(messages: list[dict[str, Any]], object_arguments: bool) -> list[dict[str, Any]]:
    """The messages as transformers hands them to the template (see the module docstring)."""
    out = []
    for message in messages:
        m = {k: v for k, v in message.items() if v is not None}
        if "content" in message and message["content"] is None:  # as vLLM: templates that concatenate
            m["content"] = ""  # or search the content (Qwen 3, SmolLM2) fail on none
        if object_arguments and isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [_object_call(c) for c in m["tool_calls"]]
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _object_call(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    fn = dict(call["function"])
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args) if args.strip() else {}
        except ValueError:
            pass  # not JSON: the template gets the text, as the client sent it
    elif args is None:
        fn["arguments"] = {}
    return {**call, "function": fn}


def compile_template(source: str) -> Any:
    """The template compiled in transformers' environment."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks its position
        for assistant masks, which serving never asks for)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """Refuses underscore names, which would reach Python internals."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            for name in dict(*rest, **kwargs):
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, dict(*rest, **kwargs))

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with _: {name!r}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)
