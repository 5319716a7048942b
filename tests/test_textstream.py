from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.textstream import IncrementalDetokenizer, StopMatcher
from rank.tokenizer import ChatTokenizer


def test_multibyte_characters_spanning_tokens(tiny_model: Path) -> None:
    tok = ChatTokenizer(tiny_model)
    text = "héllo → 世界 🍎 done"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # byte-level: one token per byte, so characters span tokens
    detok = IncrementalDetokenizer(tok.decode)
    pieces = [detok.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40), stop=st.text(min_size=1, max_size=5), cuts=st.lists(st.integers(0, 40)))
def test_stop_never_emitted_and_prefix_exact(text: str, stop: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    m = StopMatcher([stop])
    out = "".join(m.feed(p) for p in pieces)
    if not m.stopped:
        out += m.flush()
    idx = text.find(stop)
    expected = text if idx < 0 else text[:idx]
    assert out == expected
    assert m.stopped == (idx >= 0)


def test_first_of_several_stops_wins() -> None:
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hel") + m.feed("lo wor") + m.feed("ld") == "hel"
    assert m.stopped
