"""Token choice shared by the numpy runtimes (onnxruntime, llama.cpp): greedy, temperature, top-k, top-p,
and the generation loop around it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens only
    text: str


def pick(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """Greedy argmax, or a sample from softmax(logits / T) restricted to top-k and the top-p nucleus."""
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64)
    order = np.argsort(-logits)[:top_k] if top_k > 0 else np.argsort(-logits)
    p = np.exp((logits[order] - logits[order[0]]) / temperature)
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1  # smallest prefix with mass >= top_p
    p = p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(p), p=p)])


def sample_tokens(logits: np.ndarray, advance: Callable[[int, int], np.ndarray], max_new_tokens: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  is_stop: Callable[[int], bool] = lambda tok: False,
                  on_token: Callable[[int], None] | None = None) -> list[int]:
    """Pick from `logits` (the prompt's last position), feed the token with `advance(token, step)` for
    the next logits, until `max_new_tokens` or a stop token (not included)."""
    rng = np.random.default_rng(seed)
    new: list[int] = []
    for step in range(max_new_tokens):
        tok = pick(logits, temperature, top_k, top_p, rng)
        if is_stop(tok):
            break
        new.append(tok)
        if on_token is not None:
            on_token(tok)
        if step + 1 < max_new_tokens:
            logits = advance(tok, step)
    return new
