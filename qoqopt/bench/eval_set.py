"""The chats every variant is measured on, and the reference's logits stored between processes.

The reference (the source checkpoint in transformers, fp32 compute by default) is run once; its
next-token logits at the reply positions of each chat are kept as plain .npy files (never pickles)
beside a chats.json, so each variant's child process can compare against them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import QoqoptError


def builtin_scans() -> dict[str, int]:
    """Distinct source files of the built-in set, by domain: its splits are seeded views of these same
    scans, so its eval chats are held-out views, not held-out patients."""
    from ..data.catalog import SOURCES

    files: dict[str, set] = {}
    for source in SOURCES:
        files.setdefault(source.domain, set()).add(source.file)
    return {domain: len(names) for domain, names in files.items()}


def eval_items(source: str, n: int, seed: int = 0, render: bool = True, domains: list[str] | None = None):
    """Domain-balanced held-out chats: the built-in clinical "eval" split, or a user JSONL set, of
    ``domains`` only when given. Each image is rendered once here (``render``): every variant reads
    it for encoding, generation and speed probes. Without ``render`` the items are only chosen and
    validated."""
    from ..data import balanced_sample, clinical_set, domain_counts, load_jsonl

    if n < 1:
        raise QoqoptError("--items must be at least 1")
    # The same pool `qoqopt mini --train` reports its held-out accuracy on (never trained on).
    pool = clinical_set(split="eval", n_per_base=4, seed=seed) if source == "clinical" else load_jsonl(source)
    if domains:
        have = domain_counts(pool)
        absent = [d for d in domains if d not in have]
        if absent:
            raise QoqoptError(f"--domain {absent[0]}: the {source} eval set has no items of it (it has: {', '.join(have)})")
        pool = [item for item in pool if item.domain in domains]
    chosen = balanced_sample(pool, n, seed=seed)
    return [item.materialized() for item in chosen] if render else chosen


def save_reference(folder: Path, chats: list[dict]) -> None:
    """chats: dicts with id, domain, answer, prompt, reply_ids, image_tokens, ref_logits, [score]."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = []
    for i, chat in enumerate(chats):
        np.save(folder / f"ref-{i:04d}.npy", np.asarray(chat["ref_logits"], dtype=np.float32), allow_pickle=False)
        meta.append({k: v for k, v in chat.items() if k != "ref_logits"})
    (folder / "chats.json").write_text(json.dumps(meta, indent=1))


def load_reference(folder: Path) -> list[dict]:
    meta = json.loads((folder / "chats.json").read_text())
    return [{**m, "ref_logits_path": folder / f"ref-{i:04d}.npy"} for i, m in enumerate(meta)]


def ref_logits(chat: dict) -> np.ndarray:
    return np.load(chat["ref_logits_path"], allow_pickle=False)
