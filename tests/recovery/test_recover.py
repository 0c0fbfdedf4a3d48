"""Recovery fine-tune on tiny runs: what trains, that it learns, resume == uninterrupted, reload keeps sharing."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from flexiedge.build import shared_parameter_names
from flexiedge.checkpoint import load_checkpoint, read_metadata
from flexiedge.cli import main
from flexiedge.errors import FlexiEdgeError
from flexiedge.plan import PROJECTIONS, Plan
from flexiedge.recover import TRAINER_STATE, read_log, recover
from flexiedge.slots import LoRALinear
from flexiedge.train_config import TrainConfig, config_from


@pytest.fixture
def train_config(tiny_text_file, tmp_path):
    """Factory: a few tiny steps on the tiny text (seq 32, batch 2); warm start and teacher cache kept tiny/local."""
    def make(**overrides):
        fields = dict(tokens=32 * 2 * 6, data=(str(tiny_text_file),), seq_len=32, batch_size=2, eval_every=2,
                      eval_sequences=2, save_every=0, warm_start_data=(str(tiny_text_file),), warm_start_tokens=256,
                      teacher_cache=str(tmp_path / "teacher"))
        fields.update(overrides)
        return TrainConfig(**fields)
    return make


def stored(run) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def is_trainable(name: str, plan: Plan) -> bool:
    """Independent restatement of METHOD.md section 5: adapters anywhere, norms only in slots."""
    if name.endswith(("lora_A", "lora_B")):
        return True
    if not name.startswith("model.layers."):
        return False
    position = int(name.split(".")[2])
    return plan.layers[position].is_slot and "norm" in name


@pytest.mark.parametrize("method, kept_lora, recipe", [
    ("flexigpt", 0, "flexiedge"),   # slots: adapters, output norms and slot RMSNorms train
    ("flexigpt", 0, "slots_kept"),  # the default: half the slot rank moves to new LoRA on the kept blocks
    ("flexigpt", 2, "slots_kept"),  # an explicit kept-block rank instead of the recipe's share
    ("shortgpt", 3, "slots_kept"),  # the ShortGPT+LoRA baseline: only kept-block LoRA exists
])
def test_only_intended_parameters_change(tiny_run, train_config, tmp_path, method, kept_lora, recipe):
    run = tiny_run(method=method)
    out = recover(run, tmp_path / "rec", train_config(kept_lora=kept_lora, recipe=recipe), progress=False)
    before, after = stored(run), stored(out)
    plan = Plan.from_json(read_metadata(out)["plan"])
    new = set(after) - set(before)
    adds_kept_lora = bool(kept_lora) or (recipe == "slots_kept" and method == "flexigpt")
    assert all(n.endswith(("lora_A", "lora_B")) for n in new) and (bool(new) == adds_kept_lora)
    for name, tensor in after.items():
        if name in new:
            continue
        if is_trainable(name, plan):
            assert not torch.equal(tensor, before[name]), f"{name} did not train"
        else:
            assert torch.equal(tensor, before[name]), f"frozen {name} changed"  # bitwise


def test_loss_decreases(tiny_run, train_config, tmp_path):
    # The paper's recipe: next-token loss. (The default distils from the unpruned model, which for these
    # random tiny models is no better than the student, so held-out next-token loss need not fall.)
    out = recover(tiny_run(), tmp_path / "rec", train_config(tokens=32 * 2 * 30, lr=1e-2, eval_every=1,
                                                             recipe="paper"), progress=False)
    evals = [r["eval_loss"] for r in read_log(out)]
    assert evals[-1] < evals[0] - 0.05, evals


def assert_same_runs(a, b):
    ta, tb = stored(a), stored(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    la, lb = read_log(a), read_log(b)
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r.get("eval_loss") for r in la] == [r.get("eval_loss") for r in lb]


@pytest.mark.parametrize("kept_lora", [0, 2])
def test_resume_equals_uninterrupted(tiny_run, train_config, tmp_path, kept_lora):
    run, config = tiny_run(), train_config(kept_lora=kept_lora, grad_accum=2, warmup_steps=2)
    whole = recover(run, tmp_path / "whole", config, progress=False)
    part = recover(run, tmp_path / "part", config, stop_after=2, progress=False)
    assert read_metadata(part)["provenance"]["recovery"]["complete"] is False
    load_checkpoint(part)  # an interrupted run is a usable checkpoint
    recover(run, part, config, resume=True, progress=False)
    assert_same_runs(whole, part)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_it(tiny_run, train_config, tmp_path, monkeypatch):
    import flexiedge.recover as rec

    run, config = tiny_run(), train_config()
    whole = recover(run, tmp_path / "whole", config, progress=False)
    real_step = rec.train_step

    def step_then_ctrl_c(session, *args):
        loss = real_step(session, *args)
        if session.step == 2:  # Ctrl-C arrives during step 3 (0-based 2)
            signal.raise_signal(signal.SIGINT)
        return loss

    monkeypatch.setattr(rec, "train_step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        recover(run, tmp_path / "part", config, progress=False)
    monkeypatch.setattr(rec, "train_step", real_step)
    assert read_log(tmp_path / "part")[-1]["step"] == 3
    assert (tmp_path / "part" / TRAINER_STATE).is_file()
    recover(run, tmp_path / "part", config, resume=True, progress=False)
    assert_same_runs(whole, tmp_path / "part")


def test_recovered_checkpoint_reloads_with_sharing_intact(tiny_run, train_config, tmp_path):
    run = tiny_run()
    out = recover(run, tmp_path / "rec", train_config(kept_lora=2), progress=False)
    ckpt = load_checkpoint(out)
    layers = ckpt.model.model.layers
    for position in ckpt.plan.slots:
        base = layers[ckpt.plan.layers[position].shares]
        for name in PROJECTIONS:
            assert layers[position].get_submodule(name).weight is base.get_submodule(name).weight
    kept = [p for p in range(len(layers)) if not ckpt.plan.layers[p].is_slot]
    assert all(isinstance(layers[p].get_submodule(n), LoRALinear) and ckpt.plan.layers[p].rank == 2
               for p in kept for n in PROJECTIONS)
    assert not set(shared_parameter_names(ckpt.plan)) & set(stored(out))  # shared weights stored once
    # The reloaded model computes what the saved tensors say: compare against a second load.
    ids = torch.randint(0, 300, (1, 16))
    again = load_checkpoint(out).model
    torch.testing.assert_close(ckpt.model(ids).logits, again(ids).logits, rtol=0, atol=0)


def test_checkpoint_without_kept_lora_still_loads_the_old_way(tiny_run):
    """Backward compatibility: a plan whose kept layers have rank 0 builds plain nn.Linear there."""
    ckpt = load_checkpoint(tiny_run())
    kept = [p for p, spec in enumerate(ckpt.plan.layers) if not spec.is_slot]
    assert all(type(ckpt.model.model.layers[p].self_attn.q_proj) is torch.nn.Linear for p in kept)


def test_out_exists_without_resume_is_an_error(tiny_run, train_config, tmp_path):
    run = tiny_run()
    recover(run, tmp_path / "rec", train_config(tokens=64), progress=False)
    with pytest.raises(FlexiEdgeError, match="already exists"):
        recover(run, tmp_path / "rec", train_config(tokens=64), progress=False)


def test_shortgpt_without_kept_lora_has_nothing_to_train(tiny_run, train_config, tmp_path):
    with pytest.raises(FlexiEdgeError, match="--kept-lora"):
        recover(tiny_run(method="shortgpt"), tmp_path / "rec", train_config(), progress=False)


def test_config_precedence_defaults_file_cli(tmp_path):
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("lr: 0.001\nseq_len: 128\ndata: [alice29]\n")
    config = config_from(yaml_file, seq_len=64, lr=None)
    assert (config.lr, config.seq_len, config.data, config.batch_size) == (0.001, 64, ("alice29",), 4)
    json_file = tmp_path / "train.json"
    json_file.write_text('{"learning_rate": 1}')
    with pytest.raises(FlexiEdgeError, match="unknown training setting 'learning_rate'"):
        config_from(json_file)


def test_cli_recover(tiny_run, tiny_text_file, tmp_path, capsys):
    run = tiny_run()
    rc = main(["recover", str(run), "--out", str(tmp_path / "rec"), "--tokens", "128", "--data", str(tiny_text_file),
               "--seq-len", "32", "--batch-size", "2", "--lr", "1e-3"])
    assert rc == 0
    assert "held-out PPL" in capsys.readouterr().out
    recovery = read_metadata(tmp_path / "rec")["provenance"]["recovery"]
    assert recovery["config"]["lr"] == 1e-3 and recovery["complete"] and recovery["total_steps"] == 2
