"""`make setup` builds llama.cpp (through llama-cpp-python) for the CPU it runs on. Where the C++
compiler's AMX header is GCC 12.2's, whose `_tile_loadconfig` declares its 64-byte operand as one
pointer, llama.cpp's AMX matmul died of a general protection fault at the first llama_decode on
an AMX Xeon: the build must then leave AMX out, and not come from pip's wheel cache."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# _tile_loadconfig as GCC's amxtileintrin.h defines it: GCC 12.2 (Debian 12) inline asm whose "m"
# operand is a pointer, and later GCC releases' builtin, which reads all 64 bytes.
POINTER_OPERAND = "(*((const void **)__config))"
GCC_12_2 = f'__asm__ volatile ("ldtilecfg\\t%X0" :: "m" {POINTER_OPERAND});'
BUILTIN = "__builtin_ia32_ldtilecfg (__config);"
AMX_OFF = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def _install_line(tmp_path: Path, cxx: Path | str) -> str:
    """The pip command that installs qoqopt's dependencies (llama-cpp-python among them), as
    `make setup` would run it for a fresh venv with C++ compiler ``cxx``."""
    res = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}", f"CXX={cxx}", "-W", "pyproject.toml"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    (install,) = [line for line in res.stdout.splitlines() if "-e '.[all]'" in line]
    return install


def _compiler(tmp_path: Path, header_body: str | None) -> Path:
    """A stand-in C++ compiler whose amxtileintrin.h holds `header_body` (None: it has none, as
    clang); it answers -print-file-name as gcc does: the path, or the bare name when absent."""
    header = tmp_path / "amxtileintrin.h"
    if header_body is not None:
        header.write_text(f"extern __inline void\n_tile_loadconfig (const void *__config)\n{{\n  {header_body}\n}}\n")
    cxx = tmp_path / "c++"
    cxx.write_text(f"#!/bin/sh\necho {header if header_body is not None else 'amxtileintrin.h'}\n")
    cxx.chmod(0o755)
    return cxx


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


@needs_make
def test_a_gcc_12_2_amx_header_builds_llama_cpp_without_amx(tmp_path):
    install = _install_line(tmp_path, _compiler(tmp_path, GCC_12_2))
    assert " CXXFLAGS='" in install and install.startswith("CFLAGS='") and install.count(f"{AMX_OFF}'") == 2
    assert "--no-cache-dir" in install  # a wheel cached from an earlier build may hold AMX


@needs_make
@pytest.mark.parametrize("header_body", [BUILTIN, None], ids=["builtin", "no-header"])
def test_other_compilers_build_llama_cpp_as_pip_does(tmp_path, header_body):
    install = _install_line(tmp_path, _compiler(tmp_path, header_body))
    assert "amx" not in install and "--no-cache-dir" not in install
    assert install.split() == [str(tmp_path / "venv/bin/python"), "-m", "pip", "install", "-q", "-e", "'.[all]'"]


@needs_make
def test_this_machines_compiler_is_judged_by_its_own_header(tmp_path):
    """With the real compiler: its amxtileintrin.h in GCC 12.2's form <=> AMX left out (skipped
    where the compiler has no such header, as clang and Apple's have none)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    found = subprocess.run([cxx, "-print-file-name=include/amxtileintrin.h"], capture_output=True, text=True) if cxx else None
    header = Path(found.stdout.strip()) if found else None
    if header is None or not header.is_file():
        pytest.skip("the C++ compiler has no amxtileintrin.h")
    text = header.read_text()
    assert POINTER_OPERAND in text or "__builtin_ia32_ldtilecfg" in text, f"{header}: an unknown form"
    install = _install_line(tmp_path, cxx)
    assert (AMX_OFF in install) == (POINTER_OPERAND in text), (header, install)


@pytest.mark.parametrize("xdg", [None, "", "relative/cache"])
def test_the_cache_follows_xdg_and_ignores_an_invalid_xdg_cache_home(xdg, tmp_path, monkeypatch):
    """XDG Base Directory spec: an unset or empty XDG_CACHE_HOME means ~/.cache, and a relative one is
    invalid and ignored. Empty, the cache was the relative folder `qoqopt`: run from the repository,
    the package source itself."""
    from qoqopt.cache import cache_root

    monkeypatch.delenv("QOQOPT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert cache_root() == tmp_path / ".cache" / "qoqopt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "qoqopt"


def test_qoqopt_cache_is_expanded_and_made_absolute(tmp_path, monkeypatch):
    """QOQOPT_CACHE="~/big/qoqopt" (quoted, so no shell expands it) was a folder named `~` under the
    working folder, and a relative one moved with each command's working folder."""
    from qoqopt.cache import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("QOQOPT_CACHE", "~/big/qoqopt")
    assert cache_root() == tmp_path / "big" / "qoqopt"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QOQOPT_CACHE", "rel")
    assert cache_root() == tmp_path / "rel"


def test_a_cache_folder_that_cannot_be_made_is_one_line_naming_qoqopt_cache(tmp_path, monkeypatch, capsys):
    """`qoqopt mini` builds its tokenizer through the cache: under a QOQOPT_CACHE that names a file
    it died in a NotADirectoryError traceback; a read-only home was an errno line with no way out."""
    from tests.conftest import refused

    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("QOQOPT_CACHE", str(tmp_path / "a-file" / "qoqopt"))
    err = refused(["mini", "--out", tmp_path / "m", "--preset", "tiny"], capsys)
    assert err == (f"error: cannot make qoqopt's cache folder {tmp_path / 'a-file' / 'qoqopt' / 'tokenizer'} (Not a "
                   "directory): set QOQOPT_CACHE to a folder you can write")
    assert not (tmp_path / "m").exists()
