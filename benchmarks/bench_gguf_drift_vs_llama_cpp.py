"""Benchmark: qoqopt's GGUF builds against llama.cpp's own route, in llama.cpp, same run, same chats.

    .venv/bin/python benchmarks/bench_gguf_drift_vs_llama_cpp.py [--model DIR] [--quants BF16,Q8_0,Q4_K_M] [--items 63]

llama.cpp's route: its convert_hf_to_gguf.py (BF16 text, F16 mmproj), then llama_model_quantize (what
llama-quantize runs) for each other type, without an imatrix. qoqopt's: `qoqopt export --imatrix none`
(like for like) and, for the types that take one, `--imatrix clinical` (its default). One `qoqopt
bench` (drift only, `--answer-tokens 0`) measures every build against the checkpoint in transformers
on the same eval chats; llama.cpp's files enter it as `gguf:FILE.gguf`.

Printed and saved (default benchmarks/results/gguf_drift_vs_llama_cpp.json): per type, how many
tensors the two routes hold byte for byte alike (text and mmproj), each build's mean KLD, and qoqopt's
over llama.cpp's with the paired 95% interval over the chats. Without --model the trained `tiny`
mini model is used (`qoqopt mini --train`, cached).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_gguf_convert import DEFAULT_REF, converter_missing  # run by path: benchmarks/ is on sys.path
from qoqopt.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
NAME = "m"


def qoqopt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "qoqopt", *args], check=True)


def llama_cpp_route(model: Path, out: Path, quants: list[str], ref: Path) -> dict[str, Path]:
    """Text GGUF per type and the mmproj, as llama.cpp's own tools make them."""
    import llama_cpp
    from qoqopt.exports.gguf_quant import llama_ftypes

    out.mkdir(parents=True)
    env = {"PYTHONPATH": str(ref / "gguf-py")}
    script = str(ref / "convert_hf_to_gguf.py")
    bf16 = out / f"{NAME}-BF16.gguf"
    for extra, dest in (([], bf16), (["--mmproj"], out / f"mmproj-{NAME}-f16.gguf")):
        outtype = "f16" if extra else "bf16"
        subprocess.run([sys.executable, script, str(model), "--outtype", outtype, *extra, "--outfile", str(dest)],
                       env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    files = {"BF16": bf16}
    for quant in (q for q in quants if q != "BF16"):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_ftypes()[quant]
        files[quant] = out / f"{NAME}-{quant}.gguf"
        if llama_cpp.llama_model_quantize(str(bf16).encode(), str(files[quant]).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama_model_quantize failed for {quant}")
    return files


def alike(a: Path, b: Path) -> tuple[int, int]:
    """(tensors byte for byte the same in type and data, tensors in a)."""
    import numpy as np
    from gguf import GGUFReader

    ta, tb = ({t.name: t for t in GGUFReader(p).tensors} for p in (a, b))
    same = sum(n in tb and ta[n].tensor_type == tb[n].tensor_type and np.array_equal(ta[n].data, tb[n].data) for n in ta)
    return same, len(ta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint (default: the trained tiny mini model)")
    ap.add_argument("--quants", default="BF16,Q8_0,Q4_K_M")
    ap.add_argument("--items", type=int, default=63, help="eval chats (the built-in set has 63)")
    ap.add_argument("--work", type=Path, help="folder for the builds and the bench result, kept (default: a temporary one)")
    ap.add_argument("--ref", type=Path, default=DEFAULT_REF, help="vendor/llama.cpp of the llama-cpp-python sdist")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "gguf_drift_vs_llama_cpp.json")
    args = ap.parse_args(argv)
    if converter_missing(args.ref):
        return 2
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="gguf-vs-llama-cpp-") as work:
            return measure(args, Path(work))
    if args.work.exists():
        raise SystemExit(f"{args.work} exists: remove it first")
    return measure(args, args.work)


def measure(args, work: Path) -> int:
    from qoqopt.bench.intervals import kld_ratio_interval
    from qoqopt.exports.gguf_quant import is_direct

    quants = args.quants.split(",")
    model = args.model or work / "model"
    if args.model is None:
        qoqopt("mini", "--out", str(model), "--preset", "tiny", "--train")
    theirs = llama_cpp_route(model, work / "llama.cpp", quants, args.ref)
    ours = work / "qoqopt"
    qoqopt("export", str(model), "--format", "gguf", "--quant", args.quants, "--imatrix", "none", "--name", NAME, "--out", str(ours))
    weighted = [q for q in quants if not is_direct(q)]
    clinical = work / "qoqopt-imatrix"
    if weighted:
        qoqopt("export", str(model), "--format", "gguf", "--quant", ",".join(weighted), "--name", NAME, "--out", str(clinical))
    variants = [f"gguf:{q}" for q in quants] + [f"gguf:{p}" for p in theirs.values()]
    variants += [f"gguf:{clinical / f'{NAME}.{q}.gguf'}" for q in weighted]
    results = work / "bench"
    qoqopt("bench", str(model), "--variants", ",".join(variants), "--from", str(ours), "--items", str(args.items),
           "--no-speed", "--answer-tokens", "0", "--out", str(results))  # fmt: skip
    (path,) = results.glob("bench-*.json")
    run = {v["name"]: v for v in json.loads(path.read_text())["variants"]}
    rows = []
    for q in quants:
        peer, own = run[f"gguf:{theirs[q].name}"]["drift"]["all"], run[f"gguf:{q}"]["drift"]["all"]
        row = {"quant": q, "text_alike": alike(ours / f"{NAME}.{q}.gguf", theirs[q]),
               "mmproj_alike": alike(ours / f"mmproj-{NAME}-f16.gguf", theirs[q].parent / f"mmproj-{NAME}-f16.gguf"),
               "llama_cpp_kld": peer["mean_kld"], "qoqopt_kld": own["mean_kld"],
               "ratio_ci95": kld_ratio_interval(peer["chat_kld"], own["chat_kld"])}  # fmt: skip
        if q in weighted:
            im = run[f"gguf:{NAME}.{q}.gguf"]["drift"]["all"]
            row |= {"qoqopt_imatrix_kld": im["mean_kld"], "imatrix_ratio_ci95": kld_ratio_interval(peer["chat_kld"], im["chat_kld"])}
        rows.append(row)
        print(f"{q:7} tensors alike text {row['text_alike'][0]}/{row['text_alike'][1]}, mmproj "
              f"{row['mmproj_alike'][0]}/{row['mmproj_alike'][1]}; mean KLD llama.cpp {row['llama_cpp_kld']:.3e}, "
              f"qoqopt {row['qoqopt_kld']:.3e} (ratio {row['qoqopt_kld'] / row['llama_cpp_kld']:.3f}, 95% CI "
              f"{row['ratio_ci95'][0]:.3f}-{row['ratio_ci95'][1]:.3f})"
              + (f", qoqopt + clinical imatrix {row['qoqopt_imatrix_kld']:.3e} (95% CI {row['imatrix_ratio_ci95'][0]:.3f}-"
                 f"{row['imatrix_ratio_ci95'][1]:.3f})" if q in weighted else ""))  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps({"model": str(args.model or "trained tiny"), "items": args.items, "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
