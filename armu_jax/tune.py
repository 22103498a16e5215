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

import csv
import dataclasses
import io
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from armu_jax import outputs, storage
from armu_jax.config import SETTINGS, RunConfig, bound_error, flagfile_text, validate
from armu_jax.errors import UserError, first_line
from armu_jax.study import (
    MAX_RETRY,
    Heartbeat,
    fail_stale,
    open_storage,
    quiet_optuna,
    storage_spec,
    trial_seeded_sampler,
)

SEARCHABLE_KINDS = ("int", "float", "enum", "bool", "topic_floats", "topic_ints", "list")  # a list: by choices
NOT_SEARCHABLE = ("model", "forget_corpora", "retain_corpora", "mesh", "dtype", "control_vectors", "update_layer_ids")
NLL_CAP = 1.0  # nat/token: the NLL rise beyond which the objective gains nothing (the target's +1)
PRUNE_PERCENTILE = 75.0  # a trial worse than 75% of the others at a step is stopped (the worst quarter)
PRUNE_TEXTS = 16  # held-out texts per forget task in the pruning NLL (a full-model forward: kept small)


# ----------------------------------------------------------------------------- the search space

@dataclass(frozen=True)
class Dimension:
    """One --tune_space entry: setting (a RunConfig field), index (a topic's value, or None: all topics),
    a range [low, high] (log-scaled or not) or choices."""
    setting: str
    index: int | None
    kind: str  # the setting's kind
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    @property
    def name(self) -> str:
        return self.setting if self.index is None else f"{self.setting}.{self.index}"

    @property
    def integer(self) -> bool:
        return self.kind in ("int", "topic_ints")

    def spec(self) -> str:
        if self.choices:
            return f"{self.name}:{'|'.join(map(str, self.choices))}"
        number = lambda v: str(int(v)) if self.integer else f"{v:g}"
        return f"{self.name}:{number(self.low)}:{number(self.high)}" + (":log" if self.log else "")

    def distribution(self):
        import optuna
        if self.choices:
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)


def _value(setting: str, kind: str, text: str, entry: str):
    meta = SETTINGS[setting]
    try:
        if kind in ("int", "topic_ints"):
            return int(text)
        if kind in ("float", "topic_floats"):
            return float(text)
        if kind == "bool":
            return {"true": True, "false": False}[text.lower()]
    except (ValueError, KeyError):
        raise UserError(f"--tune_space entry {entry!r}: {text!r} is not a{'n integer' if 'int' in kind else ' number' if kind != 'bool' else ' bool (true|false)'} "
                        f"for --{setting}") from None
    if meta["choices"] and text not in meta["choices"]:
        raise UserError(f"--tune_space entry {entry!r}: {text!r} is not a value of --{setting} "
                        f"(choose from {', '.join(meta['choices'])})")
    return text


def searchable() -> list[str]:
    return [n for n, m in SETTINGS.items() if m["group"] == "training" and m["kind"] in SEARCHABLE_KINDS
            and n not in NOT_SEARCHABLE]


def parse_space(spec: str | None, n_topics: int, num_layers: int | None = None) -> list[Dimension]:
    """--tune_space -> its dimensions, every entry checked (the layer range against the model's layers
    when num_layers is given). One line naming the first bad entry."""
    if not spec or not spec.strip():
        raise UserError("--mode=tune needs --tune_space, e.g. --tune_space=layer_id:3:9,beta:2:12:log,lr:1e-3:1e-2:log")
    dims = []
    for entry in (e.strip() for e in spec.split(",")):
        parts = entry.split(":")
        name = parts[0]
        setting, _, index = name.partition(".")
        if setting not in SETTINGS:
            raise UserError(f"--tune_space entry {entry!r}: unknown setting {setting!r}; searchable: {', '.join(searchable())}")
        if setting not in searchable():
            raise UserError(f"--tune_space entry {entry!r}: --{setting} cannot be searched (it sets the model, data or "
                            f"layout of every trial); searchable: {', '.join(searchable())}")
        kind = SETTINGS[setting]["kind"]
        if index:
            if kind not in ("topic_floats", "topic_ints"):
                raise UserError(f"--tune_space entry {entry!r}: --{setting} has one value, not one per topic; write {setting}:...")
            if not index.isdigit() or int(index) >= n_topics:
                raise UserError(f"--tune_space entry {entry!r}: topic index {index} is outside the {n_topics} forget topics "
                                f"(0..{n_topics - 1})")
        index = int(index) if index else None
        if len(parts) == 2 and "|" in parts[1] or kind in ("enum", "bool", "list"):
            if len(parts) != 2 or not parts[1]:
                raise UserError(f"--tune_space entry {entry!r}: give the choices as {name}:a|b|c")
            choices = tuple(dict.fromkeys(_value(setting, kind, c, entry) for c in parts[1].split("|")))
            dim = Dimension(setting, index, kind, choices=choices)
        else:
            if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "log"):
                raise UserError(f"--tune_space entry {entry!r}: expected {name}:LOW:HIGH, {name}:LOW:HIGH:log or {name}:a|b|c")
            low, high = (_value(setting, kind, p, entry) for p in parts[1:3])
            if not low < high:
                raise UserError(f"--tune_space entry {entry!r}: LOW must be below HIGH")
            log = len(parts) == 4
            if log and low <= 0:
                raise UserError(f"--tune_space entry {entry!r}: a log range needs LOW > 0")
            for v in (low, high):
                error = bound_error(setting, v, SETTINGS[setting]["bound"])
                if error:
                    raise UserError(f"--tune_space entry {entry!r}: {error}")
            dim = Dimension(setting, index, kind, float(low), float(high), log)
        if any(d.setting == dim.setting and (d.index is None or dim.index is None or d.index == dim.index) for d in dims):
            raise UserError(f"--tune_space entry {entry!r}: --{setting} is named twice")
        dims.append(dim)
    if num_layers is not None:
        for d in dims:
            if d.setting == "layer_id" and (d.high if not d.choices else max(d.choices)) >= num_layers:
                raise UserError(f"--tune_space entry {d.spec()!r}: the model has {num_layers} layers (0..{num_layers - 1})")
    return dims


def parse_budget(spec: str | None) -> dict:
    """--tune_retain_budget=acc:2,nll:0.05 -> {"acc": 2.0, "nll": 0.05} (either may be absent)."""
    budget = {}
    for entry in (e.strip() for e in (spec or "").split(",") if e.strip()):
        key, _, value = entry.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if key not in ("acc", "nll") or key in budget or not number >= 0 or not math.isfinite(number):
            raise UserError(f"--tune_retain_budget entry {entry!r}: expected acc:POINTS and/or nll:NAT_PER_TOKEN, each "
                            ">= 0 once (e.g. acc:2,nll:0.05)")
        budget[key] = number
    return budget


def check(cfg: RunConfig) -> None:
    """The tune group's checks on the config alone, before anything is loaded (tune_cli; sweep_cli with
    --tune_storage)."""
    parse_budget(cfg.tune_retain_budget)
    if cfg.mode == "sweep" and cfg.tune_storage:
        storage_spec(cfg)
    if cfg.mode != "tune":
        return
    parse_space(cfg.tune_space, cfg.n_topics)
    if not cfg.output_dir:
        raise UserError("--mode=tune needs --output_dir (trials/, tune.csv, tune.md, tune.png, best.flags)")
    if cfg.eval_split != "test":
        raise UserError(f"--mode=tune scores its trials on the validation split and reports the chosen one on the test "
                        f"split; --eval_split={cfg.eval_split} would change that: leave it at test")
    if cfg.overwrite or cfg.resume:
        raise UserError("--mode=tune continues the study in --output_dir by itself; drop --overwrite/--resume "
                        "(a new study: a new --output_dir)")
    storage_spec(cfg)


# ----------------------------------------------------------------------------- the study

def identity(cfg: RunConfig, dims: list[Dimension]) -> dict:
    """What a study is: its space, objective and the flagfile's other training settings. A worker on a
    study with another identity stops before changing anything."""
    searched = {d.setting for d in dims} | ({"update_layer_ids"} if any(d.setting == "layer_id" for d in dims) else set())
    fixed = [line for line in flagfile_text(cfg).splitlines()
             if SETTINGS[line[2:].split("=", 1)[0]]["group"] == "training" and line[2:].split("=", 1)[0] not in searched]
    return {"space": [d.spec() for d in dims],
            "objective": {"retain_budget": parse_budget(cfg.tune_retain_budget),
                          "max_trial_seconds": cfg.tune_max_trial_seconds, "eval_tasks": list(cfg.eval_tasks),
                          "eval_limit": cfg.eval_limit, "eval_nll_tokens": cfg.eval_nll_tokens,
                          "prune_every": cfg.tune_prune_every, "trials_split": "validation",
                          **({"attack": cfg.tune_attack} if cfg.tune_attack != "none" else {}),
                          **({"seeds": cfg.seeds} if cfg.seeds > 1 else {})},
            "fixed": fixed}


def open_study(cfg: RunConfig, study_storage, name: str, ident: dict, sampler=None, pruner=None):
    """Create or load the study; refuse one with another identity (nothing of it changed)."""
    import optuna
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


def trial_config(cfg: RunConfig, dims: list[Dimension], params: dict, directory) -> RunConfig:
    """The flagfile's run with a trial's settings (the updated layers keep their offsets from --layer_id)."""
    changes: dict = {}
    n = cfg.n_topics
    for d in dims:
        value = params[d.name]
        if d.kind in ("topic_floats", "topic_ints"):
            values = list(changes.get(d.setting, getattr(cfg, d.setting)))
            values = values * n if len(values) == 1 else values
            if d.index is None:
                values = [value] * n
            else:
                values[d.index] = value
            changes[d.setting] = tuple(float(v) if d.kind == "topic_floats" else int(v) for v in values)
        elif d.kind == "list":  # a choice of several values joined by + (update_params:mlp.down_proj|default)
            changes[d.setting] = tuple(value.split("+"))
        else:
            changes[d.setting] = value
    if "layer_id" in changes:
        offsets = [u - cfg.layer_id for u in cfg.update_layer_ids]
        changes["update_layer_ids"] = tuple(changes["layer_id"] + o for o in offsets if changes["layer_id"] + o >= 0)
    return dataclasses.replace(cfg, mode="train", output_dir=str(directory), resume=False, overwrite=False,
                               allow_flag_changes=False, export=False, eval_every=0, **changes)


def seed_runs(trial_cfg: RunConfig) -> list[RunConfig]:
    """A trial's runs: itself (--seeds=1), or its --seeds runs in <trial dir>/seed_<s>/, the directories
    --mode=train --seeds=K writes (train.seed_run_configs), so best.flags reproduces every one."""
    from armu_jax.train import seed_run_configs
    return [trial_cfg] if trial_cfg.seeds == 1 else seed_run_configs(trial_cfg)


def mean_results(per_seed: list[dict], samples: list[list[dict]]) -> dict:
    """The evaluator's results of K seeds' runs as one: each task's acc, acc_norm and NLL the mean over the
    seeds, their intervals the two-way bootstrap over seeds and questions (compare.score) of the seeds'
    records. One seed: its results as they are."""
    if len(per_seed) == 1:
        return per_seed[0]
    from armu_jax import compare
    out = {}
    for task, first in per_seed[0].items():
        merged = {k: first[k] for k in ("n", "role", "chance", "nll_n") if k in first}
        for metric in ("acc", "acc_norm", "nll"):
            if metric not in first:
                continue
            merged[metric] = float(np.mean([r[task][metric] for r in per_seed]))
            pooled = compare.score(samples, [task], metric)
            if pooled is not None:
                merged[f"{metric}_ci"] = pooled["ci"]
        merged["seeds"] = len(per_seed)
        out[task] = merged
    return out


def summary(results: dict, original: dict) -> dict:
    """Forget: mean |acc - chance| (points) and NLL rise; retain: accuracy lost (points) and NLL gained, all
    against the original model, means over the tasks of each role."""
    mean = lambda xs: float(np.mean(xs)) if xs else None
    forget = [t for t, r in results.items() if r["role"] == "forget"]
    retain = [t for t, r in results.items() if r["role"] == "retain"]
    nll = lambda names, src: mean([src[t]["nll"] for t in names if "nll" in src[t]])
    out = {"forget_acc": mean([results[t]["acc"] for t in forget]),
           "forget_gap": mean([100 * abs(results[t]["acc"] - results[t]["chance"]) for t in forget]),
           "forget_nll": nll(forget, results), "retain_acc": mean([results[t]["acc"] for t in retain]),
           "retain_nll": nll(retain, results)}
    base_forget_nll, base_retain_nll = nll(forget, original), nll(retain, original)
    out["forget_nll_rise"] = None if out["forget_nll"] is None else out["forget_nll"] - base_forget_nll
    base_retain = mean([original[t]["acc"] for t in retain])
    out["retain_acc_lost"] = None if not retain else 100 * (base_retain - out["retain_acc"])
    out["retain_nll_gained"] = None if out["retain_nll"] is None else out["retain_nll"] - base_retain_nll
    return out


def objective(s: dict) -> float:
    """Minimised: distance of forget accuracy from chance (points) less the forget NLL rise (capped); with
    --tune_attack the worse of the unlearned model's and the attacked model's (s["attacked"])."""
    rise = s["forget_nll_rise"] or 0.0
    value = s["forget_gap"] - min(rise, NLL_CAP)
    return max(value, objective(s["attacked"])) if s.get("attacked") else value


def attacked_results(cfg: RunConfig, run_cfg: RunConfig, runner, trained: dict) -> dict:
    """--tune_attack on a trial's model: --relearn_steps AdamW steps on --relearn_texts texts of the corpus
    (forget or retain) that the run did not train on, then the validation tasks (what --mode=attack does to an
    export, here to the trained leaves in memory)."""
    from armu_jax.attack import RELEARN, relearn, relearn_names, text_batch, unused_texts
    from armu_jax.evaluate import evaluate_tasks
    from armu_jax.params import merge
    texts = unused_texts(run_cfg, RELEARN[cfg.tune_attack], cfg.attack_seed, cfg.relearn_texts)
    batch = text_batch(runner.scorer.tokenizer, texts, cfg.relearn_max_len)
    params = merge(runner.full, trained)
    names = relearn_names(params, cfg.relearn_params, cfg.relearn_layers or run_cfg.update_layer_ids)
    tuned, _ = relearn(runner.scorer.model, params, names, batch, cfg.relearn_steps, cfg.relearn_lr,
                       cfg.relearn_weight_decay, runner.run_context.mesh, runner.cache)
    return evaluate_tasks(runner.scorer, tuned, runner.tasks, nll_tokens=runner.nll_tokens)


def constraints(cfg: RunConfig, s: dict, run_seconds: float) -> list[float]:
    """Optuna's constraint values (feasible: every one <= 0, up to float rounding), in the order of
    constraint_names."""
    budget = parse_budget(cfg.tune_retain_budget)
    values = []
    if "acc" in budget:
        values.append(s["retain_acc_lost"] - budget["acc"])
    if "nll" in budget:
        values.append(s["retain_nll_gained"] - budget["nll"])
    if cfg.tune_max_trial_seconds:
        values.append(run_seconds - cfg.tune_max_trial_seconds)
    return values


def constraint_keys(cfg: RunConfig) -> list[str]:
    budget = parse_budget(cfg.tune_retain_budget)
    return [k for k, on in (("retain_acc_lost", "acc" in budget), ("retain_nll_gained", "nll" in budget),
                            ("run_seconds", bool(cfg.tune_max_trial_seconds))) if on]


def constraint_names(cfg: RunConfig) -> list[str]:
    budget = parse_budget(cfg.tune_retain_budget)
    return ([f"retain acc lost <= {budget['acc']:g} pt"] if "acc" in budget else []) + \
        ([f"retain NLL gained <= {budget['nll']:g}"] if "nll" in budget else []) + \
        ([f"run <= {cfg.tune_max_trial_seconds:g} s"] if cfg.tune_max_trial_seconds else [])


FEASIBLE_BELOW = 1e-9  # a retain loss of exactly the budget (2 points: 2.0000000000000004) is within it


def feasible(trial) -> bool:
    return trial.state.name == "COMPLETE" and all(c <= FEASIBLE_BELOW for c in trial.user_attrs.get("constraints", [math.inf]))


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
    from armu_jax.rundir import read_metrics
    times = np.diff([0.0] + [r["seconds"] for r in read_metrics(run_dir)])
    return float(np.median(times[1:] if len(times) > 1 else times) * len(times))


def run_trial(cfg, dims, study, trial, runner, original, out, bar) -> None:
    """One trial, start to tell: the run (pruned on the forget NLL), the validation evaluator, the objective
    and constraints; a failure is the trial's state FAIL with its error as an attribute."""
    import optuna
    heartbeat = Heartbeat(study, trial, cfg.tune_heartbeat_seconds)  # first: a worker killed from here on is seen
    directory = out / "trials" / f"{trial.number:04d}"
    trial_cfg = trial_config(cfg, dims, trial.params, directory)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("run_dir", str(directory))
    forget_texts = [text for task in runner.tasks if task.role == "forget" for text in task.nll_texts[:PRUNE_TEXTS]]
    pruning = {"seconds": 0.0}

    def prune(done, trainable):
        if cfg.tune_prune_every and forget_texts and done % cfg.tune_prune_every == 0 and done < trial_cfg.max_num_batches:
            began_nll = time.time()
            value = -runner.nll(trainable, forget_texts)
            pruning["seconds"] += time.time() - began_nll
            trial.set_user_attr("prune_seconds", round(pruning["seconds"], 2))
            trial.set_user_attr("steps", done)
            trial.report(value, done)
            if trial.should_prune():
                raise Pruned(f"forget NLL {-value:.3f} at step {done}")

    trial.set_user_attr("planned_steps", trial_cfg.max_num_batches)
    began = time.time()
    try:
        validate(trial_cfg, runner.run_context.model_cfg)
        runs = seed_runs(trial_cfg)
        measured = []
        for k, seeded in enumerate(runs):  # pruned on the first seed: the others run only for a trial that survives it
            if len(runs) > 1:
                bar.write(f"trial {trial.number}: seed {seeded.seed} ({k + 1} of {len(runs)})")
            m, trained = runner.run(seeded, prune if k == 0 else None)
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
        heartbeat.close()
        study.tell(trial, objective(s))
        ok = all(c <= FEASIBLE_BELOW for c in cons)
        after = f" (after {cfg.tune_attack}: {100 * s['attacked']['forget_acc']:.1f})" if s.get("attacked") else ""
        bar.write(f"trial {trial.number}: {_describe(trial.params)}: forget acc {100 * s['forget_acc']:.1f}{after}, NLL "
                  f"{s['forget_nll_rise']:+.2f}; retain acc lost {s['retain_acc_lost'] or 0:.1f} pt"
                  f"{'' if ok else ' (breaks the budget)'}{f' (mean of {len(runs)} seeds)' if len(runs) > 1 else ''} "
                  f"({total('seconds'):.0f} s)")
    except Pruned as why:
        heartbeat.close()
        trial.set_user_attr("seconds", round(time.time() - began, 1))
        trial.set_user_attr("pruned", str(why))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        bar.write(f"trial {trial.number}: {_describe(trial.params)}: pruned ({why})")
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


def _describe(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def work(study, budget: int, interval: int, ask, take) -> None:
    """The tune's worker loop: until the study has `budget` finished trials, fail stale trials, ask() for
    one and take(trial) it, unless it is beyond the budget (then it is marked surplus and failed without
    running). Waits while the budget is held by running trials."""
    import optuna
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


# ----------------------------------------------------------------------------- reports

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
        lines.append(f"Chosen: trial {best.number} ({_describe(best.params)}), best.flags.")
        if test:
            from armu_jax.stats import fmt_ci
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
    return (f"# --mode=tune's chosen trial {best.number} ({_describe(best.params)}), objective {best.value:.3f} on the "
            f"validation split.\n# python -m armu_jax.main --flagfile=best.flags --output_dir=runs/best\n") + text


def test_scores(cfg, dims, best, runner, out: Path) -> tuple[dict, dict]:
    """The chosen trial (its final checkpoint) and the original model on the test split, computed once
    (best_test.json)."""
    from armu_jax.checkpoints import Checkpointer
    from armu_jax.params import truncate
    from armu_jax.step import StepSpec
    from armu_jax.tasks import load_tasks
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
    from armu_jax.tasks import mean_chance
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


# ----------------------------------------------------------------------------- the mode

def check_tune_dir(out: Path, cfg: RunConfig) -> None:
    """The output directory: new, or one holding this tune (tune_flags.txt)."""
    if (out / "tune_flags.txt").is_file():
        return  # the study's identity decides whether it is the same tune
    outputs.claim(out, ignore=("study.db", "study.db-journal", "study.db.lock", ".lock"),
                  hint="it holds no tune; choose a new directory")


def tune_cli(cfg: RunConfig) -> dict:
    """--mode=tune: one worker of the study; the reports once the study has --tune_trials finished trials."""
    import optuna

    from armu_jax import hosts
    from armu_jax.cells import CellRunner
    from armu_jax.context import RunContext
    from armu_jax.tasks import load_tasks

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

