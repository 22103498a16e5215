"""The one runner of sweep cells and tune trials: what every run of one process shares, built once (the
whole model, the process cache: tokenizer, tokenized corpora, compiled steps per layer and shape, the
scorer), a run and its evaluation, and runs of one layer trained side by side. --mode=sweep and
--mode=tune both stand on it; neither imports the other.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from armu_jax import rundir
from armu_jax.cache import ProcessCache
from armu_jax.config import RunConfig
from armu_jax.errors import RunFailure
from armu_jax.evaluate import EvalSpec, evaluate_tasks
from armu_jax.params import merge
from armu_jax.train import train, train_cells


def _metrics_of(run_dir: Path, n_topics: int) -> dict:
    """Final forget/retain loss (mean over the last step of each topic), the coefficient each topic
    used (mean), and the first step's time beyond a typical step's (its compilation, if any)."""
    records = rundir.read_metrics(run_dir)
    last = records[-n_topics:]
    times = np.diff([0.0] + [r["seconds"] for r in records])
    typical = float(np.median(times[1:])) if len(times) > 1 else 0.0
    return {"forget_loss": float(np.mean([r["forget_loss"] for r in last])),
            "retain_loss": float(np.mean([r["retain_loss"] for r in last])),
            "coeff_used": float(np.mean([r["coeff"] for r in last])),
            "first_step_seconds": round(float(times[0]) - typical, 2) if len(times) else None}


class CellRunner:
    """The one cell runner of the sweep and the tune: what every cell (a sweep's) or trial (a tune's) of
    one process shares, built once: the whole model, the process cache (tokenizer, tokenized corpora,
    compiled steps per layer and shape, the scorer) and the evaluation tasks."""

    def __init__(self, cfg: RunConfig, run, tasks: list):
        self.cache = ProcessCache(keep_full=True)
        self.run_context = run
        self.full = self.cache.params(run.model_dir, cfg.dtype, run.mesh)
        self.scorer = self.cache.scorer(EvalSpec.of(cfg, run.model_dir, run.mesh))
        self.tasks, self.nll_tokens = tasks, cfg.eval_nll_tokens

    def evaluate(self, trained: dict | None = None, tasks: list | None = None, samples: list | None = None) -> dict:
        """The native evaluator on the original model or with the trained leaves swapped in (each
        question's record appended to `samples` when given)."""
        return evaluate_tasks(self.scorer, merge(self.full, trained) if trained else self.full,
                              self.tasks if tasks is None else tasks, nll_tokens=self.nll_tokens, samples=samples)

    def nll(self, trained: dict, texts: list[str]) -> float:
        """Held-out NLL per token of texts with the trained leaves (the tune's pruning signal)."""
        return self.scorer.nll_per_token(self.scorer.place(merge(self.full, trained)), texts, self.nll_tokens,
                                         desc="pruning nll")

    def run(self, run_cfg: RunConfig, hook=None) -> tuple[dict, dict]:
        """One cell: its run (resumed if run_cfg says so), then the evaluator on the trained weights:
        ({results, samples (a record per question), forget_loss, retain_loss, coeff_used, first_step_seconds,
        *_seconds}, trained leaves). Raises what the run raises."""
        began = time.time()
        run_dir, trained = train(run_cfg, self.cache, hook)
        trained_at = time.time()
        samples: list[dict] = []
        results = self.evaluate(trained, samples=samples)
        done = time.time()
        return {"results": results, "samples": samples, **_metrics_of(run_dir, run_cfg.n_topics),
                "train_seconds": round(trained_at - began, 1), "eval_seconds": round(done - trained_at, 1),
                "seconds": round(done - began, 1)}, trained


    def run_side_by_side(self, run_cfgs: list[RunConfig]) -> list:
        """Cells of one layer trained side by side (train.train_cells), then each evaluated: per cell what
        run() returns without the trained leaves, or the RunFailure that stopped it. train_seconds is the
        shared training's time."""
        began = time.time()
        outcomes = train_cells(run_cfgs, self.cache)
        trained_at = time.time()
        out = []
        for run_cfg, outcome in zip(run_cfgs, outcomes):
            if isinstance(outcome, RunFailure):
                out.append(outcome)
                continue
            run_dir, trained = outcome
            evaluated = time.time()
            samples: list[dict] = []
            results = self.evaluate(trained, samples=samples)
            done = time.time()
            out.append({"results": results, "samples": samples, **_metrics_of(run_dir, run_cfg.n_topics),
                        "train_seconds": round(trained_at - began, 1), "eval_seconds": round(done - evaluated, 1),
                        "seconds": round(trained_at - began + done - evaluated, 1), "side_by_side": len(run_cfgs)})
        return out
