"""The admin token rank 0 uses when started without `--admin-token`: read from `--admin-token-file`, or
generated once and kept in a per-user file where `python -m tui` finds it.

The generated file lives in the per-user Orchard folder ($ORCHARD_CACHE, else $XDG_CACHE_HOME/orchard,
else ~/.cache/orchard), whatever `--cache-dir` says: `--cache-dir` is where models live (often a big
shared disk), and the dashboard must find the token without being told where the models are.

It is a secret on disk, so: created 0600 and never through a symbolic link (someone who planted one
could make rank 0 overwrite a file of theirs, or of ours, with the token); a wider mode found on an
existing file is narrowed, and its token replaced, since others may have read it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import stat
from pathlib import Path

from cluster.errors import ConfigError

log = logging.getLogger("orchard")

TOKEN_FILE_NAME = "admin-token"
MAX_TOKEN_FILE_BYTES = 4096
_GENERATED = re.compile(r"[A-Za-z0-9_-]{16,256}")


def admin_token_path() -> Path:
    """The per-user file (tui/__main__.py `token_file` computes the same path; a test holds them equal)."""
    from rank.models import default_cache_dir

    return default_cache_dir() / TOKEN_FILE_NAME


def read_token_file(path: Path) -> str:
    """`--admin-token-file`: the first line that is neither blank nor a # comment."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_TOKEN_FILE_BYTES).decode(errors="replace")
            mode = os.fstat(f.fileno()).st_mode
    except OSError as exc:
        raise ConfigError(f"--admin-token-file {path}: {exc.strerror}") from exc
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ConfigError(f"--admin-token-file {path} holds no token")
    if mode & 0o077:
        log.warning("--admin-token-file %s is readable by other users (chmod 600 it)", path)
    return lines[0]


def generated_token(path: Path) -> str:
    """The token kept in `path`, made (0600, no symlink followed) when the file is new, empty, invalid or
    was readable by others.

    A valid private token is reused rather than replaced: every job started without --admin-token used
    to overwrite it, so a second job on the host (or a restart) locked out the dashboards and scripts
    that held the first one's token. Delete the file to get a new token."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if path.is_symlink():
            raise ConfigError(
                f"the admin token file {path} is a symbolic link: refusing to write a secret through it "
                "(remove it, or pass --admin-token)"
            ) from exc
        raise ConfigError(f"cannot write the admin token file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two jobs starting at once agree on one token
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"the admin token file {path} is not a regular file: remove it")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"the admin token file {path} belongs to another user: remove it")
        private = not st.st_mode & 0o077
        if not private:
            os.fchmod(fd, 0o600)
            log.warning("%s was readable by other users: made it 0600 and replaced its token", path)
        old = os.read(fd, MAX_TOKEN_FILE_BYTES).decode(errors="replace").strip()
        if private and _GENERATED.fullmatch(old):
            log.info("admin token read from %s (pass --admin-token to choose one)", path)
            return old
        token = secrets.token_urlsafe(24)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (token + "\n").encode(), 0)
        os.fsync(fd)
        log.info("admin token written to %s (pass --admin-token to choose one)", path)
        return token
    finally:
        os.close(fd)
