"""The dashboard App: polls rank 0's /admin/state in a worker and applies each snapshot to the panes.

A slow or dead server never freezes the screen: the poll is an async worker (the UI keeps running
while it waits), a one-second timer only re-labels the header ("stale 4 s") and cannot fail, failed
polls back off, and nothing the server sends or refuses ends the app: errors become notifications.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.theme import Theme
from textual.widgets import Footer, Sparkline, Static

from cluster.snapshot import JobSnapshot
from tui.adapters import AdaptersTable, unload_question
from tui.client import AdminClient, AdminError
from tui.connection import Link
from tui.events import diff
from tui.fmt import duration, rate
from tui.history import HitHistory
from tui.screens import ChooseTier, Confirm, Help
from tui.tiers import TiersPanel
from tui.widgets import EventLog, QueueTable, RanksTable, SpeculationLine, StatusHeader, palette

NOTES = (
    "The queue is sorted by age, oldest first: s cycles the column, S",
    "reverses, a click on a header sorts by it. in/out: prompt/generated",
    "tokens. beat: age of the rank's last health report.",
    "spec: speculative decoding. acc: drafted tokens accepted since start,",
    "10s: over the last 10 s, +n/row: drafts a verified row gains a step.",
    "Pause freezes the queue, cache and rank panes so rows stay put while",
    "you read or select; polling goes on: header and events stay live.",
    "When rank 0 does not answer, the panes dim (stale) and polls back",
    "off to one every 10 s, retrying for as long as the dashboard runs.",
)


class OrchardApp(App[None]):
    TITLE = "Orchard"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]
    CSS = """
    #header { height: 2; padding: 0 1; background: $panel; text-wrap: nowrap; text-overflow: ellipsis; }
    #body { height: 1fr; }
    #top { height: 1fr; }
    #left { width: 3fr; }
    #side { width: 2fr; }
    .pane { border: round $primary-muted; border-title-color: $text-primary; border-title-style: bold; }
    .pane:focus-within, .pane:focus { border: round $accent; }
    DataTable { scrollbar-size-vertical: 1; scrollbar-size-horizontal: 0; }
    #queue { height: 1fr; }
    #totals { height: 1; padding: 0 1; color: $text-muted; text-wrap: nowrap; text-overflow: ellipsis; }
    #tiers { height: auto; max-height: 1fr; padding: 0 1; }
    #adapters { height: auto; max-height: 8; }
    #throughput { height: 1fr; min-height: 4; padding: 0 1; }
    #spec { height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    #tput { height: 1fr; }
    #bottom { height: 10; }
    #ranks { width: 3fr; height: 1fr; }
    #events { width: 2fr; height: 1fr; scrollbar-size-vertical: 1; overflow-y: auto; overflow-x: hidden; }
    Screen.-tall #bottom { height: 12; }
    Screen.-tall TierView .spark-row { height: 3; }
    Screen.-narrow #left { width: 1fr; }
    Screen.-narrow #side { width: 28; }
    Screen.-narrow #bottom { layout: vertical; height: auto; }
    Screen.-narrow #ranks { width: 1fr; height: auto; max-height: 8; }
    Screen.-narrow #events { width: 1fr; height: 5; }
    #body.-stale DataTable, #body.-stale TiersPanel, #body.-stale #throughput { text-opacity: 55%; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "cancel", "cancel", tooltip="cancel the selected request (asks first)"),
        Binding("d", "drain", "drain", tooltip="drain: stop admission (new requests get 503)"),
        Binding("r", "resume", "resume", tooltip="resume admission"),
        Binding("x", "clear_tier", "clear", tooltip="clear a KV cache tier (pick it, then confirm)"),
        Binding(
            "u",
            "unload_adapter",
            "unload",
            tooltip="unload the selected LoRA adapter (asks first; one in use drains)",
        ),
        Binding("s", "sort", "sort", tooltip="sort the queue by the next column"),
        Binding("S", "reverse_sort", "reverse", show=False, tooltip="reverse the queue's sort order"),
        Binding("p", "pause", "pause", tooltip="pause / resume the view (polling goes on)"),
        Binding("tab", "focus_next", "pane", priority=True, tooltip="next pane: queue, cache, ranks, events"),
        Binding("shift+tab", "focus_previous", "pane", show=False, priority=True, tooltip="previous pane"),
        Binding("question_mark", "help", "help", key_display="?", tooltip="this help"),
        Binding("q", "quit", "quit", tooltip="quit (the job keeps running)"),
    ]

    def __init__(
        self,
        url: str,
        token: str | None,
        interval: float = 1.0,
        *,
        timeout: float = 5.0,
        autopoll: bool = True,
    ) -> None:
        """`timeout`: how long one poll may wait for rank 0 before it counts as a failure.
        `autopoll=False` leaves the poller off (the refresh benchmark feeds snapshots itself)."""
        super().__init__()
        self.url = url.rstrip("/")
        self.client = AdminClient(self.url, token, timeout=timeout)
        self.interval = max(0.1, interval)
        self.autopoll = autopoll
        self.link = Link(self.interval)
        self.hits = HitHistory()
        self.snapshot: JobSnapshot | None = None
        self.view_paused = False
        self.refresh_ms = 0.0
        self._wake: asyncio.Event | None = None
        self._display_error = ""

    def compose(self) -> ComposeResult:
        self.header = StatusHeader(id="header")
        self.queue = QueueTable(id="queue", classes="pane")
        self.totals = Static(id="totals")
        self.tiers = TiersPanel(id="tiers", classes="pane")
        self.adapters = AdaptersTable(id="adapters", classes="pane")
        self.tput = Sparkline([], id="tput")
        self.spec = SpeculationLine("spec n/a", id="spec")
        self.ranks = RanksTable(id="ranks", classes="pane")
        self.events = EventLog(id="events", classes="pane")
        yield self.header
        with Vertical(id="body") as body:
            self.body = body
            with Horizontal(id="top"):
                with Vertical(id="left"):
                    yield self.queue
                    yield self.totals
                with Vertical(id="side"):
                    yield self.tiers
                    yield self.adapters
                    with Vertical(id="throughput", classes="pane") as box:
                        self.tput_box = box
                        yield self.spec
                        yield self.tput
            with Horizontal(id="bottom"):
                yield self.ranks
                yield self.events
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.queue.border_title, self.tiers.border_title = "queue", "KV cache"
        self.ranks.border_title, self.events.border_title = "ranks", "events"
        self.tput_box.border_title = "throughput"
        self.adapters.display = False  # shown once the job serves an adapter
        self.restyle()
        self.theme_changed_signal.subscribe(self, self.on_theme)
        self.render_header()
        self.set_interval(1.0, self.tick)
        self.queue.focus()
        self._wake = asyncio.Event()
        if self.autopoll:
            self.poll_loop()

    async def on_unmount(self) -> None:
        await self.client.close()

    def restyle(self) -> None:
        styles = palette(self.theme_variables)
        self.queue.restyle(styles)
        self.ranks.restyle(styles)
        self.adapters.restyle(styles)
        self.events.styles_by_level = styles
        self.events.rewrite()

    def on_theme(self, _theme: Theme) -> None:
        self.restyle()
        if self.snapshot is not None and not self.view_paused:
            self.apply_snapshot(self.snapshot)

    # -- polling ----------------------------------------------------------------------------------
    @work(exclusive=True, group="poll", exit_on_error=False)
    async def poll_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                snap = await self.client.state()
            except AdminError as exc:
                delay = self.lost(exc)
            except Exception as exc:  # a bug or an httpx surprise: show it, keep polling
                delay = self.lost(AdminError("protocol", f"poll failed: {type(exc).__name__}: {exc}"))
            else:
                try:
                    self.received(snap)
                except Exception as exc:
                    self.display_bug(exc)
                delay = self.interval - (time.monotonic() - started)
            await self.sleep(delay)

    async def sleep(self, delay: float) -> None:
        """Sleep until the next poll, or until an action wants fresh data now."""
        if self._wake is None or delay <= 0:
            return
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except asyncio.TimeoutError:
            pass

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def received(self, snap: JobSnapshot) -> None:
        now = time.monotonic()
        back = self.link.ok(now)
        if back:
            self.log_event("success", back)
            self.notify(back, title="connection")
        for event in diff(self.snapshot, snap):
            self.log_event(event.level, event.text)
        self.snapshot = snap
        self.hits.add(time.time(), snap.tiers)
        if not self.view_paused:
            self.apply_snapshot(snap)
        self.tick()

    def lost(self, exc: AdminError) -> float:
        delay, new = self.link.failed(exc)
        if new:
            title = "admin token" if exc.kind == "auth" else "connection"
            self.log_event("error", new)
            self.notify(new, title=title, severity="error", timeout=8)
        self.tick()
        return delay

    def tick(self) -> None:
        """Once a second and after each poll: re-label the header (stale age) and dim stale panes.
        Runs in a timer, so it must not raise: it only formats what is already here."""
        try:
            status = self.link.status(time.monotonic())
            self.body.set_class(status.level != "success", "-stale")
            self.render_header()
        except Exception as exc:
            self.display_bug(exc)

    def display_bug(self, exc: Exception) -> None:
        """A bug in showing a snapshot is reported once per distinct message, and the app goes on."""
        message = f"display error: {type(exc).__name__}: {exc}"
        if message != self._display_error:
            self._display_error = message
            self.log_event("error", message)
            self.notify(message, severity="error")

    # -- display ----------------------------------------------------------------------------------
    def render_header(self) -> None:
        self.header.show(self.url, self.snapshot, self.link.status(time.monotonic()), self.view_paused)

    def apply_snapshot(self, snap: JobSnapshot) -> None:
        """Everything below the header, from one snapshot. Guarded: a display bug is shown, not fatal."""
        start = time.perf_counter()
        try:
            self.queue.show(snap.queue)
            self.ranks.show(snap.ranks)
            self.tiers.show(snap.tiers, self.hits.series, snap.memory)
            had = self.adapters.display
            self.adapters.show(snap.adapters)
            if had != self.adapters.display:
                self.refresh_bindings()  # the unload key shows only while there is something to unload
            self.tput.data = list(snap.throughput.history)
            self.spec.show(snap.speculation)
        except Exception as exc:
            self.display_bug(exc)
            return
        self.refresh_ms = (time.perf_counter() - start) * 1000
        self.label_panes(snap)

    def label_panes(self, snap: JobSnapshot) -> None:
        paused = " (paused)" if self.view_paused else ""
        self.queue.border_title = f"queue · {len(snap.queue)}{paused}"
        batch, totals, tput = snap.batch, snap.totals, snap.throughput
        self.queue.summary = f"{batch.running} running · {batch.waiting} waiting · max {batch.max_batch}"
        self.queue.relabel()
        done = " · ".join(f"{k} {v}" for k, v in sorted(totals.requests.items())) or "none yet"
        self.totals.update(
            f"done: {done} · tokens {totals.prompt_tokens} in / {totals.generated_tokens} out"
            f" · refresh {self.refresh_ms:.0f} ms"
        )
        span = duration(len(tput.history) * tput.history_step_s)
        self.tput_box.border_title = f"throughput {rate(tput.output_tokens_per_s)} tok/s"
        self.tput_box.border_subtitle = f"last {span}"
        self.ranks.border_title = f"ranks · {len(snap.ranks)}{paused}"

    def log_event(self, level: str, text: str) -> None:
        self.events.add(level, text)

    # -- actions ----------------------------------------------------------------------------------
    def admin_call(self, what: str, call: Callable[[], Awaitable[str]], done: Callable[[str], str]) -> None:
        """Run one admin API call in a worker; any failure is a notification and an event line."""

        async def run() -> None:
            try:
                result = await call()
            except AdminError as exc:
                message = exc.message
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
            else:
                text = done(result)
                self.notify(text, title=what)
                self.log_event("warning", f"you: {text}")
                self.wake()
                return
            self.notify(f"{what} failed: {message}", title=what, severity="error", timeout=8)
            self.log_event("error", f"{what} failed: {message}")

        self.run_worker(run(), group="actions", exit_on_error=False)

    def action_cancel(self) -> None:
        rid = self.queue.selected_key()
        row = self.queue.rows_by_id.get(rid or "")
        if rid is None or row is None:
            self.notify("no request selected: pick a row in the queue first", severity="warning")
            return
        question = (
            f"{rid}\n{row.state}, age {duration(row.age_s)}, {row.prompt_tokens} prompt tokens, "
            f"{row.generated_tokens} generated, client {row.client or '?'}\n\n"
            'Its client gets the error "cancelled by an operator".'
        )

        def answered(yes: bool | None) -> None:
            if yes:
                self.admin_call("cancel", lambda: self.client.cancel(rid), lambda r: f"cancelled request {r}")

        self.push_screen(Confirm("Cancel this request?", question), answered)

    def action_drain(self) -> None:
        self.admin_call("drain", self.client.drain, lambda a: f"drain: admission now {a}")

    def action_resume(self) -> None:
        self.admin_call("resume", self.client.resume, lambda a: f"resume: admission now {a}")

    def action_clear_tier(self) -> None:
        tiers = [t.name for t in self.snapshot.tiers] if self.snapshot else []
        if not tiers:
            self.notify("no KV cache tiers known (no snapshot yet)", severity="warning")
            return

        def confirm(tier: str | None) -> None:
            if tier is None:
                return

            def answered(yes: bool | None) -> None:
                if yes:
                    self.admin_call(
                        "clear tier", lambda: self.client.clear_tier(tier), lambda t: f"clearing KV tier {t}"
                    )

            question = f"Every block of the {tier} tier that no running request uses is dropped."
            self.push_screen(Confirm(f"Clear the {tier} KV cache tier?", question), answered)

        if len(tiers) == 1:
            confirm(tiers[0])
        else:
            self.push_screen(ChooseTier(tiers), confirm)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "unload_adapter":
            return bool(self.snapshot is not None and self.snapshot.adapters)
        return True

    def action_unload_adapter(self) -> None:
        table = self.adapters
        name = table.selected_key() if table.row_count != 1 else next(iter(table.by_name), None)
        adapter = table.by_name.get(name or "")
        if adapter is None:
            self.notify("no adapter selected: pick a row in the adapters pane first", severity="warning")
            return
        title, question, drain = unload_question(adapter)

        def answered(yes: bool | None) -> None:
            if yes:
                self.admin_call(
                    "unload adapter",
                    lambda: self.client.unload_adapter(adapter.name, drain),
                    lambda state: f"adapter {adapter.name}: {state}",
                )

        self.push_screen(Confirm(title, question), answered)

    def action_sort(self) -> None:
        self.queue.cycle_sort()

    def action_reverse_sort(self) -> None:
        self.queue.set_sort(self.queue.sort_column, not self.queue.sort_reverse)

    def action_pause(self) -> None:
        self.view_paused = not self.view_paused
        self.log_event("info", "view paused (polling goes on)" if self.view_paused else "view resumed")
        if self.snapshot is not None:
            if self.view_paused:
                self.label_panes(self.snapshot)
            else:
                self.apply_snapshot(self.snapshot)
        self.render_header()

    def action_help(self) -> None:
        keys = []
        for b in self.BINDINGS:
            assert isinstance(b, Binding)
            keys.append((b.key_display or b.key, b.tooltip or b.description))
        self.push_screen(Help(keys, NOTES))
