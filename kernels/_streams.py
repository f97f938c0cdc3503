"""Fork calls onto a second CUDA stream and join them back, so one GEMM's last wave can share the GPU.

A GEMM whose tiles do not divide evenly over the SMs ends on a partly filled wave. Queued on another
stream, independent work (the next row chunk's GEMM) can take the idle SMs; a CUDA graph records the
fork and join as parallel branches. Off CUDA every call runs in place, in order.

The tensors a side-stream call reads stay referenced until the join: the caching allocator hands a
freed block to the next allocation on the main stream, which would otherwise overwrite it while the
side stream still reads it. The join makes every later main-stream call wait for the side stream.
"""

from __future__ import annotations

import torch

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class SideStream:
    """``with SideStream(device) as side: side.run(fn, *reads)``: each ``fn`` after all work queued so far."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._held: list[torch.Tensor] = []
        if self.cuda:
            self.main = torch.cuda.current_stream(device)
            self.side = _side_stream(device)

    def __enter__(self) -> "SideStream":
        return self

    def run(self, fn, *reads: torch.Tensor):
        """``fn()`` on the side stream, after everything queued on the main stream; ``reads`` kept until the join."""
        if not self.cuda:
            return fn()
        self.side.wait_stream(self.main)
        self._held.extend(reads)
        with torch.cuda.stream(self.side):
            return fn()

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.main.wait_stream(self.side)
        self._held.clear()
