"""The child process that runs one llama.cpp quantize; gguf_quant.llama_quantize starts it.

Why a process: llama_model_quantize is one C call that runs for minutes on a 7B model, and Python
cannot interrupt it; a child process can be killed. Ctrl-C and SIGTERM get their default action
here, so a terminal's Ctrl-C, which reaches the whole process group, ends this process at once too.

    python -m qoqopt.exports.quantize_worker SRC DST QUANT THREADS [IMATRIX.safetensors]

The last line on stdout is the reply: {"fallbacks": [...]} (exit 0) or {"error": "..."} (exit 1).
"""

from __future__ import annotations

import ctypes
import json
import signal
import sys
from pathlib import Path

from qoqopt.errors import QoqoptError

from .gguf_quant import quantize_here

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    src, dst, quant, threads, *rest = argv
    imatrix = _load_means(rest[0]) if rest else None
    try:
        fallbacks = quantize_here(Path(src), Path(dst), quant, imatrix, int(threads))
    except QoqoptError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    print(json.dumps({"fallbacks": fallbacks}), flush=True)
    return 0


def _die_with_parent() -> None:
    """A parent killed outright (SIGKILL) cannot kill us: ask Linux to, so no orphan quantize runs on."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _load_means(path: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
