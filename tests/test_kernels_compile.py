"""Compile every kernel for Hopper (sm_90) without a GPU, with the GPU launch configs.

The interpreter checks what the kernels compute, not whether Triton's compiler accepts them (static
ifs, reshapes, helper calls, dot shapes) or whether they fit in registers and shared memory. Triton's
NVIDIA backend compiles to a cubin offline, so that part is checked here on any machine. Register
spills are reported, not asserted: they depend on the Triton version.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("a GPU is present: tests/test_kernels.py compiles and runs these kernels for real",
                allow_module_level=True)

CUDA = torch.device("cuda")
BF16 = "*bf16"


def _compile(kernel, signature: dict, constexprs: dict, options: dict, arch: int = 90):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel[CUDA]
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    # Real launches specialise 16-byte-aligned pointers and ints divisible by 16; without that hint
    # loads are scalar and nothing is pipelined, so say so here too (true of every launch at 7B dims).
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, ty in signature.items() if ty.startswith("*") or name.startswith("stride")}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    try:
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except (ImportError, RuntimeError) as err:
        if "ptxas" in str(err) or "backend" in str(err).lower():
            pytest.skip(f"no offline CUDA toolchain in this triton: {err}")
        raise


def _resource_usage(compiled) -> str:
    """Registers and spill stack of the cubin, via the cuobjdump bundled with triton (if any)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists() or "cubin" not in compiled.asm:
        return "resource usage unavailable"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"qoqopt_{compiled.metadata.name}.cubin"
    path.write_bytes(compiled.asm["cubin"])
    out = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return f"{match.group(1)} registers, {match.group(2)} B stack" if match else "resource usage unavailable"


def test_merger_compiles():
    from qoqopt.kernels.merger import _fc1_config, _merger_fc1_kernel

    signature = {"x_ptr": BF16, "ln_w_ptr": BF16, "w1_ptr": BF16, "b1_ptr": BF16, "out_ptr": BF16,
                 "M": "i32", "N": "i32", "eps": "fp32"}
    for m in (64, 1280):  # one small image; the 5120-patch maximum
        cfg = _fc1_config(m, 1280, CUDA)
        options = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        constexprs = dict(C=1280, MERGE=4, SLOTS=4, DOT_PRECISION="tf32", **cfg)
        compiled = _compile(_merger_fc1_kernel, signature, constexprs, options)
        print(f"merger M={m} {cfg}: {_resource_usage(compiled)}")


@pytest.mark.parametrize("dtype", ["*bf16", "*fp32"])
def test_vision_attention_compiles(dtype):
    from qoqopt.kernels.vision_attention import _attention_config, _vision_attention_kernel, head_split

    signature = {"qkv_ptr": dtype, "cos_ptr": "*fp32", "sin_ptr": "*fp32", "plan_ptr": "*i32", "out_ptr": dtype,
                 "stride_qkv": "i32", "stride_rope": "i32", "stride_out": "i32", "qk_scale": "fp32"}
    main, rest = head_split(80)
    for avg_len in (64, 5120):  # window layers; full attention on one large image
        cfg = _attention_config(CUDA, avg_len)
        options = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        constexprs = dict(H=16, HEAD_DIM=80, MAIN=main, REST=rest, SHARED_HALVES=True,
                          DOT_PRECISION="tf32" if dtype == BF16 else "ieee", **cfg)
        compiled = _compile(_vision_attention_kernel, signature, constexprs, options)
        print(f"attention {dtype} avg_len={avg_len} {cfg}: {_resource_usage(compiled)}")


@pytest.mark.parametrize("layout", ["gptq", "awq"])
def test_w4a16_compiles(layout):
    from qoqopt.kernels.w4a16 import _w4a16_kernel

    for m, k, n in ((1, 18944, 3584), (2048, 3584, 18944)):  # decode (split-K), prefill
        cfg = _config_no_gpu(m, n, k)
        split = cfg.pop("SPLIT_K")
        options = {key: cfg.pop(key) for key in ("num_warps", "num_stages")}
        signature = {"x_ptr": BF16, "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16",
                     "bias_ptr": "*fp16", "out_ptr": BF16 if split == 1 else "*fp32", "M": "i32", "N": "i32",
                     "K": "i32", "stride_xm": "i32", "stride_qw": "i32", "stride_qz": "i32", "stride_s": "i32",
                     "k_per_split": "i32"}
        constexprs = dict(GROUP_SIZE=128, BITS=4, AWQ=layout == "awq", ZERO_OFFSET=int(layout == "gptq"),
                          HAS_BIAS=split == 1, SPLIT_K=split, DOT_PRECISION="tf32", **cfg)
        compiled = _compile(_w4a16_kernel, signature, constexprs, options)
        print(f"w4a16 {layout} M={m} {cfg} split={split}: {_resource_usage(compiled)}")


def _config_no_gpu(m, n, k):
    """The launcher's CUDA config with the SM count of an H100 (no device to ask here)."""
    from unittest import mock

    from qoqopt.kernels import w4a16

    with mock.patch.object(w4a16, "num_sms", lambda device: 132):
        return w4a16._config(m, n, k, 128, CUDA)
