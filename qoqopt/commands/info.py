"""`qoqopt info MODEL`."""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  qoqopt info out/mini                      # a local checkpoint directory
  qoqopt info ddvd233/QoQ-Med-VL-7B         # a Hub id: only config, index and tokenizer are fetched
  HF_HUB_OFFLINE=1 qoqopt info ddvd233/QoQ-Med-VL-7B   # from the local HF cache only

Reads config.json, the safetensors index and shard headers; never the weights themselves.
A directory with the metadata but no shards (config.json and model.safetensors.index.json, as a
metadata-only Hub fetch leaves it) still works: shapes come from a meta-device model.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "info",
        help="summarise a QoQ-Med / Qwen2.5-VL checkpoint",
        description="Architecture summary: text and vision dims, parameters by part, dtype, shards, "
        "tokenizer/processor presence, and QoQ-Med's ECG encoder if present.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="local checkpoint directory or Hub id (owner/name)")
    p.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses
    import json

    from ..info import render, summarize
    from ..loader import open_checkpoint

    ckpt = open_checkpoint(args.model, args.revision, weights=False)
    summary = summarize(ckpt)
    print(json.dumps(dataclasses.asdict(summary), indent=2) if args.json else render(summary))
    return 0
