"""The estimate formulas against hand-computed numbers, and the analytic sizes against METHOD.md's paper figures."""

from __future__ import annotations

import pytest

from flexiedge.devices.analytic import GGUF_Q4_K, LLAMA2_7B, footprint
from flexiedge.devices.estimate import Settings, decode_tps, estimate, prefill_tps
from flexiedge.devices.footprint import Footprint
from flexiedge.devices.profiles import parse_profile

TOY = Footprint(name="toy", runtime="llamacpp", type="q8_0", method="flexigpt", path="-", file_bytes=900,
                unique_bytes=800_000_000, weight_bytes_per_token=1_000_000_000, matmul_params_per_token=10**9,
                kv_bytes_per_position=1_000_000, layers=10, heads=8, head_dim=64)
PHONE = dict(name="toy-phone", threads=4, memory=dict(bandwidth_gbps=60.0, bandwidth_source="-", ram_gib=8,
             ram_budget_gib=1.0), compute=dict(gflops=100.0, gflops_source="-"),
             efficiency=dict(llamacpp=0.5, prefill=0.4, source="-"), runtime=dict(overhead_mib=0))


def test_decode_is_efficiency_times_bandwidth_over_bytes_per_token():
    # 0.5 x 60 GB/s / 1.0 GB per token = 30 tokens/s
    assert decode_tps(0.5, 60.0, 1e9) == pytest.approx(30.0)
    # prefill: 0.4 x 100 GFLOP/s / 2 GFLOP per token = 20 tokens/s
    assert prefill_tps(0.4, 100.0, 2e9) == pytest.approx(20.0)


def test_estimate_on_a_toy_phone_by_hand():
    e = estimate(TOY, parse_profile(PHONE, "toy"), Settings(prompt=100, gen=100, n_ctx=200))
    # a generated token attends over 100 + 100 / 2 = 150 positions: 1e9 + 150 x 1e6 bytes
    assert e.bytes_per_token == 1_150_000_000
    assert e.decode_tps == pytest.approx(0.5 * 60e9 / 1.15e9)
    # prefill FLOPs per token at position 50: 2 x 1e9 + 4 x 10 layers x 8 heads x 64 x 50 = 2_001_024_000
    assert e.prefill_tps == pytest.approx(0.4 * 100e9 / 2_001_024_000)
    assert e.ttft_s == pytest.approx(100 / e.prefill_tps)
    # resident: 800 MB unique + 200 positions x 1 MB of KV (no overhead) = 1.0e9 bytes, under 1 GiB (1.074e9)
    assert e.resident_bytes == 1_000_000_000 and e.fits


def test_llama7b_flexigpt_adds_the_papers_3_67_percent_over_shortgpt():
    """METHOD.md: rank-256 adapters on all seven projections of 9 slots = +3.67% parameters over ShortGPT."""
    short = footprint(LLAMA2_7B, GGUF_Q4_K, "shortgpt", 9)
    flexi = footprint(LLAMA2_7B, GGUF_Q4_K, "flexigpt", 9, rank=256)
    adapters = flexi.matmul_params_per_token - short.matmul_params_per_token - 9 * 202_383_360
    assert adapters / (short.matmul_params_per_token + 32000 * 4096) == pytest.approx(0.0367, abs=0.0005)  # + embedding
    # stored: 23 blocks once; read per token: all 32 layers (the 9 slots re-read their bases)
    assert flexi.file_bytes < footprint(LLAMA2_7B, GGUF_Q4_K, "unpruned", 0).file_bytes
    assert flexi.weight_bytes_per_token > footprint(LLAMA2_7B, GGUF_Q4_K, "unpruned", 0).weight_bytes_per_token
