"""Load qoqopt's GPTQ and AWQ exports with the real ecosystem loaders and check what they compute.

    .venv/bin/python benchmarks/check_ecosystem_loaders.py --python /work/gptq-venv/bin/python [--work DIR] [--json PATH]
        [--preset tiny|small|7b-shape]

(``--preset 7b-shape``: QoQ-Med-7B's exact tensor shapes with random weights, 2 decoder layers; the three
exports take ~40 min on 2 cores and the check step peaks at 22 GB of memory.)

GPTQModel pins torch >= 2.14.1, which this project's .venv (torch 2.13 CPU) cannot take, so the
loaders live in a second virtualenv (`--python`), set up once with:

    python3.11 -m venv /work/gptq-venv
    /work/gptq-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    BUILD_CUDA_EXT=0 /work/gptq-venv/bin/pip install gptqmodel==7.7.0 optimum==2.3.0 'transformers>=5.23,<6' safetensors numpy pillow

(the first CPU load JIT-compiles GPTQModel's CPU kernel, ~4 min on 2 cores, cached afterwards).

Step 1, here (.venv): the trained mini QoQ-Med is saved as a checkpoint and exported as GPTQ (4-bit,
group 128, symmetric: the default), GPTQ asymmetric with act-order, and AWQ; a few held-out clinical
chats are encoded with the model's processor and saved as tensors, with one image for the
AutoProcessor check. Step 2, in the loader venv (this same file with --check, which imports only
torch, transformers, safetensors, numpy and gptqmodel), for each export:

* weights: every packed Linear is unpacked with an unpacker written here from the published layout
  and compared with the source weight (AWQ folds per-channel scales into neighbours, so its rows and
  columns are first re-scaled by a least-squares fit: a packing bug is not a rescaling);
* reference: the fake-quantized fp32 model (the source model with those dequantized weights and the
  export's other tensors);
* transformers: `AutoModelForImageTextToText.from_pretrained(export, dtype=float32)` (GPTQModel
  backend): module classes (vision tower and lm_head plain), and logits vs the reference;
* GPTQModel: `GPTQModel.load(export, device="cpu", dtype=float32)` with its default backend, whose
  fused CPU kernel computes in bf16 (so bf16 tolerances: GPTQModel 7.7.0 has no fp32 CPU kernel,
  its torch kernels dequantize to fp16/bf16): logits vs the reference, vision tower left plain;
* AutoProcessor: `AutoProcessor.from_pretrained(export)` and `generate` on an image chat, greedy,
  compared token for token with the reference model's generation.

All comparisons in fp32 (bf16 noise alone costs ~2% of top-1). Results are printed and saved as JSON
(default benchmarks/results/ecosystem_loaders.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPORTS = {  # name -> export_hf_quant options
    "gptq": dict(fmt="gptq"),
    "gptq-asym-actorder": dict(fmt="gptq", sym=False, order="act"),
    "awq": dict(fmt="awq"),
}
LOGIT_TOL = 1e-3  # max |Δlogit| / max |logit|, fp32 kernels
KLD_TOL = 1e-6  # mean KLD, fp32 kernels (random weights give near-ties, so top-1 alone would be noise)
BF16_LOGIT_TOL, BF16_KLD_TOL = 2e-2, 1e-4  # GPTQModel's auto-picked CPU kernel computes in bf16
WEIGHT_TOL = {4: 0.25, 8: 0.02}  # relative Frobenius error of a dequantized weight vs the source


# =========================================================================== step 1 (.venv)


def write_source(src: Path, random_weights: bool = False, layout: str = "legacy", preset: str = "tiny") -> None:
    """The mini QoQ-Med ``preset`` as a checkpoint at ``src``: trained (cached) or random; kept if present."""
    from qoqopt.mini import PRESETS, build_model, save_checkpoint

    if (src / "config.json").exists():
        config = json.loads((src / "config.json").read_text())
        hidden = config.get("text_config", config).get("hidden_size")
        if hidden not in (None, PRESETS[preset].hidden):
            raise SystemExit(f"{src} holds another mini model (hidden {hidden}), not {preset!r}; use another --work")
        return
    if random_weights:
        model = build_model(preset, 0)
    else:
        from qoqopt.train import trained_model

        model, report = trained_model(preset, 0)
        print(report.describe())
    src.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, src, layout=layout)


def prepare(work: Path, samples: int, chats: int, random_weights: bool, preset: str = "tiny") -> dict:
    from qoqopt.calibration import encode_chat
    from qoqopt.data import balanced_sample, clinical_set
    from qoqopt.exports.hf_quant import export_hf_quant
    from qoqopt.processor import load_processor

    src = work / ("source-random" if random_weights else "source")
    write_source(src, random_weights, preset=preset)
    info = {"source": str(src), "preset": preset, "weights": "random" if random_weights else "trained", "exports": {}}
    for name, opts in EXPORTS.items():
        out = work / name
        t0 = time.perf_counter()
        export_hf_quant(str(src), out, samples=samples, force=True, progress=False, **opts)
        info["exports"][name] = {"path": str(out), "export_s": round(time.perf_counter() - t0, 1), **opts}
    proc = load_processor(src)
    items = balanced_sample(clinical_set("eval", n_per_base=1), chats, seed=0)
    save_batches(work / "inputs.safetensors", [encode_chat(proc, item, with_answer=True) for item in items])
    items[0].image.save(work / "image.png")
    (work / "chat.json").write_text(json.dumps({"question": items[0].question, "answer": items[0].answer,
                                                "domains": [it.domain for it in items]}))  # fmt: skip
    info["chats"] = len(items)
    return info


# =========================================================================== step 2 (loader venv)

def _fit_rescaled_error(w_q, w_src) -> float:
    """Relative error after the best diag(r) @ w_src @ diag(c) fit (AWQ's folded scales), alternating LS."""
    import torch

    r = torch.ones(w_src.shape[0], 1)
    c = torch.ones(1, w_src.shape[1])
    for _ in range(4):
        base = w_src * c
        r = ((w_q * base).sum(1, keepdim=True) / (base * base).sum(1, keepdim=True).clamp(min=1e-20))
        base = r * w_src
        c = ((w_q * base).sum(0, keepdim=True) / (base * base).sum(0, keepdim=True).clamp(min=1e-20))
    return float((w_q - r * w_src * c).norm() / (r * w_src * c).norm())


def save_batches(path: Path, batches: list[dict]) -> None:
    """Model-input dicts as one safetensors file (``{i}.{name}``), readable in either venv."""
    from safetensors.torch import save_file

    save_file({f"{i}.{k}": v.contiguous() for i, b in enumerate(batches) for k, v in b.items()}, str(path))


def load_batches(path: Path) -> list[dict]:
    from safetensors.torch import load_file

    flat = load_file(str(path))
    chats: dict[int, dict] = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        chats.setdefault(int(i), {})[name] = v
    return [chats[i] for i in sorted(chats)]


def _compare(ref_logits: list, logits: list) -> dict:
    import torch

    worst, agree, total, kld = 0.0, 0, 0, []
    for a, b in zip(ref_logits, logits):
        worst = max(worst, float((a - b).abs().max() / a.abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
        kld.append((lp.exp() * (lp - lq)).sum(-1))
    mean_kld = float(torch.cat(kld).mean())
    return {"max_rel_logit_diff": worst, "same_top1_pct": 100.0 * agree / total,
            "mean_kld": mean_kld, "ok": worst <= LOGIT_TOL and mean_kld <= KLD_TOL}  # fmt: skip


def _logits(model, chats: list[dict]) -> list:
    import torch

    out = []
    with torch.no_grad():
        for batch in chats:
            out.append(model(**batch).logits[0].float())
    return out


def check(work: Path, info: dict) -> dict:
    import torch
    from spec_layout import read_dir, spec_state  # run by path: benchmarks/ is on sys.path
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for pkg in ("gptqmodel", "optimum"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception as exc:  # noqa: BLE001
            versions[pkg] = f"missing ({exc})"
    chats = load_batches(work / "inputs.safetensors")
    src = Path(info["source"])
    # Only decoder layers are packed: keeping just their source weights spares the embeddings, which
    # are most of a 7B-shaped checkpoint, across all the exports.
    src_tensors = {k: v for k, v in read_dir(src).items() if k.startswith("model.layers.")}
    results = {"versions": versions, "exports": {}}
    for name, meta in info["exports"].items():
        path = Path(meta["path"])
        qc = json.loads((path / "config.json").read_text())["quantization_config"]
        # the export as the spec reads it, dequantized once: for the weight errors and the reference model
        state, packed = spec_state(path)
        res: dict = {}
        # ---- weights, from the published layout
        errs = {}
        for mod in packed:
            canon = mod.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
            w_src = src_tensors[canon + ".weight"].float()
            w_q = state[mod + ".weight"]
            if qc["quant_method"] == "awq":
                errs[mod] = _fit_rescaled_error(w_q, w_src)
            else:
                errs[mod] = float((w_q - w_src).norm() / w_src.norm())
        worst = max(errs, key=errs.get)
        res["weights"] = {"linears": len(errs), "max_rel_error": round(errs[worst], 4), "worst": worst,
                          "ok": errs[worst] <= WEIGHT_TOL[qc["bits"]]}  # fmt: skip
        # ---- the fake-quantized fp32 reference
        ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
        state = {k: v for k, v in state.items() if not k.startswith("time_series_embedding.")}
        expected = set(ref.state_dict())
        missing = expected - set(state)
        assert not (set(state) - expected), f"unknown tensors {sorted(set(state) - expected)[:3]}"
        ref.load_state_dict(state, strict=False)
        res["reference"] = {"tensors_from_export": len(state), "kept_from_source": sorted(missing)}
        del state  # a full fp32 copy: at the 7B shapes, several GB beside the reference model
        ref_logits = _logits(ref, chats)
        # ---- transformers
        try:
            t0 = time.perf_counter()
            model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32, device_map="cpu").eval()
            classes = {
                "language q_proj": type(model.model.language_model.layers[0].self_attn.q_proj).__name__,
                "vision qkv": type(model.model.visual.blocks[0].attn.qkv).__name__,
                "lm_head": type(model.lm_head).__name__,
            }
            res["transformers"] = {"load_s": round(time.perf_counter() - t0, 1), "classes": classes,
                                   **_compare(ref_logits, _logits(model, chats))}  # fmt: skip
            res["transformers"]["ok"] &= classes["vision qkv"] == "Linear" and classes["lm_head"] == "Linear" \
                and classes["language q_proj"] != "Linear"
            del model
        except Exception as exc:  # noqa: BLE001
            res["transformers"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
        # ---- GPTQModel: the fp32 AVX-512 kernel transformers also picks, then GPTQModel's own default
        # GPTQModel 7.7.0 has no fp32 CPU path: its fused and AVX-512 kernels "only support bf16", and
        # its plain torch kernels dequantize to fp16/bf16. Its default path gets bf16 tolerances.
        for part, backend in (("gptqmodel", "auto"),):
            try:
                from gptqmodel import GPTQModel

                t0 = time.perf_counter()
                gm = GPTQModel.load(str(path), device="cpu", dtype=torch.float32, backend=backend)
                hf = getattr(gm, "model", gm)
                r = {"load_s": round(time.perf_counter() - t0, 1),
                     "q_proj class": type(hf.model.language_model.layers[0].self_attn.q_proj).__name__,
                     "vision qkv": type(hf.model.visual.blocks[0].attn.qkv).__name__,
                     **_compare(ref_logits, _logits(hf, chats))}  # fmt: skip
                if part == "gptqmodel":  # its auto-picked fused CPU kernel runs the matmul in bf16
                    r["ok"] = r["max_rel_logit_diff"] <= BF16_LOGIT_TOL and r["mean_kld"] <= BF16_KLD_TOL
                r["ok"] &= r["vision qkv"] == "Linear"
                res[part] = r
                del gm, hf
            except Exception as exc:  # noqa: BLE001
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                known = "sym=False" in msg and qc["quant_method"] == "gptq"
                res[part] = {"ok": False, "error": msg,
                             **({"known": "GPTQModel loads asymmetric GPTQ v1 only when its own meta says "
                                          "gptqmodel >= 0.9.0 produced it; use the default --sym"} if known else {})}  # fmt: skip
        # ---- AutoProcessor + generate
        try:
            from PIL import Image

            processor = AutoProcessor.from_pretrained(str(path))
            chat = json.loads((work / "chat.json").read_text())
            messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(work / "image.png")},
                                                     {"type": "text", "text": chat["question"]}]}]  # fmt: skip
            inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")  # fmt: skip
            model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32, device_map="cpu").eval()
            gen = dict(max_new_tokens=24, do_sample=False, repetition_penalty=1.0)
            n = inputs["input_ids"].shape[1]
            got = model.generate(**inputs, **gen)[0, n:]
            want = ref.generate(**inputs, **gen)[0, n:]
            res["generate"] = {"processor": type(processor).__name__,
                               "text": processor.decode(got, skip_special_tokens=True),
                               "same_tokens_as_reference": bool(torch.equal(got, want)), "reference_answer": chat["answer"]}  # fmt: skip
            res["generate"]["ok"] = res["generate"]["same_tokens_as_reference"]
            del model
        except Exception as exc:  # noqa: BLE001
            res["generate"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
        results["exports"][name] = res
        del ref
    return results


# =========================================================================== driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default="/work/gptq-venv/bin/python", help="interpreter of the loader venv")
    ap.add_argument("--work", type=Path, help="work dir (default /tmp/qoqopt-ecosystem, -PRESET after it unless tiny)")
    ap.add_argument("--preset", choices=("tiny", "small", "7b-shape"), default="tiny",
                    help="mini model (default tiny); 7b-shape is QoQ-Med-7B's exact shapes with random weights "
                    "(2 decoder layers; the check step peaks at 22 GB of memory)")  # fmt: skip
    ap.add_argument("--samples", type=int, default=16, help="calibration chats per export (default 16)")
    ap.add_argument("--chats", type=int, default=3, help="held-out chats compared (default 3)")
    ap.add_argument("--random", action="store_true", help="random-weight mini model instead of the trained one "
                    "(the trained one is built on first use: ~1 h on 2 cores)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="results (default benchmarks/results/ecosystem_loaders[_PRESET].json)")
    ap.add_argument("--reuse", action="store_true", help="reuse the exports of an earlier run in --work")
    ap.add_argument("--check", type=Path, help=argparse.SUPPRESS)  # step 2, inside the loader venv
    args = ap.parse_args(argv)
    tiny = args.preset == "tiny"
    args.work = args.work or Path("/tmp/qoqopt-ecosystem" + ("" if tiny else f"-{args.preset}"))
    args.json = args.json or REPO / "benchmarks" / "results" / ("ecosystem_loaders" + ("" if tiny else
                                                                "_" + args.preset.replace("-", "_")) + ".json")
    args.random |= args.preset == "7b-shape"  # too large to train on a CPU

    if args.check:
        info = json.loads((args.check / "prepared.json").read_text())
        print("RESULT " + json.dumps(check(args.check, info)))
        return 0

    if not Path(args.python).exists():
        print(f"error: loader venv interpreter {args.python} not found; see this script's docstring", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    prepared = args.work / "prepared.json"
    if args.reuse and prepared.exists():
        info = json.loads(prepared.read_text())
    else:
        info = prepare(args.work, args.samples, args.chats, args.random, args.preset)
        prepared.write_text(json.dumps(info, indent=2))
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([args.python, __file__, "--check", str(args.work)], capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
        print(f"error: the check step failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    results = json.loads(line[-1][len("RESULT "):])
    results["prepared"] = info
    print(f"loaders: {results['versions']}; mini model weights: {info['weights']}")
    ok = True
    for name, res in results["exports"].items():
        print(f"\n== {name}")
        for part in ("weights", "transformers", "gptqmodel", "generate"):
            if part not in res:
                continue
            r = res.get(part, {})
            status = "ok  " if r.get("ok") else ("KNOWN" if r.get("known") else "FAIL")
            ok &= bool(r.get("ok") or r.get("known"))
            print(f"  {part:<15} {status} {json.dumps({k: v for k, v in r.items() if k != 'ok'})}")
    from qoqopt.fileio import atomic_write_text

    atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
