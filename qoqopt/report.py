"""`qoqopt report`: merge bench result files from several machines into Markdown tables and plots.

A result file (schema `qoqopt.bench/1`, written by `qoqopt bench`) holds one run on one machine:
the machine's hardware/software tags and, per variant, its files, drift against the reference
(overall and per clinical domain) and speed. Drift does not depend on the machine, given the same
files, chats and runtime, so a drift table takes each variant's first successful measurement per
runtime (a GPTQ build in fp32 torch on a CPU and in bf16 Triton on a GPU are two rows), but only
from runs of the same reference, eval set and settings: runs that differ there get a drift table
each, never one table of numbers from different chats or models. Speed is per machine.
A build is Pareto-optimal when no other build is both smaller and drifts less (mean KLD).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

from .bench.intervals import DRAWS, STUDENTIZED_FROM, neighbour_ratio_intervals
from .bench.variants import VARIANT_NAME
from .errors import QoqoptError, printable

SCHEMA = "qoqopt.bench/1"
KLD = ".2e"  # drift spans 1e-6 (Q8_0) to 1e-1 (2-bit): fixed-point would print zeros
CI = "mean_kld_ci95"  # drift.all's [low, high] of the mean KLD (bench/intervals.py)
CHATS = "chat_kld"  # drift.all's [KLD sum, positions] per chat, in eval order (bench/intervals.chat_totals)


def load_results(paths: list[Path]) -> list[dict]:
    """Each result file once (the same file named twice is one run), checked as a bench result. A
    copy of one under another name is one run too: counted twice, it doubled a machine's speed rows
    and put one build in a drift set twice."""
    runs, seen, contents = [], set(), {}
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
        except UnicodeDecodeError:
            raise QoqoptError(f"{path} is not a qoqopt bench result (not UTF-8 text)") from None
        _check_result(data, path)
        key = json.dumps(data, sort_keys=True)
        if key in contents:
            print(f"note: {path} holds the same run as {contents[key]}: counted once", file=sys.stderr)
            continue
        contents[key] = path
        runs.append(data)
    if not runs:
        raise QoqoptError("no result files given")
    _tell_apart(runs, [contents[json.dumps(r, sort_keys=True)] for r in runs])
    return runs


def _tell_apart(runs: list[dict], paths: list[Path]) -> None:
    """Runs sharing a machine label get ``#1``, ``#2``... (in the order given): two rows or legend
    entries of one name could not be told apart."""
    labels = [machine_label(r) for r in runs]
    taken = set(labels)
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        same = [i for i, x in enumerate(labels) if x == label]
        marks = []
        for i in same:
            k = len(marks) + 1
            while f"{label} #{k}" in taken:  # a run already labelled "cpu #1"
                k += 1
            taken.add(f"{label} #{k}")
            marks.append(k)
            runs[i]["run"]["machine"] = {**runs[i]["run"]["machine"], "label": f"{label} #{k}"}
        named = ", ".join(f"{paths[i]} as #{k}" for k, i in zip(marks, same))
        print(f"note: {len(same)} runs are labelled {label!r}: shown as {named}", file=sys.stderr)


# Mean KLDs of one build, chats and reference this far apart (by both measures) are not runtime noise:
# bf16 rounding on another machine moves a KLD of 1e-6 by its own size, not by 1e-4.
DISAGREE, DISAGREE_NATS = 2.0, 1e-4


def say_disagreements(runs: list[dict]) -> None:
    """A note for each build whose runs in one drift set and runtime disagree by more than DISAGREE on
    mean KLD: its drift table shows the first run's numbers only, which would otherwise hide the other's."""
    for members in drift_groups(runs):
        seen: dict[tuple[str, str], tuple[float, dict, list[str]]] = {}
        for run in members:
            for v in run["variants"]:
                kld = (((v.get("drift") or {}).get("all") or {}).get("mean_kld")) if v.get("status") == "ok" else None
                if not _is_number(kld) or not math.isfinite(kld):
                    continue
                key = (v["name"], str(v.get("runtime")))  # another runtime has a row of its own
                if key not in seen:
                    seen[key] = (kld, run, _file_shas(v))
                    continue
                first, where, files = seen[key]
                lo, hi = sorted((first, kld))
                if files == _file_shas(v) and hi > DISAGREE * lo and hi - lo > DISAGREE_NATS:  # other files: refused later
                    print(f"note: {v['name']}'s mean KLD is {first:.3g} in {_run_name(where)} and {kld:.3g} in "
                          f"{_run_name(run)} (same files and chats); the drift table shows the first", file=sys.stderr)


def _check_result(data, path: Path) -> None:
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA:
        raise QoqoptError(f"{path} is not a qoqopt bench result (schema {schema!r}, want {SCHEMA})")
    run, variants = data.get("run"), data.get("variants")
    if not isinstance(run, dict) or not isinstance(run.get("machine"), dict):
        raise QoqoptError(f"{path}: a {SCHEMA} result needs a \"run\" object with its \"machine\"")
    if not isinstance(variants, list) or not all(isinstance(v, dict) and isinstance(v.get("name"), str) for v in variants):
        raise QoqoptError(f"{path}: a {SCHEMA} result needs a \"variants\" list of named objects")
    _check_fields(run["machine"], {"label": str, "cpu": str, "gpu": dict}, f"{path}: run.machine")
    _check_fields(run, {"model": dict, "speed_settings": dict, "eval": dict, "reference_dtype": str, "logits": str},
                  f"{path}: run")  # fmt: skip
    _check_fields(run.get("speed_settings") or {}, {"decode_tokens": int}, f"{path}: run.speed_settings")
    if run.get("reference_dtype") is not None and not WORD.match(run["reference_dtype"]):
        raise QoqoptError(f"{path}: run.reference_dtype {run['reference_dtype']!r} is not a dtype name")
    if run.get("eval") is not None:
        ev = f"{path}: run.eval"
        _check_fields(run["eval"], {"source": str, "items": int, "seed": int, "sha256": str, "domains": dict,
                                    "answer_tokens": int}, ev)  # fmt: skip
        _check_numbers(run["eval"].get("domains") or {}, f"{ev}.domains")
        _check_domain_names(run["eval"].get("domains") or {}, f"{ev}.domains")
        if run["eval"].get("items") is not None and run["eval"]["items"] < 1:
            raise QoqoptError(f"{ev}.items is {run['eval']['items']}; a run has at least one chat")
    for v in variants:
        where = f"{path}: variant {v['name']!r}"
        if not VARIANT_NAME.match(v["name"]):
            raise QoqoptError(f"{where} is not a bench variant name (letters, digits and . _ : + -)")
        _check_fields(v, {"status": str, "error": str, "runtime": str, "worst_domain": str, "files": list,
                          "unboxed": int}, where)  # fmt: skip
        _check_domain_names([v.get("worst_domain") or "all", *(v.get("drift") or {})], where)
        if not all(isinstance(f, dict) for f in v.get("files") or []):
            raise QoqoptError(f"{where}: files is not a list of objects")
        bad = [f.get("sha256") for f in v.get("files") or [] if f.get("sha256") is not None and not SHA256.match(str(f["sha256"]))]
        if bad:
            raise QoqoptError(f"{where}: files[].sha256 {bad[0]!r} is not a sha256 (64 hex digits)")
        _check_speed(v.get("speed") or {}, f"{where}: speed")
        if v.get("status") == "ok" and v.get("drift"):
            _check_measured(v, where)


# names that become table cells, headers and plot labels as they are: a bench variant (VARIANT_NAME:
# gguf:Q4_K_M, gptq:4, bnb:nf4) and a clinical domain
DOMAIN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
WORD = re.compile(r"^[A-Za-z0-9_]+$")  # a dtype's name (float32, bfloat16)
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_domain_names(names, where: str) -> None:
    bad = [n for n in names if not (isinstance(n, str) and DOMAIN_NAME.match(n))]
    if bad:
        raise QoqoptError(f"{where}: {bad[0]!r} is not a clinical domain name (lower-case letters, digits, _ and -)")


def _check_speed(speed, where: str) -> None:
    """Numbers, under "spread" a [min, max] pair of numbers (or null) for each rate, and "prefill" a string."""
    if isinstance(speed, dict) and not isinstance(speed.get("prefill", ""), str):
        raise QoqoptError(f"{where}.prefill is {speed['prefill']!r}, not a string")
    numbers = {k: x for k, x in speed.items() if k not in ("spread", "prefill")} if isinstance(speed, dict) else speed
    _check_numbers(numbers, where)
    spread = speed.get("spread") or {}
    if not isinstance(spread, dict):
        raise QoqoptError(f"{where}.spread is {spread!r}, not an object")
    for key, pair in spread.items():
        _check_pair(pair, f"{where}.spread.{key}")


def _check_pair(pair, where: str) -> None:
    """A [low, high] pair of numbers, or null."""
    if pair is not None and not (isinstance(pair, list) and len(pair) == 2 and all(_is_number(x) for x in pair)):
        raise QoqoptError(f"{where} is {pair!r}, not a [min, max] pair of numbers")


def _check_fields(obj, kinds: dict[str, type], where: str) -> None:
    """Each of ``kinds`` present in ``obj`` is of its type, or null (a hand edit gave tracebacks)."""
    if not isinstance(obj, dict):
        raise QoqoptError(f"{where} is not an object")
    for key, kind in kinds.items():
        value = obj.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise QoqoptError(f"{where}.{key} is {value!r}; a {SCHEMA} result has a {kind.__name__} there")


def _check_measured(v: dict, where: str) -> None:
    """What the tables and plots read of a measured variant: numbers (or null, shown as –) where they
    read numbers, a size and, but for the reference (no KLD of its own), an overall mean KLD."""
    drift = v["drift"]
    if not isinstance(drift, dict) or not isinstance(drift.get("all"), dict):
        raise QoqoptError(f"{where} has drift but no drift.all")
    for domain, numbers in drift.items():
        if isinstance(numbers, dict) and CI in numbers:
            _check_pair(numbers[CI], f"{where}: drift.{domain}.{CI}")
        if isinstance(numbers, dict) and CHATS in numbers:
            _check_chat_totals(numbers[CHATS], f"{where}: drift.{domain}.{CHATS}")
        if isinstance(numbers, dict):
            numbers = {k: x for k, x in numbers.items() if k not in (CI, CHATS)}
        _check_numbers(numbers, f"{where}: drift.{domain}")
        for key in ("mean_kld", "p99_kld"):  # NaN is a measurement that failed, shown as –
            kld = numbers.get(key)
            if kld is not None and (kld < 0 or math.isinf(kld)):
                raise QoqoptError(f"{where}: drift.{domain}.{key} is {kld}; a KL divergence is finite and >= 0")
    size, kld = v.get("size_bytes"), drift["all"].get("mean_kld")
    if not _is_number(size) or not math.isfinite(size) or size <= 0:
        raise QoqoptError(f"{where} has drift but size_bytes {size!r}; a measured build has a positive size")
    if v["name"] != "reference" and not _is_number(kld):
        raise QoqoptError(f"{where} has drift but no drift.all.mean_kld")


def _check_chat_totals(totals, where: str) -> None:
    """A list of [KLD sum, positions] per chat (or null): a finite sum >= 0 and a whole count."""
    fine = isinstance(totals, list) and all(
        isinstance(t, list) and len(t) == 2 and _is_number(t[0]) and math.isfinite(t[0]) and t[0] >= 0
        and isinstance(t[1], int) and not isinstance(t[1], bool) and t[1] >= 0 for t in totals)  # fmt: skip
    if totals is not None and not fine:
        raise QoqoptError(f"{where} is not a list of [KLD sum, positions] pairs, one per chat")


def _check_numbers(obj, where: str) -> None:
    if not isinstance(obj, dict):
        raise QoqoptError(f"{where} is {obj!r}, not an object")
    for key, value in obj.items():
        if value is not None and not _is_number(value):
            raise QoqoptError(f"{where}.{key} is {value!r}, not a number")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def machine_label(run: dict) -> str:
    m = run["run"]["machine"]
    return m.get("label") or (m.get("gpu") or {}).get("name") or m.get("cpu", "unknown")


def _markdown_label(run: dict) -> str:
    """The machine label as one line of plain Markdown (a table cell): bench refuses `|` and a backtick
    in --label, but a result from before that, a CPU's own name or a hand edit may hold anything."""
    return inline_text(machine_label(run))


_MARKDOWN_ACTIVE = re.compile(r"([\\|<>\[\]])")


def inline_text(text: str) -> str:
    """A result's free text (a machine label, a runtime, an error) as one line of plain Markdown
    text: result files travel between sites and their text lands on published cards, so no newline
    (a heading, a section), HTML tag, link or image, table cell break or code span can come of it,
    nor, where it starts a line or a list item, a heading, rule, fence, quote or list; control
    characters are shown, not sent to a terminal."""
    text = _MARKDOWN_ACTIVE.sub(r"\\\1", printable(code_text(text)))
    return _BLOCK_START.sub(r"\1\\\2", text)


_BLOCK_START = re.compile(r"^(\d*)([#=*+~>.)-])")  # what opens a block at a line's start ("1." a list)


def code_text(text: str) -> str:
    """Free text for inside a code span (where backslashes stay literal): one line, no backtick."""
    return " ".join(str(text).split()).replace("`", "'")


def drift_groups(runs: list[dict]) -> list[list[dict]]:
    """The runs whose drift can share one table, in order of first appearance: measured against the
    same reference (its files' sha256, else the model named) in the same dtype, on the same chats
    (eval set, count, seed, answer tokens). Speed is compared across all runs; drift only within a group."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(_drift_key(run), []).append(run)
    return list(groups.values())


def _drift_key(run: dict) -> tuple:
    r, ev = run["run"], run["run"].get("eval") or {}
    chats = (ev.get("sha256") or ev.get("source"), ev.get("ids_sha256"), ev.get("items"), ev.get("seed"),
             json.dumps(ev.get("domains"), sort_keys=True))  # fmt: skip
    return (_model_key(run), *chats, ev.get("answer_tokens"), r.get("reference_dtype"), r.get("logits"))


def _model_key(run: dict):
    """The model a run measured: its reference's files (sha256), else the model it names."""
    return tuple(_file_shas(_reference(run))) or (run["run"].get("model") or {}).get("source")


def speed_groups(runs: list[dict]) -> list[list[int]]:
    """Indexes of the runs whose speed rows can share a table, in order of first appearance: one
    model timed over one decode length. Machines and eval sets mix there; a 7B's rows beside a
    32B's, or 32-token decodes beside 256-token ones, would read as one comparison."""
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        if _timed(run):  # a --no-speed run has no row to place
            decode = (run["run"].get("speed_settings") or {}).get("decode_tokens")
            groups.setdefault((_model_key(run), decode), []).append(i)
    return list(groups.values())


def _timed(run: dict) -> list[dict]:
    """The run's variants with speed rows (the reference is timed for drift only)."""
    return [v for v in run["variants"] if v.get("status") == "ok"
            and ((v.get("speed") or {}).get("decode_tok_s") or (v.get("speed") or {}).get("ttft_ms"))]  # fmt: skip


def drift_rows(runs: list[dict]) -> dict[str, dict]:
    """Row label -> drift/size record, from runs of one drift group. Runs from several machines
    measure the same files, so the first successful record in a runtime stands for that runtime's
    runs. Another runtime computes otherwise (a GPTQ build runs fp32 torch on a CPU, bf16 Triton on a
    GPU; a GGUF runs offloaded or not): its numbers get their own row, labelled with the runtime. A
    name measured on other files (another build of that type) cannot share its rows."""
    out: dict[tuple[str, str], dict] = {}
    first: dict[str, tuple[dict, dict]] = {}  # variant name -> its first record and that record's run
    for run in runs:
        for v in run["variants"]:
            if v.get("status") != "ok" or not v.get("drift"):
                continue
            seen, where = first.setdefault(v["name"], (v, run))
            if _file_shas(v) != _file_shas(seen):
                raise QoqoptError(f"{v['name']} was measured on other files in {_run_name(run)} than in "
                                  f"{_run_name(where)} (another build): report those runs separately")  # fmt: skip
            out.setdefault((v["name"], str(v.get("runtime"))), v)
    runtimes = Counter(name for name, _ in out)
    rows = {}
    for (name, runtime), v in out.items():  # the label is the record's name downstream (tables, plots, publish)
        label = name if runtimes[name] == 1 else f"{name} ({_runtime_tag(runtime)})"
        rows[label] = v if label == name else {**v, "name": label}
    return rows


def _runtime_tag(runtime: str) -> str:
    """A runtime (a result file's free text) as part of a row label, which tables, plots and publish
    take as it is: only characters that no Markdown, HTML or plot label reads as markup."""
    return " ".join(re.sub(r"[^\w .,:+()-]", " ", runtime).split())[:80]


def _reference_line(run: dict, dtype: str | None, tail: str) -> str:
    """What sets a table's reference apart: `publish` reads "Reference: `...`" and hides a local path there."""
    source = (run["run"].get("model") or {}).get("source")
    return f"Reference: `{code_text(source)}` ({f'{dtype}; ' if dtype else ''}weights sha256 {_weights_sha(run)}); {tail}."


def _weights_sha(run: dict) -> str:
    """The reference's weights as a reader tells two models apart: each file's sha256, shortened."""
    return ", ".join(sha[:12] for sha in _file_shas(_reference(run))) or "not recorded"


def _reference(run: dict) -> dict:
    return next((v for v in run["variants"] if v["name"] == "reference"), {})


def _file_shas(v: dict) -> list[str]:
    return sorted(str(f.get("sha256")) for f in v.get("files") or [])  # a list of objects: _check_result


def _run_name(run: dict) -> str:
    started = run["run"].get("started")
    return f"the run on {machine_label(run)}" + (f" started {started}" if started else "")


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


def _short_of_100(pct) -> str:
    """A percentage to one decimal, or as many more (up to 4) as show it is not 100: one changed top
    token in 2,400 positions is 99.96%, which one decimal printed as a perfect 100.0."""
    decimals = 1
    while _is_number(pct) and pct < 100 and round(pct, decimals) >= 100 and decimals < 4:
        decimals += 1
    return _fmt(pct, f".{decimals}f")


def render_markdown(runs: list[dict], plots: dict[str, str] | None = None) -> str:
    machines = [_markdown_label(r) for r in runs]
    out = ["# qoqopt report", "", f"Runs merged: {len(runs)} ({', '.join(machines)}).", ""]
    groups = drift_groups(runs)
    for n, members in enumerate(groups, 1):
        out += _drift_section(members, f", set {n} of {len(groups)}" if len(groups) > 1 else "")
    timing = speed_groups(runs)
    for n, members in enumerate(timing, 1):
        out += _speed_table(runs, members, f", set {n} of {len(timing)}" if len(timing) > 1 else "")
    out += _failures(runs)
    if plots:
        out += ["## Plots", ""] + [f"![{title}]({path})" for title, path in plots.items()] + [""]
    return "\n".join(out)


def _drift_section(runs: list[dict], which: str) -> list[str]:
    """The drift and per-domain tables of one drift group; ``which`` names the group when there are several."""
    rows = drift_rows(runs)
    front, paired = pareto(_sized(rows)), _paired_table(rows, which)
    out = [f"## Drift against the reference (same chats, same positions){which}", "", *_eval_lines(runs[0])]
    if which:  # what sets this group apart from the others: two models may share a folder name
        out += [_reference_line(runs[0], runs[0]["run"].get("reference_dtype"),
                                f"runs: {', '.join(_markdown_label(run) for run in runs)}"), ""]  # fmt: skip
    if runs[0]["run"].get("logits") is None:
        out += ["Measured by a qoqopt before 2026-12-03: transformers' logits (the reference's, when it runs in "
                "bf16, and a bf16 or bitsandbytes variant's) were rounded to bf16 before the KLD, a floor near "
                "1e-4 that newer runs do not have; compared only with runs like it.", ""]
    out += [files_comment((None, v) for _, v in _by_size(rows)),
            "| variant | size MB | mean KLD | 95% CI | p99 KLD | same top % | RMS Δp % | answer acc | worst domain | Pareto |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|:-:|"]  # fmt: skip
    for name, v in _by_size(rows):
        a = v["drift"]["all"]
        out.append(
            f"| {name} | {v['size_bytes'] / 1e6:.1f} | {_fmt(a.get('mean_kld'), KLD)} | {_interval(a.get(CI))} | "
            f"{_fmt(a.get('p99_kld'), KLD)} | "
            f"{_short_of_100(a.get('same_top_pct'))} | {_fmt(a.get('rms_dp_pct'), '.3g')} | {_accuracy(a, v)} | "
            f"{v.get('worst_domain') or '–'} | {'★' if name in front else ''} |"
        )
    out += ["", f"95% CI: the range the mean KLD took over {DRAWS} redraws of these chats (bootstrap-t on its log; "
            f"under {STUDENTIZED_FROM} chats the redraws' own percentiles; a chat's positions drawn together, as they share its image and reply; in simulated evals of 20 chats "
            "it held the true mean 93% of the time): how much the number rests on which chats were drawn. Every build is "
            "measured on the same chats, so their difference can be surer than two overlapping ranges "
            f"suggest{' (the paired table)' if paired else ''}.", "",
            f"★ Pareto-optimal: {PARETO_PHRASE} smaller and lower in mean KLD. Size: every file a build "
            "loads (a GGUF build's text file and mmproj; a GPTQ/AWQ build's safetensors and config); for the "
            "reference, a dtype or a bitsandbytes variant, its weights as loaded in that dtype or quantization.", ""]
    return out + _unboxed_lines(rows, runs[0]) + _domain_table(rows, which) + paired


def _paired_table(rows: dict[str, dict], which: str = "") -> list[str]:
    """Each build against the next smaller one, on the same redraws of the same chats: whether the
    extra bytes buy a drift these chats can tell apart. Builds measured before bench kept its
    chats' totals are left out (a build is then compared with the next smaller one that has them)."""
    builds = [(n, v) for n, v in _by_size(rows) if n != "reference" and v["drift"]["all"].get(CHATS)]
    intervals = neighbour_ratio_intervals([v["drift"]["all"][CHATS] for _, v in builds])
    pairs = [(small, big, ci) for small, big, ci in zip(builds, builds[1:], intervals) if ci is not None]
    if not pairs:
        return []
    out = [f"## Each build against the next smaller one (paired){which}", "",
           "Mean KLD divided by the next smaller build's (of those whose result keeps each chat's totals), over "
           "the same redraws of the same chats. Where builds find the same chats hard, the ratio varies less than "
           "either mean, and builds whose own ranges overlap can still be told apart. Each range is studentized "
           f"(bootstrap-t on the log ratio, {DRAWS} redraws; under {STUDENTIZED_FROM} chats, the redraws' own "
           "percentiles)" + _joint_note(len(pairs)) + " In simulated evals of 20 chats such ranges held their "
           "ratios a little less often than they say (a 95% range 93-95% of the time). On a model card the build compared with may be another format's, "
           "not shown there.", "",
           files_comment((None, big[1]) for _, big, _ in pairs),
           "| variant | against | mean KLD ratio | joint 95% CI | told apart |", "|---|---|---:|---:|---|"]
    for (small, _), (name, v), (low, high) in pairs:
        ratio = v["drift"]["all"]["mean_kld"] / rows[small]["drift"]["all"]["mean_kld"]
        verdict = "yes, lower" if high < 1 else "yes, higher" if low > 1 else "no, not by these chats"
        out.append(f"| {name} | {small} | {ratio:.4g} | {low:.4g}–{high:.4g} | {verdict} |")
    return out + [""]


def _joint_note(pairs: int) -> str:
    if pairs == 1:
        return ", meant to hold the true ratio 95% of the time."
    return (f"; the {pairs} are joint: they hold their true ratios all together 95% of the time (each a "
            f"{100 - 5 / pairs:.4g}% range), so a \"yes\" is not one pair's luck among several.")


def _interval(pair) -> str:
    return f"{_fmt(pair[0], KLD)}–{_fmt(pair[1], KLD)}" if pair else "–"


def _accuracy(drift_all: dict, variant: dict) -> str:
    """The accuracy cell, with its answers that had no `\\boxed{}` (each scored 0) beside it: in the
    row, so a card that keeps one build's rows says nothing of the others'."""
    cut = variant.get("unboxed")
    return _fmt(drift_all.get("accuracy"), ".2f") + (f" ({cut} unboxed)" if cut else "")


def _unboxed_lines(rows: dict[str, dict], run: dict) -> list[str]:
    """A reply cut off at the run's answer_tokens is not a wrong answer, and a column of them
    measures the limit, not the build."""
    if not any(v.get("unboxed") for v in rows.values()):
        return []
    limit = (run["run"].get("eval") or {}).get("answer_tokens")
    return [f"(n unboxed): n answers with no `\\boxed{{}}`, each scored 0: cut off at the run's {limit} answer "
            "tokens, or never given; if cut off, run again with a larger `--answer-tokens`.", ""]


def _sized(rows: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """(size, mean KLD) of each build with a KLD (a NaN is no measurement: it cannot be on the front)."""
    sized = {n: (v["size_bytes"], v["drift"]["all"]["mean_kld"]) for n, v in rows.items() if n != "reference"}
    return {n: p for n, p in sized.items() if not math.isnan(p[1])}


def _eval_lines(run: dict) -> list[str]:
    """How many chats the drift and accuracy columns rest on (one eval for a whole drift set): with
    a handful, one answer moves the accuracy a lot, and a reader of clinical evidence must see that
    beside the numbers."""
    ev = run["run"].get("eval") or {}
    if not ev.get("items"):
        return []
    domains = ", ".join(f"{d} {n}" for d, n in sorted((ev.get("domains") or {}).items()))
    answers = ("No answers were asked for (`--answer-tokens 0`): drift only." if ev.get("answer_tokens") == 0
               else f"One answer moves accuracy by {1 / ev['items']:.2f}.")  # fmt: skip
    return [f"Evaluated on {ev['items']} chats: {domains}; eval set `{code_text(ev.get('source'))}`, seed {ev.get('seed')}. "
            f"{answers}{_builtin_note(ev.get('source'))}", ""]  # fmt: skip


def _builtin_note(source) -> str:
    """The built-in set's chats are views of a few scans, which its calibration split shares: a
    reader must not take them for held-out patients."""
    if source != "clinical":
        return ""
    from .bench.eval_set import builtin_scans

    scans = builtin_scans()
    return (f" The built-in set's chats are seeded views (crops, windows, flips) of {sum(scans.values())} source "
            f"scans ({', '.join(f'{d} {n}' for d, n in sorted(scans.items()))}), the same ones its calibration split "
            "draws on: held-out views, not held-out patients. For evidence about a service, bench its own "
            "scans (`--eval`).")


def _by_size(rows: dict[str, dict]) -> list[tuple[str, dict]]:
    """The reference first (the yardstick), then builds from smallest to largest."""
    return sorted(rows.items(), key=lambda kv: (kv[0] != "reference", kv[1]["size_bytes"]))


def _domain_table(rows: dict[str, dict], which: str = "") -> list[str]:
    domains = sorted({d for v in rows.values() for d in v["drift"] if d != "all"})
    if not domains:
        return []
    out = _per_domain(rows, domains, f"## Mean KLD per clinical domain{which}", domains, "mean_kld", KLD)
    if any(_is_number(v["drift"].get(d, {}).get("accuracy")) for v in rows.values() for d in domains):
        # a build can keep its KLD low overall and still lose the answers of one modality; each
        # domain has few chats, so the header says how many one answer is out of
        counts = {d: max((v["drift"].get(d, {}).get("items") or 0 for v in rows.values()), default=0) for d in domains}
        header = [f"{d} ({counts[d]})" if counts[d] else d for d in domains]
        out += _per_domain(rows, domains, f"## Answer accuracy per clinical domain{which}", header, "accuracy", ".2f")
        out += ["Accuracy: set-F1 of the greedy answer's `\\boxed{}` conditions against the item's; in brackets, "
                "each domain's chats.", ""]
    return out


def _per_domain(rows: dict[str, dict], domains: list[str], title: str, header: list[str], key: str, spec: str) -> list[str]:
    out = [title, "", files_comment((None, v) for _, v in _by_size(rows)),
           "| variant | " + " | ".join(header) + " |",
           "|---|" + "---:|" * len(domains)]  # fmt: skip
    for name, v in _by_size(rows):
        out.append(f"| {name} | " + " | ".join(_fmt(v["drift"].get(d, {}).get(key), spec) for d in domains) + " |")
    return out + [""]


def _speed_table(runs: list[dict], members: list[int], which: str = "") -> list[str]:
    """One speed group's rows (run indexes ``members``); ``which`` names the group among several."""
    timed = [(i, v) for i in members for v in _timed(runs[i])]
    out = [f"## Speed per machine (medians){which}", ""]
    if which:
        r = runs[members[0]]["run"]
        out += [_reference_line(runs[members[0]], None, f"{(r.get('speed_settings') or {}).get('decode_tokens')} "
                                "decode tokens a request"), ""]  # fmt: skip
    out += [files_comment(timed),
            "| machine | variant | runtime | prompt tokens | prefill tok/s | decode tok/s (range) | image encode ms | TTFT ms "
            "| peak device MiB | peak host MiB |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for i, v in timed:
        s = v["speed"]
        older = " †" if "spread" not in s else " ‡" if _older_prefill(v) else ""
        out.append(
            f"| {_markdown_label(runs[i])}{older} | {v['name']} | {inline_text(v.get('runtime', ''))} | {_fmt(s.get('prompt_tokens'), '.0f')} | "
            f"{_fmt(s.get('prefill_tok_s'), '.0f')} | {_decode_cell(s)} | {_fmt(s.get('image_encode_ms'), '.0f')} | "
            f"{_fmt(s.get('ttft_ms'), '.0f')} | {_fmt(s.get('peak_device_mb'), '.0f')} | {_fmt(s.get('peak_host_mb'), '.0f')} |"
        )
    if any("spread" not in v["speed"] for _, v in timed):
        out += ["", "† measured by a qoqopt before 2026-12-02 (no repeat range recorded): its transformers decode "
                "rate was the difference of two requests, and its peak host memory could be the bench process's "
                "own; not comparable with the other rows."]  # fmt: skip
    if any(_older_prefill(v) for _, v in timed):
        out += ["", "‡ measured by a qoqopt before 2026-12-03: its transformers prefill tok/s was TTFT less the "
                "image encode, generate()'s own host work included (16-19 ms a request on an H200); now the "
                "language model's first forward. Its other columns compare."]  # fmt: skip
    return out + [""]


def _older_prefill(variant: dict) -> bool:
    """A transformers row whose prefill rate held generate()'s host work (llama.cpp's is unchanged)."""
    s = variant["speed"]
    return "spread" in s and "prefill" not in s and not str(variant.get("runtime") or "").startswith("llama.cpp")


def _decode_cell(speed: dict) -> str:
    """Median decode tok/s, with the repeats' range when the run recorded one."""
    lo_hi = (speed.get("spread") or {}).get("decode_tok_s")
    cell = _fmt(speed.get("decode_tok_s"), ".1f")
    return f"{cell} ({lo_hi[0]:.1f}–{lo_hi[1]:.1f})" if lo_hi and (speed.get("repeats") or 0) > 1 else cell


def _failures(runs: list[dict]) -> list[str]:
    failed = [(i, v) for i, r in enumerate(runs) for v in r["variants"] if v.get("status") != "ok"]
    if not failed:
        return []
    return (["## Failed variants", "", files_comment(failed)]
            + [f"- {_markdown_label(runs[i])}: `{v['name']}`: {inline_text(v.get('error') or 'no error recorded')}" for i, v in failed] + [""])


FILES_TAG = "<!-- qoqopt-files "
PARETO_PHRASE = "no other build is both"  # publish rewords it on a card that leaves builds out


def files_comment(rows) -> str:
    """Hidden in the Markdown, for each following row in order (``rows``: (the run's index or None,
    variant record)): its variant, the sha256s of its files, and for tables across runs the run it
    comes from. `publish` puts on a build's card only the rows measured on that build's own files,
    and the reference rows of those runs."""
    entries = [{"variant": v["name"], "files": _file_shas(v), "run": run} for run, v in rows]
    body = json.dumps(entries).replace("--", "-\\u002d")  # JSON's own escape: no "--" can end the comment early
    return f"{FILES_TAG}{body} -->"


# --------------------------------------------------------------------------- plots


def write_plots(runs: list[dict], out_dir: Path) -> dict[str, str]:
    """Drift plots per drift group, a speed plot per speed group; returns title -> file name (relative to the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_path

    plots = {}

    def save(fig, name, title):
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        plots[title] = name

    groups = drift_groups(runs)
    for n, members in enumerate(groups, 1):
        rows = {k: v for k, v in drift_rows(members).items() if k != "reference"}
        suffix, which = (f"-{n}", f" (set {n} of {len(groups)})") if len(groups) > 1 else ("", "")
        if _sized(rows):
            save(_plot_drift_vs_size(plt, rows), f"drift_vs_size{suffix}.png", f"Drift against size{which}")
        if rows:
            save(_plot_domain_heatmap(plt, rows), f"domain_drift{suffix}.png", f"Per-domain drift{which}")
    timing = speed_groups(runs)
    for n, members in enumerate(timing, 1):
        timed = [runs[i] for i in members]
        suffix, which = (f"-{n}", f" (set {n} of {len(timing)})") if len(timing) > 1 else ("", "")
        if any((v.get("speed") or {}).get("decode_tok_s") for run in timed for v in run["variants"]):  # TTFT alone: no bars
            save(_plot_speed(plt, timed), f"speed{suffix}.png", f"Decode speed per machine{which}")
    return plots


def _plot_drift_vs_size(plt, rows):
    sized = {n: (size / 1e6, kld) for n, (size, kld) in _sized(rows).items()}
    front = pareto(sized)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (size, kld) in sized.items():
        ax.scatter(size, max(kld, 1e-9), s=60, marker="*" if name in front else "o",
                   color="tab:red" if name in front else "tab:blue", zorder=3)  # fmt: skip
        ax.annotate(name, (size, max(kld, 1e-9)), textcoords="offset points", xytext=(5, 4), fontsize=8)
    line = sorted(sized[n] for n in front)
    ax.plot([p[0] for p in line], [max(p[1], 1e-9) for p in line], "--", color="tab:red", lw=1, label="Pareto front")
    ax.set(xlabel="size (MB): files, or weights as loaded", ylabel="mean KLD vs reference (log)", yscale="log", title="Drift vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot_domain_heatmap(plt, rows):
    import numpy as np

    names = sorted(rows, key=lambda n: rows[n]["size_bytes"])
    domains = sorted({d for v in rows.values() for d in v["drift"] if d != "all"})
    kld = [[rows[n]["drift"].get(d, {}).get("mean_kld") for d in domains] for n in names]
    grid = np.array([[np.nan if x is None else x for x in row] for row in kld], dtype=float)
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
    """One bar per machine and build at its decode speed; none where a machine has no number (a
    failed or unrun build was drawn as a real 0). A build run in two runtimes (llama.cpp on the CPU
    in one run, on the GPU in another) is two groups, named as the tables name them."""
    import numpy as np

    machines = [machine_label(r).replace("$", r"\$") for r in runs]  # matplotlib reads $...$ as math

    def key(v) -> tuple[str, str]:
        return v["name"], str(v.get("runtime"))

    keys = sorted({key(v) for r in runs for v in r["variants"] if (v.get("speed") or {}).get("decode_tok_s")})
    runtimes = Counter(name for name, _ in keys)
    names = [name if runtimes[name] == 1 else f"{name} ({_runtime_tag(runtime)})" for name, runtime in keys]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4))
    width = 0.8 / max(len(runs), 1)
    for i, (run, label) in enumerate(zip(runs, machines)):
        speeds = {key(v): (v.get("speed") or {}).get("decode_tok_s") for v in run["variants"]}
        vals = [speeds.get(k) or np.nan for k in keys]  # NaN: no bar
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(names)) + width * (len(runs) - 1) / 2, names, rotation=20, ha="right")
    ax.set(ylabel="decode tokens/s", title="Decode speed per variant and machine")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def write_report(paths: list[Path], out_dir: Path, force: bool = False) -> Path:
    """report.md and its plots, built in a temporary directory and swapped in whole: a failure
    leaves no half-written report, and an existing one is replaced only with ``force``."""
    from .fileio import Owned, atomic_dir, holding

    runs = load_results(paths)
    owned = Owned("report.md written by qoqopt report", holding("report.md", "# qoqopt report"))
    say_disagreements(runs)
    with atomic_dir(out_dir, force=force, inputs=paths, owned=owned) as tmp:
        plots = write_plots(runs, tmp)
        (tmp / "report.md").write_text(render_markdown(runs, plots))
    return out_dir / "report.md"
