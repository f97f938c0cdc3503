"""Benchmark: `qoqopt export --format gguf` vs llama.cpp's own convert_hf_to_gguf.py, same run, same checkpoint.

    .venv/bin/python benchmarks/bench_gguf_convert.py [--preset small] [--repeat 3] [--json PATH]

Both tools write the text GGUF and the mmproj at F16 from the `small` mini QoQ-Med checkpoint; the
converter needs two invocations (text, then --mmproj). Each tool runs as its own process; wall time
is measured around the process, peak RSS is the child's ru_maxrss (os.wait4). The converter runs
with the .venv python and the gguf-py of the same llama-cpp-python sdist on PYTHONPATH (it also
needs `sentencepiece` installed, one of its own requirements).

Reported as ratios qoqopt / converter (targets: <= 0.5 for both), plus what the converter does with
each key layout: legacy (`visual.*`, `model.layers.*`) and runtime (`model.visual.*`,
`model.language_model.*`): tensor counts and exit codes of its text and mmproj outputs.

Results are printed and saved as JSON (default benchmarks/results/gguf_convert.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import run_measured  # run by path: benchmarks/ is on sys.path
from qoqopt.bench.machine import cpu_model, ru_maxrss_mib
from qoqopt.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REF = Path("/work/ref/llama_cpp_python-0.3.36/vendor/llama.cpp")


def gguf_tensor_count(path: Path) -> int | None:
    """n_tensors from a GGUF header (magic, version, n_tensors, n_kv), without parsing the rest."""
    if not path.exists():
        return None
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        return None
    return struct.unpack("<Q", head[8:16])[0]


def build_checkpoints(preset: str, work: Path) -> dict[str, Path]:
    """Through the CLI, in child processes: this process must stay small, because on Linux a child's
    ru_maxrss starts from its parent's RSS at fork time."""
    out = {}
    for layout in ("legacy", "runtime"):
        d = work / f"mini-{preset}-{layout}"
        cmd = [sys.executable, "-m", "qoqopt", "mini", "--preset", preset, "--layout", layout, "--out", str(d)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        out[layout] = d
    return out


def ours(ckpt: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "qoqopt", "export", str(ckpt), "--format", "gguf", "--quant", "F16",
           "--imatrix", "none", "--mmproj-type", "f16", "--name", "m", "--out", str(out), "--force"]  # fmt: skip
    r = run_measured(cmd)
    r["text_tensors"] = gguf_tensor_count(out / "m.F16.gguf")
    r["mmproj_tensors"] = gguf_tensor_count(out / "mmproj-m-f16.gguf")
    return r


def converter(ckpt: Path, out: Path, ref: Path) -> dict:
    env = {"PYTHONPATH": str(ref / "gguf-py")}
    script = str(ref / "convert_hf_to_gguf.py")
    out.mkdir(parents=True, exist_ok=True)
    text = run_measured([sys.executable, script, str(ckpt), "--outtype", "f16", "--outfile", str(out / "text.gguf")], env)
    mm = run_measured([sys.executable, script, str(ckpt), "--outtype", "f16", "--mmproj", "--outfile", str(out / "mmproj.gguf")], env)
    return {
        "wall_s": text["wall_s"] + mm["wall_s"],
        "peak_rss_mib": max(text["peak_rss_mib"], mm["peak_rss_mib"]),
        "text": {**text, "tensors": gguf_tensor_count(out / "text.gguf")},
        "mmproj": {**mm, "tensors": gguf_tensor_count(out / "mmproj.gguf")},
    }


def hardware() -> dict:
    import gguf
    import llama_cpp

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "gguf": getattr(gguf, "__version__", "?"),
            "llama_cpp_python": llama_cpp.__version__, "platform": platform.platform()}  # fmt: skip


def peer_parser(doc: str, result: str, repeat_help: str) -> argparse.ArgumentParser:
    """The options of a benchmark against llama.cpp's converter (this one and bench_gguf_split.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--repeat", type=int, default=1, help=repeat_help)
    ap.add_argument("--ref", type=Path, default=DEFAULT_REF, help="vendor/llama.cpp of the llama-cpp-python sdist")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / result)
    return ap


def converter_missing(ref: Path) -> bool:
    if (ref / "convert_hf_to_gguf.py").exists():
        return False
    print(f"error: no convert_hf_to_gguf.py under {ref}", file=sys.stderr)
    return True


def main(argv=None) -> int:
    args = peer_parser(__doc__, "gguf_convert.json", "runs per tool on the legacy layout (median reported)").parse_args(argv)
    if converter_missing(args.ref):
        return 2

    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        work = Path(tmp)
        ckpts = build_checkpoints(args.preset, work)
        runs_ours, runs_conv = [], []
        for i in range(args.repeat):  # alternate, so drift in machine load hits both
            runs_conv.append(converter(ckpts["legacy"], work / f"conv-legacy-{i}", args.ref))
            runs_ours.append(ours(ckpts["legacy"], work / f"ours-legacy-{i}"))
        layouts = {
            "legacy": {"qoqopt": runs_ours[-1], "converter": runs_conv[-1]},
            "runtime": {"qoqopt": ours(ckpts["runtime"], work / "ours-runtime"),
                        "converter": converter(ckpts["runtime"], work / "conv-runtime", args.ref)},
        }  # fmt: skip

    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    launcher_rss = ru_maxrss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    result = {
        "benchmark": "gguf_convert",
        "launcher_peak_rss_mib": launcher_rss,  # a floor under every child's measured peak RSS
        "preset": args.preset,
        "what": "text GGUF + mmproj, F16, one checkpoint; converter = two invocations (text, --mmproj)",
        "hardware": hardware(),
        "repeat": args.repeat,
        "qoqopt": {"wall_s": med(runs_ours, "wall_s"), "peak_rss_mib": med(runs_ours, "peak_rss_mib")},
        "converter": {"wall_s": med(runs_conv, "wall_s"), "peak_rss_mib": med(runs_conv, "peak_rss_mib")},
        "layouts": layouts,
    }
    result["ratio_wall"] = result["qoqopt"]["wall_s"] / result["converter"]["wall_s"]
    result["ratio_peak_rss"] = result["qoqopt"]["peak_rss_mib"] / result["converter"]["peak_rss_mib"]
    result["targets_met"] = {"wall<=0.5": result["ratio_wall"] <= 0.5, "rss<=0.5": result["ratio_peak_rss"] <= 0.5}

    print(f"mini-{args.preset}, F16 text + mmproj, median of {args.repeat}, on {result['hardware']['cpu']} x{result['hardware']['cores']}")
    print(f"  qoqopt export      {result['qoqopt']['wall_s']:7.2f} s   peak RSS {result['qoqopt']['peak_rss_mib']:7.0f} MiB")
    print(f"  convert_hf_to_gguf {result['converter']['wall_s']:7.2f} s   peak RSS {result['converter']['peak_rss_mib']:7.0f} MiB")
    print(f"  ratio              {result['ratio_wall']:7.2f} x             {result['ratio_peak_rss']:7.2f} x   (targets <= 0.5)")
    for layout, r in layouts.items():
        c = r["converter"]
        print(f"  {layout:8} layout: converter text {c['text']['tensors']} tensors (rc {c['text']['rc']}), "
              f"mmproj {c['mmproj']['tensors']} tensors (rc {c['mmproj']['rc']}); "
              f"qoqopt text {r['qoqopt']['text_tensors']}, mmproj {r['qoqopt']['mmproj_tensors']} (rc {r['qoqopt']['rc']})")  # fmt: skip
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
