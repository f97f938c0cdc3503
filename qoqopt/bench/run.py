"""Orchestrate a bench run: locate or build each variant, run the reference and every variant in its own
child process, and write one result JSON (schema qoqopt.bench/1) tagged with hardware and software."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..children import how_it_ended, python_module
from ..errors import QoqoptError
from ..fileio import OutputExists, atomic_write_text, check_can_make_dir, removed_if_left_empty, sha256_file, writing
from ..integrity import checked_files, checked_weights, sha256_of
from ..leftovers import tidy, tmp_prefix
from ..loader import FINGERPRINT_PREFIX
from ..manifest import entry_path, read_manifest
from ..report import SCHEMA
from .machine import machine_info, software_info, threads_or_default
from .speed import SpeedSettings
from .given_gguf import check_shapes, given_files
from .variants import Variant, build_commands, find_in, locate, run_build


@dataclass
class BenchOptions:
    model: str
    variants: list[Variant]
    out: Path
    device: str = "cpu"
    eval_source: str = "clinical"
    domains: list[str] | None = None  # only these domains of the eval set
    items: int = 20
    seed: int = 0
    search: list[Path | str] = field(default_factory=list)  # export directories or Hub ids to take builds from
    builds: Path | None = None  # where missing builds are made (default OUT/builds)
    label: str | None = None
    threads: int = 0
    speed: SpeedSettings | None = field(default_factory=SpeedSettings)
    calib_items: int = 64
    answer_tokens: int = 1024  # QoQ-Med's replies think at length before \boxed{}
    reference_dtype: str = "auto"
    revision: str | None = None


# transformers' logits are projected in fp32 (exports/gguf_verify.fp32_logits); a run without this
# field rounded a bf16 model's to bf16, and its drift is not compared with newer runs'
LOGITS = "fp32"


def run_bench(opts: BenchOptions, log=print) -> Path:
    check_can_make_dir(opts.out)
    builds = opts.builds or opts.out / "builds"
    with removed_if_left_empty(opts.out, builds):  # builds it made are kept, for the next run
        return _bench(opts, builds, log)


def _bench(opts: BenchOptions, builds: Path, log) -> Path:
    from ..data import domain_counts
    from ..loader import checked_processor, open_checkpoint, resolve
    from .eval_set import eval_items

    tidy(opts.out / "bench", f"in {opts.out}")  # a killed run's work folder, the reference's logits: first, for space
    # What needs neither the checkpoint nor transformers (whose import alone takes 8 s on 2 cores) first
    _check_device(opts.device)
    items = eval_items(opts.eval_source, opts.items, opts.seed, render=False, domains=opts.domains)  # bad --eval fails here
    set_sha = _set_sha(opts.eval_source, items)  # the set as read now: an edit during the run is not recorded as measured
    hub = _hub_manifests(opts.search)  # before the source checkpoint, which may be a 16 GB download
    found = _find_builds(opts, hub)  # manifests alone: a variant in two --from is refused here
    model_path, revision = resolve(opts.model, opts.revision)
    ckpt = open_checkpoint(str(model_path))  # validates: Qwen2.5-VL, weights present
    ckpt.require_weights()
    ckpt.require_unquantized()  # the reference is the original checkpoint, not a build of it
    found |= _cached_builds(opts, builds, found, ckpt.fingerprint, log)
    located = _checked_builds(opts, found, hub, ckpt, log)
    missing = [v for v in opts.variants if v.name not in located]
    if not missing:  # nothing to build: a broken build is refused before transformers loads
        _say_unrunnable(located, log)
    _check_answer_room(opts.answer_tokens, ckpt.hf_config())  # a config transformers refuses stops here too
    checked_processor(model_path, opts.model)  # and so must its tokenizer and chat template
    _say_gguf_on_cpu(opts, log)
    set_name = _set_name(opts.eval_source)
    threads = threads_or_default(opts.threads)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if missing:
        located |= _build_missing(opts, missing, builds, log)
        located = {v.name: located[v.name] for v in opts.variants}  # in the order the user gave them
        _say_unrunnable(located, log)  # now, not after the reference pass (long fp32 work on a 7B)
    hashes = _Hashes()
    source_files = [model_path / f for f in ckpt.shard_files]
    with writing(opts.out):
        opts.out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=tmp_prefix(opts.out / "bench"), suffix=".tmp", dir=opts.out))
    try:
        common = _common_job(opts, ckpt, work, threads)
        log(f"reference: {opts.model} in transformers ({common['reference_dtype']}), {len(items)} chats")
        ref = _run_worker({**common, "role": "reference", "speed": None}, work, "reference")
        if ref["status"] != "ok":
            raise QoqoptError(f"the reference failed, so nothing can be compared: {ref['error']}")
        records = [_record("reference", "hf", ref, source_files, hashes)]
        log(f"  {summary_line(records[0])}")
        for i, v in enumerate(opts.variants, 1):
            files = located[v.name].get("files")
            log(f"[{i}/{len(opts.variants)}] {v.name}" + (f" from {_build_folder(files)}" if files else ""))
            records.append(_variant_record(v, located[v.name], common, work, source_files, hashes))
            log(f"  {summary_line(records[-1])}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "schema": SCHEMA,
        "run": {
            "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(opts.device, threads, opts.label), "software": software_info(),
            "model": {"source": opts.model, "revision": revision, "architecture": ckpt.architecture},
            "eval": {"source": set_name, "items": len(items), "seed": opts.seed,
                     "domains": domain_counts(items), "answer_tokens": opts.answer_tokens,
                     "only_domains": opts.domains, "ids_sha256": _ids_sha(items), **set_sha},
            "reference_dtype": common["reference_dtype"],
            "logits": LOGITS,
            "speed_settings": vars(opts.speed) if opts.speed else None,
        },
        "variants": records,
    }  # fmt: skip
    name = _file_name(opts.model, result["run"]["machine"]["label"])
    return _write_result(opts.out, name, json.dumps(result, indent=1))


def _write_result(out: Path, name: str, text: str) -> Path:
    """Under ``name``, or ``name-2``... where a run that finished in the same second took it."""
    for n in range(1, 1000):
        path = out / (name if n == 1 else f"{Path(name).stem}-{n}.json")
        try:
            atomic_write_text(path, text, replace=False)
            return path
        except OutputExists:
            continue
    raise QoqoptError(f"{out} holds {name} and 998 more of its numbered names; choose another --out")


def _set_sha(source: str, items) -> dict:
    """A user set's sha256, over the JSONL and each chosen item's image file: `report` compares drift
    only from the same chats, wherever the files were (a replaced image is other chats)."""
    if source == "clinical":
        return {}
    digest = hashlib.sha256(sha256_file(Path(source)).encode())
    for item in items:
        digest.update(sha256_file(Path(item.source)).encode())
    return {"sha256": digest.hexdigest()}


def _set_name(source: str) -> str:
    """The eval set as results name it: results travel between sites and onto cards, so a user set
    goes by its sha256, not its path."""
    from qoqopt.data.jsonl import set_label

    return source if source == "clinical" else set_label(source)


def _ids_sha(items) -> str:
    """The chosen chats by id: a --domain filter, or another sampler, chooses others."""
    return hashlib.sha256("\n".join(item.id for item in items).encode()).hexdigest()


def summary_line(rec: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['name']}: FAILED: {rec['error']}"
    a, s = rec["drift"]["all"], rec.get("speed") or {}
    parts = [f"{rec['name']} ({rec['runtime']}, {rec['size_bytes'] / 1e6:.1f} MB)"]
    if a.get("mean_kld") is not None:
        parts.append(f"mean KLD {a['mean_kld']:.2e}, same top-1 {a['same_top_pct']:.1f}%, worst domain {rec['worst_domain']}")
    if a.get("accuracy") is not None:
        parts.append(f"answer accuracy {a['accuracy']:.2f}")
    if s.get("decode_tok_s"):
        parts.append(f"decode {s['decode_tok_s']:.1f} tok/s, TTFT {s['ttft_ms']:.0f} ms")
    return "; ".join(parts)


# --------------------------------------------------------------------------- variants


def _find_builds(opts: BenchOptions, hub: dict) -> dict[str, dict[str, Path] | None]:
    """variant name -> its files in a --from folder, or None; from manifests alone (a Hub build's
    files are not downloaded yet). `hub`: as _hub_manifests gives it."""
    searched = {(hub[s][0] if isinstance(s, str) else s).resolve(): str(s) for s in opts.search}  # folder -> as given
    return {v.name: given_files(v.given) if v.given else _locate(v, searched)
            for v in opts.variants if v.format not in ("hf", "bnb")}  # fmt: skip


def _cached_builds(opts: BenchOptions, builds: Path, found: dict, fingerprint: str, log) -> dict[str, dict[str, Path]]:
    """variant name -> its files in an earlier run's build (OUT/builds, bench's own cache) for each
    variant no --from has, if that build is what this run would make: from this checkpoint, calibrated
    on --calib-items chats of the built-in clinical set. Matched on the format and type alone, a build of the model benched before
    into the same --out stopped the run, and one calibrated on other chats was measured as this one."""
    folders = sorted(p for p in builds.iterdir() if p.is_dir()) if builds.is_dir() else []
    out: dict[str, dict[str, Path]] = {}
    for v in (v for v in opts.variants if v.name in found and found[v.name] is None):
        stale = []
        for folder in folders:
            files = find_in(folder, v)
            why = files and _unfit(folder, v, fingerprint, opts.calib_items)
            if files and not why:
                out[v.name] = files
                break
            if files:
                stale.append(f"{folder} {why}")
        else:
            for line in stale:
                log(f"note: {line}: {v.name} is built again")
    return out


CLINICAL = "qoqopt clinical calib split"  # how a build's manifest names the built-in calibration set


def _unfit(folder: Path, v: Variant, fingerprint: str, calib_items: int) -> str | None:
    """Why a cached build of ``v`` is not the one this run would make, or None."""
    from ..exports.gguf_quant import is_direct

    m = read_manifest(folder)
    source = m.get("source") or {}
    if not source.get("fingerprint"):
        return "records no content fingerprint of its source"
    if source["fingerprint"] != fingerprint:
        return f"was made from {source.get('model') or 'an unrecorded checkpoint'}, not this one"
    if m.get("format") == "gguf" and is_direct(v.option):
        return None  # F16/BF16/Q8_0 take no imatrix: no calibration to match
    if m.get("format") == "gguf":  # bench exports with the clinical imatrix on --calib-items chats
        imatrix = m.get("imatrix") or {}
        calibrated = imatrix.get("source") == "calibrated" and (imatrix.get("datasets") or [""])[0].startswith(CLINICAL)
        chats = imatrix.get("chunks")
    else:
        calibration = m.get("calibration") or {}
        calibrated, chats = str(calibration.get("source", "")).startswith(CLINICAL), calibration.get("chats")
    if not calibrated:
        return "was not calibrated on the built-in clinical set, as bench's own builds are"
    if chats != calib_items:
        return f"was calibrated on {chats} chats, not --calib-items {calib_items}"
    return None


def _checked_builds(opts: BenchOptions, found: dict, hub: dict, ckpt, log) -> dict[str, dict]:
    """variant name -> {"files": {...}} or {"error": ...} for each variant that needs no build made;
    variants needing no files get {}. Builds found are checked against the model (``ckpt``) from
    their manifests alone, before any is downloaded, then checked file by file; a GGUF given by its
    file that no manifest lists, by its dims."""
    foreign = {v.name for v in opts.variants if v.given and not _in_a_build(found[v.name])}
    _check_sources(opts.model, ckpt.fingerprint, {n: files for n, files in found.items() if files and n not in foreign}, log)
    out: dict[str, dict] = {}
    for v in opts.variants:
        if v.format in ("hf", "bnb"):
            out[v.name] = {"files": {}}
        elif v.name in foreign:
            check_shapes(v.name, found[v.name], ckpt.hf_config())
            log(f"note: {v.name} is not a qoqopt build (no manifest lists it): its dims are {opts.model}'s, but "
                "which checkpoint it was made from cannot be checked (a base model's build has the same dims)")
            out[v.name] = {"files": found[v.name], "foreign": True}
        elif found[v.name] is not None:
            try:
                out[v.name] = {"files": _fetch_from_hub(found[v.name], hub, log)}
            except QoqoptError as err:
                out[v.name] = {"error": str(err)}
    return out


def _in_a_build(files: dict[str, Path]) -> bool:
    """A GGUF given by its file that the manifest of a qoqopt build beside it lists, with its mmproj:
    checked as that build is (its source, its files' sha256), not as another tool's."""
    folder = files["text"].parent
    try:
        listed = {entry_path(e) for e in read_manifest(folder)["files"]}
    except QoqoptError:
        return False
    return all(p.parent == folder and p.name in listed for p in files.values())


def _build_missing(opts: BenchOptions, missing: list[Variant], builds: Path, log) -> dict[str, dict]:
    """Export the variants no folder had; variant name -> {"files": {...}} or {"error": ...}. Builds
    are made from the model as the user named it (a Hub id stays a Hub id in their manifests)."""
    out: dict[str, dict] = {}
    for variants, dest, cmd in build_commands(opts.model, missing, builds, opts.calib_items, opts.revision):
        log(f"building {', '.join(v.name for v in variants)} -> {dest} (qoqopt export)")
        error = run_build(cmd)
        for v in variants:
            made = None if error else locate(v, [dest])
            out[v.name] = {"files": made} if made else {"error": error or f"the export did not produce {v.name}"}
    return out


def _say_unrunnable(located: dict[str, dict], log) -> None:
    """Variants whose build is missing, damaged or failed to export: with none left to run nothing
    can be compared (refused before the reference runs); else each is named up front."""
    broken = {name: where["error"] for name, where in located.items() if "error" in where}
    if broken and len(broken) == len(located):
        name, error = next(iter(broken.items()))
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise QoqoptError(f"no variant can run, so there is nothing to compare: {name}: {error}{more}")
    for name, error in broken.items():
        log(f"note: {name} cannot run and is recorded as failed: {error}")


def _locate(v: Variant, searched: dict[Path, str]) -> dict[str, Path] | None:
    """The variant's files from the one --from that has it (two that do are refused: which build
    would be measured was the order's choice, unsaid)."""
    hits = [(given, files) for folder, given in searched.items() if (files := find_in(folder, v))]
    if len(hits) > 1:
        raise QoqoptError(f"{v.name} is in more than one --from ({', '.join(given for given, _ in hits)}): "
                          "give only the one to bench")  # fmt: skip
    return hits[0][1] if hits else None


def _build_folder(files: dict[str, Path]) -> Path:
    return files.get("dir") or files["text"].parent


def _check_sources(model: str, fingerprint: str, found: dict[str, dict[str, Path]], log) -> None:
    """Refuse builds made from another checkpoint: their drift against MODEL would be measured
    against the wrong reference. A build's manifest records its source's ``Checkpoint.fingerprint``
    (content, so the same for a Hub snapshot and a local copy of it); older builds recorded none, or
    one of config and headers only, which a fine-tune shares with its base: those get a note."""
    for name, files in found.items():
        folder = _build_folder(files)
        source = read_manifest(folder).get("source") or {}
        recorded = source.get("fingerprint") or ""
        if not recorded.startswith(FINGERPRINT_PREFIX):
            log(f"note: {folder} is an older build whose manifest records no content fingerprint: "
                f"cannot check that {name} was built from {model}")
        elif recorded != fingerprint:
            raise QoqoptError(
                f"{name}: {folder} was built from {source.get('model')} ({recorded}), not from {model} "
                f"({fingerprint}); bench a build against the checkpoint it was made from"
            )


def _hub_manifests(search: list[Path | str]) -> dict[str, tuple[Path, str | None]]:
    """Hub id -> (its local snapshot folder, its commit) for each --from that is one, holding only
    the repo's manifest and configs so far: a build's files are fetched once a variant picks it."""
    from ..loader import resolve

    manifests = {}
    for repo in (s for s in search if isinstance(s, str)):
        try:
            folder, commit = resolve(repo, weights=False)
        except QoqoptError as err:
            raise QoqoptError(f"--from {repo}: no such directory; as a Hub id: {err}") from err
        if not (folder / "manifest.json").is_file():
            raise QoqoptError(f"--from {repo}: the Hub repo has no manifest.json (not uploaded by `qoqopt publish`)")
        manifests[repo] = (folder, commit)
    return manifests


def _fetch_from_hub(found: dict[str, Path], hub: dict[str, tuple[Path, str | None]], log) -> dict[str, Path]:
    """Download the files of a build found in a Hub repo's manifest: a GGUF build's text file (each
    part of it) and mmproj only (a GGUF repo holds every quant type), a GPTQ/AWQ checkpoint whole.
    Then every GGUF file, or a GPTQ/AWQ build's every safetensors file, must be there at the size and
    sha256 its manifest records, fetched or local: llama.cpp would only say that the model failed to
    load, and a corrupt file that loads would be measured as quantization drift."""
    from ..loader import resolve

    for repo, (folder, commit) in hub.items():
        if all(p.is_relative_to(folder) for p in found.values()):
            if "dir" in found:
                log(f"fetching the {repo} checkpoint")
                resolve(repo, commit)
            else:
                log(f"fetching {', '.join(p.name for p in found.values())} from {repo}")
                resolve(repo, commit, only=[p.relative_to(folder).as_posix() for p in found.values()])
    if "dir" not in found:
        _check_listed(found)
    elif (found["dir"] / "manifest.json").exists():  # a qoqopt GPTQ/AWQ build, not a plain checkpoint
        checked_weights(found["dir"], read_manifest(found["dir"]))
    return found


def _check_listed(found: dict[str, Path]) -> None:
    """Every GGUF file of the build present, at the size and sha256 its manifest records: a corrupt
    file would be measured as quantization drift."""
    folder = _build_folder(found)
    entries = {PurePosixPath(entry_path(e)).as_posix(): e for e in read_manifest(folder).get("files", [])}
    listed = []
    for path in found.values():
        rel = path.relative_to(folder).as_posix()
        if rel not in entries:
            raise QoqoptError(f"{folder}/manifest.json does not list {rel}")
        listed.append(entries[rel])
    checked_files(folder, listed)


def _variant_record(v: Variant, where: dict, common: dict, work: Path, source_files, hashes) -> dict:
    if "error" in where:
        return {"name": v.name, "format": v.format, "status": "failed", "error": where["error"]}
    files = {k: str(p) for k, p in where["files"].items()}
    job = {**common, "role": "variant", "variant": vars(v), "files": files}
    res = _run_worker(job, work, re.sub(r"\W+", "_", v.name))
    if res["status"] != "ok":
        return {"name": v.name, "format": v.format, "status": "failed", "error": res["error"]}
    paths = _variant_files(where["files"]) or source_files
    rec = _record(v.name, v.format, res, paths, hashes)
    if where["files"]:  # provenance: what the build's manifest says it was made from
        folder = _build_folder(where["files"])
        rec["built_from"] = {} if where.get("foreign") or not (folder / "manifest.json").exists() else \
            read_manifest(folder).get("source") or {}  # fmt: skip
    return rec


def _variant_files(found: dict[str, Path]) -> list[Path]:
    if "dir" in found:
        d = found["dir"]
        return sorted([*d.glob("*.safetensors"), d / "config.json"])
    return list(found.values())  # the text file (each part of it) and the mmproj


def _record(name: str, fmt: str, res: dict, paths: list[Path], hashes: "_Hashes") -> dict:
    files = [{"path": str(p), "sha256": hashes(p), "size_bytes": p.stat().st_size} for p in paths]
    size = sum(f["size_bytes"] for f in files)
    basis = "files"
    # Quantized (bnb) or cast (a dtype variant, the reference) at load time: what it occupies is its
    # size. The checkpoint's files would list an fp32 variant of a bf16 checkpoint at half its size,
    # on the Pareto front ahead of bf16.
    if fmt in ("bnb", "hf") and res.get("loaded_bytes"):
        size, basis = res["loaded_bytes"], "loaded weights"
    return {"name": name, "format": fmt, "status": "ok", "runtime": res["runtime"], "files": files,
            "size_bytes": size, "size_basis": basis, "drift": res["drift"], "worst_domain": res["worst_domain"],
            "speed": res["speed"], "unboxed": res.get("unboxed", 0), "seconds": res["seconds"]}  # fmt: skip


class _Hashes:
    """sha256 once per file: the source checkpoint's shards back several variants (and `sha256_of`
    remembers them across runs)."""

    def __init__(self):
        self._seen: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        if path not in self._seen:
            self._seen[path] = sha256_of(path)
        return self._seen[path]


# --------------------------------------------------------------------------- workers


def _common_job(opts: BenchOptions, ckpt, work: Path, threads: int) -> dict:
    from ..calibration import auto_dtype

    ref_dtype = auto_dtype(ckpt) if opts.reference_dtype == "auto" else opts.reference_dtype
    return {
        "model": str(ckpt.path), "device": opts.device, "threads": threads, "reference_dtype": ref_dtype,
        "eval": {"source": opts.eval_source, "items": opts.items, "seed": opts.seed, "domains": opts.domains},
        "ref_dir": str(work / "reference"), "answer_tokens": opts.answer_tokens,
        "speed": vars(opts.speed) if opts.speed else None,
    }  # fmt: skip


def _run_worker(job: dict, work: Path, tag: str) -> dict:
    job_path, out_path = work / f"{tag}.job.json", work / f"{tag}.result.json"
    out_path.unlink(missing_ok=True)  # names that differ only in punctuation share a tag: never read another's result
    atomic_write_text(job_path, json.dumps(job))  # a full disk names the file
    proc = subprocess.run(python_module("qoqopt.bench.worker", str(job_path), str(out_path)),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    # the worker's own warnings (a 16-bit image using 12 bits, an unchecked file) reach the user,
    # each once, without its progress bars' redraws
    for line in dict.fromkeys(ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.startswith("warning: ")):
        print(line, file=sys.stderr)
    if out_path.exists():
        return json.loads(out_path.read_text())
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and "\r" not in ln]
    return {"status": "failed", "error": f"worker died ({how_it_ended(proc.returncode)}){': ' + tail[-1] if tail else ''}"}


# --------------------------------------------------------------------------- helpers


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise QoqoptError("--device cuda: no CUDA GPU is visible to torch here (use --device cpu)")


def _check_answer_room(answer_tokens: int, config) -> None:
    """An --answer-tokens that the largest eval image and its prompt leave no room for: refused
    before the reference pass, not found by the first long chat (transformers and llama.cpp would
    both go on past the positions the model learned)."""
    from ..exports.gguf_meta import train_token_range
    from .gguf_runner import PROMPT_ROOM

    limit, image = config.get_text_config().max_position_embeddings, train_token_range()[1]
    if image + PROMPT_ROOM + answer_tokens > limit:
        most = limit - image - PROMPT_ROOM
        raise QoqoptError(f"--answer-tokens {answer_tokens}: with the largest image ({image} tokens) and its prompt "
                          f"(up to {PROMPT_ROOM}) a chat would pass the model's context of {limit} tokens; "
                          + (f"at most {most}" if most > 0 else "no answer fits"))  # fmt: skip


def _say_gguf_on_cpu(opts: BenchOptions, log) -> None:
    """Under --device cuda, a llama-cpp-python built for the CPU (what PyPI's sdist builds) runs the
    GGUF variants on the CPU: said before the long reference pass, with how to build it for the GPU,
    since their speed is then not comparable with the GPU rows."""
    ggufs = [v.name for v in opts.variants if v.format == "gguf"]
    if opts.device != "cuda" or not ggufs:
        return
    try:
        import llama_cpp

        from ..exports.gguf_runtime import gpu_offload_available
    except Exception:  # not installed, or a GPU build whose CUDA libraries do not load (a RuntimeError)
        return  # the variants fail with their own error
    if not gpu_offload_available():
        log(f"note: {', '.join(ggufs)} will run on the CPU: this llama-cpp-python was built without GPU offload; "
            f'to run GGUF on the GPU, rebuild it: CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall '
            f"--no-cache-dir --no-deps llama-cpp-python=={llama_cpp.__version__}")  # fmt: skip


def _file_name(model: str, label: str) -> str:
    stem = Path(model.rstrip("/")).name or "model"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()[:60]
    return f"bench-{stem}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}.json"
