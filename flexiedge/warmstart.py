"""Block-local warm start: fit each slot to reproduce its pruned block on that block's own inputs.

The paper starts a slot near identity (output-norm gamma = 0.01), so the start model is ShortGPT and the
slot's extra compute must be earned by end-to-end training. Here, before that training, every slot is fitted
alone to the pruned block it replaces, on the unpruned model's activations (one pass of the source model
over calibration text, inputs and outputs of each pruned block cached):

  0. (optional) activation-aware adapter init: each projection's rank-r adapter minimises the error on the
     pruned block's own inputs X to that projection, || (W_pruned - W_base - B A) X^T ||_F, instead of the
     paper's weight-space || W_pruned - W_base - B A ||_F. With C = X^T W X = L L^T (Cholesky; W the token
     weights of step 1): B A = [ (W_pruned - W_base) L ]_r L^-1, the rank-r SVD truncation in whitened
     coordinates (as in SVD-LLM). Layers' weights are nearly orthogonal, so the weight-space truncation keeps
     little of what the block computes; the activation-aware one keeps the directions its inputs use;
  1. closed-form output-norm gamma: per channel c, the weighted least-squares scale that maps the slot's
     normalised sublayer output n onto the pruned block's sublayer output o,
         gamma_c = sum_t w_t o_tc n_tc / sum_t w_t n_tc^2,   w_t = 1 / ||y_t||^2
     (y_t the block's output: every token counts relative to its own residual norm, as the next RMSNorm sees it);
  2. a few Adam steps on the slot's own parameters (adapters, both output norms, both RMSNorms) minimising the
     block-local relative error  mean_t ||slot(x)_t - y_t||^2 / ||y_t||^2  (one block forward/backward a step).

The slot keeps the paper's architecture (LoRA over a shared base, output norms), so checkpoints, exporters and
runtimes are unchanged: only the starting values differ.

Measured (SmolLM2-135M, 9 of 30 blocks, r=32; benchmarks/results/recovery_recipes.json): start PPL 89.2 (paper,
= ShortGPT) -> 81.3 with the closed-form gammas. Steps 0 and 2 lower the block-local error further but raise
the start PPL (132.3 and 87.6), so the default is step 1 alone. A slot given the pruned block's own weights
(full rank) with closed-form gammas starts at 25.1 (unpruned 23.1): the output norm is not what limits the
start, the rank-r adapter over a base block that computes something else is.

The same cached activations give the functional base choice (`prune --selection functional`): the base whose
SVD-corrected projections make the pruned block's output on its own inputs closest (`functional_distances`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FlexiEdgeError
from .lowrank import adapter_init
from .plan import PROJECTIONS, Plan


@dataclass
class BlockIO:
    """One pruned block's activations on calibration text, in the unpruned model."""
    inputs: torch.Tensor      # (n, T, d) block input x
    attn_out: torch.Tensor    # (n, T, d) attention sublayer output (before the residual add)
    mlp_out: torch.Tensor     # (n, T, d) MLP sublayer output
    outputs: torch.Tensor     # (n, T, d) block output y


@torch.no_grad()
def capture_block_io(source, blocks: list[int], windows: torch.Tensor, batch_size: int = 4,
                     covariances: bool = False):
    """BlockIO of each source block in `blocks`, and the layer kwargs (rotary, mask) of one batch.

    Only full batches are used, so the captured kwargs fit every batch. With `covariances`, also returns
    {block: {projection: X^T W X}}: each projection's token-weighted input covariance (W_t = 1/||y_t||^2).
    """
    layers = source.model.layers
    n = len(windows) // batch_size * batch_size
    store = {b: {k: [] for k in ("inputs", "attn_out", "mlp_out", "outputs")} for b in blocks}
    kwargs_seen: dict = {}
    handles = []
    cov = {b: {} for b in blocks}
    proj_inputs = {b: {} for b in blocks}

    def block_hooks(b):
        def pre(module, args, kwargs):
            store[b]["inputs"].append((args[0] if args else kwargs["hidden_states"]).detach().clone())
            if not kwargs_seen:
                kwargs_seen.update({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values",
                                                                                   "past_key_value", "use_cache")})

        def post(module, args, kwargs, output):
            y = (output[0] if isinstance(output, tuple) else output).detach().clone()
            store[b]["outputs"].append(y)
            w = 1.0 / y.pow(2).sum(-1).clamp_min(1e-12).reshape(-1, 1).double()
            for name, x in proj_inputs[b].items():
                x = x.reshape(-1, x.shape[-1]).double()
                cov[b][name] = cov[b].get(name, 0) + x.T @ (w * x)
            proj_inputs[b].clear()

        def proj_hook(name):
            def hook(module, args):
                proj_inputs[b][name] = args[0].detach()
            return hook

        def attn(module, args, kwargs, output):
            store[b]["attn_out"].append(output[0].detach().clone())

        def mlp(module, args, output):
            store[b]["mlp_out"].append(output.detach().clone())
        layer = layers[b]
        extra = [layer.get_submodule(name).register_forward_pre_hook(proj_hook(name))
                 for name in PROJECTIONS] if covariances else []
        return extra + [layer.register_forward_pre_hook(pre, with_kwargs=True),
                layer.register_forward_hook(post, with_kwargs=True),
                layer.self_attn.register_forward_hook(attn, with_kwargs=True),
                layer.mlp.register_forward_hook(mlp)]

    for b in blocks:
        handles += block_hooks(b)
    try:
        last = max(blocks)
        for i in range(0, n, batch_size):
            _run_until(source, windows[i:i + batch_size], last)
    finally:
        for h in handles:
            h.remove()
    ios = {b: BlockIO(**{k: torch.cat(v) for k, v in d.items()}) for b, d in store.items()}
    return (ios, kwargs_seen, cov) if covariances else (ios, kwargs_seen)


@torch.no_grad()
def activation_aware_adapter(delta: torch.Tensor, cov: torch.Tensor, rank: int, damp: float = 1e-4):
    """(lora_A, lora_B) minimising || (delta - lora_B lora_A) L ||_F with cov = L L^T (whitened truncated SVD)."""
    cov = cov.double()
    cov = cov + damp * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    chol = torch.linalg.cholesky(cov)
    u, s, vh = torch.linalg.svd(delta.double() @ chol, full_matrices=False)
    lora_B = u[:, :rank] * s[:rank]
    lora_A = torch.linalg.solve_triangular(chol.T, vh[:rank].T, upper=True).T  # V_r^T L^-1
    return lora_A.float().contiguous(), lora_B.float().contiguous()


@torch.no_grad()
def activation_aware_init(slot, pruned_block, covs: dict) -> None:
    """Reset every adapter of `slot` to the activation-aware rank-r fit of W_pruned - W_base."""
    for name in PROJECTIONS:
        lin = slot.get_submodule(name)
        if lin.rank == 0:
            continue
        delta = pruned_block.get_submodule(name).weight.detach().float() - lin.weight.detach().float()
        lora_A, lora_B = activation_aware_adapter(delta, covs[name], lin.rank)
        lin.lora_A.copy_(lora_A)
        lin.lora_B.copy_(lora_B)


class _Stop(Exception):
    pass


def _run_until(model, batch, last_block: int) -> None:
    """Run the model's body up to and including `last_block` (the blocks above it are not needed)."""
    def stop(module, args, output):
        raise _Stop
    handle = model.model.layers[last_block].register_forward_hook(stop)
    try:
        model.model(input_ids=batch, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_t ||pred_t - target_t||^2 / ||target_t||^2 over every token."""
    return ((pred - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


@torch.no_grad()
def block_error(slot, io: BlockIO, kwargs: dict, batch_size: int) -> float:
    """The slot's block-local relative error on all cached inputs."""
    total, n = 0.0, len(io.inputs)
    for i in range(0, n, batch_size):
        total += float(relative_error(slot(io.inputs[i:i + batch_size], **kwargs), io.outputs[i:i + batch_size])) \
            * len(io.inputs[i:i + batch_size])
    return total / n


def _normalised(norm: nn.LayerNorm, h: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(h, norm.normalized_shape, None, None, norm.eps)


@torch.no_grad()
def closed_form_gammas(slot, io: BlockIO, kwargs: dict, batch_size: int) -> None:
    """Set both output-norm gammas to the weighted least-squares fit of the pruned block's sublayer outputs."""
    if not isinstance(slot.attn_output_norm, nn.LayerNorm):
        return
    d = io.inputs.shape[-1]
    num = {"attn": torch.zeros(d), "mlp": torch.zeros(d)}
    den = {"attn": torch.zeros(d), "mlp": torch.zeros(d)}
    for i in range(0, len(io.inputs), batch_size):
        x, y = io.inputs[i:i + batch_size], io.outputs[i:i + batch_size]
        w = 1.0 / y.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
        a_target, m_target = io.attn_out[i:i + batch_size], io.mlp_out[i:i + batch_size]
        a = _normalised(slot.attn_output_norm, slot.self_attn(hidden_states=slot.input_layernorm(x), **kwargs)[0])
        h = x + a_target  # the teacher's mid-block residual: the MLP sublayer's input in the pruned block
        m = _normalised(slot.mlp_output_norm, slot.mlp(slot.post_attention_layernorm(h)))
        for key, n_, o in (("attn", a, a_target), ("mlp", m, m_target)):
            num[key] += (w * o * n_).sum((0, 1))
            den[key] += (w * n_ * n_).sum((0, 1))
    slot.attn_output_norm.weight.copy_(num["attn"] / den["attn"].clamp_min(1e-12))
    slot.mlp_output_norm.weight.copy_(num["mlp"] / den["mlp"].clamp_min(1e-12))


def own_parameters(slot) -> list[nn.Parameter]:
    """The slot's own parameters: adapters and norms (never the shared base weights)."""
    return [p for name, p in slot.named_parameters() if name.endswith(("lora_A", "lora_B")) or "norm" in name]


def fit_slot(slot, io: BlockIO, kwargs: dict, steps: int, lr: float, batch_size: int, seed: int = 0) -> list[float]:
    """Adam on the slot's own parameters against the block-local relative error; returns the loss per step."""
    params = own_parameters(slot)
    flags = {id(p): p.requires_grad for p in slot.parameters()}
    for p in slot.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, foreach=False)
    generator = torch.Generator().manual_seed(seed)
    n, losses = len(io.inputs), []
    was_training = slot.training
    slot.train()
    try:
        for step in range(steps):
            rows = torch.randperm(n, generator=generator)[:batch_size]
            for g in optimizer.param_groups:  # cosine decay to zero
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = relative_error(slot(io.inputs[rows], **kwargs), io.outputs[rows])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        slot.train(was_training)
        for p in slot.parameters():
            p.requires_grad_(flags[id(p)])
    return losses


def warm_start(model, plan: Plan, source, windows: torch.Tensor, steps: int, lr: float, batch_size: int = 4,
               gamma: bool = True, seed: int = 0, log=print, activation_aware: bool = False) -> dict:
    """Warm-start every slot of `model` (built from `plan`) from `source` (the unpruned model); returns a report.

    `windows` (n, T) are calibration token windows; `steps` Adam steps per slot (0: the closed-form gammas only).
    """
    slots = plan.slots
    if not slots:
        return {}
    source_blocks = [plan.layers[p].source_block for p in slots]
    captured = capture_block_io(source, source_blocks, windows, batch_size, covariances=activation_aware)
    ios, kwargs = captured[0], captured[1]
    report = {}
    for position, block in zip(slots, source_blocks):
        slot, io = model.model.layers[position], ios[block]
        before = block_error(slot, io, kwargs, batch_size)
        if activation_aware:
            activation_aware_init(slot, source.model.layers[block], captured[2][block])
        if gamma:
            closed_form_gammas(slot, io, kwargs, batch_size)
        after_gamma = block_error(slot, io, kwargs, batch_size)
        losses = fit_slot(slot, io, kwargs, steps, lr, batch_size, seed) if steps else []
        after = block_error(slot, io, kwargs, batch_size) if steps else after_gamma
        report[position] = dict(source_block=block, error_svd_init=before, error_gamma=after_gamma, error_fit=after)
        log(f"warm start slot {position} (block {block}): block-local error {before:.4f} -> "
            f"{after_gamma:.4f} (gamma) -> {after:.4f} ({steps} steps)")
    return report



# ---- functional base choice ------------------------------------------------------------------------------

def _block_output(block, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def corrected_block_error(pruned_block, base_block, io: BlockIO, kwargs: dict, rank: int, batch_size: int = 4,
                          svd: str = "auto") -> float:
    """Block-local relative error of the pruned block with every projection replaced by W_base + [W_pruned - W_base]_r.

    This is what a slot on `base_block` computes right after the SVD initialisation, before output norms
    (its own RMSNorms are the pruned block's): the function the rank-r correction actually restores.
    """
    block = copy.deepcopy(pruned_block)
    for name in PROJECTIONS:
        w_pruned, w_base = pruned_block.get_submodule(name).weight, base_block.get_submodule(name).weight
        lora_A, lora_B = adapter_init(w_pruned, w_base, rank, svd)
        block.get_submodule(name).weight.copy_(w_base.float() + lora_B @ lora_A)
    total, n = 0.0, len(io.inputs)
    for i in range(0, n, batch_size):
        x, y = io.inputs[i:i + batch_size], io.outputs[i:i + batch_size]
        total += float(relative_error(_block_output(block, x, kwargs), y)) * len(x)
    return total / n


def functional_distances(source, pruned: list[int], kept: list[int], rank: int, windows: torch.Tensor,
                         batch_size: int = 4, svd: str = "auto") -> dict[int, dict[int, float]]:
    """distance[i][j] = `corrected_block_error` of pruned block i on base j, on block i's own calibration inputs.

    One pass of the source model caches every pruned block's inputs and outputs; then each (i, j) pair
    costs seven truncated SVDs and one block forward over the cached inputs.
    """
    n = len(windows) // batch_size * batch_size
    if n == 0:
        raise FlexiEdgeError(f"the functional base choice needs at least {batch_size} calibration windows, "
                             f"got {len(windows)}")
    ios, kwargs = capture_block_io(source, pruned, windows[:n], batch_size)
    layers = source.model.layers
    return {i: {j: corrected_block_error(layers[i], layers[j], ios[i], kwargs, rank, batch_size, svd) for j in kept}
            for i in pruned}
