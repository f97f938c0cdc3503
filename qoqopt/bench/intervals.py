"""How far a build's mean KLD could move with other chats: a bootstrap over the eval's chats.

llama-perplexity prints mean KLD ± its standard error over positions, as if every token were drawn
apart from the rest. A chat's positions share its image and its reply, so they are not: the chat is
the unit drawn. Each draw takes as many chats as the eval has, with replacement, and pools their
positions as the run does. The pooled mean is a ratio (KLD summed over positions counted), and its
interval is studentized (bootstrap-t on its log, with the delta-method standard error): over 300
simulated evals of 20 chats the draws' own percentiles held the true mean in 266 (89% where 95% is
said), the studentized one in 279 (93%; tests/test_drift.py).

Two builds measured on the same chats are compared on the same draws (a paired bootstrap): where
the chats that are hard for one are hard for the other, their ratio varies less than either mean,
and two builds whose intervals overlap can still be told apart. The ratio's interval is studentized
(bootstrap-t, on the log of the ratio): at 20 chats of simulated equal builds, the percentile
interval missed the true ratio 9.4% of the time where it says 5, and the studentized one 5.6%.
"""

from __future__ import annotations

import numpy as np

DRAWS = 2000
SEED = 0  # the same chats give the same interval, run after run
FLAT = 1e-12  # a spread of chats' shares (each ~1) this small is rounding: the chats agree
# Below this many chats a draw often repeats one chat (no spread: t infinite; 11% of draws at 3
# chats) and bootstrap-t ranges run to infinity: the ratios' own percentiles are given instead
STUDENTIZED_FROM = 8


def chat_totals(per_chat_kld: list[np.ndarray]) -> list[list[float]]:
    """Each chat's [KLD summed over its positions, positions], in eval order: what a result keeps so
    that builds can later be compared chat by chat (numbers only, nothing of the chat itself)."""
    return [[float(k.sum(dtype=np.float64)), int(k.size)] for k in per_chat_kld]


def mean_kld_interval(per_chat_kld: list[np.ndarray], draws: int = DRAWS, seed: int = SEED) -> list[float] | None:
    """[low, high]: a 95% interval of the pooled mean KLD over ``draws`` resamplings of the chats (each
    chat's per-position KLDs), studentized as the ratio's is (the pooled mean is one too: KLD summed
    over positions counted); None with fewer than two chats holding positions, where nothing varies."""
    totals = np.array([t for t in chat_totals(per_chat_kld) if t[1]], dtype=np.float64).reshape(-1, 2)
    if len(totals) < 2:
        return None
    return _ratio_of_sums(totals[:, 1], totals[:, 0], _redraws(len(totals), draws, seed))(0.95)


def kld_ratio_interval(base: list[list[float]], other: list[list[float]], draws: int = DRAWS, seed: int = SEED,
                       level: float = 0.95) -> list[float] | None:  # fmt: skip
    """[low, high]: a ``level`` interval of ``other``'s pooled mean KLD divided by ``base``'s (each a
    :func:`chat_totals` of the same chats, in the same order), studentized over ``draws`` resamplings
    of the chats. None where they cannot be paired (other chats, or fewer than two with positions)
    or where a draw leaves ``base`` with no drift to divide by."""
    interval = _paired(base, other, draws, seed)
    return None if interval is None else interval(level)


def _paired(base: list[list[float]], other: list[list[float]], draws: int, seed: int):
    """:func:`kld_ratio_interval` drawn once, as a function of the level; None where it gives None."""
    a, b = (np.asarray(t, dtype=np.float64).reshape(-1, 2) for t in (base, other))
    if a.shape != b.shape or not np.array_equal(a[:, 1], b[:, 1]):
        return None  # not the same positions: not the same chats
    kept = a[:, 1] > 0
    a, b = a[kept, 0], b[kept, 0]  # over the same positions, the ratio of pooled means is that of the sums
    if len(a) < 2:
        return None
    return _ratio_of_sums(a, b, _redraws(len(a), draws, seed))


def _ratio_of_sums(a: np.ndarray, b: np.ndarray, picks: np.ndarray):
    """A function of the level giving the central interval of sum(b) / sum(a) over the chats, from
    the redraws ``picks`` (rows of chat indexes): bootstrap-t on the log, or the draws' own
    percentiles where that cannot be taken; None where a draw leaves nothing of a to divide by."""
    under, over = a[picks].sum(axis=1), b[picks].sum(axis=1)
    if not np.all(under > 0):
        return None
    if len(a) < STUDENTIZED_FROM or not np.all(over > 0):  # few chats, or drift-free draws (no log)
        return lambda level: _central(over / under, level)
    log_ratio, se = _log_ratio(a, b)
    if se <= FLAT:
        return lambda level: [float(np.exp(log_ratio))] * 2  # every chat at the same ratio: no spread to draw
    drawn, drawn_se = _log_ratio(a[picks], b[picks])
    off = drawn - log_ratio
    t = np.divide(off, drawn_se, out=np.copysign(np.inf, off), where=drawn_se > FLAT)
    t[(drawn_se <= FLAT) & (np.abs(off) <= FLAT)] = 0.0

    def interval(level: float) -> list[float]:
        low_t, high_t = _central(t, level)
        return [float(np.exp(log_ratio - high_t * se)), float(np.exp(log_ratio - low_t * se))]

    return interval


def _log_ratio(a: np.ndarray, b: np.ndarray) -> tuple:
    """log(mean b / mean a) along the last axis, and its delta-method standard error: each chat's
    share of b less its share of a, spread over the chats."""
    mean_a, mean_b = a.mean(axis=-1, keepdims=True), b.mean(axis=-1, keepdims=True)
    shares = b / mean_b - a / mean_a
    se = shares.std(axis=-1, ddof=1) / np.sqrt(a.shape[-1])
    return np.log(mean_b / mean_a)[..., 0], se


def neighbour_ratio_intervals(totals: list, draws: int = DRAWS, seed: int = SEED,
                              level: float = 0.95) -> list[list[float] | None]:  # fmt: skip
    """Each build's :func:`kld_ratio_interval` over the one before it in ``totals`` (each build's
    :func:`chat_totals`), made wider so that all of them hold their true ratios together ``level`` of
    the time (Bonferroni over the k pairs that pair: each is the central 1 - (1 - level) / k). With
    one 95% range a pair, one of three pairs of equal builds read "told apart" in 17% of simulated
    evals of 20 chats; with the joint ranges, in 7% (tests/test_drift.py)."""
    paired = [_paired(a, b, draws, seed) for a, b in zip(totals, totals[1:])]
    each = 1 - (1 - level) / max(sum(p is not None for p in paired), 1)
    return [None if p is None else p(each) for p in paired]


def _redraws(chats: int, draws: int, seed: int) -> np.ndarray:
    """``draws`` rows of ``chats`` chat indexes drawn with replacement."""
    return np.random.default_rng(seed).integers(0, chats, size=(draws, chats))


def _central(values: np.ndarray, level: float = 0.95) -> list[float]:
    """The central ``level`` of ``values``, as order statistics: an infinite t (a draw of one chat
    repeated) is not interpolated with a finite one into NaN."""
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)], method="inverted_cdf")
    return [float(low), float(high)]
