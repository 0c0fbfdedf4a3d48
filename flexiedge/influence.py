"""Block Influence (ShortGPT; METHOD.md section 1): BI_i = 1 - mean_t cos(X_i,t, X_i+1,t)."""

from __future__ import annotations

import torch
from tqdm import tqdm


def block_influence_from_states(inputs: torch.Tensor, outputs: torch.Tensor) -> tuple[float, int]:
    """Sum of (1 - cos) over tokens and the token count, for one block's input and output states."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    y = outputs.reshape(-1, outputs.shape[-1]).float()
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    return float((1.0 - cos).sum()), x.shape[0]


@torch.no_grad()
def block_influence(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> list[float]:
    """BI of every decoder block of `model` on token windows (n, seq_len), via forward hooks.

    Hooks see each block's real input and output, whatever the architecture returns as hidden states.
    """
    layers = model.model.layers
    totals = [0.0] * len(layers)
    counts = [0] * len(layers)

    def hook_for(i):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            total, count = block_influence_from_states(hidden_in, hidden_out)
            totals[i] += total
            counts[i] += count
        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        batches = windows.split(batch_size)
        for batch in tqdm(batches, desc="block influence", unit="batch", disable=not progress):
            model.model(input_ids=batch, use_cache=False)  # the LM head is not needed
    finally:
        for h in handles:
            h.remove()
    return [t / c for t, c in zip(totals, counts)]
