"""Quant types, and K-quant / IQ quantization through llama.cpp's own quantizer.

F32, F16, BF16 and Q8_0 are written directly from the checkpoint (gguf_write). Every other type
goes through `llama_cpp.llama_model_quantize` from one F16/BF16 intermediate GGUF, with the
importance matrix handed over in memory (`llama_model_quantize_params.imatrix`), exactly what
`llama-quantize --imatrix` does after loading its file. The call runs in a child process
(quantize_worker), so that Ctrl-C stops it.

llama.cpp decides the per-tensor mix (Q4_K_M keeps some tensors at Q6_K, ...) and falls back
per tensor when a row is not a multiple of the type's block (256 for K-quants: Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL). We capture its log during the call and report
those fallbacks in one line, a tensor's fallback in every block once.
"""

from __future__ import annotations

import ctypes
import json
import errno
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qoqopt.children import how_it_ended, python_module
from qoqopt.errors import QoqoptError
from qoqopt.fileio import atomic_path, free_bytes, write_error

from .gguf_map import by_block
from .gguf_write import DIRECT_TYPES

# types that need an importance matrix: llama.cpp's library refuses a tensor of IQ1_S/M, IQ2_XXS/XS/S
# or IQ3_XXS without one, so IQ2_M (IQ2_S tensors) and IQ3_XS/XXS too, which llama-quantize's own
# up-front list leaves to fail mid-file (measured: each offered type tried without an imatrix)
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"}
# MoE-only, ternary-model-only and placeholder members of the enum are not offered
_NOT_OFFERED = {"GUESSED", "MOSTLY_MXFP4_MOE", "MOSTLY_NVFP4", "MOSTLY_TQ1_0", "MOSTLY_TQ2_0", "MOSTLY_Q1_0"}


def llama_ftypes() -> dict[str, int]:
    """Quant name -> llama_ftype, from gguf-py's LlamaFileType (the enum llama.h defines)."""
    from gguf import LlamaFileType

    out = {}
    for member in LlamaFileType:
        if member.name in _NOT_OFFERED:
            continue
        name = member.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        out[name] = int(member.value)
    return out


def parse_quants(spec: str) -> list[str]:
    """'q4_k_m,Q8_0' -> ['Q4_K_M', 'Q8_0']; unknown names are a one-line error."""
    known = llama_ftypes()
    out: list[str] = []
    for raw in spec.split(","):
        name = raw.strip().upper()
        if not name:
            continue
        if name not in known:
            offered = ", ".join(sorted(known))
            raise QoqoptError(f"unknown quant type {raw.strip()!r}; choose from {offered}")
        if name not in out:
            out.append(name)
    if not out:
        raise QoqoptError("no quant type given (e.g. --quant Q4_K_M,Q8_0)")
    return out


def is_direct(quant: str) -> bool:
    return quant in DIRECT_TYPES


# ---------------------------------------------------------------------------- llama.cpp


@dataclass
class QuantReport:
    quant: str
    fallbacks: list[str] = field(default_factory=list)  # "blk.0.ffn_down.weight Q4_K -> Q5_0"

    def summary(self) -> list[str]:
        lines = []
        if self.fallbacks:
            lines.append(
                f"{self.quant}: {len(self.fallbacks)} tensor(s) have rows not divisible by the type's block "
                f"(256 for K-quants); llama.cpp fell back per tensor: {'; '.join(by_block(self.fallbacks))}"
            )
        return lines


_FALLBACK = re.compile(r"warning:\s+(\S+)\s+- ncols\s+\d+ not divisible by\s+\d+ \(required for type\s+(\S+)\).*?falling back to\s+(\S+)")


class _LogCapture:
    """Route llama.cpp's log into a list while a call runs; restore llama-cpp-python's logger after."""

    def __init__(self):
        import llama_cpp

        self.lines: list[str] = []
        self._llama = llama_cpp

        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            self.lines.append(text.decode("utf-8", "replace"))

        self._callback = callback

    def __enter__(self):
        self._llama.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        from llama_cpp import _logger

        self._llama.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))

    @property
    def text(self) -> str:
        return "".join(self.lines)


def llama_quantize(
    src: Path, dst: Path, quant: str, imatrix: dict[str, np.ndarray] | None, threads: int = 0,
    provenance: dict | None = None,
) -> QuantReport:
    """Quantize GGUF `src` to `dst` with llama.cpp. `imatrix`: GGUF tensor name -> per-column mean x^2;
    `provenance`: the imatrix's file name, datasets, entries and chunks, which the output records as
    llama-quantize records them (:func:`imatrix_kv`).

    It runs in a child process (exports/quantize_worker.py) so that Ctrl-C or SIGTERM stops it at
    once: in this process it is one C call that Python cannot interrupt, and a 7B quantize went on
    for minutes after a Ctrl-C."""
    if quant not in llama_ftypes():
        raise QoqoptError(f"unknown quant type {quant!r}")
    if quant in NEEDS_IMATRIX and not imatrix:
        raise QoqoptError(f"{quant} needs an importance matrix; drop --imatrix none")
    for name, values in (imatrix or {}).items():
        if not np.isfinite(values).all():
            raise QoqoptError(f"imatrix entry {name} has non-finite values")
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as work:
        argv = python_module("qoqopt.exports.quantize_worker", str(src), str(dst), quant, str(threads))
        if imatrix:
            argv += [_save_means(imatrix, Path(work) / "imatrix.safetensors"), json.dumps(provenance or {})]
        reply = _run_worker(argv, dst, quant)
    return QuantReport(quant, reply["fallbacks"])


def _save_means(imatrix: dict[str, np.ndarray], path: Path) -> str:
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:  # a full disk is one line, not safetensors' own traceback
        save_file({name: np.ascontiguousarray(v, dtype=np.float32) for name, v in imatrix.items()}, str(tmp))
    return str(path)


def _run_worker(argv: list[str], dst: Path, quant: str) -> dict:
    """The worker's JSON reply; on any exit of ours (Ctrl-C included) it is killed and `dst` removed."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        dst.unlink(missing_ok=True)
        raise
    lines = out.strip().splitlines()
    reply = json.loads(lines[-1]) if proc.returncode in (0, 1) and lines and lines[-1].startswith("{") else None
    if reply is None:
        dst.unlink(missing_ok=True)
        raise QoqoptError(f"llama.cpp's quantize to {quant} died ({how_it_ended(proc.returncode)})")
    if "error" in reply:
        dst.unlink(missing_ok=True)
        raise QoqoptError(reply["error"])
    return reply


# llama.cpp writes through a std::ofstream with exceptions on, whose message names no cause
# (libstdc++: "basic_ios::clear: iostream error"; macOS's libc++: "ios_base::clear: unspecified
# iostream_category error"): with this little left where it wrote, the cause was a full disk
_FULL = 64 << 20


def _disk_full(lines: list[str], folder: Path) -> bool:
    if any("No space left" in ln for ln in lines):
        return True
    free = free_bytes(folder)
    return any("iostream" in ln for ln in lines) and free is not None and free < _FULL


def quantize_here(
    src: Path, dst: Path, quant: str, imatrix: dict[str, np.ndarray] | None, threads: int = 0,
    provenance: dict | None = None,
) -> list[str]:
    """The quantize itself, in this process (the worker's job): the fallbacks llama.cpp logged."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftypes()[quant]
    params.nthread = threads
    keep = []
    if imatrix and provenance:
        overrides = _kv_overrides(llama_cpp, imatrix_kv(provenance))
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        keep.append(overrides)
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append((name.encode(), arr))
            entries[i].name = keep[-1][0]
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    with _LogCapture() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        errors = [ln.strip() for ln in log.lines if "error" in ln.lower() or "failed" in ln.lower()]
        if _disk_full(log.lines, dst.parent):
            raise write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), dst)
        why = errors[-1] if errors else f"return code {rc}"
        raise QoqoptError(f"llama.cpp could not quantize to {quant}: {why}")
    flat = log.text.replace("\n", " ")
    return [f"{m.group(1)} {m.group(2).upper()} -> {m.group(3).upper()}" for m in _FALLBACK.finditer(flat)]


def imatrix_kv(provenance: dict) -> dict[str, str | int]:
    """The keys llama-quantize writes into a build made with an importance matrix (its
    quantize.cpp): without them a K-quant made with the clinical imatrix could not be told, from
    its own metadata, from one made with none. Strings are cut at 127 bytes, as llama.cpp's are."""
    kv: dict[str, str | int] = {"quantize.imatrix.file": c_string(provenance["file"])}
    if provenance.get("datasets"):
        kv["quantize.imatrix.dataset"] = c_string(provenance["datasets"][0])
    kv["quantize.imatrix.entries_count"] = int(provenance["entries"])
    if provenance.get("chunks"):
        kv["quantize.imatrix.chunks_count"] = int(provenance["chunks"])
    return kv


def c_string(text: str) -> str:
    return text.encode()[:127].decode(errors="ignore")  # not half a UTF-8 character


def _kv_overrides(llama_cpp, kv: dict[str, str | int]):
    """``kv`` as llama.cpp's override array, ended by an entry with an empty key."""
    overrides = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
    for entry, (key, value) in zip(overrides, kv.items()):
        entry.key = key.encode()
        if isinstance(value, str):
            entry.tag, entry.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()
        else:
            entry.tag, entry.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
    return overrides


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> GGML type name, read from a file's header (memory-mapped, cheap)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}
