"""`qoqopt bench MODEL --variants ...`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data.domains import DOMAINS
from .argtypes import answer_limit, count_or_all, label, positive_int, seed

EXAMPLES = """\
examples:
  qoqopt bench out/mini --variants bf16,gguf:Q4_K_M,gguf:Q8_0,gptq:4 --out results/
  qoqopt bench out/mini --variants gguf:Q4_K_M,gptq:4 --from out/mini-gguf --from out/mini-gptq --out results/
  qoqopt bench ddvd233/QoQ-Med-VL-7B --variants bf16,gguf:Q4_K_M,awq:4,bnb:nf4 --device cuda --items 60 --out results/
  qoqopt bench ddvd233/QoQ-Med-VL-7B --variants bf16,gguf:Q4_K_M --from me/QoQ-Med-VL-7B-GGUF --device cuda
  qoqopt bench out/mini --variants gguf:Q4_K_M --eval my_scans.jsonl --threads 1 --label "laptop, 1 thread"
  qoqopt bench out/mini --variants gguf:Q4_K_M,gguf:llama.cpp/mini-Q4_K_M.gguf --from out/gguf   # vs llama.cpp's own
  qoqopt report results/*.json --out report/

Variants: bf16 | fp16 | fp32 (transformers), gguf:<TYPE> (llama.cpp, text GGUF + mmproj through mtmd),
gguf:<FILE>.gguf (a GGUF another tool made, such as llama.cpp's convert_hf_to_gguf.py and
llama-quantize: the one mmproj*.gguf beside it, or gguf:TEXT.gguf+MMPROJ.gguf; its dims are checked
against the model's, its origin only where a qoqopt manifest beside it lists it), gptq:4|8 and awq:4 (transformers with qoqopt's W4A16 QuantLinear: Triton on CUDA, torch on CPU),
bnb:nf4|fp4|int8 (transformers + bitsandbytes, quantized at load; needs pip install 'qoqopt[bnb]',
which `make setup` includes). A build is taken from a --from directory or Hub repo (or an earlier
run's OUT/builds) when its manifest lists it, otherwise built with `qoqopt export` into OUT/builds.

Drift: each eval chat (image + question, then the reference reply, teacher-forced) runs through the
reference (the source checkpoint in transformers; fp32 compute up to ~3 B parameters, bf16 above, its
logits projected in fp32 as llama.cpp's are) and through each variant; at the reply positions: mean
KLD (with a 95% bootstrap interval over the chats), p99 KLD, same top-1 %, RMS delta-p. Each variant
also answers every chat greedily (up to --answer-tokens): \\boxed{} set-F1 accuracy, and the answers
with no \\boxed{} counted. Overall and per clinical domain, worst domain named.

Speed (medians after warm-up): image encode at both ends of QoQ-Med's pixel range (256x256 and
728x700), time to first token, prefill tok/s (the language model's prompt pass: in transformers its
first forward and logits, timed by hooks; in llama.cpp the prompt decode after the image encode),
decode tok/s, peak device memory (transformers: torch's allocator; llama.cpp: the buffers it logs)
and peak host RSS of the variant's own process.

One JSON per run (schema qoqopt.bench/1) tagged with the machine, package versions, qoqopt commit
and every variant file's sha256. A failing variant is recorded with its error; the rest go on, and
the exit status is then 1. A build that is missing, damaged or fails to export is named before the
reference runs; when no variant can run, nothing is run.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="measure each build's drift from the original and its speed, each in its own runtime",
        description="Benchmark compressed builds against the original: clinical drift and speed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="the source checkpoint: local directory or Hub id (owner/name)")
    p.add_argument("--variants", default="bf16,gguf:Q4_K_M,gguf:Q8_0,gptq:4", help="comma-separated (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for the result JSON (default: results/)")
    p.add_argument("--from", dest="search", action="append", default=[], metavar="DIR|OWNER/NAME",
                   help="an export directory, or a Hub repo published by `qoqopt publish`, to take builds "
                        "from (repeatable; from a Hub GGUF repo only the benched quant types are fetched)")  # fmt: skip
    p.add_argument("--builds", type=Path, help="where missing builds are made, and reused by a later run where made from the same "
                   "checkpoint with the same --calib-items, else made again (default: OUT/builds)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where variants run (default cpu); with cuda, GGUF variants run on one GPU "
                        "(cuda:0, as transformers does) when llama-cpp-python was built with CUDA, else on "
                        "the CPU, which bench says")
    p.add_argument("--eval", dest="eval_source", default="clinical", metavar="clinical|FILE.jsonl",
                   help="eval chats: the built-in clinical eval split (seeded views of the same few scans its calib split "
                   "draws on: held-out views, not patients; `qoqopt data list`), or your own JSONL set")  # fmt: skip
    p.add_argument("--items", type=int, default=20, help="eval chats, domain-balanced (default 20)")
    p.add_argument("--domain", action="append", choices=list(DOMAINS), metavar="DOMAIN",
                   help="only this domain of the eval set (repeatable), e.g. --domain ct for a CT-only service")  # fmt: skip
    p.add_argument("--seed", type=seed, default=0, help="eval sampling seed (default 0)")
    p.add_argument("--threads", type=count_or_all, default=0, help="CPU threads for torch and llama.cpp (default and 0: one per physical core this process may use, as llama.cpp and torch choose; fewer where OMP_NUM_THREADS asks for fewer, as torch takes it)")
    p.add_argument("--label", type=label, help="machine label in reports (default: GPU name, or CPU model and threads)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (default 3)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens per decode timing (default 32)")
    p.add_argument("--no-speed", action="store_true", help="drift and accuracy only")
    p.add_argument("--answer-tokens", type=answer_limit, default=1024,
                   help="the most tokens each greedy answer may take (default 1024: QoQ-Med thinks, with a bbox "
                        "JSON, before its \\boxed{} answer; a reply cut off before it scores 0, and the report "
                        "counts such answers per variant); 0: no answers, drift only, as llama-perplexity's "
                        "--kl-divergence (at 7B the answers are most of a run's time)")  # fmt: skip
    p.add_argument("--calib-items", type=positive_int, default=64, help="calibration chats for builds made on the fly (default 64: export's own for the GGUF "
                   "imatrix, half of its 128 for GPTQ/AWQ, for speed; to bench the builds you publish, "
                   "export them and pass --from)")
    p.add_argument("--reference-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype of the reference (default auto: float32 up to ~3 B parameters)")  # fmt: skip
    p.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.run import BenchOptions, run_bench
    from ..bench.speed import SpeedSettings
    from ..bench.variants import parse_variants
    from ..errors import QoqoptError

    if args.repeats < 1 or args.decode_tokens < 1:
        raise QoqoptError("--repeats and --decode-tokens must be at least 1")
    search = [_build_source(s) for s in args.search]
    opts = BenchOptions(
        model=args.model, variants=parse_variants(args.variants), out=args.out, device=args.device,
        eval_source=args.eval_source, domains=args.domain, items=args.items, seed=args.seed, search=search, builds=args.builds,
        label=args.label, threads=args.threads,
        speed=None if args.no_speed else SpeedSettings(repeats=args.repeats, decode_tokens=args.decode_tokens),
        calib_items=args.calib_items, answer_tokens=args.answer_tokens, reference_dtype=args.reference_dtype,
        revision=args.revision,
    )  # fmt: skip
    path = run_bench(opts)
    print(f"wrote {path}\nnext: {next_step(path)}")
    failed = [v["name"] for v in json.loads(path.read_text())["variants"] if v["status"] != "ok"]
    if failed:  # recorded in the result, and said in the exit status for scripts and CI
        print(f"error: {len(failed)} of {len(opts.variants)} variants failed ({', '.join(failed)}); "
              f"{path.name} records why", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def next_step(result: Path) -> str:
    """The `qoqopt report` command for the folder ``result`` was written to: with --force where an
    earlier run's report is there, which report refuses to replace without it."""
    report = result.parent / "report"
    return f"qoqopt report {result.parent}/*.json --out {report}{' --force' if report.exists() else ''}"


def _build_source(source: str) -> Path | str:
    """A --from directory (it must hold a manifest), or a Hub id, kept as given for the bench to fetch."""
    from ..errors import QoqoptError
    from ..loader import HUB_ID, check_not_a_local_path

    path = Path(source).expanduser()
    if path.exists() or not HUB_ID.match(source):
        if not (path / "manifest.json").is_file():
            raise QoqoptError(f"--from {source}: not an export directory (no manifest.json) nor a Hub id")
        return path
    check_not_a_local_path(source)
    return source
