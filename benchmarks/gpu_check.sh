#!/usr/bin/env bash
# One-shot GPU check of qoqopt.kernels: the kernel tests on CUDA (fp32, fp16 and bf16), then the
# benchmark at QoQ-Med-7B dims with a small tile sweep. Run once, from the repo root:
#
#     OUT=/path/for/results bash benchmarks/gpu_check.sh
#
# Needs only python with torch, triton, transformers and pytest (all in the GPU image). Installs nothing; writes only under $OUT
# (default ./out/gpu_check): env.txt, tests.log, bench.log, bench_kernels.json, summary.txt.
# Each step has its own time limit; the whole script stays under 8 minutes.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/out/gpu_check}"
PY="${PYTHON:-python3}"
TEST_LIMIT_S="${TEST_LIMIT_S:-250}"
BENCH_LIMIT_S="${BENCH_LIMIT_S:-200}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"
T0=$(date +%s)

# --- qoqopt.kernels and benchmarks importable without installing ---------------------------------
# pyproject maps the top-level kernels/ to qoqopt.kernels. Without an install, a throwaway package
# dir of symlinks (qoqopt/* plus kernels -> qoqopt/kernels) on PYTHONPATH gives the same layout.
# -P (Python >= 3.11) and pytest's importlib mode keep the repo root, whose qoqopt/ has no kernels,
# off the front of sys.path; so the tests' other import from the repo, benchmarks (the format
# specs they check against), is linked in the same dir, installed or not.
PYFLAGS="$("$PY" -c 'import sys; print("-P" if sys.version_info >= (3, 11) else "")')"
SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
ln -s "$REPO/benchmarks" "$SHIM/benchmarks"
if ! "$PY" $PYFLAGS -c "import sys, qoqopt.kernels as k; sys.exit(0 if k.__file__.startswith('$REPO/') else 1)" 2>/dev/null; then
    mkdir "$SHIM/qoqopt"
    for entry in "$REPO"/qoqopt/*; do ln -s "$entry" "$SHIM/qoqopt/"; done
    ln -s "$REPO/kernels" "$SHIM/qoqopt/kernels"
    [ -d "$REPO/exports" ] && ln -s "$REPO/exports" "$SHIM/qoqopt/exports"
fi
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET
# GPU_CHECK_ALLOW_CPU=1 runs the same steps on a CPU-only box (interpreter, tiny sizes): it checks
# this script, not the kernels' speed.
if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then export TRITON_INTERPRET=1; else export QOQOPT_KERNEL_DEVICE=cuda; fi

# --- environment ---------------------------------------------------------------------------------
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi unavailable"
    "$PY" $PYFLAGS -c "import sys, torch, triton, transformers, qoqopt.kernels as k
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| triton', triton.__version__, '| transformers', transformers.__version__)
print('qoqopt.kernels from', k.__file__)
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')"
} 2>&1 | tee "$OUT/env.txt"
if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; stopping" | tee "$OUT/summary.txt"
    exit 2
fi

# --- 1. correctness on CUDA ----------------------------------------------------------------------
TESTS=(tests/test_kernels.py tests/test_kernels_apply.py tests/test_kernels_fusion.py tests/test_packing.py)
echo "== tests (limit ${TEST_LIMIT_S}s) =="
timeout "$TEST_LIMIT_S" "$PY" $PYFLAGS -m pytest -q -rs -p no:cacheprovider --import-mode=importlib "${TESTS[@]}" \
    --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
TEST_RC=${PIPESTATUS[0]}

# --- 2. benchmark --------------------------------------------------------------------------------
echo "== benchmark (limit ${BENCH_LIMIT_S}s) =="
rm -f "$OUT/bench_kernels.json"  # the JSON is rewritten after every op: a timeout keeps what finished
timeout "$BENCH_LIMIT_S" env -u TRITON_INTERPRET "$PY" benchmarks/bench_kernels.py --out "$OUT/bench_kernels.json" --sweep 2>&1 | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}

# --- 3. summary (last) ---------------------------------------------------------------------------
TEST_LINE="$(grep -E '([0-9]+ (passed|failed))' "$OUT/tests.log" | tail -n 1)"
[ "$TEST_RC" = 124 ] && TEST_LINE="TIMED OUT after ${TEST_LIMIT_S}s; last: ${TEST_LINE}"
"$PY" - "$OUT/bench_kernels.json" "$TEST_RC" "$TEST_LINE" "$BENCH_RC" "$(( $(date +%s) - T0 ))" <<'PYEOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

path, test_rc, test_line, bench_rc, seconds = sys.argv[1:]
print("\n================ qoqopt gpu_check summary ================")
print(f"{'tests (cuda, fp32/fp16/bf16)':56s} {'PASS' if test_rc == '0' else 'FAIL (rc ' + test_rc + ')'}  {test_line}")
if not Path(path).exists():
    print(f"{'benchmark':56s} no results (rc {bench_rc})")
    sys.exit(0)
result = json.loads(Path(path).read_text())
hw = result["hardware"]
print(f"{'device':56s} {hw.get('device')} ({hw.get('memory_gib')} GiB, driver {hw.get('driver')}, "
      f"torch {hw.get('torch')}, triton {hw.get('triton')})")
for key, v in result["targets"].items():
    worst = f"worst x{v['worst']} at {v['worst_case']}" if "worst" in v else ""
    if "worst_graph" in v:
        worst += f" | CUDA graph: {v['status_graph']}, worst x{v['worst_graph']} at {v['worst_graph_case']}"
    print(f"{v['what'] + ' >= x' + str(v['target']):56s} {v['status']:8s} {worst}")
# judged rows, plus W4A16 prefill (GPTQ), a decoder layer's linears and the whole tower for the
# record; the rest is in bench.log / the JSON
rows = [r for r in result["rows"] if r["speedup"] is not None and r["op"] != "sweep"
        and (r["target"] or r["op"] in ("layer", "tower") or (r["op"] == "w4a16" and r["impl"] == "qoqopt-gptq"))]
print(f"\n{'op':9s} {'case':30s} {'impl':18s} {'ms':>9s} {'speedup':>8s} {'vs':18s} {'t/floor':>7s} {'graph x':>8s}")
for r in rows:
    floor = f"{r['over_floor']:.1f}" if r["over_floor"] else "-"
    graph = f"x{r['graph_speedup']:.2f}" if r.get("graph_speedup") else "-"
    print(f"{r['op']:9s} {r['case']:30s} {r['impl']:18s} {r['ms']:9.4f} {'x%.2f' % r['speedup']:>8s} "
          f"{r['peer']:18s} {floor:>7s} {graph:>8s}"
          + (f"  max rel diff {r['extra']['max_rel_err']:.1e}" if "max_rel_err" in r.get("extra", {}) else ""))
sweep = {}
for r in result["rows"]:
    if r["op"] == "sweep" and (r["case"] not in sweep or r["ms"] < sweep[r["case"]]["ms"]):
        sweep[r["case"]] = r
if sweep:
    print("\nfastest tile config per sweep case:")
    for case, r in sweep.items():
        print(f"  {case:36s} {r['impl']:20s} {r['ms']:.4f} ms")
status = "complete" if result.get("complete") else "INCOMPLETE (timed out or failed)"
print(f"\nbenchmark {status}, rc {bench_rc}; total {seconds}s; logs and JSON in {Path(path).parent}")
PYEOF
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))
