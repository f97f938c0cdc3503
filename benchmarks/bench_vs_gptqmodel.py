"""Benchmark: qoqopt's GPTQ or AWQ export against GPTQModel's and llm-compressor's, same model, same calibration chats.

    .venv/bin/python benchmarks/bench_vs_gptqmodel.py --python /work/gptq-venv/bin/python
        [--llmc-python /work/llmc-venv/bin/python] [--method gptq|awq] [--preset tiny|small]
        [--samples 32] [--seeds 0,1,2] [--json PATH]

The peers pin other torch/transformers versions than this project's .venv, so each runs from its own
virtualenv: GPTQModel (`--python`; set up as in check_ecosystem_loaders.py), the GPTQ quantizer
transformers defers to, which quantizes AWQ too; and optionally llm-compressor (`--llmc-python`;
`pip install torch==2.13.0 llmcompressor==0.14.0.1`), vLLM's quantizer, which writes
compressed-tensors checkpoints. All quantize the trained mini QoQ-Med (``--preset``: tiny, 2 decoder
layers, or small, 8; each trained once and cached) to the same scheme, in fp32 where the tool allows it:

* GPTQ: 4-bit, group 128, symmetric, natural g_idx, damp 0.01, each tool's default visiting order
  (qoqopt and llm-compressor: act-order with static groups; GPTQModel: group-aware, GAR);
  llm-compressor's W4A16 scheme.
* AWQ: 4-bit, group 128, zero point; GPTQModel in bf16 (its AWQ packer refuses fp32);
  llm-compressor's AWQModifier + QuantizationModifier(W4A16_ASYM), its documented recipe. Each tool
  folds its own scales into the norms and producing Linears, so the whole checkpoint is swapped in,
  not only the packed Linears.

Every tool calibrates on the same domain-balanced clinical image chats (qoqopt's calib split: the
image, the question and the reference reply), drawn with each of several seeds: GPTQModel gets them
as conversations (its chat template adds a trailing generation prompt after the reply),
llm-compressor as the processor inputs qoqopt encodes. For GPTQ, qoqopt also runs with
``--order group-aware`` (GPTQModel's order) and ``--order natural`` (plain GPTQ), the in-run measure
of the visiting order. Each run is its own process
on the same threads; reported per tool and seed:

* wall time and peak RSS of the whole process (imports, model load, calibration, quantization,
  save), from os.wait4;
* drift: the checkpoint as the spec reader (benchmarks/spec_layout.py, no tool's code) reads it,
  packed Linears dequantized and every other tensor (norms, embeddings) as stored, loaded into the
  fp32 transformers model; mean KLD and same-top-1 against the fp32 model on held-out clinical
  chats (eval split, reference replies teacher-forced). The reader's compressed-tensors
  dequantization is checked against transformers' own loader after each llm-compressor run;
* which Linears were quantized, and the bytes on disk.

The tiny model's vocabulary is 97% of its parameters, so time and memory there are mostly fixed
costs. Drift moves by up to 2x (tiny) and 3.5x (small) with the calibration draw alone, which is why
several seeds are run and compared as means. Results are printed and saved
as JSON (default benchmarks/results/vs_gptqmodel.json, vs_gptqmodel_awq.json for AWQ; ``_small``
before ``.json`` for the small preset).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from check_ecosystem_loaders import load_batches, save_batches, write_source  # benchmarks/ is on sys.path
from measure import run_measured

REPO = Path(__file__).resolve().parents[1]
# the settings every tool is given, per method; each is also qoqopt's export default
CONFIGS = {
    "gptq": dict(bits=4, group_size=128, sym=True, desc_act=False, damp_percent=0.01),
    "awq": dict(method="awq", format="gemm", bits=4, group_size=128, sym=False),
}
# qoqopt's runs: the default, then (GPTQ only) the other plain-layout visiting orders
QOQOPT_VARIANTS = {"qoqopt": [], "qoqopt-gar": ["--order", "group-aware"], "qoqopt-natural": ["--order", "natural"]}
# GPTQModel's AWQ packer refuses fp32 modules (AwqTorchLinear takes fp16/bf16 only), so its AWQ
# calibrates in bf16, its own CPU default; qoqopt computes in fp32 either way
GPTQMODEL_DTYPE = {"gptq": "float32", "awq": "bfloat16"}


# =========================================================================== GPTQModel (its venv)


def quantize_with_gptqmodel(work: Path, method: str, seed: int) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    os.chdir(work)  # GPTQModel writes its per-module log files under ./logs
    chats = json.loads((work / f"calib-{seed}.json").read_text())
    model = GPTQModel.load(str(work / "source"), QuantizeConfig(**CONFIGS[method]), device="cpu", dtype=getattr(torch, GPTQMODEL_DTYPE[method]))
    model.quantize(chats, batch_size=1)
    model.save(str(work / f"{method}-gptqmodel-{seed}"))
    print("ok")


# =========================================================================== llm-compressor (its venv)

# llm-compressor's own schemes for the same formats (compressed-tensors' names), and what it must not touch
LLMC_SCHEMES = {"gptq": "W4A16", "awq": "W4A16_ASYM"}
LLMC_IGNORE = ["lm_head", "re:.*visual.*"]


def quantize_with_llmcompressor(work: Path, method: str, seed: int) -> None:
    """oneshot on the calibration batches qoqopt itself encodes (llm-compressor takes a DataLoader), each
    recipe as llm-compressor documents it for this format; saved compressed (pack-quantized)."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations unconditionally, which raises without an
        # accelerator; pinning only speeds host-to-device copies, so skipping it changes no number (a
        # Mac's MPS counts as an accelerator to torch, but the peers run on the CPU there)
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    os.chdir(work)
    batches = load_batches(work / f"calib-{seed}.safetensors")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(work / "source"), dtype=torch.float32)
    scheme = dict(targets="Linear", scheme=LLMC_SCHEMES[method], ignore=LLMC_IGNORE)
    if method == "gptq":
        recipe = [GPTQModifier(**scheme, dampening_frac=CONFIGS["gptq"]["damp_percent"])]
    else:
        recipe = [AWQModifier(), QuantizationModifier(**scheme)]
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda b: b)  # one chat per step, as the others
    # the batches are already encoded; the tokenizer stands in for AutoProcessor, which wants torchvision
    oneshot(model=model, processor=AutoTokenizer.from_pretrained(str(work / "source")), dataset=loader, recipe=recipe,
            num_calibration_samples=len(batches), sequential_targets=["Qwen2_5_VLDecoderLayer"])  # fmt: skip
    model.save_pretrained(str(work / f"{method}-llmcompressor-{seed}"), save_compressed=True)
    print("ok")


def check_spec_reader(out: Path) -> float:
    """The spec reader's dequantization of this checkpoint against transformers' own compressed-tensors
    loader (dequantize on load), Linear by Linear: the judge reads the checkpoint the way the runtime does."""
    import torch
    from spec_layout import spec_weights
    from transformers import CompressedTensorsConfig, Qwen2_5_VLForConditionalGeneration

    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(out), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    worst = max(float((loaded.get_submodule(name).weight.float() - w).abs().max()) for name, w in spec_weights(out).items())
    if worst > 1e-6:
        raise SystemExit(f"the spec reader disagrees with transformers on {out}: max |diff| {worst:.3g}")
    return worst


# =========================================================================== here (.venv)


def prepare(work: Path, preset: str, samples: int, seeds: list[int], eval_chats: int) -> None:
    """The trained mini model as a checkpoint, the calibration chats in GPTQModel's conversation form
    (images as PNG files), and the held-out chats encoded once (with each reply's token count)."""
    import torch

    from qoqopt.calibration import encode_chat
    from qoqopt.data import balanced_sample, clinical_set
    from qoqopt.processor import load_processor

    write_source(work / "source", layout="runtime", preset=preset)
    proc = load_processor(work / "source")
    for seed in seeds:
        _write_calibration(work, proc, samples, seed)
    batches = []
    for item in balanced_sample(clinical_set("eval", n_per_base=1), eval_chats, seed=0):
        reply = len(proc.tokenizer(item.target_text() + "<|im_end|>").input_ids)
        batches.append(encode_chat(proc, item, with_answer=True) | {"reply": torch.tensor([reply])})
    save_batches(work / "eval.safetensors", batches)


def _write_calibration(work: Path, proc, samples: int, seed: int) -> None:
    """The chats `qoqopt export --samples N --seed S` draws: as GPTQModel conversations, and as the
    processor inputs qoqopt calibrates on (for llm-compressor, which takes model inputs)."""
    from qoqopt.calibration import calibration_items
    from qoqopt.quantize.runner import encode_chats

    items, _ = calibration_items("clinical", samples, seed)
    save_batches(work / f"calib-{seed}.safetensors", encode_chats(proc, items))
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
        self.params = self.model.state_dict()  # live references: copying into them changes the model
        self.originals = {name: t.clone() for name, t in self.params.items()}  # restored after each checkpoint
        self.chats = load_batches(work / "eval.safetensors")
        self.reference = _reply_logits(self.model, self.chats)

    def drift(self, export: Path) -> dict:
        """The export as the spec reader (neither tool's code) reads it, measured as `qoqopt bench` does."""
        import numpy as np
        import torch

        from qoqopt.drift import position_stats, summarize_positions

        state, packed = self._export_state(export)
        with torch.no_grad():
            for name, t in state.items():
                self.params[name].copy_(t)
            try:
                stats = [position_stats(ref, cand, targets)
                         for (ref, targets), (cand, _) in zip(self.reference, _reply_logits(self.model, self.chats))]  # fmt: skip
            finally:
                for name in state:
                    self.params[name].copy_(self.originals[name])
        d = summarize_positions({k: np.concatenate([s[k] for s in stats]) for k in stats[0]})
        return {"quantized_linears": len(packed), "positions": d.positions, "mean_kld": d.mean_kld,
                "p99_kld": d.p99_kld, "same_top1_pct": d.same_top_pct,
                "disk_bytes": sum(f.stat().st_size for f in export.glob("*.safetensors"))}  # fmt: skip

    def _export_state(self, export: Path) -> tuple[dict, list[str]]:
        """Model parameter name -> the export's value, and the packed Linears' names."""
        from spec_layout import spec_state

        from qoqopt.loader import canonical_name, runtime_name

        stored, packed = spec_state(export)
        state = {}
        for key, t in stored.items():
            name = runtime_name(canonical_name(key))  # either key layout
            if name not in self.params or self.params[name].shape != t.shape:
                raise SystemExit(f"{export}: tensor {key} {tuple(t.shape)} has no counterpart in the model")
            state[name] = t
        return state, packed


def run(python: str, llmc_python: str | None, method: str, preset: str, work: Path, samples: int,
        seeds: list[int], eval_chats: int) -> dict:  # fmt: skip
    prepare(work, preset, samples, seeds, eval_chats)
    env = {"PYTHONPATH": str(REPO)}
    judge = Judge(work)
    result = {"benchmark": "vs_gptqmodel", "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
              "versions": _versions({"gptqmodel": python, "llmcompressor": llmc_python}),
              "model": f"trained mini QoQ-Med ({preset})", "method": method, method: CONFIGS[method],
              "calibration_chats": samples, "eval_chats": eval_chats, "runs": []}  # fmt: skip
    for seed in seeds:
        out = {tool: work / f"{method}-{tool}-{seed}" for tool in (*QOQOPT_VARIANTS, "gptqmodel", "llmcompressor")}
        export = [sys.executable, "-m", "qoqopt", "export", str(work / "source"), "--format", method, "--samples",
                  str(samples), "--seed", str(seed), "--force", "--out"]  # fmt: skip
        commands = {
            tool: ([*export, str(out[tool]), *flags], env)
            for tool, flags in QOQOPT_VARIANTS.items() if method == "gptq" or not flags
        } | {  # fmt: skip
            # GPTQModel sizes its CPU pool as half the cores, then asks 2 for its loader: on 2 cores it
            # refuses to start unless told the pool size
            "gptqmodel": ([python, __file__, "--gptqmodel", str(work), "--method", method, "--seed", str(seed)],
                          {"GPTQMODEL_CPU_WORKERS": str(os.cpu_count())}),
        }  # fmt: skip
        if llmc_python:
            commands["llmcompressor"] = ([llmc_python, __file__, "--llmcompressor", str(work), "--method", method,
                                          "--seed", str(seed)], {})  # fmt: skip
        for tool, (cmd, tool_env) in commands.items():
            proc = run_measured(cmd, tool_env, True)
            entry = {"tool": tool, "seed": seed} | {k: (round(v, 2) if isinstance(v, float) else v) for k, v in proc.items()}
            if proc["rc"] == 0 and tool == "llmcompressor":  # outside the measured run
                entry["spec_reader_max_abs_diff"] = _check_in(llmc_python, out[tool])
            if proc["rc"] == 0:
                entry |= judge.drift(out[tool])
                manifest = out[tool] / "manifest.json"  # qoqopt's own per-layer output errors
                if manifest.exists():
                    entry["layer_rel_errors"] = [lr["rel_error"] for lr in json.loads(manifest.read_text())["layers"]]
            result["runs"].append(entry)
    result["summary"] = summarize(result["runs"])
    return result


def _check_in(python: str, checkpoint: Path) -> float | str:
    """check_spec_reader in the peer's venv: the largest difference, or the one-line reason it failed."""
    proc = subprocess.run([python, __file__, "--check-compressed", str(checkpoint)], capture_output=True, text=True)
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        print(f"spec reader check failed on {checkpoint}: {lines[-1]}", file=sys.stderr)
        return f"failed: {lines[-1]}"
    return float(proc.stdout.strip().splitlines()[-1])


def _versions(pythons: dict[str, str | None]) -> dict[str, str]:
    """Each peer's package version, as its own venv reports it; this venv's torch and transformers."""
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    ask = "import importlib.metadata as m, sys; print(*(m.version(p) for p in sys.argv[1:]))"
    peers = {"gptqmodel": ("gptqmodel", "torch", "transformers"),
             "llmcompressor": ("llmcompressor", "compressed-tensors", "torch", "transformers")}  # fmt: skip
    for peer, python in pythons.items():
        if python:
            found = subprocess.run([python, "-c", ask, *peers[peer]], capture_output=True, text=True).stdout.split()
            out[peer] = dict(zip(peers[peer], found))
    return out


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
    for mine, peer in (("qoqopt", "gptqmodel"), ("qoqopt", "llmcompressor"), *(("qoqopt", v) for v in list(QOQOPT_VARIANTS)[1:])):
        q, g = summary.get(mine), summary.get(peer)
        if q and g:
            print(f"{mine} / {peer}: median wall x{q['wall_s'] / g['wall_s']:.2f}, median peak RSS "
                  f"x{q['peak_rss_mib'] / g['peak_rss_mib']:.2f}, mean KLD over seeds x{q['mean_kld'] / g['mean_kld']:.2f}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", help="the python of the virtualenv that has gptqmodel")
    ap.add_argument("--llmc-python", help="the python of a virtualenv with llmcompressor: adds llm-compressor as a third tool")
    ap.add_argument("--method", choices=sorted(CONFIGS), default="gptq", help="what every tool quantizes to (default gptq)")
    ap.add_argument("--preset", choices=("tiny", "small"), default="tiny",
                    help="the trained mini model: tiny (2 decoder layers, default) or small (8; trained once, ~45 min on 2 cores)")
    ap.add_argument("--work", type=Path, help="working directory (default /tmp/qoqopt-vs-gptqmodel[-small])")
    ap.add_argument("--samples", type=int, default=32, help="calibration chats for every tool (default 32)")
    ap.add_argument("--seeds", default="0,1,2", help="calibration draws, one run of each tool per seed (default 0,1,2)")
    ap.add_argument("--eval-chats", type=int, default=15)
    ap.add_argument("--json", type=Path, help="where to save the results (default benchmarks/results/vs_gptqmodel[_awq].json)")
    ap.add_argument("--gptqmodel", type=Path, help=argparse.SUPPRESS)  # internal: the children in the other venvs
    ap.add_argument("--llmcompressor", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--check-compressed", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gptqmodel:
        quantize_with_gptqmodel(args.gptqmodel, args.method, args.seed)
        return 0
    if args.check_compressed:
        print(check_spec_reader(args.check_compressed))  # the last line of output is the number
        return 0
    if args.llmcompressor:
        quantize_with_llmcompressor(args.llmcompressor, args.method, args.seed)
        return 0
    if not args.python:
        ap.error("--python (the virtualenv with gptqmodel) is required")
    # both methods share a preset's work dir (prepare is method-free); defaults name only what differs
    # from gptq/tiny: vs_gptqmodel[_awq][_small].json
    args.work = args.work or Path("/tmp/qoqopt-vs-gptqmodel" + ("" if args.preset == "tiny" else f"-{args.preset}"))
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    result = run(args.python, args.llmc_python, args.method, args.preset, args.work, args.samples, seeds, args.eval_chats)
    report(result)
    name = "vs_gptqmodel" + "".join(f"_{tag}" for tag in (args.method, args.preset) if tag not in ("gptq", "tiny"))
    args.json = args.json or REPO / "benchmarks" / "results" / f"{name}.json"
    # Imported here, not at the top: this file also runs as the child in the peers' venvs, which lack qoqopt.
    from qoqopt.fileio import atomic_write_text

    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
