"""QoQ-Med-7B's exact tensor shapes through the GGUF export, run in llama.cpp, against transformers.

    .venv/bin/python benchmarks/check_7b_shapes.py [--work DIR] [--json PATH] [--threads N]

The mini presets have head_dim 64 everywhere. QoQ-Med-7B has text head_dim 128 (28 query heads on
4 KV heads, M-RoPE sections [16, 24, 24]), vision head_dim 80 over 16 heads, a 3420-wide vision MLP,
a window period of 8 vision blocks and the 5120 -> 3584 merger. ``qoqopt mini --preset 7b-shape``
builds exactly those tensors with random weights, cut to 2 of 28 decoder layers and 8 of 32 vision
blocks (1.76 B parameters, 3.5 GB as bf16). This script exports it with ``qoqopt export --format
gguf`` (F32 and Q4_K_M text with the clinical imatrix, F16 mmproj) and checks, in llama.cpp through
llama-cpp-python, against transformers' fp32 forward of the same checkpoint:

* text logits of clinical prompts, F32 GGUF with an F32 KV cache and transformers' RMSNorm epsilon
  set to 0 as llama.cpp runs it (rel err < 1e-4, as tests/test_gguf.py asserts at the mini shapes);
* image embeddings from the F16 mmproj vs ``get_image_features`` at two sizes whose windows are cut
  at the image edge (rel err < 2e-3);
* a whole CT image chat (prompt, image tokens, M-RoPE positions, teacher-forced reply), F32 text +
  F16 mmproj (rel err < 5e-3), and the same chat with the Q4_K_M build, reported but not judged:
  drift on random weights says nothing about a trained model.

and, in transformers, ``qoqopt.kernels.apply`` (patch embedding, vision MLP, varlen window/full
attention with the rotary inside, merger; through the Triton interpreter on a CPU) against the
unpatched model on a batch of two CT images of different sizes (fp32 logits, rel err < 1e-4, as
tests/test_kernels_apply.py asserts at the mini shapes; ~10 min of the run on 2 cores).

It needs ~12 GB of memory and ~11 GB of disk under --work (default /tmp/qoqopt-7b-shape; the
checkpoint and exports are kept and reused). Exit 1 if a check fails. Results:
benchmarks/results/shape_7b_gguf.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEXT_TOL, EMBED_TOL, CHAT_TOL = 1e-4, 2e-3, 5e-3  # the tolerances tests/test_gguf.py holds the mini model to
KERNEL_TOL = 1e-4  # ... and tests/test_kernels_apply.py
IMAGE_SIZES = [(308, 308), (364, 252)]  # 11x11 and 13x9 merged tokens: windows cut at the image edge
TRAIN_TOKENS = (84, 668)  # QoQ-Med's training pixel range in merged tokens (65536 / 784, 524288 / 784)


def build(work: Path) -> tuple[Path, Path, dict]:
    """The 7b-shape checkpoint and its GGUF export under ``work``, each made once (and timed then)."""
    from qoqopt.exports.gguf_export import GGUFOptions, export_gguf
    from qoqopt.fileio import atomic_dir
    from qoqopt.mini import build_model, save_checkpoint

    src, gguf, seconds = work / "source", work / "gguf", {}
    if not (src / "model.safetensors").exists():
        print("building the 7b-shape checkpoint (random weights, ~1.5 min)")
        t0 = time.perf_counter()
        with atomic_dir(src, force=True) as tmp:
            save_checkpoint(build_model("7b-shape", 0), tmp)
        seconds["build_s"] = round(time.perf_counter() - t0, 1)
        gc.collect()
    if not (gguf / "manifest.json").exists():
        print("exporting GGUF: F32 + Q4_K_M text, F16 mmproj (~2.5 min)")
        t0 = time.perf_counter()
        export_gguf(str(src), gguf, GGUFOptions(quants=["F32", "Q4_K_M"], mmproj_type="f16", name="shape7b",
                                                calib_items=16), force=True)  # fmt: skip
        seconds["export_s"] = round(time.perf_counter() - t0, 1)
    return src, gguf, seconds


def ct_item():
    from qoqopt.data import clinical_set

    return next(i for i in clinical_set("eval", n_per_base=1) if i.domain == "ct")


def transformers_side(src: Path) -> dict:
    """Every reference, computed before llama.cpp loads, so the two models are never in memory together."""
    import torch
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qoqopt.exports.gguf_verify import clinical_text_prompts, reference, set_text_rms_eps
    from qoqopt.processor import load_processor

    t0 = time.perf_counter()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
    proc = load_processor(src)
    set_text_rms_eps(model, 0.0)
    item = ct_item()
    out: dict = {"prompts": [], "images": [], "item": item}
    with torch.no_grad():
        for text in clinical_text_prompts(proc.tokenizer):
            ids = proc.tokenizer(text).input_ids
            x = torch.tensor([ids])
            logits = model(input_ids=x, mm_token_type_ids=torch.zeros_like(x)).logits[0].numpy()
            out["prompts"].append({"text": text, "ids": ids, "logits": logits})
        base = item.image.convert("RGB")
        for size in IMAGE_SIZES:
            img = base.resize(size, Image.BICUBIC)
            inputs = proc.image_processor(images=[img], return_tensors="pt")
            feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            feats = getattr(feats, "pooler_output", feats)
            ref = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
            out["images"].append({"size": size, "image": img, "embeddings": ref.numpy()})
        out["chat"] = reference(model, proc, item)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    # eps 0 turns a right-padded row's zero hidden state into NaN, which the next layer's attention
    # spreads through the whole padded batch (0 x NaN): the kernel check runs at the real epsilon.
    set_text_rms_eps(model, model.config.text_config.rms_norm_eps)
    out["kernels_apply"] = kernels_vs_unpatched(model, proc, base)  # last: it patches the model in place
    del model
    gc.collect()
    return out


def kernels_vs_unpatched(model, proc, base) -> dict:
    """Logits of a two-image batch (different sizes, right-padded) before and after ``kernels.apply``."""
    import torch
    from PIL import Image

    from qoqopt.kernels import apply

    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True, tokenize=False)
             for q in ("Which body region is shown?", "Any acute finding?")]  # fmt: skip
    # 14 x 10 and 10 x 10 merged tokens (the second raised to QoQ-Med's minimum pixels): both cut
    # windows of 4 x 4 at their edges
    images = [base.resize((392, 280), Image.BICUBIC), base.resize((252, 252), Image.BICUBIC)]
    batch = proc(text=texts, images=images, padding=True, return_tensors="pt")
    keep = batch["attention_mask"].bool()
    t0 = time.perf_counter()
    with torch.inference_mode():
        ref = model(**batch).logits[keep]
        report = apply(model)
        out = model(**batch).logits[keep]
    err = float((out - ref).abs().max() / ref.abs().max())
    return {"patched": dict(report.counts), "backend": report.backend, "image_grids": batch["image_grid_thw"].tolist(),
            "max_rel_err": err, "tol": KERNEL_TOL, "seconds": round(time.perf_counter() - t0, 1),
            "ok": err < KERNEL_TOL and report.backend == "triton"}  # fmt: skip


def rel_err(cand: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(cand - ref).max() / np.abs(ref).max())


def llama_side(gguf: Path, ref: dict, threads: int) -> dict:
    from qoqopt.drift import token_drift
    from qoqopt.exports.gguf_runtime import LlamaVL
    from qoqopt.exports.gguf_verify import reply_logits

    manifest = json.loads((gguf / "manifest.json").read_text())
    files = {f"{f['kind']}:{f.get('quant')}": gguf / f["path"] for f in manifest["files"] if f["kind"] in ("text", "mmproj")}
    mm = dict(image_min_tokens=TRAIN_TOKENS[0], image_max_tokens=TRAIN_TOKENS[1], threads=threads)
    res: dict = {"kernels_apply": ref["kernels_apply"]}
    with LlamaVL(files["text:F32"], f32_kv=True, threads=threads) as vl:
        errs = []
        for p in ref["prompts"]:
            assert vl.tokenize(p["text"]) == p["ids"], "llama.cpp tokenizes a prompt differently"
            errs.append(rel_err(vl.logits(p["ids"]), p["logits"]))
        res["text_f32"] = {"prompts": len(errs), "max_rel_err": max(errs), "tol": TEXT_TOL, "ok": max(errs) < TEXT_TOL}
    with LlamaVL(files["text:F32"], files["mmproj:F16"], f32_kv=True, **mm) as vl:
        errs, shapes = [], []
        for im in ref["images"]:
            ours = vl.image_embeddings(im["image"])
            shapes.append(list(ours.shape))
            errs.append(rel_err(ours, im["embeddings"]) if ours.shape == im["embeddings"].shape else float("inf"))
        res["mmproj_f16"] = {"shapes": shapes, "max_rel_err": max(errs), "tol": EMBED_TOL, "ok": max(errs) < EMBED_TOL}
        chat, item = ref["chat"], ref["item"]
        err = rel_err(reply_logits(vl, chat, item), chat["ref_logits"])  # raises if the image token counts differ
        res["chat_f32"] = {"image_tokens": vl.last_image_tokens, "reply_tokens": len(chat["reply_ids"]),
                           "max_rel_err": err, "tol": CHAT_TOL, "ok": err < CHAT_TOL}  # fmt: skip
    with LlamaVL(files["text:Q4_K_M"], files["mmproj:F16"], **mm) as vl:
        cand = reply_logits(vl, chat, item)
        drift = token_drift(chat["ref_logits"], cand, chat["reply_ids"])
        res["chat_q4_k_m"] = {"max_rel_err": rel_err(cand, chat["ref_logits"]), "mean_kld": drift.mean_kld,
                              "same_top1_pct": drift.same_top_pct, "note": "random weights: reported, not judged"}  # fmt: skip
    res["files"] = {k: f"{v.name} ({v.stat().st_size / 2**20:.0f} MiB)" for k, v in files.items()}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/qoqopt-7b-shape"))
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "shape_7b_gguf.json")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    args = ap.parse_args(argv)

    os.environ.setdefault("TRITON_INTERPRET", "1")  # the model runs on the CPU: kernels through Triton's interpreter
    import llama_cpp
    import transformers

    t0 = time.perf_counter()
    src, gguf, seconds = build(args.work)
    ref = transformers_side(src)
    res = llama_side(gguf, ref, args.threads)
    checks = [k for k, v in res.items() if isinstance(v, dict) and "ok" in v]
    ok = all(res[k]["ok"] for k in checks)
    for k in checks + ["chat_q4_k_m"]:
        print(f"{k:<12} {'ok  ' if res[k].get('ok', True) else 'FAIL'} {json.dumps({a: b for a, b in res[k].items() if a != 'ok'})}")
    out = {"model": "qoqopt mini --preset 7b-shape (QoQ-Med-7B shapes, 2 decoder layers, 8 vision blocks, random weights)",
           "machine": platform.machine(), "versions": {"llama_cpp_python": llama_cpp.__version__,
                                                       "transformers": transformers.__version__},
           **seconds, "transformers_reference_s": ref["seconds"], "total_s": round(time.perf_counter() - t0, 1),
           "ok": ok, **res}  # fmt: skip
    from qoqopt.fileio import atomic_write_text

    atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    print(f"{'all checks pass' if ok else 'A CHECK FAILED'}; saved {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
