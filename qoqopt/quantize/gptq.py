"""GPTQ (Frantar et al., 2022) as pure functions: Hessian accumulation, then one weight at a time.

    H = accumulate_hessian(H, n, x)              # per calibration batch: running 2/n * sum x x^T
    qw, info = gptq_quantize(weight, H, spec)    # -> QuantizedWeight (packing layout) + what happened

The algorithm quantizes the columns (input features) of ``W`` in order; after each column the
rounding error is spread over the columns not yet quantized, weighted by the inverse Hessian
(its upper Cholesky factor), lazily in blocks of ``block_size`` columns. Options:

* ``act_order``: visit columns by decreasing Hessian diagonal (most active inputs first); each
  input's group then follows its visiting order, recorded in ``g_idx`` (``desc_act`` in the config);
* ``static_groups``: with act-order, compute each group's scale/zero up front from the unmodified
  weights of the natural groups, so ``g_idx`` stays ``k // group_size`` and the layout is the plain
  one (``desc_act`` false): act-order's visiting benefit at no kernel cost. This is the export's
  default order, ``static`` (llm-compressor's default, ``actorder: static``);
* ``group_aware`` (without act-order): group-aware reordering (GAR; Gafni et al., CVPR 2025
  workshops, arXiv:2505.14638). Columns are visited by decreasing Hessian diagonal *within* each
  natural group, and the groups by decreasing largest diagonal. Every group is still visited as
  one contiguous run, so its grid is found where a natural group's would be, the scales are stored
  per natural group and ``g_idx`` stays ``k // group_size`` (GPTQModel's default; ``group-aware``);
* dampening: ``damp * mean(diag H)`` is added to the diagonal; a Cholesky that fails retries with
  ten times the dampening and reports it through ``warn``: it never silently falls back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qoqopt.errors import QoqoptError

from .rtn import QuantizedWeight, QuantSpec, check_shape, group_params, quantize_values

MAX_DAMP = 10.0


def accumulate_hessian(hessian: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold inputs ``x`` ``[..., K]`` into the running ``H = 2/n * sum x x^T`` over all ``n`` tokens seen."""
    x = x.reshape(-1, x.shape[-1]).float()
    k, m = x.shape[1], x.shape[0]
    if hessian is None:
        hessian = torch.zeros(k, k, device=x.device, dtype=torch.float32)
    assert hessian.shape == (k, k), f"Hessian {tuple(hessian.shape)} vs inputs with K={k}"
    if m == 0:
        return hessian, count
    total = count + m
    hessian.mul_(count / total)
    x = x * (2.0 / total) ** 0.5
    hessian.addmm_(x.t(), x)
    return hessian, total


@dataclass
class GptqInfo:
    damp: float  # dampening that was finally used (fraction of mean diag H)
    retries: int  # Cholesky failures before it succeeded
    dead_inputs: int  # inputs never active in calibration (diag H == 0): their weights are zeroed


def inverse_hessian_factor(
    hessian: torch.Tensor, damp: float, warn: Callable[[str], None] | None = None, name: str = "weight"
) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, retrying with more dampening."""
    diag_mean = torch.mean(torch.diag(hessian)).item()
    if not diag_mean > 0:
        diag_mean = 1.0
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    retries = 0
    while True:
        chol, info = torch.linalg.cholesky_ex(hessian + damp * diag_mean * eye)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if info2.item() == 0 and torch.isfinite(upper).all():
                return upper, damp, retries
        retries += 1
        if damp * 10 > MAX_DAMP:
            raise QoqoptError(
                f"GPTQ: the Hessian of {name} is not positive definite even with dampening {damp:g}; "
                "the calibration data may be too small or degenerate (try more --samples)"
            )
        if warn:
            warn(f"GPTQ: Cholesky of {name}'s Hessian failed at dampening {damp:g}; retrying with {damp * 10:g}")
        damp *= 10


def group_aware_order(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """GAR's visiting order: groups by decreasing largest ``diag``, columns within each by decreasing ``diag``."""
    groups = diag.reshape(-1, group_size)  # the caller's shape check guarantees whole groups
    within = torch.argsort(groups, dim=1, descending=True, stable=True)
    order = torch.argsort(groups.amax(dim=1), descending=True, stable=True)
    base = torch.arange(groups.shape[0], device=diag.device).unsqueeze(1) * group_size
    return (base + within)[order].reshape(-1)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    group_aware: bool = False,
    warn: Callable[[str], None] | None = None,
    name: str = "weight",
) -> tuple[QuantizedWeight, GptqInfo]:
    """Quantize ``weight`` ``[N, K]`` given the Hessian ``[K, K]`` of its inputs."""
    check_shape(weight, spec)
    n, k = weight.shape
    assert hessian.shape == (k, k), f"Hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}"
    gs, groups = spec.size(k), spec.groups(k)
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone().to(w.device)

    activity = torch.diag(h).clone()  # visiting-order key: dead inputs (0) go last, not as the 1.0 below
    dead = activity == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    static = None
    if static_groups:  # natural groups, from the weights before any error propagation
        static = [group_params(w[:, g * gs : (g + 1) * gs], spec) for g in range(groups)]

    perm = None
    if act_order:
        perm = torch.argsort(activity, descending=True, stable=True)
    elif group_aware:
        perm = group_aware_order(activity, gs)
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    perm_list = perm.tolist() if perm is not None else None  # no device sync per column
    hinv, used_damp, retries = inverse_hessian_factor(h, damp, warn, name)
    del h

    q = torch.zeros(n, k, device=w.device)  # integer levels, in visiting order
    scales = torch.zeros(groups, n, device=w.device)
    zeros = torch.zeros(groups, n, device=w.device)
    clamped = torch.zeros(groups, n, dtype=torch.bool, device=w.device)
    scale = zero = None

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = perm_list[col] if perm_list is not None else col
            if static is not None:
                g = orig // gs
                scale, zero, _ = static[g]
            else:
                g = col // gs
                if col % gs == 0:  # a new group starts: its range from the current (updated) weights
                    span = torch.cat([w1[:, i : i + gs], w[:, i2 : i2 + gs]], dim=1)[:, :gs]
                    scale, zero, clamped[g] = group_params(span, spec)
                    scales[g], zeros[g] = scale, zero
            wc = w1[:, i]
            levels = quantize_values(wc, scale, zero, spec.maxq)
            dq = (levels - zero) * scale
            q[:, col] = levels
            d = hinv1[i, i]
            err = (wc - dq) / d
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    # g_idx: natural groups for static groups or no act-order; with act-order, a column's group is
    # its visiting position // group size
    group_of = torch.arange(k, device=w.device) // gs
    if perm is not None:
        inv = torch.argsort(perm)
        q = q[:, inv]
        if act_order and static is None:
            group_of = inv // gs
        elif not act_order:  # group-aware: group g was visited as run number inv[g * gs] // gs
            visited = inv[::gs] // gs
            scales, zeros, clamped = scales[visited], zeros[visited], clamped[visited]
    if static is not None:
        scales = torch.stack([s for s, _, _ in static])
        zeros = torch.stack([z for _, z, _ in static])
        clamped = torch.stack([c for _, _, c in static])
    qw = QuantizedWeight(
        intweight=q.t().to(torch.int32).contiguous(),
        zeros=zeros.to(torch.int32),
        scales=scales.half(),
        g_idx=group_of.to(torch.int32),
        bits=spec.bits,
        clamped_zeros=int(clamped.sum()),
    )
    info = GptqInfo(used_damp, retries, int(dead.sum()))
    return qw, info
