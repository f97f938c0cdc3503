"""Shared quantization primitives and the round-to-nearest (RTN) baseline, as pure functions.

Orientation: weights are ``nn.Linear`` weights ``[N, K]`` (N outputs, K inputs). A quantized weight is
stored the way :mod:`qoqopt.packing` wants it: ``intweight`` int32 ``[K, N]``, ``zeros`` int32 and
``scales`` fp16 ``[G, N]``, ``g_idx`` int32 ``[K]``, with ``W[n, k] = (q[k, n] - zero[g, n]) * scale[g, n]``.

Scales are rounded to fp16 *before* values are rounded, so what the checkpoint stores is exactly
what the algorithms measured their error against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qoqopt.packing import dequantize as _dequantize


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized: ``group_size`` -1 means one group per row."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    zero_min: int = 0  # smallest stored zero-point; GPTQ v1 with zero-points needs 1 (see hf_quant)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, k: int) -> int:
        return 1 if self.group_size == -1 else k // self.group_size

    def size(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size


@dataclass
class QuantizedWeight:
    intweight: torch.Tensor  # int32 [K, N]
    zeros: torch.Tensor  # int32 [G, N]
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor  # int32 [K]
    bits: int
    clamped_zeros: int = 0  # groups whose zero-point was raised to spec.zero_min

    def dequantize(self) -> torch.Tensor:
        """The ``[N, K]`` fp32 ``nn.Linear`` weight this quantization stands for."""
        return _dequantize(self.intweight, self.zeros, self.scales, self.g_idx).t().contiguous()


def group_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero, clamped)`` for the values ``w`` ``[N, C]`` of one group.

    Symmetric: ``scale = 2 * max|w| / maxq`` and the zero-point sits mid-range (8 for 4 bits).
    Asymmetric: the range ``[min(w, 0), max(w, 0)]`` spans all levels. A zero-point below
    ``spec.zero_min`` (only possible when a group is all >= 0) is raised to it, and the scale shrinks
    to ``max / (maxq - zero_min)`` so no value clips; ``clamped`` marks those rows.
    """
    assert w.dim() == 2, f"expected [N, C], got {tuple(w.shape)}"
    maxq = spec.maxq
    w = w.float()
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    if spec.sym:
        amax = torch.maximum(-lo, hi)
        scale = torch.where(amax > 0, 2 * amax / maxq, torch.ones_like(amax))
        scale = _fp16(scale)
        zero = torch.full_like(scale, (maxq + 1) // 2)
        return scale, zero, torch.zeros_like(scale, dtype=torch.bool)
    scale = torch.where(hi > lo, (hi - lo) / maxq, torch.ones_like(hi))
    scale = _fp16(scale)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    clamped = zero < spec.zero_min
    if clamped.any():
        shrunk = _fp16(torch.where(hi > 0, hi / (maxq - spec.zero_min), torch.ones_like(hi)))
        scale = torch.where(clamped, shrunk, scale)
        zero = torch.where(clamped, torch.full_like(zero, spec.zero_min), zero)
    return scale, zero, clamped


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    """Round positive scales to what fp16 stores (never to 0)."""
    return scale.clamp(min=1e-7, max=65504.0).half().float().clamp(min=2**-24)


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer levels of ``w`` ``[N, C]`` (or ``[N]``) under per-row ``scale``/``zero`` ``[N]``."""
    if w.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``w`` rounded onto the grid and mapped back to floats."""
    q = quantize_values(w, scale, zero, maxq)
    if w.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return (q - zero) * scale


def check_shape(weight: torch.Tensor, spec: QuantSpec) -> None:
    assert weight.dim() == 2, f"weight must be [N, K], got {tuple(weight.shape)}"
    assert spec.bits in (2, 3, 4, 8), f"bits must be 2, 3, 4 or 8, got {spec.bits}"
    k = weight.shape[1]
    assert spec.group_size == -1 or (spec.group_size > 0 and k % spec.group_size == 0), (
        f"group_size {spec.group_size} does not divide in-features {k}"
    )


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest, group by group: the baseline GPTQ and AWQ must beat."""
    check_shape(weight, spec)
    n, k = weight.shape
    gs, groups = spec.size(k), spec.groups(k)
    w = weight.float().reshape(n, groups, gs)
    scales, zeros, clamped = group_params(w.reshape(n * groups, gs), spec)
    scales, zeros, clamped = scales.view(n, groups), zeros.view(n, groups), clamped.view(n, groups)
    q = quantize_values(w.reshape(n * groups, gs), scales.reshape(-1), zeros.reshape(-1), spec.maxq)
    return QuantizedWeight(
        intweight=q.reshape(n, k).t().to(torch.int32).contiguous(),
        zeros=zeros.t().to(torch.int32).contiguous(),
        scales=scales.t().half().contiguous(),
        g_idx=(torch.arange(k, device=weight.device) // gs).to(torch.int32),
        bits=spec.bits,
        clamped_zeros=int(clamped.sum()),
    )
