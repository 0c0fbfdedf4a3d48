"""Extension: repeated blocks share their source's weights and start as the original function."""

import pytest
import torch

from flexiedge.checkpoint import load_checkpoint
from flexiedge.extend import ExtendConfig, extend, extension_plan, repeated_blocks
from flexiedge.prune import CalibrationConfig


@pytest.mark.parametrize("layout,repeats,order", [
    ("block", [1, 3], [0, 1, 1, 2, 3, 3, 4, 5]),
    ("block", [2, 2], [0, 1, 2, 2, 2, 3, 4, 5]),
    ("sequential", [2, 3], [0, 1, 2, 3, 2, 3, 4, 5]),
])
def test_layouts_place_the_repeats(layout, repeats, order):
    plan = extension_plan(6, repeats, layout, ExtendConfig(to=8, layout=layout), None)
    assert [spec.source_block for spec in plan.layers] == order
    for position in plan.slots:  # every repeat runs the weights of an earlier copy of its own block
        owner = plan.layers[position].shares
        assert owner < position and plan.layers[owner].source_block == plan.layers[position].source_block


def test_default_choice_repeats_the_most_influential_inner_blocks():
    scores = [0.9, 0.1, 0.5, 0.3, 0.4, 0.8]
    assert repeated_blocks(scores, 2, "block") == [2, 4]
    assert repeated_blocks(scores, 2, "sequential") == [2, 3]  # 0.5 + 0.3 beats 0.3 + 0.4


@pytest.fixture
def extended(tmp_path, tiny_model_dir, tiny_text_file):
    def make(gamma, layout="block"):
        source = tiny_model_dir()
        calibration = CalibrationConfig(texts=(str(tiny_text_file),), tokens=128, seq_len=64)
        out = extend(str(source), tmp_path / f"ext-{gamma}-{layout}", ExtendConfig(to=9, layout=layout, rank=4,
                     output_norm_init=gamma), calibration)
        return source, out
    return make


@pytest.mark.parametrize("layout", ["block", "sequential"])
def test_with_zero_gamma_the_extended_model_computes_the_original_function(extended, layout):
    from transformers import AutoModelForCausalLM
    source, out = extended(0.0, layout)
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    model = load_checkpoint(out).model
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert len(model.model.layers) == 9


def test_a_block_used_three_times_is_stored_once(extended):
    _, out = extended(0.01)
    ckpt = load_checkpoint(out)
    params = ckpt.metadata["parameters"]
    adapters_and_norms = params["stored"] - params["source"]
    assert 0 < adapters_and_norms < 0.25 * params["source"]  # only adapters and norms are new
    assert params["computed"] > params["stored"]


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_an_extended_model_exports_with_each_block_stored_once(extended, tmp_path, fmt):
    _, run = extended(0.01)
    meta = load_checkpoint(run).metadata["parameters"]
    if fmt == "gguf":
        from flexiedge.exporters.gguf import GGUFExportConfig, export_gguf, storage_report
        out = tmp_path / "gguf"
        export_gguf(run, out, GGUFExportConfig(type="f32"))
        report = storage_report(out)
        assert report["unique_params"] == meta["stored"]
        assert report["bytes_over_unique"] == pytest.approx(1.0, abs=0.01)
    else:
        from flexiedge.exporters.onnx import OnnxExportConfig, export_onnx
        out = tmp_path / "onnx"
        report = export_onnx(run, out, OnnxExportConfig(precision="fp32"))
        stored = sum(p.stat().st_size for p in out.glob("*.data"))
        # At most the checkpoint's unique bytes: equal-valued tensors (fresh zero lora_B) may merge too.
        assert 0.9 * meta["stored_bytes"] < stored <= 1.01 * meta["stored_bytes"]


def test_continued_pretraining_of_an_extended_model_trains_only_the_repeats(extended, tmp_path, tiny_text_file):
    from flexiedge.recover import recover
    from flexiedge.train_config import TrainConfig
    _, run = extended(0.01)
    before = load_checkpoint(run).model
    out = recover(run, tmp_path / "trained", TrainConfig(tokens=256, seq_len=32, batch_size=2,
                                                         data=(str(tiny_text_file),)), progress=False)
    after = load_checkpoint(out).model
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    changed = {n for n in b if not torch.equal(b[n], a[n])}
    assert changed and all(".lora_" in n or "norm" in n for n in changed)
    assert all(n.startswith(tuple(f"model.layers.{p}." for p in load_checkpoint(run).plan.slots)) for n in changed)
