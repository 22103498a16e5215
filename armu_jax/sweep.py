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

from armu_jax import compare, outputs, rundir, stats, storage
from armu_jax import study as tune_study
from armu_jax.cells import CellRunner
from armu_jax.config import RunConfig, differences, flagfile_text, from_flagfile, sweep_alpha, validate
from armu_jax.errors import RunFailure, UserError, first_line
from armu_jax.evaluate import read_samples, write_samples

TAIL_COLUMNS = ("forget_loss", "retain_loss", "seconds", "train_seconds", "eval_seconds", "first_step_seconds",
                "side_by_side")


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


SIDES = ("forget", "retain", "neighbour")


def summary(results: dict) -> dict:
    """Mean acc and NLL over the forget tasks, the retain tasks and the neighbour tasks (each result
    carries its task's role)."""
    out = {}
    for side in SIDES:
        names = [t for t, r in results.items() if r["role"] == side]
        out[f"{side}_acc"] = float(np.mean([results[t]["acc"] for t in names])) if names else None
        nll = [results[t]["nll"] for t in names if "nll" in results[t]]
        out[f"{side}_nll"] = float(np.mean(nll)) if nll else None
    return out


def roles(results: dict) -> dict[str, list[str]]:
    """{side: its task names} of an evaluation's results."""
    return {side: [t for t, r in results.items() if r["role"] == side] for side in SIDES}


@dataclass
class Point:
    """One setting at one layer over its seeds (the original model: layer None): the mean of each side's
    score over seeds with its interval (two-way bootstrap over seeds and questions, compare.score), and the
    seeds' records for the paired comparisons (None when a cell has no samples.jsonl)."""
    layer: int | None
    setting: str
    method: str
    rows: list[dict]
    records: list[list[dict]] | None
    values: dict

    def get(self, key: str):
        return self.values.get(key)


def point(layer, setting: str, method: str, rows: list[dict], records, sides: dict) -> Point:
    values = {}
    for side, tasks in sides.items():
        for metric in ("acc", "nll"):
            key = f"{side}_{metric}"
            got = compare.score(records, tasks, metric) if records and tasks else None
            if got is not None:
                values[key], values[f"{key}_ci"] = got["mean"], got["ci"]
            else:  # no records: the seeds' mean of the reported means, no interval
                means = [summary(r["results"])[key] if r.get("results") else r.get(key) for r in rows]
                values[key] = float(np.mean(means)) if means and None not in means else None
    coeffs = [r["coeff"] if r.get("coeff") is not None else r.get("coeff_used") for r in rows]
    values["coeff"] = float(np.mean(coeffs)) if coeffs and None not in coeffs else None
    return Point(layer, setting, method, rows, records, values)


def points(rows: list[dict], records_of: dict, sides: dict) -> list[Point]:
    """The ok cells grouped by (layer, setting): one Point each, over its seeds, in the rows' order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["layer"], r["setting"]), []).append(r)
    out = []
    for (layer, setting), members in groups.items():
        records = [records_of.get(r["name"]) for r in members]
        out.append(point(layer, setting, members[0]["method"], members, None if None in records else records, sides))
    return out


def claim(points_: list[Point], original: Point, sides: dict, level: float = 0.05) -> list[dict]:
    """Per (RMU setting, Adaptive RMU setting) with the same alpha, over the layers swept with both: where
    Adaptive RMU forgets more than RMU, the paired difference of forget accuracy (per question, averaged
    over seeds: compare.paired) significant at `level` after Holm's correction over the layers, and its
    retain accuracy not significantly below the original's (paired, uncorrected: the stricter side). The
    same by held-out NLL (forget NLL higher than RMU's; retain NLL not significantly higher than the
    original's). A layer without per-question records is not tested."""
    alpha_of = {p.setting: p.rows[0]["alpha"] for p in points_}
    out = []
    for rmu_setting in dict.fromkeys(p.setting for p in points_ if p.method == "rmu"):
        for ada_setting in dict.fromkeys(p.setting for p in points_ if p.method == "adaptive_rmu"):
            if alpha_of[rmu_setting] != alpha_of[ada_setting]:
                continue
            rmu = {p.layer: p for p in points_ if p.setting == rmu_setting}
            ada = {p.layer: p for p in points_ if p.setting == ada_setting}
            layers = sorted(set(rmu) & set(ada))
            entry = {"rmu": rmu_setting, "adaptive_rmu": ada_setting, "layers": layers, "of": len(layers), "per_layer": {}}
            for metric, better in (("acc", -1), ("nll", 1)):
                tests = {}
                for l in layers:
                    if ada[l].records and rmu[l].records and original.records:
                        tests[l] = (compare.paired(ada[l].records, rmu[l].records, sides["forget"], metric),
                                    compare.paired(ada[l].records, original.records, sides["retain"], metric)
                                    if sides["retain"] else None)
                tested = [l for l in layers if l in tests and tests[l][0] is not None]
                adjusted = dict(zip(tested, stats.holm_adjusted([tests[l][0]["p"] for l in tested])))
                wins = []
                for l in tested:
                    forget, retain = tests[l]
                    retain_worse = retain is not None and retain["diff"] * better > 0 and retain["p"] < level
                    won = better * forget["diff"] > 0 and adjusted[l] <= level and not retain_worse
                    entry["per_layer"].setdefault(l, {})[metric] = {
                        "forget": forget, "holm_p": adjusted[l], "retain_vs_original": retain,
                        "retain_worse": retain_worse, "win": won}
                    wins += [l] if won else []
                entry["wins" if metric == "acc" else "wins_nll"] = wins
                entry["tested" if metric == "acc" else "tested_nll"] = tested
            entry["count"] = len(entry["wins"])
            out.append(entry)
    return out


def _row(cell: Cell, status: str, results: dict | None = None, **extra) -> dict:
    row = {"layer": cell.layer, "method": cell.method, "coeff": cell.coeff, "beta": cell.beta,
           "alpha": "/".join(f"{a:g}" for a in dict.fromkeys(cell.alpha)), "seed": cell.seed, "status": status,
           "setting": cell.setting, "name": cell.name, "results": results or {}}
    if results:
        row.update(summary(results))
    row.update(extra)
    return row


FIXED_COLUMNS = ("layer", "method", "coeff", "beta", "alpha", "seed", "status")
TASK_COLUMNS = ("acc", "acc_lo", "acc_hi", "acc_norm", "nll", "nll_lo", "nll_hi")  # _lo, _hi: the 95% interval


def csv_text(rows: list[dict], tasks: list[str]) -> str:
    """A row per cell (per seed): each task's acc, acc_norm and NLL with their 95% intervals."""
    columns = [*FIXED_COLUMNS, *(f"{t}/{m}" for t in tasks for m in TASK_COLUMNS), *TAIL_COLUMNS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    fmt = lambda v: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)

    def task_value(result: dict, column: str):
        if column.endswith(("_lo", "_hi")):
            ci = result.get(column[:-3] + "_ci")
            return None if ci is None else ci[column.endswith("_hi")]
        return result.get(column)
    for r in rows:
        coeff = r["coeff"] if r["coeff"] is not None else r.get("coeff_used")  # Adaptive: the c it derived
        values = [r["layer"], r["method"], fmt(coeff), fmt(r["beta"]), r["alpha"], r.get("seed", ""), r["status"]]
        values += [fmt(task_value(r["results"].get(t, {}), m)) for t in tasks for m in TASK_COLUMNS]
        values += [fmt(r.get(k)) for k in TAIL_COLUMNS]
        writer.writerow(values)
    return buffer.getvalue()


def _with_ci(p: Point, key: str, scale: float, digits: int) -> str:
    value, ci = p.get(key), p.get(f"{key}_ci")
    if value is None:
        return "-"
    return f"{scale * value:.{digits}f}" + (f" [{stats.fmt_ci(ci, scale, digits)}]" if ci else "")


def markdown(points_: list[Point], original: Point, claims: list[dict], failed: list[dict] = ()) -> str:
    """The table (a row per setting and layer: means over seeds with 95% intervals) and the claim."""
    header = ["layer", "method", "coeff", "beta", "alpha", "seeds", "forget acc %", "retain acc %",
              "neighbour acc %", "forget NLL", "retain NLL"]
    def row(p: Point, layer, method, coeff, beta, alpha, seeds):
        return [layer, method, coeff, beta, alpha, seeds, _with_ci(p, "forget_acc", 100, 1),
                _with_ci(p, "retain_acc", 100, 1), _with_ci(p, "neighbour_acc", 100, 1), _with_ci(p, "forget_nll", 1, 3),
                _with_ci(p, "retain_nll", 1, 3)]
    table = [row(original, "-", "original", "-", "-", "-", "-")]
    for p in points_:
        first = p.rows[0]
        table.append(row(p, p.layer, p.method, "-" if p.get("coeff") is None else f"{p.get('coeff'):.4g}",
                         "-" if first["beta"] is None else f"{first['beta']:g}", first["alpha"], len(p.rows)))
    lines = [outputs.markdown_table(header, table), "",
             "Means over the seeds; [95% interval]: a two-way bootstrap over seeds and questions (one seed, one "
             "task: Wilson). Side scores are means over their tasks.", ""]
    for f in failed:
        lines.append(f"- {f['name']}: {f['status']} (rerun the same command to try it again)")
    for c in claims:
        lines += _claim_lines(c)
    return "\n".join(lines)


def _claim_lines(c: dict) -> list[str]:
    lines = [f"### Adaptive RMU ({c['adaptive_rmu']}) against RMU ({c['rmu']})", "",
             "Per layer, paired over the same questions (each question's correctness averaged over seeds): Adaptive "
             "minus RMU on the forget tasks (negative: forgets more) with its 95% interval and p-value (McNemar's "
             "exact test, or the sign-flip test with several seeds or tasks), Holm-adjusted over the layers; and "
             "Adaptive minus the original on the retain tasks.", ""]
    table = []
    for l in c["layers"]:
        r = c["per_layer"].get(l, {}).get("acc")
        if r is None:
            table.append([l, "not tested (no per-question records)", "-", "-", "-"])
            continue
        table.append([l, compare.fmt_paired(r["forget"]), f"{r['holm_p']:.2g}", compare.fmt_paired(r["retain_vs_original"]),
                      "yes" if r["win"] else "no"])
    lines += [outputs.markdown_table(["layer", "forget acc: Adaptive - RMU (points)", "Holm p",
                                      "retain acc: Adaptive - original", "claim holds"], table), ""]
    wins = ", ".join(map(str, c["wins"])) or "none"
    share = f" ({100 * c['count'] / c['of']:.0f}%)" if c["of"] else ""
    lines.append(f"**The claim's count: {c['count']} of {c['of']} layers{share}** ({wins}): Adaptive RMU forgets "
                 f"more than RMU, significant at 5% after Holm's correction over the {len(c['tested'])} layers tested, "
                 "with retain accuracy not significantly below the original's.")
    wins_nll = ", ".join(map(str, c["wins_nll"])) or "none"
    lines.append(f"By held-out NLL (per text, paired; forget NLL above RMU's, Holm at 5%; retain NLL not significantly "
                 f"above the original's): {len(c['wins_nll'])} of {c['of']} layers ({wins_nll}).")
    return lines + [""]


def plot_sweep(path: Path, points_: list[Point], original: Point, chance: float | None) -> list[dict]:
    """Forget accuracy, retain accuracy and forget NLL vs layer, a line per setting (RMU dashed) with its
    95% intervals as error bars, chance and the original model (its interval as a band); returns what is
    drawn."""
    fig, axes = outputs.figure(1, 3, figsize=(18, 4.8))
    panels = ((axes[0], "forget_acc", 100, "forget tasks: mean accuracy % (lower: more forgotten)"),
              (axes[1], "retain_acc", 100, "retain tasks: mean accuracy % (higher: kept)"),
              (axes[2], "forget_nll", 1, "forget tasks: held-out NLL per token (higher: more forgotten)"))
    settings = list(dict.fromkeys(p.setting for p in points_))
    for k, setting in enumerate(settings):
        mine = sorted((p for p in points_ if p.setting == setting), key=lambda p: p.layer)
        style = "-o" if mine[0].method == "adaptive_rmu" else "--s"
        offset = 0.15 * (k - (len(settings) - 1) / 2)  # the settings' error bars side by side
        for ax, key, scale, _ in panels:
            if all(p.get(key) is not None for p in mine):
                xs = [p.layer for p in mine]
                ax.plot(xs, [scale * p.get(key) for p in mine], style, color=f"C{k}", markersize=4, label=setting)
                outputs.errorbars(ax, xs, [p.get(key) for p in mine], [p.get(f"{key}_ci") for p in mine], f"C{k}",
                                  setting, scale, offset)
    for ax, key, scale, title in panels:
        if key.endswith("acc") and chance is not None:
            ax.axhline(100 * chance, color="gray", linestyle=":", linewidth=1, label="chance")
        if original.get(key) is not None:
            ax.axhline(scale * original.get(key), color="black", linestyle="--", linewidth=1, label="original")
            if original.get(f"{key}_ci"):
                low, high = original.get(f"{key}_ci")
                ax.axhspan(scale * low, scale * high, color="black", alpha=0.08, linewidth=0)
        ax.set_xlabel("unlearn layer l (updated: the layers below it, by --update_layer_ids' offsets)")
        ax.set_title(title + " [95% CI]", fontsize=9)
    axes[0].set_ylim(0, 100)
    axes[1].set_ylim(0, 100)
    axes[1].legend(fontsize=7)
    return outputs.save_figure(fig, path)


def check_sweep_dir(cfg: RunConfig, out: Path) -> Path:
    """The sweep's directory: new, or one holding this sweep (its sweep_flags.txt agrees on the training
    settings; the --sweep_* flags may change). Returns the flagfile's path; nothing is written."""
    saved = out / "sweep_flags.txt"
    if not saved.is_file():  # a new sweep: the directory must be new or empty
        try:
            outputs.claim(out, ignore=(".lock", "study.db", "study.db.lock"), hint="it holds no sweep; choose a new directory")
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
    from armu_jax.train import latest_checkpoint
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


def run_cells_shared(cfg: RunConfig, cells: list[Cell], out: Path, runner: CellRunner, task_names: list[str]) -> list[dict]:
    """--tune_storage given: the cells spread over every worker started with the same command, through an
    Optuna study (GridSampler over the cell names) in that storage. A cell is claimed before it runs: of the
    running trials on one cell the lowest-numbered runs it and any other is marked surplus and failed;
    a cell with result.json "ok" never runs again. A failed cell is tried once per run of the command; a
    worker that dies leaves its cell to the others after 2 x --tune_heartbeat_seconds. Every worker
    returns when every cell is done (or failed in this round) and writes the same tables."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune_study.quiet_optuna()
    names = {c.name: c for c in cells}
    study_storage = tune_study.open_storage(cfg)
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


def report(out: Path, rows: list[dict], original: dict, original_records: list[dict], chance: float | None) -> str:
    """sweep.md and sweep.png from the rows and every cell's samples.jsonl; returns the markdown."""
    sides = roles(original)
    records_of = {r["name"]: read_samples(out / "cells" / r["name"] / "samples.jsonl") for r in rows
                  if r["status"] == "ok" and (out / "cells" / r["name"] / "samples.jsonl").is_file()}
    pts = points(rows, records_of, sides)
    base = point(None, "original", "original", [{"results": original}], [original_records], sides)
    table = markdown(pts, base, claim(pts, base, sides), [r for r in rows if r["status"] != "ok"])
    outputs.write_text(out / "sweep.md", table + "\n")
    plot_sweep(out / "sweep.png", pts, base, chance)
    return table


def sweep_cli(cfg: RunConfig) -> list[dict]:
    """--mode=sweep: run (or continue) the sweep in --output_dir; returns the rows."""
    from armu_jax import hosts
    from armu_jax.context import RunContext
    from armu_jax.tasks import load_tasks, mean_chance

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
