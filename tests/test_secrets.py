"""Secrets on disk and on command lines: the admin token file rank 0 generates (real files, symbolic
links and modes), the dashboard finding it, and a real job through the launcher whose processes carry no
secret on their command lines."""

from __future__ import annotations

import argparse
import os
import secrets
import stat
from pathlib import Path

import httpx
import pytest

from cluster.errors import ConfigError
from rank.leader_setup import _generated_admin_token
from tests.jobs import tiny_args


def server_token(cache_dir: Path | None = None, token_file: Path | None = None) -> str:
    """What rank 0 uses when started without --admin-token (and `--cache-dir`, `--admin-token-file`)."""
    return _generated_admin_token(argparse.Namespace(cache_dir=cache_dir, admin_token_file=token_file))


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A per-user Orchard folder of the test's own."""
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path / "orchard"))
    return tmp_path / "orchard"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_generated_token_is_private_and_kept_across_jobs(home: Path) -> None:
    old_umask = os.umask(0)  # a careless umask must not make the file readable by others
    try:
        first = server_token()
    finally:
        os.umask(old_umask)
    path = home / "admin-token"
    assert path.read_text() == first + "\n" and mode(path) == 0o600 and len(first) >= 24
    assert server_token() == first  # a second job (or a restart) keeps the dashboards' token working
    assert path.read_text() == first + "\n"
    path.write_text("not a token!\n")  # damaged: replaced
    replaced = server_token()
    assert replaced != first and path.read_text() == replaced + "\n"


def test_a_token_file_others_could_read_is_narrowed_and_replaced(home: Path) -> None:
    first = server_token()
    path = home / "admin-token"
    path.chmod(0o644)
    second = server_token()
    assert mode(path) == 0o600
    assert second != first and path.read_text() == second + "\n"  # the old one may have been read


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symbolic_link_in_place_of_the_token_file_is_refused(home: Path, tmp_path: Path, dangling: bool) -> None:
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_text("precious\n")
        victim.chmod(0o644)
    home.mkdir(parents=True)
    (home / "admin-token").symlink_to(victim)
    with pytest.raises(ConfigError, match="admin-token is a symbolic link: refusing"):
        server_token()
    if dangling:
        assert not victim.exists()  # not created through the link either
    else:
        assert victim.read_text() == "precious\n" and mode(victim) == 0o644


def test_the_token_file_is_not_a_directory_or_fifo(home: Path) -> None:
    home.mkdir(parents=True)
    os.mkfifo(home / "admin-token")
    with pytest.raises(ConfigError, match="not a regular file"):
        server_token()


def test_the_dashboard_finds_the_token_whatever_the_servers_cache_dir(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rank.admin_token import admin_token_path
    from tui.__main__ import parse_args, token_file

    models = tmp_path / "big-disk" / "models"
    token = server_token(cache_dir=models)  # --cache-dir is where models live, not the user's secrets
    assert not (models / "admin-token").exists()
    assert parse_args([], dict(os.environ)).token == token
    monkeypatch.delenv("ORCHARD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert token_file(os.environ) == admin_token_path() == tmp_path / "xdg" / "orchard" / "admin-token"
    xdg_token = server_token(cache_dir=models)
    assert parse_args([], dict(os.environ)).token == xdg_token


def test_token_files_given_by_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tui.__main__ import parse_args

    given = tmp_path / "token"
    given.write_text("# the admin token\nfrom-a-file\n")
    given.chmod(0o600)
    assert server_token(token_file=given) == "from-a-file"
    assert parse_args(["--token-file", str(given)], {}).token == "from-a-file"
    with pytest.raises(ConfigError, match="--admin-token-file .*missing: No such file"):
        server_token(token_file=tmp_path / "missing")
    with pytest.raises(SystemExit):
        parse_args(["--token-file", str(tmp_path / "missing")], {})
    assert "--token-file" in capsys.readouterr().err


def on_command_lines(*needles: str) -> dict[int, str]:
    """Every process whose argv holds one of `needles` (what `ps` shows to any user of the host)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if any(n in argv for n in needles):
                found[int(entry.name)] = argv.replace("\0", " ")
    return found


@pytest.mark.cluster
def test_the_launcher_keeps_secrets_off_command_lines(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    key, token = "sk-" + secrets.token_hex(8), "adm-" + secrets.token_hex(8)
    args = tiny_args(tiny_model, "--api-key", key, "--admin-token", token)
    job = job_factory.start(2, args, "secrets-launcher", launcher=True)
    try:
        assert httpx.get(job.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(job.url + "/v1/models").status_code == 401
        admin = httpx.get(job.url + "/admin/state", headers={"Authorization": f"Bearer {token}"})
        assert admin.status_code == 200
        assert len(job.pids()) == 2
        # Only the launcher, whose command line the user typed, holds them: not mpirun, not a rank.
        assert set(on_command_lines(key, token)) == {job.proc.pid}
        log = job.log()
        assert "orchard: " in log and key not in log and token not in log  # the printed mpirun command
    finally:
        job.stop()
