"""The dashboard: header, queue, cache tiers, ranks, events. Polls rank 0's /admin/state in a worker; a
slow or dead server never freezes the screen: the data is marked stale and reconnects back off."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.widgets import DataTable, Footer, RichLog, Sparkline, Static

from tui.client import AdminClient, AdminError
from tui.screens import ChooseTier, Confirm, Help

QUEUE_COLUMNS = (
    ("id", "request"),
    ("state", "state"),
    ("age", "age s"),
    ("prompt", "prompt"),
    ("gen", "gen"),
    ("rate", "tok/s"),
)
RANK_COLUMNS = (
    ("rank", "rank"),
    ("host", "host"),
    ("state", "state"),
    ("step", "step ms"),
    ("mem", "memory"),
    ("age", "report"),
)
STATE_STYLE = {
    "ok": "bold $success",
    "slow": "bold $warning",
    "unresponsive": "bold $error",
    "dead": "bold reverse $error",
}
MAX_BACKOFF = 10.0


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def bar(used: float, capacity: float, width: int = 20) -> str:
    frac = min(1.0, used / capacity) if capacity else 0.0
    filled = int(round(frac * width))
    return "█" * filled + "░" * (width - filled) + f" {frac * 100:4.1f}%"


class OrchardApp(App[None]):
    TITLE = "Orchard"
    CSS = """
    #header { height: 3; padding: 0 1; background: $boost; }
    #main { height: 1fr; }
    #queue { width: 3fr; height: 1fr; border: round $primary; }
    #side { width: 2fr; }
    #tiers { height: auto; border: round $primary; padding: 0 1; }
    Sparkline { height: 1; margin: 0 1; }
    #ranks { height: 1fr; min-height: 5; border: round $primary; }
    #events { height: 6; border: round $primary; }
    #totals { height: 1; padding: 0 1; }
    DataTable:focus, RichLog:focus { border: round $accent; }
    """
    BINDINGS = [
        Binding("c", "cancel", "cancel"),
        Binding("d", "drain", "drain"),
        Binding("r", "resume", "resume"),
        Binding("x", "clear_tier", "clear tier"),
        Binding("s", "sort", "sort"),
        Binding("p", "pause", "pause"),
        Binding("tab", "focus_next", "pane", show=False),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, url: str, token: str | None, interval: float = 1.0) -> None:
        super().__init__()
        self.client = AdminClient(url, token)
        self.url = url
        self.interval = max(0.2, interval)
        self.snapshot: dict[str, Any] | None = None
        self.last_ok: float | None = None
        self.failures = 0
        self.connection = "connecting"
        self.paused = False
        self.sort_index = 0
        self.hit_history: list[float] = []
        self.last_refresh_ms = 0.0

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        with Horizontal(id="main"):
            yield DataTable(id="queue", cursor_type="row", zebra_stripes=True)
            with Vertical(id="side"):
                yield Static(id="tiers")
                yield Sparkline([], id="throughput")
                yield Sparkline([], id="hitrate")
                yield DataTable(id="ranks", cursor_type="row")
        yield Static(id="totals")
        yield RichLog(id="events", markup=True, max_lines=500)
        yield Footer()

    def main(self, selector: str, expect_type: type[Any] | None = None) -> Any:
        """A widget of the dashboard itself, also while a modal screen is on top."""
        screen = self.screen_stack[0] if self.screen_stack else self.screen
        return screen.query_one(selector, expect_type) if expect_type else screen.query_one(selector)

    def on_mount(self) -> None:
        queue = self.main("#queue", DataTable)
        for key, label in QUEUE_COLUMNS:
            queue.add_column(label, key=key)
        ranks = self.main("#ranks", DataTable)
        for key, label in RANK_COLUMNS:
            ranks.add_column(label, key=key)
        queue.border_title, ranks.border_title = "queue", "ranks"
        self.main("#tiers").border_title = "KV cache · throughput · hit rate"
        self.main("#events", RichLog).border_title = "events"
        self.render_header()
        self.poll()

    async def on_unmount(self) -> None:
        await self.client.close()

    # -- polling -------------------------------------------------------------------------------------
    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        while True:
            try:
                state = await self.client.state()
            except AdminError as exc:
                self.failures += 1
                was = self.connection
                self.connection = "auth" if exc.kind == "auth" else "down"
                if was not in ("down", "auth") or self.failures == 1:
                    self.event(f"[b]connection[/b]: {exc.message}", "error")
                    self.notify(exc.message, severity="error", timeout=6)
                try:
                    self.render_header(error=exc.message)
                except NoMatches:
                    return
                await asyncio.sleep(min(MAX_BACKOFF, self.interval * 2 ** min(self.failures, 4)))
                continue
            if self.connection in ("down", "auth"):
                self.event("[b]connection[/b]: back", "success")
            self.connection, self.failures, self.last_ok = "live", 0, time.monotonic()
            previous, self.snapshot = self.snapshot, state
            self.compare(previous, state)
            try:
                if not self.paused:
                    start = time.perf_counter()
                    self.apply(state)
                    self.last_refresh_ms = (time.perf_counter() - start) * 1000
                self.render_header()
            except NoMatches:
                return  # the app is closing: its widgets are gone
            await asyncio.sleep(self.interval)

    # -- rendering -----------------------------------------------------------------------------------
    def render_header(self, error: str | None = None) -> None:
        s = self.snapshot or {}
        if self.connection == "live":
            conn = Text("● live", style="bold green")
        elif self.connection == "connecting" and error is None:
            conn = Text("connecting…", style="bold")
        else:
            age = f"stale {time.monotonic() - self.last_ok:.0f} s, " if self.last_ok else ""
            label = "token refused" if self.connection == "auth" else f"reconnecting {self.failures}/∞"
            conn = Text(f"● {age}{label}", style="bold red")
        if self.paused:
            conn.append("  ⏸ paused", style="bold yellow")
        line1 = Text(f"Orchard  {self.url}  ", style="bold")
        line1.append_text(conn)
        if s:
            admission = s.get("admission", "?")
            adm_style = "bold green" if admission == "open" else "bold yellow reverse"
            line2 = Text(
                f"model {s.get('model')}  TP={s.get('tensor_parallel')}  up {s.get('uptime_s', 0):.0f} s  "
            )
            line2.append(f"admission {admission}", style=adm_style)
            tp = s.get("throughput", {}).get("output_tokens_per_s", 0.0)
            line2.append(
                f"  {tp:.1f} tok/s  batch {s['batch']['running']}/{s['batch']['max_batch']}  waiting {s['batch']['waiting']}"
            )
        else:
            line2 = Text(error or "waiting for the first snapshot…")
        if s.get("failure"):
            line2.append(f"  FAILED: {s['failure']}", style="bold red")
        self.main("#header", Static).update(Text("\n").join([line1, line2]))

    def apply(self, s: dict[str, Any]) -> None:
        self.apply_queue(s.get("queue", []))
        self.apply_ranks(s.get("ranks", []))
        self.apply_tiers(s.get("kv", {}).get("tiers", []), s.get("throughput", {}))
        totals = s.get("totals", {})
        outcomes = "  ".join(f"{k} {v}" for k, v in sorted(totals.get("requests", {}).items())) or "none yet"
        self.main("#totals", Static).update(
            f"requests: {outcomes}   tokens: {totals.get('prompt_tokens', 0)} in / {totals.get('generated_tokens', 0)} out"
            f"   refresh {self.last_refresh_ms:.0f} ms"
        )

    def apply_queue(self, rows: list[dict[str, Any]]) -> None:
        table = self.main("#queue", DataTable)
        wanted = {r["request_id"]: r for r in rows}
        for key in [k.value for k in table.rows if k.value not in wanted]:
            table.remove_row(key)
        for rid, r in wanted.items():
            cells = (
                rid[-12:],
                r["state"],
                f"{r['age_s']:.1f}",
                str(r["prompt_tokens"]),
                str(r["generated_tokens"]),
                f"{r['tokens_per_s']:.1f}",
            )
            if rid in table.rows:
                for (col, _), value in zip(QUEUE_COLUMNS[1:], cells[1:], strict=True):
                    if table.get_cell(rid, col) != value:
                        table.update_cell(rid, col, value)
            else:
                table.add_row(*cells, key=rid)
        table.border_subtitle = f"{len(rows)} requests"

    def apply_ranks(self, ranks: list[dict[str, Any]]) -> None:
        table = self.main("#ranks", DataTable)
        for r in ranks:
            key = str(r["rank"])
            style = self.get_css_variables().get(STATE_STYLE.get(r["state"], "").split("$")[-1], "")
            state = Text(r["state"], style=f"bold {style}" if style else "bold")
            cells = (
                key,
                r["host"],
                state,
                f"{r['step_ms']:.1f}",
                gib(r["rss_bytes"]),
                f"{r['report_age_s']:.1f} s",
            )
            if key in table.rows:
                for (col, _), value in zip(RANK_COLUMNS[1:], cells[1:], strict=True):
                    table.update_cell(key, col, value)
            else:
                table.add_row(*cells, key=key)

    def apply_tiers(self, tiers: list[dict[str, Any]], throughput: dict[str, Any]) -> None:
        lines = []
        for t in tiers:
            name = t["tier"].upper()
            off = "" if t.get("enabled", True) else f"  OFF: {t.get('disabled_reason', '')}"
            lines.append(
                f"{name:<4} {bar(t['bytes_used'], t['capacity_bytes'])}  {gib(t['bytes_used'])} / {gib(t['capacity_bytes'])}{off}"
            )
            lines.append(
                f"     blocks {t['blocks']}  hit rate {t['hit_rate'] * 100:.0f}%  evictions {t['evictions']}"
            )
        self.main("#tiers", Static).update("\n".join(lines) or "no KV cache tiers")
        self.main("#throughput", Sparkline).data = list(throughput.get("history", [])) or [0.0]
        if tiers:
            self.hit_history = (self.hit_history + [tiers[0]["hit_rate"]])[-180:]
            self.main("#hitrate", Sparkline).data = self.hit_history

    # -- events ----------------------------------------------------------------------------------------
    def event(self, message: str, level: str = "info") -> None:
        color = {"error": "red", "warning": "yellow", "success": "green"}.get(level, "default")
        stamp = time.strftime("%H:%M:%S")
        self.main("#events", RichLog).write(
            Text.from_markup(f"[dim]{stamp}[/dim] [{color}]{message}[/{color}]")
        )

    def compare(self, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
        if old is None:
            self.event(f"connected to {new.get('model')} on {len(new.get('ranks', []))} rank(s)", "success")
            return
        if old.get("admission") != new.get("admission"):
            self.event(f"admission {old.get('admission')} → {new.get('admission')}", "warning")
        before = {r["rank"]: r["state"] for r in old.get("ranks", [])}
        for r in new.get("ranks", []):
            if before.get(r["rank"], r["state"]) != r["state"]:
                level = "success" if r["state"] == "ok" else "error"
                self.event(f"rank {r['rank']} ({r['host']}) {before[r['rank']]} → {r['state']}", level)
        if new.get("failure") and not old.get("failure"):
            self.event(f"engine failed: {new['failure']}", "error")
        old_err = old.get("totals", {}).get("requests", {}).get("error", 0)
        new_err = new.get("totals", {}).get("requests", {}).get("error", 0)
        if new_err > old_err:
            self.event(f"{new_err - old_err} request(s) ended with an error", "error")

    # -- actions ---------------------------------------------------------------------------------------
    def selected_request(self) -> str | None:
        table = self.main("#queue", DataTable)
        if not table.row_count:
            return None
        try:
            return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        except Exception:
            return None

    async def act(self, what: str, call: Any) -> None:
        try:
            await call
        except AdminError as exc:
            self.notify(f"{what} failed: {exc.message}", severity="error")
            self.event(f"{what} failed: {exc.message}", "error")
            return
        self.notify(what)
        self.event(what, "warning")

    def action_cancel(self) -> None:
        rid = self.selected_request()
        if rid is None:
            self.notify("no request selected", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(self.act(f"cancelled {rid}", self.client.cancel(rid)))

        self.push_screen(Confirm(f"Cancel request {rid}? Its client gets an error."), answered)

    def action_drain(self) -> None:
        self.run_worker(self.act("admission paused (drain)", self.client.drain()))

    def action_resume(self) -> None:
        self.run_worker(self.act("admission resumed", self.client.resume()))

    def action_clear_tier(self) -> None:
        tiers = [t["tier"] for t in (self.snapshot or {}).get("kv", {}).get("tiers", [])]
        if not tiers:
            self.notify("no cache tiers to clear", severity="warning")
            return

        def chosen(tier: str | None) -> None:
            if tier:
                self.push_screen(
                    Confirm(f"Clear the {tier} tier?"),
                    lambda yes: (
                        self.run_worker(self.act(f"cleared the {tier} tier", self.client.clear(tier)))
                        if yes
                        else None
                    ),
                )

        self.push_screen(ChooseTier(tiers), chosen)

    def action_sort(self) -> None:
        table = self.main("#queue", DataTable)
        self.sort_index = (self.sort_index + 1) % len(QUEUE_COLUMNS)
        key, label = QUEUE_COLUMNS[self.sort_index]
        numeric = key in ("age", "prompt", "gen", "rate")
        table.sort(key, key=lambda v: float(v) if numeric else v, reverse=numeric)
        self.notify(f"queue sorted by {label}")

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.render_header()

    def action_help(self) -> None:
        self.push_screen(Help())
