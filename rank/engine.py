"""Rank 0's step loop (`Leader`): plans, broadcasts, executes, samples and answers. The followers' loop is
rank/follower.py. The leader's loop is the only code on rank 0 that calls MPI or MLX.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from cluster.bus import ControlBus
from cluster.engine_client import Cancel, ClearCache, EngineClient, EngineState
from cluster.errors import BusError, EngineError
from cluster.health import HealthTable
from cluster.ledger import RequestLedger
from cluster.messages import Heartbeat, Shutdown, SsdLoadResult, StepPlan
from cluster.pulse import PulseBook
from cluster.requests import FinishReason, Request, RequestEvent
from cluster.scheduler import Emit, SampledToken, ScheduledStep, Scheduler
from cluster.snapshot import JobFacts, RequestRow, capture
from cluster.stats import ServingStats
from rank.executor import Executor
from rank.grammar import GrammarRuntime, StepMasks
from rank.report import Reporter
from rank.sampler import Sampler
from rank.watchdog import StepWatchdog

log = logging.getLogger("orchard.engine")

BURST_WAIT_S = 0.05  # an idle engine waits at most this long for requests the HTTP side is preparing
BURST_POLL_S = 0.002
# ... and, with nothing in preparation, until no request has come in for this long: a client's parallel
# requests reach the HTTP side one connection after another, so the second may not be in preparation yet
# when the first is taken (8 concurrent chats: the first prefilled alone, the other 7 a 0.47 s step later)
BURST_QUIET_S = 0.01


class Leader:
    def __init__(
        self,
        executor: Executor,
        scheduler: Scheduler,
        bus: ControlBus,
        client: EngineClient,
        heartbeat_interval: float = 1.0,
        shutdown_timeout: float = 30.0,
        request_timeout: float = 600.0,
        step_timeout: float = 20.0,
        watchdog: StepWatchdog | None = None,
        rank_names: dict[int, str] | None = None,
        facts: JobFacts | None = None,
        clock: Callable[[], float] = time.monotonic,
        grammar: GrammarRuntime | None = None,
        chain_steps: bool = True,
    ) -> None:
        self.executor = executor
        self.scheduler = scheduler
        self.bus = bus
        self.client = client
        client.attach(scheduler)
        self.sampler = Sampler(eos_token_ids=scheduler.eos_token_ids)
        if executor.splits_vocabulary:  # sampling rows' picks are gathered too (`StepPlan.draws`)
            scheduler.draws = self.sampler.draws
        self.grammar = grammar  # constrained decoding (rank/grammar.py); None: constrained requests fail
        self.heartbeat_interval = heartbeat_interval
        self.shutdown_timeout = shutdown_timeout
        self.request_timeout = request_timeout
        self.clock = clock
        self.step_timeout = step_timeout
        self.watchdog = watchdog
        self.rank_names = rank_names or {}
        self._shutdown_since: float | None = None
        self._stop = False
        self.steps = 0
        self.stats = ServingStats()
        self.ledger = RequestLedger(self.stats)
        self.health = HealthTable(clock, timeout=max(5.0, 3 * heartbeat_interval))
        self.reporter = Reporter(0, "", interval=min(1.0, heartbeat_interval))
        self._last_step_ms = 0.0
        self._burst_since: float | None = None  # when an idle engine began waiting for a burst to arrive
        self._last_arrival = -1.0  # when the last generation request was taken from the inbox
        self._rows_at = 0.0
        self._published_at = -1.0
        self._queue_rows: tuple[RequestRow, ...] = ()
        self.facts = facts or JobFacts("", bus.size, scheduler.config.context_length, time.time())
        self.pulses: PulseBook | None = None  # liveness answers outside MPI (rank/pulse.py)
        self.pulse_timeout = 5.0
        # Chained steps (`Scheduler.chain`, `StepPlan.chained`): the next plan goes out before this step
        # runs, so the followers never wait for it; only where every rank learns the picks (two ranks
        # with a vocabulary-parallel head, `Executor.chains`).
        self.chains = chain_steps and executor.chains
        self.chained_steps = 0
        self._ahead: ScheduledStep | None = None  # a plan sent, not yet run: it runs before anything else

    @property
    def shutting_down(self) -> bool:
        return self._shutdown_since is not None or self._stop

    # Called from the signal handler (main thread, between bytecodes): only set flags.
    def begin_shutdown(self) -> None:
        """Stop admitting; let in-flight requests finish for up to `shutdown_timeout`, then stop the job.
        (An operator's /admin/drain only pauses admission: `EngineClient.admission_paused`.)"""
        if self._shutdown_since is None:
            self._shutdown_since = self.clock()
        self.client.set_state(EngineState.SHUTTING_DOWN)

    def request_stop(self) -> None:
        self._stop = True
        self.client.set_state(EngineState.SHUTTING_DOWN)

    def run(self) -> int:
        self.client.set_state(EngineState.READY)
        last_sent = self.clock()
        try:
            while True:
                now = self.clock()
                self._take_inbox(now)
                self._expire(now)
                if self._ahead is not None:  # sent before the last step ran: the followers are running it
                    step, self._ahead = self._ahead, None
                    plan = step.plan
                    self._collect_reports(now)
                    if self.watchdog is not None:
                        self.watchdog.enter(f"step {plan.step}")
                else:
                    if self._should_exit(now):
                        break
                    self._collect_reports(now)
                    if not self.scheduler.has_work():
                        self._publish(now)
                        if now - last_sent >= self.heartbeat_interval:
                            self._send(Heartbeat(self.steps, time.time()), "an idle heartbeat")
                            self._leave()
                            last_sent = now
                        self.client.wait(min(self.heartbeat_interval, 0.25))
                        continue
                    if self._gathers_burst(now):
                        self.client.wait(BURST_POLL_S)
                        continue
                    self._burst_since = None
                    step = self.scheduler.schedule()
                    plan = step.plan
                    self._send(plan, f"step {plan.step}")
                last_sent = self.clock()
                # (not while stopping: the loop checks whether to stop between plans it has not sent)
                if self.chains and not self.shutting_down and not self.client.has_commands():
                    self._ahead = self.scheduler.chain(step)
                    if self._ahead is not None:  # out before this step runs: no rank waits for it
                        self._send(self._ahead.plan, f"step {self._ahead.plan.step}", watch=False)
                        self.chained_steps += 1
                self._deliver(self._step(step))
                self._leave()
                took = self.clock() - last_sent
                self._last_step_ms = took * 1000
                if self.scheduler.spec is not None and plan.decode_ids:
                    widths = sum(1 + len(d) for d in plan.decode_drafts) or len(plan.decode_ids)
                    positions = widths + sum(len(c.tokens) for c in plan.prefill)
                    self.scheduler.spec.timed(positions, took * 1000)
                self._publish(self.clock())
                if log.isEnabledFor(logging.DEBUG):
                    gather = " (chained)" if plan.chained else ""
                    gather += " (sampled picks)" if plan.draws else ""
                    gather += f" (top-{plan.topk} gather)" if plan.topk and self.executor.splits_vocabulary else ""
                    log.debug(
                        "step %d%s: %.0f ms, %d admitted, %d prompt tokens in %d chunks, %d decoded",
                        plan.step,
                        gather,
                        took * 1000,
                        len(plan.admit),
                        sum(c.end - c.start for c in plan.prefill),
                        len(plan.prefill),
                        len(plan.decode_ids),
                    )
        except BusError as exc:
            return self._fail(f"control bus failure: {exc}")
        except EngineError as exc:
            return self._fail(str(exc))
        except Exception as exc:
            dead = self.bus.failed_ranks() if self.bus.size > 1 else []
            if dead:
                names = ", ".join(self.rank_name(r) for r in dead)
                for r in dead:
                    self.health.mark_dead(r, f"process died ({exc})")
                return self._fail(f"{names} died: {exc}")
            log.exception("engine step failed")
            return self._fail(f"engine failure: {type(exc).__name__}: {exc}")
        self.client.set_state(EngineState.STOPPED)
        self.bus.send(Shutdown(0, "rank 0 stopped"))
        self.bus.close()
        return 0

    def _gathers_burst(self, now: float) -> bool:
        """An idle engine with requests waiting while the HTTP side still prepares more (a burst: agents'
        parallel calls, a batch client): wait up to BURST_WAIT_S for them, so they start in one prefill
        step instead of the first one alone and the rest a whole step later (the first step on a CPU is
        0.3-0.4 s of the embedded model's prefill). A lone request waits BURST_QUIET_S."""
        if self.scheduler.num_running or not self.scheduler.num_waiting:
            return False
        if not self.client.preparing() and now - self._last_arrival >= BURST_QUIET_S:
            return False
        if self.scheduler.num_waiting >= self.scheduler.config.max_batch:
            return False
        if self._burst_since is None:
            self._burst_since = now
        return now - self._burst_since < BURST_WAIT_S

    def _send(self, message: StepPlan | Heartbeat, label: str, watch: bool = True) -> None:
        """Broadcast; a message without collectives (a heartbeat, a plan with no forward pass) then waits
        until every rank has it, so a dead or hung follower is named within the step timeout. `watch`:
        the watchdog times it from now (a chained plan's time starts when rank 0 runs it)."""
        if self.watchdog is not None and watch:
            self.watchdog.enter(label)
        self.bus.send(message)
        if isinstance(message, StepPlan) and (message.prefill or message.decode_ids):
            # Its forward pass starts with a collective that waits for every rank anyway, so rank 0 starts
            # its first layer instead of waiting (across hosts the round trip overlaps the wait for the
            # followers' first contribution: measured, no change per token). A rank that never arrives
            # hangs the step, which the watchdog ends (naming it from the pulses and the
            # acknowledgements, read here as they come).
            self.bus.await_acks(0.0)
            return
        missing = self.bus.await_acks(self.step_timeout)
        if missing:
            names = ", ".join(self.rank_name(r) for r in missing)
            raise EngineError(
                f"{names} did not receive {label} within {self.step_timeout:g} s (hung or dead)"
            )

    def _leave(self) -> None:
        if self.watchdog is not None:
            self.watchdog.leave()

    def describe_ranks(self) -> str:
        """For the watchdog's message: who answers liveness pings, and what each follower last received."""
        acks = self.bus.last_acks()
        parts = [f"{self.rank_name(r)} last received message {seq}" for r, seq in sorted(acks.items())]
        if self.pulses is not None:
            # Pings go out 10 times a second: a rank silent for a second while others answer is the one.
            parts.insert(0, self.pulses.describe(min(1.0, self.pulse_timeout)))
        return "; ".join(parts) or "single rank"

    def hung_ranks(self, step_seconds: float) -> list[str]:
        """Called by the watchdog (its own thread): followers silent for the pulse timeout while a step
        has been stuck at least that long. Either alone is no proof (a long step; a lost datagram)."""
        if self.pulses is None:
            return []
        # A dead process is also an MPI error, which names it better ("died", ULFM): give that 2 s.
        gone = self.pulses.gone_ranks() if step_seconds >= 2.0 else []
        silent = self.pulses.silent(self.pulse_timeout) if step_seconds >= self.pulse_timeout else []
        return [f"{self.rank_name(r)} died" for r in gone] + [
            f"{self.rank_name(r)} hung" for r in silent if r not in gone
        ]

    def rank_name(self, rank: int) -> str:
        return self.rank_names.get(rank, f"rank {rank}")

    def _collect_reports(self, now: float) -> None:
        ssd = self.scheduler.prefix_cache.ssd if self.scheduler.prefix_cache is not None else None
        for report in self.bus.poll_reports():
            self.health.update(report)
            if ssd is not None and (report.ssd_written or report.ssd_dropped):
                ssd.write_results(report.rank, report.ssd_written, report.ssd_dropped)
        if ssd is not None and self.executor.ssd is not None:
            outcomes = self.executor.ssd.take_outcomes()
            if outcomes.written or outcomes.dropped:
                ssd.write_results(0, outcomes.written, outcomes.dropped)
        if self.reporter.due(now):
            self.reporter.last_sent = now
            kv_blocks = len(self.executor.blocks)
            report = self.reporter.build(
                self.steps, self._last_step_ms, kv_blocks, kv_blocks * self.executor.block_bytes
            )
            self.health.update(report)
        if now - self._rows_at >= 0.25:
            self._rows_at = now
            self._queue_rows = self.ledger.rows(self.scheduler.queue(), now)

    def _publish(self, now: float) -> None:
        """The job's view for /health, /metrics, /admin/state and the dashboard: at most 10 times a second
        (a step can take 5 ms; nobody reads faster than that), and on every idle pass."""
        if now - self._published_at < 0.1 and self.scheduler.has_work():
            return
        self._published_at = now
        pc = self.scheduler.prefix_cache
        tiers: list[Any] = [] if pc is None else [pc.index.stats] + ([pc.ssd] if pc.ssd is not None else [])
        self.client.publish(
            capture(
                facts=self.facts,
                engine_state=self.client.state.value,
                admission_paused=self.client.admission_paused,
                failure=self.client.failure,
                running=self.scheduler.num_running,
                waiting=self.scheduler.num_waiting,
                max_batch=self.scheduler.config.max_batch,
                sequences_on_ranks=self.executor.num_sequences,
                steps=self.steps,
                last_step_ms=self._last_step_ms,
                stats=self.stats,
                queue=self._queue_rows,
                tiers=tiers,
                ranks=self.health.snapshot(),
                now_unix=time.time(),
                adapters=self.scheduler.adapters.rows() if self.scheduler.adapters is not None else (),
                chained_steps=self.chained_steps,
            )
        )

    def _step(self, step: ScheduledStep) -> list[Emit]:
        plan = step.plan
        # the constrained rows' masks fill on the grammar's worker while the forward pass runs
        job = self.grammar.start(step.rows) if self.grammar is not None else None
        out = self.executor.execute(plan)
        masks = job.join() if job is not None else None
        for seq_id, entries in out.prompt_logprobs:
            self.scheduler.record_prompt_logprobs(seq_id, entries)
        if plan.ssd_load and self.scheduler.prefix_cache is not None:
            failed = set(out.ssd_failed)
            for result in self.bus.gather(SsdLoadResult):
                failed.update(result.failed)
            self.scheduler.prefix_cache.ssd_results(failed)
        self.steps += 1
        if not out.row_ids or (out.logits is None and out.picks is None):
            return self.scheduler.update(step, ())
        expected = [r.seq_id for r, w in zip(step.rows, step.widths, strict=True) for _ in range(w)]
        if out.row_ids != expected:
            raise EngineError(f"step {plan.step}: the executor's rows differ from the scheduler's")
        runs: list[Any]
        if out.picks is not None:  # an argmax plan: the ranks sent each row's pick (rank/executor.py)
            runs = Sampler.runs_of_picks(out.picks, step.drafts or ((),) * len(step.rows))
            sampled = [run[0] for run in runs]
            if step.drafts:
                self._speculated(step, runs)
            return self.scheduler.update(step, runs)  # no grammar: argmax plans have no constrained row
        assert out.logits is not None
        if step.drafts:  # speculation: each row's run of accepted drafts and one more token
            runs = self.sampler.sample_runs(step.rows, out.logits, step.drafts, masks)
            sampled = [run[0] for run in runs]
            self._speculated(step, runs)
        else:
            runs = sampled = self.sampler.sample(step.rows, out.logits, masks)
        emits = self._grammar_ends(step, masks, sampled)
        if masks is not None and self.grammar is not None:
            self.grammar.consume(step.rows, [t.token_id for t in sampled], masks)
        return emits + self.scheduler.update(step, runs)

    def _speculated(self, step: ScheduledStep, runs: list[tuple[SampledToken, ...]]) -> None:
        drafted = sum(len(d) for d in step.drafts)
        self.stats.speculated(drafted, sum(len(run) - 1 for run in runs), sum(1 for d in step.drafts if d))

    def _grammar_ends(
        self, step: ScheduledStep, masks: StepMasks | None, sampled: list[SampledToken]
    ) -> list[Emit]:
        """Finish the rows whose constraint allows no token (their sampled token is dropped: the
        scheduler skips finished rows), and constrained rows on a leader without a grammar engine.
        A complete grammar allows EOS alone: that EOS ends the request even under ignore_eos or before
        min_tokens, which would otherwise repeat it until max_tokens."""
        dead = dict(masks.dead) if masks is not None else {}
        if self.grammar is None:
            missing = "this server has no grammar engine"
            dead.update({i: missing for i, r in enumerate(step.rows) if r.constraint is not None})
        emits: list[Emit] = []
        for row in masks.rows if masks is not None else ():
            req = step.rows[row]
            matcher: Any = req.matcher
            if row in dead or matcher is None or sampled[row].token_id not in self.sampler.eos_token_ids:
                continue
            eos_is_text = req.sampling.ignore_eos or len(req.output) < req.sampling.min_tokens
            if eos_is_text and matcher.is_stopped():
                emits += self.scheduler.end(req.request_id, FinishReason.STOP)
        for row, why in dead.items():
            req = step.rows[row]
            log.info("%s: finished by its constraint: %s", req.request_id, why)
            for emit in self.scheduler.end(req.request_id, FinishReason.GRAMMAR_ERROR):
                emit[1].error = why
                emits.append(emit)
        return emits

    def _take_inbox(self, now: float) -> None:
        emits: list[Emit] = []
        with self.client.taking() as commands:
            for cmd in commands:
                if isinstance(cmd, Cancel):
                    emits += self.scheduler.cancel(cmd.request_id)
                elif isinstance(cmd, ClearCache):
                    dropped = self.scheduler.clear_prefix_cache(cmd.tier)
                    log.info("operator cleared the %s tier: %d blocks dropped", cmd.tier, dropped)
                else:
                    if cmd.arrival == 0.0:
                        cmd.arrival = now
                    self._last_arrival = now
                    self.ledger.arrived(self.scheduler.add(cmd))
                    if cmd.constraint is not None and self.grammar is not None:
                        self.grammar.prepare(cmd.constraint.grammar)
        self._deliver(emits)

    def _expire(self, now: float) -> None:
        if not self.request_timeout:
            return
        emits: list[Emit] = []
        for req in self.scheduler.older_than(now - self.request_timeout):
            for emit in self.scheduler.cancel(req.request_id, FinishReason.ERROR):
                emit[1].error = f"request timed out after {self.request_timeout:g} s"
                emit[1].error_type = "timeout"
                emits.append(emit)
        self._deliver(emits)

    def _should_exit(self, now: float) -> bool:
        if self._stop:
            return True
        if self._shutdown_since is None:
            return False
        if not self.scheduler.has_work() and self.client.waiting == 0:
            return True
        if now - self._shutdown_since > self.shutdown_timeout:
            self._deliver(
                self.scheduler.fail_all("the server is shutting down (drain timeout)", "unavailable")
            )
            # Release what the ranks hold so the final state is clean, then stop.
            if self.scheduler.has_work():
                plan = self.scheduler.schedule().plan
                self.bus.send(plan)
                self.executor.execute(plan)
            return True
        return False

    def _deliver(self, emits: list[Emit]) -> None:
        if not emits:
            return
        now, now_unix = self.clock(), time.time()
        for req, event in emits:
            if event.finished:
                req.matcher = None  # the grammar's state goes with the request, whatever ended it
            self.ledger.on_event(req, event, now, now_unix)
            _safe_send(req, event)

    def _fail(self, message: str) -> int:
        log.error("%s; failing all requests and stopping the job", message)
        self.client.set_state(EngineState.FAILED, message)
        self._deliver(self.scheduler.fail_all(message))
        self.client.fail_live(message)  # what is still in the inbox
        return 1


def _safe_send(req: Request, event: RequestEvent) -> None:
    try:
        req.sink(event)
    except Exception:  # a broken sink (closed loop) must never take the engine down
        log.debug("dropping event for %s: sink failed", req.request_id, exc_info=True)
