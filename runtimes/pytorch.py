"""The PyTorch reference runtime: a decoder over a KV cache, with the option to skip replacement slots.

Skipping slots gives the draft model of self-speculative decoding (METHOD.md section 7): the ShortGPT
architecture, running on the very same Parameters, so nothing is stored or held twice.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from flexiedge.slots import FlexiSlot


@contextlib.contextmanager
def slots_skipped(model, skip: bool = True):
    """Within the block, every FlexiSlot of `model` passes its input through unchanged."""
    slots = [layer for layer in model.model.layers if isinstance(layer, FlexiSlot)]
    before = [slot.skipped for slot in slots]
    for slot in slots:
        slot.skipped = skip
    try:
        yield
    finally:
        for slot, was in zip(slots, before):
            slot.skipped = was


@dataclass
class TorchDecoder:
    """Incremental decoding of one sequence: `extend` appends tokens to a cache and returns their logits."""
    model: torch.nn.Module
    skip_slots: bool = False

    def start(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def extend(self, cache, tokens: list[int]) -> torch.Tensor:
        with slots_skipped(self.model, self.skip_slots):
            out = self.model(input_ids=torch.tensor([tokens]), cache=cache, use_cache=True)
        return out.logits[0].float()

    @staticmethod
    def length(cache) -> int:
        return cache.get_seq_length()

    @staticmethod
    def crop(cache, length: int) -> None:
        """Forget every cached position from `length` on."""
        excess = cache.get_seq_length() - length
        if excess > 0:
            cache.crop(-excess)


def greedy_generate(decoder, prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset(),
                    on_token=None) -> list[int]:
    """Plain greedy decoding, one token per forward pass: the reference speculative decoding must equal."""
    cache = decoder.start()
    logits = decoder.extend(cache, list(prompt))
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = int(logits[-1].argmax())
        out.append(token)
        if on_token:
            on_token(token)
        if token in eos or len(out) == max_new_tokens:
            break
        logits = decoder.extend(cache, [token])
    return out


def time_decoding(decoder, prompt: list[int], new_tokens: int) -> dict:
    """TTFT, prefill and decode throughput of plain greedy decoding."""
    cache = decoder.start()
    t0 = time.perf_counter()
    logits = decoder.extend(cache, list(prompt))
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        logits = decoder.extend(cache, [int(logits[-1].argmax())])
    decode = time.perf_counter() - t1
    return dict(ttft_s=ttft, prefill_tps=len(prompt) / ttft, decode_tps=new_tokens / decode)
