"""Evaluation: perplexity over sliding windows, as in the paper and the HF perplexity guide."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class PerplexityResult:
    ppl: float
    nll: float          # mean negative log-likelihood per scored token (nats)
    tokens: int         # tokens scored
    context: int
    stride: int

    def as_dict(self) -> dict:
        return dict(ppl=self.ppl, nll=self.nll, tokens=self.tokens, context=self.context, stride=self.stride)


def sliding_windows(num_tokens: int, context: int, stride: int):
    """(begin, end, first_scored) for each window: every token after the first is scored exactly once."""
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        if end - begin < 2:
            break
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int = 512, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on a 1-D token tensor: windows of `context` tokens moved by `stride`.

    With stride < context each window only scores its last tokens, conditioned on up to `context`
    tokens of history (the paper's definition); stride == context gives disjoint windows.
    """
    stride = stride or context
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    windows = sliding_windows(len(ids), context, stride)
    total_nll, total_tokens = 0.0, 0
    groups = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    for group in tqdm(groups, desc="perplexity", unit="batch", disable=not progress):
        for same_len in _by_length(group):
            batch = torch.stack([ids[b:e] for b, e, _ in same_len])
            logits = model(input_ids=batch, use_cache=False).logits.float()
            for row, (b, e, first) in enumerate(same_len):
                targets = ids[first:e]
                pred = logits[row, first - b - 1:e - b - 1]
                total_nll += float(F.cross_entropy(pred, targets, reduction="sum"))
                total_tokens += len(targets)
    nll = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=total_tokens, context=context, stride=stride)


def _by_length(windows):
    lengths = {}
    for w in windows:
        lengths.setdefault(w[1] - w[0], []).append(w)
    return lengths.values()


def perplexity_of_logits(logits_of, ids, context: int = 512, stride: int | None = None,
                         max_tokens: int | None = None) -> PerplexityResult:
    """`perplexity` for a numpy runtime (onnxruntime, llama.cpp): `logits_of(window ids) -> (T, vocab)`
    next-token logits of a fresh sequence; the same windows and scored tokens."""
    import numpy as np

    ids = np.asarray(ids, np.int64).reshape(-1)[: None if max_tokens is None else max_tokens + 1]
    stride = stride or context
    nll, count = 0.0, 0
    for begin, end, first in sliding_windows(len(ids), context, stride):
        pred = np.asarray(logits_of(ids[begin:end]))[first - begin - 1:end - begin - 1].astype(np.float64)
        top = pred.max(-1)
        log_z = np.log(np.exp(pred - top[:, None]).sum(-1)) + top
        nll += float((log_z - pred[np.arange(len(pred)), ids[first:end]]).sum())
        count += end - first
    mean = nll / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=count, context=context, stride=stride)
