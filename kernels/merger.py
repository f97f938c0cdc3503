"""Qwen2.5-VL patch merger: RMSNorm(C) -> 2x2 spatial merge -> Linear(4C, 4C) -> GELU -> Linear(4C, out).

The first GEMM carries the whole front of the pipeline, with nothing elementwise left on its A tiles
(per-element work on A made the first version issue-bound: ~330 instructions per K step per thread
on sm_90 against a ~500-cycle MMA, and its in-kernel RMS sweep re-read every row once per N tile):
  * the norm's weight is folded into fc1 once (``fold_norm_weight``, cached by the module): column
    ``s * C + c`` of W1 times ``ln_w[c]``;
  * the norm's 1/RMS is per patch, i.e. constant over each C-wide slot of a merged row, so it scales
    that slot's partial dot product: ``sum_s rstd[4m + s] * (x_slot @ W1'_slot)``. One small
    reduction launch computes it (4 floats per merged row); the normalised activations never exist;
  * the 2x2 merge is free: merged row ``m`` is patch rows ``4m..4m+3`` back to back, the same memory
    viewed as ``[N/4, 4C]``; A and W1' tiles go from memory to the tensor cores untouched;
  * epilogue: bias and exact (erf) GELU on the fp32 accumulator, one rounding to the model dtype.
One K loop runs over all four slots, the 1/RMS step behind a branch at each slot's end, so loads
stay in flight across the slot boundaries. A K loop per slot drained and refilled the load pipeline
at each (sm_90 SASS 128 instructions per K step against 115, 213 registers against 185) and lost at
every image size on an H200 (5120 patches: 210 us at its best tile, against 169).
``RESCALE`` (a sweep option): one accumulator instead of two. Before each slot after the first, the
accumulator is multiplied by the previous slot's 1/RMS over this one's, and after the last slot by
its 1/RMS, which leaves ``sum_s rstd_s * (x_slot @ W1'_slot)`` with the MMA accumulating in place:
sm_90 registers at 5120 patches 185 -> 127 (Triton 3.6; with TMA 149 -> 116), about the same
instructions a slot (114 a K step against 109, 90 at the slot's boundary against 200); at 127
registers two programs of 3 stages fit an SM.
fc1 can also be split over K by patch slots (``SPLIT_K`` 2 or 4, a sweep option, not a default yet):
each split sums whole slots, and the split of each tile that finishes last adds the parts and applies
bias and GELU (``_splitk.py``). For small images it trades programs that each read all of A for wider
tiles that read it a quarter as often.
The second GEMM is a plain ``addmm``: nothing is left to fuse into it, and cuBLAS is the peer to beat.

The default plan, ``"cublas"`` (``apply(model)``; the fused one above is ``merger="fused"``), leaves
both GEMMs to cuBLAS and fuses only what cuBLAS cannot take: transformers' RMSNorm, about eight
launches over fp32 copies of the patches in eager mode, becomes one Triton pass that reads each
patch once and writes the normalised, weighted row (``patch_rmsnorm``); the 2x2 merge is a view,
then fc1, exact GELU and fc2 run as transformers runs them. The fused fc1 ran at 400 TFLOP/s where
cuBLAS runs bf16 GEMMs of this size at 630-680: on an H200 (2026-11-30, eager) the whole merger took
193 us at 5120 patches against 241 for the fused plan and 278 for transformers; 68 against 102 and
119 at 1296 patches; 72 against 99 and 120 at 256.

``"overlap"`` (not a default; untimed): the cublas plan over 128-row-aligned chunks of merged rows,
each chunk's fc1, GELU and fc2 on its own CUDA stream, so one chunk's GEMMs run on the SMs that
another's last, partly filled wave leaves idle. The cuBLAS GEMMs alone took 187 us at 5120 patches,
against eager's 279 (1.49x): the plan reaches 1.5x only if its GEMMs get faster, and filling their
last waves is one way.

The fused plan's rounding differs from transformers' ``Qwen2_5_VLRMSNorm`` (which rounds the
normalised input, then its product with the weight): there W1' is rounded once and the normalised
input never is. The cublas plan's norm rounds where transformers rounds.
"""

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qoqopt.errors import QoqoptError

from ._splitk import splitk_operands, splitk_total
from ._streams import Lanes
from ._triton import cdiv, check_supported, device_function, dot_precision, kernel, next_pow2, tensor_version, tl, use_triton


@kernel
def _patch_rstd_kernel(x_ptr, rstd_ptr, P, eps, C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``1 / sqrt(mean(x**2) + eps)`` of every patch row of ``x [P, C]``, in fp32 like transformers."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    row_mask = rows < P
    sumsq = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        xs = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=row_mask[:, None] & (cols < C)[None, :],
                     other=0.0).to(tl.float32)
        sumsq += tl.sum(xs * xs, axis=1)
    tl.store(rstd_ptr + rows, 1.0 / tl.sqrt(sumsq / C + eps), mask=row_mask)


@kernel
def _patch_rmsnorm_kernel(x_ptr, w_ptr, out_ptr, P, eps, C: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """transformers' ``Qwen2_5_VLRMSNorm`` of every patch row of ``x [P, C]`` in one read and one write: the
    mean square and its 1/sqrt in fp32, the normalised row rounded to the model dtype, then times the
    weight and rounded again: rounded where transformers rounds (its 1/RMS may differ in the last bit)."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < P)[:, None] & col_mask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    xs = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xs * xs, axis=1) / C + eps)
    normed = (xs * rstd[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (w[None, :] * normed).to(out_ptr.dtype.element_ty), mask=mask)


@kernel(do_not_specialize=("M",))
def _merger_fc1_kernel(
    x_ptr,  # [M * MERGE, C] patch rows (contiguous), viewed as [M, MERGE * C]
    rstd_ptr,  # [M * MERGE] fp32: 1 / RMS of each patch row
    w1_ptr,  # [N, MERGE * C] fc1 weight with the norm weight folded in (nn.Linear layout)
    b1_ptr,  # [N]
    out_ptr,  # [M, N] GELU(fc1(norm(x).view(M, -1)))
    partials_ptr,  # SPLIT_K > 1: fp32 [SPLIT_K, M, N] scratch (kernels/_splitk.py)
    counters_ptr,  # SPLIT_K > 1: int32 [output tiles], zero between launches
    M,
    N,
    x_desc,  # TMA: x as [M, MERGE * C] in [BLOCK_M, BLOCK_K] blocks (host descriptor), else None
    w1_desc,  # TMA: w1 in [BLOCK_N, BLOCK_K] blocks, else None
    C: tl.constexpr,
    MERGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,  # divides MERGE: each split sums whole patch slots
    RESCALE: tl.constexpr = False,  # one accumulator, rescaled between patch slots (see below)
    TMA: tl.constexpr = False,  # A and W tiles by the tensor memory accelerator (sm_90), cut-off rows zero-filled
):
    K: tl.constexpr = MERGE * C
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * K + offs_k[None, :]
    w1_ptrs = w1_ptr + offs_n[None, :] * K + offs_k[:, None]

    tl.static_assert(MERGE % SPLIT_K == 0, "each split sums whole patch slots")
    SLOT_STEPS: tl.constexpr = C // BLOCK_K
    SPLIT_STEPS: tl.constexpr = K // BLOCK_K // SPLIT_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # the current patch slot's dot product
    first = 0 if SPLIT_K == 1 else pid_k * SPLIT_STEPS  # unsplit, the loop's bounds stay constants
    # Each slot's 1/RMS is loaded a slot ahead, once the previous one is used: loaded where it is used,
    # every warp waited out a memory latency at each slot's end (sm_90 SASS: the loop's only plain loads).
    rstd = tl.load(rstd_ptr + offs_m * MERGE + first // SLOT_STEPS, mask=m_mask, other=0.0)
    for step in range(first, first + SPLIT_STEPS):
        if TMA:
            a = x_desc.load([pid_m * BLOCK_M, step * BLOCK_K])
            b = tl.trans(w1_desc.load([pid_n * BLOCK_N, step * BLOCK_K]))
        else:
            a = tl.load(x_ptrs + step * BLOCK_K, mask=m_mask[:, None], other=0.0)
            b = tl.load(w1_ptrs + step * BLOCK_K, mask=n_mask[None, :], other=0.0)
        if RESCALE:
            if step % SLOT_STEPS == 0 and step != first:  # a new slot: acc into its patch's 1/RMS units
                slot = step // SLOT_STEPS
                ratio = (tl.load(rstd_ptr + offs_m * MERGE + slot - 1, mask=m_mask, other=1.0)
                         / tl.load(rstd_ptr + offs_m * MERGE + slot, mask=m_mask, other=1.0))
                acc = acc * ratio[:, None]
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        else:
            part = tl.dot(a, b, part, input_precision=DOT_PRECISION)
            if step % SLOT_STEPS == SLOT_STEPS - 1:  # the slot's last K tile: scale by its patch's 1/RMS
                acc += part * rstd[:, None]
                part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                next_slot = tl.minimum(step // SLOT_STEPS + 1, MERGE - 1)
                rstd = tl.load(rstd_ptr + offs_m * MERGE + next_slot, mask=m_mask, other=0.0)
    if RESCALE:  # the last slot's 1/RMS
        last = (first + SPLIT_STEPS - 1) // SLOT_STEPS
        acc = acc * tl.load(rstd_ptr + offs_m * MERGE + last, mask=m_mask, other=0.0)[:, None]

    offs = offs_m[:, None] * N + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        _fc1_epilogue(acc, b1_ptr, out_ptr, offs, offs_n, n_mask, mask)
    else:  # GELU needs the whole sum: the split that finishes last applies it
        total, last = splitk_total(acc, partials_ptr, counters_ptr, pid_m * tl.num_programs(1) + pid_n, pid_k,
                                   M * N, offs, mask, SPLIT_K, 1)
        if last:
            _fc1_epilogue(total, b1_ptr, out_ptr, offs, offs_n, n_mask, mask)


@device_function
def _fc1_epilogue(acc, b1_ptr, out_ptr, offs, offs_n, n_mask, mask):
    """Bias and exact GELU in fp32, one rounding to out's dtype."""
    h = acc + tl.load(b1_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=mask)


def _fc1_config(m: int, c: int, device: torch.device) -> dict:
    """Tile sizes: BLOCK_K must divide C (one patch per K tile); small tiles for the interpreter.
    On the GPU, from the H200 sweeps of 2026-11-30 (fc1 alone, graph replay; h200_kernels.json and
    h200_recheck_kernels.json)."""
    block_k = next((b for b in (64, 32, 16) if c % b == 0), None)
    if block_k is None:
        raise QoqoptError(f"patch merger kernel: context dim {c} is not a multiple of 16")
    if device.type == "cpu":
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=min(block_k, 32), num_warps=4, num_stages=1)
    if m <= 64:  # one small image: weight streaming dominates, so narrow deep tiles spread N over many
        # programs (256 patches: 41 us at 64 x 32 x 128 against 51 at the former 64 x 64 x 64)
        block_m = max(16, min(64, next_pow2(m)))
        deep_k = 128 if c % 128 == 0 else block_k
        return dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=deep_k, num_warps=4, num_stages=4)
    if m <= 512:  # keeps >= 1.5 waves of programs on 132 SMs for mid-size images (1296 patches: 66 us
        # against 69 at 128 x 128)
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, num_warps=4, num_stages=4)
    # 5120 patches: 169 us against 189 at 64 x 128 and 188 at 3 stages
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, num_warps=8, num_stages=4)


def fold_norm_weight(w1: torch.Tensor, ln_weight: torch.Tensor) -> torch.Tensor:
    """fc1's weight with the RMSNorm weight folded in: ``W1[:, s * C + c] * ln_w[c]`` (rounded once)."""
    merge = w1.shape[1] // ln_weight.shape[0]
    return (w1.float() * ln_weight.float().repeat(merge)[None, :]).to(w1.dtype).contiguous()


def patch_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``[P]`` fp32 1/RMS of every patch row of ``x [P, C]``."""
    p, c = x.shape
    rstd = torch.empty(p, device=x.device, dtype=torch.float32)
    block_p = 16 if x.device.type == "cpu" else 32
    block_c = min(next_pow2(c), 32 if x.device.type == "cpu" else 256)
    _patch_rstd_kernel[x.device][(cdiv(p, block_p),)](x, rstd, p, eps, C=c, BLOCK_P=block_p, BLOCK_C=block_c,
                                                      num_warps=4)
    return rstd


def rmsnorm_blocks(c: int) -> dict:
    """A whole row in registers: C = 1280 pads to 2048, 4 rows a program, 64 floats a thread at 4 warps."""
    block_c = next_pow2(c)
    assert block_c <= 8192, f"patch RMSNorm keeps a row in registers: C={c} is too wide"
    return dict(BLOCK_P=max(1, min(64, 8192 // block_c)), BLOCK_C=block_c)


def patch_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out=None) -> torch.Tensor:
    """``[P, C]`` transformers' RMSNorm of every patch row of ``x [P, C]`` (weight ``[C]``, x's dtype)."""
    assert x.dim() == 2 and x.is_contiguous(), f"x must be contiguous [patches, C], got {tuple(x.shape)}"
    p, c = x.shape
    assert weight.shape == (c,) and weight.dtype == x.dtype, f"weight must be [{c}] {x.dtype}"
    if out is None:
        out = torch.empty_like(x)
    # the kernel rounds to out's dtype: another dtype would round elsewhere than transformers
    assert out.shape == x.shape and out.is_contiguous() and out.dtype == x.dtype, (
        f"out must be contiguous {tuple(x.shape)} {x.dtype}")
    blocks = rmsnorm_blocks(c)
    if p:
        _patch_rmsnorm_kernel[x.device][(cdiv(p, blocks["BLOCK_P"]),)](x, weight, out, p, eps, C=c, **blocks,
                                                                       num_warps=4)
    return out


def merger_fc1(x: torch.Tensor, eps: float, w1_folded: torch.Tensor, b1: torch.Tensor, out=None, **config):
    """``GELU(Linear(RMSNorm(x).view(-1, 4C)))``; ``x`` is ``[num_patches, C]``, ``w1_folded`` from
    :func:`fold_norm_weight`."""
    launch = fc1_launch(x, w1_folded, b1, out, **config)
    if launch.grid is not None:
        _merger_fc1_kernel[x.device][launch.grid](x, patch_rstd(x, eps), *launch.args, **launch.constexprs)
    return launch.out


@dataclass(frozen=True)
class Fc1Launch:
    out: torch.Tensor
    grid: tuple[int, int, int] | None  # None: nothing to launch (no merged rows)
    args: tuple = ()  # the kernel's operands after x and its per-patch rstd
    constexprs: dict = field(default_factory=dict)


def fc1_launch(x: torch.Tensor, w1_folded: torch.Tensor, b1: torch.Tensor, out=None,
               device: torch.device | None = None, **config) -> Fc1Launch:
    """Check the operands and plan :func:`merger_fc1`'s kernel launch for ``device`` (default x's).
    benchmarks/offline_compile.py plans for CUDA with CPU stand-ins, so it compiles for sm_90
    exactly the launch that runs."""
    assert x.dim() == 2 and x.is_contiguous(), f"x must be contiguous [patches, C], got {tuple(x.shape)}"
    c = x.shape[1]
    n, k = w1_folded.shape
    assert k % c == 0 and x.shape[0] % (k // c) == 0, f"x {tuple(x.shape)} does not merge into rows of {k}"
    assert b1.shape == (n,), f"b1 {tuple(b1.shape)}"
    assert w1_folded.is_contiguous() and w1_folded.dtype == x.dtype, f"w1 must be contiguous {x.dtype}"
    m = x.shape[0] // (k // c)
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    assert out.shape == (m, n) and out.is_contiguous(), f"out must be contiguous [{m}, {n}]"
    if m == 0:
        return Fc1Launch(out, None)
    cfg = _fc1_config(m, c, device or x.device) | config
    assert c % cfg["BLOCK_K"] == 0, f"BLOCK_K={cfg['BLOCK_K']} must divide C={c} (one patch per K tile)"
    split = cfg.get("SPLIT_K", 1)
    assert (k // c) % split == 0, f"SPLIT_K={split} must divide the {k // c} patch slots of a merged row"
    grid = (cdiv(m, cfg["BLOCK_M"]), cdiv(n, cfg["BLOCK_N"]), split)
    partials, counters = splitk_operands(x.device, split, m * n, grid[0] * grid[1], b1)
    descs = (None, None)
    if cfg.get("TMA"):
        from triton.tools.tensor_descriptor import TensorDescriptor

        descs = (TensorDescriptor.from_tensor(x.view(m, k), [cfg["BLOCK_M"], cfg["BLOCK_K"]]),
                 TensorDescriptor.from_tensor(w1_folded, [cfg["BLOCK_N"], cfg["BLOCK_K"]]))
    args = (w1_folded, b1, out, partials, counters, m, n, *descs)
    return Fc1Launch(out, grid, args, dict(C=c, MERGE=k // c, DOT_PRECISION=dot_precision(x.dtype), **cfg))


def patch_merger(x, eps, w1_folded, b1, w2, b2, out=None, **config) -> torch.Tensor:
    """Triton path of the merger: fused norm/merge/GEMM/GELU, then ``addmm`` for the projection."""
    h = merger_fc1(x, eps, w1_folded, b1, **config)
    if out is None:
        return F.linear(h, w2, b2)
    return torch.addmm(b2, h, w2.t(), out=out)


def patch_merger_cublas(x, ln_weight, eps, w1, b1, w2, b2) -> torch.Tensor:
    """The ``"cublas"`` plan: the norm in one Triton pass, then the reference's GEMMs and GELU."""
    return _merged_mlp(patch_rmsnorm(x, ln_weight, eps), w1, b1, w2, b2)


OVERLAP_CHUNKS = 2
OVERLAP_ROWS = 128  # chunk boundaries fall on whole 128-row tiles of merged rows (cuBLAS's are 64-256 rows)


def overlap_chunks(rows: int, chunks: int = OVERLAP_CHUNKS) -> list[tuple[int, int]]:
    """``[lo, hi)`` merged-row ranges: ``rows`` in 128-row units shared as evenly as ``chunks`` allow, larger first."""
    if chunks < 1:
        raise QoqoptError(f"patch merger: overlap chunks must be at least 1, got {chunks}")
    units, bounds, lo = cdiv(rows, OVERLAP_ROWS), [], 0
    base, extra = divmod(units, chunks)
    for i in range(min(chunks, units)):
        hi = min(rows, lo + (base + (i < extra)) * OVERLAP_ROWS)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def patch_merger_overlap(x, ln_weight, eps, w1, b1, w2, b2, chunks: int = OVERLAP_CHUNKS) -> torch.Tensor:
    """The ``"overlap"`` plan: the cublas plan over row chunks, each chunk's fc1, GELU and fc2 in order
    on its own CUDA stream (:mod:`._streams`; chunk 0 on the caller's), the chunks side by side. At 5120
    patches, in 128 x 256 tiles, fc1's 1280 x 5120 output is 200 tiles and fc2's 1280 x 3584 is 140: on
    an H200's 132 SMs, two waves each with the second partly empty; chunked, one chunk's GEMMs can run
    on the SMs another's leave idle. The same operations and roundings as the cublas plan, over fewer
    rows a GEMM."""
    a = patch_rmsnorm(x, ln_weight, eps).view(-1, w1.shape[1])
    out = a.new_empty(a.shape[0], w2.shape[0])

    def chunk(lo: int, hi: int) -> None:
        torch.addmm(b2, F.gelu(F.linear(a[lo:hi], w1, b1)), w2.t(), out=out[lo:hi])

    bounds = overlap_chunks(a.shape[0], chunks)
    with Lanes(a.device) as lanes:
        for lane, (lo, hi) in enumerate(bounds[1:]):  # forked first: a lane waits for all queued before it
            lanes.run(lane, functools.partial(chunk, lo, hi), a, out)
        if bounds:
            chunk(*bounds[0])
    return out


def patch_merger_reference(x, ln_weight, eps, w1, b1, w2, b2) -> torch.Tensor:
    """Torch reference, op for op as transformers' ``Qwen2_5_VLPatchMerger``."""
    xf = x.float()
    normed = ln_weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return _merged_mlp(normed, w1, b1, w2, b2)


def _merged_mlp(normed, w1, b1, w2, b2) -> torch.Tensor:
    """The 2x2 merge (a view: merged row m is patch rows 4m..4m+3), fc1, exact GELU, fc2."""
    return F.linear(F.gelu(F.linear(normed.view(-1, w1.shape[1]), w1, b1)), w2, b2)


MERGER_PLANS = ("cublas", "fused", "overlap")
DEFAULT_PLAN = MERGER_PLANS[0]  # apply()'s, since the H200 run of 2026-11-30


class FusedPatchMerger(nn.Module):
    """Drop-in for ``Qwen2_5_VLPatchMerger``; keeps its submodules so state_dict keys are unchanged."""

    def __init__(self, ln_q: nn.Module, mlp: nn.Sequential, strict: bool = False, plan: str = DEFAULT_PLAN):
        super().__init__()
        if plan not in MERGER_PLANS:
            raise QoqoptError(f"patch merger: plan {plan!r}; choose from {', '.join(MERGER_PLANS)}")
        self.ln_q = ln_q
        self.mlp = mlp
        self.hidden_size = mlp[0].in_features
        self.strict = strict
        self.plan = plan

    @classmethod
    def from_hf(cls, merger: nn.Module, strict: bool = False, plan: str = DEFAULT_PLAN) -> "FusedPatchMerger":
        mlp = merger.mlp
        shape_ok = len(mlp) == 3 and isinstance(mlp[0], nn.Linear) and isinstance(mlp[2], nn.Linear)
        if not (shape_ok and isinstance(mlp[1], nn.GELU) and mlp[1].approximate == "none"):
            raise QoqoptError("patch merger: expected mlp = Linear, exact GELU, Linear")
        if mlp[0].bias is None or mlp[2].bias is None:
            raise QoqoptError("patch merger: expected biased Linears")
        check_supported(mlp[0].weight.device, mlp[0].weight.dtype, "patch merger")
        return cls(merger.ln_q, mlp, strict, plan)

    def folded_w1(self) -> torch.Tensor:
        """fc1's weight with ln_q's folded in, rebuilt only when either weight changes."""
        fc1_w, ln_w = self.mlp[0].weight, self.ln_q.weight
        key = tuple((t.data_ptr(), tensor_version(t), t.dtype, t.device) for t in (fc1_w, ln_w))
        if getattr(self, "_fold_key", None) != key:
            self._folded, self._fold_key = fold_norm_weight(fc1_w.detach(), ln_w.detach()), key
        return self._folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.mlp[0], self.mlp[2]
        if use_triton(x, self.strict, "patch merger", self.ln_q.weight, fc1.weight, fc2.weight):
            if self.plan == "fused":
                return patch_merger(x.contiguous(), self.ln_q.variance_epsilon, self.folded_w1(), fc1.bias, fc2.weight,
                                    fc2.bias)
            run = patch_merger_overlap if self.plan == "overlap" else patch_merger_cublas
            return run(x.contiguous(), self.ln_q.weight, self.ln_q.variance_epsilon, fc1.weight, fc1.bias, fc2.weight,
                       fc2.bias)
        return patch_merger_reference(x, self.ln_q.weight, self.ln_q.variance_epsilon, fc1.weight, fc1.bias,
                                      fc2.weight, fc2.bias)
