"""benches/bench_served_kl.py without a server: reading SGLang's KL helper output, recording its
cache-assertion callbacks, and the registry's fourth server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))

import bench_served_kl as bk
import bench_served_quality as bq

# What sglang.test.kl_test_utils prints (numpy 2 scalars in the list), around a helper's lines.
CANNED = """Running test_input_output_logprobs_match_prefill_cache_hit with 3 prompts
Prefill cache miss for prompt 1, skipping
Flush Cache and run prefill to get input logprobs ...
kl_divs=[np.float64(0.0021), np.float64(3.5e-05)]
avg_kl_div=0.0010675
ACC_THRESHOLDS={'m': {'kl_div': 0.003}}
"""


def test_parse_helper_output_reads_numpy_scalars_and_misses() -> None:
    got = bk.parse_helper_output(CANNED)
    assert got["kl_per_prompt"] == [0.0021, 3.5e-05]
    assert got["avg_kl"] == pytest.approx(0.0010675)
    assert got["skipped_misses"] == 1


def test_parse_helper_output_plain_floats_and_nothing_printed() -> None:
    assert bk.parse_helper_output("kl_divs=[0.5, nan]\n")["kl_per_prompt"][0] == 0.5
    empty = bk.parse_helper_output("[multi] 2 samples, 3 turns\n")
    assert empty == {"kl_per_prompt": [], "avg_kl": None, "skipped_misses": 0}


def _result(cached: int) -> dict:
    return {"meta_info": {"cached_tokens": cached}}


def test_cache_checks_record_sglang_verdicts_on_128_token_pages() -> None:
    pytest.importorskip("sglang")
    _, mt = bk.sglang_kl_modules()
    prefill = bk.CacheChecks(bk.paged_prefill_assert(128), lambda prefix: prefix)
    for cached in (200, 128, 100):  # whole prefix, cut to a page, neither
        prefill(_result(cached), 200, "p")
    assert (prefill.n, prefill.failed, prefill.exact) == (3, 1, 1)
    assert "cached_tokens=200, got 100" in prefill.first_failure

    decode = bk.CacheChecks(
        lambda *a: mt.default_decode_cache_assert(*a, page_size=128),
        lambda history, output: history + output - 1,
    )
    decode(_result(299), 290, 10, "d")  # full hit but the last answer token (never computed)
    decode(_result(256), 290, 10, "d")  # cut to a page, as SGLang's callback allows
    decode(_result(290), 290, 10, "d")  # the previous answer not cached
    assert (decode.n, decode.failed, decode.exact) == (3, 1, 1)


def test_registry_has_the_sink_server_outside_the_defaults() -> None:
    assert bq.SERVERS["oscar-2bit-sink4"]["extra_args"] == ["--kv-quant-sink-bits", "4"]
    assert "oscar-2bit-sink4" not in bq.DEFAULT_SERVERS
    assert bq.DEFAULT_SERVERS[0] == "sglang-own"


def test_mean_kl_topk_is_zero_on_itself_and_skips_empty_positions() -> None:
    tops = [{1: -0.1, 2: -2.5}, {}, {3: -0.7, 1: -1.0}]
    assert bq.mean_kl_topk(tops, tops) == pytest.approx(0.0, abs=1e-12)
    other = [{1: -0.3, 2: -1.5}, {5: -0.1}, {3: -0.7, 1: -1.0}]
    assert bq.mean_kl_topk(tops, other) == pytest.approx(bq.kl_topk(tops[0], other[0]) / 2)
