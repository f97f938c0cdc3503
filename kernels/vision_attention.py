"""Varlen flash attention for the Qwen2.5-VL vision tower, 2-D RoPE applied in-kernel.

One launch covers every window of every image (window layers, ``cu_window_seqlens``) or every
image (full-attention layers, ``cu_seqlens``). The kernel reads q, k and v straight out of the
packed ``qkv`` Linear output ``[S, 3 * H * D]`` (transformers' ``reshape(S, 3, H, D)`` order),
rotates q and k in registers and writes ``[S, H * D]`` ready for ``proj``.

Choices worth knowing:
  * RoPE pairs head column j with j + D/2 (``rotate_half``). q and k are loaded as pairs: the
    two halves of a column tile come in as two plain loads, are rotated in fp32 and interleaved
    (j, j + D/2, j + 1, ...) into one dot operand. q.k is a sum over columns, so any column order
    works as long as q and k share it; each k element is read once, with no partner gather.
  * head_dim 80 is not a power of two: its 40 rotary pairs are split into tiles of 32 and 8
    (operands 64 + 16 wide, no padding), and v / the output into columns 64 + 16.
  * The rotary table is read per key block, not applied in a separate pass. Qwen2.5-VL's table
    repeats over the two halves, so the kernel reads the first half only; for 16-bit inputs that
    half is cached as one fp16 [S, 2, D/2] cos/sin table per forward (error <= 2^-12, below the
    16-bit rounding transformers applies right after the rotation). Full attention re-reads keys
    and table for every query block, so their bytes set its speed.
  * The launch grid comes from a block *plan* (q_start, seq_start, seq_end per q block) built on
    the device from ``cu_seqlens`` with an upper-bound grid known on the host, so no layer ever
    syncs. :class:`VarlenPlanCache` builds the plan and the rotary table once per forward and
    every layer reuses them: each vision layer receives the very same ``cu_seqlens`` /
    ``cu_window_seqlens`` and ``position_embeddings`` tensor objects.
"""

import math
import threading
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ._triton import (
    cdiv,
    check_supported,
    device_function,
    dot_precision,
    kernel,
    next_pow2,
    tensor_version,
    tl,
    use_triton,
)


@device_function
def _load_rotated_pairs(
    base_ptr, rows, stride, row_mask, pairs, pair_mask, cos_ptr, sin_ptr, stride_rope,
    HALF: tl.constexpr, SHARED_HALVES: tl.constexpr, ROWS: tl.constexpr, PAIRS: tl.constexpr,
):
    """Rotary pairs ``pairs`` of rows ``rows`` after ``x * cos + rotate_half(x) * sin``, in fp32:
    ``[ROWS, 2 * PAIRS]`` with column j's result next to column j + HALF's."""
    mask = row_mask[:, None] & pair_mask[None, :]
    x_ptrs = base_ptr + rows[:, None] * stride + pairs[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    rope_offs = rows[:, None] * stride_rope + pairs[None, :]
    cos1 = tl.load(cos_ptr + rope_offs, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + rope_offs, mask=mask, other=0.0).to(tl.float32)
    if SHARED_HALVES:
        cos2 = cos1
        sin2 = sin1
    else:
        cos2 = tl.load(cos_ptr + rope_offs + HALF, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + rope_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x)[j] = -x[j + HALF] and rotate_half(x)[j + HALF] = x[j]
    return tl.reshape(tl.join(x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2), (ROWS, 2 * PAIRS))


@kernel
def _vision_attention_kernel(
    qkv_ptr,  # [S, 3 * H * D]
    cos_ptr,  # rotary cos, row stride stride_rope (any float dtype; read as fp32)
    sin_ptr,  # rotary sin, same rows and stride
    plan_ptr,  # [num_blocks, 3] int32: q_start, seq_start, seq_end (q_start >= seq_end: idle block)
    out_ptr,  # [S, H * D]
    stride_qkv,
    stride_rope,
    stride_out,
    qk_scale,  # softmax scale * log2(e): the softmax runs on exp2
    H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MAIN: tl.constexpr,  # v / output columns [0, MAIN): largest power of two <= HEAD_DIM (at least 16)
    REST: tl.constexpr,  # columns [MAIN, HEAD_DIM) padded to a power of two >= 16; 0 if none
    SHARED_HALVES: tl.constexpr,  # cos/sin repeat after HEAD_DIM // 2: read the first half only
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    # q/k operands as wide as v's tiles, made of rotary pairs: 80 -> pairs 32 + 8 (64 + 16 columns)
    PAIRS_A: tl.constexpr = MAIN // 2
    PAIRS_B: tl.constexpr = REST // 2
    block = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(plan_ptr + block * 3)
    seq_start = tl.load(plan_ptr + block * 3 + 1)
    seq_end = tl.load(plan_ptr + block * 3 + 2)
    in_dtype = qkv_ptr.dtype.element_ty
    q_base = qkv_ptr + head * HEAD_DIM
    k_base = qkv_ptr + (H + head) * HEAD_DIM
    v_base = qkv_ptr + (2 * H + head) * HEAD_DIM

    offs_m = q_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seq_end  # idle blocks mask every row and never enter the key loop
    pairs_a = tl.arange(0, PAIRS_A)
    pa_mask = pairs_a < HALF
    # q, rotated in fp32 and rounded to the input dtype as transformers does before attention.
    q_a = _load_rotated_pairs(q_base, offs_m, stride_qkv, m_mask, pairs_a, pa_mask, cos_ptr, sin_ptr, stride_rope,
                              HALF, SHARED_HALVES, BLOCK_M, PAIRS_A).to(in_dtype)
    if PAIRS_B > 0:
        pairs_b = PAIRS_A + tl.arange(0, PAIRS_B)
        pb_mask = pairs_b < HALF
        q_b = _load_rotated_pairs(q_base, offs_m, stride_qkv, m_mask, pairs_b, pb_mask, cos_ptr, sin_ptr,
                                  stride_rope, HALF, SHARED_HALVES, BLOCK_M, PAIRS_B).to(in_dtype)
    cols_a = tl.arange(0, MAIN)
    a_mask = cols_a < HEAD_DIM
    acc_a = tl.zeros([BLOCK_M, MAIN], dtype=tl.float32)
    if REST > 0:
        cols_b = MAIN + tl.arange(0, REST)
        b_mask = cols_b < HEAD_DIM
        acc_b = tl.zeros([BLOCK_M, REST], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(seq_start, seq_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_end
        k_a = _load_rotated_pairs(k_base, offs_n, stride_qkv, n_mask, pairs_a, pa_mask, cos_ptr, sin_ptr,
                                  stride_rope, HALF, SHARED_HALVES, BLOCK_N, PAIRS_A).to(in_dtype)
        qk = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)
        if PAIRS_B > 0:
            k_b = _load_rotated_pairs(k_base, offs_n, stride_qkv, n_mask, pairs_b, pb_mask, cos_ptr, sin_ptr,
                                      stride_rope, HALF, SHARED_HALVES, BLOCK_N, PAIRS_B).to(in_dtype)
            qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=DOT_PRECISION)
        if n0 + BLOCK_N > seq_end:  # only a segment's last key block has keys past its end
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
        # running max in log2 units; the scale folds into exp2's argument (one FFMA per score)
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(in_dtype)

        v_rows = v_base + offs_n[:, None] * stride_qkv
        v_a = tl.load(v_rows + cols_a[None, :], mask=n_mask[:, None] & a_mask[None, :], other=0.0)
        acc_a = tl.dot(p, v_a, acc_a * alpha[:, None], input_precision=DOT_PRECISION)
        if REST > 0:
            v_b = tl.load(v_rows + cols_b[None, :], mask=n_mask[:, None] & b_mask[None, :], other=0.0)
            acc_b = tl.dot(p, v_b, acc_b * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # idle blocks: avoid 0/0 in rows that are never stored
    out_dtype = out_ptr.dtype.element_ty
    o_rows = out_ptr + offs_m[:, None] * stride_out + head * HEAD_DIM
    tl.store(o_rows + cols_a[None, :], (acc_a / l_i[:, None]).to(out_dtype), mask=m_mask[:, None] & a_mask[None, :])
    if REST > 0:
        tl.store(o_rows + cols_b[None, :], (acc_b / l_i[:, None]).to(out_dtype), mask=m_mask[:, None] & b_mask[None, :])


def head_split(head_dim: int) -> tuple[int, int]:
    """(MAIN, REST) tile widths covering the head with as little padding as tl.dot allows: 80 -> 64 + 16.

    Halved, they tile the D/2 rotary pairs of q and k too (each pair gives two operand columns)."""
    main = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - main
    return main, (max(16, next_pow2(rest)) if rest > 0 else 0)


def build_plan(cu_seqlens: torch.Tensor, total_tokens: int, block_m: int) -> torch.Tensor:
    """``[num_blocks, 3]`` int32 (q_start, seq_start, seq_end), computed on cu_seqlens' device.

    ``num_blocks = cdiv(total, block_m) + num_seqs`` bounds ``sum(cdiv(len_i, block_m))`` from the
    host-known shapes alone; blocks past the real count are idle (all zeros).
    """
    cu = cu_seqlens.to(torch.int64)
    num_seqs = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    blocks_per_seq = (lens + block_m - 1) // block_m
    blocks_end = torch.cumsum(blocks_per_seq, 0)
    b = torch.arange(cdiv(total_tokens, block_m) + num_seqs, device=cu.device)
    seq = torch.searchsorted(blocks_end, b, right=True)
    valid = seq < num_seqs
    seq = seq.clamp(max=num_seqs - 1)
    seq_start, seq_end = cu[seq], cu[seq + 1]
    q_start = seq_start + (b - (blocks_end[seq] - blocks_per_seq[seq])) * block_m
    plan = torch.stack([q_start, seq_start, seq_end], dim=1)
    return torch.where(valid[:, None], plan, 0).to(torch.int32).contiguous()


def rope_table(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype, shared_halves: bool):
    """The (cos, sin) views the kernel reads, with one row stride.

    With ``shared_halves`` that is the first half only, packed as one ``[S, 2, D/2]`` table (a row's
    cos and sin side by side) in fp16 for 16-bit activations, fp32 otherwise. fp16 holds any value
    in [-1, 1] to 2^-12, under the 16-bit rounding that follows the rotation in transformers.
    """
    if not shared_halves:
        return cos.contiguous(), sin.contiguous()
    half = cos.shape[1] // 2
    table_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    table = torch.stack((cos[:, :half], sin[:, :half]), dim=1).to(table_dtype)
    return table[:, 0], table[:, 1]


class VarlenPlanCache:
    """Per-forward launch data shared by all attention layers of one vision tower: block plans
    (from ``cu_seqlens``) and packed rotary tables (from ``position_embeddings``).

    Keyed by the identity of the source tensors, checked through weak references and version
    counters, so a freed tensor can never hit a stale entry, nor one modified in place outside
    inference mode. Inference tensors have no version counter: a caller that refills the same
    ``cu_seqlens`` or rotary buffer in place under ``torch.inference_mode`` must :meth:`clear` the
    cache in between. ``apply()`` does so at every forward of the vision tower (transformers takes
    ``cu_seqlens`` precomputed from its caller, which may reuse one buffer).

    One model may serve several threads (a web server's workers): one thread's forward clears the
    cache while another looks an entry up, so every access holds the lock.
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0  # how many plans were built: tests assert one per distinct cu_seqlens
        self.table_builds = 0

    def clear(self, *_hook_args) -> None:
        """Forget every entry (callable as a forward pre-hook: the plans then live one forward)."""
        with self._lock:
            self._entries.clear()

    def plan(self, cu_seqlens: torch.Tensor, total_tokens: int, block_m: int) -> torch.Tensor:
        plan, built = self._cached((cu_seqlens,), ("plan", total_tokens, block_m),
                                   lambda: build_plan(cu_seqlens, total_tokens, block_m))
        self.builds += built
        return plan

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype, shared_halves: bool):
        if not shared_halves:  # the tables as given: nothing is built, so nothing is worth keeping
            return rope_table(cos, sin, dtype, shared_halves)
        table, built = self._cached((cos, sin), ("rope", dtype),
                                    lambda: rope_table(cos, sin, dtype, shared_halves=True))
        self.table_builds += built
        return table

    def _cached(self, sources: tuple, params: tuple, build):
        with self._lock:
            return self._cached_locked(sources, params, build)

    def _cached_locked(self, sources: tuple, params: tuple, build):
        key = (*map(id, sources), *params)
        # versions are None under inference mode: transformers never edits these tensors in place
        versions = tuple(tensor_version(t) for t in sources)
        hit = self._entries.get(key)
        if hit is not None and hit[1] == versions and all(ref() is t for ref, t in zip(hit[0], sources)):
            self._entries.move_to_end(key)
            return hit[2], False
        value = build()
        self._entries[key] = (tuple(weakref.ref(t) for t in sources), versions, value)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value, True


def _attention_config(device: torch.device, avg_len: float, dtype: torch.dtype) -> dict:
    if device.type == "cpu":  # small blocks so tests cross several q and k blocks per sequence
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    # fp32 (the exactness path: IEEE dots on CUDA cores) spills at any tile on sm_90; 64-row blocks
    # keep it to ~300 B per thread where 128 rows spill 1.6 KB.
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    # Measured on an H200 (bench_kernels --sweep, bf16, CUDA-graph replay, 7B dims, 5120 patches):
    if avg_len <= 96:  # window layers: a 64-patch window is one q block; 4 warps, 32-key steps
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)  # 28.9 us (64x64, 8 warps: 64.1)
    # Full attention: taller q blocks halve how often each key block is loaded and rotated.
    # (8 warps, two warpgroups of 64 rows: with 4 warps a thread needs 251 registers on sm_90, and
    # 256-row blocks with 16 warps spill; see benchmarks/sass_report.py.)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)  # 774 us (128x64: 876)


def vision_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_heads: int,
    plans: VarlenPlanCache | None = None,
    out: torch.Tensor | None = None,
    shared_halves: bool = False,
    **config,
) -> torch.Tensor:
    """Bidirectional attention within each ``cu_seqlens`` segment; returns ``[S, H * D]``.

    ``shared_halves=True`` promises ``cos[:, :D/2] == cos[:, D/2:]`` (same for sin), which holds by
    construction for Qwen2.5-VL's vision rotary (``cat([freqs_hw, freqs_hw])``): the kernel then
    reads half the rotary table (see :func:`rope_table`), which matters for full attention where
    keys are re-rotated for every query block.
    """
    assert qkv.dim() == 2 and qkv.stride(1) == 1, f"qkv must be [S, 3*H*D] with unit column stride, got {tuple(qkv.shape)}"
    s, width = qkv.shape
    head_dim = width // (3 * num_heads)
    assert width == 3 * num_heads * head_dim and head_dim % 2 == 0, f"qkv width {width} vs {num_heads} heads"
    assert cos.shape == (s, head_dim) and sin.shape == (s, head_dim), f"cos/sin must be [{s}, {head_dim}]"
    if out is None:
        out = torch.empty(s, num_heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    assert out.shape == (s, num_heads * head_dim) and out.stride(1) == 1, "out must be [S, H*D]"
    if s == 0:
        return out
    num_seqs = cu_seqlens.numel() - 1  # shapes only: the average length needs no device sync
    cfg = _attention_config(qkv.device, s / max(num_seqs, 1), qkv.dtype) | config
    plans = plans or VarlenPlanCache()
    plan = plans.plan(cu_seqlens, s, cfg["BLOCK_M"])
    cos, sin = plans.rope(cos, sin, qkv.dtype, shared_halves)
    grid = (plan.shape[0], num_heads)
    main, rest = head_split(head_dim)
    _vision_attention_kernel[qkv.device][grid](
        qkv, cos, sin, plan, out,
        qkv.stride(0), cos.stride(0), out.stride(0),
        head_dim**-0.5 * math.log2(math.e),
        H=num_heads, HEAD_DIM=head_dim, MAIN=main, REST=rest, SHARED_HALVES=shared_halves,
        DOT_PRECISION=dot_precision(qkv.dtype), **cfg,
    )
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def vision_attention_reference(qkv, cos, sin, cu_seqlens, num_heads) -> torch.Tensor:
    """Torch reference: transformers' RoPE (fp32, then rounded) and SDPA per segment."""
    s = qkv.shape[0]
    q, k, v = qkv.reshape(s, 3, num_heads, -1).unbind(1)  # [S, H, D] each
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    q = (q.float() * cos + rotate_half(q.float()) * sin).to(qkv.dtype)
    k = (k.float() * cos + rotate_half(k.float()) * sin).to(qkv.dtype)
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [H, L, D]
        outs.append(F.scaled_dot_product_attention(*seg).transpose(0, 1))
    return torch.cat(outs, dim=0).reshape(s, -1)


class FusedVisionAttention(nn.Module):
    """Drop-in for ``Qwen2_5_VLVisionAttention``: same ``qkv``/``proj`` submodules and signature."""

    def __init__(self, qkv: nn.Module, proj: nn.Module, num_heads: int, plans: VarlenPlanCache, strict: bool = False):
        super().__init__()
        self.qkv = qkv
        self.proj = proj
        self.num_heads = num_heads
        self.plans = plans
        self.strict = strict

    @classmethod
    def from_hf(cls, attn: nn.Module, plans: VarlenPlanCache, strict: bool = False) -> "FusedVisionAttention":
        # a quantized proj (an AWQ build's --quantize-vision) has no weight: its scales hold the dtype
        params = getattr(attn.proj, "weight", None)
        params = attn.proj.scales if params is None else params
        check_supported(params.device, params.dtype, "vision attention")
        return cls(attn.qkv, attn.proj, attn.num_heads, plans, strict)

    def forward(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kwargs):
        qkv = self.qkv(hidden_states)
        if position_embeddings is None:  # older transformers passed the raw rotary angles
            angles = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
            position_embeddings = (angles.cos(), angles.sin())
        cos, sin = position_embeddings
        if use_triton(qkv, self.strict, "vision attention"):
            # Qwen2.5-VL's vision rotary repeats its table over the two halves (see vision_attention).
            out = vision_attention(qkv, cos, sin, cu_seqlens, self.num_heads, self.plans, shared_halves=True)
        else:
            out = vision_attention_reference(qkv, cos, sin, cu_seqlens, self.num_heads)
        return self.proj(out)
