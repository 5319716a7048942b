"""Rank 0's set-up after start-up (rank/startup.py): the KV tiers and the SSD start-up sync, the
scheduler, the `Leader`, the liveness monitor, the step watchdog and the HTTP server; then the leader's
loop, and the job's end.

The Leader/Scheduler/Service construction is in `lead`, in one place, so that changes to their
signatures touch only that function.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cluster.adapters import AdapterCheck, AdapterRegistry, AdapterSpec, Reserve
from cluster.messages import Hello
from cluster.prefix import PrefixCache
from cluster.snapshot import JobFacts
from rank.executor import Executor
from rank.pulse import PulseMonitor
from rank.startup import Started, context_length, freeze_heap, thaw_heap

log = logging.getLogger("orchard")


def _prefix_cache(args: argparse.Namespace, started: Started) -> PrefixCache | None:
    """The RAM tier's index, sized in blocks of this model on one rank, and the SSD tier behind it."""
    from cluster.kvindex import BlockIndex, root_hash
    from cluster.manifest import Manifest
    from cluster.ssdtier import SsdTier, plan_entries
    from rank.env import local_ranks
    from rank.models import default_cache_dir, fingerprint
    from rank.ssdsync import sync_leader

    executor: Executor = started.executor
    if not executor.caps.prefix_blocks:
        log.info("prefix cache off for this model: %s", executor.caps.reason)
        return None
    world_size = started.bus.size
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
    if executor.ssd is not None and started.ssd_dir is not None:
        manifest = Manifest(started.ssd_dir / "manifest.sqlite", world_size)
        ssd = SsdTier(
            manifest,
            index,
            int(args.kv_ssd_gb * 2**30),
            args.kv_ssd_ttl or None,
            max_per_plan=plan_entries(args.bus_max_bytes),
        )
        ssd.io = executor.ssd.counters
        sync_leader(started.bus, executor.ssd, manifest, ssd)
        log.info(
            "SSD tier: %s, %d blocks on disk, bound %.1f GiB per rank",
            started.ssd_dir,
            ssd.stats.blocks,
            args.kv_ssd_gb,
        )
    model_id = fingerprint(started.model_dir, args.cache_dir or default_cache_dir())
    fused = started.adapter_digest  # --adapter-path: the fused model is another model
    if fused:
        model_id = f"{model_id}+adapter:{fused}"
    # the blocks' storage format (rank.kvquant) is part of what a block is: another format, another chain
    return PrefixCache(index, root_hash(model_id, f"tp{world_size}|{executor.kv.name}"), ssd)


def _keeping_special(tokenizer: Any) -> Callable[[Sequence[int]], str]:
    """The detokenizer of requests with skip_special_tokens=False: it keeps special tokens' text."""
    return functools.partial(tokenizer.decode, skip_special=False)


def _adapters(args: argparse.Namespace, started: Started, base_name: str) -> AdapterRegistry:
    """The LoRA adapters served besides the base model: the `--lora` ones every rank loaded at start-up,
    in their slots; `--max-loras` bounds the runtime ones too."""
    from cluster.errors import ConfigError
    from rank.lora import adapter_slots

    registry = AdapterRegistry(adapter_slots(args.lora, args.max_loras), base_name)
    for a in started.adapters:
        spec = AdapterSpec(str(Path(a.path).resolve()), a.info.digest, a.info.rank)
        outcome = registry.add_loaded(a.name, a.slot, spec)
        if outcome is not Reserve.RESERVED:
            why = f"cannot serve it as model {a.name!r} ({outcome.value})"
            raise ConfigError(f"--lora {a.name}={a.path}: {why}")
        log.info("serving adapter %s (rank %d) as model %r from slot %d", a.path, a.info.rank, a.name, a.slot)
    return registry


def _adapter_inspector(started: Started) -> Callable[[str], AdapterCheck]:
    """POST /admin/adapters' validation (on a worker thread): rank/lora.py's check of an adapter folder
    against this model, its rank count and the layers the executor's slots can modify."""
    from cluster.errors import AdapterError
    from rank.lora import inspect_adapter

    config, world_size, executor = started.config, started.bus.size, started.executor

    def check(path: str) -> AdapterCheck:
        try:
            info = inspect_adapter(Path(path), config, world_size, executor.lora_targets or None)
        except AdapterError as exc:
            return AdapterCheck(None, str(exc))
        except OSError as exc:
            return AdapterCheck(None, f"cannot read it: {exc}")
        return AdapterCheck(AdapterSpec(path, info.digest, info.rank))

    return check


def _pulse_monitor(
    args: argparse.Namespace, ranks: tuple[Hello, ...], names: dict[int, str]
) -> PulseMonitor | None:
    """Rank 0's liveness pings to every follower (outside MPI), or None for one rank / --pulse-timeout 0."""
    followers = [h for h in ranks if h.rank != 0 and h.pulse is not None]
    if not followers or args.pulse_timeout <= 0:
        return None
    from cluster.pulse import PulseBook

    book = PulseBook(time.monotonic, {h.rank: names[h.rank] for h in followers})
    monitor = PulseMonitor(
        book,
        interval=min(0.1, args.pulse_timeout / 4),
        warn_after=2 * args.pulse_timeout,
        max_datagrams=args.pulse_max_datagrams,
    )
    here = socket.gethostname()
    for h in followers:
        if h.pulse is not None:
            monitor.add(h.rank, h.pulse, same_host=h.host == here)
    monitor.start()
    return monitor


def _generated_admin_token(args: argparse.Namespace) -> str:
    """No --admin-token (nor ORCHARD_ADMIN_TOKEN): the one in --admin-token-file, else the per-user file
    `python -m tui` reads, made once and kept private (rank/admin_token.py has the why)."""
    from rank.admin_token import admin_token_path, generated_token, read_token_file

    if args.admin_token_file:
        return read_token_file(args.admin_token_file)
    return generated_token(admin_token_path())


def _speculation(args: argparse.Namespace, executor: Any, config: dict[str, Any], tokenizer: Any) -> Any:
    """The speculation controller rank 0's scheduler asks for drafts (cluster/speculation.py), or None:
    --spec off, or a model whose caches cannot roll rows back (every rank's executor decided alike)."""
    from cluster.speculation import NgramProposer, SpecConfig, SpecController

    mode = getattr(args, "spec", "off") or "off"
    if mode == "off" or not executor.speculates:
        return None
    proposer: Any
    if mode == "draft":
        from rank.draft import config_vocab, load_draft

        vocab = int(config_vocab(config) or tokenizer.vocab_size)
        proposer = load_draft(Path(args.draft_model), vocab, args.max_batch)
    else:
        proposer = NgramProposer()
    log.info("speculative decoding: %s, up to %d drafted tokens a row per step", mode, args.spec_tokens)
    return SpecController(SpecConfig(mode=mode, tokens=args.spec_tokens), proposer)


def lead(args: argparse.Namespace, started: Started) -> int:
    """Rank 0 after start-up: set up, serve until stopped, and end the job with the loop's exit code."""
    from api.app import ApiServer, create_app
    from api.service import Service
    from cluster.config import ServingConfig, ServingLimits
    from cluster.engine_client import EngineClient
    from cluster.scheduler import Scheduler, SchedulerConfig
    from rank.cli import api_keys, http_front
    from rank.engine import Leader
    from rank.grammar import GrammarRuntime
    from rank.launch import tell_launcher
    from rank.models import EMBEDDED_NAME
    from rank.report import Reporter
    from rank.tokenizer import ChatTokenizer
    from rank.watchdog import StepWatchdog

    bus, executor, model_dir, config, ranks = (
        started.bus,
        started.executor,
        started.model_dir,
        started.config,
        started.ranks,
    )
    names = {h.rank: f"rank {h.rank} (host {h.host}, pid {h.pid})" for h in ranks}
    table = json.dumps([{"rank": h.rank, "host": h.host, "pid": h.pid} for h in ranks])
    tell_launcher("ORCHARD_RANKS_FILE", table)  # it names the ranks of a host mpirun loses

    tokenizer = ChatTokenizer(model_dir, special_tokens_in_content=args.allow_special_tokens_in_content)
    context = context_length(args, config)
    name = args.served_model_name or (
        EMBEDDED_NAME if args.model is None else model_dir.name.removesuffix(".gguf")
    )
    if args.model and not args.served_model_name and str(args.model).endswith(".gguf"):
        name = os.path.basename(str(args.model)).removesuffix(".gguf")
    elif args.model and not args.served_model_name and not os.path.exists(args.model):
        from rank.hf_cache import looks_like_repo_id

        if looks_like_repo_id(str(args.model)):
            name = str(args.model)  # "org/name", as clients of mlx_lm.server and vLLM send it
    limits = ServingLimits(
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens,
        max_waiting=args.max_queue,
        request_timeout=args.request_timeout,
        max_messages=args.max_messages,
        max_template_chars=args.max_template_chars,
    )
    serving = ServingConfig(
        model_name=name,
        context_length=context,
        limits=limits,
        api_keys=api_keys(args),
        admin_token=args.admin_token or _generated_admin_token(args),
        world_size=bus.size,
        front=http_front(args),
    )
    adapters = _adapters(args, started, name)
    client = EngineClient(max_waiting=limits.max_waiting, adapters=adapters)
    prefix_cache = _prefix_cache(args, started)
    # the running sequences' KV budget per rank (cluster.memory): the scheduler admits within it, the API
    # refuses (400) what could never fit
    from rank.kvquant import kv_memory

    ram_tier = prefix_cache.index.capacity_blocks * prefix_cache.index.block_bytes if prefix_cache else 0
    memory = kv_memory(args, executor, ram_tier, context)
    serving = dataclasses.replace(serving, memory=memory)
    spec = _speculation(args, executor, config, tokenizer)
    scheduler = Scheduler(
        SchedulerConfig(
            max_batch=args.max_batch,
            prefill_chunk=args.prefill_chunk,
            context_length=context,
            idle_prefill_chunk=args.idle_prefill_chunk,
            live_from=executor.live.start if executor.live is not None else None,
        ),
        decode=tokenizer.decode,
        eos_token_ids=tokenizer.eos_token_ids,
        prefix_cache=prefix_cache,
        adapters=adapters,
        decode_special=_keeping_special(tokenizer),
        memory=memory,
        spec=spec,
    )
    leader = Leader(
        executor,
        scheduler,
        bus,
        client,
        heartbeat_interval=args.heartbeat_interval,
        shutdown_timeout=args.drain_timeout,
        request_timeout=limits.request_timeout,
        step_timeout=args.step_timeout or 1e9,
        rank_names=names,
        facts=JobFacts(serving.model_name, serving.world_size, serving.context_length, time.time()),
        grammar=GrammarRuntime(tokenizer),  # constrained decoding (rank/grammar.py); ~1 s at a 150k vocab
        chain_steps=getattr(args, "chain_steps", "on") == "on",
    )
    leader.stats.memory = memory  # /metrics, /admin/state and the dashboard show it (cluster.stats)
    if spec is not None:
        leader.stats.spec_mode, leader.stats.spec_tokens = spec.config.mode, spec.config.tokens
    for h in ranks:
        leader.health.register(h.rank, h.host, h.pid)
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
    from api.defaults import load_defaults

    sampling_defaults = load_defaults(model_dir, args.generation_config)
    log.info("%s", sampling_defaults.describe())
    from api.tools import tool_format_for

    fmt = tool_format_for(tokenizer.chat_template, args.tool_parser, tokenizer.special_ids)
    log.info("tool calls: %r%s", fmt, "" if args.tool_parser else " (from the chat template; --tool-parser)")
    server = ApiServer(
        create_app(
            Service(
                client,
                tokenizer,
                serving,
                vocab,
                started=leader.facts.started,
                inspect_adapter=_adapter_inspector(started) if adapters.max_loras else None,
                defaults=sampling_defaults,
                tool_parser=args.tool_parser,
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
        if leader.shutting_down:
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            leader.request_stop()
        else:
            log.info(
                "%s: draining (new requests get 503; in-flight ones have %g s)",
                signal.Signals(signum).name,
                args.drain_timeout,
            )
            leader.begin_shutdown()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # mpirun forwards SIGUSR1 without killing
        signal.signal(sig, on_signal)
    keys = "on" if serving.api_keys else "off"
    log.info(
        "serving %s (model directory %s) on http://%s:%d/v1 with %d rank(s), context %d, max batch %d, "
        "API keys %s",
        name,
        model_dir,
        args.host,
        args.port,
        bus.size,
        context,
        args.max_batch,
        keys,
    )
    freeze_heap()
    try:
        code = leader.run()
    finally:
        thaw_heap()
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
        bus.abort(code)
    log.info("rank 0 exiting with %d", code)
    return code
