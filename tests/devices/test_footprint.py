"""Bytes per token of a real (tiny) GGUF export: shared weights stored once, read once per use; and a real
measurement of it on this host, in a subprocess, returns positive numbers."""

from __future__ import annotations

import pytest

from flexiedge.devices.estimate import Settings
from flexiedge.devices.footprint import footprint
from flexiedge.devices.profiler import MeasureConfig, profile_artifacts
from flexiedge.devices.profiles import load_profile
from flexiedge.exporters.gguf import GGUFExportConfig, export_gguf

# tests/conftest.py's tiny llama: hidden 64, ffn 128, 6 layers, 4 heads over 2 KV heads (head_dim 16), vocab 320,
# untied. tiny_run prunes 2 blocks into FlexiGPT slots with rank-4 adapters.
H, F, KV, V, LAYERS, SLOTS, RANK = 64, 128, 32, 320, 6, 2, 4
BLOCK = [(H, H), (H, KV), (H, KV), (H, H), (H, F), (H, F), (F, H)]  # (in, out) of q k v o gate up down
BLOCK_PARAMS = sum(i * o for i, o in BLOCK)                        # 36_864
ADAPTER_PARAMS = RANK * sum(i + o for i, o in BLOCK)               # 4_096 per slot
NORMS = (2 * LAYERS + 2 * SLOTS + 1) * H                           # pre-norms, slot output norms, final norm


@pytest.fixture
def tiny_gguf(tiny_run, tmp_path):
    run = tiny_run()
    out = tmp_path / "tiny-gguf-f32"
    export_gguf(run, out, GGUFExportConfig(type="f32", verify=False))
    return out


def test_bytes_per_token_counts_shared_weights_per_use(tiny_gguf):
    fp = footprint(tiny_gguf)
    assert (fp.runtime, fp.type, fp.method, fp.slots, fp.layers) == ("llamacpp", "f32", "flexigpt", SLOTS, LAYERS)
    # stored: the 4 kept blocks once (slots alias their base), every adapter, the embedding and the head
    assert fp.unique_bytes == 4 * (4 * BLOCK_PARAMS + NORMS + SLOTS * ADAPTER_PARAMS + 2 * V * H)
    # read per token: all 6 layers' projections (a slot re-reads its base), one embedding row, the whole head
    assert fp.weight_bytes_per_token == 4 * (LAYERS * BLOCK_PARAMS + NORMS + SLOTS * ADAPTER_PARAMS + H + V * H)
    assert fp.weight_bytes_per_token - fp.unique_bytes == 4 * (SLOTS * BLOCK_PARAMS - (V - 1) * H)
    # f16 KV cache: K and V, 6 layers x 2 KV heads x 16 dims x 2 bytes
    assert fp.kv_bytes_per_position == 2 * LAYERS * KV * 2


def test_a_real_measurement_on_this_host_returns_positive_numbers(tiny_gguf):
    rows, bench = profile_artifacts([footprint(tiny_gguf)], [load_profile("host")], Settings(prompt=8, gen=4),
                                    MeasureConfig(repeats=2, warmup=1, threads=1))
    measured, estimated = rows
    assert (measured.source, estimated.source) == ("measured", "estimated")
    assert len(measured.extra["measurement"]["decode_tps"]) == 2
    for value in (measured.ttft_s, measured.prefill_tps, measured.decode_tps, measured.resident_bytes,
                  bench.bandwidth_gbps, bench.gflops, estimated.decode_tps):
        assert value > 0
    assert estimated.decode_rel_error is not None  # the host's estimate is checked against its measurement
