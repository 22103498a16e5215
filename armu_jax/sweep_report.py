"""The sweep's outputs and its test of the claim: sweep.csv (a row per cell and seed), sweep.md (a row per
setting and layer, means over seeds with intervals, and the claim's count), sweep.png; Point (a setting at a
layer over its seeds) and claim (Adaptive RMU against RMU per layer, paired, Holm over the layers). The
claim is stated in armu_jax/sweep.py's docstring."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from armu_jax import compare, outputs, stats
from armu_jax.evaluate import read_samples

TAIL_COLUMNS = ("forget_loss", "retain_loss", "seconds", "train_seconds", "eval_seconds", "first_step_seconds",
                "side_by_side")


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

