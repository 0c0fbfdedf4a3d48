"""Self-speculative decoding (METHOD.md section 7): draft with the slot-skipping model, verify with the full one.

Works over any pair of decoders with the small interface of `runtimes.pytorch.TorchDecoder`
(`start`, `extend(cache, tokens) -> logits`, `length(cache)`, `crop(cache, length)`). Both caches always
hold every token of the sequence but the last one; a round drafts k tokens, verifies them in one pass of
the full model, keeps the longest accepted prefix plus one token from the full model, and crops both
caches back. Greedy output is token-for-token plain greedy decoding of the full model; with sampling,
the acceptance rule of Leviathan et al. (2023) keeps the full model's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 0.0      # 0: greedy
    top_k: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            cutoff = logits.topk(self.top_k).values[..., -1:]
            logits = logits.masked_fill(logits < cutoff, float("-inf"))
        return logits.softmax(-1)


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verify(self) -> float:
        return self.generated / self.rounds if self.rounds else 0.0


def _draft(draft, cache, pending: list[int], k: int, sampling: Sampling, generator):
    tokens, probs = [], []
    for _ in range(k):
        logits = draft.extend(cache, pending)[-1]
        if sampling.greedy:
            token = int(logits.argmax())
        else:
            p = sampling.probs(logits)
            token = int(torch.multinomial(p, 1, generator=generator))
            probs.append(p)
        tokens.append(token)
        pending = [token]
    return tokens, probs


def _accept(logits: torch.Tensor, drafted: list[int], draft_probs, sampling: Sampling, generator):
    """(number of drafted tokens accepted, the full model's next token) from the verify pass's logits."""
    if sampling.greedy:
        best = logits.argmax(-1).tolist()
        n = 0
        while n < len(drafted) and drafted[n] == best[n]:
            n += 1
        return n, best[n]
    for i, token in enumerate(drafted):
        p, q = sampling.probs(logits[i]), draft_probs[i]
        if torch.rand((), generator=generator) >= torch.clamp(p[token] / q[token], max=1.0):
            residual = torch.clamp(p - q, min=0)
            return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafted), int(torch.multinomial(sampling.probs(logits[-1]), 1, generator=generator))


def speculative_generate(full, draft, prompt: list[int], max_new_tokens: int, k: int,
                         sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
                         eos: set[int] = frozenset(), on_token=None) -> tuple[list[int], SpeculativeStats]:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    full_cache, draft_cache = full.start(), draft.start()
    if len(prompt) > 1:
        full.extend(full_cache, list(prompt[:-1]))
        draft.extend(draft_cache, list(prompt[:-1]))
    seq, out, stats = list(prompt), [], SpeculativeStats()
    while len(out) < max_new_tokens:
        k_round = min(k, max_new_tokens - len(out) - 1)
        pending = seq[draft.length(draft_cache):]
        drafted, draft_probs = _draft(draft, draft_cache, pending, k_round, sampling, generator)
        context = len(seq) - 1
        logits = full.extend(full_cache, [seq[-1]] + drafted)
        accepted, next_token = _accept(logits, drafted, draft_probs, sampling, generator)
        stats.rounds += 1
        stats.drafted += len(drafted)
        stats.accepted += accepted
        full.crop(full_cache, context + 1 + accepted)
        draft.crop(draft_cache, min(draft.length(draft_cache), context + 1 + accepted))
        for token in drafted[:accepted] + [next_token]:
            seq.append(token)
            out.append(token)
            stats.generated += 1
            if on_token:
                on_token(token)
            if token in eos or len(out) == max_new_tokens:
                return out, stats
    return out, stats


def expected_speedup(acceptance: float, k: int, draft_cost: float) -> float:
    """Tokens per unit of full-model time: E[tokens per round] / (k draft steps + one verify pass).

    With per-token acceptance a, a round yields (1 - a^(k+1)) / (1 - a) tokens; `draft_cost` is one
    draft step's time over one full-model step's time (about the fraction of layers the draft runs).
    """
    a = min(max(acceptance, 0.0), 0.999)
    return (1 - a ** (k + 1)) / (1 - a) / (k * draft_cost + 1)


def choose_k(acceptance: float, draft_cost: float, k_max: int = 8) -> int:
    return max(range(1, k_max + 1), key=lambda k: expected_speedup(acceptance, k, draft_cost))
