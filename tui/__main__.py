"""python -m tui [--url http://host:8000] [--token T] [--interval 1.0]

The URL comes from --url, else $ORCHARD_URL, else http://127.0.0.1:8000. The admin token from --token,
else $ORCHARD_ADMIN_TOKEN, else the file rank 0 writes when started without --admin-token
($ORCHARD_CACHE/admin-token or ~/.cache/orchard/admin-token), so on the head node it just works.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def token_file(env: Mapping[str, str]) -> Path:
    base = env.get("ORCHARD_CACHE") or str(Path.home() / ".cache" / "orchard")
    return Path(base) / "admin-token"


def resolve_token(given: str | None, env: Mapping[str, str]) -> str | None:
    if given:
        return given
    if env.get("ORCHARD_ADMIN_TOKEN"):
        return env["ORCHARD_ADMIN_TOKEN"]
    path = token_file(env)
    try:
        return path.read_text().strip() or None
    except OSError:  # absent or unreadable: the dashboard then says the token is missing
        return None


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> argparse.Namespace:
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(
        prog="python -m tui",
        description="Live dashboard of an Orchard cluster (talks to rank 0's admin API).",
    )
    p.add_argument(
        "--url",
        default=env.get("ORCHARD_URL", "http://127.0.0.1:8000"),
        help="rank 0's URL (default: $ORCHARD_URL or http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--token",
        help="admin token (default: $ORCHARD_ADMIN_TOKEN, else $ORCHARD_CACHE/admin-token or "
        "~/.cache/orchard/admin-token)",
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1.0)")
    args = p.parse_args(argv)
    if args.interval <= 0:
        p.error("--interval must be positive")
    args.token = resolve_token(args.token, env)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from tui.app import OrchardApp  # after parsing: --help answers without loading Textual

    OrchardApp(args.url, args.token, args.interval).run()


if __name__ == "__main__":
    main()
