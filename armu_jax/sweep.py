"""--mode=sweep: the paper's experiment (which layer, which method) in one command and one process.

Cells are layers (--sweep_layers) x methods (--sweep_methods) x RMU's c (--sweep_steering_coeffs)
or Adaptive RMU's beta (--sweep_betas) x alpha (--sweep_alphas), every other setting from the
flagfile. Each cell is a full run (train.train) in <output_dir>/cells/<name>/, then the native
evaluator on --eval_tasks. The model, tokenizer, corpora, tokenized batches, compiled steps (one
per layer and shape: the method and its numbers are arguments of the step) and the evaluator are
built once (armu_jax.cache.ProcessCache) and reused by every cell.

With --seeds=K every setting runs K times (control vectors drawn with --seed, --seed+1, ...; the
first seed's cell keeps its plain name, the others add _s<seed>), sharing the compiled steps.

Restart: rerun the same command. A cell with result.json is done and skipped; a cell killed midway
resumes from its last checkpoint; a failed cell is recorded ("failed: ...") and tried again on the
next run. Writes sweep.csv (a row per cell and seed, each task's numbers with 95% intervals), sweep.md
(a row per setting and layer: means over seeds with intervals, and the claim below), sweep.png
(forget and retain accuracy and forget NLL vs layer with error bars, chance and the original model),
per cell samples.jsonl (a record per question) and original.json/original_samples.jsonl.

The claim (Adaptive RMU's), tested on per-question records (armu_jax.compare): at a layer, Adaptive
RMU forgets more than RMU (lower forget accuracy, paired over the same questions, each question's
correctness averaged over seeds), significant at 5% after Holm's correction over the layers, while
its retain accuracy is not significantly below the original model's; and the same by held-out NLL.
Each task knows its role (tasks.Task.role): demo_retain and mmlu are retain tasks, demo_physical a
neighbour task (reported, not part of the claim), every other task a forget task.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from armu_jax import hosts, outputs, rundir, storage
from armu_jax import study as tune_study
from armu_jax.cells import CellRunner
from armu_jax.config import RunConfig, differences, flagfile_text, from_flagfile, sweep_alpha, validate
from armu_jax.context import RunContext
from armu_jax.errors import RunFailure, UserError, first_line
from armu_jax.evaluate import read_samples, write_samples
from armu_jax.sweep_report import csv_text, report, summary
from armu_jax.tasks import load_tasks, mean_chance
from armu_jax.train import latest_checkpoint


@dataclass(frozen=True)
class Cell:
    layer: int
    method: str
    coeff: float | None  # RMU's c (every topic)
    beta: float | None  # Adaptive RMU's beta
    alpha: tuple[float, ...]  # per topic
    seed: int | None = None  # --seeds: the control vectors' seed (None: the flagfile's --seed, the first)

    @property
    def name(self) -> str:
        knob = f"c{self.coeff:g}" if self.method == "rmu" else f"b{self.beta:g}"
        seed = "" if self.seed is None else f"_s{self.seed}"
        return f"l{self.layer:02d}_{self.method}_{knob}_a{'-'.join(f'{a:g}' for a in dict.fromkeys(self.alpha))}{seed}"

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
    """The cells, in order, each setting --seeds times (--sweep_methods is checked with its group,
    config.check_sweep)."""
    seeds = [None] + [cfg.seed + k for k in range(1, cfg.seeds)]
    return [dataclasses.replace(cell, seed=seed) for cell in _settings(cfg, num_layers) for seed in seeds]


def _settings(cfg: RunConfig, num_layers: int) -> list[Cell]:
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
    seed = cfg.seed if cell.seed is None else cell.seed
    return dataclasses.replace(
        cfg, mode="train", method=cell.method, layer_id=cell.layer, seed=seed, seeds=1,
        data_seed=None if cfg.data_seed is None else cfg.data_seed + seed - cfg.seed,
        update_layer_ids=tuple(cell.layer + o for o in offsets if cell.layer + o >= 0),
        steering_coeffs=(cell.coeff,) * n if cell.coeff is not None else cfg.steering_coeffs,
        beta=cell.beta if cell.beta is not None else cfg.beta, alpha=cell.alpha, output_dir=str(directory),
        resume=done, overwrite=started and not done, allow_flag_changes=False, export=False, eval_every=0,
        cells_per_step=1)


def _row(cell: Cell, status: str, results: dict | None = None, **extra) -> dict:
    row = {"layer": cell.layer, "method": cell.method, "coeff": cell.coeff, "beta": cell.beta,
           "alpha": "/".join(f"{a:g}" for a in dict.fromkeys(cell.alpha)), "seed": cell.seed, "status": status,
           "setting": cell.setting, "name": cell.name, "results": results or {}}
    if results:
        row.update(summary(results))
    row.update(extra)
    return row


def check_sweep_dir(cfg: RunConfig, out: Path) -> Path:
    """The sweep's directory: new, or one holding this sweep (its sweep_flags.txt agrees on the training
    settings; the --sweep_* flags may change). Returns the flagfile's path; nothing is written."""
    saved = out / "sweep_flags.txt"
    if not saved.is_file():  # a new sweep: the directory must be new or empty
        try:
            outputs.claim(out, ignore=(*storage.LOCK_FILES, "study.db", "study.db.lock"), hint="it holds no sweep; choose a new directory")
        except UserError:
            # --tune_storage: a worker started with the same command may be writing this sweep's flags now
            deadline = time.time() + (10 if cfg.tune_storage else 0)
            while not saved.is_file() and time.time() < deadline:
                time.sleep(0.1)
            if not saved.is_file():
                raise
    if saved.is_file():
        changed = differences(from_flagfile(saved), cfg)
        if changed and not cfg.allow_flag_changes:
            raise UserError(f"{out} holds a sweep with other settings: " + "; ".join(changed) + "; rerun with "
                            f"--flagfile={saved} (the --sweep_* flags may change), choose a new --output_dir, "
                            "or add --allow_flag_changes")
    return saved


CELL_ERRORS = (UserError, RunFailure, ValueError, RuntimeError, OSError)  # a cell's failure: its row's status


def run_cell(cfg: RunConfig, cell: Cell, directory: Path, runner: CellRunner, bar) -> dict:
    """One cell of the sweep: its run (resumed if it was cut short), then the evaluator on the trained
    weights; a failure is the row's status (tried again on the next run of the sweep)."""
    began = time.time()
    seed = cfg.seed if cell.seed is None else cell.seed  # the CSV's seed column: the seed the cell ran with
    try:
        measured, _ = runner.run(cell_config(cfg, cell, directory))
        results = measured.pop("results")
        write_samples(directory / "samples.jsonl", measured.pop("samples"))
        return _row(cell, "ok", results, seed=seed, **measured)
    except CELL_ERRORS as err:
        line = first_line(err)
        bar.write(f"{cell.name}: failed: {line}")
        return _row(cell, f"failed: {line}", seed=seed, seconds=round(time.time() - began, 1))


def _progress_line(row: dict, name: str) -> str:
    retain = f", retain acc {100 * row['retain_acc']:.1f}" if row["retain_acc"] is not None else ""
    return f"{name}: forget acc {100 * row['forget_acc']:.1f}{retain} ({row['seconds']:.0f} s)"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; remove it (its cell or the original model is then evaluated "
                        "again) and rerun the sweep") from None


def side_by_side(cfg: RunConfig, cells: list[Cell], out: Path) -> list[list[Cell]]:
    """The cells to run, in groups of up to --cells_per_step that can share one compiled step: the same
    layer, the same batches (--data_seed) and the same progress (the step of their last checkpoint), in the
    plan's order."""
    groups: dict[tuple, list[list[Cell]]] = {}
    for cell in cells:
        run_cfg = cell_config(cfg, cell, out / "cells" / cell.name)
        key = (cell.layer, run_cfg.data_seed, latest_checkpoint(Path(run_cfg.output_dir)) if run_cfg.resume else None)
        chunks = groups.setdefault(key, [[]])
        if len(chunks[-1]) == cfg.cells_per_step:
            chunks.append([])
        chunks[-1].append(cell)
    return [chunk for chunks in groups.values() for chunk in chunks]


def run_group(cfg: RunConfig, group: list[Cell], out: Path, runner: CellRunner, bar) -> list[dict]:
    """The rows of cells trained side by side; a group that cannot start (one cell's bad input) runs its
    cells one at a time instead, each failing or not on its own."""
    if len(group) == 1:
        return [run_cell(cfg, group[0], out / "cells" / group[0].name, runner, bar)]
    began = time.time()
    try:
        outcomes = runner.run_side_by_side([cell_config(cfg, c, out / "cells" / c.name) for c in group])
    except CELL_ERRORS as err:
        bar.write(f"{', '.join(c.name for c in group)}: cannot run side by side ({first_line(err)}); one at a time")
        return [run_cell(cfg, c, out / "cells" / c.name, runner, bar) for c in group]
    rows = []
    for cell, outcome in zip(group, outcomes):
        seed = cfg.seed if cell.seed is None else cell.seed
        if isinstance(outcome, RunFailure):
            line = first_line(outcome)
            bar.write(f"{cell.name}: failed: {line}")
            rows.append(_row(cell, f"failed: {line}", seed=seed, seconds=round(time.time() - began, 1)))
            continue
        results = outcome.pop("results")
        write_samples(out / "cells" / cell.name / "samples.jsonl", outcome.pop("samples"))
        rows.append(_row(cell, "ok", results, seed=seed, **outcome))
    return rows


def run_cells(cfg: RunConfig, cells: list[Cell], out: Path, runner: CellRunner, task_names: list[str]) -> list[dict]:
    """Every cell: done ones (result.json "ok") read back, the others run (--cells_per_step at a time, side by
    side); sweep.csv rewritten after each cell or group, so an interrupted sweep leaves the table of what is
    done. Rows in the plan's order."""
    rows: dict[str, dict] = {}
    todo = []
    for cell in cells:
        result_file = out / "cells" / cell.name / "result.json"
        row = _read_json(result_file) if result_file.is_file() else None
        if row is not None and row["status"] == "ok":
            rows[cell.name] = row
        else:
            todo.append(cell)
    ordered = lambda: [rows[c.name] for c in cells if c.name in rows]
    bar = tqdm(total=len(cells), initial=len(rows), desc="sweep", unit="cell")
    for group in side_by_side(cfg, todo, out):
        for cell, row in zip(group, run_group(cfg, group, out, runner, bar)):
            outputs.write_json(out / "cells" / cell.name / "result.json", row)
            rows[cell.name] = row
            if row["status"] == "ok":
                bar.write(_progress_line(row, cell.name))
            bar.update(1)
        outputs.write_text(out / "sweep.csv", csv_text(ordered(), task_names))
    bar.close()
    outputs.write_text(out / "sweep.csv", csv_text(ordered(), task_names))
    return ordered()


def _result(out: Path, cell: Cell) -> dict | None:
    path = out / "cells" / cell.name / "result.json"
    return _read_json(path) if path.is_file() else None


def open_cell_study(cfg: RunConfig, names: list[str]):
    """The sweep's Optuna study in --tune_storage (a GridSampler over the cell names): (study, the cell's
    distribution)."""
    import optuna  # optional: only the tune and spread sweeps load Optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune_study.quiet_optuna()
    study_storage = tune_study.open_storage(cfg)

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values):  # its study.stop() is for study.optimize; the loop
            pass                                              # of run_cells_shared ends when every cell is settled

    try:
        study = optuna.create_study(storage=study_storage, study_name=cfg.tune_study or "sweep",
                                    sampler=Grid({"cell": names}), load_if_exists=True)
    except Exception as err:
        raise UserError(f"--tune_storage: cannot open study {cfg.tune_study or 'sweep'!r} ({first_line(err)})") from None
    return study, {"cell": optuna.distributions.CategoricalDistribution(names)}


def claim_cell(study, distribution, names: dict, free: list[Cell]):
    """A trial on a free cell, or None: a trial the grid gave a cell another worker runs (or one done) is
    marked surplus and failed (a free cell is queued in its place)."""
    import optuna  # optional: only the tune and spread sweeps load Optuna
    trial = study.ask(distribution)
    name = trial.params["cell"]
    claimed = any(t.number < trial.number and t.params.get("cell") == name and t.state.name == "RUNNING"
                  and not t.user_attrs.get("surplus") for t in study.get_trials(deepcopy=False))
    if claimed or names[name] not in free:
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if not claimed:
            study.enqueue_trial({"cell": free[0].name}, skip_if_exists=False)
        return None
    return trial


def run_claimed(cfg: RunConfig, study, trial, cell: Cell, out: Path, runner: CellRunner, bar) -> None:
    """A claimed cell run under its trial's heartbeat; its result.json written, the trial told."""
    import optuna  # optional: only the tune and spread sweeps load Optuna
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    heartbeat = tune_study.Heartbeat(study, trial, cfg.tune_heartbeat_seconds)
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


def run_cells_shared(cfg: RunConfig, cells: list[Cell], out: Path, runner: CellRunner, task_names: list[str]) -> list[dict]:
    """--tune_storage given: the cells spread over every worker started with the same command, through an
    Optuna study (GridSampler over the cell names) in that storage. A cell is claimed before it runs: of the
    running trials on one cell the lowest-numbered runs it and any other is marked surplus and failed;
    a cell with result.json "ok" never runs again. A failed cell is tried once per run of the command; a
    worker that dies leaves its cell to the others after 2 x --tune_heartbeat_seconds. Every worker
    returns when every cell is done (or failed in this round) and writes the same tables."""
    names = {c.name: c for c in cells}
    study, distribution = open_cell_study(cfg, list(names))
    began = time.time()
    bar = tqdm(total=len(cells), desc="sweep", unit="cell")

    def settled(cell):  # ok, or failed in this round of the command
        row = _result(out, cell)
        return row is not None and (row["status"] == "ok" or (out / "cells" / cell.name / "result.json").stat().st_mtime > began)

    while True:
        tune_study.fail_stale(study, cfg.tune_heartbeat_seconds)
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
        trial = claim_cell(study, distribution, names, free)
        if trial is not None:
            run_claimed(cfg, study, trial, names[trial.params["cell"]], out, runner, bar)
    bar.close()
    rows = [r for r in (_result(out, c) for c in cells) if r is not None]
    outputs.write_text(out / "sweep.csv", csv_text(rows, task_names))
    return rows


def evaluate_original(out: Path, runner: CellRunner, tasks: list) -> tuple[dict, list[dict]]:
    """The original model's results and records (original.json, original_samples.jsonl), evaluated once
    (again when the records are missing: a sweep begun before samples.jsonl)."""
    original_file, samples_file = out / "original.json", out / "original_samples.jsonl"
    if original_file.is_file() and samples_file.is_file():
        original = _read_json(original_file)
        for name, result in original.items():  # a sweep begun before tasks carried their role
            result.setdefault("role", next((t.role for t in tasks if t.name == name), "forget"))
        return original, read_samples(samples_file)
    print("evaluating the original model")
    samples: list[dict] = []
    original = runner.evaluate(samples=samples)
    write_samples(samples_file, samples)
    outputs.write_json(original_file, original)
    return original, samples


def sweep_cli(cfg: RunConfig) -> list[dict]:
    """--mode=sweep: run (or continue) the sweep in --output_dir; returns the rows."""

    if cfg.tune_storage:
        tune_study.storage_spec(cfg)  # one line for a storage the workers cannot share, before anything loads
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
        original, original_records = evaluate_original(out, runner, tasks)
        rows = (run_cells_shared if cfg.tune_storage else run_cells)(cfg, cells, out, runner, [t.name for t in tasks])
        table = report(out, rows, original, original_records, mean_chance(tasks, "forget"))
        print(table)
        failed = sum(r["status"] != "ok" for r in rows)
        print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'sweep.png'}"
              + (f"; {failed} cell(s) failed: rerun the same command to try them again" if failed else ""))
        return rows
    finally:
        if lock:
            lock.release()
