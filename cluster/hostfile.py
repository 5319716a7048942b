"""Open MPI hostfiles: `host [slots=N] ...` per line, `#` comments. The first host gets rank 0."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.errors import ConfigError


@dataclass(slots=True, frozen=True)
class HostEntry:
    host: str
    slots: int
    line: int


def parse_hostfile(path: Path) -> list[HostEntry]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read hostfile {path}: {exc.strerror}") from exc
    hosts: list[HostEntry] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host, *options = line.split()
        slots = 1
        for opt in options:
            key, _, value = opt.partition("=")
            if key == "slots":
                if not value.isdigit() or int(value) < 1:
                    raise ConfigError(f"{path}:{number}: slots must be a positive integer, got {value!r}")
                slots = int(value)
        hosts.append(HostEntry(host, slots, number))
    if not hosts:
        raise ConfigError(f"hostfile {path} lists no hosts")
    return hosts
