"""The control bus: one versioned msgpack envelope for both directions, bounded both ways, no pickle.

Envelope: ``[PROTOCOL_VERSION, seq, message]``. Rank 0 numbers its broadcasts 1, 2, ...; a follower's
reply or report carries the number of the last broadcast it received, so rank 0 can tell an answer to
an older message from one to the current. The sender refuses to send an oversize message; a receiver
refuses oversize bytes before decoding them. Every failure is a `BusError` subclass, which the rank
loops treat as fatal for the job (see DESIGN.md: ranks that disagree about state produce garbage).

`ControlBus` is the whole API of the bus for both roles; only it touches a `Transport`, which moves
bytes and nothing else (rank/transport.py: MPI, or nothing for a single rank).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, TypeVar

import msgpack

from cluster.errors import BusDecodeError, BusMessageTooLarge, BusVersionMismatch
from cluster.messages import (
    BROADCAST_TYPES,
    MESSAGE_TYPES,
    BusMessage,
    Message,
    RankReport,
    Reply,
    SsdMissing,
    StepPlan,
)

# 6: LoRA adapters (Admit.adapter, StepPlan.adapter_load / adapter_unload); 7: PrefillChunk.prompt_logprobs
PROTOCOL_VERSION = 12  # 9: StepPlan.argmax; 10: StepPlan.chained; 11: StepPlan.topk; 12: StepPlan.draws
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

R = TypeVar("R", bound=Reply)
C = TypeVar("C", bound=SsdMissing)  # the replies sent in chunks


@dataclass(slots=True, frozen=True)
class Envelope:
    seq: int
    message: Message


class BusCodec:
    """Encodes and decodes envelopes with a byte limit applied on both sides."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 64:
            raise ValueError("max_message_bytes must be at least 64")
        self.max_message_bytes = max_message_bytes

    def encode(self, seq: int, message: Message) -> bytes:
        data: bytes = msgpack.packb([PROTOCOL_VERSION, seq, message.to_wire()], use_bin_type=True)
        if len(data) > self.max_message_bytes:
            raise BusMessageTooLarge(
                f"bus message {type(message).__name__} is {len(data)} bytes, over the limit of "
                f"{self.max_message_bytes} (raise --bus-max-bytes or lower --max-prompt-tokens)"
            )
        return data

    def decode(self, data: bytes) -> Envelope:
        if len(data) > self.max_message_bytes:
            raise BusMessageTooLarge(
                f"received a {len(data)}-byte bus message, over the limit of {self.max_message_bytes}"
            )
        try:
            raw = msgpack.unpackb(data, use_list=True, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise BusDecodeError(f"undecodable bus message ({type(exc).__name__}: {exc})") from exc
        if not isinstance(raw, list) or len(raw) != 3:
            raise BusDecodeError("bus envelope is not a 3-element array")
        version, seq, body = raw
        if version != PROTOCOL_VERSION:
            raise BusVersionMismatch(
                f"bus protocol version {version!r} received, this rank speaks {PROTOCOL_VERSION}: "
                "run the same Orchard version on every host"
            )
        if type(seq) is not int:
            raise BusDecodeError("bus envelope sequence number is not an integer")
        if not isinstance(body, list) or not body or type(body[0]) is not int:
            raise BusDecodeError("bus message has no kind tag")
        kind = MESSAGE_TYPES.get(body[0])
        if kind is None:
            raise BusDecodeError(f"unknown bus message kind {body[0]}")
        try:
            message = kind.from_wire(body)
        except BusDecodeError:
            raise
        except (TypeError, ValueError) as exc:
            raise BusDecodeError(f"malformed {kind.__name__} on the bus: {exc}") from exc
        return Envelope(seq=seq, message=message)


class Channel(enum.IntEnum):
    """The follower-to-rank-0 streams besides acknowledgements; each is ordered on its own."""

    REPLY = 1  # answers rank 0 waits for, in protocol order; the follower's send completes before it goes on
    REPORT = 2  # health reports: posted without waiting, polled by rank 0 between steps


class Transport(Protocol):
    """Bytes only: framing, types, sizes and sequence checks are the `ControlBus`'s."""

    rank: int
    size: int

    def broadcast(self, data: bytes) -> None:
        """Rank 0: `data` to every follower."""

    def receive(self, max_bytes: int, expect_soon: bool = False) -> bytes:
        """A follower: the next broadcast, waiting without burning a core; oversize is a BusError."""
        ...

    def acknowledge(self, seq: int) -> None:
        """A follower: tell rank 0 it has broadcast `seq`, without waiting."""

    def await_acks(self, seq: int, timeout: float, acked: dict[int, int]) -> None:
        """Rank 0: wait up to `timeout` until every follower acknowledged `seq`, recording in `acked`
        each follower's newest acknowledgement as it arrives (another thread may read it meanwhile)."""

    def send(self, channel: Channel, data: bytes) -> None:
        """A follower: `data` to rank 0 on `channel` (see `Channel` for which ones wait)."""

    def recv(self, channel: Channel, source: int, max_bytes: int) -> bytes:
        """Rank 0: the next message from follower `source` on `channel`, waiting for it; oversize is a
        BusError."""
        ...

    def poll(self, channel: Channel) -> list[tuple[int, bytes]]:
        """Rank 0: every (source, bytes) waiting on `channel`, without waiting; sizes are not checked."""
        ...

    def failed_ranks(self) -> list[int]:
        """Ranks the transport knows to have died."""
        ...

    def abort(self, code: int) -> None:
        """End every rank of the job now with exit status `code`."""

    def close(self) -> None:
        """After the last message, once rank 0 has every acknowledgement of it: settle what is still in
        flight so every rank can finalize."""


class ControlBus:
    """Rank 0 broadcasts in one numbered sequence (a gap is fatal) and gathers typed replies; followers
    receive, reply and report. Every message on either side goes through one `BusCodec`."""

    def __init__(self, transport: Transport, codec: BusCodec | None = None) -> None:
        self._transport = transport
        self.codec = codec or BusCodec()
        self._seq = 0
        self.bytes_sent = 0
        self._busy = False  # the last message was a step: the next one is probably close
        # Rank 0: the newest message each follower acknowledged (read by the watchdog thread too).
        self._acked = dict.fromkeys(range(1, transport.size), 0) if transport.rank == 0 else {}

    @property
    def rank(self) -> int:
        return self._transport.rank

    @property
    def size(self) -> int:
        return self._transport.size

    @property
    def max_message_bytes(self) -> int:
        return self.codec.max_message_bytes

    # -- rank 0 ------------------------------------------------------------------------------------
    def send(self, message: BusMessage) -> None:
        self._seq += 1
        data = self.codec.encode(self._seq, message)
        if self.size > 1:
            self._transport.broadcast(data)
            self.bytes_sent += len(data)

    def await_acks(self, timeout: float) -> list[int]:
        """Ranks that have not received the last message sent within `timeout` seconds."""
        if self.size == 1:
            return []
        self._transport.await_acks(self._seq, timeout, self._acked)
        return [r for r, got in sorted(self._acked.items()) if got < self._seq]

    def last_acks(self) -> dict[int, int]:
        """Follower rank -> the newest message it acknowledged (safe from another thread)."""
        return dict(self._acked)

    def gather(self, kind: type[R]) -> list[R]:
        """One `kind` reply from every follower, in rank order, answering the last message sent."""
        return [self._recv_reply(r, kind) for r in range(1, self.size)]

    def gather_chunks(self, kind: type[C]) -> list[list[C]]:
        """Every follower's answer sent in chunks (`more` on all but the last), in rank order."""
        out = []
        for r in range(1, self.size):
            chunks = [self._recv_reply(r, kind)]
            while chunks[-1].more:
                chunks.append(self._recv_reply(r, kind))
            out.append(chunks)
        return out

    def poll_reports(self) -> list[RankReport]:
        """Health reports that have arrived, without waiting. A report rank 0 cannot read (oversize,
        malformed) is a BusError: it carries SSD write results the tier's accounting depends on."""
        out = []
        for source, data in self._transport.poll(Channel.REPORT):
            if len(data) > self.codec.max_message_bytes:
                raise BusMessageTooLarge(
                    f"rank {source} sent a {len(data)}-byte health report, over the bus limit of "
                    f"{self.codec.max_message_bytes}"
                )
            message = self.codec.decode(data).message
            if not isinstance(message, RankReport) or message.rank != source:
                raise BusDecodeError(f"rank {source} sent {type(message).__name__} as its health report")
            out.append(message)
        return out

    def failed_ranks(self) -> list[int]:
        """Ranks the transport knows to have died (MPI ULFM); empty for a single rank."""
        return self._transport.failed_ranks() if self.size > 1 else []

    # -- followers ---------------------------------------------------------------------------------
    def receive(self) -> BusMessage:
        data = self._transport.receive(self.codec.max_message_bytes, expect_soon=self._busy)
        envelope = self.codec.decode(data)
        if envelope.seq != self._seq + 1:
            raise BusDecodeError(
                f"bus message {envelope.seq} arrived, expected {self._seq + 1}: ranks out of step"
            )
        message = envelope.message
        if not isinstance(message, BROADCAST_TYPES):
            raise BusDecodeError(f"rank 0 broadcast {type(message).__name__}, which only followers send")
        self._seq = envelope.seq
        self._transport.acknowledge(self._seq)
        self._busy = isinstance(message, StepPlan)
        return message

    def reply(self, message: Reply) -> None:
        """Answer the last message received; returns once the transport has taken the bytes."""
        self._transport.send(Channel.REPLY, self.codec.encode(self._seq, message))

    def report(self, report: RankReport) -> None:
        """Post a health report without waiting (split into several when it would not fit the limit)."""
        for part in report.chunks(self.codec.max_message_bytes):
            self._transport.send(Channel.REPORT, self.codec.encode(self._seq, part))

    # -- both --------------------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """After the last message (Shutdown): settle the acknowledgements so every rank can finalize MPI."""
        if self.rank == 0 and self.size > 1:
            self._transport.await_acks(self._seq, timeout, self._acked)
        self._transport.close()

    def abort(self, code: int) -> None:
        """End the whole job now (every rank) with exit status `code`."""
        self._transport.abort(code)

    def _recv_reply(self, source: int, kind: type[R]) -> R:
        envelope = self.codec.decode(
            self._transport.recv(Channel.REPLY, source, self.codec.max_message_bytes)
        )
        message = envelope.message
        if not isinstance(message, kind):
            raise BusDecodeError(
                f"rank {source} sent {type(message).__name__} where rank 0 expected {kind.__name__}"
            )
        if envelope.seq != self._seq:
            raise BusDecodeError(
                f"rank {source} answered bus message {envelope.seq}, expected an answer to {self._seq}: "
                "ranks out of step"
            )
        return message
