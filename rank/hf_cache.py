"""`--model org/name`, as mlx-lm takes it: a Hugging Face repo id, found in the local Hugging Face cache
(where `huggingface-cli download`, mlx-lm and transformers put models) or downloaded into it.

The cache is read here, not through huggingface_hub, so a machine without it (or offline) still finds what
is there: `<cache>/models--org--name/refs/main` names a commit, `snapshots/<commit>/` holds the files
(symlinks into `blobs/`). The cache folder is huggingface_hub's: HF_HUB_CACHE, else HF_HOME/hub, else
$XDG_CACHE_HOME/huggingface/hub (~/.cache/huggingface/hub). HF_HUB_OFFLINE=1 never downloads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from cluster.errors import ModelError

Download = Callable[[str, Path], Path]  # (repo id, cache folder) -> the snapshot folder

# What mlx-lm downloads for a model (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS): config, weights, tokenizer.
ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def looks_like_repo_id(arg: str) -> bool:
    """`org/name`: one slash, no path syntax (a local folder that exists is always taken as a folder)."""
    return bool(_REPO_ID.match(arg)) and ".." not in arg


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment now (not at import, as the hub does)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def repo_folder(repo_id: str, cache: Path) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, cache: Path, revision: str = "main") -> Path | None:
    """The complete snapshot `revision` (a branch, tag or commit) points at in `cache`, or None."""
    folder = repo_folder(repo_id, cache)
    ref = folder / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
    elif _COMMIT.match(revision):
        commit = revision
    else:
        return None
    snapshot = folder / "snapshots" / commit
    return snapshot if missing_files(snapshot) == [] else None


def missing_files(snapshot: Path) -> list[str]:
    """What a model folder lacks to load: config.json and its weights (every shard its index names)."""
    if not (snapshot / "config.json").is_file():
        return ["config.json"]
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            return [index.name + " (unreadable)"]
        return [s for s in shards if not (snapshot / s).is_file()]  # is_file follows the blob symlink
    return [] if any(snapshot.glob("model*.safetensors")) else ["model*.safetensors"]


def hub_download(repo_id: str, cache: Path) -> Path:
    """Download with huggingface_hub (what mlx-lm does), only the files mlx-lm loads."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelError(
            f"--model {repo_id}: not in the Hugging Face cache at {cache}, and huggingface_hub is not "
            "installed to download it (pip install huggingface_hub, or pass a local model folder)"
        ) from exc
    return Path(snapshot_download(repo_id, cache_dir=str(cache), allow_patterns=ALLOW_PATTERNS))


def resolve_repo(
    repo_id: str, progress: Callable[[str], None], download: Download | None = hub_download
) -> Path:
    """The local snapshot folder of `repo_id`: from the cache, else downloaded (unless offline, or
    `download` is None: a check that must not fetch gigabytes, such as a hostfile preflight)."""
    cache = hub_cache_dir()
    found = cached_snapshot(repo_id, cache)
    if found is not None:
        return found
    partial = repo_folder(repo_id, cache)
    state = "is incomplete" if partial.exists() else "is not"
    where = f"{repo_id} {state} in the Hugging Face cache at {cache}"
    if offline():
        raise ModelError(
            f"--model {repo_id}: {where}, and HF_HUB_OFFLINE is set: download it first "
            f"(`hf download {repo_id}` while online) or pass a local model folder"
        )
    if download is None:
        raise ModelError(f"--model {repo_id}: {where}")
    progress(f"downloading {repo_id} from Hugging Face into {cache} (once; later starts reuse it)")
    try:
        snapshot = download(repo_id, cache)
    except ModelError:
        raise
    except Exception as exc:  # network, authentication, a repo that does not exist: all say the same
        raise ModelError(
            f"--model {repo_id}: {where}, and downloading it failed ({type(exc).__name__}: {exc}); "
            "check the name and the network, or set HF_HUB_OFFLINE=1 and pass a local model folder"
        ) from exc
    lacking = missing_files(snapshot)
    if lacking:
        raise ModelError(
            f"--model {repo_id}: the download into {snapshot} lacks {', '.join(lacking)} "
            "(is it an MLX model? mlx-community/... repos are)"
        )
    progress(f"downloaded {repo_id}")
    return snapshot
