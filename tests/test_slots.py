"""Replacement slots: shared Parameters by identity, SVD-initialised adapters, output norms."""

import pytest
import torch

from flexiedge.build import build_from_source
from flexiedge.plan import PROJECTIONS, LayerSpec, Plan


def _plan(num_layers, slot, base, rank, **kw):
    layers = [LayerSpec(b, shares=base, rank=rank) if b == slot else LayerSpec(b) for b in range(num_layers)]
    return Plan(method="flexigpt", num_source_layers=num_layers, layers=layers, pruned=[slot], **kw)


def _block_io(model, position, x):
    """Input and output hidden states of one layer for the token batch x."""
    seen = {}
    layer = model.model.layers[position]
    handle = layer.register_forward_hook(lambda m, a, k, o: seen.update(x=k.get("hidden_states", a[0] if a else None), y=o),
                                         with_kwargs=True)
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    handle.remove()
    return seen["x"], seen["y"]


def test_slot_projections_are_the_base_blocks_parameters(tiny_model):
    model = build_from_source(tiny_model(), _plan(6, slot=3, base=1, rank=4))
    slot, base = model.model.layers[3], model.model.layers[1]
    for name in PROJECTIONS:
        assert slot.get_submodule(name).weight is base.get_submodule(name).weight
    unique = {id(p) for p in model.parameters()}
    assert len(unique) == len(list(model.parameters()))  # parameters() yields the shared ones once


def test_slot_with_zero_gamma_is_an_identity_block(tiny_model):
    model = build_from_source(tiny_model(), _plan(6, slot=3, base=1, rank=4, output_norm_init=0.0))
    x, y = _block_io(model, 3, torch.randint(0, 320, (2, 12)))
    torch.testing.assert_close(y, x)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_full_rank_slot_without_output_norm_reproduces_the_pruned_block(tiny_model, arch):
    source = tiny_model(arch, num_key_value_heads=4)  # every projection then has rank 64
    x = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        reference = source(input_ids=x).logits
    full_rank = 64  # min(d_out, d_in) over all projections of the tiny config
    model = build_from_source(source, _plan(6, slot=3, base=1, rank=full_rank, output_norm=False))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, reference, rtol=1e-4, atol=1e-4)


def test_slot_model_generates_with_a_kv_cache(tiny_model):
    model = build_from_source(tiny_model(), _plan(6, slot=3, base=1, rank=4))
    x = torch.randint(0, 320, (1, 5))
    cached = model.generate(x, max_new_tokens=6, do_sample=False)
    uncached = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
