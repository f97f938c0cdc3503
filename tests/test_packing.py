"""GPTQ v1 / AWQ GEMM bit packing: hand-worked words, then random data packed and read back by the
spec's bit-by-bit reading (benchmarks/spec_layout.py, which imports nothing from qoqopt)."""

import pytest
import torch

from benchmarks.spec_layout import spec_unpack_awq, spec_unpack_gptq
from qoqopt.packing import (
    awq_to_gptq_v2,
    dequantize,
    fragments_to_gptq,
    gptq_v2_to_awq,
    gptq_to_fragments,
    pack_awq,
    pack_fragments,
    permute_packed_rows,
    pack_gptq,
    quantize_rtn,
    unpack_awq,
    unpack_fragments,
    unpack_gptq,
)


def test_gptq_4bit_hand_worked():
    # One column, K = 8: values 1..8 LSB first along K -> nibbles 0x8,7,6,5,4,3,2,1 from the top.
    intweight = torch.arange(1, 9, dtype=torch.int32).view(8, 1)
    # Eight columns of zeros 1..8 -> stored zero - 1 = 0..7 LSB first along N -> 0x76543210.
    zeros = torch.arange(1, 9, dtype=torch.int32).view(1, 8)
    qweight, qzeros = pack_gptq(intweight.expand(8, 8).contiguous(), zeros)
    assert qweight.shape == (1, 8) and qzeros.shape == (1, 1)
    assert qweight.dtype == torch.int32 and qzeros.dtype == torch.int32
    assert qweight[0, 0].item() == 0x87654321 - 2**32  # = -2023406815, the sign bit is set
    assert qzeros[0, 0].item() == 0x76543210


def test_gptq_8bit_hand_worked():
    # K = 4 rows per word, N = 4 columns per zeros word; every column holds 0x11, 0x22, 0x33, 0xF4.
    intweight = torch.tensor([[0x11], [0x22], [0x33], [0xF4]], dtype=torch.int32).expand(4, 4).contiguous()
    zeros = torch.tensor([[0x81, 0x01, 0x02, 0x03]], dtype=torch.int32)  # stored 0x80, 0x00, 0x01, 0x02
    qweight, qzeros = pack_gptq(intweight, zeros, bits=8)
    assert qweight.tolist() == [[0xF4332211 - 2**32] * 4]
    assert qzeros.tolist() == [[0x02010080]]


def test_awq_hand_worked():
    # One row, columns 0..7 hold their own index: nibble i holds column [0,2,4,6,1,3,5,7][i].
    intweight = torch.arange(8, dtype=torch.int32).view(1, 8)
    zeros = torch.tensor([[15, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.int32)
    qweight, qzeros = pack_awq(intweight, zeros)
    assert qweight.tolist() == [[0x75316420]]
    # column 0 -> nibble 0 (0xF), column 7 -> nibble 7 (0x1) -> 0x1000000F
    assert qzeros.tolist() == [[0x1000000F]]


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_round_trip(bits):
    g = torch.Generator().manual_seed(0)
    k, n, groups = 64, 24 if bits == 4 else 12, 4  # N is a multiple of 32 // bits, not of 32
    intweight = torch.randint(0, 2**bits, (k, n), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 2**bits + 1, (groups, n), generator=g, dtype=torch.int32)
    qweight, qzeros = pack_gptq(intweight, zeros, bits)
    assert qweight.shape == (k * bits // 32, n) and qzeros.shape == (groups, n * bits // 32)
    w2, z2 = unpack_gptq(qweight, qzeros, bits)
    assert torch.equal(w2, intweight) and torch.equal(z2, zeros)
    ints, spec_zeros = spec_unpack_gptq(qweight, qzeros, bits)  # the words as the spec reads them, bit by bit
    assert (ints == intweight.numpy()).all() and (spec_zeros == zeros.numpy()).all()


def test_awq_round_trip():
    g = torch.Generator().manual_seed(1)
    intweight = torch.randint(0, 16, (32, 40), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (2, 40), generator=g, dtype=torch.int32)
    qweight, qzeros = pack_awq(intweight, zeros)
    assert qweight.shape == (32, 5) and qzeros.shape == (2, 5)
    w2, z2 = unpack_awq(qweight, qzeros)
    assert torch.equal(w2, intweight) and torch.equal(z2, zeros)
    ints, spec_zeros = spec_unpack_awq(qweight, qzeros)
    assert (ints == intweight.numpy()).all() and (spec_zeros == zeros.numpy()).all()


def test_gptq_v2_written_back_as_awq_is_the_awq_checkpoint():
    """A layer held as GPTQ v2 (AWQ repacked at load) is saved as AWQ: the words AWQ packed, read by
    the spec's bit-by-bit reader; 8 columns a step, so every step boundary is crossed."""
    g = torch.Generator().manual_seed(4)
    intweight = torch.randint(0, 16, (32, 40), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (2, 40), generator=g, dtype=torch.int32)
    qweight, qzeros = pack_awq(intweight, zeros)
    back = gptq_v2_to_awq(*awq_to_gptq_v2(qweight, qzeros), cols_per_step=8)
    assert torch.equal(back[0], qweight) and torch.equal(back[1], qzeros)
    ints, spec_zeros = spec_unpack_awq(*back)
    assert (ints == intweight.numpy()).all() and (spec_zeros == zeros.numpy()).all()


def test_awq_repacked_as_gptq_v2_reads_back_by_the_gptq_spec():
    """QuantLinear runs AWQ checkpoints in the GPTQ layout: the repacked words, read bit by bit as
    the GPTQ spec states (v1's zero - 1 undone for v2), hold the same integers. K = 40 in steps of
    16 rows leaves a partial last step."""
    g = torch.Generator().manual_seed(3)
    intweight = torch.randint(0, 16, (40, 24), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (5, 24), generator=g, dtype=torch.int32)
    qweight, qzeros = awq_to_gptq_v2(*pack_awq(intweight, zeros), rows_per_step=16)
    assert qweight.shape == (5, 24) and qzeros.shape == (5, 3) and qweight.dtype == qzeros.dtype == torch.int32
    ints, v1_zeros = spec_unpack_gptq(qweight, qzeros, 4)
    assert (ints == intweight.numpy()).all() and (v1_zeros - 1 == zeros.numpy()).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_permuting_packed_rows_moves_values_not_words(bits):
    """Act-order layers are made group-contiguous at load: row r of every column takes the value of
    row perm[r], read back by the GPTQ spec; 40 columns in steps of 16 leave a partial last step."""
    g = torch.Generator().manual_seed(4)
    intweight = torch.randint(0, 2**bits, (32, 40), generator=g, dtype=torch.int32)
    perm = torch.randperm(32, generator=g)
    qweight, qzeros = pack_gptq(intweight, torch.ones(1, 40, dtype=torch.int32), bits)
    ints, _ = spec_unpack_gptq(permute_packed_rows(qweight, perm, bits, cols_per_step=16), qzeros, bits)
    assert (ints == intweight[perm].numpy()).all()


def test_fragment_words_hold_the_rows_their_layout_states():
    """The decode kernel's fragment words, read nibble by nibble as ``qoqopt.packing`` states the
    layout (word r = rlo + 4 rhi of column n in block b sits at [b, 16 n + r]; nibble e1 + 2 e6 + 4 e0
    holds row 128 b + e0 + 2 rhi + 8 e1 + 16 rlo + 64 e6), spelled out here loop by loop; made
    from GPTQ words two blocks at a time (the last step partial), and unpacked back."""
    g = torch.Generator().manual_seed(5)
    intweight = torch.randint(0, 16, (384, 24), generator=g, dtype=torch.int32)
    qweight, _ = pack_gptq(intweight, torch.ones(1, 24, dtype=torch.int32))
    words = gptq_to_fragments(qweight, blocks_per_step=2)
    assert words.shape == (3, 16 * 24) and words.dtype == torch.int32
    assert torch.equal(words, pack_fragments(intweight)) and torch.equal(unpack_fragments(words), intweight)
    # and back to GPTQ's words as the spec reads them (QuantLinear's state_dict and torch path)
    ints, _ = spec_unpack_gptq(fragments_to_gptq(words, blocks_per_step=2), torch.zeros(1, 3, dtype=torch.int32), 4)
    assert (ints == intweight.numpy()).all()
    u = words.numpy().view("uint32")
    for b in range(3):
        for n in range(24):
            for rlo in range(4):
                for rhi in range(4):
                    word = int(u[b, 16 * n + rlo + 4 * rhi])
                    for e0 in range(2):
                        for e1 in range(2):
                            for e6 in range(2):
                                k = 128 * b + e0 + 2 * rhi + 8 * e1 + 16 * rlo + 64 * e6
                                assert (word >> (4 * (e1 + 2 * e6 + 4 * e0))) & 15 == intweight[k, n], (b, n, k)


def test_shape_asserts():
    with pytest.raises(AssertionError):
        pack_gptq(torch.zeros(7, 8, dtype=torch.int32), torch.ones(1, 8, dtype=torch.int32))  # K % 8
    with pytest.raises(AssertionError):
        pack_awq(torch.zeros(8, 12, dtype=torch.int32), torch.zeros(1, 12, dtype=torch.int32))  # N % 8
    with pytest.raises(AssertionError):
        pack_gptq(torch.zeros(8, 8, dtype=torch.int32), torch.zeros(1, 8, dtype=torch.int32))  # zero 0 in v1
    with pytest.raises(AssertionError):
        pack_fragments(torch.zeros(64, 8, dtype=torch.int32))  # K % 128


def test_rtn_dequantize_close():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    q, z, s = quantize_rtn(w, bits=4, group_size=32)
    g_idx = torch.arange(64, dtype=torch.int32) // 32
    w_hat = dequantize(q, z, s, g_idx).t()
    # the step spans each group's range in 2**bits - 2 levels (one kept spare so that zero >= 1),
    # rounded to fp16; RTN's error is then at most half a step per element
    groups = w.view(16, 2, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 14  # [N, G]
    torch.testing.assert_close(s.float(), step.t(), rtol=2**-10, atol=0)
    assert ((w_hat - w).abs() <= step.repeat_interleave(32, dim=1) * 0.5 + 1e-3).all()
