"""Host (Python) cost of one decoder layer's 7 W4A16 linears at M = 1, with the kernel launch stubbed.

Eager decode on a fast GPU is bound by the host: this is the part of it that is qoqopt's own code
(QuantLinear's forward, the fused projections' slicing), measurable on any CPU. Triton's dispatch
and the GPU time are not in it: those are bench_kernels.py's ``layer`` rows, on a GPU.

    python benchmarks/bench_host_cost.py
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import DECODER_LINEARS, PROFILES, _decoder_layer  # noqa: E402


def stub_launches() -> None:
    """QuantLinear takes its Triton path, whose launch only allocates the output."""
    import qoqopt.kernels.w4a16 as w4a16

    def prepare(m, k, n, dtype, device, **_):
        return lambda *args, **kwargs: torch.empty(m, n, dtype=dtype, device=device)

    w4a16.use_triton = lambda *args, **kwargs: True
    w4a16.prepare_w4a16 = prepare


def per_layer_us(calls, rounds: int = 30, inner: int = 200) -> float:
    with torch.inference_mode():
        for _ in range(inner):
            [layer(x) for layer, x in calls]
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(inner):
                [layer(x) for layer, x in calls]
            samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples)


def main() -> None:
    from qoqopt.kernels.fused_projections import fuse_projections

    stub_launches()
    pr = PROFILES["tiny"]
    unfused = _decoder_layer(pr, torch.float32, torch.device("cpu"))
    fused = {parent: copy.deepcopy(unfused[parent]) for parent in DECODER_LINEARS}
    for holder in fused.values():
        fuse_projections(holder)
    hidden, _, inter = pr.decoder
    x, a, h = torch.randn(1, hidden), torch.randn(1, hidden), torch.randn(1, inter)
    inputs = dict(q_proj=x, k_proj=x, v_proj=x, o_proj=a, gate_proj=x, up_proj=x, down_proj=h)
    for label, holders in (("QuantLinear x7", unfused), ("fused, 4 launches", fused)):
        calls = [(holders[parent].get_submodule(name), inputs[name])
                 for parent in DECODER_LINEARS for name in DECODER_LINEARS[parent]]
        print(f"{label:18s} {per_layer_us(calls):6.1f} us of Python per decoder layer (median, launches stubbed)")


if __name__ == "__main__":
    main()
