"""How far a compressed build strays from the original, measured the way the field does.

Token-level statistics follow llama-perplexity's KL-divergence mode, computed over the same
token positions of the same chats:
- KLD per position = sum_v p_ref(v) * (log p_ref(v) - log p_cand(v)), full-vocabulary softmax
- mean and 99th-percentile KLD over positions
- same top token %: argmax agreement
- RMS Δp: root mean square of p_cand(t) - p_ref(t) for the observed next token t

Answer-level accuracy reads QoQ-Med's answer format (its prompt asks for the final answer in
`\\boxed{}`): the final answer is the last `\\boxed{...}`, scored by set-F1 over comma-separated
conditions against the reference answer.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class TokenDrift:
    positions: int
    mean_kld: float
    p99_kld: float
    same_top_pct: float
    rms_dp_pct: float

    def as_dict(self) -> dict:
        return asdict(self)


# Rows per block in position_stats: two rows' float64 temporaries (~2.4 MB each at a 152k vocabulary)
# stay in cache. Whole-chat temporaries (~300 MB each) made it 3x slower on 2 cores; 1-32 rows measured.
_BLOCK_ROWS = 2


def position_stats(ref_logits, cand_logits, target_ids=None) -> dict[str, np.ndarray]:
    """Per-position KLD, top-1 agreement and Δp. Inputs are [positions, vocab] logits.

    `target_ids` are the observed next tokens; without them the reference's top token stands in.
    """
    ref = np.asarray(ref_logits)
    cand = np.asarray(cand_logits)
    assert ref.ndim == 2 and ref.shape == cand.shape, f"logit shapes differ: {ref.shape} vs {cand.shape}"
    targets = np.asarray(target_ids) if target_ids is not None else ref.argmax(axis=-1)
    assert targets.shape == (ref.shape[0],), "one target id per position"
    kld, dp = np.empty(ref.shape[0]), np.empty(ref.shape[0])
    for s in range(0, ref.shape[0], _BLOCK_ROWS):
        rows = slice(s, s + _BLOCK_ROWS)
        kld[rows], dp[rows] = _kld_and_dp(ref[rows], cand[rows], targets[rows])
    same = ref.argmax(axis=-1) == cand.argmax(axis=-1)
    return {"kld": kld, "same_top": same, "dp": dp}


def _kld_and_dp(ref: np.ndarray, cand: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KLD and Δp for a block of rows, in float64, with one full-vocabulary softmax instead of two:
    with a, b the max-shifted logits and p = softmax(a), sum p = 1 gives
    KLD = sum p (a - lse(a) - b + lse(b)) = sum p (a - b) - lse(a) + lse(b).
    torch, not numpy: exp is the cost here, and numpy's float64 exp has no AVX2 vector path (half
    torch's speed per thread, measured) and uses one core."""
    import torch

    a = torch.tensor(ref, dtype=torch.float64)  # copies: the caller's arrays stay untouched
    a -= a.amax(dim=-1, keepdim=True)
    b = torch.tensor(cand, dtype=torch.float64)
    b -= b.amax(dim=-1, keepdim=True)
    rows = torch.arange(a.shape[0])
    t = torch.as_tensor(targets, dtype=torch.long)
    a_t, b_t = a[rows, t], b[rows, t]
    lse_b = b.exp().sum(dim=-1).log()  # b's max is 0: no overflow, and the max term keeps the sum >= 1
    torch.sub(a, b, out=b)  # b now holds a - b
    p = a.exp_()  # unnormalised: divided by z below
    z = p.sum(dim=-1)
    lse_a = z.log()
    kld = (p * b).sum(dim=-1) / z - lse_a + lse_b
    dp = (b_t - lse_b).exp() - (a_t - lse_a).exp()
    return kld.clamp_min(0.0).numpy(), dp.numpy()  # clamp float noise below 0


def summarize_positions(stats: dict[str, np.ndarray]) -> TokenDrift:
    kld, same, dp = stats["kld"], stats["same_top"], stats["dp"]
    if kld.size == 0:
        return TokenDrift(0, float("nan"), float("nan"), float("nan"), float("nan"))
    return TokenDrift(
        positions=int(kld.size),
        mean_kld=float(kld.mean()),
        p99_kld=float(np.percentile(kld, 99)),
        same_top_pct=float(100.0 * same.mean()),
        rms_dp_pct=float(100.0 * np.sqrt(np.mean(dp**2))),
    )


def token_drift(ref_logits, cand_logits, target_ids=None) -> TokenDrift:
    return summarize_positions(position_stats(ref_logits, cand_logits, target_ids))


# --------------------------------------------------------------------------- answers


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces balanced; None if absent."""
    start = None
    for m in re.finditer(r"\\boxed\s*\{", text):
        start = m.end()
    if start is None:
        return None
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i].strip()
    return None


# QoQ-Med's reward (its examples/reward_function/medical.py) splits labels on ", ", " and ", " & ",
# "," and "&", so the model writes "Atrial fibrillation and LBBB"; here on every one of them at once
_SEPARATORS = re.compile(r",|&|\s+and\s+", re.IGNORECASE)
_WRAPPED = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")  # \boxed{\text{Head}}
_EDGES = " .:;!?\"'`()[]"  # (Head), "Head", Head.


def _conditions(answer: str) -> set[str]:
    """The labels of one answer, compared case-insensitively, with LaTeX text wrappers, quotes,
    brackets and runs of spaces (a non-breaking one included: NFKC) taken away."""
    text = _WRAPPED.sub(r"\1", unicodedata.normalize("NFKC", answer))
    labels = (" ".join(part.split()).strip(_EDGES).lower() for part in _SEPARATORS.split(text))
    return {label for label in labels if label}


def set_f1(predicted: str | None, reference: str) -> float:
    """F1 between comma-separated condition sets (case-insensitive); 0 when nothing was boxed."""
    if predicted is None:
        return 0.0
    pred, ref = _conditions(predicted), _conditions(reference)
    if not pred or not ref:
        return float(pred == ref)
    hit = len(pred & ref)
    if hit == 0:
        return 0.0
    precision, recall = hit / len(pred), hit / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_score(generated: str, reference: str) -> float:
    return set_f1(extract_boxed(generated), reference)


# --------------------------------------------------------------------------- per-domain report


@dataclass
class DomainDrift:
    domain: str
    items: int
    tokens: TokenDrift | None
    accuracy: float | None  # mean set-F1 of the candidate's answers


def drift_by_domain(records: list[dict]) -> dict[str, DomainDrift]:
    """Aggregate per-item records into per-domain and overall ("all") drift.

    Each record: {"domain", optional "ref_logits"/"cand_logits"/"target_ids", optional "score"}.
    Positions are pooled within a domain (as llama-perplexity pools over chunks).
    """
    return aggregate_items([ItemDrift.from_record(r) for r in records])


@dataclass
class ItemDrift:
    """One chat's per-position statistics (logits already reduced) and its answer score."""

    domain: str
    stats: dict[str, np.ndarray] | None
    score: float | None

    @classmethod
    def from_record(cls, r: dict) -> "ItemDrift":
        stats = position_stats(r["ref_logits"], r["cand_logits"], r.get("target_ids")) if "ref_logits" in r else None
        score = float(r["score"]) if r.get("score") is not None else None
        return cls(r["domain"], stats, score)


def aggregate_items(items: list[ItemDrift]) -> dict[str, DomainDrift]:
    """Pool positions and scores per domain and overall; keeps memory flat for long runs, since
    each chat's vocabulary-wide logits can be dropped once reduced to an ItemDrift."""
    pooled: dict[str, list[dict]] = defaultdict(list)
    scores: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for it in items:
        for key in (it.domain, "all"):
            counts[key] += 1
            if it.stats is not None:
                pooled[key].append(it.stats)
            if it.score is not None:
                scores[key].append(it.score)
    out = {}
    for key in sorted(set(pooled) | set(scores), key=lambda k: (k == "all", k)):
        stats = pooled.get(key)
        tokens = summarize_positions({f: np.concatenate([s[f] for s in stats]) for f in stats[0]}) if stats else None
        acc = float(np.mean(scores[key])) if scores.get(key) else None
        out[key] = DomainDrift(key, counts[key], tokens, acc)
    return out


def worst_domain(report: dict[str, DomainDrift]) -> str | None:
    """The domain with the highest mean KLD (the one a user of that modality should worry about)."""
    scored = [(d.tokens.mean_kld, k) for k, d in report.items() if k != "all" and d.tokens and d.tokens.positions]
    return max(scored)[1] if scored else None
