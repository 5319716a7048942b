"""Text <-> token ids and the chat template, without importing transformers (slow) when not needed.

A model directory with `tokenizer.json` is served through the `tokenizers` package and the chat template
from `tokenizer_config.json` rendered in a sandboxed Jinja environment, as Hugging Face does. Other
directories (sentencepiece only) fall back to transformers' AutoTokenizer.

The API calls `encode` and `encode_chat` from its prompt threads (`api.prompts`) while the engine thread
decodes: both paths are safe to call from several threads at once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cluster.errors import ModelError


def _raise(message: str) -> None:
    raise ValueError(message)


class ChatTokenizer:
    def __init__(self, model_dir: Path) -> None:
        cfg_path = model_dir / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self._hf: Any = None
        self._tok: Any = None
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
        template = cfg.get("chat_template")
        if template is None and (model_dir / "chat_template.jinja").exists():
            template = (model_dir / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.eos_token_ids = self._eos_ids(model_dir)
        self._compiled: Any = None
        self._lock = threading.Lock()  # the lazy compile; transformers' tokenizers are not thread-safe

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
        """The batch calls let go of the GIL while Rust works (`Tokenizer.encode` holds it: a 1 MiB prompt
        froze every other thread for 0.8 s); `encode_batch_fast` also skips the character offsets we never
        read, which makes it 2.7 times as fast. Both give the same ids as `encode`."""
        batch = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        return list(batch([text], add_special_tokens=False)[0].ids)

    def decode(self, ids: Sequence[int]) -> str:
        if self._tok is not None:
            if len(ids) > 4096:  # an echoed prompt: the batch call lets go of the GIL (89 ms for 800k ids)
                return str(self._tok.decode_batch([list(ids)], skip_special_tokens=True)[0])
            return str(self._tok.decode(list(ids), skip_special_tokens=True))
        return str(self._hf.decode(list(ids), skip_special_tokens=True))

    def render_chat(self, messages: list[dict[str, Any]], **extra: Any) -> str:
        source = self.chat_template
        if source is None:
            raise ModelError("this model has no chat template: use /v1/completions")
        return str(
            self._template(source).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        )

    def _template(self, source: str) -> Any:
        with self._lock:
            if self._compiled is None:
                from jinja2.sandbox import ImmutableSandboxedEnvironment

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = _raise
                env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
                self._compiled = env.from_string(source)
            return self._compiled

    def encode_chat(self, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
        """Render the template and tokenize it; the template already carries any BOS token."""
        return self.encode(self.render_chat(messages, **extra), add_special=False)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
