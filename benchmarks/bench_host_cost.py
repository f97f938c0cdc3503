"""Host (CPU) cost of W4A16 launches, measurable on any machine: no GPU is used.

Eager decode on a fast GPU is bound by the host: each of a layer's 7 quantized linears costs
QuantLinear's Python plus a Triton launch. Two parts are timed here, at M = 1 (and 16, 64):

* **Triton's launch path, per launch**, on sm_90 kernels compiled for real, with a stub driver whose
  launcher does nothing: Triton's JIT dispatch (argument binding, specialisation, cache key) against
  the direct launch that a planned W4A16 launch makes after its first call (``BoundLaunch``); at a
  prefill size, a launch planned at each call against the one shared by every layer of the shape;
* **qoqopt's own Python per decoder layer**, with the launch itself stubbed: 7 QuantLinear calls,
  and the fused projections (4 launches; q/k/v and gate/up taking their columns of a shared output).

The CUDA driver's own launch cost and the GPU time are in neither: bench_kernels.py's ``layer``
rows time the whole thing on a GPU. Results print and go to --json.

    python benchmarks/bench_host_cost.py [--json benchmarks/results/host_cost.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import PROFILES, _decoder_layer, fused_copy, layer_calls, layer_inputs  # noqa: E402
from offline_compile import NoToolchain, offline_w4a16, w4a16_operands  # noqa: E402
from qoqopt.fileio import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def median_us(fn, rounds: int = 30, inner: int = 200) -> float:
    with torch.inference_mode():
        for _ in range(inner):
            fn()
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples)


def dispatch_every_call(variant, grid, constexprs: dict):
    """The launch as it was before BoundLaunch: through Triton's dispatch at every call."""
    launch = variant[grid]
    return lambda *args: launch(*args, **constexprs)


def launch_path_us() -> dict[str, float]:
    """Per W4A16 launch (gate/up at 7B, M = 1 and 16): Triton's dispatch vs the bound direct launch,
    each behind the same planned launch (operands, split-K scratch, strides)."""
    from qoqopt.kernels import _triton, w4a16

    k, n, dtype, cuda = 3584, 18944, torch.bfloat16, torch.device("cuda", 0)  # a layer's device: indexed
    out = {}
    with offline_w4a16() as driver:
        for m in (1, 16):
            x, qweight, qzeros, scales, _, y = w4a16_operands(m, k, n, dtype)
            operands = (x, qweight, qzeros, scales, None, y)  # gate/up: no bias
            for label, bind in (("direct", _triton._Compiled.bind), ("Triton dispatch", dispatch_every_call)):
                saved, _triton._Compiled.bind = _triton._Compiled.bind, bind
                try:
                    launch = w4a16.prepare_w4a16(m, k, n, dtype, cuda, has_bias=False, group_size=128, zero_offset=1)
                finally:
                    _triton._Compiled.bind = saved
                launch(*operands)  # compiles (once per M) and binds
                out[f"M={m} {label}"] = median_us(lambda: launch(*operands))
                driver.launches.clear()
        # a layer on another GPU than the current one (a model split over GPUs): the launch switches the
        # current device and back; torch's own switch (a C call) is stubbed out here
        other = w4a16.prepare_w4a16(1, k, n, dtype, torch.device("cuda", 1), has_bias=False, group_size=128,
                                    zero_offset=1)
        x, qweight, qzeros, scales, _, y = w4a16_operands(1, k, n, dtype)
        operands = (x, qweight, qzeros, scales, None, y)
        other(*operands)
        out["M=1 direct, other GPU"] = median_us(lambda: other(*operands))
        driver.launches.clear()
        out |= prefill_path_us(driver, k, n, dtype, cuda)
    return out


def prefill_path_us(driver, k: int, n: int, dtype, cuda, m: int = 64) -> dict[str, float]:
    """Per prefill call (M = 64, the tiles: from 128 rows the dense plan runs a GEMM, which on CPU
    stand-ins would be real work): QuantLinear had planned, bound and dispatched its launch at every
    call for M > 16, where it now looks up the launch shared by every layer of the shape."""
    from qoqopt.kernels import w4a16

    x, qweight, qzeros, scales, _, y = w4a16_operands(m, k, n, dtype)
    operands = (x, qweight, qzeros, scales, None, y)
    plan = (m, k, n, dtype, cuda, False, 4, 128, 1)  # shared_launch's arguments: gate/up, no bias, GPTQ v1

    def planned_per_call():
        w4a16.prepare_w4a16(*plan[:5], has_bias=False, bits=4, group_size=128, zero_offset=1)(*operands)

    out = {f"M={m} planned per call": median_us(planned_per_call),
           f"M={m} shared launch": median_us(lambda: w4a16.shared_launch(*plan)(*operands))}
    driver.launches.clear()
    return out


def layer_python_us() -> dict[str, float]:
    """qoqopt's Python for one decoder layer's linears at M = 1, the launch stubbed."""
    from qoqopt.kernels import w4a16

    saved = w4a16.use_triton, w4a16.shared_launch
    w4a16.use_triton = lambda *args, **kwargs: True
    w4a16.shared_launch = lambda m, k, n, dtype, *_: lambda *args: torch.empty(m, n, dtype=dtype)
    try:
        pr = PROFILES["tiny"]
        unfused = _decoder_layer(pr, torch.float32, torch.device("cpu"))
        inputs = layer_inputs(pr, 1, torch.float32, torch.device("cpu"))
        return {label: median_us(layer_calls(holders, inputs))
                for label, holders in (("7 QuantLinear", unfused), ("fused, 4 launches", fused_copy(unfused)))}
    finally:
        w4a16.use_triton, w4a16.shared_launch = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "host_cost.json")
    args = ap.parse_args(argv)
    import triton

    result = {"benchmark": "host_cost", "host": {"machine": platform.machine(), "python": platform.python_version(),
                                                 "torch": torch.__version__, "triton": triton.__version__}}
    try:
        result["launch_us"] = launch_path_us()
    except NoToolchain as err:
        print(f"launch path: skipped, no offline CUDA toolchain in this triton ({err})")
    result["layer_python_us"] = layer_python_us()
    for section in ("launch_us", "layer_python_us"):
        for label, us in result.get(section, {}).items():
            print(f"{section:16s} {label:22s} {us:7.2f} us")
    launch = result.get("launch_us")
    if launch:  # per decoder layer at M = 1: qoqopt's Python + one launch path per launch
        py = result["layer_python_us"]
        estimate = {
            "7 launches via Triton dispatch": py["7 QuantLinear"] + 7 * launch["M=1 Triton dispatch"],
            "7 direct launches": py["7 QuantLinear"] + 7 * launch["M=1 direct"],
            "fused: 4 direct launches": py["fused, 4 launches"] + 4 * launch["M=1 direct"],
        }
        result["layer_host_us_estimate"] = estimate
        for label, us in estimate.items():
            print(f"{'layer host est.':16s} {label:32s} {us:7.1f} us")
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
