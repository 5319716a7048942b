"""Sampling defaults from generation_config.json (api/defaults.py) and the route's settings built from a
body (api/sampling.py), without a model: what a request omits takes the model's value, what it sends
wins, and a file with values no request could ask for does not turn every request into a 400."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from api.defaults import SamplingDefaults, defaults_from, load_defaults
from api.errors import APIError
from api.sampling import MAX_WARNED_FIELDS, build_sampling, check_sampling, warn_unknown_fields
from api.schemas import CompletionRequest
from api.service import Service
from cluster.config import ServingConfig, ServingLimits
from cluster.engine_client import EngineClient


class _Codec:
    vocab_size = 100


def service(defaults: SamplingDefaults) -> Service:
    config = ServingConfig("m", 1000, limits=ServingLimits(max_tokens=300, default_max_tokens=50))
    return Service(EngineClient(max_waiting=4), _Codec(), config, 100, defaults=defaults)  # type: ignore[arg-type]


def settings(svc: Service, prompt_len: int = 10, **body: object) -> object:
    req = CompletionRequest.model_validate({"prompt": "x", **body})
    checked = check_sampling(svc, req, req.max_tokens)
    return build_sampling(svc, req, checked, prompt_len, req.max_tokens, None)


def test_generation_config_values_fill_omitted_fields_only(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {"temperature": 0.2, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_new_tokens": 64}
        )
    )
    d = load_defaults(tmp_path)
    assert d.as_dict() == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 20,
        "repetition_penalty": 1.1,
        "max_tokens": 64,
    }
    assert "temperature=0.2" in d.describe() and str(tmp_path) in d.describe()
    svc = service(d)
    s = settings(svc)
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.max_tokens) == (0.2, 0.9, 20, 1.1, 64)  # type: ignore[attr-defined]
    s = settings(svc, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=5, repetition_penalty=1.0)
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.max_tokens) == (1.0, 1.0, 0, 1.0, 5)  # type: ignore[attr-defined]
    s = settings(svc, prompt_len=990)  # the default max_tokens is cut to what the context leaves
    assert s.max_tokens == 10  # type: ignore[attr-defined]
    assert load_defaults(tmp_path, "vllm") == SamplingDefaults()


def test_no_file_or_a_bad_file_means_openais_defaults(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert load_defaults(tmp_path) == SamplingDefaults()
    s = settings(service(load_defaults(tmp_path)))
    assert (s.temperature, s.top_p, s.max_tokens) == (1.0, 1.0, 50)  # type: ignore[attr-defined]
    (tmp_path / "generation_config.json").write_text("{not json")
    assert load_defaults(tmp_path) == SamplingDefaults()
    with caplog.at_level(logging.WARNING, "orchard.api"):
        d = defaults_from(
            {"temperature": 5, "top_p": 0, "top_k": 1.5, "min_p": True, "max_new_tokens": 0}, "cfg"
        )
    assert d == SamplingDefaults() and caplog.text.count("ignoring") == 5


def test_extension_fields_reach_the_engine_and_are_checked() -> None:
    svc = service(SamplingDefaults())
    s = settings(
        svc,
        ignore_eos=True,
        min_tokens=3,
        max_tokens=8,
        stop_token_ids=[5, 7, 5],
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        seed=9,
    )
    assert (s.ignore_eos, s.min_tokens, s.stop_token_ids) == (True, 3, (5, 7))  # type: ignore[attr-defined]
    assert s.include_stop_str_in_output and not s.skip_special_tokens  # type: ignore[attr-defined]
    assert s.seed == 9  # type: ignore[attr-defined]
    for bad, param in (
        ({"stop_token_ids": [100]}, "stop_token_ids"),
        ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
        ({"min_tokens": 301}, "min_tokens"),
        ({"min_tokens": 60}, "min_tokens"),  # over the default max_tokens (50)
    ):
        with pytest.raises(APIError) as err:
            settings(svc, **bad)
        assert err.value.status == 400 and err.value.param == param


def test_unknown_fields_are_logged_once_per_name_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "orchard.api"):
        for _ in range(3):
            warn_unknown_fields(
                CompletionRequest.model_validate({"prompt": "x", "zz_once": 1}), "/v1/completions"
            )
        for i in range(MAX_WARNED_FIELDS + 50):
            warn_unknown_fields(
                CompletionRequest.model_validate({"prompt": "x", f"zz_{i}": 1}), "/v1/completions"
            )
    assert caplog.text.count("'zz_once'") == 1
    assert len(caplog.records) <= MAX_WARNED_FIELDS + 1
    assert "no longer logged" in caplog.records[-1].getMessage()


def test_the_kv_budget_caps_a_default_max_tokens_and_refuses_what_never_fits() -> None:
    from cluster.memory import GIB, KvCost, KvMemory

    mem = KvMemory(KvCost(token_bytes=1 << 20), budget_bytes=2 * GIB, context_length=32768)
    config = ServingConfig(
        "m", 32768, limits=ServingLimits(max_tokens=4096, default_max_tokens=2048), memory=mem
    )
    svc = Service(EngineClient(max_waiting=4), _Codec(), config, 100)  # type: ignore[arg-type]
    assert settings(svc, prompt_len=1000).max_tokens == 792  # type: ignore[attr-defined]  # kv_room, not 2048
    with pytest.raises(APIError) as err:
        settings(svc, prompt_len=1000, max_tokens=1000)
    assert err.value.code == "kv_budget_exceeded" and "--kv-budget" in err.value.message
