"""The tune's search: what it searches (--tune_space's grammar, Dimension), a trial's run (trial_config,
seed_runs), and how a trial is scored (summary, objective, constraints, feasible); the tune group's
checks on the config (check). No Optuna study and no run here: armu_jax/tune.py runs the trials,
armu_jax/tune_report.py writes what they found. The objective and the constraints are described in
tune.py's docstring."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from armu_jax import compare
from armu_jax.config import SETTINGS, RunConfig, bound_error, flagfile_text
from armu_jax.errors import UserError
from armu_jax.study import storage_spec
from armu_jax.train import seed_run_configs

SEARCHABLE_KINDS = ("int", "float", "enum", "bool", "topic_floats", "topic_ints", "list")  # a list: by choices


NOT_SEARCHABLE = ("model", "forget_corpora", "retain_corpora", "mesh", "dtype", "control_vectors", "update_layer_ids")


NLL_CAP = 1.0  # nat/token: the NLL rise beyond which the objective gains nothing (the target's +1)


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
        import optuna  # optional: only the tune and spread sweeps load Optuna
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
    return [trial_cfg] if trial_cfg.seeds == 1 else seed_run_configs(trial_cfg)


def mean_results(per_seed: list[dict], samples: list[list[dict]]) -> dict:
    """The evaluator's results of K seeds' runs as one: each task's acc, acc_norm and NLL the mean over the
    seeds, their intervals the two-way bootstrap over seeds and questions (compare.score) of the seeds'
    records. One seed: its results as they are."""
    if len(per_seed) == 1:
        return per_seed[0]
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


def describe_params(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())

