"""Compact number formats: the dashboard must fit 80 columns, so every figure has a short form."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{n:.0f} B"
            return f"{n:.0f} {unit}" if abs(n) >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def duration(s: float) -> str:
    """At most 6 characters: 4.2s, 42s, 12m05, 3h07, 2d04."""
    if s < 10:
        return f"{max(s, 0.0):.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    m = int(s // 60)
    if m < 60:
        return f"{m}m{int(s % 60):02d}"
    h = m // 60
    if h < 48:
        return f"{h}h{m % 60:02d}"
    return f"{h // 24}d{h % 24:02d}"


def count(n: int) -> str:
    """At most 5 characters: 999, 12345, 123k, 12.3M."""
    if n < 100_000:
        return str(n)
    if n < 10_000_000:
        return f"{n / 1000:.0f}k"
    return f"{n / 1e6:.1f}M"


def rate(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def short_id(request_id: str, width: int = 10) -> str:
    """The random part of `cmpl-<hex>` / `chatcmpl-<hex>`: the prefix is the same on every row."""
    tail = request_id.rsplit("-", 1)[-1]
    return tail[:width]
