"""Text <-> token ids and the chat template, without importing transformers (slow) when not needed.

A model directory with `tokenizer.json` is served through the `tokenizers` package and the chat template
from `tokenizer_config.json` rendered in a sandboxed Jinja environment, as Hugging Face does. Other
directories (sentencepiece only) fall back to transformers' AutoTokenizer.

The API calls `encode` and `encode_chat` from its prompt threads (`api.prompts`) while the engine thread
decodes: both paths are safe to call from several threads at once.

Request strings are data. `encode_chat` reads special-token text written inside a message ("<|im_end|>\n
<|im_start|>system ...") as plain text, so a client cannot forge role markers or control tokens; only
the template's own text yields special tokens. `encode` (a raw `/v1/completions` prompt, the client's own
template) still reads them as special tokens.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import ModelError
from rank.chat_template import (
    compile_template,
    load_templates,
    prepare_messages,
    special_token_vars,
    wants_object_arguments,
)


class ChatTokenizer:
    def __init__(self, model_dir: Path, special_tokens_in_content: bool = False) -> None:
        """`special_tokens_in_content`: read special-token text inside messages as special tokens, as
        before issue #19 (`--allow-special-tokens-in-content`), for clients that build turns themselves."""
        cfg_path = model_dir / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self._hf: Any = None
        self._tok: Any = None
        self._plain_tok: Any = None  # made on first use by `_plain`
        self._tokenizer_file = model_dir / "tokenizer.json"
        self.special_tokens_in_content = special_tokens_in_content
        if (model_dir / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            self._tok.no_padding()
            self._tok.no_truncation()
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError as exc:  # pragma: no cover
                raise ModelError(f"{model_dir} has no tokenizer.json and transformers is missing") from exc
            self._hf = AutoTokenizer.from_pretrained(str(model_dir))
        self.chat_templates = load_templates(model_dir, cfg)  # by name: "default", "tool_use", ...
        self.chat_template: str | None = self.chat_templates.get("default")
        map_path = model_dir / "special_tokens_map.json"  # the older place for them
        old_map: dict[str, Any] = json.loads(map_path.read_text()) if map_path.exists() else {}
        # bos_token, eos_token, ... as transformers passes them to the template
        self.template_vars = special_token_vars({**old_map, **cfg})
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.eos_token_ids = self._eos_ids(model_dir)
        self._compiled: dict[str, Any] = {}  # template source -> compiled
        self._lock = threading.Lock()  # the lazy compile; transformers' tokenizers are not thread-safe
        special = self._special_tokens()
        self.specials = SpecialText.of(special)
        self.special_ids = {text: tid for tid, text in special.items() if text}  # text -> id

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size() if self._tok else len(self._hf))

    def _eos_ids(self, model_dir: Path) -> frozenset[int]:
        ids: set[int] = set()
        for name in ("config.json", "generation_config.json"):
            path = model_dir / name
            if path.exists():
                value = json.loads(path.read_text()).get("eos_token_id")
                if isinstance(value, int):
                    ids.add(value)
                elif isinstance(value, list):
                    ids.update(v for v in value if isinstance(v, int))
        if self.eos_token:
            tid = self.token_to_id(self.eos_token)
            if tid is not None:
                ids.add(tid)
        return frozenset(ids)

    def token_to_id(self, text: str) -> int | None:
        if self._tok is not None:
            return self._tok.token_to_id(text)
        tid = self._hf.convert_tokens_to_ids(text)
        return None if tid == self._hf.unk_token_id else tid

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        if self._tok is not None:
            ids = self._encode_ids(text)
            if add_special and self.add_bos and self.bos_token:
                bos = self.token_to_id(self.bos_token)
                if bos is not None and (not ids or ids[0] != bos):
                    ids.insert(0, bos)
            return ids
        with self._lock:
            return list(self._hf.encode(text, add_special_tokens=add_special))

    def _encode_ids(self, text: str) -> list[int]:
        return _batch_ids(self._tok, [text])[0]

    def _encode_pieces(self, texts: list[str], plain: bool) -> list[list[int]]:
        """Each text on its own, no BOS; `plain` reads special-token text as ordinary text."""
        if self._tok is not None:
            return _batch_ids(self._plain() if plain else self._tok, texts)
        with self._lock:  # the flag transformers sets for `split_special_tokens` lives on the tokenizer
            return [
                list(self._hf.encode(t, add_special_tokens=False, split_special_tokens=plain)) for t in texts
            ]

    def _plain(self) -> Any:
        """A second `Tokenizer` that never matches special tokens. `encode_special_tokens` is a flag on
        the tokenizer object: setting it around calls on the shared one would race the other prompt
        thread (a raw prompt would lose its specials), so this copy has it set once, before any use."""
        with self._lock:
            if self._plain_tok is None:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(self._tokenizer_file))
                tok.no_padding()
                tok.no_truncation()
                tok.encode_special_tokens = True
                self._plain_tok = tok
            return self._plain_tok

    def _special_tokens(self) -> dict[int, str]:
        """Id -> text of the tokens marked special (role markers, BOS/EOS, control tokens). Added tokens
        not marked special (a model's extra words, some `<think>`) are vocabulary, as in Hugging Face's
        `split_special_tokens`: reading them apart would change the ids of ordinary text."""
        if self._tok is not None:
            return {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        out = {i: t.content for i, t in self._hf.added_tokens_decoder.items() if t.special}
        for text in self._hf.all_special_tokens:
            tid = self.token_to_id(text)
            if tid is not None:
                out[tid] = text
        return out

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """`skip_special` False keeps special tokens' text (tool-call markers such as `[TOOL_CALLS]` or
        `<|python_tag|>`, which the tool parsers need)."""
        if self._tok is not None:
            if len(ids) > 4096:  # an echoed prompt: the batch call lets go of the GIL (89 ms for 800k ids)
                return str(self._tok.decode_batch([list(ids)], skip_special_tokens=skip_special)[0])
            return str(self._tok.decode(list(ids), skip_special_tokens=skip_special))
        return str(self._hf.decode(list(ids), skip_special_tokens=skip_special))

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The prompt text, as transformers' `apply_chat_template(messages, tools=tools,
        add_generation_prompt=True, tokenize=False, **extra)` renders it (rank/chat_template.py): the
        "tool_use" template when tools are given and the model has one, `content: None` accepted,
        call arguments given as JSON text turned into objects for templates that read objects."""
        source = self.chat_template
        if tools is not None and "tool_use" in self.chat_templates:
            source = self.chat_templates["tool_use"]
        if source is None:
            raise ModelError("this model has no chat template: use /v1/completions")
        return str(
            self._template(source).render(
                messages=prepare_messages(messages, wants_object_arguments(source)),
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **{**self.template_vars, **extra},
            )
        )

    def _template(self, source: str) -> Any:
        with self._lock:
            if source not in self._compiled:
                self._compiled[source] = compile_template(source)
            return self._compiled[source]

    def encode_chat(
        self, messages: list[dict[str, Any]], rendered: str | None = None, **extra: Any
    ) -> list[int]:
        """Render the template and tokenize it; the template already carries any BOS token. `rendered`:
        `render_chat(messages, **extra)` when the caller has it already (the API checks its length).

        Every string in `messages` and `extra` comes from the request: special-token text inside one is
        read as plain text. A conversation without such text (nearly all) takes the same path as before,
        so its ids are the whole-string encoding, byte for byte (the prefix cache depends on it). Do not
        tokenize `render_chat`'s text yourself: that reads special-token text in messages as special.
        Not caught: a special token that only forms where a request string meets the template's text or
        another request string ("<|im_" + "end|>"); no template we know puts them side by side so."""
        if rendered is None:
            rendered = self.render_chat(messages, **extra)
        if self.special_tokens_in_content or not self.specials.found_in((messages, extra)):
            return self.encode(rendered, add_special=False)
        return self._encode_chat_masked(messages, extra, rendered)

    def _encode_chat_masked(
        self, messages: list[dict[str, Any]], extra: dict[str, Any], real: str
    ) -> list[int]:
        """Each special-token text in the request becomes a placeholder, one character of the private use
        planes that the request does not hold (it survives `trim`, `upper`, splits on other text, and is
        shorter than the text it stands for, so the render cannot grow); the template is rendered with
        them and the render split at them: the template's pieces are tokenized with special tokens, the
        request's special text without. Only that text is cut out: the rest of a message stays in one
        piece with the template's text around it, as in the whole-string encoding (cutting out whole
        messages changed the ids of ordinary messages that start with a space or a newline on SmolLM2)."""
        marks = self.specials.placeholders((messages, extra))
        masked = self.render_chat(self.specials.mask(messages, marks), **self.specials.mask(extra, marks))
        back = {ch: text for text, ch in marks.items()}
        parts = re.split("([" + re.escape("".join(back)) + "])", masked)
        texts, injected = parts[0::2], [back[ch] for ch in parts[1::2]]
        text_ids = self._encode_pieces(texts, plain=False)
        if "".join(t + i for t, i in zip(texts, [*injected, ""], strict=True)) == real:
            distinct = sorted(set(injected))
            plain = dict(zip(distinct, self._encode_pieces(distinct, plain=True), strict=True))
            out = list(text_ids[0])
            for text, ids in zip(injected, text_ids[1:], strict=True):
                out += plain[text]
                out += ids
            return out
        # The template reshaped text holding placeholders (cut, escaped or dropped it, split it at a
        # special token): the real render serves when the special tokens in it are the template's own.
        own = [i for ids in text_ids for i in ids if i in self.specials.ids]
        ids = self.encode(real, add_special=False)
        if [i for i in ids if i in self.specials.ids] == own:
            return ids
        raise ValueError(
            "a message holds special-token text that this model's chat template reshapes, so it cannot "
            "be kept apart from the template's own special tokens; remove it (or start the server with "
            "--allow-special-tokens-in-content)"
        )


_TRIE_CHARS = 64
_PRIVATE = re.compile("[\U000f0000-\U0010ffff]")  # supplementary private use areas A and B


@dataclass(slots=True, frozen=True)
class SpecialText:
    """The texts of a tokenizer's special tokens, and one regex that finds any of them. The regex is a
    trie (`_trie_pattern`): a plain alternation of Llama 3's 256 specials took 1.7 s, holding the GIL, on
    a 4 MiB body made of near misses; the trie takes 16 ms."""

    texts: tuple[str, ...]
    ids: frozenset[int]
    pattern: re.Pattern[str] | None

    @classmethod
    def of(cls, tokens: dict[int, str]) -> SpecialText:
        texts = tuple(sorted({t for t in tokens.values() if t}))
        return cls(texts, frozenset(tokens), re.compile(_trie_pattern(texts)) if texts else None)

    def found_in(self, value: Any) -> bool:
        """Whether any string in `value` (nested dicts, lists, tuples; keys too) holds special text."""
        pattern = self.pattern
        return pattern is not None and any(pattern.search(s) for s in _strings(value))

    def placeholders(self, value: Any) -> dict[str, str]:
        """A character for each special text in `value`, from the private use planes, none in `value`."""
        assert self.pattern is not None
        present = sorted({m for s in _strings(value) for m in self.pattern.findall(s)})
        taken = {c for s in _strings(value) for c in _PRIVATE.findall(s)}
        free = (chr(c) for c in range(0xF0000, 0x110000) if chr(c) not in taken)
        marks = dict(zip(present, free, strict=False))
        if len(marks) < len(present):
            raise ValueError("this request holds special-token text and every private use character")
        return marks

    def mask(self, value: Any, marks: dict[str, str]) -> Any:
        """A copy of `value` with each special text replaced by its character in `marks`."""
        pattern = self.pattern
        assert pattern is not None
        return _mask(value, lambda text: pattern.sub(lambda m: marks[m[0]], text))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _mask(value: Any, sub: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return sub(value)
    if isinstance(value, dict):
        return {_mask(k, sub): _mask(v, sub) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_mask(v, sub) for v in value)
    return value


def _trie_pattern(words: Sequence[str]) -> str:
    """A regex matching any of `words`, the longest one where several start at the same place (as the
    tokenizer matches). Words longer than `_TRIE_CHARS` (none in the tokenizers we know) go first as a
    plain alternation, which keeps the trie's nesting, and so recursion here and in `re`, shallow."""
    long = sorted((w for w in words if len(w) > _TRIE_CHARS), key=len, reverse=True)
    trie: dict[str, Any] = {}
    for word in words:
        if len(word) <= _TRIE_CHARS:
            node = trie
            for ch in word:
                node = node.setdefault(ch, {})
            node[""] = {}

    def build(node: dict[str, Any]) -> str:
        alts = []
        for ch, child in sorted(node.items()):
            if ch:
                run = ch
                while len(child) == 1 and "" not in child:  # a chain of single letters: one literal
                    ((ch, child),) = child.items()
                    run += ch
                alts.append(re.escape(run) + build(child))
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return "|".join([re.escape(w) for w in long] + ([build(trie)] if trie else []))


def _batch_ids(tok: Any, texts: list[str]) -> list[list[int]]:
    """The batch calls let go of the GIL while Rust works (`Tokenizer.encode` holds it: a 1 MiB prompt
    froze every other thread for 0.8 s); `encode_batch_fast` also skips the character offsets we never
    read, which makes it 2.7 times as fast. Both give the same ids as `encode`."""
    batch = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    return [list(e.ids) for e in batch(texts, add_special_tokens=False)]


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
