"""Qwen2.5-VL patch merger: RMSNorm(C) -> 2x2 spatial merge -> Linear(4C, 4C) -> GELU -> Linear(4C, out).

The first GEMM carries the whole front of the pipeline:
  * prologue: each program first sweeps its rows once for the RMS of every patch, then normalises
    its A tiles in registers inside the GEMM loop, so the normalised (and merged) activations never
    touch memory. The 2x2 merge is free: merged row ``m`` is patch rows ``4m..4m+3`` back to back,
    i.e. the same memory viewed as ``[N/4, 4C]``; a K tile never straddles two patches because
    BLOCK_K divides C;
  * epilogue: bias and exact (erf) GELU on the fp32 accumulator, one rounding to the model dtype.
The second GEMM is a plain ``addmm``: nothing is left to fuse into it, and cuBLAS is the peer to beat.

Rounding follows transformers' ``Qwen2_5_VLRMSNorm``: normalise in fp32, round to the input dtype,
multiply by the weight, round again.
"""

import torch
import torch.nn.functional as F
from torch import nn

from qoqopt.errors import QoqoptError

from ._triton import cdiv, check_supported, dot_precision, kernel, next_pow2, tl, use_triton


@kernel(do_not_specialize=("M",))
def _merger_fc1_kernel(
    x_ptr,  # [M * MERGE, C] patch rows (contiguous), viewed as [M, MERGE * C]
    ln_w_ptr,  # [C] RMSNorm weight
    w1_ptr,  # [N, MERGE * C] first Linear weight (nn.Linear layout)
    b1_ptr,  # [N]
    out_ptr,  # [M, N] GELU(fc1(norm(x).view(M, -1)))
    M,
    N,
    eps,
    C: tl.constexpr,
    MERGE: tl.constexpr,
    SLOTS: tl.constexpr,  # MERGE rounded up to a power of two: one rstd column per patch
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    K: tl.constexpr = MERGE * C
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, SLOTS)
    m_mask = offs_m < M
    n_mask = offs_n < N
    in_dtype = x_ptr.dtype.element_ty
    x_ptrs = x_ptr + offs_m[:, None] * K + offs_k[None, :]
    w1_ptrs = w1_ptr + offs_n[None, :] * K + offs_k[:, None]

    # Prologue: sum of squares of each of the MERGE patches in every merged row, as [BLOCK_M, SLOTS].
    sumsq = tl.zeros([BLOCK_M, SLOTS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xs = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0).to(tl.float32)
        sumsq += tl.where(slots[None, :] == k0 // C, tl.sum(xs * xs, axis=1)[:, None], 0.0)
    rstd_all = 1.0 / tl.sqrt(sumsq / C + eps)

    # Main loop: one flat GEMM loop over K (the form Triton's pipeliner handles), normalising each
    # A tile with its patch's rstd in registers.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rstd = tl.sum(tl.where(slots[None, :] == k0 // C, rstd_all, 0.0), axis=1)
        xs = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0).to(tl.float32)
        g = tl.load(ln_w_ptr + (k0 % C) + offs_k).to(tl.float32)
        a = ((xs * rstd[:, None]).to(in_dtype).to(tl.float32) * g[None, :]).to(in_dtype)
        b = tl.load(w1_ptrs + k0, mask=n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # Epilogue: bias + exact GELU in fp32.
    h = acc + tl.load(b1_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _fc1_config(m: int, c: int, device: torch.device) -> dict:
    """Tile sizes: BLOCK_K must divide C (one patch per K tile); small tiles for the interpreter."""
    block_k = next((b for b in (64, 32, 16) if c % b == 0), None)
    if block_k is None:
        raise QoqoptError(f"patch merger kernel: context dim {c} is not a multiple of 16")
    if device.type == "cpu":
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=min(block_k, 32), num_warps=4, num_stages=1)
    if m <= 64:  # one small image: weight streaming dominates, spread N over many programs
        block_m = max(16, min(64, next_pow2(m)))
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, num_warps=4, num_stages=4)
    if m <= 512:  # keeps >= 1.5 waves of programs on 132 SMs for mid-size images
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, num_warps=8, num_stages=3)


def merger_fc1(x: torch.Tensor, ln_weight: torch.Tensor, eps: float, w1: torch.Tensor, b1: torch.Tensor, out=None, **config):
    """``GELU(Linear(RMSNorm(x).view(-1, 4C)))`` in one kernel; ``x`` is ``[num_patches, C]``."""
    assert x.dim() == 2 and x.is_contiguous(), f"x must be contiguous [patches, C], got {tuple(x.shape)}"
    c = x.shape[1]
    n, k = w1.shape
    assert k % c == 0 and x.shape[0] % (k // c) == 0, f"x {tuple(x.shape)} does not merge into rows of {k}"
    assert ln_weight.shape == (c,) and b1.shape == (n,), f"ln {tuple(ln_weight.shape)}, b1 {tuple(b1.shape)}"
    assert w1.is_contiguous() and w1.dtype == x.dtype, f"w1 must be contiguous {x.dtype}, got {w1.dtype}"
    m = x.shape[0] // (k // c)
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    assert out.shape == (m, n) and out.is_contiguous(), f"out must be contiguous [{m}, {n}]"
    if m == 0:
        return out
    cfg = _fc1_config(m, c, x.device) | config
    assert c % cfg["BLOCK_K"] == 0, f"BLOCK_K={cfg['BLOCK_K']} must divide C={c} (one patch per K tile)"
    grid = (cdiv(m, cfg["BLOCK_M"]), cdiv(n, cfg["BLOCK_N"]))
    _merger_fc1_kernel[x.device][grid](
        x, ln_weight, w1, b1, out, m, n, eps,
        C=c, MERGE=k // c, SLOTS=max(2, next_pow2(k // c)), DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )
    return out


def patch_merger(x, ln_weight, eps, w1, b1, w2, b2, out=None, **config) -> torch.Tensor:
    """Triton path of the merger: fused prologue/GEMM/epilogue, then ``addmm`` for the projection."""
    h = merger_fc1(x, ln_weight, eps, w1, b1, **config)
    if out is None:
        return F.linear(h, w2, b2)
    return torch.addmm(b2, h, w2.t(), out=out)


def patch_merger_reference(x, ln_weight, eps, w1, b1, w2, b2) -> torch.Tensor:
    """Torch reference, op for op as transformers' ``Qwen2_5_VLPatchMerger``."""
    xf = x.float()
    normed = ln_weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    h = F.gelu(F.linear(normed.view(-1, w1.shape[1]), w1, b1))
    return F.linear(h, w2, b2)


class FusedPatchMerger(nn.Module):
    """Drop-in for ``Qwen2_5_VLPatchMerger``; keeps its submodules so state_dict keys are unchanged."""

    def __init__(self, ln_q: nn.Module, mlp: nn.Sequential, strict: bool = False):
        super().__init__()
        self.ln_q = ln_q
        self.mlp = mlp
        self.hidden_size = mlp[0].in_features
        self.strict = strict

    @classmethod
    def from_hf(cls, merger: nn.Module, strict: bool = False) -> "FusedPatchMerger":
        mlp = merger.mlp
        shape_ok = len(mlp) == 3 and isinstance(mlp[0], nn.Linear) and isinstance(mlp[2], nn.Linear)
        if not (shape_ok and isinstance(mlp[1], nn.GELU) and mlp[1].approximate == "none"):
            raise QoqoptError("patch merger: expected mlp = Linear, exact GELU, Linear")
        if mlp[0].bias is None or mlp[2].bias is None:
            raise QoqoptError("patch merger: expected biased Linears")
        check_supported(mlp[0].weight.device, mlp[0].weight.dtype, "patch merger")
        return cls(merger.ln_q, mlp, strict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.mlp[0], self.mlp[2]
        args = (self.ln_q.weight, self.ln_q.variance_epsilon, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if use_triton(x, self.strict, "patch merger", fc1.weight):
            return patch_merger(x.contiguous(), *args)
        return patch_merger_reference(x, *args)
