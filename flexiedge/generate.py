"""`flexiedge generate`: stream text from a run with the PyTorch runtime, optionally self-speculative."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .errors import FlexiEdgeError


def draft_cost(model) -> float:
    """A draft step's cost over a full step's: the weights each reads per token (decode is memory-bound)."""
    from .slots import FlexiSlot

    def layer_params(layer):
        return sum(p.numel() for p in layer.parameters())
    layers = model.model.layers
    head = model.lm_head.weight.numel()
    full = sum(layer_params(layer) for layer in layers) + head
    draft = sum(layer_params(layer) for layer in layers if not isinstance(layer, FlexiSlot)) + head
    return draft / full


def probe_acceptance(full, draft, prompt: list[int], tokens: int = 16, k: int = 4) -> float:
    """Greedy acceptance rate of the draft on a short continuation of the prompt."""
    from flexiedge.runtimes.speculative import speculative_generate

    _, stats = speculative_generate(full, draft, prompt, tokens, k)
    return stats.acceptance_rate


def generate(run: Path, prompt: str, max_new_tokens: int = 64, speculative: str | None = None,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0, stream=sys.stdout) -> dict:
    from .checkpoint import load_checkpoint
    from flexiedge.runtimes.pytorch import TorchDecoder, greedy_generate
    from flexiedge.runtimes.speculative import Sampling, choose_k, speculative_generate

    ckpt = load_checkpoint(run)
    tokenizer = ckpt.tokenizer
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise FlexiEdgeError("the prompt is empty: give some text to continue")
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    full = TorchDecoder(ckpt.model)
    printed = []

    def on_token(token):  # decode the whole tail so multi-token characters print correctly
        printed.append(token)
        text = tokenizer.decode(printed, skip_special_tokens=True)
        stream.write(text[len(on_token.shown):])
        stream.flush()
        on_token.shown = text
    on_token.shown = ""

    info = dict(prompt_tokens=len(ids))
    t0 = time.perf_counter()
    if speculative:
        if not ckpt.plan.slots:
            raise FlexiEdgeError(f"{run} has no replacement slots, so there is no draft model to speculate with")
        draft = TorchDecoder(ckpt.model, skip_slots=True)
        if speculative == "auto":
            acceptance, cost = probe_acceptance(full, draft, ids), draft_cost(ckpt.model)
            k = choose_k(acceptance, cost)
            info.update(probe_acceptance=acceptance, draft_cost=cost)
        else:
            k = int(speculative)
        sampling = Sampling(temperature=temperature, top_k=top_k)
        generator = torch.Generator().manual_seed(seed)
        tokens, stats = speculative_generate(full, draft, ids, max_new_tokens, k, sampling, generator, eos, on_token)
        info.update(k=k, acceptance_rate=stats.acceptance_rate, tokens_per_verify=stats.tokens_per_verify)
    else:
        if temperature > 0:
            raise FlexiEdgeError("sampling is done by the speculative decoder here: add --speculative K or use "
                                 "--temperature 0")
        tokens = greedy_generate(full, ids, max_new_tokens, eos, on_token)
    info.update(new_tokens=len(tokens), seconds=time.perf_counter() - t0)
    stream.write("\n")
    return info


def _command(args) -> None:
    info = generate(Path(args.run), args.prompt, args.max_new_tokens, args.speculative, args.temperature,
                    args.top_k, args.seed)
    summary = f"{info['new_tokens']} tokens in {info['seconds']:.2f}s ({info['new_tokens'] / info['seconds']:.1f} tokens/s)"
    if "k" in info:
        summary += f", speculative k={info['k']}, acceptance {info['acceptance_rate']:.2f}, " \
                   f"{info['tokens_per_verify']:.2f} tokens per verify"
    print(summary, file=sys.stderr)


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a run (PyTorch runtime)")
    p.add_argument("run", help="run folder, HF folder or built-in model name")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--speculative", metavar="K|auto", help="self-speculative decoding: draft K tokens with the "
                   "slot-skipping model, or choose K from a measured acceptance rate")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_command)
