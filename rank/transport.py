"""Byte transports for the control bus: MPI broadcast from rank 0, or nothing for a single rank.

Followers wait in a non-blocking broadcast and poll it: a blocking MPI collective busy-polls a whole core
(Open MPI), which an idle cluster must not do. They spin for a short window after each message (steps
arrive back to back while serving) and then back off to sleeping, up to `max_sleep`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from cluster.bus import Channel
from cluster.errors import BusMessageTooLarge

# Point-to-point streams on the job's own communicator: acknowledgements, and the bus's channels.
_ACK_TAG = 77
_TAGS = {Channel.REPLY: 78, Channel.REPORT: 79}


class LocalTransport:
    """World size 1: there is nobody to tell."""

    rank = 0
    size = 1

    def broadcast(self, data: bytes) -> None:
        return None

    def receive(self, max_bytes: int, expect_soon: bool = False) -> bytes:  # pragma: no cover - never called
        raise RuntimeError("a single-rank job has no followers")

    def acknowledge(self, seq: int) -> None:  # pragma: no cover - a single rank never receives
        return None

    def await_acks(self, seq: int, timeout: float, acked: dict[int, int]) -> None:
        return None

    def send(self, channel: Channel, data: bytes) -> None:  # pragma: no cover - rank 0 has no leader
        raise RuntimeError("a single-rank job has no leader to answer")

    def recv(self, channel: Channel, source: int, max_bytes: int) -> bytes:  # pragma: no cover - never called
        raise RuntimeError("a single-rank job has no followers")

    def poll(self, channel: Channel) -> list[tuple[int, bytes]]:
        return []

    def failed_ranks(self) -> list[int]:
        return []

    def abort(self, code: int) -> None:
        raise SystemExit(code)

    def close(self) -> None:
        return None


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
        self._pending: list[tuple[Any, np.ndarray]] = []  # follower: in-flight Isends and their buffers
        self._ack_bufs = {r: np.full(1, -1, dtype=np.int64) for r in range(1, self.size)}
        self._ack_reqs: dict[int, Any] = {}

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
        self._post(np.array([seq], dtype=np.int64), _ACK_TAG)

    def _poll_acks(self, acked: dict[int, int]) -> None:
        for r, buf in self._ack_bufs.items():
            req = self._ack_reqs.get(r)
            while True:
                if req is None:
                    req = self._ack_reqs[r] = self.comm.Irecv(buf, source=r, tag=_ACK_TAG)
                if not req.Test():
                    break
                acked[r] = int(buf[0])
                req = self._ack_reqs[r] = None

    def await_acks(self, seq: int, timeout: float, acked: dict[int, int]) -> None:
        """Wait until every follower has received message `seq` or `timeout` passes."""
        deadline = time.monotonic() + timeout
        spin_until = time.monotonic() + 0.005
        while True:
            self._poll_acks(acked)
            if all(got >= seq for got in acked.values()) or time.monotonic() > deadline:
                return
            if time.monotonic() > spin_until:
                time.sleep(0.0005)

    # -- followers to rank 0 ------------------------------------------------------------------------
    def send(self, channel: Channel, data: bytes) -> None:
        buf = np.frombuffer(data, dtype=np.uint8)
        if channel is Channel.REPORT:
            self._post(buf.copy(), _TAGS[channel])
        else:
            self.comm.Send(buf, dest=0, tag=_TAGS[channel])

    def _post(self, buf: np.ndarray, tag: int) -> None:
        """Send without waiting; the buffer lives until MPI is done with it."""
        self._pending = [(r, b) for r, b in self._pending if not r.Test()]
        self._pending.append((self.comm.Isend(buf, dest=0, tag=tag), buf))

    def recv(self, channel: Channel, source: int, max_bytes: int) -> bytes:
        """Rank 0: the next message from `source` on `channel`; its size is checked before receiving."""
        from mpi4py import MPI

        status = MPI.Status()
        self.comm.Probe(source=source, tag=_TAGS[channel], status=status)
        n = status.Get_count(MPI.BYTE)
        if not 0 <= n <= max_bytes:
            raise BusMessageTooLarge(f"rank {source} sent a {n}-byte reply, over the limit of {max_bytes}")
        buf = np.empty(n, dtype=np.uint8)
        self.comm.Recv(buf, source=source, tag=_TAGS[channel])
        return buf.tobytes()

    def poll(self, channel: Channel) -> list[tuple[int, bytes]]:
        """Everything waiting on `channel`, whatever its size (it has to be received to be cleared)."""
        from mpi4py import MPI

        out = []
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAGS[channel], status=status):
            n, source = status.Get_count(MPI.BYTE), status.Get_source()
            buf = np.empty(max(n, 0), dtype=np.uint8)
            self.comm.Recv(buf, source=source, tag=_TAGS[channel])
            out.append((source, buf.tobytes()))
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

    def close(self, timeout: float = 5.0) -> None:
        """Leave no point-to-point request pending: MPI_Finalize (at exit) refuses to end cleanly otherwise.
        Rank 0 calls it once every follower acknowledged the last message (`ControlBus.close`)."""
        deadline = time.monotonic() + timeout
        if self.rank == 0:
            self.poll(Channel.REPORT)  # the last reports of a job that is ending
            for req in self._ack_reqs.values():
                if req is not None:
                    req.Cancel()
                    req.Wait()
            self._ack_reqs.clear()
        else:
            while self._pending and time.monotonic() < deadline:
                self._pending = [(r, b) for r, b in self._pending if not r.Test()]
                time.sleep(0.001)
