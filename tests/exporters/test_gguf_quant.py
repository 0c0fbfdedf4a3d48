"""Per-tensor quantization for GGUF export (exporters/ggml_quant.py) against independent references:
llama.cpp's whole-file quantizer (llama_model_quantize, pure) on an F32 export, gguf-py's quantizers and
dequantizers, and bf16 checkpoints read tensor by tensor.

The llama_model_quantize comparisons need the patched runtime (python -m flexiedge.runtimes.llamacpp.build).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from flexiedge.exporters import ggml_quant
from flexiedge.exporters.gguf import MODEL_FILE, GGUFExportConfig, export_gguf, storage_type
from flexiedge.runtimes.llamacpp.build import runtime_status

_status = runtime_status()
needs_llamacpp = pytest.mark.skipif(not _status.ok, reason=_status.reason)
needs_ggml = pytest.mark.skipif(not ggml_quant.available(), reason="llama-cpp-python (libggml-base) not installed")
rng = np.random.default_rng(0)


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _llama_quantize(src, dst, type_):
    """The reference: llama.cpp's own whole-file quantizer, one type for every matrix (pure)."""
    import llama_cpp as lc
    from flexiedge.runtimes.llamacpp.runtime import _init_backend
    _init_backend(verbose=False)
    ftype = {"q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k": lc.LLAMA_FTYPE_MOSTLY_Q4_K_S,
             "q5_k": lc.LLAMA_FTYPE_MOSTLY_Q5_K_S, "q6_k": lc.LLAMA_FTYPE_MOSTLY_Q6_K}[type_]
    params = lc.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = ftype, True, 1
    assert lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0


@pytest.fixture
def wide_run(tmp_path, tiny_model_dir, tiny_text_file):
    """A tiny run whose rows fill 256-blocks (hidden 256) except ffn_down's (320: a Q4_K -> Q5_0 fallback).
    No output norms, so the stock layout (what llama_model_quantize can read) exists too."""
    from flexiedge.plan import PruneConfig
    from flexiedge.prune import CalibrationConfig, prune
    model = tiny_model_dir("llama", hidden_size=256, intermediate_size=320)
    calibration = CalibrationConfig(texts=(str(tiny_text_file),), tokens=256, seq_len=64)
    return prune(str(model), tmp_path / "wide", PruneConfig(blocks=2, rank=4, output_norm=False), calibration)


@needs_llamacpp
@pytest.mark.parametrize("type_, matrix, ffn_down", [
    ("q4_k", "Q4_K", "Q5_0"),   # rows of 320 are not whole 256-blocks: llama.cpp's fallback
    ("q5_k", "Q5_K", "Q5_1"),
    ("q6_k", "Q6_K", "Q8_0"),
    ("q8_0", "Q8_0", "Q8_0"),   # 320 = 10 x 32
])
def test_bytes_match_llama_model_quantize(wide_run, tmp_path, type_, matrix, ffn_down):
    export_gguf(wide_run, tmp_path / "f32", GGUFExportConfig(type="f32", layout="stock", verify=False))
    _llama_quantize(tmp_path / "f32" / MODEL_FILE, tmp_path / "ref.gguf", type_)
    ref = _tensors(tmp_path / "ref.gguf")
    for layout in ("stock", "compact"):
        export_gguf(wide_run, tmp_path / layout, GGUFExportConfig(type=type_, layout=layout, verify=False))
        got = _tensors(tmp_path / layout / MODEL_FILE)
        assert set(got) == set(ref)
        for name, t in got.items():  # compact: a slot's aliases read the base's bytes, the same in stock
            assert t.tensor_type == ref[name].tensor_type, name
            np.testing.assert_array_equal(np.asarray(t.data), np.asarray(ref[name].data), err_msg=name)
    assert got["blk.0.attn_q.weight"].tensor_type.name == matrix
    assert got["token_embd.weight"].tensor_type.name == matrix
    assert got["blk.0.ffn_down.weight"].tensor_type.name == ffn_down
    assert got["blk.0.attn_norm.weight"].tensor_type.name == "F32"


@needs_ggml
def test_adapters_are_q8_0_of_the_checkpoint_factors(wide_run, tmp_path):
    """k-quant exports store LoRA factors in Q8_0 (lora_b, rank 4 < 32: F16), against gguf-py's quantizer."""
    from safetensors.torch import load_file
    from flexiedge.exporters.gguf import ADAPTER_FILE
    from flexiedge.exporters.gguf_writer import permute_qk
    export_gguf(wide_run, tmp_path / "out", GGUFExportConfig(type="q4_k", verify=False))
    got = _tensors(tmp_path / "out" / ADAPTER_FILE)
    w = load_file(wide_run / "model.safetensors")
    slot = next(int(n.split(".")[2]) for n in w if n.endswith("lora_A"))
    for short, hf, heads in (("attn_q", "self_attn.q_proj", 4), ("ffn_down", "mlp.down_proj", None)):
        a, b = (w[f"model.layers.{slot}.{hf}.{k}"].float().numpy() for k in ("lora_A", "lora_B"))
        b = permute_qk(b, heads) if heads else b
        ta, tb = got[f"blk.{slot}.{short}.weight.lora_a"], got[f"blk.{slot}.{short}.weight.lora_b"]
        assert (ta.tensor_type, tb.tensor_type) == (Q.Q8_0, Q.F16)
        np.testing.assert_array_equal(np.asarray(ta.data), gguf.quants.quantize(a, Q.Q8_0))
        np.testing.assert_array_equal(np.asarray(tb.data), b.astype(np.float16))


@needs_ggml
@pytest.mark.parametrize("qtype, rms", [  # rms error / std of N(0, 1) weights, ~bits per weight
    (Q.Q4_K, 0.10), (Q.Q5_K, 0.05), (Q.Q6_K, 0.025), (Q.Q5_0, 0.05), (Q.Q5_1, 0.05), (Q.Q8_0, 0.01),
])
def test_gguf_py_dequantizes_ours(qtype, rms):
    x = rng.standard_normal((24, 512)).astype(np.float32)
    data = ggml_quant.quantize(x, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert data.dtype == np.uint8 and data.shape == (24, 512 // block * size)
    back = gguf.quants.dequantize(data, qtype)
    assert back.shape == x.shape
    assert np.sqrt(np.mean((back - x) ** 2)) < rms
    assert np.sqrt(np.mean((back - x) ** 2)) > rms / 10  # it did quantize


@needs_ggml
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_0])
def test_same_bytes_as_gguf_py(qtype):
    """gguf-py reimplements the 32-block reference quantizers in numpy: bit for bit the same."""
    x = (rng.standard_normal((40, 96)) * 0.02).astype(np.float32)
    np.testing.assert_array_equal(ggml_quant.quantize(x, qtype), gguf.quants.quantize(x, qtype))


@needs_ggml
def test_threads_do_not_change_bytes(monkeypatch):
    x = rng.standard_normal((300, 256)).astype(np.float32)
    monkeypatch.setattr(ggml_quant, "CHUNK_ELEMENTS", 256 * 7)  # 43 chunks of 7 rows, the last one short
    one, two = ggml_quant.quantize(x, Q.Q4_K, threads=1), ggml_quant.quantize(x, Q.Q4_K, threads=2)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one[:7], ggml_quant.quantize(x[:7], Q.Q4_K, threads=1))


@pytest.mark.parametrize("qtype, shape, stored", [
    (Q.Q4_K, (8, 512), Q.Q4_K),
    (Q.Q4_K, (8, 96), Q.Q5_0),     # 96 = 3 x 32
    (Q.Q4_K, (8, 100), Q.F16),     # not even whole 32-blocks
    (Q.Q5_K, (8, 96), Q.Q5_1),
    (Q.Q6_K, (8, 96), Q.Q8_0),
    (Q.Q8_0, (8, 4), Q.F16),       # lora_b of rank 4
    (Q.Q4_K, (512,), Q.F32),       # norms stay F32
])
def test_storage_type_fallback(qtype, shape, stored):
    assert storage_type(qtype, shape) == stored


def test_bf16_checkpoint_is_converted_per_tensor(tiny_model, tiny_tokenizer, tmp_path):
    """A plain HF folder in bf16: f32 export holds the bf16 values exactly (the reader converts each tensor)."""
    from safetensors.torch import load_file
    folder = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    w = load_file(folder / "model.safetensors")
    assert w["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    export_gguf(folder, tmp_path / "out", GGUFExportConfig(type="f32"))
    t = _tensors(tmp_path / "out" / MODEL_FILE)
    np.testing.assert_array_equal(t["blk.0.ffn_up.weight"].data, w["model.layers.0.mlp.up_proj.weight"].float().numpy())
    np.testing.assert_array_equal(t["output.weight"].data, w["lm_head.weight"].float().numpy())


@needs_llamacpp
@pytest.mark.parametrize("type_", ["q4_k", "q6_k"])
def test_k_quant_exports_load_and_track_pytorch(wide_run, tmp_path, type_):
    """Real Q4_K/Q6_K blocks (rows of 256), aliased by the slots, in the patched runtime with adapters."""
    from flexiedge.checkpoint import load_checkpoint
    from flexiedge.exporters.gguf import ADAPTER_FILE
    from flexiedge.runtimes.llamacpp import LlamaCppModel
    export_gguf(wide_run, tmp_path / "out", GGUFExportConfig(type=type_, verify=False))
    ids = [1, 17, 260, 5, 299, 42, 42, 280, 3, 271, 100, 2, 290, 64, 7, 259]
    with torch.no_grad():
        ref = load_checkpoint(wide_run).model(torch.tensor([ids])).logits[0].numpy()
    with LlamaCppModel.load(tmp_path / "out" / MODEL_FILE, tmp_path / "out" / ADAPTER_FILE, n_threads=2, n_ctx=64,
                            kv_type="f32", flash_attn=False) as m:
        got = m.logits(ids)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.95  # quantised, but the same model


def test_sharded_hf_folder_is_read_through_its_index(tiny_model, tiny_tokenizer, tmp_path):
    """A plain HF release in shards (LLaMA-2-7B ships two): the same tensors as from one file."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for folder in ("one", "sharded"):
        tiny_tokenizer.save_pretrained(tmp_path / folder)
        export_gguf(tmp_path / folder, tmp_path / f"out-{folder}", GGUFExportConfig(type="f16", verify=True))
    one, sharded = _tensors(tmp_path / "out-one" / MODEL_FILE), _tensors(tmp_path / "out-sharded" / MODEL_FILE)
    assert set(one) == set(sharded)
    for name in one:
        np.testing.assert_array_equal(np.asarray(one[name].data), np.asarray(sharded[name].data), err_msg=name)
