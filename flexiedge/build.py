"""Building a model from a plan: slots share base Parameters by identity, adapters start from the SVD.

`build_from_source` applies a plan to the loaded source model (it needs the pruned blocks' weights);
`build_skeleton` makes the same structure with empty tensors, for loading a checkpoint.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import FlexiEdgeError
from .lowrank import adapter_init
from .plan import PROJECTIONS, Plan
from .slots import FlexiSlot, LoRALinear, output_norm, random_lora


def set_layers(model, layers: list[nn.Module], source_blocks: list[int]) -> None:
    """Install a new layer stack: positions renumbered for the KV cache, per-layer config entries kept."""
    for position, layer in enumerate(layers):
        layer.self_attn.layer_idx = position
    model.model.layers = nn.ModuleList(layers)
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == config.num_hidden_layers:
        config.layer_types = [layer_types[b] for b in source_blocks]
    config.num_hidden_layers = len(layers)


def make_slot(config, base: nn.Module, position: int, rank: int, plan: Plan,
              norms_from: nn.Module, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> FlexiSlot:
    """A slot at `position` whose projections share `base`'s weights; norms copied from `norms_from`.

    `adapters` maps projection name -> (lora_A, lora_B); None starts every adapter as PEFT does.
    """
    with torch.device("meta"):
        self_attn = type(base.self_attn)(config, layer_idx=position)
        mlp = type(base.mlp)(config)
    holder = nn.Module()
    holder.self_attn, holder.mlp = self_attn, mlp
    extra = [n for n, _ in holder.named_parameters() if not n.startswith(PROJECTIONS)]
    if extra:
        raise FlexiEdgeError(f"{type(base).__name__} has parameters flexiedge cannot share ({extra[0]}): "
                             "this architecture variant is not supported")
    for name in PROJECTIONS:
        shared = base.get_submodule(name)
        lora_A, lora_B = adapters[name] if adapters else random_lora(shared.out_features, shared.in_features, rank)
        parent, attr = name.split(".")
        setattr(getattr(holder, parent), attr, LoRALinear(shared.weight, shared.bias, lora_A, lora_B))
    d, eps = config.hidden_size, plan.output_norm_eps
    make_norm = (lambda: output_norm(d, plan.output_norm_init, eps)) if plan.output_norm else (lambda: None)
    return FlexiSlot(self_attn, mlp, copy.deepcopy(norms_from.input_layernorm),
                     copy.deepcopy(norms_from.post_attention_layernorm), make_norm(), make_norm())


@torch.no_grad()
def slot_adapters(pruned: nn.Module, base: nn.Module, rank: int, svd: str = "auto"):
    return {name: adapter_init(pruned.get_submodule(name).weight, base.get_submodule(name).weight, rank, svd)
            for name in PROJECTIONS}


def build_from_source(model, plan: Plan, svd_init: bool = True, svd: str = "auto", progress=None):
    """Turn the loaded source model into the plan's model, in place, and return it."""
    source = list(model.model.layers)
    if len(source) != plan.num_source_layers:
        raise FlexiEdgeError(f"the plan is for a {plan.num_source_layers}-block model, this one has {len(source)}")
    layers = []
    for position, spec in enumerate(plan.layers):
        if not spec.is_slot:
            layers.append(source[spec.source_block])
            continue
        base = layers[spec.shares] if spec.shares < position else source[plan.layers[spec.shares].source_block]
        pruned = source[spec.source_block]
        adapters = slot_adapters(pruned, base, spec.rank, svd) if svd_init and spec.rank else None
        layers.append(make_slot(model.config, base, position, spec.rank, plan, pruned, adapters))
        if progress is not None:
            progress.update(1)
    set_layers(model, layers, [spec.source_block for spec in plan.layers])
    return model


def build_skeleton(config, plan: Plan):
    """The plan's model with meta tensors, ready for `load_state_dict(..., assign=True)`."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.num_hidden_layers = len(plan.layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = list(model.model.layers)
    for position in plan.slots:
        spec = plan.layers[position]
        base = layers[spec.shares]
        with torch.device("meta"):
            layers[position] = make_slot(model.config, base, position, spec.rank, plan, base, adapters=None)
    for position, spec in enumerate(plan.layers):
        if not spec.is_slot and spec.rank:  # a kept block with its own LoRA (ShortGPT+LoRA recovery)
            with torch.device("meta"):
                add_own_lora(layers[position], spec.rank)
    model.model.layers = nn.ModuleList(layers)
    return model


def add_own_lora(layer: nn.Module, rank: int) -> None:
    """Give a kept block's projections a LoRA adapter over their own weight (PEFT's start: B = 0)."""
    for name in PROJECTIONS:
        linear = layer.get_submodule(name)
        lora_A, lora_B = random_lora(linear.out_features, linear.in_features, rank)
        parent, attr = name.split(".")
        setattr(layer.get_submodule(parent), attr, LoRALinear(linear.weight, linear.bias, lora_A, lora_B))


def retie_slots(model, plan: Plan) -> None:
    """Point every slot projection at its base's Parameter again (after an `assign=True` load)."""
    layers = model.model.layers
    for position in plan.slots:
        base = layers[plan.layers[position].shares]
        for name in PROJECTIONS:
            slot_proj, base_proj = layers[position].get_submodule(name), base.get_submodule(name)
            slot_proj.weight = base_proj.weight
            slot_proj.bias = base_proj.bias


def shared_parameter_names(plan: Plan) -> list[str]:
    """State-dict names that are views of another layer's Parameter (stored once, under the base's name)."""
    return [f"model.layers.{p}.{proj}.{kind}" for p in plan.slots for proj in PROJECTIONS for kind in ("weight", "bias")]
