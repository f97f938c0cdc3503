"""How far the swapped W4A16 decode kernel's zero correction moves its outputs, at the 7B's K, without a GPU.

The swapped kernel (``KERNEL="swap"``) accumulates ``(MAGIC + q) * a`` on the tensor cores and takes
``(MAGIC + z) * sum(a)`` off afterwards, so its fp32 accumulator holds values about MAGIC / |q - z|
times larger than the result it keeps (MAGIC = 128 in bf16, 1024 in fp16): the rounding error of
that accumulation is what this measures, on the down projection (K = 18944, the 7B's deepest),
against the exact result, beside the same error for the default 16-row kernel, for a bf16 matmul
over the dequantized weights (the dense peer the benchmark compares with), and for the output
dtype's own rounding.

Two accumulation models, since the tensor cores' rounding is not IEEE:
- ``rn``: each 16-deep MMA step adds its exact products to the accumulator and rounds once to
  nearest fp32 (what the Triton interpreter and a careful FMA chain do);
- ``chop``: each step aligns all 17 addends to the largest one's exponent, drops the bits below
  fp32's last place (truncation, no guard bits), and truncates the sum to 24 bits: the pessimistic
  end of what Fasi et al. (2021, "Numerical behavior of NVIDIA tensor cores") measured on V100/A100.
The fp32 CUDA-core steps around the MMA (activation sums, zero correction, group scale) round to
nearest as the hardware does (the activation sum is rounded once, not in tl.sum's tree order).
Then the real kernels run under the Triton interpreter (fp16: the interpreter has no bf16 dot) on
the same weights' first columns with new activations: a rough check of the ``rn`` model (numpy's
fp32 matmul per step, then one add).

    python benchmarks/swap_accuracy.py --out benchmarks/results/swap_accuracy.json

A model, not a measurement of wgmma: `bench_kernels.py --sweep` measures the same errors on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernels import rel_err  # noqa: E402
from qoqopt.kernels.w4a16 import HALF_MAGIC  # noqa: E402
from qoqopt.packing import quantize_rtn  # noqa: E402

STEP = 16  # K depth of one wgmma for 16-bit inputs
TILE = 128  # BLOCK_K of both decode kernels at the 7B shapes (one group)


def f32(x: torch.Tensor) -> torch.Tensor:
    """Round float64 to the nearest fp32, kept in float64."""
    return x.float().double()


def _chop(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """Truncate toward zero to a multiple of 2**(exponent - 24): fp32's last place for |x| < 2**exponent."""
    ulp = torch.ldexp(torch.ones_like(x), exponent - 24)
    return torch.trunc(x / ulp) * ulp


def mma_step(acc: torch.Tensor, products: torch.Tensor, mode: str) -> torch.Tensor:
    """One MMA step: ``acc [..]`` plus ``products [.., STEP]`` (exact in float64), per the model."""
    if mode == "rn":
        return f32(acc + products.sum(-1))
    terms = torch.cat([acc.unsqueeze(-1), products], -1)
    top = torch.frexp(terms.abs().amax(-1, keepdim=True)).exponent
    total = _chop(terms, top).sum(-1)  # multiples of one place, fewer than 2**29 of them: exact
    return _chop(total, torch.frexp(total).exponent)


def exact(a: torch.Tensor, q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``sum_g s_g sum_{k in g} (q_k - z_g) a_k`` in float64 (exact to ~1e-16)."""
    k = a.shape[1]
    w = (q - z.repeat_interleave(k // z.shape[0], 0)) * s.repeat_interleave(k // s.shape[0], 0)
    return a @ w


def dense(a: torch.Tensor, w: torch.Tensor, mode: str) -> torch.Tensor:
    """bf16/fp16 matmul over the rounded dequantized weight ``w [K, N]``: fp32 accumulation in K order."""
    acc = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float64)
    for k0 in range(0, a.shape[1], STEP):
        acc = mma_step(acc, a[:, None, k0 : k0 + STEP] * w.t()[None, :, k0 : k0 + STEP], mode)
    return acc


def mma16(a, q, z, s, mode: str) -> torch.Tensor:
    """``_w4a16_kernel``'s decode branch: per K tile, ``dot(a, q - z)`` (exact operands), times the scale."""
    acc = torch.zeros(a.shape[0], q.shape[1], dtype=torch.float64)
    for t, k0 in enumerate(range(0, a.shape[1], TILE)):
        w = q[k0 : k0 + TILE] - z[t]
        part = torch.zeros_like(acc)
        for j in range(0, TILE, STEP):
            part = mma_step(part, a[:, None, k0 + j : k0 + j + STEP] * w.t()[None, :, j : j + STEP], mode)
        acc = f32(acc + part * s[t])  # one FFMA
    return acc


def swapped(a, q, z, s, magic: float, mode: str) -> torch.Tensor:
    """``_w4a16_swap_kernel``: per K tile, ``dot(MAGIC + q, a)`` walked one packed field (K stride 8) at
    a time, minus ``(MAGIC + z) * sum(a)``, times the scale."""
    acc = torch.zeros(a.shape[0], q.shape[1], dtype=torch.float64)
    for t, k0 in enumerate(range(0, a.shape[1], TILE)):
        a_t, w = a[:, k0 : k0 + TILE], q[k0 : k0 + TILE] + magic
        a_sum = f32(a_t.sum(1, keepdim=True))  # tl.sum's tree order rounds a little more (fp16 max ~1.2x)
        part = torch.zeros_like(acc)
        for field in range(8):  # half h, field j: K rows 8 * word + 4 * h + j
            rows = torch.arange(16) * 8 + field
            part = mma_step(part, a_t[:, None, rows] * w.t()[None, :, rows], mode)
        # part - (z + MAGIC) * a_sum is one FFMA (one rounding), then one more with the scale
        acc = f32(acc + f32(part - (z[t] + magic) * a_sum) * s[t])
    return acc


def heavy_tailed(m: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """fp32 ``[m, k]`` activations with per-channel log-normal spread and 8 channels 40x larger, as
    SwiGLU outputs (the down projection's input) have: the case where the zero correction's
    ``MAGIC * sum(a)`` is largest against the result."""
    a = torch.randn(m, k, generator=generator) * torch.exp(0.7 * torch.randn(k, generator=generator))
    a[:, torch.randperm(k, generator=generator)[:8]] *= 40.0
    return a


def problem(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """A down projection's shapes: RTN 4-bit weights (group 128), :func:`heavy_tailed` activations."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * 0.02
    q, zeros, scales = quantize_rtn(weight, 4, TILE)
    a = heavy_tailed(m, k, g).to(dtype).double()
    return a, q.double(), zeros.double(), scales.to(dtype).double()


def errors(out: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> dict:
    """Error of ``out`` rounded to ``dtype`` (as the kernels store it), relative to max |truth|."""
    stored = out.to(dtype)
    return {"max_rel": rel_err(stored, truth), "rms_rel": rel_err(stored, truth, rms=True),
            "fp32_acc_max_rel": rel_err(out, truth)}


def emulate(m: int, n: int, k: int) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        a, q, z, s = problem(m, n, k, dtype)
        truth = exact(a, q, z, s)
        w_round = ((q - z.repeat_interleave(TILE, 0)) * s.repeat_interleave(TILE, 0)).to(dtype).double()
        magic = HALF_MAGIC[dtype][1]
        rows.append({"dtype": str(dtype)[6:], "kernel": "output rounding", "model": "-", **errors(truth, truth, dtype)})
        print(f"  {rows[-1]['dtype']:8s} {'output rounding':16s} -     max {rows[-1]['max_rel']:.2e}  "
              f"rms {rows[-1]['rms_rel']:.2e}", flush=True)
        for mode in ("rn", "chop"):
            for name, out in (("dense matmul", dense(a, w_round, mode)), ("mma 16-row", mma16(a, q, z, s, mode)),
                              ("swap", swapped(a, q, z, s, magic, mode))):
                rows.append({"dtype": str(dtype)[6:], "kernel": name, "model": mode, **errors(out, truth, dtype)})
                print(f"  {rows[-1]['dtype']:8s} {name:16s} {mode:4s}  max {rows[-1]['max_rel']:.2e}  "
                      f"rms {rows[-1]['rms_rel']:.2e}  (fp32 accumulator before the store: "
                      f"{rows[-1]['fp32_acc_max_rel']:.2e})", flush=True)
    return rows


def interpreted(m: int, n: int, k: int) -> list[dict]:
    """The real kernels under the Triton interpreter, fp16 (numpy fp32 matmuls: the ``rn`` model)."""
    os.environ["TRITON_INTERPRET"] = "1"
    from qoqopt.kernels.w4a16 import w4a16_matmul
    from qoqopt.packing import pack_gptq

    a, q, z, s = problem(m, n, k, torch.float16)
    truth = exact(a, q, z, s)
    qweight, qzeros = pack_gptq(q.int(), z.int())
    x, scales = a.half(), s.half()
    rows = [{"dtype": "float16", "kernel": "output rounding", "model": f"N={n}", **errors(truth, truth, torch.float16)}]
    print(f"  float16  {'output rounding':16s} N={n}  max {rows[-1]['max_rel']:.2e}  rms {rows[-1]['rms_rel']:.2e}")
    for name, tiles in (("mma 16-row", dict(KERNEL="mma", BLOCK_M=16, BLOCK_N=64, BLOCK_K=TILE)),
                        ("swap", dict(KERNEL="swap", BLOCK_N=64, BLOCK_K=TILE))):
        out = w4a16_matmul(x, qweight, qzeros, scales, bits=4, group_size=TILE, zero_offset=1, SPLIT_K=1,
                           num_warps=4, num_stages=2, **tiles)
        rows.append({"dtype": "float16", "kernel": name, "model": "triton interpreter",
                     **errors(out.double(), truth, torch.float16), "fp32_acc_max_rel": None})  # stored fp16
        print(f"  float16  {name:16s} interp  max {rows[-1]['max_rel']:.2e}  rms {rows[-1]['rms_rel']:.2e}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=16, help="activation rows (decode: at most 16)")
    parser.add_argument("--n", type=int, default=256, help="output columns sampled from the projection")
    parser.add_argument("--k", type=int, default=18944, help="K (the 7B's down projection: 18944)")
    parser.add_argument("--interp-n", type=int, default=64, help="columns for the interpreter check (0: skip)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.k % TILE or not 1 <= args.m <= 16:
        parser.error(f"--k must be a multiple of {TILE} and --m in 1..16")
    print(f"swapped-kernel accuracy, M={args.m} K={args.k} N={args.n}, errors relative to max |exact|:")
    rows = emulate(args.m, args.n, args.k)
    if args.interp_n:
        rows += interpreted(args.m, args.interp_n, args.k)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"m": args.m, "n": args.n, "k": args.k, "rows": rows}, indent=1) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
