"""Static machine-code report of the W4A16, merger and attention kernels, compiled for sm_90 on any machine.

For each launch ``w4a16_matmul`` would make at the 7B language-model shapes, prints registers,
spill stack and the instructions the main K loop issues per dequantized weight per thread; for the
merger's fc1 at 7B dims, the instructions its GEMM K loop issues per K step per thread; for vision
attention (window and full layers), the key loop's instructions and global loads per key block per
thread. Issue slots
bound the first versions of both on the H200 (W4A16: two int/float conversions at 1/8 of the FMA
rate per weight; merger: the norm applied to every A element); this is the proxy a CPU-only session
can measure. It is not a timing: the GPU benchmark (bench_kernels.py) is the judge.

    python benchmarks/sass_report.py --out benchmarks/results/sass_report.json

Code generation differs between Triton releases (3.6 spilled a former AWQ GEMV that 3.9 kept in
registers), so also read it with the Triton a GPU image runs, installed beside the venv's:

    pip download --no-deps -d /tmp/whl triton==3.6.0 && pip install --no-deps --target /tmp/t36 /tmp/whl/*.whl
    PYTHONPATH=/tmp/t36 python benchmarks/sass_report.py --out benchmarks/results/sass_report_triton3.6.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernels import FRAGMENT_DECODE, SWEEP, config_tag  # noqa: E402
from benchmarks.offline_compile import (  # noqa: E402
    NoToolchain,
    attention_compile,
    main_loop_mix,
    merger_fc1_compile,
    mma_loop_mix,
    resource_usage,
    w4a16_compile,
)

SHAPES = ((3584, 18944, "gate/up"), (18944, 3584, "down"), (3584, 512, "k/v"))
M_VALUES = (1, 16, 128, 2048)
# Not defaults, from the GPU sweep: 128-row tiles capped at 128 registers, for two programs per SM
# (session 17's prefill dequant took them from 128 to 130 under Triton 3.6, and the H200 ran them
# 19-26% slower); one-row tiles as wide as their warps' columns (no barrier in the K loop); 16-row
# tiles built by joins (JOIN_FIELDS, wide shared-memory stores); decode over fragment words
# (KERNEL="frag", at one row and at 16: MMA operands straight from the dequant's registers); prefill
# over fragment words and GPTQ words with 128-deep K steps
SWEPT = ([(3584, 18944, "gate/up", m, cfg) for m, case in ((128, "w4a16-mid"), (2048, "w4a16-prefill"))
          for cfg in SWEEP[case] if "maxnreg" in cfg or cfg.get("BLOCK_K") == 128 or cfg.get("FRAGMENTS")]
         + [(k, n, label, 1, cfg) for k, n, label in SHAPES[:2] for cfg in SWEEP["w4a16-gemv"]]
         + [(k, n, label, 16, cfg) for k, n, label in SHAPES[:2] for cfg in SWEEP["w4a16"]
            if cfg.get("JOIN_FIELDS") or cfg.get("KERNEL") == "frag"]
         # decode over fragment words at the other launches apply() makes: q/o, and the fused gate/up
         # (296 tiles: unsplit by the rules), one dot and two a K step
         + [(k, n, label, m, cfg) for k, n, label in ((3584, 3584, "q/o"), (3584, 37888, "fused gate/up"))
            for m in (1, 16) for cfg in FRAGMENT_DECODE if cfg["BLOCK_N"] == 128])


def w4a16_rows() -> list[dict]:
    rows = []
    # One layout: AWQ checkpoints are repacked to GPTQ's at load; the launches w4a16_matmul plans
    # From 128 rows the default is the dense plan (a dequantization, then cuBLAS): the tiles it
    # replaced there are reported beside it, as "mma"
    launches = ([(k, n, label, m, {}) for k, n, label in SHAPES for m in M_VALUES]
                + [(k, n, label, m, dict(KERNEL="mma")) for k, n, label in SHAPES for m in M_VALUES if m >= 128]
                + SWEPT)
    for k, n, label, m, config in launches:
        compiled, plan = w4a16_compile(m, k, n, **config)
        mix = main_loop_mix(compiled)
        c = plan.constexprs
        weights = c["BLOCK_K"] * c["BLOCK_N"] / (32 * c["num_warps"])  # per thread per K step
        loop = sum(mix.values()) if mix else None
        rows.append(dict(
            shape=f"{label} {k}->{n}", m=m,
            kernel=config_tag(config) if "KERNEL" in config else plan.kernel + (f"-{config_tag(config)}" if config else ""),
            split=plan.split, tile=f"{c.get('BLOCK_M', 1)}x{c['BLOCK_N']}x{c['BLOCK_K']}",
            **(resource_usage(compiled) or {}), loop_instructions=loop,
            instructions_per_weight=round(loop / weights, 2) if loop else None,
            barriers=mix.get("BAR", 0) if mix else None,  # per K step: each waits for every warp of the program
            top_opcodes=dict(mix.most_common(6)) if mix else None,
        ))
    return rows


def merger_rows() -> list[dict]:
    rows = []
    # each size's default tiles; the per-slot 1/RMS block runs once per C / BLOCK_K steps, so a step
    # is counted without what the branch in the loop jumps over, and that count is reported beside
    # and the sweep's configs split over K by patch slots or loading by TMA (not defaults)
    swept = [(patches, cfg) for patches, case in ((256, "merger-small"), (1296, "merger-mid"), (5120, "merger"))
             for cfg in SWEEP[case] if {"SPLIT_K", "TMA", "RESCALE"} & cfg.keys()]
    for patches, config in [(256, {}), (1296, {}), (5120, {})] + swept:
        compiled, cfg = merger_fc1_compile(patches // 4, **config)
        mix, whole = mma_loop_mix(compiled, skip_branches=True), mma_loop_mix(compiled)
        rows.append(dict(op="merger fc1" + (f" {config_tag(config)}" if config else ""), patches=patches,
                         tile=f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}",
                         warps=cfg["num_warps"], stages=cfg["num_stages"], **(resource_usage(compiled) or {}),
                         k_loop_instructions=sum(mix.values()) if mix else None,
                         branched_over=sum(whole.values()) - sum(mix.values()) if mix else None,
                         top_opcodes=dict(mix.most_common(6)) if mix else None))
    return rows


def attention_rows() -> list[dict]:
    rows = []
    for mode, avg_len in (("windows", 64), ("full", 5120)):
        compiled, cfg = attention_compile(avg_len)
        mix = mma_loop_mix(compiled)
        rows.append(dict(op="attention", mode=mode, tile=f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}", warps=cfg["num_warps"],
                         **(resource_usage(compiled) or {}),
                         key_loop_instructions=sum(mix.values()) if mix else None,
                         global_loads=sum(n for op, n in mix.items() if op.startswith("LDG") and op != "LDGDEPBAR")
                         if mix else None,
                         top_opcodes=dict(mix.most_common(6)) if mix else None))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    print(f"sm_90 machine code from triton {triton.__version__}\n")
    try:
        rows, merger, attention = w4a16_rows(), merger_rows(), attention_rows()
    except NoToolchain as err:
        print(f"error: this triton cannot compile for CUDA offline: {err}", file=sys.stderr)
        return 1
    print(f"{'shape':22} {'M':>5} {'kernel':26} {'split':>5} {'tile':>11} {'regs':>5} {'stack':>5} "
          f"{'loop':>5} {'instr/weight':>12} {'barriers':>8}")
    for r in rows:  # "-": no K loop (the dense plan's dequantization: one tile a program)
        loop = {key: "-" if r[key] is None else r[key] for key in ("loop_instructions", "instructions_per_weight", "barriers")}
        print(f"{r['shape']:22} {r['m']:>5} {r['kernel']:26} {r['split']:>5} {r['tile']:>11} "
              f"{r.get('registers', '?'):>5} {r.get('stack_bytes', '?'):>5} {loop['loop_instructions']:>5} "
              f"{loop['instructions_per_weight']:>12} {loop['barriers']:>8}")
    print(f"\n{'op':36} {'patches':>7} {'tile':>10} {'warps':>5} {'stages':>6} {'regs':>5} {'stack':>5} "
          f"{'K-step instr/thread':>20} {'branched over':>13}")
    for r in merger:
        print(f"{r['op']:36} {r['patches']:>7} {r['tile']:>10} {r['warps']:>5} {r['stages']:>6} {r.get('registers', '?'):>5} "
              f"{r.get('stack_bytes', '?'):>5} {r['k_loop_instructions']:>20} {r['branched_over']:>13}")
    print(f"\n{'op':10} {'mode':>7} {'tile':>10} {'warps':>5} {'regs':>5} {'stack':>5} {'key-loop instr/thread':>22} "
          f"{'loads':>5}")
    for r in attention:
        print(f"{r['op']:10} {r['mode']:>7} {r['tile']:>10} {r['warps']:>5} {r.get('registers', '?'):>5} "
              f"{r.get('stack_bytes', '?'):>5} {r['key_loop_instructions']:>22} {r['global_loads']:>5}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"schema": "qoqopt.sass_report/1", "target": "sm_90", "triton": triton.__version__,
                                   "w4a16": rows, "merger": merger, "attention": attention}, indent=1))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
