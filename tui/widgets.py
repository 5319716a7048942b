"""The dashboard's panes. Each takes parsed snapshot data and updates itself in place: tables change
only the cells whose text changed (by row key), so a 1,000-row queue refreshes without flicker and the
cursor stays on the request it was on."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.style import Style
from rich.text import Text
from textual.events import Resize
from textual.markup import escape
from textual.widgets import DataTable, RichLog, Static
from textual.widgets.data_table import CellDoesNotExist, RowKey

from cluster.snapshot import SPEC_RECENT_S, JobSnapshot, RankView, RequestRow, SpeculationView
from tui.connection import Status
from tui.fmt import count, duration, human_bytes, rate, short_id

LEVELS = ("success", "warning", "error", "info")


def palette(variables: dict[str, str]) -> dict[str, Style]:
    """Rich styles for table cells and log lines, from the theme's *text* colours ($text-success ...):
    Textual derives those to stay readable on the theme's background, light or dark."""
    out = {}
    for level, var in zip(
        LEVELS, ("text-success", "text-warning", "text-error", "text-primary"), strict=True
    ):
        try:
            out[level] = Style.parse(variables.get(var, ""))
        except Exception:  # an ANSI theme may name colours Rich cannot parse: plain text then
            out[level] = Style()
    return out


class Cell:
    """A table cell that sorts by its value and shows its text: the table sorts numbers as numbers."""

    __slots__ = ("value", "text")

    def __init__(self, value: Any, text: Text) -> None:
        self.value = value
        self.text = text

    def __rich__(self) -> Text:
        return self.text

    def __lt__(self, other: Cell) -> bool:
        return bool(self.value < other.value)


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    label: str
    width: int
    numeric: bool = False


class LiveTable(DataTable[Any]):
    """A DataTable fed whole row lists; it diffs them against what it shows."""

    COLUMNS: tuple[Column, ...] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._shown: dict[str, tuple[str, ...]] = {}
        self._restyle = False
        self.styles_by_level: dict[str, Style] = {}

    def on_mount(self) -> None:
        for c in self.COLUMNS:
            label = Text(c.label, justify="right" if c.numeric else "left")
            self.add_column(label, width=c.width, key=c.key)

    def restyle(self, styles: dict[str, Style]) -> None:
        """The theme changed: every cell is re-rendered on the next update."""
        self.styles_by_level = styles
        self._restyle = True

    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except CellDoesNotExist:
            return None

    def cell(self, index: int, text: str, value: Any, style: Style | str = "") -> Cell:
        return Cell(
            value, Text(text, style=style, justify="right" if self.COLUMNS[index].numeric else "left")
        )

    def make_cell(self, index: int, text: str, item: Any) -> Cell:
        raise NotImplementedError

    def update_rows(
        self, items: Sequence[Any], key_of: Callable[[Any], str], texts_of: Callable[[Any], tuple[str, ...]]
    ) -> None:
        keep = self.selected_key()
        wanted = {key_of(item): item for item in items}
        gone = [k for k in self._shown if k not in wanted]
        rebuild = len(gone) > max(100, len(self._shown) // 4)
        if rebuild:
            # each remove_row re-indexes every remaining row (quadratic when hundreds end at once, as in a
            # mass cancel); dropping all rows and adding the rest back is linear and lands in the same
            # frame, so it does not flicker
            self.clear()
            self._shown.clear()
        else:
            for k in gone:
                self.remove_row(k)
                del self._shown[k]
        restyle, self._restyle = self._restyle, False
        added = False
        for key, item in wanted.items():
            texts = texts_of(item)
            old = self._shown.get(key)
            if old is None:
                self.add_row(*[self.make_cell(i, t, item) for i, t in enumerate(texts)], key=key)
                added = True
            elif old != texts or restyle:
                for i, col in enumerate(self.COLUMNS):
                    if restyle or old[i] != texts[i]:  # only what changed: most cells stay as they are
                        self.update_cell(key, col.key, self.make_cell(i, texts[i], item))
            self._shown[key] = texts
        self.after_update(added)
        if keep is not None and keep in self._shown:
            index = self.get_row_index(RowKey(keep))
            if index != self.cursor_row:
                self.move_cursor(row=index, scroll=rebuild)

    def after_update(self, added: bool) -> None:
        """Hook for re-sorting."""


QUEUE_STATE_ORDER = {"running": 0, "prefill": 1, "waiting": 2}
QUEUE_SORT_VALUE: tuple[Callable[[RequestRow], Any], ...] = (
    lambda r: r.request_id,
    lambda r: QUEUE_STATE_ORDER.get(r.state, 9),
    lambda r: r.age_s,
    lambda r: r.prompt_tokens,
    lambda r: r.generated_tokens,
    lambda r: r.tokens_per_s,
    lambda r: r.client,
)
QUEUE_STATE_LEVEL = {"running": "success", "prefill": "info"}


class QueueTable(LiveTable):
    COLUMNS = (
        Column("id", "request", 10),
        Column("state", "state", 7),
        Column("age", "age", 5, numeric=True),
        Column("in", "in", 5, numeric=True),
        Column("out", "out", 5, numeric=True),
        Column("rate", "tok/s", 5, numeric=True),
        Column("client", "client", 15),
    )
    SORTS = (
        ("age", True),
        ("state", False),
        ("rate", True),
        ("out", True),
        ("in", True),
        ("id", False),
        ("client", False),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sort_column, self.sort_reverse = self.SORTS[0]
        self.rows_by_id: dict[str, RequestRow] = {}
        self.summary = ""  # batch figures, set by the app; the sort order is appended

    def relabel(self) -> None:
        self.border_subtitle = f"{self.summary} · {self.sort_label()}" if self.summary else self.sort_label()

    def sort_label(self) -> str:
        label = next(c.label for c in self.COLUMNS if c.key == self.sort_column)
        return f"{label} {'↓' if self.sort_reverse else '↑'}"

    def make_cell(self, index: int, text: str, item: Any) -> Cell:
        r: RequestRow = item
        if index == 1:
            style = self.styles_by_level.get(QUEUE_STATE_LEVEL.get(r.state, ""), "")
            return self.cell(1, text, QUEUE_STATE_ORDER.get(r.state, 9), style)
        return self.cell(index, text, QUEUE_SORT_VALUE[index](r))

    def show(self, rows: Sequence[RequestRow]) -> None:
        self.rows_by_id = {r.request_id: r for r in rows}
        self.update_rows(rows, lambda r: r.request_id, queue_texts)

    def after_update(self, added: bool) -> None:
        self.sort(self.sort_column, reverse=self.sort_reverse)

    def set_sort(self, column: str, reverse: bool | None = None) -> None:
        default = dict(self.SORTS)[column]
        keep = self.selected_key()
        if reverse is None:
            reverse = not self.sort_reverse if column == self.sort_column else default
        self.sort_column, self.sort_reverse = column, reverse
        self.sort(column, reverse=reverse)
        self.relabel()
        if keep is not None:
            self.move_cursor(row=self.get_row_index(RowKey(keep)))

    def cycle_sort(self) -> None:
        keys = [k for k, _ in self.SORTS]
        nxt = keys[(keys.index(self.sort_column) + 1) % len(keys)]
        self.set_sort(nxt, dict(self.SORTS)[nxt])

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.set_sort(str(event.column_key.value))


def queue_texts(r: RequestRow) -> tuple[str, ...]:
    return (
        short_id(r.request_id), r.state, duration(r.age_s), count(r.prompt_tokens), count(r.generated_tokens),
        rate(r.tokens_per_s), r.client,
    )  # fmt: skip


RANK_LEVEL = {"ok": "success", "slow": "warning", "unresponsive": "error", "dead": "error"}


class RanksTable(LiveTable):
    COLUMNS = (
        Column("rank", "rank", 4, numeric=True),
        Column("host", "host", 10),
        Column("state", "state", 12),
        Column("step", "step ms", 7, numeric=True),
        Column("median", "median", 7, numeric=True),
        Column("rss", "rss", 8, numeric=True),
        Column("mlx", "mlx", 8, numeric=True),
        Column("beat", "beat", 5, numeric=True),
        Column("error", "last error", 30),
        Column("peak", "mlx peak", 8, numeric=True),
        Column("pid", "pid", 7, numeric=True),
    )

    def make_cell(self, index: int, text: str, item: Any) -> Cell:
        r: RankView = item
        key = self.COLUMNS[index].key
        style = Style()
        if key == "state":
            style = self.styles_by_level.get(RANK_LEVEL.get(r.state, ""), Style())
            if r.state in ("slow", "unresponsive", "dead"):
                style = Style(bold=True, reverse=r.state == "dead") + style
        elif key == "error":
            style = self.styles_by_level.get("error", Style())
        return self.cell(index, text, text, style)

    def show(self, ranks: Sequence[RankView]) -> None:
        self.update_rows(ranks, lambda r: str(r.rank), rank_texts)


def rank_texts(r: RankView) -> tuple[str, ...]:
    return (
        str(r.rank), r.host, r.state, f"{r.step_ms:.1f}", f"{r.median_step_ms:.1f}", human_bytes(r.rss_bytes),
        human_bytes(r.active_bytes), duration(r.beat_age_s), r.last_error, human_bytes(r.peak_bytes), str(r.pid),
    )  # fmt: skip


class StatusHeader(Static):
    """Two lines: what runs (model, TP layout, uptime, admission, tok/s) and how we see it (link)."""

    def show(self, url: str, snap: JobSnapshot | None, status: Status, paused: bool) -> None:
        lv = {
            "success": "$text-success",
            "warning": "$text-warning",
            "error": "$text-error",
            "info": "$text-primary",
        }
        if snap is None:
            line1 = f"[b]Orchard[/b] · {escape(url)}"
        else:
            adm = "$text-success" if snap.admission == "open" else "$text-warning"
            hosts: dict[str, int] = {}
            for r in snap.ranks:
                hosts[r.host] = hosts.get(r.host, 0) + 1
            layout = ", ".join(f"{h}×{n}" if n > 1 else h for h, n in hosts.items())
            line1 = (
                f"[b]Orchard[/b] [b]{escape(snap.model)}[/b] · TP={snap.tensor_parallel}"
                f"{f' ({escape(layout)})' if layout else ''} · up {duration(snap.uptime_s)} · "
                f"admission [b {adm}]{escape(snap.admission)}[/] · "
                f"[b]{rate(snap.throughput.output_tokens_per_s)}[/b] tok/s"
            )
            if snap.engine != "ready":
                line1 += f" · engine [b $text-warning]{escape(snap.engine)}[/]"
        line2 = f"[b {lv[status.level]}]● {escape(status.text)}[/]"
        if paused:
            line2 += " · [b reverse $text-warning] VIEW PAUSED [/] (polling goes on; p resumes)"
        if status.level == "error" or snap is None:
            line2 += f" · {escape(status.detail or url)}"
        else:
            line2 += (
                f" · {escape(url)} · batch {snap.batch.running}/{snap.batch.max_batch}"
                f" · waiting {snap.batch.waiting}"
                f" · step {snap.last_step_ms:.1f} ms"
            )
            if snap.failure:
                line2 += f" · [b $text-error]FAILED: {escape(snap.failure)}[/]"
        self.update(f"{line1}\n{line2}")


class SpeculationLine(Static):
    """One line of speculative decoding figures, most telling first (the side pane may be 24 columns):
    mode, acceptance since start, over the last seconds, the tokens a verified row gains per step,
    accepted/drafted tokens, k. "n/a" for a server from before speculation, never zeros."""

    TOOLTIP = (
        "speculative decoding: mode (--spec) · acc: drafted tokens accepted since start · "
        f"{SPEC_RECENT_S}s: over the last {SPEC_RECENT_S} s · +n/row: drafted tokens a verified row gains "
        "per step · accepted/drafted tokens · k: most drafts per row and step (--spec-tokens)"
    )

    def on_mount(self) -> None:
        self.tooltip = self.TOOLTIP

    def show(self, spec: SpeculationView | None) -> None:
        self.update(speculation_text(spec))


def speculation_text(spec: SpeculationView | None) -> str:
    if spec is None:
        return "spec [dim]n/a[/dim]"
    if spec.mode == "off":
        return "spec [b]off[/b]"
    head = f"spec [b]{escape(spec.mode)}[/b]"
    if not spec.drafted:
        return f"{head} · k={spec.tokens} · nothing drafted yet"
    recent = f"{spec.recent_acceptance:.0%}" if spec.recent_drafted else "–"
    return (
        f"{head} · acc [b]{spec.acceptance:.0%}[/b] · {SPEC_RECENT_S}s {recent}"
        f" · +{spec.accepted / max(spec.rows, 1):.1f}/row · {count(spec.accepted)}/{count(spec.drafted)} tok"
        f" · k={spec.tokens}"
    )


class EventLog(RichLog):
    """Keeps its entries as data, so they are re-wrapped when the pane changes width (RichLog keeps
    rendered lines only) and re-coloured when the theme changes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_lines=1000, wrap=True, markup=False, min_width=20, **kwargs)
        self.styles_by_level: dict[str, Style] = {}
        self.entries: deque[tuple[str, str, str]] = deque(maxlen=1000)
        self._width = 0

    def add(self, level: str, text: str) -> None:
        entry = (time.strftime("%H:%M:%S "), level, text)
        self.entries.append(entry)
        self._write(entry)

    def _write(self, entry: tuple[str, str, str]) -> None:
        stamp, level, text = entry
        line = Text()
        line.append(stamp, style="dim")  # not Text(stamp, style=...): that would dim the whole line
        line.append(text, style=self.styles_by_level.get(level, ""))
        self.write(line)

    def rewrite(self) -> None:
        self.clear()
        for entry in self.entries:
            self._write(entry)

    def on_resize(self, event: Resize) -> None:
        super().on_resize(event)
        if event.size.width != self._width:
            self._width = event.size.width
            self.rewrite()
