"""Token choice shared by the numpy runtimes (onnxruntime, llama.cpp): greedy, temperature, top-k, top-p."""

from __future__ import annotations

import numpy as np


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
