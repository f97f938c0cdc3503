"""Compile every kernel for Hopper (sm_90) without a GPU, with the GPU launch configs.

The interpreter checks what the kernels compute, not whether Triton's compiler accepts them (static
ifs, reshapes, helper calls, dot shapes) or whether they fit in registers and shared memory. Triton's
NVIDIA backend compiles to a cubin offline, so that part is checked here on any machine. Register
use is reported; spills are asserted absent for the W4A16 kernels, whose decode path lives on its
register budget. They depend on the Triton version, and this file skips itself on a GPU machine: check
the GPU image's Triton from a CPU one, installed beside the venv's (see benchmarks/sass_report.py).
"""

from __future__ import annotations

import functools

import pytest
import torch

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("a GPU is present: tests/test_kernels.py compiles and runs these kernels for real",
                allow_module_level=True)

from benchmarks.offline_compile import (  # noqa: E402
    CUDA,
    NoToolchain,
    compile_kernel,
    loads_read_in_step,
    loads_read_in_their_step,
    main_loop_mix,
    mma_loop_mix,
    resource_usage,
)

BF16 = "*bf16"


def _offline(compile_fn, *args, **kwargs):
    """``compile_fn(*args, **kwargs)``, or a skip when this triton has no offline CUDA toolchain."""
    try:
        return compile_fn(*args, **kwargs)
    except NoToolchain as err:
        pytest.skip(f"no offline CUDA toolchain in this triton: {err}")


def _compile(kernel, signature: dict, constexprs: dict, options: dict):
    return _offline(compile_kernel, kernel, signature, constexprs, options)


def _loop_mixes(*compiled) -> list:
    """Each kernel's main-loop opcode counts; a skip where this triton ships no cuobjdump (a machine-code
    assertion must not pass for want of machine code)."""
    mixes = [main_loop_mix(c) for c in compiled]
    if None in mixes or None in (resource_usage(c) for c in compiled):
        pytest.skip("this triton ships no cuobjdump: machine code unreadable")
    return mixes


def _resource_usage(compiled) -> str:
    usage = resource_usage(compiled)
    return f"{usage['registers']} registers, {usage['stack_bytes']} B stack" if usage else "resource usage unavailable"


def test_merger_compiles():
    from benchmarks.offline_compile import merger_fc1_compile
    from qoqopt.kernels.merger import _patch_rmsnorm_kernel, _patch_rstd_kernel, rmsnorm_blocks

    # one small image, a mid-size one, the 5120-patch maximum; a small one split over K by patch slots
    # and the sweep's TMA loads (host tensor descriptors) at the largest image
    # and one accumulator rescaled between slots, which exists to free registers
    registers = {}
    for m, config in ((64, {}), (324, {}), (1280, {}), (64, dict(BLOCK_N=128, BLOCK_K=64, SPLIT_K=4)),
                      (1280, dict(TMA=True)), (1280, dict(RESCALE=True)), (1280, dict(RESCALE=True, TMA=True))):
        compiled, cfg = _offline(merger_fc1_compile, m, **config)
        print(f"merger M={m} {cfg}: {_resource_usage(compiled)}")
        assert (resource_usage(compiled) or {}).get("stack_bytes", 0) == 0, f"merger fc1 {cfg} spills"
        registers[m, tuple(config.items())] = (resource_usage(compiled) or {}).get("registers")
        if config.get("TMA") and (mix := mma_loop_mix(compiled)) is not None:
            assert mix["UTMALDG"] and not mix["LDGSTS"], f"merger fc1 {cfg} does not load by TMA: {dict(mix)}"
        # each slot's 1/RMS, a plain load (the tiles are copied ahead), is loaded a slot before it is used
        # (RESCALE, a sweep candidate, still loads its ratio where it rescales)
        if not config.get("RESCALE"):
            assert not loads_read_in_their_step(compiled), f"merger fc1 {cfg} waits on a load it makes in the step"
    if None not in registers.values():  # a 128 x 128 fp32 accumulator is 64 registers a thread at 8 warps
        assert registers[1280, (("RESCALE", True),)] <= registers[1280, ()] - 32, registers
    _compile(_patch_rstd_kernel, {"x_ptr": BF16, "rstd_ptr": "*fp32", "P": "i32", "eps": "fp32"},
             dict(C=1280, BLOCK_P=32, BLOCK_C=256), dict(num_warps=4, num_stages=1))
    # the cublas plan's norm pass, as patch_rmsnorm launches it at the 7B's 1280 channels
    norm = _compile(_patch_rmsnorm_kernel, {"x_ptr": BF16, "w_ptr": BF16, "out_ptr": BF16, "P": "i32", "eps": "fp32"},
                    dict(C=1280, **rmsnorm_blocks(1280)), dict(num_warps=4, num_stages=1))
    print(f"merger norm pass {rmsnorm_blocks(1280)}: {_resource_usage(norm)}")
    if resource_usage(norm) is None:
        pytest.skip("this triton ships no cuobjdump: the norm pass's spills unreadable")
    assert resource_usage(norm)["stack_bytes"] == 0, "the merger's norm pass spills"


@pytest.mark.parametrize("dtype", ["*bf16", "*fp32"])
def test_vision_attention_compiles(dtype):
    from benchmarks.offline_compile import attention_compile

    for avg_len in (64, 5120):  # window layers; full attention on one large image
        compiled, cfg = _offline(attention_compile, avg_len, dtype)
        print(f"attention {dtype} avg_len={avg_len} {cfg}: {_resource_usage(compiled)}")


@pytest.mark.parametrize("zero_offset", [1, 0], ids=["gptq-v1", "gptq-v2-or-awq"])
def test_w4a16_compiles_without_spills(zero_offset):
    """Every launch shape compiles, and keeps its values in registers: a local-memory spill in the
    weight stream costs more than the dequant (an earlier AWQ GEMV spilled 2 KB per thread under
    Triton 3.6, tripling its instructions per weight)."""
    from benchmarks.offline_compile import w4a16_compile

    # decode: one row (GEMV, split-K) and 16 rows (tensor cores, with and without split-K); prefill
    # tiles (256-row at 2048), with and without split-K (a narrow layer at a short prompt); the dense
    # plan's dequantization, the prefill default from 128 rows, over GPTQ and fragment words
    mma = dict(KERNEL="mma")
    for m, k, n, config in ((1, 18944, 3584, {}), (1, 3584, 18944, {}), (16, 3584, 18944, {}), (16, 18944, 3584, {}),
                            (2048, 3584, 18944, mma), (128, 3584, 512, mma), (2048, 3584, 512, mma),
                            (2048, 3584, 18944, {}), (2048, 18944, 3584, dict(FRAGMENTS=True))):
        compiled, plan = _offline(w4a16_compile, m, k, n, zero_offset=zero_offset, **config)
        assert (plan.kernel == "dense") == (m >= 128 and not config.get("KERNEL")), (m, plan.kernel)
        print(f"w4a16 M={m} {plan.kernel} split={plan.split}: {_resource_usage(compiled)}")
        usage = resource_usage(compiled)
        assert usage is None or usage["stack_bytes"] == 0, (m, k, n, usage)


def test_bf16_kernels_are_refused_where_ptxas_refuses_them(monkeypatch):
    """The decode kernel that apply() repacks wide layers for (fragment words) multiplies in bf16x2
    FMAs, which ptxas compiles for sm_80 (Ampere) and up only. triton_unusable_reason refuses bf16 on
    exactly those GPUs that ptxas refuses it for (a T4 is sm_75): the patched model then runs the torch
    references, and apply(strict=True) refuses, instead of a ptxas error at the first decode step.
    fp16 is not refused: it compiles for sm_75 (asserted here too)."""
    from benchmarks.offline_compile import w4a16_compile
    from qoqopt.kernels import _triton

    cuda = torch.device("cuda", 0)
    for arch in (75, 80, 90):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, arch=arch: divmod(arch, 10))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index, arch=arch: f"an sm_{arch} GPU")
        # a cache of this arch's answers, gone with the test
        monkeypatch.setattr(_triton, "_bf16_unusable_reason", functools.cache(_triton._bf16_unusable_reason.__wrapped__))
        reason = _triton.triton_unusable_reason(cuda, torch.bfloat16)
        try:  # a device index per arch: Triton keeps one target per device
            _offline(w4a16_compile, 1, 3584, 18944, dtype=torch.bfloat16, arch=arch, device=arch, KERNEL="frag")
            refused = None
        except triton.runtime.errors.PTXASError as err:
            refused = str(err)
        print(f"sm_{arch}: ptxas {'refuses' if refused else 'compiles'} bf16; qoqopt: {reason}")
        assert (reason is None) == (refused is None), (arch, reason, refused)
        assert refused is None or "bf16" in refused, refused
        assert reason is None or f"an sm_{arch} GPU is {arch // 10}.{arch % 10}" in reason, reason
        assert _triton.triton_unusable_reason(cuda, torch.float16) is None
    _offline(w4a16_compile, 1, 3584, 18944, dtype=torch.float16, arch=75, device=75, KERNEL="frag")


def test_w4a16_joined_decode_tiles_store_wide():
    """``JOIN_FIELDS`` (a sweep candidate) exists to replace the default 16-row tile's one 16-bit
    shared-memory store per weight with wide stores. Its results equal the default's by design, so
    only the machine code shows that the joined path is the one compiled (sm_90, gate/up at M = 16):
    at least 4x fewer stores in the K loop, no spill. The flag is refused where it has no meaning."""
    from benchmarks.offline_compile import w4a16_compile
    from qoqopt.kernels.w4a16 import _launch_plan

    (plain, _), (joined, _) = (_offline(w4a16_compile, 16, 3584, 18944, **cfg) for cfg in ({}, dict(JOIN_FIELDS=True)))
    stores = [mix.get("STS", 0) for mix in _loop_mixes(plain, joined)]
    print(f"K-loop shared stores: default {stores[0]}, joined {stores[1]}")
    assert stores[1] * 4 <= stores[0] and resource_usage(joined)["stack_bytes"] == 0, stores
    for m, dtype in ((16, torch.float32), (64, torch.bfloat16)):  # no 16-bit magic; a prefill tile
        with pytest.raises(AssertionError, match="JOIN_FIELDS"):
            _launch_plan(m, 512, 256, 4, 128, 1, False, dtype, CUDA, 132, (("JOIN_FIELDS", True),))


@pytest.mark.parametrize("dtype, tiles", [(torch.bfloat16, dict(BLOCK_N=128, num_warps=4)),
                                          (torch.float16, dict(BLOCK_N=64, num_warps=2))], ids=["bf16-n128-w4", "fp16-n64-w2"])
def test_w4a16_fragment_decode_feeds_the_mma_from_registers(dtype, tiles):
    """``KERNEL="frag"`` (a sweep candidate; its two configs) exists to drop the decode tile's
    shared-memory pass of dequantized weights: in the fragment words' layout, the conversion to the
    MMA operand is a renaming. Its results equal the default's by design, so only the compiled code
    shows it (sm_90, gate/up at M = 16): no spill; at most 2 shared-memory stores per K step against
    the default's one per weight; under half the default's K-loop instructions per weight; MMA
    operands paired by rows (kWidth 2: a join in the operand's chain would make it 4, and rebuild
    every A fragment with register moves); and each pack of eight the asm sees is one word's eight
    nibbles, innermost in each thread's registers, as its text assumes. And no plain global load of
    the K loop is read in the step that makes it: the scales (2 bytes a thread, too small for the
    pipeliner's cp.async) are loaded a step ahead, where loaded in their own step they were stored to
    shared memory 10 instructions later, before a barrier that every warp then waited at."""
    import re

    from benchmarks.offline_compile import w4a16_compile

    (plain, base), (frag, plan) = (_offline(w4a16_compile, 16, 3584, 18944, dtype=dtype, **cfg)
                                   for cfg in ({}, dict(KERNEL="frag", num_stages=3, **tiles)))
    assert plan.kernel == "frag" and plan.constexprs["ASM"]
    mixes = _loop_mixes(plain, frag)
    assert resource_usage(frag)["stack_bytes"] == 0
    weights = [p.constexprs["BLOCK_K"] * p.constexprs["BLOCK_N"] / (32 * p.constexprs["num_warps"]) for p in (base, plan)]
    stores, per_weight = [mix.get("STS", 0) for mix in mixes], [sum(mix.values()) / w for mix, w in zip(mixes, weights)]
    print(f"K loop per weight: default {per_weight[0]:.2f}, {stores[0]} STS; fragments {per_weight[1]:.2f}, {stores[1]}")
    assert stores[1] <= 2 and stores[1] * 16 <= stores[0] and per_weight[1] * 2 < per_weight[0], (stores, per_weight)
    assert loads_read_in_their_step(frag) == [] and loads_read_in_their_step(plain)  # the default tile's scale: read
    ttgir = frag.asm["ttgir"]
    assert set(re.findall(r"kWidth = (\d+)", ttgir)) == {"2"}
    encoding = re.search(r"tt\.elementwise_inline_asm .*-> tensor<[0-9x]+x(?:bf16|f16), (#\w+)>", ttgir).group(1)
    layout = re.search(rf"^{encoding} = .*sizePerThread = \[([\d, ]+)\].*order = \[([\d, ]+)\]", ttgir, re.M)
    assert layout.group(1).endswith("2, 2, 2") and layout.group(2).startswith("4, 3, 2"), layout.group(0)


@pytest.mark.parametrize("m, k, n", [(1, 3584, 18944), (16, 18944, 3584), (16, 3584, 3584), (1, 3584, 37888)],
                         ids=["gate-up-m1", "down-m16", "q-o-m16", "fused-gate-up-m1"])
def test_w4a16_fragment_decode_in_two_dots_holds_fewer_registers(m, k, n):
    """``DOT_K=64`` (a tuning candidate) makes each K step two 64-row dots from the same words, so
    half the dequantized B registers are live at a time. That is all it is for, and only the compiled
    code shows it (sm_90, bf16, 128 x 128 tiles at 4 warps, the rules' K split): at least 24 registers
    a thread fewer than the one 128-row dot, no spill, K-loop instructions within 2%, and still no
    shared-memory pass of the weights (at most 2 stores a step) with MMA operands paired by rows
    (kWidth 2). Split over K, at most 96 (5 programs of 128 threads an SM where 128 fit 4); unsplit
    (the fused gate/up's 296 tiles), Triton 3.9 takes 104 (4 programs; 3.6, the GPU image's, 96).
    Each pack of four the half's asm sees is one word's pairs 2H and 2H + 1, innermost in the
    thread's registers, as its text (``test_fragment_asm_texts_make_each_pair_of_the_word``) assumes."""
    import re

    from benchmarks.offline_compile import w4a16_compile

    tiles = dict(KERNEL="frag", BLOCK_N=128, num_warps=4, num_stages=3)
    (one, _), (two, plan) = (_offline(w4a16_compile, m, k, n, **tiles, **depth) for depth in ({}, dict(DOT_K=64)))
    assert plan.constexprs["DOT_K"] == 64 and plan.constexprs["ASM_LO"] and plan.constexprs["ASM_HI"]
    (usage_one, usage_two), mixes = (resource_usage(one), resource_usage(two)), _loop_mixes(one, two)
    loops = [sum(mix.values()) for mix in mixes]
    print(f"M={m} {k}->{n}: one dot {usage_one}, {loops[0]} K-loop instructions; two dots {usage_two}, {loops[1]}")
    assert usage_two["stack_bytes"] == 0 and usage_two["registers"] <= (96 if plan.split > 1 else 104)
    assert usage_two["registers"] + 24 <= usage_one["registers"] and loops[1] <= 1.02 * loops[0], (usage_two, loops)
    assert mixes[1].get("STS", 0) <= 2
    ttgir = two.asm["ttgir"]
    assert set(re.findall(r"kWidth = (\d+)", ttgir)) == {"2"}
    encoding = re.search(r"tt\.elementwise_inline_asm .*-> tensor<[0-9x]+x(?:bf16|f16), (#\w+)>", ttgir).group(1)
    layout = re.search(rf"^{encoding} = .*sizePerThread = \[([\d, ]+)\].*order = \[([\d, ]+)\]", ttgir, re.M)
    assert layout.group(1).endswith(" 2, 2") and layout.group(2).startswith("3, 2,"), layout.group(0)


def _sass(*body: str) -> str:
    """A loop of SASS lines, as cuobjdump prints them, closed by a branch back to its first."""
    lines = [f"        /*{16 * i:04x}*/                   {text} ;" for i, text in enumerate(body)]
    return "\n".join(lines + [f"        /*{16 * len(body):04x}*/                   BRA 0x0000 ;"])


@pytest.mark.parametrize("body, read", [
    (["LDG.E.U16 R4, desc[UR8][R2.64]", "IADD3 R5, R6, R7, RZ", "STS.U16 [R9+0x10], R4"], ["LDG.E.U16 R4"]),
    (["STS.U16 [R9+0x10], R4", "IADD3 R5, R6, R7, RZ", "LDG.E.U16 R4, desc[UR8][R2.64]"], []),  # read next step
    (["LDG.E.128 R4, desc[UR8][R2.64]", "MOV R5, RZ", "FADD R9, R7, R8"], ["LDG.E.128 R4"]),  # R7 still live
    (["LDG.E R4, desc[UR8][R2.64]", "@P0 MOV R4, RZ", "FADD R9, R4, R8"], ["LDG.E R4"]),  # a predicated write
    (["LDG.E R5, desc[UR8][R2.64]", "LDG.E R8, desc[UR8][R4.64]"], ["LDG.E R5"]),  # R4.64 is R4 and R5
    (["LDG.E R4, desc[UR8][R2.64]", "LDGSTS.E [R4+0x100], desc[UR8][R6.64]"], ["LDG.E R4"]),  # an address
    (["LDG.E R4, desc[UR8][R2.64]", "SHFL.IDX PT, R4, R9, R10, R11", "FADD R9, R4, R8"], []),  # R4 rewritten
    (["LDG.E RZ, desc[UR8][R2.64]", "LDG.E.64 R4, desc[UR8][R2.64]", "MOV R4, RZ", "MOV R5, RZ"], []),
], ids=["read", "next-step", "128-bit", "predicated", "pair-address", "smem-address", "shfl", "rz"])  # fmt: skip
def test_loads_read_in_step_follows_registers(body, read):
    """The SASS reading behind the fragment kernel's prefetch check, on hand-written loops: a load's
    registers are followed until each is overwritten without a predicate; addresses (``[R4.64]``:
    R4 and R5; shared-memory destinations) are reads."""
    assert loads_read_in_step(_sass(*body)) == read
    assert loads_read_in_step(_sass(*body).rsplit("\n", 1)[0]) == []  # no loop, nothing to report


@pytest.mark.parametrize("m, tiles", [(128, dict(BLOCK_M=128, num_stages=3)), (2048, {})], ids=["m128", "m2048"])
def test_w4a16_fragment_prefill_costs_what_gptq_words_cost(m, tiles):
    """Prefill tiles over fragment words (``FRAGMENTS=True``) read the rows in another order and
    nothing else: compiled for sm_90 at gate/up with 128-deep K steps (one block), within 3% of GPTQ
    words' K-loop instructions at the same tiles, and no spill at 128-row tiles. (256-row tiles with
    128-deep steps sit at the register ceiling: Triton 3.9 spills 8 B for GPTQ words and 80 B for
    fragments there, 3.6 neither; the sweep times them under the GPU image's 3.6.) If fragment
    decode wins on the GPU, this is what lets one layout serve prefill too."""
    from benchmarks.offline_compile import w4a16_compile

    (gptq, _), (frag, plan) = (_offline(w4a16_compile, m, 3584, 18944, BLOCK_K=128, **tiles, **f)
                               for f in ({}, dict(FRAGMENTS=True)))
    assert plan.kernel == "mma" and plan.constexprs["FRAGMENTS"] and plan.constexprs["BLOCK_K"] == 128
    loops, usage = [sum(mix.values()) for mix in _loop_mixes(gptq, frag)], resource_usage(frag)
    print(f"M={m} K-loop instructions: GPTQ words {loops[0]}, fragment words {loops[1]}; {_resource_usage(frag)}")
    assert loops[1] <= 1.03 * loops[0] and (usage["stack_bytes"] == 0 or plan.constexprs["BLOCK_M"] > 128), (loops, usage)


@pytest.fixture
def offline_launches():
    from benchmarks.offline_compile import offline_w4a16

    with offline_w4a16() as driver:
        yield driver


# the one-row GEMV (a 2-D grid), the tensor-core decode kernel (3-D, M as an argument)
@pytest.mark.parametrize("m", [1, 16], ids=["gemv", "mma"])
def test_bound_launch_hands_the_kernel_what_tritons_dispatch_hands_it(offline_launches, m):
    """After its first launch a planned W4A16 launch skips Triton's dispatch and calls the compiled
    kernel's runner itself. The reference is Triton's own dispatch: the launcher must receive the same
    grid and arguments, and whatever Triton would specialise differently must go through it again."""
    from qoqopt.kernels.w4a16 import prepare_w4a16

    k, n = 256, 512
    launch = prepare_w4a16(m, k, n, torch.float16, CUDA, has_bias=False, group_size=128, zero_offset=1)
    x = torch.randn(m, k + 8, dtype=torch.float16)
    qweight = torch.zeros(k // 8, n, dtype=torch.int32)
    qzeros = torch.zeros(2, n // 8, dtype=torch.int32)
    scales = torch.ones(2, n, dtype=torch.float16)
    out = torch.empty(m, n, dtype=torch.float16)

    def call(x, qweight=qweight):
        launch(x, qweight, qzeros, scales, None, out)

    def same_arguments(dispatched, direct):
        # (grid x, y, z, stream, function, packed metadata, launch metadata, enter hook, exit hook,
        # *kernel args); the launch metadata is a fresh object per launch (only launch hooks read it)
        assert len(direct) == len(dispatched) > 9
        for i, (a, b) in enumerate(zip(dispatched, direct)):
            if i != 6:
                assert a is b if isinstance(a, torch.Tensor) else a == b, (i, a, b)

    launches = offline_launches.launches
    aligned = x[:, :k]
    call(aligned)  # compiles, then goes through Triton's dispatch
    call(aligned)  # bound: straight to the runner
    same_arguments(*launches)
    matmul = launch.matmul
    assert matmul.dispatches == 1
    # One thing Triton specialises on changes at a time: a qweight row stride (an int argument) of
    # n + 8; then x 2 bytes off 16-byte alignment. Each goes back through the dispatch, and is bound again.
    wider = torch.zeros(k // 8, n + 8, dtype=torch.int32)[:, :n]
    for changed in (dict(x=aligned, qweight=wider), dict(x=x[:, 1 : k + 1], qweight=wider)):
        dispatches = matmul.dispatches
        del launches[:]
        call(**changed)
        call(**changed)
        assert matmul.dispatches == dispatches + 1
        same_arguments(*launches)


def test_layers_of_one_shape_share_a_prefill_launch(offline_launches):
    """A prefill calls each linear once with the prompt's M. Layers of one shape share one launch, so
    only the first of them goes through Triton's dispatch, and each call still hands the kernel its
    own layer's tensors (a launch holds none)."""
    from benchmarks.offline_compile import w4a16_operands
    from qoqopt.kernels.w4a16 import shared_launch

    m, k, n = 40, 256, 512
    plan = (m, k, n, torch.float16, CUDA, False, 4, 128, 1)  # no bias, 4 bits, group 128, GPTQ v1
    layers = [w4a16_operands(m, k, n, torch.float16) for _ in range(3)]
    launches = {}  # the stub starts with an empty cache
    for x, qweight, qzeros, scales, _, out in layers:
        launch = shared_launch(*plan)
        launches[id(launch)] = launch
        launch(x, qweight, qzeros, scales, None, out)
    assert sum(launch.matmul.dispatches for launch in launches.values()) == 1
    # from DENSE_MIN_M rows the plan (dequantize, then cuBLAS) is the same for every M: one launch
    # for every prompt length
    assert shared_launch(128, *plan[1:]) is shared_launch(4096, *plan[1:]) is not shared_launch(127, *plan[1:])
    assert len(offline_launches.launches) == len(layers)
    for (x, qweight, qzeros, scales, _, out), args in zip(layers, offline_launches.launches):
        kernel_args = args[9:]  # after grid, stream, function, metadata and hooks
        assert all(a is b for a, b in zip(kernel_args[:4], (x, qweight, qzeros, scales))) and kernel_args[5] is out


def test_launches_go_to_the_gpu_their_layer_is_on(offline_launches):
    """Triton launches on its driver's current device, whatever the tensors' device. A layer on cuda:1
    of a model split over GPUs, called while cuda:0 is current, must launch on cuda:1 (through Triton's
    dispatch, and bound after it), leave cuda:0 current, and not be dispatched again each call; a
    layer on the current GPU changes nothing."""
    from benchmarks.offline_compile import w4a16_operands
    from qoqopt.kernels.w4a16 import prepare_w4a16

    m, k, n = 16, 256, 512
    x, qweight, qzeros, scales, _, out = w4a16_operands(m, k, n, torch.float16)
    for device in (6, 0):  # 6: an index no other test loads kernels on (Triton checks them once a device)
        launch = prepare_w4a16(m, k, n, torch.float16, torch.device("cuda", device), has_bias=False,
                               group_size=128, zero_offset=1)
        del offline_launches.launch_devices[:]
        for _ in range(2):
            launch(x, qweight, qzeros, scales, None, out)
            assert offline_launches.get_current_device() == 0
        assert offline_launches.launch_devices == [device, device] and launch.matmul.dispatches == 1
        functions = [args[4] for args in offline_launches.launches[-2:]]  # (grid x, y, z, stream, function, ...)
        assert functions == [("function loaded on", device)] * 2


def test_unbound_launches_go_to_the_gpu_asked():
    """The merger's and the attention's launches (``kernel[x.device][grid](...)``, no binding) too."""
    from benchmarks.offline_compile import recording_driver, toolchain_needed
    from qoqopt.kernels.merger import _patch_rstd_kernel

    x, rstd = torch.empty(64, 1280, dtype=torch.float16), torch.empty(64)

    def launch(device: int) -> None:
        with toolchain_needed():
            _patch_rstd_kernel[torch.device("cuda", device)][(2,)](x, rstd, 64, 1e-6, C=1280, BLOCK_P=32,
                                                                   BLOCK_C=256, num_warps=4)

    with recording_driver() as driver:
        for device in (7, 0):
            _offline(launch, device)
            assert driver.launch_devices[-1] == device and driver.get_current_device() == 0
            assert driver.launches[-1][4] == ("function loaded on", device)


RTX_4090_SHARED_MEM = 101376  # bytes per block, opted in (sm_89); an A100 has 166912


@pytest.mark.parametrize("op", ["w4a16-prefill", "merger-fc1"])
def test_hopper_tiles_run_shallower_where_shared_memory_is_smaller(op, request):
    """The default tiles are sized for Hopper's shared memory. Triton's own launch check (against the
    device's limit) refuses them on a GPU with less; the launch must then run the same tiles with
    fewer pipeline stages, remember that depth for the next launch, and on Hopper run all the stages
    asked for."""
    from benchmarks.offline_compile import HOPPER_SHARED_MEM, merger_fc1_compile, w4a16_compile
    from qoqopt.kernels import w4a16
    from qoqopt.kernels.merger import _merger_fc1_kernel

    variant = (w4a16.KERNELS["mma"] if op == "w4a16-prefill" else _merger_fc1_kernel)[CUDA]
    # one dict shared by the kernel's per-GPU variants: emptied in place, refilled afterwards
    saved = dict(variant.fitted_stages)
    variant.fitted_stages.clear()
    request.addfinalizer(lambda: (variant.fitted_stages.clear(), variant.fitted_stages.update(saved)))

    def launch(limit: int, device: int):  # 7B dims: M = 2048 prefill of gate/up; 5120 patches
        if op == "w4a16-prefill":
            compiled, plan = _offline(w4a16_compile, 2048, 3584, 18944, max_shared_mem=limit, device=device,
                                      KERNEL="mma")
            return compiled, plan.constexprs["num_stages"]
        compiled, cfg = _offline(merger_fc1_compile, 1280, max_shared_mem=limit, device=device)
        return compiled, cfg["num_stages"]

    # two GPUs in one machine, at device indexes no other test launches on: Triton checks a kernel's
    # resources once per device, when it first loads it there
    for device, limit in enumerate((HOPPER_SHARED_MEM, RTX_4090_SHARED_MEM), start=1):
        compiled, asked = launch(limit, device)
        print(f"{op} under {limit} B: {compiled.metadata.num_stages} of {asked} stages, {compiled.metadata.shared} B")
        assert compiled.metadata.shared <= limit
        if limit == HOPPER_SHARED_MEM:
            assert compiled.metadata.num_stages == asked and not variant.fitted_stages
        else:
            assert 1 <= compiled.metadata.num_stages < asked
            memo = dict(variant.fitted_stages)
            assert list(memo.values()) == [compiled.metadata.num_stages]
            again, _ = launch(limit, device)  # from the memo: the same kernel, nothing refused again
            assert again is compiled and variant.fitted_stages == memo
