"""benchmarks/compare.py's batching check: a peer that did not batch is marked INVALID, and a burst on a
shared document (whose single streams then run against a warm prompt cache) is judged by decode rates."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from compare import batching_verdict  # noqa: E402


def test_a_sequential_server_is_invalid_by_either_rate() -> None:
    # one stream at a time: the streams never overlap
    v = batching_verdict(13.0, 13.2, 1, 8, 76.0, 75.0)
    assert not v["valid"] and "no two requests" in v["invalid_reason"]
    # interleaved but not batched: 8 streams each 8x slower decode no faster than one
    v = batching_verdict(13.0, 13.2, 8, 8, 600.0, 75.0)
    assert not v["valid"] and "decode no faster" in v["invalid_reason"]
    # without the decode figures, the output rates decide
    assert not batching_verdict(13.0, 13.2, 8, 8)["valid"]


def test_a_cold_shared_document_burst_that_batched_is_valid() -> None:
    """mlx_lm.server on the shared document (session 5): 2.49 tok/s at 8 concurrent (its burst prefilled
    8 copies of the document) against 10.62 tok/s for single streams with the document cached; its 8
    streams decoded at once at 248 ms a token against 94 ms alone: 2.75x, it batched."""
    v = batching_verdict(2.49, 10.62, 8, 8, 248.2, 90.2)
    assert v["valid"] and v["decode_batching_gain"] == 2.91 and v["batching_gain"] == 0.23


def test_repeated_runs_report_medians_and_every_run() -> None:
    from compare import median_of

    runs = [
        {"output_tok_s": 44.0, "errors": 0, "itl_p50_ms": 95.0, "model": "m", "peak_decoding_streams": 8},
        {"output_tok_s": 49.0, "errors": 1, "itl_p50_ms": 90.0, "model": "m", "peak_decoding_streams": 8},
        {"output_tok_s": 46.0, "errors": 0, "itl_p50_ms": 91.0, "model": "m", "peak_decoding_streams": 7},
    ]
    m = median_of(runs)
    assert m["output_tok_s"] == 46.0 and m["itl_p50_ms"] == 91.0 and m["peak_decoding_streams"] == 8
    assert m["errors"] == 1 and m["repeats"] == 3 and m["model"] == "m"
    assert m["output_tok_s_runs"] == [44.0, 49.0, 46.0]
    assert median_of(runs[:1]) is runs[0]
