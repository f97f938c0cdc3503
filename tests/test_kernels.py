"""Op-level checks of qoqopt.kernels against transformers' modules and the torch references.

Device: CUDA when available (or QOQOPT_KERNEL_DEVICE=cuda), else the CPU through the Triton
interpreter, which this module switches on for its own tests only. bf16 runs on CUDA only: the
interpreter has no bf16 dot. Every output buffer is filled with NaN first, so an element the kernel
forgets to write fails the comparison.

Tolerances (atol, rtol) per dtype, against references that round at different points:
  fp32 2e-5 / 1e-4 (GPU fp32 dots run as IEEE fp32, never tf32)
  fp16 2e-3 / 2e-3 (about one ulp at 1.0, plus one intermediate rounding)
  bf16 2e-2 / 2e-2 (same, at bf16's 8-bit mantissa)
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from qoqopt.packing import dequantize, pack_awq, pack_gptq, quantize_rtn
from tests.kernel_device import DEVICE

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}

pytest.importorskip("triton")
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("QOQOPT_KERNEL_DEVICE=cuda but no CUDA device", allow_module_level=True)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def assert_close(out, ref, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol * scale, rtol=rtol)


# Every output buffer is followed by guard elements holding a sentinel, checked after each test: the
# interpreter does not bounds-check, so a store that drops a row or column mask (a tile's EVEN_N
# wrongly set, say) writes past the output, here into the guard, instead of failing.
_GUARD, _SENTINEL = 256, 7776.0  # exact in fp16, bf16 and fp32
_guards: list[torch.Tensor] = []


def nan_like(shape, dtype):
    """A NaN-filled contiguous output of ``shape``, so an element the kernel forgets to write fails the
    comparison, followed in memory by a guard that :func:`_outputs_stay_in_bounds` checks."""
    numel = math.prod(shape)
    buffer = torch.full((numel + _GUARD,), float("nan"), device=DEVICE, dtype=dtype)
    buffer[numel:] = _SENTINEL
    _guards.append(buffer[numel:])
    return buffer[:numel].view(shape)


@pytest.fixture(autouse=True)
def _outputs_stay_in_bounds():
    _guards.clear()
    yield
    for guard in _guards:
        assert guard.eq(_SENTINEL).all(), "a kernel wrote past the end of its output buffer"
    _guards.clear()


# ----------------------------------------------------------------------------- patch merger


def _with_quiet_patches(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32 rows of patches) with patch 1 all zeros, which RMSNorm takes to 0 (0 * rsqrt(eps);
    NaN where eps is left out), and patch 2 about 1e-3, whose mean square is about eps (1e-6): where eps
    sits (inside the root, or added to it) shows there. Elsewhere eps moves 1/RMS by 1e-5 at most."""
    x = x.clone()
    if len(x) > 2:
        x[1] = 0
        x[2] = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(2)) * 1e-3
    return x


def _hf_merger(context_dim, out_dim, dtype, seed=0):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    torch.manual_seed(seed)
    merger = Qwen2_5_VLPatchMerger(dim=out_dim, context_dim=context_dim).eval()
    with torch.no_grad():  # a non-trivial norm weight and bias, so both are exercised
        merger.ln_q.weight.normal_(1.0, 0.3)
        for linear in (merger.mlp[0], merger.mlp[2]):
            linear.bias.normal_(0.0, 0.1)
    return merger.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_merged", [1, 7, 37])  # a single merged unit; several M tiles with a ragged tail
# the default tiles (on the GPU one K step per patch slot here), and 16-deep K tiles: 4 steps per slot, so a
# slot's 1/RMS applied a step early or late shows
# Split over K by patch slots: two slots per split, and one per split with 4 steps each, the last split
# of each tile adding the parts and applying bias and GELU. Tiles by TMA descriptors (cut-off rows
# zero-filled by the copy, not masked), alone and split. One accumulator rescaled between slots
# (RESCALE), with 4 steps a slot, split, and by TMA
@pytest.mark.parametrize("config", [{}, dict(BLOCK_K=16), dict(SPLIT_K=2), dict(SPLIT_K=4, BLOCK_K=16),
                                    dict(TMA=True, BLOCK_K=16), dict(TMA=True, SPLIT_K=2),
                                    dict(RESCALE=True, BLOCK_K=16), dict(RESCALE=True, SPLIT_K=2),
                                    dict(RESCALE=True, TMA=True, BLOCK_K=16)],
                         ids=["default-tiles", "4-steps-per-slot", "split-2-slots-each", "split-1-slot-each",
                              "tma-4-steps-per-slot", "tma-split-2", "rescale-4-steps-per-slot", "rescale-split-2",
                              "rescale-tma"])
def test_merger_fc1_matches_hf(dtype, num_merged, config):
    _fc1_matches_hf(dtype, num_merged, 64, config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merger_fc1_masks_a_cut_off_context_and_output_tile(dtype):
    """C = 48: the norm pass's 32-wide column block is cut off (its masked tail must read as zero); a
    128-wide output tile over fc1's 192 columns is cut off too."""
    _fc1_matches_hf(dtype, 7, 48, dict(BLOCK_N=128, BLOCK_K=16))


def _fc1_matches_hf(dtype, num_merged, context_dim, config):
    from qoqopt.kernels.merger import fold_norm_weight, merger_fc1

    merger, width = _hf_merger(context_dim=context_dim, out_dim=48, dtype=dtype), 4 * context_dim
    # patches 1/8 to 8 times as large as each other: their 1/RMS differ, the output (normalised) does not
    scale = 2.0 ** torch.randint(-3, 4, (4 * num_merged, 1), generator=torch.Generator().manual_seed(num_merged))
    x = _with_quiet_patches(torch.randn(4 * num_merged, context_dim) * 2 * scale).to(DEVICE, dtype)
    fc1, fc2 = merger.mlp[0], merger.mlp[2]
    out = nan_like((num_merged, width), dtype)
    with torch.inference_mode():
        w1_folded = fold_norm_weight(fc1.weight, merger.ln_q.weight)
        h = merger_fc1(x, merger.ln_q.variance_epsilon, w1_folded, fc1.bias, out=out, **config)
        ref_h = merger.mlp[1](fc1(merger.ln_q(x).view(-1, width)))
        y, ref = F.linear(h, fc2.weight, fc2.bias), merger(x)
    assert_close(h, ref_h, dtype)
    assert_close(y, ref, dtype, scale=4)  # the 256-wide projection sums 256 rounding errors
    if config.get("SPLIT_K", 1) > 1:
        from qoqopt.kernels._splitk import splitk_workspace

        assert splitk_workspace(DEVICE, 1, 1)[1].eq(0).all()  # counters left at zero for the next launch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_merger_module_matches_hf(dtype):
    from qoqopt.kernels.merger import FusedPatchMerger, patch_merger_reference

    merger = _hf_merger(context_dim=32, out_dim=40, dtype=dtype, seed=1)
    fused = FusedPatchMerger.from_hf(merger, plan="fused")
    x = _with_quiet_patches(torch.randn(4 * 19, 32)).to(DEVICE, dtype)
    with torch.inference_mode():
        ref = merger(x)
        args = (merger.ln_q.weight, merger.ln_q.variance_epsilon, merger.mlp[0].weight, merger.mlp[0].bias,
                merger.mlp[2].weight, merger.mlp[2].bias)
        assert_close(patch_merger_reference(x, *args), ref, dtype)
        assert_close(fused(x), ref, dtype, scale=4)
        # the folded weight is cached, and rebuilt when a weight changes in place
        folded = fused.folded_w1()
        assert fused.folded_w1() is folded
    with torch.no_grad():
        merger.ln_q.weight.mul_(0.5)
    with torch.inference_mode():
        assert fused.folded_w1() is not folded
        assert_close(fused(x), merger(x), dtype, scale=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# one patch; a ragged last program; C not a power of two (the 7B's 1280 is not either), so the row's
# masked tail is read as zeros and never written
@pytest.mark.parametrize("patches,context_dim", [(1, 32), (37, 64), (130, 48)])
def test_patch_rmsnorm_matches_hf(dtype, patches, context_dim):
    from qoqopt.kernels.merger import patch_rmsnorm

    merger = _hf_merger(context_dim=context_dim, out_dim=16, dtype=dtype, seed=patches)
    scale = 2.0 ** torch.randint(-3, 4, (patches, 1), generator=torch.Generator().manual_seed(patches))
    x = _with_quiet_patches(torch.randn(patches, context_dim) * scale).to(DEVICE, dtype)
    out = nan_like((patches, context_dim), dtype)
    with torch.inference_mode():
        patch_rmsnorm(x, merger.ln_q.weight, merger.ln_q.variance_epsilon, out=out)
        ref = merger.ln_q(x)
    assert_close(out, ref, dtype)
    if dtype == torch.float32:
        return
    # Rounded where transformers rounds (the normalised row, then its product with the weight): equal
    # but for the odd element whose fp32 1/RMS differs in its last bit. Rounding once instead differs
    # in about a quarter of the elements, by an ulp, inside the tolerance above: the control below.
    share, ulps = _low_bits_differ(out, ref, dtype)
    assert share <= 0.01 and ulps <= 2, (share, ulps)
    xf = x.float()
    once = (merger.ln_q.weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert _low_bits_differ(once, ref, dtype)[0] > 0.05


def _low_bits_differ(out, ref, dtype) -> tuple[float, float]:
    """The share of elements that differ, and the largest difference in units of ref's last place."""
    mantissa = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    diff = (out.float() - ref.float()).abs()
    ulp = 2.0 ** (torch.floor(torch.log2(ref.float().abs().clamp_min(1e-30))) - mantissa)
    return (diff > 0).float().mean().item(), (diff / ulp).max().item()


# "cublas" (the default): the Triton norm pass, then cuBLAS GEMMs and exact GELU, as apply() runs it;
# "overlap": the same over row chunks side by side on their own streams (300 merged rows: 2 chunks)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("plan,merged_rows", [("cublas", 23), ("overlap", 300)])
def test_cublas_merger_plans_match_hf(dtype, plan, merged_rows):
    from qoqopt.errors import QoqoptError
    from qoqopt.kernels.merger import FusedPatchMerger

    merger = _hf_merger(context_dim=48, out_dim=40, dtype=dtype, seed=2)
    patched = FusedPatchMerger.from_hf(merger, strict=True, plan=plan)
    x = _with_quiet_patches(torch.randn(4 * merged_rows, 48) * 3).to(DEVICE, dtype)
    with torch.inference_mode():
        assert_close(patched(x), merger(x), dtype, scale=4)
    with pytest.raises(QoqoptError, match="choose from cublas, fused, overlap"):
        FusedPatchMerger.from_hf(merger, plan="cuBLAS")


def test_overlap_chunks_cover_the_rows_in_whole_tiles():
    """Every merged row in exactly one chunk, in order; boundaries on 128-row tiles; no chunk more than
    one tile larger than another; as many chunks as asked where there are tiles enough."""
    from qoqopt.errors import QoqoptError
    from qoqopt.kernels.merger import OVERLAP_ROWS, overlap_chunks

    for rows in (0, 1, 127, 128, 129, 324, 1280, 1281, 5000):
        for chunks in (1, 2, 3, 4, 16):
            bounds = overlap_chunks(rows, chunks)
            assert [r for lo, hi in bounds for r in range(lo, hi)] == list(range(rows)), (rows, chunks)
            assert all(lo % OVERLAP_ROWS == 0 and hi > lo for lo, hi in bounds), bounds
            sizes = [-(-(hi - lo) // OVERLAP_ROWS) for lo, hi in bounds]
            assert sizes == sorted(sizes, reverse=True) and (not sizes or sizes[0] - sizes[-1] <= 1), bounds
            assert len(bounds) == min(chunks, -(-rows // OVERLAP_ROWS)), bounds
    with pytest.raises(QoqoptError, match="at least 1"):
        overlap_chunks(1280, 0)


def test_lanes_fork_after_the_queued_work_and_join_every_lane(monkeypatch):
    """Lanes' stream protocol, recorded through stand-ins for torch.cuda's stream calls: each lane waits
    for the caller's stream before its work, the caller waits for every lane used at the exit (also
    when the work raises), a pooled stream that is the caller's own runs in place, each thread gets
    its own lanes, and the tensors a lane reads are released only after the join."""
    import contextlib
    import threading
    import weakref

    from qoqopt.kernels import _streams

    log, current = [], []

    class Stream:
        def __init__(self, device=None, name=None):
            self.name = name or f"lane{len(made)}"

        def wait_stream(self, other):
            log.append(f"{self.name} waits {other.name}")

    made: list[Stream] = []

    def new_stream(device=None):
        made.append(Stream())
        return made[-1]

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        yield
        current.pop()

    monkeypatch.setattr(_streams, "_local", threading.local())
    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    current.append(Stream(name="main"))
    work = lambda: log.append(f"work on {current[-1].name}")  # noqa: E731
    read = torch.ones(3)
    released = weakref.ref(read, lambda _: log.append("read released"))
    with _streams.Lanes(torch.device("cuda", 0)) as lanes:
        lanes.run(1, work, read)
        lanes.run(0, work)
        lanes.run(1, work)
        del read
    assert log == ["lane1 waits main", "work on lane1", "lane0 waits main", "work on lane0", "lane1 waits main",
                   "work on lane1", "main waits lane1", "main waits lane0", "read released"], log
    log.clear()
    with pytest.raises(RuntimeError), _streams.Lanes(torch.device("cuda", 0)) as lanes:
        lanes.run(0, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert log == ["lane0 waits main", "main waits lane0"]
    log.clear()
    current[0] = made[0]  # the caller runs on what the pool holds as lane 0
    with _streams.Lanes(torch.device("cuda", 0)) as lanes:
        lanes.run(0, work)
    assert log == ["work on lane0"]
    other = []
    thread = threading.Thread(target=lambda: other.append(_streams._lane_streams(0, 1)[0]))
    thread.start()
    thread.join()
    assert other[0] is not made[0] and _streams._lane_streams(0, 1)[0] is made[0]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="streams and CUDA graphs")
def test_overlap_merger_plan_replays_from_a_cuda_graph():
    """The overlap plan's forks and joins captured in a CUDA graph: a replay on new input gives the
    eager plan's output and the cublas plan's (within bf16 tolerance: cuBLAS promises bitwise-equal
    results only with one stream active). An unjoined lane fails the capture; a lane that does not
    wait for the norm reads stale input, and one left out of the capture runs only at capture time."""
    from qoqopt.kernels.merger import FusedPatchMerger, overlap_chunks

    merger = _hf_merger(context_dim=1280, out_dim=3584, dtype=torch.bfloat16, seed=3)
    overlap = FusedPatchMerger.from_hf(merger, strict=True, plan="overlap")
    cublas = FusedPatchMerger.from_hf(merger, strict=True, plan="cublas")
    static_x = torch.randn(4 * 1000, 1280, device=DEVICE, dtype=torch.bfloat16)
    assert len(overlap_chunks(1000)) == 2
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            overlap(static_x)  # warm-up off the default stream, as torch.cuda.graph asks
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = overlap(static_x)
        for seed in (4, 5):
            static_x.copy_(torch.randn(static_x.shape, generator=torch.Generator().manual_seed(seed)))
            graph.replay()
            torch.cuda.synchronize()
            assert_close(static_out, overlap(static_x), torch.bfloat16)
            assert_close(static_out, cublas(static_x), torch.bfloat16)


# ----------------------------------------------------------------------------- patch embedding, vision MLP


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("patches", [1, 37])
def test_matmul_patch_embed_matches_hf(dtype, patches):
    """apply()'s patch embedding (the Conv3d's kernel as one GEMM over each flattened patch) against
    transformers' Qwen2_5_VisionPatchEmbed (its Conv3d), random pixels, the 7B's patch geometry."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    from qoqopt.kernels.patch_embed import MatmulPatchEmbed

    torch.manual_seed(patches)
    embed = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=48)
    embed = embed.eval().to(DEVICE, dtype)
    pixels = torch.randn(patches, 3 * 2 * 14 * 14).to(DEVICE, dtype)
    with torch.inference_mode():
        ref = embed(pixels)
        out = MatmulPatchEmbed.from_hf(embed)(pixels)
    assert out.shape == ref.shape == (patches, 48)
    assert_close(out, ref, dtype, scale=4)  # 1176-long sums, in another order than the convolution's


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 37])
def test_fused_gate_up_mlp_matches_hf(dtype, rows):
    """apply()'s vision MLP (gate and up in one Linear, then split) against transformers' Qwen2_5_VLMLP
    with biases, as the vision tower has them: a swapped or misaligned gate/up half fails here."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

    from qoqopt.kernels.vision_mlp import FusedGateUpMLP

    torch.manual_seed(rows)
    mlp = Qwen2_5_VLMLP(Qwen2_5_VLVisionConfig(hidden_size=40, intermediate_size=56, hidden_act="silu"), bias=True)
    with torch.no_grad():
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.bias.normal_(0.0, 0.1)
    mlp = mlp.eval().to(DEVICE, dtype)
    x = torch.randn(rows, 40).to(DEVICE, dtype)
    with torch.inference_mode():
        ref = mlp(x)
        out = FusedGateUpMLP.from_hf(mlp)(x)
    assert_close(out, ref, dtype)


# ----------------------------------------------------------------------------- vision attention


def _hf_attention(num_heads, head_dim, dtype, seed=0):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    config = Qwen2_5_VLVisionConfig(
        depth=1, hidden_size=num_heads * head_dim, hidden_act="silu", intermediate_size=64,
        num_heads=num_heads, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        tokens_per_second=2, window_size=112, out_hidden_size=64, fullatt_block_indexes=[0],
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen2_5_VLVisionAttention(config).eval().to(DEVICE, dtype)


def _rope(positions_hw, head_dim):
    """cos/sin as transformers' vision rotary builds them: [h freqs, w freqs] twice over."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)))
    freqs = positions_hw[..., None].float() * inv_freq  # [S, 2, head_dim / 4]
    angles = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def _segments(grids, windows: bool):
    """cu_seqlens (full attention) or cu_window_seqlens for images of the given (t, h, w) grids,
    from transformers' own helpers; windows are 112 px = 4 x 4 merged units = 64 patches."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    grid_thw = torch.tensor(grids)
    if windows:
        return get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=112, patch_size=14)[1].to(DEVICE)
    return get_vision_cu_seqlens(grid_thw).to(DEVICE)


# (t, h, w) in patches: a 12 x 20 image (windows cut at both edges), a single merged unit (2 x 2),
# and a 6 x 8 image smaller than one window.
GRIDS = [(1, 12, 20), (1, 2, 2), (1, 6, 8)]
ATTENTION_CASES = {
    "windows": lambda: _segments(GRIDS, windows=True),
    "full": lambda: _segments(GRIDS, windows=False),
    "ragged": lambda: torch.tensor([0, 4, 37, 38, 60], dtype=torch.int32, device=DEVICE),  # a length-1 segment
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("head_dim", [16, 40, 80])  # 80: the real head, tiles 64 + 16; 40: 32 + 16 (8 masked)
def test_vision_attention_matches_hf(dtype, case, head_dim):
    """The module's path: shared rotary halves, packed into one fp16 table for 16-bit inputs."""
    from qoqopt.kernels.vision_attention import VarlenPlanCache, vision_attention

    if head_dim != 16 and case != "ragged" and DEVICE.type == "cpu":
        pytest.skip("head_dim 40/80 on the long layouts run on the GPU only (interpreter time)")
    cu_seqlens = ATTENTION_CASES[case]()
    seq = int(cu_seqlens[-1])
    attn = _hf_attention(num_heads=2, head_dim=head_dim, dtype=dtype)
    x = torch.randn(seq, 2 * head_dim, device=DEVICE, dtype=dtype)
    positions = torch.randint(0, 40, (seq, 2))
    cos, sin = _rope(positions, head_dim)
    out = nan_like((seq, 2 * head_dim), dtype)
    with torch.inference_mode():
        ref = attn(x, cu_seqlens, position_embeddings=(cos, sin))
        core = vision_attention(attn.qkv(x), cos, sin, cu_seqlens, 2, VarlenPlanCache(), out=out, shared_halves=True)
        y = attn.proj(core)
    assert not core.isnan().any()
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_attention_module_matches_hf(dtype):
    """The module path, which reads only the first half of Qwen2.5-VL's repeated rotary table."""
    from qoqopt.kernels.vision_attention import FusedVisionAttention, VarlenPlanCache

    cu_seqlens = _segments(GRIDS, windows=True)
    seq = int(cu_seqlens[-1])
    attn = _hf_attention(num_heads=2, head_dim=16, dtype=dtype, seed=3)
    fused = FusedVisionAttention.from_hf(attn, VarlenPlanCache())
    x = torch.randn(seq, 32, device=DEVICE, dtype=dtype)
    rope = _rope(torch.randint(0, 40, (seq, 2)), 16)
    with torch.inference_mode():
        assert_close(fused(x, cu_seqlens, position_embeddings=rope), attn(x, cu_seqlens, position_embeddings=rope), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 40])  # 40: rotary pairs in tiles of 16 and 8 (4 masked)
def test_vision_attention_general_rotary_table(dtype, head_dim):
    """Without shared_halves the kernel reads both halves of cos/sin: check with unrelated halves."""
    from qoqopt.kernels.vision_attention import vision_attention, vision_attention_reference

    cu_seqlens = torch.tensor([0, 9, 30], dtype=torch.int32, device=DEVICE)
    qkv = torch.randn(30, 3 * 2 * head_dim, device=DEVICE, dtype=dtype)
    angles = torch.rand(30, head_dim, device=DEVICE) * 6
    out = nan_like((30, 2 * head_dim), dtype)
    with torch.inference_mode():
        vision_attention(qkv, angles.cos(), angles.sin(), cu_seqlens, 2, out=out)
        ref = vision_attention_reference(qkv, angles.cos(), angles.sin(), cu_seqlens, 2)
    assert_close(out, ref, dtype)
    # and against transformers' own module, which applies any full-width cos/sin table as given
    attn = _hf_attention(num_heads=2, head_dim=head_dim, dtype=dtype)
    x = torch.randn(30, 2 * head_dim, device=DEVICE, dtype=dtype)
    table = (angles.cos().to(dtype), angles.sin().to(dtype))
    with torch.inference_mode():
        ours = attn.proj(vision_attention(attn.qkv(x), *table, cu_seqlens, 2))
        theirs = attn(x, cu_seqlens, position_embeddings=table)
    assert_close(ours, theirs, dtype)


def test_vision_attention_reference_matches_hf():
    from qoqopt.kernels.vision_attention import vision_attention_reference

    cu_seqlens = _segments(GRIDS, windows=True)
    seq = int(cu_seqlens[-1])
    attn = _hf_attention(num_heads=2, head_dim=80, dtype=torch.float32)
    x = torch.randn(seq, 160, device=DEVICE)
    cos, sin = _rope(torch.randint(0, 40, (seq, 2)), 80)
    with torch.inference_mode():
        ref = attn(x, cu_seqlens, position_embeddings=(cos, sin))
        y = attn.proj(vision_attention_reference(attn.qkv(x), cos, sin, cu_seqlens, 2))
    assert_close(y, ref, torch.float32)


def test_head_split():
    from qoqopt.kernels.vision_attention import head_split

    assert head_split(80) == (64, 16) and head_split(64) == (64, 0) and head_split(40) == (32, 16)
    assert head_split(8) == (16, 0)  # below tl.dot's minimum: one masked 16-wide tile


def test_halved_head_split_covers_each_rotary_pair_once():
    """The kernel's q/k tiles are head_split's halved, in rotary pairs (each pair two columns)."""
    from qoqopt.kernels.vision_attention import head_split

    def pair_split(head_dim):
        return tuple(width // 2 for width in head_split(head_dim))

    assert pair_split(80) == (32, 8) and pair_split(64) == (32, 0) and pair_split(40) == (16, 8)
    for head_dim in range(8, 258, 2):
        a, b = pair_split(head_dim)
        assert a + b >= head_dim // 2  # every pair in a tile
        assert a <= head_dim // 2 or head_dim < 16  # tile A is never padded unless the head is below 16
        assert 2 * a >= 16 and (b == 0 or 2 * b >= 16) and a & (a - 1) == 0 and b & (b - 1) == 0


def test_rope_table_is_the_first_half_within_fp16_rounding():
    """The packed table the module's kernel reads: cos and sin of the first half, to fp16's 2^-12."""
    from qoqopt.kernels.vision_attention import VarlenPlanCache

    cos, sin = _rope(torch.randint(0, 200, (50, 2)), 80)
    plans = VarlenPlanCache()
    for dtype, bound in ((torch.bfloat16, 2.0**-12), (torch.float16, 2.0**-12), (torch.float32, 0.0)):
        c, s = plans.rope(cos, sin, dtype, shared_halves=True)
        assert c.shape == (50, 40) and c.stride() == s.stride() and c.stride(0) == 80
        assert (c.float() - cos[:, :40]).abs().max() <= bound and (s.float() - sin[:, :40]).abs().max() <= bound
    assert plans.rope(cos, sin, torch.float16, shared_halves=True)[0] is plans.rope(cos, sin, torch.float16, True)[0]
    assert plans.table_builds == 3  # one per dtype, then cache hits


def test_plan_cache_serves_threads_that_clear_it():
    """Two threads running one patched model: each forward clears the shared plan cache, which the
    other may be reading. Every plan must be build_plan's, and no lookup may fail (it raised
    KeyError when a clear fell between finding an entry and moving it to the end)."""
    import sys
    import threading

    from qoqopt.kernels.vision_attention import VarlenPlanCache, build_plan

    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    want = build_plan(cu, 9, 16)
    plans, errors, done = VarlenPlanCache(capacity=1), [], threading.Event()

    def forward():
        try:
            for _ in range(20000):
                assert torch.equal(plans.plan(cu, 9, 16), want)
        except Exception as exc:  # noqa: BLE001 - reported below, with its type
            errors.append(repr(exc))

    def clearing():
        while not done.is_set():
            plans.clear()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so the race shows in a short run
    try:
        for _ in range(3):
            workers = [threading.Thread(target=forward) for _ in range(2)]
            clearer = threading.Thread(target=clearing)
            for t in (clearer, *workers):
                t.start()
            for t in workers:
                t.join()
            done.set()
            clearer.join()
            done.clear()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


def test_plan_covers_every_row_once():
    from qoqopt.kernels.vision_attention import build_plan

    cu = torch.tensor([0, 4, 37, 38, 60], dtype=torch.int32)
    plan = build_plan(cu, 60, block_m=16)
    assert plan.shape == (4 + 4, 3)  # cdiv(60, 16) + 4 segments: an upper bound, idle rows are zero
    rows = torch.cat([torch.arange(q, min(q + 16, end)) for q, _, end in plan.tolist() if q < end])
    assert torch.equal(rows, torch.arange(60))


# ----------------------------------------------------------------------------- W4A16


def _gptq_case(k, n, bits, group_size, act_order, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * 0.05
    intweight, zeros, scales = quantize_rtn(weight, bits, group_size)
    g_idx = torch.arange(k, dtype=torch.int32) // group_size
    if act_order:  # desc_act: rows of one group are scattered over K
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return intweight, zeros, scales, g_idx


def _spec_case(k, n, group_size, seed, scales_dtype=torch.float16, zeros_at_ends=False):
    """Random 4-bit integers, GPTQ v1 zeros (1..15; ``zeros_at_ends``: some 1 and 16, v1's range) and
    small positive scales, packed; with the spec's fp32 weight ``(q - z) * s`` and the generator, for
    tests that read single weights back."""
    g = torch.Generator().manual_seed(seed)
    intweight = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 16, (k // group_size, n), generator=g, dtype=torch.int32)  # v1 stores zero - 1
    if zeros_at_ends:
        zeros[:, :2], zeros[:, 2:4] = 16, 1
    scales = (torch.rand(k // group_size, n, generator=g) * 0.02 + 1e-3).to(scales_dtype)
    qweight, qzeros = pack_gptq(intweight, zeros)
    return qweight, qzeros, scales, dequantize(intweight, zeros, scales, torch.arange(k) // group_size), g


def _one_hot_rows_read_back(words, qzeros, scales, w, picks, group_size, dtype=torch.float32, **config):
    """``w4a16_matmul(**config)`` on one-hot rows in ``dtype``: output row ``i`` of each pick is weight
    row ``rows[i]``, which must be the spec's (``w``, from :func:`_spec_case`) bit for bit, with every
    element of the poisoned output written."""
    from qoqopt.kernels.w4a16 import w4a16_matmul

    k, n = w.shape
    for rows in picks:
        m = len(rows)
        x = torch.zeros(m, k).index_put_((torch.arange(m), rows), torch.tensor(1.0)).to(DEVICE, dtype)
        out = nan_like((m, n), dtype)
        with torch.inference_mode():
            w4a16_matmul(x, words.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE), group_size=group_size,
                         zero_offset=1, out=out, **config)
        assert torch.equal(out.cpu(), w[rows].to(dtype)), rows.tolist()


W4A16_CASES = {
    # name: (layout, K, N, bits, group_size, act_order)
    "gptq4-g32": ("gptq", 256, 88, 4, 32, False),  # N not a multiple of the N tile
    "gptq4-channel": ("gptq", 208, 64, 4, 208, False),  # group_size = K, K not a multiple of 32
    "gptq4-actorder": ("gptq", 128, 64, 4, 32, True),
    "gptq8-g64": ("gptq", 128, 44, 8, 64, False),
    "awq-g32": ("awq", 256, 88, 4, 32, False),
    "awq-g64-even": ("awq", 128, 64, 4, 64, False),  # every tile full: the unmasked loads
}


def test_dequant_bit_tricks_are_exact():
    """The kernels turn packed fields into floats by OR-ing them into a float's mantissa. Checked
    against torch's own reading of the IEEE bit patterns, for every field value and position."""
    from qoqopt.kernels.w4a16 import FP32_MAGIC, FP32_MAGIC_BITS, HALF_MAGIC, field_position

    for dtype, (bits, value, mantissa) in HALF_MAGIC.items():
        q = torch.arange(2 ** min(mantissa, 8), dtype=torch.int32)
        as_float = (q | bits).to(torch.int16).view(dtype).double()
        assert torch.equal(as_float, value + q.double()), dtype
        # the fragment kernel's -(MAGIC + z), built as z + (MAGIC's bits | sign), wrapped to 16 bits
        # as Triton's int32 -> int16 cast wraps, for every zero 4-bit GPTQ v1 / v2 holds (0 to 16)
        z = torch.arange(17, dtype=torch.int32)
        neg = (z + (bits | 0x8000)).to(torch.int16).view(dtype).double()
        assert torch.equal(neg, -(value + z.double())), dtype
    for width in (4, 8):  # GEMV and prefill: every field masked in place where the kernels put it
        for idx in range(32 // width):
            shift = field_position(idx, width)
            q = torch.arange(2**width, dtype=torch.int32)
            field = ((q << shift) | FP32_MAGIC_BITS.value).view(torch.float32)
            assert torch.equal(field.double(), FP32_MAGIC.value + q.double() * 2**shift), (width, shift)
            # then one FMA leaves q - z, for every zero a checkpoint holds (GPTQ v1's offset included)
            z = torch.arange(2**width + 1, dtype=torch.float32)[:, None]
            q_minus_z = _fp32_fma(field[None, :], torch.tensor(2.0**-shift), -(z + FP32_MAGIC.value * 2.0**-shift))
            assert torch.equal(q_minus_z, q.float()[None, :] - z), (width, shift)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)  # plain Python: bf16 too
def test_fragment_asm_texts_make_each_pair_of_the_word(dtype):
    """The inline asm of the fragment decode kernel (GPU only), run here by the PTX ISA's definitions
    of the instructions it uses: the whole block's text (four registers a word) and each half's (two,
    ``DOT_K`` 64) must give register ``i`` of a text made for pairs ``P`` the weights of nibbles
    ``P[i]`` (low half) and ``P[i] + 4`` (high half) minus the zero, for every zero a checkpoint holds
    and random words. The GPU tests check where those registers go; this checks the text that fills
    them, which no CPU run executes otherwise (a half made from the other pair order passes every
    interpreter test)."""
    from qoqopt.kernels.w4a16 import FRAGMENT_ASM, FRAGMENT_HALF_ASM, HALF_MAGIC

    magic = HALF_MAGIC[dtype][0]
    words = torch.randint(-2**31, 2**31, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    for pairs, text in (((0, 1, 2, 3), FRAGMENT_ASM[dtype]), ((0, 1), FRAGMENT_HALF_ASM[dtype][0]),
                        ((2, 3), FRAGMENT_HALF_ASM[dtype][1])):
        for z in range(17):
            neg = z + (magic | 0x8000)  # the kernel's -(MAGIC + z) pattern, in both halves
            for word in words:
                word &= 0xFFFFFFFF
                copies = 2 * len(pairs)  # a pack of 16-bit elements: one copy of each input per element
                out = _run_ptx(text, len(pairs), [word] * copies + [neg | neg << 16] * copies
                               + [magic | magic << 16] * copies, dtype)
                for i, j in enumerate(pairs):
                    q_lo, q_hi = (word >> 4 * j) & 0xF, (word >> (16 + 4 * j)) & 0xF
                    assert _halves(out[i], dtype) == (q_lo - z, q_hi - z), (pairs, i, z, hex(word))


def _halves(reg: int, dtype: torch.dtype) -> tuple[float, float]:
    """A 32-bit register's low and high 16-bit halves read as ``dtype``."""
    pair = torch.tensor([reg & 0xFFFF, reg >> 16], dtype=torch.int32).to(torch.int16).view(dtype)
    return tuple(pair.double().tolist())


def _run_ptx(text: str, outs: int, inputs: list[int], dtype: torch.dtype) -> list[int]:
    """The output registers of an inline-asm block (``$0`` .. ``$outs-1``; inputs from ``$outs``) over
    32-bit ints, for the instructions the W4A16 asm uses, as the PTX ISA defines them: ``mov.b32``,
    ``shr.u32``, ``lop3.b32`` (result bit from the LUT at index ``a << 2 | b << 1 | c``) and
    ``fma.rn`` on packed 16-bit pairs (``a * b + c`` exactly, rounded once to nearest even). Any
    other instruction fails."""
    regs = {f"${i + outs}": v for i, v in enumerate(inputs)}

    def value(operand: str) -> int:
        return int(operand, 0) & 0xFFFFFFFF if operand[0].isdigit() else regs[operand]

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        a = [value(x) for x in src]
        if op == "mov.b32":
            regs[dst] = a[0]
        elif op == "shr.u32":
            regs[dst] = a[0] >> a[1]
        elif op == "lop3.b32":
            regs[dst] = sum(((a[3] >> ((a[0] >> bit & 1) << 2 | (a[1] >> bit & 1) << 1 | (a[2] >> bit & 1))) & 1) << bit
                            for bit in range(32))
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            assert (op == "fma.rn.bf16x2") == (dtype == torch.bfloat16), op
            x, y, c = (torch.tensor(_halves(v, dtype), dtype=torch.float64) for v in a)
            bits = (x * y + c).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
            regs[dst] = int(bits[0]) | int(bits[1]) << 16
        else:
            raise AssertionError(f"an instruction this test does not model: {line}")
    return [regs[f"${i}"] for i in range(outs)]


def _fp32_fma(a, b, c):
    """IEEE fp32 fma of fp32 tensors: the exact a * b + c (float64 holds it: every operand here has
    at most 24 significant bits and the product at most 48), rounded once to fp32."""
    return (a.double() * b.double() + c.double()).float()


@pytest.mark.parametrize("bits", [4, 8])
def test_prefill_dequant_fma_is_the_reference_rounding(bits):
    """Prefill tiles compute q from the magic field (``fma(field, 2**-pos, -2**(23 - pos))``) and then
    ``fma(q, s, -(z * s))`` for fp16/bf16 scales. Both must equal the reference's one rounding of
    ``(q - z) * s`` in fp32, for every field value, every zero a checkpoint holds (GPTQ v1's offset
    included) and every positive fp16 and bf16 scale below 2**100, subnormals included (a sample of
    them at 8 bits)."""
    from qoqopt.kernels.w4a16 import FP32_MAGIC, FP32_MAGIC_BITS, field_position

    q = torch.arange(2**bits, dtype=torch.int32)
    for pos in {field_position(idx, bits) for idx in range(32 // bits)}:
        field = ((q << pos) | FP32_MAGIC_BITS.value).view(torch.float32)
        exact_q = _fp32_fma(field, torch.tensor(2.0**-pos), torch.tensor(-FP32_MAGIC.value * 2.0**-pos))
        assert torch.equal(exact_q, q.float()), pos
    for dtype in (torch.float16, torch.bfloat16):
        every = torch.arange(2**15, dtype=torch.int16).view(dtype).float()  # every non-negative bit pattern
        # (bf16 reaches 3.4e38, where z * s would overflow fp32 before (q - z) * s does: scales stay below 2**100)
        scales = every[torch.isfinite(every) & (every > 0) & (every < 2.0**100)]
        if bits == 8:
            scales = scales[torch.randperm(len(scales), generator=torch.Generator().manual_seed(0))[:512]]
        qf, zf, s = q.float()[:, None, None], torch.arange(2**bits + 1).float()[None, :, None], scales[None, None, :]
        kernel = _fp32_fma(qf, s, -(zf * s))  # z * s rounded to fp32 first, as the kernel does
        reference = ((qf.double() - zf.double()) * s.double()).float()
        assert torch.equal(kernel, reference), dtype
    # Why fp32 scales take the subtract-first branch: with 24 significant bits, z * s can round.
    s, q1, z3 = torch.tensor(1 + 2.0**-23), torch.tensor(1.0), torch.tensor(3.0)
    assert _fp32_fma(q1, s, -(z3 * s)) != ((q1 - z3) * s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# GEMV (split-K), tensor-core decode, prefill (32-row tiles); on a GPU also the dense plan (from 128 rows)
@pytest.mark.parametrize("m", [1, 16, 33] + ([130] if DEVICE.type == "cuda" else []))
@pytest.mark.parametrize("case", list(W4A16_CASES))
def test_quant_linear_matches_dequantized_matmul(dtype, m, case):
    from qoqopt.kernels.w4a16 import w4a16_matmul

    linear, x, ref = _quant_linear_case(W4A16_CASES[case], m, dtype)
    n, k = linear.out_features, linear.in_features
    with torch.inference_mode():
        x_in = x.index_select(1, linear.perm) if linear.perm is not None else x
        out = nan_like((m, n), dtype)
        w4a16_matmul(x_in, linear.qweight, linear.qzeros, linear.scales, linear.bias.to(dtype),
                     out=out, **linear._kwargs())
        y = linear(x.view(1, m, k))  # the module path, with a leading batch dimension
    assert y.shape == (1, m, n)
    assert_close(out, ref, dtype, scale=4)
    assert_close(y[0], ref, dtype, scale=4)


def _quant_linear_case(case: tuple, m: int, dtype: torch.dtype, seed: int = 0):
    """A QuantLinear of one W4A16 case on DEVICE, random ``[m, K]`` activations, and the reference
    output: the original integers dequantized (never the packed words), F.linear in fp32."""
    from qoqopt.kernels.w4a16 import QuantLinear

    layout, k, n, bits, group_size, act_order = case
    intweight, zeros, scales, g_idx = _gptq_case(k, n, bits, group_size, act_order, seed=seed)
    bias = torch.randn(n) * 0.1
    if layout == "awq":
        linear = QuantLinear.from_awq(*pack_awq(intweight, zeros), scales, bias)
    else:
        linear = QuantLinear.from_gptq(*pack_gptq(intweight, zeros, bits), scales, g_idx, bias, bits=bits)
    w = dequantize(intweight, zeros, scales, g_idx).to(DEVICE)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    return linear.to(DEVICE), x, F.linear(x.float(), w.t().to(dtype).float(), bias.to(DEVICE, dtype).float())


FRAGMENT_CASES = {  # layers that fit fragment words: K and groups whole 128-row blocks
    "gptq4-g128-actorder": ("gptq", 256, 88, 4, 128, True),
    "awq-g128": ("awq", 384, 72, 4, 128, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 16, 33])
@pytest.mark.parametrize("case", list(FRAGMENT_CASES))
def test_quant_linear_over_fragment_words_matches_dequantized_matmul(dtype, m, case, monkeypatch):
    """``use_fragment_words``: the layer's own launch over fragment words at each M and dtype (the
    fragment decode kernel for 16-bit x up to 16 rows, the tensor-core tiles over fragment words
    otherwise) gives the dequantized weight's answer; the torch path is kept out, and the launch the
    layer plans is recorded, so a launch over the wrong kernel or words cannot pass unseen."""
    from qoqopt.kernels import w4a16

    linear, x, ref = _quant_linear_case(FRAGMENT_CASES[case], m, dtype)
    assert linear.use_fragment_words() and linear.words == "fragments"
    planned, prepare = [], w4a16.prepare_w4a16
    w4a16._shared_launch.cache_clear()  # so that this layer's launch is planned here
    monkeypatch.setattr(w4a16, "prepare_w4a16", lambda *a, **config: planned.append(config) or prepare(*a, **config))
    monkeypatch.setattr(w4a16, "w4a16_reference", lambda *a, **kw: pytest.fail("the torch path ran"))
    with torch.inference_mode():
        y = linear(x.view(1, m, -1))
    assert_close(y[0], ref, dtype, scale=4)
    (config,) = planned
    assert config.get("KERNEL") == "frag" if m <= 16 and dtype != torch.float32 else config.get("FRAGMENTS")


def test_quant_linear_keeps_gptq_words_outside_while_holding_fragment_words():
    """Over fragment words, ``state_dict`` still gives GPTQ's ``qweight`` bit for bit, the torch path
    (autograd) reads the words right, another layer's GPTQ state loads (repacked on the way in) and
    answers as that layer does, and a qweight of the wrong shape is refused; a layer that does not
    fit keeps GPTQ's words."""
    case = ("gptq", 256, 88, 4, 128, False)
    linear, x, ref = _quant_linear_case(case, 3, torch.float32)
    other, _, _ = _quant_linear_case(case, 3, torch.float32, seed=1)
    before = {name: t.clone() for name, t in linear.state_dict().items()}
    assert linear.use_fragment_words() and linear.qweight.shape == (2, 16 * 88)
    after = linear.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[name], before[name]) for name in before)
    with warnings.catch_warnings():  # the torch path, on purpose: "autograd is recording"
        warnings.simplefilter("ignore", UserWarning)
        torch.testing.assert_close(linear(x.clone().requires_grad_()), ref, atol=2e-5, rtol=1e-4)
    linear.load_state_dict(other.state_dict())
    assert linear.words == "fragments"
    with torch.inference_mode():
        torch.testing.assert_close(linear(x), other(x), atol=2e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="does not fit this 256->88 layer"):
        linear.load_state_dict({**other.state_dict(), "qweight": other.qweight[:16]})
    # a swapped-in qweight of the other layout (same size) is refused, not run (torch.func.functional_call)
    from qoqopt.errors import QoqoptError

    with torch.inference_mode(), pytest.raises(QoqoptError, match=r"holds fragments words of shape \(2, 1408\)"):
        torch.func.functional_call(linear, other.state_dict(), (x,))
    # assign=True keeps the state's tensors (a meta layer, as loaders build them, takes real ones)
    meta = copy.deepcopy(linear).to("meta")
    meta.load_state_dict(other.state_dict(), assign=True)
    assert meta.qweight.device == x.device and torch.equal(meta.gptq_qweight(), other.qweight)
    narrow, _, _ = _quant_linear_case(W4A16_CASES["gptq4-g32"], 1, torch.float32)
    assert not narrow.use_fragment_words() and narrow.words == "gptq"


@pytest.mark.parametrize("unroll", [1, 2], ids=["partials-one-by-one", "partials-two-at-a-time"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_w4a16_prefill_split_k_over_several_row_tiles(dtype, unroll):
    """Prefill tiles split over K when they would leave SMs idle (narrow layers, short prompts): each
    output tile, of every row block, sums its own splits' partials, edge tiles included."""
    from qoqopt.kernels._splitk import splitk_workspace
    from qoqopt.kernels.w4a16 import w4a16_matmul

    m, k, n, group_size = 70, 256, 88, 32  # 3 row blocks and 3 column blocks, the last of each cut off
    intweight, zeros, scales, g_idx = _gptq_case(k, n, 4, group_size, False)
    qweight, qzeros = pack_gptq(intweight, zeros)
    w = dequantize(intweight, zeros, scales, g_idx).to(DEVICE)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    tiles = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, SPLIT_K=3, REDUCE_UNROLL=unroll)
    out = nan_like((m, n), dtype)
    with torch.inference_mode():
        w4a16_matmul(x, qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE, dtype), group_size=group_size,
                     zero_offset=1, out=out, **tiles)
    assert_close(out, F.linear(x.float(), w.t().to(dtype).float()), dtype, scale=4)
    assert splitk_workspace(DEVICE, 1, 1)[1].eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tiles", [dict(BLOCK_N=512, BLOCK_K=64, num_warps=4), dict(BLOCK_N=256, BLOCK_K=64, num_warps=2),
                                   dict(BLOCK_N=512, BLOCK_K=64, num_warps=4, SPLIT_K=4, REDUCE_UNROLL=3)],
                         ids=["n512-w4", "n256-w2", "n512-w4-unroll3"])
def test_w4a16_gemv_wide_tiles(tiles, dtype):
    """The GEMV's tiles as wide as their warps' columns (the sweep's barrier-free candidates): the
    last tile cut off in N, K split over programs (4 ways with partials summed 3 at a time: the
    second batch is cut off), every output written, split-K counters left at zero."""
    from qoqopt.kernels._splitk import splitk_workspace
    from qoqopt.kernels.w4a16 import launch_plan, w4a16_matmul

    k, n, group_size = 256, 600, 64
    intweight, zeros, scales, g_idx = _gptq_case(k, n, 4, group_size, False)
    qweight, qzeros = pack_gptq(intweight, zeros)
    w = dequantize(intweight, zeros, scales, g_idx).to(DEVICE)
    x = torch.randn(1, k, device=DEVICE, dtype=dtype)
    plan = launch_plan(1, n, k, bits=4, group_size=group_size, zero_offset=1, has_bias=False, dtype=dtype,
                       device=DEVICE, **tiles)
    assert plan.kernel == "gemv" and plan.split > 1 and not plan.constexprs["EVEN_N"]
    out = nan_like((1, n), dtype)
    with torch.inference_mode():
        w4a16_matmul(x, qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE, dtype), group_size=group_size,
                     zero_offset=1, out=out, **tiles)
    assert_close(out, F.linear(x.float(), w.t().to(dtype).float()), dtype, scale=4)
    assert splitk_workspace(DEVICE, 1, 1)[1].eq(0).all()


HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])  # the interpreter has no bf16


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("split", [1, 3])
def test_w4a16_decode_joined_fields_place_every_weight(dtype, split):
    """Decode tiles built by joins (``JOIN_FIELDS``, the sweep's candidate: two fields per masked
    word) must put each weight where the spec does. One-hot activations make each output one weight,
    ``(q - z) * s`` in fp32 rounded once to x's dtype: compared bit for bit, so a swapped pair of
    fields fails. N is cut off by the tile and K split over programs."""
    from qoqopt.kernels.w4a16 import launch_plan, w4a16_matmul

    k, n, group_size, m = 256, 40, 64, 16
    qweight, qzeros, scales, w, g = _spec_case(k, n, group_size, seed=2)
    rows = torch.randperm(k, generator=g)[:m]
    x = torch.zeros(m, k).index_put_((torch.arange(m), rows), torch.tensor(1.0)).to(DEVICE, dtype)
    tiles = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, SPLIT_K=split, JOIN_FIELDS=True)
    plan = launch_plan(m, n, k, bits=4, group_size=group_size, zero_offset=1, has_bias=False, dtype=dtype,
                       device=DEVICE, **tiles)
    assert plan.kernel == "mma" and plan.split == split and plan.constexprs["MAGIC_BITS"]  # the joined path
    out = nan_like((m, n), dtype)
    with torch.inference_mode():
        w4a16_matmul(x, qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE), group_size=group_size,
                     zero_offset=1, out=out, **tiles)
    assert torch.equal(out.cpu(), w[rows].to(dtype))


def _matches_dequantized_matmul(k, n, group_size, m, dtype, seed, v2_zeros=False, **config):
    """Random 4-bit GPTQ weights, activations and a bias through ``w4a16_matmul(**config)`` (the words
    repacked as fragment words where the config reads those), against the dequantized weight's
    matmul. ``v2_zeros``: GPTQ v2's zeros, stored as they are, 0 among them (v1 cannot store it)."""
    from qoqopt.kernels.w4a16 import reads_fragment_words, w4a16_matmul
    from qoqopt.packing import gptq_to_fragments, pack_along_cols, pack_along_rows

    intweight, zeros, scales, g_idx = _gptq_case(k, n, 4, group_size, False, seed=seed)
    if v2_zeros:
        zeros[:, :3] = 0
        qweight, qzeros = pack_along_rows(intweight, 4), pack_along_cols(zeros, 4)
    else:
        qweight, qzeros = pack_gptq(intweight, zeros)
    w = dequantize(intweight, zeros, scales, g_idx).to(DEVICE)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    bias = (torch.randn(n) * 0.1).to(DEVICE, dtype)
    out = nan_like((m, n), dtype)
    with torch.inference_mode():
        w4a16_matmul(x, (gptq_to_fragments(qweight) if reads_fragment_words(config) else qweight).to(DEVICE),
                     qzeros.to(DEVICE), scales.to(DEVICE, dtype), bias, group_size=group_size,
                     zero_offset=0 if v2_zeros else 1, out=out, **config)
    assert_close(out, F.linear(x.float(), w.t().to(dtype).float(), bias.float()), dtype, scale=4)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_w4a16_decode_joined_fields_match_dequantized_matmul(dtype):
    """The same tiles on random activations and a bias, 13 rows (the 16-row tile cut off)."""
    _matches_dequantized_matmul(384, 72, 128, 13, dtype, seed=3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4,
                                num_stages=2, JOIN_FIELDS=True)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("tiles", [dict(BLOCK_N=128, num_warps=4), dict(BLOCK_N=64, num_warps=2),
                                   dict(BLOCK_N=128, num_warps=4, DOT_K=64)], ids=["n128-w4", "n64-w2", "n128-w4-dot64"])
def test_w4a16_fragment_decode_places_every_weight(dtype, split, tiles):
    """The fragment-word decode kernel (``KERNEL="frag"``, apply()'s decode path; its two tiles, and
    the 128-wide one as two 64-row dots a K step, a tuning candidate) over
    weights repacked from GPTQ at load (``gptq_to_fragments``): with one-hot activations each output is one weight,
    ``(q - z) * s`` rounded once to x's dtype, compared bit for bit for every row of every 128-row
    block, 16 at a time, so a pair or a register placed wrong fails; zeros include v1's largest, 16.
    N is cut off by the tile, K split over programs. On a GPU this runs the inline-asm pairs; the
    interpreter (fp16 only: it has no bf16) runs the same steps as Triton ops."""
    from qoqopt.kernels.w4a16 import launch_plan
    from qoqopt.packing import gptq_to_fragments

    k, n, group_size, m = 384, 40, 128, 16
    qweight, qzeros, scales, w, g = _spec_case(k, n, group_size, seed=6, zeros_at_ends=True)
    tiles = dict(KERNEL="frag", num_stages=2, SPLIT_K=split, **tiles)
    plan = launch_plan(m, n, k, bits=4, group_size=group_size, zero_offset=1, has_bias=False, dtype=dtype,
                       device=DEVICE, **tiles)
    assert plan.kernel == "frag" and plan.split == split and plan.constexprs["BLOCK_K"] == 128
    asm = plan.constexprs["ASM_LO"] and plan.constexprs["ASM_HI"] if "DOT_K" in tiles else plan.constexprs["ASM"]
    assert bool(asm) == (DEVICE.type == "cuda")  # the compiled pairs wherever they can run
    _one_hot_rows_read_back(gptq_to_fragments(qweight), qzeros, scales, w, torch.randperm(k, generator=g).view(-1, m),
                            group_size, dtype, **tiles)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 13])
@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("dot_k", [128, 64])
def test_w4a16_fragment_decode_matches_dequantized_matmul(dtype, m, split, dot_k):
    """The same kernel on random activations with a bias, one row (where it would stand in for the
    GEMV) and 13 (the 16-row tile cut off); GPTQ v2 zeros, 0 among them, two groups of 256 rows. Split
    4 ways, each split is one 128-row block, so half of them start inside a group: the scales each
    step loads a step ahead must still be its own group's. ``dot_k`` 64: each step's two half-block
    dots must add up to the whole block's."""
    _matches_dequantized_matmul(512, 72, 256, m, dtype, seed=7, v2_zeros=True, KERNEL="frag", BLOCK_N=64,
                                num_warps=2, num_stages=2, SPLIT_K=split, **({} if dot_k == 128 else dict(DOT_K=dot_k)))


@pytest.mark.parametrize("m", [64, 16, 1], ids=["prefill", "decode16", "decode1"])
@pytest.mark.parametrize("split", [1, 3])
def test_w4a16_fragment_tiles_return_the_spec_weights_bit_for_bit(split, m):
    """Tensor-core tiles over fragment words (``FRAGMENTS=True``: prefill, and the 16-row decode tile
    where the fragment decode kernel cannot run, as for fp32 x), fp32 one-hot rows: every row of
    every block read back as the spec's ``(q - z) * s``, bit for bit, ``m`` rows at a time (64: two
    row tiles), zeros 1 and 16 among them, N cut off, K split 1 and 3 ways. One row (the 16-row tile
    cut off to 1) reads one weight row a launch: each block's first, last and a random row (the
    16-row case reads them all through the same compiled tile; 384 interpreted launches took 50 s)."""
    from qoqopt.kernels.w4a16 import launch_plan
    from qoqopt.packing import gptq_to_fragments

    k, n, group_size = 384, 40, 128
    qweight, qzeros, scales, w, g = _spec_case(k, n, group_size, seed=8, scales_dtype=torch.float32, zeros_at_ends=True)
    plan = launch_plan(m, n, k, bits=4, group_size=group_size, zero_offset=1, has_bias=False, dtype=torch.float32,
                       device=DEVICE, FRAGMENTS=True, SPLIT_K=split)
    assert plan.kernel == "mma" and (plan.constexprs["BLOCK_M"] > 16) == (m > 16) and plan.constexprs["BLOCK_K"] == 128
    rows = torch.randperm(k, generator=g)
    if m == 1:
        rows = torch.tensor([r for b in range(0, k, 128) for r in (b, b + 1 + int(rows[b]) % 126, b + 127)])
    _one_hot_rows_read_back(gptq_to_fragments(qweight), qzeros, scales, w, rows.view(-1, m), group_size,
                            FRAGMENTS=True, SPLIT_K=split)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_w4a16_fragment_prefill_matches_dequantized_matmul(dtype):
    """The same tiles on random activations with a bias, 70 rows (the last row tile cut off)."""
    _matches_dequantized_matmul(256, 72, 128, 70, dtype, seed=9, FRAGMENTS=True)


def test_w4a16_fragment_decode_refuses_what_it_cannot_run():
    """Prefill rows, fp32 x, 8-bit weights, groups or K not whole 128-row blocks: a clear error; the
    tiles over fragment words refuse 8 bits and partial blocks, and the GEMV fragment words; a dot
    depth (``DOT_K``) other than half or all of a block, or outside the decode kernel."""
    from qoqopt.errors import QoqoptError
    from qoqopt.kernels.w4a16 import launch_plan

    frag = dict(KERNEL="frag", bits=4, group_size=128, zero_offset=1, has_bias=False, device=DEVICE)
    for m, k, dtype, changes in ((17, 256, torch.float16, {}), (16, 256, torch.float32, {}),
                                 (16, 256, torch.float16, dict(bits=8)), (16, 256, torch.float16, dict(group_size=64)),
                                 (16, 320, torch.float16, {})):
        with pytest.raises(QoqoptError, match="KERNEL='frag' decodes"):
            launch_plan(m, 64, k, dtype=dtype, **(frag | changes))
    prefill = dict(FRAGMENTS=True, bits=4, group_size=128, zero_offset=1, has_bias=False, device=DEVICE)
    for m, k, changes in ((64, 256, dict(bits=8)), (16, 256, dict(group_size=64)), (64, 320, {})):
        with pytest.raises(QoqoptError, match="FRAGMENTS=True reads 4-bit weights"):
            launch_plan(m, 64, k, dtype=torch.float16, **(prefill | changes))
    with pytest.raises(QoqoptError, match="GEMV .* reads GPTQ words only"):
        launch_plan(1, 64, 256, dtype=torch.float16, **(prefill | dict(KERNEL="gemv")))
    for changes in (dict(DOT_K=32), dict(DOT_K=256), dict(KERNEL="mma", FRAGMENTS=True, DOT_K=64)):  # two 64-row dots
        with pytest.raises(QoqoptError, match="DOT_K=.*dot depth, 64 or 128"):  # or one 128-row dot, in 'frag' only
            launch_plan(16, 64, 256, dtype=torch.float16, **(frag | changes))


@pytest.mark.parametrize("scales_dtype", [torch.float16, torch.float32], ids=["fp16-scales", "fp32-scales"])
@pytest.mark.parametrize("kernel, m", [("gemv", 1), ("mma", 16), ("mma", 64)], ids=["gemv", "mma-decode", "mma-prefill"])
def test_w4a16_kernels_return_the_spec_weights_bit_for_bit(kernel, m, scales_dtype):
    """With one-hot fp32 activations each output element is one weight, so every kernel must return
    the spec's dequantization of the original integers, ``(q - z) * s`` rounded once to fp32, bit for
    bit (:func:`qoqopt.packing.dequantize`). Scales with full 24-bit significands catch a zero folded
    into the scale's product (``z * s`` rounds), which fp16 scales cannot show."""
    from qoqopt.kernels.w4a16 import launch_plan

    k, n, group_size = 256, 40, 128
    qweight, qzeros, scales, w, g = _spec_case(k, n, group_size, seed=1, scales_dtype=scales_dtype)
    plan = launch_plan(m, n, k, bits=4, group_size=group_size, zero_offset=1, has_bias=False, dtype=torch.float32,
                       device=DEVICE)
    assert plan.kernel == kernel and (m <= 16 or plan.constexprs["BLOCK_M"] > 16)  # the regime named
    # output row i reads weight row rows[i]; the GEMV's one row reads each field of one word in turn
    picks = [torch.randperm(k, generator=g)[:m]] if m > 1 else [torch.tensor([8 * 21 + f]) for f in range(8)]
    _one_hot_rows_read_back(qweight, qzeros, scales, w, picks, group_size)


@pytest.mark.parametrize("words", ["gptq", "fragments"])
@pytest.mark.parametrize("scales_dtype", [torch.float16, torch.float32], ids=["fp16-scales", "fp32-scales"])
def test_w4a16_dense_plan_returns_the_spec_weights_bit_for_bit(words, scales_dtype):
    """The dense prefill plan (``KERNEL="dense"``, the GPU default from ``DENSE_MIN_M`` rows: the
    weight dequantized whole, then torch's matmul) over GPTQ and fragment words, fp32 one-hot rows:
    every weight read back as the spec's ``(q - z) * s``, bit for bit, 128 rows at a time, zeros 1 and
    16 among them, N cut off, the output poisoned."""
    from qoqopt.kernels.w4a16 import launch_plan
    from qoqopt.packing import gptq_to_fragments

    k, n, group_size, m = 384, 40, 128, 128
    qweight, qzeros, scales, w, g = _spec_case(k, n, group_size, seed=12, scales_dtype=scales_dtype, zeros_at_ends=True)
    config = dict(KERNEL="dense", FRAGMENTS=words == "fragments")
    plan = launch_plan(m, n, k, bits=4, group_size=group_size, zero_offset=1, has_bias=False, dtype=torch.float32,
                       device=DEVICE, **config)
    assert plan.kernel == "dense" and plan.grid[0] * plan.constexprs["BLOCK_K"] >= k
    words = gptq_to_fragments(qweight) if config["FRAGMENTS"] else qweight
    _one_hot_rows_read_back(words, qzeros, scales, w, torch.randperm(k, generator=g).view(-1, m), group_size, **config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["gptq4-g32", "gptq4-channel", "gptq8-g64", "fragments"])
def test_w4a16_dense_plan_matches_dequantized_matmul(dtype, case):
    """The same plan on random activations with a bias (added by ``addmm``), 130 rows: groups of 32,
    one group over a K that is no multiple of 32, 8-bit words, and fragment words with GPTQ v2 zeros."""
    from qoqopt.kernels.w4a16 import w4a16_matmul

    if case == "fragments":
        _matches_dequantized_matmul(256, 72, 128, 130, dtype, seed=13, v2_zeros=True, KERNEL="dense", FRAGMENTS=True)
        return
    layer, x, ref = _quant_linear_case(W4A16_CASES[case], 130, dtype)
    out = nan_like(ref.shape, dtype)
    operands = (layer.qweight, layer.qzeros, layer.scales.to(dtype), layer.bias)
    with torch.inference_mode():
        w4a16_matmul(x, *operands, out=out, KERNEL="dense", **layer._kwargs())
    assert_close(out, ref, dtype, scale=4)
    # outside inference mode, on an x that asks for gradients: as the Triton launches, no autograd
    # history (which would keep the dense temporary alive) and no refusal of out=
    x.requires_grad_(dtype == torch.float32)
    again = w4a16_matmul(x, *operands, out=nan_like(ref.shape, dtype), KERNEL="dense", **layer._kwargs())
    assert again.grad_fn is None and torch.equal(again, out)


def test_w4a16_prefill_defaults_to_the_dense_plan_from_128_rows_on_a_gpu():
    """7B shapes on a 132-SM GPU (planned without one): from ``DENSE_MIN_M`` rows the default plan is
    dense, over either layout; below it, or with any tile asked for, the tensor-core tiles; on the
    CPU (the interpreter) the tiles at every M."""
    from qoqopt.errors import QoqoptError
    from qoqopt.kernels.w4a16 import DENSE_MIN_M, _launch_plan

    def kind(m, device="cuda", config=()):
        return _launch_plan(m, 18944, 3584, 4, 128, 1, False, torch.bfloat16, torch.device(device), 132, config).kernel

    assert DENSE_MIN_M == 128 and kind(128) == kind(2048) == "dense" and kind(127) == "mma"
    assert kind(2048, config=(("FRAGMENTS", True),)) == "dense"
    assert kind(2048, config=(("BLOCK_K", 128),)) == kind(2048, config=(("KERNEL", "mma"),)) == "mma"
    assert kind(2048, device="cpu") == "mma"
    with pytest.raises(QoqoptError, match="group_size 24 must be a multiple of 16"):
        _launch_plan(2048, 512, 384, 4, 24, 1, False, torch.bfloat16, torch.device("cuda"), 132, ())


def test_w4a16_decode_tiles_widen_only_where_that_lets_k_split():
    """7B shapes on a 132-SM GPU, M = 16: 128-wide tiles where 64-wide ones are 2-4 waves, unsplit
    (gate/up: H200 42 against 48 us); wider layers stay unsplit either way and 64 wide (the fused
    gate/up ran slower at 128), narrower ones split 64-wide tiles."""
    from qoqopt.kernels.w4a16 import _launch_plan

    def plan(n, k):
        p = _launch_plan(16, n, k, 4, 128, 1, False, torch.bfloat16, torch.device("cuda"), 132, ())
        return p.constexprs["BLOCK_N"], p.split

    assert plan(18944, 3584) == (128, 3)  # gate/up: 296 tiles of 64, 148 of 128
    assert plan(2 * 18944, 3584) == (64, 1)  # gate/up fused
    assert plan(3584, 18944)[0] == 64 and plan(3584, 18944)[1] > 1  # down
    assert plan(512, 3584)[0] == 64  # k/v


def test_w4a16_plans_split_prefill_only_when_tiles_underfill_the_gpu():
    """7B shapes on a 132-SM GPU (planned without one: the plan needs only the device type)."""
    from qoqopt.kernels.w4a16 import _launch_plan

    def plan(m, n, k):  # the tiles: by default the dense plan takes M >= 128 on a GPU
        return _launch_plan(m, n, k, 4, 128, 1, False, torch.bfloat16, torch.device("cuda"), 132, (("KERNEL", "mma"),))

    narrow = plan(128, 512, 3584)  # k/v at a 128-token prompt: 4 output tiles unsplit
    assert narrow.split > 1 and 32 <= math.prod(narrow.grid) <= 132 and narrow.k_per_split >= 4 * 64
    q_o = plan(128, 3584, 3584)  # 28 tiles: split, in one wave (140 blocks would leave 8 for a second)
    assert q_o.split > 1 and math.prod(q_o.grid) <= 132
    assert plan(512, 3584, 3584).split == 1  # 112 tiles: split 2 would be two full waves, no gain
    # 256-row tiles only from 512 rows, where they fill the GPU unsplit (split-K's epilogue spills at 256 rows)
    assert plan(512, 3584, 3584).constexprs["BLOCK_M"] == 128
    assert plan(128, 18944, 3584).constexprs["BLOCK_M"] == 128  # one 256-row tile would be half padding
    assert plan(2048, 512, 3584).constexprs["BLOCK_M"] == 128  # k/v: 32 tiles of 256 rows
    assert plan(2048, 18944, 3584).constexprs["BLOCK_M"] == 256
    assert plan(2048, 18944, 3584).split == 1  # gate/up at 2048 tokens: 1184 tiles of 256 rows already


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quant_linear_planned_launches_follow_its_tensors(dtype):
    """Decode launches are planned once per M but take the layer's tensors at each call: a replaced
    buffer (of the same or another dtype) or a deep copy changed in place is what runs. On a GPU the
    repeated calls launch the compiled kernel directly, past Triton's dispatch. Split-K scratch is
    shared and left with its counters at zero after every launch."""
    import copy

    from qoqopt.kernels._splitk import splitk_workspace
    from qoqopt.kernels.w4a16 import QuantLinear

    intweight, zeros, scales, g_idx = _gptq_case(256, 88, 4, 32, False)
    linear = QuantLinear.from_gptq(*pack_gptq(intweight, zeros), scales).to(DEVICE)
    w = dequantize(intweight, zeros, scales, g_idx).to(DEVICE)
    xs = [torch.randn(m, 256, device=DEVICE, dtype=dtype) for m in (1, 1, 16)]
    with torch.inference_mode():
        outs = [linear(x) for x in xs]  # GEMV and 16-row tiles, both split over K here
        assert len(linear._launchers) == 2
        for x, y in zip(xs, outs):
            assert_close(y, F.linear(x.float(), w.t().to(dtype).float()), dtype, scale=4)
        _, counters = splitk_workspace(DEVICE, 1, 1)
        assert counters.eq(0).all()
        linear.scales = linear.scales * 2  # a new tensor under the same buffer name
        assert_close(linear(xs[0]), 2 * outs[0].float(), dtype, scale=8)
        twin = copy.deepcopy(linear)
        twin.scales.mul_(2)  # in place, in the copy only
        assert_close(twin(xs[0]), 4 * outs[0].float(), dtype, scale=16)
        assert_close(linear(xs[0]), 2 * outs[0].float(), dtype, scale=8)
        linear.scales = linear.scales.float()  # another dtype: Triton specialises anew, so no direct launch
        assert_close(linear(xs[0]), 2 * outs[0].float(), dtype, scale=8)
        linear(torch.randn(40, 256, device=DEVICE, dtype=dtype))  # prefill sizes are not kept
        assert len(linear._launchers) == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quant_linears_of_one_shape_share_their_prefill_launch(dtype):
    """Layers of one shape (a model's 28 q_proj) share the launch planned for a prompt's M, and each
    still computes with its own weights."""
    from qoqopt.kernels.w4a16 import QuantLinear

    layers, weights = [], []
    for seed in (0, 1):
        intweight, zeros, scales, g_idx = _gptq_case(256, 88, 4, 32, False, seed=seed)
        layers.append(QuantLinear.from_gptq(*pack_gptq(intweight, zeros), scales).to(DEVICE))
        weights.append(dequantize(intweight, zeros, scales, g_idx).to(DEVICE))
    x = torch.randn(40, 256, device=DEVICE, dtype=dtype)
    with torch.inference_mode():
        for layer, w in zip(layers, weights):
            assert_close(layer(x), F.linear(x.float(), w.t().to(dtype).float()), dtype, scale=4)
        assert layers[0]._launcher(x) is layers[1]._launcher(x)


@pytest.mark.parametrize("groups_per_step", [1, 3])  # one group at a time; steps of 3 with a shorter last
@pytest.mark.parametrize("case", list(W4A16_CASES))
def test_reference_path_is_the_spec_bit_for_bit(case, groups_per_step, monkeypatch):
    """QuantLinear's torch path (every call that does not run Triton: CPU, autograd) unpacks with
    int32 shifts a few groups at a time. Its weight must be exactly the spec's dequantization of
    the original integers (rounded once to the activation dtype), and its output exactly
    ``F.linear`` over that weight."""
    import qoqopt.kernels.w4a16 as w4a16
    from qoqopt.kernels.w4a16 import QuantLinear, dequantize_weight, w4a16_reference

    layout, k, n, bits, group_size, act_order = W4A16_CASES[case]
    monkeypatch.setattr(w4a16, "_DEQUANT_STEP", groups_per_step * group_size * n)
    intweight, zeros, scales, g_idx = _gptq_case(k, n, bits, group_size, act_order)
    if layout == "awq":
        linear = QuantLinear.from_awq(*pack_awq(intweight, zeros), scales)
    else:
        linear = QuantLinear.from_gptq(*pack_gptq(intweight, zeros, bits), scales, g_idx, bits=bits)
    spec = dequantize(intweight, zeros, scales, g_idx).contiguous()  # F.linear's rounding follows the layout
    if linear.perm is not None:  # the layer holds K permuted: its row r is the checkpoint's row perm[r]
        spec = spec[linear.perm]
    bias = torch.randn(n)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = dequantize_weight(linear.qweight, linear.qzeros, linear.scales, dtype=dtype, **linear._kwargs())
        assert w.dtype == dtype and torch.equal(w, spec.to(dtype)), dtype
        x = torch.randn(5, k, dtype=dtype)
        y = w4a16_reference(x, linear.qweight, linear.qzeros, linear.scales, bias, **linear._kwargs())
        assert torch.equal(y, F.linear(x, spec.to(dtype).t(), bias.to(dtype))), dtype
