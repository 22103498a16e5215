"""Intervals and paired tests for every number the tool reports.

- Accuracy of one model on n questions: the Wilson score interval (95%), from the count of correct
  answers alone (`wilson`). Its coverage is computed exactly in the tests (the binomial summed over
  every outcome): 92-98% at n = 40, 100, 400 and p = 0.25, 0.5, where the normal interval undercovers.
- Held-out NLL per token over texts: a percentile bootstrap over texts of the ratio
  sum(NLL) / sum(tokens) (`bootstrap_ratio`), the estimator the evaluator reports.
- K seeds x n questions (a mean over seeds): a two-way percentile bootstrap, seeds and questions
  resampled independently (`bootstrap_seeds`): the interval carries the spread between seeds as well
  as the sampling of questions. With one seed it is the question bootstrap.
- Two models on the same questions (`paired`): the difference of their per-question scores. With
  0/1 scores (one seed) the test is McNemar's exact test (the two-sided binomial test on the b + c
  discordant questions); with scores averaged over seeds (k/K) the sign-flip permutation test of the
  mean difference, which is McNemar's exact test again when every difference is -1, 0 or +1. Exact
  enumeration up to 20 non-zero differences, else 20,000 seeded sign flips. The interval is the
  paired percentile bootstrap over questions.
- A recovered fraction (attacked - unlearned) / (original - unlearned): the bootstrap over questions,
  the three models' scores resampled together (`bootstrap_recovered`).
- Several layers tested at once: Holm's step-down correction (`holm`).

Every bootstrap uses a fixed seed (the numbers are reproducible run to run) and B = 2,000 resamples.
"""
from __future__ import annotations

import math
from itertools import product

import numpy as np

Z95 = 1.959963984540054  # the 97.5% point of the standard normal
RESAMPLES = 2000
SEED = 20260101
LEVEL = 0.95


def wilson(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct / n (95% by default)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = correct / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, center - half), min(1.0, center + half))


def coverage(interval, n: int, p: float) -> float:
    """The exact coverage of interval(k, n) -> (low, high) for a binomial(n, p) count: the probability,
    summed over every outcome k, that the interval holds p."""
    total = 0.0
    for k in range(n + 1):
        low, high = interval(k, n)
        if low <= p <= high:
            total += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
    return total


def _percentiles(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return (float(low), float(high))


def _rng(seed: int = SEED) -> np.random.Generator:
    return np.random.default_rng(seed)


def bootstrap_mean(values, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of values (resampled with replacement)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    index = _rng(seed).integers(0, values.size, (resamples, values.size))
    return _percentiles(values[index].mean(axis=1))


def bootstrap_ratio(numerators, denominators, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(numerators) / sum(denominators), items resampled together
    (NLL per token: each text's summed NLL over its token count)."""
    num, den = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
    if num.size == 0:
        return (float("nan"), float("nan"))
    index = _rng(seed).integers(0, num.size, (resamples, num.size))
    return _percentiles(num[index].sum(axis=1) / den[index].sum(axis=1))


def bootstrap_seeds(scores, weights=None, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Two-way percentile bootstrap of the mean of scores [K seeds, n questions], weighted by per-question
    weights if given (each resample's sum(w s) / sum(w) over the questions drawn, the weights drawn with their
    questions): seeds and questions resampled independently. One seed: the question bootstrap, which for
    weighted scores is bootstrap_ratio's (an NLL per token has one interval, whichever report gives it)."""
    scores = np.atleast_2d(np.asarray(scores, np.float64))
    k, n = scores.shape
    if n == 0:
        return (float("nan"), float("nan"))
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    if k == 1 and weights is not None:
        return bootstrap_ratio(scores[0] * w, w, resamples, seed)
    rng = _rng(seed)
    means = np.empty(resamples)
    for b in range(resamples):
        seeds = rng.integers(0, k, k) if k > 1 else np.zeros(1, int)
        drawn = rng.integers(0, n, n)
        means[b] = (scores[seeds][:, drawn] * w[drawn]).sum() / (len(seeds) * w[drawn].sum())
    return _percentiles(means)


def bootstrap_recovered(original, unlearned, attacked, weights=None, resolution: float = 0.0,
                        resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap of the recovered fraction (mean(attacked) - mean(unlearned)) / (mean(original)
    - mean(unlearned)) over the same items (per-question scores of the three models, resampled together;
    optional per-item weights). Resamples whose gap is under `resolution` are left out (the fraction is
    undefined there); NaNs when most are."""
    o, u, a = (np.asarray(x, np.float64) for x in (original, unlearned, attacked))
    w = np.ones_like(o) if weights is None else np.asarray(weights, np.float64)
    if o.size == 0:
        return (float("nan"), float("nan"))
    index = _rng(seed).integers(0, o.size, (resamples, o.size))
    ww = w[index]
    mean = lambda x: (x[index] * ww).sum(axis=1) / ww.sum(axis=1)
    gap = mean(o) - mean(u)
    keep = np.abs(gap) >= max(resolution, 1e-12)
    if keep.mean() < 0.5:
        return (float("nan"), float("nan"))
    return _percentiles(((mean(a) - mean(u))[keep]) / gap[keep])


def interval(scores) -> tuple[float, float]:
    """The interval of a mean accuracy from per-question scores: Wilson for one seed's 0/1 scores (a
    1-D list), the two-way bootstrap for [K seeds, n questions]."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim == 1 or scores.shape[0] == 1:
        flat = scores.reshape(-1)
        return wilson(float(flat.sum()), flat.size)
    return bootstrap_seeds(scores)


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact test: the two-sided binomial(b + c, 1/2) p-value of b answers right only under
    the first model and c right only under the second (1 when b + c = 0)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def sign_flip(differences, resamples: int = 20000, seed: int = SEED) -> float:
    """The two-sided sign-flip permutation p-value of mean(differences) = 0 (paired differences,
    symmetric under the null): exact over every sign pattern up to 20 non-zero differences, else seeded
    Monte Carlo (the observed pattern counted once)."""
    d = np.asarray(differences, np.float64)
    d = d[np.abs(d) > 1e-12]
    if d.size == 0:
        return 1.0
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, observed)
    if d.size <= 20:
        totals = np.array([abs(np.dot(signs, d)) for signs in product((-1.0, 1.0), repeat=d.size)])
        return float(np.mean(totals >= observed - tol))
    signs = _rng(seed).choice((-1.0, 1.0), (resamples, d.size))
    totals = np.abs(signs @ d)
    return float((1 + np.sum(totals >= observed - tol)) / (resamples + 1))


def paired(a, b, weights=None) -> dict:
    """a vs b on the same questions: per-question scores (0/1, or each question's mean over seeds),
    aligned, and optional per-question weights (normalised to mean 1: the mean of weighted differences is
    then a weighted mean difference, e.g. a mean over tasks of different sizes). {diff, ci: paired bootstrap
    interval, p: the test's two-sided p-value, test, n, and with 0/1 unweighted scores a_only/b_only: the
    discordant counts (right under a only / under b only)}."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores of different shapes {a.shape} and {b.shape}")
    w = np.ones_like(a) if weights is None else np.asarray(weights, np.float64) / np.mean(weights)
    d = w * (a - b)
    out = {"diff": float(d.mean()) if d.size else float("nan"), "ci": list(bootstrap_mean(d)), "n": int(d.size)}
    binary = np.all(np.isin(a, (0.0, 1.0))) and np.all(np.isin(b, (0.0, 1.0))) and np.allclose(w, 1.0)
    if binary:
        only_a, only_b = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
        out.update(test="mcnemar_exact", p=mcnemar_exact(only_a, only_b), a_only=only_a, b_only=only_b)
    else:
        out.update(test="sign_flip", p=sign_flip(d))
    return out


def holm(p_values: list[float], level: float = 0.05) -> list[bool]:
    """Holm's step-down correction: which of the hypotheses are rejected at family-wise level `level`."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > level / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


def holm_adjusted(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (reject at 5% when <= 0.05), monotone in the raw ones."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def fmt_ci(ci, scale: float = 100.0, digits: int = 1) -> str:
    """[low, high] as "low-high" at a scale (100: percentage points)."""
    if ci is None or any(v is None or v != v for v in ci):
        return "-"
    return f"{scale * ci[0]:.{digits}f}-{scale * ci[1]:.{digits}f}"
