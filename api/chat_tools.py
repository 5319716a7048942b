"""What a chat request's `tools`, `tool_choice`, `response_format` and reasoning switches ask of the rest
of the route: the chat template's extra inputs, the messages as the model's format wants them, the
decoding constraint, and each choice's output parser (api/tools). Invalid combinations, unknown tools and
schemas the grammar engine cannot enforce are 400s before anything is queued.

Which constraint: a `tool_choice` that forces a call ("required" or a named function) constrains the
output to calls in the model's native format; otherwise a `response_format` of json_object/json_schema
constrains it to JSON; otherwise the output is free and calls are parsed out of it (`auto`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from api.errors import APIError
from api.render import ChatOutput
from api.schemas import ChatCompletionRequest
from api.service import Service

MAX_TEMPLATE_KWARGS = 32
_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt", "tokenize"})
_formats: dict[int, tuple[Any, Any]] = {}  # id(tokenizer) -> (tokenizer, its ToolFormat)
_formats_lock = threading.Lock()


def tool_format(svc: Service) -> Any:
    """The served model's tool-call format (`--tool-parser`, else sniffed from its chat template)."""
    from api.tools import tool_format_for

    tok = svc.tokenizer
    with _formats_lock:
        hit = _formats.get(id(tok))
        if hit is not None and hit[0] is tok:
            return hit[1]
        fmt = tool_format_for(
            getattr(tok, "chat_template", None), svc.tool_parser, getattr(tok, "special_ids", None)
        )
        _formats[id(tok)] = (tok, fmt)
        return fmt


@dataclass(slots=True)
class ChatPlan:
    """A chat request's tool and format settings, validated; `constraint` and `outputs` need the rendered
    prompt (a template that opens `<think>` changes both)."""

    fmt: Any = None  # api.tools.ToolFormat, or None (no tools, no reasoning)
    tools: list[dict[str, Any]] | None = None  # as sent (dicts), for the template and the grammar
    choice: str = "auto"  # "none", "auto", "required" or a function's name
    parallel: bool = True
    reasoning: bool = False  # split <think> blocks out of the answer
    include_reasoning: bool = True  # vLLM's: False drops the reasoning from the reply
    response_format: Any = None  # schemas.ResponseFormat of type json_object / json_schema
    template: dict[str, Any] = field(default_factory=dict)  # apply_chat_template's extra arguments

    @property
    def parses_calls(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def keep_special_tokens(self) -> bool:
        """The parser needs the model's call markers, some of which are special tokens."""
        return self.parses_calls

    def prepare(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages as the template should see them: for a template without a tools section the format
        adds its tools system prompt and writes the history's calls and results out."""
        if self.fmt is None or not self.tools:
            return messages
        out: list[dict[str, Any]] = self.fmt.prepare_messages(messages, self.tools)
        return out

    def constraint(self, tokenizer: Any, rendered: str) -> Any:
        """The decoding constraint (checked against the served tokenizer), or None; 400 if unenforceable.
        Runs off the event loop: the first check of a tokenizer builds llguidance's copy of it."""
        from cluster.constraints import (
            ConstraintError,
            check,
            grammar_constraint,
            json_object_constraint,
            json_schema_constraint,
        )

        forced = self.parses_calls and self.choice != "auto"
        rf = self.response_format
        try:
            if forced:
                from api.tools import prompt_opens_thinking

                thinking = "open" if prompt_opens_thinking(rendered) else None
                made = grammar_constraint(self.fmt.grammar(self.tools, self.choice, self.parallel, thinking))
            elif rf is not None and rf.type == "json_object":
                made = json_object_constraint()
            elif rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
                made = json_schema_constraint(rf.json_schema.json_schema or {}, bool(rf.json_schema.strict))
            else:
                return None
            check(made, tokenizer)
        except ConstraintError as exc:
            where = "tools" if forced else "response_format"
            raise APIError(400, str(exc), param=where, code="invalid_schema") from None
        except (ValueError, TypeError, KeyError) as exc:  # a tool the format cannot write a grammar for
            raise APIError(
                400, f"cannot build a grammar for these tools: {exc}", param="tools", code="invalid_schema"
            ) from None
        return made

    def outputs(self, rendered: str) -> Callable[[], ChatOutput]:
        """A factory of per-choice outputs: a parser when calls or reasoning are read, else plain text."""
        if not self.parses_calls and not self.reasoning:
            return ChatOutput
        from api.tools import OutputParser, prompt_opens_thinking, tool_names

        fmt, tools, reasoning = self.fmt, self.parses_calls, self.reasoning
        names = tool_names(self.tools)
        # A JSON response_format's grammar holds from the first token (no thinking first): the output is
        # the answer, not reasoning, even where the prompt opened <think>
        rf = self.response_format
        json_forced = not (self.parses_calls and self.choice != "auto") and rf is not None and rf.type != "text"
        opened = reasoning and prompt_opens_thinking(rendered) and not json_forced
        keep = self.include_reasoning
        most = None if self.parallel else 1

        def make() -> ChatOutput:
            parser = OutputParser(fmt, tools, reasoning, names, opened)
            return ChatOutput(parser, keep_reasoning=keep, max_calls=most)

        return make


def plan_chat(svc: Service, body: ChatCompletionRequest) -> ChatPlan:
    """Validate the request's tool and format fields (cheap: no rendering, no grammar compile)."""
    if body.functions or body.function_call is not None:
        raise APIError(
            400,
            "functions and function_call are deprecated: send tools and tool_choice",
            param="functions" if body.functions else "function_call",
            code="unsupported_parameter",
        )
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = _choice(body, tools)
    template = _template_kwargs(body.chat_template_kwargs)
    fmt = tool_format(svc) if tools or _thinks(svc) else None
    plan = ChatPlan(
        fmt=fmt,
        tools=tools,
        choice=choice,
        parallel=body.parallel_tool_calls is not False,
        reasoning=fmt is not None and bool(getattr(fmt, "thinks", False)),
        include_reasoning=body.include_reasoning,
        response_format=body.response_format
        if body.response_format and body.response_format.type != "text"
        else None,
        template=template,
    )
    if tools:
        plan.template["tools"] = tools
    rf = plan.response_format
    if (
        rf is not None
        and rf.type == "json_schema"
        and (rf.json_schema is None or rf.json_schema.json_schema is None)
    ):
        raise APIError(
            400, "response_format json_schema needs json_schema.schema", param="response_format.json_schema"
        )
    return plan


def _choice(body: ChatCompletionRequest, tools: list[dict[str, Any]] | None) -> str:
    tc = body.tool_choice
    if tc is None:
        return "auto" if tools else "none"
    name = tc if isinstance(tc, str) else tc.function.name
    if not tools and name != "none":
        raise APIError(400, f"tool_choice {name!r} needs tools", param="tool_choice")
    if isinstance(tc, str):
        return tc
    if name not in {t["function"]["name"] for t in tools or ()}:
        raise APIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return name


def _template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's chat_template_kwargs (e.g. {"enable_thinking": false} for Qwen 3), bounded; the names the
    route itself passes are refused."""
    if not kwargs:
        return {}
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise APIError(
            400, f"at most {MAX_TEMPLATE_KWARGS} chat_template_kwargs", param="chat_template_kwargs"
        )
    bad = sorted(k for k in kwargs if k in _RESERVED or not k.isidentifier())
    if bad:
        raise APIError(
            400, f"chat_template_kwargs may not set {', '.join(map(repr, bad))}", param="chat_template_kwargs"
        )
    return dict(kwargs)


def _thinks(svc: Service) -> bool:
    template = getattr(svc.tokenizer, "chat_template", None)
    return bool(template and "<think>" in template)
