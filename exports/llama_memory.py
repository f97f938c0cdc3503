"""llama.cpp's own account of the memory it allocates, read from its log.

llama.cpp allocates outside torch, so no allocator of ours sees it. It logs each buffer once, with the
backend's buffer name and size, as llama.cpp users read them at load:

    load_tensors:        CUDA0 model buffer size =  4168.09 MiB
    llama_kv_cache:      CUDA0 KV buffer size =   224.00 MiB
    llama_context:  CUDA_Host  output buffer size =     0.58 MiB
    sched_reserve:       CUDA0 compute buffer size =   304.00 MiB
    reserve_compute_meta:  CUDA0 compute buffer size =  46.89 MiB   (mtmd's clip, for its first image)

The mmproj's weights are logged as one total ("model size: 1276.44 MiB") on the backend clip said it
uses ("CLIP using CUDA0 backend"). The largest size logged per buffer, summed, is the peak only if
no buffer grows unlogged afterwards: clip's compute buffer does, for an image larger than its first
(bench's GGUF runner encodes the largest first). ggml-cuda's own pool of temporaries is never
logged, and so not counted.
"""

from __future__ import annotations

import re

_BUFFER = re.compile(r"^(\w+):\s+(\S+)\s+([A-Za-z ]+?)\s+buffer size =\s*([\d.]+) MiB")
_CLIP_BACKEND = re.compile(r"CLIP using (\S+) backend")
_CLIP_WEIGHTS = re.compile(r"^\w+: model size:\s+([\d.]+) MiB")


def on_host(buffer_name: str) -> bool:
    """ggml names host memory CPU, CPU_Mapped (mmap'd weights), CPU_REPACK, and a GPU backend's
    pinned host memory <BACKEND>_Host (CUDA_Host); device memory carries the device's name (CUDA0)."""
    return buffer_name.startswith("CPU") or buffer_name.endswith("_Host")


class BufferLog:
    """The largest size llama.cpp logged for each of its buffers since the last `clear`."""

    def __init__(self):
        self.mib: dict[tuple[str, str, str], float] = {}  # (logging function, buffer name, kind) -> MiB
        self._clip_backend = "CPU"

    def write(self, text: str) -> None:
        for line in text.splitlines():
            self._read(line.strip())

    def _read(self, line: str) -> None:
        if m := _CLIP_BACKEND.search(line):
            self._clip_backend = m.group(1)
        elif m := _CLIP_WEIGHTS.match(line):
            self._keep(("clip", self._clip_backend, "model"), float(m.group(1)))
        elif m := _BUFFER.match(line):
            self._keep((m.group(1), m.group(2), m.group(3)), float(m.group(4)))

    def _keep(self, key: tuple[str, str, str], mib: float) -> None:
        self.mib[key] = max(mib, self.mib.get(key, 0.0))

    def clear(self) -> None:
        self.mib = {}
        self._clip_backend = "CPU"

    def total_mib(self, device: bool) -> float | None:
        """MiB in device buffers (``device``) or host buffers; None when llama.cpp logged none there."""
        sizes = [mib for (_, name, _), mib in self.mib.items() if on_host(name) != device]
        return sum(sizes) if sizes else None
