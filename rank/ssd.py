"""This rank's SSD tier: its slice of each block in its own file, written off the step loop.

File: `ORKV1\\n`, one JSON header line (hash, dtype, shape, payload size, SHA-256 of the payload), then
the keys' and values' raw bytes. Written to a temporary name, fsynced, renamed, directory fsynced: a
crash leaves either the whole file or none. Every load re-checks size and checksum, so flipped bits or a
truncated file are found and the block is refused (and deleted), never used. No pickle.
The writer thread does file I/O only (no MPI, no MLX): the engine thread hands it bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

log = logging.getLogger("orchard.ssd")
MAGIC = b"ORKV1\n"
MAX_HEADER = 4096


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


def _to_bytes(x: mx.array) -> bytes:
    return bytes(np.asarray(x.reshape(-1).view(mx.uint8)))


class SsdBlockStore:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.counters = SsdCounters()
        self._queue: queue.Queue[tuple[str, bytes, dict] | None] = queue.Queue()
        self._results: list[tuple[bytes, bool]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._writer, name="ssd-writer", daemon=True)
        self._thread.start()

    def path(self, hex_hash: str) -> Path:
        return self.dir / f"{hex_hash}.kv"

    # -- engine thread ---------------------------------------------------------------------------
    def save(self, h: bytes, keys: mx.array, values: mx.array) -> None:
        payload = _to_bytes(keys) + _to_bytes(values)
        header = {
            "hash": h.hex(),
            "dtype": str(keys.dtype).split(".")[-1],
            "shape": list(keys.shape),
            "payload": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        self._queue.put((h.hex(), payload, header))

    def load(self, h: bytes) -> tuple[mx.array, mx.array] | None:
        """The block's arrays, or None (missing, truncated or corrupt: a damaged file is deleted)."""
        path = self.path(h.hex())
        start = time.perf_counter()
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            if not data.startswith(MAGIC):
                raise ValueError("bad magic")
            end = data.index(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
            header = json.loads(data[len(MAGIC) : end])
            payload = data[end + 1 :]
            if header["hash"] != h.hex() or len(payload) != header["payload"]:
                raise ValueError("truncated or misnamed")
            if hashlib.sha256(payload).hexdigest() != header["sha256"]:
                raise ValueError("checksum mismatch")
            dtype = getattr(mx, header["dtype"])
            shape = tuple(int(d) for d in header["shape"])
            half = len(payload) // 2
            arrays = [
                mx.array(np.frombuffer(payload[i : i + half], dtype=np.uint8)).view(dtype).reshape(shape)
                for i in (0, half)
            ]
        except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            self.counters.corrupt += 1
            log.warning("dropping damaged KV block file %s: %s", path.name, exc)
            path.unlink(missing_ok=True)
            return None
        self.counters.reads += 1
        self.counters.read_bytes += len(data)
        self.counters.read_seconds += time.perf_counter() - start
        return arrays[0], arrays[1]

    def delete(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self.path(h.hex()).unlink(missing_ok=True)

    def keep_only(self, wanted: set[bytes]) -> list[bytes]:
        """Start-up: delete files the manifest does not list; return listed hashes whose file is absent
        or has the wrong size (cheap checks; the checksum is verified at every load)."""
        present: dict[str, int] = {}
        for f in self.dir.glob("*"):
            if f.suffix != ".kv" or len(f.stem) != 32:
                f.unlink(missing_ok=True)  # temporary files of interrupted writes, strangers
                continue
            if bytes.fromhex(f.stem) not in wanted:
                f.unlink(missing_ok=True)
                continue
            present[f.stem] = f.stat().st_size
        return [h for h in wanted if present.get(h.hex(), 0) <= len(MAGIC)]

    def take_results(self) -> list[tuple[bytes, bool]]:
        with self._lock:
            out, self._results = self._results, []
        return out

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- writer thread ---------------------------------------------------------------------------
    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            hex_hash, payload, header = item
            ok = self._write(hex_hash, payload, header)
            with self._lock:
                self._results.append((bytes.fromhex(hex_hash), ok))

    def _write(self, hex_hash: str, payload: bytes, header: dict) -> bool:
        final = self.path(hex_hash)
        tmp = final.with_suffix(f".tmp{os.getpid()}")
        start = time.perf_counter()
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + json.dumps(header).encode() + b"\n")
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.counters.errors += 1
            log.warning("SSD tier write failed (%s): %s", final.name, exc)
            tmp.unlink(missing_ok=True)
            return False
        self.counters.writes += 1
        self.counters.write_bytes += len(payload)
        self.counters.write_seconds += time.perf_counter() - start
        return True
