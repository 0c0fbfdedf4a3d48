"""ONNX export of a tiny FlexiGPT run: parity with PyTorch, shared weights stored once at every precision.

The reference is the checkpoint's PyTorch model (transformers' Llama with FlexiSlots); onnxruntime runs
the exported files. One trace serves all precisions (see conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from flexiedge.cli import main
from flexiedge.exporters import onnx_graph as graph
from flexiedge.exporters.onnx import (DATA_FILE, GENAI_CONFIG, MODEL_FILE, expected_shared_groups, export_onnx,
                                      unique_parameters)
from flexiedge.plan import PROJECTIONS
from flexiedge.runtimes.onnxruntime import OrtModel

PROMPTS = [[5, 17, 42, 99, 7, 63, 28, 11, 3, 250],
           [0, 0, 0, 0, 31, 8, 77, 3, 50, 121]]   # 4 left pads
MASK = [[1] * 10, [0] * 4 + [1] * 6]


def torch_logits(model, ids, mask):
    """The reference: the PyTorch model on the whole sequence, positions counted from the first real token."""
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


def load_graph(folder):
    return onnx.load_model(folder / MODEL_FILE)


def test_prefill_matches_pytorch_on_a_left_padded_batch(tiny_checkpoint, tiny_export):
    folder, _ = tiny_export("fp32")
    got = OrtModel.load(folder).forward(np.array(PROMPTS), np.array(MASK))[0]
    want = torch_logits(tiny_checkpoint.model, PROMPTS, MASK)
    real = torch.tensor(MASK, dtype=torch.bool)
    torch.testing.assert_close(torch.from_numpy(got)[real], want[real], atol=1e-4, rtol=0)


def test_one_step_decode_from_the_cache_matches_pytorch(tiny_checkpoint, tiny_export):
    folder, _ = tiny_export("fp32")
    ort_model = OrtModel.load(folder)
    prompt, mask = np.array(PROMPTS)[:, :-1], np.array(MASK)[:, :-1]
    _, past = ort_model.forward(prompt, mask)
    assert past[0].shape[2] == 9                                   # the cache holds the prompt
    got = ort_model.forward(np.array(PROMPTS)[:, -1:], np.array(MASK), past)[0][:, -1]
    want = torch_logits(tiny_checkpoint.model, PROMPTS, MASK)[:, -1]
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=0)


def test_each_shared_weight_is_one_initializer_read_by_its_base_and_all_its_slots(tiny_checkpoint, tiny_export):
    folder, _ = tiny_export("fp32")
    shared = graph.shared_weights(load_graph(folder))
    groups = expected_shared_groups(tiny_checkpoint.plan)
    assert groups and all(len(g) >= 2 for g in groups)             # the run really shares blocks
    assert sorted(shared.values()) == sorted(g for g in groups for _ in PROJECTIONS)


@pytest.mark.parametrize("precision, bytes_per_element", [("fp32", 4), ("fp16", 2)])
def test_stored_bytes_are_the_unique_parameters_once(tiny_checkpoint, tiny_export, precision, bytes_per_element):
    folder, report = tiny_export(precision)
    expected = unique_parameters(tiny_checkpoint.model) * bytes_per_element
    assert (folder / DATA_FILE).stat().st_size == pytest.approx(expected, rel=0.01)
    # The parameters computed with count each shared block once per use: more than what is stored.
    computed = tiny_checkpoint.metadata["parameters"]["computed"]
    assert computed * bytes_per_element > 1.2 * expected
    assert report["storage"]["shared_single_copy"]


@pytest.mark.parametrize("precision, bits", [("int8", 8), ("int4", 4)])
def test_quantized_exports_keep_one_copy_per_shared_weight(tiny_checkpoint, tiny_export, precision, bits):
    folder, report = tiny_export(precision)
    proto = load_graph(folder)
    shared = graph.shared_weights(proto)
    groups = expected_shared_groups(tiny_checkpoint.plan)
    assert sorted(shared.values()) == sorted(g for g in groups for _ in PROJECTIONS)
    readers = [n for n in proto.graph.node if len(n.input) > 1 and n.input[1] in shared]
    assert readers and {n.op_type for n in readers} == {"MatMulNBits"}   # the shared copy IS quantised
    assert all(a.i == bits for n in readers for a in n.attribute if a.name == "bits")
    # No two initializers hold the same bytes.
    digests = [graph._digest(t) for t in proto.graph.initializer]
    assert len(digests) == len(set(digests))
    assert report["verify"]["argmax_agreement"] >= {8: 0.8, 4: 0.4}[bits]


def test_adapters_and_output_norms_are_ordinary_ops(tiny_checkpoint, tiny_export):
    folder, _ = tiny_export("fp32")
    proto = load_graph(folder)
    slots = tiny_checkpoint.plan.slots
    names = {t.name for t in proto.graph.initializer}
    for p in slots:
        for proj in PROJECTIONS:
            assert any(n.startswith(f"model.layers.{p}.{proj}.lora_A") for n in names)
            assert any(n.startswith(f"model.layers.{p}.{proj}.lora_B") for n in names)
    norms = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert sorted({graph.layer_of(n) for n in norms}) == slots and len(norms) == 2 * len(slots)
    assert any(n.name.startswith(f"/model/layers.{slots[0]}/self_attn/q_proj/MatMul") for n in proto.graph.node)


def test_genai_config_names_the_graph_inputs_and_outputs(tiny_checkpoint, tiny_export):
    folder, _ = tiny_export("fp32")
    config = json.loads((folder / GENAI_CONFIG).read_text())
    decoder, model_config = config["model"]["decoder"], tiny_checkpoint.model.config
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"]) == (4 + 2, 4, 2, 16)
    assert config["model"]["type"] == "llama" and config["model"]["vocab_size"] == model_config.vocab_size
    assert (config["model"]["eos_token_id"], config["model"]["bos_token_id"]) == (2, 1)
    proto = onnx.load_model(folder / MODEL_FILE, load_external_data=False)
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    n = decoder["num_hidden_layers"]
    assert inputs == ["input_ids", "attention_mask", "position_ids"] + [
        decoder["inputs"][f"past_{kv}_names"] % i for i in range(n) for kv in ("key", "value")]
    assert outputs == ["logits"] + [
        decoder["outputs"][f"present_{kv}_names"] % i for i in range(n) for kv in ("key", "value")]
    assert (folder / "tokenizer.json").is_file()
    assert sorted(p.name for p in folder.iterdir() if "onnx" in p.name) == [MODEL_FILE, DATA_FILE]


def test_cli_refuses_an_existing_out_before_tracing(tiny_flexigpt_run, tiny_export, capsys):
    folder, _ = tiny_export("fp32")
    capsys.readouterr()                                            # drop what exporting printed
    assert main(["export", "onnx", str(tiny_flexigpt_run), "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flexiedge: error:") and "--force" in err and "\n" not in err
    assert not list(folder.parent.glob("*.tmp-*"))


@pytest.mark.slow
def test_real_smollm2_flexigpt_fp32_export_matches_pytorch_and_stores_each_weight_once(tmp_path, smollm2_run):
    report = export_onnx(smollm2_run, tmp_path / "onnx")             # verify() runs inside and raises on failure
    assert report["verify"]["logit_max_abs_diff"] < 1e-3 and report["verify"]["argmax_agreement"] == 1.0
    assert report["storage"]["bytes_over_unique"] == pytest.approx(1.0, abs=0.01)
    assert report["storage"]["shared_single_copy"]


def test_onnxruntime_session_optimisation_keeps_one_copy_per_shared_weight(tiny_checkpoint, tiny_export, tmp_path):
    import onnxruntime as ort
    folder, _ = tiny_export("fp32")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable fusions only
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load_model(tmp_path / "optimised.onnx", load_external_data=False)  # it points at ours
    groups = expected_shared_groups(tiny_checkpoint.plan)
    assert sorted(graph.shared_weights(optimised).values()) == sorted(g for g in groups for _ in PROJECTIONS)
    assert graph.initializer_bytes(optimised) <= 1.01 * graph.initializer_bytes(load_graph(folder))
