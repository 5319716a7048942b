"""What a constrained request's output must match (`response_format`, `tool_choice` required or named), as
an llguidance grammar text, built and checked on the API's side before anything is queued.

A `Constraint` is plain data (its grammar is text), so it crosses the engine door like the rest of a
request; rank 0's sampler compiles it into a matcher (rank/grammar.py). llguidance is imported only by
`check` and `ll_tokenizer`, inside them: the rest of `cluster/` never needs it.

JSON whitespace is fixed (", " and ": " as separators, nothing else): with free whitespace small models
loop on newlines and spaces until `max_tokens` (vLLM and llguidance users hit this), and a bounded
pattern still lets a random model pad every gap. The separators are the ones `json.dumps` writes, the
form models saw most.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

KINDS = ("json_schema", "json_object", "tool_calls", "grammar")
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_CHARS = 1_000_000  # a schema or grammar larger than this is refused (400), never compiled


@dataclass(frozen=True, slots=True)
class Constraint:
    """`grammar`: llguidance's grammar text (its JSON form for schemas, Lark for tool calls)."""

    kind: str  # one of KINDS
    grammar: str


class ConstraintError(ValueError):
    """The schema or grammar cannot be enforced (invalid, unsupported, too large): the route's 400."""


def json_schema_constraint(schema: dict[str, Any], strict: bool = False) -> Constraint:
    """Output is one JSON value valid against `schema`. `strict` (OpenAI's flag): a keyword the grammar
    engine cannot enforce is an error; without it such keywords are ignored (the rest still holds)."""
    if not isinstance(schema, dict):
        raise ConstraintError("the JSON schema must be an object")
    options = {**JSON_OPTIONS, "lenient": not strict}
    try:
        body = {**schema, "x-guidance": {**options}}
        text = json.dumps(
            {"grammars": [{"name": "json_schema", "json_schema": body, "lark_grammar": None}]},
            separators=(",", ":"),
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"the JSON schema is not serialisable JSON: {exc}") from None
    return Constraint("json_schema", text)


def json_object_constraint() -> Constraint:
    """OpenAI's `json_object`: any JSON object (the schema {"type": "object"})."""
    return Constraint("json_object", json_schema_constraint({"type": "object"}).grammar)


def grammar_constraint(lark: str, kind: str = "tool_calls") -> Constraint:
    """A Lark grammar (llguidance's dialect: %json{...} embeds a schema, <|token|> a special token)."""
    if kind not in KINDS:
        raise ValueError(f"unknown constraint kind {kind!r}")
    return Constraint(kind, lark)


# -- validation against the served tokenizer -------------------------------------------------------
_lock = threading.Lock()
_tokenizers: dict[int, tuple[Any, Any]] = {}  # id(served tokenizer) -> (it, its llguidance tokenizer)
_checked: OrderedDict[tuple[int, str], str] = OrderedDict()  # (tokenizer, grammar) -> error ("" if ok)
_CHECKED_MAX = 512


def ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's tokenizer for the served one (rank/tokenizer.ChatTokenizer, or an LLTokenizer), built
    once per tokenizer object: it costs about a second at a 50k vocabulary. Every EOS id is an EOS."""
    import llguidance

    if isinstance(tokenizer, llguidance.LLTokenizer):
        return tokenizer
    with _lock:
        hit = _tokenizers.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        eos = sorted(getattr(tokenizer, "eos_token_ids", ()) or ()) or None
        backend = getattr(tokenizer, "_tok", None)  # a `tokenizers.Tokenizer` (from tokenizer.json)
        if backend is not None:
            built = llguidance.LLTokenizer(backend.to_str(), eos_token=eos)
        else:
            import llguidance.hf

            built = llguidance.hf.from_tokenizer(tokenizer._hf, eos_token=eos)
        _tokenizers[id(tokenizer)] = (tokenizer, built)
        return built


def check(constraint: Constraint, tokenizer: Any) -> None:
    """Compile `constraint` against the served tokenizer; raises ConstraintError with the engine's reason.
    Results are cached by grammar text (a client repeats its schema on every request)."""
    if len(constraint.grammar) > MAX_GRAMMAR_CHARS:
        raise ConstraintError(f"the schema or grammar is longer than {MAX_GRAMMAR_CHARS} characters")
    tok = ll_tokenizer(tokenizer)
    key = (id(tok), constraint.grammar)
    with _lock:
        error = _checked.get(key)
        if error is not None:
            _checked.move_to_end(key)
    if error is None:
        import llguidance

        try:
            error = llguidance.LLMatcher.validate_grammar(constraint.grammar, tok)
        except Exception as exc:  # a malformed grammar text may raise rather than answer
            error = str(exc) or type(exc).__name__
        with _lock:
            _checked[key] = error
            while len(_checked) > _CHECKED_MAX:
                _checked.popitem(last=False)
    if error and not error.startswith("WARNING"):
        what = "JSON schema" if constraint.kind in ("json_schema", "json_object") else "grammar"
        raise ConstraintError(f"unsupported or invalid {what}: {error}")
