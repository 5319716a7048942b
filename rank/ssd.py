"""This rank's SSD tier: its slice of each block in its own file, written off the step loop.

File `<hash>.kv`: `ORKV3\\n`, the SHA-256 (hex) of everything after that line, then one JSON header line
(format version, hash, the block's KV format (rank.kvquant: `kv16`, `q8g64`, ...), each stored array's
dtype and shape, payload size) and the arrays' raw bytes in order: keys and values, or for a quantized
format each as (packed, scales, biases). A file of another version or KV format is refused: a block is
never read as a format it was not written in (the format also names the job's folder). The header is parsed only once
the checksum holds, so a damaged or planted file is never interpreted. Written to a fresh temporary name
(created exclusively, never through a symlink), fsynced, renamed, directory fsynced: a crash leaves
either the whole file or none. Reads do not follow symlinks and refuse a file larger than a block; every
load re-checks size and checksum, and a damaged file is deleted, never used. No pickle.

The writer thread does file I/O only (no MPI, no MLX): the engine thread hands it bytes through a queue
bounded in bytes. When the disk falls that far behind (stalled, dying), a save is dropped at once rather
than waited for: the engine thread must never block on a disk (the step watchdog would stop the job).
A dropped block is simply not persisted; rank 0 learns it from the write outcomes and never lists it.

One job per folder: a lock file is held for the store's life (two jobs would delete each other's files).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import queue
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from cluster.errors import ConfigError

log = logging.getLogger("orchard.ssd")
MAGIC = b"ORKV3\n"
FORMAT_VERSION = 3
DIGEST_HEX = 64
MAX_HEADER = 4096
PREFIX_BYTES = len(MAGIC) + DIGEST_HEX + 1 + MAX_HEADER + 1  # everything of a file but the payload, at most
MAX_FILE_BYTES = 1 << 30  # the cap while the block size is not known: no block of any model is this large
DEFAULT_QUEUE_BYTES = 256 << 20
LOCK_NAME = "orchard.lock"
_BLOCK_FILE = re.compile(r"[0-9a-f]{32}\.kv")
_TEMP_FILE = re.compile(r"\.[0-9a-f]{32}\.[0-9a-f]{16}\.tmp|[0-9a-f]{32}\.tmp\d+")  # ours, and older writers'
_DTYPES = {name: getattr(mx, name) for name in ("float16", "bfloat16", "float32", "uint32")}
_DROP_WARNING_SECONDS = 30.0
WriteAll = Callable[[int, bytes], None]  # writes every byte to a file descriptor (a seam for tests)


@dataclass(slots=True)
class SsdCounters:
    write_bytes: int = 0
    read_bytes: int = 0
    write_seconds: float = 0.0
    read_seconds: float = 0.0
    writes: int = 0
    reads: int = 0
    corrupt: int = 0
    errors: int = 0
    dropped: int = 0  # saves refused because the writer queue was full


@dataclass(slots=True)
class WriteOutcomes:
    """What became of the saves since the last take: finished writes (ok, or an I/O error) and saves
    dropped before any write because the disk was too far behind (not an error of the disk's contents)."""

    written: list[tuple[bytes, bool]] = field(default_factory=list)
    dropped: list[bytes] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class _Save:
    hex_hash: str
    header: bytes  # the JSON header line, newline included
    payload: bytes


def _to_bytes(x: mx.array) -> bytes:
    return bytes(np.asarray(x.reshape(-1).view(mx.uint8)))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _lock_folder(directory: Path) -> int | None:
    """An exclusive lock on the folder for this process's life (released by the kernel if it dies)."""
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the SSD tier's lock file {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"the SSD tier folder {directory} is in use by another Orchard job ({holder}); two jobs must "
            "not share one: stop that job, give this one its own --kv-ssd-dir, or turn the tier off with "
            "--kv-ssd-dir none"
        ) from None
    except OSError as exc:  # a file system without locks (some network mounts)
        os.close(fd)
        log.warning(
            "cannot lock the SSD tier folder %s (%s): nothing keeps a second job from using it at the same "
            "time; prefer a folder on a local disk",
            directory,
            exc,
        )
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


ArraySpec = tuple[str, tuple[int, ...]]  # (dtype name, shape) of one stored array


def decode_block(data: bytes, h: bytes, kv_format: str = "kv16") -> tuple[list[ArraySpec], memoryview]:
    """(array specs, payload) of a block file's bytes; ValueError when they are not block `h`'s in
    `kv_format`. The checksum is verified before anything else is read."""
    end = len(MAGIC) + DIGEST_HEX
    if not data.startswith(MAGIC):
        raise ValueError("bad magic (not an Orchard KV block file, or an older format)")
    if len(data) <= end or data[end : end + 1] != b"\n":
        raise ValueError("truncated")
    body = memoryview(data)[end + 1 :]
    if not hmac.compare_digest(hashlib.sha256(body).hexdigest().encode(), data[len(MAGIC) : end]):
        raise ValueError("checksum mismatch")
    stop = data.find(b"\n", end + 1, end + 2 + MAX_HEADER)
    if stop < 0:
        raise ValueError("no header line")
    header = json.loads(data[end + 1 : stop])
    payload = memoryview(data)[stop + 1 :]
    if not isinstance(header, dict) or header.get("hash") != h.hex():
        raise ValueError("misnamed (the header names another block)")
    if header.get("version") != FORMAT_VERSION or header.get("format") != kv_format:
        raise ValueError(f"KV format {header.get('format')!r}, not this job's {kv_format!r}")
    arrays = header.get("arrays")
    if not isinstance(arrays, list) or not arrays or not all(_spec_ok(a) for a in arrays):
        raise ValueError("unusable header")
    specs = [(str(a[0]), tuple(a[1])) for a in arrays]
    size = sum(math.prod(shape) * _DTYPES[dtype].size for dtype, shape in specs)
    if header.get("payload") != len(payload) or size != len(payload):
        raise ValueError("payload size does not match its header")
    return specs, payload


def _spec_ok(a: object) -> bool:
    return (
        isinstance(a, list)
        and len(a) == 2
        and a[0] in _DTYPES
        and isinstance(a[1], list)
        and all(type(d) is int and d >= 0 for d in a[1])
    )


class SsdBlockStore:
    def __init__(
        self,
        directory: Path,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        block_bytes: int | None = None,
        write_all: WriteAll = _write_all,
        kv_format: str = "kv16",
    ) -> None:
        """`queue_bytes`: most bytes waiting for (or in) a write before saves are dropped; `block_bytes`:
        one block's payload on this rank, when known (caps reads; else `MAX_FILE_BYTES` does);
        `kv_format`: the blocks' format name (rank.kvquant), written in and required of every file."""
        self.dir = directory
        self.kv_format = kv_format
        self.dir.mkdir(parents=True, exist_ok=True)
        self.queue_bytes = queue_bytes
        self.block_bytes = block_bytes
        self.counters = SsdCounters()
        self._lock_fd = _lock_folder(self.dir)
        self._write_all = write_all
        self._queue: queue.SimpleQueue[_Save | None] = queue.SimpleQueue()
        self._queued = 0  # payload bytes handed to the writer and not written yet (the one in hand too)
        self._outcomes = WriteOutcomes()
        self._lock = threading.Lock()
        self._last_drop_warning = -_DROP_WARNING_SECONDS
        self._thread = threading.Thread(target=self._writer, name="ssd-writer", daemon=True)
        self._thread.start()

    def path(self, hex_hash: str) -> Path:
        return self.dir / f"{hex_hash}.kv"

    @property
    def max_file_bytes(self) -> int:
        return PREFIX_BYTES + self.block_bytes if self.block_bytes else MAX_FILE_BYTES

    @property
    def queued_bytes(self) -> int:
        with self._lock:
            return self._queued

    # -- engine thread ---------------------------------------------------------------------------
    def save(self, h: bytes, *arrays: mx.array) -> bool:
        """Queue the block's write (its stored arrays: keys and values, or their quantized parts); False
        when it was dropped (the writer is `queue_bytes` behind). One block is always accepted into an
        empty queue, whatever its size, so a tiny bound still writes."""
        size = sum(a.nbytes for a in arrays)
        with self._lock:
            drop = self._queued > 0 and self._queued + size > self.queue_bytes
            if drop:
                self._outcomes.dropped.append(h)
                self.counters.dropped += 1
            else:
                self._queued += size
        if drop:
            now = time.monotonic()
            if now - self._last_drop_warning >= _DROP_WARNING_SECONDS:
                self._last_drop_warning = now
                log.warning(
                    "SSD tier %s: the disk is %d MiB of writes behind (--kv-ssd-queue-mb): dropping saves "
                    "(%d so far); those blocks stay in RAM only",
                    self.dir,
                    self.queued_bytes >> 20,
                    self.counters.dropped,
                )
            return False
        payload = b"".join(_to_bytes(a) for a in arrays)
        header = {
            "version": FORMAT_VERSION,
            "hash": h.hex(),
            "format": self.kv_format,
            "arrays": [[str(a.dtype).split(".")[-1], list(a.shape)] for a in arrays],
            "payload": len(payload),
        }
        self._queue.put(_Save(h.hex(), json.dumps(header).encode() + b"\n", payload))
        return True

    def load(self, h: bytes) -> tuple[mx.array, ...] | None:
        """The block's arrays as saved, or None (missing, oversize, not a plain file, truncated, corrupt
        or of another KV format: such a file is deleted)."""
        path = self.path(h.hex())
        start = time.perf_counter()
        try:
            data = self._read(path)
            specs, payload = decode_block(data, h, self.kv_format)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a symlink (ELOOP), a folder, an unreadable file: not ours to delete
            self.counters.corrupt += 1
            log.warning("refusing KV block file %s: %s", path.name, exc)
            return None
        except (ValueError, KeyError, TypeError) as exc:
            self.counters.corrupt += 1
            log.warning("dropping damaged KV block file %s: %s", path.name, exc)
            path.unlink(missing_ok=True)
            return None
        arrays, at = [], 0
        for dtype, shape in specs:
            n = math.prod(shape) * _DTYPES[dtype].size
            raw = np.frombuffer(payload[at : at + n], dtype=np.uint8)
            arrays.append(mx.array(raw).view(_DTYPES[dtype]).reshape(shape))
            at += n
        self.counters.reads += 1
        self.counters.read_bytes += len(data)
        self.counters.read_seconds += time.perf_counter() - start
        return tuple(arrays)

    def _read(self, path: Path) -> bytes:
        """The file's bytes, never through a symlink and never more than a block file can hold."""
        # O_NONBLOCK: a FIFO planted under a block's name must not hang the engine thread in open()
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            cap = self.max_file_bytes
            if st.st_size > cap:
                raise ValueError(f"{st.st_size} bytes, over the {cap} a block file can have")
            parts, left = [], cap + 1
            while left > 0 and (part := os.read(fd, min(left, 1 << 24))):
                parts.append(part)
                left -= len(part)
        finally:
            os.close(fd)
        if left <= 0:
            raise ValueError(f"grew past the {cap} bytes a block file can have")
        return b"".join(parts)

    def delete(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self.path(h.hex()).unlink(missing_ok=True)

    def keep_only(self, wanted: set[bytes]) -> list[bytes]:
        """Start-up: delete block files the manifest does not list and temporary files of interrupted
        writes; return listed hashes whose file is absent, not a plain file or of an impossible size
        (cheap checks; the checksum is verified at every load). Anything else is left alone, with a
        warning: the folder may hold what someone put there."""
        present: set[str] = set()
        unknown: list[str] = []
        with os.scandir(self.dir) as entries:
            for entry in entries:
                name, plain = entry.name, entry.is_file(follow_symlinks=False)
                if name == LOCK_NAME and plain:
                    continue
                if _TEMP_FILE.fullmatch(name) and plain:
                    os.unlink(entry.path)
                    continue
                if not _BLOCK_FILE.fullmatch(name) or not plain:
                    unknown.append(name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
                    continue
                size = entry.stat(follow_symlinks=False).st_size
                if bytes.fromhex(name[:32]) not in wanted or not len(MAGIC) < size <= self.max_file_bytes:
                    os.unlink(entry.path)
                    continue
                present.add(name[:32])
        if unknown:
            shown = ", ".join(sorted(unknown)[:5]) + (", ..." if len(unknown) > 5 else "")
            log.warning(
                "SSD tier %s: skipping %d unknown entries (left as they are): %s",
                self.dir,
                len(unknown),
                shown,
            )
        return [h for h in wanted if h.hex() not in present]

    def take_outcomes(self) -> WriteOutcomes:
        with self._lock:
            out, self._outcomes = self._outcomes, WriteOutcomes()
        return out

    def take_results(self) -> list[tuple[bytes, bool]]:
        """Finished writes as (hash, ok). A dropped save shows as a failed write here (which makes rank 0
        disable the tier); callers that report drops apart use `take_outcomes`."""
        out = self.take_outcomes()
        return out.written + [(h, False) for h in out.dropped]

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the folder's lock
            self._lock_fd = None

    # -- writer thread ---------------------------------------------------------------------------
    def _writer(self) -> None:
        while (item := self._queue.get()) is not None:
            ok = self._write(item)
            with self._lock:
                self._outcomes.written.append((bytes.fromhex(item.hex_hash), ok))
                self._queued -= len(item.payload)

    def _write(self, item: _Save) -> bool:
        final = self.path(item.hex_hash)
        tmp = self.dir / f".{item.hex_hash}.{secrets.token_hex(8)}.tmp"
        digest = hashlib.sha256(item.header)
        digest.update(item.payload)
        start = time.perf_counter()
        created = False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            created = True
            try:
                self._write_all(fd, MAGIC + digest.hexdigest().encode() + b"\n" + item.header)
                self._write_all(fd, item.payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            created = False
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.counters.errors += 1
            log.warning("SSD tier write failed (%s): %s", final.name, exc)
            if created:
                tmp.unlink(missing_ok=True)
            return False
        self.counters.writes += 1
        self.counters.write_bytes += len(item.payload)
        self.counters.write_seconds += time.perf_counter() - start
        return True
