"""Benchmark: qoqopt's GPTQ export against GPTQModel's quantizer, same model, same calibration chats.

    .venv/bin/python benchmarks/bench_vs_gptqmodel.py --python /work/gptq-venv/bin/python [--samples 32] [--seeds 0,1,2] [--json PATH]

GPTQModel is the GPTQ quantizer transformers defers to; it pins a newer torch than this project's
.venv, so it runs from a second virtualenv (`--python`; set up as in check_ecosystem_loaders.py).
Both quantize the trained mini QoQ-Med (tiny, 2 decoder layers) to GPTQ 4-bit, group 128,
symmetric, no act-order, damp 0.01, fp32 compute (GPTQModel would pick bf16 on the CPU), each
tool's default visiting order (both GAR), from the same domain-balanced clinical image chats
(qoqopt's calib split: the image, the question and the reference reply; GPTQModel's chat template
adds a trailing generation prompt after the reply), drawn with each of several seeds. qoqopt also
runs with ``--natural-order`` (plain GPTQ) as the in-run measure of the visiting order. Each run
is its own process on the same threads; reported per tool and seed:

* wall time and peak RSS of the whole process (imports, model load, calibration, quantization,
  save), from os.wait4;
* drift: the checkpoint dequantized by the GPTQ spec reader (benchmarks/spec_layout.py, neither
  tool's code) into the fp32 transformers model, mean KLD and same-top-1 against the fp32 model on
  held-out clinical chats (eval split, reference replies teacher-forced);
* which Linears were quantized, and the bytes on disk.

The mini model is tiny (its vocabulary is 97% of its parameters), so time and memory here are mostly
fixed costs. Its drift moves by up to 2x with the calibration draw alone (two quantized layers, 14
matrices), which is why several seeds are run and compared as means. Results are printed and saved
as JSON (default benchmarks/results/vs_gptqmodel.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from check_ecosystem_loaders import load_batches, save_batches, write_source  # benchmarks/ is on sys.path
from measure import run_measured

REPO = Path(__file__).resolve().parents[1]
GPTQ = dict(bits=4, group_size=128, sym=True, desc_act=False, damp_percent=0.01)


# =========================================================================== GPTQModel (its venv)


def quantize_with_gptqmodel(work: Path, seed: int) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    os.chdir(work)  # GPTQModel writes its per-module log files under ./logs
    chats = json.loads((work / f"calib-{seed}.json").read_text())
    model = GPTQModel.load(str(work / "source"), QuantizeConfig(**GPTQ), device="cpu", dtype=torch.float32)
    model.quantize(chats, batch_size=1)
    model.save(str(work / f"gptqmodel-{seed}"))
    print("ok")


# =========================================================================== here (.venv)


def prepare(work: Path, samples: int, seeds: list[int], eval_chats: int) -> None:
    """The trained mini model as a checkpoint, the calibration chats in GPTQModel's conversation form
    (images as PNG files), and the held-out chats encoded once (with each reply's token count)."""
    import torch

    from qoqopt.calibration import encode_chat
    from qoqopt.data import balanced_sample, clinical_set
    from qoqopt.processor import load_processor

    write_source(work / "source", layout="runtime")
    for seed in seeds:
        _write_calibration(work, samples, seed)
    proc = load_processor(work / "source")
    batches = []
    for item in balanced_sample(clinical_set("eval", n_per_base=1), eval_chats, seed=0):
        reply = len(proc.tokenizer(item.target_text() + "<|im_end|>").input_ids)
        batches.append(encode_chat(proc, item, with_answer=True) | {"reply": torch.tensor([reply])})
    save_batches(work / "eval.safetensors", batches)


def _write_calibration(work: Path, samples: int, seed: int) -> None:
    """The chats `qoqopt export --samples N --seed S` draws, as GPTQModel conversations."""
    from qoqopt.calibration import calibration_items

    items, _ = calibration_items("clinical", samples, seed)
    images = work / f"images-{seed}"
    images.mkdir(exist_ok=True)
    chats = []
    for i, item in enumerate(items):
        path = images / f"{i}.png"
        item.image.save(path)
        chats.append([
            {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": item.question}]},
            {"role": "assistant", "content": [{"type": "text", "text": item.target_text()}]},
        ])  # fmt: skip
    (work / f"calib-{seed}.json").write_text(json.dumps(chats))


def _reply_logits(model, chats: list[dict]) -> list[tuple]:
    """(logits, next tokens) at each chat's reply positions."""
    import torch

    out = []
    with torch.inference_mode():
        for chat in chats:
            n = int(chat["reply"])
            inputs = {k: v for k, v in chat.items() if k != "reply"}
            out.append((model(**inputs).logits[0, -n - 1 : -1].numpy(), inputs["input_ids"][0, -n:].numpy()))
    return out


class Judge:
    """The fp32 model, loaded once: a checkpoint's dequantized weights go in, drift against the
    model's own logits comes out, the original weights go back."""

    def __init__(self, work: Path):
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(work / "source"), dtype=torch.float32).eval()
        self.chats = load_batches(work / "eval.safetensors")
        self.reference = _reply_logits(self.model, self.chats)

    def drift(self, export: Path) -> dict:
        """The export dequantized by the spec reader (neither tool's code), measured as `qoqopt bench` does."""
        import numpy as np
        import torch
        from spec_layout import spec_weights

        from qoqopt.drift import position_stats, summarize_positions

        weights = spec_weights(export)
        originals = {name: self.model.get_submodule(name).weight.detach().clone() for name in weights}
        with torch.no_grad():
            for name, w in weights.items():
                self.model.get_submodule(name).weight.copy_(w)
            try:
                stats = [position_stats(ref, cand, targets)
                         for (ref, targets), (cand, _) in zip(self.reference, _reply_logits(self.model, self.chats))]  # fmt: skip
            finally:
                for name, w in originals.items():
                    self.model.get_submodule(name).weight.copy_(w)
        d = summarize_positions({k: np.concatenate([s[k] for s in stats]) for k in stats[0]})
        return {"quantized_linears": len(weights), "positions": d.positions, "mean_kld": d.mean_kld,
                "p99_kld": d.p99_kld, "same_top1_pct": d.same_top_pct,
                "disk_bytes": sum(f.stat().st_size for f in export.glob("*.safetensors"))}  # fmt: skip


def run(python: str, work: Path, samples: int, seeds: list[int], eval_chats: int) -> dict:
    prepare(work, samples, seeds, eval_chats)
    env = {"PYTHONPATH": str(REPO)}
    judge = Judge(work)
    result = {"benchmark": "vs_gptqmodel", "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
              "model": "trained mini QoQ-Med (tiny)", "gptq": GPTQ, "calibration_chats": samples,
              "eval_chats": eval_chats, "runs": []}  # fmt: skip
    for seed in seeds:
        export = [sys.executable, "-m", "qoqopt", "export", str(work / "source"), "--format", "gptq", "--samples",
                  str(samples), "--seed", str(seed), "--force", "--out"]  # fmt: skip
        commands = {
            "qoqopt": ([*export, str(work / f"qoqopt-{seed}")], env),
            "qoqopt-natural": ([*export, str(work / f"qoqopt-natural-{seed}"), "--natural-order"], env),
            # GPTQModel sizes its CPU pool as half the cores, then asks 2 for its loader: on 2 cores it
            # refuses to start unless told the pool size
            "gptqmodel": ([python, __file__, "--gptqmodel", str(work), "--seed", str(seed)],
                          env | {"GPTQMODEL_CPU_WORKERS": str(os.cpu_count())}),
        }  # fmt: skip
        for tool, (cmd, tool_env) in commands.items():
            proc = run_measured(cmd, tool_env, True)
            entry = {"tool": tool, "seed": seed} | {k: (round(v, 2) if isinstance(v, float) else v) for k, v in proc.items()}
            if proc["rc"] == 0:
                entry |= judge.drift(work / f"{tool}-{seed}")
                manifest = work / f"{tool}-{seed}" / "manifest.json"  # qoqopt's own per-layer output errors
                if manifest.exists():
                    entry["layer_rel_errors"] = [lr["rel_error"] for lr in json.loads(manifest.read_text())["layers"]]
            result["runs"].append(entry)
    result["summary"] = summarize(result["runs"])
    return result


def summarize(runs: list[dict]) -> dict:
    """Per tool: mean KLD over the seeds, median wall time and peak RSS; None where a run failed."""
    import statistics

    out = {}
    for tool in dict.fromkeys(r["tool"] for r in runs):
        mine = [r for r in runs if r["tool"] == tool]
        if any(r["rc"] for r in mine):
            out[tool] = None
            continue
        out[tool] = {"mean_kld": statistics.fmean(r["mean_kld"] for r in mine),
                     "wall_s": statistics.median(r["wall_s"] for r in mine),
                     "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine)}  # fmt: skip
    return out


def report(result: dict) -> None:
    print(f"\n{'tool':14s} {'seed':>4s} {'wall s':>7s} {'peak MiB':>9s} {'linears':>8s} {'mean KLD':>10s} {'p99 KLD':>10s} {'same top1':>10s}")
    for r in result["runs"]:
        if r["rc"]:
            print(f"{r['tool']:14s} {r['seed']:4d} FAILED (rc {r['rc']}): {r['tail']}")
            continue
        print(f"{r['tool']:14s} {r['seed']:4d} {r['wall_s']:7.1f} {r['peak_rss_mib']:9.0f} {r['quantized_linears']:8d} "
              f"{r['mean_kld']:10.3e} {r['p99_kld']:10.3e} {r['same_top1_pct']:9.1f}%")  # fmt: skip
    summary = result["summary"]
    for mine, peer in (("qoqopt", "gptqmodel"), ("qoqopt", "qoqopt-natural")):
        q, g = summary.get(mine), summary.get(peer)
        if q and g:
            print(f"{mine} / {peer}: median wall x{q['wall_s'] / g['wall_s']:.2f}, median peak RSS "
                  f"x{q['peak_rss_mib'] / g['peak_rss_mib']:.2f}, mean KLD over seeds x{q['mean_kld'] / g['mean_kld']:.2f}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", help="the python of the virtualenv that has gptqmodel")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qoqopt-vs-gptqmodel"))
    ap.add_argument("--samples", type=int, default=32, help="calibration chats for both tools (default 32)")
    ap.add_argument("--seeds", default="0,1,2", help="calibration draws, one run of each tool per seed (default 0,1,2)")
    ap.add_argument("--eval-chats", type=int, default=15)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "vs_gptqmodel.json")
    ap.add_argument("--gptqmodel", type=Path, help=argparse.SUPPRESS)  # internal: the child in the other venv
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gptqmodel:
        quantize_with_gptqmodel(args.gptqmodel, args.seed)
        return 0
    if not args.python:
        ap.error("--python (the virtualenv with gptqmodel) is required")
    args.work.mkdir(parents=True, exist_ok=True)
    result = run(args.python, args.work, args.samples, [int(s) for s in args.seeds.split(",")], args.eval_chats)
    report(result)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
