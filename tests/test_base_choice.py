"""Base choice by function (`selection="functional"`) and per-slot ranks from the difference spectra
(`rank_allocation="energy"`), pinned against references computed here without the code under test."""

from __future__ import annotations

import copy

import pytest
import torch

from flexiedge.checkpoint import load_checkpoint
from flexiedge.errors import FlexiEdgeError
from flexiedge.plan import PROJECTIONS, PruneConfig, allocate_ranks, difference_energy, energy_ranks
from flexiedge.warmstart import functional_distances


def _truncate(w, r):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def _block_output(model, block, windows):
    """Output of `block` inside a full forward pass (hooked), for the reference."""
    seen = []
    handle = model.model.layers[block].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    handle.remove()
    return seen[0]


def _perturb(target, source, rank, scale=0.3):
    """target's projections := source's + a random rank-`rank` change."""
    with torch.no_grad():
        for name in PROJECTIONS:
            w = source.get_submodule(name).weight
            change = torch.randn(w.shape[0], rank) @ torch.randn(rank, w.shape[1]) * scale * w.std()
            target.get_submodule(name).weight.copy_(w + change)


def test_functional_distance_is_the_error_of_the_pruned_block_on_the_svd_corrected_base(tiny_model):
    """distance[i][j] = mean_t ||y'_t - y_t||^2 / ||y_t||^2, y' = block i with W_j + [W_i - W_j]_r, same inputs."""
    model, windows, rank = tiny_model(), torch.randint(3, 300, (4, 24)), 4
    distances = functional_distances(model, [2], [1, 3], rank, windows, batch_size=4, svd="exact")
    y = _block_output(model, 2, windows)
    for j in (1, 3):
        corrected = copy.deepcopy(model)
        with torch.no_grad():
            for name in PROJECTIONS:
                wi, wj = model.model.layers[2].get_submodule(name).weight, model.model.layers[j].get_submodule(name).weight
                corrected.model.layers[2].get_submodule(name).weight.copy_(wj + _truncate(wi - wj, rank))
        y_corrected = _block_output(corrected, 2, windows)  # blocks 0, 1 unchanged: block 2 sees the same inputs
        expected = ((y_corrected - y).pow(2).sum(-1) / y.pow(2).sum(-1)).mean()
        torch.testing.assert_close(torch.tensor(distances[2][j]), expected, rtol=1e-4, atol=1e-7)


def test_functional_choice_finds_the_block_a_rank_r_adapter_turns_into_the_pruned_one(tiny_model):
    model, windows = tiny_model(), torch.randint(3, 300, (4, 24))
    _perturb(model.model.layers[2], model.model.layers[4], rank=2)
    distances = functional_distances(model, [2], [0, 1, 3, 4, 5], rank=2, windows=windows, svd="exact")
    assert min(distances[2], key=distances[2].get) == 4
    assert distances[2][4] < 1e-8 < min(d for j, d in distances[2].items() if j != 4)


def test_prune_with_functional_selection_records_it_and_loads(tiny_run):
    run = tiny_run(selection="functional")
    ckpt = load_checkpoint(run)
    assert ckpt.plan.config["selection"] == "functional"
    kept = [b for b in range(6) if b not in ckpt.plan.pruned]
    assert all(ckpt.plan.layers[ckpt.plan.layers[p].shares].source_block in kept for p in ckpt.plan.slots)


def test_functional_selection_without_calibration_text_is_one_clear_error(tiny_model):
    from flexiedge.prune import plan_pruning

    with pytest.raises(FlexiEdgeError, match="functional needs calibration text"):
        plan_pruning(tiny_model(), [0.1, 0.2, 0.05, 0.3, 0.04, 0.5], PruneConfig(blocks=2, selection="functional"))


# ---- per-slot ranks from the energy spectrum -------------------------------------------------------------

@pytest.mark.parametrize("energy,budget,expected", [
    ({0: [4., 3., 2., 1.], 1: [4., 3., 2., 1.]}, 4, {0: 2, 1: 2}),         # equal spectra: equal ranks
    ({0: [9., 8., 7., 6.], 1: [1., .5, .2, .1]}, 5, {0: 4, 1: 1}),          # energy goes where it is; floor 1
    ({0: [5., 1., 0., 0.], 1: [4., 3., 2., .5]}, 5, {0: 2, 1: 3}),          # interleaved by next singular value
    ({0: [1., 1.], 1: [9., 9., 9., 9.]}, 6, {0: 2, 1: 4}),                  # no slot beyond its spectrum's length
])
def test_allocate_ranks_spends_the_budget_on_the_most_energy(energy, budget, expected):
    ranks = allocate_ranks({i: torch.tensor(e) for i, e in energy.items()}, budget)
    assert ranks == expected and sum(ranks.values()) == budget


@pytest.mark.parametrize("budget", [1, 7])  # below one per slot; above what the spectra hold
def test_allocate_ranks_refuses_a_budget_it_cannot_split(budget):
    with pytest.raises(FlexiEdgeError, match="cannot be split"):
        allocate_ranks({0: torch.ones(3), 1: torch.ones(3)}, budget)


def test_energy_is_the_normalised_spectrum_of_the_difference_summed_over_projections(tiny_model):
    layers = tiny_model().model.layers
    energy = difference_energy(layers, {2: 1})[2]
    expected = 0
    for name in PROJECTIONS:
        wi, wj = layers[2].get_submodule(name).weight, layers[1].get_submodule(name).weight
        expected = expected + (torch.linalg.svdvals(wi - wj)[:32] ** 2) / wi.pow(2).sum()  # 32: k_proj is 32 x 64
    torch.testing.assert_close(energy, expected)


def test_energy_ranks_keep_the_uniform_total_and_follow_the_spectra(tiny_model):
    """A slot whose difference to its base has rank 2 needs rank 2; the freed rank goes to the other slot."""
    model = tiny_model()
    layers = model.model.layers
    _perturb(layers[2], layers[1], rank=2)
    ranks = energy_ranks(layers, {2: 1, 4: 3}, rank=8)
    assert sum(ranks.values()) == 16
    assert ranks == {2: 2, 4: 14}


def test_prune_with_energy_ranks_builds_slots_of_those_ranks_within_the_budget(tiny_run):
    ckpt = load_checkpoint(tiny_run(rank=4, rank_allocation="energy"))
    ranks = [ckpt.plan.layers[p].rank for p in ckpt.plan.slots]
    assert sum(ranks) == 4 * len(ranks)
    for p, rank in zip(ckpt.plan.slots, ranks):
        for name in PROJECTIONS:
            lin = ckpt.model.model.layers[p].get_submodule(name)
            assert lin.lora_A.shape[0] == lin.lora_B.shape[1] == rank


def test_unknown_rank_allocation_is_one_clear_error():
    with pytest.raises(FlexiEdgeError, match="unknown rank allocation 'spectral'"):
        PruneConfig(rank_allocation="spectral").check()
