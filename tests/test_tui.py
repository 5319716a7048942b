"""The dashboard (`python -m tui`) driven by Textual's Pilot: against a real TP=2 job (tiny model, real
HTTP, real mpirun), against a port nobody listens on, and against a job that refuses the token.

The rendered screen is checked as text pulled out of `export_screenshot()` (pytest-textual-snapshot
pins pytest<9): one string per terminal line, so "admission paused" matches even though the two words
are drawn in different colours."""

from __future__ import annotations

import html
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.style import Style
from textual.app import App
from textual.pilot import Pilot
from textual.widgets.data_table import RowKey

from cluster.snapshot import JobFacts, JobSnapshot, SnapshotDecodeError
from tests.jobs import Job, free_port, tiny_args
from tui.__main__ import parse_args
from tui.app import OrchardApp
from tui.bench_refresh import measure
from tui.screens import Confirm, Help

cluster = pytest.mark.cluster  # only the tests that start a job: the rest run in the quick suite
TOKEN = "tui-admin-token"
STREAM_BODY = {"model": "tiny", "prompt": "x", "max_tokens": 1500, "stream": True, "logit_bias": {"2": -100}}


class RecordingApp(OrchardApp):
    """Keeps every notification, so tests can check what the operator was told and how loudly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notes: list[tuple[str, str]] = []

    def notify(self, message: str, *args: Any, severity: Any = "information", **kwargs: Any) -> None:
        self.notes.append((str(severity), message))
        super().notify(message, *args, severity=severity, **kwargs)


@pytest.fixture(scope="module")
def job(job_factory, tiny_model: Path) -> Job:  # type: ignore[no-untyped-def]
    return job_factory.start(2, tiny_args(tiny_model, "--admin-token", TOKEN), "tui")


class Stream(threading.Thread):
    """One streaming completion read to its end in a thread, so the dashboard's loop stays free."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[dict[str, Any]] = []
        self.failure: str | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=STREAM_BODY, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        self.events.append(json.loads(line[6:]))
        except Exception as exc:  # reported by the test, never left to the thread machinery
            self.failure = repr(exc)


TEXT = re.compile(r'<text [^>]*x="([\d.]+)"[^>]*clip-path="url\(#terminal-\d+-line-(\d+)\)">([^<]*)</text>')
CELL_PX = 12.2  # Rich's SVG export: one terminal cell is 0.61 of its 20 px font


def screen_lines(app: App[Any]) -> list[str]:
    """The screen as text, one string per terminal line, from the SVG export (which leaves out runs of
    plain blanks: each text run is placed by its x position)."""
    width, height = app.size
    grid = [[" "] * width for _ in range(height)]
    for x, line, text in TEXT.findall(app.export_screenshot()):
        column = round(float(x) / CELL_PX)
        for i, char in enumerate(html.unescape(text).replace("\xa0", " ")):
            if column + i < width and int(line) < height:
                grid[int(line)][column + i] = char
    return ["".join(row).rstrip() for row in grid]


def screen(app: App[Any]) -> str:
    return "\n".join(screen_lines(app))


async def wait_for(pilot: Pilot[None], predicate: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            app = pilot.app
            notes = getattr(app, "notes", [])
            raise AssertionError(
                f"timed out; screen {type(app.screen).__name__}, notes {notes}:\n{screen(app)}"
            )
        await pilot.pause(0.05)


def event_text(app: OrchardApp) -> str:
    return "\n".join(line.text for line in app.events.lines)


@cluster
@pytest.mark.asyncio
async def test_ranks_queue_cancel_drain_resume(job: Job) -> None:
    app = RecordingApp(job.url, TOKEN, interval=0.3)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.ranks.row_count == 2)
        for rank in ("0", "1"):
            assert app.ranks.get_cell(rank, "state").text.plain == "ok"
        text = screen(app)
        assert "● live" in text and "tiny" in text and "TP=2" in text and "admission open" in text

        stream = Stream(job.url)
        stream.start()
        await wait_for(pilot, lambda: any(r.state == "running" for r in app.queue.rows_by_id.values()))
        rid = next(iter(app.queue.rows_by_id))
        assert rid.rsplit("-", 1)[-1][:10] in screen(app)  # the row is on screen, not just in the table

        # select the row, cancel it, confirm in the modal
        app.queue.focus()
        app.queue.move_cursor(row=app.queue.get_row_index(RowKey(rid)))
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, Confirm))
        assert rid in screen(app)
        await pilot.press("y")
        deadline = time.monotonic() + 30
        while stream.is_alive() and time.monotonic() < deadline:
            await pilot.pause(0.1)
        assert not stream.is_alive() and stream.failure is None, stream.failure
        assert "error" in stream.events[-1], stream.events[-3:]
        assert "cancelled by an operator" in stream.events[-1]["error"]["message"]
        await wait_for(pilot, lambda: rid not in app.queue.rows_by_id and app.queue.row_count == 0)
        assert ("information", f"cancelled request {rid}") in app.notes
        await wait_for(pilot, lambda: "ended: cancelled" in event_text(app))

        # drain shows in the header and really stops admission; resume restores it
        await pilot.press("d")
        await wait_for(pilot, lambda: "admission paused" in screen_lines(app)[0])
        r = httpx.post(job.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 503
        await pilot.press("r")
        await wait_for(pilot, lambda: "admission open" in screen_lines(app)[0])
        events = event_text(app)
        assert "admission open → paused" in events and "admission paused → open" in events

        # pausing the view freezes the panes but keeps polling
        await pilot.press("p")
        await wait_for(pilot, lambda: "VIEW PAUSED" in screen_lines(app)[1])
        await pilot.press("p")
        await wait_for(pilot, lambda: "VIEW PAUSED" not in screen_lines(app)[1])
        assert not [n for n in app.notes if n[0] == "error"], app.notes


@pytest.mark.asyncio
async def test_unreachable_server_keeps_the_app_up() -> None:
    app = RecordingApp(f"http://127.0.0.1:{free_port()}", "x", interval=0.1)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: "reconnecting 2/6" in screen_lines(app)[1], timeout=10)
        header = "\n".join(screen_lines(app)[:2])
        assert "cannot reach" in header, header
        assert any(sev == "error" and "connection refused" in m for sev, m in app.notes), app.notes
        await pilot.press("d")  # an action against a dead server fails as a notification, never a crash
        await wait_for(pilot, lambda: any(m.startswith("drain failed") for _, m in app.notes))
        assert app.is_running
        assert "cannot reach" in event_text(app)


def example_state() -> dict[str, Any]:
    """A small /admin/state document, written by the server's own schema."""
    doc = JobSnapshot.starting(JobFacts("fake", 1, 2048, started=1e9)).to_json()
    doc.update(engine="ready", admission="open", uptime_s=5.1)
    tier = {"tier": "ram", "blocks": 0, "capacity_blocks": 19284, "bytes_used": 0, "capacity_bytes": 2527592448,
            "block_bytes": 131072, "query_tokens": 11, "hit_tokens": 0, "miss_tokens": 11, "hit_rate": 0.0,
            "evictions": 0, "stored": 0}  # fmt: skip
    rank = {"rank": 0, "host": "vm", "pid": 1, "state": "ok", "report_age_s": 0.85, "step": 32, "step_ms": 0.05,
            "median_step_ms": 0.05, "active_bytes": 1, "peak_bytes": 1, "rss_bytes": 1, "kv_blocks": 0,
            "kv_bytes": 0, "last_error": "", "liveness_age_s": None}  # fmt: skip
    doc["kv"] = {"tiers": [tier]}
    doc["ranks"] = [rank]
    return doc


EXAMPLE_STATE = example_state()


class SlowServer(ThreadingHTTPServer):
    """An admin API stand-in that answers /admin/state at once, or after `delay` seconds."""

    daemon_threads = True
    delay = 0.0

    def __init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(server.delay)
                body = json.dumps(EXAMPLE_STATE).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the dashboard gave up on this answer (its timeout): expected here

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.mark.asyncio
async def test_slow_server_goes_stale_then_reconnects() -> None:
    server = SlowServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # stale after 1 s without an answer, failed at the client's 4 s timeout: a 3 s window to see
    # "stale" even on a loaded 2-core machine
    app = RecordingApp(f"http://127.0.0.1:{server.server_address[1]}", "t", interval=0.1, timeout=4.0)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: "● live" in screen_lines(app)[1])
            server.delay = 6.0  # each poll now outlasts the client's 4 s timeout
            await wait_for(pilot, lambda: "● stale" in screen_lines(app)[1], timeout=8)
            assert app.body.has_class("-stale")  # the panes are dimmed meanwhile
            await wait_for(pilot, lambda: "reconnecting 1/6" in screen_lines(app)[1], timeout=10)
            server.delay = 0.0
            await wait_for(pilot, lambda: "● live" in screen_lines(app)[1], timeout=10)
            assert "connection back" in event_text(app)
            assert not app.body.has_class("-stale")
    finally:
        server.shutdown()
        server.server_close()


@cluster
@pytest.mark.asyncio
async def test_refused_or_missing_token_is_said_clearly(job: Job) -> None:
    for token, says in (("wrong-token", "the admin token was refused"), (None, "no admin token given")):
        app = RecordingApp(job.url, token, interval=0.2)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: "token refused" in screen_lines(app)[1])  # noqa: B023
            assert says in screen_lines(app)[1]
            assert any(sev == "error" and says in m for sev, m in app.notes), app.notes
            assert app.ranks.row_count == 0  # nothing shown that the token did not unlock


@cluster
@pytest.mark.asyncio
async def test_rendered_screen_small_and_large(job: Job) -> None:
    for size in ((80, 24), (200, 60)):
        app = RecordingApp(job.url, TOKEN, interval=0.3)
        async with app.run_test(size=size) as pilot:
            await wait_for(pilot, lambda: app.ranks.row_count == 2 and "SSD" in screen(app))  # noqa: B023
            lines = screen_lines(app)
            text = "\n".join(lines)
            for label in (
                "Orchard",
                "TP=2",
                "queue",
                "KV cache",
                "RAM",
                "SSD",
                "hit%",
                "throughput",
                "ranks",
            ):
                assert label in text, (size, label, text)
            for label in ("events", "connected: tiny", "step ms", "beat", "tok/s", "age ↓"):
                assert label in text, (size, label, text)
            for key in (
                "c cancel",
                "d drain",
                "r resume",
                "x clear",
                "s sort",
                "p pause",
                "? help",
                "q quit",
            ):
                assert key in lines[-1], (size, key, lines[-1])
            await pilot.press("s")  # the next sort column shows in the queue's border
            await wait_for(pilot, lambda: "state ↑" in screen(app))  # noqa: B023
            await pilot.press("question_mark")
            await wait_for(pilot, lambda: isinstance(app.screen, Help))  # noqa: B023
            help_text = screen(app)
            assert "Orchard dashboard keys" in help_text and "cancel the selected request" in help_text
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, Help))  # noqa: B023
            # a light theme: state colours come from its own $text-success, readable on white
            dark = app.ranks.get_cell("0", "state").text.style.color
            app.theme = "textual-light"

            def restyled() -> bool:
                light = Style.parse(app.theme_variables["text-success"]).color  # noqa: B023
                return light != dark and app.ranks.get_cell("0", "state").text.style.color == light  # noqa: B023

            await wait_for(pilot, restyled)


@pytest.mark.asyncio
async def test_thousand_rows_update_in_place() -> None:
    """The refresh benchmark doubles as a check: rows are keyed by request id, the selected request
    keeps the cursor through updates, and one 1,000-row snapshot applies well under a poll interval."""
    result = await measure(rows=1000, rounds=5)
    assert result["apply_p50_ms"] < 500, result


def test_cli_token_sources(tmp_path: Path) -> None:
    (tmp_path / "admin-token").write_text("from-file\n")
    env = {"ORCHARD_CACHE": str(tmp_path)}
    assert parse_args([], env).token == "from-file"
    assert parse_args([], {**env, "ORCHARD_ADMIN_TOKEN": "from-env"}).token == "from-env"
    assert parse_args(["--token", "given"], env).token == "given"
    args = parse_args([], {"ORCHARD_CACHE": str(tmp_path / "none"), "ORCHARD_URL": "http://h:1"})
    assert args.token is None and args.url == "http://h:1" and args.interval == 1.0


def test_snapshot_decoding_is_strict_but_ignores_unknown_fields() -> None:
    state = example_state()
    state["kv"]["tiers"].append(
        {**state["kv"]["tiers"][0], "tier": "ssd", "enabled": False, "disabled_reason": "disk full",
         "corrupt_dropped": 2, "rank0_io": None, "shards": 4, "io": {"nested": 1}}
    )  # fmt: skip
    ram, ssd = JobSnapshot.from_json(state).tiers
    assert (ram.name, ram.enabled, ram.extra) == ("ram", True, None)
    assert (ssd.name, ssd.capacity_blocks, ssd.enabled, ssd.disabled_reason) == (
        "ssd",
        19284,
        False,
        "disk full",
    )
    assert ssd.extra is not None and ssd.extra.corrupt_dropped == 2
    del state["kv"]["tiers"][0]["hit_rate"]  # a field the server renamed: an error, never a zero
    with pytest.raises(SnapshotDecodeError, match=r"kv\.tiers\[0\]\.hit_rate: missing"):
        JobSnapshot.from_json(state)


@pytest.mark.asyncio
async def test_tiers_pane_shows_the_kv_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The running sequences' KV against the budget, first in the KV cache pane, with requests waiting
    for memory called out; a server without a budget shows no such line."""
    from cluster.snapshot import MemoryView

    state = example_state()
    state["memory"] = MemoryView(4 * 2**30, 2**30, 2**28, 3 * 2**30, 2, 5, 1).to_json()
    monkeypatch.setitem(globals(), "EXAMPLE_STATE", state)
    server = SlowServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    app = RecordingApp(f"http://127.0.0.1:{server.server_address[1]}", "t", interval=0.1)
    try:
        async with app.run_test(size=(140, 40)) as pilot:
            await wait_for(pilot, lambda: any("2 wait for memory" in line for line in screen_lines(app)))
            text = "\n".join(screen_lines(app))
            assert "LIVE" in text and "1.0 GiB/4.0 GiB · rsv 75%" in text, text
            monkeypatch.setitem(globals(), "EXAMPLE_STATE", example_state())  # no budget
            await wait_for(pilot, lambda: "LIVE" not in "\n".join(screen_lines(app)))
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.asyncio
async def test_throughput_pane_shows_speculation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Speculative decoding's figures in the throughput pane, acceptance first so a narrow screen keeps
    it; "off" when the server does not speculate, "n/a" when its snapshot has no such section (a server
    from before it), never zeros."""
    from cluster.snapshot import SpeculationView

    ngram = SpeculationView("ngram", 4, 2000, 1500, 500, 40, 10)

    def serve(spec: SpeculationView | None, *, drop: bool = False) -> None:
        doc = example_state()
        doc["speculation"] = None if spec is None else spec.to_json()
        if drop:
            del doc["speculation"]
        monkeypatch.setitem(globals(), "EXAMPLE_STATE", doc)

    def spec_line(app: OrchardApp) -> str:
        return next((line for line in screen_lines(app) if "spec " in line), "")

    server = SlowServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for size in ((200, 50), (80, 24)):
            serve(ngram)
            app = RecordingApp(f"http://127.0.0.1:{server.server_address[1]}", "t", interval=0.1)
            async with app.run_test(size=size) as pilot:
                for spec, drop, shown in (
                    (ngram, False, "spec ngram · acc 75% · 10s 25% · +3.0/row · 1500/2000 tok · k=4"),
                    (SpeculationView("draft", 6, 0, 0, 0, 0, 0), False, "spec draft · k=6 · nothing drafted"),
                    (SpeculationView("off", 0, 0, 0, 0, 0, 0), False, "spec off"),
                    (None, True, "spec n/a"),
                ):
                    serve(spec, drop=drop)
                    if size[0] < 110:  # the narrow side pane: 24 columns, acceptance first
                        shown = shown[:20]
                    await wait_for(pilot, lambda: shown in spec_line(app))  # noqa: B023
                assert not [n for n in app.notes if n[0] == "error"], app.notes
    finally:
        server.shutdown()
        server.server_close()
