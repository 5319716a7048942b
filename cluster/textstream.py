"""Token ids to text, incrementally, with stop strings held back until they are ruled out.

Pure logic with an injected `decode` function, so it is tested without a model. The technique (decode a
short window and emit only what is stable, never a trailing U+FFFD) is the one vLLM and TGI use for
byte-level BPE, where one character can span several tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    # A UTF-8 character is at most 4 bytes: past this many pending tokens the bytes are invalid, and
    # holding them longer would only grow the window (and the cost of every decode) without end.
    MAX_PENDING = 8

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token: int) -> str:
        """Add one token and return the text it completes (possibly empty)."""
        self._tokens.append(token)
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset :])
        stuck = len(self._tokens) - self._read_offset > self.MAX_PENDING
        if len(full) > len(prefix) and (stuck or not full.endswith("\ufffd")):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Text still pending at the end (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._tokens)
        return full[len(prefix) :]


class StopMatcher:
    """Finds the first stop string in streamed text; never emits any part of it (with `include`, emits the
    text up to the end of the matched stop string: vLLM's `include_stop_str_in_output`).

    Up to `max(len(stop)) - 1` characters are held back, because they may be the start of a stop string
    that the next token completes. Text fed with `check=False` (before `min_tokens`) is never searched on
    its own: a stop string must end in text fed with checking on to count.
    """

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._include = include
        self._pending = ""
        self._unchecked = 0  # leading characters of `_pending` that arrived while checking was off
        self.stopped = False

    def feed(self, text: str, check: bool = True) -> str:
        """Return the text that is safe to emit; sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._pending + text
        if check:
            cut = self._find(buf)
            if cut >= 0:
                self.stopped = True
                self._pending = ""
                return buf[:cut]
        keep = min(self._hold, len(buf))
        self._pending = buf[len(buf) - keep :] if keep else ""
        self._unchecked = 0 if check else len(self._pending)
        return buf[: len(buf) - keep]

    def _find(self, buf: str) -> int:
        """Where the output ends at the earliest stop string in `buf` that ends past the unchecked text;
        -1 when there is none."""
        best, cut = len(buf) + 1, -1
        for s in self._stops:
            i = buf.find(s, max(0, self._unchecked - len(s) + 1))
            if 0 <= i < best:
                best, cut = i, i + len(s) if self._include else i
        return cut

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
