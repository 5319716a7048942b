from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.jobs import Job


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted models are cached once per machine, like a user's ~/.cache/orchard."""
    path = Path(os.environ.get("ORCHARD_TEST_CACHE", Path.home() / ".cache" / "orchard"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rank.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=7)


@pytest.fixture(scope="session")
def tiny3_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with heads a 3-rank job can split (6 query, 3 KV heads)."""
    from rank.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny3", seed=7, hidden=192, heads=6, kv_heads=3, ffn=384)


def _remove_stale_mpi_session_dirs() -> None:
    """Open MPI leaves /tmp/ompi.<pid> behind when its processes are SIGKILLed (the fault tests do that).
    A later mpirun whose pid is recycled then fails: "The PMIx server's listener thread failed to start"
    (seen once here). Only directories of processes that no longer exist are removed."""
    import shutil
    import tempfile

    for path in Path(tempfile.gettempdir()).glob("ompi.*"):
        pid = path.name.split(".", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def job_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[type]:
    started: list[Job] = []
    logs = tmp_path_factory.mktemp("logs")

    class Factory:
        @staticmethod
        def start(
            np: int,
            args: list[str],
            name: str,
            env: dict[str, str] | None = None,
            launcher: bool = False,
            mpirun_extra: list[str] | None = None,
            host: str = "127.0.0.1",
        ) -> Job:
            _remove_stale_mpi_session_dirs()
            job = Job(np, args, logs / f"{name}-{len(started)}.log", env, launcher, mpirun_extra, host)
            started.append(job)
            return job.wait_ready()

    yield Factory
    for job in started:
        job.stop()
