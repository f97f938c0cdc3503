"""Benchmark: peak memory of layer-streaming GPTQ/AWQ vs the size of the model, with per-layer time.

    .venv/bin/python benchmarks/bench_quant_memory.py [--preset small] [--formats gptq,awq,imatrix] [--samples 8] [--json PATH]

Builds the `small` mini QoQ-Med (8 decoder layers, 190 M parameters, most of them the real-size
vocabulary: embedding + lm_head), then runs, each as its own process (peak RSS is the child's
ru_maxrss from os.wait4):

* `imports`: python importing torch, transformers and qoqopt (the floor every process pays);
* `calibration data`: imports + building and encoding the calibration chats (DICOM decoding, the
  processor), which any calibrated quantizer pays whatever the model size;
* `full fp32 model`: the peer, `Qwen2_5_VLForConditionalGeneration.from_pretrained(dtype=float32)`
  and one calibration forward, which is what a quantizer that loads the whole model needs;
* `export <fmt>`: `export_hf_quant`, the layer-streaming quantizer (reads the vision tower and the
  embedding once, then one decoder layer at a time; lm_head is never loaded as a float matrix);
* `imatrix whole model` / `imatrix streamed`: the GGUF export's clinical imatrix statistics over the
  same chats, with hooks on the whole fp32 transformers model (how it was computed before) and
  streamed one decoder layer at a time (how `--imatrix clinical` computes it now).

Reported: peak RSS of each, the increment over `imports`, the ratio export / full-model increment,
the fp32 model size, and per-layer seconds (from the export's manifest). The small preset is far
from a 7B model's shape (its vocabulary dominates; a 7B layer is 0.93 GB in fp32 against an
embedding of 2.2 GB), so the ratio here understates the saving on a real checkpoint.

Results are printed and saved as JSON (default benchmarks/results/quant_memory.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

from measure import run_measured  # run by path: benchmarks/ is on sys.path
from qoqopt.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def run_code(code: str) -> dict:
    """Python ``code`` in a child, measured (rounded for the JSON)."""
    r = run_measured([sys.executable, "-c", code], show_failure=True)
    return {**r, "wall_s": round(r["wall_s"], 2), "peak_rss_mib": round(r["peak_rss_mib"], 1)}


IMPORTS = "import torch, transformers, qoqopt.exports.hf_quant, qoqopt.quantize.runner\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--formats", default="gptq,awq,imatrix", help="export formats to measure; imatrix: the GGUF imatrix pass")
    ap.add_argument("--samples", type=int, default=8, help="calibration chats (default 8)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the children (default: torch's)")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "quant_memory.json")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="qoqopt-bench-quant-") if not args.work else None
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"mini-{args.preset}"
    threads = f"torch.set_num_threads({args.threads})\n" if args.threads else ""
    if not (ckpt / "config.json").exists():
        r = run_code(
            "from pathlib import Path\nfrom qoqopt.mini import build_model, save_checkpoint\n"
            f"p = Path({str(ckpt)!r}); p.mkdir(parents=True, exist_ok=True)\n"
            f"save_checkpoint(build_model({args.preset!r}, 0), p)\n"
        )
        assert r["rc"] == 0, "building the mini model failed"

    from safetensors import safe_open

    params = 0
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        for k in f.keys():
            params += math.prod(f.get_slice(k).get_shape())
    fp32_mib = params * 4 / 2**20
    disk_mib = (ckpt / "model.safetensors").stat().st_size / 2**20

    results = {"imports": run_code(IMPORTS + threads + "print('ok')")}
    results["calibration data"] = run_code(
        IMPORTS + threads + "from qoqopt.calibration import calibration_items\n"
        "from qoqopt.processor import load_processor\nfrom qoqopt.quantize.runner import encode_chats\n"
        f"items, _ = calibration_items('clinical', {args.samples}, 0)\n"
        f"chats = encode_chats(load_processor({str(ckpt)!r}), items)\nprint('ok')\n"
    )
    results["full fp32 model"] = run_code(
        IMPORTS + threads + "from qoqopt.calibration import calibration_items, encode_chat\n"
        "from qoqopt.processor import load_processor\n"
        "from transformers import Qwen2_5_VLForConditionalGeneration\n"
        f"m = Qwen2_5_VLForConditionalGeneration.from_pretrained({str(ckpt)!r}, dtype=torch.float32).eval()\n"
        f"items, _ = calibration_items('clinical', 1)\n"
        f"b = encode_chat(load_processor({str(ckpt)!r}), items[0])\n"
        "with torch.no_grad(): m(**b)\nprint('ok')\n"
    )
    manifests = {}
    for fmt in [f for f in args.formats.split(",") if f]:
        if fmt == "imatrix":
            results.update(imatrix_processes(ckpt, args.samples, threads))
            continue
        out = work / f"out-{fmt}"
        results[f"export {fmt}"] = run_code(
            IMPORTS + threads + "import json\nfrom pathlib import Path\nfrom qoqopt.exports.hf_quant import export_hf_quant_report\n"
            f"r = export_hf_quant_report({str(ckpt)!r}, Path({str(out)!r}), {fmt!r}, samples={args.samples}, force=True, progress=False)\n"
            "print(json.dumps({'layers': r.layers, 'calibration': r.calibration}))\n"
        )
        if results[f"export {fmt}"]["rc"] == 0:
            manifests[fmt] = json.loads(results[f"export {fmt}"]["tail"])
            results[f"export {fmt}"]["tail"] = "ok"

    floor = results["imports"]["peak_rss_mib"]
    data_floor = results["calibration data"]["peak_rss_mib"]
    full_inc = results["full fp32 model"]["peak_rss_mib"] - floor
    print(f"\nmini {args.preset}: {params / 1e6:.1f} M parameters, {fp32_mib:.0f} MiB in fp32, {disk_mib:.0f} MiB on disk (bf16)")
    print(f"{'process':<18}{'peak RSS MiB':>14}{'over imports':>14}{'wall s':>9}")
    for name, r in results.items():
        print(f"{name:<18}{r['peak_rss_mib']:>14.0f}{r['peak_rss_mib'] - floor:>14.0f}{r['wall_s']:>9.1f}"
              + ("" if r["rc"] == 0 else f"   FAILED rc={r['rc']}"))  # fmt: skip
    summary = {}
    if "imatrix streamed" in results:
        inc = {k: results[f"imatrix {k}"]["peak_rss_mib"] - data_floor for k in ("whole model", "streamed")}
        summary["imatrix"] = {"peak_rss_over_calibration_data_mib": {k: round(v, 1) for k, v in inc.items()},
                              "ratio_streamed_vs_whole_model": round(inc["streamed"] / inc["whole model"], 3)}
        print(f"imatrix: over the calibration-data process, whole model {inc['whole model']:.0f} MiB, "
              f"streamed {inc['streamed']:.0f} MiB (x{inc['streamed'] / inc['whole model']:.2f})")
    for fmt, m in manifests.items():
        inc = results[f"export {fmt}"]["peak_rss_mib"] - floor
        layer_s = [lr["seconds"] for lr in m["layers"]]
        model_inc = results[f"export {fmt}"]["peak_rss_mib"] - data_floor
        summary[fmt] = {
            "peak_rss_over_imports_mib": round(inc, 1),
            "peak_rss_over_calibration_data_mib": round(model_inc, 1),
            "ratio_model_part_vs_fp32_model_size": round(model_inc / fp32_mib, 3),
            "ratio_vs_full_fp32_model_peer": round(inc / full_inc, 3) if full_inc > 0 else None,
            "ratio_vs_fp32_model_size": round(inc / fp32_mib, 3),
            "layer_seconds": layer_s,
            "layer_rel_error": [lr["rel_error"] for lr in m["layers"]],
            "calibration": m["calibration"],
        }
        print(f"{fmt}: peak over imports {inc:.0f} MiB = {inc / fp32_mib:.2f} x the fp32 model, "
              f"{inc / full_inc:.2f} x the full-model peer; over the calibration-data process {model_inc:.0f} MiB "
              f"= {model_inc / fp32_mib:.2f} x the fp32 model; per layer {', '.join(f'{s:.1f}' for s in layer_s)} s")  # fmt: skip
    record = {
        "benchmark": "quant_memory",
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "preset": args.preset, "params": params, "fp32_mib": round(fp32_mib, 1), "disk_mib": round(disk_mib, 1),
        "samples": args.samples, "processes": results, "summary": summary,
    }  # fmt: skip
    atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    print(f"saved {args.json}")
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


def imatrix_processes(ckpt: Path, samples: int, threads: str) -> dict:
    """The GGUF imatrix statistics, whole-model hooks vs layer streaming, each in its own process."""
    setup = (IMPORTS + threads + "from qoqopt import calibration\nfrom qoqopt.loader import open_checkpoint\n"
             "from qoqopt.processor import load_processor\n"
             f"items, _ = calibration.calibration_items('clinical', {samples}, 0)\nproc = load_processor({str(ckpt)!r})\n")
    whole = (f"m = calibration.load_hf_model({str(ckpt)!r}, dtype='float32', device='cpu')\n"
             "s = calibration.collect_input_sq_sums(m, proc, items, progress=False)\n")
    streamed = (f"s = calibration.stream_input_sq_sums(open_checkpoint({str(ckpt)!r}), proc, items, device='cpu', "
                "progress=False)\n")
    return {f"imatrix {name}": run_code(setup + code + "print('ok')\n")
            for name, code in (("whole model", whole), ("streamed", streamed))}


if __name__ == "__main__":
    sys.exit(main())
