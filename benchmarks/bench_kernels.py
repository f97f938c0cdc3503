"""Benchmark qoqopt.kernels against their peers at QoQ-Med-7B dimensions.

GPU (CUDA): times with ``triton.testing.do_bench`` (median, L2 flushed between reps), and again with
``do_bench_cudagraph`` (the call replayed from a CUDA graph: GPU time without host launch cost, as
in vLLM's and torch.compile's decode; the eager number stays the one judged)
  * patch merger (1280 -> 5120 -> 5120 -> 3584): the default "cublas" plan (one Triton norm pass,
    cuBLAS GEMMs; judged) and the "fused" one (one Triton fc1) vs transformers' eager module, with
    their max relative difference from it, the two cuBLAS GEMMs alone (no norm, no GELU: what
    the default plan would take were they free), each GEMM alone, and the "overlap" plan at 2 and 4
    row chunks (side by side, each on its own CUDA stream; not judged);
  * vision attention (16 heads x 80, up to 5120 patches, 64-patch windows and full attention):
    the patched module vs transformers' sdpa path per layer and per image (the tower's 28 windowed
    and 4 full-attention layers in turn: the judged row), and the core op (RoPE + attention) vs
    RoPE + ``torch.nn.attention.varlen`` and RoPE + flash-attn varlen when those are importable;
  * W4A16 (GPTQ v1, and AWQ as QuantLinear loads it: repacked to the GPTQ layout; group 128; held
    as ``apply`` leaves it: fragment words where they pay) vs bf16 ``F.linear`` at M = 1, 16, 128,
    2048 on the 7B LM shapes;
  * one decoder layer's 7 linears at M = 1 and 16 (a decode step's per-layer matmuls): bf16
    ``F.linear`` each, QuantLinear each, and QuantLinear with q/k/v and gate/up fused as ``apply``
    fuses them (4 launches; no target: the fusion's effect on launch-bound decode);
  * the whole 32-layer vision tower on a 5120-patch image, transformers' sdpa path vs ``apply``
    (no target: what the ops add up to, with the outputs' max relative difference).
Each row also gets a roofline floor, max(bytes / peak bandwidth, flops / peak bf16 FLOP/s), and
time / floor. Results go to ``--out`` as hardware-tagged JSON; a summary table prints last.

CPU (no GPU): the torch reference paths vs the eager peers at small sizes, so the harness itself is
exercised; every GPU target is reported as open.

    python benchmarks/bench_kernels.py --out results/bench_kernels.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import itertools
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qoqopt.bench.machine import cpu_model
from qoqopt.errors import QoqoptError
from qoqopt.fileio import atomic_write_text, file_in_the_way

# Peak HBM bandwidth (B/s) and dense bf16 tensor FLOP/s, from the vendors' data sheets.
PEAKS = (  # first match on the device name wins
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100", 3.35e12, 989e12),  # SXM
    ("A100-SXM4-80GB", 2.04e12, 312e12),
    ("A100", 1.56e12, 312e12),
)
TARGETS = {  # op -> (description, minimum speedup over the named peer; None: worst row recorded, not judged)
    # the default plan since the H200 run of 2026-11-30: the norm in one Triton pass, cuBLAS GEMMs
    "merger": ("merger (cublas plan) vs eager", 1.5),
    # the single Triton fc1 (norm and GELU inside), apply(merger="fused"); and the plan's two GEMMs
    # alone, on input normalised beforehand: what the plan would take were its norm and GELU free
    "merger/fused": ("merger, fused plan, vs eager (not judged)", None),
    "merger/gemms": ("merger's cuBLAS GEMMs alone vs eager (not judged)", None),
    # the cublas plan over 2 and 4 row chunks side by side, each on its own CUDA stream
    "merger/overlap": ("merger, overlap plan, vs eager (not judged)", None),
    # Per image, as the tower runs it: transformers' sdpa path loops over windows in the windowed
    # layers and makes one flash call in the full ones. Judged per image because at a full layer alone
    # 5x would be under that layer's own FLOP floor; the per-layer rows stay in the table.
    "attention/sdpa": ("vision attention per image vs hf sdpa path", 5.0),
    "attention/sdpa-layer": ("vision attention per layer vs hf sdpa (not judged)", None),
    "attention/varlen": ("vision attention core vs torch varlen (+RoPE)", 1.0),
    "w4a16/decode": ("W4A16 vs bf16 matmul, M <= 16", 2.5),
}


@dataclass(frozen=True)
class Profile:
    """Sizes of one run. "7b": QoQ-Med-7B dims (GPU). "tiny": the same code paths at small sizes."""

    vision_hidden: int
    merger_out: int
    merger_patches: tuple[int, ...]
    heads: int
    head_dim: int
    grids: tuple[tuple[int, int, int], ...]  # (t, h, w) in patches; 64 x 80 = 5120 = 1280*28*28 max pixels
    lm_shapes: tuple[tuple[int, int, str], ...]
    m_values: tuple[int, ...]
    group_size: int
    tower: tuple[int, int, tuple[int, ...]]  # vision depth, MLP width, full-attention block indexes
    decoder: tuple[int, int, int]  # LM hidden, k/v width, MLP width: one decoder layer's 7 linears


PROFILES = {
    "7b": Profile(1280, 3584, (5120, 1296, 256), 16, 80, ((1, 64, 80), (1, 36, 36)),
                  ((3584, 18944, "gate/up"), (18944, 3584, "down"), (3584, 3584, "q/o"), (3584, 512, "k/v")),
                  (1, 16, 128, 2048), 128, (32, 3420, (7, 15, 23, 31)), (3584, 512, 18944)),
    "tiny": Profile(64, 96, (256,), 2, 32, ((1, 16, 20),), ((256, 512, "small"),), (1, 16, 40), 64, (2, 64, (1,)),
                    (256, 128, 512)),
}


@dataclass
class Row:
    op: str
    case: str
    impl: str
    ms: float
    peer: str | None = None
    speedup: float | None = None  # peer ms / this ms
    floor_ms: float | None = None
    over_floor: float | None = None
    target: str | None = None  # TARGETS key this row is judged against
    extra: dict = field(default_factory=dict)
    # The same call replayed from a CUDA graph (as vLLM and torch.compile "reduce-overhead" decode):
    # host-side launch cost removed, so this is the GPU time alone. None where capture is impossible
    # (host syncs, e.g. transformers' sdpa vision path) or off the GPU.
    graph_ms: float | None = None
    graph_speedup: float | None = None


def wall_ms(fn, reps: int = 5) -> float:
    """Median wall time of ``fn`` after one warm-up call: the CPU's timing (no GPU to ask)."""
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def rtn_gptq_layer(weight: torch.Tensor, group_size: int):
    """A dense ``[N, K]`` weight quantized round-to-nearest, 4-bit, as a QuantLinear over GPTQ v1 words."""
    from qoqopt.kernels.w4a16 import QuantLinear
    from qoqopt.packing import pack_gptq, quantize_rtn

    intweight, zeros, scales = quantize_rtn(weight, 4, group_size)
    return QuantLinear.from_gptq(*pack_gptq(intweight, zeros), scales)


class Bench:
    def __init__(self, device: torch.device):
        from qoqopt.kernels._triton import interpreter_enabled

        self.device = device
        self.rows: list[Row] = []
        # Triton runs compiled on CUDA, or interpreted on the CPU when TRITON_INTERPRET=1 (a harness
        # check only: interpreter timings mean nothing). Otherwise the torch references are timed.
        self.triton = device.type == "cuda" or interpreter_enabled()
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
        peak = next(((bw, fl) for key, bw, fl in PEAKS if key in name), None) if device.type == "cuda" else None
        self.name, self.peak = name, peak
        # triton's do_bench flushes L2 before each timed call; its CUDA-graph replay does not, so a
        # weight that fits in L2 (50 MB on an H100/H200) would be timed warm there, as no decode
        # step finds it: each layer's weights come back after the other layers' have passed
        props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
        self.l2_bytes = getattr(props, "L2_cache_size", 0) if props is not None else 0
        self.after_row = lambda: None  # main() saves the JSON here: a run cut off mid-op keeps its rows

    def time_ms(self, fn) -> float:
        if self.device.type == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        return wall_ms(fn)

    def time_graph_ms(self, fn) -> float | None:
        if self.device.type != "cuda":
            return None
        import triton.testing

        try:
            with warnings.catch_warnings():  # torch warns of an empty graph before the capture fails
                warnings.filterwarnings("ignore", message="The CUDA Graph is empty")
                return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception:  # not capturable (a host sync inside): the eager time stands alone
            torch.cuda.synchronize()
            return None

    def floor_ms(self, bytes_moved: float, flops: float) -> float | None:
        if self.peak is None:
            return None
        bw, fl = self.peak
        return max(bytes_moved / bw, flops / fl) * 1e3

    def add(self, op, case, impl, fn, peer: Row | None = None, bytes_moved=0.0, flops=0.0, target=None) -> Row | None:
        try:
            with torch.inference_mode():
                ms = self.time_ms(fn)
                graph = self.time_graph_ms(fn)
        except Exception as err:  # a peer missing on this torch build is a result, not a crash
            print(f"  {op} {case} {impl}: unavailable ({type(err).__name__}: {str(err)[:120]})")
            return None
        floor = self.floor_ms(bytes_moved, flops) if bytes_moved or flops else None
        graph_speedup = peer.graph_ms / graph if peer and peer.graph_ms and graph else None
        row = Row(op, case, impl, ms, peer=peer.impl if peer else None,
                  speedup=(peer.ms / ms) if peer else None, floor_ms=floor,
                  over_floor=(ms / floor) if floor else None, target=target,
                  graph_ms=graph, graph_speedup=graph_speedup)  # fmt: skip
        self.rows.append(row)
        self.after_row()
        line = f"  {op:9s} {case:28s} {impl:18s} {ms:9.4f} ms" + (f"  x{row.speedup:.2f} vs {row.peer}" if peer else "")
        if graph is not None:
            line += f" | graph {graph:.4f} ms" + (f" x{graph_speedup:.2f}" if graph_speedup else "")
        print(line)
        return row


# ----------------------------------------------------------------------------- merger


def bench_merger(b: Bench, pr: Profile) -> None:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    from qoqopt.kernels.merger import FusedPatchMerger, patch_merger_overlap, patch_merger_reference

    dtype, triton_ok = b.dtype, b.triton
    ctx, out_dim, patch_counts = pr.vision_hidden, pr.merger_out, pr.merger_patches
    torch.manual_seed(0)
    hf = Qwen2_5_VLPatchMerger(dim=out_dim, context_dim=ctx).eval().to(b.device, dtype)
    fused = FusedPatchMerger.from_hf(hf, plan="fused")
    cublas = FusedPatchMerger.from_hf(hf)
    weights = (hf.ln_q.weight, hf.ln_q.variance_epsilon, hf.mlp[0].weight, hf.mlp[0].bias, hf.mlp[2].weight,
               hf.mlp[2].bias)
    plans = [("qoqopt norm+cuBLAS", cublas, "merger"), ("qoqopt-triton", fused, "merger/fused")]
    plans += [(f"qoqopt overlap x{n}", lambda x, n=n: patch_merger_overlap(x, *weights, chunks=n), "merger/overlap")
              for n in (2, 4)]
    hidden = 4 * ctx
    for p in patch_counts:
        x = torch.randn(p, ctx, device=b.device, dtype=dtype)
        m = p // 4
        size = dtype.itemsize
        bytes_moved = size * (p * ctx + hidden * hidden + hidden * out_dim + m * out_dim)
        flops = 2 * m * hidden * (hidden + out_dim)
        case = f"{p} patches"
        eager = b.add("merger", case, "hf-eager", lambda: hf(x), bytes_moved=bytes_moved, flops=flops)
        if triton_ok:
            with torch.inference_mode():
                theirs = hf(x)
            for impl, plan, target in plans:
                row = b.add("merger", case, impl, lambda plan=plan: plan(x), eager, bytes_moved, flops, target=target)
                if row is not None:  # each plan against transformers' module, in the run's dtype
                    with torch.inference_mode():
                        row.extra["max_rel_err"] = rel_err(plan(x), theirs)
                    print(f"  {'':9s} {case:28s} {impl:18s} max relative difference vs eager "
                          f"{row.extra['max_rel_err']:.2e} ({_short(dtype)})")
            with torch.inference_mode():
                normed = hf.ln_q(x).view(m, hidden)
            fc1, fc2 = hf.mlp[0], hf.mlp[2]
            b.add("merger", case, "cuBLAS fc1+fc2 only", lambda: F.linear(F.linear(normed, fc1.weight, fc1.bias),
                  fc2.weight, fc2.bias), eager, bytes_moved, flops, target="merger/gemms")
            with torch.inference_mode():
                h = F.gelu(fc1(normed))
            # each GEMM alone, for its time / floor: a GEMM that ends on a partly empty wave of tiles
            # sits further from its floor, and that share is what the overlap plan can win back
            for impl, a, linear in (("cuBLAS fc1 only", normed, fc1), ("cuBLAS fc2 only", h, fc2)):
                b.add("merger", case, impl, lambda a=a, linear=linear: F.linear(a, linear.weight, linear.bias),
                      bytes_moved=size * (a.numel() + linear.weight.numel() + m * linear.out_features),
                      flops=2 * a.numel() * linear.out_features)
        else:
            b.add("merger", case, "qoqopt-torch-ref", lambda: patch_merger_reference(x, *weights), eager)


# ----------------------------------------------------------------------------- vision attention


def _vision_config(pr: Profile, depth: int = 1, fullatt: tuple[int, ...] = (0,)):
    """The profile's vision tower as transformers configures it (112 px windows, 2x2 merge), sdpa path."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    config = Qwen2_5_VLVisionConfig(
        depth=depth, hidden_size=pr.vision_hidden, hidden_act="silu", intermediate_size=pr.tower[1],
        num_heads=pr.heads, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        tokens_per_second=2, window_size=112, out_hidden_size=pr.merger_out, fullatt_block_indexes=list(fullatt),
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


def _vision_inputs(b: Bench, pr: Profile, grid):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    dtype, heads, head_dim = b.dtype, pr.heads, pr.head_dim
    torch.manual_seed(0)
    attn = Qwen2_5_VLVisionAttention(_vision_config(pr)).eval().to(b.device, dtype)
    grid_thw = torch.tensor([grid])
    cu = {
        "windows": get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=112, patch_size=14)[1],
        "full": get_vision_cu_seqlens(grid_thw),
    }
    s = grid[0] * grid[1] * grid[2]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)))
    pos = torch.stack(torch.meshgrid(torch.arange(grid[1]), torch.arange(grid[2]), indexing="ij"), -1).view(-1, 2)
    freqs = (pos[..., None].float() * inv_freq).flatten(1)
    angles = torch.cat([freqs, freqs], dim=-1).to(b.device)
    x = torch.randn(s, heads * head_dim, device=b.device, dtype=dtype)
    return attn, {k: v.to(b.device, torch.int32) for k, v in cu.items()}, x, (angles.cos(), angles.sin())


def _rope_torch(qkv, cos, sin, heads):
    from qoqopt.kernels.vision_attention import rotate_half

    q, k, v = qkv.view(qkv.shape[0], 3, heads, -1).unbind(1)
    c, s_ = cos.unsqueeze(1), sin.unsqueeze(1)
    q = (q.float() * c + rotate_half(q.float()) * s_).to(qkv.dtype)
    k = (k.float() * c + rotate_half(k.float()) * s_).to(qkv.dtype)
    return q, k, v


def _varlen_peers():
    peers = {}
    try:
        from torch.nn.attention.varlen import varlen_attn

        peers["torch-varlen+rope"] = lambda q, k, v, cu, mx: varlen_attn(q, k, v, cu, cu, mx, mx)
    except ImportError:
        print("  torch.nn.attention.varlen: not in this torch")
    try:
        from flash_attn import flash_attn_varlen_func

        peers["flash-attn+rope"] = lambda q, k, v, cu, mx: flash_attn_varlen_func(q, k, v, cu, cu, mx, mx)
    except Exception:  # absent, or built for another torch
        print("  flash_attn: not importable")
    return peers


def bench_attention(b: Bench, pr: Profile) -> None:
    from qoqopt.kernels.vision_attention import (
        FusedVisionAttention,
        VarlenPlanCache,
        vision_attention,
        vision_attention_reference,
    )

    dtype, heads, head_dim = b.dtype, pr.heads, pr.head_dim
    for grid in pr.grids:
        attn, cus, x, rope = _vision_inputs(b, pr, grid)
        plans = VarlenPlanCache()
        fused = FusedVisionAttention.from_hf(attn, plans)
        s = x.shape[0]
        for mode, cu in cus.items():
            lens = (cu[1:] - cu[:-1]).tolist()
            max_len = max(lens)
            case = f"{s} patches, {mode}"
            # qkv in, out, and the packed half rotary table (cos + sin, fp16 for 16-bit inputs)
            table_bytes = (4 if dtype == torch.float32 else 2) * s * head_dim
            core_bytes = dtype.itemsize * (3 * s * heads * head_dim + s * heads * head_dim) + table_bytes
            core_flops, lin_flops = _attention_flops(pr, cu, s)
            hf_row = b.add("attention", case, "hf-sdpa-module", lambda: attn(x, cu, position_embeddings=rope),
                           flops=core_flops + lin_flops)
            if not b.triton:
                b.add("attention", case, "qoqopt-torch-ref",
                      lambda: attn.proj(vision_attention_reference(attn.qkv(x), *rope, cu, heads)), hf_row)
                continue
            b.add("attention", case, "qoqopt-module", lambda: fused(x, cu, position_embeddings=rope), hf_row,
                  flops=core_flops + lin_flops, target="attention/sdpa-layer")
            qkv = attn.qkv(x)
            fused(x, cu, position_embeddings=rope)  # builds the per-forward plan that every layer reuses
            core = lambda: vision_attention(qkv, *rope, cu, heads, plans, shared_halves=True)  # noqa: E731
            ours = b.add("attention", case, "qoqopt-core", core, bytes_moved=core_bytes, flops=core_flops)
            q, k, v = _rope_torch(qkv, *rope, heads)
            for name, peer in _varlen_peers().items():
                def run(peer=peer):
                    return peer(*_rope_torch(qkv, *rope, heads), cu, max_len)
                # for reference: the peer alone, as if RoPE were free
                b.add("attention", case, name.replace("+rope", " (no rope)"), lambda peer=peer: peer(q, k, v, cu, max_len),
                      bytes_moved=core_bytes, flops=core_flops)
                row = b.add("attention", case, name, run, bytes_moved=core_bytes, flops=core_flops)
                if row and ours and name.startswith("torch-varlen"):
                    b.rows.append(Row("attention", case, "qoqopt-core", ours.ms, peer=name, speedup=row.ms / ours.ms,
                                      floor_ms=ours.floor_ms, over_floor=ours.over_floor, target="attention/varlen"))
                    print(f"  {'':9s} {case:28s} {'qoqopt-core':18s} x{row.ms / ours.ms:.2f} vs {name}")
        _bench_attention_per_image(b, pr, attn, fused, cus, x, rope)


def _attention_flops(pr: Profile, cu: torch.Tensor, s: int) -> tuple[int, int]:
    """(attention core, qkv + proj linears) FLOPs of one layer over ``s`` patches in segments ``cu``."""
    width = pr.heads * pr.head_dim
    core = 4 * width * int((cu[1:] - cu[:-1]).pow(2).sum())
    return core, 2 * s * width**2 * 4  # qkv (3x) + proj (1x)


def _bench_attention_per_image(b: Bench, pr: Profile, attn, fused, cus, x, rope) -> None:
    """One image through the tower's attention layers (the 7B: 28 windowed, 4 full), each module
    called as the tower calls it: the judged row of the sdpa target."""
    depth, full = pr.tower[0], len(pr.tower[2])
    layers = [cus["windows"]] * (depth - full) + [cus["full"]] * full
    case = f"{x.shape[0]} patches, per image"
    per_layer = {mode: sum(_attention_flops(pr, cu, x.shape[0])) for mode, cu in cus.items()}
    flops = (depth - full) * per_layer["windows"] + full * per_layer["full"]

    def through(module):
        def run():
            for cu in layers:
                module(x, cu, position_embeddings=rope)
        return run

    hf_row = b.add("attention", case, "hf-sdpa-module", through(attn), flops=flops)
    if b.triton:
        b.add("attention", case, "qoqopt-module", through(fused), hf_row, flops=flops, target="attention/sdpa")
        print(f"  {'':9s} {case:28s} = {depth - full} windowed + {full} full-attention layers")


# ----------------------------------------------------------------------------- W4A16


def rel_err(out: torch.Tensor, ref: torch.Tensor, rms: bool = False) -> float:
    """max (or rms) |out - ref| / max |ref|, in float64: comparable across configs, kernels and dtypes."""
    diff = (out.double() - ref.double()).abs()
    return ((diff.pow(2).mean().sqrt() if rms else diff.max()) / ref.double().abs().max()).item()


def _short(dtype: torch.dtype) -> str:
    return str(dtype)[6:]


def _dense_name(dtype: torch.dtype) -> str:
    return "bf16-matmul" if dtype == torch.bfloat16 else f"{_short(dtype)}-matmul"


def weight_copies(nbytes: float, l2_bytes: int, most: int = 64) -> int:
    """How many copies of a weight of ``nbytes`` a timed call cycles through so that each call reads
    its weight from memory, not from L2 (together at least twice L2; 1 where L2 is unknown)."""
    return max(1, min(most, math.ceil(2 * l2_bytes / nbytes))) if l2_bytes else 1


def cycling(calls: list) -> Callable[[], object]:
    """``() -> result`` of the next of ``calls`` each time: captured in a CUDA graph, a replay runs
    them in turn."""
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def bench_w4a16(b: Bench, pr: Profile) -> None:
    from qoqopt.kernels.w4a16 import QuantLinear, w4a16_reference
    from qoqopt.packing import pack_awq, pack_gptq, quantize_rtn

    dtype, gs = b.dtype, pr.group_size
    dense_name = _dense_name(dtype)
    for k, n, label in pr.lm_shapes:
        torch.manual_seed(0)
        weight = (torch.randn(n, k, device=b.device) * 0.02).to(dtype)
        intweight, zeros, scales = quantize_rtn(weight, 4, gs)
        layers = {
            "gptq": QuantLinear.from_gptq(*pack_gptq(intweight, zeros), scales),
            "awq": QuantLinear.from_awq(*pack_awq(intweight, zeros), scales),
        }
        del intweight, zeros
        if b.triton:  # as apply() leaves them by default: fragment words where they fit and pay
            for layer in layers.values():
                layer.use_fragment_words(only_where_faster=True)
        q_bytes = k * n / 2 + (k // gs) * n * 2.5
        # cold weights, as in a decode step (see Bench.l2_bytes); activations stay hot, as they do
        weights = [weight] + [weight.clone() for _ in range(weight_copies(dtype.itemsize * k * n, b.l2_bytes) - 1)]
        copies = weight_copies(q_bytes, b.l2_bytes)
        rotations = {layout: [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)] for layout, layer in layers.items()}
        for m in pr.m_values:
            x = torch.randn(m, k, device=b.device, dtype=dtype)
            case = f"{label} {k}->{n} M={m}"
            io_bytes = dtype.itemsize * (m * k + m * n)
            flops = 2 * m * k * n
            dense = b.add("w4a16", case, dense_name, cycling([functools.partial(F.linear, x, w) for w in weights]),
                          bytes_moved=dtype.itemsize * k * n + io_bytes, flops=flops)
            if dense is not None:
                dense.extra["weight_copies"] = len(weights)
            target = "w4a16/decode" if m <= 16 else None
            for layout, layer in layers.items():
                if b.triton:
                    run = cycling([functools.partial(copy_, x) for copy_ in rotations[layout]])
                    row = b.add("w4a16", case, f"qoqopt-{layout}", run, dense, q_bytes + io_bytes, flops, target)
                    if row is not None:
                        row.extra |= {"words": layer.words, "weight_copies": len(rotations[layout])}
                else:
                    b.add("w4a16", case, f"{layout}-torch-ref",
                          lambda: w4a16_reference(x, layer.qweight, layer.qzeros, layer.scales, **layer._kwargs()), dense)


# ----------------------------------------------------------------------------- one decoder layer

DECODER_LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def _decoder_layer(pr: Profile, dtype, device) -> dict[str, nn.Module]:
    """Attention and MLP holders with one 7B decoder layer's projections as QuantLinear (RTN, GPTQ
    layout), plus the dense weights they came from."""
    hidden, kv, inter = pr.decoder
    shapes = dict(q_proj=(hidden, hidden), k_proj=(hidden, kv), v_proj=(hidden, kv), o_proj=(hidden, hidden),
                  gate_proj=(hidden, inter), up_proj=(hidden, inter), down_proj=(inter, hidden))
    parts, dense = {}, {}
    torch.manual_seed(0)
    for parent, names in DECODER_LINEARS.items():
        parts[parent] = nn.Module()
        for name in names:
            k, n = shapes[name]
            dense[name] = (torch.randn(n, k, device=device) * 0.02).to(dtype)
            setattr(parts[parent], name, rtn_gptq_layer(dense[name], pr.group_size))
    return dict(parts, dense=dense)


def fused_copy(holders: dict[str, nn.Module], fragment_words: bool = False) -> dict[str, nn.Module]:
    """A copy of :func:`_decoder_layer`'s holders with q/k/v and gate/up fused as ``apply`` fuses them,
    and with ``fragment_words`` every layer repacked as ``apply(w4a16_words="fragments")`` does."""
    from qoqopt.kernels.fused_projections import fuse_projections
    from qoqopt.kernels.w4a16 import QuantLinear

    fused = {parent: copy.deepcopy(holders[parent]) for parent in DECODER_LINEARS}
    for holder in fused.values():
        fuse_projections(holder)
        layers = [m for m in holder.modules() if isinstance(m, QuantLinear)] if fragment_words else []
        assert all(layer.use_fragment_words() for layer in layers), "a 7B layer that does not fit fragment words"
    return fused


def layer_inputs(pr: Profile, m: int, dtype, device) -> dict[str, torch.Tensor]:
    """Each projection's input: q, k, v and gate, up read the same tensor, as in transformers."""
    hidden, _, inter = pr.decoder
    x, a, h = (torch.randn(m, width, device=device, dtype=dtype) for width in (hidden, hidden, inter))
    return dict(q_proj=x, k_proj=x, v_proj=x, o_proj=a, gate_proj=x, up_proj=x, down_proj=h)


def layer_calls(holders: dict[str, nn.Module], inputs: dict[str, torch.Tensor]):
    """``() -> outputs`` calling the 7 projections by name, in transformers' order (fused holders
    answer q/k/v and gate/up from slices of the shared output)."""
    calls = [(holders[parent].get_submodule(name), inputs[name])
             for parent in DECODER_LINEARS for name in DECODER_LINEARS[parent]]
    return lambda: [layer(inp) for layer, inp in calls]


def bench_decoder_layer(b: Bench, pr: Profile) -> None:
    """A decode step's matmuls for one layer, called as transformers calls them (attention output
    and MLP activation stood in by random tensors)."""
    dtype, dev = b.dtype, b.device
    unfused = _decoder_layer(pr, dtype, dev)
    fused = fused_copy(unfused)
    # on a GPU only: the interpreter's profile quantizes in groups of 64, which fragment words cannot hold
    fragments = fused_copy(unfused, fragment_words=True) if b.triton and dev.type == "cuda" else None
    dense = unfused["dense"]
    q_bytes = sum(w.numel() / 2 + w.numel() / pr.group_size * 2.5 for w in dense.values())
    for m in (1, 16):
        inputs = layer_inputs(pr, m, dtype, dev)
        case = f"7 linears M={m}"
        flops = 2 * m * sum(w.numel() for w in dense.values())
        peer = b.add("layer", case, f"{_dense_name(dtype)} x7", lambda: [F.linear(inputs[n], w) for n, w in dense.items()],
                     bytes_moved=dtype.itemsize * sum(w.numel() for w in dense.values()), flops=flops)
        impl = "qoqopt" if b.triton else "torch-ref"  # QuantLinear falls back by itself
        variants = [(f"{impl} x7 gptq words", unfused), (f"{impl} fused x4 gptq words", fused)]
        if fragments is not None:  # apply()'s default: every 7B layer fits fragment words
            variants.append((f"{impl} fused x4 fragment words", fragments))
        for impl, holders in variants:
            b.add("layer", case, impl, layer_calls(holders, inputs), peer, q_bytes, flops)


# ----------------------------------------------------------------------------- whole vision tower


def bench_tower(b: Bench, pr: Profile) -> None:
    """The whole vision tower on the largest image, transformers' sdpa path vs the same model after
    ``apply``: what a clinical request pays before the language model sees a token. No target; the
    rows say what the per-op speedups add up to, and extra.max_rel_err how far the outputs drift."""

    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from qoqopt.kernels import apply

    depth, _, fullatt = pr.tower
    config = _vision_config(pr, depth, fullatt)
    torch.manual_seed(0)
    with torch.device(b.device):  # random init straight on the device (~1.3 GB of bf16 at 7B dims)
        hf = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=b.dtype).eval()
    ours = copy.deepcopy(hf)
    report = apply(ours)
    print(f"  {report}")
    grid = max(pr.grids, key=lambda g: g[0] * g[1] * g[2])
    s = grid[0] * grid[1] * grid[2]
    pixels = torch.randn(s, 3 * 2 * 14 * 14, device=b.device, dtype=b.dtype)
    grid_thw = torch.tensor([grid], device=b.device)

    def run(model):
        return lambda: model(pixels, grid_thw=grid_thw).pooler_output

    case = f"{s} patches, {depth} layers"
    hf_row = b.add("tower", case, "hf-sdpa", run(hf))
    row = b.add("tower", case, f"qoqopt-{report.backend}", run(ours), hf_row)
    if row is not None:
        _tower_drift(row, hf, ours, pixels, grid_thw, case, b.dtype)
    del hf, ours


def _fp32_output(hf, pixels, grid_thw) -> torch.Tensor:
    """transformers' tower in exact fp32: a copy (the bf16 model's fp32 buffers stay as they are), and
    cuDNN kept off TF32 for its Conv3d patch embedding (torch's default would let it round)."""
    exact = copy.deepcopy(hf).float()
    allow = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return exact(pixels.float(), grid_thw=grid_thw).pooler_output
    finally:
        torch.backends.cudnn.allow_tf32 = allow
        del exact


def _tower_drift(row: Row, hf, ours, pixels, grid_thw, case: str, dtype: torch.dtype) -> None:
    """How far the patched tower's output is from transformers' in the same dtype, and how far each is
    from transformers in fp32: bf16 alone drifts over 32 layers, so the second pair says whether the
    kernels add to that or not."""
    with torch.inference_mode():
        theirs = hf(pixels, grid_thw=grid_thw).pooler_output.float()
        out = ours(pixels, grid_thw=grid_thw).pooler_output.float()
        row.extra["max_rel_err"] = rel_err(out, theirs)
        if dtype != torch.float32:
            row.extra["vs_fp32"] = {"ours": rel_err(out, exact := _fp32_output(hf, pixels, grid_thw)),
                                    "transformers": rel_err(theirs, exact)}
    line = f"  {'':9s} {case:28s} max relative difference {row.extra['max_rel_err']:.2e} ({_short(dtype)})"
    if "vs_fp32" in row.extra:
        line += " | each vs transformers fp32: ours {ours:.2e}, transformers {transformers:.2e}".format(**row.extra["vs_fp32"])
    print(line)


# ----------------------------------------------------------------------------- config sweep


# Decode over fragment words (KERNEL="frag", session 22; apply()'s default since session 26): weights repacked at load so that each
# thread's words hold its MMA B fragments; every word becomes four registers of two q - z by one asm
# block, and the dot takes them as they are (no shared-memory pass of dequantized weights). sm_90 SASS
# per weight at gate/up, Triton 3.6: 2.60 at 128 wide and 4 warps, 2.72 at 64 wide and 2 (3.9: 2.57,
# 2.69), against 6.49 for the default 16-row tile, 5.41 for JOIN_FIELDS and 4.88 for the one-row GEMV;
# tried at M = 1 as well. benchmarks/tune_w4a16.py searches their tiles, stages and splits per GPU
# Session 28: the 128-wide tile with each K step as two 64-row dots (DOT_K=64) holds half the
# dequantized B registers at a time: 96 registers a thread instead of 126-128, so 5 programs an SM
# instead of 4, at the same K-loop instructions (sm_90, Triton 3.6: every 7B decode launch; 3.9: the
# split ones, 104 unsplit)
FRAGMENT_DECODE = [dict(KERNEL="frag", BLOCK_N=bn, num_warps=w, num_stages=3, **depth)
                   for bn, w, depth in ((128, 4, {}), (64, 2, {}), (128, 4, dict(DOT_K=64)))]
# Prefill over the same words (FRAGMENTS=True, 128-deep K steps: one block), beside GPTQ words at the same
# tiles: if fragments win decode, one layout must serve both. sm_90 SASS per weight, Triton 3.6, gate/up:
# 6.45 at 128 x 128 x 128 against 6.55 for GPTQ words (8.09 at the default's 64-deep steps), 7.53 at
# 256 x 128 x 128 against 7.72 (9.12); no spill under 3.6 (3.9 spills 80 and 8 B at 256 rows)
FRAGMENT_PREFILL_128 = [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, **f)
                        for f in ({}, dict(FRAGMENTS=True))]

# Launcher overrides tried by --sweep, each case's default first (the defaults live in each op's _config
# function and follow the H200 sweeps of 2026-11-29 and -30, h200_kernels.json; configs that lost
# clearly there are gone, to keep gpu_check's benchmark step inside its time limit).
SWEEP = {
    # 5120 patches (default: 128 x 128 x 64 at 8 warps, 4 stages): the runner-up tiles and a deeper pipeline.
    # TMA (session 21, untimed): A and W tiles copied by the tensor memory accelerator from host
    # descriptors instead of cp.async: sm_90 SASS per K step 115 -> 98 instructions, 185 -> 149
    # registers at the default tile (Triton 3.9; 3.6: 109 -> 99); 169 us is 400 TFLOP/s, and 1.5x
    # eager needs cuBLAS-class fc1
    "merger": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, num_warps=w, num_stages=st)
               for bm, bn, w, st in ((64, 128, 4, 4), (128, 128, 8, 3), (128, 64, 4, 4), (128, 128, 8, 5))]
              + [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=st, TMA=True) for st in (4, 3)]
              # one accumulator rescaled between slots (session 22, untimed): 185 -> 127 registers
              # (Triton 3.6), so 3-stage programs fit two to an SM
              + [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=st, RESCALE=True, **tma)
                 for st, tma in ((4, {}), (3, {}), (4, dict(TMA=True)))],
    # 1296 patches, 324 merged rows (default: 64 x 128 x 64, 4 warps, 4 stages). Split over K by patch
    # slots (2026-11-30, untimed): 128-row tiles read each weight tile from L2 3 times instead of 6,
    # and two slots a split keep the default's 240 programs
    "merger-mid": [dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=64, num_warps=w, num_stages=st)
                   for bm, w, st in ((128, 8, 4), (64, 4, 3))]
                  + [dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=64, num_warps=w, num_stages=4, SPLIT_K=2)
                     for bm, w in ((128, 8), (64, 4))]
                  + [dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4, TMA=True)]
                  + [dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=64, num_warps=w, num_stages=4, RESCALE=True)
                     for bm, w in ((64, 4), (128, 8))],
    # 256 patches, 64 merged rows (default: 64 x 32 x 128, 4 stages: 160 programs of 40 K steps, each
    # reading all of A, 16 KB of A for 8 KB of weight per step; every tile shape ran 41-50 us). Split
    # over K by patch slots (untimed): wider tiles read A a quarter as often for the same programs
    "merger-small": [dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=4)
                     for bn, bk in ((64, 64), (16, 128), (32, 64))]
                    + [dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=4, SPLIT_K=sk)
                       for bn, bk, sk in ((128, 64, 4), (64, 128, 4), (32, 128, 2))]
                    + [dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4, TMA=True),
                       dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4, SPLIT_K=4, TMA=True)],
    # each mode's default and runner-up (H200 2026-11-30, graph: windows 64 x 32 28.8 us, 64 x 64 33.9;
    # full 128 x 128 775 us, 128 x 64 at 3 stages 822); 128 x 64 at 2 stages, beaten in both modes
    # (57 us, 880 us), is gone to make room for session 21's rows
    "attention": [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
                  for bm, bn, w, st in ((64, 32, 4, 2), (64, 64, 4, 2), (128, 128, 8, 2), (128, 64, 8, 3))],
    # One row. The default 128 x 128 tile puts its 4 warps on different word rows, so the per-column
    # scale and zero (loaded one column per thread) reach the tile's layout through shared memory, and
    # each K step's row sum crosses warps: 14 barriers per K step (sm_90 SASS, Triton 3.9), and 64-deep
    # K steps (twice the barriers per weight) ran 40 us against 27.7 at gate/up (H200, 2026-11-30).
    # Tiles as wide as the warps' columns (512 at 4 warps, 256 at 2) give each warp its own columns and
    # each thread all the tile's rows: no barrier, no shared memory in the loop, 4.38 instructions per
    # weight against the default's 4.88 (Triton 3.6; 3.9: 4.27 against 4.64), 128 registers at 64-deep
    # K steps. With 7 such tiles at down the
    # split is 74 ways: partials summed 8 at a time (the defaults' 3-18 splits are unrolled already).
    # The last config fixes the split at 19 (down: 133 programs, one wave of 16-step splits, against
    # its automatic 74; gate/up: 19 splits of 3 steps, against 14). 128-deep wide tiles are out: 254 registers and a 24-byte spill under
    # Triton 3.6 since session 21's field extraction. Untimed (no GPU in sessions 20 and 21)
    "w4a16-gemv": [dict(BLOCK_N=bn, BLOCK_K=64, num_warps=w, num_stages=3, REDUCE_UNROLL=8)
                   for bn, w in ((512, 4), (256, 2))]
                  + [dict(BLOCK_N=512, BLOCK_K=64, num_warps=4, num_stages=3, SPLIT_K=19, REDUCE_UNROLL=8)]
                  + FRAGMENT_DECODE,
    # 16 rows: 64- and 128-wide tiles both (the default picks by layer width), and shallower K tiles.
    # JOIN_FIELDS (2026-11-30, untimed), at both widths (each layer's default is one of them): the tile
    # built by joins, two fields per masked word, as the prefill tiles do; the default stores one 16-bit weight at a time to shared memory (sm_90 SASS
    # per K step at gate/up, Triton 3.6: 17 stores against 129, 5.41 instructions per weight against
    # 6.49, 128 registers against 168; Triton 3.9: 3.91 against 5.41)
    "w4a16": [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st)
              for bn, bk, st in ((64, 128, 3), (128, 128, 3), (64, 64, 4), (128, 64, 4))]
             + [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, num_warps=4, num_stages=3, JOIN_FIELDS=True) for bn in (64, 128)]
             + FRAGMENT_DECODE,
    # 128-row tiles ran 19-26% slower on the H200 of 2026-11-30 than on 2026-11-29 (gate/up at M = 128:
    # 113 against 95 us; at M = 2048: 1.00 against 0.80 ms). They now take 130 registers a thread
    # (Triton 3.6; 128 before), so one program per SM instead of two. Capped at 128 (sass_report: no
    # spill under 3.6, 8.81 instructions per weight against 8.31), split in two, or 64-row tiles
    # The default from 128 rows on a GPU is the dense plan (dequantize, then cuBLAS; untimed when
    # written): "mma" is the tile default it replaced, "densefrag" the same plan over fragment words
    "w4a16-mid": [dict(KERNEL="mma"), dict(KERNEL="dense", FRAGMENTS=True), dict(maxnreg=128), dict(SPLIT_K=2),
                  dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)]
                 + FRAGMENT_PREFILL_128,
    # q/o and k/v at M = 128 (2026-11-30, H200 graph replay: 28 and 23 us against bf16's 8.5 and 7):
    # 128 x 128 tiles leave 28 and 4 output tiles, split 4 and 14 ways, and the last split of each
    # tile sums all partials alone (64 KB each), one at a time. Smaller tiles split less; fewer splits;
    # or two partials loaded at once
    "w4a16-narrow": [dict(KERNEL="mma")]
                    + [dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=64, num_warps=4, num_stages=4) for bn in (128, 64)]
                    + [dict(SPLIT_K=4), dict(SPLIT_K=2), dict(REDUCE_UNROLL=2)],
    "w4a16-prefill": [dict(KERNEL="mma"), dict(KERNEL="dense", FRAGMENTS=True)]
                     + [dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3) for bm in (256, 128)]
                     + [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, maxnreg=128)]
                     + FRAGMENT_PREFILL_128 + [dict(BLOCK_K=128), dict(KERNEL="mma", FRAGMENTS=True)],
}


def config_tag(cfg: dict) -> str:
    short = {"BLOCK_M": "m", "BLOCK_N": "n", "BLOCK_K": "k", "num_warps": "w", "num_stages": "s", "SPLIT_K": "sk",
             "maxnreg": "r", "REDUCE_UNROLL": "u", "JOIN_FIELDS": "j", "TMA": "tma", "KERNEL": "", "RESCALE": "rs",
             "FRAGMENTS": "frag", "DOT_K": "d"}
    # a key not listed here fails loudly; a flag set is its letter alone
    return "".join(short[k] + ("" if v is True else str(v)) for k, v in cfg.items())


def heavy_tailed(m: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """fp32 ``[m, k]`` activations with per-channel log-normal spread and 8 channels 40x larger, as
    SwiGLU outputs (the down projection's input) have: where fp32 accumulation loses most."""
    a = torch.randn(m, k, generator=generator) * torch.exp(0.7 * torch.randn(k, generator=generator))
    a[:, torch.randperm(k, generator=generator)[:8]] *= 40.0
    return a


def sweep_w4a16(b: Bench, pr: Profile) -> None:
    """Tile configs beside the default at each benchmarked M, each with its error against the
    exact product on :func:`heavy_tailed` activations: the W4A16 defaults are decided from these rows.
    One copy of each weight: under graph replay a weight that fits in L2 stays there, so these rows
    compare configs with each other; the judged rows (cold weights) compare with bf16.
    At bf16 the store's rounding hides accumulation error, so the decode defaults are also checked in
    fp16, and every config is counted by how many outputs differ from the default's."""
    from qoqopt.kernels.w4a16 import dequantize_weight, reads_fragment_words
    from qoqopt.packing import FRAGMENT_K, gptq_to_fragments

    dtype, dev = b.dtype, b.device
    g = torch.Generator().manual_seed(0)
    for i, (k, n, label) in enumerate(pr.lm_shapes):
        narrow = i >= 2  # q/o and k/v, after gate/up and down
        layer = rtn_gptq_layer(torch.randn(n, k, device=dev) * 0.02, pr.group_size)
        w_exact = dequantize_weight(layer.qweight, layer.qzeros, layer.scales, **layer._kwargs()).double()
        # the words each config's kernel reads: GPTQ's, or repacked once a shape (K is whole 128-row blocks
        # at every 7B shape; elsewhere the plan refuses fragment configs, inside the timed call)
        words = {False: layer.qweight, True: gptq_to_fragments(layer.qweight) if k % FRAGMENT_K == 0 else None}
        for m in w4a16_swept_ms(pr, narrow):
            xs = {dt: heavy_tailed(m, k, g).to(dev, dt) for dt in ((dtype, torch.float16) if m <= 16 else (dtype,))}
            exact = {dt: x.double() @ w_exact for dt, x in xs.items()}
            case = f"w4a16 gptq {label} M={m}"
            floor = {f"{_short(dt)}_store": rel_err(e.to(dt), e) for dt, e in exact.items()}  # rounding alone
            floor["dense"] = rel_err(F.linear(xs[dtype], w_exact.t().to(dtype)), exact[dtype])
            default_out, planned = None, []
            # the default first: the configs' times and errors read against it in the same run
            for cfg in [{}] + w4a16_sweep_configs(m, narrow):
                if (plan := _plan(layer, m, xs[dtype], cfg)) is not None and plan in planned:
                    continue  # the default's own launch under its name: timed once
                planned.append(plan)
                run = _bound_w4a16(layer, xs[dtype], cfg, words[reads_fragment_words(cfg)])
                if not (row := b.add("sweep", case, config_tag(cfg) or "default", run)):
                    continue
                out = run()
                default_out = out if default_out is None else default_out
                row.extra |= {"max_rel_err": rel_err(out, exact[dtype]), "rms_rel_err": rel_err(out, exact[dtype], rms=True),
                              "differs_from_default": (out != default_out).float().mean().item(), **floor}
                if torch.float16 in xs and not cfg:  # not timed: the accumulation error bf16 would hide
                    out16 = _bound_w4a16(layer, xs[torch.float16], cfg, layer.qweight)()
                    row.extra["fp16_max_rel_err"] = rel_err(out16, exact[torch.float16])
                print(f"  {'':9s} {case:28s} {row.impl:18s} " + _accuracy_line(row.extra, _short(dtype)))


def w4a16_swept_ms(pr: Profile, narrow: bool) -> list[int]:
    """Gate/up and down (the 7B's widest N and deepest K) at every M; the narrow q/o and k/v only
    between decode and 512 rows, where few output tiles leave the default splitting K deepest."""
    return [m for m in pr.m_values if 16 < m < 512] if narrow else list(pr.m_values)


def w4a16_sweep_configs(m: int, narrow: bool) -> list[dict]:
    """The configs timed beside the default at ``m`` rows."""
    return SWEEP["w4a16-gemv" if m == 1 else "w4a16" if m <= 16 else "w4a16-narrow" if narrow
                 else "w4a16-mid" if m < 512 else "w4a16-prefill"]


def _accuracy_line(e: dict, name: str) -> str:
    line = (f"max rel err {e['max_rel_err']:.2e} (store {e[name + '_store']:.2e}, dense {e['dense']:.2e}), "
            f"rms {e['rms_rel_err']:.2e}, {100 * e['differs_from_default']:.1f}% differ from default")
    if "fp16_max_rel_err" in e:
        line += f" | fp16 max {e['fp16_max_rel_err']:.2e} (store {e['float16_store']:.2e})"
    return line


def sweep_merger(b: Bench, pr: Profile) -> None:
    """fc1 tile configs beside the default at each image size (largest, middle, smallest)."""
    from qoqopt.kernels.merger import fold_norm_weight, merger_fc1

    dtype, dev = b.dtype, b.device
    ctx, p = pr.vision_hidden, max(pr.merger_patches)
    x = torch.randn(p, ctx, device=dev, dtype=dtype)
    ln = torch.ones(ctx, device=dev, dtype=dtype)
    w1 = torch.randn(4 * ctx, 4 * ctx, device=dev, dtype=dtype) * 0.02
    b1 = torch.zeros(4 * ctx, device=dev, dtype=dtype)
    w1_folded = fold_norm_weight(w1, ln)
    sizes = sorted(set(pr.merger_patches), reverse=True)
    for patches in sizes:
        xs = x[:patches]
        configs = SWEEP["merger" if patches == sizes[0] else "merger-small" if patches == sizes[-1] else "merger-mid"]
        case, default_out = f"merger fc1 {patches} patches", None
        for cfg in [{}] + configs:  # the default first; every config's output is checked against it
            run = functools.partial(merger_fc1, xs, 1e-6, w1_folded, b1, **cfg)
            if row := b.add("sweep", case, config_tag(cfg) or "default", run):
                out = run()
                default_out = out if default_out is None else default_out
                row.extra["max_rel_diff_vs_default"] = rel_err(out, default_out)
                print(f"  {'':9s} {case:28s} {row.impl:18s} max rel diff vs default {row.extra['max_rel_diff_vs_default']:.2e}")


def sweep_attention(b: Bench, pr: Profile) -> None:
    """Tile configs of window and full attention at the first grid."""
    from qoqopt.kernels.vision_attention import VarlenPlanCache, vision_attention

    attn, cus, xa, rope = _vision_inputs(b, pr, pr.grids[0])
    qkv = attn.qkv(xa)
    for mode, cu in cus.items():
        for cfg in SWEEP["attention"]:
            plans = VarlenPlanCache()
            b.add("sweep", f"attention {mode}", config_tag(cfg),
                  lambda: vision_attention(qkv, *rope, cu, pr.heads, plans, shared_halves=True, **cfg))


def _plan(layer, m: int, x, cfg: dict):
    """The launch ``cfg`` makes for ``m`` rows, or None where it does not fit the layer (the sweep
    then reports the failure from the timed call)."""
    from qoqopt.errors import QoqoptError
    from qoqopt.kernels.w4a16 import launch_plan

    try:
        return launch_plan(m, layer.out_features, layer.in_features, has_bias=False, dtype=x.dtype, device=x.device,
                           **layer._kwargs(), **cfg)
    except (AssertionError, QoqoptError):
        return None


def _bound_w4a16(layer, x, cfg, qweight):
    """The layer's launch under ``cfg`` over ``qweight`` (the layer's, or its fragment words), bound on
    first call as QuantLinear binds its own (a config that does not fit the layer fails inside the
    timed call, where the sweep reports it)."""
    from qoqopt.kernels.w4a16 import prepare_w4a16

    launch = None

    def run():
        nonlocal launch
        if launch is None:
            launch = prepare_w4a16(x.shape[0], layer.in_features, layer.out_features, x.dtype, x.device,
                                   has_bias=False, **layer._kwargs(), **cfg)
        return launch(x, qweight, layer.qzeros, layer.scales)

    return run


# ----------------------------------------------------------------------------- report


def hardware(b: Bench) -> dict:
    info = {
        "device": b.name, "device_type": b.device.type, "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "platform": platform.platform(),
    }  # fmt: skip
    for mod in ("triton", "transformers", "flash_attn"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # absent, or a broken binary extension
            info[mod] = None
    if b.device.type == "cuda":
        props = torch.cuda.get_device_properties(b.device)
        info.update(memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = None
    info["peak_bw_TBps"], info["peak_bf16_TFLOPs"] = (b.peak[0] / 1e12, b.peak[1] / 1e12) if b.peak else (None, None)
    from qoqopt.kernels.tuning import tables_for

    info["w4a16_tuning"] = [str(path) for path in tables_for(b.device)]  # the decode launches' tables, if any
    return info


def verdicts(b: Bench) -> dict:
    out = {}
    for key, (what, minimum) in TARGETS.items():
        rows = [r for r in b.rows if r.target == key and r.speedup is not None]
        if b.device.type != "cuda" or not rows:
            status = "open (no GPU run)" if b.device.type != "cuda" else "open (no data)"
            out[key] = dict(what=what, target=minimum, status=status)
            continue
        worst = min(rows, key=lambda r: r.speedup)
        out[key] = dict(what=what, target=minimum, worst=round(worst.speedup, 3), worst_case=f"{worst.case} vs {worst.peer}",
                        status=_judge(worst.speedup, minimum))
        graphed = [r for r in rows if r.graph_speedup is not None]
        if graphed:  # reported beside the eager verdict, which stays the one judged
            g = min(graphed, key=lambda r: r.graph_speedup)
            out[key] |= dict(worst_graph=round(g.graph_speedup, 3), worst_graph_case=f"{g.case} vs {g.peer}",
                             status_graph=_judge(g.graph_speedup, minimum))
    return out


def _judge(speedup: float, minimum: float | None) -> str:
    return "recorded" if minimum is None else "met" if speedup >= minimum else "NOT met"


def print_table(b: Bench, verdict: dict) -> None:
    print(f"\n== qoqopt kernel benchmark on {b.name} ==")
    print(f"{'op':9s} {'case':30s} {'impl':18s} {'ms':>9s} {'speedup':>14s} {'floor ms':>9s} {'t/floor':>7s} "
          f"{'graph ms':>9s} {'graph x':>8s}")
    for r in b.rows:
        sp = f"x{r.speedup:.2f}" if r.speedup is not None else ""
        fl = f"{r.floor_ms:.4f}" if r.floor_ms else "-"
        of = f"{r.over_floor:.1f}" if r.over_floor else "-"
        gm = f"{r.graph_ms:.4f}" if r.graph_ms else "-"
        gs = f"x{r.graph_speedup:.2f}" if r.graph_speedup else ""
        print(f"{r.op:9s} {r.case:30s} {r.impl:18s} {r.ms:9.4f} {sp:>14s} {fl:>9s} {of:>7s} {gm:>9s} {gs:>8s}")
    print("\ntargets (eager; CUDA-graph replay beside it where capturable):")
    for key, v in verdict.items():
        detail = f"worst x{v['worst']} ({v['worst_case']})" if "worst" in v else ""
        if "worst_graph" in v:
            detail += f"; graph: {v['status_graph']}, worst x{v['worst_graph']} ({v['worst_graph_case']})"
        bar = f">= x{v['target']}" if v["target"] is not None else ""
        print(f"  {v['what']:50s} {bar:7s} {v['status']} {detail}")


EPILOG = """\
The JSON is rewritten (atomically) after every row, so a run cut short keeps what finished; it says
"complete": false until every op ran. Exit status 1 when an op failed (its traceback is printed and
the others still run). On a CPU, TRITON_INTERPRET=1 runs the Triton paths interpreted (slow; a
correctness check of the harness, not a timing).

examples:
  python benchmarks/bench_kernels.py --out out/bench_kernels.json
  python benchmarks/bench_kernels.py --out out/attention.json --only attention --only merger
  python benchmarks/bench_kernels.py --out out/sweep.json --sweep --force
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Time qoqopt.kernels against their peers at QoQ-Med-7B dimensions on a "
                                     "CUDA GPU (tiny sizes on a CPU, every GPU target left open); the module "
                                     "docstring lists each row.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON results path (not replaced without --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--only", choices=("merger", "attention", "w4a16", "layer", "tower"), action="append",
                        help="run only this op (repeat for several)")
    parser.add_argument("--profile", choices=tuple(PROFILES), help="sizes (default: 7b on CUDA, tiny on CPU)")
    parser.add_argument("--sweep", action="store_true", help="also time a few tile configs per op (Triton only)")
    args = parser.parse_args(argv)
    try:
        _check_out(args.out, args.force)
    except QoqoptError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gpu = torch.cuda.is_available()
    b = Bench(torch.device("cuda" if gpu else "cpu"))
    profile = args.profile or ("7b" if gpu else "tiny")
    if not gpu:
        print(f"no CUDA device: {'interpreted Triton' if b.triton else 'torch reference paths'} at {profile} sizes; "
              "GPU targets stay open")
    hw, errors = hardware(b), {}

    def save(complete: bool) -> dict:  # after every row and op, so a run cut short keeps what finished
        verdict = verdicts(b)
        result = {
            "schema": "qoqopt.bench_kernels/1",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "complete": complete,
            "errors": errors,
            "hardware": hw,
            "profile": asdict(PROFILES[profile]),
            "rows": [asdict(r) for r in b.rows],
            "targets": verdict,
            "argv": sys.argv,
        }
        # Rewritten after every op: a timeout mid-write must leave the previous complete file.
        atomic_write_text(args.out, json.dumps(result, indent=2, default=str))
        return verdict

    b.after_row = lambda: save(complete=False)
    steps = [("merger", bench_merger), ("attention", bench_attention), ("w4a16", bench_w4a16), ("layer", bench_decoder_layer),
             ("tower", bench_tower)]
    if args.sweep and b.triton:  # after the judged ops; W4A16 first: its defaults wait on these rows
        steps += [("sweep-w4a16", sweep_w4a16), ("sweep-merger", sweep_merger), ("sweep-attention", sweep_attention)]
    # --only merger keeps the merger's sweep too
    steps = [(name, fn) for name, fn in steps if not args.only or name.removeprefix("sweep-") in args.only]
    for name, fn in steps:
        print(f"[{name}]")
        try:
            fn(b, PROFILES[profile])
        except Exception as err:  # one broken op must not cost the others' numbers
            traceback.print_exc()
            errors[name] = f"{type(err).__name__}: {err}"
        save(complete=False)
    verdict = save(complete=not errors)
    print_table(b, verdict)
    print(f"\nwrote {args.out}")
    return 1 if errors else 0


def _check_out(out: Path, force: bool) -> None:
    """Before any timing: a results file that can be written, and no earlier results lost unasked."""
    if out.is_dir():
        raise QoqoptError(f"--out {out} is a folder; give a JSON file path, such as {out / 'bench_kernels.json'}")
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise QoqoptError(f"cannot write {out}: {blocker} is a file")
    if out.exists() and not force:
        raise QoqoptError(f"{out} exists (--force replaces it)")


if __name__ == "__main__":
    sys.exit(main())
