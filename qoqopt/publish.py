"""Publish an export directory to the Hugging Face Hub with a model card that carries its evidence.

Everything is checked before anything is sent: the repo id, the manifest, every file's sha256 and
the presence of a token. The plan (files, sizes, card) is built first and is exactly what
`--dry-run` prints and what the upload sends. The token is read from the environment or the
stored HF login, handed to `HfApi`, and never printed or written.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from .errors import QoqoptError
from .fileio import sha256_file
from .hub_license import QOQ_MED_REPO, UNNAMED as UNNAMED_LICENSE, CardLicense, NoLicense, card_license
from .local_names import own_eval_set, recorded_local_names
from .report import inline_text
from .manifest import (
    BUILD_FORMATS, entry_path, gguf_entries, gguf_quants, listed_file, preferred_quant, read_manifest, source_id,
)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
HUB_MAX_FILE_BYTES = 50 * 10**9  # the Hub's limit a file ("50GB max, 20GB recommended", its storage docs)


@dataclass
class PlannedFile:
    path: str
    bytes: int
    sha256: str


@dataclass
class UploadPlan:
    folder: Path
    repo_id: str
    private: bool
    files: list[PlannedFile]
    card: str
    fmt: str
    notes: list[str] = field(default_factory=list)
    manifest_text: str = ""  # the manifest.json uploaded (see shipped_manifest)
    stops: list[str] = field(default_factory=list)  # what would refuse the upload (a dry run's plan only)
    replace: bool = False  # delete the repo's files that are not in this build, in the same commit

    def describe(self) -> str:
        total = sum(f.bytes for f in self.files)
        # not private: a new repo takes its owner's default (an organisation's may be private)
        seen = "private" if self.private else "public unless its owner makes new repos private"
        lines = [
            f"repo      {self.repo_id} ({seen}; model)",
            f"format    {self.fmt}",
            f"upload    {len(self.files) + 1} files, {total / 1e6:.1f} MB",
        ]
        lines += [f"  {f.path:50s} {f.bytes:>14,d}  sha256 {f.sha256[:16]}…" for f in self.files]
        lines.append(f"  {'README.md':50s} {len(self.card.encode()):>14,d}  (model card, generated)")
        lines += [f"note      {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- checks


def is_repo_id(s: str) -> bool:
    return _repo_id_problem(s) is None


def check_repo_id(repo_id: str) -> None:
    problem = _repo_id_problem(repo_id)
    if problem:
        raise QoqoptError(f"invalid repo name {repo_id!r}: {problem}")


def _repo_id_problem(repo_id: str) -> str | None:
    """What breaks the Hub's naming rules, in huggingface_hub's own words (validate_repo_id, which
    also takes a bare name), or that the owner is missing; None for a good owner/name."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return " ".join(str(err).split())
    return None if REPO_ID.match(repo_id) else "expected owner/name, each starting with a letter or digit"


def verified_files(folder: Path, manifest: dict) -> list[PlannedFile]:
    """Every manifest entry exists with the recorded size and sha256 (no partial or edited file ships)."""
    out = []
    for entry in manifest["files"]:
        rel, target = entry_path(entry), listed_file(folder, entry)
        if not entry.get("sha256"):
            raise QoqoptError(f"manifest.json records no sha256 for {rel}: re-export to publish it")
        digest = sha256_file(target)
        if digest != entry["sha256"]:
            raise QoqoptError(f"{rel} does not match its sha256 in manifest.json: the file changed after export")
        out.append(PlannedFile(rel, target.stat().st_size, digest))
    return out


def check_hub_file_sizes(folder: Path, manifest: dict) -> None:
    """Refuse a file the Hub would refuse (over 50 GB: a 32B F16 GGUF is about 65), before hashing
    anything: hashing that file alone takes minutes, and the upload would fail only at its end."""
    for entry in manifest["files"]:
        size = listed_file(folder, entry).stat().st_size
        if size > HUB_MAX_FILE_BYTES:
            quant = entry.get("quant") if entry.get("kind") == "text" else None
            hint = (f": export again with --split-max-size 48G (parts llama.cpp and LM Studio load as one), or leave "
                    f"{quant} out of --quant (Q8_0 is about half of F16's size)") if quant else ""  # fmt: skip
            raise QoqoptError(f"{entry_path(entry)} is {size / 1e9:.1f} GB and the Hub takes files of at most "
                              f"{HUB_MAX_FILE_BYTES // 10**9} GB{hint}")


def unlisted_files(folder: Path, manifest: dict) -> list[str]:
    """Files in the build folder that manifest.json does not list (and so are not uploaded)."""
    listed = {entry_path(e) for e in manifest["files"]} | {"manifest.json", "README.md"}
    found = (p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file())
    return [name for name in found if name not in listed]


def resolve_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise QoqoptError("no Hugging Face token: set HF_TOKEN or run `hf auth login` first")
    return token


# --------------------------------------------------------------------------- the card


def _tags(manifest: dict, base_model: str) -> list[str]:
    """The Hub tags: the field's (QoQ-Med's only on its builds), the format's, and for GPTQ/AWQ the
    bit width the build really has; "multimodal" only where the build reads images."""
    clinical = ["qoq-med", "medical", "clinical", "radiology"] if is_qoq_med(base_model) else []
    base = clinical + ["qwen2.5-vl"] + (["multimodal"] if reads_images(manifest) else []) + ["quantized", "qoqopt"]
    fmt = manifest.get("format", "unknown")
    if fmt == "gguf":
        return base + ["gguf", "llama.cpp"]
    bits = (manifest.get("quantization") or {}).get("bits")
    return base + [fmt] + ([f"{bits}-bit"] if bits else [])


def is_qoq_med(base_model: str) -> bool:
    """A QoQ-Med model (the 7B, the 32B) rather than another Qwen2.5-VL the build was made from."""
    return bool(QOQ_MED_REPO.match(base_model))


def reads_images(manifest: dict) -> bool:
    """A GGUF build reads images only with an mmproj (`--mmproj-type none` leaves it out); GPTQ/AWQ
    builds keep their vision tower."""
    return manifest.get("format") != "gguf" or bool(gguf_entries(manifest, "mmproj"))


class LocalNames(QoqoptError):
    """The build's files hold names qoqopt does not write (they can name the user's folders or data
    files), and --allow-local-names was not given."""


def local_names_kept(folder: Path, manifest: dict, allow: bool, base: str | None = None) -> list[str]:
    """The local names the upload would carry: refused unless ``allow`` (they are in files uploaded
    byte for byte, so the upload cannot leave them out). ``base``: the repo the card names."""
    found = recorded_local_names(folder, manifest, base)
    if found and not allow:
        raise LocalNames(f"the build's files hold names qoqopt does not write there, which can name local folders "
                         f"or files ({_some(found, 3)}) and would be uploaded; export it again with this qoqopt, "
                         "or pass --allow-local-names to upload them as they are")  # fmt: skip
    return found


class NoBaseModel(QoqoptError):
    """The build was exported from a local folder and no --base-model was given."""


# what a dry run's card shows for the base model it was not told (the upload itself is refused)
UNNAMED_BASE = "OWNER/BASE-MODEL"


def base_model_id(manifest: dict, override: str | None = None) -> str:
    """The Hub repo the build comes from: the card's `base_model` must be a repo id, not a local path.
    A build made from a Hub repo names it; one made from a local folder (or whose manifest names no
    source) needs --base-model, which must not contradict a recorded Hub source."""
    hub, hint = hub_source(manifest), "pass --base-model owner/name (the repo the weights come from)"
    if override:
        if not is_repo_id(override):
            raise QoqoptError(f"--base-model is not a Hub repo id; {hint}")
        if hub is not None and hub != override:
            raise QoqoptError(f"--base-model {override}: the build was exported from {hub} at revision "
                              f"{manifest['source']['revision'][:12]}, which its card names; leave --base-model out")  # fmt: skip
        return override
    if hub is not None:
        return hub
    model = (manifest.get("source") or {}).get("model")
    if not isinstance(model, str) or not model:  # QoQ-Med-VL-7B was assumed: a 32B or a mini build claimed it
        raise NoBaseModel(f"the build's manifest.json names no source model; {hint}")
    raise NoBaseModel(f"the build was exported from {model!r}, a local folder, not a Hub repo; {hint}")


def hub_source(manifest: dict) -> str | None:
    """The Hub repo the build was exported from, or None for a local folder. Judged by the commit the
    export recorded (a Hub snapshot always has one, a folder none), not by whether a folder of that
    name exists where publish runs: `export rev/mini` from /tmp named a local folder `rev/mini`,
    which from anywhere else passed for a Hub id and became the card's base_model."""
    from .loader import is_commit

    source = manifest.get("source") or {}
    model = source.get("model")
    return model if is_commit(source.get("revision")) and isinstance(model, str) and is_repo_id(model) else None


def check_base_model(folder: Path, manifest: dict, base: str) -> str | None:
    """Refuse a --base-model whose language model is not the build's shape (the Hub's model tree
    would list the build as a quantization of a model it did not come from). Returns a note when
    the base's config cannot be read here (offline, not cached), None when it matches."""
    from .loader import checked_config, resolve

    try:
        path, _ = resolve(base, weights=False)
    except QoqoptError as err:
        return f"--base-model {base} not checked against the build ({err})"
    t = checked_config(path, f"--base-model {base}")[1].text_config  # read, but not Qwen2.5-VL: refused
    theirs, ours = (t.hidden_size, t.num_hidden_layers), _text_shape(folder, manifest)
    if ours and theirs != ours:
        raise QoqoptError(f"--base-model {base} has a language model of hidden size {theirs[0]} with {theirs[1]} "
                          f"layers; this build's has {ours[0]} with {ours[1]}: it was not quantized from {base}")  # fmt: skip
    return None


def _text_shape(folder: Path, manifest: dict) -> tuple[int, int] | None:
    """(hidden size, layers) of the build's language model (files already verified): from a GGUF
    build's text-file header, from a GPTQ/AWQ build's config.json; None for a GGUF build without one."""
    if manifest.get("format") == "gguf":
        from gguf import GGUFReader

        texts = gguf_entries(manifest, "text")
        if not texts:
            return None
        fields = GGUFReader(str(folder / texts[0])).fields
        arch = fields["general.architecture"].contents()
        return fields[f"{arch}.embedding_length"].contents(), fields[f"{arch}.block_count"].contents()
    from .loader import checked_config

    t = checked_config(folder, str(folder))[1].text_config
    return t.hidden_size, t.num_hidden_layers


def card_metadata(manifest: dict, base_model: str | None = None, license: CardLicense | None = None):
    from huggingface_hub import ModelCardData

    fmt = manifest.get("format", "unknown")
    base = base_model_id(manifest, base_model)
    extra = {"library_name": "transformers"} if fmt in ("gptq", "awq") else {}
    return ModelCardData(
        base_model=base, base_model_relation="quantized", **(license or card_license(base, None)).metadata(),
        pipeline_tag="image-text-to-text" if reads_images(manifest) else "text-generation",
        tags=_tags(manifest, base), language=["en"], **extra,
    )  # fmt: skip


def render_card(manifest: dict, files: list[PlannedFile], repo_id: str, results_md: str | None = None,
                base_model: str | None = None, exported: dict[str, str] | None = None,
                license: CardLicense | None = None) -> str:  # fmt: skip
    """The Hub card. ``exported``: the sections of the build's own README.md (checked against its
    manifest), which the card replaces on the Hub: a GGUF build's run instructions (they name its
    files and QoQ-Med's image range), what it left out, and its known issues."""
    from huggingface_hub import ModelCard

    fmt = manifest.get("format", "unknown")
    src = manifest.get("source", {})
    meta = card_metadata(manifest, base_model, license)
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{fmt.upper()} build of [{meta.base_model}](https://huggingface.co/{meta.base_model}), "
        + ("a clinical vision-language model (Qwen2.5-VL fine-tune)" if is_qoq_med(meta.base_model)
           else "a Qwen2.5-VL vision-language model")
        + ", made and verified by qoqopt.",
        "",
        f"- source: {source_id(src.get('revision'), src.get('fingerprint'))}; architecture `{src.get('architecture', '?')}`",
    ]
    if src.get("ecg_encoder"):
        body.append("- the source carries QoQ-Med's ECG encoder (`time_series_embedding.*`); see notes below")
    body += [f"- {inline_text(n)}" for n in manifest.get("notes", [])]  # a build from elsewhere may say anything
    if fmt in ("gptq", "awq") and "quantization" in manifest:
        from .exports.hf_readme import summary_table

        body += ["", summary_table(manifest)]
    body += ["", "## Files", "", *_file_table(files, manifest)]
    if exported is not None:  # only a README the manifest lists is read
        body += ["", "This card takes the place of the export's own README.md, which is not uploaded (the "
                 "`manifest.json` here leaves it out)."]
    if results_md:
        evidence = _evidence(results_md, manifest)
        timed = any("### Speed per machine" in part for part in evidence)  # `bench --no-speed` has none
        body += ["", f"## Evidence: drift{' and speed' if timed else ''}", "", *evidence]
    # builds exported before the top-level key carried the encoder whenever their source had one
    carries_ecg = manifest.get("ecg_encoder", "carried" if src.get("ecg_encoder") else None) == "carried"
    sections = exported or {}
    body += ["", "## Usage", "", _usage(fmt, repo_id, manifest, carries_ecg, sections.get("Run it"))]
    for heading in ("Left out on purpose", "Known issues"):
        if heading in sections:
            body += ["", f"## {heading}", "", sections[heading]]
    return ModelCard.from_template(meta, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n", body="\n".join(body)).content


def _evidence(results_md: str, manifest: dict) -> list[str]:
    """The report's rows for this build, and the build's quants it has no drift for."""
    fmt = manifest.get("format", "unknown")
    shas = {f["sha256"] for f in manifest["files"] if f.get("sha256")}
    tables, measured = tables_for_build(results_md, fmt, shas)
    if not measured:
        raise QoqoptError(f"--results: the report measured none of this build's files (its {fmt} rows are of "
                          "other builds); bench this build and run `qoqopt report` on that")  # fmt: skip
    # the report's sections sit under the card's Evidence heading, one level down
    tables = re.sub(r"^## ", "### ", without_local_paths(tables, hub_source(manifest)), flags=re.M)
    built = [f"{fmt}:{q}" for q in gguf_quants(manifest)] if fmt == "gguf" else []
    missing = [v for v in built if v not in measured]
    return [tables] + (["", f"Not measured in these results: {', '.join(missing)}."] if missing else [])


_LOCAL_REFERENCE = re.compile(r"Reference: `([^`]*)`")
_EVAL_SET = re.compile(r"eval set `([^`]*)`")


def without_local_paths(report_md: str, hub: str | None) -> str:
    """The report's text less the local paths it names (they say nothing to a card's reader, and
    name the user's folders): a reference other than the Hub repo the build was exported from
    (``hub``; a relative folder can have a repo id's shape) is the original model; an eval
    set not named as bench names one now (the built-in set, or a user set by its sha256: older
    results named it by its path) is "a user JSONL set"."""
    md = _LOCAL_REFERENCE.sub(lambda m: m.group(0) if m.group(1) == hub else "Reference: the original model",
                              report_md)  # fmt: skip
    return _EVAL_SET.sub(lambda m: m.group(0) if own_eval_set(m.group(1)) else "eval set `a user JSONL set`", md)


def tables_for_build(report_md: str, fmt: str, shas: set[str]) -> tuple[str, set[str]]:
    """`qoqopt report` Markdown narrowed to this build, and the variants of it that were measured.

    A row of the build's format is kept only when its files (the sha256s the report records beside
    each table) are among the build's ``shas``: a report may also hold other builds of the same
    types, or other models. The reference and unquantized rows stay, for scale, in the sections
    that measured this build; sections that did not are dropped whole. Plot links are dropped too,
    since the PNGs are not part of the upload."""
    from .report import FILES_TAG

    if FILES_TAG not in report_md:
        raise QoqoptError("--results: this report.md does not record which files it measured (an older qoqopt "
                          "wrote it); run `qoqopt report` on the bench results again")  # fmt: skip
    out, measured = [], set()
    for section in _sections(report_md):
        kept, mine, has_rows = _narrow(section, fmt, shas)
        measured |= mine
        if mine or not has_rows:  # a section that measured other builds only goes whole
            out += kept
    return "\n".join(out).strip(), measured


def _narrow(section: list[str], fmt: str, shas: set[str]) -> tuple[list[str], set[str], bool]:
    """A report section's lines less the rows of other builds (and the hidden file lists, the title
    and plot links), the variants of this build it measured, and whether it has rows at all. The
    reference and unquantized rows stay for scale: in a drift table (one reference) always, in a
    table across runs only from the runs that measured this build."""
    from .report import PARETO_PHRASE

    lines = _rows_with_files(section)
    mine = {i for i, (_, entry) in enumerate(lines) if entry and _is_mine(entry, fmt, shas)}
    mine_runs = {lines[i][1]["run"] for i in mine}
    kept, dropped = [], False
    for i, (line, entry) in enumerate(lines):
        scale = entry and _is_scale(entry["variant"]) and entry.get("run") in (None, *mine_runs)
        if entry and i not in mine and not scale:
            dropped = True
            continue
        kept.append(line)
    if dropped:  # a star was given among every build the report measured, shown on this card or not
        kept = [ln.replace(PARETO_PHRASE, "no other build the report measured (some are not shown here) is both")
                for ln in kept]  # fmt: skip
    return kept, {lines[i][1]["variant"] for i in mine}, any(entry for _, entry in lines)


def _rows_with_files(section: list[str]) -> list[tuple[str, dict | None]]:
    """The section's lines to show, each row with what the report recorded for it (None for other
    lines); a row whose record is missing or names another variant is a report edited by hand."""
    from .report import FILES_TAG

    out, entries, column = [], [], 0  # column of the variant: a speed table's rows start with the machine
    for line in section:
        if line.startswith(FILES_TAG):
            if entries:  # a row of the table before was deleted
                raise QoqoptError(_EDITED)
            entries = _files_entries(line[len(FILES_TAG):].removesuffix("-->"))
            continue
        if line.startswith(("![", "# ")) or line.strip() == "## Plots":  # the report's title: the card has its own
            continue
        cells = [c.strip() for c in _CELL_BORDER.split(line.strip().strip("|"))] if line.startswith("|") else []
        if cells and cells[0] in ("variant", "machine"):
            column = int(cells[0] == "machine")
        name = _row_variant(line, cells, column)
        entry = entries.pop(0) if name is not None and entries else None
        if name is not None and (entry is None or entry["variant"] != name):
            raise QoqoptError(_EDITED)
        out.append((line, entry))
    if entries:
        raise QoqoptError(_EDITED)
    return out


_CELL_BORDER = re.compile(r"(?<!\\)\|")  # an escaped \| is inside a cell (a machine label's)

_EDITED = ("--results: report.md's rows do not match the files it records for them (was it edited?); "
           "run `qoqopt report` on the bench results again")  # fmt: skip


def _files_entries(text: str) -> list[dict]:
    try:
        entries = json.loads(text)
    except json.JSONDecodeError:
        raise QoqoptError(_EDITED) from None
    ok = isinstance(entries, list) and all(
        isinstance(e, dict) and isinstance(e.get("variant"), str) and isinstance(e.get("run"), (int, type(None)))
        and isinstance(e.get("files"), list) and all(isinstance(f, str) for f in e["files"]) for e in entries
    )  # fmt: skip
    if not ok:
        raise QoqoptError(_EDITED)
    return entries


def _is_mine(entry: dict, fmt: str, shas: set[str]) -> bool:
    return entry["variant"].startswith(f"{fmt}:") and bool(entry["files"]) and set(entry["files"]) <= shas


def _is_scale(variant: str) -> bool:
    from .bench.variants import HF_DTYPES

    return variant in {"reference", *HF_DTYPES}


def _sections(md: str) -> list[list[str]]:
    """The lines of a Markdown text split where each ``## `` heading starts."""
    sections: list[list[str]] = [[]]
    for line in md.strip().splitlines():
        if line.startswith("## "):
            sections.append([])
        sections[-1].append(line)
    return sections


def _row_variant(line: str, cells: list[str], column: int) -> str | None:
    """The variant a report line is about: a table row's variant cell, or a failure bullet's
    `name`; None for any other line (headers, rules, prose)."""
    if line.startswith("- ") and line.count("`") >= 2:
        return line.split("`")[1]
    if not cells or set(line.strip()) <= set("|-: ") or cells[0] in ("variant", "machine"):
        return None
    return cells[column] if column < len(cells) else None


def readme_sections(readme: str) -> dict[str, str]:
    """The ``## `` sections of a README, by heading, without the heading line (a ``## `` line inside a
    fenced block is text; a section that opens with an indented code block keeps its indent)."""
    sections: dict[str, list[str]] = {}
    current, fenced = None, False
    for line in readme.splitlines():
        fenced ^= line.startswith("```")
        if line.startswith("## ") and not fenced:
            current = line[3:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {heading: "\n".join(lines).strip("\n") for heading, lines in sections.items()}


def _file_table(files: list[PlannedFile], manifest: dict) -> list[str]:
    """The uploaded files; for a GGUF build also what each is (text model and its quant type, the
    mmproj, the importance matrix) and how the K-quants were calibrated, as the export's README
    (which the card replaces) said: a bare `mini.imatrix.gguf` told a reader nothing."""
    if manifest.get("format") != "gguf":
        return ["| file | bytes | sha256 |", "|---|---:|---|", *(f"| `{f.path}` | {f.bytes:,} | `{f.sha256}` |" for f in files)]
    listed = {entry_path(e): e for e in manifest.get("files", [])}
    rows = ["| file | kind | type | bytes | sha256 |", "|---|---|---|---:|---|"]
    for f in files:
        entry = listed.get(f.path, {})
        kind, quant = inline_text(str(entry.get("kind", "manifest" if f.path == "manifest.json" else "–"))), entry.get("quant")
        rows.append(f"| `{f.path}` | {kind} | {inline_text(str(quant)) if quant else '–'} | {f.bytes:,} | `{f.sha256}` |")
    imatrix = manifest.get("imatrix")
    if isinstance(imatrix, dict) and imatrix.get("file"):
        datasets = "; ".join(inline_text(str(d)) for d in imatrix.get("datasets") or [])
        rows += ["", f"The K-quant and IQ files were quantized with an importance matrix ({inline_text(str(imatrix.get('source')))}"
                 + (f"; {datasets}" if datasets else "") + f"), shipped as `{inline_text(str(imatrix['file']))}`."]  # fmt: skip
    elif gguf_quants(manifest):
        rows += ["", "No importance matrix was used."]
    return rows


def _usage(fmt: str, repo_id: str, manifest: dict, carries_ecg: bool, exported_run: str | None) -> str:
    """GPTQ/AWQ: the run instructions their exports write, for the repo id. GGUF: the export's own run
    section (it names this build's files and QoQ-Med's image range), below the download."""
    if fmt in ("gptq", "awq"):
        from .exports.hf_readme import run_instructions

        return run_instructions(repo_id, {**manifest, "ecg_encoder": "carried" if carries_ecg else None})
    if exported_run is None:
        return _gguf_usage(repo_id, manifest)
    from .exports.ollama import HF_CO_PLACEHOLDER

    # the export did not know the repo; the quant is named, as for llama.cpp: untagged, Ollama takes
    # Q4_K_M or else a quant of its choosing, not necessarily the one the card and Modelfile describe
    exported_run = exported_run.replace(HF_CO_PLACEHOLDER, f"hf.co/{_hf_repo_tag(repo_id, manifest)}")
    fetch = (f"(`llama-mtmd-cli -hf {_hf_repo_tag(repo_id, manifest)}` also fetches that quant and its mmproj by "
             "itself; give it the same flags.)" if reads_images(manifest) else
             f"(`llama-cli -hf {_hf_repo_tag(repo_id, manifest)}` also fetches that quant by itself; this build "
             "has no mmproj, so it reads text only.)")  # fmt: skip
    return (f"`hf download {repo_id} --local-dir qoq-med && cd qoq-med` fetches the build (add "
            "`--include` with the files below to skip the other quants); the commands below run from there. "
            f"{fetch}\n\n{exported_run}")


def _card_model_gguf(manifest: dict) -> tuple[str | None, str]:
    """``(quant, path)`` of the text GGUF the card runs: the build's preferred quant, the one its
    README, Modelfile, `info` and `ask` use (Q4_K_M, llama.cpp's own ``-hf`` default, where the build
    has it). Never the imatrix or the mmproj, which are GGUFs of other kinds."""
    quant = preferred_quant(gguf_quants(manifest))
    texts = [f for f in manifest.get("files", []) if f.get("kind") == "text" and f.get("quant") == quant]
    if not texts:
        return None, "MODEL.gguf"
    return quant, next(entry_path(f) for f in texts if (f.get("part") or 1) == 1)


def _hf_repo_tag(repo_id: str, manifest: dict) -> str:
    """``repo:QUANT`` for llama.cpp's ``-hf``, naming the quant :func:`_card_model_gguf` picks. Named, not
    left to llama.cpp: without a tag it takes Q4_K_M, or where there is none the repo's first file."""
    quant = _card_model_gguf(manifest)[0]
    return f"{repo_id}:{quant}" if quant else repo_id


def _gguf_usage(repo_id: str, manifest: dict) -> str:
    """For GGUF builds whose README has no run section (not written by a current qoqopt export)."""
    text = _card_model_gguf(manifest)[1]
    mmproj = next(iter(gguf_entries(manifest, "mmproj")), None)
    llama_cpp = [
        f"llama-mtmd-cli -hf {_hf_repo_tag(repo_id, manifest)} --image scan.png -p 'Above is a CT image of a patient. ...'",
        f"# or with local files: llama-mtmd-cli -m {text} --mmproj {mmproj} --image scan.png -p '...'",
    ] if mmproj else [  # no mmproj: text only, and llama-mtmd-cli stops without one
        f"llama-cli -hf {_hf_repo_tag(repo_id, manifest)} -p '...'", f"# or with the local file: llama-cli -m {text} -p '...'",
    ]  # fmt: skip
    return "\n".join([
        "**llama.cpp**", "```bash", *llama_cpp,
        "```", "", "**LM Studio**: search for the repo name, download the quant and the mmproj together.", "",
        "**Ollama**", "```bash", f"hf download {repo_id} --local-dir qoq-med && cd qoq-med",
        "ollama create qoq-med -f Modelfile && ollama run qoq-med", "```",
    ])  # fmt: skip


# --------------------------------------------------------------------------- plan and upload


def plan_upload(folder: Path, repo_id: str, private: bool = False, results: Path | None = None,
                base_model: str | None = None, dry_run: bool = False, license: CardLicense | None = None,
                replace: bool = False, allow_local_names: bool = False) -> UploadPlan:  # fmt: skip
    """What would be uploaded, every file checked. A build of a local folder without --base-model, of
    a base other than QoQ-Med without --license, or whose files name local folders or data files
    (without ``allow_local_names``) is refused before any file is hashed; a dry run shows its card
    with a placeholder and a stop."""
    check_repo_id(repo_id)
    manifest = read_manifest(folder, "a directory written by `qoqopt export` to publish")
    if manifest.get("format") not in BUILD_FORMATS:
        raise QoqoptError(f"{folder}/manifest.json: format {manifest.get('format')!r} is not a qoqopt build "
                          f"({', '.join(BUILD_FORMATS)})")  # fmt: skip
    stops = []
    base = _or_stop(lambda: base_model_id(manifest, base_model), NoBaseModel, UNNAMED_BASE, dry_run, stops)
    if base == UNNAMED_BASE and license is None:  # its stop says what to pass; the licence follows from that
        licence = UNNAMED_LICENSE
    else:
        listed = [entry_path(e) for e in manifest["files"]]
        licence = _or_stop(lambda: card_license(base, license, listed), NoLicense, UNNAMED_LICENSE, dry_run, stops)
    check_hub_file_sizes(folder, manifest)
    named = _or_stop(lambda: local_names_kept(folder, manifest, allow_local_names, None if base == UNNAMED_BASE else base),
                     LocalNames, None, dry_run, stops)  # fmt: skip
    files = [f for f in verified_files(folder, manifest) if f.path != "README.md"]
    # The manifest ships too, so downloaders can check what they got.
    manifest_text, withheld = shipped_manifest(manifest, repo_id, base)
    files.append(PlannedFile("manifest.json", len(manifest_text.encode()), hashlib.sha256(manifest_text.encode()).hexdigest()))
    results_md = _read_report(results) if results else None
    # only a README the manifest lists (verified_files has checked its sha256) speaks on the card
    listed = any(entry_path(e) == "README.md" for e in manifest["files"])
    exported = readme_sections((folder / "README.md").read_text(errors="replace")) if listed else None
    card = render_card(manifest, files, repo_id, results_md, base, exported, licence)
    fmt = manifest.get("format", "unknown")
    notes = [] if results_md else ["no --results given: the card has no drift/speed tables"]
    notes += withheld
    if named:
        notes.append(f"uploaded as they are (--allow-local-names): {_some(named)}")
    left = unlisted_files(folder, manifest)
    if left:  # an extra quant dropped in by hand would otherwise vanish from the upload unsaid
        notes.append(f"not in manifest.json, so not uploaded: {_some(left)}")
    if base_model:  # a build exported from a Hub id names its base itself
        notes += [n for n in [check_base_model(folder, manifest, base_model)] if n]
    if exported is not None:
        own = fmt != "gguf" or "Run it" in exported
        notes.append("the export's README.md is replaced by the generated model card (which "
                     + ("carries its run instructions)" if own else "has qoqopt's generic usage)"))
    elif (folder / "README.md").exists():
        notes.append("README.md is not in manifest.json: left out, and not read for the card")
    return UploadPlan(folder, repo_id, private, files, card, fmt, notes, manifest_text, stops, replace)


def _or_stop(value, missing: type[QoqoptError], placeholder, dry_run: bool, stops: list[str]):
    """``value()``; when it raises ``missing``, a dry run carries on with ``placeholder`` (None: one
    the card does not show) and a stop."""
    try:
        return value()
    except missing as err:
        if not dry_run:
            raise
        shown = "" if placeholder is None else f" (the card above shows {getattr(placeholder, 'id', placeholder)})"
        stops.append(f"{err}{shown}")
        return placeholder


def _some(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def shipped_manifest(manifest: dict, repo_id: str, base: str) -> tuple[str, list[str]]:
    """The manifest.json uploaded, and notes on what it leaves out: the build's own, less the
    export's README.md, which the card replaces on the Hub (listed, its size and sha256 failed
    `info --verify` on every download), marked as published, so that the card is not reported as a
    file the manifest leaves out, and naming the base model instead of the local folder the build
    was made from (a path holds user and folder names; the fingerprint still identifies the weights)."""
    files = [e for e in manifest["files"] if entry_path(e) != "README.md"]
    published = {"repo": repo_id, "readme": "the model card written by qoqopt publish"}
    source, notes = dict(manifest.get("source") or {}), []
    local = source.get("model")
    if hub_source(manifest) is None:
        source["model"] = base
    if isinstance(local, str) and local and hub_source(manifest) is None:
        notes.append(f"manifest.json names the local folder {local} the build was made from; the uploaded copy "
                     f"names {base} instead")  # fmt: skip
        if manifest.get("name") and manifest["name"] == PurePath(local.rstrip("/\\")).name:  # export's default name
            notes.append(f"the build's file names and GGUF general.name are {manifest['name']!r}, the name of that "
                         "folder; `qoqopt export --name` chooses another")  # fmt: skip
    text = json.dumps({**manifest, "source": source, "files": files, "published": published}, indent=2) + "\n"
    return text, notes


def _read_report(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QoqoptError(f"--results {path}: not UTF-8 text (byte {exc.start}); give the report.md of `qoqopt report`") from None


def _upload_failure(err: Exception, repo_id: str) -> str:
    """What went wrong with an upload, in words: the Hub refused it, offline mode, or no answer."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, HfHubHTTPError):  # a refused token, no write access, a bad name
        status = getattr(err.response, "status_code", None)
        return f"the Hub refused the upload to {repo_id} (HTTP {status}): {str(err).splitlines()[0]}"
    if isinstance(err, OfflineModeIsEnabled):
        return f"HF_HUB_OFFLINE is set: unset it to upload to {repo_id}"
    return f"cannot reach the Hub to upload to {repo_id}: {err}"  # offline, DNS, a proxy, a timeout


def upload(plan: UploadPlan, token: str, api=None) -> str:
    """Create the repo if needed and send exactly the planned files plus the card, in one commit: a
    failure leaves none of them on the Hub, and the message says whether the repo exists by then.
    An existing repo is checked first (see :func:`repo_state`)."""
    import tempfile

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HTTPError, OfflineModeIsEnabled

    api = api or HfApi()
    repo_made = False
    try:
        state = repo_state(api, plan, token)
        state.refuse()
        if not state.exists:
            # private=None, not False: a new repo then takes its owner's default (an organisation's may be private)
            api.create_repo(plan.repo_id, token=token, private=plan.private or None, repo_type="model")
        repo_made = True
        with tempfile.TemporaryDirectory() as tmp:
            generated = {"manifest.json": plan.manifest_text, "README.md": plan.card}
            for name, text in generated.items():
                (Path(tmp) / name).write_text(text, encoding="utf-8")
            ops = [CommitOperationAdd(f.path, str((Path(tmp) if f.path in generated else plan.folder) / f.path))
                   for f in plan.files] + [CommitOperationAdd("README.md", str(Path(tmp) / "README.md"))]  # fmt: skip
            ops += [CommitOperationDelete(name) for name in state.stale]
            info = api.create_commit(
                plan.repo_id, ops, commit_message=f"qoqopt: upload {plan.fmt} build", token=token, repo_type="model"
            )
    except QoqoptError:
        raise
    except (HTTPError, OfflineModeIsEnabled) as err:  # HTTPError covers the Hub's own refusals too
        raise QoqoptError(_not_committed(_upload_failure(err, plan.repo_id), plan.repo_id, repo_made)) from err
    except Exception as err:  # a dropped connection, a Xet/LFS transfer error, a file gone mid-upload
        reason = (str(err).strip().splitlines() or [""])[0]
        said = f"upload to {plan.repo_id} failed: {type(err).__name__}{': ' + reason if reason else ''}"
        raise QoqoptError(_not_committed(said, plan.repo_id, repo_made)) from err
    return getattr(info, "commit_url", str(info))


def _not_committed(said: str, repo_id: str, repo_made: bool) -> str:
    """A failed upload's one line: the commit is all or nothing, but the repo may have been made."""
    return f"{said}; no file was committed" + (f" ({repo_id} exists, without this build)" if repo_made else "")


@dataclass
class RepoState:
    """The target repo as the Hub answers for it, and what that means for the plan."""

    repo_id: str
    exists: bool
    private: bool = False
    stale: list[str] = field(default_factory=list)  # its files the build does not have
    refusals: list[str] = field(default_factory=list)

    def refuse(self) -> None:
        if self.refusals:
            raise QoqoptError(self.refusals[0])

    def describe(self, replace: bool) -> list[str]:
        if not self.exists:
            return [f"{self.repo_id} does not exist yet: the upload creates it"]
        lines = [f"{self.repo_id} exists ({'private' if self.private else 'public'}): the upload adds a commit to it"]
        if self.stale and replace:
            lines.append(f"--replace deletes from it, in the same commit: {_some(self.stale)}")
        return lines


def repo_state(api, plan: UploadPlan, token: str | None) -> RepoState:
    """Whether the repo exists, and what would refuse this plan there: --private for a public repo
    (create_repo(exist_ok=True) left it public, unsaid), and files the build does not have unless
    --replace deletes them."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.repo_info(plan.repo_id, token=token, repo_type="model")
    except RepositoryNotFoundError:
        return RepoState(plan.repo_id, exists=False)
    state = RepoState(plan.repo_id, True, bool(info.private), stale_files([s.rfilename for s in info.siblings or []], plan))
    if plan.private and not state.private:
        state.refusals.append(f"{plan.repo_id} exists and is public: --private does not change an existing repo; make "
                              "it private in its settings on the Hub first, or publish to a new repo")  # fmt: skip
    if state.stale and not plan.replace:
        state.refusals.append(f"{plan.repo_id} already holds files this build does not: {_some(state.stale)}. Loaders "
                              "would read them beside the new files (an old shard index, an old quant); pass --replace "
                              "to delete them in the same commit (the repo's history keeps them), or publish to a new "
                              "repo")  # fmt: skip
    return state


def preflight(plan: UploadPlan, token: str | None, api=None) -> tuple[list[str], list[str]]:
    """A dry run's look at the target repo: (notes, stops). Unreachable (offline, no answer) is a
    note: the real upload asks again."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError, OfflineModeIsEnabled

    try:
        state = repo_state(api or HfApi(), plan, token)
    except (HTTPError, OfflineModeIsEnabled, OSError) as err:
        reason = "HF_HUB_OFFLINE is set" if isinstance(err, OfflineModeIsEnabled) else " ".join(str(err).split())[:200]
        return [f"the repo was not looked up on the Hub ({reason}); the upload checks it first"], []
    return state.describe(plan.replace), state.refusals


def stale_files(remote: list[str], plan: UploadPlan) -> list[str]:
    """The repo's files an upload of ``plan`` would neither write nor keep (the Hub's own
    .gitattributes stays)."""
    ours = {f.path for f in plan.files} | {"README.md", ".gitattributes"}
    return sorted(name for name in remote if name not in ours)
