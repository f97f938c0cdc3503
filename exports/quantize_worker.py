"""The child process that runs one llama.cpp quantize; gguf_quant.llama_quantize starts it.

Why a process: llama_model_quantize is one C call that runs for minutes on a 7B model, and Python
cannot interrupt it; a child process can be killed. Ctrl-C and SIGTERM get their default action
here (unless they came in ignored, as in a shell script's background job), so a terminal's Ctrl-C,
which reaches the whole process group, ends this process at once too.

    qoqopt.children.python_module("qoqopt.exports.quantize_worker", SRC, DST, QUANT, THREADS [, IMATRIX, PROVENANCE])

The last line on stdout is the reply: {"fallbacks": [...]} (exit 0) or {"error": "..."} (exit 1).
IMATRIX is a safetensors file of per-column mean x^2, by GGUF tensor name; PROVENANCE the JSON of
the imatrix's file name, datasets, entries and chunks (gguf_quant.imatrix_kv).
"""

from __future__ import annotations

import json
import signal
import sys
import traceback
from pathlib import Path

from qoqopt.errors import QoqoptError


def main(argv: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
    src, dst, quant, threads, *rest = argv
    try:
        from .gguf_quant import quantize_here

        imatrix = _load_means(rest[0]) if rest else None
        provenance = json.loads(rest[1]) if len(rest) > 1 else None
        fallbacks = quantize_here(Path(src), Path(dst), quant, imatrix, int(threads), provenance)
    except QoqoptError as exc:
        return _reply({"error": str(exc)}, 1)
    except Exception as exc:  # a bug, or llama-cpp-python missing: in full on stderr, named in the reply
        traceback.print_exc()
        return _reply({"error": f"the quantize worker failed: {type(exc).__name__}: {exc}"}, 1)
    return _reply({"fallbacks": fallbacks}, 0)


def _reply(reply: dict, status: int) -> int:
    print(json.dumps(reply), flush=True)
    return status


def _load_means(path: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
