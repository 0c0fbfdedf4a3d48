"""GGUF export of tiny runs: read back with gguf-py (names, shapes, aliases), bytes against the checkpoint's
unique parameters, refusals of the stock layout, and logits in llama.cpp against the PyTorch model.

The llama.cpp checks need the patched runtime (python -m flexiedge.runtimes.llamacpp.build) and are
skipped without it; the rest only needs gguf-py.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from flexiedge.checkpoint import load_checkpoint
from flexiedge.errors import FlexiEdgeError
from flexiedge.exporters.gguf import ADAPTER_FILE, MODEL_FILE, GGUFExportConfig, export_gguf
from flexiedge.exporters.gguf_writer import permute_qk
from flexiedge.runtimes.llamacpp.build import runtime_status

_status = runtime_status()
needs_llamacpp = pytest.mark.skipif(not _status.ok, reason=_status.reason)
PROJ = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
IDS = [1, 17, 260, 5, 299, 42, 42, 280, 3, 271, 100, 2, 290, 64, 7, 259, 33, 80, 81, 82]


def _export(run, out, **config):
    return export_gguf(run, out, GGUFExportConfig(**config))


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _plan(run):
    return json.loads((run / "flexiedge.json").read_text())["plan"]


def _torch_logits(run, ids=IDS):
    with torch.no_grad():
        return load_checkpoint(run).model(torch.tensor([ids])).logits[0].numpy()


def _llama_logits(folder, adapters=True, ids=IDS):
    from flexiedge.runtimes.llamacpp import LlamaCppModel
    lora = folder / ADAPTER_FILE if adapters and (folder / ADAPTER_FILE).is_file() else None
    with LlamaCppModel.load(folder / MODEL_FILE, lora, n_threads=2, n_ctx=64, kv_type="f32", flash_attn=False) as m:
        return m.logits(ids)


@pytest.fixture
def flexigpt(tiny_run):
    return tiny_run(name="flexigpt")  # 6 layers, 2 slots of rank 4, output norms on


def test_round_trip_names_shapes_and_aliases(flexigpt, tmp_path):
    report = _export(flexigpt, tmp_path / "out", type="f32", verify=False)
    plan = _plan(flexigpt)
    t = _tensors(tmp_path / "out" / MODEL_FILE)
    slots = {p: layer["shares"] for p, layer in enumerate(plan["layers"]) if layer["shares"] is not None}
    assert len(slots) == 2
    want = {"token_embd.weight", "output_norm.weight", "output.weight"}  # untied tiny model: output.weight kept
    for p in range(len(plan["layers"])):
        want |= {f"blk.{p}.{n}.weight" for n in PROJ + ["attn_norm", "ffn_norm"]}
        if p in slots:  # the slot's own output norms (the patch's tensors)
            want |= {f"blk.{p}.post_attention_norm.weight", f"blk.{p}.post_ffw_norm.weight"}
    assert set(t) == want
    assert tuple(t["blk.0.attn_k.weight"].shape) == (64, 32)  # ne0 = in (hidden), ne1 = 2 kv heads x 16
    assert tuple(t["blk.0.ffn_down.weight"].shape) == (128, 64)
    for slot, base in slots.items():
        for n in PROJ:
            assert t[f"blk.{slot}.{n}.weight"].data_offset == t[f"blk.{base}.{n}.weight"].data_offset
    owners = [x.data_offset for name, x in t.items()
              if not any(name.startswith(f"blk.{s}.") and name.split(".")[2] in PROJ for s in slots)]
    assert len(set(owners)) == len(owners)  # everything else owns its bytes
    from safetensors.torch import load_file
    w = load_file(flexigpt / "model.safetensors")
    np.testing.assert_array_equal(t["blk.0.attn_q.weight"].data, permute_qk(w["model.layers.0.self_attn.q_proj.weight"].numpy(), 4))
    np.testing.assert_array_equal(t["blk.0.attn_v.weight"].data, w["model.layers.0.self_attn.v_proj.weight"].numpy())
    slot = next(iter(slots))
    np.testing.assert_array_equal(t[f"blk.{slot}.post_ffw_norm.weight"].data,
                                  w[f"model.layers.{slot}.mlp_output_norm.weight"].numpy())
    a = _tensors(tmp_path / "out" / ADAPTER_FILE)
    assert set(a) == {f"blk.{s}.{n}.weight.{k}" for s in slots for n in PROJ for k in ("lora_a", "lora_b")}
    assert tuple(a[f"blk.{slot}.ffn_up.weight.lora_a"].shape) == (64, 4)  # A (r, in): ne0 = in
    assert tuple(a[f"blk.{slot}.ffn_up.weight.lora_b"].shape) == (4, 128)  # B (out, r): ne0 = r
    assert report["storage"]["unique_params"] == json.loads((flexigpt / "flexiedge.json").read_text())["parameters"]["stored"]


@pytest.mark.parametrize("type_, matrix_type, adapter_b_type", [
    ("f16", "F16", "F16"),
    ("q8_0", "Q8_0", "F16"),  # lora_b rows are the rank (4): not a whole Q8_0 block -> F16 fallback
])
def test_bytes_are_the_unique_parameters_once(flexigpt, tmp_path, type_, matrix_type, adapter_b_type):
    report = _export(flexigpt, tmp_path / "out", type=type_, verify=False)
    params = json.loads((flexigpt / "flexiedge.json").read_text())["parameters"]
    s = report["storage"]
    assert s["unique_params"] == params["stored"]  # every checkpoint tensor exactly once, nothing else
    # independent payload: numel x bytes/element of the type each checkpoint tensor should be stored in
    from safetensors import safe_open
    bpe = dict(F32=4.0, F16=2.0, Q8_0=34 / 32)
    expected = 0.0
    with safe_open(flexigpt / "model.safetensors", "np") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            kind = "F32" if len(shape) == 1 else adapter_b_type if name.endswith("lora_B") else matrix_type
            expected += np.prod(shape) * bpe[kind]
    assert abs(s["data_bytes"] / expected - 1) < 0.01  # a duplicated slot would add ~25% here
    assert abs(s["bytes_over_unique"] - 1) < 0.01
    t = _tensors(tmp_path / "out" / MODEL_FILE)
    assert t["blk.0.ffn_up.weight"].tensor_type.name == matrix_type
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # norms stay F32 (llama.cpp convention)


def test_q8_0_keeps_aliases(flexigpt, tmp_path):
    _export(flexigpt, tmp_path / "out", type="q8_0", verify=False)
    t = _tensors(tmp_path / "out" / MODEL_FILE)
    slots = {p: l["shares"] for p, l in enumerate(_plan(flexigpt)["layers"]) if l["shares"] is not None}
    for slot, base in slots.items():
        for n in PROJ:
            s, b = t[f"blk.{slot}.{n}.weight"], t[f"blk.{base}.{n}.weight"]
            assert s.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.Q8_0
            assert s.data_offset == b.data_offset


@needs_llamacpp
def test_f32_logits_match_pytorch(flexigpt, tmp_path):
    report = _export(flexigpt, tmp_path / "out", type="f32")
    assert report["verify"]["argmax_agreement"] == 1.0 and report["verify"]["logit_max_abs_diff"] < 1e-3
    ref = _torch_logits(flexigpt)
    got = _llama_logits(tmp_path / "out")
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(ref), atol=1e-3, rtol=1e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(_llama_logits(tmp_path / "out", adapters=False) - ref).max() > 1e-2  # the adapters matter


@needs_llamacpp
def test_f32_parity_is_skipped_for_models_too_large_for_pytorch(flexigpt, tmp_path, monkeypatch):
    import flexiedge.exporters.gguf as exporter
    monkeypatch.setattr(exporter, "PARITY_MAX_GIB", 0)  # as a 7B run (27 GB in fp32) would be
    report = _export(flexigpt, tmp_path / "out", type="f32")
    assert report["verify"]["round_trip"].startswith("ok") and "logit_max_abs_diff" not in report["verify"]
    assert "GiB in fp32" in report["verify"]["parity_skipped"]


def test_stock_layout_refuses_output_norms(flexigpt, tmp_path):
    with pytest.raises(FlexiEdgeError, match="--no-output-norm"):
        _export(flexigpt, tmp_path / "out", type="f32", layout="stock")
    assert not (tmp_path / "out").exists()  # atomic: nothing half-written


def test_stock_layout_cli_error_is_one_line(flexigpt, tmp_path, capsys):
    from flexiedge.cli import main
    assert main(["export", "gguf", str(flexigpt), "--out", str(tmp_path / "o"), "--layout", "stock"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "flexiedge prune --no-output-norm" in err


def test_stock_layout_without_output_norms(tiny_run, tmp_path):
    run = tiny_run(name="no-norm", output_norm=False)
    compact = _export(run, tmp_path / "compact", type="f32", verify=False)
    stock = _export(run, tmp_path / "stock", type="f32", layout="stock")
    t = _tensors(tmp_path / "stock" / MODEL_FILE)
    offsets = [x.data_offset for x in t.values()]
    assert len(set(offsets)) == len(offsets)  # no aliases: any llama.cpp can load it
    assert not any("post_" in n for n in t)
    slots = {p: l["shares"] for p, l in enumerate(_plan(run)["layers"]) if l["shares"] is not None}
    shared = sum(t[f"blk.{b}.{n}.weight"].n_bytes for b in slots.values() for n in PROJ)
    assert stock["storage"]["model_bytes"] - compact["storage"]["model_bytes"] == shared
    for slot, base in slots.items():
        np.testing.assert_array_equal(t[f"blk.{slot}.attn_q.weight"].data, t[f"blk.{base}.attn_q.weight"].data)
    if _status.ok:
        assert stock["verify"]["logit_max_abs_diff"] < 1e-3 and stock["verify"]["argmax_agreement"] == 1.0


@needs_llamacpp
def test_kept_block_adapters_are_exported(tiny_run, tmp_path):
    """A ShortGPT run with LoRA on its kept blocks (ShortGPT+LoRA recovery) and a rank that differs by layer."""
    from flexiedge.build import add_own_lora
    from flexiedge.checkpoint import save_checkpoint
    ckpt = load_checkpoint(tiny_run(name="short", method="shortgpt"))
    for p, rank in [(0, 4), (2, 8)]:
        ckpt.plan.layers[p].rank = rank
        add_own_lora(ckpt.model.model.layers[p], rank)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
            torch.nn.init.normal_(ckpt.model.model.layers[p].get_submodule(name).lora_B, std=0.2)
    run = save_checkpoint(ckpt.model, ckpt.tokenizer, ckpt.plan, tmp_path / "short-lora", provenance={})
    _export(run, tmp_path / "out", type="f32")
    a = _tensors(tmp_path / "out" / ADAPTER_FILE)
    assert len(a) == 2 * 2 * len(PROJ) and tuple(a["blk.2.attn_q.weight.lora_b"].shape) == (8, 64)
    ref = _torch_logits(run)
    got = _llama_logits(tmp_path / "out")
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(ref), atol=1e-3, rtol=1e-4)
    assert np.abs(_llama_logits(tmp_path / "out", adapters=False) - ref).max() > 1e-2


@needs_llamacpp
def test_q4_k_goes_through_llamacpp_and_keeps_aliases(flexigpt, tmp_path):
    report = _export(flexigpt, tmp_path / "out", type="q4_k")
    t = _tensors(tmp_path / "out" / MODEL_FILE)
    # rows of 64 / 128 are not whole 256-blocks: llama.cpp's fallback Q4_K -> Q5_0, as for SmolLM2's 576
    assert t["blk.0.ffn_up.weight"].tensor_type.name == "Q5_0"
    slots = {p: l["shares"] for p, l in enumerate(_plan(flexigpt)["layers"]) if l["shares"] is not None}
    for slot, base in slots.items():
        assert t[f"blk.{slot}.ffn_down.weight"].data_offset == t[f"blk.{base}.ffn_down.weight"].data_offset
    assert report["verify"]["round_trip"].startswith("ok")
    got, ref = _llama_logits(tmp_path / "out"), _torch_logits(flexigpt)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.5  # quantised, but still the same model


@pytest.mark.slow
def test_smollm2_flexigpt_f32_parity(tmp_path, smollm2_run):
    """The real FlexiGPT 30% run: 128 positions, llama.cpp with adapters vs PyTorch."""
    run = smollm2_run
    if not _status.ok:
        pytest.skip("needs the patched runtime")
    from flexiedge.data import EVAL_TEXTS, tokenize_texts
    _export(run, tmp_path / "out", type="f32")
    ids = tokenize_texts(load_checkpoint(run).tokenizer, list(EVAL_TEXTS))[:128].tolist()
    got, ref = _llama_logits(tmp_path / "out", ids=ids), _torch_logits(run, ids)
    assert np.abs(got - ref).max() < 1e-3 and (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("qtype", ["q8_0", "f16"])
def test_a_modified_checkpoint_is_refused_before_anything_is_written(tiny_run, tmp_path, qtype):
    run = tiny_run(name=f"modified-{qtype}")
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(FlexiEdgeError, match="does not match the checksum"):
        export_gguf(run, tmp_path / "out", GGUFExportConfig(type=qtype, verify=False))
    assert not (tmp_path / "out").exists()
