"""The replacement slot: the only place that knows how a slot computes (METHOD.md sections 3 and 4).

    h   = x + OutNorm_attn( Attn_slot( RMSNorm_slot(x) ) )
    out = h + OutNorm_mlp(  MLP_slot(  RMSNorm_slot(h) ) )

where every projection of Attn_slot / MLP_slot is W_base x + lora_B (lora_A x): W_base is the base
block's Parameter itself (shared by identity), lora_A / lora_B and both norms belong to the slot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


class LoRALinear(nn.Module):
    """y = x W^T + b + (x A^T) B^T, with W (and b) shared with a base block and A (r, in), B (out, r) own.

    Names follow PEFT and llama.cpp adapters: lora_A is the input-side (r, d_in) factor, lora_B the
    output-side (d_out, r) factor. The scale is 1 (any scale is folded into lora_B).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, lora_A: torch.Tensor, lora_B: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(lora_B)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B)

    def merged_weight(self) -> torch.Tensor:
        """W + B A: the dense weight this projection computes (for runtimes without adapters)."""
        return self.weight + self.lora_B @ self.lora_A


def output_norm(hidden_size: int, init: float, eps: float) -> nn.LayerNorm:
    """LayerNorm without bias on a sublayer's output, gamma = init (METHOD.md section 4)."""
    norm = nn.LayerNorm(hidden_size, eps=eps, bias=False)
    nn.init.constant_(norm.weight, init)
    return norm


class FlexiSlot(GradientCheckpointingLayer):
    """A decoder layer whose attention and MLP reuse a base block's projections through LoRALinear."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module, attn_output_norm: nn.Module | None,
                 mlp_output_norm: nn.Module | None):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        self.attn_output_norm = attn_output_norm if attn_output_norm is not None else nn.Identity()
        self.mlp_output_norm = mlp_output_norm if mlp_output_norm is not None else nn.Identity()
        self.skipped = False  # True: pass through (the draft model of self-speculative decoding)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.skipped:
            return hidden_states
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual + self.attn_output_norm(hidden_states)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + self.mlp_output_norm(hidden_states)


def random_lora(out_features: int, in_features: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default start: A Kaiming-uniform, B zero, so the adapter adds nothing at first."""
    lora_A = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    return lora_A, torch.zeros(out_features, rank)
