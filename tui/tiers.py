"""The KV cache pane: one view per tier in the snapshot, built from the fields every tier shares, so a
tier added later shows up without code here; the SSD tier's own fields (`extra`) are listed after."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.widgets import Label, ProgressBar, Sparkline, Static

from cluster import snapshot
from tui.fmt import count, human_bytes


class TierView(Vertical):
    """One KV tier: a used/capacity bar, the counters, and the recent hit-rate sparkline."""

    DEFAULT_CSS = """
    TierView { height: auto; }
    TierView > Horizontal { height: 1; }
    TierView .name { width: 5; text-style: bold; }
    TierView ProgressBar { width: 1fr; }
    TierView Bar { width: 1fr; }
    TierView .stats { height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    TierView Sparkline { width: 1fr; height: 1fr; }
    """

    def __init__(self, tier: snapshot.TierView, hits: list[float]) -> None:
        super().__init__(classes="tier")
        self.tier_name = tier.name
        self._latest = (tier, hits)

    def on_mount(self) -> None:
        self.show(*self._latest)

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield Label(self.tier_name.upper()[:4], classes="name")
            yield ProgressBar(total=1, show_eta=False)
        yield Static(classes="stats")
        with Horizontal(classes="spark-row"):
            yield Label("hit%", classes="name")
            yield Sparkline([], summary_function=max)

    def show(self, t: snapshot.TierView, hits: list[float]) -> None:
        self._latest = (t, hits)
        if not self.is_mounted:
            return  # on_mount shows the latest figures
        used, cap = (t.bytes_used, t.capacity_bytes) if t.capacity_bytes else (t.blocks, t.capacity_blocks)
        self.query_one(ProgressBar).update(total=max(cap, 1), progress=min(used, max(cap, 1)))
        parts = [
            f"hit {t.hit_rate:.0%}",
            f"ev {count(t.evictions)}",
            f"{count(t.blocks)}/{count(t.capacity_blocks)} blk",
            f"{human_bytes(t.bytes_used)} / {human_bytes(t.capacity_bytes)}",
        ]
        parts.append(f"stored {t.stored}")
        if t.extra is not None:
            parts.append(f"corrupt dropped {t.extra.corrupt_dropped}")
        text = escape(" · ".join(parts))
        if not t.enabled:
            text = f"[b $text-error]off: {escape(t.disabled_reason or 'disabled')}[/] · " + text
        self.query_one(".stats", Static).update(text)
        self.query_one(Sparkline).data = hits


class MemoryView(Vertical):
    """The running sequences' KV per rank against the budget (`--kv-budget`): what they hold now (the
    bar, "now/budget"), what they may grow to over the budget ("rsv"), the decode batch's padding
    ("pad"), with --kv-live-from the running sequences whose cache is quantized ("q"), and requests waiting
    for memory (first, as the pane is narrow)."""

    DEFAULT_CSS = """
    MemoryView { height: auto; }
    MemoryView > Horizontal { height: 1; }
    MemoryView .name { width: 5; text-style: bold; }
    MemoryView ProgressBar { width: 1fr; }
    MemoryView Bar { width: 1fr; }
    MemoryView .stats { height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, memory: snapshot.MemoryView) -> None:
        super().__init__(classes="tier")
        self._latest = memory

    def on_mount(self) -> None:
        self.show(self._latest)

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield Label("LIVE", classes="name")
            yield ProgressBar(total=1, show_eta=False)
        yield Static(classes="stats")

    def show(self, m: snapshot.MemoryView) -> None:
        self._latest = m
        if not self.is_mounted:
            return
        budget = max(m.budget_bytes, 1)
        self.query_one(ProgressBar).update(total=budget, progress=min(m.kv_bytes, budget))
        parts = [
            f"{human_bytes(m.kv_bytes)}/{human_bytes(m.budget_bytes)}",
            f"rsv {m.pressure:.0%}",
            f"pad {human_bytes(m.padding_bytes)}",
        ]
        if m.live_from:  # --kv-live-from: how many running caches are quantized
            parts.append(f"q{m.quantized}")
        text = escape(" · ".join(parts))
        if m.waiting_for_memory:  # first: the pane is narrow, and this is what an operator must see
            text = f"[b $warning]{m.waiting_for_memory} wait for memory[/] · " + text
        self.query_one(".stats", Static).update(text)


class TiersPanel(VerticalScroll):
    """Tier views appear and disappear with the tiers in the snapshot (an ssd tier may come later); the
    running sequences' KV against the budget comes first, when a budget is enforced."""

    def show(
        self,
        tiers: Sequence[snapshot.TierView],
        hits: Callable[[str], list[float]],
        memory: snapshot.MemoryView | None = None,
    ) -> None:
        live = list(self.query(MemoryView))
        if memory is None or not memory.budget_bytes:
            for gone in live:
                gone.remove()
        elif live:
            live[0].show(memory)
        else:
            self.mount(MemoryView(memory), before=0 if self.children else None)
        views = {v.tier_name: v for v in self.query(TierView)}
        names = {t.name for t in tiers}
        for name, old in views.items():
            if name not in names:
                old.remove()
        for t in tiers:
            view = views.get(t.name)
            if view is None:
                self.mount(TierView(t, hits(t.name)))
            else:
                view.show(t, hits(t.name))
