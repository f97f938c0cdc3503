"""Drift statistics against hand-computed values (llama-perplexity definitions)."""

import math

import numpy as np
import pytest

from qoqopt.drift import answer_score, drift_by_domain, extract_boxed, position_stats, set_f1, token_drift, worst_domain


def test_identical_logits_give_zero_kld_and_full_agreement():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 1000))
    d = token_drift(logits, logits.copy())
    assert d.positions == 50
    assert d.mean_kld == pytest.approx(0.0, abs=1e-12)
    assert d.p99_kld == pytest.approx(0.0, abs=1e-12)
    assert d.same_top_pct == 100.0
    assert d.rms_dp_pct == pytest.approx(0.0, abs=1e-12)


def test_constant_logit_shift_is_not_drift():
    logits = np.random.default_rng(1).normal(size=(10, 32))
    assert token_drift(logits, logits + 7.5).mean_kld == pytest.approx(0.0, abs=1e-12)


def test_known_two_token_shift():
    # p = (1/2, 1/2), q = (3/4, 1/4): KL(p||q) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    ref = np.array([[0.0, 0.0]])
    cand = np.array([[math.log(3.0), 0.0]])
    d = token_drift(ref, cand, target_ids=[1])
    assert d.mean_kld == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    # Δp for the observed token 1: 1/4 - 1/2
    assert d.rms_dp_pct == pytest.approx(25.0, rel=1e-12)
    # argmax of (0,0) is token 0, candidate's is token 0 too
    assert d.same_top_pct == 100.0


def test_position_stats_match_torch_across_row_blocks():
    """Against torch's own log_softmax and kl_div in float64: float32 logits at a 152k vocabulary
    (Qwen2's), 19 positions (blocks cut mid-way), peaked rows as in confident answers, and
    candidates from near-identical to far off."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    ref = (4 * rng.standard_normal((19, 151_936))).astype(np.float32)
    ref[::3, 7] += 40.0  # p(top) ~ 1: the KLD lives in the tail
    scale = np.logspace(-4, 0, 19, dtype=np.float32)[:, None]
    cand = ref + scale * rng.standard_normal(ref.shape).astype(np.float32)
    targets = rng.integers(0, ref.shape[1], 19)
    got = position_stats(ref, cand, targets)
    lp_ref, lp_cand = F.log_softmax(torch.from_numpy(ref).double(), -1), F.log_softmax(torch.from_numpy(cand).double(), -1)
    kld = F.kl_div(lp_cand, lp_ref, log_target=True, reduction="none").sum(-1).numpy()
    rows = np.arange(19)
    dp = (lp_cand.exp() - lp_ref.exp()).numpy()[rows, targets]
    np.testing.assert_allclose(got["kld"], kld, rtol=1e-7, atol=1e-13)  # float64 round-off in both
    np.testing.assert_allclose(got["dp"], dp, rtol=1e-7, atol=1e-13)
    assert (got["same_top"] == (ref.argmax(-1) == cand.argmax(-1))).all()
    assert kld.min() < 1e-6 < 1e-2 < kld.max()  # the range really spans small and large drift
    # the summary over positions: numpy's mean and (linear) 99th percentile of torch's 19 distinct
    # values, where 98 equal values would let max or any percentile method pass (helper-66)
    d = token_drift(ref, cand, targets)
    assert d.mean_kld == pytest.approx(kld.mean(), rel=1e-7) and d.p99_kld == pytest.approx(np.percentile(kld, 99), rel=1e-7)
    assert d.p99_kld < kld.max() and d.positions == 19
    assert d.rms_dp_pct == pytest.approx(100 * np.sqrt(np.mean(dp**2)), rel=1e-7)
    assert d.same_top_pct == pytest.approx(100 * np.mean(ref.argmax(-1) == cand.argmax(-1)))


def test_p99_and_top1_over_positions():
    # 100 positions: 98 identical, 2 with a flipped top token of known KLD
    ref = np.zeros((100, 2))
    ref[:, 0] = math.log(9.0)  # p = (0.9, 0.1)
    cand = ref.copy()
    cand[:2] = [0.0, math.log(9.0)]  # q = (0.1, 0.9)
    d = token_drift(ref, cand)
    k = 0.9 * math.log(9) + 0.1 * math.log(1 / 9)  # KL((.9,.1)||(.1,.9))
    assert d.mean_kld == pytest.approx(2 * k / 100, rel=1e-9)
    assert d.same_top_pct == pytest.approx(98.0)
    # numpy's linear-interpolated 99th percentile of 98 zeros and 2 values k: position 98.01
    assert d.p99_kld == pytest.approx(k, rel=1e-9)
    # Δp of the reference's top token: 0.1 - 0.9 at the 2 flipped positions, 0 at the other 98 (a
    # mean |Δp| would give 1.6%)
    assert d.rms_dp_pct == pytest.approx(100 * math.sqrt(2 * 0.8**2 / 100), rel=1e-9)


def test_boxed_extraction():
    assert extract_boxed(r"<think>x</think> \boxed{CT}") == "CT"
    assert extract_boxed(r"\boxed{A} then \boxed{ Chest, Abdomen }") == "Chest, Abdomen"
    assert extract_boxed(r"\boxed{\text{MRI}}") == r"\text{MRI}"
    assert extract_boxed("no answer here") is None
    assert extract_boxed(r"\boxed{unclosed") is None


@pytest.mark.parametrize("boxed, reference, score", [
    # QoQ-Med's own reward splits labels on ", ", " and ", " & ", "," and "&" (medical.py parse_conditions)
    (r"\boxed{Head and Chest}", "Head, Chest", 1.0),
    (r"\boxed{Atrial fibrillation & LBBB}", "LBBB, Atrial fibrillation", 1.0),
    (r"\boxed{Chest AND Abdomen}", "Chest", pytest.approx(2 / 3)),
    # the ways a right answer was scored 0: LaTeX text, brackets and quotes, spacing
    (r"\boxed{\text{Head}}", "Head", 1.0),
    (r"\boxed{(Head)}", "Head", 1.0),
    (r'\boxed{"Head"}', "Head", 1.0),
    (r"\boxed{Atrial  fibrillation}", "Atrial fibrillation", 1.0),
    ("\\boxed{Sinus\u00a0rhythm}", "Sinus rhythm", 1.0),
    # and what stays wrong
    (r"\boxed{Handedness}", "Hand", 0.0),
    (r"\boxed{}", "Head", 0.0),
])
def test_answers_are_read_as_qoq_med_writes_them(boxed, reference, score):
    assert answer_score(f"<think>..</think>{boxed}", reference) == score


def test_set_f1_of_boxed_condition_sets():
    """F1 = 2PR / (P + R) over the sets of comma-separated conditions, worked by hand."""
    assert set_f1("Chest", "chest") == 1.0
    assert set_f1("Chest, Abdomen", "Chest") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert set_f1("Knee", "Chest") == 0.0
    assert set_f1(None, "Chest") == 0.0
    assert answer_score(r"<think>..</think>\boxed{CT, MRI}", "MRI, CT") == 1.0


def test_per_domain_report_pools_positions_and_names_worst():
    """"all" is the mean over every position of every chat (torch's kl_div over the concatenation),
    not the mean of the domains' means: with 3 CT positions and 5 ECG ones the two differ."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    ref_ct, ref_ecg = rng.standard_normal((3, 6)), rng.standard_normal((5, 6))
    cand_ct, cand_ecg = ref_ct + 0.1 * rng.standard_normal((3, 6)), ref_ecg + rng.standard_normal((5, 6))
    recs = [
        {"domain": "ct", "ref_logits": ref_ct, "cand_logits": cand_ct, "score": 1.0},
        {"domain": "ecg", "ref_logits": ref_ecg, "cand_logits": cand_ecg, "score": 0.0},
    ]
    rep = drift_by_domain(recs)
    assert set(rep) == {"ct", "ecg", "all"}

    def kl(ref, cand):
        lp_ref, lp_cand = F.log_softmax(torch.from_numpy(ref), -1), F.log_softmax(torch.from_numpy(cand), -1)
        return F.kl_div(lp_cand, lp_ref, log_target=True, reduction="none").sum(-1).numpy()

    per_ct, per_ecg = kl(ref_ct, cand_ct), kl(ref_ecg, cand_ecg)
    assert rep["ct"].tokens.mean_kld == pytest.approx(per_ct.mean(), rel=1e-9)
    assert rep["all"].tokens.positions == 8
    pooled = np.concatenate([per_ct, per_ecg]).mean()
    assert rep["all"].tokens.mean_kld == pytest.approx(pooled, rel=1e-9)
    assert abs(pooled - (per_ct.mean() + per_ecg.mean()) / 2) > 0.1 * pooled  # the two readings really differ here
    assert rep["all"].accuracy == 0.5
    assert worst_domain(rep) == "ecg"


def test_the_mean_klds_interval_covers_the_true_mean_as_a_95_percent_interval_should():
    """bench's mean KLD came as a point alone: 4.818e-6 against 4.84e-6 decided a Pareto star. The
    interval redraws chats (positions within a chat share its image and reply), so over many evals of
    chats drawn from one known distribution it holds the distribution's true pooled mean in about 95%
    of them (20 chats are few: 0.91..0.985 is asked; the draws' own percentiles, the interval before
    it was studentized, held it in 266 of these 300, 0.89), and widens when the chats disagree more."""
    from qoqopt.bench.intervals import mean_kld_interval

    rng = np.random.default_rng(1)
    true_mean, hits, widths = 2e-5, 0, []
    for _ in range(300):
        # 20 chats of 10..40 positions; each chat's own level varies (its image), its positions around it
        levels = rng.gamma(2.0, true_mean / 2.0, size=20)
        chats = [rng.exponential(level, size=rng.integers(10, 41)) for level in levels]
        low, high = mean_kld_interval(chats, draws=500, seed=int(rng.integers(1 << 30)))
        hits += low <= true_mean <= high
        widths.append(high - low)
    assert 0.91 <= hits / 300 <= 0.985, hits
    one = [np.full(25, 3e-5)] * 20  # chats that agree: nothing to draw differently
    assert mean_kld_interval(one) == pytest.approx([3e-5, 3e-5])
    assert mean_kld_interval([np.full(25, 3e-5)]) is None and mean_kld_interval([np.ones(3), np.ones(0)]) is None
    levels = rng.uniform(1e-5, 2e-5, size=20)  # chats twice as far from their mean: an interval twice as wide
    apart = levels.mean() + 2 * (levels - levels.mean())
    (low, high), (low2, high2) = (mean_kld_interval([np.full(25, x) for x in v]) for v in (levels, apart))
    assert high2 - low2 == pytest.approx(2 * (high - low), rel=0.03)  # about: studentized on the log scale


def test_the_paired_ratio_interval_covers_the_true_ratio_and_tells_apart_what_overlapping_ranges_cannot():
    """Two builds measured on the same chats: a chat that is hard for one is hard for the other. Over
    300 simulated evals of 20 chats, where build B's positions drift 0.8x build A's around each chat's
    own level, the paired interval of B's pooled mean over A's holds the true 0.8 95% of the time
    (285 of 300; a percentile interval held it in 275, 0.92, short of what it says), and tells the
    builds apart (wholly under 1) in most evals where their own 95% intervals overlap: the per-build
    ranges could not."""
    from qoqopt.bench.intervals import chat_totals, kld_ratio_interval, mean_kld_interval

    rng, ratio = np.random.default_rng(2), 0.8
    hits = told = overlap = 0
    for _ in range(300):
        levels, sizes = rng.gamma(2.0, 1e-5, size=20), rng.integers(10, 41, size=20)
        a = [rng.exponential(level, size=n) for level, n in zip(levels, sizes)]
        b = [rng.exponential(ratio * level, size=n) for level, n in zip(levels, sizes)]
        seed = int(rng.integers(1 << 30))
        low, high = kld_ratio_interval(chat_totals(a), chat_totals(b), draws=500, seed=seed)
        hits += low <= ratio <= high
        (la, ha), (lb, hb) = mean_kld_interval(a, 500, seed), mean_kld_interval(b, 500, seed)
        both_overlap = lb <= ha and la <= hb
        overlap += both_overlap
        told += both_overlap and high < 1
    assert 0.93 <= hits / 300 <= 0.985, hits
    assert overlap >= 250 and told >= 0.7 * overlap, (overlap, told)
    chats = [rng.exponential(1e-5, size=n) for n in (12, 30, 7)]
    assert kld_ratio_interval(chat_totals(chats), chat_totals([2 * c for c in chats])) == pytest.approx([2, 2])
    many = [rng.exponential(1e-5, size=n) for n in range(5, 17)]  # bootstrap-t's chat count: no spread to draw
    assert kld_ratio_interval(chat_totals(many), chat_totals([2 * c for c in many])) == pytest.approx([2, 2])
    # not the same chats (positions differ), one chat, or a base with no drift: no ratio to give
    assert kld_ratio_interval(chat_totals(chats), chat_totals([c[:-1] for c in chats])) is None
    assert kld_ratio_interval(chat_totals(chats[:1]), chat_totals(chats[:1])) is None
    assert kld_ratio_interval(chat_totals([0 * c for c in chats]), chat_totals(chats)) is None


def test_the_neighbour_ratios_are_told_apart_by_chance_at_most_5_percent_of_the_time_together():
    """Four builds of equal drift (each chat's positions drawn around the same level for all four):
    a "told apart" in any of the report's three neighbour pairs is chance. Over 300 simulated evals
    of 20 chats, one 95% range a pair reads one such "yes" in 50 (17%); the joint ranges (Bonferroni
    over the pairs) in 21 (7%: 20 chats are few), and they still tell apart a build at 0.6x its
    neighbour's drift in 292. A pair that cannot be paired widens no other."""
    from qoqopt.bench.intervals import chat_totals, kld_ratio_interval, neighbour_ratio_intervals

    rng = np.random.default_rng(5)
    alone = joint = told = 0
    for _ in range(300):
        levels, sizes = rng.gamma(2.0, 1e-5, size=20), rng.integers(10, 41, size=20)
        builds = [chat_totals([rng.exponential(level, size=n) for level, n in zip(levels, sizes)]) for _ in range(4)]
        seed = int(rng.integers(1 << 30))
        each = [kld_ratio_interval(a, b, 1000, seed) for a, b in zip(builds, builds[1:])]
        both = neighbour_ratio_intervals(builds, 1000, seed)
        alone += any(not lo <= 1 <= hi for lo, hi in each)
        joint += any(not lo <= 1 <= hi for lo, hi in both)
        better = chat_totals([rng.exponential(0.6 * level, size=n) for level, n in zip(levels, sizes)])
        told += neighbour_ratio_intervals([*builds[:3], better], 1000, seed)[2][1] < 1
    assert alone / 300 >= 0.12 and joint / 300 <= 0.09 and joint < alone / 2, (alone, joint)
    assert told / 300 >= 0.9, told
    other = [[[s, n + 1] for s, n in b] for b in builds[1:3]]  # other chats than builds[0]'s: no ratio to it
    assert neighbour_ratio_intervals([builds[0], *other], 1000, 3) == [None, kld_ratio_interval(*other, 1000, 3)]
