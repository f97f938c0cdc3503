"""One bench variant in its own process: `python -m qoqopt.bench.worker JOB.json RESULT.json`.

A child process per variant gives each one a clean peak-memory reading, and a runtime that aborts
(a llama.cpp assert, a CUDA fault) fails only that variant. The reference job stores its logits for
the variant jobs (see eval_set.py). Errors are written into RESULT.json as one line.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from ..drift import ItemDrift, aggregate_items, extract_boxed, position_stats, set_f1, worst_domain
from .eval_set import eval_items, load_reference, ref_logits, save_reference
from .intervals import chat_totals, mean_kld_interval
from .machine import ru_maxrss_mib
from .speed import SpeedSettings, measure
from .variants import Variant


def open_runner(job: dict):
    variant = Variant(**job["variant"]) if job.get("variant") else None
    files = {k: Path(v) for k, v in (job.get("files") or {}).items()}
    if variant is not None and variant.format == "gguf":
        from .gguf_runner import GGUFRunner

        return GGUFRunner(files["text"], files.get("mmproj"), job["device"], job["threads"], job["answer_tokens"])
    from .hf_runner import load_hf

    return load_hf(Path(job["model"]), variant, files, job["device"], job.get("reference_dtype", "float32"))


def _progress(items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


@contextmanager
def _naming(item):
    """A failure on one chat (an image the runtime refuses, say) says which chat it was: the
    worker's error is the single line the results keep."""
    try:
        yield
    except Exception as exc:
        raise RuntimeError(f"on chat {item.id} ({Path(item.source).name}): {type(exc).__name__}: {exc}") from exc


def _answer_score(runner, item, chat: dict, job: dict, tally: Counter) -> float | None:
    """The greedy answer's set-F1; an answer with no closed \\boxed{} (cut off at answer_tokens, or
    never given) counts in ``tally["unboxed"]``: its 0 says nothing of the build's medicine. Counted,
    not named: a user set's chat ids may carry a patient's record number."""
    if not job["answer_tokens"]:  # drift only: no answer asked for, none scored
        return None
    boxed = extract_boxed(runner.answer(item, chat, job["answer_tokens"]))
    tally["unboxed"] += boxed is None
    return set_f1(boxed, item.answer)


def reference_pass(runner, items, job: dict, tally: Counter) -> list[ItemDrift]:
    chats, out = [], []
    for item in _progress(items, "reference"):
        with _naming(item):
            logits, chat = runner.reference_chat(item)
            _check_finite(logits)
            score = _answer_score(runner, item, chat, job, tally)
        chats.append({"id": item.id, "domain": item.domain, **chat, "score": score, "ref_logits": logits})
        out.append(ItemDrift(item.domain, None, score))
    save_reference(Path(job["ref_dir"]), chats)
    return out


def variant_pass(runner, items, job: dict, tally: Counter) -> list[ItemDrift]:
    chats = load_reference(Path(job["ref_dir"]))
    if [c["id"] for c in chats] != [it.id for it in items]:
        raise RuntimeError("the stored reference was made on different chats")
    out = []
    for item, chat in zip(_progress(items, job["variant"]["name"]), chats):
        with _naming(item):
            cand = _check_finite(runner.reply_logits(item, chat))
            score = _answer_score(runner, item, chat, job, tally)
        stats = position_stats(ref_logits(chat), cand, chat["reply_ids"])
        out.append(ItemDrift(item.domain, stats, score))
    return out


def _check_finite(logits):
    """NaN or inf logits are a build broken in this runtime (an fp16 overflow, a poisoned scale),
    not a drift: their KLD was NaN, which the report showed as "–", i.e. as not measured."""
    import numpy as np

    bad = int(np.count_nonzero(~np.isfinite(logits)))
    if bad:
        raise RuntimeError(f"{bad} of {np.size(logits)} logits are NaN or infinite: the build is broken in this runtime")
    return logits


def drift_json(per_item: list[ItemDrift]) -> tuple[dict, str | None]:
    report = aggregate_items(per_item)
    drift = {key: {**(d.tokens.as_dict() if d.tokens else {}), "accuracy": d.accuracy, "items": d.items}
             for key, d in report.items()}  # fmt: skip
    counts = Counter(it.domain for it in per_item) + Counter(all=len(per_item))
    for key in sorted(counts, key=lambda k: (k == "all", k)):  # the reference of a drift-only run: chats, nothing scored
        drift.setdefault(key, {"accuracy": None, "items": counts[key]})
    if "all" in drift and any(it.stats is not None for it in per_item):
        chats = [it.stats["kld"] for it in per_item if it.stats is not None]
        drift["all"]["mean_kld_ci95"] = mean_kld_interval(chats)
        drift["all"]["chat_kld"] = chat_totals(chats)  # for the report's paired comparison of builds
    return drift, worst_domain(report)


def peak_host_mib() -> float:
    """This process's own peak RSS. Linux carries ru_maxrss across exec (a child started from a
    1.5 GiB bench reads 1.5 GiB before it allocates anything: measured), while /proc's VmHWM
    belongs to the address space exec made."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru_maxrss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run_job(job: dict) -> dict:
    import torch  # the KLD runs in torch for every runtime, so its threads are the job's too

    torch.set_num_threads(job["threads"])
    start = time.time()
    items = eval_items(job["eval"]["source"], job["eval"]["items"], job["eval"]["seed"], domains=job["eval"].get("domains"))
    runner = open_runner(job)
    runner.start_peaks()  # what running needs, not load-time temporaries
    try:
        tally: Counter = Counter()
        run_pass = reference_pass if job["role"] == "reference" else variant_pass
        drift, worst = drift_json(run_pass(runner, items, job, tally))
        speed = {}
        if job.get("speed"):
            speed = measure(runner.profile, items[0].image, items[0].question, SpeedSettings(**job["speed"]))
        speed["peak_device_mb"] = runner.peak_device_mb()
        footprint = getattr(getattr(runner, "model", None), "get_memory_footprint", None)
        result = {"status": "ok", "runtime": runner.runtime, "drift": drift, "worst_domain": worst, "speed": speed,
                  "unboxed": tally["unboxed"], "loaded_bytes": int(footprint()) if footprint else None}  # fmt: skip
    finally:
        runner.close()
    # MiB, under the key's historical name: the whole worker's peak, model load and eval included.
    result["speed"]["peak_host_mb"] = peak_host_mib()
    result["seconds"] = round(time.time() - start, 2)
    return result


def main(argv: list[str]) -> int:
    job_path, out_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    try:
        result = run_job(job)
    except Exception as exc:  # recorded as this variant's failure; the bench goes on with the rest
        msg = " ".join(str(exc).split()) or type(exc).__name__
        result = {"status": "failed", "error": f"{type(exc).__name__}: {msg}"[:500]}
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_json_default))
    tmp.replace(out_path)
    return 0


def _json_default(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
