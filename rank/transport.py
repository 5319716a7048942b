"""Byte transports for the control bus: MPI broadcast from rank 0, or nothing for a single rank.

Followers wait in a non-blocking broadcast and poll it: a blocking MPI collective busy-polls a whole core
(Open MPI), which an idle cluster must not do. They spin for a short window after each message (steps
arrive back to back while serving) and then back off to sleeping, up to `max_sleep`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

ACK_TAG = 77
HELLO_TAG = 78
REPORT_TAG = 79
SSD_LOAD_TAG = 80
SSD_SYNC_TAG = 81
MAX_REPORT_BYTES = 64 * 1024


class LocalTransport:
    """World size 1: there is nobody to tell."""

    rank = 0
    size = 1

    def acknowledge(self, seq: int) -> None:  # pragma: no cover - a single rank never receives
        return None

    def await_acks(self, seq: int, timeout: float) -> list[int]:
        return []

    def send_to_leader(self, data: bytes, tag: int) -> None:  # pragma: no cover - rank 0 has no leader
        return None

    def recv_from_followers(self, tag: int, max_bytes: int) -> list[bytes]:
        return []

    def close(self, last_seq: int) -> None:
        return None

    def failed_ranks(self) -> list[int]:
        return []

    def send_report(self, data: bytes) -> None:  # pragma: no cover - rank 0 reports to itself
        return None

    def poll_reports(self) -> list[bytes]:
        return []

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
        import os

        self.comm = comm
        # Ranks that share a host share its cores: a spinning follower starves rank 0's HTTP thread
        # (measured: requests stalled for seconds at TP=2 on 2 cores). They poll with short sleeps instead.
        self.shared_host = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")) > 1
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.spin_seconds = spin_seconds
        self.max_sleep = max_sleep
        self._header = np.zeros(1, dtype=np.int64)
        self._pending_acks: list[tuple[Any, np.ndarray]] = []  # follower: in-flight Isends and their buffers
        self._pending_reports: list[tuple[Any, np.ndarray]] = []
        self._ack_bufs = {r: np.full(1, -1, dtype=np.int64) for r in range(1, self.size)}
        self._ack_reqs: dict[int, Any] = {}
        self.last_ack = dict.fromkeys(range(1, self.size), 0)  # leader: newest seq each follower received

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
            elif self.shared_host:
                time.sleep(0.0002)  # stay responsive without holding a core
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

    # -- liveness: every follower acknowledges each bus message as soon as it has it ----------------
    def acknowledge(self, seq: int) -> None:
        self._pending_acks = [(r, b) for r, b in self._pending_acks if not r.Test()]
        buf = np.array([seq], dtype=np.int64)
        self._pending_acks.append((self.comm.Isend(buf, dest=0, tag=ACK_TAG), buf))

    def _poll_acks(self) -> None:
        for r, buf in self._ack_bufs.items():
            req = self._ack_reqs.get(r)
            while True:
                if req is None:
                    req = self._ack_reqs[r] = self.comm.Irecv(buf, source=r, tag=ACK_TAG)
                if not req.Test():
                    break
                self.last_ack[r] = int(buf[0])
                req = self._ack_reqs[r] = None

    def await_acks(self, seq: int, timeout: float) -> list[int]:
        """Wait until every follower has received message `seq`; the ranks still missing at the timeout."""
        deadline = time.monotonic() + timeout
        spin_until = time.monotonic() + 0.005
        while True:
            self._poll_acks()
            missing = [r for r, got in self.last_ack.items() if got < seq]
            if not missing or time.monotonic() > deadline:
                return missing
            if time.monotonic() > spin_until:
                time.sleep(0.0005)

    def send_report(self, data: bytes) -> None:
        self._pending_reports = [(r, b) for r, b in self._pending_reports if not r.Test()]
        buf = np.frombuffer(data, dtype=np.uint8).copy()
        self._pending_reports.append((self.comm.Isend(buf, dest=0, tag=REPORT_TAG), buf))

    def poll_reports(self) -> list[bytes]:
        from mpi4py import MPI

        out = []
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=REPORT_TAG, status=status):
            n, source = status.Get_count(MPI.BYTE), status.Get_source()
            buf = np.empty(max(n, 0), dtype=np.uint8)
            self.comm.Recv(buf, source=source, tag=REPORT_TAG)
            if 0 < n <= MAX_REPORT_BYTES:
                out.append(buf.tobytes())
        return out

    def failed_ranks(self) -> list[int]:
        """Ranks MPI knows to have died (needs mpirun --with-ft ulfm, which the launcher passes)."""
        from mpi4py import MPI

        try:
            group = self.comm.Get_failed()
            world = self.comm.Get_group()
            return sorted(
                r for r in MPI.Group.Translate_ranks(group, list(range(group.Get_size())), world) if r >= 0
            )
        except Exception:  # no ULFM support in this MPI, or nothing failed
            return []

    def close(self, last_seq: int, timeout: float = 5.0) -> None:
        """Leave no point-to-point request pending: MPI_Finalize (at exit) refuses to end cleanly otherwise."""
        deadline = time.monotonic() + timeout
        if self.rank == 0:
            self.await_acks(last_seq, timeout)
            self.poll_reports()
            for req in self._ack_reqs.values():
                if req is not None:
                    req.Cancel()
                    req.Wait()
            self._ack_reqs.clear()
        else:
            while (self._pending_acks or self._pending_reports) and time.monotonic() < deadline:
                self._pending_acks = [(r, b) for r, b in self._pending_acks if not r.Test()]
                self._pending_reports = [(r, b) for r, b in self._pending_reports if not r.Test()]
                time.sleep(0.001)

    def send_to_leader(self, data: bytes, tag: int) -> None:
        """A follower's blocking reply to rank 0 (length, then bytes)."""
        self.comm.Send(np.array([len(data)], dtype=np.int64), dest=0, tag=tag)
        self.comm.Send(np.frombuffer(data, dtype=np.uint8), dest=0, tag=tag)

    def recv_from_followers(self, tag: int, max_bytes: int) -> list[bytes]:
        """Rank 0: one reply from every follower, in rank order; oversize replies are a bus error."""
        out = []
        for r in range(1, self.size):
            n = np.zeros(1, dtype=np.int64)
            self.comm.Recv(n, source=r, tag=tag)
            if not 0 <= n[0] <= max_bytes:
                from cluster.errors import BusMessageTooLarge

                raise BusMessageTooLarge(f"rank {r} announced a {int(n[0])}-byte reply (limit {max_bytes})")
            buf = np.empty(int(n[0]), dtype=np.uint8)
            self.comm.Recv(buf, source=r, tag=tag)
            out.append(buf.tobytes())
        return out
