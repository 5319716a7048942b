"""`python -m rank`: start one rank. Order matters: environment fix-ups (may re-exec), MLX distributed
init, then mpi4py (it must not initialise MPI itself), model load + shard, then the role's loop."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from rank.env import prepare_process, under_mpi

log = logging.getLogger("orchard")


class _JsonFormatter(logging.Formatter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "rank": self.rank,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, rank: int, as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter(rank))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _init_distributed() -> tuple[Any, Any]:
    """MLX first, then mpi4py on the already initialised MPI (ENVIRONMENT.md)."""
    from cluster.bus import Transport
    from rank.transport import LocalTransport, MpiTransport

    transport: Transport
    world = os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or "1"
    if not under_mpi() or world == "1":  # `mpirun -np 1` (or `--np 1`): a single rank needs no MPI
        return None, LocalTransport()
    import mlx.core as mx

    group = mx.distributed.init(backend="mpi", strict=True)
    import mpi4py

    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI

    # A communicator of our own: our point-to-point messages (acks, reports) must never match MLX's own
    # send/recv on COMM_WORLD (the vocabulary-parallel logits), whatever tags either side uses.
    transport = MpiTransport(MPI.COMM_WORLD.Dup())
    if group.size() != transport.size:
        raise SystemExit(f"MLX sees {group.size()} ranks but MPI sees {transport.size}")
    return (group if group.size() > 1 else None), transport


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from rank.launch import launch, split_launch_args

    if any(a == "--check-hostfile" or a.startswith("--check-hostfile=") for a in argv):
        from pathlib import Path

        from rank.cli import build_parser
        from rank.preflight import check

        args = build_parser().parse_args(argv)
        return check(Path(args.check_hostfile), args.model, args.ssh)
    launching = split_launch_args(argv)
    if launching is not None and not under_mpi():
        from rank.cli import build_parser

        build_parser().parse_args(argv)  # reject bad flags here, not in N ranks
        return launch(*launching)
    prepare_process(argv)
    from rank.cli import build_parser

    args = build_parser().parse_args(argv)
    rank_env = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    _setup_logging(args.log_level, rank_env, args.log_json)
    from cluster.errors import OrchardError

    try:
        from rank.cli import validate

        validate(args)
        group, transport = _init_distributed()
        return _run(args, group, transport)
    except OrchardError as exc:
        log.error("%s", exc)
        return 2


def _run(args: Any, group: Any, transport: Any) -> int:
    from cluster.bus import BusCodec, ControlBus
    from rank import cpu_kernels
    from rank.env import blas_in_use
    from rank.executor import Executor
    from rank.models import default_cache_dir, load_model, resolve_model

    rank, size = transport.rank, transport.size
    t0 = time.monotonic()
    cache_dir = args.cache_dir or default_cache_dir()
    model_dir = resolve_model(args.model, cache_dir, progress=log.info if rank == 0 else log.debug)
    model, config = load_model(model_dir, group)
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
    from rank.transport import HELLO_TAG

    hello: dict[str, Any] = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid()}
    responder = ssd_store = None
    try:  # every thread started here is stopped below: a live thread at exit keeps MPI from finalizing
        if rank != 0 and args.pulse_timeout > 0:
            from rank.pulse import Activity, PulseResponder

            responder = PulseResponder(rank, Activity())
            responder.start()
            hello["pulse"] = responder.hello()
        identity = json.dumps(hello).encode()
        if rank == 0:
            ranks = [json.loads(b) for b in [identity, *transport.recv_from_followers(HELLO_TAG, 16384)]]
        else:
            transport.send_to_leader(identity, HELLO_TAG)
            ranks = []
        ssd_dir, ssd_store = _ssd_store(args, model_dir, rank, size)
        executor = Executor(
            model, want_logits=rank == 0, block_tokens=args.kv_block_tokens, ssd=ssd_store, group=group
        )
        return _serve(args, rank, bus, transport, executor, model_dir, config, ranks, ssd_dir, responder)
    finally:
        if responder is not None:
            responder.stop()
        if ssd_store is not None:
            ssd_store.close()  # a live writer thread at exit keeps MPI from finalizing cleanly


def _ssd_store(args: Any, model_dir: Any, rank: int, size: int) -> tuple[Any, Any]:
    """This rank's SSD folder: <dir>/<model fingerprint>-tp<N>/rank<r>, or (None, None) when off."""
    from pathlib import Path

    from rank.models import default_cache_dir, fingerprint
    from rank.ssd import SsdBlockStore

    if (args.kv_ssd_dir or "").lower() == "none" or args.kv_ram_gb == 0:
        return None, None
    base = (
        Path(args.kv_ssd_dir).expanduser()
        if args.kv_ssd_dir
        else (args.cache_dir or default_cache_dir()) / "kv"
    )
    ssd_dir = base / f"{fingerprint(model_dir)[:16]}-tp{size}"
    return ssd_dir, SsdBlockStore(ssd_dir / f"rank{rank}")


def _serve(
    args: Any,
    rank: int,
    bus: Any,
    transport: Any,
    executor: Any,
    model_dir: Any,
    config: Any,
    ranks: Any,
    ssd_dir: Any,
    responder: Any = None,
) -> int:
    from cluster.errors import BusError
    from rank.follower import follow
    from rank.ssdsync import sync_followers

    if rank != 0:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)  # rank 0 drains and tells us when to stop
        from rank.report import Reporter

        try:
            if executor.ssd is not None:
                sync_followers(bus, executor.ssd)
            activity = responder.activity if responder is not None else None
            return follow(executor, bus, Reporter(rank, socket.gethostname(), interval=1.0), activity)
        except BusError as exc:
            log.error("fatal control-bus error, aborting the job: %s", exc)
            transport.abort(3)
            return 3
    return _lead(args, model_dir, config, executor, bus, ranks, ssd_dir)


def _prefix_cache(args: Any, model_dir: Any, executor: Any, bus: Any, ssd_dir: Any) -> Any:
    """The RAM tier's index, sized in blocks of this model on one rank, and the SSD tier behind it."""
    from cluster.kvindex import BlockIndex, root_hash
    from cluster.manifest import Manifest
    from cluster.prefix import PrefixCache
    from cluster.ssdtier import SsdTier
    from rank.ssdsync import sync_leader

    world_size = bus.size
    from rank.env import local_ranks
    from rank.models import fingerprint

    if args.kv_ram_gb is None:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        ram_bytes = int(min(8 * 2**30, 0.10 * physical / local_ranks()))
    else:
        ram_bytes = int(args.kv_ram_gb * 2**30)
    block_bytes = executor.block_bytes
    capacity = ram_bytes // block_bytes
    if capacity < 1:
        log.info("prefix cache off (--kv-ram-gb %s)", args.kv_ram_gb)
        return None
    index = BlockIndex(args.kv_block_tokens, capacity, block_bytes)
    log.info(
        "RAM prefix cache: %d blocks of %d tokens (%.2f GiB per rank, %.2f MiB per block)",
        capacity,
        args.kv_block_tokens,
        capacity * block_bytes / 2**30,
        block_bytes / 2**20,
    )
    ssd = None
    if executor.ssd is not None:
        manifest = Manifest(ssd_dir / "manifest.sqlite", world_size)
        ssd = SsdTier(manifest, index, int(args.kv_ssd_gb * 2**30), args.kv_ssd_ttl or None)
        ssd.io = executor.ssd.counters
        sync_leader(bus, executor.ssd, manifest, ssd)
        log.info(
            "SSD tier: %s, %d blocks on disk, bound %.1f GiB per rank",
            ssd_dir,
            ssd.stats.blocks,
            args.kv_ssd_gb,
        )
    return PrefixCache(index, root_hash(fingerprint(model_dir), f"tp{world_size}"), ssd)


def _tiers(prefix_cache: Any) -> list[Any]:
    if prefix_cache is None:
        return []
    return [prefix_cache.index.stats] + ([prefix_cache.ssd] if prefix_cache.ssd is not None else [])


def _pulse_monitor(args: Any, ranks: list[dict], names: dict[int, str]) -> Any:
    """Rank 0's liveness pings to every follower (outside MPI), or None for one rank / --pulse-timeout 0."""
    followers = [r for r in ranks if r["rank"] != 0 and r.get("pulse")]
    if not followers or args.pulse_timeout <= 0:
        return None
    from cluster.pulse import PulseBook
    from rank.pulse import PulseMonitor

    book = PulseBook(time.monotonic, {r["rank"]: names[r["rank"]] for r in followers})
    monitor = PulseMonitor(book, interval=min(0.1, args.pulse_timeout / 4), warn_after=2 * args.pulse_timeout)
    here = socket.gethostname()
    for r in followers:
        monitor.add(r["rank"], r["pulse"], same_host=r["host"] == here)
    monitor.start()
    return monitor


def _generated_admin_token(args: Any) -> str:
    """No --admin-token: make one and leave it, readable by this user only, where `python -m tui` looks."""
    import secrets

    from rank.models import default_cache_dir

    path = (args.cache_dir or default_cache_dir()) / "admin-token"
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("admin token written to %s (pass --admin-token to choose one)", path)
    return token


def _lead(
    args: Any,
    model_dir: Any,
    config: dict[str, Any],
    executor: Any,
    bus: Any,
    ranks: list[dict],
    ssd_dir: Any,
) -> int:
    from api.app import ApiServer, create_app
    from api.service import Service
    from cluster.config import ServingConfig, ServingLimits
    from cluster.engine_client import EngineClient
    from cluster.scheduler import Scheduler, SchedulerConfig
    from rank.cli import api_keys
    from rank.engine import Leader
    from rank.launch import tell_launcher
    from rank.models import EMBEDDED_NAME
    from rank.report import Reporter
    from rank.tokenizer import ChatTokenizer
    from rank.watchdog import StepWatchdog

    names = {r["rank"]: f"rank {r['rank']} (host {r['host']}, pid {r['pid']})" for r in ranks}
    table = json.dumps([{k: r[k] for k in ("rank", "host", "pid")} for r in ranks])
    tell_launcher("ORCHARD_RANKS_FILE", table)  # it names the ranks of a host mpirun loses

    tokenizer = ChatTokenizer(model_dir)
    context = int(config.get("max_position_embeddings") or 2048)
    if args.max_context:
        context = min(context, args.max_context)
    name = args.served_model_name or (
        EMBEDDED_NAME if args.model is None else model_dir.name.removesuffix(".gguf")
    )
    if args.model and not args.served_model_name and str(args.model).endswith(".gguf"):
        name = os.path.basename(str(args.model)).removesuffix(".gguf")
    limits = ServingLimits(
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens,
        max_waiting=args.max_queue,
        request_timeout=args.request_timeout,
    )
    serving = ServingConfig(
        model_name=name,
        context_length=context,
        limits=limits,
        api_keys=api_keys(args),
        admin_token=args.admin_token or _generated_admin_token(args),
        world_size=bus.size,
    )
    client = EngineClient(max_waiting=args.max_queue)
    prefix_cache = _prefix_cache(args, model_dir, executor, bus, ssd_dir)
    scheduler = Scheduler(
        SchedulerConfig(
            max_batch=args.max_batch,
            prefill_chunk=args.prefill_chunk,
            context_length=context,
            idle_prefill_chunk=args.idle_prefill_chunk,
        ),
        decode=tokenizer.decode,
        eos_token_ids=tokenizer.eos_token_ids,
        clock=time.monotonic,
        prefix_cache=prefix_cache,
    )
    leader = Leader(
        executor,
        scheduler,
        bus,
        client,
        heartbeat_interval=args.heartbeat_interval,
        drain_timeout=args.drain_timeout,
        request_timeout=args.request_timeout,
        step_timeout=args.step_timeout or 1e9,
        rank_names=names,
    )
    for r in ranks:
        leader.health.register(r["rank"], r["host"], r["pid"])
    leader.reporter = Reporter(0, socket.gethostname(), interval=1.0)
    monitor = _pulse_monitor(args, ranks, names)
    if monitor is not None:
        leader.pulses, leader.pulse_timeout = monitor.book, args.pulse_timeout
        leader.health.liveness = monitor.book.silence
        leader.health.timeout = max(leader.health.timeout, args.pulse_timeout)
        monitor.on_gone = lambda r: leader.health.mark_dead(r, "process died (liveness port refuses pings)")
    leader.watchdog = StepWatchdog(
        client, args.step_timeout, leader.describe_ranks, hung=leader.hung_ranks if monitor else None
    )
    leader.watchdog.start()
    vocab = int(config.get("vocab_size") or tokenizer.vocab_size)
    server = ApiServer(
        create_app(
            Service(
                client,
                tokenizer,
                serving,
                vocab,
                stats=leader.stats,
                health=leader.health,
                kv_tiers=_tiers(prefix_cache),
            )
        ),
        args.host,
        args.port,
        "warning",
    )
    try:
        server.start()
    except Exception:
        from cluster.messages import Shutdown

        bus.send(Shutdown(2, "rank 0 could not start its HTTP server"))
        leader.watchdog.stop()
        if monitor is not None:
            monitor.stop()
        raise

    def on_signal(signum: int, _frame: Any) -> None:
        if leader.draining:
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            leader.request_stop()
        else:
            log.info(
                "%s: draining (new requests get 503; in-flight ones have %g s)",
                signal.Signals(signum).name,
                args.drain_timeout,
            )
            leader.request_drain()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # mpirun forwards SIGUSR1 without killing
        signal.signal(sig, on_signal)
    keys = "on" if serving.api_keys else "off"
    log.info(
        "serving %s on http://%s:%d/v1 with %d rank(s), context %d, max batch %d, API keys %s",
        name,
        args.host,
        args.port,
        bus.size,
        context,
        args.max_batch,
        keys,
    )
    try:
        code = leader.run()
    finally:
        leader.watchdog.stop()
        if monitor is not None:
            monitor.stop()
    if code:
        time.sleep(1.0)  # let error responses reach their clients
    server.stop()
    if code:
        tell_launcher("ORCHARD_STATUS_FILE", str(code))
    if code and bus.size > 1:
        log.error("stopping every rank (exit %d)", code)
        bus.transport.abort(code)
    log.info("rank 0 exiting with %d", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
