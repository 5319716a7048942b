"""The LoRA adapters pane: one row per adapter the job serves besides its base model (name, slot, state,
requests using it, requests since it was loaded, LoRA rank). Hidden while the job serves none, so a job
without adapters looks as it always did."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.style import Style

from cluster.snapshot import AdapterView
from tui.fmt import count
from tui.widgets import Cell, Column, LiveTable

STATE_LEVEL = {"ready": "success", "loading": "info", "draining": "warning", "unloading": "warning"}


class AdaptersTable(LiveTable):
    COLUMNS = (
        Column("name", "adapter", 16),
        Column("slot", "slot", 4, numeric=True),
        Column("state", "state", 9),
        Column("live", "live", 5, numeric=True),
        Column("total", "total", 6, numeric=True),
        Column("rank", "r", 3, numeric=True),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.by_name: dict[str, AdapterView] = {}

    def make_cell(self, index: int, text: str, item: Any) -> Cell:
        a: AdapterView = item
        style = Style()
        if self.COLUMNS[index].key == "state":
            style = self.styles_by_level.get(STATE_LEVEL.get(a.state, ""), Style())
        value: Any = (a.name, a.slot, a.state, a.requests, a.total_requests, a.rank)[index]
        return self.cell(index, text, value, style)

    def show(self, adapters: Sequence[AdapterView]) -> None:
        self.by_name = {a.name: a for a in adapters}
        self.display = bool(adapters)
        self.update_rows(adapters, lambda a: a.name, adapter_texts)
        self.border_title = f"adapters · {len(adapters)}"


def adapter_texts(a: AdapterView) -> tuple[str, ...]:
    return a.name, str(a.slot), a.state, count(a.requests), count(a.total_requests), str(a.rank)


def unload_question(a: AdapterView) -> tuple[str, str, bool]:
    """(title, question, drain) for the confirmation: an adapter in use is drained (no new requests, then
    unloaded after the last one), never cut off under its requests."""
    head = f"{a.name} (slot {a.slot}, rank {a.rank}, {a.state})\n{a.path}\n\n"
    if a.requests:
        return (
            f"Drain and unload adapter {a.name}?",
            head + f"{a.requests} request(s) use it: they finish; new requests for {a.name!r} get 404 "
            "from now on, and it unloads after the last one.",
            True,
        )
    return f"Unload adapter {a.name}?", head + f"New requests for {a.name!r} get 404 from now on.", False
