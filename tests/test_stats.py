"""Intervals and paired tests (armu_jax.stats, armu_jax.compare) against exact results: the Wilson
interval's coverage summed over every binomial outcome, McNemar's exact test as scipy's binomial test,
Holm as its definition, and the pooled scores as the reports' means."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from armu_jax import compare, stats


@pytest.mark.parametrize("n", [40, 100, 400])
@pytest.mark.parametrize("p", [0.25, 0.5])
def test_wilson_coverage_is_near_95_percent_exactly(n, p):
    """Exact coverage (no simulation): the binomial probability of every k whose interval holds p."""
    covered = stats.coverage(stats.wilson, n, p)
    print(f"Wilson coverage at n={n}, p={p}: {100 * covered:.2f}%")
    assert 0.92 <= covered <= 0.98
    # the same sum by scipy's binomial pmf: the coverage routine itself is right
    pmf = scipy_stats.binom.pmf(np.arange(n + 1), n, p)
    holds = [stats.wilson(k, n)[0] <= p <= stats.wilson(k, n)[1] for k in range(n + 1)]
    assert covered == pytest.approx(float(pmf[holds].sum()), abs=1e-9)


def test_wilson_matches_its_formula_and_the_normal_interval_undercovers():
    low, high = stats.wilson(10, 40)
    z = stats.Z95
    center = (0.25 + z * z / 80) / (1 + z * z / 40)
    half = z * math.sqrt(0.25 * 0.75 / 40 + z * z / (4 * 40 * 40)) / (1 + z * z / 40)
    assert (low, high) == pytest.approx((center - half, center + half))
    assert stats.wilson(0, 40)[0] == 0.0 and stats.wilson(40, 40)[1] == 1.0

    def normal(k, n):
        q = k / n
        return (q - z * math.sqrt(q * (1 - q) / n), q + z * math.sqrt(q * (1 - q) / n))
    assert stats.coverage(normal, 40, 0.1) < 0.92 < stats.coverage(stats.wilson, 40, 0.1)


def test_paired_identical_is_p_one_and_k_flips_is_mcnemar_exact():
    rng = np.random.default_rng(0)
    a = (rng.random(80) < 0.5).astype(float)
    same = stats.paired(a, a.copy())
    assert same["p"] == 1.0 and same["diff"] == 0.0 and same["test"] == "mcnemar_exact"
    for k in (1, 3, 8, 15):  # flip k of a's right answers to wrong: b = 0, c = k discordant
        b = a.copy()
        right = np.flatnonzero(a == 1)[:k]
        b[right] = 0.0
        got = stats.paired(b, a)
        expected = scipy_stats.binomtest(k, k, 0.5).pvalue  # two-sided binomial(k, 1/2) of 0 vs k
        assert got["p"] == pytest.approx(expected, rel=1e-12)
        assert (got["a_only"], got["b_only"]) == (0, k) and got["diff"] == pytest.approx(-k / 80)
        assert got["ci"][0] <= got["diff"] <= got["ci"][1]
    # discordant both ways: b right-only 4, c right-only 11
    assert stats.mcnemar_exact(4, 11) == pytest.approx(scipy_stats.binomtest(4, 15, 0.5).pvalue, rel=1e-12)
    # the sign-flip test on -1/0/+1 differences is McNemar's exact test again
    d = np.array([1.0] * 4 + [-1.0] * 11 + [0.0] * 30)
    assert stats.sign_flip(d) == pytest.approx(stats.mcnemar_exact(4, 11), rel=1e-9)


def test_holm_step_down():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06 > 0.05: stop), 0.04
    assert stats.holm(p) == [True, False, False, True]
    assert stats.holm_adjusted(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.2]) == [False] and stats.holm_adjusted([0.2]) == [0.2]


def _records(task, correct, start=0):
    return [{"task": task, "doc_id": start + i, "acc": int(c), "acc_norm": int(c)} for i, c in enumerate(correct)]


def test_pooled_score_is_the_mean_of_task_means_and_seeds_average_per_question():
    rng = np.random.default_rng(1)
    big, small = (rng.random(100) < 0.6).astype(int), (rng.random(20) < 0.3).astype(int)
    seed = _records("a", big) + _records("b", small)
    got = compare.score([seed], ["a", "b"])
    assert got["mean"] == pytest.approx((big.mean() + small.mean()) / 2)  # each task weighs the same
    assert got["ci"][0] < got["mean"] < got["ci"][1]
    one = compare.score([seed], ["a"])
    assert one["mean"] == pytest.approx(big.mean()) and one["ci"] == pytest.approx(list(stats.wilson(big.sum(), 100)))
    # three seeds: the mean over seeds; the paired test averages each question over seeds first
    seeds = [_records("a", (rng.random(100) < 0.6).astype(int)) for _ in range(3)]
    three = compare.score(seeds, ["a"])
    assert three["mean"] == pytest.approx(np.mean([[r["acc"] for r in s] for s in seeds]))
    assert three["seeds"] == 3
    versus = compare.paired(seeds, [seed], ["a"])
    per_question = np.mean([[r["acc"] for r in s] for s in seeds], axis=0)
    assert versus["diff"] == pytest.approx(float((per_question - big).mean()))
    assert versus["test"] == "sign_flip" and 0 < versus["p"] <= 1


def test_recovered_fraction_interval_holds_the_point_and_widens_with_noise():
    rng = np.random.default_rng(2)
    n = 200
    original = (rng.random(n) < 0.7).astype(float)
    unlearned = original * (rng.random(n) < 0.4)  # most right answers lost
    attacked = np.where(rng.random(n) < 0.5, original, unlearned)  # about half of them back
    point = (attacked.mean() - unlearned.mean()) / (original.mean() - unlearned.mean())
    low, high = stats.bootstrap_recovered(original, unlearned, attacked)
    assert low < point < high and 0.2 < point < 0.8
    half = slice(0, 50)
    low_small, high_small = stats.bootstrap_recovered(original[half], unlearned[half], attacked[half])
    assert high_small - low_small > high - low  # fewer questions: a wider interval
    assert all(np.isnan(stats.bootstrap_recovered(original, original, original)))  # no gap: undefined


def test_an_nll_has_one_interval_whichever_report_gives_it():
    """The held-out NLL per token of one model on one task: evaluate_tasks' interval (the bootstrap of the ratio
    of summed NLL to summed tokens) and compare.score's (the reports') are the same numbers; a weighted mean
    over several seeds is each resample's ratio too (a text twice as long weighs twice, in every resample)."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(2, 40, 50)
    nll = tokens * rng.uniform(2.0, 4.0, 50)
    records = [{"task": "t", "doc_id": i, "type": "nll", "tokens": int(n), "nll": float(v)}
               for i, (n, v) in enumerate(zip(tokens, nll))]
    evaluated = stats.bootstrap_ratio(nll, tokens)
    reported = compare.score([records], ["t"], "nll")
    assert reported["ci"] == pytest.approx(list(evaluated), rel=1e-12)  # the same resamples, the same ratio
    assert reported["mean"] == pytest.approx(nll.sum() / tokens.sum())
    two = compare.score([records, records], ["t"], "nll")  # two identical seeds: the same ratio, a ratio interval
    assert two["mean"] == pytest.approx(reported["mean"])
    assert two["ci"][0] < reported["mean"] < two["ci"][1]
