"""`python -m rank --check-hostfile`: the table and fixes a user sees before starting a job across Macs.
ssh is replaced by a stand-in script (no other hosts exist here): it runs the probe locally, fails for
"down" like an unreachable host, and answers for "old" like a Mac with other versions and model files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.errors import ConfigError
from cluster.hostfile import HostEntry, parse_hostfile
from rank.preflight import check, check_host_names, ssh_command
from tests.jobs import ROOT

FAKE_SSH = """#!/bin/sh
while [ "$1" = "-o" ]; do shift 2; done
[ "$1" = "--" ] && shift
host=$1; shift
case "$host" in
  down) echo "ssh: connect to host down port 22: No route to host" >&2; exit 255;;
  old) echo '{"hostname": "old", "python": "x", "orchard": "0.0.1", "mlx": "0.1.0", "mpi": false, "model": "other"}';;
  *) exec sh -c "$*";;
esac
"""


def run_check(tmp_path: Path, hosts: list[str]) -> subprocess.CompletedProcess[str]:
    ssh = tmp_path / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("# test cluster\n" + "".join(f"{h} slots=1\n" for h in hosts))
    cmd = [sys.executable, "-m", "rank", "--check-hostfile", str(hostfile), "--ssh", str(ssh)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_all_hosts_ready(tmp_path: Path) -> None:
    out = run_check(tmp_path, ["mac-1", "mac-2"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all 2 hosts ready; rank 0 is mac-1" in out.stdout
    assert out.stdout.count(" ok") == 2


def test_problems_are_listed_with_fixes(tmp_path: Path) -> None:
    out = run_check(tmp_path, ["mac-1", "down", "old"])
    assert out.returncode == 1
    assert "unreachable" in out.stdout and "ssh-copy-id down" in out.stdout
    assert "Orchard 0.0.1" in out.stdout and "MLX 0.1.0" in out.stdout
    assert "no MPI library" in out.stdout and "model files differ" in out.stdout


def test_hostfile_parsing(tmp_path: Path) -> None:
    f = tmp_path / "h"
    f.write_text("# comment\nstudio-1.local slots=2  # rank 0\n\nstudio-2.local\n")
    assert [(h.host, h.slots) for h in parse_hostfile(f)] == [("studio-1.local", 2), ("studio-2.local", 1)]
    f.write_text("a slots=zero\n")
    with pytest.raises(ConfigError, match="slots must be a positive integer"):
        parse_hostfile(f)
    f.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no hosts"):
        parse_hostfile(f)
    assert [h.host for h in parse_hostfile(ROOT / "hostfiles" / "studio.txt")][0] == "studio-1.local"


def test_a_host_name_is_never_an_ssh_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With the real ssh: a hostfile line "-oProxyCommand=..." would run that command on this machine."""
    marker, evil = tmp_path / "ran", tmp_path / "evil"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\n")
    evil.chmod(0o755)
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(f"mac-1 slots=1\n# the next one is hostile\n-oProxyCommand={evil} slots=1\n")
    assert check(hostfile, None, "ssh") == 2
    assert f"{hostfile}:3: host name '-oProxyCommand={evil}' starts with '-'" in capsys.readouterr().err
    assert not marker.exists()
    for name in ("a\x1bb", "a\u200bb", "-x"):
        with pytest.raises(ConfigError, match=r"h:7: host name"):
            check_host_names(Path("h"), [HostEntry("ok", 1, 1), HostEntry(name, 1, 7)])
    check_host_names(Path("h"), [HostEntry("studio-2.local", 1, 1), HostEntry("10.0.0.2", 1, 2)])


def test_ssh_gets_the_host_after_the_end_of_its_options(tmp_path: Path) -> None:
    marker, evil = tmp_path / "ran", tmp_path / "evil"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\n")
    evil.chmod(0o755)
    cmd = ssh_command("ssh", f"-oProxyCommand={evil}", ["true"])
    assert cmd[cmd.index("--") + 1] == f"-oProxyCommand={evil}"
    subprocess.run(cmd, capture_output=True, timeout=30)  # real ssh refuses the name as a host
    assert not marker.exists()
