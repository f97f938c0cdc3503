"""`qoqopt export --format gguf`: text GGUF(s) + mmproj from one checkpoint, into one output folder.

    from qoqopt.exports.gguf_export import GGUFOptions, export_gguf
    result = export_gguf("out/mini", "out/mini-gguf", GGUFOptions(quants=["Q4_K_M", "Q8_0"]))

Steps (each in its own module):
1. map every checkpoint tensor to a GGUF name or a deliberate skip (gguf_map);
2. write F32/F16/BF16/Q8_0 text files straight from the shards, streaming (gguf_write, gguf_meta,
   gguf_vocab), each over --split-max-size straight into parts llama.cpp loads as one (gguf_split);
3. for K-quants / IQ types, write one F16/BF16 intermediate (or reuse a requested F16/BF16 output),
   collect the clinical imatrix through the transformers model (qoqopt.calibration) and quantize
   every requested type from that one intermediate with llama.cpp (gguf_quant), splitting each
   output over --split-max-size once it is written;
4. write the mmproj from the checkpoint's own vision tower;
5. write the imatrix file, the Ollama files (Modelfile, and the Hub's `template` and `params`:
   exports/ollama.py), README.md (exports/gguf_card.py) and manifest.json.

Everything is built in a temporary sibling folder that replaces the output only when complete,
so an interrupted (even SIGKILLed) export never leaves a file under a final name. No timestamps or
absolute paths go into any file, so a rerun is byte-identical.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from qoqopt.errors import QoqoptError
from qoqopt.hub_license import copy_license_files
from qoqopt.integrity import sha256_of
from qoqopt.local_names import own_dataset
from qoqopt.manifest import preferred_quant

from . import gguf_map, gguf_meta, gguf_quant, gguf_split, gguf_vocab, gguf_write, ollama
from .gguf_card import render_readme, size_text
from .imatrix_file import IMatrix, checked, read_imatrix, write_imatrix

MMPROJ_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
# rough bits per weight, for the free-space check only
_BPW = {"Q2_K": 3.0, "Q3_K": 3.9, "Q4": 4.9, "IQ4": 4.5, "Q5": 5.7, "Q6_K": 6.6, "Q8_0": 8.5, "IQ1": 2.0, "IQ2": 2.7, "IQ3": 3.5}


@dataclass
class GGUFOptions:
    quants: list[str] = field(default_factory=lambda: ["Q4_K_M"])
    imatrix: str = "clinical"  # clinical | none | a .jsonl calibration set | a llama.cpp imatrix file
    mmproj_type: str = "f16"  # f32 | f16 | bf16 | q8_0 | none
    name: str | None = None
    calib_items: int = 64
    # how much image positions' own activations count in the clinical imatrix, relative to text positions
    # (which are image-conditioned either way); 1 = every token alike. 0 by default: see calibration.py
    imatrix_image_weight: float = 0.0
    seed: int = 0
    threads: int = 0
    device: str | None = None  # where the imatrix calibration runs; None: CUDA where torch sees a GPU
    progress: bool = True
    # 0: every text file whole; else larger ones are written in parts of at most this many bytes
    # (the Hub takes files of at most 50 GB; a 32B F16 is ~65)
    split_max_bytes: int = 0


@dataclass
class FileRecord:
    path: str  # relative to the build directory (the manifest key; the same in GPTQ/AWQ manifests)
    kind: str  # text | mmproj | imatrix | modelfile | ollama (the Hub's template and params) | readme
    quant: str | None = None
    tensors: int | None = None
    bytes: int = 0
    sha256: str = ""
    part: int | None = None  # a text file written in parts: this one's number (from 1) and their count
    parts: int | None = None


@dataclass
class ExportResult:
    out: Path
    name: str
    files: list[FileRecord]
    notes: list[str]
    skipped: list[str]
    imatrix: dict | None

    def file(self, kind: str, quant: str | None = None) -> Path:
        for f in self.files:
            if f.kind == kind and (quant is None or f.quant == quant):
                return self.out / f.path
        raise KeyError((kind, quant))


def default_name(source: str) -> str:
    base = source.rstrip("/").split("/")[-1] if not Path(source).exists() else Path(source).resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model"


def text_file_name(name: str, quant: str) -> str:
    return f"{name}.{quant}.gguf"


def mmproj_file_name(name: str, mmproj_type: str) -> str:
    return f"mmproj-{name}-{mmproj_type.lower()}.gguf"


# ---------------------------------------------------------------------------- the export


class _Context:
    """What every step needs: checkpoint, mapping, hyperparameters, vocabulary."""

    def __init__(self, source: str, revision: str | None, options: GGUFOptions, log):
        from qoqopt.loader import checked_processor, open_checkpoint

        self.source, self.options, self.log = source, options, log
        self.ckpt = open_checkpoint(source, revision)
        self.ckpt.require_weights()
        self.ckpt.require_unquantized()
        self.processor = None  # loaded, and so checked, before the long work when the imatrix needs chats
        if any(not gguf_quant.is_direct(q) for q in options.quants) and imatrix_kind(options.imatrix) in ("clinical", "jsonl"):
            self.ckpt.hf_config()  # the imatrix runs the transformers model: check its config before the long work
            self.processor = checked_processor(self.ckpt.path, self.ckpt.source)
        self.text_hp = gguf_meta.text_hparams(self.ckpt.config)
        self.vision_hp = gguf_meta.vision_hparams(self.ckpt.config)
        # read now: a value llama.cpp cannot use failed after every text file was written
        self.image_norm = gguf_meta.image_norm(self.ckpt.path) if options.mmproj_type != "none" else None
        shapes = {n: tuple(self.ckpt.tensor_info(n)["shape"]) for n in self.ckpt.names}
        self.mapping = gguf_map.build_mapping(shapes, self.text_hp.n_layers, self.vision_hp.depth if self.vision_hp else None)
        embed_rows = shapes["model.embed_tokens.weight"][0]
        if embed_rows != self.text_hp.vocab_size:
            raise QoqoptError(f"embedding has {embed_rows} rows but config vocab_size is {self.text_hp.vocab_size}")
        self.vocab = gguf_vocab.read_vocab(self.ckpt.path, self.ckpt.config, embed_rows)
        self.name = options.name or default_name(source)
        if options.name is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._+-]*", options.name):
            raise QoqoptError(f"--name {options.name!r}: give a plain file-name stem (letters, digits, . _ + -)")
        # a llama.cpp imatrix file is read and checked now, before the long work, not after it
        kind = imatrix_kind(options.imatrix)
        self.given_imatrix = _check_imatrix(self, read_imatrix(Path(options.imatrix))) if kind == "file" else None
        if kind == "jsonl":  # every line and file header too, before the intermediate is written
            from qoqopt.data import load_jsonl

            if not Path(options.imatrix).is_file():
                raise QoqoptError(f"--imatrix {options.imatrix}: no such calibration file")
            load_jsonl(options.imatrix)
        self.revision = self.ckpt.revision
        self.fingerprint = self.ckpt.fingerprint
        self.skipped = self.mapping.skip_summary()
        self.src_dtypes = {self.ckpt.tensor_info(e.source)["dtype"] for e in self.mapping.text}
        self.reader = gguf_write.ShardReader(self.ckpt)

    def common_kv(self, writer, file_type: int) -> None:
        gguf_meta.add_common(
            writer, name=self.name, file_type=file_type, source=self.source,
            revision=self.revision, fingerprint=self.fingerprint, skipped=self.skipped,
        )  # fmt: skip


def _file_type_id(quant: str) -> int:
    return gguf_quant.llama_ftypes()[quant]


def write_text(ctx: _Context, path: Path, ftype: str) -> gguf_write.WriteReport:
    plans = gguf_write.plan_tensors(ctx.mapping.text, ftype, mmproj=False)

    def add_kv(writer):
        ctx.common_kv(writer, _file_type_id(ftype))
        gguf_meta.add_text_hparams(writer, ctx.text_hp)
        gguf_vocab.add_vocab(writer, ctx.vocab)

    return _write(ctx, path, gguf_meta.TEXT_ARCH, add_kv, plans, ctx.options.split_max_bytes)


def _write(ctx: _Context, path: Path, arch: str, add_kv, plans, max_bytes: int = 0) -> gguf_write.WriteReport:
    from qoqopt.progress import bar

    total = sum(p.nbytes for p in plans)
    with bar(total=total, unit="B", unit_scale=True, desc=path.name, leave=False, show=ctx.options.progress) as shown:
        return gguf_write.write_gguf(path, arch, add_kv, plans, ctx.reader, progress=shown.update, max_bytes=max_bytes)


def write_mmproj(ctx: _Context, path: Path, ftype: str) -> gguf_write.WriteReport:
    if not ctx.mapping.vision:
        raise QoqoptError(f"{ctx.source} has no vision tower tensors; cannot write an mmproj (use --mmproj-type none)")
    plans = gguf_write.plan_tensors(ctx.mapping.vision, ftype, mmproj=True)
    norm = ctx.image_norm
    if norm.note:
        ctx.log(f"note: {norm.note}")

    def add_kv(writer):
        ctx.common_kv(writer, _file_type_id(ftype))
        gguf_meta.add_vision_hparams(writer, ctx.vision_hp, ctx.text_hp.hidden, norm)

    return _write(ctx, path, gguf_meta.CLIP_ARCH, add_kv, plans)


def estimate_bytes(ctx: _Context, options: GGUFOptions) -> int:
    f16 = sum(gguf_write.nbytes(e.shape, gguf_write.F16 if len(e.shape) > 1 else gguf_write.F32) for e in ctx.mapping.text)
    total, quantized = 0, [0]
    for q in options.quants:
        if q == "F32":
            total += 2 * f16
        elif q in ("F16", "BF16"):
            total += f16
        else:
            bpw = next((v for k, v in _BPW.items() if q.startswith(k)), 8.5)
            total += int(f16 * bpw / 16)
            if not gguf_quant.is_direct(q):
                quantized.append(int(f16 * bpw / 16))
    if any(not gguf_quant.is_direct(q) for q in options.quants):
        total += f16  # the intermediate
    if options.mmproj_type != "none":
        total += sum(gguf_write.nbytes(e.shape, gguf_write.F32) for e in ctx.mapping.vision)
    # llama.cpp writes a quant type whole: splitting it writes a part before its bytes leave the file
    split = options.split_max_bytes
    return total + (split if split and max(quantized) > split else 0)


def export_gguf(source: str, out: str | Path, options: GGUFOptions, *, revision: str | None = None, force: bool = False, log=print) -> ExportResult:
    from qoqopt.fileio import atomic_dir, check_free_space, prepare_output_dir, write_error
    from qoqopt.manifest import export_output

    owned = export_output()
    out = Path(out)
    if options.mmproj_type not in (*MMPROJ_TYPES, "none"):
        raise QoqoptError(f"unknown --mmproj-type {options.mmproj_type!r}; choose from {', '.join(MMPROJ_TYPES)}, none")
    if options.calib_items < 1:  # an imatrix of no chats would quietly equal none
        raise QoqoptError(f"--samples must be at least 1, got {options.calib_items}")
    _check_split_size(options.split_max_bytes)
    quants = gguf_quant.parse_quants(",".join(options.quants))
    options.quants = quants
    needy = [q for q in quants if q in gguf_quant.NEEDS_IMATRIX]
    if needy and imatrix_kind(options.imatrix) == "none":  # as llama-quantize refuses, before any file is written
        raise QoqoptError(f"{needy[0]} needs an importance matrix; drop --imatrix none")
    inputs = [source] + ([options.imatrix] if imatrix_kind(options.imatrix) in ("jsonl", "file") else [])
    prepare_output_dir(out, force, inputs, owned=owned)  # fail before the (possibly long) work starts
    ctx = _Context(source, revision, options, log)
    for note in ctx.vocab.notes:
        log(f"note: {note}")
    for line in ctx.skipped:
        log(f"skipped deliberately: {line}")
    check_free_space(out, estimate_bytes(ctx, options))

    records: list[FileRecord] = []
    notes: list[str] = list(ctx.vocab.notes)
    imatrix_info = None
    try:
        with atomic_dir(out, force=force, inputs=inputs, owned=owned) as tmp:
            reports: dict[str, gguf_write.WriteReport] = {}
            texts: list[tuple[str, list[tuple[Path, int]]]] = []  # (quant type, [(file or part, tensors)])
            # 1. direct types, written in parts where over --split-max-size
            for q in [q for q in quants if gguf_quant.is_direct(q)]:
                path = tmp / text_file_name(ctx.name, q)
                reports[q] = rep = write_text(ctx, path, q)
                notes += rep.notes
                log(f"wrote {path.name}{_in_parts(ctx, rep.parts)} ({rep.tensors} tensors, {size_text(rep.bytes)})")
                texts.append((q, rep.parts or [(rep.path, rep.tensors)]))
            # 2. llama.cpp types from one intermediate
            llama_quants = [q for q in quants if not gguf_quant.is_direct(q)]
            if llama_quants:
                inter_type = "BF16" if ctx.src_dtypes == {"BF16"} else "F16"
                temporary = inter_type not in quants
                # llama.cpp reads an intermediate in parts as one file (given its first part)
                inter_rep = write_text(ctx, tmp / f".intermediate.{inter_type}.gguf", inter_type) if temporary else reports[inter_type]
                inter = inter_rep.path
                # llama-quantize keeps every tensor of its input: the intermediate's count is each output's
                tensors = inter_rep.tensors
                imatrix, imatrix_info = _imatrix(ctx, options, tmp, log)
                means = imatrix.means() if imatrix else None  # the same for every quant type
                if imatrix_info:
                    records.append(_record(tmp / imatrix_info["file"], "imatrix"))
                for q in llama_quants:
                    path = tmp / text_file_name(ctx.name, q)
                    rep = gguf_quant.llama_quantize(inter, path, q, means, options.threads, imatrix_info)
                    notes += rep.summary()
                    for line in rep.summary():
                        log(f"note: {line}")
                    log(f"wrote {path.name} (llama.cpp {q}, {_imatrix_words(options) if imatrix else 'no imatrix'}, "
                        f"{size_text(path.stat().st_size)})")
                    texts.append((q, _split_over(ctx, path, tensors)))
                if temporary:
                    for part, _ in inter_rep.parts or [(inter, tensors)]:
                        part.unlink()
            records += [r for q, parts in texts for r in _text_records(q, parts)]
            # 3. mmproj
            mmproj_name = None
            if options.mmproj_type != "none":
                ftype = MMPROJ_TYPES[options.mmproj_type]
                path = tmp / mmproj_file_name(ctx.name, options.mmproj_type)
                rep = write_mmproj(ctx, path, ftype)
                notes += rep.notes
                for note in rep.notes:
                    log(f"note: {note}")
                records.append(_record(path, "mmproj", ftype, rep.tensors))
                mmproj_name = path.name
                log(f"wrote {path.name} ({rep.tensors} tensors, {size_text(rep.bytes)})")
            # 4. user-facing files
            records.sort(key=lambda r: (r.kind != "text", r.kind, r.path))
            runnable = {r.quant: r.path for r in records if r.kind == "text" and (r.part or 1) == 1}
            primary = preferred_quant(runnable) or quants[0]
            modelfile = _modelfile(ctx, records, primary, mmproj_name)
            records += [_record(path, kind) for path, kind in ollama.write_files(tmp, modelfile)]
            # the source's licence text goes with the build (Apache-2.0 4a, MIT), as GPTQ/AWQ builds carry it
            records += [_record(path, "license") for path in copy_license_files(ctx.ckpt.path, tmp)]
            (tmp / "README.md").write_text(render_readme(ctx, records, mmproj_name, primary, notes, imatrix_info))
            records.append(_record(tmp / "README.md", "readme"))
            manifest = render_manifest(ctx, records, notes, imatrix_info)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as exc:
        raise write_error(exc, out / "manifest.json") from exc
    finally:
        ctx.reader.close()
    log(f"done: {out}")
    return ExportResult(out, ctx.name, records, notes, ctx.skipped, imatrix_info)


def _record(path: Path, kind: str, quant: str | None = None, tensors: int | None = None, part: tuple[int, int] | None = None) -> FileRecord:
    from qoqopt.fileio import sha256_file

    return FileRecord(path.name, kind, quant, tensors, path.stat().st_size, sha256_file(path), *(part or (None, None)))


def _check_split_size(max_bytes: int) -> None:
    if max_bytes < 0 or 0 < max_bytes < gguf_split.MIN_SPLIT_BYTES:
        raise QoqoptError(f"--split-max-size {max_bytes} bytes: give at least 1M (sizes take K, M, G: 48G keeps every "
                          "file under the Hub's 50 GB limit)")  # fmt: skip


def _split_over(ctx: _Context, path: Path, tensors: int) -> list[tuple[Path, int]]:
    """A file llama.cpp quantized: [(it, tensors)], or its parts where it is over --split-max-size."""
    from qoqopt.progress import bar

    max_bytes = ctx.options.split_max_bytes
    if not max_bytes or path.stat().st_size <= max_bytes:
        return [(path, tensors)]
    with bar(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"splitting {path.name}", leave=False,
             show=ctx.options.progress) as shown:  # fmt: skip
        parts = gguf_split.split_gguf(path, max_bytes, progress=shown.update)
    if len(parts) > 1:
        ctx.log(f"split {path.name}{_in_parts(ctx, parts, 'into')}")
    return parts


def _in_parts(ctx: _Context, parts: list[tuple[Path, int]], word: str = "as") -> str:
    """' as N parts (first part, ...) of at most SIZE bytes', and which are larger and why, for a
    log line; '' if the file is whole."""
    if len(parts) < 2:
        return ""
    max_bytes = ctx.options.split_max_bytes
    over = [n for p, n in parts if p.stat().st_size > max_bytes]
    tensors = len(over) - (0 in over)  # parts over SIZE by one tensor; a part with none holds the metadata
    why = (["the metadata alone is larger"] if 0 in over else []) + (
        [f"{tensors} {'holds' if tensors == 1 else 'hold'} one tensor that alone is larger"] if tensors else [])
    return (f" {word} {len(parts)} parts ({parts[0][0].name}, ...) of at most {max_bytes:,} bytes"
            + "".join(f"; {w}" for w in why))  # fmt: skip


def _text_records(quant: str, parts: list[tuple[Path, int]]) -> list[FileRecord]:
    """A text GGUF's manifest records: the file itself, or each of its parts."""
    if len(parts) == 1:
        return [_record(parts[0][0], "text", quant, parts[0][1])]
    return [_record(p, "text", quant, n, (no, len(parts))) for no, (p, n) in enumerate(parts, 1)]


# ---------------------------------------------------------------------------- imatrix


def imatrix_kind(choice: str) -> str:
    """What --imatrix names: "none"; "clinical" or a "jsonl" calibration set, computed here; or a
    llama.cpp imatrix "file"."""
    if choice in ("none", "clinical"):
        return choice
    return "jsonl" if choice.lower().endswith(".jsonl") else "file"


def _imatrix(ctx: _Context, options: GGUFOptions, tmp: Path, log) -> tuple[IMatrix | None, dict | None]:
    """The importance matrix to quantize with (or None), written into the output as `<Name>.imatrix.gguf`."""
    choice, kind = options.imatrix, imatrix_kind(options.imatrix)
    if kind == "none":
        log("note: quantizing without an importance matrix (--imatrix none)")
        return None, None
    if kind == "file":  # read and checked when the export started
        # llama-imatrix names its -f file as typed, an older qoqopt its set's path: not carried on
        im = replace(ctx.given_imatrix, datasets=[own_dataset(d) for d in ctx.given_imatrix.datasets])
        how = f"read from an imatrix file (sha256 {sha256_of(Path(choice))[:12]})"
    else:
        im, how = _check_imatrix(ctx, clinical_imatrix(ctx.ckpt, ctx.processor, choice, options, log)), "calibrated"
    path = tmp / f"{ctx.name}.imatrix.gguf"
    write_imatrix(path, im)
    # quantize with the file as written (float32 sums), so that `--imatrix` of this file, or
    # `llama-quantize --imatrix` of it, gives these builds again byte for byte
    im = read_imatrix(path)
    info = {"file": path.name, "source": how, "datasets": im.datasets, "entries": len(im.sums),
            "chunks": im.chunk_count, "chunk_size": im.chunk_size}  # fmt: skip
    return im, info


def _imatrix_words(options: GGUFOptions) -> str:
    """Which importance matrix a quant was made with, for the log (a user set is not "clinical")."""
    kind, name = imatrix_kind(options.imatrix), Path(options.imatrix).name
    return {"clinical": "clinical imatrix", "jsonl": f"imatrix calibrated on {name}"}.get(kind, f"imatrix {name}")


def _check_imatrix(ctx: _Context, im: IMatrix) -> IMatrix:
    cols = {e.target: e.shape[-1] for e in ctx.mapping.text if len(e.shape) == 2}
    unknown = sorted(set(im.sums) - set(cols))
    if unknown:
        raise QoqoptError(f"imatrix has {len(unknown)} entries this model lacks, e.g. {unknown[0]}")
    for name, sums in im.sums.items():
        if sums.size != cols[name]:
            raise QoqoptError(f"imatrix entry {name} has {sums.size} values; the tensor has {cols[name]} columns")
    return im


def imatrix_from_stats(stats, image_weight: float = 0.0) -> IMatrix:
    """Calibration statistics (canonical weight names) -> llama.cpp imatrix entries (GGUF names)."""
    combined, combined_counts = stats.combined(image_weight)
    sums, counts = {}, {}
    for canon, s in combined.items():
        rule, bid = gguf_map.match(canon)
        if rule.part != gguf_map.TEXT:
            continue
        target = rule.targets[0].format(bid=bid)
        sums[target], counts[target] = s, combined_counts[canon]
    dataset = f"{stats.dataset}: {stats.describe()}; image positions weighted {image_weight:g}"
    # the tokens each chat added to a layer's counts (the image's only as weighted), as llama-imatrix's
    # chunk_count x chunk_size is the tokens it counted
    chunk = max(1, round(max(counts.values(), default=0) / max(stats.chats, 1)))
    return checked(IMatrix(sums, counts, [dataset], stats.chats, chunk), "calibration (the model's activations)")


def clinical_imatrix(ckpt, processor, choice: str, options: GGUFOptions, log) -> IMatrix:
    from qoqopt import calibration

    items, label = calibration.calibration_items(choice, options.calib_items, options.seed, log)
    log(f"calibrating the imatrix on {len(items)} image chats from {label}")
    stats = calibration.stream_input_sq_sums(ckpt, processor, items, dataset=label, device=options.device,
                                             progress=options.progress)  # fmt: skip
    log(f"imatrix: {stats.describe()}; image positions weighted {options.imatrix_image_weight:g}")
    return imatrix_from_stats(stats, options.imatrix_image_weight)


# ---------------------------------------------------------------------------- the Modelfile and the manifest


def _modelfile(ctx: _Context, records: list[FileRecord], primary: str, mmproj: str | None) -> str:
    """The Modelfile, naming the text GGUF the card and `ask` use: each of its parts, where it is in
    parts (Ollama 0.30 and later merge them)."""
    texts = [r for r in records if r.kind == "text"]
    files = [r.path for r in sorted((r for r in texts if r.quant == primary), key=lambda r: r.part or 1)]
    others = [r.path + (f" (+{r.parts - 1} parts)" if r.parts else "") for r in texts if r.quant != primary and (r.part or 1) == 1]
    return ollama.render_modelfile(ctx.name, files, mmproj, others, gguf_meta.train_token_range(ctx.vision_hp))


def render_manifest(ctx: _Context, records: list[FileRecord], notes: list[str], imatrix: dict | None) -> dict:
    from qoqopt import __version__

    return {
        "format": "gguf",
        "name": ctx.name,
        "qoqopt_version": __version__,
        "source": {
            "model": ctx.source,
            "revision": ctx.revision,
            "fingerprint": ctx.fingerprint,
            "architecture": ctx.ckpt.architecture,
            "layout": ctx.ckpt.layout,
            "ecg_encoder": ctx.ckpt.has_ecg_encoder,
        },
        "files": [
            {k: v for k, v in vars(r).items() if v is not None} for r in records
        ],
        "skipped": ctx.skipped,
        "imatrix": imatrix,
        "notes": notes,
    }
