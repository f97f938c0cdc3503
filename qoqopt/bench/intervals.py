"""How far a build's mean KLD could move with other chats: a bootstrap over the eval's chats.

llama-perplexity prints mean KLD ± its standard error over positions, as if every token were drawn
apart from the rest. A chat's positions share its image and its reply, so they are not: the chat is
the unit drawn. Each draw takes as many chats as the eval has, with replacement, and pools their
positions as the run does; the interval is the 2.5th to 97.5th percentile of the draws' means.
"""

from __future__ import annotations

import numpy as np

DRAWS = 2000
SEED = 0  # the same chats give the same interval, run after run


def mean_kld_interval(per_chat_kld: list[np.ndarray], draws: int = DRAWS, seed: int = SEED) -> list[float] | None:
    """[low, high] of the pooled mean KLD over ``draws`` resamplings of the chats (each chat's
    per-position KLDs); None with fewer than two chats holding positions, where nothing varies."""
    chats = [k for k in per_chat_kld if k.size]
    if len(chats) < 2:
        return None
    sums = np.array([k.sum(dtype=np.float64) for k in chats])
    sizes = np.array([k.size for k in chats], dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(chats), size=(draws, len(chats)))
    means = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]
