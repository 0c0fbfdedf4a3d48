"""The low-rank algebra of the method, pinned against full SVDs computed independently."""

import pytest
import torch

from flexiedge.lowrank import adapter_init, low_rank_distance, low_rank_factors, truncated_svd


def _truncate(w, r):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


@pytest.mark.parametrize("shape,rank", [((48, 32), 4), ((32, 80), 8), ((64, 64), 1)])
def test_distance_is_singular_values_r_plus_1_to_2r_of_the_difference(shape, rank):
    wi, wj = torch.randn(shape), torch.randn(shape)
    diff = _truncate(wi, rank) - _truncate(wj, rank)
    s = torch.linalg.svdvals(diff)
    expected = s[rank:2 * rank].pow(2).sum().sqrt()
    got = low_rank_distance(low_rank_factors(wi, rank), low_rank_factors(wj, rank), rank)
    torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-4, atol=1e-5)


def test_distance_is_zero_when_the_difference_fits_in_rank_r():
    w = torch.randn(40, 30)
    shifted = w + torch.randn(40, 1) @ torch.randn(1, 30)  # a rank-1 change
    # Truncating both at full rank keeps the rank-1 difference exactly; a rank-r adapter absorbs it.
    assert low_rank_distance(low_rank_factors(w, 30), low_rank_factors(shifted, 30), 30) < 1e-4


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_adapter_init_is_the_best_rank_r_approximation_of_the_difference(rank):
    w_pruned, w_base = torch.randn(24, 40), torch.randn(24, 40)
    lora_A, lora_B = adapter_init(w_pruned, w_base, rank)
    assert lora_A.shape == (rank, 40) and lora_B.shape == (24, rank)
    torch.testing.assert_close(lora_B @ lora_A, _truncate(w_pruned - w_base, rank), rtol=1e-4, atol=1e-5)
    # Eckart-Young: the residual is exactly the discarded singular values.
    s = torch.linalg.svdvals(w_pruned - w_base)
    residual = (w_pruned - w_base - lora_B @ lora_A).norm()
    torch.testing.assert_close(residual, s[rank:].pow(2).sum().sqrt(), rtol=1e-4, atol=1e-5)


def test_randomized_svd_matches_exact_on_a_matrix_with_a_decaying_spectrum():
    u, _ = torch.linalg.qr(torch.randn(300, 300))
    v, _ = torch.linalg.qr(torch.randn(200, 200))
    s = torch.logspace(0, -3, 200)
    w = u[:, :200] @ torch.diag(s) @ v.T
    _, s_exact, _ = truncated_svd(w, 10, "exact")
    _, s_rand, _ = truncated_svd(w, 10, "randomized")
    torch.testing.assert_close(s_rand, s_exact, rtol=1e-4, atol=1e-6)


def test_rank_larger_than_the_matrix_is_refused():
    with pytest.raises(ValueError, match="rank 9 is larger"):
        truncated_svd(torch.randn(8, 20), 9)


def test_randomized_svd_picks_the_same_bases_as_the_exact_svd(tiny_model):
    from flexiedge.plan import block_distances, choose_bases
    layers = tiny_model().model.layers
    pruned, kept = [2, 4], [0, 1, 3, 5]
    exact = choose_bases(block_distances(layers, pruned, kept, rank=4, svd="exact"))
    randomized = choose_bases(block_distances(layers, pruned, kept, rank=4, svd="randomized"))
    assert randomized == exact


def test_plain_frobenius_and_low_rank_distances_are_both_available(tiny_model):
    from flexiedge.plan import block_distances
    layers = tiny_model().model.layers
    low = block_distances(layers, [2], [1, 3], rank=4, selection="lowrank")
    high = block_distances(layers, [2], [1, 3], rank=4, selection="frobenius")
    assert low[2].keys() == high[2].keys() == {1, 3}
    assert all(v > 0 for v in list(low[2].values()) + list(high[2].values()))


def test_adapter_factors_are_row_major_even_at_rank_1():
    """A (d, 1) factor must have stride (1, 1): writers view tensors as raw bytes in row-major order."""
    lora_A, lora_B = adapter_init(torch.randn(24, 40), torch.randn(24, 40), 1)
    assert lora_A.stride() == (40, 1) and lora_B.stride() == (1, 1)
