"""Benchmark: `qoqopt export --split-max-size` vs llama.cpp's convert_hf_to_gguf.py --split-max-size, same run.

    .venv/bin/python benchmarks/bench_gguf_split.py [--preset small] [--size 200M] [--repeat 3] [--ref DIR] [--json PATH]

Both tools write the F16 text GGUF of one mini QoQ-Med checkpoint in parts of at most SIZE, each
straight into its parts (qoqopt: exports/gguf_write.py with gguf_split's layout; the converter:
gguf-py's writer). Each tool runs as its own process (wall time and the
child's peak RSS, as benchmarks/measure.py takes them). Then llama.cpp (llama-cpp-python) loads each
tool's first part and evaluates the same tokens: the logits of the two are compared, and each
part's size against SIZE (the converter bounds only a part's tensor data, qoqopt the whole file).

--ref is vendor/llama.cpp of the llama-cpp-python sdist (`pip download llama-cpp-python==0.3.36
--no-deps --no-binary :all:`, then unpack). Results are printed and saved as JSON (default
benchmarks/results/gguf_split.json).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench_gguf_convert import build_checkpoints, converter_missing, hardware, peer_parser  # run by path
from measure import run_measured
from qoqopt.fileio import atomic_write_text

TOKENS = list(range(100, 164))


def ours(ckpt: Path, out: Path, size: str) -> dict:
    cmd = [sys.executable, "-m", "qoqopt", "export", str(ckpt), "--format", "gguf", "--quant", "F16", "--imatrix",
           "none", "--mmproj-type", "none", "--name", "m", "--split-max-size", size, "--out", str(out), "--force"]  # fmt: skip
    return {**run_measured(cmd), "parts": sorted(out.glob("m.F16*.gguf"))}


def converter(ckpt: Path, out: Path, size: str, ref: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ref / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "f16", "--split-max-size", size,
           "--outfile", str(out / "text.gguf")]  # fmt: skip
    return {**run_measured(cmd, {"PYTHONPATH": str(ref / "gguf-py")}), "parts": sorted(out.glob("text*.gguf"))}


def logits(first_part: Path):
    from qoqopt.exports.gguf_runtime import LlamaVL

    with LlamaVL(first_part) as vl:
        return vl.logits(TOKENS)


def summary(runs: list[dict]) -> dict:
    last = runs[-1]
    sizes = [p.stat().st_size for p in last["parts"]]
    return {"wall_s": statistics.median(r["wall_s"] for r in runs), "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "rc": last["rc"], "tail": last["tail"], "parts": [p.name for p in last["parts"]], "part_bytes": sizes}  # fmt: skip


def main(argv=None) -> int:
    from qoqopt.commands.argtypes import byte_size

    ap = peer_parser(__doc__, "gguf_split.json", "runs per tool (median reported)")
    ap.add_argument("--size", default="200M", help="the split size both tools are given (K, M, G: decimal in both)")
    args = ap.parse_args(argv)
    if converter_missing(args.ref):
        return 2
    limit = byte_size(args.size)

    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
        work = Path(tmp)
        ckpt = build_checkpoints(args.preset, work)["legacy"]
        runs = {"qoqopt": [], "converter": []}
        for i in range(args.repeat):  # alternate, so drift in machine load hits both
            runs["converter"].append(converter(ckpt, work / f"conv-{i}", args.size, args.ref))
            runs["qoqopt"].append(ours(ckpt, work / f"ours-{i}", args.size))
        result = {name: summary(r) for name, r in runs.items()}
        failed = [name for name, r in result.items() if r["rc"] or not r["parts"]]
        if not failed:
            ours_logits, conv_logits = (logits(runs[n][-1]["parts"][0]) for n in ("qoqopt", "converter"))
            result["llama_cpp_max_abs_logit_diff"] = float(abs(ours_logits - conv_logits).max())

    result.update(benchmark="gguf_split", preset=args.preset, split_max_bytes=limit, hardware=hardware(), repeat=args.repeat,
                  what="F16 text GGUF in parts; each tool writes its parts directly")  # fmt: skip
    print(f"mini-{args.preset}, F16 text in parts of at most {args.size}, median of {args.repeat}, "
          f"on {result['hardware']['cpu']} x{result['hardware']['cores']}")
    for name in ("qoqopt", "converter"):
        r = result[name]
        over = sum(b > limit for b in r["part_bytes"])
        print(f"  {name:10} {r['wall_s']:6.2f} s  peak RSS {r['peak_rss_mib']:6.0f} MiB  rc {r['rc']}  {len(r['parts'])} parts, "
              f"largest {max(r['part_bytes'], default=0) / 1e6:.1f} MB, {over} over {args.size}")  # fmt: skip
    if failed:
        print(f"  failed: {', '.join(failed)} (last line: {result[failed[0]]['tail']})")
    else:
        result["ratio_wall"] = result["qoqopt"]["wall_s"] / result["converter"]["wall_s"]
        result["ratio_peak_rss"] = result["qoqopt"]["peak_rss_mib"] / result["converter"]["peak_rss_mib"]
        print(f"  qoqopt / converter: wall {result['ratio_wall']:.2f} x, peak RSS {result['ratio_peak_rss']:.2f} x")
        print(f"  llama.cpp, each tool's first part, {len(TOKENS)} tokens: max |logit difference| "
              f"{result['llama_cpp_max_abs_logit_diff']:.3g}")
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(f"saved {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
