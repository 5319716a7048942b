"""Rank 0's record of the SSD tier (SQLite): which blocks are on every rank's disk.

A block is `persisted` only when every rank acknowledged writing its slice; until then it is never
loaded. The manifest survives restarts; at start-up, entries that never became persisted (a crash mid
write) are dropped, and the ranks report files that are missing or damaged so those go too.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import msgpack

SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    hash BLOB PRIMARY KEY,
    tokens BLOB NOT NULL,
    nbytes INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    acks INTEGER NOT NULL DEFAULT 0,
    persisted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS blocks_lru ON blocks (persisted, last_used);
"""


class Manifest:
    def __init__(self, path: Path, world_size: int, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.world_size = world_size
        self.clock = clock
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._acked: dict[bytes, set[int]] = {}

    def close(self) -> None:
        self.db.close()

    def drop_unpersisted(self) -> int:
        """Writes a crash interrupted: never loadable, so forget them (the ranks delete the files)."""
        return self.db.execute("DELETE FROM blocks WHERE persisted = 0").rowcount

    def persisted_hashes(self) -> list[bytes]:
        return [row[0] for row in self.db.execute("SELECT hash FROM blocks WHERE persisted = 1")]

    def add_pending(self, h: bytes, tokens: tuple[int, ...], nbytes: int) -> None:
        now = self.clock()
        self.db.execute(
            "INSERT OR IGNORE INTO blocks (hash, tokens, nbytes, created, last_used) VALUES (?, ?, ?, ?, ?)",
            (h, msgpack.packb(list(tokens)), nbytes, now, now),
        )

    def all_hashes(self) -> list[bytes]:
        return [row[0] for row in self.db.execute("SELECT hash FROM blocks")]

    def ack(self, h: bytes, rank: int) -> bool:
        """Record one rank's successful write; True when this made the block persisted."""
        if h not in self._acked and not self.known(h):
            return False  # deleted (cleared or pruned) while its write was in flight
        ranks = self._acked.setdefault(h, set())
        ranks.add(rank)
        if len(ranks) < self.world_size:
            return False
        del self._acked[h]
        cur = self.db.execute(
            "UPDATE blocks SET persisted = 1, acks = ? WHERE hash = ? AND persisted = 0", (len(ranks), h)
        )
        return cur.rowcount == 1

    def tokens(self, h: bytes) -> tuple[int, ...] | None:
        row = self.db.execute("SELECT tokens FROM blocks WHERE hash = ? AND persisted = 1", (h,)).fetchone()
        return tuple(msgpack.unpackb(row[0])) if row else None

    def known(self, h: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM blocks WHERE hash = ?", (h,)).fetchone() is not None

    def touch(self, hashes: Iterable[bytes]) -> None:
        now = self.clock()
        self.db.executemany("UPDATE blocks SET last_used = ? WHERE hash = ?", [(now, h) for h in hashes])

    def delete(self, hashes: Iterable[bytes]) -> int:
        hs = list(hashes)
        for h in hs:
            self._acked.pop(h, None)
        self.db.executemany("DELETE FROM blocks WHERE hash = ?", [(h,) for h in hs])
        return len(hs)

    def forget_pending(self, hashes: Iterable[bytes]) -> list[bytes]:
        """Forget blocks whose write some rank gave up on (a dropped save); a persisted block stays.
        Returns the hashes forgotten."""
        out = []
        for h in hashes:
            if self.db.execute("DELETE FROM blocks WHERE hash = ? AND persisted = 0", (h,)).rowcount:
                self._acked.pop(h, None)
                out.append(h)
        return out

    def usage(self) -> tuple[int, int]:
        """(blocks, bytes on one rank) of persisted and pending blocks together."""
        n, total = self.db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM blocks").fetchone()
        return int(n), int(total)

    def persisted_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM blocks WHERE persisted = 1").fetchone()[0])

    def victims(self, max_bytes: int, ttl: float | None, incoming: int = 0) -> list[bytes]:
        """Persisted blocks to delete, least recently used first, so `incoming` more bytes fit and none
        is older than `ttl` seconds."""
        out: list[bytes] = []
        if ttl:
            cutoff = self.clock() - ttl
            out += [
                r[0]
                for r in self.db.execute(
                    "SELECT hash FROM blocks WHERE persisted = 1 AND last_used < ?", (cutoff,)
                )
            ]
        _, used = self.usage()
        excess = used + incoming - max_bytes
        if excess > 0:
            taken = set(out)
            for h, nbytes in self.db.execute(
                "SELECT hash, nbytes FROM blocks WHERE persisted = 1 ORDER BY last_used"
            ):
                if excess <= 0:
                    break
                if h not in taken:
                    out.append(h)
                    excess -= nbytes
        return out
