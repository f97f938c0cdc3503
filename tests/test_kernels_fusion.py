"""Fused sibling projections (q/k/v, gate/up) over QuantLinear: same answers, fewer launches.

References: the original integers dequantized by the GPTQ spec reading (``qoqopt.packing``) and,
end to end, transformers' own Qwen2.5-VL with those dequantized weights in plain ``nn.Linear``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.kernel_device import DEVICE
from tests.test_kernels_apply import (  # noqa: F401 (exact_fp32_reference: an autouse fixture)
    exact_fp32_reference,
    logits_of,
    relative_error,
    tiny_model,
    two_image_batch,
)


def quantized(weight: torch.Tensor, group_size: int, perm: torch.Tensor | None = None, layout: str = "gptq"):
    """Checkpoint tensors of ``weight`` [N, K] quantized RTN, act-order when ``perm`` is given (groups
    are contiguous in ``perm``'s order, as GPTQ with desc_act writes them), and its dequantized [K, N]."""
    from qoqopt.packing import dequantize, pack_awq, pack_gptq, quantize_rtn

    k = weight.shape[1]
    perm = torch.arange(k) if perm is None else perm
    intweight, zeros, scales = quantize_rtn(weight[:, perm].float(), 4, group_size)
    intweight = intweight[torch.argsort(perm)]  # rows back in input order
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group_size).int()
    if layout == "awq":
        qweight, qzeros = pack_awq(intweight, zeros)
        tensors = dict(qweight=qweight, qzeros=qzeros, scales=scales)
    else:
        qweight, qzeros = pack_gptq(intweight, zeros)
        tensors = dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)
    return tensors, dequantize(intweight, zeros, scales, g_idx)


class Attention(nn.Module):
    """Sibling projections as transformers' attention holds them (k_proj without bias, to check that
    a part with no bias stays without one)."""

    def __init__(self, widths=(64, 32, 32), k=64, group_size=32, perms=(None, None, None), seed=0, layout="gptq"):
        super().__init__()
        from qoqopt.kernels import QuantLinear

        g = torch.Generator().manual_seed(seed)
        self.dense, self.tensors = {}, {}  # the checkpoint's tensors, by state_dict key
        for name, width, perm in zip(("q_proj", "k_proj", "v_proj"), widths, perms):
            tensors, self.dense[name] = quantized(torch.randn(width, k, generator=g) * 0.1, group_size, perm, layout)
            self.tensors |= {f"{name}.{key}": t for key, t in tensors.items()}
            bias = None if name == "k_proj" else torch.randn(width, generator=g) * 0.1
            self.dense[f"{name}.bias"] = bias
            build = QuantLinear.from_awq if layout == "awq" else QuantLinear.from_gptq
            setattr(self, name, build(**tensors, bias=bias).to(DEVICE))

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def reference(self, x):
        outs = []
        for name in ("q_proj", "k_proj", "v_proj"):
            y = x @ self.dense[name].to(DEVICE)
            bias = self.dense[f"{name}.bias"]
            outs.append(y if bias is None else y + bias.to(DEVICE))
        return outs


def launches(layer: nn.Module) -> list[int]:
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["gptq-act-order", "awq"])
@pytest.mark.parametrize("rows", [1, 5, 20])  # GEMV, tensor-core decode, prefill (outputs made contiguous)
def test_fused_siblings_match_the_dequantized_weights_with_one_launch(interpreter, rows, layout, dtype):
    from qoqopt.kernels.fused_projections import ProjectionSlice, fuse_projections

    if layout == "awq":
        attn = Attention(layout="awq")
    else:
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
        attn = Attention(perms=(perm, perm, perm))
    assert fuse_projections(attn) == {"qkv_proj": 1, "gate_up_proj": 0}
    assert isinstance(attn.k_proj, ProjectionSlice) and attn.qkv_proj.out_features == 128
    calls = launches(attn.qkv_proj)
    x = torch.randn(rows, 64, device=DEVICE).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: the output rounded once, 64-long sums
    with torch.no_grad():
        outs = attn(x)
        for out, ref in zip(outs, attn.reference(x.float())):
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    assert len(calls) == 1
    # At prefill v owns its memory (a KV cache holding it must not pin all of qkv); the rest are views.
    owned = [out.untyped_storage().nbytes() == out.numel() * out.element_size() for out in outs]
    assert owned == [False, False, rows > 16]
    assert attn.q_proj.shared._outputs is None  # nothing held once the siblings have taken their columns


def test_other_orders_and_inputs_still_get_their_own_answer(interpreter):
    from qoqopt.kernels.fused_projections import fuse_projections

    attn = Attention()
    fuse_projections(attn)
    calls = launches(attn.qkv_proj)
    x, y = torch.randn(2, 64, device=DEVICE), torch.randn(2, 64, device=DEVICE)
    with torch.no_grad():
        ref_x, ref_y = attn.reference(x), attn.reference(y)
        torch.testing.assert_close(attn.v_proj(x), ref_x[2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn.k_proj(y), ref_y[1], atol=1e-5, rtol=1e-5)  # another input
        torch.testing.assert_close(attn.q_proj(x), ref_x[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn.v_proj(x), ref_x[2], atol=1e-5, rtol=1e-5)  # again
        q = attn.q_proj(x)
        x.add_(1.0)  # changed in place between siblings: the cached output is stale
        torch.testing.assert_close(attn.k_proj(x), attn.reference(x)[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q, ref_x[0], atol=1e-5, rtol=1e-5)
    # Launches: v(x), k(y) (another input), q(x) (ditto), q(x) (q already taken) and k(x) after the
    # in-place change; the second v(x) took its columns of the third launch's output.
    assert len(calls) == 5
    assert attn.q_proj.shared._outputs is not None  # v(x) is still due...
    with torch.no_grad():
        attn(y)  # ... until the parent's forward ends: its hook drops whatever was not taken
        attn.q_proj(y)
        attn.v_proj(y)
    assert attn.q_proj.shared._outputs is not None
    with pytest.raises(RuntimeError), torch.no_grad():
        attn(torch.randn(2, 63, device=DEVICE))  # an exception inside the forward clears it too
    assert attn.q_proj.shared._outputs is None


def test_groups_that_cannot_be_fused_are_left_alone_with_the_reason():
    from qoqopt.kernels import QuantLinear
    from qoqopt.kernels.fused_projections import fuse_projections

    perms = [torch.randperm(64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    cases = {
        "act-order permutations differ": Attention(perms=perms),
        "bits differs": Attention(),
        "not all are qoqopt QuantLinear": Attention(),
    }
    cases["not all are qoqopt QuantLinear"].v_proj = nn.Linear(64, 32)
    cases["bits differs"].k_proj.bits = 8
    # fused, they would be saved in one layout: AWQ's, or GPTQ's with a g_idx for each
    cases["source differs"], cases["some have a g_idx, some not"] = Attention(), Attention()
    cases["source differs"].k_proj.source = "awq"
    cases["some have a g_idx, some not"].k_proj.g_idx = None
    for reason, attn in cases.items():
        skipped = {}
        assert fuse_projections(attn, skipped) == {"qkv_proj": 0, "gate_up_proj": 0}
        assert reason in skipped[".qkv_proj"] and isinstance(attn.q_proj, QuantLinear)


@pytest.mark.parametrize("layout", ["gptq", "awq"])
def test_state_dict_keeps_the_per_projection_keys_and_loads_them_back(interpreter, layout):
    """Fused or not, held as GPTQ v2 or in fragment words, the state is the checkpoint's: GPTQ act-order
    layers with their g_idx and words in input order, AWQ ones in AWQ's layout (saved as GPTQ v2 before)."""
    from qoqopt.kernels.fused_projections import fuse_projections

    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1)) if layout == "gptq" else None
    attn, other = Attention(perms=(perm,) * 3, layout=layout), Attention(perms=(perm,) * 3, seed=1, layout=layout)
    state = attn.state_dict()
    assert set(attn.tensors) <= set(state) and all(torch.equal(state[k].cpu(), t) for k, t in attn.tensors.items())
    before = attn.state_dict()
    fuse_projections(attn)
    after = attn.state_dict()
    assert sorted(after) == sorted(before) and "k_proj.bias" not in after
    assert all(torch.equal(after[k], before[k]) for k in before)
    attn.load_state_dict(other.state_dict())  # another model's weights, split keys: joined on load
    x = torch.randn(3, 64, device=DEVICE)
    with torch.no_grad():
        for out, ref in zip(attn(x), other.reference(x)):
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    meta = {k: tuple(v.shape) for k, v in copy.deepcopy(attn).to("meta").state_dict().items()}
    assert meta == {k: tuple(v.shape) for k, v in after.items()}  # a meta model saves the same layout
    if layout == "awq":  # the zeros alone (a partial load) are read as AWQ's too
        attn.load_state_dict({k: v for k, v in other.state_dict().items() if k.endswith("qzeros")}, strict=False)
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in attn.state_dict().items())
    if layout == "gptq":
        half = {k: v for k, v in Attention(perms=(None,) * 3, seed=2).state_dict().items() if k.endswith("g_idx")}
        with pytest.raises(RuntimeError, match="a new act order for this layer; load its qweight with it"):
            attn.load_state_dict(half, strict=False)  # g_idx without qweight: the words held would be misread
        broken = other.state_dict()
        broken["v_proj.g_idx"] = torch.arange(64, device=broken["v_proj.g_idx"].device).int() // 32
        with pytest.raises(RuntimeError, match="different act-order permutations"):
            attn.load_state_dict(broken)


def quantize_language_model(model: nn.Module, group_size: int = 32):
    """GPTQ tensors for every decoder linear (q/k/v share one act-order permutation, as GPTQ computes
    it from their shared input; gate/up likewise), and a transformers copy with the dequantized weights."""
    from qoqopt.kernels import replace_linears

    dense = copy.deepcopy(model)
    tensors = {}
    g = torch.Generator().manual_seed(2)
    for path, parent in model.named_modules():
        if not path.endswith((".self_attn", ".mlp")) or ".language_model." not in f".{path}":
            continue
        k = next(m.in_features for n, m in parent.named_children() if n in ("q_proj", "gate_proj"))
        shared = torch.randperm(k, generator=g)
        for name, layer in parent.named_children():
            if not isinstance(layer, nn.Linear):
                continue
            perm = shared if name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") else None
            parts, weight = quantized(layer.weight.detach().cpu(), group_size, perm)
            tensors.update({f"{path}.{name}.{key}": t for key, t in parts.items()})
            if layer.bias is not None:
                tensors[f"{path}.{name}.bias"] = layer.bias.detach().cpu()
            dense.get_submodule(f"{path}.{name}").weight.data.copy_(weight.t())
    assert replace_linears(model, tensors, method="gptq") == 7 * model.config.text_config.num_hidden_layers
    return dense


def test_apply_fuses_a_quantized_model_and_matches_transformers(no_interpreter):
    """On the CPU this runs QuantLinear's torch reference (the interpreter would take minutes over a
    whole model): what is checked here is the fusion inside transformers' layers and KV cache; the
    kernels on fused widths are checked above."""
    from qoqopt.kernels import apply

    model = tiny_model()
    dense = quantize_language_model(model)
    batch = two_image_batch(model.config)
    layers = model.config.text_config.num_hidden_layers
    report = apply(model)
    counts = report.counts
    assert (counts["w4a16"], counts["qkv_proj"], counts["gate_up_proj"]) == (7 * layers, layers, layers)
    calls = launches(model.model.language_model.layers[0].self_attn.qkv_proj)
    assert relative_error(logits_of(model, batch), logits_of(dense, batch)) < 1e-4
    assert len(calls) == 1
    # Decode through the KV cache: one-row GEMV launches on views of the fused output.
    settings = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        ours = model.generate(**batch, **settings)
        theirs = dense.generate(**batch, **settings)
    assert len(calls) == 1 + len(ours.logits)
    for step_ours, step_theirs in zip(ours.logits, theirs.logits, strict=True):
        assert relative_error(step_ours.float(), step_theirs.float()) < 1e-4


@pytest.mark.parametrize(("dtype", "words"), [(torch.float32, "fragments"), (torch.float16, "auto")], ids=str)
def test_apply_repacks_fused_layers_as_fragment_words(interpreter, dtype, words, monkeypatch):
    """``apply`` (by default, or asked for ``w4a16_words="fragments"``) repacks each quantized layer after fusion (the fused q/k/v
    whole): the dequantized weights' answers at decode and prefill rows (16-bit x: the fragment
    decode kernel; fp32: the 16-row tensor-core tiles over fragment words), the same state_dict as
    before, GPTQ's words and all, and another model's state loaded back through the fused layer."""
    from qoqopt.kernels import apply

    from qoqopt.kernels import w4a16

    # by default only layers of FRAGMENT_MIN_N outputs and up are repacked: this fused q/k/v is 128 wide
    monkeypatch.setattr(w4a16, "FRAGMENT_MIN_N", 128)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    attn, other = (Attention(k=256, group_size=128, perms=(perm,) * 3, seed=s) for s in (0, 1))
    before = attn.state_dict()
    report = apply(attn, w4a16_words=words) if words != "auto" else apply(attn)
    assert (report.backend, report.counts["qkv_proj"], report.counts["w4a16 fragment words"]) == ("triton", 1, 1)
    assert attn.qkv_proj.words == "fragments" and attn.qkv_proj.qweight.shape == (2, 16 * 128)
    after = attn.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    attn.load_state_dict(other.state_dict())
    monkeypatch.setattr(w4a16, "w4a16_reference", lambda *a, **kw: pytest.fail("the torch path ran"))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=8e-3, rtol=8e-3)
    for rows in (1, 5, 20):
        x = torch.randn(rows, 256, device=DEVICE)
        with torch.no_grad():
            for out, ref in zip(attn(x.to(dtype)), other.reference(x.to(dtype).float())):
                torch.testing.assert_close(out.float(), ref, **tol)


def test_apply_keeps_gptq_words_where_fragment_words_cannot_serve(interpreter):
    """Layers that do not fit fragment words keep GPTQ's, each named when fragments were asked for
    (by default, quietly); an unknown layout is refused."""
    from qoqopt.errors import QoqoptError
    from qoqopt.kernels import apply

    attn = Attention()  # K 64, groups of 32
    report = apply(attn, w4a16_words="fragments")
    assert report.counts["w4a16 fragment words"] == 0 and attn.qkv_proj.words == "gptq"
    assert "kept GPTQ words: fragment words need 4 bits" in report.skipped["qkv_proj"]
    attn = Attention()
    report = apply(attn)
    assert (report.counts["w4a16 fragment words"], report.skipped, attn.qkv_proj.words) == (0, {}, "gptq")
    # fits, but narrower than FRAGMENT_MIN_N (GPTQ words decode the 7B's 512-wide k/v faster): kept
    # by default, repacked when fragments are asked for
    narrow, asked = Attention(k=256, group_size=128), Attention(k=256, group_size=128)
    assert apply(narrow).counts["w4a16 fragment words"] == 0 and narrow.qkv_proj.words == "gptq"
    assert apply(asked, w4a16_words="fragments").counts["w4a16 fragment words"] == 1
    with pytest.raises(QoqoptError, match="w4a16_words='packed'; choose from auto, fragments, gptq"):
        apply(Attention(), w4a16_words="packed")


def test_apply_keeps_gptq_words_for_the_torch_reference(no_interpreter):
    from qoqopt.kernels import apply

    # on the CPU without the interpreter the torch reference runs, whatever device the suite targets
    # (on CUDA the layer would run Triton and be repacked: the H200 run of 2026-11-30 failed here)
    attn = Attention(k=256, group_size=128).cpu()
    report = apply(attn, w4a16_words="fragments")
    assert report.counts["w4a16 fragment words"] == 0 and attn.qkv_proj.words == "gptq"
    assert report.skipped["w4a16 fragment words"] == "1 layer(s) kept GPTQ words: the torch reference runs"
