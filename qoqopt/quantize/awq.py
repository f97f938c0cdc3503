"""AWQ (Lin et al., 2023) as pure functions: activation-aware input scales, then clipping.

A weight's input channels that see large activations matter most. AWQ multiplies those columns
of ``W`` by ``s > 1`` before rounding (so they round more finely) and divides the activations by
``s``, which is free when folded into the op that produces them:

* RMSNorm -> q/k/v (or gate/up): ``norm.weight /= s``, ``W[:, j] *= s[j]`` for each consumer;
* v_proj -> o_proj: ``v_proj`` rows (and bias) ``/= s``, ``o_proj`` columns ``*= s``. With grouped-query
  attention one v channel feeds ``n_rep`` query heads, so the o_proj scale is the v scale repeated
  per head group (:func:`expand_kv_scale`): the fold stays exact;
* up_proj -> down_proj: ``up_proj`` rows ``/= s``, ``down_proj`` columns ``*= s`` (``act(gate) * up``
  is linear in ``up``).

``s = mean|x| ** alpha``, normalised, with ``alpha`` searched on a grid to minimise the error of the
consumers' outputs on calibration tokens. Then, per output row and group, the clipping range is
shrunk on a grid to minimise that group's contribution to the output error.

Quantization is asymmetric (``zero_point: true``), 4 bits, zeros stored without offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rtn import QuantizedWeight, QuantSpec, check_shape, fake_quantize, group_params, rtn_quantize


def clip_groups(weight: torch.Tensor, spec: QuantSpec, max_abs: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[N, K]`` with each group clipped to ``±max_abs`` ``[N, G]``."""
    n, k = weight.shape
    gs, groups = spec.size(k), spec.groups(k)
    w = weight.float().reshape(n * groups, gs)
    m = max_abs.reshape(n * groups, 1).to(w.device)
    return torch.maximum(torch.minimum(w, m), -m).reshape(n, k)


def group_fake_quantize(weight: torch.Tensor, spec: QuantSpec, max_abs: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` ``[N, K]`` through group-wise quantization (optionally clipped to ``±max_abs`` ``[N, G]``)."""
    n, k = weight.shape
    w = clip_groups(weight, spec, max_abs) if max_abs is not None else weight.float()
    w = w.reshape(n * spec.groups(k), spec.size(k))
    scale, zero, _ = group_params(w, spec)
    return fake_quantize(w, scale, zero, spec.maxq).reshape(n, k)


def normalised_scale(x_mean_abs: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``mean|x| ** alpha`` (divided by ``w_mean ** (1 - alpha)`` when given), kept away from 0 and
    centred so ``max * min == 1``."""
    s = x_mean_abs.float().clamp(min=1e-4).pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.float().pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_mean(weights: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Per input channel: mean over output rows of ``|w|`` relative to its group's largest ``|w|``."""
    w = torch.cat([x.float() for x in weights], dim=0).abs()
    n, k = w.shape
    g = w.reshape(n, spec.groups(k), spec.size(k))
    g = g / g.amax(dim=2, keepdim=True).clamp(min=1e-12)
    return g.reshape(n, k).mean(dim=0)


@dataclass
class ScaleSearch:
    scale: torch.Tensor  # [K] input-channel scale to fold (over the weights' K)
    alpha: float  # chosen exponent
    duo: bool  # whether the weight statistic divided the scale
    loss: float  # output MSE at the chosen alpha
    loss_unscaled: float  # output MSE with s = 1 (plain group-wise rounding)
    base: torch.Tensor | None = None  # the scale before ``expand`` (over x_mean_abs's channels)


def search_scale(
    x_mean_abs: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    spec: QuantSpec,
    *,
    n_grid: int = 20,
    expand: callable = None,
    w_mean: torch.Tensor | None = None,
    error_of: callable = None,
) -> ScaleSearch:
    """Grid-search ``alpha`` for the consumers ``weights`` (each ``[N_i, K]``) of inputs ``x`` ``[T, K]``.

    ``expand`` maps a scale over ``x_mean_abs``'s channels to one over the weights' K (used for the
    GQA-tied v_proj -> o_proj scale); identity otherwise. The grid is searched twice,
    the second time dividing by the weights' per-channel magnitude ``** (1 - alpha)`` (``w_mean``,
    default :func:`weight_mean` of ``weights``); ``s = 1`` is
    always a candidate, so the search never does worse than plain rounding by its measure:
    ``error_of(wq)``, given the weights as quantized under a scale (concatenated, scale undone),
    which defaults to their outputs' squared error on ``x``.
    """
    expand = expand or (lambda s: s)
    w_cat = torch.cat([w.float() for w in weights], dim=0)
    check_shape(w_cat, spec)
    error_of = error_of or output_mse(x.float(), w_cat)

    def loss_of(s):
        return error_of(group_fake_quantize(w_cat * s, spec) / s)

    ones = torch.ones_like(x_mean_abs, dtype=torch.float32)
    unscaled = loss_of(expand(ones))
    best = (unscaled, 0.0, False, ones)
    if w_mean is None:  # over the weights' K; a tied search passes its own, over x's channels
        w_mean = weight_mean(weights, spec)
    assert w_mean.shape == x_mean_abs.shape, "w_mean must cover x_mean_abs's channels"
    for use_w in (False, True):
        for i in range(n_grid):
            alpha = i / n_grid
            base = normalised_scale(x_mean_abs, alpha, w_mean if use_w else None)
            loss = loss_of(expand(base))
            if loss < best[0]:
                best = (loss, alpha, use_w, base)
    loss, alpha, use_w, base = best
    return ScaleSearch(expand(base), alpha, use_w, loss, unscaled, base)


def gram_error(d: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``sum_t (x_t . d_r)^2`` for each row ``d_r`` of ``d`` ``[..., R, C]``, given ``gram = x^T x``
    ``[..., C, C]`` (batched over leading dims): the squared output error of a weight error ``d``."""
    return ((d @ gram) * d).sum(dim=-1)


def output_mse(x: torch.Tensor, weight: torch.Tensor):
    """``error(wq) = mean((x @ wq.T - x @ weight.T) ** 2)`` over ``x`` ``[T, K]``, for the many candidate
    ``wq`` of one ``weight`` ``[N, K]`` that a grid search tries.

    With more tokens than input channels it is read off the Gram matrix: ``sum_n d_n (x^T x) d_n^T
    / (T N)`` with ``d = wq - weight`` costs N K^2 per candidate against T K N.
    """
    t, k = x.shape
    n = weight.shape[0]
    if t > k:
        gram = x.t() @ x

        def error(wq: torch.Tensor) -> float:
            return gram_error(wq - weight, gram).sum().item() / (t * n)
    else:
        ref = x @ weight.t()

        def error(wq: torch.Tensor) -> float:
            return (x @ wq.t() - ref).pow(2).mean().item()

    return error


def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    rows_per_chunk: int = 256,
) -> torch.Tensor:
    """Per ``[N, G]`` clipping bound ``max_abs`` minimising each group's output error on ``x`` ``[T, K]``.

    The error of group ``g`` of row ``n`` is ``sum_t (x[t, g] . (w[n, g] - q(w[n, g])))^2``; bounds
    ``max|w| * (1 - i / n_grid)`` for ``i / n_grid < max_shrink`` are tried. The error is read off
    each group's Gram matrix ``x[:, g]^T x[:, g]`` (``[gs, gs]``, formed once): ``d^T G_g d`` costs gs^2
    per group and candidate instead of T gs, and calibration has thousands of tokens per group of 128.
    """
    check_shape(weight, spec)
    n, k = weight.shape
    gs, groups = spec.size(k), spec.groups(k)
    xg = x.float().reshape(-1, groups, gs).transpose(0, 1)  # [G, T, gs]
    gram = xg.transpose(1, 2) @ xg  # [G, gs, gs]
    out = torch.empty(n, groups, device=weight.device)
    for r0 in range(0, n, rows_per_chunk):
        w = weight[r0 : r0 + rows_per_chunk].float().reshape(-1, groups, gs)  # [R, G, gs]
        org_max = w.abs().amax(dim=2)  # [R, G]
        best_err = torch.full_like(org_max, float("inf"))
        best = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            m = org_max * (1 - i / n_grid)
            d = (group_fake_quantize(w.reshape(-1, k), spec, m).reshape_as(w) - w).transpose(0, 1)  # [G, R, gs]
            err = gram_error(d, gram).t()  # [R, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, m, best)
        out[r0 : r0 + rows_per_chunk] = best
    return out


def awq_quantize(weight: torch.Tensor, spec: QuantSpec, max_abs: torch.Tensor | None = None) -> QuantizedWeight:
    """Group-wise quantization of an (already scaled) weight, clipped to ``±max_abs`` ``[N, G]``:
    AWQ's rounding is round-to-nearest with zero-points once the clip is applied."""
    check_shape(weight, spec)
    return rtn_quantize(clip_groups(weight, spec, max_abs) if max_abs is not None else weight, spec)


# --------------------------------------------------------------------------- grouped-query attention


def expand_kv_scale(s_kv: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """v_proj output scale ``[kv * head_dim]`` -> o_proj input scale ``[kv * n_rep * head_dim]``.

    Query head ``h`` reads kv head ``h // n_rep`` (``repeat_kv``), so o_proj input channel
    ``h * head_dim + d`` carries v channel ``(h // n_rep) * head_dim + d``.
    """
    assert s_kv.shape[0] % head_dim == 0, f"{s_kv.shape[0]} channels is not a whole number of heads of {head_dim}"
    kv = s_kv.shape[0] // head_dim
    return s_kv.view(kv, 1, head_dim).expand(kv, n_rep, head_dim).reshape(-1)


def tie_kv_stat(x_mean_abs_o: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """o_proj input statistic ``[heads * head_dim]`` -> one value per v channel (mean over its heads)."""
    return x_mean_abs_o.view(-1, n_rep, head_dim).mean(dim=1).reshape(-1)
