"""The kernel benchmark's harness (benchmarks/bench_kernels.py), which a GPU session runs once with
no chance to fix it: on CPU it runs every op's reference path beside transformers' module and
leaves every GPU target open; on a GPU it judges each target by its worst row; gpu_check's summary
reads its JSON. Timings are never asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_kernels  # noqa: E402


@pytest.fixture(scope="module")
def cpu_result(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)  # torch reference paths: the harness, not the kernels
    mp.setattr(torch.cuda, "is_available", lambda: False)  # the CPU run even on a GPU machine (gpu_check runs the rest)
    try:
        out = tmp_path_factory.mktemp("bench") / "kernels.json"
        assert bench_kernels.main(["--out", str(out)]) == 0
        return json.loads(out.read_text())
    finally:
        mp.undo()


def test_cpu_run_is_complete_and_leaves_gpu_targets_open(cpu_result):
    assert cpu_result["complete"] and cpu_result["errors"] == {}
    assert set(cpu_result["targets"]) == set(bench_kernels.TARGETS)
    assert {v["status"] for v in cpu_result["targets"].values()} == {"open (no GPU run)"}


def test_cpu_run_times_each_op_beside_transformers(cpu_result):
    rows = cpu_result["rows"]
    peers = {(r["op"], r["impl"]) for r in rows}
    # the dense peer runs in the run's dtype: fp32 on the CPU
    for op, peer in (("merger", "hf-eager"), ("attention", "hf-sdpa-module"), ("w4a16", "float32-matmul"),
                     ("tower", "hf-sdpa")):
        assert (op, peer) in peers, (op, peer)
    judged = [r for r in rows if r["peer"]]
    assert judged and all(r["speedup"] == pytest.approx(
        next(p["ms"] for p in rows if (p["op"], p["case"], p["impl"]) == (r["op"], r["case"], r["peer"])) / r["ms"])
        for r in judged)
    # the per-image attention row runs the profile's windowed and full layers in turn
    assert any(r["op"] == "attention" and r["case"].endswith("per image") for r in rows)
    assert all(r["ms"] > 0 for r in rows)


def _fake_gpu_bench(speedups: dict) -> bench_kernels.Bench:
    b = bench_kernels.Bench.__new__(bench_kernels.Bench)  # no device needed to judge rows
    b.device = torch.device("cuda")
    b.rows = [bench_kernels.Row("attention", case, "qoqopt-module", 1.0, peer="hf-sdpa-module", speedup=s,
                                target="attention/sdpa") for case, s in speedups.items()]
    return b


def test_a_target_is_judged_by_its_worst_row():
    verdict = bench_kernels.verdicts(_fake_gpu_bench({"big image": 9.0, "small image": 4.9}))
    sdpa = verdict["attention/sdpa"]
    assert sdpa["status"] == "NOT met" and sdpa["worst"] == 4.9 and sdpa["worst_case"].startswith("small image")
    assert bench_kernels.verdicts(_fake_gpu_bench({"big image": 9.0, "small image": 5.0}))["attention/sdpa"][
        "status"] == "met"
    assert verdict["merger"]["status"] == "open (no data)"  # no merger rows: not judged met by default


def test_gpu_check_summary_reads_a_recorded_h200_run(tmp_path):
    script = (ROOT / "benchmarks/gpu_check.sh").read_text()
    summary = script.split("<<'PYEOF' | tee \"$OUT/summary.txt\"\n", 1)[1].split("\nPYEOF", 1)[0]
    (tmp_path / "summary.py").write_text(summary)
    recorded = ROOT / "benchmarks/results/h200_kernels.json"
    done = subprocess.run([sys.executable, str(tmp_path / "summary.py"), str(recorded), "0", "181 passed", "0", "412",
                           str(tmp_path / "absent.json"), "skipped"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for what in ("merger vs eager", "W4A16 vs bf16 matmul", "fastest tile config per sweep case", "NVIDIA H200"):
        assert what in text, what
    # the attention module's per-layer rows stay in the table whether or not they carry the target
    assert sum(" qoqopt-module " in line for line in text.splitlines()) >= 4
