"""The process environment `python -m rank` gives itself on Linux: OpenBLAS preloaded, its thread count
split between the ranks of a host, and kernels the CPU can run when OpenBLAS does not recognise it.
Runs against the real OpenBLAS found here (skipped where there is none)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from rank import env as rank_env

LIB = rank_env.find_openblas() if sys.platform == "linux" else None
needs_openblas = pytest.mark.skipif(LIB is None, reason="no OpenBLAS installed")
AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx2", "fma"}


def _corename(lib: str) -> str:
    get = ctypes.CDLL(lib).openblas_get_corename
    get.restype = ctypes.c_char_p
    return get().decode().lower()


@needs_openblas
def test_coretype_only_when_openblas_fell_back_to_narrow_kernels() -> None:
    assert LIB is not None
    narrow = _corename(LIB) not in rank_env._WIDE_CORES
    assert rank_env.openblas_coretype(LIB, AVX512) == ("SkylakeX" if narrow else None)
    assert rank_env.openblas_coretype(LIB, {"avx2", "fma", "sse3"}) == ("Haswell" if narrow else None)
    assert rank_env.openblas_coretype(LIB, {"sse2", "sse3"}) is None  # nothing better to offer


@needs_openblas
def test_with_openblas_keeps_what_the_user_set() -> None:
    assert LIB is not None
    mine = rank_env.with_openblas({"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_NUM_THREADS": "3"}, LIB, 2)
    assert mine["OPENBLAS_CORETYPE"] == "Haswell" and mine["OPENBLAS_NUM_THREADS"] == "3"
    assert mine["LD_PRELOAD"].split(":")[0] == LIB
    shared = rank_env.with_openblas({"LD_PRELOAD": "/x.so"}, LIB, 64)
    assert shared["OPENBLAS_NUM_THREADS"] == "1" and shared["LD_PRELOAD"] == f"{LIB}:/x.so"
    if "OPENBLAS_CORETYPE" in shared:  # chosen for this CPU: the library must accept it and use wide kernels
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import ctypes; f = ctypes.CDLL({LIB!r}).openblas_get_corename; "
                "f.restype = ctypes.c_char_p; print(f().decode())",
            ],
            env={"OPENBLAS_CORETYPE": shared["OPENBLAS_CORETYPE"], "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip().lower() in rank_env._WIDE_CORES
