"""`qoqopt mini`: write the mini QoQ-Med checkpoint (optionally trained on the clinical set)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .argtypes import seed

EXAMPLES = """\
examples:
  qoqopt mini --out out/mini-tiny                      # random weights, seconds
  qoqopt mini --out out/mini --preset tiny --train     # trained to answer the clinical set (cached)
  qoqopt mini --out out/mini-small --preset small      # ~190 M parameters, for benchmarks
  qoqopt mini --out out/mini-v5 --layout runtime       # model.visual.* / model.language_model.* keys
  qoqopt mini --out out/shape-7b --preset 7b-shape     # QoQ-Med-7B's exact tensor shapes, 2 decoder
                                                       # layers + 8 vision blocks (3.5 GB, random weights)

The checkpoint loads with Qwen2_5_VLForConditionalGeneration.from_pretrained and carries the real
Qwen2 tokenizer (vocab 152064), the Qwen2.5-VL chat template, QoQ-Med's training pixel range and
generation settings. --train results are cached under $QOQOPT_CACHE (default $XDG_CACHE_HOME/qoqopt, else ~/.cache/qoqopt).
"""


def register(sub) -> None:
    from ..mini import PRESETS

    p = sub.add_parser(
        "mini",
        help="build the mini QoQ-Med model (real architecture + tokenizer, small dims)",
        description="Write a small Qwen2.5-VL checkpoint with QoQ-Med's tokenizer, template and "
        "processor settings, for tests and benchmarks when the real weights are not available.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="size (default: tiny); 7b-shape checks a toolchain at the real 7B shapes")
    p.add_argument("--seed", type=seed, default=0, help="weight and training seed (default: 0)")
    p.add_argument(
        "--train", action="store_true", help="fine-tune on the clinical set (up to 1000 steps; tiny reaches 85-95%% held-out "
        "accuracy, depending on the CPU, in 11-23 min on 2 cores; small 58%% in ~45 min) and print the held-out accuracy "
        "(60 eval-split views, up to 4 per image and domain-balanced: `qoqopt data list --split eval` lists one view "
        "per image and question)"
    )
    p.add_argument(
        "--layout", default="legacy", choices=["legacy", "runtime"],
        help="tensor key layout: legacy visual.*/model.layers.* (default) or runtime model.visual.*",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an earlier mini in --out (a folder of the files `qoqopt mini` writes, no others; "
                   "other folders are refused)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..fileio import Owned, atomic_dir
    from ..mini import build_model, save_checkpoint

    owned = Owned("checkpoint of qoqopt mini's files alone", _is_mini)
    with atomic_dir(args.out, force=args.force, owned=owned) as tmp:
        if args.train:
            from ..train import trained_model

            model, report = trained_model(args.preset, args.seed)
            print(report.describe())
        else:
            model = build_model(args.preset, args.seed)
        save_checkpoint(model, tmp, layout=args.layout)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({args.preset}, {n / 1e6:.1f} M parameters, {args.layout} layout)")
    return 0


# what `qoqopt mini` writes (mini.save_checkpoint): a folder of these files alone is an earlier mini,
# which --force may replace; a fine-tune's folder (training args, a README, shards) is not
MINI_FILES = {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
              "tokenizer.json", "tokenizer_config.json", "chat_template.json"}  # fmt: skip


def _is_mini(folder: Path) -> bool:
    return (folder / "config.json").is_file() and all(p.name in MINI_FILES for p in folder.iterdir())
