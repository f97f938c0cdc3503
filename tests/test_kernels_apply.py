"""qoqopt.kernels.apply on a whole Qwen2.5-VL model: same logits, clear refusals, clean patching.

Runs on CUDA when available (or QOQOPT_KERNEL_DEVICE=cuda), else on the CPU through the Triton
interpreter (switched on per test). The end-to-end check is fp32: relative error < 1e-4 of the
patched model's logits against the unpatched model on a batch of two images of different sizes.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from qoqopt.errors import QoqoptError
from tests.kernel_device import DEVICE

IMAGE_PAD, VISION_START, VISION_END, PAD = 151655, 151652, 151653, 151643


@pytest.fixture(autouse=True)
def exact_fp32_reference(monkeypatch):
    """The unpatched model is the reference: on CUDA its Conv3d patch embedding would otherwise run as
    TF32 in cuDNN (torch's default), making it the less exact side (seen on an H200: 1.3e-4 apart in
    the vision output, 3.4e-4 in the logits; the patched path is an IEEE fp32 matmul)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # torch's matmuls are IEEE fp32 by default


def tiny_model():
    """The project's mini QoQ-Med (vision: 4 blocks, full attention at 1 and 3, window 112)."""
    from qoqopt.mini import build_model

    return build_model("tiny", seed=0).to(DEVICE).eval()


def two_image_batch(config, grids=((1, 12, 20), (1, 6, 8))):
    """Inputs as the processor builds them: one image per sequence, right-padded, with
    mm_token_type_ids marking the <|image_pad|> tokens (without it M-RoPE silently goes 1-D).
    The 12 x 20 grid cuts windows at both image edges; 6 x 8 is smaller than one window."""
    g = torch.Generator().manual_seed(0)
    vision = config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    merge = vision.spatial_merge_size**2
    rows = []
    for t, h, w in grids:
        prompt = torch.randint(1000, 5000, (5,), generator=g).tolist()
        rows.append([151644] + prompt[:2] + [VISION_START] + [IMAGE_PAD] * (t * h * w // merge) + [VISION_END] + prompt[2:])
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    n_patches = sum(t * h * w for t, h, w in grids)
    return dict(
        input_ids=input_ids.to(DEVICE),
        attention_mask=attention_mask.to(DEVICE),
        mm_token_type_ids=(input_ids == IMAGE_PAD).int().to(DEVICE),
        pixel_values=torch.randn(n_patches, patch_dim, generator=g).to(DEVICE),
        image_grid_thw=torch.tensor(grids).to(DEVICE),
    )


def logits_of(model, batch):
    with torch.inference_mode():
        logits = model(**batch).logits
    return logits[batch["attention_mask"].bool()].float()


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# "cublas" (the default): the merger's norm in one Triton pass, its GEMMs in torch; "fused": one Triton fc1
@pytest.mark.parametrize("merger", ["fused", "cublas"])
def test_apply_matches_unpatched_model(interpreter, merger, monkeypatch):
    import sys

    from qoqopt.kernels import apply
    from qoqopt.kernels.merger import FusedPatchMerger
    from qoqopt.kernels.vision_attention import FusedVisionAttention

    # the kernels must run: the torch fallbacks (transformers' own sums) would match as well
    def fallback(*args, **kwargs):
        pytest.fail("a patched module fell back to its torch reference")

    monkeypatch.setattr(sys.modules[FusedPatchMerger.__module__], "patch_merger_reference", fallback)
    monkeypatch.setattr(sys.modules[FusedVisionAttention.__module__], "vision_attention_reference", fallback)
    model = tiny_model()
    batch = two_image_batch(model.config)
    ref = logits_of(model, batch)
    report = apply(model, merger=merger)
    assert isinstance(model.model.visual.merger, FusedPatchMerger) and model.model.visual.merger.plan == merger
    assert f"merger x1 ({merger} plan)" in str(report)
    assert report.backend == "triton", report
    depth = model.config.vision_config.depth
    assert report.counts == {"patch_embed": 1, "vision_mlp": depth, "vision_attention": depth, "merger": 1, "w4a16": 0,
                             "qkv_proj": 0, "gate_up_proj": 0, "w4a16 fragment words": 0}
    out = logits_of(model, batch)
    error = relative_error(out, ref)
    print(f"apply(model, merger={merger!r}): fp32 logits' relative error {error:.2e} (bar 1e-4)")  # seen with -s
    assert error < 1e-4, error
    # Plans are per forward, not per layer: one for the windows, one for the full-attention blocks;
    # likewise the packed rotary table, built once from the position embeddings every layer receives.
    plans = model.model.visual.blocks[0].attn.plans
    assert (plans.builds, plans.table_builds) == (2, 1)


@pytest.mark.parametrize("stopped", [False, True], ids=["applied", "strict-apply-stopped-at-the-merger"])
def test_a_cu_seqlens_buffer_refilled_in_place_is_read_afresh(interpreter, stopped, monkeypatch):
    """transformers' vision tower takes ``cu_seqlens`` precomputed from its caller (vision_utils), who
    may refill one buffer between forwards. Under inference_mode that buffer has no version counter,
    so the attention plans live one forward of the tower: a second batch of as many patches, cut into
    images differently, gives what transformers' tower gives (a stale plan was 1.2 off in places).
    Also where a strict apply stopped after the attention layers were swapped (their per-forward
    reset was only set up at the end, so a stopped apply left them reading stale plans)."""
    from qoqopt.kernels import apply, registry

    pytest.importorskip("transformers.vision_utils", reason="this transformers computes cu_seqlens itself")
    model, reference = tiny_model(), tiny_model()
    if stopped:
        def refuse(*args):
            raise QoqoptError("refused for this test")

        monkeypatch.setattr(registry.FusedPatchMerger, "from_hf", refuse)
        with pytest.raises(QoqoptError, match=r"merger: refused for this test \(\d+ module\(s\) before it were replaced"):
            apply(model, strict=True)
        assert type(model.model.visual.blocks[0].attn).__name__ == "FusedVisionAttention"
    else:
        apply(model)
    vision = model.config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        cu_seqlens = torch.zeros(3, dtype=torch.int32, device=DEVICE)  # an inference tensor
        for grid in ([[1, 8, 8], [1, 8, 8]], [[1, 4, 8], [1, 12, 8]]):  # 128 patches both times
            grid = torch.tensor(grid, device=DEVICE)
            cu_seqlens[1:] = grid.prod(1).cumsum(0)
            pixels = torch.randn(int(cu_seqlens[-1]), patch_dim, generator=g).to(DEVICE)
            out = model.model.visual(pixels, grid_thw=grid, cu_seqlens=cu_seqlens).pooler_output
            ref = reference.model.visual(pixels, grid_thw=grid, cu_seqlens=cu_seqlens.clone()).pooler_output
            assert relative_error(out, ref) < 1e-4, (grid.tolist(), relative_error(out, ref))


def test_an_apply_that_stops_before_any_swap_leaves_the_model_as_it_was(interpreter, monkeypatch):
    """The attention plans' per-forward reset is hooked on before the swaps (a stopped apply's
    attention layers need it); an apply that stops before swapping anything takes it off again, so a
    retry does not stack a hook per attempt, and the model is not marked as patched."""
    from qoqopt.kernels import apply, registry

    model = tiny_model()
    visual = model.model.visual
    before = len(visual._forward_pre_hooks)

    def refuse(*args):
        raise QoqoptError("refused for this test")

    with monkeypatch.context() as m:
        m.setattr(registry.MatmulPatchEmbed, "from_hf", refuse)
        with pytest.raises(QoqoptError, match=r"patch_embed: refused for this test$"):
            apply(model, strict=True)
    assert len(visual._forward_pre_hooks) == before and not getattr(model, registry._PATCHED, False)
    assert apply(model).counts["vision_attention"] == len(visual.blocks)
    assert len(visual._forward_pre_hooks) == before + 1


def test_a_forward_that_records_autograd_says_the_kernels_did_not_run(interpreter, monkeypatch):
    """from_pretrained's parameters require grad: a plain ``model(**batch)`` ran every patched module's
    torch reference (the kernels have no backward) and said nothing. It says so, once; under
    no_grad (as generate() runs) the kernels run and nothing is said."""
    import warnings

    from qoqopt.kernels import _triton, apply

    monkeypatch.setattr(_triton, "_GRAD_FALLBACK_SAID", [])
    model = tiny_model()
    assert all(p.requires_grad for p in model.parameters())
    batch = two_image_batch(model.config, grids=((1, 4, 4), (1, 2, 6)))
    apply(model)
    with pytest.warns(UserWarning, match="autograd is recording .* torch.inference_mode\\(\\) or torch.no_grad\\(\\)") as said:
        model(**batch)
        model(**batch)
    assert len([w for w in said if "qoqopt.kernels" in str(w.message)]) == 1
    monkeypatch.setattr(_triton, "_GRAD_FALLBACK_SAID", [])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        model(**batch)


def test_reference_fallback_without_interpreter(no_interpreter):
    if DEVICE.type != "cpu":
        pytest.skip("the fallback is for CPU tensors without TRITON_INTERPRET")
    from qoqopt.kernels import apply

    model = tiny_model()
    batch = two_image_batch(model.config, grids=((1, 4, 4), (1, 2, 6)))
    ref = logits_of(model, batch)
    report = apply(model)
    assert report.backend == "torch" and ("TRITON_INTERPRET" in report.fallback_reason or "triton" in report.fallback_reason)
    assert relative_error(logits_of(model, batch), ref) < 1e-5
    with pytest.raises(QoqoptError, match="strict"):
        apply(tiny_model(), strict=True)


def test_a_cuda_box_without_a_c_compiler_runs_the_references(monkeypatch, tmp_path):
    """Triton builds its CUDA launchers with the host's C compiler ($CC, else gcc, else clang); a CUDA
    runtime image has none, and the first patched forward died in Triton's "Failed to find C
    compiler". qoqopt's rule is checked against Triton's own search in each case: it refuses exactly
    when Triton's finds nothing, and names the fix."""
    triton_build = pytest.importorskip("triton.runtime.build")
    from qoqopt.kernels import _triton

    def tritons_answer() -> bool:
        triton_build._find_compiler.cache_clear()
        try:
            triton_build._find_compiler("c")
            return True
        except RuntimeError as err:
            assert "Failed to find C compiler" in str(err)
            return False

    (tmp_path / "bin").mkdir()
    monkeypatch.setattr(_triton, "_no_c_compiler_reason", functools.cache(_triton._no_c_compiler_reason.__wrapped__))
    cuda = torch.device("cuda", 0)
    for path, cc in ((str(tmp_path / "bin"), None), (str(tmp_path / "bin"), "cc-of-my-choice"), (os.environ["PATH"], None)):
        monkeypatch.setenv("PATH", path)
        monkeypatch.delenv("CC", raising=False) if cc is None else monkeypatch.setenv("CC", cc)
        _triton._no_c_compiler_reason.cache_clear()
        reason = _triton.triton_unusable_reason(cuda, torch.float16)
        assert (reason is None) == tritons_answer(), (path, cc, reason)
        assert reason is None or "install gcc, or set CC" in reason
    triton_build._find_compiler.cache_clear()


def test_without_triton_installed_everything_runs_its_torch_reference(tmp_path):
    """Triton is an optional extra: without it `qoqopt.kernels` still imports (a module-level
    ``tl.constexpr`` value once failed), apply() falls back and says why, and a GPTQ layer computes
    the spec's product. Run in a child where ``import triton`` fails as it does when not installed."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from benchmarks.spec_layout import spec_dequantize\n"
        "from qoqopt.kernels import apply\n"
        "from qoqopt.kernels.w4a16 import QuantLinear\n"
        "from qoqopt.packing import pack_gptq, quantize_rtn\n"
        "from tests.test_kernels_apply import logits_of, relative_error, tiny_model, two_image_batch\n"
        "model = tiny_model().cpu()\n"
        "batch = {k: v.cpu() for k, v in two_image_batch(model.config).items()}\n"
        "ref = logits_of(model, batch)\n"
        "report = apply(model)\n"
        "print(report.backend, report.fallback_reason, relative_error(logits_of(model, batch), ref) < 1e-5)\n"
        "ints, zeros, scales = quantize_rtn(torch.randn(64, 256) * 0.02, 4, 128)\n"
        "layer = QuantLinear.from_gptq(*pack_gptq(ints, zeros), scales)\n"
        "x = torch.randn(3, 256)\n"
        "want = x @ spec_dequantize(ints.numpy(), zeros.numpy(), scales, torch.arange(256) // 128).T\n"
        "with torch.no_grad():\n"
        "    print(torch.allclose(layer(x).float(), want, rtol=1e-4, atol=1e-5))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines() == ["torch torch reference: triton is not installed True", "True"], res.stdout


def test_state_dict_keys_unchanged_and_reload(no_interpreter):
    from qoqopt.kernels import apply

    model = tiny_model()
    before = model.state_dict()
    apply(model)
    after = model.state_dict()
    assert sorted(after) == sorted(before)  # order differs (gate/up are split back after down_proj)
    assert all(torch.equal(after[k], before[k]) for k in before)
    model.load_state_dict(before)  # the fused gate/up accepts transformers' split keys
    # ... and routes them to the right halves: other weights loaded into the patched model give the
    # logits transformers gives with those weights (a swapped gate/up would not)
    from qoqopt.mini import build_model

    other = build_model("tiny", seed=1).to(DEVICE).eval()
    model.load_state_dict(other.state_dict())
    ids = torch.tensor([[9707, 11, 1879, 0, 151645]], device=DEVICE)
    pixels = torch.randn(4 * 4, 3 * 2 * 14 * 14, device=DEVICE)
    grid = torch.tensor([[1, 4, 4]], device=DEVICE)
    with torch.no_grad():
        ours = model.model.visual(pixels, grid_thw=grid).pooler_output
        theirs = other.model.visual(pixels, grid_thw=grid).pooler_output
        torch.testing.assert_close(model(input_ids=ids).logits, other(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_refuses_unsupported_dtype_and_non_qwen_models():
    from qoqopt.kernels import apply

    with pytest.raises(QoqoptError, match="dtype"):
        apply(nn.Sequential(nn.Linear(4, 4)).double())
    with pytest.raises(QoqoptError, match="nothing to patch"):
        apply(nn.Sequential(nn.Linear(4, 4)))
    # an unknown plan is refused up front, not left to each layer's build (which would skip it)
    with pytest.raises(QoqoptError, match="merger=.cuBLAS.; choose from cublas, fused, overlap"):
        apply(tiny_model(), merger="cuBLAS")
    # a path, or a module that is itself a target (an AttributeError on '' before), in one line
    with pytest.raises(QoqoptError, match="^apply: expects the loaded model .*, got str$"):
        apply("/models/qoq-med")
    merger = tiny_model().model.visual.merger
    with pytest.raises(QoqoptError, match="^apply: patches the modules inside a model; give it the model that holds"):
        apply(merger)
    # a second apply() found only its own modules and said the model was not a Qwen2.5-VL one
    model = tiny_model()
    apply(model)
    with pytest.raises(QoqoptError, match="^apply: this Qwen2_5_VLForConditionalGeneration is patched already"):
        apply(model)


def test_when_every_quantized_layer_is_refused_the_reason_is_said(interpreter):
    """3-bit GPTQ layers (the kernels read 4 and 8): the reason, not "expected a Qwen2.5-VL model";
    with strict, the layer is named."""
    from qoqopt.kernels import apply
    from qoqopt.packing import pack_gptq, quantize_rtn

    q, z, s = quantize_rtn(torch.randn(32, 64) * 0.1, 4, 32)
    g_idx = torch.arange(64, dtype=torch.int32) // 32
    model = nn.Sequential(*(ForeignGPTQLinear(*pack_gptq(q, z), s, g_idx, bits=3) for _ in range(2)))
    with pytest.raises(QoqoptError, match=r"^apply: nothing could be patched in Sequential: 0: GPTQ: unsupported "
                                          r"bits=3 / checkpoint_format='gptq' \(and 1 more\)$"):  # fmt: skip
        apply(model)
    with pytest.raises(QoqoptError, match=r"^apply: 0: GPTQ: unsupported bits=3"):
        apply(model, strict=True)


def test_refuses_offloaded_layers():
    """``device_map`` with CPU or disk offload leaves layers on the meta device until a forward loads
    them; apply refuses before patching anything."""
    from qoqopt.kernels import apply

    model = tiny_model()
    model.lm_head.to("meta")
    with pytest.raises(QoqoptError, match="^apply: the model's weights are on .*meta.*offload") as err:
        apply(model)
    assert "\n" not in str(err.value)
    assert type(model.model.visual.merger).__name__ == "Qwen2_5_VLPatchMerger"  # nothing was patched


def test_device_map_hooks_survive_patching(no_interpreter):
    """A model loaded with ``device_map`` over several GPUs carries accelerate hooks, and the one on a
    module placed on its own GPU moves its inputs there. A patched module must keep running it: here a
    hook (accelerate's own hook API) that records each call and shifts the input (a shift, not a
    scale, which the merger's RMSNorm would undo), so the logits show whether it ran."""
    hooks = pytest.importorskip("accelerate.hooks")
    from qoqopt.kernels import apply
    from qoqopt.kernels.merger import FusedPatchMerger

    class Shift(hooks.ModelHook):
        def __init__(self):
            self.calls = 0

        def pre_forward(self, module, hidden_states, *args, **kwargs):
            self.calls += 1
            return (hidden_states + 0.5, *args), kwargs

    model = tiny_model()
    batch = two_image_batch(model.config, grids=((1, 4, 4), (1, 2, 6)))
    plain = logits_of(model, batch)
    hook = Shift()
    hooks.add_hook_to_module(model.model.visual.merger, hook)
    ref = logits_of(model, batch)
    assert relative_error(plain, ref) > 1e-3  # the hook shows in the logits
    apply(model)
    merger = model.model.visual.merger
    assert isinstance(merger, FusedPatchMerger) and merger._hf_hook is hook
    calls = hook.calls
    assert relative_error(logits_of(model, batch), ref) < 1e-4
    assert hook.calls == calls + 1


class ForeignGPTQLinear(nn.Module):
    """Shaped like another library's GPTQ linear: packed buffers plus bits and g_idx attributes."""

    def __init__(self, qweight, qzeros, scales, g_idx, bits):
        super().__init__()
        self.bits = bits
        for name, t in dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx).items():
            self.register_buffer(name, t)
        self.bias = None


def test_registry_replaces_foreign_quantized_linears(interpreter):
    from benchmarks.spec_layout import spec_unpack_gptq
    from qoqopt.kernels import QuantLinear, apply
    from qoqopt.packing import pack_gptq, quantize_rtn

    weight = torch.randn(32, 64) * 0.1
    q, z, s = quantize_rtn(weight, 4, 32)
    g_idx = torch.arange(64, dtype=torch.int32) // 32
    packed = pack_gptq(q, z)
    model = nn.Sequential(ForeignGPTQLinear(*packed, s, g_idx, bits=4)).to(DEVICE)
    report = apply(model)
    assert report.counts["w4a16"] == 1 and isinstance(model[0], QuantLinear) and report.backend == "triton"
    x = torch.randn(3, 64, device=DEVICE)
    with torch.inference_mode():
        y = model(x)
    # the foreign layer's packed tensors, read as the GPTQ v1 spec states (benchmarks/spec_layout.py)
    ints, zeros = (torch.from_numpy(a).float() for a in spec_unpack_gptq(*packed, 4))
    w = (ints - zeros.repeat_interleave(32, 0)) * s.float().repeat_interleave(32, 0)
    torch.testing.assert_close(y, x @ w.to(DEVICE), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("act_order", [False, True], ids=["g_idx-trivial", "act-order"])
def test_a_replaced_foreign_layer_keeps_the_checkpoint_it_came_from(interpreter, act_order):
    """A foreign GPTQ linear becomes a QuantLinear that runs K permuted where g_idx is act-order. Its
    state_dict is still the foreign layer's, tensor for tensor (g_idx kept, qweight in input order;
    g_idx was dropped and qweight saved permuted), so a save after apply() is a GPTQ checkpoint, and
    a model built from it loads that state back and answers as the spec's weights do."""
    from benchmarks.spec_layout import spec_dequantize, spec_unpack_gptq
    from qoqopt.kernels import apply
    from tests.test_kernels_fusion import quantized

    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3)) if act_order else None
    t, _ = quantized(torch.randn(48, 256) * 0.1, 64, perm)
    foreign = nn.Sequential(ForeignGPTQLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)).to(DEVICE)
    before = {k: v.clone() for k, v in foreign.state_dict().items()}
    apply(foreign)
    assert (foreign[0].perm is not None) == act_order
    after = foreign.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    ints, zeros = spec_unpack_gptq(t["qweight"], t["qzeros"], 4)
    w = spec_dequantize(ints, zeros, t["scales"], t["g_idx"].numpy()).to(DEVICE)
    other = nn.Sequential(ForeignGPTQLinear(*(torch.zeros_like(t[n]) for n in ("qweight", "qzeros")), t["scales"],
                                            torch.arange(256, dtype=torch.int32) // 64, bits=4)).to(DEVICE)
    apply(other)  # built from another layout (no act-order), then given this checkpoint
    other.load_state_dict(after)
    x = torch.randn(3, 256, device=DEVICE)
    with torch.inference_mode():
        for model in (foreign, other):
            torch.testing.assert_close(model(x), x @ w.T, atol=1e-4, rtol=1e-4)


def test_a_quantized_vision_tower_is_patched_around_its_w4a16_layers(interpreter):
    """An AWQ build's --quantize-vision packs the vision blocks' Linears (here another library's GPTQ
    layers): the fused attention runs around a packed qkv and proj, each replaced by a W4A16 layer; the
    MLP keeps transformers' module, its packed gate/up fused as one. The logits match the unpatched
    model holding the same weights dequantized as the GPTQ spec states (benchmarks/spec_layout.py)."""
    from benchmarks.spec_layout import spec_dequantize, spec_unpack_gptq
    from qoqopt.kernels import QuantLinear, apply
    from qoqopt.kernels.vision_attention import FusedVisionAttention
    from tests.test_kernels_fusion import quantized

    model, reference = tiny_model(), tiny_model()
    # block 0's attention and block 1's MLP (the interpreter takes seconds per W4A16 launch)
    names = ((0, "attn", "qkv"), (0, "attn", "proj"), (1, "mlp", "gate_proj"), (1, "mlp", "up_proj"),
             (1, "mlp", "down_proj"))
    for index, parent, name in names:
        owner = getattr(model.model.visual.blocks[index], parent)
        linear = getattr(owner, name)
        t, _ = quantized(linear.weight.detach().cpu(), 64)
        foreign = ForeignGPTQLinear(t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"], bits=4)
        foreign.bias = linear.bias
        setattr(owner, name, foreign.to(DEVICE))
        ints, zeros = spec_unpack_gptq(t["qweight"], t["qzeros"], 4)
        with torch.no_grad():
            getattr(getattr(reference.model.visual.blocks[index], parent), name).weight.copy_(
                spec_dequantize(ints, zeros, t["scales"].float(), t["g_idx"].numpy()))
    batch = two_image_batch(model.config, grids=((1, 4, 8), (1, 4, 4)))
    ref = logits_of(reference, batch)
    report = apply(model)
    depth = model.config.vision_config.depth
    assert report.counts == {"patch_embed": 1, "vision_mlp": depth - 1, "vision_attention": depth, "merger": 1,
                             "w4a16": len(names), "qkv_proj": 0, "gate_up_proj": 1, "w4a16 fragment words": 0}, report
    assert not report.skipped and report.backend == "triton", report
    attn = model.model.visual.blocks[0].attn
    assert isinstance(attn, FusedVisionAttention) and isinstance(attn.qkv, QuantLinear), attn
    error = relative_error(logits_of(model, batch), ref)
    assert error < 1e-4, error


def test_apply_frees_each_replaced_layer_before_building_the_next(no_interpreter, monkeypatch):
    """Repacking foreign layers must not hold two copies of the model's quantized weights at once."""
    import gc
    import weakref

    from qoqopt.kernels import QuantLinear, apply
    from qoqopt.packing import pack_gptq, quantize_rtn

    def foreign():
        q, z, s = quantize_rtn(torch.randn(32, 64), 4, 32)
        return ForeignGPTQLinear(*pack_gptq(q, z), s, torch.arange(64, dtype=torch.int32) // 32, bits=4)

    model = nn.Sequential(foreign(), foreign(), foreign())
    replaced, alive_at_build = [], []
    real = QuantLinear.from_module

    def spy(module, strict=False):
        gc.collect()
        alive_at_build.append(sum(ref() is not None for ref in replaced))
        replaced.append(weakref.ref(module))
        return real(module, strict)

    monkeypatch.setattr(QuantLinear, "from_module", staticmethod(spy))
    assert apply(model).counts["w4a16"] == 3
    assert alive_at_build == [0, 0, 0]


class ForeignAWQLinear(nn.Module):
    """Shaped like AutoAWQ's WQLinear_GEMM: packed buffers, w_bit and the group size it was made with."""

    def __init__(self, qweight, qzeros, scales, group_size):
        super().__init__()
        self.w_bit, self.group_size, self.bias = 4, group_size, None
        for name, t in dict(qweight=qweight, qzeros=qzeros, scales=scales).items():
            self.register_buffer(name, t)


def test_a_group_size_the_scales_do_not_fit_is_refused(no_interpreter):
    """Two groups of scales over K = 200 rows are 100 + 100, or 128 + 72 (groups of 128: ceil(200 / 128)
    = 2), and the tensors alone cannot tell. A layer that states its group size (a foreign layer's
    attribute, a checkpoint's quantization_config) is read by it: 128 is refused in one line, not
    run as groups of 100; -1 is one group of all K."""
    from benchmarks.spec_layout import spec_dequantize, spec_unpack_gptq
    from qoqopt.kernels import QuantLinear
    from qoqopt.packing import pack_awq, pack_gptq

    g = torch.Generator().manual_seed(0)
    intweight, zeros = torch.randint(0, 16, (200, 16), generator=g), torch.randint(1, 16, (2, 16), generator=g)
    scales = torch.rand(2, 16, generator=g).half()
    gptq, awq = pack_gptq(intweight, zeros), pack_awq(intweight, zeros)
    assert QuantLinear.from_gptq(*gptq, scales).group_size == 100  # unstated: whole groups
    stated = QuantLinear.from_gptq(*gptq, scales, group_size=100)
    ints, stored_zeros = spec_unpack_gptq(*gptq, 4)  # the GPTQ v1 spec's reading (benchmarks/spec_layout.py)
    weight = spec_dequantize(ints, stored_zeros, scales.float(), (torch.arange(200) // 100).numpy())
    x = torch.randn(3, 200, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(stated(x).float(), x @ weight.T, atol=1e-3, rtol=1e-3)
    assert QuantLinear.from_module(ForeignAWQLinear(*awq, scales, 100)).group_size == 100
    assert QuantLinear.from_gptq(*pack_gptq(intweight, zeros[:1]), scales[:1], group_size=-1).group_size == 200
    with pytest.raises(QoqoptError, match="GPTQ: K=200 in groups of 128 rows does not give the 2 groups"):
        QuantLinear.from_gptq(*gptq, scales, group_size=128)
    with pytest.raises(QoqoptError, match="AWQ: K=200 in groups of 128 rows does not give the 2 groups"):
        QuantLinear.from_module(ForeignAWQLinear(*awq, scales, 128))


def test_replace_linears_from_checkpoint_tensors(no_interpreter):
    """A GPTQ/AWQ checkpoint runs through QuantLinear with no other kernel library."""
    from qoqopt.kernels.w4a16 import QuantLinear, replace_linears
    from qoqopt.packing import dequantize, pack_awq, pack_gptq, quantize_rtn

    model = nn.Sequential(nn.Linear(64, 32, bias=True), nn.ReLU(), nn.Linear(32, 16, bias=False))
    tensors, dense = {}, {}
    for path, layer, method in (("0", model[0], "gptq"), ("2", model[2], "awq")):
        q, z, s = quantize_rtn(layer.weight.detach(), 4, 32)
        qweight, qzeros = pack_gptq(q, z) if method == "gptq" else pack_awq(q, z)
        tensors.update({f"{path}.qweight": qweight, f"{path}.qzeros": qzeros, f"{path}.scales": s})
        dense[path] = dequantize(q, z, s, torch.arange(q.shape[0]) // 32)
    tensors["0.bias"] = model[0].bias.detach()
    assert replace_linears(model, {k: v for k, v in tensors.items() if k.startswith("0.")}, method="gptq") == 1
    assert replace_linears(model, {k: v for k, v in tensors.items() if k.startswith("2.")}, method="awq") == 1
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        ref = torch.relu(x @ dense["0"] + tensors["0.bias"]) @ dense["2"]
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(QoqoptError, match="expects"):
        replace_linears(nn.Sequential(nn.Linear(48, 32)), {k: v for k, v in tensors.items() if k.startswith("0.")},
                        method="gptq")
