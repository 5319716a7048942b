"""`python -m rank`: start one rank. Environment fix-ups come first (they may re-exec), then argument
parsing, then start-up (rank/startup.py: MLX, MPI, model, bus) and the role: rank 0 leads
(rank/leader_setup.py), every other rank follows."""

from __future__ import annotations

import json
import logging
import os
import sys

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
        from rank.startup import ends_job_on_failure, run_follower, start

        with start(args) as started:  # a rank that fails in here ends the whole job (rank/startup.py)
            if started.rank == 0:  # the one role switch
                from rank.leader_setup import lead

                # Rank 0 leaving by an exception (its set-up, say a tokenizer that does not load) would
                # leave the followers waiting for a plan forever.
                with ends_job_on_failure(started.bus):
                    return lead(args, started)
            return run_follower(started)
    except OrchardError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
