"""Clinical items (image + QoQ-Med-style question + reference answer), splits and balanced sampling.

Splits differ only in augmentation seeds: "train" views teach the mini model, "calib" views feed
quantization statistics, "eval" views are held out. A split's name is part of every seed, so an
eval image is never a train image, while all splits share the same labelled base images.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import numpy as np
from PIL import Image

from qoqopt.data import catalog
from qoqopt.data.augment import DEFAULT_MAX_SIDE, augment, draw_params, fit_size
from qoqopt.data.domains import BUILTIN_DOMAINS, DOMAINS, SPLITS
from qoqopt.data.prompts import QUESTION_TYPES, format_question, reason_for, target_text
from qoqopt.errors import QoqoptError

# Each split draws from its own seed stream; these numbers only need to differ.
_SPLIT_CODES = {"train": 1, "calib": 2, "eval": 3}


@dataclass(eq=False)
class ClinicalItem:
    """One question about one image. `image` is produced on access (and not kept, so memory stays flat)."""

    id: str
    domain: str
    question: str  # the full user text, format instruction included
    answer: str  # reference answer; several labels are comma-separated
    choices: list[str]
    source: str  # the file the image comes from
    ecg_signal: np.ndarray | None = None  # (8, 2500) mV for ECG items: QoQ-Med's ECG-encoder input
    meta: dict = field(default_factory=dict)
    image_fn: Callable[[], Image.Image] | None = field(default=None, repr=False)

    @property
    def image(self) -> Image.Image:
        if self.image_fn is None:
            raise QoqoptError(f"item {self.id} has no image")
        return self.image_fn()

    def materialized(self) -> "ClinicalItem":
        """The same item with its image rendered once and kept: for short eval sets that read each
        image several times (prompt encoding, generation, llama.cpp), not for training streams."""
        image = self.image
        return replace(self, image_fn=lambda: image)

    @property
    def answers(self) -> list[str]:
        return [a.strip() for a in self.answer.split(",") if a.strip()]

    def messages(self) -> list[dict]:
        """HF chat messages for ``processor.apply_chat_template``: the image, then the question."""
        return [
            {
                "role": "user",
                "content": [{"type": "image", "image": self.image}, {"type": "text", "text": self.question}],
            }
        ]

    def target_text(self) -> str:
        """Reference assistant reply: one reasoning sentence in <think>, the answer in \\boxed{}."""
        reason = self.meta.get("reason") or reason_for(self.meta.get("qtype", ""), self.answer, self.meta)
        return target_text(self.answer, reason)


def clinical_set(
    split: str = "eval",
    n_per_base: int = 4,
    seed: int = 0,
    max_side: int = DEFAULT_MAX_SIDE,
    domains: list[str] | tuple[str, ...] | None = None,
) -> list[ClinicalItem]:
    """The built-in set: every (base image, question type) pair, `n_per_base` augmented views each."""
    if split not in SPLITS:
        raise QoqoptError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if n_per_base < 1:
        raise QoqoptError(f"n_per_base must be at least 1, got {n_per_base}")
    wanted = set(domains or BUILTIN_DOMAINS)
    unknown = wanted - set(BUILTIN_DOMAINS)
    if unknown:
        raise QoqoptError(f"no built-in data for domain(s) {', '.join(sorted(unknown))}")
    return [
        make_item(view, qtype, split, k, seed, max_side)
        for view in catalog.views()
        if view.source.domain in wanted
        for qtype in view.qtypes
        for k in range(n_per_base)
    ]


def make_item(view: catalog.View, qtype: str, split: str, k: int, seed: int, max_side: int) -> ClinicalItem:
    src = view.source
    q = QUESTION_TYPES[qtype]
    answer = view.labels[qtype]
    params = draw_params(_rng(seed, split, view.key, qtype, k), catalog.limits_for(src))
    meta = {"qtype": qtype, "view": view.key, "split": split, "k": k, "seed": seed, "augment": params.as_dict()}
    if view.frame is not None:
        meta["frame"] = view.frame
    if view.window is not None:
        meta["window"] = list(view.window)
    signal = None
    if src.domain == "ecg":
        facts = catalog.ecg_facts()
        signal = facts["signal"]
        meta.update(heart_rate_bpm=round(facts["heart_rate_bpm"], 1), statements=list(facts["statements"]))
    return ClinicalItem(
        id=f"{view.key}.{qtype}.{split}-{k}",
        domain=src.domain,
        question=format_question(src.domain, q.ask, q.choices, q.domain_neutral),
        answer=answer,
        choices=list(q.choices),
        source=catalog.source_path(src.file),
        ecg_signal=signal,
        meta=meta,
        image_fn=partial(_render, view.key, params, max_side),
    )


def _render(view_key: str, params, max_side: int) -> Image.Image:
    view = catalog.view_by_key(view_key)
    # Work from a copy ~1.25x the output: the crop then samples about one input pixel per output pixel.
    base = catalog.base_image(view_key, int(round(1.25 * max_side)))
    size = fit_size(base.width, base.height, max_side)
    return augment(base, params, size, catalog.limits_for(view.source).fill)


def _rng(seed: int, split: str, view_key: str, qtype: str, k: int) -> np.random.Generator:
    """A generator that depends on exactly these five things (crc32 is stable across runs, hash() is not)."""
    tag = zlib.crc32(f"{view_key}.{qtype}".encode())
    return np.random.default_rng([seed, _SPLIT_CODES[split], tag, k])


def find_item(item_id: str, seed: int = 0, max_side: int = DEFAULT_MAX_SIDE) -> ClinicalItem:
    """Rebuild one built-in item from its id ("<view>.<question type>.<split>-<k>")."""
    try:
        view_key, qtype, tail = item_id.rsplit(".", 2)
        split, k = tail.rsplit("-", 1)
        k_int = int(k)
    except ValueError:
        raise QoqoptError(f"malformed item id {item_id!r}; expected <view>.<question>.<split>-<n>") from None
    view = catalog.view_by_key(view_key)
    if qtype not in view.qtypes or split not in SPLITS or k_int < 0:
        raise QoqoptError(f"no built-in item {item_id!r}")
    return make_item(view, qtype, split, k_int, seed, max_side)


def balanced_sample(items: list[ClinicalItem], n: int, seed: int = 0) -> list[ClinicalItem]:
    """Up to `n` items taken round-robin across domains, so rare domains weigh as much as common ones.

    Within a domain the order is a seeded shuffle; the domain order is reshuffled every round so
    that when `n` is not a multiple of the domain count no domain is always the one left out.
    """
    rng = np.random.default_rng(seed)
    by_domain: dict[str, list[ClinicalItem]] = defaultdict(list)
    for item in items:
        by_domain[item.domain].append(item)
    queues = {d: [group[i] for i in rng.permutation(len(group))] for d, group in sorted(by_domain.items())}
    out: list[ClinicalItem] = []
    while len(out) < n and any(queues.values()):
        for d in rng.permutation(sorted(queues)):
            if queues[d] and len(out) < n:
                out.append(queues[d].pop())
    return out


def domain_counts(items: list[ClinicalItem]) -> dict[str, int]:
    counts = {d: 0 for d in DOMAINS}
    for item in items:
        counts[item.domain] = counts.get(item.domain, 0) + 1
    return {d: c for d, c in counts.items() if c}
