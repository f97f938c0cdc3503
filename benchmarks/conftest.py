"""pytest-benchmark suites (not tests): `pytest benchmarks/ --benchmark-only`.

Each group times qoqopt's op next to its peer in the same run, so the ratio survives a noisy machine.
On a CUDA machine the kernels run in Triton at bf16; without one, the torch reference paths run at
fp32 and the numbers describe only the CPU fallback.
"""

import pytest
import torch

from tests.conftest import tiny_dir  # noqa: F401  (the mini QoQ-Med checkpoint, built once)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def dtype(device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def timed(benchmark, fn, device):
    """Benchmark `fn` with a device sync inside the timed call, so GPU work is counted."""

    def call():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return benchmark(call)
