"""Weight-only quantized GEMM (4-bit, or 8-bit GPTQ) over the GPTQ layout; AWQ GEMM checkpoints are
repacked to it once, at load.

``y = x @ W + b`` with ``W[k, n] = (q[k, n] - zero[k // group_size, n]) * scale[k // group_size, n]``;
see :mod:`qoqopt.packing` for the bit layouts. Weights are unpacked and dequantized in registers,
one K tile at a time (BLOCK_K divides group_size, so each tile reads one row of scales and zeros),
and fed to ``tl.dot`` in the activation dtype with fp32 accumulation.

Two regimes, two kernels:
  * decode (M <= 16): the weight stream is everything. One row runs a CUDA-core GEMV, up to 16 rows
    16-row tensor-core tiles. Few output tiles exist for narrow layers, so K is split across
    programs to keep every SM streaming (fp32 partials, summed by the split of each output tile
    that finishes last: still one launch). A swapped decode kernel (``out^T = W^T x^T``, the weight
    as the MMA's A operand; 5.1 sm_90 instructions per weight against the 16-row tiles' 6.4) ran
    1.1x to 1.9x slower than these on the H200 at every 7B decode shape (2026-11-30) and was removed;
  * prefill: classic tiles with M fastest in the grid, so programs sharing a weight tile run
    together and the weight is read from HBM about once; 256-row tiles where they fill the GPU.
    From ``DENSE_MIN_M`` rows on a GPU, the default is the dense plan instead (``KERNEL="dense"``):
    one launch dequantizes the whole weight into a temporary, cuBLAS multiplies (``_dense_launch``).
A third decode kernel (``KERNEL="frag"``) reads the weights repacked at load into fragment words
(``qoqopt.packing.pack_fragments``), whose layout turns the dequantized registers into the MMA's B
operand with no shared-memory pass (``_w4a16_fragment_kernel``); the tensor-core tiles and the dense
plan read the same words with ``FRAGMENTS=True``, so one layout serves every M.
``QuantLinear.use_fragment_words`` switches a layer to them, as ``apply(model)`` does by default
since the H200 run of 2026-11-30 (gate/up at M = 1: 17 us against the GEMV's 27; M = 16: 18 against
41).

Act-order GPTQ (``desc_act``: g_idx not ``k // group_size``) is handled once at load time: K is
permuted so groups become contiguous, and the same permutation is applied to the activations.

AWQ packs 8 output columns per word, in an interleaved order. Reading it directly needed a second
code path in both kernels, a 3-D fan-out that Triton 3.6 (the H200 image's) compiled to 32 registers
and 2 KB of local-memory spills per thread in the GEMV (18.5 instructions per weight, against 6.2 then
for the same bits packed along K). The integers are the same in both layouts, so ``QuantLinear.from_awq``
repacks them as GPTQ v2 once and every launch runs the one path.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qoqopt.errors import QoqoptError
from qoqopt.packing import (FRAGMENT_K, awq_qweight_to_gptq_v2, awq_to_gptq_v2, awq_zeros_to_gptq_v2, fragments_to_gptq,
                            gptq_to_fragments, gptq_v2_to_awq, permute_packed_rows)

from . import tuning
from ._splitk import splitk_operands, splitk_total
from ._triton import (cdiv, check_supported, device_function, dot_precision, interpreter_enabled, kernel, num_sms, tl,
                      use_triton)

DECODE_MAX_M = 16
# From this many rows on a GPU the default plan dequantizes the weight and leaves the GEMM to cuBLAS
# (``KERNEL="dense"``); between the two, the dequantizing tensor-core tiles
DENSE_MIN_M = 128

# OR-ing an unsigned q < 2**mantissa_bits into the mantissa of the float MAGIC gives MAGIC + q
# exactly: the weight becomes a float with no int->float conversion instruction (those issue at
# 1/8 of the FMA rate on sm_80/sm_90, and two of them per weight bounded the first version).
HALF_MAGIC = {torch.float16: (0x6400, 1024.0, 10), torch.bfloat16: (0x4300, 128.0, 7)}  # bits, value, mantissa
FP32_MAGIC_BITS = tl.constexpr(0x4B000000)  # 2**23
FP32_MAGIC = tl.constexpr(8388608.0)


@device_function
def _group_params(scales_ptr, qzeros_ptr, g, cols, col_mask, stride_s, stride_qz,
                  BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr):
    """Scale (fp32) and zero point (int32, checkpoint offset included) of columns ``cols`` in group
    ``g``; zeros pack along N, LSB first."""
    scale = tl.load(scales_ptr + g * stride_s + cols, mask=col_mask, other=0.0).to(tl.float32)
    return scale, _group_zeros(qzeros_ptr, g, cols, col_mask, stride_qz, BITS, ZERO_OFFSET)


@device_function
def _group_zeros(qzeros_ptr, g, cols, col_mask, stride_qz, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr):
    """Zero points (int32, checkpoint offset included) of columns ``cols`` in group ``g``."""
    PACK: tl.constexpr = 32 // BITS
    word = tl.load(qzeros_ptr + g * stride_qz + cols // PACK, mask=col_mask, other=0)
    return ((word >> ((cols % PACK) * BITS)) & ((1 << BITS) - 1)) + ZERO_OFFSET


@device_function
def _load(ptrs, mask, UNMASKED: tl.constexpr):
    """``tl.load`` with zeros where masked; ``UNMASKED`` (shapes divide the tiles) drops the mask
    from the hot loop altogether."""
    if UNMASKED:
        values = tl.load(ptrs)
    else:
        values = tl.load(ptrs, mask=mask, other=0)
    return values


def field_position(idx: int, bits: int) -> int:
    """Where ``_field_minus`` masks field ``idx`` in place: its bit in the word's lower half, or in the
    upper half shifted down by 12 (tests check the magic constant at every such position)."""
    return (idx % (16 // bits)) * bits + (4 if idx >= 16 // bits else 0)


@device_function
def _field_minus(words, magic_bits, offset, IDX: tl.constexpr, BITS: tl.constexpr):
    """Field ``IDX`` of every packed word as the fp32 ``q - offset``, exactly (``offset``: a small
    integer, such as a zero point). The field is masked in place and OR-ed into 2**23's mantissa in
    one LOP3 (the pattern comes in a register), giving ``2**23 + q * 2**POS``; one FMA by
    ``2**-POS`` with ``-(2**(23 - POS) + offset)`` then leaves ``q - offset`` unrounded. No
    int->float conversion, which issues at 1/8 of the FMA rate on sm_80/sm_90.

    The upper half of a word is reached by one shift shared by its fields, of 12 bits, not 16: the
    lowest upper field then sits at bit 4, a plain mask, where at bit 0 the compiler made a bit-field
    extract of it with a shift of its own (sm_90 SASS: 2 more instructions per word). Upper fields
    sit at bits 4 to 19 (``field_position``), below the exponent at bit 23."""
    HALF: tl.constexpr = 16 // BITS
    POS: tl.constexpr = (IDX % HALF) * BITS + (4 if IDX >= HALF else 0)
    bits = (words >> 12) if IDX >= HALF else words
    field = ((bits & (((1 << BITS) - 1) << POS)) | magic_bits).to(tl.float32, bitcast=True)
    return tl.fma(field, 1.0 / (1 << POS), -(offset + FP32_MAGIC / (1 << POS)))


@device_function
def _field(words, magic_bits, IDX: tl.constexpr, BITS: tl.constexpr):
    """Field ``IDX`` of every packed word, as the exact fp32 ``q``."""
    return _field_minus(words, magic_bits, 0.0, IDX, BITS)


@device_function
def _q_tile(words, magic_bits, BITS: tl.constexpr):
    """``[words, cols]`` packed int32 -> ``[32 // BITS * words, cols]`` fp32 ``q`` (row ``PACK * word + field``)."""
    # one return: Triton types a device function's returns before it drops the untaken branch
    if BITS == 4:
        t = _join_fields8(_field(words, magic_bits, 0, BITS), _field(words, magic_bits, 1, BITS),
                          _field(words, magic_bits, 2, BITS), _field(words, magic_bits, 3, BITS),
                          _field(words, magic_bits, 4, BITS), _field(words, magic_bits, 5, BITS),
                          _field(words, magic_bits, 6, BITS), _field(words, magic_bits, 7, BITS))
    else:
        t = _join_fields4(_field(words, magic_bits, 0, BITS), _field(words, magic_bits, 1, BITS),
                          _field(words, magic_bits, 2, BITS), _field(words, magic_bits, 3, BITS))
    return t


@device_function
def _step_words(qweight_ptr, k0, offs_n, n_mask, K, stride_qw, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, FRAGMENTS: tl.constexpr):
    """A K step's packed words for columns ``offs_n``: the 128-row block of fragment words holding
    row ``k0`` (K is whole blocks), or the GPTQ words of rows ``k0 .. k0 + BLOCK_K`` (zeros past K)."""
    if FRAGMENTS:
        words = _load(_fragment_word_ptrs(qweight_ptr, offs_n) + (k0 // 128) * stride_qw, n_mask[None, :], EVEN_N)
    else:
        offs_wk = k0 // (32 // BITS) + tl.arange(0, BLOCK_K // (32 // BITS))
        w_mask = (offs_wk < K // (32 // BITS))[:, None] & n_mask[None, :]
        words = _load(qweight_ptr + offs_wk[:, None] * stride_qw + offs_n[None, :], w_mask, EVEN_K and EVEN_N)
    return words


@device_function
def _step_q_tile(words, magic_bits, BITS: tl.constexpr, BLOCK_N: tl.constexpr, FRAGMENTS: tl.constexpr):
    """:func:`_step_words` -> the step's ``[BLOCK_K, BLOCK_N]`` fp32 ``q``, in row order."""
    if FRAGMENTS:
        q = _fragment_q_tile(words, magic_bits, BLOCK_N)
    else:
        q = _q_tile(words, magic_bits, BITS)
    return q


@device_function
def _dequant_tile(q, scale, zero, scales_ptr):
    """``(q - z) * s`` of a ``[rows, cols]`` fp32 ``q`` tile, in fp32 with the reference's one rounding."""
    if scales_ptr.dtype.element_ty == tl.float32:  # z * s could round: subtract first
        w = (q - zero.to(tl.float32)[None, :]) * scale[None, :]
    else:  # q * s and z * s fit fp32's 24 bits (9-bit integers, 11-bit scales): one FMA, exact
        w = tl.fma(q, scale[None, :], -(zero.to(tl.float32) * scale)[None, :])
    return w


@device_function
def _output_tile(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows and columns of output tile (pid_m, pid_n), and which of them exist."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@device_function
def _half_pair(words, pair_bits, J: tl.constexpr, dtype: tl.constexpr):
    """Fields ``J`` and ``J + 4`` of every packed word (4-bit) as ``MAGIC + q`` in the 16-bit float
    ``dtype``: masked into the two halves of one word and OR-ed into MAGIC's 16-bit pattern in both
    halves (``pair_bits``, in a register: with the mask, two immediates would take two LOP3s), one
    shift and one LOP3 for two weights, then read as the word's low and high halves."""
    pair = ((words >> (J * 4)) & 0x000F000F) | pair_bits
    return pair.to(tl.int16).to(dtype, bitcast=True), (pair >> 16).to(tl.int16).to(dtype, bitcast=True)


@device_function
def _half_q_tile(words, pair_bits, dtype: tl.constexpr):
    """``[words, cols]`` packed int32 (4-bit) -> ``[8 * words, cols]`` ``MAGIC + q`` in ``dtype`` (row
    ``8 * word + field``), two fields per masked word."""
    f0, f4 = _half_pair(words, pair_bits, 0, dtype)
    f1, f5 = _half_pair(words, pair_bits, 1, dtype)
    f2, f6 = _half_pair(words, pair_bits, 2, dtype)
    f3, f7 = _half_pair(words, pair_bits, 3, dtype)
    return _join_fields8(f0, f1, f2, f3, f4, f5, f6, f7)


@device_function
def _join_fields8(f0, f1, f2, f3, f4, f5, f6, f7):
    """Eight ``[words, cols]`` tiles -> ``[8 * words, cols]`` (row ``8 * word + i`` from the i-th).

    Fields are joined one level at a time, so each thread keeps the columns of the words it loaded
    and the dequantized tile goes to the MMA operand's shared memory in wide stores; a broadcast
    [words, fields, cols] tile put one column per thread (one 16-bit store per weight, sm_90 SASS).
    A join adds a last axis whose index is the highest bit of the field number so far.
    """
    t = tl.join(tl.join(tl.join(f0, f1), tl.join(f2, f3)), tl.join(tl.join(f4, f5), tl.join(f6, f7)))
    t = tl.permute(t, (0, 4, 3, 2, 1))
    return tl.reshape(t, (f0.shape[0] * 8, f0.shape[1]))


@device_function
def _join_fields4(f0, f1, f2, f3):
    """Four ``[words, cols]`` field tiles -> ``[4 * words, cols]``, as :func:`_join_fields8`."""
    t = tl.permute(tl.join(tl.join(f0, f1), tl.join(f2, f3)), (0, 3, 2, 1))
    return tl.reshape(t, (f0.shape[0] * 4, f0.shape[1]))


@kernel(do_not_specialize=("M",))
def _w4a16_kernel(
    x_ptr,  # [M, K]
    qweight_ptr,  # [K * BITS / 32, N]
    qzeros_ptr,  # [G, N * BITS / 32]
    scales_ptr,  # [G, N]
    bias_ptr,  # [N] (read only when HAS_BIAS)
    out_ptr,  # [M, N] in x's dtype
    partials_ptr,  # SPLIT_K > 1: fp32 [SPLIT_K, M, N] scratch
    counters_ptr,  # SPLIT_K > 1: int32 [output tiles], zero between launches
    M,
    N,
    K,
    stride_xm,
    stride_qw,
    stride_qz,
    stride_s,
    k_per_split,  # multiple of BLOCK_K
    magic_bits,  # FP32_MAGIC_BITS, an argument for the reason given in the GEMV
    pair_bits,  # MAGIC_BITS in both 16-bit halves (JOIN_FIELDS)
    GROUP_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,  # 1 for GPTQ v1 (stored zero - 1), 0 otherwise
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks in the loop
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no N masks on the weight loads
    MAGIC_BITS: tl.constexpr,  # 16-bit pattern of MAGIC in x's dtype; 0: plain conversion (fp32, bf16 8-bit)
    MAGIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    REDUCE_UNROLL: tl.constexpr = 1,  # split-K: partials loaded together by each tile's last split
    JOIN_FIELDS: tl.constexpr = False,  # decode, 4-bit, 16-bit x: build the tile by joins (see below)
    FRAGMENTS: tl.constexpr = False,  # over fragment words (BLOCK_K 128; see _fragment_q_tile)
):
    """Tensor-core path (M > 1). Each K tile lies in one group. Decode tiles (BLOCK_M <= 16) are
    dequant-bound: the group's scale multiplies the tile's dot product, ``sum_k a_k (q_k - z) s =
    s * (a . (q - z))``, so each weight costs a shift, a mask-or and half a packed subtract. Prefill
    tiles are MMA-bound: the scale goes into the weights (``_q_tile``, then one FMA), so wgmma
    accumulates in place."""
    pid_m = tl.program_id(0)  # M fastest: neighbouring programs share the weight tile in L2
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m, offs_n, m_mask, n_mask = _output_tile(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    in_dtype = x_ptr.dtype.element_ty
    PACK: tl.constexpr = 32 // BITS  # values per int32 word
    MASK: tl.constexpr = (1 << BITS) - 1
    # Decode: each packed word is loaded once, then fanned out to its PACK values in registers:
    # [rows, 1, cols] >> [1, PACK, 1], reshaped row-major to the [BLOCK_K, BLOCK_N] tile.
    shifts = tl.arange(0, PACK) * BITS

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :],
                    other=0.0)
        words = _step_words(qweight_ptr, k0, offs_n, n_mask, K, stride_qw, BITS, BLOCK_K, EVEN_K, EVEN_N, FRAGMENTS)
        scale, zero = _group_params(scales_ptr, qzeros_ptr, k0 // GROUP_SIZE, offs_n, n_mask, stride_s, stride_qz,
                                    BITS, ZERO_OFFSET)
        if BLOCK_M > 16:  # prefill: (q - z) * s in fp32, rounded once to x's dtype, as the reference
            q = _step_q_tile(words, magic_bits, BITS, BLOCK_N, FRAGMENTS)
            acc = tl.dot(a, _dequant_tile(q, scale, zero, scales_ptr).to(in_dtype), acc, input_precision=DOT_PRECISION)
        else:  # decode: q - zero is exact in x's dtype, the scale is applied to the tile's dot
            # (MAGIC + q) - (MAGIC + zero): no conversion instruction
            magic_zero = (zero.to(tl.float32) + MAGIC).to(in_dtype)[None, :]
            if FRAGMENTS:  # where the fragment decode kernel cannot run (fp32 x, ROCm): fp32 fields
                w = (_fragment_q_tile(words, magic_bits, BLOCK_N) - zero.to(tl.float32)[None, :]).to(in_dtype)
            elif JOIN_FIELDS:  # the plan allows it for 4-bit weights and 16-bit x only
                # Fields joined as in the prefill tiles: wide shared-memory stores instead of one
                # 16-bit store per weight (sm_90 SASS, gate/up M=16 at Triton 3.6: 17 STS against 129
                # per K step, 5.41 instructions per weight against 6.49, 128 registers against 168).
                # In the sweep, not a default: fewer instructions have not meant faster decode
                w = _half_q_tile(words, pair_bits, in_dtype) - magic_zero
            else:
                q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & MASK, (BLOCK_K, BLOCK_N))
                if MAGIC_BITS != 0:
                    w = (q | MAGIC_BITS).to(tl.int16).to(in_dtype, bitcast=True) - magic_zero
                else:
                    w = (q - zero[None, :]).to(in_dtype)  # |q - zero| < 2**BITS <= 256: exact in every float dtype
            acc += tl.dot(a, w, input_precision=DOT_PRECISION) * scale[None, :]

    tile = pid_m * tl.num_programs(1) + pid_n
    _store_tile(acc, out_ptr, partials_ptr, counters_ptr, bias_ptr, tile, pid_k, M, N,
                offs_m[:, None] * N + offs_n[None, :], offs_n[None, :], m_mask[:, None] & n_mask[None, :],
                HAS_BIAS, SPLIT_K, REDUCE_UNROLL)


# Two 16-bit floats MAGIC + q from nibbles j and j + 4 of a fragment word, plus -(MAGIC + z) in both
# halves at once (an FMA by 1.0: packed bf16 subtract needs sm_90, packed FMA sm_80): rows k and k + 1
# of one column, a whole MMA B register. One asm block per word (the pack of 8: four output
# registers), so Triton never sees the halves apart (a join of 16-bit halves became one PRMT per
# weight, sm_90 SASS). Half a block (``DOT_K`` 64) takes pairs 2H and 2H + 1 of each word: a pack of 4,
# two registers out.
def _fragment_asm(pairs: tuple[int, ...], ptx_type: str, one: str) -> str:
    """The asm text that makes pairs ``pairs`` of a fragment word (operands: ``len(pairs)`` output
    registers, then the pack's copies of the word, of -(MAGIC + z) and of MAGIC's pattern pair)."""
    outs = len(pairs)
    word, neg, pattern = outs, 3 * outs, 5 * outs  # a pack of 2 * outs 16-bit elements: one copy each
    lines = ["{", "    .reg .b32 t, one;", f"    mov.b32 one, {one};"]
    for out, j in enumerate(pairs):
        src = f"${word}"
        if j:
            lines.append(f"    shr.u32 t, ${word}, {4 * j};")
            src = "t"
        lines += [f"    lop3.b32 ${out}, {src}, 0x000F000F, ${pattern}, 0xea;",
                  f"    fma.rn.{ptx_type} ${out}, ${out}, one, ${neg};"]
    return "\n".join(lines + ["}"])


_PTX_HALVES = {torch.bfloat16: ("bf16x2", "0x3F803F80"), torch.float16: ("f16x2", "0x3C003C00")}
FRAGMENT_ASM = {dtype: _fragment_asm((0, 1, 2, 3), *ptx) for dtype, ptx in _PTX_HALVES.items()}
FRAGMENT_HALF_ASM = {dtype: (_fragment_asm((0, 1), *ptx), _fragment_asm((2, 3), *ptx)) for dtype, ptx in _PTX_HALVES.items()}
def _asm_operands(outs: int) -> tl.constexpr:
    """``outs`` output registers, early-clobber (written before the inputs are last read); then the
    pack's copies (two 16-bit elements an output) of 3 inputs, as :func:`_fragment_asm` numbers them."""
    return tl.constexpr(",".join(["=&r"] * outs + ["r"] * 6 * outs))


FRAGMENT_ASM_OPERANDS = _asm_operands(4)
FRAGMENT_HALF_ASM_OPERANDS = _asm_operands(2)


@device_function
def _by_eight(t):
    """``[...]`` -> ``[..., 2, 2, 2]``, every element ``t``'s (the operands of a pack-of-8 asm)."""
    t4 = _by_four(t)
    return tl.join(t4, t4)


@device_function
def _fragment_tile(words, neg_magic_zero, neg_magic_zero_pair, pair_bits, dtype: tl.constexpr, BLOCK_N: tl.constexpr,
                   ASM: tl.constexpr):
    """``[16, BLOCK_N]`` fragment words (one 128-row block, ``qoqopt.packing.pack_fragments``, whose
    row order the permute below undoes), ``[BLOCK_N]`` -(MAGIC + z) as a value and as a 16-bit pair,
    and MAGIC's pattern pair -> ``[128, BLOCK_N]`` ``q - z`` in ``dtype``, exact.

    The words' 16 rows are contiguous in memory, so Triton gives each thread 4 of them (one 16-byte
    load) and spreads the other 4 over lanes; with the nibble order of the layout, every weight then
    lands in the thread and register where the 16-row MMA reads it (kWidth 2: rows k, k + 1 paired),
    and the conversion to the dot operand is a renaming, with no shared memory. ``ASM`` (compiled
    code: the asm text for x's dtype) makes each pair with one lop3 and one packed FMA; as inline
    asm that is not pure, it also ends the chain Triton searches for the operand's original bit
    width, where a join would halve it (kWidth 4, and register moves to rebuild every A fragment).
    The interpreter runs the same arithmetic as Triton ops."""
    if ASM != "":
        zeros = tl.zeros_like(words)  # the pair operands as words-shaped tiles: asm operands share one shape
        operands = [_by_eight(words), _by_eight(neg_magic_zero_pair[None, :] + zeros), _by_eight(pair_bits + zeros)]
        # dtype from a tensor: the asm call does not take a constexpr-wrapped dtype
        t = tl.inline_asm_elementwise(ASM.value, FRAGMENT_ASM_OPERANDS.value, operands, dtype=neg_magic_zero.dtype,
                                      is_pure=False, pack=8)
        w = _fragment_rows(t, BLOCK_N)
    else:  # nibbles J and J + 4 of each word from one masked pair, as the asm makes them
        lo0, hi0 = _half_pair(words, pair_bits, 0, dtype)
        lo1, hi1 = _half_pair(words, pair_bits, 1, dtype)
        lo2, hi2 = _half_pair(words, pair_bits, 2, dtype)
        lo3, hi3 = _half_pair(words, pair_bits, 3, dtype)
        w = _fragment_nibble_rows(lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, BLOCK_N) + neg_magic_zero[None, :]
    return w


@device_function
def _fragment_half_tile(words, neg_magic_zero, neg_magic_zero_pair, pair_bits, dtype: tl.constexpr,
                        BLOCK_N: tl.constexpr, ASM: tl.constexpr, H: tl.constexpr):
    """Rows ``64 H`` to ``64 H + 63`` of :func:`_fragment_tile`'s ``[128, BLOCK_N]`` (``ASM``: the
    half's text of ``FRAGMENT_HALF_ASM``), made from the same words: pairs ``2 H`` and ``2 H + 1`` of
    each. A K step as two dots of 64 rows holds half the dequantized registers at a time."""
    if ASM != "":
        zeros = tl.zeros_like(words)
        operands = [_by_four(words), _by_four(neg_magic_zero_pair[None, :] + zeros), _by_four(pair_bits + zeros)]
        t = tl.inline_asm_elementwise(ASM.value, FRAGMENT_HALF_ASM_OPERANDS.value, operands, dtype=neg_magic_zero.dtype,
                                      is_pure=False, pack=4)
        w = _fragment_half_rows(t, BLOCK_N)
    else:
        lo0, hi0 = _half_pair(words, pair_bits, 2 * H, dtype)
        lo1, hi1 = _half_pair(words, pair_bits, 2 * H + 1, dtype)
        w = _fragment_half_rows(tl.join(tl.join(lo0, lo1), tl.join(hi0, hi1)), BLOCK_N) + neg_magic_zero[None, :]
    return w


@device_function
def _by_four(t):
    """``[...]`` -> ``[..., 2, 2]``, every element ``t``'s (the operands of a pack-of-4 asm)."""
    t2 = tl.join(t, t)
    return tl.join(t2, t2)


@device_function
def _fragment_half_rows(t, BLOCK_N: tl.constexpr):
    """Half a fragment block's values ``[r, n, e1, e0]`` -> ``[64, n]``, as :func:`_fragment_rows`
    with ``e6`` (the half) fixed."""
    # [r, n, e1, e0] -> [rhi, rlo, n, e1, e0] -> [rlo, e1, rhi, e0, n]
    t = tl.permute(tl.reshape(t, (4, 4, BLOCK_N, 2, 2)), (1, 3, 0, 4, 2))
    return tl.reshape(t, (64, BLOCK_N))


@device_function
def _fragment_word_ptrs(qweight_ptr, offs_n):
    """``[16, cols]`` pointers to columns ``offs_n``'s fragment words in the first 128-row block (the
    block of row ``k0`` is ``k0 // 128`` rows of ``stride_qw`` on)."""
    return qweight_ptr + offs_n[None, :] * 16 + tl.arange(0, 16)[:, None]


@device_function
def _fragment_rows(t, BLOCK_N: tl.constexpr):
    """A fragment block's values ``[r, n, e6, e1, e0]`` (word, column, nibble bits) -> ``[128, n]``."""
    # [r, n, e6, e1, e0] -> [rhi, rlo, n, e6, e1, e0] -> [e6, rlo, e1, rhi, e0, n]: k's bits, highest first
    t = tl.permute(tl.reshape(t, (4, 4, BLOCK_N, 2, 2, 2)), (3, 1, 4, 0, 5, 2))
    return tl.reshape(t, (128, BLOCK_N))


@device_function
def _fragment_nibble_rows(n0, n1, n2, n3, n4, n5, n6, n7, BLOCK_N: tl.constexpr):
    """Eight ``[16, BLOCK_N]`` tiles, nibble ``p`` of each fragment word (``p = e1 + 2 e6 + 4 e0``) ->
    ``[128, BLOCK_N]`` in row order."""
    t = tl.join(tl.join(tl.join(n0, n2), tl.join(n1, n3)), tl.join(tl.join(n4, n6), tl.join(n5, n7)))
    return _fragment_rows(t, BLOCK_N)


@device_function
def _fragment_q_tile(words, magic_bits, BLOCK_N: tl.constexpr):
    """``[16, BLOCK_N]`` fragment words -> ``[128, BLOCK_N]`` fp32 ``q`` (``_field`` of each nibble,
    as the prefill tiles read GPTQ words): prefill tiles go through shared memory to the MMA anyway,
    so over fragment words they only read the rows in another order."""
    return _fragment_nibble_rows(_field(words, magic_bits, 0, 4), _field(words, magic_bits, 1, 4),
                                 _field(words, magic_bits, 2, 4), _field(words, magic_bits, 3, 4),
                                 _field(words, magic_bits, 4, 4), _field(words, magic_bits, 5, 4),
                                 _field(words, magic_bits, 6, 4), _field(words, magic_bits, 7, 4), BLOCK_N)


@kernel(do_not_specialize=("M",))
def _w4a16_fragment_kernel(
    x_ptr,  # [M, K]
    qweight_ptr,  # [K / 128, 16 * N] fragment words (qoqopt.packing.pack_fragments)
    qzeros_ptr,  # as in _w4a16_kernel, from here on
    scales_ptr,
    bias_ptr,
    out_ptr,
    partials_ptr,
    counters_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qw,
    stride_qz,
    stride_s,
    k_per_split,  # multiple of 128
    magic_bits,  # unused: the launch passes _w4a16_kernel's arguments (so EVEN_K and MAGIC_BITS too)
    pair_bits,  # MAGIC_BITS in both 16-bit halves
    GROUP_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # always true (K is whole blocks): the launch's common constexprs
    EVEN_N: tl.constexpr,
    MAGIC_BITS: tl.constexpr,  # MAGIC's 16-bit pattern (also in pair_bits, both halves)
    MAGIC: tl.constexpr,  # unused (its bits are)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # 128: one block of fragment words per K step
    DOT_PRECISION: tl.constexpr,
    ASM: tl.constexpr,  # FRAGMENT_ASM of x's dtype; "" under the interpreter (no inline asm there)
    REDUCE_UNROLL: tl.constexpr = 1,
    DOT_K: tl.constexpr = 128,  # 64: each K step as two dots, one per half block (ASM_LO, ASM_HI)
    ASM_LO: tl.constexpr = "",  # FRAGMENT_HALF_ASM of x's dtype where DOT_K is 64
    ASM_HI: tl.constexpr = "",
):
    """Decode (M <= 16) over fragment-ordered 4-bit words: each K step loads one 128-row block of
    words, turns each word into four registers of two ``q - z`` each, and feeds them to the MMA as
    they are (``_fragment_tile``); the group's scale multiplies the step's dot product, as in the
    decode tiles of ``_w4a16_kernel``. sm_90 SASS at gate/up M = 16, 128 x 128 tiles, Triton 3.6
    (the H200 image's): 2.60 instructions per weight against 6.49 for the default decode tile and
    5.41 for JOIN_FIELDS (2.73 before -(MAGIC + z) was built from its bits), and 1 shared-memory
    store per K step against 129 (Triton 3.9: 2.57, 2 stores). ``DOT_K`` 64 keeps that count and
    takes the 128-wide tile from 128 registers a thread to 96. The store left carries the group's
    scales over to the MMA accumulator's layout, behind the K step's second barrier."""
    tl.static_assert(BLOCK_K == 128 and BITS == 4 and GROUP_SIZE % 128 == 0 and (DOT_K == 128 or DOT_K == 64))
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m, offs_n, m_mask, n_mask = _output_tile(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    in_dtype = x_ptr.dtype.element_ty
    word_ptrs = _fragment_word_ptrs(qweight_ptr, offs_n)

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Each step's scales are loaded a step ahead, after the last use of the previous ones (so into the
    # same registers). A 2-byte load a thread is too small for cp.async, so Triton's pipeliner leaves it
    # a plain load in the loop, and loaded where it is used it was stored to shared memory 10
    # instructions later, before a barrier: every warp waited out its latency every K step (sm_90 SASS,
    # Triton 3.6; every other load of the loop is copied stages ahead).
    g_last = (k_end - 1) // GROUP_SIZE
    scale_ptrs = scales_ptr + offs_n
    raw_scale = tl.load(scale_ptrs + (k_start // GROUP_SIZE) * stride_s, mask=n_mask, other=0.0)
    for k0 in range(k_start, k_end, BLOCK_K):
        words = _load(word_ptrs + (k0 // BLOCK_K) * stride_qw, n_mask[None, :], EVEN_N)
        zero = _group_zeros(qzeros_ptr, k0 // GROUP_SIZE, offs_n, n_mask, stride_qz, BITS, ZERO_OFFSET)
        # -(MAGIC + z) from its bits: z (at most 16) is the mantissa of MAGIC + z, and the sign bit
        # negates it. Integer ops only: through fp32, each column took an int->float conversion, a
        # negation and a float->16-bit conversion (quarter rate), 3 of 8 instructions (sm_90 SASS)
        neg = zero + (MAGIC_BITS | 0x8000)
        neg_magic_zero, neg_pair = neg.to(tl.int16).to(in_dtype, bitcast=True), neg | (neg << 16)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + k0 + tl.arange(0, DOT_K)[None, :]
        a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        if DOT_K == BLOCK_K:
            w = _fragment_tile(words, neg_magic_zero, neg_pair, pair_bits, in_dtype, BLOCK_N, ASM)
            dot = tl.dot(a, w, input_precision=DOT_PRECISION)
        else:  # the second half's weights are made after the first half's dot has read its own
            w = _fragment_half_tile(words, neg_magic_zero, neg_pair, pair_bits, in_dtype, BLOCK_N, ASM_LO, 0)
            dot = tl.dot(a, w, input_precision=DOT_PRECISION)
            a = tl.load(x_ptrs + DOT_K, mask=m_mask[:, None], other=0.0)
            w = _fragment_half_tile(words, neg_magic_zero, neg_pair, pair_bits, in_dtype, BLOCK_N, ASM_HI, 1)
            dot = tl.dot(a, w, dot, input_precision=DOT_PRECISION)
        acc += dot * raw_scale.to(tl.float32)[None, :]
        g_next = tl.minimum((k0 + BLOCK_K) // GROUP_SIZE, g_last)
        raw_scale = tl.load(scale_ptrs + g_next * stride_s, mask=n_mask, other=0.0)

    tile = pid_m * tl.num_programs(1) + pid_n
    _store_tile(acc, out_ptr, partials_ptr, counters_ptr, bias_ptr, tile, pid_k, M, N,
                offs_m[:, None] * N + offs_n[None, :], offs_n[None, :], m_mask[:, None] & n_mask[None, :],
                HAS_BIAS, SPLIT_K, REDUCE_UNROLL)


@kernel
def _w4a16_gemv_kernel(
    x_ptr,  # [1, K]
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,  # [1, N] in x's dtype
    partials_ptr,  # as in _w4a16_kernel
    counters_ptr,
    N,
    K,
    stride_qw,
    stride_qz,
    stride_s,
    k_per_split,
    magic_bits,  # FP32_MAGIC_BITS, as an argument: see below
    GROUP_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    REDUCE_UNROLL: tl.constexpr = 1,
):
    """Decode path for one activation row: a tensor-core tile would be 15/16 padding, so this is
    fp32 FMA on CUDA cores. Each weight becomes the exact float q - z by a mask-or into 2**23's
    mantissa, in place, and one FMA; the K tile's sum is scaled once. The tile keeps the
    packing's shape ([words, cols], one field at a time): no reshape, so no layout shuffle through
    shared memory.

    With no dot in the loop, the launch's ``num_stages`` does not pipeline it (sm_90 SASS: plain LDG,
    none in flight across steps). Pipelining it with ``tl.range(..., num_stages=3 or 4)`` (cp.async,
    5.23 instructions per weight against 5.02) ran no faster on the H200: 27.9 us against 27.6 at
    gate/up, 27.5 against 27.2 at down (graph replay, 2026-11-30), so the loop stays plain."""
    PACK: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        scale, zero = _group_params(scales_ptr, qzeros_ptr, k0 // GROUP_SIZE, cols, col_mask, stride_s, stride_qz,
                                    BITS, ZERO_OFFSET)
        offs_wk = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        w_mask = (offs_wk < K // PACK)[:, None] & col_mask[None, :]
        words = _load(qweight_ptr + offs_wk[:, None] * stride_qw + cols[None, :], w_mask, EVEN_K and EVEN_N)
        # Each field becomes q - zero in one LOP3 and one FMA (``_field_minus``), then one FMA into
        # its word row's chain; rows are summed once per tile. (Pre-dividing a by the field's 2**POS
        # instead, with a plain subtract, cost an FMUL per loaded a: 48 of 1202 instructions per K
        # step at 512 x 64, sm_90 SASS, Triton 3.9.)
        # The 2**23 pattern is a kernel argument, not a constexpr: with two immediates (the mask
        # and the pattern) Triton 3.6 emits two LOP3s per weight and 3.9 an extra IMAD; with the
        # pattern in a register, (word & mask | pattern) is one LOP3 (sm_90 SASS: 6.15 and 5.83
        # instructions per weight before, 5.15 and 5.02 after).
        rows = tl.zeros([BLOCK_K // PACK, BLOCK_N], dtype=tl.float32)
        # z through 2**23's mantissa, as the fields: an int->float conversion of each (z + 2**(23 - POS))
        # is what the compiler made of zero.to(float32) (27 I2FP per K step at 512 x 64)
        zero_f = (zero | magic_bits).to(tl.float32, bitcast=True) - FP32_MAGIC
        for half in tl.static_range(2):
            for j in tl.static_range(PACK // 2):
                offs_k = offs_wk * PACK + half * (PACK // 2) + j
                a = _load(x_ptr + offs_k, offs_k < K, EVEN_K).to(tl.float32)
                rows += a[:, None] * _field_minus(words, magic_bits, zero_f[None, :], half * (PACK // 2) + j, BITS)
        acc += tl.sum(rows, axis=0) * scale

    _store_tile(acc, out_ptr, partials_ptr, counters_ptr, bias_ptr, pid_n, pid_k, 1, N, cols, cols, col_mask,
                HAS_BIAS, SPLIT_K, REDUCE_UNROLL)


@device_function
def _store_tile(acc, out_ptr, partials_ptr, counters_ptr, bias_ptr, tile, pid_k, M, N, offs, cols, mask,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, REDUCE_UNROLL: tl.constexpr):
    """Store the tile's final values (bias added, in out's dtype); split K: once every split has
    added its part (:func:`~qoqopt.kernels._splitk.splitk_total`), from the split that came last."""
    if SPLIT_K == 1:
        _store_final(acc, out_ptr, bias_ptr, offs, cols, mask, HAS_BIAS)
    else:
        total, last = splitk_total(acc, partials_ptr, counters_ptr, tile, pid_k, M * N, offs, mask, SPLIT_K,
                                   REDUCE_UNROLL)
        if last:
            _store_final(total, out_ptr, bias_ptr, offs, cols, mask, HAS_BIAS)


@device_function
def _store_final(acc, out_ptr, bias_ptr, offs, cols, mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@kernel
def _w4a16_dequant_kernel(
    qweight_ptr,  # GPTQ words [K * BITS / 32, N], or fragment words [K / 128, 16 * N] (FRAGMENTS)
    qzeros_ptr,  # as in _w4a16_kernel
    scales_ptr,
    w_ptr,  # [K, N] out: the dense weight, in x's dtype
    N,
    K,
    stride_qw,
    stride_qz,
    stride_s,
    magic_bits,  # FP32_MAGIC_BITS
    GROUP_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP_SIZE: one group per tile
    FRAGMENTS: tl.constexpr = False,
):
    """The dense prefill plan's first launch (``KERNEL="dense"``): one ``[BLOCK_K, BLOCK_N]`` tile of
    the layer's weight, dequantized as the prefill tiles dequantize it, written out for cuBLAS."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    words = _step_words(qweight_ptr, k0, offs_n, n_mask, K, stride_qw, BITS, BLOCK_K, EVEN_K, EVEN_N, FRAGMENTS)
    q = _step_q_tile(words, magic_bits, BITS, BLOCK_N, FRAGMENTS)
    scale, zero = _group_params(scales_ptr, qzeros_ptr, k0 // GROUP_SIZE, offs_n, n_mask, stride_s, stride_qz,
                                BITS, ZERO_OFFSET)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :],
             _dequant_tile(q, scale, zero, scales_ptr).to(w_ptr.dtype.element_ty),
             mask=(offs_k < K)[:, None] & n_mask[None, :])


# KERNEL names: the one-row CUDA-core GEMV, tensor-core tiles, decode tiles over fragment words, and
# the dense prefill plan's dequantization (its GEMM is cuBLAS's)
KERNELS = {"gemv": _w4a16_gemv_kernel, "mma": _w4a16_kernel, "frag": _w4a16_fragment_kernel,
           "dense": _w4a16_dequant_kernel}


def _config(m: int, n: int, k: int, group_size: int, device: torch.device, sms: int, overrides: dict) -> dict:
    """Tiles per regime (GEMV for one row, tensor cores above; BLOCK_K of the defaults divides
    group_size), then ``overrides``; the K split follows the resulting tiles unless overridden."""
    cpu = device.type == "cpu"
    fragments = reads_fragment_words(overrides)  # decode tiles at any M <= 16, one row included
    # the dense plan by default from DENSE_MIN_M rows on a GPU; a config naming a kernel or a tile
    # (the sweep, the tests) keeps its own choice
    if overrides.get("KERNEL") == "dense" or (_dense_by_default(m, device) and overrides.keys() <= {"FRAGMENTS"}):
        return _dense_config(group_size, cpu, fragments) | overrides
    if m == 1 and not fragments:  # 128 x 128 tiles: 128 weights per thread per step at 4 warps
        cfg = dict(KERNEL="gemv", BLOCK_N=32 if cpu else 128, BLOCK_K=32 if cpu else 128, num_warps=4, num_stages=3)
    elif m <= DECODE_MAX_M:  # 64 x 128 tiles: 64 dequantized values per thread at 4 warps
        cfg = dict(KERNEL="mma", BLOCK_M=16, BLOCK_N=32 if cpu else 64, BLOCK_K=32 if cpu else 128, num_warps=4,
                   num_stages=3)
        if not cpu and 2 * sms < cdiv(n, 64) <= 4 * sms:  # 64-wide tiles: over two waves, unsplit; half as
            # many 128-wide ones split 3 ways balance better (H200, M=16: gate/up 3584->18944 42 us against
            # 48). Wider layers stay unsplit either way, and 64 wide: the fused gate/up (37888) ran 6 us
            # slower per decoder layer at 128.
            cfg["BLOCK_N"] = 128
    elif m <= 64 or cpu:  # (32 rows on the CPU: the interpreter runs the prefill code at small sizes)
        cfg = dict(KERNEL="mma", BLOCK_M=32 if cpu else 64, BLOCK_N=32 if cpu else 128, BLOCK_K=32 if cpu else 64,
                   num_warps=4, num_stages=4)
    elif m < 512 or cdiv(m, 256) * cdiv(n, 128) < sms:
        cfg = dict(KERNEL="mma", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    else:  # 256 rows share each dequantized weight: per K step 8 wgmma against 311 instructions per thread
        # (128 rows: 4 against 283, i.e. issue-bound; sm_90 SASS, 237 registers, no spill). Only from
        # 512 rows (below, most of a 256-row tile can be padding) and where the tiles fill the GPU
        # unsplit (split-K's epilogue spills at 256 rows). H200 at M=2048: gate/up 0.78 ms against
        # 1.00 at 128 rows, down 0.91 against 1.19, 4 stages 3.6% over 3 at down. (128-row tiles ran
        # 0.80 / 0.94 on 2026-11-29 at 128 registers, two programs per SM; now 130 under Triton 3.6:
        # one. bench_kernels.py --sweep times them capped at 128.)
        cfg = dict(KERNEL="mma", BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)
    cfg["BLOCK_K"] = _in_one_group(cfg["BLOCK_K"], group_size)
    if fragments:  # one block of fragment words per K step
        cfg["BLOCK_K"] = FRAGMENT_K
        if overrides.get("KERNEL") == "frag" and cfg["BLOCK_N"] == 64 and not cpu:  # the sweep's 64-wide
            cfg["num_warps"] = 2  # candidate (fragn64w2s3; 128 wide: fragn128w4s3), offline-compiled by the tests
    cfg |= overrides
    if "SPLIT_K" not in cfg:
        cfg["SPLIT_K"] = _split_k(m, n, k, cfg, device.type == "cpu", sms)
    return cfg


def kernel_blocker(group_size: int) -> str | None:
    """Why the W4A16 kernels cannot run a layer of this group size, or None: each K tile lies in one
    group (it reads one row of scales and zeros), and the smallest tile is 16 rows (a ``tl.dot``'s
    least K)."""
    if group_size % 16:
        return f"group_size {group_size} is not a multiple of 16, the W4A16 kernels' smallest K tile"
    return None


def _in_one_group(block_k: int, group_size: int) -> int:
    """The largest K tile of at most ``block_k`` rows (halving) that lies in one group: each tile reads
    one row of scales and zeros."""
    while group_size % block_k:
        block_k //= 2
    if block_k < 16:
        raise QoqoptError(f"w4a16 kernel: group_size {group_size} must be a multiple of 16")
    return block_k


def _dense_by_default(m: int, device: torch.device) -> bool:
    """Whether the default plan for ``m`` rows on ``device`` is the dense one."""
    return m >= DENSE_MIN_M and device.type != "cpu"


def _dense_config(group_size: int, cpu: bool, fragments: bool) -> dict:
    """The dense prefill plan's dequantization tiles: 128 x 128 (32 x 32 on the CPU), one group deep."""
    block_k = FRAGMENT_K if fragments else _in_one_group(32 if cpu else 128, group_size)
    return dict(KERNEL="dense", BLOCK_N=32 if cpu else 128, BLOCK_K=block_k, num_warps=8, num_stages=1, SPLIT_K=1)


def _split_k(m: int, n: int, k: int, cfg: dict, cpu: bool, sms: int) -> int:
    # Split K only when the output tiles cannot keep the SMs busy (decode; prefill on narrow layers or
    # short prompts: on an H200, k/v 3584->512 at M=128 ran 4 tiles on 132 SMs, 57 us against bf16's 7).
    tiles = cdiv(m, cfg.get("BLOCK_M", 1)) * cdiv(n, cfg["BLOCK_N"])
    k_tiles = cdiv(k, cfg["BLOCK_K"])
    if m <= DECODE_MAX_M:
        split = max(1, min(4 * sms // tiles, k_tiles if cpu else k_tiles // 2))
    elif cpu:
        split = 1
    else:  # MMA-bound tiles, one per SM (~200 registers x 256 threads): as many splits as fit in one wave
        # (a 2nd wave of a few blocks costs a whole tile time), each split at least 4 K tiles deep
        split = max(1, min(sms // tiles, k_tiles // 4))
    return split


@dataclass(frozen=True)
class LaunchPlan:
    kernel: str  # a key of KERNELS
    split: int  # K splits (fp32 partials, summed by each tile's last split)
    k_per_split: int
    grid: tuple[int, int, int] | tuple[int, int]
    constexprs: dict  # kernel constexprs plus num_warps / num_stages


def launch_plan(m, n, k, *, bits, group_size, zero_offset, has_bias, dtype, device, **config) -> LaunchPlan:
    """Which kernel, grid and constexprs ``w4a16_matmul`` launches (also compiled offline by the tests).

    Not memoised here: a plan is made once per shape, by the launch that :func:`shared_launch` keeps."""
    return _launch_plan(m, n, k, bits, group_size, zero_offset, has_bias, dtype, device, num_sms(device),
                        tuple(sorted(config.items())))


def _launch_plan(m, n, k, bits, group_size, zero_offset, has_bias, dtype, device, sms, config) -> LaunchPlan:
    cfg = _config(m, n, k, group_size, device, sms, dict(config))
    kind, split, block_k = cfg.pop("KERNEL"), cfg.pop("SPLIT_K"), cfg["BLOCK_K"]
    assert kind in KERNELS, f"KERNEL={kind!r} is not one of {tuple(KERNELS)}"
    if reads_fragment_words(dict(config)):
        _check_fragment_launch(m, k, bits, group_size, dtype, block_k, kind)
    if "DOT_K" in cfg and (kind != "frag" or cfg["DOT_K"] not in (FRAGMENT_K // 2, FRAGMENT_K)):
        raise QoqoptError(f"DOT_K={cfg['DOT_K']}: the fragment decode kernel's (KERNEL='frag') dot depth, "
                          f"{FRAGMENT_K // 2} or {FRAGMENT_K}; got KERNEL={kind!r}")
    if group_size % block_k:  # a K tile over two groups would read one group's scales for both: wrong
        # results, silently, so not an assert (python -O drops those; configs come from tables too)
        raise QoqoptError(f"BLOCK_K={block_k} must divide group_size={group_size} (one group per K tile)")
    assert kind != "gemv" or m == 1, "the GEMV kernel takes one row"
    if kind == "dense":  # one program per weight tile; the GEMM is cuBLAS's
        assert split == 1 and block_k % (32 // bits) == 0, (split, block_k)
        grid = (cdiv(k, block_k), cdiv(n, cfg["BLOCK_N"]))
        return LaunchPlan(kind, 1, k, grid, dict(GROUP_SIZE=group_size, BITS=bits, ZERO_OFFSET=zero_offset,
                                                 EVEN_K=k % block_k == 0, EVEN_N=n % cfg["BLOCK_N"] == 0) | cfg)
    k_per_split = cdiv(cdiv(k, split), block_k) * block_k
    split = cdiv(k, k_per_split)  # rounding may leave fewer splits
    common = dict(GROUP_SIZE=group_size, BITS=bits, ZERO_OFFSET=zero_offset,
                  HAS_BIAS=has_bias, SPLIT_K=split, EVEN_K=k % block_k == 0,
                  EVEN_N=n % cfg["BLOCK_N"] == 0)
    if kind == "gemv":
        return LaunchPlan(kind, split, k_per_split, (cdiv(n, cfg["BLOCK_N"]), split), common | cfg)
    magic_bits, magic, mantissa = HALF_MAGIC.get(dtype, (0, 0.0, 0))
    if bits > mantissa:
        magic_bits, magic = 0, 0.0
    cfg |= dict(DOT_PRECISION=dot_precision(dtype), MAGIC_BITS=magic_bits, MAGIC=magic)
    if kind == "frag":
        asm = device.type == "cuda" and not interpreter_enabled()
        halves = cfg.get("DOT_K", FRAGMENT_K) != FRAGMENT_K  # each K step as two dots: the half blocks' texts
        cfg["ASM"] = FRAGMENT_ASM[dtype] if asm and not halves else ""
        if halves:
            cfg["ASM_LO"], cfg["ASM_HI"] = FRAGMENT_HALF_ASM[dtype] if asm else ("", "")
    # the kernel would quietly run its plain tile otherwise, and a sweep row would time the wrong code
    assert not cfg.get("JOIN_FIELDS") or (cfg["BLOCK_M"] <= 16 and magic_bits and bits == 4 and not cfg.get("FRAGMENTS")), \
        "JOIN_FIELDS builds 16-row decode tiles of 4-bit GPTQ words for fp16/bf16 activations only"
    grid = (cdiv(m, cfg["BLOCK_M"]), cdiv(n, cfg["BLOCK_N"]), split)
    return LaunchPlan(kind, split, k_per_split, grid, common | cfg)


def reads_fragment_words(config: dict) -> bool:
    """Whether a launch ``config`` reads fragment words (``qoqopt.packing.gptq_to_fragments``) instead
    of GPTQ's: the decode kernel over them, or the tensor-core tiles with ``FRAGMENTS``."""
    return config.get("KERNEL") == "frag" or bool(config.get("FRAGMENTS"))


def qweight_shape(k: int, n: int, bits: int, fragments: bool) -> tuple[int, int]:
    """``qweight``'s shape for a ``K x N`` layer: GPTQ's ``[K * bits / 32, N]``, or fragment words'."""
    return (k // FRAGMENT_K, 16 * n) if fragments else (k * bits // 32, n)


def fragment_words_fit(bits: int, k: int, group_size: int) -> bool:
    """Whether a layer's weights can be held as fragment words: 4-bit, K and the groups whole
    128-row blocks (the 7B's every linear; one group per K step)."""
    return bits == 4 and k % FRAGMENT_K == 0 and group_size % FRAGMENT_K == 0


# apply()'s default repacks a layer as fragment words only from this width: on an H200 (2026-11-30,
# CUDA graphs, bf16) k/v (3584 -> 512) decoded in 7.1 / 8.2 us over fragment words at M = 1 / 16
# against 5.9 / 5.7 over GPTQ words, while q/o (3584 wide) went from 7.9 / 11.8 to 6.9 / 7.6 and
# the wider layers from 27 / 41 to 17-18 / 18-19. Widths between 512 and 3584 are untimed.
FRAGMENT_MIN_N = 1024


def fragment_words_pay(n: int) -> bool:
    """Whether fragment words decode an ``n``-wide layer faster than GPTQ words (as measured)."""
    return n >= FRAGMENT_MIN_N


def fragment_launch(m: int, dtype: torch.dtype) -> dict:
    """The launch config over fragment words at ``m`` rows: the decode kernel where it runs (16-bit x,
    up to 16 rows, NVIDIA), else the tensor-core tiles (prefill rows; fp32 or ROCm decode)."""
    return dict(KERNEL="frag") if _fragment_decodes(m, dtype) else dict(FRAGMENTS=True)


def rules_launch(m: int, dtype: torch.dtype, fragments: bool) -> dict:
    """The config the rules launch at ``m`` rows over a layer's words (no tuning table): the plan's
    defaults, over fragment words :func:`fragment_launch`'s."""
    return fragment_launch(m, dtype) if fragments else {}


def _fragment_decodes(m: int, dtype: torch.dtype) -> bool:
    return m <= DECODE_MAX_M and dtype in FRAGMENT_ASM and torch.version.hip is None


def _check_fragment_launch(m, k, bits, group_size, dtype, block_k, kind: str) -> None:
    """Refuse a fragment-word launch the kernels cannot run (a config error that ``w4a16_matmul``'s
    keyword arguments can reach, so not an assert): ``KERNEL="frag"`` decodes, ``FRAGMENTS=True``
    runs the tensor-core tiles (at decode rows, the 16-row ones)."""
    if kind == "gemv":
        raise QoqoptError("the GEMV (KERNEL='gemv') reads GPTQ words only, not fragment words")
    tiles = kind in ("mma", "dense")
    words_ok = fragment_words_fit(bits, k, group_size) and block_k == FRAGMENT_K
    if tiles and not words_ok:
        raise QoqoptError(f"FRAGMENTS=True reads 4-bit weights, K and group_size multiples of {FRAGMENT_K}; "
                          f"got M={m}, K={k}, bits={bits}, group_size={group_size}, BLOCK_K={block_k}")
    if not tiles and not (words_ok and _fragment_decodes(m, dtype)):
        raise QoqoptError(f"KERNEL='frag' decodes (M <= {DECODE_MAX_M}) 4-bit weights for fp16/bf16 x on NVIDIA GPUs, "
                          f"K and group_size multiples of {FRAGMENT_K}; got M={m}, K={k}, bits={bits}, "
                          f"group_size={group_size}, {dtype}, BLOCK_K={block_k}")


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bits: int = 4,
    group_size: int,
    zero_offset: int,
    out: torch.Tensor | None = None,
    **config,
) -> torch.Tensor:
    """``x [M, K] @ dequant(W) [K, N] (+ bias)`` in x's dtype, W in the GPTQ layout (``zero_offset`` 1
    for v1 checkpoints, 0 for v2 and for repacked AWQ); with ``KERNEL="frag"`` (decode) or
    ``FRAGMENTS=True`` (the tensor-core tiles), ``qweight`` holds fragment words instead
    (``qoqopt.packing.gptq_to_fragments``; :func:`fragment_launch` picks between them)."""
    assert bits in (4, 8) and zero_offset in (0, 1), (bits, zero_offset)
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be [M, K] with unit column stride, got {tuple(x.shape)}"
    m, k = x.shape
    n = scales.shape[1]
    assert qweight.shape == qweight_shape(k, n, bits, reads_fragment_words(config)) and qweight.is_contiguous(), \
        f"qweight {tuple(qweight.shape)} vs K={k}, N={n}"
    assert scales.shape[0] == cdiv(k, group_size) and qzeros.shape[0] == scales.shape[0], "groups disagree"
    assert out is None or (out.shape == (m, n) and out.is_contiguous()), f"out must be contiguous [{m}, {n}]"
    if m == 0:
        return out if out is not None else torch.empty(m, n, device=x.device, dtype=x.dtype)
    if config:
        launch = prepare_w4a16(m, k, n, x.dtype, x.device, has_bias=bias is not None, bits=bits,
                               group_size=group_size, zero_offset=zero_offset, **config)
    else:
        launch = shared_launch(m, k, n, x.dtype, x.device, bias is not None, bits, group_size, zero_offset)
    return launch(x, qweight, qzeros, scales, bias, out)


def prepare_w4a16(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, *, has_bias: bool,
                  bits: int = 4, group_size: int, zero_offset: int, **config):
    """Plan ``[m, k] @ [k, n]`` once; returns ``launch(x, qweight, qzeros, scales, bias=None, out=None)``.

    A decode step calls each linear with the same M again and again: ``QuantLinear`` keeps one launch
    per M, leaving only the output allocation and the kernel launch on the per-call path, and after
    its first call the launch goes to the compiled kernel directly, past Triton's dispatch
    (:class:`~qoqopt.kernels._triton.BoundLaunch`). The launch holds no tensors (the layer's are
    passed in, checked by the caller), so it never pins a weight.
    """
    plan = launch_plan(m, n, k, bits=bits, group_size=group_size, zero_offset=zero_offset,
                       has_bias=has_bias, dtype=dtype, device=device, **config)
    matmul = KERNELS[plan.kernel][device].bind(plan.grid, plan.constexprs)
    if plan.kernel == "dense":
        return _dense_launch(k, n, dtype, matmul)
    tiles = math.prod(plan.grid[:-1])
    pair_bits = plan.constexprs.get("MAGIC_BITS", 0) * 0x10001

    def launch(x, qweight, qzeros, scales, bias=None, out=None) -> torch.Tensor:
        if out is None:
            out = torch.empty(m, n, device=device, dtype=dtype)
        partials, counters = splitk_operands(device, plan.split, m * n, tiles, scales)
        operands = (x, qweight, qzeros, scales, bias if bias is not None else scales, out, partials, counters)
        strides = (qweight.stride(0), qzeros.stride(0), scales.stride(0), plan.k_per_split)
        if plan.kernel == "gemv":
            matmul(*operands, n, k, *strides, FP32_MAGIC_BITS.value)
        else:
            matmul(*operands, m, n, k, x.stride(0), *strides, FP32_MAGIC_BITS.value, pair_bits)
        return out

    launch.matmul = matmul  # the kernel launch it makes (tests and offline compiles read it)
    return launch


def _dense_launch(k, n, dtype, dequantize):
    """The dense prefill plan: the whole weight dequantized into a ``[K, N]`` temporary of x's dtype,
    then cuBLAS. Prompts are compute-bound, and cuBLAS runs them at about twice the rate of the
    dequantizing tiles (H200, 7B gate/up at M = 2048, 2026-11-30: bf16 matmul 0.37-0.41 ms against
    0.76), while writing the weight out costs about what reading it as bf16 costs once. The temporary
    is one layer's weight at a time (272 MB for a 7B's fused gate/up), freed to the caching
    allocator after the call. Like the Triton launches, it records no autograd history: under
    autograd, ``mm`` would keep every layer's temporary alive for a backward pass that never comes.
    fp32 follows torch's own matmul precision switch (``torch.backends.cuda.matmul.allow_tf32``,
    off by default), as the model's other fp32 matmuls do."""

    def dense_weight(qweight, qzeros, scales) -> torch.Tensor:
        w = torch.empty(k, n, device=qweight.device, dtype=dtype)  # (offline compiles: CPU stand-ins)
        dequantize(qweight, qzeros, scales, w, n, k, qweight.stride(0), qzeros.stride(0), scales.stride(0),
                   FP32_MAGIC_BITS.value)
        return w

    @torch.no_grad()
    def launch(x, qweight, qzeros, scales, bias=None, out=None) -> torch.Tensor:
        w = dense_weight(qweight, qzeros, scales)
        if bias is None:
            return torch.mm(x, w, out=out)
        return torch.addmm(bias.to(dtype), x, w, out=out)

    launch.matmul = dequantize  # the kernel launch it makes (tests and offline compiles read it)
    launch.dense_weight = dense_weight  # offline compiles launch only this (no GEMM on CPU stand-ins)
    return launch


def shared_launch(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, has_bias: bool, bits: int,
                  group_size: int, zero_offset: int, fragments: bool = False):
    """:func:`prepare_w4a16` with the default tiles (over fragment words: :func:`fragment_launch`'s),
    or at decode sizes those of this GPU's tuning table where it has the shape (:mod:`.tuning`),
    one per shape for the whole process.

    A prefill calls every layer once with the prompt's M: planned per layer, each of a 7B's 196
    linears paid the plan, the bind and Triton's dispatch (28-35 us a call on the CI machine's CPU,
    against 8-10 for the shared launch; ``benchmarks/bench_host_cost.py``). Shared, the 28 layers of one
    shape make one launch between them, bound after its first call. A launch holds no tensors, so
    the cache pins no weight."""
    if _dense_by_default(m, device):  # the dense plan does not depend on M: one launch for every
        m = DENSE_MIN_M  # prompt length, not a new plan, bind and dispatch for each
    tuned = _tuned(m, k, n, dtype, device, bits, group_size, fragments)
    return _shared_launch(m, k, n, dtype, device, has_bias, bits, group_size, zero_offset, fragments, num_sms(device),
                          tuned)


def _tuned(m, k, n, dtype, device, bits, group_size, fragments) -> tuning.Tuned | None:
    """This GPU's tuned decode config for the launch, if its table has one."""
    if m > DECODE_MAX_M or device.type != "cuda" or interpreter_enabled():
        return None
    return tuning.lookup(tuning.device_name(device), words="fragments" if fragments else "gptq", bits=bits,
                         group_size=group_size, k=k, n=n, m=m, dtype=dtype)


@functools.lru_cache(maxsize=256)
def _shared_launch(m, k, n, dtype, device, has_bias, bits, group_size, zero_offset, fragments, sms, tuned):
    # sms: the plan's input
    config = tuned.config if tuned else rules_launch(m, dtype, fragments)
    try:
        return prepare_w4a16(m, k, n, dtype, device, has_bias=has_bias, bits=bits, group_size=group_size,
                             zero_offset=zero_offset, **config)
    except (AssertionError, QoqoptError) as err:
        if tuned is None:
            raise
        raise QoqoptError(f"W4A16 tuning table {tuned.source}: {config} does not fit the {k}->{n} layer at M={m} "
                          f"({err}); QOQOPT_KERNEL_TUNING=off runs the default tiles") from err


# Elements of int32 scratch per step of the reference dequantization: a few MB, which stay in cache
# and in the heap between steps (a whole-layer temporary is a fresh mmap, page-faulted on every call).
_DEQUANT_STEP = 1 << 20


def dequantize_weight(qweight, qzeros, scales, *, bits=4, group_size, zero_offset, dtype=torch.float32) -> torch.Tensor:
    """``[K, N]`` weight of a GPTQ-layout layer, computed in fp32 and rounded once to ``dtype``.

    The same numbers as :func:`qoqopt.packing.dequantize` over the unpacked integers, bit for bit
    (``q - zero`` is exact in int32, then one fp32 product with the scale), but a few whole groups of
    rows at a time into one output buffer: this runs over the whole layer on every call wherever
    Triton is not used (CPU runs, ``qoqopt bench`` on CPU).
    """
    per_word, mask, n = 32 // bits, 2**bits - 1, scales.shape[1]
    # int32 >> is arithmetic: the top field of a negative word drags sign bits, which the mask drops
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device).view(1, per_word, 1)
    zeros = (qzeros.unsqueeze(2) >> shifts.view(-1)).bitwise_and_(mask).view(qzeros.shape[0], -1)[:, :n]
    zeros = (zeros + zero_offset).unsqueeze(1)  # [G, 1, N]
    scales = scales.float().unsqueeze(1)
    out = torch.empty(qweight.shape[0] * per_word, n, dtype=dtype, device=qweight.device)
    # a step starts on a whole word: ``word_groups`` groups of rows fill whole words
    word_groups = per_word // math.gcd(group_size, per_word)
    groups = max(1, _DEQUANT_STEP // (group_size * n * word_groups)) * word_groups
    for g in range(0, scales.shape[0], groups):
        words = qweight[g * group_size // per_word : (g + groups) * group_size // per_word]
        q = (words.unsqueeze(1) >> shifts).bitwise_and_(mask).view(-1, group_size, n)
        q.sub_(zeros[g : g + groups])
        # int32 * fp32 is computed in fp32 (exact conversion, one rounding), then cast to out's dtype
        torch.mul(q, scales[g : g + groups], out=out[g * group_size : g * group_size + q.numel() // n].view(q.shape))
    return out


def w4a16_reference(x, qweight, qzeros, scales, bias=None, *, bits=4, group_size, zero_offset) -> torch.Tensor:
    """Torch reference: dequantize in fp32, round to x's dtype, ``F.linear``."""
    w = dequantize_weight(qweight, qzeros, scales, bits=bits, group_size=group_size, zero_offset=zero_offset, dtype=x.dtype)
    return F.linear(x, w.t(), None if bias is None else bias.to(x.dtype))


class QuantLinear(nn.Module):
    """Inference ``nn.Linear`` replacement over GPTQ (v1, v2) / AWQ GEMM tensors, with no other kernel library.

    Buffers (``qweight``, ``qzeros``, ``scales``) hold the GPTQ layout: a GPTQ layer's as stored,
    except that an act-order layer is K-permuted (``perm``, derived from ``g_idx``, holds the
    permutation, applied to the input); an AWQ layer's repacked as GPTQ v2 (``source`` says which
    it came from). :meth:`use_fragment_words` repacks ``qweight`` in memory for the fragment-word
    kernels (``words`` says which layout it holds). ``state_dict`` and loading keep the checkpoint's
    layout either way: GPTQ's words in input order, and ``g_idx`` where the layer had one. A group size
    the kernels cannot run (``kernel_blocker``) runs the torch reference on every call.
    """

    def __init__(self, qweight, qzeros, scales, bias, *, bits, group_size, zero_offset, perm=None, g_idx=None,
                 source="gptq", strict=False):
        super().__init__()
        self.bits, self.group_size, self.zero_offset, self.source = bits, group_size, zero_offset, source
        self.in_features = qweight.shape[0] * 32 // bits
        self.out_features = scales.shape[1]
        self.strict = strict
        self.kernel_blocker = kernel_blocker(group_size)  # set: every call runs the torch reference
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("qzeros", qzeros.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        if perm is not None and g_idx is None:  # a checkpoint of this layer needs its groups
            g_idx = (torch.argsort(perm) // group_size).int()
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("perm", perm, persistent=False)  # from g_idx, which checkpoints keep
        self.words = "gptq"  # or "fragments": what qweight holds (use_fragment_words)
        # checked at every launch (a tuple compare on the decode path), so kept, not derived per call
        self._qweight_shape = qweight_shape(self.in_features, self.out_features, bits, fragments=False)
        self._launchers: dict = {}  # (M, dtype, device, has bias) -> planned launch; decode sizes only

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, bias=None, *, bits=4, checkpoint_format="gptq",
                  group_size=None, strict=False):
        """From GPTQ tensors; ``checkpoint_format`` "gptq" (v1, zero - 1 stored) or "gptq_v2";
        ``group_size`` as the checkpoint states it (-1: one group), where known."""
        if bits not in (4, 8) or checkpoint_format not in ("gptq", "gptq_v2"):
            raise QoqoptError(f"GPTQ: unsupported bits={bits} / checkpoint_format={checkpoint_format!r}")
        k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
        # qzeros packs along N: a last, partial word where N is not a multiple of 32 / bits
        _check_words("GPTQ", qweight, qzeros, scales, (scales.shape[0], cdiv(n * bits, 32)), n)
        group_size = _group_size("GPTQ", k, scales.shape[0], group_size)
        perm = _act_order_perm(g_idx, k, group_size)
        if perm is not None:  # make groups contiguous: permute K once, here
            qweight = permute_packed_rows(qweight, perm, bits)
        zero_offset = 1 if checkpoint_format == "gptq" else 0
        return cls(qweight, qzeros, scales, bias, bits=bits, group_size=group_size, zero_offset=zero_offset,
                   perm=perm, g_idx=g_idx, strict=strict)

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, bias=None, *, group_size=None, strict=False):
        """From AWQ GEMM tensors (4-bit, zeros without offset), repacked as GPTQ v2; ``group_size``
        as the checkpoint states it, where known."""
        k, n = qweight.shape[0], qweight.shape[1] * 8
        _check_words("AWQ", qweight, qzeros, scales, (scales.shape[0], n // 8), n)
        group_size = _group_size("AWQ", k, scales.shape[0], group_size)
        if k % 8:
            raise QoqoptError(f"AWQ: K={k} must be a multiple of 8 to run as packed along K")
        qweight, qzeros = awq_to_gptq_v2(qweight, qzeros)
        return cls(qweight, qzeros, scales, bias, bits=4, group_size=group_size, zero_offset=0, source="awq",
                   strict=strict)

    @classmethod
    def from_module(cls, mod: nn.Module, strict: bool = False) -> "QuantLinear":
        """From a foreign GPTQ/AWQ linear (:func:`foreign_method` tells which). Shapes that are not
        the format's plain words are refused with their likely cause: a kernel's repack at load.

        GPTQModel keeps v1 checkpoints in v2 form in memory and says so through ``qzero_format()``.
        """
        if isinstance(mod, cls):
            mod.strict = strict
            return mod
        try:
            return cls._from_foreign(mod, strict)
        except NotPlainWords as err:
            raise QoqoptError(f"{type(mod).__name__}: {err}; {REPACKED_AT_LOAD}") from err

    @classmethod
    def _from_foreign(cls, mod: nn.Module, strict: bool) -> "QuantLinear":
        bias = getattr(mod, "bias", None)
        group_size = getattr(mod, "group_size", None)  # GPTQModel's, AutoGPTQ's and AutoAWQ's layers say it
        method, bits = foreign_method(mod)
        if method == "gptq":
            fmt = getattr(mod, "qzero_format", None)
            fmt = fmt() if callable(fmt) else fmt
            checkpoint_format = "gptq_v2" if fmt == 2 else "gptq"
            return cls.from_gptq(mod.qweight, mod.qzeros, mod.scales, mod.g_idx, bias, bits=bits,
                                 checkpoint_format=checkpoint_format, group_size=group_size, strict=strict)
        if method == "awq" and bits == 4:
            return cls.from_awq(mod.qweight, mod.qzeros, mod.scales, bias, group_size=group_size, strict=strict)
        if method == "awq":
            raise QoqoptError(f"{type(mod).__name__}: AWQ with bits={bits}; the W4A16 kernels read 4-bit AWQ")
        raise QoqoptError(f"{type(mod).__name__}: not a recognised GPTQ (g_idx, bits) or AWQ (w_bit, or bits "
                          "without g_idx) linear")

    def _kwargs(self) -> dict:
        return dict(bits=self.bits, group_size=self.group_size, zero_offset=self.zero_offset)

    def use_fragment_words(self, only_where_faster: bool = False) -> bool:
        """Repack ``qweight`` as fragment words (``qoqopt.packing.gptq_to_fragments``: same bytes, rows
        ordered as the tensor cores read them) where the layer fits them (4-bit, K and groups whole
        128-row blocks) and, ``only_where_faster``, is wide enough for them to pay
        (:func:`fragment_words_pay`); returns whether it holds them now."""
        if only_where_faster and not fragment_words_pay(self.out_features):
            return self.words == "fragments"
        if self.words == "gptq" and fragment_words_fit(self.bits, self.in_features, self.group_size):
            self.qweight = gptq_to_fragments(self.qweight)
            self.words, self._launchers = "fragments", {}
            self._qweight_shape = qweight_shape(self.in_features, self.out_features, self.bits, fragments=True)
        return self.words == "fragments"

    def gptq_qweight(self) -> torch.Tensor:
        """``qweight`` in GPTQ's layout, whichever the layer holds."""
        return fragments_to_gptq(self.qweight) if self.words == "fragments" else self.qweight

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # the checkpoint's layout, in K order
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.source == "awq":
            destination[prefix + "qweight"], destination[prefix + "qzeros"] = gptq_v2_to_awq(self.gptq_qweight(), self.qzeros)
        elif self.words == "fragments" or self.perm is not None:
            words = self.gptq_qweight()
            if self.perm is not None and words.device.type != "meta":
                words = permute_packed_rows(words, torch.argsort(self.perm), self.bits)
            destination[prefix + "qweight"] = words

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        seen = len(errors)  # the whole load's errors: this layer's are the ones after these
        if self.source == "awq":
            state_dict = self._awq_in(state_dict, prefix, local_metadata, errors)
        perm = self._perm_in(state_dict, prefix, errors) if len(errors) == seen else None
        if len(errors) == seen:
            state_dict = self._gptq_in(state_dict, prefix, local_metadata, perm, errors)
        if len(errors) > seen:
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if len(errors) == seen:
            self.perm = None if perm is None else perm.to(self.qweight.device)
            self._launchers = {}

    def _perm_in(self, state_dict, prefix, errors) -> torch.Tensor | None:
        """The act-order permutation after this load: the loaded g_idx's, else the one held."""
        g_key = prefix + "g_idx"
        if g_key not in state_dict:
            return self.perm
        g_idx = state_dict[g_key]
        try:
            perm = None if g_idx.device.type == "meta" else _act_order_perm(g_idx, self.in_features, self.group_size)
        except QoqoptError as exc:
            errors.append(f"{g_key}: {exc}")
            return None
        if prefix + "qweight" not in state_dict and not _same_perm(perm, self.perm):  # words held in the old order
            errors.append(f"{g_key}: a new act order for this layer; load its qweight with it")
        elif self.g_idx is None:  # a layer built without one takes the checkpoint's
            self.g_idx = torch.empty_like(g_idx, device=self.qweight.device)
        return perm

    def _gptq_in(self, state_dict, prefix, local_metadata, perm, errors) -> dict:
        """A checkpoint's GPTQ qweight (input order) as this layer holds it: K-permuted, fragment words."""
        key = prefix + "qweight"
        if key not in state_dict or (perm is None and self.words != "fragments"):
            return state_dict
        gptq = state_dict[key]
        if gptq.shape != qweight_shape(self.in_features, self.out_features, self.bits, fragments=False):
            errors.append(f"{key}: GPTQ qweight of shape {tuple(gptq.shape)} does not fit this "
                          f"{self.in_features}->{self.out_features} layer")
            return state_dict
        # assign=True keeps the state's tensors where they are; meta tensors have no values to repack
        device = gptq.device if local_metadata.get("assign_to_params_buffers") else self.qweight.device
        if "meta" in (gptq.device.type, device.type):
            return {**state_dict, key: torch.empty(self._qweight_shape, dtype=torch.int32, device="meta")}
        words = gptq.to(device)
        if perm is not None:
            words = permute_packed_rows(words, perm.to(device), self.bits)
        return {**state_dict, key: gptq_to_fragments(words) if self.words == "fragments" else words}

    def _awq_in(self, state_dict, prefix, local_metadata, errors) -> dict:
        """A checkpoint's AWQ tensors (either or both) as this layer holds them, GPTQ v2."""
        out = dict(state_dict)
        for name, shape, convert in (("qweight", (self.in_features, self.out_features // 8), awq_qweight_to_gptq_v2),
                                     ("qzeros", (self.scales.shape[0], self.out_features // 8), awq_zeros_to_gptq_v2)):
            t = state_dict.get(prefix + name)
            if t is None:
                continue
            if t.shape != shape:
                errors.append(f"{prefix}{name}: AWQ {name} of shape {tuple(t.shape)} does not fit this "
                              f"{self.in_features}->{self.out_features} layer")
                return state_dict
            device = t.device if local_metadata.get("assign_to_params_buffers") else self.qweight.device
            out[prefix + name] = convert(t.to(device))  # meta in, meta out
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._rows(x)
        if not self._runs_triton(x2):
            check_supported(x.device, x.dtype, "QuantLinear")
            y = self._reference(x2)
        elif x2.shape[0] == 0:
            y = x2.new_empty(0, self.out_features)
        else:
            b = self._buffers
            if b["qweight"].shape != self._qweight_shape:  # the launch reads raw pointers: a swapped-in
                # tensor of the other layout (same size) would run and give garbage
                raise QoqoptError(f"QuantLinear holds {self.words} words of shape {self._qweight_shape}, "
                                  f"got qweight {tuple(b['qweight'].shape)}")
            y = self._launcher(x2)(x2.contiguous(), b["qweight"], b["qzeros"], b["scales"], b["bias"])
        return y.reshape(*x.shape[:-1], self.out_features)

    def _runs_triton(self, x2: torch.Tensor) -> bool:
        if self.kernel_blocker is None:
            return use_triton(x2, self.strict, "QuantLinear")
        if self.strict:
            raise QoqoptError(f"QuantLinear: {self.kernel_blocker} (strict=True: no torch reference instead)")
        return False

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` through the torch reference, whatever the backend (``x`` ``[..., K]``)."""
        return self._reference(self._rows(x)).reshape(*x.shape[:-1], self.out_features)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[M, K]`` rows in the order the words hold K (act order: permuted)."""
        x2 = x.reshape(-1, self.in_features)
        return x2 if self.perm is None else x2.index_select(1, self.perm)

    def _reference(self, x2: torch.Tensor) -> torch.Tensor:
        return w4a16_reference(x2, self.gptq_qweight(), self.qzeros, self.scales, self.bias, **self._kwargs())

    def _launcher(self, x2: torch.Tensor):
        """The planned launch for x2's M, dtype and device (shared by every layer of this shape); decode
        sizes (M <= 16) are also kept here, a dict lookup cheaper than the shared cache's."""
        key = (x2.shape[0], x2.dtype, x2.device, self._buffers["bias"] is not None)
        launch = self._launchers.get(key)
        if launch is None:
            check_supported(x2.device, x2.dtype, "QuantLinear")
            launch = shared_launch(x2.shape[0], self.in_features, self.out_features, x2.dtype, x2.device, key[3],
                                   self.bits, self.group_size, self.zero_offset, self.words == "fragments")
            if x2.shape[0] <= DECODE_MAX_M:
                self._launchers[key] = launch
        return launch

    def __getstate__(self):  # launches are closures (not picklable) and cheap to plan again
        state = self.__dict__.copy()
        state["_launchers"] = {}
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, source={self.source}, "
                f"bits={self.bits}, group_size={self.group_size}, act_order={self.perm is not None}, words={self.words}")


def foreign_method(mod: nn.Module) -> tuple[str | None, int | None]:
    """("gptq" or "awq", bits) of a foreign packed linear, by what it carries: GPTQ layers (AutoGPTQ's,
    GPTQModel's) have ``g_idx`` and ``bits``; AutoAWQ's have ``w_bit``; GPTQModel's AWQ layers (what
    transformers 5 builds for an AWQ checkpoint) have ``bits`` and no ``g_idx``. (None, None) otherwise."""
    if hasattr(mod, "g_idx") and hasattr(mod, "bits"):
        return "gptq", mod.bits
    if hasattr(mod, "w_bit"):
        return "awq", mod.w_bit
    if hasattr(mod, "bits"):
        return "awq", mod.bits
    return None, None


# Why a foreign layer's words are not the checkpoint's, and what to do instead
REPACKED_AT_LOAD = ("its words are likely a kernel's repack at load (GPTQModel's ExllamaV2, Marlin or Machete "
                    "layers reorder them); load the build with qoqopt.exports.hf_quant.load_with_quant_linear instead")

# Largest relative (Frobenius) error accepted between a foreign layer's own forward and the same
# input through the replacement's torch reference. Read right, the two differ only by rounding: the
# reference rounds each weight to x's dtype (bf16: 2**-9 relative) and the foreign kernels their
# output, some their partial sums in fp16 (ExllamaV2's atomics): 1.3e-3 at most in the tests, 3e-3
# for bf16 against exact at K = 3584. Read wrong, they differ by the weights themselves: ExllamaV2's
# nibble shuffle gave 0.77 (0.95 with its act-order rows), a zero point off by one about 0.1 at 4 bits.
FOREIGN_CHECK_RTOL = 2e-2


def check_foreign(foreign: nn.Module, layer: "QuantLinear", dtype: torch.dtype, rows: int = 4) -> None:
    """Refuse ``layer`` (QoqoptError) unless it computes what ``foreign``, the module it replaces,
    computes on a few random rows of ``dtype``. A module with no forward of its own (nothing can
    call it) has nothing to disagree with and is taken as it is."""
    if type(foreign).forward is nn.Module.forward:
        return
    name = type(foreign).__name__
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(layer.qweight.device, dtype)
    with torch.no_grad():
        try:
            want = foreign(x)
        except Exception as exc:  # a kernel it needs (a GPU's), or anything else: it cannot be compared
            first = (str(exc).splitlines() or [""])[0][:200]
            raise QoqoptError(f"{name}: could not be checked against its own forward, which raised "
                              f"{type(exc).__name__}: {first}") from exc
        got = layer.reference_forward(x)
    error = _relative_error(got, want)
    if not error <= FOREIGN_CHECK_RTOL:  # NaN fails too
        fmt = "AWQ GEMM" if layer.source == "awq" else "GPTQ"
        raise QoqoptError(f"{name}: its own forward and the {fmt} reading of its tensors differ (relative error "
                          f"{error:.3g} > {FOREIGN_CHECK_RTOL}): {REPACKED_AT_LOAD}")


def _relative_error(got: torch.Tensor, want) -> float:
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return math.inf
    want = want.float()
    return ((got.float() - want).norm() / want.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()


class NotPlainWords(QoqoptError):
    """Packed tensors whose shapes are not the checkpoint layout's (a kernel's repacked words, say)."""


def _check_words(fmt: str, qweight, qzeros, scales, qzeros_shape: tuple[int, int], n: int) -> None:
    """Refuse tensors not shaped as ``fmt``'s plain words, given the qzeros and the N that ``qweight``
    implies (``scales`` ``[groups, N]``)."""
    if tuple(qzeros.shape) != qzeros_shape or scales.dim() != 2 or scales.shape[1] != n:
        raise NotPlainWords(f"{fmt}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                            f"{tuple(scales.shape)} are not {fmt}'s plain packed words (that qweight "
                            f"needs qzeros {qzeros_shape} and scales ({qzeros_shape[0]}, {n}))")


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a.cpu(), b.cpu()))


def _group_size(fmt: str, k: int, groups: int, stated: int | None) -> int:
    """Rows per group: as stated (-1: all of K), else K over the scales' rows. Only whole groups run:
    with 200 rows in 2 groups the groups could be 128 + 72 as well as 100 + 100, and no tensor says."""
    if stated is None:
        if k % groups:
            raise QoqoptError(f"{fmt}: K={k} is not a whole number of {groups} groups")
        return k // groups
    group_size = k if stated == -1 else stated
    if group_size <= 0 or k % group_size or k // group_size != groups:
        raise QoqoptError(f"{fmt}: K={k} in groups of {stated} rows does not give the {groups} groups its scales "
                          "hold (only whole groups are supported)")  # fmt: skip
    return group_size


def _act_order_perm(g_idx: torch.Tensor | None, k: int, group_size: int) -> torch.Tensor | None:
    """None for trivial g_idx; else the K permutation that sorts rows by group."""
    if g_idx is None:
        return None
    trivial = torch.arange(k, device=g_idx.device) // group_size
    if torch.equal(g_idx.long(), trivial):
        return None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], trivial):
        raise QoqoptError(f"GPTQ g_idx: groups are not {group_size} rows each; cannot make them contiguous")
    return perm


def replace_linears(model: nn.Module, tensors, *, method: str, bits: int = 4, checkpoint_format: str = "gptq",
                    group_size: int | None = None, strict: bool = False) -> int:
    """Swap every ``nn.Linear`` whose ``{path}.qweight`` is in ``tensors`` for a :class:`QuantLinear`.

    ``tensors`` maps module paths *of this model* to checkpoint tensors (``{path}.qweight``,
    ``.qzeros``, ``.scales``, and ``.g_idx``/``.bias`` when present): normalising a checkpoint's key
    layout is the loader's job. ``group_size``: the checkpoint's quantization_config's, where known.
    Returns how many layers were replaced; a shape mismatch is an error.
    """
    if method not in ("gptq", "awq"):
        raise QoqoptError(f"unknown quantization method {method!r} (gptq or awq)")
    count = 0
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{path}.qweight" not in tensors:
            continue
        parts = [tensors[f"{path}.{name}"] for name in ("qweight", "qzeros", "scales")]
        bias = tensors.get(f"{path}.bias")
        if method == "gptq":
            layer = QuantLinear.from_gptq(*parts, tensors.get(f"{path}.g_idx"), bias, bits=bits,
                                          checkpoint_format=checkpoint_format, group_size=group_size, strict=strict)
        else:
            layer = QuantLinear.from_awq(*parts, bias, group_size=group_size, strict=strict)
        if (layer.in_features, layer.out_features) != (module.in_features, module.out_features):
            raise QoqoptError(f"{path}: checkpoint is {layer.in_features}->{layer.out_features}, "
                              f"model expects {module.in_features}->{module.out_features}")
        parent_path, _, name = path.rpartition(".")
        device = module.weight.device  # a meta-device model (a loader building it) keeps the real tensors
        setattr(model.get_submodule(parent_path) if parent_path else model, name, layer if device.type == "meta" else layer.to(device))
        count += 1
    return count
