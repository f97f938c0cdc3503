"""Tune the W4A16 decode launches for this GPU and write its table (``qoqopt.kernels.tuning``).

For every quantized linear shape of a QoQ-Med model (as ``apply(model)`` runs them: q/k/v and
gate/up fused, and each projection alone) and each decode row count, times the default launch and a
grid of candidates (tile width and warps, pipeline stages, K split), and keeps the fastest where it
beats the default by at least ``--min-gain``. Layers are held as ``apply`` holds them: fragment
words where they fit and pay, GPTQ words elsewhere; random RTN weights, group 128.

Times are CUDA-graph replays (GPU time, no host launch cost) of calls that cycle through copies of
the layer's weights together at least twice L2: a decode step never finds a layer's weight in L2,
and a replay does not flush it. A candidate whose output differs from the rules' by more than two
units in the last place of the largest output is reported and never kept; the fastest is timed
against the rules twice more, in turn, before it is kept. Where the rules win, the table says so
(``config`` null): the first table holding a layer decides it.

    python benchmarks/tune_w4a16.py                       # <qoqopt cache>/kernels/w4a16/<GPU>.json
    python benchmarks/tune_w4a16.py --out kernels/tuned/  # a table to ship with qoqopt (review it)
    python benchmarks/tune_w4a16.py --model 32b --quick --limit-s 120

The table is rewritten after every shape, so a run cut short keeps what it finished. On a machine
without a GPU it refuses: timings there mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import time
from pathlib import Path

import torch

# the repo root for `benchmarks`, last: qoqopt must come from its install (or gpu_check's package
# dir), not from the repo's qoqopt/, which holds no kernels
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernels import (config_tag, cycling, rel_err, rtn_gptq_layer, wall_ms,  # noqa: E402
                                      weight_copies)
from qoqopt.errors import QoqoptError  # noqa: E402

# Text-model dims (hidden, intermediate, attention heads, KV heads): the 7B's from its config, the
# 32B's from Qwen2.5-VL-32B's (DESIGN.md); "tiny" exercises the tuner itself (interpreter, CPU)
MODELS = {"7b": (3584, 18944, 28, 4), "32b": (5120, 27648, 40, 8), "tiny": (256, 512, 4, 2)}
GROUP_SIZE = 128
# Two units in the last place of the largest output (bf16 keeps 8 significant bits, fp16 11): a K
# split reorders fp32 sums, which can move an output across one rounding boundary; a wrong tile is
# off by far more
MAX_REL_DIFF = {torch.bfloat16: 2**-6, torch.float16: 2**-9, torch.float32: 1e-5}


def layer_shapes(model: str) -> dict[str, tuple[int, int]]:
    """``name -> (K, N)`` of each W4A16 launch a decoder layer makes, fused first (what ``apply``
    runs), widest first."""
    hidden, inter, heads, kv_heads = MODELS[model]
    kv = hidden // heads * kv_heads
    return {"gate_up": (hidden, 2 * inter), "down": (inter, hidden), "qkv": (hidden, hidden + 2 * kv),
            "o": (hidden, hidden), "gate": (hidden, inter), "k": (hidden, kv)}


def _splits(tiles: int, k_steps: int, sms: int, warps: int, per_sm: tuple[int, ...]) -> list[int]:
    """K splits that put about ``per_sm`` 4-warp programs on each SM (fewer warps, more programs),
    each split at least one K step."""
    return sorted({max(1, min(k_steps, round(p * sms * 4 / warps / tiles))) for p in per_sm})


# Fragment-word tiles: (BLOCK_N, warps, dot depth, programs an SM to aim the K split at). Half a
# program an SM (few splits of long programs) is for the latency-bound narrow layers, where 14 splits
# of 2 K steps each pay a reduction; the defaults sit at about 3. Two 64-row dots a K step (DOT_K 64)
# take the 128-wide tile from 126-128 registers to 96 (sm_90), room for a fifth program an SM.
FRAGMENT_TILES = {True: ((128, 4, 128, (0.5, 2, 3, 4)), (64, 2, 128, (2, 4)), (128, 4, 64, (3, 5))),
                  False: ((128, 4, 128, (0.5, 1, 2, 3, 4)), (64, 2, 128, (0.5, 1, 2, 3, 4)), (128, 8, 128, (1, 2, 3)),
                          (256, 8, 128, (1, 2, 3)), (128, 4, 64, (0.5, 2, 3, 4, 5)), (128, 8, 64, (2, 3, 4)))}


def candidates(k: int, n: int, m: int, words: str, sms: int, quick: bool) -> list[dict]:
    """The launch configs tried beside the default for ``m`` rows of a ``k -> n`` layer."""
    stages = (3, 4) if quick else (3, 4, 5)
    found = []
    if words == "fragments":  # one 128-row block of words per K step
        for bn, warps, dot_k, per_sm in FRAGMENT_TILES[quick]:
            depth = {} if dot_k == 128 else dict(DOT_K=dot_k)
            for st in stages:
                found += [dict(KERNEL="frag", BLOCK_N=bn, num_warps=warps, num_stages=st, SPLIT_K=s, **depth)
                          for s in _splits(-(-n // bn), k // 128, sms, warps, per_sm)]
        return found
    per_sm = (2, 3, 4) if quick else (0.5, 1, 2, 3, 4)
    block_k = GROUP_SIZE  # one group a K step
    for bn in (64, 128):  # 16-row tensor-core tiles (any M up to 16)
        for st in stages:
            found += [dict(KERNEL="mma", BLOCK_M=16, BLOCK_N=bn, BLOCK_K=block_k, num_warps=4, num_stages=st, SPLIT_K=s)
                      for s in _splits(-(-n // bn), k // block_k, sms, 4, per_sm)]
    if m == 1:  # the one-row GEMV: the default's 128-wide tiles, and tiles as wide as its warps' columns
        for bn, bk, warps in ((128, 128, 4), (512, 64, 4), (256, 64, 2)):
            found += [dict(KERNEL="gemv", BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=3, SPLIT_K=s)
                      for s in _splits(-(-n // bn), k // bk, sms, warps, per_sm)]
    return found


class Layer:
    """One RTN-quantized ``k -> n`` layer held as ``apply`` holds it, with copies of its weights."""

    def __init__(self, k: int, n: int, dtype: torch.dtype, device: torch.device, l2_bytes: int,
                 has_bias: bool = False):
        g = torch.Generator(device="cpu").manual_seed(k * 7 + n)
        layer = rtn_gptq_layer((torch.randn(n, k, generator=g) * 0.02).to(device, dtype), GROUP_SIZE)
        layer.use_fragment_words(only_where_faster=True)
        self.k, self.n, self.dtype, self.words, self.kwargs = k, n, dtype, layer.words, layer._kwargs()
        self.bias = (torch.randn(n, generator=g) * 0.1).to(device, dtype) if has_bias else None
        tensors = (layer.qweight, layer.qzeros, layer.scales)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.copies = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(weight_copies(nbytes, l2_bytes) - 1)]

    def plan(self, m: int, device: torch.device, config: dict):
        """The launch ``config`` makes at ``m`` rows (two configs with one plan launch the same kernel)."""
        from qoqopt.kernels.w4a16 import launch_plan

        return launch_plan(m, self.n, self.k, has_bias=self.bias is not None, dtype=self.dtype, device=device,
                           **self.kwargs, **config)

    def run(self, x: torch.Tensor, config: dict):
        """``() -> out`` of the next weight copy under ``config`` (planned here: a config that does
        not fit raises now)."""
        from qoqopt.kernels.w4a16 import prepare_w4a16

        launch = prepare_w4a16(x.shape[0], self.k, self.n, self.dtype, x.device, has_bias=self.bias is not None,
                               **self.kwargs, **config)
        return cycling([functools.partial(launch, x, *weights, self.bias) for weights in self.copies])


def time_us(fn) -> float:
    """GPU time of one call, CUDA-graph replay (median); on the CPU, wall time (the tuner's own
    tests: those numbers mean nothing)."""
    if torch.cuda.is_available():
        import triton.testing

        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return 1e3 * wall_ms(fn, reps=3)


def tune_one(layer: Layer, m: int, sms: int, quick: bool, min_gain: float, log=print) -> dict:
    """Time the rules' launch and the candidates at ``m`` rows; the table entry: the winner, or
    ``config`` None where none beat the rules by ``min_gain``. The best is timed against the rules
    again, in turn, before it is kept: one lucky timing of many candidates must not make a win."""
    from qoqopt.kernels import tuning
    from qoqopt.kernels.w4a16 import rules_launch

    x = torch.randn(m, layer.k, device=layer.copies[0][0].device, dtype=layer.dtype)
    default = rules_launch(m, layer.dtype, layer.words == "fragments")
    default_plan, reference = layer.plan(m, x.device, default), layer.run(x, default)()
    default_us = time_us(layer.run(x, default))
    best, best_us, tried, planned = None, default_us, 0, [default_plan]
    log(f"  {'rules':24s} {default_us:9.2f} us  ({config_tag(default) or 'no overrides'})")
    for config in candidates(layer.k, layer.n, m, layer.words, sms, quick):
        tag = config_tag(config)
        try:
            plan = layer.plan(m, x.device, config)
            if plan in planned:
                continue  # a launch already timed under another name (the rules', or two splits one rounds to)
            planned.append(plan)
            run = layer.run(x, config)
            diff = rel_err(run(), reference)
            if diff > MAX_REL_DIFF[layer.dtype]:
                log(f"  {tag:24s} rejected: output differs from the rules' by {diff:.2e}")
                continue
            us, tried = time_us(run), tried + 1
        except Exception as err:  # a config this GPU cannot compile or launch (shared memory, say)
            log(f"  {tag:24s} unavailable ({type(err).__name__}: {str(err).splitlines()[0][:100]})")
            continue
        log(f"  {tag:24s} {us:9.2f} us  x{default_us / us:.3f}")
        if us < best_us:
            best, best_us = config, us
    key = tuning.Key(layer.words, 4, GROUP_SIZE, layer.k, layer.n, tuning.dtype_name(layer.dtype), m)
    if best is not None:  # in turn, twice each: the better of each pair's times
        rules_again, best_again = zip(*((time_us(layer.run(x, default)), time_us(layer.run(x, best))) for _ in range(2)))
        default_us, best_us = min(default_us, *rules_again), min(best_again)
        log(f"  {config_tag(best):24s} {best_us:9.2f} us against the rules' {default_us:.2f}, timed in turn")
    if best is None or best_us > default_us * (1 - min_gain):
        return tuning.entry(key, None, default_us=round(default_us, 2), candidates=tried)
    return tuning.entry(key, best, us=round(best_us, 2), default_us=round(default_us, 2), candidates=tried)


def output_path(out: str | None, device_name: str) -> Path:
    """``--out`` as the table's path: a folder (existing, or written with a trailing slash) holds
    ``<GPU>.json``; by default the qoqopt cache's."""
    from qoqopt.kernels import tuning

    if out is None:
        return tuning.user_dir() / tuning.file_name(device_name)
    folder = out.endswith(("/", os.sep)) or Path(out).is_dir()
    return Path(out) / tuning.file_name(device_name) if folder else Path(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="7b", help="whose layer shapes (default 7b)")
    parser.add_argument("--shapes", help="comma-separated subset of " + ",".join(layer_shapes("7b"))
                        + ", tuned in that order (default: all, in this order)")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16], help="decode rows to tune (default 1 16)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--out", help="table file, or a folder to hold <GPU>.json "
                        "(default: the qoqopt cache, where qoqopt looks first after $QOQOPT_KERNEL_TUNING)")
    parser.add_argument("--force", action="store_true", help="replace an existing table")
    parser.add_argument("--quick", action="store_true", help="a smaller grid (4 to 16 candidates a shape and M)")
    parser.add_argument("--min-gain", type=float, default=0.03, help="keep a config only if this much faster (0.03)")
    parser.add_argument("--limit-s", type=float, help="start no new shape after this many seconds")
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # the tuner's own tests
    args = parser.parse_args(argv)
    try:
        return tune(args, sys.argv[1:] if argv is None else list(argv))
    except QoqoptError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _layers(args) -> list[tuple[str, int, int, bool]]:
    """``(name, K, N, bias)`` to tune, in the order asked, each K -> N once."""
    shapes = layer_shapes(args.model)
    names = args.shapes.split(",") if args.shapes else list(shapes)
    if unknown := [name for name in names if name not in shapes]:
        raise QoqoptError(f"unknown shape {unknown[0]!r}: choose from {', '.join(shapes)}")
    if bad := [m for m in args.m if not 1 <= m <= 16]:
        raise QoqoptError(f"--m {bad[0]}: decode rows are 1 to 16 (from 128 rows cuBLAS runs after a dequantization)")
    # the fused q/k/v carries Qwen2's biases; the judged single projections run without
    layers, seen = [], set()
    for name in names:
        if shapes[name] not in seen:  # (the tiny model's qkv and gate are one shape: a table key)
            seen.add(shapes[name])
            layers.append((name, *shapes[name], name == "qkv"))
    return layers


def tune(args, argv: list[str]) -> int:
    from qoqopt.kernels import tuning
    from qoqopt.kernels._triton import num_sms

    layers, rows = _layers(args), sorted(set(args.m))
    gpu = torch.cuda.is_available()
    if not gpu and not args.allow_cpu:
        raise QoqoptError("tune_w4a16 needs a CUDA GPU: timings on a CPU mean nothing")
    device = torch.device("cuda" if gpu else "cpu")
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    path = output_path(args.out, name)
    if path.exists() and not args.force:
        raise QoqoptError(f"{path} exists (--force replaces it)")
    dtype, sms = getattr(torch, args.dtype), num_sms(device)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if gpu else 0
    import triton

    meta = dict(created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, sm_count=sms,
                l2_bytes=l2, model=args.model, min_gain=args.min_gain, argv=argv)
    entries, t0, summary = [], time.monotonic(), []
    for shape, k, n, has_bias in layers:
        if args.limit_s is not None and time.monotonic() - t0 > args.limit_s:
            print(f"time limit: {shape} and the shapes after it not tuned")
            break
        layer = Layer(k, n, dtype, device, l2, has_bias)
        for m in rows:
            print(f"[{shape} {k}->{n} M={m}, {layer.words} words, {len(layer.copies)} weight copies]")
            entries.append(tune_one(layer, m, sms, args.quick, args.min_gain))
            summary.append((shape, entries[-1]))
        del layer
        tuning.write_table(path, name, entries, meta, force=True)  # after every shape
    print_summary(summary)
    if entries:
        won = sum(e["config"] is not None for e in entries)
        print(f"wrote {path}: {len(entries)} launches tuned, {won} beat the rules")
    return 0


def print_summary(summary: list) -> None:
    print(f"\n{'shape':8s} {'K->N':>12s} {'M':>3s} {'rules us':>9s} {'tuned us':>9s} {'gain':>6s}  config")
    for shape, e in summary:
        size = f"{e['k']}->{e['n']}"
        head = f"{shape:8s} {size:>12s} {e['m']:3d} {e['default_us']:9.2f}"
        if e["config"] is None:
            print(f"{head} {'':>9s} {'':>6s}  rules kept")
        else:
            print(f"{head} {e['us']:9.2f} x{e['default_us'] / e['us']:5.3f}  {config_tag(e['config'])}")


if __name__ == "__main__":
    sys.exit(main())
