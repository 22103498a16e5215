"""The tune's outputs: tune.csv (a row per trial), tune.md (the best feasible trials and the chosen one's
test-split scores), tune.png (forget vs retain of every trial, the feasible front) and best.flags."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from armu_jax import outputs, storage
from armu_jax.checkpoints import Checkpointer
from armu_jax.config import RunConfig, flagfile_text
from armu_jax.params import truncate
from armu_jax.search import (
    Dimension,
    constraint_names,
    describe_params,
    feasible,
    mean_results,
    seed_runs,
    trial_config,
)
from armu_jax.stats import fmt_ci
from armu_jax.step import StepSpec
from armu_jax.tasks import load_tasks, mean_chance


def rows_of(study, dims: list[Dimension]) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        a = t.user_attrs
        rows.append({"trial": t.number, **{d.name: t.params.get(d.name) for d in dims}, "state": t.state.name.lower(),
                     "objective": t.value, "forget_acc": a.get("forget_acc"), "forget_nll_rise": a.get("forget_nll_rise"),
                     "retain_acc_lost": a.get("retain_acc_lost"), "retain_nll_gained": a.get("retain_nll_gained"),
                     "feasible": feasible(t) if t.state.name == "COMPLETE" else None,
                     "constraints": a.get("constraints"), "run_seconds": a.get("run_seconds"), "seconds": a.get("seconds"),
                     "note": a.get("error") or a.get("pruned") or "", "results": a.get("results"),
                     "steps": a.get("steps"), "planned_steps": a.get("planned_steps"),
                     "prune_seconds": a.get("prune_seconds", 0.0)})
    return rows


def csv_text(rows: list[dict], dims: list[Dimension]) -> str:
    columns = ["trial", *(d.name for d in dims), "state", "objective", "forget_acc", "forget_nll_rise", "retain_acc_lost",
               "retain_nll_gained", "feasible", "constraints", "run_seconds", "seconds", "note"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    fmt = lambda v: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else
                                          ";".join(f"{c:.4g}" for c in v) if isinstance(v, list) else v)
    for r in rows:
        writer.writerow([fmt(r[c]) for c in columns])
    return buffer.getvalue()


def best_trial(study):
    """The feasible complete trial with the lowest objective (ties: the earlier); None if none is feasible."""
    candidates = [t for t in study.get_trials(deepcopy=False) if feasible(t)]
    return min(candidates, key=lambda t: (t.value, t.number)) if candidates else None


def front(rows: list[dict]) -> list[dict]:
    """Feasible trials not dominated in (forget acc lower, retain acc lost lower)."""
    ok = [r for r in rows if r["feasible"]]
    return sorted([r for r in ok if not any(o["forget_acc"] <= r["forget_acc"] and o["retain_acc_lost"] <= r["retain_acc_lost"]
                                            and (o["forget_acc"], o["retain_acc_lost"]) != (r["forget_acc"], r["retain_acc_lost"])
                                            for o in ok)], key=lambda r: r["forget_acc"])


def markdown(cfg, rows, dims, best, test: dict | None, original_test: dict | None) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    num = lambda v, f="{:+.3f}": "-" if v is None else f.format(v)
    finished = [r for r in rows if r["state"] in ("complete", "pruned")]
    lines = [f"{len(finished)} trials ({sum(r['state'] == 'pruned' for r in rows)} pruned, "
             f"{sum(r['state'] == 'fail' for r in rows)} failed) over {', '.join(d.spec() for d in dims)}; "
             f"scored on the validation split"
             f"{f' (a trial: the mean of {cfg.seeds} runs, seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}; pruned on the first)' if cfg.seeds > 1 else ''}. "
             f"Constraints: {', '.join(constraint_names(cfg)) or 'none'}.", ""]
    pruned = [r for r in rows if r["state"] == "pruned" and r["steps"] and r["planned_steps"]]
    if pruned:
        planned = sum(r["planned_steps"] for r in rows if r["state"] in ("complete", "pruned") and r["planned_steps"])
        saved = sum(r["planned_steps"] - r["steps"] for r in pruned)
        checks = sum(r["prune_seconds"] or 0.0 for r in rows)
        lines += [f"Pruning stopped {len(pruned)} trials early: {saved} of {planned} planned steps ({100 * saved / planned:.0f}%) "
                  f"not run (and their evaluations); the pruning checks cost {checks:.0f} s in all.", ""]
    ranked = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: (not r["feasible"], r["objective"]))[:10]
    table = [[r["trial"], *(_fmt(r[d.name]) for d in dims), f"{r['objective']:.2f}", pct(r["forget_acc"]),
              num(r["forget_nll_rise"]), num(r["retain_acc_lost"], "{:.1f}"), num(r["retain_nll_gained"]),
              "yes" if r["feasible"] else "no"] for r in ranked]
    lines += ["The best trials (validation split):", "",
              outputs.markdown_table(["trial", *(d.name for d in dims), "objective", "forget acc", "forget NLL rise",
                                      "retain acc lost (pt)", "retain NLL gained", "within budget"], table), ""]
    if best is None:
        lines.append("No complete trial met the constraints: no best.flags. Widen --tune_space or the budget, or add trials.")
    else:
        lines.append(f"Chosen: trial {best.number} ({describe_params(best.params)}), best.flags.")
        if test:
            ci = lambda r, k, scale, f: "-" if r.get(k) is None else \
                f"{f.format(scale * r[k])} [{fmt_ci(r.get(k + '_ci'), scale, 1 if scale == 100 else 3)}]"
            head = ["task", "n", "original acc %", "chosen acc %", "original NLL", "chosen NLL"]
            body = [[t, r["n"], ci(original_test[t], "acc", 100, "{:.1f}"), ci(r, "acc", 100, "{:.1f}"),
                     ci(original_test[t], "nll", 1, "{:.3f}"), ci(r, "nll", 1, "{:.3f}")] for t, r in test.items()]
            seeds = f", the mean of its {cfg.seeds} seeds" if cfg.seeds > 1 else ""
            lines += ["", f"The chosen trial on the test split (no trial saw it){seeds}; [95% interval: "
                      + ("two-way bootstrap over seeds and questions (texts for NLL)]:" if cfg.seeds > 1 else
                         "Wilson for accuracy, bootstrap over texts for NLL]:"), "", outputs.markdown_table(head, body)]
    return "\n".join(lines)


def _fmt(v):
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def plot(path, rows, original: dict, chance: float | None) -> list[dict]:
    """Forget accuracy vs retain accuracy lost of every complete trial (pruned ones have no retain score),
    infeasible ones hollow, the feasible front joined, chance and the original model as lines."""
    fig, ax = outputs.figure(1, 1, figsize=(7.5, 5.5))
    done = [r for r in rows if r["state"] == "complete"]
    ok = [r for r in done if r["feasible"]]
    bad = [r for r in done if not r["feasible"]]
    if ok:
        ax.scatter([r["retain_acc_lost"] for r in ok], [100 * r["forget_acc"] for r in ok], color="C0",
                   label="trial within the budget")
    if bad:
        ax.scatter([r["retain_acc_lost"] for r in bad], [100 * r["forget_acc"] for r in bad], facecolors="none",
                   edgecolors="C3", label="trial over the budget")
    best_front = front(rows)
    if best_front:
        ax.plot([r["retain_acc_lost"] for r in best_front], [100 * r["forget_acc"] for r in best_front], "-",
                color="C0", linewidth=1, label="front")
    if chance is not None:
        ax.axhline(100 * chance, color="gray", linestyle=":", linewidth=1, label="chance")
    base = [r["acc"] for r in original.values() if r["role"] == "forget"]
    if base:
        ax.axhline(100 * float(np.mean(base)), color="black", linestyle="--", linewidth=1, label="original")
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel("retain accuracy lost against the original (points; validation split)")
    ax.set_ylabel("forget tasks: mean accuracy % (lower: more forgotten)")
    ax.set_title("--mode=tune: every complete trial", fontsize=9)
    ax.legend(fontsize=7)
    return outputs.save_figure(fig, path)


def best_flags(cfg: RunConfig, dims, best) -> str:
    """A flagfile of the chosen trial without an output directory."""
    chosen = trial_config(cfg, dims, best.params, "")
    chosen = dataclasses.replace(chosen, output_dir=None, export=cfg.export, eval_every=cfg.eval_every,
                                 tune_space=None, tune_storage=None)
    text = flagfile_text(chosen).replace("--mode=train\n", "")
    return (f"# --mode=tune's chosen trial {best.number} ({describe_params(best.params)}), objective {best.value:.3f} on the "
            f"validation split.\n# python -m armu_jax.main --flagfile=best.flags --output_dir=runs/best\n") + text


def test_scores(cfg, dims, best, runner, out: Path) -> tuple[dict, dict]:
    """The chosen trial (its final checkpoint) and the original model on the test split, computed once
    (best_test.json)."""
    cached = out / "best_test.json"
    if cached.is_file():
        saved = json.loads(cached.read_text())
        if saved.get("trial") == best.number:
            return saved["chosen"], saved["original"]
    tasks = load_tasks(cfg.eval_tasks, cfg.eval_limit, "test")
    trial_cfg = trial_config(cfg, dims, best.params, best.user_attrs["run_dir"])
    run = runner.run_context
    frozen = truncate(runner.full, trial_cfg.layer_id)
    compiled = runner.cache.step(StepSpec.of(trial_cfg, run.model_cfg, run.mesh), frozen)
    per_seed, samples = [], []
    for seeded in seed_runs(trial_cfg):  # the chosen trial's every seed, averaged as on the validation split
        checkpointer = Checkpointer(storage.path(seeded.output_dir) / "checkpoints", trial_cfg.keep_checkpoints)
        try:
            state = checkpointer.restore(compiled.init(frozen), compiled.state_shardings)
        finally:
            checkpointer.close()
        samples.append([])
        per_seed.append(runner.evaluate(state["trainable"], tasks, samples=samples[-1]))
    chosen = mean_results(per_seed, samples)
    original = runner.evaluate(None, tasks)
    outputs.write_json(cached, {"trial": best.number, "chosen": chosen, "original": original})
    return chosen, original


def report(cfg, study, dims, runner, out: Path, original: dict) -> dict:
    rows = rows_of(study, dims)
    outputs.write_text(out / "tune.csv", csv_text(rows, dims))
    best = best_trial(study)
    test = original_test = None
    if best is not None:
        test, original_test = test_scores(cfg, dims, best, runner, out)
        outputs.write_text(out / "best.flags", best_flags(cfg, dims, best))
    table = markdown(cfg, rows, dims, best, test, original_test)
    outputs.write_text(out / "tune.md", table + "\n")
    plot(out / "tune.png", rows, original, mean_chance(runner.tasks, "forget"))  # the validation tasks
    print(table)
    print(f"wrote {out / 'tune.csv'}, {out / 'tune.md'}, {out / 'tune.png'}"
          + (f", {out / 'best.flags'}" if best is not None else ""))
    return {"rows": rows, "best": best, "test": test, "original_test": original_test}

