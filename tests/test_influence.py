"""Block Influence: BI = 1 - mean cosine similarity of a block's input and output states."""

import pytest
import torch

from flexiedge.influence import block_influence, block_influence_from_states
from flexiedge.plan import select_pruned_blocks


@pytest.mark.parametrize("make_output,expected", [
    (lambda x: x, 0.0),                  # identity block
    (lambda x: 3.0 * x, 0.0),            # scaling does not change the direction
    (lambda x: -x, 2.0),                 # reversed direction
    (lambda x: torch.stack([-x[..., 1], x[..., 0]], -1), 1.0),  # rotated 90 degrees in 2-D
])
def test_block_influence_on_hand_made_states(make_output, expected):
    x = torch.randn(3, 5, 2)
    total, count = block_influence_from_states(x, make_output(x))
    assert count == 15
    assert total / count == pytest.approx(expected, abs=1e-5)


def test_an_identity_block_has_zero_influence_and_is_pruned_first(tiny_model):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = block_influence(model, torch.randint(0, 320, (2, 16)), progress=False)
    assert scores[2] == pytest.approx(0.0, abs=1e-6)
    assert min(scores[:2] + scores[3:]) > 1e-3
    assert select_pruned_blocks(scores, 1) == [2]


def test_selection_protects_the_first_and_last_blocks():
    scores = [0.0, 0.5, 0.1, 0.3, 0.0]
    assert select_pruned_blocks(scores, 2) == [2, 3]
    assert select_pruned_blocks(scores, 2, protect_ends=False) == [0, 4]
