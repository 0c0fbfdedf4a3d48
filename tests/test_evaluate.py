"""Perplexity over sliding windows: every token after the first scored once, as the HF guide defines it."""

import math

import pytest
import torch
import torch.nn.functional as F

from flexiedge.evaluate import perplexity, sliding_windows


@pytest.mark.parametrize("n,context,stride", [(100, 32, 32), (100, 32, 16), (33, 32, 32), (64, 64, 8)])
def test_windows_score_every_token_after_the_first_exactly_once(n, context, stride):
    scored = []
    for begin, end, first in sliding_windows(n, context, stride):
        assert end - begin <= context and begin < first <= end
        scored.extend(range(first, end))
    if stride == context:  # disjoint windows: the first token of each window has no context
        assert scored == [t for t in range(1, n) if t % context != 0]
    else:
        assert scored == list(range(1, n))


def test_disjoint_window_perplexity_matches_a_direct_computation(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 320, (96,))
    result = perplexity(model, ids, context=32, progress=False)
    nll = 0.0
    with torch.no_grad():
        for w in ids.view(3, 32):
            logits = model(input_ids=w[None]).logits[0]
            nll += float(F.cross_entropy(logits[:-1], w[1:], reduction="sum"))
    assert result.tokens == 93
    assert result.ppl == pytest.approx(math.exp(nll / 93), rel=1e-5)
