"""Everything a rank does before its role's loop, in the order it must happen: MLX distributed init, then
mpi4py on the MPI that MLX started (it must not initialise MPI itself), model load + shard, the control
bus, the liveness responder, the hello exchange, the SSD block store and the executor. Then a follower
starts its loop here; rank 0's set-up is rank/leader_setup.py.

Every thread started here is stopped when `start`'s context ends: a live thread at exit keeps MPI from
finalizing cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cluster.bus import BusCodec, ControlBus, Transport
from cluster.errors import BusDecodeError, BusError, OrchardError
from cluster.messages import Hello
from rank.env import under_mpi
from rank.executor import Executor
from rank.lora import NamedAdapter
from rank.pulse import Activity, PulseResponder
from rank.ssd import SsdBlockStore

log = logging.getLogger("orchard")


@dataclass(slots=True, frozen=True)
class Started:
    """What start-up hands the role's loop."""

    bus: ControlBus
    executor: Executor
    model_dir: Path
    config: dict[str, Any]  # the model's config.json
    ranks: tuple[Hello, ...]  # rank 0: every rank's hello, in rank order; followers: ()
    ssd_dir: Path | None  # the job's SSD tier folder; None: the tier is off
    activity: Activity | None = None  # a follower's, reported to rank 0's liveness pings; None: not pinged
    # `--adapter-path`'s content digest (hex; "" without one): the fused model is another model, so it
    # joins the prefix cache's root hash and the SSD folder name
    adapter_digest: str = ""
    adapters: tuple[NamedAdapter, ...] = ()  # `--lora` adapters, loaded unfused into slots 1..k in order

    @property
    def rank(self) -> int:
        return self.bus.rank


def init_distributed(collectives: str = "mpi") -> tuple[Any, Transport, bool]:
    """MLX first, then mpi4py on the already initialised MPI (ENVIRONMENT.md). Returns MLX's group for the
    tensor collectives (None for one rank; from the `--collectives` backend, rank/collectives.py), the
    bus's transport (always MPI) and whether every rank reaches rank 0 point to point in that group."""
    from rank.transport import LocalTransport, MpiTransport

    world = os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or "1"
    if not under_mpi() or world == "1":  # `mpirun -np 1` (or `--np 1`): a single rank needs no MPI
        return None, LocalTransport(), True
    import mlx.core as mx

    group = mx.distributed.init(backend="mpi", strict=True)
    import mpi4py

    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI

    # A communicator of our own: our point-to-point messages (acks, replies, reports) must never match
    # MLX's own send/recv on COMM_WORLD (the vocabulary-parallel logits), whatever tags either side uses.
    transport = MpiTransport(MPI.COMM_WORLD.Dup())
    if group.size() != transport.size:
        raise SystemExit(f"MLX sees {group.size()} ranks but MPI sees {transport.size}")
    point_to_point = True
    if collectives != "mpi" and group.size() > 1:
        from rank.collectives import init_tensor_group

        with ends_job_on_failure(
            transport
        ):  # a rank whose ring or RDMA set-up fails must not strand the rest
            comm = MPI.COMM_WORLD.Dup()
            try:
                tensor = init_tensor_group(collectives, group, comm)
                group, point_to_point = tensor.group, tensor.point_to_point
            finally:
                comm.Free()
    return (group if group.size() > 1 else None), transport, point_to_point


class _Abortable(Protocol):
    """A transport or the bus: who this rank is, and how it ends the job."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def abort(self, code: int) -> None: ...


@contextmanager
def ends_job_on_failure(transport: _Abortable) -> Iterator[None]:
    """A rank that cannot start ends the whole job, at once, with its reason in the log. Without this
    the others wait for it forever: rank 0 in its hello gather, followers in their follow loop (Open
    MPI's waits spin a core each). One rank alone just raises."""
    try:
        yield
    except Exception as exc:
        if transport.size <= 1:
            raise
        reason = str(exc) if isinstance(exc, OrchardError) else f"{type(exc).__name__}: {exc}"
        log.error(
            "rank %d could not start, ending the whole job: %s",
            transport.rank,
            reason,
            exc_info=not isinstance(exc, OrchardError),  # a bug: keep its traceback
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        from rank.launch import tell_launcher

        # Under ULFM mpirun exits 0 after MPI_Abort: the launcher reads the job's code from this file
        # (written by whichever rank fails first; on another host than the launcher's it is a no-op file).
        tell_launcher("ORCHARD_STATUS_FILE", "2")
        transport.abort(2)
        raise


@contextmanager
def start(args: argparse.Namespace) -> Iterator[Started]:
    from rank import cpu_kernels
    from rank.env import blas_in_use
    from rank.lora import adapter_digest, adapter_slots
    from rank.models import default_cache_dir, load_model, resolve_model

    group, transport, point_to_point = init_distributed(getattr(args, "collectives", "mpi"))
    rank, size = transport.rank, transport.size
    leader = rank == 0  # the only role check of start-up
    t0 = time.monotonic()
    with ends_job_on_failure(transport):
        cache_dir = args.cache_dir or default_cache_dir()
        model_dir = resolve_model(args.model, cache_dir, progress=log.info if leader else log.debug)
        adapter_path = args.adapter_path
        model, config = load_model(
            model_dir, group, args.dequantize, log.info if leader else log.debug, adapter_path
        )
        cpu_fast = cpu_kernels.install(model, args.cpu_kernels)
    log.info(
        "loaded %s as shard %d/%d in %.1f s (BLAS: %s; CPU kernels: %s)",
        model_dir.name,
        rank,
        size,
        time.monotonic() - t0,
        blas_in_use(),
        "on" if cpu_fast else "off",
    )
    bus = ControlBus(transport, BusCodec(args.bus_max_bytes))
    responder = ssd_store = None
    try:
        with ends_job_on_failure(transport):
            pulse = None
            if not leader and args.pulse_timeout > 0:
                responder = PulseResponder(rank, Activity(), max_datagrams=args.pulse_max_datagrams)
                responder.start()
                pulse = responder.hello()
            hello = Hello(rank, socket.gethostname(), os.getpid(), pulse, software_versions())
            check_plan_fits(args, config, bus.codec)  # every rank decides the same, before anyone waits
            if leader:
                ranks = gather_hellos(bus, hello)
                problem = mismatched_software(ranks)
                if problem:
                    log.error("%s", problem)
                    bus.abort(2)  # the followers wait for a plan that will never come
            else:
                bus.reply(hello)  # who this rank is, and where rank 0 can ping it
                ranks = ()
            digest = adapter_digest(adapter_path).hex() if adapter_path is not None else ""
            ssd_dir, ssd_store = _ssd_store(args, model_dir, rank, size, digest)
            executor = Executor(
                model,
                want_logits=leader,
                block_tokens=args.kv_block_tokens,
                ssd=ssd_store,
                group=group,
                max_loras=adapter_slots(args.lora, args.max_loras),
                config=config,
                kv_format=kv_format(args),
                speculative=getattr(args, "spec", "off") != "off",
                point_to_point=point_to_point,
                live_from=getattr(args, "kv_live_from", None),
            )
            adapters = _load_loras(executor, args.lora, log.info if leader else log.debug)
            if ssd_store is not None:
                ssd_store.block_bytes = executor.block_bytes  # reads of larger files are refused
            activity = responder.activity if responder is not None else None
            started = Started(bus, executor, model_dir, config, ranks, ssd_dir, activity, digest, adapters)
        yield started
    finally:
        if responder is not None:
            responder.stop()
        if ssd_store is not None:
            ssd_store.close()  # a live writer thread at exit keeps MPI from finalizing cleanly


def software_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    return f"orchard {v('mlx-orchard')}, mlx {v('mlx')}, mlx-lm {v('mlx-lm')}"


def mismatched_software(ranks: tuple[Hello, ...]) -> str | None:
    odd = [h for h in ranks if h.software != ranks[0].software]
    if not odd:
        return None
    others = "; ".join(f"rank {h.rank} on {h.host} runs {h.software}" for h in odd)
    return f"rank 0 runs {ranks[0].software}, but {others}: install the same versions on every host"


def context_length(args: argparse.Namespace, config: dict[str, Any]) -> int:
    context = int(config.get("max_position_embeddings") or 2048)
    return min(context, args.max_context) if args.max_context else context


def check_plan_fits(args: argparse.Namespace, config: dict[str, Any], codec: BusCodec) -> None:
    """The largest step plan these limits allow must fit the bus, or the job would fail mid-serving."""
    from cluster.errors import BusMessageTooLarge, ConfigError
    from cluster.messages import PlanLimits
    from cluster.prefix import PrefixCache
    from cluster.ssdtier import plan_entries

    prompt = args.max_prompt_tokens or context_length(args, config)
    limits = PlanLimits(
        max_batch=args.max_batch,
        prefill_tokens=max(args.prefill_chunk, args.idle_prefill_chunk),
        max_prompt_blocks=prompt // args.kv_block_tokens,
        block_tokens=args.kv_block_tokens,
        max_evictions=PrefixCache.MAX_EVICTIONS_PER_PLAN,
        max_ssd_ops=plan_entries(args.bus_max_bytes),
        spec_tokens=args.spec_tokens if getattr(args, "spec", "off") != "off" else 0,
    )
    try:
        codec.encode(0, limits.largest_plan())
    except BusMessageTooLarge as exc:
        raise ConfigError(
            f"the largest step plan these limits allow does not fit the control bus ({exc}); raise "
            "--bus-max-bytes, or lower --max-batch, --prefill-chunk, --idle-prefill-chunk or --max-prompt-tokens"
        ) from None


def gather_hellos(bus: ControlBus, own: Hello) -> tuple[Hello, ...]:
    """Rank 0: every rank's hello in rank order (its own first), each checked to be the rank it claims."""
    ranks = (own, *bus.gather(Hello))
    for r, h in enumerate(ranks):
        if h.rank != r:
            raise BusDecodeError(f"rank {r} introduced itself as rank {h.rank}")
    return ranks


def _load_loras(executor: Executor, flags: list[str], progress: Any) -> tuple[NamedAdapter, ...]:
    """`--lora NAME=DIR` adapters into slots 1, 2, ... in flag order, alike on every rank."""
    from rank.lora import lora_flags

    loaded = []
    for slot, (name, path) in enumerate(lora_flags(flags), start=1):
        info = executor.load_adapter(slot, path)
        progress(f"adapter {name} ({path}, rank {info.rank}, {len(info.targets)} layers) in slot {slot}")
        loaded.append(NamedAdapter(name, slot, path, info))
    return tuple(loaded)


def kv_format(args: argparse.Namespace) -> Any:
    """`--kv-bits` / `--kv-group-size` as a rank.kvquant.KvFormat (the executor fits it to the model)."""
    from rank.kvquant import KvFormat

    return KvFormat(getattr(args, "kv_bits", 16), getattr(args, "kv_group_size", 64))


def _ssd_store(
    args: argparse.Namespace, model_dir: Path, rank: int, size: int, adapter: str = ""
) -> tuple[Path | None, SsdBlockStore | None]:
    """This rank's SSD folder: <dir>/<model fingerprint>[-a<fused adapter digest>]-tp<N>-<kv format>/rank<r>,
    or (None, None) when off. The format asked for names the folder (the one the executor fits to the
    model is a function of it and the model); block files also carry the fitted one."""
    from rank.models import default_cache_dir, fingerprint

    if (args.kv_ssd_dir or "").lower() == "none" or args.kv_ram_gb == 0:
        return None, None
    base = (
        Path(args.kv_ssd_dir).expanduser()
        if args.kv_ssd_dir
        else (args.cache_dir or default_cache_dir()) / "kv"
    )
    model_id = fingerprint(model_dir, args.cache_dir or default_cache_dir())[:16]
    ssd_dir = base / f"{model_id}{f'-a{adapter[:16]}' if adapter else ''}-tp{size}-{kv_format(args).name}"
    return ssd_dir, SsdBlockStore(ssd_dir / f"rank{rank}", queue_bytes=int(args.kv_ssd_queue_mb * 2**20))


def run_follower(started: Started) -> int:
    """A follower's life after start-up: agree on the SSD tier, then execute rank 0's plans until it says
    stop. A broken bus ends the whole job: ranks that disagree about state produce garbage."""
    from rank.follower import follow
    from rank.report import Reporter
    from rank.ssdsync import sync_followers

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)  # rank 0 drains and tells us when to stop
    bus, executor = started.bus, started.executor
    try:
        if executor.ssd is not None:
            sync_followers(bus, executor.ssd)
        reporter = Reporter(started.rank, socket.gethostname(), interval=1.0)
        freeze_heap()
        try:
            return follow(executor, bus, reporter, started.activity)
        finally:
            thaw_heap()
    except BusError as exc:
        log.error("fatal control-bus error, aborting the job: %s", exc)
        bus.abort(3)
        return 3


def freeze_heap() -> None:
    """Move every object start-up made (the model's modules, tokenizer, templates, FastAPI's routes: over
    100,000) out of the cyclic garbage collector's reach, once, before serving. A full collection walks
    them all (65 ms on an idle 2-core machine, well over 100 ms beside busy ranks) with the GIL held, so
    every thread stops: the soak saw /health answer in up to 178 ms at such moments. They live as long as
    the process, so collecting them could never free anything."""
    import gc

    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info(
        "start-up heap frozen: %d objects left out of garbage collection (%.0f ms)",
        gc.get_freeze_count(),
        (time.perf_counter() - t0) * 1000,
    )


def thaw_heap() -> None:
    """Undo `freeze_heap` once serving ends: at exit the interpreter's last collections skip frozen
    objects, and start-up's cycles (the bus's communicator among them) must be finalized before MPI is,
    or the job does not end cleanly (Open MPI reported a follower "exiting improperly")."""
    import gc

    gc.unfreeze()
