"""The dashboard driven by Textual's Pilot against a real TP=2 job (tiny model, real HTTP), against an
unreachable server and against one that refuses the token."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from textual.widgets import DataTable, RichLog

from tests.jobs import Job, free_port
from tui.app import OrchardApp

pytestmark = pytest.mark.cluster
TOKEN = "tui-token"


@pytest.fixture(scope="module")
def job(job_factory) -> Job:  # type: ignore[no-untyped-def]
    # The embedded model over 3 ranks: slow enough (about 10 tokens/s here) that a request is still
    # running when the dashboard cancels it.
    return job_factory.start(3, ["--admin-token", TOKEN], "tui")


async def wait_for(pilot, predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        app = pilot.app
        notes = [n.message for n in app._notifications]
        assert loop.time() < deadline, (
            f"condition not reached; screen {type(app.screen).__name__}, notes {notes}"
        )
        await pilot.pause(0.1)


def screen_text(app: OrchardApp) -> str:
    """The rendered screen as text (the SVG export writes spaces as &#160;)."""
    return app.export_screenshot().replace("&#160;", " ")


STREAM_CLIENT = """
import sys, httpx
body = {"model": "SmolLM2-135M-Instruct", "prompt": "dashboard", "max_tokens": 1900, "stream": True, "logit_bias": {"2": -100}}
with httpx.stream("POST", sys.argv[1] + "/v1/completions", json=body, timeout=120) as r:
    lines = [line for line in r.iter_lines() if line.startswith("data: {")]
print(lines[-1], flush=True)
"""


@pytest.mark.asyncio
async def test_ranks_queue_cancel_and_drain(job: Job) -> None:
    # The load comes from another process: a client sharing the dashboard's event loop would compete
    # with it for the loop and measure the test, not the dashboard.
    app = OrchardApp(job.url, TOKEN, interval=0.3)
    async with app.run_test(size=(140, 42)) as pilot:
        queue = app.query_one("#queue", DataTable)
        ranks = app.query_one("#ranks", DataTable)
        await wait_for(pilot, lambda: ranks.row_count == 3)

        async def start_client() -> asyncio.subprocess.Process:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-c", STREAM_CLIENT, job.url, stdout=asyncio.subprocess.PIPE
            )

        def states() -> list[str]:
            return [str(queue.get_row_at(i)[1]) for i in range(queue.row_count)]

        client = await start_client()
        await wait_for(pilot, lambda: "running" in states())
        text = screen_text(app)
        assert "live" in text and "SmolLM2" in text and "TP=3" in text
        # select the running request and cancel it, confirming in the modal
        queue.focus()
        queue.move_cursor(row=states().index("running"))
        await pilot.press("c")
        await pilot.pause(0.2)
        await pilot.press("y")
        await wait_for(pilot, lambda: any("cancel" in n.message for n in app._notifications), timeout=10)
        notes = [n.message for n in app._notifications]
        out, _ = await asyncio.wait_for(client.communicate(), 60)
        assert "failed" not in " ".join(notes), notes
        assert "cancelled by an operator" in json.loads(out.decode().splitlines()[-1][6:])["error"]["message"]
        await wait_for(pilot, lambda: queue.row_count == 0)
        # drain shows in the header, resume restores it
        await pilot.press("d")
        await wait_for(pilot, lambda: "admission paused" in screen_text(app))
        await pilot.press("r")
        await wait_for(pilot, lambda: "admission open" in screen_text(app))
        events = "\n".join(str(line) for line in app.query_one("#events", RichLog).lines)
        assert "cancelled" in events and "admission" in events


@pytest.mark.asyncio
async def test_unreachable_server_keeps_the_app_up() -> None:
    app = OrchardApp(f"http://127.0.0.1:{free_port()}", "x", interval=0.2)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: "reconnecting" in screen_text(app), timeout=10)
        assert "cannot reach" in screen_text(app)
        await pilot.press("d")  # actions fail as notifications, never a crash
        await pilot.pause(0.5)
        assert app.is_running


@pytest.mark.asyncio
async def test_refused_token_is_said_clearly(job: Job) -> None:
    app = OrchardApp(job.url, "wrong-token", interval=0.2)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: "token refused" in screen_text(app), timeout=10)
        assert "admin token was refused" in screen_text(app)


@pytest.mark.asyncio
async def test_rendered_screen_small_and_large(job: Job) -> None:
    for size in ((80, 24), (200, 60)):
        app = OrchardApp(job.url, TOKEN, interval=0.3)
        async with app.run_test(size=size) as pilot:
            table = app.query_one("#ranks", DataTable)
            await wait_for(pilot, lambda t=table: t.row_count == 3)
            await pilot.pause(0.5)
            text = screen_text(app)
            for label in ("Orchard", "queue", "ranks", "KV cache", "RAM", "events", "cancel", "drain"):
                assert label in text, (size, label)
            await pilot.press("question_mark")
            await pilot.pause(0.2)
            assert "Orchard dashboard keys" in screen_text(app)
