"""python -m tui [--url http://host:8000] [--token T | --token-file F] [--interval 1.0]

The URL comes from --url, else $ORCHARD_URL, else http://127.0.0.1:8000. The admin token from --token,
else --token-file, else $ORCHARD_ADMIN_TOKEN, else the file rank 0 writes when started without
--admin-token (admin-token in $ORCHARD_CACHE, else $XDG_CACHE_HOME/orchard, else ~/.cache/orchard: the
same per-user folder as rank/admin_token.py, whatever the server's --cache-dir), so on the head node it
just works.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

MAX_TOKEN_FILE_BYTES = 4096


def token_file(env: Mapping[str, str]) -> Path:
    """Where rank 0 leaves a generated token (rank/admin_token.py; the dashboard may not import rank)."""
    base = env.get("ORCHARD_CACHE") or os.path.join(
        env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"), "orchard"
    )
    return Path(base) / "admin-token"


def read_token(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_TOKEN_FILE_BYTES).decode(errors="replace")
    except OSError:  # absent or unreadable: the dashboard then says the token is missing
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return lines[0] if lines else None


def resolve_token(given: str | None, env: Mapping[str, str], given_file: Path | None = None) -> str | None:
    if given:
        return given
    if given_file is not None:
        return read_token(given_file)
    if env.get("ORCHARD_ADMIN_TOKEN"):
        return env["ORCHARD_ADMIN_TOKEN"]
    return read_token(token_file(env))


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
        help="admin token (default: $ORCHARD_ADMIN_TOKEN, else the admin-token file rank 0 writes in "
        "$ORCHARD_CACHE, $XDG_CACHE_HOME/orchard or ~/.cache/orchard)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        help="read the admin token from this file (e.g. the server's --admin-token-file)",
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1.0)")
    args = p.parse_args(argv)
    if args.interval <= 0:
        p.error("--interval must be positive")
    args.token = resolve_token(args.token, env, args.token_file)
    if args.token is None and args.token_file is not None:
        p.error(f"--token-file {args.token_file}: no token there (missing, unreadable or empty)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from tui.app import OrchardApp  # after parsing: --help answers without loading Textual

    OrchardApp(args.url, args.token, args.interval).run()


if __name__ == "__main__":
    main()
