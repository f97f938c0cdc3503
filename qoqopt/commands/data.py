"""`qoqopt data`: look at the clinical sets (what is in them, and one item's image and prompt)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from qoqopt.commands.argtypes import positive_int, seed
from qoqopt.data.augment import DEFAULT_MAX_SIDE
from qoqopt.data.domains import BUILTIN_DOMAINS, DOMAINS, SPLITS
from qoqopt.errors import QoqoptError

EPILOG = """\
examples:
  qoqopt data list --split eval
  qoqopt data list --split calib --n-per-base 4 --domain ecg --domain xray
  qoqopt data list --jsonl my_set/eval.jsonl
  qoqopt data show ct-head-693.region_ct.eval-0 --out /tmp/ct.png
  qoqopt data show ecg-12lead.rhythm.eval-0 --out /tmp/ecg.png
  qoqopt data show eval:3 --jsonl my_set/eval.jsonl --out /tmp/item.png

Item ids of the built-in set read <base image>.<question type>.<split>-<n>; the split and n
pick the seeded augmentation, so an id always rebuilds the same pixels.

Your own set (--jsonl here; `export --imatrix F.jsonl`, `export --calib F.jsonl`,
`bench --eval F.jsonl`) is a JSONL file, one item per line:

  {"image": "scans/a.png", "question": "Which body region is shown?", "answer": "Head", "domain": "ct"}
  {"dicom": "mr/b.dcm", "question": "Which plane?", "answer": "Axial", "domain": "mri", "id": "mr-b"}
  {"dicom": "ecg/c.dcm", "question": "Rhythm?", "answer": "AF", "domain": "ecg", "choices": ["AF", "Sinus"]}

  required   question, answer, domain, and exactly one of image (a file Pillow reads) or dicom
DOMAIN_LIST
  optional   choices (2 or more, distinct, without commas; each comma-separated label of the
             answer must be one; offered in the prompt as the built-in set offers its own,
             unless the question already names them all), id (unique; default
             FILE-STEM:LINE), frame (which frame of a multi-frame file, from 0), meta
             (free-form; meta.reason is the <think> sentence of the reference reply, default
             "The image shows ANSWER.")
  paths      relative to the JSONL file's folder; the file is UTF-8 (a BOM is fine)
  image      PNG, JPEG, TIFF, ...: EXIF orientation applied, 16-bit greyscale reduced by its
             high byte as llama.cpp does; a DICOM given here is read as one (DICM marker)
  dicom      shown as a viewer would: rescale, then the file's own window or VOI LUT (CT without
             one: soft tissue 40/400 HU; else a 0.5-99.5 percentile stretch), MONOCHROME1
             inverted, a slice stored mirrored flipped to the radiological view (patient's
             left on the right); an empty window or rescale counts as none, a broken one
             is refused; multi-frame: the middle frame unless "frame" says, enhanced files
             through their functional groups; uncompressed, RLE, JPEG, JPEG Lossless,
             JPEG-LS, JPEG 2000 (not 12-bit JPEG); a waveform DICOM (a 10 s ECG) is drawn as
             a 12-lead paper sheet
  sizes      each image at its own size on Qwen's 28-pixel grid, clamped into QoQ-Med's
             training range (65,536-524,288 pixels); --max-side N here: longer side about N

QoQ-Med's think/\\boxed{} instruction is added to each question that does not ask for \\boxed{}
itself. Answers are scored as in the built-in set: set F1 over the comma-separated labels inside
the reply's last \\boxed{}, case-insensitive. Every line, and each file's header, is checked
when the set is loaded (FILE:LINE: what is wrong), before any long work starts; pixels are
decoded when an item is used.
""".replace("DOMAIN_LIST", textwrap.fill(", ".join(DOMAINS), 96, initial_indent="  domains    ",
                                          subsequent_indent=" " * 13))  # fmt: skip


def register(subparsers) -> argparse.ArgumentParser:
    """Add `data` (with `list` and `show`) to the top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "data",
        help="list and inspect the clinical calibration / evaluation sets",
        description="The built-in clinical sets (real DICOM files from pydicom and pydicom-data: "
        f"{', '.join(BUILTIN_DOMAINS)}) and user JSONL sets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="{list,show}")

    ls = sub.add_parser(
        "list",
        help="table of items with per-domain counts",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("--split", choices=SPLITS, help="built-in split (default eval)")
    _common(ls)
    ls.add_argument("--n-per-base", type=positive_int, help="augmented views per base image (default 1)")
    ls.add_argument("--domain", action="append", choices=list(DOMAINS), help="only this domain (repeatable)")
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser(
        "show",
        help="write one item's image and print its prompt and reference answer",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("id", help="item id, as printed by `qoqopt data list`")
    show.add_argument("--out", required=True, type=Path, help="where to write the image (PNG)")
    show.add_argument("--force", action="store_true", help="replace an existing image file")
    _common(show)
    show.set_defaults(func=cmd_show)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=seed, default=0, help="augmentation seed (default 0)")
    p.add_argument("--max-side", type=positive_int,
                   help=f"longer image side in pixels (default: {DEFAULT_MAX_SIDE} for the built-in set; a --jsonl "
                   "set's images keep their own size, as export and bench give them to the model)")  # fmt: skip
    p.add_argument("--jsonl", type=Path, help="use this user JSONL set instead of the built-in one")


def cmd_list(args: argparse.Namespace) -> int:
    from qoqopt.data.items import clinical_set, domain_counts
    from qoqopt.data.jsonl import MAX_BAD_LINES, BadLines, load_jsonl

    if args.jsonl:
        if args.split or args.n_per_base:
            raise QoqoptError("--split and --n-per-base pick from the built-in set; a --jsonl set is listed whole")
        try:
            items = load_jsonl(args.jsonl, max_side=args.max_side)
        except BadLines as exc:  # checking a set: each bad line, not the first only
            if len(exc.errors) == 1:
                raise
            for error in exc.errors:
                print(f"error: {error}", file=sys.stderr)
            stopped = f" (stopped at {MAX_BAD_LINES}: is it a JSONL set?)" if exc.stopped else ""
            raise QoqoptError(f"{exc.path}: {exc.count()}{stopped}") from None
        items = [it for it in items if not args.domain or it.domain in args.domain]
    else:
        extra = sorted(set(args.domain or []) - set(BUILTIN_DOMAINS))
        if extra:
            raise QoqoptError(f"--domain {extra[0]}: the built-in set has {', '.join(BUILTIN_DOMAINS)} (others come "
                              "with a --jsonl set)")  # fmt: skip
        items = clinical_set(args.split or "eval", n_per_base=args.n_per_base or 1, seed=args.seed,
                             max_side=args.max_side or DEFAULT_MAX_SIDE, domains=args.domain)
    rows = [(it.id, it.domain, Path(it.source).name, _question(it), it.answer) for it in items]
    header = ("id", "domain", "source file", "question", "answer")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    counts = domain_counts(items)
    print()
    print(f"{len(items)} items: " + ", ".join(f"{d} {n}" for d, n in counts.items()))
    return 0


def _question(item, width: int = 40) -> str:
    """The built-in set's question type; a user item's own question, shortened to fit a table row."""
    from qoqopt.data.prompts import THINK_SUFFIX

    if item.meta.get("qtype") != "user":
        return item.meta.get("qtype", "")
    text = " ".join(item.question.replace(THINK_SUFFIX, "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_show(args: argparse.Namespace) -> int:
    from PIL import Image

    from qoqopt.fileio import atomic_path, check_image_path

    check_image_path(args.out)
    item = _find(args)
    if args.out.exists() and not args.force:
        raise QoqoptError(f"{args.out} already exists (use --force to replace it)")
    image = item.image
    with atomic_path(args.out, replace=args.force) as tmp:  # another run may write it meanwhile
        image.save(tmp, format=Image.registered_extensions()[args.out.suffix.lower()])
    print(f"id:      {item.id}")
    print(f"domain:  {item.domain}")
    print(f"source:  {item.source}")
    print(f"image:   {args.out} ({image.width}x{image.height})")
    if item.ecg_signal is not None:
        print(f"signal:  {item.ecg_signal.shape[0]} leads x {item.ecg_signal.shape[1]} samples (mV)")
    print()
    print("prompt:")
    print(item.question)
    print()
    print(f"answer:  {item.answer}")
    print("reference reply:")
    print(item.target_text())
    return 0


def builtin_item(item_id: str, **kwargs):
    """A built-in item by id (for `data show` and `ask --item`); a wrong id says where the ids are."""
    from qoqopt.data.items import find_item

    try:
        return find_item(item_id, **kwargs)
    except QoqoptError as err:
        raise QoqoptError(f"{err} (`qoqopt data list` lists the ids)") from None


def _find(args: argparse.Namespace):
    from qoqopt.data.jsonl import load_jsonl

    if not args.jsonl:
        return builtin_item(args.id, seed=args.seed, max_side=args.max_side or DEFAULT_MAX_SIDE)
    items = load_jsonl(args.jsonl, max_side=args.max_side)
    for item in items:
        if item.id == args.id:
            return item
    raise QoqoptError(f"{args.jsonl}: no item with id {args.id!r}{_near(args.id, [i.id for i in items])}")


def _near(wanted: str, ids: list[str]) -> str:
    """The ids a mistyped one may have meant, or the first few when none is close."""
    import difflib

    close = difflib.get_close_matches(wanted, ids, n=3)
    shown = close or ids[:3]
    more = "" if close or len(ids) <= 3 else f", ... ({len(ids)} in all)"
    return f"; {'ids close to it:' if close else 'its ids include'} {', '.join(map(repr, shown))}{more}"
