"""Self-speculative decoding on onnxruntime: draft.onnx (the stack without its slots) reads the full
model's data file, both sessions share one mapped copy of the weights, and greedy output is exactly
plain greedy decoding (ORT and PyTorch alike)."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from flexiedge.cli import main
from flexiedge.exporters import onnx_graph as graph
from flexiedge.exporters.onnx import DATA_FILE, DRAFT_DATA_FILE, DRAFT_FILE, MODEL_FILE, REPORT, draft_stack
from flexiedge.runtimes.onnxruntime import OrtDecoder, OrtModel, load_pair, shared_initializers
from flexiedge.runtimes.pytorch import TorchDecoder, greedy_generate, slots_skipped
from flexiedge.runtimes.speculative import speculative_generate
from flexiedge.slots import FlexiSlot

PROMPTS = [[5], [7, 8, 9, 10, 11, 12], list(range(40, 60))]


@pytest.fixture(scope="module")
def spec_export(tmp_path_factory, tiny_tokenizer, tiny_text_file):
    """A tiny FlexiGPT run whose slots matter (output norms at 0.5), exported with --draft: (run, folder)."""
    import importlib.util
    from pathlib import Path

    from flexiedge.plan import PruneConfig
    from flexiedge.prune import CalibrationConfig, prune

    spec = importlib.util.spec_from_file_location("flexiedge_tests_conftest", Path(__file__).parents[1] / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    root = tmp_path_factory.mktemp("onnx-spec")
    conftest.make_tiny_model("llama").save_pretrained(root / "tiny")
    tiny_tokenizer.save_pretrained(root / "tiny")
    calibration = CalibrationConfig(texts=(str(tiny_text_file),), tokens=256, seq_len=64)
    run = prune(str(root / "tiny"), root / "run", PruneConfig(blocks=2, rank=4, output_norm_init=0.5), calibration)
    assert main(["export", "onnx", str(run), "--out", str(root / "onnx"), "--draft"]) == 0
    return run, root / "onnx"


@pytest.fixture(scope="module")
def checkpoint(spec_export):
    from flexiedge.checkpoint import load_checkpoint
    return load_checkpoint(spec_export[0])


@pytest.fixture(scope="module")
def pair(spec_export):
    return load_pair(spec_export[1], threads=1)


def test_the_draft_is_the_kept_layers_with_renumbered_kv_io(spec_export, checkpoint):
    _, folder = spec_export
    draft = onnx.load_model(folder / DRAFT_FILE, load_external_data=False)
    kept = [i for i, layer in enumerate(checkpoint.model.model.layers) if not isinstance(layer, FlexiSlot)]
    assert len(kept) == 4
    past = [x.name for x in draft.graph.input if x.name.startswith("past_key_values.")]
    assert past == [f"past_key_values.{i}.{kv}" for i in range(len(kept)) for kv in ("key", "value")]
    assert [x.name for x in draft.graph.output][1:] == [f"present.{i}.{kv}" for i in range(len(kept))
                                                       for kv in ("key", "value")]
    report = json.loads((folder / REPORT).read_text())["draft"]
    assert report["layers"] == len(kept) and report["kept_positions"] == kept


def test_the_draft_stores_no_weight_twice(spec_export):
    _, folder = spec_export
    full = onnx.load_model(folder / MODEL_FILE, load_external_data=False)
    draft = onnx.load_model(folder / DRAFT_FILE, load_external_data=False)
    stored = {}
    for t in full.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        stored[t.name] = (info["location"], int(info["offset"]), int(info["length"]))
    draft_bytes = 0
    for t in draft.graph.initializer:  # every draft tensor is a byte range the full model already stores
        assert t.data_location == onnx.TensorProto.EXTERNAL and not t.HasField("raw_data")
        info = {e.key: e.value for e in t.external_data}
        assert (info["location"], int(info["offset"]), int(info["length"])) == stored[t.name]
        draft_bytes += int(info["length"])
    assert draft_bytes == graph.initializer_bytes(draft) > 0.5 * (folder / DATA_FILE).stat().st_size
    assert not (folder / DRAFT_DATA_FILE).exists()
    assert (folder / DRAFT_FILE).stat().st_size < (folder / MODEL_FILE).stat().st_size   # graph only
    report = json.loads((folder / REPORT).read_text())
    assert report["draft"]["own_data_bytes"] == 0 and report["draft"]["unmatched_initializers"] == []
    assert abs(report["storage"]["bytes_over_unique"] - 1) < 0.01   # the full export is unchanged: once each


def test_draft_logits_match_pytorch_with_slots_skipped(spec_export, checkpoint):
    _, folder = spec_export
    model = checkpoint.model
    ids = list(range(3, 19))
    with torch.no_grad(), slots_skipped(model):
        want = model(input_ids=torch.tensor([ids])).logits[0]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids])).logits[0]
    assert (want - full).abs().max() > 1e-2                      # the draft is really another model
    draft = OrtDecoder(OrtModel.load(folder, threads=1, tokenizer=False, draft=True))
    torch.testing.assert_close(draft.extend(draft.start(), ids), want, atol=1e-4, rtol=0)
    cache = draft.start()                                         # and through the cache, one token at a time
    draft.extend(cache, ids[:10])
    steps = torch.cat([draft.extend(cache, [t]) for t in ids[10:]])
    torch.testing.assert_close(steps, want[10:], atol=1e-4, rtol=0)
    assert json.loads((folder / REPORT).read_text())["draft"]["verify"]["logit_max_abs_diff"] < 1e-3


def test_both_sessions_read_one_shared_copy_of_every_draft_weight(spec_export, pair):
    _, folder = spec_export
    draft = onnx.load_model(folder / DRAFT_FILE, load_external_data=False)
    values = shared_initializers(folder)
    assert set(values) == {t.name for t in draft.graph.initializer}
    full, draft_model = pair
    assert full._initializers is draft_model._initializers


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_on_ort_equals_plain_greedy_ort_and_pytorch(pair, checkpoint, k, prompt):
    full, draft = (OrtDecoder(m) for m in pair)
    plain = greedy_generate(full, prompt, 20)
    spec, stats = speculative_generate(full, draft, prompt, 20, k)
    assert spec == plain == greedy_generate(TorchDecoder(checkpoint.model), prompt, 20)
    assert stats.generated == 20 and stats.accepted <= stats.drafted


def test_unshared_sessions_give_the_same_output(spec_export, pair):
    full, draft = (OrtDecoder(m) for m in load_pair(spec_export[1], threads=1, share=False))
    shared_full, shared_draft = (OrtDecoder(m) for m in pair)
    prompt = PROMPTS[1]
    assert speculative_generate(full, draft, prompt, 12, 3) == speculative_generate(shared_full, shared_draft,
                                                                                    prompt, 12, 3)


def test_crop_forgets_positions(pair):
    decoder = OrtDecoder(pair[0])
    cache = decoder.start()
    decoder.extend(cache, [5, 6, 7, 8])
    decoder.crop(cache, 2)
    assert decoder.length(cache) == 2 and all(a.shape[2] == 2 for a in cache.past)
    again = decoder.extend(cache, [7, 8])
    torch.testing.assert_close(again, decoder.extend(decoder.start(), [5, 6, 7, 8])[2:], atol=1e-5, rtol=0)


def test_draft_stack_restores_the_model(checkpoint):
    model = checkpoint.model
    layers, idx = list(model.model.layers), [layer.self_attn.layer_idx for layer in model.model.layers]
    with draft_stack(model) as kept:
        assert len(model.model.layers) == model.config.num_hidden_layers == len(kept)
        assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(len(kept)))
    assert list(model.model.layers) == layers and model.config.num_hidden_layers == len(layers)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == idx
