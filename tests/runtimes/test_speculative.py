"""Self-speculative decoding in PyTorch: identical greedy output, the full model's sampling distribution."""

import copy

import pytest
import torch

from flexiedge.build import build_from_source
from flexiedge.plan import PruneConfig, make_plan
from flexiedge.runtimes.pytorch import TorchDecoder, greedy_generate
from flexiedge.runtimes.speculative import Sampling, choose_k, speculative_generate


@pytest.fixture
def flexi_and_source(tiny_model):
    """A tiny FlexiGPT model (slots 2 and 4) and an untouched copy of its source model."""
    source = tiny_model()
    config = PruneConfig(blocks=2, rank=4, output_norm_init=0.5)  # slots that matter, so the draft differs
    plan = make_plan(config, [0.5] * 6, [2, 4], {2: 1, 4: 3})
    model = build_from_source(copy.deepcopy(source), plan)
    return model, source, plan


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("prompt", [[5], [7, 8, 9, 10, 11, 12], list(range(40, 60))])
def test_greedy_speculative_output_equals_plain_greedy(flexi_and_source, k, prompt):
    model, _, _ = flexi_and_source
    full, draft = TorchDecoder(model), TorchDecoder(model, skip_slots=True)
    plain = greedy_generate(full, prompt, 24)
    spec, stats = speculative_generate(full, draft, prompt, 24, k)
    assert spec == plain
    assert stats.generated == 24 and stats.accepted <= stats.drafted
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
    assert spec == reference[0, len(prompt):].tolist()


def test_the_draft_is_the_shortgpt_model_on_the_same_parameters(flexi_and_source):
    model, source, plan = flexi_and_source
    ids = list(range(3, 19))
    draft_logits = TorchDecoder(model, skip_slots=True).extend(TorchDecoder(model).start(), ids)
    shortgpt = build_from_source(copy.deepcopy(source), make_plan(PruneConfig(method="shortgpt", blocks=2),
                                                                   [0.5] * 6, plan.pruned, None))
    with torch.no_grad():
        expected = shortgpt(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(draft_logits, expected, rtol=1e-5, atol=1e-5)


def test_speculative_sampling_keeps_the_full_models_distribution(flexi_and_source):
    model, _, _ = flexi_and_source
    full, draft = TorchDecoder(model), TorchDecoder(model, skip_slots=True)
    sampling = Sampling(temperature=1.0, top_k=6)
    prompt = [11, 12, 13]
    with torch.no_grad():
        p = sampling.probs(full.extend(full.start(), prompt)[-1])
        q = sampling.probs(draft.extend(draft.start(), prompt)[-1])
    assert 0.5 * (p - q).abs().sum() > 0.1  # the draft alone would be a detectably different distribution
    generator = torch.Generator().manual_seed(0)
    draws = 1500
    counts = torch.zeros_like(p)
    for _ in range(draws):
        tokens, _ = speculative_generate(full, draft, prompt, 2, k=1, sampling=sampling, generator=generator)
        counts[tokens[0]] += 1
    support = p > 0
    expected = p[support] * draws
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))
    assert counts[~support].sum() == 0
    assert p_value > 1e-3, f"chi2={chi2:.1f} with {dof} dof"


@pytest.mark.parametrize("acceptance,draft_cost,expected", [
    (0.0, 0.7, 1),      # nothing is ever accepted: draft as little as possible
    (0.9, 0.1, 8),      # a cheap, accurate draft: draft long
])
def test_choose_k_follows_the_expected_speedup(acceptance, draft_cost, expected):
    assert choose_k(acceptance, draft_cost) == expected


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculative_equals_plain_greedy_on_real_smollm2(smollm2_run, k):
    from flexiedge.checkpoint import load_checkpoint
    from flexiedge.data import tokenize_texts
    ckpt = load_checkpoint(smollm2_run)
    text = tokenize_texts(ckpt.tokenizer, ["alice29"]).tolist()
    full, draft = TorchDecoder(ckpt.model), TorchDecoder(ckpt.model, skip_slots=True)
    for start in (1000, 5000):
        prompt = text[start:start + 32]
        spec, stats = speculative_generate(full, draft, prompt, 16, k)
        assert spec == greedy_generate(full, prompt, 16)
        assert 0 <= stats.acceptance_rate <= 1
