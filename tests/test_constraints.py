"""Constrained decoding (issue #15): the real leader loop on one rank, with the embedded SmolLM2 model and
tiny random models, sampling at temperature 1. A random model writes anything it is allowed to, so a
valid output every time is the grammar's doing, not the model's."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from cluster.bus import ControlBus
from cluster.constraints import (
    Constraint,
    ConstraintError,
    check,
    grammar_constraint,
    json_object_constraint,
    json_schema_constraint,
)
from cluster.engine_client import EngineClient
from cluster.requests import Admission, FinishReason, GenerationRequest, RequestEvent, SamplingParams
from cluster.scheduler import Scheduler, SchedulerConfig
from rank.engine import Leader
from rank.executor import Executor
from rank.grammar import GrammarRuntime, StepMasks
from rank.models import load_model
from rank.tokenizer import ChatTokenizer
from rank.transport import LocalTransport
from tests.families import build

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


class GrammarEngine:
    """The leader loop in a thread, with the grammar runtime as rank/leader_setup.py builds it."""

    def __init__(self, model_dir: Path, max_batch: int = 8) -> None:
        self.model, _ = load_model(model_dir, None)
        self.tokenizer = ChatTokenizer(model_dir)
        self.client = EngineClient(max_waiting=100)
        self.executor = Executor(self.model, True, block_tokens=8)
        sched = Scheduler(
            SchedulerConfig(max_batch, 64, 2048), self.tokenizer.decode, self.tokenizer.eos_token_ids
        )
        self.grammar = GrammarRuntime(self.tokenizer)
        bus = ControlBus(LocalTransport())
        self.leader = Leader(self.executor, sched, bus, self.client, grammar=self.grammar)
        self.thread = threading.Thread(target=self.leader.run, daemon=True)
        self.thread.start()
        while self.client.state.value != "ready":
            time.sleep(0.01)

    def submit(
        self, rid: str, prompt: list[int], params: SamplingParams, constraint: Constraint | None = None
    ) -> list[RequestEvent]:
        events: list[RequestEvent] = []
        req = GenerationRequest(rid, tuple(prompt), params, sink=events.append, constraint=constraint)
        assert self.client.submit(req) is Admission.ACCEPTED
        return events

    def run(
        self, jobs: list[tuple[list[int], SamplingParams, Constraint | None]]
    ) -> list[list[RequestEvent]]:
        """Submit all at once (one batch), wait for every final event."""
        streams = [self.submit(f"r{i}-{time.monotonic_ns()}", *job) for i, job in enumerate(jobs)]
        deadline = time.monotonic() + 300
        while not all(s and s[-1].finished for s in streams):
            assert time.monotonic() < deadline, "requests did not finish"
            time.sleep(0.01)
        return streams

    def stop(self) -> None:
        self.leader.request_stop()
        self.thread.join(timeout=10)
        self.grammar.close()


def text_of(events: list[RequestEvent]) -> str:
    return "".join(e.text for e in events)


def tokens_of(events: list[RequestEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


@pytest.fixture(scope="module")
def tiny(tiny_model: Path):  # type: ignore[no-untyped-def]
    eng = GrammarEngine(tiny_model)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    eng = GrammarEngine(build("qwen3", tmp_path_factory.mktemp("fam") / "qwen3", seed=3))
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def embedded(cache_dir: Path):  # type: ignore[no-untyped-def]
    from rank.models import resolve_model

    eng = GrammarEngine(resolve_model(None, cache_dir, print), max_batch=4)
    yield eng
    eng.stop()


def _prompt(eng: GrammarEngine, text: str) -> list[int]:
    return eng.tokenizer.encode(text)


# -- validation up front --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schema",
    [
        {"type": "strin"},
        {"type": "string", "minLength": "x"},
        {"$ref": "#/definitions/nowhere"},
        {"type": "integer", "minimum": 5, "maximum": 3},
        {"type": "object", "properties": {}, "required": ["a"], "additionalProperties": False},
    ],
)
def test_invalid_schemas_are_refused(tiny: GrammarEngine, schema: dict[str, Any]) -> None:
    for strict in (False, True):
        with pytest.raises(ConstraintError, match="JSON schema"):
            check(json_schema_constraint(schema, strict), tiny.tokenizer)


def test_strict_refuses_what_it_cannot_enforce(tiny: GrammarEngine) -> None:
    schema = {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}
    check(json_schema_constraint(schema, strict=False), tiny.tokenizer)  # ignored: the rest holds
    with pytest.raises(ConstraintError, match="if"):
        check(json_schema_constraint(schema, strict=True), tiny.tokenizer)
    with pytest.raises(ConstraintError):
        json_schema_constraint(["not", "an", "object"], strict=True)  # type: ignore[arg-type]
    with pytest.raises(ConstraintError, match="grammar"):
        check(grammar_constraint("start: undefined_rule"), tiny.tokenizer)
    check(json_object_constraint(), tiny.tokenizer)
    check(grammar_constraint('start: "<tool_call>" %json{"type": "object"} "</tool_call>"'), tiny.tokenizer)


# -- the masks themselves ------------------------------------------------------------------------
def test_unpacked_mask_matches_the_bits() -> None:
    """Bit j of word w is token 32w + j, bit 31 included (a negative int32); columns past the
    tokenizer's vocabulary (a padded head) are never allowed; rows without a mask allow all."""
    rng = np.random.default_rng(0)
    vocab, width = 70, 96  # 3 words of bits; the head is padded to 96 columns
    bits = rng.integers(-(2**31), 2**31, size=(2, 3), dtype=np.int64).astype(np.int32)
    masks = StepMasks([1, 3], bits, vocab)
    box: list[np.ndarray] = []  # on another thread first, as the engine's: no op of the importing thread
    worker = threading.Thread(target=lambda: box.append(np.array(masks.penalty(4, width)) == 0))
    worker.start()
    worker.join()
    got = box[0]
    ref = np.unpackbits(bits.view(np.uint8), bitorder="little").reshape(2, 96).astype(bool)
    ref[:, vocab:] = False
    assert (got[1] == ref[0]).all() and (got[3] == ref[1]).all()
    assert got[0].all() and got[2].all()
    full = np.array(StepMasks([0, 1], bits, vocab).penalty(2, 64)) == 0  # a head narrower than the tokenizer
    assert (full == ref[:, :64]).all()


# -- outputs that parse and validate ---------------------------------------------------------------
def _check_person_runs(eng: GrammarEngine, n: int = 8) -> None:
    constraint = json_schema_constraint(PERSON, strict=True)
    check(constraint, eng.tokenizer)
    prompt = _prompt(eng, "A person as JSON:")
    jobs = [(prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=200), constraint) for i in range(n)]
    for events in eng.run(jobs):  # type: ignore[arg-type]
        assert events[-1].finish_reason is FinishReason.STOP, text_of(events)
        jsonschema.validate(json.loads(text_of(events)), PERSON)


def test_json_schema_random_model_temperature_1(tiny: GrammarEngine) -> None:
    _check_person_runs(tiny)
    assert tiny.grammar.stats.steps > 0 and tiny.grammar.stats.fill_max_s > 0


def test_json_schema_qwen3_family_temperature_1(qwen3: GrammarEngine) -> None:
    _check_person_runs(qwen3, 4)


def test_json_object_random_model_temperature_1(tiny: GrammarEngine) -> None:
    """Any object: a random model may still be inside a string at max_tokens (LENGTH); when it stops,
    the text is an object, and whatever it wrote is never malformed on the way."""
    constraint = json_object_constraint()
    jobs = [
        (_prompt(tiny, "{"), SamplingParams(temperature=1.0, seed=i, max_tokens=64, top_k=8), constraint)
        for i in range(6)
    ]
    for events in tiny.run(jobs):  # type: ignore[arg-type]
        text = text_of(events)
        assert text.startswith("{")
        assert "\n" not in text and "  " not in text.replace('"  ', "")  # whitespace is bounded
        if events[-1].finish_reason is FinishReason.STOP:
            assert isinstance(json.loads(text), dict)
        else:
            assert events[-1].finish_reason is FinishReason.LENGTH


def test_json_schema_embedded_model(embedded: GrammarEngine) -> None:
    """At temperature 1 the schema holds; json_object greedy (a 135M model at temperature 1 rambles
    inside an unbounded string until max_tokens: the random-model test covers sampling)."""
    constraint = json_schema_constraint(PERSON, strict=True)
    ask = 'Answer in JSON, like {"name": "Bob", "age": 40}. Describe a person named Ann, 31 years old.'
    prompt = embedded.tokenizer.encode_chat([{"role": "user", "content": ask}])
    jobs = [(prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=80), constraint) for i in range(2)]
    jobs.append((prompt, SamplingParams(temperature=0.0, max_tokens=80), json_object_constraint()))
    streams = embedded.run(jobs)  # type: ignore[arg-type]
    for events in streams:
        assert events[-1].finish_reason is FinishReason.STOP, text_of(events)
    for events in streams[:2]:
        jsonschema.validate(json.loads(text_of(events)), PERSON)
    assert isinstance(json.loads(text_of(streams[2])), dict)


# -- the free rows of a mixed batch ----------------------------------------------------------------
def test_free_rows_of_a_mixed_batch_get_what_they_get_alone(tiny: GrammarEngine) -> None:
    prompts = [_prompt(tiny, p) for p in ("Once upon", "The cat sat", "1, 2, 3,")]
    free = [
        SamplingParams(temperature=0.0, max_tokens=24),
        SamplingParams(temperature=1.0, seed=11, max_tokens=24),
        SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=24, logprobs=2),
    ]
    alone = [tokens_of(tiny.run([(p, s, None)])[0]) for p, s in zip(prompts, free, strict=True)]
    person = json_schema_constraint(PERSON, strict=True)
    for greedy_constrained in (False, True):
        t = 0.0 if greedy_constrained else 1.0
        mixed = [(p, s, None) for p, s in zip(prompts, free, strict=True)]
        mixed += [
            (prompts[0], SamplingParams(temperature=t, seed=i, max_tokens=200), person) for i in range(3)
        ]
        streams = tiny.run(mixed)  # type: ignore[arg-type]
        assert [tokens_of(s) for s in streams[:3]] == alone
        for s in streams[3:]:
            jsonschema.validate(json.loads(text_of(s)), PERSON)
    # greedy free rows only, next to greedy constrained ones: the batch's one-argmax path
    g = SamplingParams(temperature=0.0, max_tokens=24)
    streams = tiny.run([(prompts[1], g, None), (prompts[0], g, person)])
    assert tokens_of(streams[0]) == tokens_of(tiny.run([(prompts[1], g, None)])[0])


# -- dead ends -------------------------------------------------------------------------------------
def test_a_dead_end_finishes_with_grammar_error(tiny: GrammarEngine) -> None:
    """A grammar the matcher cannot build (never checked) and a matcher pushed into its error state
    both end the request with `grammar_error` and a reason; the free request beside them is untouched."""
    prompt = _prompt(tiny, "x")
    broken = Constraint("grammar", "start: undefined_rule")
    free = SamplingParams(temperature=0.0, max_tokens=8)
    streams = tiny.run([(prompt, SamplingParams(max_tokens=8), broken), (prompt, free, None)])
    last = streams[0][-1]
    assert last.finish_reason is FinishReason.GRAMMAR_ERROR and last.error and "undefined_rule" in last.error
    assert streams[1][-1].finish_reason is FinishReason.LENGTH
    # a grammar whose only continuation the tokenizer cannot produce as its next token
    impossible = grammar_constraint('start: "a" <[999]>', kind="grammar")
    streams = tiny.run([(prompt, SamplingParams(max_tokens=8), impossible)])
    assert streams[0][-1].finish_reason is FinishReason.GRAMMAR_ERROR


def test_min_tokens_bans_eos(tiny: GrammarEngine) -> None:
    """min_tokens bans EOS until that many tokens are out: with EOS forced by a bias, the request still
    runs to min_tokens and then stops at once."""
    eos = sorted(tiny.tokenizer.eos_token_ids)[0]
    params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=5, logit_bias=((eos, 100.0),))
    events = tiny.run([(_prompt(tiny, "hi"), params, None)])[0]
    toks = tokens_of(events)
    assert len(toks) == 6 and toks[-1] == eos and eos not in toks[:-1]
    assert events[-1].finish_reason is FinishReason.STOP


def test_a_complete_grammar_ends_the_request_despite_ignore_eos_and_min_tokens(tiny: GrammarEngine) -> None:
    """Once the JSON is complete the grammar allows EOS alone: with ignore_eos (or min_tokens to go)
    the request would repeat it until max_tokens; it ends STOP instead, the JSON whole."""
    constraint = json_schema_constraint(PERSON, strict=True)
    prompt = _prompt(tiny, "A person:")
    jobs = [
        (prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=300, ignore_eos=True), constraint),
        (prompt, SamplingParams(temperature=1.0, seed=4, max_tokens=300, min_tokens=290), constraint),
    ]
    for events in tiny.run(jobs):  # type: ignore[arg-type]
        assert events[-1].finish_reason is FinishReason.STOP
        assert events[-1].completion_tokens < 290
        jsonschema.validate(json.loads(text_of(events)), PERSON)


# -- end to end, tensor parallel -------------------------------------------------------------------
@pytest.mark.cluster
def test_json_schema_over_http_at_tp2(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """The tiny random model under TP=2, through the API and the official client: concurrent
    json_schema requests at temperature 1 parse and validate, the free one beside them equals its
    greedy output alone, and an invalid schema is a 400 naming response_format."""
    import concurrent.futures as cf

    import openai

    from tests.jobs import tiny_args

    job = job_factory.start(2, tiny_args(tiny_model), "constraints-tp2")
    client = openai.OpenAI(base_url=job.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    chat = [{"role": "user", "content": "A person, please."}]

    def constrained(seed: int) -> Any:
        return client.chat.completions.create(
            model="tiny", messages=chat, temperature=1.0, seed=seed, max_tokens=200, response_format=fmt
        )

    def free() -> str:
        r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0)
        return r.choices[0].text

    alone = free()
    with cf.ThreadPoolExecutor(5) as pool:
        answers = [pool.submit(constrained, i) for i in range(4)]
        beside = pool.submit(free)
        for fut in answers:
            choice = fut.result().choices[0]
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content or ""), PERSON)
        assert beside.result() == alone
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=chat, max_tokens=4, response_format=bad)  # type: ignore[arg-type]
    assert err.value.response.json()["error"]["param"] == "response_format"
    job.stop()
