"""Modal screens: confirmation, tier choice, help."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

KEYS = [
    ("c", "cancel the selected request (asks first)"),
    ("d / r", "drain / resume admission"),
    ("x", "clear a cache tier (asks first)"),
    ("s", "sort the queue by the next column"),
    ("p", "pause / unpause the view (polling goes on)"),
    ("tab", "switch panes"),
    ("?", "this help"),
    ("q", "quit"),
]


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]
    DEFAULT_CSS = """
    Confirm { align: center middle; }
    Confirm > Grid { grid-size: 2; grid-gutter: 1 2; width: 60; height: auto; padding: 1 2;
                     border: thick $warning; background: $surface; }
    Confirm Label { column-span: 2; width: 100%; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Grid():
            yield Label(self.question)
            yield Button("Yes (y)", variant="error", id="yes")
            yield Button("No (n)", variant="primary", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ChooseTier(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss_none", "back")]
    DEFAULT_CSS = """
    ChooseTier { align: center middle; }
    ChooseTier > Vertical { width: 50; height: auto; padding: 1 2; border: thick $warning; background: $surface; }
    ChooseTier Button { width: 100%; margin-top: 1; }
    """

    def __init__(self, tiers: list[str]) -> None:
        super().__init__()
        self.tiers = tiers

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Clear which KV cache tier? Every block no request uses is dropped.")
            for tier in self.tiers:
                yield Button(f"clear {tier}", id=f"tier-{tier}", variant="error")
            yield Button("back (esc)", id="back")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        bid = event.button.id or ""
        self.dismiss(bid.removeprefix("tier-") if bid.startswith("tier-") else None)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class Help(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "close", "close")]
    DEFAULT_CSS = """
    Help { align: center middle; }
    Help > Static { width: 64; height: auto; padding: 1 2; border: thick $primary; background: $surface; }
    """

    def compose(self) -> ComposeResult:
        lines = ["[b]Orchard dashboard keys[/b]", ""] + [f"[b]{k:<6}[/b] {what}" for k, what in KEYS]
        lines += [
            "",
            "Data marked [i]stale[/i] is the last snapshot the server sent.",
            "esc closes this help.",
        ]
        yield Static("\n".join(lines))

    def action_close(self) -> None:
        self.dismiss(None)
