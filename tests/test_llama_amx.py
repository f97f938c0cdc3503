"""llama.cpp's AMX kernels, compiled by GCC 12.2, die at the first multi-row product (the tile config's
stores are optimised away); qoqopt then loads GGUFs without llama.cpp's extra buffer types. What
can be run anywhere is run here: the load without them against llama.cpp's default load, and the
probe's child process on a real GGUF; the crash itself needs an AMX CPU and such a build (checked
by hand on a 2-core Xeon VM, session 44)."""

from __future__ import annotations

import json
import signal
import sys

import numpy as np
import pytest

from qoqopt.exports import llama_amx
from qoqopt.exports.gguf_runtime import BUFFERS, LlamaVL

pytestmark = pytest.mark.slow

IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645]  # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>"


@pytest.fixture(scope="module")
def q4_0(tiny_dir, tmp_path_factory):
    """A Q4_0 text GGUF of the tiny mini: a type llama.cpp repacks on x86 CPUs with AVX2 (and AMX)."""
    from qoqopt.exports.gguf_export import GGUFOptions, export_gguf

    out = tmp_path_factory.mktemp("amx") / "tiny-gguf"
    res = export_gguf(str(tiny_dir), out, GGUFOptions(quants=["Q4_0"], imatrix="none", mmproj_type="f16", name="tiny",
                                                       progress=False), log=lambda _: None)  # fmt: skip
    return res.file("text", "Q4_0")


def _logits_and_buffers(path, extra_buffers: bool):
    with LlamaVL(path, n_ctx=64, extra_buffers=extra_buffers) as vl:
        return vl.logits(IDS), {name for _, name, _ in BUFFERS.mib}


def test_without_extra_buffers_llama_cpp_gives_its_default_logits(q4_0):
    """The fallback load keeps llama.cpp's weights in plain CPU buffers (no repack, no AMX) and
    computes what its default load computes, up to the repacked kernels' summation order."""
    import llama_cpp

    default, default_buffers = _logits_and_buffers(q4_0, extra_buffers=True)
    plain, plain_buffers = _logits_and_buffers(q4_0, extra_buffers=False)
    assert not plain_buffers & {"CPU_REPACK", "AMX"}, plain_buffers
    if b"REPACK = 1" in llama_cpp.llama_print_system_info() and b"AVX2 = 1" in llama_cpp.llama_print_system_info():
        assert default_buffers & {"CPU_REPACK", "AMX"}, default_buffers  # else the switch changed nothing here
    elif not default_buffers & {"CPU_REPACK", "AMX"}:  # both loads were the same plain load: nothing to compare
        pytest.skip("this llama.cpp repacks no weights here, so its default load is the plain one")
    scale = np.abs(default).max()
    assert np.abs(plain - default).max() <= 1e-3 * scale
    assert (plain.argmax(-1) == default.argmax(-1)).all()


def test_the_probe_child_decodes_a_real_gguf_and_says_whether_amx_held_weights(q4_0):
    expected = "amx" if llama_amx.amx_in_build() else "no-amx"
    assert llama_amx._probe(q4_0, extra_buffers=True) == expected
    assert llama_amx._probe(q4_0, extra_buffers=False) == "no-amx"
    assert llama_amx._probe(q4_0.parent / "missing.gguf", extra_buffers=True) == "failed"


@pytest.mark.parametrize("signum", [signal.SIGSEGV, signal.SIGILL])
def test_a_probe_child_killed_by_a_crash_signal_reads_crashed(monkeypatch, signum, tmp_path):
    """As the GCC 12.2 build dies (a general protection fault is delivered as SIGSEGV)."""
    monkeypatch.setattr(llama_amx, "python_module",
                        lambda *a: [sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(signum)})"])  # fmt: skip
    assert llama_amx._probe(tmp_path / "m.gguf", extra_buffers=True) == "crashed"
    monkeypatch.setattr(llama_amx, "python_module", lambda *a: [sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
    assert llama_amx._probe(tmp_path / "m.gguf", extra_buffers=True) == "failed"  # killed (OOM), not a crash


@pytest.mark.parametrize(("with_extra", "without", "verdict"), [
    ("crashed", "no-amx", True),  # only the extra buffers make it die: AMX's kernels are broken here
    ("amx", None, False),  # AMX held weights and the tokens decoded
    ("no-amx", None, None),  # this model put nothing in AMX buffers: it says nothing of the kernels
    ("crashed", "crashed", None),  # it dies either way: not AMX's doing
    ("failed", None, None),
])  # fmt: skip
def test_a_verdict_needs_a_crash_with_the_extra_buffers_and_none_without(monkeypatch, with_extra, without, verdict):
    answers = {True: with_extra, False: without}
    monkeypatch.setattr(llama_amx, "_probe", lambda path, extra_buffers: answers[extra_buffers])
    assert llama_amx._probe_verdict("m.gguf") is verdict


def test_a_cached_crash_verdict_loads_without_extra_buffers_and_says_so_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("QOQOPT_CACHE", str(tmp_path))
    monkeypatch.setattr(llama_amx, "amx_in_build", lambda: True)
    monkeypatch.setattr(llama_amx, "_SAID", [])
    calls = []
    monkeypatch.setattr(llama_amx, "_probe", lambda path, extra_buffers: calls.append(extra_buffers) or
                        ("crashed" if extra_buffers else "no-amx"))  # fmt: skip
    assert llama_amx.extra_buffers_run("m.gguf") is False
    assert llama_amx.extra_buffers_run("other.gguf") is False  # from the cache: one probe per build
    assert calls == [True, False]
    (said,) = capsys.readouterr().err.splitlines()
    assert said.startswith("warning: llama.cpp's AMX kernels crash on this CPU") and llama_amx.rebuild_command() in said
    (verdict,) = (tmp_path / "llama_amx").iterdir()
    verdict.write_text("{")  # damaged: read as no verdict, removed, asked again next time
    assert llama_amx.extra_buffers_run("m.gguf") is True and not verdict.exists()
    verdict.write_text(json.dumps({"amx": "runs"}))
    assert llama_amx.extra_buffers_run("m.gguf") is True


def test_a_build_without_amx_is_never_probed(monkeypatch):
    monkeypatch.setattr(llama_amx, "amx_in_build", lambda: False)
    monkeypatch.setattr(llama_amx, "_probe", lambda *a, **k: pytest.fail("probed a build without AMX"))
    assert llama_amx.extra_buffers_run("m.gguf") is True
