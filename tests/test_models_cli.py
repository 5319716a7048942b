"""Model preparation and the command line, as a user meets them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cluster.errors import ModelError, ShardingError
from rank.models import check_tensor_parallel, make_tiny_model, resolve_model
from tests.jobs import ROOT, free_port, mpirun_prefix


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", seed=3, layers=2)
    b = make_tiny_model(tmp_path / "b", seed=3, layers=2)
    c = make_tiny_model(tmp_path / "c", seed=4, layers=2)
    assert digest(a) == digest(b) != digest(c)


def test_sharding_message_names_the_valid_rank_counts() -> None:
    cfg = {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}
    with pytest.raises(
        ShardingError, match="this model has 9 attention heads and 3 KV heads: run 1 or 3 ranks"
    ):
        check_tensor_parallel(cfg, 2)
    check_tensor_parallel(cfg, 3)


def test_model_argument_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path, print)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path, print)
    with pytest.raises(
        ModelError, match="not a local model directory, a .gguf file or a Hugging Face repo id"
    ):
        resolve_model(str(tmp_path / "missing" / "folder"), tmp_path, print)


def test_embedded_model_converts_once_with_progress(tmp_path: Path) -> None:
    messages: list[str] = []
    first = resolve_model(None, tmp_path, messages.append)
    assert any("converting" in m for m in messages)
    assert (first / "config.json").exists() and (first / "tokenizer.json").exists()
    messages.clear()
    assert resolve_model(None, tmp_path, messages.append) == first
    assert messages == []  # reused, not converted again


def test_help_documents_every_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "rank", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for flag in ("--model", "--host", "--port", "--max-batch", "--log-level", "--api-key", "--max-queue"):
        assert flag in out.stdout
    assert "127.0.0.1" in out.stdout and "8000" in out.stdout


@pytest.mark.cluster
def test_wrong_rank_count_fails_fast_with_a_clear_message() -> None:
    cmd = mpirun_prefix(2) + [sys.executable, "-m", "rank", "--port", str(free_port())]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert "this model has 9 attention heads and 3 KV heads: run 1 or 3 ranks" in out.stdout + out.stderr


def test_api_keys_from_flags_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rank.cli import api_keys, build_parser

    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nfile-key-1\n\nfile-key-2\n")
    monkeypatch.setenv("ORCHARD_API_KEYS", "env-key, flag-key")
    args = build_parser().parse_args(["--api-key", "flag-key", "--api-key-file", str(keys)])
    assert api_keys(args) == ("flag-key", "env-key", "file-key-1", "file-key-2")
    missing = build_parser().parse_args(["--api-key-file", str(tmp_path / "nope")])
    from cluster.errors import ConfigError

    with pytest.raises(ConfigError, match="--api-key-file"):
        api_keys(missing)


# -- `--model org/name`: the local Hugging Face cache, laid out here as huggingface_hub lays it out ------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache: Path, repo: str, model: Path) -> Path:
    """models--org--name/{refs/main, snapshots/<commit>/<file> -> ../../blobs/<sha256>}; the snapshot."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot, blobs = folder / "snapshots" / COMMIT, folder / "blobs"
    for d in (folder / "refs", snapshot, blobs):
        d.mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    for f in sorted(model.iterdir()):
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snapshot / f.name).unlink(missing_ok=True)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def no_download(repo: str, cache: Path) -> Path:
    raise AssertionError(f"{repo} must not be downloaded")


def test_repo_id_is_found_in_the_hugging_face_cache(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the default: ~/.cache/huggingface/hub
    default = lay_out_hub_cache(tmp_path / "xdg" / "huggingface" / "hub", "org/tiny", tiny_model)
    assert resolve_model("org/tiny", tmp_path, print, download=no_download) == default
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    home = lay_out_hub_cache(tmp_path / "home" / "hub", "org/tiny", tiny_model)
    assert resolve_model("org/tiny", tmp_path, print, download=no_download) == home
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = lay_out_hub_cache(tmp_path / "hub", "org/tiny", tiny_model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # found in the cache: offline changes nothing
    assert resolve_model("org/tiny", tmp_path, print, download=no_download) == hub
    assert (hub / "model.safetensors").is_symlink() and (hub / "config.json").is_file()


def test_repo_id_missing_or_incomplete_is_downloaded_when_online(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    partial = tmp_path / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    partial.mkdir(parents=True)
    shutil.copy(tiny_model / "config.json", partial)  # an interrupted download: no weights
    (partial.parent.parent / "refs").mkdir()
    (partial.parent.parent / "refs" / "main").write_text(COMMIT)
    fetched: list[str] = []

    def download(repo: str, cache: Path) -> Path:  # what huggingface_hub's snapshot_download leaves
        fetched.append(repo)
        return lay_out_hub_cache(cache, repo, tiny_model)

    messages: list[str] = []
    assert resolve_model("org/tiny", tmp_path, messages.append, download=download) == partial
    assert fetched == ["org/tiny"] and any("downloading org/tiny" in m for m in messages)


def test_repo_id_that_cannot_be_found_or_fetched_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelError, match="org/none is not in the Hugging Face cache at .*hub, and HF_HUB_OFFLINE"
    ):
        resolve_model("org/none", tmp_path, print, download=no_download)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def offline_network(repo: str, cache: Path) -> Path:
        raise OSError("Temporary failure in name resolution")

    with pytest.raises(
        ModelError, match="downloading it failed .*name resolution.*check the name and the network"
    ):
        resolve_model("org/none", tmp_path, print, download=offline_network)
    with pytest.raises(ModelError, match="org/none is not in the Hugging Face cache"):
        resolve_model("org/none", tmp_path, print, download=None)  # a look-up only (preflight)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ModelError, match="huggingface_hub is not installed"):
        resolve_model("org/none", tmp_path, print)


@pytest.mark.cluster
def test_job_serves_a_repo_id_from_the_hugging_face_cache(
    job_factory,
    tiny_model: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    lay_out_hub_cache(tmp_path / "hub", "org/tiny", tiny_model)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    job = job_factory.start(1, ["--model", "org/tiny", "--served-model-name", "tiny"], "hub", env=env)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    r = httpx.post(job.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0, r.text
    assert COMMIT in job.log()  # the snapshot folder it loaded


# -- any rank that cannot start ends the whole job at once ------------------------------------------------


def broken_copy(model: Path, out: Path, file: str, text: str) -> Path:
    shutil.copytree(model, out)
    (out / file).write_text(text)
    return out


def run_two_ranks(model0: Path, model1: Path) -> subprocess.CompletedProcess[str]:
    """One 2-rank job whose ranks load different folders (as when one host's copy is broken)."""
    port = str(free_port())
    rank = [sys.executable, "-m", "rank", "--port", port, "--kv-ssd-dir", "none", "--model"]
    cmd = mpirun_prefix(1) + rank + [str(model0), ":", "-np", "1"] + rank + [str(model1)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.cluster
def test_a_follower_that_cannot_load_its_model_ends_the_job(tiny_model: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_model / "config.json").read_text()) | {"model_type": "no_such_family"}
    bad = broken_copy(tiny_model, tmp_path / "bad", "config.json", json.dumps(config))
    out = run_two_ranks(tiny_model, bad)  # rank 0 waits for rank 1's hello: it must not wait forever
    assert out.returncode != 0
    assert "rank 1 could not start, ending the whole job: cannot load" in out.stderr
    assert "Model type no_such_family not supported" in out.stderr


@pytest.mark.cluster
def test_rank0_failing_in_its_setup_ends_the_job(tiny_model: Path, tmp_path: Path) -> None:
    bad = broken_copy(tiny_model, tmp_path / "badtok", "tokenizer.json", '{"broken":')
    out = run_two_ranks(bad, tiny_model)  # rank 1 is in its follow loop when rank 0's tokenizer fails
    assert out.returncode != 0
    assert "rank 0 could not start, ending the whole job" in out.stderr
    assert "tokenizer" in out.stderr


class _Transport:
    def __init__(self, size: int) -> None:
        self.rank, self.size = 1, size
        self.aborted: list[int] = []

    def abort(self, code: int) -> None:
        self.aborted.append(code)


def test_a_start_up_failure_aborts_a_job_of_several_ranks() -> None:
    from rank.startup import ends_job_on_failure

    several, alone = _Transport(2), _Transport(1)
    for transport in (several, alone):
        with pytest.raises(ModelError, match="broken"), ends_job_on_failure(transport):
            raise ModelError("broken")
    assert several.aborted == [2] and alone.aborted == []  # one rank alone just reports it
