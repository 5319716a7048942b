"""The tables and the text check of spec_bench.py: one row per measured cell, ready for README's
Performance section, and each prompt's greedy text with speculation against the same cell without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WORKLOADS = ("rewrite", "quote", "chat")
TARGETS = {"rewrite": (1.5, 1.2), "quote": (1.5, 1.2), "chat": (0.97, 0.97)}  # x off at 1 / 8 streams (#16)


@dataclass(slots=True)
class Cell:
    """One measurement: a system in a mode, at a TP size, on a workload at a concurrency."""

    system: str  # "orchard" or "mlx_lm.server"
    mode: str  # off, ngram, draft
    np: int
    workload: str
    concurrency: int
    summary: dict[str, Any]
    texts: dict[int, str]
    metrics: dict[str, float] = field(default_factory=dict)
    round: int = 0  # of --rounds
    load: float = 0.0  # the host's 1-minute load average when the cell began (2 cores: 0-1 is quiet)

    @property
    def tok_s(self) -> float:
        return float(self.summary.get("output_tok_s") or 0.0)

    def acceptance(self) -> str:
        """Accepted / drafted tokens during this cell, from the counters' differences."""
        drafted = sum(v for k, v in self.metrics.items() if "drafted" in k and k.endswith("_total"))
        accepted = sum(v for k, v in self.metrics.items() if "accepted" in k and k.endswith("_total"))
        return f"{accepted / drafted:.0%} of {drafted:.0f}" if drafted else "-"


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def compare_texts(cells: list[Cell]) -> tuple[list[str], list[str]]:
    """Mismatches (speculation against off in the same round, TP size and concurrency: bugs) and
    differences (across systems, TP sizes, concurrencies and rounds: information, float order)."""
    off = {
        (c.round, c.np, c.workload, c.concurrency): c
        for c in cells
        if c.system == "orchard" and c.mode == "off"
    }
    bugs: list[str] = []
    info: list[str] = []
    for c in cells:
        if c.system == "orchard" and c.mode != "off":
            base, into = off.get((c.round, c.np, c.workload, c.concurrency)), bugs
        elif c.system != "orchard":
            base, into = off.get((c.round, 1, c.workload, 1)), info
        elif c.round > 0:
            base, into = off.get((0, c.np, c.workload, c.concurrency)), info
        else:
            base, into = off.get((0, c.np if c.concurrency > 1 else 1, c.workload, 1)), info
        if base is None or base is c:
            continue
        for i, text in sorted(c.texts.items()):
            if i not in base.texts or base.texts[i] == text:
                continue
            at = first_difference(base.texts[i], text)
            into.append(
                f"{c.system} {c.mode} np{c.np} {c.workload} c{c.concurrency} round {c.round} prompt {i} differs "
                f"from off np{base.np} c{base.concurrency} round {base.round} at char {at}: "
                f"{base.texts[i][at : at + 40]!r} vs {text[at : at + 40]!r}"
            )
    return bugs, info


def best_of(cells: list[Cell]) -> list[Cell]:
    """Each cell's fastest round: on a shared machine the others' load only ever slows a round down."""
    best: dict[tuple[str, str, int, str, int], Cell] = {}
    for c in cells:
        key = (c.system, c.mode, c.np, c.workload, c.concurrency)
        if key not in best or c.tok_s > best[key].tok_s:
            best[key] = c
    return list(best.values())


def markdown(cells: list[Cell]) -> str:
    """One row per cell, ready for README's Performance section."""
    off = {(c.np, c.workload, c.concurrency): c for c in cells if c.system == "orchard" and c.mode == "off"}
    rows = [
        "| workload | streams | TP | system, mode | tok/s | x off | TTFT p50 ms | TPOT p50 ms | tokens | accepted "
        "| target | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {w: i for i, w in enumerate(WORKLOADS)}
    for c in sorted(cells, key=lambda c: (order[c.workload], c.concurrency, c.np, c.system != "orchard")):
        base = off.get((c.np, c.workload, c.concurrency))
        gain = c.tok_s / base.tok_s if base and base.tok_s else None
        target = ""
        if c.system == "orchard" and c.mode != "off" and gain is not None:
            want = TARGETS[c.workload][0 if c.concurrency == 1 else 1]
            target = f">={want}: {'met' if gain >= want else 'MISSED'}"
        name = "Orchard" if c.system == "orchard" else "mlx_lm.server"
        s = c.summary
        rows.append(
            f"| {c.workload} | {c.concurrency} | {c.np} | {name}, {c.mode} | {c.tok_s:.1f} | "
            f"{f'{gain:.2f}' if gain is not None and c.system == 'orchard' else '-'} | {s['ttft_p50_ms']} | "
            f"{s['tpot_p50_ms']} | {s['output_tokens']} | {c.acceptance()} | {target} | {c.load:.1f} |"
        )
    return "\n".join(rows)


def peer_lines(cells: list[Cell]) -> list[str]:
    """Orchard's modes against each mlx_lm.server mode, one stream at TP=1 (its only batched-free setting
    with a draft model)."""
    lines = []
    for p in (c for c in cells if c.system == "mlx_lm.server" and c.tok_s):
        mine = [c for c in cells if c.system == "orchard" and c.np == 1 and c.concurrency == 1]
        for c in (c for c in mine if c.workload == p.workload):
            lines.append(
                f"{c.workload}, 1 stream: Orchard {c.mode} {c.tok_s:.1f} tok/s / mlx_lm.server {p.mode} "
                f"{p.tok_s:.1f} tok/s = {c.tok_s / p.tok_s:.2f}"
            )
    return lines


def tp_lines(cells: list[Cell]) -> list[str]:
    """Speculation's gain over off at each TP size side by side: at TP>1 an accepted token also saves
    one step's collectives."""
    off = {
        (c.np, c.workload, c.concurrency): c.tok_s for c in cells if c.system == "orchard" and c.mode == "off"
    }
    nps = sorted({c.np for c in cells if c.system == "orchard"})
    lines = []
    for c in cells:
        if c.system != "orchard" or c.mode == "off" or c.np != nps[0] or len(nps) < 2:
            continue
        gains = []
        for n in nps:
            spec = next((x.tok_s for x in cells if (x.system, x.mode, x.np, x.workload, x.concurrency)
                         == ("orchard", c.mode, n, c.workload, c.concurrency)), 0.0)  # fmt: skip
            base = off.get((n, c.workload, c.concurrency), 0.0)
            if base and spec:
                gains.append(f"TP={n} {spec / base:.2f}x")
        if len(gains) > 1:
            lines.append(f"{c.workload}, {c.concurrency} stream(s), {c.mode} over off: {', '.join(gains)}")
    return lines
