"""`qoqopt publish DIR --repo user/name`."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """\
examples:
  qoqopt publish out/gguf --repo me/QoQ-Med-VL-7B-GGUF --dry-run      # show exactly what would be sent
  qoqopt publish out/gguf --repo me/QoQ-Med-VL-7B-GGUF --results results/report/report.md
  HF_TOKEN=... qoqopt publish out/gptq --repo my-lab/QoQ-Med-VL-7B-GPTQ --private
  qoqopt publish out/gguf --repo me/Qwen2.5-VL-7B-GGUF --base-model Qwen/Qwen2.5-VL-7B-Instruct --license apache-2.0

Before anything is uploaded, qoqopt checks the repo name, that DIR has a manifest.json written by
`qoqopt export`, that no file is over the Hub's 50 GB a file (a 32B F16 GGUF is: export it with
--split-max-size 48G, which writes it in parts llama.cpp and LM Studio load as one), that every
listed file still matches its sha256, that a --base-model has the build's language-model shape
(hidden size, layers; when its config can be fetched), and that a token is available (HF_TOKEN or
`hf auth login`). The token is never printed or written. The
model card (README.md) is generated: YAML metadata (base_model, base_model_relation: quantized,
licence, tags, pipeline_tag), the file list with sha256, the drift/speed tables from --results,
and usage for llama.cpp, LM Studio, Ollama, vLLM and transformers.

Only the files manifest.json lists are sent (the plan names any others in the folder). The uploaded
manifest.json names the base model, not the local folder a build was made from. Files are sent
byte for byte, so a build whose files hold names qoqopt does not write there (a calibration set's
path or an imatrix file's name an older qoqopt recorded, a config's _name_or_path from a
fine-tune's output folder: anything there but the repo the build names, as a relative folder has
a repo id's shape) is refused unless --allow-local-names; builds exported now record a user
set by its sha256 and a local source as "a local checkpoint". A repo that exists
already is checked first: --private refuses a public one (visibility is not changed), and files
in it that this build does not have (an earlier build's quants or shard index) refuse the upload
unless --replace deletes them in the same commit.

A dry run exits 0 when the upload would go ahead (a missing token aside: it is only noted), and 1
with the reasons when it would stop.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "publish",
        help="upload an export directory to the Hugging Face Hub with a generated model card",
        description="Verify an export directory against its manifest and upload it with a model card.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", type=Path, metavar="DIR", help="directory written by `qoqopt export`")
    p.add_argument("--repo", required=True, help="target repo id, user/name")
    p.add_argument("--private", action="store_true",
                   help="create the repo as private (without it a new repo takes its owner's default visibility)")
    p.add_argument("--replace", action="store_true",
                   help="delete the repo's files that this build does not have, in the upload's commit")
    p.add_argument("--results", type=Path, help="Markdown tables from `qoqopt report` to put in the card")
    p.add_argument("--base-model", metavar="OWNER/NAME",
                   help="the card's base_model when the build was exported from a local directory")  # fmt: skip
    p.add_argument("--license", metavar="ID",
                   help="the card's licence, the base model's Hub licence id (default: mit for a QoQ-Med base; "
                        "required for any other)")  # fmt: skip
    p.add_argument("--license-name", metavar="NAME", help="with --license other: the licence's name (qwen-research)")
    p.add_argument("--license-link", metavar="URL", help="with --license other: the URL of its text (default: the LICENSE file the build carries)")
    p.add_argument("--allow-local-names", action="store_true",
                   help="upload a build whose files name local folders or data files (an older export's "
                        "calibration set path, a fine-tune's output folder); refused without it")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the plan and the card; upload nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import QoqoptError
    from ..hub_license import checked_license
    from ..publish import plan_upload, resolve_token, upload

    if args.results and args.results.is_dir():
        raise QoqoptError(f"--results {args.results} is a directory; give the report.md `qoqopt report` wrote in it")
    if args.results and not args.results.is_file():
        raise QoqoptError(f"--results {args.results} does not exist")
    if args.results and args.results.suffix.lower() != ".md":
        raise QoqoptError(f"--results {args.results}: give the report.md of `qoqopt report`, not its inputs")
    licence = checked_license(args.license, args.license_name, args.license_link)
    plan = plan_upload(args.folder, args.repo, args.private, args.results, args.base_model, dry_run=args.dry_run,
                       license=licence, replace=args.replace, allow_local_names=args.allow_local_names)  # fmt: skip
    if args.dry_run:
        return _dry_run(plan)
    token = resolve_token()
    url = upload(plan, token)
    print(f"uploaded {len(plan.files) + 1} files to {args.repo}: {url}")
    return 0


def _dry_run(plan) -> int:
    """Print the plan, the card and the target repo's state; 1 when the upload would stop for what
    the plan or the repo lacks (a missing token is only noted: a preflight runs without one)."""
    from ..errors import QoqoptError
    from ..publish import preflight, resolve_token

    try:
        token = resolve_token()
        no_token = None
    except QoqoptError as err:  # said now, not after the user has set the upload going
        token, no_token = None, str(err)
    notes, stops = preflight(plan, token)
    print(plan.describe())
    for note in notes:
        print(f"note      {note}")
    print("\n--- README.md (model card) ---")
    print(plan.card)
    print("dry run: nothing was uploaded")
    stops = [*plan.stops, *stops]
    for why in stops + ([no_token] if no_token else []):
        print(f"note: the upload would stop here: {why}")
    return 1 if stops else 0
