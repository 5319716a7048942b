"""python -m tui --url http://host:8000 --token ... (or ORCHARD_URL / ORCHARD_ADMIN_TOKEN)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def default_token() -> str | None:
    """The token rank 0 leaves in the cache folder when started without --admin-token."""
    if os.environ.get("ORCHARD_ADMIN_TOKEN"):
        return os.environ["ORCHARD_ADMIN_TOKEN"]
    base = os.environ.get("ORCHARD_CACHE") or os.path.join(os.path.expanduser("~/.cache"), "orchard")
    path = Path(base) / "admin-token"
    return path.read_text().strip() if path.exists() else None


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tui", description="Live dashboard of an Orchard cluster.")
    p.add_argument(
        "--url", default=os.environ.get("ORCHARD_URL", "http://127.0.0.1:8000"), help="rank 0's URL"
    )
    p.add_argument(
        "--token",
        default=None,
        help="admin token (default: ORCHARD_ADMIN_TOKEN or ~/.cache/orchard/admin-token)",
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    args = p.parse_args()
    from tui.app import OrchardApp

    OrchardApp(args.url, args.token or default_token(), args.interval).run()


if __name__ == "__main__":
    main()
