"""The control-bus codec: one versioned msgpack envelope, bounded both ways, no pickle.

Envelope: ``[PROTOCOL_VERSION, seq, message]``. The sender refuses to send an oversize message; a
receiver refuses oversize bytes before decoding them. Every failure is a `BusError` subclass, which the
rank loops treat as fatal for the job (see DESIGN.md: ranks that disagree about state produce garbage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import msgpack

from cluster.errors import BusDecodeError, BusMessageTooLarge, BusVersionMismatch
from cluster.messages import MESSAGE_TYPES, BusMessage, StepPlan

PROTOCOL_VERSION = 3
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(slots=True, frozen=True)
class Envelope:
    seq: int
    message: BusMessage


class BusCodec:
    """Encodes and decodes envelopes with a byte limit applied on both sides."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 64:
            raise ValueError("max_message_bytes must be at least 64")
        self.max_message_bytes = max_message_bytes

    def encode(self, seq: int, message: BusMessage) -> bytes:
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
            raw = msgpack.unpackb(
                data,
                use_list=True,
                raw=False,
                strict_map_key=True,
            )
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


class Transport(Protocol):
    rank: int
    size: int

    def broadcast(self, data: bytes) -> None: ...

    def receive(self, max_bytes: int, expect_soon: bool = False) -> bytes: ...

    def abort(self, code: int) -> None: ...

    def acknowledge(self, seq: int) -> None: ...

    def await_acks(self, seq: int, timeout: float) -> list[int]: ...

    def send_to_leader(self, data: bytes, tag: int) -> None: ...

    def recv_from_followers(self, tag: int, max_bytes: int) -> list[bytes]: ...

    def close(self, last_seq: int) -> None: ...

    def failed_ranks(self) -> list[int]: ...

    def send_report(self, data: bytes) -> None: ...

    def poll_reports(self) -> list[bytes]: ...


class ControlBus:
    """Rank 0 sends, every other rank receives, in one sequence; a gap in it is fatal."""

    def __init__(self, transport: Transport, codec: BusCodec | None = None) -> None:
        self.transport = transport
        self.codec = codec or BusCodec()
        self._seq = 0
        self.bytes_sent = 0
        self._busy = False  # the last message was a step: the next one is probably close

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def size(self) -> int:
        return self.transport.size

    def send(self, message: BusMessage) -> None:
        self._seq += 1
        data = self.codec.encode(self._seq, message)
        if self.transport.size > 1:
            self.transport.broadcast(data)
            self.bytes_sent += len(data)

    def receive(self) -> BusMessage:
        data = self.transport.receive(self.codec.max_message_bytes, expect_soon=self._busy)
        envelope = self.codec.decode(data)
        if envelope.seq != self._seq + 1:
            raise BusDecodeError(
                f"bus message {envelope.seq} arrived, expected {self._seq + 1}: ranks out of step"
            )
        self._seq = envelope.seq
        self.transport.acknowledge(self._seq)
        self._busy = isinstance(envelope.message, StepPlan)
        return envelope.message

    def close(self) -> None:
        """After the last message (Shutdown): settle the acknowledgements so every rank can finalize MPI."""
        self.transport.close(self._seq)

    def await_acks(self, timeout: float) -> list[int]:
        """Ranks that have not received the last message sent within `timeout` seconds (rank 0)."""
        if self.transport.size == 1:
            return []
        return self.transport.await_acks(self._seq, timeout)
