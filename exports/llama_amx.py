"""Whether llama.cpp's AMX kernels can run here, for the llama-cpp-python installed here.

llama-cpp-python compiles llama.cpp for the CPU it is built on. On a CPU with AMX (Xeon Sapphire
Rapids and later) llama.cpp repacks weights into an AMX buffer and multiplies them on tiles, after
loading a 64-byte tile config with `_tile_loadconfig`. GCC headers that declare that intrinsic's
operand as one pointer (GCC 12.2's) let the optimiser drop the config's stores; the first
product of two or more rows then dies of a general protection fault, and the process with it.
`make setup` builds llama.cpp without AMX where its compiler has such a header; a
llama-cpp-python installed otherwise is checked here: a child process loads the model and
decodes a few tokens, once per llama.cpp build, and where only the AMX buffers make it die, models
load without llama.cpp's extra buffer types (AMX's and the CPU repack's).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from qoqopt.cache import cache_root
from qoqopt.children import python_module, run_child
from qoqopt.errors import QoqoptError
from qoqopt.fileio import atomic_write_text
from qoqopt.integrity import sha256_of

# llama.cpp's AMX path multiplies a single row with AVX-512 VNNI, without tiles: probe with more
PROBE_TOKENS = 4
CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGILL, signal.SIGBUS)
_SAID: list[bool] = []  # the warning is given once a process


def amx_in_build() -> bool:
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def rebuild_command() -> str:
    """The installed llama-cpp-python, compiled again without AMX."""
    import llama_cpp

    return ('CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="$CFLAGS" pip install --force-reinstall '
            f"--no-cache-dir --no-deps llama-cpp-python=={llama_cpp.__version__}")  # fmt: skip


def extra_buffers_run(model_path) -> bool:
    """False where this llama.cpp's AMX kernels crash (said once, with the rebuild); True where they
    run, where the build has none, or where the probe cannot tell (the real load then says why)."""
    if not amx_in_build():
        return True
    verdict = _verdict_file()
    runs = _cached_verdict(verdict)
    if runs is None:
        crashes = _probe_verdict(model_path)
        if crashes is None:
            return True
        runs = not crashes
        try:
            verdict.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(verdict, json.dumps({"amx": "runs" if runs else "crashes"}))
        except (OSError, QoqoptError):  # a full or read-only cache costs a probe next time, nothing more
            pass
    if not runs and not _SAID:
        _SAID.append(True)
        print("warning: llama.cpp's AMX kernels crash on this CPU: this llama-cpp-python was compiled by a GCC "
              "whose _tile_loadconfig drops the tile config (GCC 12.2's amxtileintrin.h); running without AMX "
              f"and repacked weights, which is slower. Rebuild it without AMX: {rebuild_command()}", file=sys.stderr)  # fmt: skip
    return runs


def _cached_verdict(verdict: Path) -> bool | None:
    """Whether AMX runs, as an earlier probe of this build found; None when none did. A damaged
    entry is removed and read as "runs" this once (llama.cpp's default load), asked again next time."""
    try:
        return {"runs": True, "crashes": False}[json.loads(verdict.read_text())["amx"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        verdict.unlink(missing_ok=True)
        return True


def _verdict_file() -> Path:
    """One verdict per llama.cpp build: the sha256 of its CPU library (hashed once, then taken
    from the integrity cache while the file is unchanged)."""
    import hashlib

    import llama_cpp

    libs = sorted({p.resolve() for p in (Path(llama_cpp.__file__).parent / "lib").glob("*ggml-cpu*")})
    build = hashlib.sha256("".join(sha256_of(p) for p in libs).encode()).hexdigest()[:32]
    return cache_root() / "llama_amx" / f"{build}.json"


def _probe_verdict(model_path) -> bool | None:
    """True: the probe dies with the extra buffers and runs without them. False: it ran with AMX
    buffers in use. None: no verdict (the model uses no AMX buffer, or fails either way)."""
    with_extra = _probe(model_path, extra_buffers=True)
    if with_extra == "amx":
        return False
    if with_extra != "crashed":
        return None
    return True if _probe(model_path, extra_buffers=False) in ("amx", "no-amx") else None


def _probe(model_path, extra_buffers: bool) -> str:
    """"amx" or "no-amx" (whether AMX buffers held weights) when a child decoded tokens; "crashed"
    when it died of a crash signal; "failed" otherwise."""
    cmd = python_module(__name__, str(model_path), *([] if extra_buffers else ["--no-extra-buffers"]))
    res = run_child(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if res.returncode < 0 and -res.returncode in CRASH_SIGNALS:
        return "crashed"
    answer = res.stdout.strip()
    return answer if res.returncode == 0 and answer in ("amx", "no-amx") else "failed"


def main(argv: list[str]) -> int:
    from .gguf_runtime import BUFFERS, LlamaVL

    with LlamaVL(argv[0], n_ctx=64, extra_buffers="--no-extra-buffers" not in argv[1:]) as vl:
        vl.logits(list(range(PROBE_TOKENS)))
        print("amx" if any(name == "AMX" for _, name, _ in BUFFERS.mib) else "no-amx")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
