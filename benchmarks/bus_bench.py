"""Control-bus overhead: time per broadcast of typical step plans (encode, Ibcast/Bcast, decode, and
every follower's acknowledgement), for 2 and 3 ranks. Run under mpirun:

    .venv/bin/mpirun --oversubscribe -np 3 .venv/bin/python benchmarks/bus_bench.py
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("MLX_MPI_LIBNAME", os.path.join(sys.prefix, "lib", "libmpi.so.40"))
import mlx.core as mx  # noqa: E402

mx.distributed.init(backend="mpi")
import mpi4py  # noqa: E402

mpi4py.rc.initialize = False
mpi4py.rc.finalize = False
from mpi4py import MPI  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cluster.bus import ControlBus  # noqa: E402
from cluster.messages import Admit, PrefillChunk, Shutdown, StepPlan  # noqa: E402
from rank.transport import MpiTransport  # noqa: E402

PLANS = {
    "decode batch of 8": StepPlan(step=1, decode_ids=tuple(range(8)), decode_tokens=tuple(range(8))),
    "admit a prompt, 256-token chunk": StepPlan(
        step=1, admit=(Admit(9, ()),), prefill=(PrefillChunk(9, 0, tuple(range(2000, 2256))),)
    ),
}


def main() -> None:
    transport = MpiTransport(MPI.COMM_WORLD)
    bus = ControlBus(transport)
    n = 300
    if transport.rank == 0:
        for name, plan in PLANS.items():
            for _ in range(20):
                bus.send(plan)
                bus.await_acks(10)
            start = time.perf_counter()
            for _ in range(n):
                bus.send(plan)
                bus.await_acks(10)
            per = (time.perf_counter() - start) / n * 1e6
            size = len(bus.codec.encode(1, plan))
            print(
                f"{transport.size} ranks, {name:<24} {size:>6} bytes: {per:8.1f} us per step (send + every ack)"
            )
        bus.send(Shutdown(0))
        bus.close()
    else:
        while not isinstance(bus.receive(), Shutdown):
            pass
        bus.close()


if __name__ == "__main__":
    main()
