"""`qoqopt report`: merge bench result files from several machines into Markdown tables and plots.

A result file (schema `qoqopt.bench/1`, written by `qoqopt bench`) holds one run on one machine:
the machine's hardware/software tags and, per variant, its files, drift against the reference
(overall and per clinical domain) and speed. Drift does not depend on the machine (same files, same
chats), so the drift table takes each variant's first successful measurement; speed is per machine.
A build is Pareto-optimal when no other build is both smaller and drifts less (mean KLD).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import QoqoptError

SCHEMA = "qoqopt.bench/1"
KLD = ".2e"  # drift spans 1e-6 (Q8_0) to 1e-1 (2-bit): fixed-point would print zeros


def load_results(paths: list[Path]) -> list[dict]:
    """Each result file once (the same file named twice is one run), checked as a bench result."""
    runs, seen = [], set()
    for path in map(Path, paths):
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        if path.is_dir():
            raise QoqoptError(f"{path} is a directory; give the bench-*.json files in it")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise QoqoptError(f"{path}: no such result file") from None
        except json.JSONDecodeError as exc:
            raise QoqoptError(f"{path} is not valid JSON: {exc}") from exc
        _check_result(data, path)
        runs.append(data)
    if not runs:
        raise QoqoptError("no result files given")
    return runs


def _check_result(data, path: Path) -> None:
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA:
        raise QoqoptError(f"{path} is not a qoqopt bench result (schema {schema!r}, want {SCHEMA})")
    run, variants = data.get("run"), data.get("variants")
    if not isinstance(run, dict) or not isinstance(run.get("machine"), dict):
        raise QoqoptError(f"{path}: a {SCHEMA} result needs a \"run\" object with its \"machine\"")
    if not isinstance(variants, list) or not all(isinstance(v, dict) and "name" in v for v in variants):
        raise QoqoptError(f"{path}: a {SCHEMA} result needs a \"variants\" list of named objects")
    for v in variants:
        if v.get("status") == "ok" and v.get("drift"):
            _check_measured(v, path)


def _check_measured(v: dict, path: Path) -> None:
    """What the drift table and plots read of a measured variant (the reference has no KLD of its own)."""
    number = (int, float)
    drift_all = v["drift"].get("all") if isinstance(v["drift"], dict) else None
    ok = isinstance(v.get("size_bytes"), number) and isinstance(drift_all, dict)
    if ok and v["name"] != "reference":
        ok = isinstance(drift_all.get("mean_kld"), number)
    if not ok:
        raise QoqoptError(f"{path}: variant {v['name']!r} has drift but no size_bytes or drift.all.mean_kld")


def machine_label(run: dict) -> str:
    m = run["run"]["machine"]
    return m.get("label") or (m.get("gpu") or {}).get("name") or m.get("cpu", "unknown")


def drift_rows(runs: list[dict]) -> dict[str, dict]:
    """variant name -> its first successful drift/size record across runs."""
    out: dict[str, dict] = {}
    for run in runs:
        for v in run["variants"]:
            if v.get("status") == "ok" and v.get("drift") and v["name"] not in out:
                out[v["name"]] = v
    return out


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names whose (size, drift) no other point beats on both (ties on both count as dominated once)."""
    best = set()
    for name, (size, drift) in points.items():
        dominated = any(
            (s <= size and d <= drift) and (s < size or d < drift) for other, (s, d) in points.items() if other != name
        )
        if not dominated:
            best.add(name)
    return best


def _fmt(x, spec=".4f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_markdown(runs: list[dict], plots: dict[str, str] | None = None) -> str:
    rows = drift_rows(runs)
    sized = {n: (v["size_bytes"], v["drift"]["all"]["mean_kld"]) for n, v in rows.items() if n != "reference"}
    front = pareto(sized)
    machines = [machine_label(r) for r in runs]
    out = ["# qoqopt report", "", f"Runs merged: {len(runs)} ({', '.join(machines)}).", ""]
    out += ["## Drift against the reference (same chats, same positions)", "", *_eval_lines(runs)]
    out += ["| variant | size MB | mean KLD | p99 KLD | same top % | RMS Δp % | answer acc | worst domain | Pareto |",
            "|---|---:|---:|---:|---:|---:|---:|---|:-:|"]  # fmt: skip
    for name, v in _by_size(rows):
        a = v["drift"]["all"]
        out.append(
            f"| {name} | {v['size_bytes'] / 1e6:.1f} | {_fmt(a.get('mean_kld'), KLD)} | {_fmt(a.get('p99_kld'), KLD)} | "
            f"{_fmt(a.get('same_top_pct'), '.1f')} | {_fmt(a.get('rms_dp_pct'), '.2f')} | {_fmt(a.get('accuracy'), '.2f')} | "
            f"{v.get('worst_domain') or '–'} | {'★' if name in front else ''} |"
        )
    out += ["", "★ Pareto-optimal: no other build is both smaller and lower in mean KLD.", ""]
    out += _domain_table(rows) + _speed_table(runs) + _failures(runs)
    if plots:
        out += ["## Plots", ""] + [f"![{title}]({path})" for title, path in plots.items()] + [""]
    return "\n".join(out)


def _eval_lines(runs: list[dict]) -> list[str]:
    """How many chats the drift and accuracy columns rest on: with a handful, one answer moves the
    accuracy a lot, and a reader of clinical evidence must see that beside the numbers."""
    sets = {}
    for run in runs:
        ev = run["run"].get("eval") or {}
        if ev.get("items"):
            domains = ", ".join(f"{d} {n}" for d, n in sorted((ev.get("domains") or {}).items()))
            sets.setdefault((ev["items"], domains, ev.get("source"), ev.get("seed")), []).append(machine_label(run))
    lines = []
    for (items, domains, source, seed), machines in sets.items():
        where = f" ({', '.join(machines)})" if len(sets) > 1 else ""
        lines.append(f"Evaluated on {items} chats{where}: {domains}; eval set `{source}`, seed {seed}. "
                     f"One answer moves accuracy by {1 / items:.2f}.")  # fmt: skip
    return [*lines, ""] if lines else []


def _by_size(rows: dict[str, dict]) -> list[tuple[str, dict]]:
    """The reference first (the yardstick), then builds from smallest to largest."""
    return sorted(rows.items(), key=lambda kv: (kv[0] != "reference", kv[1]["size_bytes"]))


def _domain_table(rows: dict[str, dict]) -> list[str]:
    domains = sorted({d for v in rows.values() for d in v["drift"] if d != "all"})
    if not domains:
        return []
    out = ["## Mean KLD per clinical domain", "", "| variant | " + " | ".join(domains) + " |",
           "|---|" + "---:|" * len(domains)]  # fmt: skip
    for name, v in _by_size(rows):
        out.append(f"| {name} | " + " | ".join(_fmt(v["drift"].get(d, {}).get("mean_kld"), KLD) for d in domains) + " |")
    return out + [""]


def _speed_table(runs: list[dict]) -> list[str]:
    out = ["## Speed per machine (medians)", "",
           "| machine | variant | runtime | prefill tok/s | decode tok/s | image encode ms | TTFT ms | peak device MB | peak host MB |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for run in runs:
        for v in run["variants"]:
            s = v.get("speed") or {}
            if v.get("status") != "ok" or not (s.get("decode_tok_s") or s.get("ttft_ms")):
                continue  # the reference (drift only) and --no-speed runs have no speed row
            out.append(
                f"| {machine_label(run)} | {v['name']} | {v.get('runtime', '')} | {_fmt(s.get('prefill_tok_s'), '.0f')} | "
                f"{_fmt(s.get('decode_tok_s'), '.1f')} | {_fmt(s.get('image_encode_ms'), '.0f')} | "
                f"{_fmt(s.get('ttft_ms'), '.0f')} | {_fmt(s.get('peak_device_mb'), '.0f')} | {_fmt(s.get('peak_host_mb'), '.0f')} |"
            )
    return out + [""]


def _failures(runs: list[dict]) -> list[str]:
    failed = [(machine_label(r), v) for r in runs for v in r["variants"] if v.get("status") != "ok"]
    if not failed:
        return []
    return ["## Failed variants", ""] + [f"- {m}: `{v['name']}`: {v.get('error', '?')}" for m, v in failed] + [""]


# --------------------------------------------------------------------------- plots


def write_plots(runs: list[dict], out_dir: Path) -> dict[str, str]:
    """Three PNGs; returns title -> file name (relative to the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_path

    rows = {n: v for n, v in drift_rows(runs).items() if n != "reference"}
    plots = {}

    def save(fig, name, title):
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        plots[title] = name

    if rows:
        save(_plot_drift_vs_size(plt, rows), "drift_vs_size.png", "Drift against file size")
        save(_plot_domain_heatmap(plt, rows), "domain_drift.png", "Per-domain drift")
    save(_plot_speed(plt, runs), "speed.png", "Decode speed per machine")
    return plots


def _plot_drift_vs_size(plt, rows):
    sized = {n: (v["size_bytes"] / 1e6, v["drift"]["all"]["mean_kld"]) for n, v in rows.items()}
    front = pareto(sized)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (size, kld) in sized.items():
        ax.scatter(size, max(kld, 1e-9), s=60, marker="*" if name in front else "o",
                   color="tab:red" if name in front else "tab:blue", zorder=3)  # fmt: skip
        ax.annotate(name, (size, max(kld, 1e-9)), textcoords="offset points", xytext=(5, 4), fontsize=8)
    line = sorted(sized[n] for n in front)
    ax.plot([p[0] for p in line], [max(p[1], 1e-9) for p in line], "--", color="tab:red", lw=1, label="Pareto front")
    ax.set(xlabel="file size (MB)", ylabel="mean KLD vs reference (log)", yscale="log", title="Drift vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot_domain_heatmap(plt, rows):
    import numpy as np

    names = sorted(rows, key=lambda n: rows[n]["size_bytes"])
    domains = sorted({d for v in rows.values() for d in v["drift"] if d != "all"})
    grid = np.array([[rows[n]["drift"].get(d, {}).get("mean_kld", np.nan) for d in domains] for n in names])
    fig, ax = plt.subplots(figsize=(1.2 * len(domains) + 3, 0.45 * len(names) + 1.5))
    logs = np.log10(np.maximum(grid, 1e-9))
    im = ax.imshow(logs, cmap="magma_r", aspect="auto")
    mid = np.nanmean(logs)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(domains)):
            dark = logs[i, j] > mid  # dark cells get white text
            ax.text(j, i, _fmt(grid[i, j], ".3g"), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label="log10 mean KLD")
    ax.set_title("Mean KLD per clinical domain")
    return fig


def _plot_speed(plt, runs):
    import numpy as np

    machines = [machine_label(r) for r in runs]
    names = sorted({v["name"] for r in runs for v in r["variants"] if (v.get("speed") or {}).get("decode_tok_s")})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4))
    width = 0.8 / max(len(runs), 1)
    for i, (run, label) in enumerate(zip(runs, machines)):
        speeds = {v["name"]: (v.get("speed") or {}).get("decode_tok_s") for v in run["variants"]}
        vals = [speeds.get(n) or 0 for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(names)) + width * (len(runs) - 1) / 2, names, rotation=20, ha="right")
    ax.set(ylabel="decode tokens/s", title="Decode speed per variant and machine")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def write_report(paths: list[Path], out_dir: Path, force: bool = False) -> Path:
    """report.md and its plots, built in a temporary directory and swapped in whole: a failure
    leaves no half-written report, and an existing one is replaced only with ``force``."""
    from .fileio import atomic_dir

    runs = load_results(paths)
    with atomic_dir(out_dir, force=force, inputs=paths) as tmp:
        plots = write_plots(runs, tmp)
        (tmp / "report.md").write_text(render_markdown(runs, plots))
    return out_dir / "report.md"
