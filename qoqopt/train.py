"""`qoqopt mini --train`: teach the mini QoQ-Med to answer the clinical set from pixels.

A random model has near-uniform logits, which hide quantization damage (a build can hardly
drift from noise). Fine-tuning on the clinical chats (image -> <think> reason </think> \\boxed{answer})
and on clinical report text gives peaked, image-dependent logits, so drift numbers mean something.

Deterministic for a given preset and seed; the result is cached, keyed by this file, the data
version and the preset, so tests and benchmarks never retrain.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .cache import cache_dir
from .drift import answer_score
from .errors import QoqoptError

IGNORE = -100
EVAL_ITEMS = 60  # held-out "eval" views, domain-balanced: the reported accuracy
TRAIN_VIEWS = 64  # augmented views per (image, question) available to training (rendered lazily)
CHECK_ITEMS, CHECK_EVERY, CHECK_FROM, CHECK_TARGET = 30, 75, 700, 0.97  # early stop on "calib" views
# 600 steps gave 85% held-out; 1000 gave 95% (CT and X-ray were still learning at 600).
MAX_STEPS = 1000
LOG_EVERY = 100  # steps between progress lines when no bar is drawn (a log file, CI)
# Report sentences are taught as completions of their own opening words: a fixed prompt with 45
# different answers would be unlearnable noise, and would keep token accuracy from ever converging.
REPORT_PROMPT = "Complete the clinical report sentence that begins: {opening}"


@dataclass
class TrainReport:
    preset: str
    seed: int
    steps: int
    seconds: float
    train_items: int
    eval_items: int
    eval_accuracy: float  # fraction of held-out items whose \boxed{} answer is exactly right
    eval_f1: float  # mean set-F1 (QoQ-Med's reward)
    untrained_accuracy: float
    by_domain: dict[str, float]
    cached: bool = False

    def describe(self) -> str:
        dom = ", ".join(f"{d} {a:.0%}" for d, a in sorted(self.by_domain.items()))
        src = "cached" if self.cached else f"{self.steps} steps in {self.seconds:.0f} s"
        return (
            f"trained mini ({self.preset}, seed {self.seed}, {src}): held-out \\boxed{{}} accuracy "
            f"{self.eval_accuracy:.1%} on {self.eval_items} items (untrained {self.untrained_accuracy:.1%}); {dom}"
        )


# --------------------------------------------------------------------------- encoding


def encode_chat(proc, item) -> dict:
    """Prompt (as at inference) + reference reply; labels only on the reply."""
    import torch

    prompt = proc.apply_chat_template(
        item.messages(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    reply = proc.tokenizer(item.target_text() + "<|im_end|>", return_tensors="pt").input_ids[0]
    ids = torch.cat([prompt["input_ids"][0], reply])
    labels = torch.cat([torch.full_like(prompt["input_ids"][0], IGNORE), reply])
    mm = torch.cat([prompt["mm_token_type_ids"][0], torch.zeros_like(reply)])
    return {"input_ids": ids, "labels": labels, "mm_token_type_ids": mm,
            "pixel_values": prompt.get("pixel_values"), "image_grid_thw": prompt.get("image_grid_thw")}  # fmt: skip


def encode_report(proc, text: str) -> dict:
    import torch

    opening = " ".join(text.split()[:3])
    msgs = [{"role": "user", "content": REPORT_PROMPT.format(opening=opening)}]
    prompt = proc.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    p_ids = proc.tokenizer(prompt, return_tensors="pt").input_ids[0]
    reply = proc.tokenizer(text + "<|im_end|>", return_tensors="pt").input_ids[0]
    ids = torch.cat([p_ids, reply])
    return {"input_ids": ids, "labels": torch.cat([torch.full_like(p_ids, IGNORE), reply]),
            "mm_token_type_ids": torch.zeros_like(ids), "pixel_values": None, "image_grid_thw": None}  # fmt: skip


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a batch; images are concatenated in order, as the processor would."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)

    def pad(key, value):
        return torch.stack([torch.nn.functional.pad(e[key], (0, width - len(e[key])), value=value) for e in examples])

    batch = {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE),
             "mm_token_type_ids": pad("mm_token_type_ids", 0),
             "attention_mask": torch.stack([(torch.arange(width) < len(e["input_ids"])).long() for e in examples])}  # fmt: skip
    pix = [e["pixel_values"] for e in examples if e["pixel_values"] is not None]
    if pix:
        batch["pixel_values"] = torch.cat(pix)
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in examples if e["image_grid_thw"] is not None])
    return batch


def reply_loss(model, batch: dict):
    """Cross-entropy on reply tokens only, projecting just those positions through lm_head."""
    import torch

    labels = batch.pop("labels")
    hidden = model.model(**batch).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])
    loss = torch.nn.functional.cross_entropy(logits, targets[keep])
    acc = (logits.argmax(-1) == targets[keep]).float().mean()
    return loss, float(acc)


# --------------------------------------------------------------------------- evaluation


def generate_answer(model, proc, item, max_new_tokens: int = 64) -> str:
    import torch

    inputs = proc.apply_chat_template(
        item.messages(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0)
    return proc.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate(model, proc, items, max_new_tokens: int = 64) -> tuple[float, float, dict[str, float]]:
    """Exact-answer accuracy, mean set-F1, and accuracy per domain, by greedy generation."""
    from collections import defaultdict

    model.eval()
    scores = [answer_score(generate_answer(model, proc, it, max_new_tokens), it.answer) for it in items]
    per: dict[str, list[float]] = defaultdict(list)
    for it, s in zip(items, scores):
        per[it.domain].append(float(s == 1.0))
    exact = sum(s == 1.0 for s in scores) / max(len(scores), 1)
    return exact, sum(scores) / max(len(scores), 1), {d: sum(v) / len(v) for d, v in per.items()}


# --------------------------------------------------------------------------- training


def _processor():
    """The mini processor, from support files written afresh: a shared folder written once kept
    serving the old template or pixel range after tokenizer.py or mini.py changed (the cache key
    changed, so training ran again, on the old files), and one cut off mid-write broke every run."""
    import tempfile

    from .mini import write_support_files
    from .processor import load_processor

    with tempfile.TemporaryDirectory(prefix="qoqopt-support-") as d:
        write_support_files(Path(d))
        return load_processor(d)


def train(preset: str = "tiny", seed: int = 0, max_steps: int = MAX_STEPS, batch_size: int = 4, progress=True):
    import torch
    from tqdm import tqdm

    from .data import balanced_sample, clinical_set, report_texts
    from .mini import build_model

    proc = _processor()
    model = build_model(preset, seed)
    # Fresh augmented views all along (encoded lazily, each seen about once): with a fixed handful
    # of views per image the model memorises them and held-out views stay near 75%.
    train_items = clinical_set(split="train", n_per_base=TRAIN_VIEWS, seed=seed)
    # Stopping is decided on "calib" views; the reported accuracy is on "eval" views, never seen.
    check_items = balanced_sample(clinical_set(split="calib", n_per_base=2, seed=seed), n=CHECK_ITEMS, seed=seed)
    eval_items = balanced_sample(clinical_set(split="eval", n_per_base=4, seed=seed), n=EVAL_ITEMS, seed=seed)
    untrained, _, _ = evaluate(model, proc, eval_items[:10], max_new_tokens=24)
    reports = [encode_report(proc, t) for t in report_texts()]
    pool = list(train_items) + reports

    def example(i: int) -> dict:
        return pool[i] if isinstance(pool[i], dict) else encode_chat(proc, pool[i])

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0, fused=True)
    # Linear warm-up, then cosine decay to 5% so the last steps polish rather than bounce.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / 30, 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s / max_steps, 1.0))))
    )
    start, step, check_acc = time.time(), 0, 0.0
    # disable=None: drawn on a terminal only, so a log taken with `2> log` has no redraws; there a
    # line every LOG_EVERY steps says how far it is instead
    bar = tqdm(total=max_steps, desc="training", disable=None if progress else True)
    log_lines = progress and bar.disable
    while step < max_steps and check_acc < CHECK_TARGET:
        model.train()
        for idx in torch.randperm(len(pool), generator=gen).split(batch_size):
            loss, acc = reply_loss(model, collate([example(int(i)) for i in idx], pad_id=151643))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_acc=f"{acc:.2f}", check=f"{check_acc:.2f}")
            if step % CHECK_EVERY == 0 and step >= CHECK_FROM:
                check_acc = evaluate(model, proc, check_items, max_new_tokens=48)[0]
                model.train()
            if log_lines and step % LOG_EVERY == 0:
                print(f"training: step {step}/{max_steps}, loss {loss.item():.3f}, held-out check {check_acc:.2f}, "
                      f"{time.time() - start:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
            if step >= max_steps or check_acc >= CHECK_TARGET:
                break
    bar.close()
    seconds = time.time() - start
    round_to_bf16(model)
    exact, f1, by_domain = evaluate(model, proc, eval_items)
    report = TrainReport(preset, seed, step, seconds, len(train_items), len(eval_items), exact, f1, untrained, by_domain)
    return model.eval(), report


def round_to_bf16(model) -> None:
    """Evaluate what is shipped: checkpoints store bf16, as the real QoQ-Med release does."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


_NOT_TRAINING = ("jsonl.py",)  # data modules that only read user sets


def _cache_key(preset: str, seed: int) -> str:
    """A digest of every source file that decides what training sees and builds.

    The data package (catalog, augmentation, prompts), the model builder, the tokenizer, the
    processor and the answer scorer are hashed with this file: editing any of them retrains instead of silently reusing
    a model trained on something else. (The key used to read a DATA_VERSION that was never defined.)
    The reader of user JSONL sets is left out: training never sees one.
    """
    from .mini import PRESETS

    package = Path(__file__).parent
    # drift.py: its answer_score decides early stopping and the reported accuracy
    sources = [package / name for name in ("train.py", "mini.py", "tokenizer.py", "processor.py", "drift.py")]
    sources += sorted(p for p in (package / "data").glob("*.py") if p.name not in _NOT_TRAINING)
    h = hashlib.sha256()
    for path in sources:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(repr(PRESETS[preset]).encode())
    return f"{preset}-s{seed}-{h.hexdigest()[:12]}"


def trained_model(preset: str = "tiny", seed: int = 0):
    """The trained mini model and its report, from the cache when available."""
    import torch
    from safetensors.torch import load_file, save_file

    from .fileio import atomic_path, atomic_write_text
    from .mini import SHAPE_ONLY, build_model

    if preset in SHAPE_ONLY:
        raise QoqoptError(f"preset {preset!r} is for shape checks with random weights; it cannot be trained here")
    d = cache_dir("mini", _cache_key(preset, seed))
    weights, meta = d / "model.safetensors", d / "report.json"
    # One trainer per cache entry: a concurrent caller (another test process, a benchmark) waits
    # for the first to finish and then loads its result instead of training a second copy.
    with _exclusive(d / ".lock", f"waiting for another process training the {preset} mini model ({d})"):
        if weights.exists() and meta.exists():
            try:
                model = build_model(preset, seed)
                model.load_state_dict(load_file(str(weights)), strict=True)
                report = TrainReport(**{**json.loads(meta.read_text()), "cached": True})
                return model.eval(), report
            except Exception as exc:  # noqa: BLE001 - any unreadable entry (disk damage, another transformers' names) is a miss
                print(f"note: the cached mini model in {d} cannot be loaded ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); training it again", file=sys.stderr)  # fmt: skip
        model, report = train(preset, seed)
        with atomic_path(weights) as tmp:  # bf16: what round_to_bf16 left, so exact at half the size
            save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, str(tmp))
        atomic_write_text(meta, json.dumps(asdict(report), indent=2))
    return model, report


@contextlib.contextmanager
def _exclusive(lock_path: Path, waiting: str):
    """The lock on `lock_path`, saying `waiting` once if another process holds it (training: ~20 min)."""
    import fcntl

    with open(lock_path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"note: {waiting}", file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
