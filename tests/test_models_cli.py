"""Model preparation and the command line, as a user meets them."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

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


def test_model_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="never downloads"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path, print)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path, print)


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
