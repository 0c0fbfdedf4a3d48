"""Block-by-block pruning (--stream) gives the in-memory pruning's plan and checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flexiedge.checkpoint import load_checkpoint
from flexiedge.errors import FlexiEdgeError
from flexiedge.memory import StageLog
from flexiedge.plan import PruneConfig
from flexiedge.prune import CalibrationConfig, prune


@pytest.fixture
def prune_both(tmp_path, tiny_model_dir, tiny_text_file):
    def make(arch="llama", **config):
        folder = tiny_model_dir(arch)
        calibration = CalibrationConfig(texts=(str(tiny_text_file),), tokens=256, seq_len=64)
        config = dict(dict(blocks=2, rank=4), **config)
        runs = [prune(str(folder), tmp_path / f"{arch}-{stream}", PruneConfig(**config), calibration, stream=stream)
                for stream in (False, True)]
        return runs
    return make


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_streamed_scores_and_plan_match_in_memory(prune_both, arch):
    in_memory, streamed = (json.loads((r / "flexiedge.json").read_text())["plan"] for r in prune_both(arch))
    torch.testing.assert_close(streamed["block_influence"], in_memory["block_influence"], rtol=1e-4, atol=1e-6)
    assert streamed["layers"] == in_memory["layers"]


@pytest.mark.parametrize("method", ["flexigpt", "shortgpt"])
def test_streamed_checkpoint_holds_the_same_tensors(prune_both, method):
    in_memory, streamed = (load_file(r / "model.safetensors") for r in prune_both(method=method))
    assert streamed.keys() == in_memory.keys()
    for name in in_memory:
        torch.testing.assert_close(streamed[name], in_memory[name], rtol=1e-4, atol=1e-5, msg=name)


def test_streamed_checkpoint_loads_and_computes_like_in_memory(prune_both):
    in_memory, streamed = (load_checkpoint(r) for r in prune_both())
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(streamed.model(ids).logits, in_memory.model(ids).logits, rtol=1e-4, atol=1e-4)
    assert streamed.metadata["parameters"] == in_memory.metadata["parameters"]


def test_streamed_prune_records_each_stage(prune_both):
    _, streamed = prune_both()
    stages = json.loads((streamed / "flexiedge.json").read_text())["provenance"]["stages"]
    assert [s["stage"] for s in stages] == ["score", "select_init", "save"]
    assert all(s["seconds"] >= 0 and s["peak_rss_gb"] > 0 for s in stages)


def test_stream_refuses_a_selection_that_needs_the_whole_model(tmp_path, tiny_model_dir, tiny_text_file):
    calibration = CalibrationConfig(texts=(str(tiny_text_file),), tokens=128, seq_len=64)
    with pytest.raises(FlexiEdgeError, match="--selection frobenius needs the whole model"):
        prune(str(tiny_model_dir()), tmp_path / "run", PruneConfig(blocks=2, rank=4, selection="frobenius"),
              calibration, stream=True)
    assert not (tmp_path / "run").exists()


def test_stage_log_measures_a_stage():
    log = StageLog()
    with log.stage("allocate"):
        block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
        del block
    assert log.records[0]["stage"] == "allocate" and log.records[0]["peak_rss_gb"] > 0.06


def test_streamed_prune_never_loads_the_whole_model(monkeypatch, tmp_path, tiny_model_dir, tiny_text_file):
    import flexiedge.prune as prune_module

    def refuse(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(prune_module, "load_model", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)
    calibration = CalibrationConfig(texts=(str(tiny_text_file),), tokens=128, seq_len=64)
    run = prune(str(tiny_model_dir()), tmp_path / "run", PruneConfig(blocks=2, rank=4), calibration, stream=True)
    assert (run / "model.safetensors").is_file()


def test_automatic_streaming_follows_available_memory(monkeypatch, tiny_model_dir):
    import flexiedge.prune as prune_module

    folder = tiny_model_dir()
    monkeypatch.setattr(prune_module, "available_memory_bytes", lambda: 10**12)
    assert not prune_module.needs_streaming(folder)
    monkeypatch.setattr(prune_module, "available_memory_bytes", lambda: 10**3)
    assert prune_module.needs_streaming(folder)


def test_an_interrupted_streamed_prune_resumes_from_its_finished_pieces(monkeypatch, tmp_path, tiny_model_dir,
                                                                        tiny_text_file):
    import flexiedge.blockwise as blockwise

    folder, calls = tiny_model_dir(), []
    calibration = CalibrationConfig(texts=(str(tiny_text_file),), tokens=128, seq_len=64)
    config = PruneConfig(blocks=2, rank=4)
    reference = prune(str(folder), tmp_path / "reference", config, calibration, stream=True)

    real_slot_adapters = blockwise.slot_adapters

    def interrupted(*args):
        calls.append("adapters")
        if len(calls) == 2:
            raise KeyboardInterrupt  # the second slot
        return real_slot_adapters(*args)

    monkeypatch.setattr(blockwise, "slot_adapters", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune(str(folder), tmp_path / "run", config, calibration, stream=True)
    assert not (tmp_path / "run").exists() and (tmp_path / "run.work").is_dir()

    monkeypatch.setattr(blockwise, "streamed_block_influence", lambda *a, **k: pytest.fail("scores recomputed"))
    monkeypatch.setattr(blockwise, "block_factors", lambda *a, **k: pytest.fail("factors recomputed"))
    calls.clear()
    run = prune(str(folder), tmp_path / "run", config, calibration, stream=True)
    assert calls == ["adapters"]  # only the slot that was interrupted
    assert not (tmp_path / "run.work").exists()
    resumed, fresh = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert resumed.keys() == fresh.keys()
    for name in fresh:
        torch.testing.assert_close(resumed[name], fresh[name], rtol=0, atol=0, msg=name)


def test_a_folder_without_safetensors_is_pruned_in_memory(tmp_path, tiny_model, tiny_tokenizer, tiny_text_file):
    folder = tmp_path / "bin-model"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")  # an older checkpoint's layout
    (folder / "model.safetensors").unlink()
    calibration = CalibrationConfig(texts=(str(tiny_text_file),), tokens=128, seq_len=64)
    run = prune(str(folder), tmp_path / "run", PruneConfig(blocks=2, rank=4), calibration)
    assert (run / "model.safetensors").is_file()
