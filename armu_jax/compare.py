"""Models compared on the same questions: per-question scores from the evaluators' records
(samples.jsonl, armu_jax.evaluate), pooled over tasks and seeds, with intervals and paired tests
(armu_jax.stats).

A model here is a list of record sets, one per seed. Its score on a group of tasks (the forget tasks,
say) is the mean over the tasks of each task's mean, as the reports give it: every question of a task
of n questions weighs 1/n, every task the same. For NLL a text's score is its NLL per token and it
weighs by its tokens within its task (a task's score is then its summed NLL over its summed tokens).
With several seeds each question's score is first averaged over the seeds (the paired comparisons);
the interval of a model's own score is the two-way bootstrap over seeds and questions.
"""
from __future__ import annotations

import numpy as np

from armu_jax import stats


def _values(records: list[dict], task: str, metric: str) -> dict[int, tuple[float, float]]:
    """{doc_id: (score, weight within the task)} of one task's records."""
    if metric == "nll":
        return {r["doc_id"]: (r["nll"] / r["tokens"], float(r["tokens"])) for r in records
                if r["task"] == task and r.get("type") == "nll"}
    return {r["doc_id"]: (float(r[metric]), 1.0) for r in records
            if r["task"] == task and r.get("type") != "nll" and metric in r}


def matrix(seeds: list[list[dict]], tasks: list[str], metric: str = "acc") -> tuple[np.ndarray, np.ndarray, list]:
    """(scores [K seeds, n items], weights [n], the items (task, doc_id)) pooled over tasks; an item is kept
    when every seed scored it. Weights: within a task 1 (acc) or the tokens (nll), each task's summing to
    the same total."""
    rows, weights, items = [[] for _ in seeds], [], []
    for task in tasks:
        per_seed = [_values(records, task, metric) for records in seeds]
        ids = sorted(set.intersection(*(set(v) for v in per_seed))) if per_seed else []
        if not ids:
            continue
        w = np.array([per_seed[0][i][1] for i in ids])
        weights += list(w / w.sum())
        items += [(task, i) for i in ids]
        for k, values in enumerate(per_seed):
            rows[k] += [values[i][0] for i in ids]
    return np.array(rows, np.float64), np.array(weights, np.float64), items


def score(seeds: list[list[dict]], tasks: list[str], metric: str = "acc") -> dict | None:
    """{mean, ci, n, seeds} of a model on tasks (None when no record matches): the mean over tasks of the
    task means, averaged over seeds; 95% interval: Wilson (one task, one seed, accuracy), else the
    two-way bootstrap over seeds and questions."""
    values, weights, items = matrix(seeds, tasks, metric)
    if not items:
        return None
    w = weights / weights.mean()
    mean = float((values * w).mean())
    if metric != "nll" and len({t for t, _ in items}) == 1 and len(seeds) == 1:
        ci = stats.wilson(float(values.sum()), values.shape[1])
    else:
        ci = stats.bootstrap_seeds(values, weights)
    return {"mean": mean, "ci": list(ci), "n": len(items), "seeds": len(seeds)}


def paired(a: list[list[dict]], b: list[list[dict]], tasks: list[str], metric: str = "acc") -> dict | None:
    """a - b on the items both scored (each item's score averaged over its model's seeds): stats.paired's
    {diff, ci, p, test, n, ...}, or None without common items. McNemar's exact test for one seed and one
    task's accuracy; otherwise the sign-flip test of the weighted differences."""
    va, wa, ia = matrix(a, tasks, metric)
    vb, _, ib = matrix(b, tasks, metric)
    common = sorted(set(ia) & set(ib))
    if not common:
        return None
    pa, pb = {x: k for k, x in enumerate(ia)}, {x: k for k, x in enumerate(ib)}
    ka, kb = [pa[x] for x in common], [pb[x] for x in common]
    weights = wa[ka] if metric == "nll" or len({t for t, _ in common}) > 1 else None
    return stats.paired(va[:, ka].mean(axis=0), vb[:, kb].mean(axis=0), weights)


def fmt_paired(result: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """"-3.2 [-6.0, -0.4], p=0.02" of a paired result (scale 100: points of accuracy)."""
    if result is None:
        return "-"
    low, high = (scale * v for v in result["ci"])
    return f"{scale * result['diff']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}], p={result['p']:.2g}"
