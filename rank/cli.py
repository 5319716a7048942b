"""Command-line flags of `python -m rank`. Every limit has a flag; secrets also come from the environment."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cluster.bus import DEFAULT_MAX_MESSAGE_BYTES
from cluster.config import HttpFront, ServingLimits
from cluster.errors import ConfigError

_D = ServingLimits()
_F = HttpFront()


def add_cpu_kernels_argument(p: Any, help_text: str) -> None:
    """`--cpu-kernels`, for `python -m rank` and the benchmarks that must run what it runs."""
    p.add_argument(
        "--cpu-kernels",
        choices=("auto", "on", "off"),
        default=os.environ.get("ORCHARD_CPU_KERNELS", "auto"),
        help=help_text,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rank",
        description=(
            "One rank of an Orchard job. Run it alone for one process, or under mpirun for tensor "
            "parallelism across ranks: mpirun -hostfile hostfiles/studio.txt python -m rank. Rank 0 serves "
            "the OpenAI-compatible API."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        help="local mlx-lm model directory, llama GGUF file, or Hugging Face repo id (org/name: from the "
        "local Hugging Face cache, else downloaded; HF_HUB_OFFLINE=1 never downloads) (default: embedded "
        "SmolLM2-135M-Instruct)",
    )
    m.add_argument(
        "--served-model-name", help="model id shown by /v1/models (default: the model's folder or file name)"
    )
    m.add_argument(
        "--cache-dir",
        type=Path,
        help="where converted models live (default: $ORCHARD_CACHE or ~/.cache/orchard)",
    )
    m.add_argument(
        "--tool-parser",
        choices=("hermes", "llama3_json", "mistral", "pythonic", "smollm2"),
        help="the model's tool-call format (default: read from its chat template; api/tools)",
    )
    m.add_argument(
        "--generation-config",
        default="auto",
        help="sampling defaults for fields a request omits, as vLLM's flag: 'auto' reads the model's "
        "generation_config.json, 'vllm' uses OpenAI's defaults, or a folder holding that file",
    )
    m.add_argument("--max-context", type=int, default=0, help="context length in tokens (0: the model's own)")
    m.add_argument(
        "--dequantize",
        action="store_true",
        help="load a quantized checkpoint (mlx-community 4/8-bit) as float32: MLX's quantized CPU kernels are "
        "far slower than fp32 with OpenBLAS on Linux; keep it quantized on a Mac",
    )
    m.add_argument(
        "--adapter-path",
        type=Path,
        help="a LoRA adapter folder in mlx-lm's format (adapter_config.json + adapters.safetensors), fused "
        "into the weights at load: served as the model itself, at no cost per token",
    )
    m.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an unfused LoRA adapter served as model NAME (repeatable); requests choose it by `model`",
    )
    m.add_argument(
        "--max-loras",
        type=int,
        default=0,
        help="unfused adapters held at once, --lora ones included (0: as many as --lora gives)",
    )
    m.add_argument(
        "--allow-special-tokens-in-content",
        action="store_true",
        help="read special-token text inside chat messages (<|im_end|>, ...) as special tokens, as before; "
        "by default it is plain text, so clients cannot forge role markers",
    )
    m.add_argument(
        "--blas",
        choices=("auto", "openblas", "none"),
        default=os.environ.get("ORCHARD_BLAS", "auto"),
        help="Linux: preload OpenBLAS for MLX's CPU matmuls (auto: when one is installed; env ORCHARD_BLAS)",
    )
    add_cpu_kernels_argument(
        m,
        "attention through numpy and SiLU through mx.power, whose exps are 20x and 3x faster than MLX's "
        "exp on CPU (auto: when MLX runs on the CPU; env ORCHARD_CPU_KERNELS)",
    )
    kv = p.add_argument_group("KV cache")
    kv.add_argument("--kv-block-tokens", type=int, default=32, help="tokens per prefix-cache block")
    kv.add_argument(
        "--kv-ram-gb",
        type=float,
        default=None,
        help="RAM prefix cache per rank in GiB (default: 10%% of RAM shared by this host's ranks, at most 8; 0: off)",
    )
    kv.add_argument(
        "--kv-ssd-dir",
        default=os.environ.get("ORCHARD_KV_SSD_DIR"),
        help="persistent SSD tier: each rank writes its block slices under this folder on its own disk "
        "(default: <cache>/kv; 'none' turns the tier off; env ORCHARD_KV_SSD_DIR)",
    )
    kv.add_argument(
        "--kv-ssd-gb", type=float, default=10.0, help="SSD tier size bound per rank in GiB (LRU pruning)"
    )
    kv.add_argument(
        "--kv-ssd-ttl",
        type=float,
        default=0.0,
        help="drop SSD blocks unused for this many seconds (0: never)",
    )
    kv.add_argument(
        "--kv-ssd-queue-mb",
        type=float,
        default=256.0,
        help="SSD writes waiting in a rank's memory, in MiB; when its disk falls further behind, new blocks "
        "are not saved (they stay in RAM only; 0: one write at a time)",
    )
    kv.add_argument(
        "--kv-bits",
        type=int,
        choices=(4, 8, 16),
        default=8,
        help="prefix-cache blocks in RAM and on the SSD tier stored quantized to this many bits (16: as the "
        "model computes them); 8 is within 0.005 nats/token of 16 (docs/kv-quantization.md)",
    )
    kv.add_argument(
        "--kv-group-size",
        type=int,
        choices=(32, 64, 128),
        default=64,
        help="values per quantization group, along the head dimension",
    )
    kv.add_argument(
        "--kv-live-from",
        type=_live_from,
        default=None,
        metavar="N|off",
        help="quantize a running sequence's KV cache, in --kv-bits' format, once it holds N positions (as "
        "mlx-lm's --quantized-kv-start): 3.6x the positions per byte for an fp32 model, 1.9x for bf16; off "
        "by default: on a CPU quantized attention is slower at every length (docs/kv-quantization.md)",
    )
    kv.add_argument(
        "--kv-budget",
        type=float,
        default=None,
        help="KV cache of running sequences per rank in GiB, padding of the batch included; requests wait "
        "beyond it (default: device memory minus weights, the RAM prefix cache and a margin)",
    )
    sp = p.add_argument_group("speculative decoding (docs/speculative.md)")
    sp.add_argument(
        "--spec",
        choices=("ngram", "draft", "off"),
        default=None,
        help="draft tokens and verify them in the batched pass, output unchanged: ngram (prompt lookup: "
        "outputs that repeat their input), draft (a small model, --draft-model), off (default: draft with "
        "--draft-model, else ngram)",
    )
    sp.add_argument(
        "--spec-tokens", type=int, default=4, help="drafted tokens a row verifies per step at most (1..16)"
    )
    sp.add_argument(
        "--draft-model",
        default=None,
        help="folder of an mlx-lm model with the served model's vocabulary, run unsharded on rank 0",
    )
    h = p.add_argument_group("HTTP (rank 0)")
    h.add_argument(
        "--host", default="127.0.0.1", help="address to bind; use 0.0.0.0 only on a trusted network"
    )
    h.add_argument("--port", type=int, default=8000, help="TCP port of the API")
    h.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted API key (repeatable; env ORCHARD_API_KEYS, comma-separated)",
    )
    h.add_argument("--api-key-file", type=Path, help="file with one accepted API key per line")
    h.add_argument(
        "--admin-token",
        default=os.environ.get("ORCHARD_ADMIN_TOKEN"),
        help="token for /admin routes (env ORCHARD_ADMIN_TOKEN)",
    )
    h.add_argument(
        "--metrics-token",
        default=os.environ.get("ORCHARD_METRICS_TOKEN"),
        help="read-only token for GET /metrics only, for Prometheus; the admin token works there too "
        "(env ORCHARD_METRICS_TOKEN)",
    )
    h.add_argument("--metrics-token-file", type=Path, help="file whose first line is the metrics token")
    h.add_argument(
        "--allowed-hosts",
        action="append",
        default=[],
        help="more Host names a loopback server without API keys answers (repeatable or comma-separated; "
        "'*': any); it refuses other names, which is what a DNS rebinding page sends",
    )
    h.add_argument(
        "--trusted-proxies",
        action="append",
        default=[],
        help="proxy addresses or networks (repeatable or comma-separated; '*': any) whose X-Forwarded-For "
        "names the client; by default the peer address is the client",
    )
    h.add_argument(
        "--max-connections",
        type=int,
        default=_F.max_connections,
        help="open HTTP connections; a new one over the cap is answered 503 and closed",
    )
    h.add_argument(
        "--header-timeout",
        type=float,
        default=_F.header_timeout,
        help="seconds a client has to send a request's headers, from connecting or from the previous "
        "response; then the connection is closed (0: no limit)",
    )
    h.add_argument(
        "--request-read-timeout",
        type=float,
        default=_F.request_read_timeout,
        help="seconds a client has to send a request's body after its headers; then 408 (0: no limit)",
    )
    h.add_argument(
        "--sse-keepalive",
        type=float,
        default=_F.sse_keepalive,
        help="seconds a stream may stay silent (queued, prefilling) before a ': keep-alive' SSE comment, so "
        "clients with read timeouts survive (0: off)",
    )
    h.add_argument(
        "--admin-token-file",
        type=Path,
        help="file holding the admin token (first line; used when neither --admin-token nor its env is set)",
    )
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-batch", type=int, default=8, help="sequences prefilled or decoded at once")
    lim.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens processed per engine step")
    lim.add_argument(
        "--idle-prefill-chunk",
        type=int,
        default=2048,
        help="prompt tokens per step at most while no sequence is decoding (no stream to keep waiting) or "
        "while more sequences wait for their first token than decode (--prefill-chunk per waiting one per "
        "decoding one: a burst of requests starts in fewer, larger steps); 0: always --prefill-chunk",
    )
    lim.add_argument(
        "--max-queue",
        type=int,
        default=_D.max_waiting,
        help="requests waiting beyond the batch; more get 429",
    )
    lim.add_argument(
        "--max-body-bytes", type=int, default=_D.max_body_bytes, help="largest request body; larger get 413"
    )
    lim.add_argument(
        "--max-messages", type=int, default=_D.max_messages, help="most chat messages in one request (400)"
    )
    lim.add_argument(
        "--max-template-chars",
        type=int,
        default=_D.max_template_chars,
        help="longest rendered chat prompt, checked before tokenizing (400; 0: 4 x --max-body-bytes)",
    )
    lim.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=_D.max_prompt_tokens,
        help="longest prompt (0: the context length)",
    )
    lim.add_argument(
        "--max-tokens", type=int, default=_D.max_tokens, help="largest max_tokens a request may ask for"
    )
    lim.add_argument(
        "--default-max-tokens",
        type=int,
        default=_D.default_max_tokens,
        help="max_tokens when a request gives none",
    )
    lim.add_argument(
        "--request-timeout",
        type=float,
        default=_D.request_timeout,
        help="seconds a request may take in all (0: no limit)",
    )
    lim.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests"
    )
    lim.add_argument(
        "--step-timeout",
        type=float,
        default=20.0,
        help="seconds a step may take before the job is declared hung and stopped (0: never)",
    )
    lim.add_argument(
        "--pulse-timeout",
        type=float,
        default=5.0,
        help="seconds without a liveness answer (UDP, outside MPI) after which a rank counts as hung; a step "
        "stuck that long with a silent rank stops the job before --step-timeout (0: no liveness channel)",
    )
    lim.add_argument(
        "--pulse-max-datagrams",
        type=int,
        default=500,
        help="datagrams a second each liveness thread reads (rank 0 sends 20 a second per address); beyond "
        "that is left to the kernel to drop, so it cannot take the engine's CPU",
    )
    lim.add_argument(
        "--bus-max-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, help="largest control-bus message"
    )
    lim.add_argument(
        "--heartbeat-interval", type=float, default=1.0, help="seconds between idle heartbeats on the bus"
    )
    p.add_argument(
        "--log-json", action="store_true", help="one JSON object per log line (prompt text is never logged)"
    )
    job = p.add_argument_group("launching (instead of calling mpirun yourself)")
    job.add_argument("--np", type=int, help="start this many ranks under the venv's mpirun (local machine)")
    job.add_argument(
        "--check-hostfile",
        metavar="FILE",
        help="check every host of FILE (ssh, venv path, versions, model files), print a table, exit",
    )
    job.add_argument("--ssh", default="ssh", help="ssh command for --check-hostfile (the one mpirun uses)")
    job.add_argument(
        "--mpirun-args",
        metavar="ARGS",
        help="more mpirun flags for --np/--hostfile, one string after '=' "
        '(e.g. --mpirun-args="--mca btl_tcp_if_include bridge0 --mca oob_tcp_if_include bridge0")',
    )
    job.add_argument(
        "--hostfile", help="start one rank per slot of this Open MPI hostfile (e.g. hostfiles/studio.txt)"
    )
    job.add_argument(
        "--collectives",
        choices=("auto", "mpi", "ring", "jaccl"),
        default=os.environ.get("ORCHARD_COLLECTIVES", "auto"),
        help="MLX backend of the tensor collectives (the control bus is always MPI): mpi; ring (MLX's TCP "
        "ring); jaccl (RDMA over Thunderbolt 5, devices from the hostfile); auto: jaccl when the hostfile "
        "lists RDMA devices and MLX has it, else the hostfile's collectives=, else mpi (docs/collectives.md; "
        "env ORCHARD_COLLECTIVES)",
    )
    p.add_argument(
        "--chain-steps",
        choices=("on", "off"),
        default="on",
        help="with two ranks, send the next greedy decode step's plan while the current step runs, so no "
        "rank waits for it: one link delay less per token (docs/collectives.md)",
    )
    p.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"), help="log verbosity"
    )
    return p


def _live_from(value: str) -> int | None:
    """`--kv-live-from`: a position count of at least 1, or "off"."""
    if value.strip().lower() == "off":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number of positions nor 'off'") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1 (or 'off')")
    return n


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = list(args.api_key)
    env = os.environ.get("ORCHARD_API_KEYS", "")
    keys += [k.strip() for k in env.split(",") if k.strip()]
    if args.api_key_file:
        try:
            lines = args.api_key_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"--api-key-file {args.api_key_file}: {exc.strerror}") from exc
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    return tuple(dict.fromkeys(keys))


def _listed(values: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for value in values for v in value.split(",") if v.strip()))


def http_front(args: argparse.Namespace) -> HttpFront:
    """The HTTP edge settings (`ServingConfig.front`) from the flags, checked."""
    import ipaddress

    if args.max_connections < 1:
        raise ConfigError("--max-connections must be at least 1")
    for name in ("header_timeout", "request_read_timeout"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be 0 (no limit) or positive")
    proxies = _listed(args.trusted_proxies)
    for proxy in proxies:
        try:
            if proxy != "*":
                ipaddress.ip_network(proxy, strict=False)
        except ValueError as exc:
            raise ConfigError(f"--trusted-proxies: {proxy!r} is not an address or network") from exc
    token = args.metrics_token or None
    if args.metrics_token_file:
        try:
            lines = args.metrics_token_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"--metrics-token-file {args.metrics_token_file}: {exc.strerror}") from exc
        token = next((ln.strip() for ln in lines if ln.strip()), None)
        if token is None:
            raise ConfigError(f"--metrics-token-file {args.metrics_token_file} is empty")
    if args.sse_keepalive < 0:
        raise ConfigError("--sse-keepalive must be 0 (off) or positive")
    return HttpFront(
        sse_keepalive=args.sse_keepalive,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        request_read_timeout=args.request_read_timeout,
        allowed_hosts=_listed(args.allowed_hosts),
        trusted_proxies=proxies,
        metrics_token=token,
    )


def validate(args: argparse.Namespace) -> None:
    positive = (
        "max_batch",
        "prefill_chunk",
        "max_queue",
        "max_body_bytes",
        "max_messages",
        "max_tokens",
        "default_max_tokens",
        "bus_max_bytes",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_template_chars < 0:
        raise ConfigError("--max-template-chars must be 0 (4 x --max-body-bytes) or more")
    if args.idle_prefill_chunk < 0:
        raise ConfigError("--idle-prefill-chunk must be 0 or more")
    if not 0 < args.port < 65536:
        raise ConfigError("--port must be 1..65535")
    if args.pulse_timeout < 0:
        raise ConfigError("--pulse-timeout must be 0 (off) or positive")
    if args.pulse_max_datagrams < 50:
        raise ConfigError("--pulse-max-datagrams must be at least 50 (rank 0 sends 20 a second per address)")
    if args.heartbeat_interval <= 0:
        raise ConfigError("--heartbeat-interval must be positive")
    if args.kv_ssd_queue_mb < 0:
        raise ConfigError("--kv-ssd-queue-mb must be 0 or more")
    if getattr(args, "kv_budget", None) is not None and args.kv_budget <= 0:
        raise ConfigError("--kv-budget must be positive (GiB per rank)")
    if getattr(args, "kv_live_from", None) is not None and args.kv_bits == 16:
        raise ConfigError("--kv-live-from quantizes running caches in --kv-bits' format: use --kv-bits 8 or 4")
    if args.spec is None:
        args.spec = "draft" if args.draft_model else "ngram"
    if not 1 <= args.spec_tokens <= 16:
        raise ConfigError("--spec-tokens must be 1..16")
    if args.spec == "draft" and not args.draft_model:
        raise ConfigError("--spec draft needs --draft-model DIR (a small model with the same vocabulary)")
    from rank.lora import adapter_slots

    adapter_slots(args.lora, args.max_loras)  # --lora NAME=DIR and --max-loras
    http_front(args)  # bad HTTP front settings fail here, before any rank loads the model
