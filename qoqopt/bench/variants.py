"""`--variants` specs, and where each build's files come from (an export directory or a fresh build)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..children import python_module
from ..errors import QoqoptError
from .given_gguf import given_files, is_given

HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BNB_TYPES = ("nf4", "fp4", "int8")
QUANT_BITS = {"gptq": ("4", "8"), "awq": ("4",)}
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][\w.:+-]*$")  # what a result's variant name may be (report checks it)
SPEC_HELP = ("bf16|fp16|fp32, gguf:<TYPE> (e.g. gguf:Q4_K_M), gguf:<FILE>.gguf (another tool's, mmproj beside it), "
             "gptq:4|8, awq:4, bnb:nf4|fp4|int8")


@dataclass(frozen=True)
class Variant:
    name: str  # as the user wrote it, e.g. "gguf:Q4_K_M"; the row label everywhere
    format: str  # hf | gguf | gptq | awq | bnb
    option: str  # the dtype, quant type, bit width or bitsandbytes type ("" for a given GGUF)
    given: str = ""  # a GGUF named by its file(s), TEXT.gguf[+MMPROJ.gguf]: given_gguf.py


def parse_variants(text: str) -> list[Variant]:
    out: list[Variant] = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        out.append(_parse_one(raw))
    if not out:
        raise QoqoptError(f"--variants is empty; give a comma-separated list of {SPEC_HELP}")
    names = [v.name for v in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise QoqoptError(f"--variants lists {', '.join(dupes)} more than once")
    return out


def _parse_one(raw: str) -> Variant:
    if raw in HF_DTYPES:
        return Variant(raw, "hf", raw)
    fmt, _, opt = raw.partition(":")
    if fmt == "gguf" and is_given(opt):
        name = f"gguf:{given_files(opt)['text'].name}"  # the files checked now, before any long work
        if not VARIANT_NAME.match(name):
            raise QoqoptError(f"{raw}: rename the file to letters, digits and . _ - + only: {name} names the variant "
                              "in results and reports")  # fmt: skip
        return Variant(name, "gguf", "", given=opt)
    if fmt == "gguf" and opt:
        from ..exports.gguf_quant import parse_quants

        quant = parse_quants(opt)[0]  # one-line error naming the offered types
        return Variant(f"gguf:{quant}", "gguf", quant)
    if fmt in QUANT_BITS and opt in QUANT_BITS[fmt]:
        return Variant(raw, fmt, opt)
    if fmt == "bnb" and opt in BNB_TYPES:
        return Variant(raw, "bnb", opt)
    raise QoqoptError(f"unknown variant {raw!r}; use {SPEC_HELP}")


# --------------------------------------------------------------------------- export directories


def find_in(folder: Path, v: Variant) -> dict[str, Path] | None:
    """The variant's files inside one `qoqopt export` directory, or None if it is not there."""
    from ..manifest import gguf_entries, gguf_text_files, read_manifest

    try:
        m = read_manifest(folder)
    except QoqoptError:
        return None
    if m.get("format") != v.format:
        return None
    if v.format == "gguf":
        text, mmproj = gguf_text_files(m, v.option), gguf_entries(m, "mmproj")
        if not text:
            return None
        parts = {f"text part {no}": folder / p for no, p in enumerate(text[1:], 2)}  # llama.cpp finds them by name
        return {"text": folder / text[0], **parts, **({"mmproj": folder / mmproj[0]} if mmproj else {})}
    if str(m.get("quantization", {}).get("bits")) == v.option:
        return {"dir": Path(folder)}
    return None


def locate(v: Variant, search: list[Path]) -> dict[str, Path] | None:
    for folder in search:
        found = find_in(folder, v)
        if found:
            return found
    return None


# --------------------------------------------------------------------------- building


def build_commands(model: str, missing: list[Variant], builds: Path, calib_items: int, revision: str | None = None) -> list[tuple[list[Variant], Path, list[str]]]:
    """`qoqopt export` invocations that produce the missing variants: one per format (all GGUF
    types share one export: one F16 intermediate, one mmproj, one imatrix), one per bit width.
    --force: OUT/builds is the bench's own cache, and a folder there without the build is stale."""
    jobs = []
    gguf = [v for v in missing if v.format == "gguf"]
    if gguf:
        out = builds / ("gguf-" + "-".join(v.option for v in gguf))
        args = ["--format", "gguf", "--quant", ",".join(v.option for v in gguf), "--samples", str(calib_items)]
        jobs.append((gguf, out, args))
    for v in missing:
        if v.format in QUANT_BITS:
            out = builds / f"{v.format}-{v.option}bit"
            jobs.append(([v], out, ["--format", v.format, "--bits", v.option, "--samples", str(calib_items)]))
    rev = ["--revision", revision] if revision else []
    return [(vs, out, python_module("qoqopt", "export", model, "--out", str(out), *args, *rev, "--force"))
            for vs, out, args in jobs]  # fmt: skip


def run_build(cmd: list[str]) -> str | None:
    """Run one export; None on success, else its one-line error."""
    from ..children import run_child

    res = run_child(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if res.returncode == 0:
        return None
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    return f"export failed: {lines[-1] if lines else f'exit {res.returncode}'}"
