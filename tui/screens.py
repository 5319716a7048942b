"""Modal screens: a yes/no confirmation, the choice of a cache tier, and the key help.

Destructive actions (cancel, clear) always pass through `Confirm`, which defaults to "no": escape, n
and a click outside all decline."""

from __future__ import annotations

from collections.abc import Sequence

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class Confirm(ModalScreen[bool]):
    BINDINGS = [
        Binding("y", "answer(True)", "yes"),
        Binding("n,escape", "answer(False)", "no"),
    ]
    DEFAULT_CSS = """
    Confirm { align: center middle; }
    Confirm > Vertical {
        width: 70; max-width: 95%; height: auto; padding: 1 2;
        border: thick $warning; background: $surface;
    }
    Confirm Static { width: 100%; margin-bottom: 1; }
    Confirm Horizontal { height: auto; align-horizontal: right; }
    Confirm Button { margin-left: 2; }
    """

    def __init__(self, title: str, question: str) -> None:
        super().__init__()
        self.title_text = title
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"[b]{escape(self.title_text)}[/b]\n\n{escape(self.question)}")
            with Horizontal():
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ChooseTier(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "choose(None)", "back")]
    DEFAULT_CSS = """
    ChooseTier { align: center middle; }
    ChooseTier > Vertical {
        width: 60; max-width: 95%; height: auto; padding: 1 2;
        border: thick $warning; background: $surface;
    }
    ChooseTier Button { width: 100%; margin-top: 1; }
    """

    def __init__(self, tiers: Sequence[str]) -> None:
        super().__init__()
        self.tiers = list(tiers)

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("[b]Clear which KV cache tier?[/b] (number key or click; esc: back)")
            for i, tier in enumerate(self.tiers, 1):
                yield Button(f"{i}: {tier}", id=f"tier-{i}", variant="warning")

    def on_key(self, event: events.Key) -> None:
        key = event.character or ""
        if key.isdigit() and 1 <= int(key) <= len(self.tiers):
            event.stop()
            self.dismiss(self.tiers[int(key) - 1])

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(self.tiers[int((event.button.id or "tier-0")[5:]) - 1])

    def action_choose(self, tier: str | None) -> None:
        self.dismiss(tier)


class Help(ModalScreen[None]):
    """Lists the app's own bindings (key, long description), so the help cannot drift from the keys."""

    BINDINGS = [Binding("escape,question_mark,q", "close", "close")]
    DEFAULT_CSS = """
    Help { align: center middle; }
    Help > VerticalScroll {
        width: 78; max-width: 100%; height: auto; max-height: 100%; padding: 0 1;
        border: thick $primary; background: $surface;
    }
    """

    def __init__(self, keys: Sequence[tuple[str, str]], notes: Sequence[str]) -> None:
        super().__init__()
        self.keys = keys
        self.notes = notes

    def compose(self) -> ComposeResult:
        lines = ["[b]Orchard dashboard keys[/b]   [dim](esc, ? or q closes)[/dim]", ""]
        lines += [f"[b $text-accent]{escape(k):<9}[/] {escape(what)}" for k, what in self.keys]
        lines += ["", *[escape(n) for n in self.notes]]
        with VerticalScroll():
            yield Static("\n".join(lines))

    def action_close(self) -> None:
        self.dismiss(None)
