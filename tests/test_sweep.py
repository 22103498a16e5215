"""--mode=sweep: layers x methods in one process; a killed sweep continues without redoing finished
cells, and a cell is the run it names (same numbers as that run started alone)."""
import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, cli_command, read_metrics, run_cli

from armu_jax.config import config_with
from armu_jax.errors import UserError
from armu_jax.evaluate import read_samples
from armu_jax.stats import mcnemar_exact
from armu_jax.sweep import parse_layers, plan
from armu_jax.sweep_report import claim, plot_sweep, point, points, roles
from armu_jax.train import run


def test_layers_and_cells():
    assert parse_layers("3:28:2", 7, 30) == list(range(3, 28, 2))
    assert parse_layers("3,7,11", 7, 30) == [3, 7, 11]
    assert parse_layers(None, 7, 30) == [7]
    for bad in ("3:40:2", "a:b", "5:3", "3:9:0"):
        with pytest.raises(UserError):
            parse_layers(bad, 7, 30)
    cfg = config_with(sweep_layers="5,9", sweep_betas=[2, 5], sweep_steering_coeffs=[6.5], alpha=[1800, 1200])
    cells = plan(cfg, 30)
    assert [(c.layer, c.method, c.coeff, c.beta) for c in cells] == [
        (5, "rmu", 6.5, None), (5, "adaptive_rmu", None, 2.0), (5, "adaptive_rmu", None, 5.0),
        (9, "rmu", 6.5, None), (9, "adaptive_rmu", None, 2.0), (9, "adaptive_rmu", None, 5.0)]
    assert cells[0].alpha == (1800.0, 1200.0) and cells[0].name == "l05_rmu_c6.5_a1800-1200"
    assert len({c.name for c in cells}) == len(cells)
    per_topic = plan(config_with(sweep_alphas=["1800/300", "900"], sweep_methods=["rmu"]), 30)
    assert [c.alpha for c in per_topic] == [(1800.0, 300.0), (900.0, 900.0)]
    for bad in ("1/2/3", "x", "-5"):
        with pytest.raises(UserError):
            plan(config_with(sweep_alphas=[bad]), 30)


def _records(correct: list[int], task: str, nll: list[float] | None = None) -> list[dict]:
    out = [{"task": task, "doc_id": i, "acc": c, "acc_norm": c} for i, c in enumerate(correct)]
    out += [{"task": task, "doc_id": i, "tokens": 10, "nll": 10 * v, "type": "nll"} for i, v in enumerate(nll or [])]
    return out


def test_claim_counts_layers_where_adaptive_forgets_more_and_keeps_retain():
    """Per-question records (one seed): a layer counts when Adaptive's forget accuracy is below RMU's by a
    McNemar-significant margin after Holm over the layers, and its retain accuracy is not significantly
    below the original's."""
    sides = {"forget": ["demo_bio"], "retain": ["demo_retain"], "neighbour": []}
    n = 60
    ones = lambda k: [1] * k + [0] * (n - k)  # k of n correct, the first k questions

    def model(forget_k, retain_k, forget_nll=3.0, retain_nll=3.0):
        return [_records(ones(forget_k), "demo_bio", [forget_nll] * 20) + _records(ones(retain_k), "demo_retain",
                                                                                     [retain_nll] * 20)]

    def pt(layer, method, *args):
        recs = model(*args)
        return point(layer, f"{method} alpha=1", method, [{"alpha": "1", "beta": None, "coeff": None}], recs, sides)
    original = point(None, "original", "original", [{}], model(40, 40), sides)
    pts = [pt(3, "rmu", 40, 40), pt(3, "adaptive_rmu", 20, 40, 5.0),  # 20 discordant: p ~ 2e-6, wins
           pt(5, "rmu", 30, 40, 4.0), pt(5, "adaptive_rmu", 35, 40, 3.5),  # forgets less
           pt(7, "rmu", 40, 40), pt(7, "adaptive_rmu", 15, 20),  # retain lost (20 of 40: significant)
           pt(9, "rmu", 40, 40), pt(9, "adaptive_rmu", 37, 40)]  # 3 fewer: not significant
    (result,) = claim(pts, original, sides)
    assert result["layers"] == [3, 5, 7, 9] and result["of"] == 4
    assert result["wins"] == [3] and result["count"] == 1
    three = result["per_layer"][3]["acc"]
    assert three["forget"]["diff"] == pytest.approx(-20 / n)
    assert three["forget"]["p"] == pytest.approx(mcnemar_exact(0, 20))  # b=0, c=20 discordant
    # Holm over the 4 layers: layer 7's p (25 discordant) is the smallest (x4), layer 3's the second (x3)
    assert three["holm_p"] == pytest.approx(max(4 * mcnemar_exact(0, 25), 3 * mcnemar_exact(0, 20)))
    assert result["per_layer"][7]["acc"]["retain_worse"] and not result["per_layer"][7]["acc"]["win"]
    assert not result["per_layer"][9]["acc"]["win"] and result["per_layer"][9]["acc"]["forget"]["diff"] < 0
    assert result["wins_nll"] == [3]  # forget NLL 5 vs 3 on every text; retain NLL unchanged


def _flagfile(tmp_path, model) -> Path:
    flags = tmp_path / "sweep.flags"
    flags.write_text("\n".join([
        f"--model={model}", "--layer_id=3", "--lr=1e-3", "--alpha=50", "--steering_coeffs=20", "--beta=3",
        "--forget_max_len=32", "--retain_max_len=32", "--pad_multiple=32", "--max_num_batches=6",
        "--checkpoint_every=2", "--eval_tasks=demo_bio,demo_retain", "--eval_limit=4", "--eval_nll_tokens=16"]) + "\n")
    return flags


@pytest.mark.slow
def test_killed_sweep_continues_without_redoing_finished_cells(tmp_path, tiny_llama):
    model = tiny_llama
    out = tmp_path / "sweep"
    args = [f"--flagfile={_flagfile(tmp_path, model)}", "--mode=sweep", "--sweep_layers=2:4", f"--output_dir={out}"]
    env = {"PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(cli_command(*args), cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("cells/*/result.json")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    finished = {p.parent.name: (p.read_text(), (p.parent / "metrics.jsonl").stat().st_mtime_ns)
                for p in out.glob("cells/*/result.json")}
    assert 1 <= len(finished) < 4, "the sweep should have been killed midway"

    second = run_cli(*args, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    for name, (result, mtime) in finished.items():  # finished cells: neither rerun nor rewritten
        assert (out / "cells" / name / "result.json").read_text() == result
        assert (out / "cells" / name / "metrics.jsonl").stat().st_mtime_ns == mtime
        assert f"{name}: forget acc" not in second.stderr + second.stdout

    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["layer"]), r["method"]) for r in rows] == [(l, m) for l in (2, 3)
                                                              for m in ("rmu", "adaptive_rmu")]
    columns = list(rows[0])
    assert columns[:7] == ["layer", "method", "coeff", "beta", "alpha", "seed", "status"]
    assert {r["seed"] for r in rows} == {"42"}  # the flagfile's --seed (the first seed names no suffix)
    for task in ("demo_bio", "demo_retain"):
        assert {f"{task}/acc", f"{task}/acc_norm", f"{task}/nll"} <= set(columns)
    assert {"forget_loss", "retain_loss", "seconds"} <= set(columns)
    assert all(r["status"] == "ok" for r in rows)
    assert {float(r["coeff"]) for r in rows if r["method"] == "rmu"} == {20.0}
    assert "of 2 layers" in (out / "sweep.md").read_text()
    # the figure: forget acc, retain acc and forget NLL by layer, a line per setting, chance and the original
    results = [json.loads(p.read_text()) for p in sorted(out.glob("cells/*/result.json"))]
    original = json.loads((out / "original.json").read_text())
    sides = roles(original)
    records = {r["name"]: read_samples(out / "cells" / r["name"] / "samples.jsonl") for r in results}
    base = point(None, "original", "original", [{"results": original}], [read_samples(out / "original_samples.jsonl")],
                 sides)
    forget_acc, retain_acc, forget_nll = plot_sweep(tmp_path / "again.png", points(results, records, sides), base, 0.25)
    for r in results:
        layers, values = forget_acc["lines"][r["setting"]]
        assert values[layers.index(r["layer"])] == pytest.approx(100 * r["forget_acc"])  # records' mean = reported
        assert forget_nll["lines"][r["setting"]][1][layers.index(r["layer"])] == pytest.approx(r["forget_nll"])
        low, high = forget_acc["errorbars"][r["setting"]][layers.index(r["layer"])]
        assert low < 100 * r["forget_acc"] < high or low == 100 * r["forget_acc"] == 0
    assert forget_acc["hlines"] == {"chance": 25.0, "original": pytest.approx(100 * original["demo_bio"]["acc"])}
    assert retain_acc["hlines"]["original"] == pytest.approx(100 * original["demo_retain"]["acc"])
    assert set(forget_acc["lines"]) == {r["setting"] for r in results}
    # Every cell has 6 steps, once each (a cell killed midway resumed from its checkpoint).
    for r in rows:
        cell = out / "cells" / f"l{int(r['layer']):02d}_{r['method']}_" \
            f"{'c20' if r['method'] == 'rmu' else 'b3'}_a50"
        assert [m["step"] for m in read_metrics(cell)] == list(range(6))

    # A cell is the run it names: Adaptive RMU at layer 3 ran on the step compiled for RMU's cell
    # at layer 3 (its method and numbers are arguments); started alone it logs the same numbers.
    alone = tmp_path / "alone"
    run(config_with(model=str(model), method="adaptive_rmu", layer_id=3, lr=1e-3, alpha=[50], beta=3,
                    forget_max_len=[32], retain_max_len=32, pad_multiple=32, max_num_batches=6,
                    checkpoint_every=0, output_dir=str(alone), export=False))
    ours = read_metrics(out / "cells" / "l03_adaptive_rmu_b3_a50")
    theirs = read_metrics(alone)
    for a, b in zip(ours, theirs):
        for key in ("loss", "forget_loss", "retain_loss", "coeff", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-12), (a["step"], key)


def test_sweep_refuses_a_directory_it_did_not_write_and_changed_settings(tmp_path):
    from armu_jax.config import flagfile_text
    from armu_jax.sweep import sweep_cli
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no sweep"):
        sweep_cli(config_with(mode="sweep", output_dir=str(other)))
    assert (other / "notes.txt").read_text() == "mine"
    started = tmp_path / "sweep"
    started.mkdir()
    (started / "sweep_flags.txt").write_text(flagfile_text(config_with(mode="sweep", output_dir=str(started))))
    with pytest.raises(UserError, match="--lr"):
        sweep_cli(config_with(mode="sweep", lr=1e-3, output_dir=str(started)))
    with pytest.raises(UserError, match="--sweep_layers=3:99"):
        sweep_cli(config_with(mode="sweep", sweep_layers="3:99", output_dir=str(started)))
    with pytest.raises(UserError, match="new --output_dir"):
        sweep_cli(config_with(mode="sweep", overwrite=True, output_dir=str(started)))


@pytest.mark.slow
def test_two_workers_share_a_sweep_each_cell_once(tmp_path, tiny_llama):
    """--tune_storage: the cells spread over two worker processes through one Optuna study; every cell
    runs once (one complete trial, its steps once), and both workers write the whole table."""
    import optuna
    out = tmp_path / "sweep"
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    args = [f"--flagfile={_flagfile(tmp_path, tiny_llama)}", "--mode=sweep", "--sweep_layers=2:4", f"--output_dir={out}",
            f"--tune_storage={url}", "--tune_heartbeat_seconds=1"]
    workers = []
    for i in range(2):
        with open(tmp_path / f"worker{i}.log", "w") as log:
            workers.append(subprocess.Popen(cli_command(*args), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                            stdout=log, stderr=subprocess.STDOUT))
    for i, w in enumerate(workers):
        assert w.wait(timeout=400) == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]
    study = optuna.load_study(study_name="sweep", storage=url)
    complete = [t.params["cell"] for t in study.trials if t.state.name == "COMPLETE"]
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert sorted(complete) == cells and len(cells) == 4
    assert all(t.user_attrs.get("surplus") for t in study.trials if t.state.name != "COMPLETE")
    for cell in cells:
        assert [m["step"] for m in read_metrics(out / "cells" / cell)] == list(range(6))
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert all(sum(f"{cell}: forget acc" in log for log in logs) == 1 for cell in cells)
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def _sweep_config(model, out, **overrides):
    return config_with(mode="sweep", model=str(model), layer_id=3, lr=1e-3, alpha=[50], beta=3, forget_max_len=[32],
                       retain_max_len=32, pad_multiple=32, max_num_batches=6, checkpoint_every=2, log_every=3,
                       eval_tasks=["demo_bio", "demo_retain"], eval_limit=4, eval_nll_tokens=16, seeds=2,
                       output_dir=str(out), **overrides)


@pytest.mark.slow
def test_cells_side_by_side_are_the_cells_run_alone(tmp_path, tiny_llama):
    """--cells_per_step=4: the layer's cells (two seeds each: their own control vectors) train four at a time
    in one compiled step. Every cell's metrics, checkpoints and results are those of the sweep run one cell
    at a time (float32 noise: the vmapped matmuls sum in another order); a cell whose c overflows the loss
    stops alone at its step, the others of its group go on; a group resumes from its cells' checkpoints."""
    from armu_jax.sweep import sweep_cli
    from armu_jax.train import latest_checkpoint
    alone, together = tmp_path / "alone", tmp_path / "together"
    sweep_cli(_sweep_config(tiny_llama, alone, sweep_steering_coeffs=[20]))
    rows = sweep_cli(_sweep_config(tiny_llama, together, sweep_steering_coeffs=[20, 1e30], cells_per_step=4))
    status = {r["name"]: r["status"] for r in rows}
    assert sorted(status) == sorted(["l03_rmu_c20_a50", "l03_rmu_c20_a50_s43", "l03_rmu_c1e+30_a50",
                                     "l03_rmu_c1e+30_a50_s43", "l03_adaptive_rmu_b3_a50", "l03_adaptive_rmu_b3_a50_s43"])
    assert {r["name"]: r.get("side_by_side") for r in rows if r["status"] == "ok"} == {
        "l03_rmu_c20_a50": 4, "l03_rmu_c20_a50_s43": 4, "l03_adaptive_rmu_b3_a50": 2, "l03_adaptive_rmu_b3_a50_s43": 2}
    for name in ("l03_rmu_c1e+30_a50", "l03_rmu_c1e+30_a50_s43"):  # c^2 overflows at step 0: that cell stops
        assert status[name].startswith("failed: step 0: forget_loss=inf"), status[name]
        assert read_metrics(together / "cells" / name) == []
        assert latest_checkpoint(together / "cells" / name) is None

    def compare(name):
        mine, theirs = read_metrics(together / "cells" / name), read_metrics(alone / "cells" / name)
        assert [m["step"] for m in mine] == list(range(6)) and [set(m) for m in mine] == [set(m) for m in theirs]
        for a, b in zip(mine, theirs):
            for key in set(a) - {"seconds", "step", "programs", "compile_seconds"}:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (name, a["step"], key)
        assert latest_checkpoint(together / "cells" / name) == 6
        ours = json.loads((together / "cells" / name / "result.json").read_text())["results"]
        want = json.loads((alone / "cells" / name / "result.json").read_text())["results"]
        for task in want:
            assert ours[task]["acc"] == want[task]["acc"]
            assert ours[task]["nll"] == pytest.approx(want[task]["nll"], rel=1e-5)
        return ours
    for name in ("l03_rmu_c20_a50", "l03_rmu_c20_a50_s43"):
        compare(name)
    seeds = [np.load(together / "cells" / n / "control_vectors.npy") for n in ("l03_rmu_c20_a50", "l03_rmu_c20_a50_s43")]
    assert not np.allclose(*seeds)  # each cell its own control vectors
    before = {n: compare(n) for n in ("l03_adaptive_rmu_b3_a50", "l03_adaptive_rmu_b3_a50_s43")}
    # The Adaptive cells' results removed: rerun, they resume side by side from their step-6 checkpoints (no
    # step left) and are evaluated again; the failed cells are tried again and fail again.
    for name in before:
        (together / "cells" / name / "result.json").unlink()
    again = {r["name"]: r for r in sweep_cli(_sweep_config(tiny_llama, together, sweep_steering_coeffs=[20, 1e30],
                                                            cells_per_step=4))}
    for name, results in before.items():
        assert again[name]["status"] == "ok" and again[name]["side_by_side"] == 2
        assert again[name]["results"] == results
        assert [m["step"] for m in read_metrics(together / "cells" / name)] == list(range(6))
    assert again["l03_rmu_c1e+30_a50"]["status"].startswith("failed: step 0")


def test_cells_per_step_is_refused_where_it_would_be_ignored():
    for mode in ("train", "tune", "eval"):
        with pytest.raises(UserError, match="--cells_per_step=2 applies to --mode=sweep only"):
            config_with(mode=mode, cells_per_step=2, tune_space="beta:1:2", output_dir="runs/x")
    with pytest.raises(UserError, match="--cells_per_step=2 with --tune_storage"):
        config_with(mode="sweep", cells_per_step=2, tune_storage="sqlite:///x.db", output_dir="runs/x")
    with pytest.raises(UserError, match="--cells_per_step=0: must be"):
        config_with(mode="sweep", cells_per_step=0, output_dir="runs/x")
    assert config_with(mode="sweep", cells_per_step=4, output_dir="runs/x").cells_per_step == 4
