"""Streaming ONNX export (trace on meta, weights read as written) against PyTorch and the in-memory export.

The in-memory export (conftest's `tiny_export`) is the structural reference: same graph, same
MatMulNBits, one copy per shared weight; PyTorch is the numerical one.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from flexiedge.cli import main
from flexiedge.exporters import onnx_graph as graph
from flexiedge.exporters import onnx_stream as stream
from flexiedge.exporters.onnx import DATA_FILE, MODEL_FILE, OnnxExportConfig, expected_shared_groups, export_onnx
from flexiedge.plan import PROJECTIONS
from flexiedge.runtimes.onnxruntime import OrtModel

PROMPTS = [[5, 17, 42, 99, 7, 63, 28, 11, 3, 250],
           [0, 0, 0, 0, 31, 8, 77, 3, 50, 121]]   # 4 left pads
MASK = [[1] * 10, [0] * 4 + [1] * 6]
REAL = torch.tensor(MASK, dtype=torch.bool)


def torch_logits(model, ids=PROMPTS, mask=MASK):
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()


def ort_logits(folder):
    return torch.from_numpy(OrtModel.load(folder).forward(np.array(PROMPTS), np.array(MASK))[0])


def load_graph(folder):
    return onnx.load_model(folder / MODEL_FILE, load_external_data=False)


@pytest.fixture(scope="session")
def stream_export(request, tmp_path_factory, tiny_flexigpt_run):
    """Factory: stream_export(precision) -> (folder, report) of the tiny run, traced once on meta."""
    cache = {}

    def make(precision: str):
        if "traced" not in cache:
            cache["traced"] = stream.trace_stream(stream.StreamSource.open(tiny_flexigpt_run))
            cache["root"] = tmp_path_factory.mktemp("onnx-stream")
        if precision not in cache:
            out = cache["root"] / precision
            cache[precision] = out, stream.write_streaming(cache["traced"], out, OnnxExportConfig(precision=precision))
        return cache[precision]
    yield make
    if "traced" in cache:
        cache["traced"].source.close()


def test_fp32_stream_export_matches_pytorch_prefill_and_decode(tiny_checkpoint, stream_export):
    folder, report = stream_export("fp32")
    want = torch_logits(tiny_checkpoint.model)
    torch.testing.assert_close(ort_logits(folder)[REAL], want[REAL], atol=1e-4, rtol=0)
    ort_model = OrtModel.load(folder)
    _, past = ort_model.forward(np.array(PROMPTS)[:, :-1], np.array(MASK)[:, :-1])
    step = ort_model.forward(np.array(PROMPTS)[:, -1:], np.array(MASK), past)[0][:, -1]
    torch.testing.assert_close(torch.from_numpy(step), want[:, -1], atol=1e-4, rtol=0)
    assert report["streaming"] and report["verify"]["argmax_agreement"] == 1.0


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4"])
def test_stream_graph_is_the_in_memory_graph(tiny_export, stream_export, precision):
    """Same initializers (names, dtypes, shapes), same ops, same I/O, same bytes as the in-memory export."""
    mine, theirs = (load_graph(f(precision)[0]) for f in (stream_export, tiny_export))

    def inits(proto):
        return {t.name: (t.data_type, tuple(t.dims)) for t in proto.graph.initializer}
    assert inits(mine) == inits(theirs)
    # The meta trace keeps one Identity per attention (after the key transpose) that the real one lacks.
    def ops(proto):
        return Counter(n.op_type for n in proto.graph.node if n.op_type != "Identity")
    assert ops(mine) == ops(theirs)
    assert [i.name for i in mine.graph.input] == [i.name for i in theirs.graph.input]
    assert [o.name for o in mine.graph.output] == [o.name for o in theirs.graph.output]
    sizes = [f(precision)[0].joinpath(DATA_FILE).stat().st_size for f in (stream_export, tiny_export)]
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("precision, atol", [("fp16", 1e-5), ("int8", 1e-4), ("int4", 1e-4)])
def test_stream_logits_equal_the_in_memory_export(tiny_export, stream_export, precision, atol):
    """Same fp16 rounding and the same onnxruntime quantisation kernel: the same logits."""
    mine, theirs = ort_logits(stream_export(precision)[0]), ort_logits(tiny_export(precision)[0])
    torch.testing.assert_close(mine[REAL], theirs[REAL], atol=atol, rtol=0)


def test_fp16_stream_export_is_close_to_pytorch(tiny_checkpoint, stream_export):
    folder, report = stream_export("fp16")
    torch.testing.assert_close(ort_logits(folder)[REAL], torch_logits(tiny_checkpoint.model)[REAL], atol=5e-3, rtol=0)
    assert report["storage"]["bytes_over_unique"] <= 1.01


@pytest.mark.parametrize("precision, bits", [("int8", 8), ("int4", 4)])
def test_quantized_stream_export_keeps_one_copy_per_shared_weight(tiny_checkpoint, tiny_export, stream_export,
                                                                   precision, bits):
    folder, report = stream_export(precision)
    proto = load_graph(folder)
    shared = graph.shared_weights(proto)
    groups = expected_shared_groups(tiny_checkpoint.plan)
    assert sorted(shared.values()) == sorted(g for g in groups for _ in PROJECTIONS)
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    reference = [n for n in load_graph(tiny_export(precision)[0]).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(reference)
    assert all(a.i == bits for n in nbits for a in n.attribute if a.name == "bits")
    assert not any("lora_" in n.input[1] for n in nbits)          # adapters stay float by default
    # each shared weight: ONE B/scales/zero-points triple, read by its base's and its slots' MatMulNBits
    readers = Counter(n.input[1] for n in nbits)
    assert all(readers[name] == len(layers) for name, layers in shared.items())
    assert report["storage"]["shared_single_copy"]


def test_quantize_blocks_is_onnxruntimes_quantizer():
    """Our call of the C++ kernel against MatMulNBitsQuantizer's own (K not a multiple of the block)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    weight = np.random.default_rng(0).standard_normal((72, 40)).astype(np.float32)
    for bits in (4, 8):
        want = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False,
                                                                       bits=bits)).qbits_block_quant(weight)
        for got, expected in zip(stream.quantize_blocks(weight, bits, 32, False), want):
            np.testing.assert_array_equal(got, expected)


def test_bf16_checkpoint_streams_to_fp32(tmp_path, tiny_flexigpt_run):
    """A bf16 checkpoint streams by default (the in-memory trace would compute in bf16), widened tensor by
    tensor to fp32; logits match its fp32-widened PyTorch model."""
    import shutil

    from flexiedge.checkpoint import load_checkpoint
    from flexiedge.models import file_sha256
    from flexiedge.tensorfile import TensorFiles, write_tensors

    run = tmp_path / "bf16-run"
    shutil.copytree(tiny_flexigpt_run, run)
    with TensorFiles.open(tiny_flexigpt_run / "model.safetensors") as src:
        tensors = {n: src.get(n, torch.bfloat16) for n in src.names}
    write_tensors(run / "model.safetensors", tensors, {"format": "flexiedge-checkpoint"})
    meta = json.loads((run / "flexiedge.json").read_text())
    meta["weights"]["sha256"] = file_sha256(run / "model.safetensors")
    (run / "flexiedge.json").write_text(json.dumps(meta))
    assert stream.wants_streaming(run, None)
    report = export_onnx(run, tmp_path / "onnx", OnnxExportConfig(precision="fp32"))
    assert report["streaming"]
    model = load_checkpoint(run).model.float()
    torch.testing.assert_close(ort_logits(tmp_path / "onnx")[REAL], torch_logits(model)[REAL], atol=1e-4, rtol=0)
    assert report["storage"]["bytes_over_unique"] == pytest.approx(1.0, abs=0.01)


def test_plain_hf_folder_with_tied_embeddings(tmp_path, tiny_model_dir):
    """No flexiedge.json: an identity plan; the tied embedding is stored once (Gather + lm_head Transpose)."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir("llama", tie_word_embeddings=True, num_hidden_layers=2)
    report = export_onnx(folder, tmp_path / "onnx", OnnxExportConfig(precision="fp16", streaming=True))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(ort_logits(tmp_path / "onnx")[REAL], torch_logits(model)[REAL], atol=5e-3, rtol=0)
    proto = load_graph(tmp_path / "onnx")
    assert [t.name for t in proto.graph.initializer if "embed" in t.name or "lm_head" in t.name] == \
        ["model.embed_tokens.weight"]
    assert report["streaming"] and report["storage"]["bytes_over_unique"] == pytest.approx(1.0, abs=0.01)


def test_qwen2_biases_of_shared_blocks_stream_once(tmp_path, tiny_run):
    """Qwen2's q/k/v biases: a slot reads its base's (never its own copy); parity with PyTorch.
    (The tiny model's biases are all zero, so the dedup pass merges them: only absence is checked.)"""
    run = tiny_run("qwen2")
    report = export_onnx(run, tmp_path / "onnx", OnnxExportConfig(precision="fp32", streaming=True))
    assert report["verify"]["logit_max_abs_diff"] < 1e-3                 # verify() raised otherwise
    names = {t.name for t in load_graph(tmp_path / "onnx").graph.initializer}
    plan = stream.StreamSource.open(run).plan
    assert any(n.endswith("_proj.bias") for n in names)
    assert not any(n.startswith(f"model.layers.{p}.") and n.endswith("_proj.bias") for p in plan.slots for n in names)
    assert report["storage"]["bytes_over_unique"] == pytest.approx(1.0, abs=0.01)


def test_export_onnx_streams_large_checkpoints_by_default(monkeypatch, tiny_flexigpt_run):
    assert not stream.wants_streaming(tiny_flexigpt_run, None)
    assert stream.wants_streaming(tiny_flexigpt_run, True) and not stream.wants_streaming(tiny_flexigpt_run, False)
    monkeypatch.setattr(stream, "STREAM_ABOVE_BYTES", 1000)
    assert stream.wants_streaming(tiny_flexigpt_run, None)


def test_cli_refuses_stream_with_draft(tiny_flexigpt_run, tmp_path, capsys):
    assert main(["export", "onnx", str(tiny_flexigpt_run), "--out", str(tmp_path / "x"), "--stream", "--draft"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flexiedge: error:") and "--draft" in err and not (tmp_path / "x").exists()


def test_quantized_weight_drops_its_blocks_once_written():
    """Bounded memory: a weight's blocks live from its first tensor's write to its last one's."""
    calls = []

    class Reader:
        def read(self, source):
            calls.append(source)
            return np.ones((64, 8), dtype=np.float32)

    q = stream.QuantizedWeight(Reader(), ("w", (1, 0)), bits=4, block_size=32, symmetric=False)
    q.part(0), q.part(1)
    assert q._blocks is not None and len(calls) == 1
    q.part(2)
    assert q._blocks is None and len(calls) == 1
