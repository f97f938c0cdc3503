"""GPTQ math: Hessian accumulation, error propagation, act-order / static groups, dampening retries."""

import pytest
import torch

from benchmarks.spec_layout import spec_dequantize, spec_unpack_gptq
from qoqopt.errors import QoqoptError
from qoqopt.packing import pack_gptq
from qoqopt.quantize.gptq import accumulate_hessian, group_aware_order, gptq_quantize
from qoqopt.quantize.rtn import QuantSpec, group_params, rtn_quantize

pytestmark = pytest.mark.usefixtures("one_thread")




def _correlated_inputs(t, k, seed=0):
    """Activations like a transformer's: correlated channels, a few with large magnitude."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(t, k, generator=g) @ mix
    x[:, :4] *= 20
    return x


def test_hessian_streaming_equals_batch():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(7))
    h, n = None, 0
    for chunk in x.split([100, 7, 193]):
        h, n = accumulate_hessian(h, n, chunk)
    assert n == 300
    torch.testing.assert_close(h, 2 / 300 * x.t() @ x, rtol=1e-5, atol=1e-5)


def test_group_params_symmetric_and_zero_floor():
    w = torch.tensor([[-1.0, 0.5, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    scale, zero, _ = group_params(w, QuantSpec(4, 4, sym=True))
    assert zero.tolist() == [8, 8] and scale[0].item() == pytest.approx(2 / 15, rel=1e-3)
    # asymmetric, all >= 0: the zero-point would be 0; GPTQ v1 needs >= 1 -> raised, scale shrinks, no clipping
    spec = QuantSpec(4, 4, sym=False, zero_min=1)
    scale, zero, clamped = group_params(w[1:], spec)
    assert zero.item() == 1 and clamped.item()
    assert (torch.round(w[1:] / scale) + zero).max().item() <= 15  # the raised zero-point clips nothing
    q = torch.clamp(torch.round(w[1:] / scale) + zero, 0, 15)
    assert q.max().item() <= 15 and ((q - zero) * scale).max().item() == pytest.approx(0.4, rel=1e-3)


def _sym4_scale(span: torch.Tensor) -> torch.Tensor:
    """The reference implementation's 4-bit symmetric grid: 2 max|w| / 15 per row, rounded to fp16."""
    amax = torch.maximum(-span.amin(1).clamp(max=0), span.amax(1).clamp(min=0))
    return (2 * amax / 15).half().double()


def _textbook_gptq(w: torch.Tensor, h: torch.Tensor, gs: int, damp: float = 0.01, col_scales=None):
    """GPTQ as the paper states it (Frantar et al. 2022, Algorithm 1, without lazy batches), 4-bit
    symmetric as the reference implementation's quantizer does it (zero-point 8), in float64.
    ``col_scales`` [K, N]: fixed grids per column (static groups) instead of each group's from its
    columns as they are when it is reached."""
    w, h = w.double().clone(), h.double()
    k = w.shape[1]
    h = h + damp * h.diag().mean() * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q, deq = torch.zeros_like(w), torch.zeros_like(w)
    for i in range(k):
        if col_scales is not None:
            scale = col_scales[i].double()
        elif i % gs == 0:  # a group's grid comes from its columns as they are when it is reached
            scale = _sym4_scale(w[:, i : i + gs])
        q[:, i] = torch.clamp(torch.round(w[:, i] / scale) + 8, 0, 15)
        deq[:, i] = (q[:, i] - 8) * scale
        err = (w[:, i] - deq[:, i]) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
    return q.t().to(torch.int32), deq.float()


def test_gptq_matches_the_textbook_algorithm():
    """Against an independent column-by-column GPTQ: blocked updates reorder float sums, so a few
    rounding decisions may differ, but almost every level must agree and the output error match."""
    k, n, gs = 256, 64, 64
    x = _correlated_inputs(1024, k, seed=3)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4)) * 0.05
    h, _ = accumulate_hessian(None, 0, x)
    qw, _ = gptq_quantize(w, h, QuantSpec(4, gs, sym=True), block_size=128)
    ref_levels, ref_deq = _textbook_gptq(w, h, gs)
    agree = (qw.intweight == ref_levels).float().mean().item()
    assert agree > 0.99, agree
    # the dequantized weight is exactly (q - zero[g]) * scale[g] from the stored fields
    g = qw.g_idx.long()
    by_hand = (qw.intweight.float() - qw.zeros[g].float()) * qw.scales[g].float()
    torch.testing.assert_close(qw.dequantize(), by_hand.t(), rtol=0, atol=0)
    ref = x @ w.t()
    ours, textbook = ((x @ d.t() - ref).norm().item() / ref.norm().item() for d in (qw.dequantize(), ref_deq))
    assert abs(ours - textbook) < 0.02 * textbook, (ours, textbook)


def test_group_aware_order_by_its_definition():
    diag = torch.tensor([1.0, 5.0, 2.0, 0.5, 9.0, 3.0, 4.0, 4.5, 0.1])
    # groups of 3: maxima 5, 9, 4.5 -> visit group 1, then 0, then 2; inside each, largest first
    assert group_aware_order(diag, 3).tolist() == [4, 5, 3, 1, 2, 0, 7, 6, 8]


def test_group_aware_gptq_is_the_textbook_algorithm_in_that_order():
    """GAR changes only the visiting order: the textbook algorithm run on the permuted columns, mapped
    back, gives the same levels; each group is still one natural group, so the layout stays plain."""
    k, n, gs = 256, 64, 64
    x = _correlated_inputs(1024, k, seed=3).flip(1)  # the loud channels last, so the order matters
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4)) * 0.05
    h, _ = accumulate_hessian(None, 0, x)
    perm = group_aware_order(h.diag(), gs)
    assert perm[:gs].min() >= k - gs  # the loud group is visited first
    qw, _ = gptq_quantize(w, h, QuantSpec(4, gs, sym=True), group_aware=True)
    ref_levels, ref_deq = _textbook_gptq(w[:, perm], h[perm][:, perm], gs)
    inv = torch.argsort(perm)
    assert (qw.intweight == ref_levels[inv]).float().mean().item() > 0.99
    assert torch.equal(qw.g_idx.long(), torch.arange(k) // gs)
    ref = x @ w.t()
    ours, textbook = ((x @ d.t() - ref).norm().item() / ref.norm().item() for d in (qw.dequantize(), ref_deq[:, inv]))
    assert abs(ours - textbook) < 0.02 * textbook, (ours, textbook)
    plain = gptq_quantize(w, h, QuantSpec(4, gs, sym=True))[0].dequantize()
    assert ours < (x @ plain.t() - ref).norm().item() / ref.norm().item()


def test_static_act_order_is_the_textbook_algorithm_on_fixed_grids():
    """The export's default order: columns by decreasing Hessian diagonal across the whole matrix, each
    on its natural group's grid taken from the original weights. That is the textbook algorithm run
    in that order with those grids; g_idx stays natural, so the layout is the plain one."""
    k, n, gs = 256, 64, 64
    x = _correlated_inputs(1024, k, seed=3).flip(1)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4)) * 0.05
    h, _ = accumulate_hessian(None, 0, x)
    perm = torch.argsort(h.diag(), descending=True, stable=True)
    grids = torch.stack([_sym4_scale(w[:, g * gs : (g + 1) * gs].double()) for g in range(k // gs)])  # [G, N]
    qw, _ = gptq_quantize(w, h, QuantSpec(4, gs, sym=True), act_order=True, static_groups=True)
    ref_levels, ref_deq = _textbook_gptq(w[:, perm], h[perm][:, perm], gs, col_scales=grids[perm // gs])
    inv = torch.argsort(perm)
    assert (qw.intweight == ref_levels[inv]).float().mean().item() > 0.99
    assert torch.equal(qw.g_idx.long(), torch.arange(k) // gs)
    torch.testing.assert_close(qw.scales.double(), grids, rtol=0, atol=0)
    ref = x @ w.t()
    ours, textbook = ((x @ d.t() - ref).norm().item() / ref.norm().item() for d in (qw.dequantize(), ref_deq[:, inv]))
    assert abs(ours - textbook) < 0.02 * textbook, (ours, textbook)


def test_gptq_beats_rtn_on_output_error():
    k, n = 256, 96
    x = _correlated_inputs(2048, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    h, _ = accumulate_hessian(None, 0, x)
    spec = QuantSpec(4, 64, sym=True)
    ref = x @ w.t()
    err = {}
    for name, qw in {"rtn": rtn_quantize(w, spec), "gptq": gptq_quantize(w, h, spec)[0]}.items():
        err[name] = ((x @ qw.dequantize().t() - ref).norm() / ref.norm()).item()
    assert err["gptq"] < 0.8 * err["rtn"], err


@pytest.mark.parametrize("act_order,static,gar", [(False, False, False), (True, False, False), (True, True, False),
                                                  (False, False, True)])
def test_layout_fields_are_consistent(act_order, static, gar):
    k, n, gs = 128, 32, 32
    x = _correlated_inputs(512, k, seed=2)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(5)) * 0.1
    h, _ = accumulate_hessian(None, 0, x)
    qw, info = gptq_quantize(w, h, QuantSpec(4, gs), act_order=act_order, static_groups=static, group_aware=gar)
    assert qw.intweight.shape == (k, n) and qw.scales.shape == (k // gs, n) and qw.scales.dtype == torch.float16
    assert info.retries == 0
    # packed as GPTQ v1 (which refuses codes outside 0..15 and zero-points outside 1..16) and read back
    # by the format's spec, the words give the weight the quantizer reports
    qweight, qzeros = pack_gptq(qw.intweight, qw.zeros, bits=4)
    by_spec = spec_dequantize(*spec_unpack_gptq(qweight, qzeros, 4), qw.scales, qw.g_idx)
    torch.testing.assert_close(qw.dequantize(), by_spec, rtol=0, atol=0)
    counts = torch.bincount(qw.g_idx.long(), minlength=k // gs)
    assert counts.tolist() == [gs] * (k // gs)  # every group has exactly group_size rows
    natural = torch.arange(k) // gs
    assert torch.equal(qw.g_idx.long(), natural) == (not act_order or static)
    # a sanity bound only (error propagation moves weights); exact agreement is the textbook test's job
    assert ((qw.dequantize() - w).abs().max() / w.abs().max()) < 0.5


def test_dead_inputs_are_zeroed():
    x = _correlated_inputs(256, 64)
    x[:, 10] = 0
    h, _ = accumulate_hessian(None, 0, x)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    qw, info = gptq_quantize(w, h, QuantSpec(4, 32))
    assert info.dead_inputs == 1
    assert torch.all(qw.dequantize()[:, 10] == 0)


def test_failed_cholesky_retries_loudly():
    k = 64
    g = torch.Generator().manual_seed(0)
    v = torch.randn(k, 4, generator=g)
    h = v @ v.t()
    h -= 0.05 * torch.eye(k) * h.diag().mean()  # indefinite: fails at the default dampening
    said = []
    qw, info = gptq_quantize(torch.randn(16, k, generator=g), h, QuantSpec(4, 32), warn=said.append, name="layer 3 q_proj")
    assert info.retries == 1 and info.damp == pytest.approx(0.1)
    assert said == ["GPTQ: Cholesky of layer 3 q_proj's Hessian failed at dampening 0.01; retrying with 0.1"]


def test_hopeless_hessian_is_a_one_line_error():
    with pytest.raises(QoqoptError, match="not positive definite") as exc:
        gptq_quantize(torch.randn(16, 64), -100 * torch.eye(64), QuantSpec(4, 32), warn=lambda m: None)
    assert "\n" not in str(exc.value)
