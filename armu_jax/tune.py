"""--mode=tune: a constrained search over the training settings, one Optuna study shared by many workers.

    python -m armu_jax.main --flagfile=configs/demo.flags --mode=tune --output_dir=runs/tune \\
        --tune_space=layer_id:3:9,beta:2:12:log,lr:1e-3:1e-2:log --tune_trials=30

Each trial is a full run of the flagfile with the searched settings (in <output_dir>/trials/NNNN/)
and the native evaluator on --eval_tasks' *validation* items (tasks.py: one split for the project);
the chosen trial is then scored on the *test* items, which no trial saw. Runs reuse what a process
shares through the cell runner (cells.CellRunner: the model, tokenized corpora, compiled
steps per layer and shape, the scorer; lr, beta, c and alpha are arguments of the compiled step).

The objective (one number, minimised; Optuna prunes only single-objective studies):
    mean over the forget tasks of |accuracy - chance| (points) - min(forget NLL rise, 1 nat/token)
Accuracy decides; held-out NLL (finer than ~200 questions' accuracy, one nat counted as one point)
breaks ties, capped at the +1 nat/token target so the search does not chase a wrecked model.
The constraints (feasible when <= 0; Optuna's TPE honours them and no infeasible trial is ever
reported as best): retain accuracy lost against the original model minus --tune_retain_budget's
acc points, retain NLL gained minus its nll, and the run's time (steps x median step time) minus
--tune_max_trial_seconds. Pruning: every --tune_prune_every steps the forget tasks' held-out NLL is
reported from half of the run on (RMU's forget loss stays flat, then breaks through: before half of
the run the NLL tells trials apart by noise); a trial in the worst quarter of the others at that
step stops (PercentilePruner).

Seeds: with --seeds=K a trial is K runs of its settings (control vectors drawn with --seed, --seed+1, ...;
in trials/NNNN/seed_<s>/), scored as the mean over them (each task's accuracy and NLL averaged; the
intervals of the chosen trial's test scores a two-way bootstrap over seeds and questions). Pruning
watches the first seed only: a trial it stops runs no other seed. The time constraint is one run's.

Workers: the same command in N processes (terminals, a SLURM array: launch/slurm.py --tune_workers)
makes N workers of one study in --tune_storage (default SQLite in the output directory). Each
trial runs once: a worker takes a trial only while the study's running and finished trials are
fewer than --tune_trials (a trial asked beyond that, by a race, is marked failed with user
attribute "surplus" and never runs); a worker that dies leaves a RUNNING trial whose heartbeat
stops: after 2 x --tune_heartbeat_seconds another worker (or the restarted one) fails it and
retries its settings once as a new trial. On RDB storage this is Optuna's heartbeat; the journal
file has none, so the workers write the heartbeat as a trial attribute and apply the same rule.
Restarting the command continues the study.

Outputs: tune.csv (a row per trial), tune.md (the best feasible trials, the chosen one's test-split
scores), tune.png (forget vs retain of every trial, the feasible front, chance and the original),
best.flags (python -m armu_jax.main --flagfile=best.flags --output_dir=runs/best reproduces the
chosen trial), study.db (open it with optuna-dashboard sqlite:///<output_dir>/study.db).
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from armu_jax import hosts, outputs, storage
from armu_jax.attack import RELEARN, relearn, relearn_names, text_batch, unused_texts
from armu_jax.cells import CellRunner
from armu_jax.config import RunConfig, flagfile_text, validate
from armu_jax.context import RunContext
from armu_jax.errors import UserError, first_line
from armu_jax.evaluate import evaluate_tasks
from armu_jax.params import merge
from armu_jax.rundir import read_metrics
from armu_jax.search import (
    FEASIBLE_BELOW,
    check,
    constraint_keys,
    constraints,
    describe_params,
    identity,
    mean_results,
    objective,
    parse_budget,
    parse_space,
    seed_runs,
    summary,
    trial_config,
)
from armu_jax.study import (
    MAX_RETRY,
    Heartbeat,
    fail_stale,
    open_storage,
    quiet_optuna,
    trial_seeded_sampler,
)
from armu_jax.tasks import load_tasks
from armu_jax.tune_report import report

PRUNE_PERCENTILE = 75.0  # a trial worse than 75% of the others at a step is stopped (the worst quarter)
PRUNE_TEXTS = 16  # held-out texts per forget task in the pruning NLL (a full-model forward: kept small)



# ----------------------------------------------------------------------------- the study


def open_study(cfg: RunConfig, study_storage, name: str, ident: dict, sampler=None, pruner=None):
    """Create or load the study; refuse one with another identity (nothing of it changed)."""
    import optuna  # optional: only the tune and spread sweeps load Optuna
    try:
        try:  # loading writes nothing (creating an existing study would append to a journal file)
            study = optuna.load_study(study_name=name, storage=study_storage, sampler=sampler, pruner=pruner)
        except KeyError:
            study = optuna.create_study(storage=study_storage, study_name=name, direction="minimize", sampler=sampler,
                                        pruner=pruner, load_if_exists=True)
    except Exception as err:
        raise UserError(f"--tune_storage: cannot open study {name!r} ({first_line(err)})") from None
    saved = study.user_attrs.get("identity")
    if saved is None:
        if study.trials:
            raise UserError(f"study {name!r} in {cfg.tune_storage or 'the output directory'} was not made by "
                            "armu_jax --mode=tune; choose another --tune_study or --tune_storage")
        study.set_user_attr("identity", ident)
    elif saved != ident:
        changed = [k for k in ident if saved.get(k) != ident[k]]
        detail = "; ".join(f"{k}: study has {saved.get(k)!r}, now {ident[k]!r}" for k in changed)
        raise UserError(f"study {name!r} was started with another {' and '.join(changed)} ({detail}); rerun its "
                        "command (the --tune_trials may change), or choose a new --output_dir / --tune_study")
    return study


def attacked_results(cfg: RunConfig, run_cfg: RunConfig, runner, trained: dict) -> dict:
    """--tune_attack on a trial's model: --relearn_steps AdamW steps on --relearn_texts texts of the corpus
    (forget or retain) that the run did not train on, then the validation tasks (what --mode=attack does to an
    export, here to the trained leaves in memory)."""
    texts = unused_texts(run_cfg, RELEARN[cfg.tune_attack], cfg.attack_seed, cfg.relearn_texts)
    batch = text_batch(runner.scorer.tokenizer, texts, cfg.relearn_max_len)
    params = merge(runner.full, trained)
    names = relearn_names(params, cfg.relearn_params, cfg.relearn_layers or run_cfg.update_layer_ids)
    tuned, _ = relearn(runner.scorer.model, params, names, batch, cfg.relearn_steps, cfg.relearn_lr,
                       cfg.relearn_weight_decay, runner.run_context.mesh, runner.cache)
    return evaluate_tasks(runner.scorer, tuned, runner.tasks, nll_tokens=runner.nll_tokens)


def _counted(trial) -> bool:
    """A trial of the budget: running, complete or pruned (a failed or surplus one is not)."""
    return trial.state.name in ("RUNNING", "COMPLETE", "PRUNED") and not trial.user_attrs.get("surplus")


def _finished(trial) -> bool:
    return trial.state.name in ("COMPLETE", "PRUNED") and not trial.user_attrs.get("surplus")


# ----------------------------------------------------------------------------- a worker

class Pruned(Exception):
    pass


def _run_seconds(run_dir) -> float:
    """steps x the median step time: the run without its compilation (the time constraint)."""
    times = np.diff([0.0] + [r["seconds"] for r in read_metrics(run_dir)])
    return float(np.median(times[1:] if len(times) > 1 else times) * len(times))


class PruneHook:
    """A trial's pruning (train's hook): every --tune_prune_every steps, before the last, the forget tasks'
    held-out NLL (PRUNE_TEXTS texts each) reported to the study; raises Pruned when the pruner says so."""

    def __init__(self, cfg, trial_cfg, trial, runner):
        self.cfg, self.trial_cfg, self.trial, self.runner = cfg, trial_cfg, trial, runner
        self.texts = [text for task in runner.tasks if task.role == "forget" for text in task.nll_texts[:PRUNE_TEXTS]]
        self.seconds = 0.0

    def __call__(self, done, trainable):
        every = self.cfg.tune_prune_every
        if not (every and self.texts and done % every == 0 and done < self.trial_cfg.max_num_batches):
            return
        began = time.time()
        value = -self.runner.nll(trainable, self.texts)
        self.seconds += time.time() - began
        self.trial.set_user_attr("prune_seconds", round(self.seconds, 2))
        self.trial.set_user_attr("steps", done)
        self.trial.report(value, done)
        if self.trial.should_prune():
            raise Pruned(f"forget NLL {-value:.3f} at step {done}")


def measure_trial(cfg, trial, trial_cfg, runner, original, bar) -> tuple[dict, list[float], int, float]:
    """A trial's runs (each seed; pruned on the first: the others run only for a trial that survives it), the
    validation evaluator (and --tune_attack), set as the trial's attributes: (scores, constraint values,
    seeds, seconds)."""
    runs = seed_runs(trial_cfg)
    measured = []
    for k, seeded in enumerate(runs):
        if len(runs) > 1:
            bar.write(f"trial {trial.number}: seed {seeded.seed} ({k + 1} of {len(runs)})")
        m, trained = runner.run(seeded, PruneHook(cfg, trial_cfg, trial, runner) if k == 0 else None)
        if cfg.tune_attack != "none":
            m["attacked"] = attacked_results(cfg, seeded, runner, trained)
        measured.append(m)
        del trained
    results = mean_results([m["results"] for m in measured], [m["samples"] for m in measured])
    s = summary(results, original)
    if cfg.tune_attack != "none":  # the attacked model's forget scores, beside the unlearned one's
        attacked = mean_results([m["attacked"] for m in measured], [[] for _ in measured])
        s["attacked"] = {k: v for k, v in summary(attacked, original).items() if k.startswith("forget")}
    run_seconds = float(np.mean([_run_seconds(storage.path(seeded.output_dir)) for seeded in runs]))  # one run's time
    cons = constraints(cfg, s, run_seconds)
    total = lambda key: round(sum(m[key] for m in measured), 1)
    per_seed = {"seed_results": [m["results"] for m in measured], "seeds": [seeded.seed for seeded in runs]} \
        if len(runs) > 1 else {}
    for key, value in {**s, "results": results, **per_seed, "run_seconds": round(run_seconds, 2),
                       "seconds": total("seconds"), "train_seconds": total("train_seconds"),
                       "eval_seconds": total("eval_seconds"), "constraints": cons}.items():
        trial.set_user_attr(key, value)
    for key, value in zip(constraint_keys(cfg), cons):  # Optuna 5's constraints: TPE reads them
        trial.set_constraint(key, value)
    return s, cons, len(runs), total("seconds")


def run_trial(cfg, dims, study, trial, runner, original, out, bar) -> None:
    """One trial, start to tell: the run (pruned on the forget NLL), the validation evaluator, the objective
    and constraints; a failure is the trial's state FAIL with its error as an attribute."""
    import optuna  # optional: only the tune and spread sweeps load Optuna
    heartbeat = Heartbeat(study, trial, cfg.tune_heartbeat_seconds)  # first: a worker killed from here on is seen
    directory = out / "trials" / f"{trial.number:04d}"
    trial_cfg = trial_config(cfg, dims, trial.params, directory)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("run_dir", str(directory))
    trial.set_user_attr("planned_steps", trial_cfg.max_num_batches)
    began = time.time()
    try:
        validate(trial_cfg, runner.run_context.model_cfg)
        s, cons, seeds, seconds = measure_trial(cfg, trial, trial_cfg, runner, original, bar)
        heartbeat.close()
        study.tell(trial, objective(s))
        ok = all(c <= FEASIBLE_BELOW for c in cons)
        after = f" (after {cfg.tune_attack}: {100 * s['attacked']['forget_acc']:.1f})" if s.get("attacked") else ""
        bar.write(f"trial {trial.number}: {describe_params(trial.params)}: forget acc {100 * s['forget_acc']:.1f}{after}, NLL "
                  f"{s['forget_nll_rise']:+.2f}; retain acc lost {s['retain_acc_lost'] or 0:.1f} pt"
                  f"{'' if ok else ' (breaks the budget)'}{f' (mean of {seeds} seeds)' if seeds > 1 else ''} "
                  f"({seconds:.0f} s)")
    except Pruned as why:
        heartbeat.close()
        trial.set_user_attr("seconds", round(time.time() - began, 1))
        trial.set_user_attr("pruned", str(why))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        bar.write(f"trial {trial.number}: {describe_params(trial.params)}: pruned ({why})")
    except Exception as err:  # any failure of one trial: recorded, the worker goes on
        heartbeat.close()
        trial.set_user_attr("error", first_line(err))
        trial.set_user_attr("seconds", round(time.time() - began, 1))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        bar.write(f"trial {trial.number}: failed: {first_line(err)}")
    except BaseException:  # Ctrl-C, SIGTERM: the trial is failed, its settings retried once, the worker stops
        heartbeat.close()
        trial.set_user_attr("error", "interrupted")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, study._storage.get_trial(trial._trial_id))
        raise


def work(study, budget: int, interval: int, ask, take) -> None:
    """The tune's worker loop: until the study has `budget` finished trials, fail stale trials, ask() for
    one and take(trial) it, unless it is beyond the budget (then it is marked surplus and failed without
    running). Waits while the budget is held by running trials."""
    import optuna  # optional: only the tune and spread sweeps load Optuna
    while True:
        fail_stale(study, interval)
        trials = study.get_trials(deepcopy=False)
        if sum(map(_finished, trials)) >= budget:
            return
        waiting = any(t.state.name == "WAITING" for t in trials)
        if sum(map(_counted, trials)) >= budget and not waiting:
            time.sleep(min(interval, 5))  # running trials hold the budget: one may fail and be retried
            continue
        trial = ask()
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and _counted(t)]
        if len(earlier) >= budget:  # another worker took the last place first
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        take(trial)



# ----------------------------------------------------------------------------- the mode

def check_tune_dir(out: Path, cfg: RunConfig) -> None:
    """The output directory: new, or one holding this tune (tune_flags.txt)."""
    if (out / "tune_flags.txt").is_file():
        return  # the study's identity decides whether it is the same tune
    outputs.claim(out, ignore=("study.db", "study.db-journal", "study.db.lock", *storage.LOCK_FILES),
                  hint="it holds no tune; choose a new directory")


def tune_cli(cfg: RunConfig) -> dict:
    """--mode=tune: one worker of the study; the reports once the study has --tune_trials finished trials."""
    import optuna  # optional: only the tune and spread sweeps load Optuna


    check(cfg)
    if hosts.several():
        raise UserError("--mode=tune runs one worker per process (its trials may use all of its devices via --mesh); "
                        "start N workers as N commands, not one with --num_processes/--multihost")
    out = storage.path(cfg.output_dir, "--output_dir")
    storage.check_bucket(out, "--output_dir")
    run = RunContext.of(cfg)
    dims = parse_space(cfg.tune_space, cfg.n_topics, run.model_cfg.num_hidden_layers)
    validate(cfg, run.model_cfg)
    tasks = load_tasks(cfg.eval_tasks, cfg.eval_limit, "validation")
    roles = {t.role for t in tasks}
    if "forget" not in roles:
        raise UserError(f"--eval_tasks={','.join(cfg.eval_tasks)} has no forget task for the objective (demo_bio, "
                        "demo_cyber, wmdp_bio:FILE)")
    if parse_budget(cfg.tune_retain_budget) and "retain" not in roles:
        raise UserError(f"--tune_retain_budget needs a retain task in --eval_tasks (demo_retain, mmlu); "
                        f"--eval_tasks={','.join(cfg.eval_tasks)} has none (or give --tune_retain_budget=)")
    check_tune_dir(out, cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_optuna()
    study_storage = open_storage(cfg)
    name = cfg.tune_study or "tune"
    ident = identity(cfg, dims)
    open_study(cfg, study_storage, name, ident)  # refuses another study before anything is written
    sampler = trial_seeded_sampler(cfg.tune_seed, cfg.tune_startup_trials)  # workers never draw alike (study.py)
    pruner = (optuna.pruners.PercentilePruner(PRUNE_PERCENTILE, n_startup_trials=cfg.tune_startup_trials,
                                              n_warmup_steps=cfg.max_num_batches // 2)
              if cfg.tune_prune_every else optuna.pruners.NopPruner())
    study = open_study(cfg, study_storage, name, ident, sampler, pruner)
    if not (out / "tune_flags.txt").is_file():
        outputs.write_text(out / "tune_flags.txt", flagfile_text(cfg))
    runner = CellRunner(cfg, run, tasks)
    original = study.user_attrs.get("original")
    if original is None:
        print("evaluating the original model (validation split)")
        original = runner.evaluate()
        study.set_user_attr("original", original)
    distributions = {d.name: d.distribution() for d in dims}
    finished = sum(map(_finished, study.get_trials(deepcopy=False)))
    bar = tqdm(total=cfg.tune_trials, initial=min(finished, cfg.tune_trials), desc="tune", unit="trial")

    def take(trial):
        run_trial(cfg, dims, study, trial, runner, original, out, bar)
        bar.n = min(sum(map(_finished, study.get_trials(deepcopy=False))), cfg.tune_trials)
        bar.refresh()

    try:
        work(study, cfg.tune_trials, cfg.tune_heartbeat_seconds, lambda: study.ask(distributions), take)
    finally:
        bar.close()
    return report(cfg, study, dims, runner, out, original)

