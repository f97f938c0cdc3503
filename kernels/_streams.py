"""Run independent pieces of work on parallel CUDA streams ("lanes") and join them back.

A GEMM whose tiles do not divide evenly over the SMs ends on a partly filled wave. Work on another
stream that does not depend on it (another row chunk's GEMMs) can take the idle SMs; a CUDA graph
records the fork and join as parallel branches. Off CUDA every call runs in place, in order.

Each lane starts after everything queued on the caller's stream so far, and the join makes the
caller's stream wait for every lane used. Tensors a lane reads but the caller's stream allocated stay
referenced until the join: the caching allocator hands a freed block to the next allocation on the
stream that allocated it, which would otherwise overwrite it while the lane still reads it. (What a
lane allocates itself is reused only by later work on that lane, which the stream orders.) Lanes
are per thread: a stream shared between threads would record one thread's work into another's graph.
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def _lane_streams(device_index: int, count: int) -> list[torch.cuda.Stream]:
    pools = _local.__dict__.setdefault("pools", {})
    pool = pools.setdefault(device_index, [])
    while len(pool) < count:
        pool.append(torch.cuda.Stream(device=device_index))
    return pool[:count]


class Lanes:
    """``with Lanes(device) as lanes: lanes.run(i, fn, *reads)``: ``fn()`` on lane ``i``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._held: list[torch.Tensor] = []
        self._used: list[torch.cuda.Stream] = []
        if self.cuda:
            self.index = device.index if device.index is not None else torch.cuda.current_device()
            self.main = torch.cuda.current_stream(self.index)

    def __enter__(self) -> "Lanes":
        return self

    def run(self, lane: int, fn, *reads: torch.Tensor):
        """``fn()`` on lane ``lane``, after all work queued so far on the caller's stream; ``reads`` (tensors
        the caller's stream allocated) kept until the join."""
        stream = _lane_streams(self.index, lane + 1)[lane] if self.cuda else None
        if stream is None or stream == self.main:  # off CUDA; or the pool handed out the caller's own stream
            return fn()
        stream.wait_stream(self.main)
        self._held.extend(reads)
        if stream not in self._used:
            self._used.append(stream)
        with torch.cuda.stream(stream):
            return fn()

    def __exit__(self, *exc) -> None:
        for stream in self._used:
            self.main.wait_stream(stream)
        self._held.clear()
