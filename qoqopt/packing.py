"""Bit packing of the GPTQ "v1" and AWQ GEMM checkpoint layouts, as pure functions.

Conventions (shapes use the math orientation: ``K`` input features, ``N`` output features,
``G`` groups along K):

GPTQ v1 (``checkpoint_format: gptq``), bits in {4, 8}, ``f = 32 // bits`` values per int32:
  * ``qweight`` int32 ``[K // f, N]``: value ``k`` of column ``n`` sits in word ``qweight[k // f, n]``
    at bit offset ``bits * (k % f)`` (LSB first along the *input* dimension);
  * ``qzeros`` int32 ``[G, N // f]``: packed the same way but along the *output* dimension, storing
    ``zero - 1`` (the historic v1 offset: a kernel reads ``stored + 1``, so zeros span 1..2**bits);
  * ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]`` gives each input row its group.

GPTQ v2 (``checkpoint_format: gptq_v2``): as v1, but ``qzeros`` stores the zero itself (no offset).
AWQ GEMM tensors repacked this way (:func:`awq_to_gptq_v2`) are what qoqopt's W4A16 kernel runs.

AWQ GEMM (``version: gemm``), 4 bits only:
  * ``qweight`` int32 ``[K, N // 8]``: nibble ``i`` of word ``qweight[k, c]`` holds column
    ``8 * c + AWQ_ORDER[i]`` with ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``;
  * ``qzeros`` int32 ``[G, N // 8]`` packed the same way, with no offset; no ``g_idx``.

The dequantized weight is ``W[k, n] = (q[k, n] - zero[g(k), n]) * scale[g(k), n]``.

Fragment words (qoqopt's own, made from GPTQ's at load for a decode kernel, never written to a
checkpoint): 4-bit, 128 input rows a block, each column's 16 words of a block contiguous, in the
order a 16-row tensor-core tile reads them (:func:`pack_fragments`).
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column (within 8) held by nibble i


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> int32 with the same bits (checkpoints store signed int32)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _check_values(values: torch.Tensor, bits: int, name: str) -> None:
    assert bits in (4, 8), f"bits must be 4 or 8, got {bits}"
    assert not values.is_floating_point(), f"{name} must be an integer tensor"
    assert values.numel() == 0 or (values.min() >= 0 and values.max() < 2**bits), f"{name} out of range for {bits} bits"


def pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``[R, C]`` ints -> int32 ``[R * bits / 32, C]``, LSB first along rows."""
    assert values.dim() == 2, f"expected 2-D, got {tuple(values.shape)}"
    per_word = 32 // bits
    assert values.shape[0] % per_word == 0, f"rows {values.shape[0]} not a multiple of {per_word}"
    v = values.to(torch.int64).reshape(-1, per_word, values.shape[1])
    shifts = (torch.arange(per_word, device=values.device) * bits).view(1, -1, 1)
    return _to_int32((v << shifts).sum(dim=1))


def unpack_along_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_along_rows`: int32 ``[R', C]`` -> int32 ``[R' * 32 / bits, C]``."""
    assert words.dim() == 2 and words.dtype == torch.int32, f"expected 2-D int32, got {words.dtype} {tuple(words.shape)}"
    per_word = 32 // bits
    shifts = (torch.arange(per_word, device=words.device) * bits).view(1, -1, 1)
    v = (words.to(torch.int64).unsqueeze(1) >> shifts) & (2**bits - 1)
    return v.reshape(-1, words.shape[1]).to(torch.int32)


def pack_along_cols(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """``[R, C]`` ints -> int32 ``[R, C * bits / 32]``; slot ``i`` of a word holds column ``order[i]``."""
    assert values.dim() == 2, f"expected 2-D, got {tuple(values.shape)}"
    per_word = 32 // bits
    assert values.shape[1] % per_word == 0, f"columns {values.shape[1]} not a multiple of {per_word}"
    order = order or tuple(range(per_word))
    v = values.to(torch.int64).reshape(values.shape[0], -1, per_word)[:, :, list(order)]
    shifts = torch.arange(per_word, device=values.device) * bits
    return _to_int32((v << shifts).sum(dim=2))


def unpack_along_cols(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_along_cols`."""
    assert words.dim() == 2 and words.dtype == torch.int32, f"expected 2-D int32, got {words.dtype} {tuple(words.shape)}"
    per_word = 32 // bits
    order = order or tuple(range(per_word))
    shifts = torch.arange(per_word, device=words.device) * bits
    slots = (words.to(torch.int64).unsqueeze(2) >> shifts) & (2**bits - 1)  # [R, C', slot]
    cols = torch.empty_like(slots)
    cols[:, :, list(order)] = slots
    return cols.reshape(words.shape[0], -1).to(torch.int32)


def pack_gptq(intweight: torch.Tensor, zeros: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ v1: ``intweight`` ``[K, N]`` in [0, 2**bits), ``zeros`` ``[G, N]`` in [1, 2**bits]."""
    assert intweight.dim() == 2 and zeros.dim() == 2 and zeros.shape[1] == intweight.shape[1], (
        f"intweight {tuple(intweight.shape)} and zeros {tuple(zeros.shape)} must be [K, N] and [G, N]"
    )
    _check_values(intweight, bits, "intweight")
    _check_values(zeros - 1, bits, "zeros - 1 (v1 stores zero - 1)")
    return pack_along_rows(intweight, bits), pack_along_cols(zeros - 1, bits)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ v1 -> (``intweight`` ``[K, N]``, ``zeros`` ``[G, N]``), undoing the zero - 1 offset."""
    assert qweight.shape[1] == qzeros.shape[1] * (32 // bits), (
        f"qweight {tuple(qweight.shape)} and qzeros {tuple(qzeros.shape)} disagree on N for {bits} bits"
    )
    return unpack_along_rows(qweight, bits), unpack_along_cols(qzeros, bits) + 1


def pack_awq(intweight: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ GEMM (4-bit): ``intweight`` ``[K, N]``, ``zeros`` ``[G, N]``, both in [0, 16)."""
    assert intweight.dim() == 2 and zeros.dim() == 2 and zeros.shape[1] == intweight.shape[1], (
        f"intweight {tuple(intweight.shape)} and zeros {tuple(zeros.shape)} must be [K, N] and [G, N]"
    )
    _check_values(intweight, 4, "intweight")
    _check_values(zeros, 4, "zeros")
    return pack_along_cols(intweight, 4, AWQ_ORDER), pack_along_cols(zeros, 4, AWQ_ORDER)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ GEMM -> (``intweight`` ``[K, N]``, ``zeros`` ``[G, N]``)."""
    assert qweight.shape[1] == qzeros.shape[1], (
        f"qweight {tuple(qweight.shape)} and qzeros {tuple(qzeros.shape)} disagree on N"
    )
    return unpack_along_cols(qweight, 4, AWQ_ORDER), unpack_along_cols(qzeros, 4, AWQ_ORDER)


def awq_to_gptq_v2(qweight: torch.Tensor, qzeros: torch.Tensor, rows_per_step: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ GEMM tensors repacked as GPTQ ``gptq_v2`` (LSB first along K, zeros stored as is): the
    same integers, so a kernel for one layout serves both, as vLLM's Marlin repack does."""
    return awq_qweight_to_gptq_v2(qweight, rows_per_step), awq_zeros_to_gptq_v2(qzeros)


def awq_qweight_to_gptq_v2(qweight: torch.Tensor, rows_per_step: int = 1024) -> torch.Tensor:
    """AWQ's qweight ``[K, N / 8]`` as GPTQ's ``[K / 8, N]``.

    Repacked ``rows_per_step`` input rows at a time: unpacking holds a few int64 copies of each
    weight, about 2 GB at once for a whole 7B MLP projection next to the model on the GPU; 1024
    rows of a 18944-wide layer hold about 0.5 GB.
    """
    assert qweight.shape[0] % 8 == 0, f"AWQ K={qweight.shape[0]} must be a multiple of 8 to pack along K"
    assert rows_per_step % 8 == 0
    packed = torch.empty(qweight.shape[0] // 8, qweight.shape[1] * 8, dtype=torch.int32, device=qweight.device)
    for r in range(0, qweight.shape[0], rows_per_step):
        ints = unpack_along_cols(qweight[r : r + rows_per_step], 4, AWQ_ORDER)
        packed[r // 8 : (r + ints.shape[0]) // 8] = pack_along_rows(ints, 4)
    return packed


def awq_zeros_to_gptq_v2(qzeros: torch.Tensor) -> torch.Tensor:
    """AWQ's packed zeros in GPTQ's column order (both pack along N; AWQ interleaves)."""
    return pack_along_cols(unpack_along_cols(qzeros, 4, AWQ_ORDER), 4)


def gptq_v2_to_awq(qweight: torch.Tensor, qzeros: torch.Tensor, cols_per_step: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`awq_to_gptq_v2`: a layer held as GPTQ v2 written back in AWQ GEMM's
    layout, as its checkpoint had it; ``cols_per_step`` output columns at a time, for the same reason."""
    assert cols_per_step % 8 == 0
    packed = torch.empty(qweight.shape[0] * 8, qweight.shape[1] // 8, dtype=torch.int32, device=qweight.device)
    for c in range(0, qweight.shape[1], cols_per_step):
        packed[:, c // 8 : (c + cols_per_step) // 8] = pack_along_cols(unpack_along_rows(qweight[:, c : c + cols_per_step], 4), 4, AWQ_ORDER)
    return packed, pack_along_cols(unpack_along_cols(qzeros, 4), 4, AWQ_ORDER)


def permute_packed_rows(qweight: torch.Tensor, perm: torch.Tensor, bits: int, cols_per_step: int = 1024) -> torch.Tensor:
    """GPTQ ``qweight`` ``[K * bits / 32, N]`` with its K rows (the values, not the words) reordered by
    ``perm``: how act-order layers are made group-contiguous at load. ``cols_per_step`` output
    columns at a time, for the same reason as :func:`awq_to_gptq_v2`."""
    out = torch.empty_like(qweight)
    for c in range(0, qweight.shape[1], cols_per_step):
        out[:, c : c + cols_per_step] = pack_along_rows(unpack_along_rows(qweight[:, c : c + cols_per_step], bits)[perm], bits)
    return out


# Fragment-ordered words (4-bit, 128 input rows a block; see :func:`pack_fragments`). Value ``k`` of a
# block sits at k = e0 + 2 * rhi + 8 * e1 + 16 * rlo + 64 * e6 (each e* one bit, rhi and rlo 0..3), in
# word r = rlo + 4 * rhi of its column, nibble e1 + 2 * e6 + 4 * e0.
FRAGMENT_K = 128
_FRAGMENT_SPLIT = (2, 4, 2, 4, 2)  # e6, rlo, e1, rhi, e0: the bits of k within a block, highest first


def pack_fragments(values: torch.Tensor) -> torch.Tensor:
    """``[K, N]`` 4-bit ints -> int32 ``[K / 128, 16 * N]``, the words of each column's 128-row block
    contiguous (column ``16 * n + r``) and ordered so that a tensor-core kernel reads its MMA B
    fragments straight from them (``kernels/w4a16.py``: no shared-memory reshuffle of dequantized
    weights). Each word holds two halves of pairs: nibbles ``j`` and ``j + 4`` are rows ``k`` and
    ``k + 1``, one ``lop3`` away from two 16-bit floats side by side in a register.
    The layout is qoqopt's own, made at load from GPTQ's (:func:`gptq_to_fragments`), never stored."""
    assert values.dim() == 2, f"expected 2-D, got {tuple(values.shape)}"
    _check_values(values, 4, "values")
    k, n = values.shape
    assert k % FRAGMENT_K == 0, f"rows {k} not a multiple of {FRAGMENT_K}"
    v = values.to(torch.int64).reshape(k // FRAGMENT_K, *_FRAGMENT_SPLIT, n)
    # -> [block, n, rhi, rlo, e0, e6, e1]: word r = 4 * rhi + rlo, nibble 4 * e0 + 2 * e6 + e1
    v = v.permute(0, 6, 4, 2, 5, 1, 3).reshape(k // FRAGMENT_K, n * 16, 8)
    shifts = torch.arange(8, device=values.device) * 4
    return _to_int32((v << shifts).sum(dim=2))


def unpack_fragments(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fragments`: int32 ``[K / 128, 16 * N]`` -> int32 ``[K, N]``."""
    assert words.dim() == 2 and words.dtype == torch.int32 and words.shape[1] % 16 == 0, (
        f"expected 2-D int32 [K / {FRAGMENT_K}, 16 * N], got {words.dtype} {tuple(words.shape)}")
    blocks, n = words.shape[0], words.shape[1] // 16
    shifts = torch.arange(8, device=words.device) * 4
    v = (words.to(torch.int64).unsqueeze(2) >> shifts) & 15  # [block, 16 n, nibble]
    v = v.reshape(blocks, n, 4, 4, 2, 2, 2)  # block, n, rhi, rlo, e0, e6, e1
    return v.permute(0, 5, 3, 6, 2, 4, 1).reshape(blocks * FRAGMENT_K, n).to(torch.int32)


_GPTQ_BLOCK_ROWS = FRAGMENT_K // 8  # GPTQ 4-bit words (rows of qweight) per 128-row block


def gptq_to_fragments(qweight: torch.Tensor, blocks_per_step: int = 8) -> torch.Tensor:
    """GPTQ 4-bit ``qweight`` ``[K / 8, N]`` -> :func:`pack_fragments` words, ``blocks_per_step`` 128-row
    blocks at a time (for the memory reason of :func:`awq_to_gptq_v2`)."""
    assert qweight.shape[0] % _GPTQ_BLOCK_ROWS == 0, f"K={qweight.shape[0] * 8} is not a multiple of {FRAGMENT_K}"
    return _by_blocks(qweight, _GPTQ_BLOCK_ROWS, 1, qweight.shape[1] * 16, blocks_per_step,
                      lambda words: pack_fragments(unpack_along_rows(words, 4)))


def fragments_to_gptq(words: torch.Tensor, blocks_per_step: int = 8) -> torch.Tensor:
    """Inverse of :func:`gptq_to_fragments`: fragment words -> GPTQ 4-bit ``qweight`` ``[K / 8, N]``."""
    return _by_blocks(words, 1, _GPTQ_BLOCK_ROWS, words.shape[1] // 16, blocks_per_step,
                      lambda block: pack_along_rows(unpack_fragments(block), 4))


def _by_blocks(src: torch.Tensor, src_rows: int, out_rows: int, out_cols: int, blocks_per_step: int, convert):
    """``convert`` applied ``blocks_per_step`` 128-row blocks at a time (``src_rows`` rows of ``src``
    a block in, ``out_rows`` rows of ``out_cols`` out), into one int32 output."""
    blocks = src.shape[0] // src_rows
    out = torch.empty(blocks * out_rows, out_cols, dtype=torch.int32, device=src.device)
    for b in range(0, blocks, blocks_per_step):
        out[b * out_rows : (b + blocks_per_step) * out_rows] = convert(src[b * src_rows : (b + blocks_per_step) * src_rows])
    return out


def dequantize(intweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """``[K, N]`` fp32 weight ``(q - zero[g_idx]) * scale[g_idx]`` (math orientation: y = x @ W)."""
    assert intweight.shape[0] == g_idx.shape[0] and zeros.shape == scales.shape, (
        f"intweight {tuple(intweight.shape)}, g_idx {tuple(g_idx.shape)}, "
        f"zeros {tuple(zeros.shape)}, scales {tuple(scales.shape)}"
    )
    g = g_idx.long()
    return (intweight.float() - zeros[g].float()) * scales[g].float()


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128):
    """Round-to-nearest asymmetric quantization of an ``nn.Linear`` weight ``[N, K]``.

    Not GPTQ: a quick way to get valid (intweight ``[K, N]``, zeros ``[G, N]`` in [1, 2**bits - 1],
    scales fp16 ``[G, N]``) for tests and benchmarks. Zeros stay >= 1 so GPTQ v1 can store them.
    """
    assert weight.dim() == 2, f"weight must be [N, K], got {tuple(weight.shape)}"
    n, k = weight.shape
    group_size = k if group_size in (-1, None) else group_size
    assert k % group_size == 0, f"K={k} not a multiple of group_size={group_size}"
    w = weight.float().t().reshape(k // group_size, group_size, n)  # [G, gs, N]
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    qmax = 2**bits - 1
    scales = ((hi - lo).clamp(min=1e-8) / (qmax - 1)).half()  # one level spare keeps zero >= 1
    zeros = (1 + torch.round(-lo / scales.float())).clamp(1, qmax).to(torch.int32)
    q = torch.round(w / scales.float().unsqueeze(1)) + zeros.unsqueeze(1)
    return q.clamp(0, qmax).to(torch.int32).reshape(k, n), zeros, scales
