"""The checkpoint: every base weight stored once, sharing re-tied by identity, tampering detected."""

import json

import pytest
import torch
from safetensors import safe_open

from flexiedge.checkpoint import load_checkpoint
from flexiedge.errors import FlexiEdgeError
from flexiedge.plan import PROJECTIONS


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _unique_bytes(model):
    """Bytes of the distinct tensors a model holds (a shared Parameter counts once)."""
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(unique.values())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_round_trip_gives_identical_logits_and_unique_bytes(tiny_run, arch):
    run = tiny_run(arch)
    first, second = load_checkpoint(run), load_checkpoint(run)
    ids = torch.randint(0, 320, (2, 10))
    torch.testing.assert_close(_logits(first.model, ids), _logits(second.model, ids), rtol=0, atol=0)
    meta = json.loads((run / "flexiedge.json").read_text())
    assert _unique_bytes(first.model) == _unique_bytes(second.model) == meta["parameters"]["stored_bytes"]


def test_saved_model_matches_the_model_before_saving(tmp_path, tiny_model, tiny_tokenizer):
    from flexiedge.checkpoint import save_checkpoint
    from flexiedge.plan import PruneConfig, make_plan
    from flexiedge.prune import apply_plan
    model = tiny_model()
    config = PruneConfig(blocks=2, rank=4)
    plan = make_plan(config, [0.5] * 6, [2, 4], {2: 1, 4: 3})
    apply_plan(model, plan, config)
    with torch.no_grad():
        for p in model.parameters():  # make every tensor distinct from its init
            p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(0, 320, (2, 10))
    out = save_checkpoint(model, tiny_tokenizer, plan, tmp_path / "run", provenance={})
    torch.testing.assert_close(_logits(load_checkpoint(out).model, ids), _logits(model, ids), rtol=0, atol=0)


def test_loaded_slots_share_base_parameters_by_identity(tiny_run):
    ckpt = load_checkpoint(tiny_run())
    layers = ckpt.model.model.layers
    for position in ckpt.plan.slots:
        base = layers[ckpt.plan.layers[position].shares]
        for name in PROJECTIONS:
            assert layers[position].get_submodule(name).weight is base.get_submodule(name).weight


def test_each_base_weight_is_stored_exactly_once(tiny_run):
    run = tiny_run()
    ckpt = load_checkpoint(run)
    with safe_open(run / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for position in ckpt.plan.slots:
        base = ckpt.plan.layers[position].shares
        for proj in PROJECTIONS:
            assert f"model.layers.{position}.{proj}.weight" not in names
            assert f"model.layers.{base}.{proj}.weight" in names
            assert f"model.layers.{position}.{proj}.lora_A" in names


def test_shortgpt_equals_a_model_built_without_the_pruned_layers(tiny_run, tiny_model):
    from transformers import AutoModelForCausalLM
    run = tiny_run(method="shortgpt")
    ckpt = load_checkpoint(run)
    pruned = ckpt.plan.pruned
    source = tiny_model()  # same seed as the fixture's source model
    config = source.config
    config.num_hidden_layers = 6 - len(pruned)
    reference = AutoModelForCausalLM.from_config(config).eval()
    kept = [i for i in range(6) if i not in pruned]
    state = {}
    for k, v in source.state_dict().items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i in kept:
                state[k.replace(f"model.layers.{i}.", f"model.layers.{kept.index(i)}.", 1)] = v
        else:
            state[k] = v
    reference.load_state_dict(state)
    ids = torch.randint(0, 320, (2, 10))
    torch.testing.assert_close(_logits(ckpt.model, ids), _logits(reference, ids), rtol=0, atol=0)
    # A ShortGPT run is also a plain HF model folder.
    plain = AutoModelForCausalLM.from_pretrained(run).eval()
    torch.testing.assert_close(_logits(plain, ids), _logits(reference, ids), rtol=0, atol=0)


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "does not match the checksum"),            # truncated
    (lambda p: p.write_bytes(p.read_bytes()[:-4] + b"\x00\x01\x02\x03"), "does not match the checksum"),  # tampered
    (lambda p: p.unlink(), "is missing"),
])
def test_damaged_weights_give_a_clear_error(tiny_run, damage, message):
    run = tiny_run()
    damage(run / "model.safetensors")
    with pytest.raises(FlexiEdgeError, match=message):
        load_checkpoint(run)


def test_corrupt_safetensors_with_a_matching_checksum_gives_a_clear_error(tiny_run):
    run = tiny_run()
    (run / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FlexiEdgeError, match="not a readable safetensors file"):
        load_checkpoint(run, verify=False)
