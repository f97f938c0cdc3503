"""W4A16 layers built from other libraries' modules and from GPTQ builds, against references qoqopt
did not write: the GPTQ and AWQ GEMM layouts as ``benchmarks/spec_layout.py`` reads them (bit by bit,
no qoqopt import) and transformers' own ``GPTQConfig``.

GPTQModel (what transformers 5 loads GPTQ and AWQ checkpoints through) is not installed here, so its
layers are emulated: buffers as the library leaves them in memory after load (its ExllamaV2 layer's
nibble shuffle, ``qdq_4.cuh``'s ``shuffle_4bit_8``; Marlin's repacked shapes), attributes as its
classes carry them, and a forward giving the checkpoint's weights as the spec reads them, which is
what the library's own kernels compute.

Device: CUDA when available (or QOQOPT_KERNEL_DEVICE=cuda), else the CPU, with the Triton interpreter
switched on per test where a kernel runs (fp32 tolerances as in tests/test_kernels.py; bf16 runs the
torch reference there).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.spec_layout import spec_dequantize, spec_unpack_awq, spec_unpack_gptq
from qoqopt.errors import QoqoptError
from tests.kernel_device import DEVICE
from qoqopt.packing import AWQ_ORDER, pack_along_cols, pack_along_rows

FP32 = dict(atol=2e-5, rtol=1e-4)  # tests/test_kernels.py's fp32 tolerance


def gptq_tensors(k, n, group_size, bits=4, seed=0, act_order=False, v2=False):
    """Random GPTQ tensors (qzeros ``ceil(N * bits / 32)`` words a row, the unused fields of a last
    partial word holding noise; fp16 scales) and the ``[N, K]`` weight the spec reads from them."""
    g = torch.Generator().manual_seed(seed)
    ints = torch.randint(0, 2**bits, (k, n), generator=g)
    zeros = torch.randint(1, 2**bits, (k // group_size, n), generator=g)
    scales = (torch.rand(k // group_size, n, generator=g) * 0.02 + 0.005).half()
    g_idx = torch.arange(k) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    noise = torch.randint(0, 2**bits, (zeros.shape[0], -n % (32 // bits)), generator=g)
    qzeros = pack_along_cols(torch.cat([zeros - (0 if v2 else 1), noise], dim=1), bits)
    t = dict(qweight=pack_along_rows(ints, bits), qzeros=qzeros, scales=scales, g_idx=g_idx.int())
    spec_ints, spec_zeros = spec_unpack_gptq(t["qweight"], t["qzeros"], bits)  # v1: stored + 1
    return t, spec_dequantize(spec_ints, spec_zeros - (1 if v2 else 0), scales, g_idx.numpy())


def awq_tensors(k, n, group_size, seed=0, order=AWQ_ORDER):
    """Random AWQ GEMM tensors, their words in ``order`` (AWQ's, or another as a kernel may reorder
    them at load), and the ``[N, K]`` weight the spec reads from the checkpoint's AWQ GEMM words."""
    g = torch.Generator().manual_seed(seed)
    ints, zeros = torch.randint(0, 16, (k, n), generator=g), torch.randint(0, 16, (k // group_size, n), generator=g)
    scales = (torch.rand(k // group_size, n, generator=g) * 0.02 + 0.005).half()
    spec_ints, spec_zeros = spec_unpack_awq(pack_along_cols(ints, 4, AWQ_ORDER), pack_along_cols(zeros, 4, AWQ_ORDER))
    t = dict(qweight=pack_along_cols(ints, 4, order), qzeros=pack_along_cols(zeros, 4, order), scales=scales)
    return t, spec_dequantize(spec_ints, spec_zeros, scales, (torch.arange(k) // group_size).numpy())


class EmulatedLayer(nn.Module):
    """A library's packed linear after load: ``buffers`` as it holds them, ``attrs`` as its class
    sets them; its forward computes ``weight`` (the checkpoint's, as the spec reads it) in x's dtype,
    and records the dtype of each input. ``fp16_chunks``: partial sums of that many rows added in
    fp16, as ExllamaV2's fp16 atomics add them."""

    def __init__(self, weight, buffers, bias=None, fp16_chunks=0, **attrs):
        super().__init__()
        for name, t in buffers.items():
            self.register_buffer(name, t)
        self.bias = bias
        self.spec_weight, self.fp16_chunks, self.seen = weight, fp16_chunks, []
        for name, value in attrs.items():
            setattr(self, name, value)

    def forward(self, x):
        self.seen.append(x.dtype)
        w = self.spec_weight.to(x.device, x.dtype)
        if not self.fp16_chunks:
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        out = torch.zeros(*x.shape[:-1], w.shape[0], device=x.device, dtype=torch.float16)
        for k0 in range(0, w.shape[1], self.fp16_chunks):
            out += F.linear(x[..., k0 : k0 + self.fp16_chunks].half(), w[:, k0 : k0 + self.fp16_chunks].half())
        return out.to(x.dtype)


class TorchQuantLinear(EmulatedLayer):
    """GPTQModel's torch GPTQ layer: the checkpoint's v1 words as they are."""

    def qzero_format(self):
        return 1


class ExllamaV2QuantLinear(EmulatedLayer):
    """GPTQModel's ExllamaV2 layer after ``post_init``: zeros in v2 form, and qweight reordered in place,
    same shape (``q_matrix.cu``: rows made sequential for act order, then ``shuffle_4bit_8``)."""

    def qzero_format(self):
        return 2


class MarlinQuantLinear(EmulatedLayer):
    """GPTQModel's Marlin layer after ``post_init``: qweight ``[K / 16, 2 N]`` (4-bit), qzeros and
    g_idx empty."""


class AwqGEMMQuantLinear(EmulatedLayer):
    """GPTQModel's AWQ GEMM layer (what transformers 5 builds for an AWQ checkpoint): ``bits`` and
    ``group_size``, no ``w_bit``, no ``g_idx``."""


def torch_gptq(k=128, n=64, group_size=32, seed=0, act_order=False, **kwargs) -> TorchQuantLinear:
    t, weight = gptq_tensors(k, n, group_size, seed=seed, act_order=act_order)
    return TorchQuantLinear(weight, t, bits=4, group_size=group_size, **kwargs).to(DEVICE)


def shuffle_4bit_8(words: torch.Tensor) -> torch.Tensor:
    """GPTQModel's ``qdq_4.cuh`` ``shuffle_4bit_8`` on every word: nibbles 0, 2, 4, 6 to the low half,
    1, 3, 5, 7 to the high half."""
    w, out = words.to(torch.int64) & 0xFFFFFFFF, torch.zeros_like(words, dtype=torch.int64)
    for i in range(4):
        out |= ((w >> (8 * i)) & 0xF) << (4 * i)
        out |= ((w >> (8 * i + 4)) & 0xF) << (4 * i + 16)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def exllama_v2(act_order: bool, k=128, n=64, group_size=32) -> ExllamaV2QuantLinear:
    t, weight = gptq_tensors(k, n, group_size, seed=1, act_order=act_order)
    ints, _ = spec_unpack_gptq(t["qweight"], t["qzeros"], 4)
    ints = torch.from_numpy(ints)[torch.argsort(t["g_idx"].long(), stable=True)]  # make_sequential: q_perm order
    qzeros = (t["qzeros"].to(torch.int64) + 0x11111111) & 0xFFFFFFFF  # GPTQModel's v1 -> v2, per word
    buffers = dict(qweight=shuffle_4bit_8(pack_along_rows(ints, 4)), scales=t["scales"], g_idx=t["g_idx"],
                   qzeros=torch.where(qzeros >= 2**31, qzeros - 2**32, qzeros).to(torch.int32))
    return ExllamaV2QuantLinear(weight, buffers, bits=4, group_size=group_size, q_handle=1234).to(DEVICE)


# ----------------------------------------------------------------------------- 1. the forward check


@pytest.mark.parametrize("act_order", [False, True], ids=["groups-in-order", "act-order"])
def test_a_foreign_layer_whose_words_were_reordered_at_load_is_refused(interpreter, act_order):
    """GPTQModel's ExllamaV2 layer keeps GPTQ's shapes but not its word order: read as GPTQ it gave
    errors as large as the outputs. apply() checks each foreign layer once against its own forward
    and leaves this one as it is, saying why (strict: QoqoptError); the one read right is replaced
    and answers as the spec's weights do."""
    from qoqopt.kernels import QuantLinear, apply

    right, reordered = torch_gptq(act_order=act_order), exllama_v2(act_order)
    model = nn.Sequential(right, reordered)
    report = apply(model)
    assert report.counts["w4a16"] == 1 and isinstance(model[0], QuantLinear) and model[1] is reordered
    why = report.skipped["1"]
    assert why.startswith("ExllamaV2QuantLinear: its own forward and the GPTQ reading of its tensors differ "
                          "(relative error ") and "load_with_quant_linear" in why and "\n" not in why, why
    assert reordered.seen == [torch.float16] and right.seen == [torch.float16]  # checked once, in the model's dtype
    x = torch.randn(3, 128, device=DEVICE)
    with torch.inference_mode():
        torch.testing.assert_close(model[0](x), x @ right.spec_weight.T.to(DEVICE), **FP32)
    # strict stops at the reordered layer, after the first was swapped: the swap stays (it computes as
    # the layer it replaced), the error says so, and a second apply refuses the part-patched model
    model = nn.Sequential(torch_gptq(act_order=act_order), exllama_v2(act_order))
    with pytest.raises(QoqoptError, match=r"^apply: 1: ExllamaV2QuantLinear: its own forward and the GPTQ.*\(1 "
                       r"module\(s\) before it were replaced already.*load the model again to apply\)$"):
        apply(model, strict=True)
    assert isinstance(model[0], QuantLinear) and model[1] is not None and not isinstance(model[1], QuantLinear)
    with pytest.raises(QoqoptError, match="^apply: this Sequential was partly patched by an apply that stopped"):
        apply(model)
    nothing_swapped = nn.Sequential(exllama_v2(act_order), torch_gptq(act_order=act_order))
    with pytest.raises(QoqoptError, match=r"^apply: 0: ExllamaV2QuantLinear: its own forward") as stopped:
        apply(nothing_swapped, strict=True)  # stopped before any swap: nothing left behind, nothing to say
    assert "replaced already" not in str(stopped.value)
    assert apply(nothing_swapped).counts["w4a16"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["plain", "act-order", "fp16-partials"])
def test_a_foreign_layer_read_right_passes_its_check_in_the_models_dtype(interpreter, dtype, variant):
    """No false refusals: a foreign GPTQ layer read right passes the check in each model dtype, with
    act order, and against a forward that adds fp16 partial sums (ExllamaV2's fp16 atomics): the
    check's bound (w4a16.FOREIGN_CHECK_RTOL) sits above such rounding. The check calls the foreign
    forward once, with the model's dtype."""
    from qoqopt.kernels import QuantLinear, apply

    foreign = torch_gptq(k=512, act_order=variant == "act-order", fp16_chunks=128 if variant == "fp16-partials" else 0)
    model = nn.Sequential(nn.Linear(4, 4).to(DEVICE, dtype), foreign)  # its weight gives the model's dtype
    report = apply(model)
    assert report.counts["w4a16"] == 1 and isinstance(model[1], QuantLinear) and not report.skipped, report
    assert foreign.seen == [dtype]


def test_a_foreign_layer_whose_forward_fails_is_refused_as_unchecked(interpreter):
    """A foreign forward that cannot run (a GPU-only kernel, say) cannot vouch for the reading: the
    layer is left as it is, saying it could not be checked (first line of the error only)."""
    from qoqopt.kernels import apply

    class CudaOnlyQuantLinear(TorchQuantLinear):
        def forward(self, x):
            raise RuntimeError("no kernel image is available for execution on the device\nCUDA traceback")

    t, weight = gptq_tensors(128, 64, 32)
    failing = CudaOnlyQuantLinear(weight, t, bits=4, group_size=32).to(DEVICE)
    model = nn.Sequential(torch_gptq(), failing)
    report = apply(model)
    assert model[1] is failing and report.skipped["1"] == (
        "CudaOnlyQuantLinear: could not be checked against its own forward, which raised RuntimeError: no kernel "
        "image is available for execution on the device")
    with pytest.raises(QoqoptError, match="^apply: 1: CudaOnlyQuantLinear: could not be checked"):
        apply(nn.Sequential(torch_gptq(), CudaOnlyQuantLinear(weight, t, bits=4, group_size=32)), strict=True)


def test_repacked_shapes_are_named_as_not_plain_gptq_words():
    """Marlin's repack changes the shapes: refused as not GPTQ's plain words, with the likely cause
    and the loader that reads the build itself (it said "quantized tensors disagree")."""
    from qoqopt.kernels import QuantLinear

    t, weight = gptq_tensors(128, 64, 32)
    empty = torch.empty(0, dtype=torch.int32)
    marlin = MarlinQuantLinear(weight, dict(qweight=torch.zeros(128 // 16, 2 * 64, dtype=torch.int32), qzeros=empty,
                                            scales=t["scales"], g_idx=empty), bits=4, group_size=32)
    with pytest.raises(QoqoptError) as err:
        QuantLinear.from_module(marlin)
    message = str(err.value)
    assert message.startswith("MarlinQuantLinear: GPTQ: qweight (8, 128), qzeros (0,), scales (4, 64) are not GPTQ's "
                              "plain packed words (that qweight needs qzeros (4, 16) and scales (4, 128)); "), message
    assert "Marlin" in message.partition(";")[2] and "load_with_quant_linear" in message and "disagree" not in message


# ----------------------------------------------------------------------------- 2. GPTQModel's AWQ layers


def test_gptqmodel_awq_layers_are_recognised_and_checked(interpreter):
    """transformers 5 builds AWQ checkpoints as GPTQModel's AWQ layers (bits and group_size, no w_bit,
    no g_idx): recognised as AWQ, checked against their own forward as GPTQ layers are, and run as
    the AWQ spec reads their words. Words in another order (same shapes) are refused."""
    from qoqopt.kernels import QuantLinear, apply

    def awq_layer(order=AWQ_ORDER, seed=0):
        t, weight = awq_tensors(128, 64, 32, seed=seed, order=order)
        attrs = dict(bits=4, group_size=32, sym=False, desc_act=False, pack_dtype=torch.int32, pack_factor=8)
        return AwqGEMMQuantLinear(weight, t, **attrs).to(DEVICE)

    layers = [awq_layer(), awq_layer(seed=1), awq_layer(order=tuple(range(8)), seed=2)]
    model = nn.Sequential(*layers)
    report = apply(model)
    assert report.counts["w4a16"] == 2 and all(isinstance(m, QuantLinear) and m.source == "awq" for m in model[:2])
    assert model[2] is layers[2] and report.skipped["2"].startswith(
        "AwqGEMMQuantLinear: its own forward and the AWQ GEMM reading of its tensors differ"), report
    x = torch.randn(3, 128, device=DEVICE)
    with torch.inference_mode():
        for layer, foreign in zip(model[:2], layers):
            torch.testing.assert_close(layer(x), x @ foreign.spec_weight.T.to(DEVICE), **FP32)


def test_awq_layers_of_other_bit_widths_are_named():
    from qoqopt.kernels import QuantLinear

    t, weight = awq_tensors(128, 64, 32)
    with pytest.raises(QoqoptError, match="^AwqGEMMQuantLinear: AWQ with bits=3; the W4A16 kernels read 4-bit AWQ$"):
        QuantLinear.from_module(AwqGEMMQuantLinear(weight, t, bits=3, group_size=32))


# ----------------------------------------------------------------------------- 3. a last, partial qzeros word


@pytest.mark.parametrize(("bits", "n"), [(4, 44), (8, 42)])
def test_qzeros_of_a_width_that_is_not_whole_words_end_in_a_partial_word(interpreter, bits, n):
    """N = 44 at 4 bits: qzeros holds ceil(44 / 8) = 6 words a group (GPTQModel's buffer, the GPTQ
    spec's reading), the last one half used. That width is read; the floor width, one word short,
    is refused (the kernels read past its end). Every kernel and the torch reference answer as the
    spec, with noise in the last word's unused fields and in the memory after qzeros."""
    from qoqopt.kernels import QuantLinear
    from qoqopt.kernels.w4a16 import w4a16_matmul

    t, weight = gptq_tensors(64, n, 32, bits)
    groups, words = t["qzeros"].shape
    with pytest.raises(QoqoptError, match=rf"^GPTQ: .* qzeros \({groups}, {words - 1}\), .* are not GPTQ's plain "
                                          rf"packed words \(that qweight needs qzeros \({groups}, {words}\)"):
        QuantLinear.from_gptq(t["qweight"], t["qzeros"][:, :-1].contiguous(), t["scales"], bits=bits)
    storage = torch.cat([t["qzeros"], torch.full((1, words), -1, dtype=torch.int32)]).to(DEVICE)  # then all ones
    layer = QuantLinear.from_gptq(t["qweight"].to(DEVICE), storage[:groups], t["scales"].to(DEVICE), bits=bits)
    assert layer.qzeros.data_ptr() == storage.data_ptr()
    weight = weight.to(DEVICE)
    for m in (1, 3, 40):  # the GEMV, 16-row decode tiles, prefill tiles
        x = torch.randn(m, 64, device=DEVICE)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), x @ weight.T, **FP32)
            torch.testing.assert_close(layer.reference_forward(x), x @ weight.T, **FP32)
            dense = w4a16_matmul(x, layer.qweight, layer.qzeros, layer.scales, bits=bits, group_size=32, zero_offset=1,
                                 KERNEL="dense")
            torch.testing.assert_close(dense, x @ weight.T, **FP32)


def test_layers_ending_in_a_partial_qzeros_word_are_not_fused():
    """Fusion joins qzeros by whole words: a part whose width ends in a partial word is not fused."""
    from qoqopt.kernels import QuantLinear
    from qoqopt.kernels.fused_projections import fuse_projections

    attn = nn.Module()
    for name, n in (("q_proj", 64), ("k_proj", 44), ("v_proj", 44)):
        t, _ = gptq_tensors(64, n, 32)
        setattr(attn, name, QuantLinear.from_gptq(t["qweight"], t["qzeros"], t["scales"]))
    model, skipped = nn.Sequential(attn), {}
    assert fuse_projections(model, skipped)["qkv_proj"] == 0
    assert skipped == {"0.qkv_proj": "not fused: a width is not a multiple of 8 (its qzeros end in a partial word)"}


# ----------------------------------------------------------------------------- 4. group sizes the kernels cannot run


@pytest.mark.parametrize(("k", "group_size"), [(64, 8), (200, 200), (24, 12)])
def test_layers_the_kernels_cannot_run_are_left_as_they_are(interpreter, k, group_size):
    """The kernels' K tiles (16 rows at least) lie in one group: a group size that is not a multiple
    of 16 was reported patched, then every forward raised. apply() leaves such layers as they are,
    saying why (strict: QoqoptError); a QuantLinear among them runs its torch reference, as the spec
    reads its words, whatever the backend."""
    from qoqopt.kernels import QuantLinear, apply

    def model():
        t, weight = gptq_tensors(k, 32, group_size)
        ours = QuantLinear.from_gptq(t["qweight"], t["qzeros"], t["scales"], group_size=group_size).to(DEVICE)
        theirs = TorchQuantLinear(weight, t, bits=4, group_size=group_size).to(DEVICE)
        return nn.Sequential(torch_gptq(), ours, theirs), weight.to(DEVICE)

    (patched, weight), why = model(), f"group_size {group_size} is not a multiple of 16"
    ours, theirs = patched[1], patched[2]
    report = apply(patched)
    assert report.counts["w4a16"] == 1 and patched[1] is ours and patched[2] is theirs
    assert all(report.skipped[path].startswith(why) for path in ("1", "2")), report
    x = torch.randn(3, k, device=DEVICE)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), x @ weight.T, **FP32)
    with pytest.raises(QoqoptError, match=f"^apply: 1: {why}"):
        apply(model()[0], strict=True)


def test_the_torch_reference_reads_groups_smaller_than_a_word(no_interpreter):
    """Groups of 4 rows at 4 bits (two to a word) over a layer so wide that the reference takes one
    group a step: a step must start on a whole word (it sliced an empty word range)."""
    from qoqopt.kernels import QuantLinear

    n = 2**17 + 8
    t, _ = gptq_tensors(8, n, 4)
    layer = QuantLinear.from_gptq(t["qweight"], t["qzeros"], t["scales"], group_size=4)
    x = torch.randn(2, 8)
    with torch.no_grad():
        y = layer(x)
    few = dict(qweight=t["qweight"][:, :64], qzeros=t["qzeros"][:, :8], scales=t["scales"][:, :64])
    ints, zeros = spec_unpack_gptq(few["qweight"], few["qzeros"], 4)
    torch.testing.assert_close(y[:, :64], x @ spec_dequantize(ints, zeros, few["scales"], [0, 0, 0, 0, 1, 1, 1, 1]).T,
                               **FP32)


# ----------------------------------------------------------------------------- 5, 6. load_with_quant_linear


LAYER = "model.layers.0.self_attn.k_proj"  # 256 -> 128, with a bias


def gptq_build(path, tiny_dir, keys: dict, v2: bool):
    """A GPTQ build of the tiny model with one packed layer (``LAYER``), ``keys`` added to its
    quantization_config; returns the build and that layer's weight as the spec reads it."""
    from safetensors.torch import load_file, save_file

    path.mkdir()
    shutil.copy(tiny_dir / "generation_config.json", path)
    config = json.loads((tiny_dir / "config.json").read_text())
    config["quantization_config"] = dict(quant_method="gptq", bits=4, group_size=64, desc_act=False, sym=False, **keys)
    (path / "config.json").write_text(json.dumps(config))
    state = load_file(str(tiny_dir / "model.safetensors"))
    del state[f"{LAYER}.weight"]
    t, weight = gptq_tensors(256, 128, 64, seed=5, v2=v2)
    save_file(state | {f"{LAYER}.{name}": v for name, v in t.items()}, str(path / "model.safetensors"))
    return path, weight, state[f"{LAYER}.bias"]


@pytest.mark.parametrize("keys", [{"format": "gptq_v2"}, {"checkpoint_format": "gptq_v2"}, {},
                                  {"format": "GPTQ", "checkpoint_format": "gptq"}],
                         ids=["format", "checkpoint_format", "neither", "both"])
def test_load_with_quant_linear_reads_the_format_as_transformers_does(tmp_path, tiny_dir, no_interpreter, keys):
    """The zero layout is transformers' GPTQConfig's reading of the config ("format", transformers 5's
    key, was ignored: a gptq_v2 build loaded as v1). Scales stay as stored (fp16) under a bf16 model:
    the kernels and the reference take them to fp32, and rounded to bf16 they moved weights by up to
    0.4%. fp32 activations then give the spec's weights exactly; bf16 ones, to bf16's rounding."""
    from transformers import GPTQConfig

    from qoqopt.exports.hf_quant import load_with_quant_linear
    from qoqopt.kernels import QuantLinear

    fmt = GPTQConfig.from_dict(dict(quant_method="gptq", bits=4, group_size=64, **keys)).format
    build, weight, bias = gptq_build(tmp_path / "build", tiny_dir, keys, v2=fmt == "gptq_v2")
    model = load_with_quant_linear(build, dtype=torch.bfloat16)
    layer = model.get_submodule(LAYER.replace("model.", "model.language_model.", 1))  # the runtime name
    assert isinstance(layer, QuantLinear) and layer.zero_offset == (0 if fmt == "gptq_v2" else 1)
    assert layer.scales.dtype == torch.float16 and layer.bias.dtype == torch.bfloat16
    x = torch.randn(3, 256)
    ref = x @ weight.T + bias.float()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, **FP32)
        torch.testing.assert_close(layer(x.bfloat16()).float(), ref, atol=2e-2, rtol=2e-2)


def test_load_with_quant_linear_refuses_two_formats_that_differ(tmp_path, tiny_dir):
    """transformers reads the legacy checkpoint_format where both are given, its documentation names
    format: a config naming both, differently, is refused rather than read either way."""
    from qoqopt.exports.hf_quant import load_with_quant_linear

    build, _, _ = gptq_build(tmp_path / "build", tiny_dir, {"format": "gptq_v2", "checkpoint_format": "gptq"}, v2=True)
    with pytest.raises(QoqoptError, match=r"names two GPTQ formats, format 'gptq_v2' and checkpoint_format 'gptq'; "
                                          r"make them agree$"):
        load_with_quant_linear(build)


def test_fused_biases_keep_their_dtype_beside_fp16_scales():
    """Scales kept in fp16 under a bf16 model: a part without a bias is joined with zeros of the biases'
    dtype (zeros of the scales' made torch.cat promote the fused bias to fp32)."""
    from qoqopt.kernels import QuantLinear
    from qoqopt.kernels.fused_projections import concat_layers

    layers = []
    for seed, has_bias in enumerate((True, False, True)):
        t, _ = gptq_tensors(64, 32, 32, seed=seed)
        bias = torch.randn(32).bfloat16() if has_bias else None
        layers.append(QuantLinear.from_gptq(t["qweight"], t["qzeros"], t["scales"], None, bias))
    fused = concat_layers(layers)
    assert fused.bias.dtype == torch.bfloat16 and fused.bias[32:64].eq(0).all()
