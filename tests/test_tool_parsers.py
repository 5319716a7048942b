"""Tool-call parsers of each family against recorded outputs (written here in each family's format, with
parallel and malformed calls): the calls, content and reasoning they give; the same from a stream cut
into chunks of every size (joined argument fragments equal the whole text's arguments); the format
chosen from real chat templates; and the native-format grammars: each compiles with llguidance, accepts
the format's own calls, and what a random walk through it writes parses back into valid calls."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from api.tools import (
    FORMATS,
    Delta,
    Hermes,
    Mistral,
    OutputParser,
    Parsed,
    SmolLM2,
    ToolFormat,
    prompt_opens_thinking,
    tool_format_for,
)

TEMPLATES = Path(__file__).parent / "data" / "templates"
WEATHER_ARGS = '{"city": "Paris"}'
TIME_ARGS = '{"zone": "CET"}'
NAMES = {"get_weather", "get_time"}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"enum": ["c", "f"]},
                    "days": {"type": "integer"},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {
                    "q": {"type": "string"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["q", "tags"],
            },
        },
    },
]

# (format, text, expected content, expected reasoning, expected [(name, arguments)]).
RECORDED: list[tuple[str, str, str | None, str | None, list[tuple[str, str]]]] = [
    # Qwen 3: thinking, then parallel calls.
    (
        "hermes",
        '<think>\nThe user wants weather and time.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
        None,
        "The user wants weather and time.",
        [("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)],
    ),
    # Qwen 2.5: words before the call; no closing tag at the end (stopped at EOS).
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "Let me check.\n",
        None,
        [("get_weather", WEATHER_ARGS)],
    ),
    # Hermes 2 Pro: arguments before the name, arguments as a JSON string.
    (
        "hermes",
        '<tool_call>\n{"arguments": "{\\"city\\": \\"Paris\\"}", "name": "get_weather"}\n</tool_call>',
        None,
        None,
        [("get_weather", WEATHER_ARGS)],
    ),
    # Malformed: broken JSON, then an unknown tool; both stay content, the good call is kept.
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par</tool_call>\n<tool_call>\n{"name": "launch", '
        '"arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par</tool_call>\n<tool_call>\n{"name": '
        '"launch", "arguments": {}}\n</tool_call>\n',
        None,
        [("get_time", TIME_ARGS)],
    ),
    # A plain answer that mentions tags and braces.
    ("hermes", "Use <tool_ to call. {x}", "Use <tool_ to call. {x}", None, []),
    # Thinking that never ends (max_tokens): all reasoning.
    ("hermes", "<think>\nStill thinking about <tool_call>", "", "Still thinking about <tool_call>", []),
    # SmolLM2: one block holding a list (its trained format), parallel.
    (
        "smollm2",
        '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}},\n{"name": "get_time", "arguments": '
        '{"zone": "CET"}}\n]</tool_call>',
        None,
        None,
        [("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)],
    ),
    (
        "smollm2",
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}]</tool_call>',
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}]</tool_call>',
        None,
        [],
    ),
    ("smollm2", "The capital of France is Paris.", "The capital of France is Paris.", None, []),
    ("smollm2", "No tool fits.\n<tool_call>[]</tool_call>", "No tool fits.\n", None, []),  # its "no call"
    # Llama 3.x JSON: bare, parallel with ";", after <|python_tag|>, a JSON answer that is no call.
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        None,
        [("get_weather", WEATHER_ARGS)],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"zone": "CET"}}',
        None,
        None,
        [("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}',
        None,
        None,
        [("get_time", TIME_ARGS)],
    ),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', None, []),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": ',
        '{"name": "get_weather", "parameters": {"city": ',
        None,
        [],
    ),
    (
        "llama3_json",
        '<|python_tag|>brave_search.call(query="x")',
        '<|python_tag|>brave_search.call(query="x")',
        None,
        [],
    ),
    ("llama3_json", "Sure: {not json}", "Sure: {not json}", None, []),
    # Mistral: list form (with ids), name/[ARGS] form (with [CALL_ID]), words first, malformed.
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}, {"name": "get_time", '
        '"arguments": {"zone": "CET"}, "id": "ghi456jkl"}]',
        None,
        None,
        [("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)],
    ),
    (
        "mistral",
        'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]x1y2z3w4v[ARGS]{"zone": "CET"}',
        "Checking.",
        None,
        [("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)],
    ),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}',
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}',
        None,
        [],
    ),
    ("mistral", "[TOOL_CALLS]get_weather{}", "[TOOL_CALLS]get_weather{}", None, []),
    # Pythonic: Llama 3.2 bare list, LFM2 markers, JSON literals, malformed (positional, unknown, eval bait).
    (
        "pythonic",
        "[get_weather(city=\"Paris\"), get_time(zone='CET')]",
        None,
        None,
        [("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)],
    ),
    (
        "pythonic",
        '<|tool_call_start|>[search(q="a, b]", tags=["x", "y"])]<|tool_call_end|>Searching.',
        "Searching.",
        None,
        [("search", '{"q": "a, b]", "tags": ["x", "y"]}')],
    ),
    (
        "pythonic",
        '[get_weather(city="Paris", days=null)]',
        None,
        None,
        [("get_weather", '{"city": "Paris", "days": null}')],
    ),
    (  # brackets and quotes inside strings: a triple-quoted one, escaped quotes
        "pythonic",
        r"""[search(q='''it's "x" ]''', tags=["a\"]", 'b\'(']), get_time()]""",
        None,
        None,
        [("search", json.dumps({"q": 'it\'s "x" ]', "tags": ['a"]', "b'("]})), ("get_time", "{}")],
    ),
    ("pythonic", '[get_weather("Paris")]', '[get_weather("Paris")]', None, []),
    ("pythonic", "[__import__('os').system('x')]", "[__import__('os').system('x')]", None, []),
    ("pythonic", "[get_weather(city=open('x').read())]", "[get_weather(city=open('x').read())]", None, []),
    ("pythonic", "[1] See the docs.", "[1] See the docs.", None, []),
]


def stream(
    fmt: ToolFormat, chunks: list[str], reasoning: bool = True, names: set[str] = NAMES
) -> list[Delta]:
    parser = OutputParser(fmt, tools=True, reasoning=reasoning, tool_names=names)
    out: list[Delta] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out + parser.finish()


def joined(deltas: list[Delta]) -> tuple[str, str, list[tuple[str, str]]]:
    content = "".join(d.text for d in deltas if d.kind == "content")
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if d.kind == "tool_call":
            if d.name is not None:
                assert d.index not in calls and d.id and d.text == ""  # the first delta of a call
                calls[d.index] = [d.name, ""]
            else:
                calls[d.index][1] += d.text
    assert sorted(calls) == list(range(len(calls)))
    return content, reasoning, [(n, a) for n, a in (calls[i] for i in range(len(calls)))]


@pytest.mark.parametrize("case", range(len(RECORDED)))
def test_recorded_outputs(case: int) -> None:
    name, text, content, reasoning, calls = RECORDED[case]
    fmt = FORMATS[name]()
    parsed = OutputParser(fmt, tools=True, reasoning=True, tool_names=NAMES | {"search"}).parse(text)
    assert (parsed.content, parsed.reasoning) == (content, reasoning)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
    for c in parsed.tool_calls:
        assert (len(c.id) == 9 and c.id.isalnum()) if name == "mistral" else c.id.startswith("call_")
    # Every split into chunks of n characters, and random splits: the same as the whole.
    want = (parsed.content or "", parsed.reasoning or "", calls)
    for n in range(1, len(text) + 1):
        deltas = stream(fmt, [text[i : i + n] for i in range(0, len(text), n)], names=NAMES | {"search"})
        assert joined(deltas) == want, n
    rng = random.Random(case)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert joined(stream(fmt, chunks, names=NAMES | {"search"})) == want


def test_content_streams_before_the_call_and_markers_are_held() -> None:
    fmt = Hermes()
    parser = OutputParser(fmt, tools=True, reasoning=False, tool_names=NAMES)
    assert parser.feed("Let me check") == [Delta("content", "Let me check")]
    assert parser.feed(" now.\n<tool_") == [Delta("content", " now.\n")]  # "<tool_" may start a call
    assert parser.feed('call>\n{"name": "get_time", "argu') == []
    first, args = parser.feed('ments": {"zone": "CET"}}\n</tool_call>')
    assert (first.kind, first.index, first.name, first.text) == ("tool_call", 0, "get_time", "")
    assert (args.kind, args.index, args.name, args.text) == ("tool_call", 0, None, TIME_ARGS)
    assert parser.finish() == []
    parser = OutputParser(fmt, tools=True, reasoning=False, tool_names=NAMES)
    assert parser.feed("a <tool_") == [Delta("content", "a ")]
    assert parser.finish() == [Delta("content", "<tool_")]  # never dropped


def test_reasoning_switch_and_prompt_opened_thinking() -> None:
    text = "<think>\nhmm\n</think>\n\nParis."
    assert Hermes().parse(text) == Parsed(
        "<think>\nhmm\n</think>\n\nParis.", None, ()
    )  # template has no <think>
    on = OutputParser(None, tools=False, reasoning=True, tool_names=set()).parse(text)
    assert on == Parsed("Paris.", "hmm", ())
    off = OutputParser(None, tools=False, reasoning=False, tool_names=set()).parse(text)
    assert off == Parsed(text, None, ())
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    opened = OutputParser(Hermes(), True, True, NAMES, thinking_open=True)
    assert opened.parse("so the zone is CET\n</think>\n\nIt is noon.") == Parsed(
        "It is noon.", "so the zone is CET", ()
    )
    assert OutputParser(None, False, True, set()).parse("  hi ") == Parsed("  hi ", None, ())


def test_tools_off_and_any_name() -> None:
    text = '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>'
    assert OutputParser(Hermes(), tools=False, reasoning=False, tool_names=NAMES).parse(text).content == text
    assert OutputParser(Hermes(), tools=True, reasoning=False, tool_names=NAMES).parse(text).tool_calls == ()
    anyname = OutputParser(Hermes(), tools=True, reasoning=False, tool_names=set()).parse(text)
    assert [(c.name, c.arguments) for c in anyname.tool_calls] == [("other", "{}")]


@pytest.fixture(scope="module")
def smollm_template(cache_dir: Path) -> str:
    from rank.models import resolve_model
    from rank.tokenizer import ChatTokenizer

    template = ChatTokenizer(resolve_model(None, cache_dir, print)).chat_template
    assert template is not None
    return template


def test_format_from_template(smollm_template: str) -> None:
    chosen = {
        f: tool_format_for((TEMPLATES / f).read_text())
        for f in sorted(p.name for p in TEMPLATES.glob("*.jinja"))
    }
    assert {f: (type(c).name, c.template_tools, c.thinks) for f, c in chosen.items()} == {
        "llama-3.2-3b-instruct.jinja": ("llama3_json", True, False),
        "llama-3.3-70b-instruct.jinja": ("llama3_json", True, False),
        "mistral-nemo-instruct-2407.jinja": ("mistral", True, False),
        "qwen3-0.6b.jinja": ("hermes", True, True),
        "vllm-hermes.jinja": ("hermes", True, False),
        "vllm-llama3.2-pythonic.jinja": ("pythonic", True, False),
    }
    assert not chosen["mistral-nemo-instruct-2407.jinja"].named  # type: ignore[attr-defined]
    assert Mistral(named=True).named and tool_format_for("x [TOOL_CALLS] [ARGS]").named  # type: ignore[attr-defined]
    embedded = tool_format_for(smollm_template)
    assert isinstance(embedded, SmolLM2) and not embedded.template_tools
    assert type(tool_format_for(smollm_template, "pythonic")).name == "pythonic"
    with pytest.raises(ValueError, match="unknown tool parser 'nope'"):
        tool_format_for(smollm_template, "nope")


def test_smollm2_prompt_and_history(smollm_template: str) -> None:
    """The embedded model's template knows no tools: its trained system prompt goes first, past calls
    are written in its format and results become user turns; formats whose template renders tools
    leave the messages alone."""
    fmt = tool_format_for(smollm_template)
    prompt = fmt.system_prompt(TOOLS[:1])
    assert prompt is not None and prompt.startswith("You are an expert in composing functions.")
    assert "<tools>" + json.dumps(TOOLS[:1]) + "</tools>" in prompt and prompt.endswith("]</tool_call>")
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": WEATHER_ARGS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = fmt.prepare_messages(history, TOOLS[:1])
    assert out[0] == {"role": "system", "content": prompt + "\n\nBe brief."}
    assert out[2] == {
        "role": "assistant",
        "content": f'<tool_call>[\n{{"name": "get_weather", "arguments": {WEATHER_ARGS}}}\n]</tool_call>',
    }
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    assert fmt.parse(out[2]["content"]).tool_calls[0].arguments == WEATHER_ARGS
    qwen = tool_format_for((TEMPLATES / "qwen3-0.6b.jinja").read_text())
    assert qwen.system_prompt(TOOLS) is None and qwen.prepare_messages(history, TOOLS) is history


# -- grammars ------------------------------------------------------------------------------------


class Walker:
    """An llguidance tokenizer on SmolLM2's vocabulary with Mistral's and Llama's call markers added as
    special tokens, and a random walk through a grammar (the stand-in for a random model)."""

    def __init__(self, tokenizer_json: Path) -> None:
        from llguidance import LLTokenizer
        from tokenizers import AddedToken, Tokenizer

        self.tok = Tokenizer.from_file(str(tokenizer_json))
        self.tok.add_special_tokens(
            [AddedToken(t, special=True) for t in ("[TOOL_CALLS]", "[ARGS]", "<|python_tag|>")]
        )
        self.specials: dict[str, int] = {
            t: self.tok.token_to_id(t) or 0 for t in ("[TOOL_CALLS]", "[ARGS]", "<|python_tag|>")
        }
        self.ll = LLTokenizer(self.tok.to_str(), eos_token=2)
        self.vocab = self.tok.get_vocab_size()
        closers = ('"', "}", "]", ")", "\n", ",")
        self.closing = np.array([any(c in self.tok.decode([i]) for c in closers) for i in range(self.vocab)])
        self.closing[2] = True  # EOS

    def matcher(self, grammar: str) -> Any:
        from llguidance import LLMatcher

        m = LLMatcher(self.ll, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def accepts(self, grammar: str, text: str) -> bool:
        m = self.matcher(grammar)
        return (
            bool(m.consume_tokens(self.tok.encode(text, add_special_tokens=False).ids)) and m.is_accepting()
        )

    def walk(self, grammar: str, rng: random.Random, limit: int = 1000) -> str:
        m = self.matcher(grammar)
        ids: list[int] = []
        for _ in range(limit):
            if m.is_stopped():
                break
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = np.nonzero(bits[: self.vocab])[0]
            assert len(allowed), m.get_error()
            think_end = self.tok.encode("</think>", add_special_tokens=False).ids
            if rng.random() < 0.1 and m.validate_tokens(think_end) == len(think_end):  # a walk ends thinking
                assert m.consume_tokens(think_end)
                ids += think_end
                continue
            closing = allowed[self.closing[allowed]]
            pick = int(rng.choice(closing if len(closing) and rng.random() < 0.85 else allowed))
            assert m.consume_token(pick), m.get_error()
            if pick == 2:
                break
            ids.append(pick)
        assert m.is_accepting() or m.is_stopped(), "the walk did not finish"
        return str(self.tok.decode(ids, skip_special_tokens=False))


@pytest.fixture(scope="module")
def walker(cache_dir: Path) -> Walker:
    from rank.models import resolve_model

    return Walker(resolve_model(None, cache_dir, print) / "tokenizer.json")


def formats_under_test(specials: dict[str, int]) -> list[ToolFormat]:
    return [
        Hermes(),
        Hermes(thinks=True),
        SmolLM2(),
        FORMATS["llama3_json"](),
        Mistral(specials=specials),
        Mistral(named=True, specials=specials),
        FORMATS["pythonic"](),
    ]


NATIVE = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    "smollm2": '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}},\n{"name": "get_time", "arguments": {}}\n]</tool_call>',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]',
    "mistral_named": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',
    "pythonic": '[get_weather(city="Paris", days=3), get_time()]',
}


def test_grammars_accept_native_calls(walker: Walker) -> None:
    for fmt in formats_under_test(walker.specials):
        key = "mistral_named" if isinstance(fmt, Mistral) and fmt.named else type(fmt).name
        text = NATIVE[key]
        assert walker.accepts(fmt.grammar(TOOLS, "required", parallel=True), text), key
        assert not walker.accepts(fmt.grammar(TOOLS, "required", parallel=False), text), key  # two calls
        assert not walker.accepts(fmt.grammar(TOOLS, "get_time", parallel=True), text), key  # not that tool
        assert not walker.accepts(fmt.grammar(TOOLS, "required", parallel=True), "Hello"), key
    thinking = Hermes(thinks=True).grammar(TOOLS, "get_time", parallel=False)
    assert walker.accepts(
        thinking, '<think>\nhmm\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    opened = Hermes(thinks=True).grammar(TOOLS, "get_time", parallel=False, thinking="open")
    assert walker.accepts(
        opened, 'hmm\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    with pytest.raises(ValueError, match="not among the tools"):
        Hermes().grammar(TOOLS, "launch", parallel=False)


@pytest.mark.parametrize("choice", ["required", "get_weather", "search"])
@pytest.mark.parametrize("parallel", [False, True])
def test_what_grammars_generate_parses_back(walker: Walker, choice: str, parallel: bool) -> None:
    """A random walk through each grammar (a model with random weights, in effect) always writes calls
    that parse, to the chosen tool, with arguments valid against its schema: one call if not parallel."""
    rng = random.Random(f"{choice}-{parallel}")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for fmt in formats_under_test(walker.specials):
        grammar = fmt.grammar(TOOLS, choice, parallel)
        for _ in range(3):
            text = walker.walk(grammar, rng)
            parsed = OutputParser(fmt, tools=True, reasoning=fmt.thinks, tool_names=set(schemas)).parse(text)
            assert parsed.tool_calls, (type(fmt).name, text)
            assert parallel or len(parsed.tool_calls) == 1
            for c in parsed.tool_calls:
                assert choice == "required" or c.name == choice
                if type(fmt).name != "pythonic":  # pythonic forces literals, not every schema keyword
                    jsonschema.validate(json.loads(c.arguments), schemas[c.name])
                else:
                    assert set(schemas[c.name].get("required", ())) <= set(json.loads(c.arguments))
