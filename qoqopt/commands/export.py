"""`qoqopt export MODEL --format gguf ...`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .argtypes import byte_size, count_or_all, damp_fraction, non_negative_float, seed

EXAMPLES = """\
examples:
  qoqopt export out/mini --format gguf --quant F16 --imatrix none --out out/mini-gguf
  qoqopt export ddvd233/QoQ-Med-VL-7B --format gguf --quant Q4_K_M,Q5_K_M,Q8_0 --out out/qoq-7b-gguf
  qoqopt export out/mini --format gguf --quant Q4_K_M --imatrix my_scans.jsonl --out out/q4
  qoqopt export out/mini --format gguf --quant IQ4_XS --imatrix out/q4/mini.imatrix.gguf --out out/iq4

Writes <Name>.<QUANT>.gguf (llama.cpp arch qwen2vl), mmproj-<Name>-<type>.gguf (the checkpoint's own
vision tower), <Name>.imatrix.gguf (when K-quants / IQ types are built with an imatrix), an Ollama
Modelfile with the `template` and `params` files `ollama run hf.co/<repo>` reads instead, README.md and
manifest.json (sha256, size, type, source revision).

--imatrix: clinical (default) runs domain-balanced clinical image+text chats through the transformers
model and collects per-channel input statistics at the text positions, which attend to the image
(--imatrix-image-weight 1 also counts the image tokens' own activations); a .jsonl path does the same
on your own set (see `qoqopt data --help`); a .gguf/.dat path reuses a llama.cpp imatrix file; none
quantizes without one. F32/F16/BF16/Q8_0 never use it.

--split-max-size 48G writes each text GGUF larger than that in parts, <Name>.<QUANT>-00001-of-0000N.gguf
(as llama-gguf-split does), every part at most that size unless one tensor alone is larger (sizes are
decimal, 48G = 48e9 bytes; at least 1M): the Hugging Face Hub takes files of at most
50 GB, and a 32B F16/BF16 GGUF is about 65. llama.cpp and LM Studio are given the first part and load
the rest; the Modelfile names every part, one FROM line each, which Ollama 0.30 or later merges.

QoQ-Med's ECG encoder (time_series_embedding.*) has no llama.cpp counterpart and is left out on
purpose; the output README says so.

GPTQ / AWQ (for vLLM and transformers):
  qoqopt export out/mini --format gptq --bits 4 --group-size 128 --out out/mini-gptq
  qoqopt export ddvd233/QoQ-Med-VL-7B --format awq --calib my_scans.jsonl --samples 256 --out out/awq

Layer-streaming: decoder layers are loaded, quantized and released one at a time straight from the
safetensors shards, so peak memory is one layer plus calibration activations. The vision tower and
lm_head stay unquantized (declared in quantization_config); QoQ-Med's ECG encoder is carried through
unquantized, or left out with --drop-ecg for vLLM, which loads neither QoQ-Med's own class nor the
encoder's tensors. GPTQ's column order (--order): by default "static" act-order, most active inputs
first across the whole matrix with each group's scale fixed from the original weights, which keeps
the plain layout (g_idx = k // group size, desc_act false: full-speed kernels everywhere);
"group-aware" (GAR, GPTQModel's default) and "natural" (plain GPTQ) keep it too; "act" (desc_act)
permutes g_idx, which costs kernel speed.
GPTQ defaults to symmetric: vLLM's fast Marlin kernels take only sym: true, and
GPTQModel.load refuses asymmetric v1 it did not produce itself. AWQ defaults to zero-points (GEMM).
"""

FORMATS = ("gguf", "gptq", "awq")


def register(sub) -> None:
    from ..exports.hf_quant import GPTQ_ORDERS  # torch-free

    p = sub.add_parser(
        "export",
        help="write a compressed build: GGUF + mmproj (llama.cpp, LM Studio, Ollama) or GPTQ / AWQ (vLLM, transformers)",
        description="Export a QoQ-Med / Qwen2.5-VL checkpoint to a runtime format: GGUF text + its own mmproj "
        "(calibrated with a clinical imatrix), or GPTQ / AWQ safetensors calibrated on clinical chats.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="local checkpoint directory or Hub id (owner/name)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("--out", required=True, type=Path, help="output directory (refused if it exists and is not empty, unless --force)")
    p.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    p.add_argument("--force", action="store_true", help="replace an earlier build in --out (a folder holding its manifest.json; other folders are refused)")
    p.add_argument("--samples", "--calib-items", dest="samples", type=int,
                   help="calibration chats: for the GGUF imatrix (default 64) or GPTQ/AWQ (default 128)")  # fmt: skip
    p.add_argument("--seed", type=seed, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where calibration runs (the clinical imatrix; GPTQ/AWQ): auto takes CUDA where torch sees a GPU "
                        "(default); cpu for a GPTQ/AWQ build whose bytes --threads fixes")  # fmt: skip
    p.add_argument("--threads", type=count_or_all,
                   help="quantizer threads: llama.cpp's for GGUF, torch's for GPTQ/AWQ (default and 0: for llama.cpp "
                        "one per CPU this process may use, for torch one per physical core it may use, performance "
                        "cores only on a hybrid CPU, fewer where OMP_NUM_THREADS asks for fewer; both capped by a "
                        "container's CPU quota, which neither library reads). A CPU GPTQ/AWQ build's bytes follow "
                        "the count, which its manifest records")  # fmt: skip
    g = p.add_argument_group("gguf")
    g.add_argument("--quant", help="comma-separated types, e.g. Q4_K_M,Q5_K_M,Q6_K,Q8_0,IQ4_XS,F16,BF16 (default Q4_K_M)")
    g.add_argument("--imatrix", metavar="clinical|none|FILE", help="importance matrix source (default: clinical)")
    g.add_argument("--mmproj-type", choices=["f32", "f16", "bf16", "q8_0", "none"], help="mmproj type (default: f16)")
    g.add_argument("--name", help="file name stem (default: the model's folder or repo name)")
    g.add_argument("--split-max-size", dest="split_max_bytes", type=byte_size, metavar="SIZE",
                   help="write text GGUFs larger than SIZE (e.g. 48G; K, M, G, T are decimal; at least 1M) in parts "
                        "llama.cpp loads as one (default, or 0: whole files)")  # fmt: skip
    g.add_argument(
        "--imatrix-image-weight", type=non_negative_float, metavar="W",
        help="weight of image positions' own activations in the clinical imatrix, relative to the (image-conditioned) "
        "text positions; 1 counts every token alike (default: 0; no weight, nor the imatrix itself, has been shown "
        "to lower drift on the mini model: README, Known issues)",
    )  # fmt: skip
    q = p.add_argument_group("gptq / awq")
    q.add_argument("--bits", type=int, choices=[4, 8], help="weight bits (AWQ GEMM: 4 only; default 4)")
    q.add_argument("--group-size", type=int, help="32, 64, 128 or -1 (one group per row, GPTQ only; default 128)")
    order = q.add_mutually_exclusive_group()
    order.add_argument("--order", choices=list(GPTQ_ORDERS),
                       help="GPTQ column visiting order (default static: act-order with static groups, plain layout; "
                            "group-aware, natural; act = desc_act, permuted g_idx, slower kernels)")  # fmt: skip
    # the flags of earlier releases, kept working
    order.add_argument("--act-order", dest="order", action="store_const", const="act", help=argparse.SUPPRESS)
    order.add_argument("--natural-order", dest="order", action="store_const", const="natural", help=argparse.SUPPRESS)
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric (GPTQ default: vLLM's Marlin path needs sym: true)")  # fmt: skip
    sym.add_argument("--asym", dest="sym", action="store_false",
                     help="zero-points (AWQ default; asymmetric GPTQ v1 keeps zero-points >= 1)")  # fmt: skip
    q.add_argument("--calib", metavar="clinical|FILE.jsonl", help="calibration chats (default clinical)")
    q.add_argument("--damp", type=damp_fraction, metavar="F",
                   help="GPTQ: dampening added to each Hessian's diagonal, a fraction of its mean (GPTQModel's "
                        "damp_percent; default 0.01; tenfold where a Cholesky fails, which the build says)")  # fmt: skip
    q.add_argument("--quantize-vision", action="store_true", default=None, help="AWQ: also quantize the vision blocks (opt-in)")
    q.add_argument("--drop-ecg", action="store_true", default=None,
                   help="leave out QoQ-Med's ECG encoder and declare the plain Qwen2.5-VL class, so vLLM can serve the "
                        "build (default: carry the encoder, which vLLM refuses)")  # fmt: skip
    p.set_defaults(func=run)


# Options only one family of formats reads, each with where its counterpart lives. Set with the
# other family they are refused: silently ignoring `--format gptq --quant Q8_0` would hand back a
# 4-bit build the user did not ask for.
GGUF_ONLY = {
    "quant": ("--quant", "GPTQ/AWQ take --bits and --group-size"),
    "imatrix": ("--imatrix", "GPTQ/AWQ calibrate with --calib"),
    "mmproj_type": ("--mmproj-type", "GPTQ/AWQ keep the vision tower inside the checkpoint"),
    "name": ("--name", "GPTQ/AWQ write a Hugging Face folder named by --out"),
    "imatrix_image_weight": ("--imatrix-image-weight", "GPTQ/AWQ have no imatrix"),
    "split_max_bytes": ("--split-max-size", "GPTQ/AWQ write safetensors shards of at most 2 GiB"),
}
HF_ONLY = {
    "bits": ("--bits", "GGUF picks its bits with --quant (e.g. Q4_K_M)"),
    "group_size": ("--group-size", "each GGUF type fixes its own block size"),
    "sym": ("--sym/--asym", "each GGUF type fixes its own scheme"),
    "calib": ("--calib", "GGUF calibrates with --imatrix clinical|FILE"),
    "quantize_vision": ("--quantize-vision", "GGUF's vision tower is the mmproj: see --mmproj-type"),
    "drop_ecg": ("--drop-ecg", "GGUF builds always leave the ECG encoder out"),
}


def refuse_foreign_options(args) -> None:
    """Refuse options of the other format family (their defaults live in the exporters themselves)."""
    from ..errors import QoqoptError

    gguf = args.format == "gguf"
    if args.order and gguf:
        raise QoqoptError("the column order (--order) is a GPTQ option; GGUF has none")
    if args.damp is not None and args.format != "gptq":  # GPTQ's alone: the other family's flags are below
        why = "AWQ searches scales" if args.format == "awq" else "llama.cpp's quantizer"
        raise QoqoptError(f"--damp is a GPTQ option, not for --format {args.format}: {why} dampens no Hessian")
    family, foreign = ("GPTQ/AWQ", HF_ONLY) if gguf else ("GGUF", GGUF_ONLY)
    for dest, (flag, hint) in foreign.items():
        if getattr(args, dest) is not None:
            raise QoqoptError(f"{flag} is a {family} option, not for --format {args.format}; {hint}")


def _device(choice: str) -> str | None:
    """The calibration device (None: the exporters' own choice, CUDA where torch sees a GPU); torch
    is imported only to check an explicit cuda (a GGUF export of F16/BF16/Q8_0 never loads it)."""
    if choice == "auto":
        return None
    if choice == "cuda":
        import torch

        if not torch.cuda.is_available():
            from ..errors import QoqoptError

            raise QoqoptError("--device cuda: no CUDA GPU is visible to torch here (use --device cpu, or auto)")
    return choice


def _given(args, dests) -> dict:
    """The options the user set: the rest take the exporter's own defaults."""
    return {d: getattr(args, d) for d in dests if getattr(args, d) is not None}


def default_threads(fmt: str) -> int:
    """llama.cpp's quantizer takes every hardware thread of the host, torch one per physical core,
    and neither reads a CPU quota or (llama.cpp) the affinity mask: `docker --cpus 2` on a 64-thread
    host ran 64 threads throttled to 2 CPUs' time. Here: the CPUs this process may use, capped by
    its quota, for llama.cpp; torch's own count under the same cap for GPTQ/AWQ."""
    from ..bench.machine import threads_or_default, usable_cores

    return usable_cores() if fmt == "gguf" else threads_or_default(0)


def run(args) -> int:
    refuse_foreign_options(args)
    args.threads = args.threads or default_threads(args.format)
    device = {"device": d} if (d := _device(args.device)) else {}  # given only, as every option here
    if args.format in ("gptq", "awq"):
        from ..exports.hf_quant import export_hf_quant

        export_hf_quant(args.model, args.out, args.format, order=args.order, force=args.force, seed=args.seed,
                        revision=args.revision, **device, **_given(args, [*HF_ONLY, "damp", "samples", "threads"]))  # fmt: skip
        return 0
    from ..exports.gguf_export import GGUFOptions, export_gguf

    options = _given(args, [*GGUF_ONLY, "threads"]) | device
    if "quant" in options:
        options["quants"] = [q for q in options.pop("quant").split(",") if q.strip()]
    if args.samples is not None:
        options["calib_items"] = args.samples
    export_gguf(args.model, args.out, GGUFOptions(**options, seed=args.seed), revision=args.revision, force=args.force)
    return 0
