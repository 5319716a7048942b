"""SHA-256 of large files, remembered across restarts in a small JSON file.

The model fingerprint must cover every byte of the weights (a fine-tune of the same shape saved in the
same folder must not reuse the old model's KV blocks), but reading 100 GB at every start would cost
minutes. A file is read again only when its stat changes: path, size and mtime, plus ctime and inode,
which change on any rewrite or replacement even when a copy restores the mtime (`cp -p`, `rsync -a`).
Ranks of one host share the cache: one hashes while the others wait on its lock, then find the result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("orchard")
MAX_ENTRIES = 512  # the cache stays small: files of a few dozen models
HashFile = Callable[[Path], str]  # hex SHA-256 of a file's bytes (a seam: tests count the reads)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class DigestCache:
    def __init__(self, path: Path, hash_file: HashFile = sha256_file) -> None:
        self.path = path
        self.hash_file = hash_file

    def digests(self, files: Sequence[Path]) -> list[str]:
        """Each file's SHA-256, read only for files whose stat is not the cached one."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            log.warning(
                "cannot use the file digest cache %s (%s): hashing the weights in full", self.path, exc
            )
            return [self.hash_file(f) for f in files]
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another rank of this host may be hashing the same files
            return self._digests(files)
        finally:
            os.close(lock)

    def _digests(self, files: Sequence[Path]) -> list[str]:
        entries = self._load()
        out, changed = [], False
        for f in files:
            key = str(f.resolve())
            before = _signature(os.stat(key))
            entry = entries.get(key)
            if (
                isinstance(entry, dict)
                and entry.get("stat") == before
                and isinstance(entry.get("sha256"), str)
            ):
                out.append(entry["sha256"])
                continue
            digest = self.hash_file(Path(key))
            out.append(digest)
            entries.pop(key, None)
            if _signature(os.stat(key)) == before:  # not rewritten while it was read
                entries[key] = {"stat": before, "sha256": digest}
                changed = True
        if changed:
            self._store(entries)
        return out

    def _load(self) -> dict[str, object]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable file digest cache %s: %s", self.path, exc)
            return {}
        return doc if isinstance(doc, dict) else {}

    def _store(self, entries: dict[str, object]) -> None:
        """Newest entries last; the oldest go past `MAX_ENTRIES`. Written to a fresh name, then renamed."""
        kept = dict(list(entries.items())[-MAX_ENTRIES:])
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            log.warning("cannot write the file digest cache %s: %s", self.path, exc)
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(kept, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("cannot write the file digest cache %s: %s", self.path, exc)
