"""--mode=sweep: the paper's experiment (which layer, which method) in one command and one process.

Cells are layers (--sweep_layers) x methods (--sweep_methods) x RMU's c (--sweep_steering_coeffs)
or Adaptive RMU's beta (--sweep_betas) x alpha (--sweep_alphas), every other setting from the
flagfile. Each cell is a full run (train.train) in <output_dir>/cells/<name>/, then the native
evaluator on --eval_tasks. The model, tokenizer, corpora, tokenized batches, compiled steps (one
per layer and shape: the method and its numbers are arguments of the step) and the evaluator are
built once (armu_jax.cache.ProcessCache) and reused by every cell.

Restart: rerun the same command. A cell with result.json is done and skipped; a cell killed midway
resumes from its last checkpoint; a failed cell is recorded ("failed: ...") and tried again on the
next run. Writes sweep.csv (a row per cell), sweep.md (table and the claim below) and sweep.png
(forget and retain accuracy vs layer, RMU vs Adaptive RMU, with chance and the original model).

The claim (Adaptive RMU's): at a layer, Adaptive RMU forgets more than RMU (lower mean accuracy on
the forget tasks) while its mean retain accuracy is within 2 points of the original model's; and,
finer, the same by held-out NLL (higher forget NLL, retain NLL within +0.05 nat/token).
Each task knows its role (tasks.Task.role): demo_retain and mmlu are retain tasks, every other
task a forget task.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from armu_jax import outputs, rundir, storage
from armu_jax.config import RunConfig, differences, flagfile_text, from_flagfile, sweep_alpha, validate
from armu_jax.errors import RunFailure, UserError, first_line

FIXED_COLUMNS = ("layer", "method", "coeff", "beta", "alpha", "status")
TAIL_COLUMNS = ("forget_loss", "retain_loss", "seconds", "train_seconds", "eval_seconds", "first_step_seconds")
METRICS = ("acc", "acc_norm", "nll")
RETAIN_WITHIN = 0.02  # the claim's retain tolerance: 2 points of accuracy
RETAIN_NLL_WITHIN = 0.05  # and by held-out NLL: +0.05 nat/token


@dataclass(frozen=True)
class Cell:
    layer: int
    method: str
    coeff: float | None  # RMU's c (every topic)
    beta: float | None  # Adaptive RMU's beta
    alpha: tuple[float, ...]  # per topic

    @property
    def name(self) -> str:
        knob = f"c{self.coeff:g}" if self.method == "rmu" else f"b{self.beta:g}"
        return f"l{self.layer:02d}_{self.method}_{knob}_a{'-'.join(f'{a:g}' for a in dict.fromkeys(self.alpha))}"

    @property
    def setting(self) -> str:
        """The cell without its layer: one line of the figure."""
        knob = f"c={self.coeff:g}" if self.method == "rmu" else f"beta={self.beta:g}"
        return f"{self.method} {knob} alpha={'/'.join(f'{a:g}' for a in dict.fromkeys(self.alpha))}"


def parse_layers(spec: str | None, default: int, num_layers: int) -> list[int]:
    """START:STOP:STEP (Python range) or a comma list; every layer must exist in the model."""
    if not spec:
        return [default]
    try:
        if ":" in spec:
            parts = [int(p) for p in spec.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            layers = list(range(*parts))
        else:
            layers = [int(p) for p in spec.split(",")]
    except ValueError:
        raise UserError(f"--sweep_layers={spec}: expected START:STOP:STEP (e.g. 3:28:2) or a list (3,7,11)") from None
    if not layers:
        raise UserError(f"--sweep_layers={spec} names no layer")
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise UserError(f"--sweep_layers={spec}: layers {bad} are outside the model's {num_layers} layers "
                        f"(0..{num_layers - 1})")
    return list(dict.fromkeys(layers))


def plan(cfg: RunConfig, num_layers: int) -> list[Cell]:
    """The cells, in order (--sweep_methods is checked with its group, config.check_sweep)."""
    layers = parse_layers(cfg.sweep_layers, cfg.layer_id, num_layers)
    alphas = [sweep_alpha(spec, cfg.n_topics) for spec in cfg.sweep_alphas] if cfg.sweep_alphas else [cfg.alpha]
    cells = []
    for layer in layers:
        for method in dict.fromkeys(cfg.sweep_methods):
            for alpha in alphas:
                if method == "rmu":
                    coeffs = cfg.sweep_steering_coeffs or [cfg.steering_coeffs[0]]
                    if not cfg.sweep_steering_coeffs and len(set(cfg.steering_coeffs)) > 1:
                        raise UserError("--mode=sweep runs RMU with one c for every topic; give --sweep_steering_coeffs")
                    cells += [Cell(layer, method, float(c), None, alpha) for c in coeffs]
                else:
                    cells += [Cell(layer, method, None, float(b), alpha) for b in cfg.sweep_betas or [cfg.beta]]
    return cells


def cell_config(cfg: RunConfig, cell: Cell, directory: Path) -> RunConfig:
    """The flagfile's run at this cell: the updated layers keep their offsets from --layer_id."""
    offsets = [u - cfg.layer_id for u in cfg.update_layer_ids]
    done = directory.is_dir() and (directory / "checkpoints").is_dir() and (directory / "flags.txt").is_file()
    started = directory.is_dir() and any(directory.iterdir())
    n = cfg.n_topics
    return dataclasses.replace(
        cfg, mode="train", method=cell.method, layer_id=cell.layer,
        update_layer_ids=tuple(cell.layer + o for o in offsets if cell.layer + o >= 0),
        steering_coeffs=(cell.coeff,) * n if cell.coeff is not None else cfg.steering_coeffs,
        beta=cell.beta if cell.beta is not None else cfg.beta, alpha=cell.alpha, output_dir=str(directory),
        resume=done, overwrite=started and not done, allow_flag_changes=False, export=False, eval_every=0)


def summary(results: dict) -> dict:
    """Mean acc and NLL over the forget tasks and over the retain tasks (each result carries its
    task's role)."""
    out = {}
    for side in ("forget", "retain"):
        names = [t for t, r in results.items() if r["role"] == side]
        out[f"{side}_acc"] = float(np.mean([results[t]["acc"] for t in names])) if names else None
        nll = [results[t]["nll"] for t in names if "nll" in results[t]]
        out[f"{side}_nll"] = float(np.mean(nll)) if nll else None
    return out


def claim(rows: list[dict], original: dict) -> list[dict]:
    """Per (RMU setting, Adaptive RMU setting) with the same alpha: at how many layers swept with both
    Adaptive RMU has lower mean forget accuracy and retain accuracy within 2 points of the original."""
    base = summary(original)
    ok = [r for r in rows if r["status"] == "ok"]
    out = []
    alpha_of = {r["setting"]: r["alpha"] for r in ok}
    for rmu_setting in dict.fromkeys(r["setting"] for r in ok if r["method"] == "rmu"):
        for ada_setting in dict.fromkeys(r["setting"] for r in ok if r["method"] == "adaptive_rmu"):
            if alpha_of[rmu_setting] != alpha_of[ada_setting]:
                continue
            rmu = {r["layer"]: r for r in ok if r["setting"] == rmu_setting}
            ada = {r["layer"]: r for r in ok if r["setting"] == ada_setting}
            layers = sorted(set(rmu) & set(ada))
            wins = [l for l in layers if ada[l]["forget_acc"] < rmu[l]["forget_acc"]
                    and (base["retain_acc"] is None or ada[l]["retain_acc"] >= base["retain_acc"] - RETAIN_WITHIN - 1e-9)]
            # The same question asked of held-out NLL (finer than 40 questions' accuracy): a forget NLL
            # more than 0.05 nat/token above RMU's with the retain NLL within +0.05 of the original.
            wins_nll = [l for l in layers if None not in (ada[l]["forget_nll"], rmu[l]["forget_nll"])
                        and ada[l]["forget_nll"] > rmu[l]["forget_nll"] + RETAIN_NLL_WITHIN
                        and (base["retain_nll"] is None or ada[l]["retain_nll"] <= base["retain_nll"] + RETAIN_NLL_WITHIN)]
            out.append({"rmu": rmu_setting, "adaptive_rmu": ada_setting, "layers": layers, "wins": wins,
                        "count": len(wins), "of": len(layers), "wins_nll": wins_nll})
    return out


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


def _row(cell: Cell, status: str, results: dict | None = None, **extra) -> dict:
    row = {"layer": cell.layer, "method": cell.method, "coeff": cell.coeff, "beta": cell.beta,
           "alpha": "/".join(f"{a:g}" for a in dict.fromkeys(cell.alpha)), "status": status,
           "setting": cell.setting, "name": cell.name, "results": results or {}}
    if results:
        row.update(summary(results))
    row.update(extra)
    return row


def csv_text(rows: list[dict], tasks: list[str]) -> str:
    columns = [*FIXED_COLUMNS, *(f"{t}/{m}" for t in tasks for m in METRICS), *TAIL_COLUMNS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    fmt = lambda v: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
    for r in rows:
        coeff = r["coeff"] if r["coeff"] is not None else r.get("coeff_used")  # Adaptive: the c it derived
        values = [r["layer"], r["method"], fmt(coeff), fmt(r["beta"]), r["alpha"], r["status"]]
        values += [fmt(r["results"].get(t, {}).get(m)) for t in tasks for m in METRICS]
        values += [fmt(r.get(k)) for k in TAIL_COLUMNS]
        writer.writerow(values)
    return buffer.getvalue()


def markdown(rows: list[dict], original: dict, claims: list[dict]) -> str:
    base = summary(original)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    nll = lambda v: "-" if v is None else f"{v:.3f}"
    table = [["-", "original", "-", "-", "-", pct(base["forget_acc"]), pct(base["retain_acc"]), nll(base["forget_nll"]),
              nll(base["retain_nll"]), "-"]]
    for r in rows:
        coeff = r["coeff"] if r["coeff"] is not None else r.get("coeff_used")
        table.append([r["layer"], r["method"], "-" if coeff is None else f"{coeff:.4g}",
                      "-" if r["beta"] is None else f"{r['beta']:g}", r["alpha"], pct(r.get("forget_acc")),
                      pct(r.get("retain_acc")), nll(r.get("forget_nll")), nll(r.get("retain_nll")), r["status"]])
    lines = [outputs.markdown_table(["layer", "method", "coeff", "beta", "alpha", "forget acc", "retain acc",
                                     "forget NLL", "retain NLL", "status"], table), ""]
    for c in claims:
        share = f" ({100 * c['count'] / c['of']:.0f}%)" if c["of"] else ""
        wins = ", ".join(map(str, c["wins"])) or "none"
        lines.append(f"Adaptive RMU ({c['adaptive_rmu']}) forgets more than RMU ({c['rmu']}) with retain within "
                     f"{100 * RETAIN_WITHIN:.0f} points of the original at {c['count']} of {c['of']} layers{share}: "
                     f"{wins}.")
        if c["of"]:
            lines.append(f"By held-out NLL (forget NLL more than {RETAIN_NLL_WITHIN} above RMU's, retain NLL within "
                         f"+{RETAIN_NLL_WITHIN} nat/token of the original): "
                         f"{len(c['wins_nll'])} of {c['of']} layers ({100 * len(c['wins_nll']) / c['of']:.0f}%): "
                         f"{', '.join(map(str, c['wins_nll'])) or 'none'}.")
    return "\n".join(lines)


def plot_sweep(path: Path, rows: list[dict], original: dict, chance: float | None) -> list[dict]:
    """Forget accuracy, retain accuracy and forget NLL vs layer, a line per setting (RMU dashed), with
    chance and the original model; returns what is drawn."""
    base = summary(original)
    fig, axes = outputs.figure(1, 3, figsize=(18, 4.8))
    ok = [r for r in rows if r["status"] == "ok"]
    panels = ((axes[0], "forget_acc", 100, "forget tasks: mean accuracy % (lower: more forgotten)"),
              (axes[1], "retain_acc", 100, "retain tasks: mean accuracy % (higher: kept)"),
              (axes[2], "forget_nll", 1, "forget tasks: held-out NLL per token (higher: more forgotten)"))
    for k, setting in enumerate(dict.fromkeys(r["setting"] for r in ok)):
        mine = sorted((r for r in ok if r["setting"] == setting), key=lambda r: r["layer"])
        style = "-o" if mine[0]["method"] == "adaptive_rmu" else "--s"
        for ax, key, scale, _ in panels:
            if all(r.get(key) is not None for r in mine):
                ax.plot([r["layer"] for r in mine], [scale * r[key] for r in mine], style, color=f"C{k}",
                        markersize=4, label=setting)
    for ax, key, scale, title in panels:
        if key.endswith("acc") and chance is not None:
            ax.axhline(100 * chance, color="gray", linestyle=":", linewidth=1, label="chance")
        if base[key] is not None:
            ax.axhline(scale * base[key], color="black", linestyle="--", linewidth=1, label="original")
        ax.set_xlabel("unlearn layer l (updated: the layers below it, by --update_layer_ids' offsets)")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylim(0, 100)
    axes[1].set_ylim(0, 100)
    axes[1].legend(fontsize=7)
    return outputs.save_figure(fig, path)


def check_sweep_dir(cfg: RunConfig, out: Path) -> Path:
    """The sweep's directory: new, or one holding this sweep (its sweep_flags.txt agrees on the training
    settings; the --sweep_* flags may change). Returns the flagfile's path; nothing is written."""
    saved = out / "sweep_flags.txt"
    if saved.is_file():
        changed = differences(from_flagfile(saved), cfg)
        if changed and not cfg.allow_flag_changes:
            raise UserError(f"{out} holds a sweep with other settings: " + "; ".join(changed) + "; rerun with "
                            f"--flagfile={saved} (the --sweep_* flags may change), choose a new --output_dir, "
                            "or add --allow_flag_changes")
    else:  # a new sweep: the directory must be new or empty
        outputs.claim(out, ignore=(".lock", "study.db", "study.db.lock"), hint="it holds no sweep; choose a new directory")
    return saved


class CellRunner:
    """The one cell runner of the sweep and the tune: what every cell (a sweep's) or trial (a tune's) of
    one process shares, built once: the whole model, the process cache (tokenizer, tokenized corpora,
    compiled steps per layer and shape, the scorer) and the evaluation tasks."""

    def __init__(self, cfg: RunConfig, run, tasks: list):
        from armu_jax.cache import ProcessCache
        from armu_jax.evaluate import EvalSpec
        self.cache = ProcessCache(keep_full=True)
        self.run_context = run
        self.full = self.cache.params(run.model_dir, cfg.dtype, run.mesh)
        self.scorer = self.cache.scorer(EvalSpec.of(cfg, run.model_dir, run.mesh))
        self.tasks, self.nll_tokens = tasks, cfg.eval_nll_tokens

    def evaluate(self, trained: dict | None = None, tasks: list | None = None) -> dict:
        """The native evaluator on the original model or with the trained leaves swapped in."""
        from armu_jax.evaluate import evaluate_tasks
        from armu_jax.params import merge
        return evaluate_tasks(self.scorer, merge(self.full, trained) if trained else self.full,
                              self.tasks if tasks is None else tasks, nll_tokens=self.nll_tokens)

    def nll(self, trained: dict, texts: list[str]) -> float:
        """Held-out NLL per token of texts with the trained leaves (the tune's pruning signal)."""
        from armu_jax.params import merge
        return self.scorer.nll_per_token(self.scorer.place(merge(self.full, trained)), texts, self.nll_tokens,
                                         desc="pruning nll")

    def run(self, run_cfg: RunConfig, hook=None) -> tuple[dict, dict]:
        """One cell: its run (resumed if run_cfg says so), then the evaluator on the trained weights:
        ({results, forget_loss, retain_loss, coeff_used, first_step_seconds, *_seconds}, trained leaves).
        Raises what the run raises."""
        from armu_jax.train import train
        began = time.time()
        run_dir, trained = train(run_cfg, self.cache, hook)
        trained_at = time.time()
        results = self.evaluate(trained)
        done = time.time()
        return {"results": results, **_metrics_of(run_dir, run_cfg.n_topics),
                "train_seconds": round(trained_at - began, 1), "eval_seconds": round(done - trained_at, 1),
                "seconds": round(done - began, 1)}, trained


CELL_ERRORS = (UserError, RunFailure, ValueError, RuntimeError, OSError)  # a cell's failure: its row's status


def run_cell(cfg: RunConfig, cell: Cell, directory: Path, runner: CellRunner, bar) -> dict:
    """One cell of the sweep: its run (resumed if it was cut short), then the evaluator on the trained
    weights; a failure is the row's status (tried again on the next run of the sweep)."""
    began = time.time()
    try:
        measured, _ = runner.run(cell_config(cfg, cell, directory))
        results = measured.pop("results")
        return _row(cell, "ok", results, **measured)
    except CELL_ERRORS as err:
        line = first_line(err)
        bar.write(f"{cell.name}: failed: {line}")
        return _row(cell, f"failed: {line}", seconds=round(time.time() - began, 1))


def _progress_line(row: dict, name: str) -> str:
    retain = f", retain acc {100 * row['retain_acc']:.1f}" if row["retain_acc"] is not None else ""
    return f"{name}: forget acc {100 * row['forget_acc']:.1f}{retain} ({row['seconds']:.0f} s)"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; remove it (its cell or the original model is then evaluated "
                        "again) and rerun the sweep") from None


def run_cells(cfg: RunConfig, cells: list[Cell], out: Path, runner: CellRunner, task_names: list[str]) -> list[dict]:
    """Every cell in order: done ones (result.json "ok") read back, the others run; sweep.csv rewritten
    after each cell, so an interrupted sweep leaves the table of what is done."""
    rows = []
    bar = tqdm(cells, desc="sweep", unit="cell")
    for cell in bar:
        directory = out / "cells" / cell.name
        result_file = directory / "result.json"
        if result_file.is_file():
            row = _read_json(result_file)
            if row["status"] == "ok":
                rows.append(row)
                continue
        row = run_cell(cfg, cell, directory, runner, bar)
        outputs.write_json(result_file, row)
        rows.append(row)
        if row["status"] == "ok":
            bar.write(_progress_line(row, cell.name))
        outputs.write_text(out / "sweep.csv", csv_text(rows, task_names))
    bar.close()
    outputs.write_text(out / "sweep.csv", csv_text(rows, task_names))
    return rows


def _result(out: Path, cell: Cell) -> dict | None:
    path = out / "cells" / cell.name / "result.json"
    return _read_json(path) if path.is_file() else None


def run_cells_shared(cfg: RunConfig, cells: list[Cell], out: Path, runner: CellRunner, task_names: list[str]) -> list[dict]:
    """--tune_storage given: the cells spread over every worker started with the same command, through an
    Optuna study (GridSampler over the cell names) in that storage. A cell is claimed before it runs: of the
    running trials on one cell the lowest-numbered runs it and any other is marked surplus and failed;
    a cell with result.json "ok" never runs again. A failed cell is tried once per run of the command; a
    worker that dies leaves its cell to the others after 2 x --tune_heartbeat_seconds. Every worker
    returns when every cell is done (or failed in this round) and writes the same tables."""
    import optuna

    from armu_jax import tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune.quiet_optuna()
    names = {c.name: c for c in cells}
    study_storage = tune.open_storage(cfg)
    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values):  # its study.stop() is for study.optimize; the loop
            pass                                              # below ends when every cell is settled

    sampler = Grid({"cell": list(names)})
    try:
        study = optuna.create_study(storage=study_storage, study_name=cfg.tune_study or "sweep", sampler=sampler,
                                    load_if_exists=True)
    except Exception as err:
        raise UserError(f"--tune_storage: cannot open study {cfg.tune_study or 'sweep'!r} ({first_line(err)})") from None
    distribution = {"cell": optuna.distributions.CategoricalDistribution(list(names))}
    began = time.time()
    bar = tqdm(total=len(cells), desc="sweep", unit="cell")

    def settled(cell):  # ok, or failed in this round of the command
        row = _result(out, cell)
        return row is not None and (row["status"] == "ok" or (out / "cells" / cell.name / "result.json").stat().st_mtime > began)

    while True:
        tune.fail_stale(study, cfg.tune_heartbeat_seconds)
        pending = [c for c in cells if not settled(c)]
        bar.n = len(cells) - len(pending)
        bar.refresh()
        if not pending:
            break
        trials = study.get_trials(deepcopy=False)
        running = {t.params.get("cell") for t in trials if t.state.name == "RUNNING" and not t.user_attrs.get("surplus")}
        free = [c for c in pending if c.name not in running]
        if not free:
            time.sleep(min(cfg.tune_heartbeat_seconds, 5))  # the rest run on other workers
            continue
        trial = study.ask(distribution)
        name = trial.params["cell"]
        claimed = any(t.number < trial.number and t.params.get("cell") == name and t.state.name == "RUNNING"
                      and not t.user_attrs.get("surplus") for t in study.get_trials(deepcopy=False))
        if claimed or names[name] not in free:  # another worker's, or done: hand the grid a free cell instead
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if not claimed:
                study.enqueue_trial({"cell": free[0].name}, skip_if_exists=False)
            continue
        cell = names[name]
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        heartbeat = tune.Heartbeat(study, trial, cfg.tune_heartbeat_seconds)
        try:
            row = run_cell(cfg, cell, out / "cells" / cell.name, runner, bar)
        except BaseException:
            heartbeat.close()
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        heartbeat.close()
        outputs.write_json(out / "cells" / cell.name / "result.json", row)
        if row["status"] == "ok":
            study.tell(trial, row["forget_acc"])
            bar.write(_progress_line(row, cell.name))
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    bar.close()
    rows = [r for r in (_result(out, c) for c in cells) if r is not None]
    outputs.write_text(out / "sweep.csv", csv_text(rows, task_names))
    return rows


def sweep_cli(cfg: RunConfig) -> list[dict]:
    """--mode=sweep: run (or continue) the sweep in --output_dir; returns the rows."""
    from armu_jax import hosts
    from armu_jax.context import RunContext
    from armu_jax.tasks import load_tasks, mean_chance

    if hosts.several():  # --output_dir and --overwrite are checked with the sweep group (config.check_sweep)
        raise UserError("--mode=sweep runs in one process (its cells may use all of its devices via --mesh); "
                        "start it without --num_processes/--multihost")
    out = storage.path(cfg.output_dir, "--output_dir")
    storage.check_bucket(out, "--output_dir")
    run = RunContext.of(cfg)
    cells = plan(cfg, run.model_cfg.num_hidden_layers)
    for cell in cells:  # every cell's settings are checked before the first one runs
        validate(cell_config(cfg, cell, out / "cells" / cell.name), run.model_cfg)
    tasks = load_tasks(cfg.eval_tasks, cfg.eval_limit, cfg.eval_split)
    saved = check_sweep_dir(cfg, out)

    lock = None if cfg.tune_storage else rundir.lock(out)  # shared: the study's claims order the workers
    try:
        outputs.write_text(saved, flagfile_text(cfg))
        runner = CellRunner(cfg, run, tasks)
        original_file = out / "original.json"
        if original_file.is_file():
            original = _read_json(original_file)
            for name, result in original.items():  # a sweep begun before tasks carried their role
                result.setdefault("role", next((t.role for t in tasks if t.name == name), "forget"))
        else:
            print("evaluating the original model")
            original = runner.evaluate()
            outputs.write_json(original_file, original)
        rows = (run_cells_shared if cfg.tune_storage else run_cells)(cfg, cells, out, runner, [t.name for t in tasks])
        chance = mean_chance(tasks, "forget")
        table = markdown(rows, original, claim(rows, original))
        outputs.write_text(out / "sweep.md", table + "\n")
        plot_sweep(out / "sweep.png", rows, original, chance)
        print(table)
        failed = sum(r["status"] != "ok" for r in rows)
        print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'sweep.png'}"
              + (f"; {failed} cell(s) failed: rerun the same command to try them again" if failed else ""))
        return rows
    finally:
        if lock:
            lock.release()
