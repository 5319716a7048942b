"""Byte transports for the control bus: MPI broadcast from rank 0, or nothing for a single rank.

Followers wait in a non-blocking broadcast and poll it: a blocking MPI collective busy-polls a whole core
(Open MPI), which an idle cluster must not do. They spin for a short window after each message (steps
arrive back to back while serving) and then back off to sleeping, up to `max_sleep`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class LocalTransport:
    """World size 1: there is nobody to tell."""

    rank = 0
    size = 1

    def broadcast(self, data: bytes) -> None:
        return None

    def receive(
        self, max_bytes: int, expect_soon: bool = False
    ) -> bytes:  # pragma: no cover - a single rank never receives
        raise RuntimeError("a single-rank job has no followers")

    def abort(self, code: int) -> None:
        raise SystemExit(code)


class MpiTransport:
    def __init__(self, comm: Any, spin_seconds: float = 0.05, max_sleep: float = 0.01) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.spin_seconds = spin_seconds
        self.max_sleep = max_sleep
        self._header = np.zeros(1, dtype=np.int64)

    def broadcast(self, data: bytes) -> None:
        self._header[0] = len(data)
        self.comm.Ibcast(self._header, root=0).Wait()
        self.comm.Bcast(np.frombuffer(data, dtype=np.uint8), root=0)

    def receive(self, max_bytes: int, expect_soon: bool = False) -> bytes:
        """`expect_soon`: a step just ran, the next is likely milliseconds away, so spin first."""
        request = self.comm.Ibcast(self._header, root=0)
        start = time.monotonic()
        spin = self.spin_seconds if expect_soon else 0.0
        sleep = 0.0005
        while not request.Test():
            if time.monotonic() - start > spin:
                time.sleep(sleep)
                sleep = min(self.max_sleep, sleep * 2)
        n = int(self._header[0])
        if n < 0 or n > max_bytes:
            from cluster.errors import BusMessageTooLarge

            raise BusMessageTooLarge(
                f"rank 0 announced a {n}-byte bus message, over the limit of {max_bytes}"
            )
        buf = np.empty(n, dtype=np.uint8)
        self.comm.Bcast(buf, root=0)
        return buf.tobytes()

    def abort(self, code: int) -> None:
        self.comm.Abort(code)
