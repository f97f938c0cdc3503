"""Qwen2.5-VL vision MLP with gate and up projections fused into one Linear.

``down(act(gate(x)) * up(x))`` reads x once and launches one GEMM of width 2I instead of two of
width I. The fused weight is ``cat([gate, up])``; state-dict hooks split it back on save and join
it on load, so a patched model still saves and loads with transformers' ``gate_proj``/``up_proj``
keys. No Triton kernel: the GEMMs are cuBLAS, the gating is one elementwise op.
"""

from __future__ import annotations

import torch
from torch import nn

from ._triton import check_supported


class FusedGateUpMLP(nn.Module):
    """Drop-in for ``Qwen2_5_VLMLP`` (vision tower, SiLU-gated, biased)."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn
        self.intermediate_size = gate_up_proj.out_features // 2
        self.register_state_dict_post_hook(_split_gate_up)
        self.register_load_state_dict_pre_hook(_join_gate_up)

    @classmethod
    def from_hf(cls, mlp: nn.Module) -> "FusedGateUpMLP":
        gate, up = mlp.gate_proj, mlp.up_proj
        check_supported(gate.weight.device, gate.weight.dtype, "vision MLP")
        has_bias = gate.bias is not None
        fused = nn.Linear(gate.in_features, 2 * gate.out_features, bias=has_bias,
                          device=gate.weight.device, dtype=gate.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([gate.weight, up.weight]))
            if has_bias:
                fused.bias.copy_(torch.cat([gate.bias, up.bias]))
        fused.weight.requires_grad_(gate.weight.requires_grad)
        if has_bias:
            fused.bias.requires_grad_(gate.bias.requires_grad)
        return cls(fused, mlp.down_proj, mlp.act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def _split_gate_up(module, state_dict, prefix, local_metadata):
    for name in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}gate_up_proj.{name}", None)
        if fused is not None:
            gate, up = fused.chunk(2, dim=0)  # clones: savers treat views of one storage as tied weights
            state_dict[f"{prefix}gate_proj.{name}"], state_dict[f"{prefix}up_proj.{name}"] = gate.clone(), up.clone()


def _join_gate_up(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for name in ("weight", "bias"):
        gate = state_dict.pop(f"{prefix}gate_proj.{name}", None)
        up = state_dict.pop(f"{prefix}up_proj.{name}", None)
        if gate is not None and up is not None:
            state_dict[f"{prefix}gate_up_proj.{name}"] = torch.cat([gate, up])
