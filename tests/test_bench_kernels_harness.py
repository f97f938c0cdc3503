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


def test_an_unusable_or_existing_out_is_refused_before_any_timing(tmp_path, capsys, monkeypatch):
    """Earlier results are not replaced without --force (the JSON is rewritten from the first row on,
    so a rerun that failed lost a complete file), and a folder or a path under a file is one line, not
    four tracebacks after the first op."""
    monkeypatch.setattr(bench_kernels, "Bench", lambda device: pytest.fail("timed before checking --out"))
    kept = tmp_path / "r.json"
    kept.write_text('{"precious": 1}')
    (tmp_path / "afile").write_text("x")
    for out, message in ((kept, f"{kept} exists (--force replaces it)"),
                         (tmp_path, f"--out {tmp_path} is a folder; give a JSON file path"),
                         (tmp_path / "afile" / "x.json", f"cannot write {tmp_path / 'afile' / 'x.json'}: {tmp_path / 'afile'} is a file")):  # fmt: skip
        assert bench_kernels.main(["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert kept.read_text() == '{"precious": 1}'


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


def test_a_recorded_target_is_reported_not_judged():
    b = _fake_gpu_bench({"windows": 17.4, "full": 0.99})
    for row in b.rows:
        row.target = "attention/sdpa-layer"
    layer = bench_kernels.verdicts(b)["attention/sdpa-layer"]
    assert layer["status"] == "recorded" and layer["worst"] == 0.99


def test_per_image_attention_runs_the_towers_layers_in_turn():
    """The judged attention row calls each module once per layer of the tower, windowed layers with
    the window boundaries and the full-attention ones with the image's."""
    profile = bench_kernels.PROFILES["7b"]
    b = bench_kernels.Bench(torch.device("cpu"))
    b.triton = True  # as on a GPU: the qoqopt row is made too
    cus = {"windows": torch.tensor([0, 4, 8, 10]), "full": torch.tensor([0, 10])}
    calls = {"hf": [], "ours": []}

    def module(name):
        return lambda x, cu, position_embeddings: calls[name].append(next(k for k, v in cus.items() if v is cu))

    bench_kernels._bench_attention_per_image(b, profile, module("hf"), module("ours"), cus, torch.zeros(10, 4), None)
    depth, full = profile.tower[0], len(profile.tower[2])
    one_image = ["windows"] * (depth - full) + ["full"] * full
    for name in ("hf", "ours"):
        runs = len(calls[name]) // depth
        assert runs >= 1 and calls[name] == one_image * runs, name
    ours = next(r for r in b.rows if r.impl == "qoqopt-module")
    assert ours.target == "attention/sdpa" and ours.peer == "hf-sdpa-module" and ours.case == "10 patches, per image"


def _run_summary(tmp_path, result: dict) -> str:
    script = (ROOT / "benchmarks/gpu_check.sh").read_text()
    summary = script.split("<<'PYEOF' | tee \"$OUT/summary.txt\"\n", 1)[1].split("\nPYEOF", 1)[0]
    (tmp_path / "summary.py").write_text(summary)
    (tmp_path / "bench.json").write_text(json.dumps(result))
    # the tuning table the run wrote (and the benchmark read), written as the tuner writes it
    from qoqopt.kernels import tuning

    key = tuning.Key("fragments", 4, 128, 3584, 37888, "bfloat16", 1)
    config = dict(KERNEL="frag", BLOCK_N=128, num_warps=4, num_stages=4, SPLIT_K=2)
    tuning.write_table(tmp_path / "tuned" / "NVIDIA_H200.json", "NVIDIA H200",
                       [tuning.entry(key, config, us=30.5, default_us=34.0)], {})
    done = subprocess.run([sys.executable, str(tmp_path / "summary.py"), str(tmp_path / "bench.json"), "0", "181 passed",
                           "0", "412", str(tmp_path / "absent.json"), "skipped", str(tmp_path / "tuned"), "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_gpu_check_summary_reads_a_recorded_h200_run(tmp_path):
    """gpu_check's summary on the H200 run of 2026-11-30, rewritten as the benchmark writes it now:
    per-layer attention rows recorded, a per-image row judged."""
    result = json.loads((ROOT / "benchmarks/results/h200_kernels.json").read_text())
    for row in result["rows"]:
        if row["op"] == "attention" and row["target"] == "attention/sdpa":
            row["target"] = "attention/sdpa-layer"
    result["rows"].append(dict(op="attention", case="5120 patches, per image", impl="qoqopt-module", ms=7.5,
                               peer="hf-sdpa-module", speedup=9.64, floor_ms=None, over_floor=None,
                               target="attention/sdpa", extra={}, graph_ms=None, graph_speedup=None))
    result["targets"] = {"attention/sdpa": dict(what="vision attention per image vs hf sdpa path", target=5.0,
                                                worst=9.64, worst_case="5120 patches, per image vs hf-sdpa-module",
                                                status="met"),
                         "attention/sdpa-layer": dict(what="vision attention per layer vs hf sdpa (not judged)",
                                                      target=None, worst=0.992, worst_case="5120 patches, full",
                                                      status="recorded")}
    lines = _run_summary(tmp_path, result).splitlines()
    for what in ("vision attention per image vs hf sdpa path >= x5.0", "per layer vs hf sdpa (not judged)",
                 "fastest tile config per sweep case", "NVIDIA H200",
                 "NVIDIA_H200.json: 1 launches tuned, 1 beat the rules",
                 "fragments  3584->37888 M=1     34.00 ->    30.50 us  KERNEL=frag BLOCK_N=128 num_warps=4"):
        assert any(what in line for line in lines), what
    module_rows = [line for line in lines if line.startswith("attention") and " qoqopt-module " in line]
    assert len(module_rows) == 5 and any("per image" in line for line in module_rows)  # 4 per layer + 1
    # each W4A16 sweep case read against bf16's graph time of its layer and M (the run's own rows)
    gate_up = next(line for line in lines if line.strip().startswith("w4a16 gptq gate/up M=1 "))
    bf16 = next(r for r in result["rows"] if r["case"] == "gate/up 3584->18944 M=1" and r["impl"] == "bf16-matmul")
    best = min(r.get("graph_ms") or r["ms"] for r in result["rows"] if r["case"] == "w4a16 gptq gate/up M=1")
    assert f"fastest x{bf16['graph_ms'] / best:.2f} bf16" in gate_up, gate_up


def test_every_w4a16_sweep_config_plans_at_the_7b_shapes_it_is_swept_at():
    """A config the plan refuses shows up on the GPU as an "unavailable" row, a row of the one run
    lost: every W4A16 config must plan for a 132-SM GPU at each 7B shape and M the sweep gives it
    (bf16, 4-bit, group 128, as the sweep quantizes)."""
    from qoqopt.kernels.w4a16 import _launch_plan

    pr = bench_kernels.PROFILES["7b"]
    for i, (k, n, label) in enumerate(pr.lm_shapes):
        for m in bench_kernels.w4a16_swept_ms(pr, i >= 2):
            for cfg in bench_kernels.w4a16_sweep_configs(m, i >= 2):
                plan = _launch_plan(m, n, k, 4, pr.group_size, 1, False, torch.bfloat16, torch.device("cuda"), 132,
                                    tuple(sorted(cfg.items())))
                assert plan.kernel == cfg.get("KERNEL", plan.kernel), (label, m, cfg)


def test_the_fragment_word_layer_row_plans_at_every_7b_projection():
    """The GPU run's "fused x4 fragment words" layer row repacks every projection of a 7B decoder
    layer (fused q/k/v and gate/up included) and plans each at decode rows: each must fit fragment
    words and take the fragment decode kernel in bf16 (a refusal would lose the row on the GPU)."""
    from qoqopt.kernels.w4a16 import _launch_plan, fragment_launch, fragment_words_fit

    pr = bench_kernels.PROFILES["7b"]
    hidden, kv, inter = pr.decoder
    fused = dict(qkv_proj=(hidden, hidden + 2 * kv), o_proj=(hidden, hidden), gate_up_proj=(hidden, 2 * inter),
                 down_proj=(inter, hidden))
    for name, (k, n) in fused.items():
        assert fragment_words_fit(4, k, pr.group_size), name
        for m in (1, 16):
            cfg = fragment_launch(m, torch.bfloat16)
            plan = _launch_plan(m, n, k, 4, pr.group_size, 1, name == "qkv_proj", torch.bfloat16, torch.device("cuda"),
                                132, tuple(sorted(cfg.items())))
            assert plan.kernel == "frag", (name, m)
            # the tiles the sweep times as candidates (fragn128w4s3, fragn64w2s3)
            tile = (plan.constexprs["BLOCK_N"], plan.constexprs["num_warps"], plan.constexprs["num_stages"])
            swept = {(c["BLOCK_N"], c["num_warps"], c["num_stages"]) for c in bench_kernels.FRAGMENT_DECODE}
            assert swept == {(128, 4, 3), (64, 2, 3)} and tile in swept, (name, m, tile)


def test_the_fragment_word_layer_row_answers_as_the_fused_row(monkeypatch):
    """The GPU run's fragment-word layer row, run here by the interpreter on a small decoder layer
    (the tiny profile's dims, groups of 128 as the 7B's), decode rows 1 and 16: each of its 7
    outputs, in fp16, is the projection of the GPTQ words as the spec reads them
    (benchmarks/spec_layout.py), and the fused GPTQ-word row it is timed beside gives the same."""
    import dataclasses

    import torch.nn.functional as F

    from benchmarks.spec_layout import spec_dequantize, spec_unpack_gptq
    from qoqopt.kernels import w4a16

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(w4a16, "w4a16_reference", lambda *a, **kw: pytest.fail("the torch path ran"))
    pr = dataclasses.replace(bench_kernels.PROFILES["tiny"], group_size=128)
    unfused = bench_kernels._decoder_layer(pr, torch.float16, torch.device("cpu"))
    fused, fragments = bench_kernels.fused_copy(unfused), bench_kernels.fused_copy(unfused, fragment_words=True)
    assert {m.words for h in fragments.values() for m in h.modules() if hasattr(m, "words")} == {"fragments"}
    spec = {}  # projection -> its weight [N, K] from the GPTQ v1 words it was built with
    for parent, names in bench_kernels.DECODER_LINEARS.items():
        for name in names:
            layer = unfused[parent].get_submodule(name)
            g_idx = torch.arange(layer.in_features) // pr.group_size
            spec[name] = spec_dequantize(*spec_unpack_gptq(layer.qweight, layer.qzeros, 4), layer.scales, g_idx)
    names = [name for names in bench_kernels.DECODER_LINEARS.values() for name in names]  # layer_calls' order
    for m in (1, 16):
        inputs = bench_kernels.layer_inputs(pr, m, torch.float16, torch.device("cpu"))
        with torch.inference_mode():
            ours, theirs = bench_kernels.layer_calls(fragments, inputs)(), bench_kernels.layer_calls(fused, inputs)()
        for name, out, fused_out in zip(names, ours, theirs, strict=True):
            torch.testing.assert_close(out.float(), F.linear(inputs[name].float(), spec[name]), atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(out, fused_out, atol=2e-3, rtol=2e-3)


def test_the_merger_rows_time_both_plans_beside_transformers(monkeypatch):
    """The GPU run's merger rows, run here by the interpreter at the tiny profile: the default (cublas)
    plan is judged against the target, the fused and overlap plans and the GEMMs alone recorded beside it, all
    against transformers' eager module, whose output each plan gives (the rows record how closely)."""
    from qoqopt.kernels import merger

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(merger, "patch_merger_reference", lambda *a, **kw: pytest.fail("the torch path ran"))
    b = bench_kernels.Bench(torch.device("cpu"))
    b.triton = True  # as on a GPU: the qoqopt rows are made
    bench_kernels.bench_merger(b, bench_kernels.PROFILES["tiny"])
    rows = {r.impl: r for r in b.rows}
    plans = ("qoqopt norm+cuBLAS", "qoqopt-triton", "qoqopt overlap x2", "qoqopt overlap x4")
    assert set(rows) == {"hf-eager", "cuBLAS fc1+fc2 only", "cuBLAS fc1 only", "cuBLAS fc2 only", *plans}
    assert rows["cuBLAS fc1 only"].peer is rows["cuBLAS fc2 only"].peer is None  # times / floor only
    assert [rows[impl].target for impl in (*plans, "cuBLAS fc1+fc2 only")] == [
        "merger", "merger/fused", "merger/overlap", "merger/overlap", "merger/gemms"]
    assert rows["qoqopt norm+cuBLAS"].peer == "hf-eager"
    errors = {impl: rows[impl].extra["max_rel_err"] for impl in plans}
    assert all(err < 1e-5 for err in errors.values()), errors  # fp32 on the CPU


def test_w4a16_rows_cycle_enough_weight_copies_to_miss_l2():
    """CUDA-graph replay does not flush L2 between calls: the W4A16 rows cycle through copies of each
    weight that together exceed twice L2 (50 MB on an H200), fewest such, at most 64; where L2 is
    unknown (the CPU), one. The calls run in turn, each once a cycle."""
    l2 = 50 * 2**20
    for nbytes in (3584 * 18944 * 2, 3584 * 18944 / 2, 3584 * 3584 / 2, 3584 * 512 * 2):
        n = bench_kernels.weight_copies(nbytes, l2)
        assert n * nbytes >= 2 * l2 and (n == 1 or (n - 1) * nbytes < 2 * l2), (nbytes, n)
    assert bench_kernels.weight_copies(3584 * 512 / 2, l2) == 64 and bench_kernels.weight_copies(1e6, 0) == 1
    seen = []
    run = bench_kernels.cycling([lambda i=i: seen.append(i) for i in range(3)])
    for _ in range(7):
        run()
    assert seen == [0, 1, 2, 0, 1, 2, 0]
