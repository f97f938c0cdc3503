"""Kernel ops against their peers at QoQ-Med-7B vision / language dims (pytest-benchmark groups).

The do_bench-based script with rooflines and targets is bench_kernels.py; this suite gives the same
comparisons in pytest-benchmark's format (`--benchmark-json`, `--benchmark-compare`)."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import timed

VISION_HIDDEN, HEADS, MERGER_OUT = 1280, 16, 3584
PATCHES = 1024  # a 448x448 scan: 32x32 patches


@pytest.fixture(scope="module")
def merger_pair(device, dtype):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    from qoqopt.kernels.merger import FusedPatchMerger

    torch.manual_seed(0)
    hf = Qwen2_5_VLPatchMerger(dim=MERGER_OUT, context_dim=VISION_HIDDEN).eval().to(device, dtype)
    return {"hf-eager": hf, "qoqopt": FusedPatchMerger.from_hf(hf)}


@pytest.mark.parametrize("impl", ["hf-eager", "qoqopt"])
def test_merger(benchmark, merger_pair, impl, device, dtype):
    benchmark.group = f"merger {PATCHES} patches {dtype}"
    x = torch.randn(PATCHES, VISION_HIDDEN, device=device, dtype=dtype)
    with torch.no_grad():
        timed(benchmark, lambda: merger_pair[impl](x), device)


@pytest.fixture(scope="module")
def attention_pair(device, dtype):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    from qoqopt.kernels.vision_attention import FusedVisionAttention, VarlenPlanCache

    cfg = Qwen2_5_VLConfig(vision_config={"hidden_size": VISION_HIDDEN, "num_heads": HEADS}).vision_config
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = Qwen2_5_VLVisionAttention(cfg).eval().to(device, dtype)
    return {"hf-sdpa": hf, "qoqopt": FusedVisionAttention.from_hf(hf, VarlenPlanCache())}


@pytest.mark.parametrize("windows", [True, False], ids=["window-64", "full"])
@pytest.mark.parametrize("impl", ["hf-sdpa", "qoqopt"])
def test_vision_attention(benchmark, attention_pair, impl, windows, device, dtype):
    benchmark.group = f"vision attention {PATCHES} patches {'64-patch windows' if windows else 'full'} {dtype}"
    x = torch.randn(PATCHES, VISION_HIDDEN, device=device, dtype=dtype)
    head_dim = VISION_HIDDEN // HEADS
    angles = torch.randn(PATCHES, head_dim // 2, device=device).repeat(1, 2)
    pos = (angles.cos().to(dtype), angles.sin().to(dtype))
    step = 64 if windows else PATCHES
    cu = torch.arange(0, PATCHES + 1, step, device=device, dtype=torch.int32)
    with torch.no_grad():
        timed(benchmark, lambda: attention_pair[impl](x, cu_seqlens=cu, position_embeddings=pos), device)


@pytest.mark.parametrize("m", [1, 16, 128])
@pytest.mark.parametrize("impl", ["dense", "gptq", "awq"])
def test_w4a16(benchmark, impl, m, device, dtype):
    """The 7B MLP down projection (18944 -> 3584), group size 128."""
    from qoqopt.kernels.w4a16 import QuantLinear
    from qoqopt.packing import pack_awq, pack_gptq, quantize_rtn

    k, n = 18944, 3584
    benchmark.group = f"w4a16 {k}->{n} M={m} {dtype}"
    torch.manual_seed(0)
    weight = (torch.randn(n, k, device=device) * 0.02).to(dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)
    if impl == "dense":
        fn = lambda: F.linear(x, weight)  # noqa: E731
    else:
        q, z, s = quantize_rtn(weight, 4, 128)
        layer = QuantLinear.from_gptq(*pack_gptq(q, z), s) if impl == "gptq" else QuantLinear.from_awq(*pack_awq(q, z), s)
        if device.type == "cuda":  # as apply() leaves it
            layer.use_fragment_words(only_where_faster=True)
        fn = lambda: layer(x)  # noqa: E731
    with torch.no_grad():
        timed(benchmark, fn, device)
