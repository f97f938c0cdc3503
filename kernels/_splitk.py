"""Split-K in one launch: the programs of an output tile each sum part of K, and the one that finishes
last adds the parts up and runs the epilogue. Shared by the W4A16 GEMM and the merger's fc1.

Every split stores its fp32 partial tile to a scratch buffer and counts itself in on the tile's
counter; the split that arrives last adds all partials in split order (so the result does not depend
on which split that is), resets the counter for the next launch and returns ``last`` true. No
separate reduction kernel, and no atomics on the values themselves: the sum is deterministic.
"""

from __future__ import annotations

import torch

from ._triton import device_function, tl

_WORKSPACES: dict = {}  # (device type, index, stream) -> (fp32 partials, int32 tile counters at zero)


def splitk_workspace(device: torch.device, partial_numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K scratch shared by every launch on this device and stream: launches on one stream run
    in order, and each leaves its counters at zero again. Grown on demand (the caching allocator
    orders the old buffer's reuse after the launches already queued on it).

    While a CUDA graph is being captured the scratch is the capture's own, never shared: its zeroing
    is then a graph node that runs before each replay, not something eager calls could rely on.
    """
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    held = None if capturing else _WORKSPACES.get(key)
    if held is None or held[0].numel() < partial_numel or held[1].numel() < tiles:
        partial_numel = max(partial_numel, held[0].numel() if held else 0)
        tiles = max(tiles, held[1].numel() if held else 0)
        held = (torch.empty(partial_numel, device=device, dtype=torch.float32),
                torch.zeros(tiles, device=device, dtype=torch.int32))
        if not capturing:
            _WORKSPACES[key] = held
    return held


def splitk_operands(device: torch.device, split: int, tile_numel: int, tiles: int, unused: torch.Tensor):
    """``(partials, counters)`` for a launch over ``tiles`` output tiles of ``tile_numel`` elements in
    all, split ``split`` ways; unsplit, ``unused`` (any tensor of the launch) stands in for both."""
    if split == 1:
        return unused, unused
    return splitk_workspace(device, split * tile_numel, tiles)


@device_function
def splitk_total(acc, partials_ptr, counters_ptr, tile, pid_k, partial_stride, offs, mask,
                 SPLIT_K: tl.constexpr, REDUCE_UNROLL: tl.constexpr):
    """``(total, last)``: this split's ``acc`` stored at ``partials_ptr + pid_k * partial_stride +
    offs``; ``last`` is true in the split that arrived last, where ``total`` is the sum of all
    partials (elsewhere zeros). The caller runs its epilogue on ``total`` under ``if last``.

    Where the compiler keeps the sum a loop (128-row W4A16 tiles' 64 floats a thread per partial;
    74 splits), each partial's load waits out an L2 round trip before the next is issued (sm_90 SASS;
    3-18 splits of small tiles are unrolled). ``REDUCE_UNROLL`` > 1 issues that many partials' loads
    together and adds them in the same order: the same result.
    """
    tl.store(partials_ptr + pid_k * partial_stride + offs, acc, mask=mask)
    # Every thread's partials are issued before the one signalling thread releases them (the
    # barrier, then a release at GPU scope); the last arrival acquires them all.
    tl.debug_barrier()
    arrived = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    total = tl.zeros_like(acc)
    if last:
        for s0 in range(0, SPLIT_K, REDUCE_UNROLL):
            for u in tl.static_range(REDUCE_UNROLL):  # .cg: read from L2, where the other SMs' stores landed
                total += tl.load(partials_ptr + (s0 + u) * partial_stride + offs, mask=mask & (s0 + u < SPLIT_K),
                                 other=0.0, cache_modifier=".cg")
        tl.store(counters_ptr + tile, 0)
    return total, last
