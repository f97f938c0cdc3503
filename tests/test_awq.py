"""AWQ math: scale search, exact folding (incl. grouped-query v_proj -> o_proj), clipping search."""

import numpy as np
import pytest
import torch

from qoqopt.quantize.awq import (
    awq_quantize,
    expand_kv_scale,
    group_fake_quantize,
    output_mse,
    search_clip,
    search_scale,
    tie_kv_stat,
)
from qoqopt.quantize.rtn import QuantSpec, rtn_quantize

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = QuantSpec(4, 64, sym=False)




def _outlier_inputs(t=1024, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :8] *= 30  # a few channels carry most of the signal, as in real LLM activations
    return x


def test_scale_search_prefers_activation_aware_scales():
    x = _outlier_inputs()
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    r = search_scale(x.abs().mean(0), x, [w], SPEC)
    assert r.alpha > 0 and r.scale.shape == (256,) and r.scale[:8].min() > r.scale[8:].max()
    # the losses it reports, recomputed by plain matmuls: the scaled weight quantized, then divided back
    ref = x.double() @ w.double().t()

    def mse(w_hat):
        return (x.double() @ w_hat.double().t() - ref).pow(2).mean().item()

    scaled, rtn = mse(awq_quantize(w * r.scale, SPEC).dequantize() / r.scale), mse(rtn_quantize(w, SPEC).dequantize())
    assert (r.loss, r.loss_unscaled) == (pytest.approx(scaled, rel=1e-4), pytest.approx(rtn, rel=1e-4))
    assert scaled < 0.9 * rtn


def test_clip_search_lowers_output_error():
    x = _outlier_inputs(512, 128, seed=3)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) * 0.05
    w[:, 5] *= 8  # an outlier weight per row stretches its group's range
    ref = x @ w.t()
    plain = awq_quantize(w, SPEC)
    clipped = awq_quantize(w, SPEC, search_clip(w, x, SPEC))
    e_plain = (x @ plain.dequantize().t() - ref).norm()
    e_clip = (x @ clipped.dequantize().t() - ref).norm()
    assert e_clip < e_plain


@pytest.mark.parametrize("tokens", [300, 40])  # more tokens than channels: the Gram form; fewer: outputs
def test_output_error_is_the_mean_squared_output_difference(tokens):
    x = _outlier_inputs(tokens, 64, seed=5)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(6)) * 0.05
    wq = group_fake_quantize(w, SPEC)
    definition = (x.double() @ wq.double().t() - x.double() @ w.double().t()).pow(2).mean().item()
    assert output_mse(x, w)(wq) == pytest.approx(definition, rel=1e-4)


def test_clip_search_picks_each_groups_least_output_error():
    """Against the definition, in float64 and per candidate: sum over tokens of the group's
    squared output error, least over the shrink grid."""
    x = _outlier_inputs(512, 128, seed=3)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) * 0.05
    w[:, 5] *= 8
    n_grid, groups, gs = 20, 2, 64
    org_max = w.abs().reshape(64, groups, gs).amax(dim=2)
    errors, bounds = [], []
    for i in range(n_grid // 2):
        m = org_max * (1 - i / n_grid)
        d = (group_fake_quantize(w, SPEC, m) - w).double().reshape(64, groups, gs)
        errors.append(torch.einsum("tgc,rgc->trg", x.double().reshape(-1, groups, gs), d).pow(2).sum(0))
        bounds.append(m)
    errors, bounds = torch.stack(errors), torch.stack(bounds)  # [candidates, R, G]
    chosen = search_clip(w, x, SPEC, n_grid=n_grid)
    picked = (bounds == chosen).double().argmax(dim=0)  # each choice is one of the candidates, exactly
    assert (bounds == chosen).any(dim=0).all()
    # its error is the least (an fp32 near-tie may go either way: equal to 1e-6 relative is a tie)
    least = errors.min(dim=0).values
    assert (errors.gather(0, picked[None])[0] <= least * (1 + 1e-6)).all()
    assert (picked == errors.argmin(dim=0)).float().mean() > 0.95


def test_awq_quantize_layout():
    torch.manual_seed(0)
    w = torch.randn(24, 128)
    w[0, :64] = w[0, :64].abs() + 1  # a group wholly above zero
    qw = awq_quantize(w, SPEC)
    assert qw.intweight.shape == (128, 24) and qw.zeros.shape == (2, 24) and qw.scales.dtype == torch.float16
    assert 0 <= qw.zeros.min() and qw.zeros.max() <= 15
    torch.testing.assert_close(qw.dequantize(), group_fake_quantize(w, SPEC), rtol=0, atol=1e-6)
    # without a clip, AWQ's rounding is RTN with zero-points
    torch.testing.assert_close(qw.dequantize(), rtn_quantize(w, SPEC).dequantize(), rtol=0, atol=0)

    # AutoAWQ's pseudo_quantize_tensor written out in numpy: per group of 64 along K,
    # s = fp16((hi - lo) / 15), z = clip(round(-lo / s), 0, 15), w' = (clip(round(w / s) + z, 0, 15) - z) * s
    def pseudo_quantize(lo, hi):
        s = (np.maximum(hi - lo, 1e-5).astype(np.float32) / 15).astype(np.float16).astype(np.float32)
        z = np.clip(np.round(-lo / s), 0, 15)
        return ((np.clip(np.round(g / s) + z, 0, 15) - z) * s).reshape(24, 128)

    g = w.numpy().reshape(24, 2, 64).astype(np.float32)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    # AutoAWQ's range is the group's [min, max]; GPTQ's quantizer (find_params) and compressed-tensors'
    # calculate_qparams (llm-compressor) widen it to take in 0. The same grid for a group across zero; a one-sided group's
    # zero-point would clip to 0 on AutoAWQ's and cut off the group's top, so qoqopt widens it
    hand = pseudo_quantize(np.minimum(lo, 0), np.maximum(hi, 0))
    np.testing.assert_allclose(qw.dequantize().numpy(), hand, rtol=0, atol=1e-6)
    autoawq = pseudo_quantize(lo, hi)
    np.testing.assert_allclose(qw.dequantize().numpy()[1:], autoawq[1:], rtol=0, atol=1e-6)
    err = {name: np.abs(q[0, :64] - w.numpy()[0, :64]).max() for name, q in (("ours", hand), ("autoawq", autoawq))}
    assert err["autoawq"] > 4 * err["ours"], err


def test_gqa_scale_tying():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # 2 kv heads of head_dim 3
    assert expand_kv_scale(s, 2, 3).tolist() == [1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6]
    stat = torch.arange(12.0)
    assert tie_kv_stat(stat, 2, 3).tolist() == [1.5, 2.5, 3.5, 7.5, 8.5, 9.5]


def _layer_and_inputs():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLRotaryEmbedding

    from qoqopt.mini import build_config

    cfg = build_config("tiny").text_config
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = Qwen2_5_VLDecoderLayer(cfg, 0).float().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    x = torch.randn(1, 20, cfg.hidden_size)
    pos = torch.arange(20).view(1, 1, -1).expand(3, 1, -1)
    pe = Qwen2_5_VLRotaryEmbedding(cfg)(x, pos)
    mask = torch.full((20, 20), float("-inf")).triu(1).view(1, 1, 20, 20)
    run = lambda: layer(x, attention_mask=mask, position_embeddings=pe)  # noqa: E731
    run.inputs = (x, {"attention_mask": mask, "position_embeddings": pe})
    return layer, cfg, run


def test_folds_are_exact_in_float():
    """The fold algebra AWQ relies on, written out against transformers' decoder layer: each scale
    moved between a norm or linear and its consumers (GQA v->o tied by ``expand_kv_scale``) leaves the
    float output unchanged. The runner's own folds are checked below."""
    layer, cfg, run = _layer_and_inputs()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        ref = run()
        g = torch.Generator().manual_seed(5)
        rand = lambda n: torch.rand(n, generator=g) + 0.5  # noqa: E731
        a = layer.self_attn
        s = rand(cfg.hidden_size)  # input_layernorm -> q, k, v
        layer.input_layernorm.weight /= s
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            lin.weight *= s
        s_v = rand(cfg.num_key_value_heads * head_dim)  # v_proj -> o_proj, tied per kv group
        a.v_proj.weight /= s_v.unsqueeze(1)
        a.v_proj.bias /= s_v
        a.o_proj.weight *= expand_kv_scale(s_v, n_rep, head_dim)
        s = rand(cfg.hidden_size)  # post_attention_layernorm -> gate, up
        layer.post_attention_layernorm.weight /= s
        layer.mlp.gate_proj.weight *= s
        layer.mlp.up_proj.weight *= s
        s = rand(cfg.intermediate_size)  # up -> down
        layer.mlp.up_proj.weight /= s.unsqueeze(1)
        layer.mlp.down_proj.weight *= s
        out = run()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _runner_folds(monkeypatch):
    """The layer's float output before and after qoqopt's AWQ runner folds its searched scales in,
    rounding switched off; and which linears changed."""
    from qoqopt.quantize import runner

    layer, cfg, run = _layer_and_inputs()
    x, kwargs = run.inputs
    with torch.no_grad():
        ref = run()
        before = {n: m.weight.clone() for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    monkeypatch.setattr(runner, "_set_weight", lambda linear, qw: None)  # keep the folded float weights
    opts = runner.QuantizeOptions(method="awq", spec=QuantSpec(4, 128, sym=False), awq_grid=4)
    runner.quantize_layer_awq(layer, [runner.LayerInput(x, kwargs)], opts, torch.float32, [])
    changed = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and not torch.equal(m.weight, before[n])]
    with torch.no_grad():
        return ref, run(), changed


def test_runner_folds_leave_the_float_layer_unchanged(monkeypatch):
    """The folds qoqopt's AWQ runner actually applies (its searched scales, the v->o tie, bias and
    norms), with rounding switched off: the float layer must still compute what it did before."""
    ref, out, changed = _runner_folds(monkeypatch)
    # every fold took a scale other than 1 (norm -> q/k/v, v -> o, norm -> gate/up, up -> down), so each
    # is tested here: a fold skipped or applied to one side only would change the layer's output
    assert set(changed) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_an_untied_o_scale_breaks_the_runners_fold(monkeypatch):
    """The check above can fail: with the kv scale spread over the query heads in the wrong order
    (``repeat`` where transformers' ``repeat_kv`` interleaves), the runner's v->o fold changes the
    layer's output. The tiny model has 2 query heads per kv head."""
    from qoqopt.quantize import runner

    tiled = lambda s_kv, n_rep, head_dim: s_kv.view(-1, head_dim).repeat(n_rep, 1).reshape(-1)  # noqa: E731
    monkeypatch.setattr(runner, "expand_kv_scale", tiled)
    ref, out, _ = _runner_folds(monkeypatch)
    assert not torch.allclose(out, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


def test_vision_clip_sample_spans_every_chat():
    """The vision clipping search's sample (--quantize-vision AWQ): evenly strided over every captured
    row as AutoAWQ strides its clipping tokens, not the first 512 (the first 8 of 64 chats' images)."""
    from qoqopt.exports.hf_quant import spread_rows

    chats = [torch.full((64, 3), float(c)) for c in range(64)]  # 64 rows captured per chat, tagged by chat
    x = spread_rows(torch.cat(chats), 512)
    assert x.shape == (512, 3) and set(x[:, 0].tolist()) == set(range(64))
    assert torch.equal(spread_rows(torch.arange(100), 512), torch.arange(100))  # fewer rows: all of them
    assert torch.equal(spread_rows(torch.arange(10), 4), torch.tensor([0, 3, 6, 9]))
