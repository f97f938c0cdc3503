"""How far a build's mean KLD could move with other chats: a bootstrap over the eval's chats.

llama-perplexity prints mean KLD ± its standard error over positions, as if every token were drawn
apart from the rest. A chat's positions share its image and its reply, so they are not: the chat is
the unit drawn. Each draw takes as many chats as the eval has, with replacement, and pools their
positions as the run does; the interval is the 2.5th to 97.5th percentile of the draws' means.

Two builds measured on the same chats are compared on the same draws (a paired bootstrap): where
the chats that are hard for one are hard for the other, their ratio varies less than either mean,
and two builds whose intervals overlap can still be told apart.
"""

from __future__ import annotations

import numpy as np

DRAWS = 2000
SEED = 0  # the same chats give the same interval, run after run


def chat_totals(per_chat_kld: list[np.ndarray]) -> list[list[float]]:
    """Each chat's [KLD summed over its positions, positions], in eval order: what a result keeps so
    that builds can later be compared chat by chat (numbers only, nothing of the chat itself)."""
    return [[float(k.sum(dtype=np.float64)), int(k.size)] for k in per_chat_kld]


def mean_kld_interval(per_chat_kld: list[np.ndarray], draws: int = DRAWS, seed: int = SEED) -> list[float] | None:
    """[low, high] of the pooled mean KLD over ``draws`` resamplings of the chats (each chat's
    per-position KLDs); None with fewer than two chats holding positions, where nothing varies."""
    totals = np.array([t for t in chat_totals(per_chat_kld) if t[1]], dtype=np.float64).reshape(-1, 2)
    if len(totals) < 2:
        return None
    picks = _redraws(len(totals), draws, seed)
    return _percentiles(_pooled(totals, picks))


def kld_ratio_interval(base: list[list[float]], other: list[list[float]], draws: int = DRAWS,
                       seed: int = SEED) -> list[float] | None:
    """[low, high] of ``other``'s pooled mean KLD divided by ``base``'s, both pooled over the same
    ``draws`` resamplings of their chats (:func:`chat_totals` of each, same chats in the same order).
    None where they cannot be paired (other chats, or fewer than two with positions) or where a draw
    leaves ``base`` with no drift to divide by."""
    a, b = (np.asarray(t, dtype=np.float64).reshape(-1, 2) for t in (base, other))
    if a.shape != b.shape or not np.array_equal(a[:, 1], b[:, 1]):
        return None  # not the same positions: not the same chats
    kept = a[:, 1] > 0
    a, b = a[kept], b[kept]
    if len(a) < 2:
        return None
    picks = _redraws(len(a), draws, seed)
    under = _pooled(a, picks)
    if not np.all(under > 0):
        return None
    return _percentiles(_pooled(b, picks) / under)


def _redraws(chats: int, draws: int, seed: int) -> np.ndarray:
    """``draws`` rows of ``chats`` chat indexes drawn with replacement."""
    return np.random.default_rng(seed).integers(0, chats, size=(draws, chats))


def _pooled(totals: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """Each draw's mean KLD over the positions of the chats it drew."""
    return totals[picks, 0].sum(axis=1) / totals[picks, 1].sum(axis=1)


def _percentiles(values: np.ndarray) -> list[float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]
