"""Benchmark: `qoqopt info FILE.gguf` vs gguf-py's `gguf-dump --json FILE.gguf`, same run.

    .venv/bin/python benchmarks/bench_gguf_info.py [--build DIR] [--repeat 3] [--json PATH]

Both read a text GGUF's header (metadata and tensor infos) and summarise it; gguf-dump is what
llama.cpp's own Python package offers for this. Each runs as its own process (wall time and peak
RSS, as benchmarks/measure.py takes them), on every text GGUF and the mmproj of a GGUF build (by
default one exported here from the trained mini QoQ-Med, whose vocabulary is the real 151k-token
one: the part of the header that costs). Each file's tensor count and parameter count must agree
between the two tools. Results are printed and saved as JSON (default
benchmarks/results/gguf_info.json).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_gguf_convert import hardware  # run by path
from measure import run_measured
from qoqopt.fileio import atomic_write_text


def export_build(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "qoqopt", "mini", "--out", str(out / "mini"), "--preset", "tiny", "--train"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "qoqopt", "export", str(out / "mini"), "--format", "gguf", "--quant",
                    "Q4_K_M,Q8_0", "--out", str(out / "gguf")], check=True, capture_output=True)  # fmt: skip
    return out / "gguf"


def counts_ours(path: Path) -> tuple[int, int]:
    res = subprocess.run([sys.executable, "-m", "qoqopt", "info", str(path), "--json"], capture_output=True, text=True,
                         check=True)  # fmt: skip
    (f,) = json.loads(res.stdout)["files"]
    return f["tensors"], f["params"]


def counts_dump(dump: str, path: Path) -> tuple[int, int]:
    res = subprocess.run([dump, "--json", str(path)], capture_output=True, text=True, check=True)
    tensors = json.loads(res.stdout)["tensors"]
    return len(tensors), sum(math.prod(t["shape"]) for t in tensors.values())


def timed(cmd: list[str], repeat: int) -> dict:
    runs = [run_measured(cmd) for _ in range(repeat)]
    assert all(r["rc"] == 0 for r in runs), runs[-1]["tail"]
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs)}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, help="a GGUF build directory (default: export one from the mini model)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gguf_info.json")
    args = ap.parse_args(argv)
    dump = shutil.which("gguf-dump") or str(Path(sys.executable).parent / "gguf-dump")
    with tempfile.TemporaryDirectory(prefix="bench-info-") as tmp:
        build = args.build or export_build(Path(tmp))
        files = sorted(p for p in build.glob("*.gguf") if "imatrix" not in p.name)
        rows = []
        for path in files:
            agree = counts_ours(path) == counts_dump(dump, path)
            ours = timed([sys.executable, "-m", "qoqopt", "info", str(path)], args.repeat)
            peer = timed([dump, "--json", str(path)], args.repeat)
            rows.append({"file": path.name, "bytes": path.stat().st_size, "counts_agree": agree, "qoqopt": ours,
                         "gguf_dump": peer, "wall_ratio": ours["wall_s"] / peer["wall_s"],
                         "rss_ratio": ours["peak_rss_mib"] / peer["peak_rss_mib"]})  # fmt: skip
    print(f"{'file':28s} {'qoqopt info':>18s} {'gguf-dump --json':>18s} {'wall':>6s} {'RSS':>6s}  counts agree")
    for r in rows:
        q, g = r["qoqopt"], r["gguf_dump"]
        print(f"{r['file']:28s} {q['wall_s']:6.2f} s {q['peak_rss_mib']:5.0f} MiB {g['wall_s']:6.2f} s "
              f"{g['peak_rss_mib']:5.0f} MiB {r['wall_ratio']:5.2f}x {r['rss_ratio']:5.2f}x  {r['counts_agree']}")  # fmt: skip
    result = {"benchmark": "gguf_info", "repeat": args.repeat, "hardware": hardware(), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(f"saved {args.json}")
    return 0 if all(r["counts_agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
