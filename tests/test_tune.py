"""--mode=tune: many workers on one study, each trial once; a killed worker's trial failed and retried;
best.flags reproduces its trial; the retain budget honoured; the study opens in optuna-dashboard; bad
input refused in one line with the study unchanged. The tiny Llama keeps each trial to seconds."""
import hashlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from gcs import free_port
from helpers import ROOT, cli_command, read_metrics, run_cli

from armu_jax.config import config_with, from_flagfile
from armu_jax.errors import UserError
from armu_jax.search import Dimension, check, parse_budget, parse_space
from armu_jax.study import storage_spec
from armu_jax.train import run
from armu_jax.tune_report import best_flags, best_trial, markdown, rows_of

SPACE = "beta:1:10:log,lr:1e-4:1e-2:log,alpha.1:10:100"
ENV = {"PYTHONPATH": str(ROOT)}


def _flagfile(tmp: Path, model: Path, steps: int = 6) -> Path:
    flags = tmp / "tune.flags"
    flags.write_text("\n".join([
        f"--model={model}", "--layer_id=3", "--forget_corpora=demo:bio,demo:cyber", "--alpha=50",
        "--forget_max_len=32", "--retain_max_len=32", "--pad_multiple=32", f"--max_num_batches={steps}",
        "--checkpoint_every=0", "--eval_tasks=demo_bio,demo_retain", "--eval_limit=4", "--eval_nll_tokens=16",
        "--tune_startup_trials=2", "--tune_prune_every=2", "--tune_heartbeat_seconds=1"]) + "\n")
    return flags


def _worker(flags: Path, out: Path, log: Path, *extra) -> subprocess.Popen:
    with open(log, "w") as f:  # stderr to a file: tqdm's output would fill a pipe
        return subprocess.Popen(cli_command(f"--flagfile={flags}", "--mode=tune", f"--tune_space={SPACE}",
                                            f"--output_dir={out}", *extra),
                                cwd=ROOT, env={**os.environ, **ENV}, stdout=f, stderr=subprocess.STDOUT)


def _study(url: str, name: str = "tune"):
    storage = (optuna.storages.journal.JournalStorage(optuna.storages.journal.JournalFileBackend(url[8:]))
               if url.startswith("journal:") else url)
    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, tiny_llama):
    """Two worker processes on one journal-file study, 5 trials: (flagfile, output dir, storage URL)."""
    tmp = tmp_path_factory.mktemp("tune")
    flags, out = _flagfile(tmp, tiny_llama), tmp / "tune"
    url = f"journal:{tmp / 'study.journal'}"
    workers = [_worker(flags, out, tmp / f"worker{i}.log", "--tune_trials=5", f"--tune_storage={url}")
               for i in range(2)]
    for i, w in enumerate(workers):
        assert w.wait(timeout=400) == 0, (tmp / f"worker{i}.log").read_text()[-3000:]
    return flags, out, url, [(tmp / f"worker{i}.log").read_text() for i in range(2)]


@pytest.mark.slow
def test_two_workers_complete_the_study_with_no_trial_run_twice(two_workers):
    flags, out, url, logs = two_workers
    study = _study(url)
    real = [t for t in study.trials if not t.user_attrs.get("surplus")]
    finished = [t for t in real if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 5 and all(t.state.name != "RUNNING" for t in study.trials)
    assert len({t.user_attrs["worker"] for t in real}) == 2, "both workers ran trials"
    for t in real:  # each trial ran once, by one worker, in its own directory, every step once
        steps = [m["step"] for m in read_metrics(out / "trials" / f"{t.number:04d}")]
        assert steps == list(range(len(steps))) and len(steps) == (6 if t.state.name == "COMPLETE" else t.user_attrs["steps"])
        assert sum(f"trial {t.number}:" in log for log in logs) == 1
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY  # what TPE reads of the budget
    assert all(f"{_CONSTRAINTS_KEY}:retain_acc_lost" in t.system_attrs for t in finished if t.state.name == "COMPLETE")
    assert sorted(p.name for p in (out / "trials").iterdir()) == sorted(f"{t.number:04d}" for t in real)
    # the reports: a row per trial, the chosen one's flags, the figure
    rows = (out / "tune.csv").read_text().splitlines()
    assert rows[0].startswith("trial,beta,lr,alpha.1,state,objective") and len(rows) == 1 + len(real)
    best = best_trial(study)
    assert best is not None and f"Chosen: trial {best.number}" in (out / "tune.md").read_text()
    assert "test split" in (out / "tune.md").read_text() and (out / "tune.png").stat().st_size > 10_000


@pytest.mark.slow
def test_best_flags_reproduce_the_chosen_trial(two_workers, tmp_path):
    flags, out, url, _ = two_workers
    best = best_trial(_study(url))
    again = tmp_path / "again"
    cfg = from_flagfile(out / "best.flags", output_dir=str(again))
    assert cfg.beta == pytest.approx(best.params["beta"]) and cfg.alpha[1] == pytest.approx(best.params["alpha.1"])
    assert cfg.mode == "train" and cfg.tune_space is None
    run(cfg)
    ours, theirs = read_metrics(again), read_metrics(out / "trials" / f"{best.number:04d}")
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        for key in ("loss", "forget_loss", "retain_loss", "coeff", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-12), (a["step"], key)


def test_the_study_opens_in_optuna_dashboard(two_workers, tmp_path):
    """The journal study, served by optuna-dashboard as its users start it; its API lists our study."""
    _, _, url, _ = two_workers
    port = free_port()
    log = open(tmp_path / "dashboard.log", "w")
    server = subprocess.Popen([str(Path(os.sys.executable).parent / "optuna-dashboard"), url[8:], "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, page = time.time() + 60, None
        while time.time() < deadline and page is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5).read().decode()
            except OSError:
                time.sleep(0.5)
        assert page is not None, (tmp_path / "dashboard.log").read_text()[-2000:]
        assert '"study_name": "tune"' in page or '"study_name":"tune"' in page
        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=5).read().decode()
        assert "<html" in html.lower()
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_bad_input_is_one_line_and_leaves_the_study_unchanged(two_workers, tiny_llama):
    flags, out, url, _ = two_workers
    journal = Path(url[8:])
    before = hashlib.sha256(journal.read_bytes()).hexdigest()
    cases = {
        "--tune_space=beta:1:10:log,lr:1e-4:1e-2:log": "another space",  # the study's space was another
        "--tune_space=layer_id:1:9": "the model has 4 layers",
        "--tune_space=colour:1:2": "unknown setting 'colour'",
        "--tune_space=beta:5:1": "LOW must be below HIGH",
        "--tune_space=model:a|b": "cannot be searched",
        "--tune_space=alpha.5:1:2": "topic index 5",
        "--tune_retain_budget=acc:x": "--tune_retain_budget entry",
    }
    for arg, message in cases.items():
        result = run_cli(f"--flagfile={flags}", "--mode=tune", f"--tune_space={SPACE}", arg, f"--output_dir={out}",
                         f"--tune_storage={url}", env=ENV, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (arg, result.stderr[-1500:])
        assert result.stderr.strip().count("\n") == 0, result.stderr  # one line
    blocker = journal.parent / "a-file"
    blocker.write_text("")
    for url_, message in ((f"sqlite:///{blocker}/study.db", "cannot open the study's storage"),
                          ("postgresql://nobody@127.0.0.1:1/none", "cannot open the study's storage")):
        result = run_cli(f"--flagfile={flags}", "--mode=tune", f"--tune_space={SPACE}", f"--output_dir={out}",
                         f"--tune_storage={url_}", env=ENV, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-1500:]
        assert result.stderr.strip().count("\n") == 0, result.stderr
    assert hashlib.sha256(journal.read_bytes()).hexdigest() == before


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_killed_worker_trial_is_failed_and_retried(tmp_path, tiny_llama, storage):
    """A worker SIGKILLed mid-trial, then started again: its trial is failed after 2 heartbeats and retried
    with the same settings; the study still reaches its 2 trials. SQLite: Optuna's heartbeat; the journal
    file: the workers' own (a trial attribute, tune.py/study.py)."""
    flags, out = _flagfile(tmp_path, tiny_llama, steps=60), tmp_path / "tune"
    url = f"sqlite:///{out / 'study.db'}" if storage == "sqlite" else f"journal:{tmp_path / 'study.journal'}"
    where = () if storage == "sqlite" else (f"--tune_storage={url}",)
    first = _worker(flags, out, tmp_path / "first.log", "--tune_trials=2", "--tune_prune_every=0", *where)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        logs = list(out.glob("trials/*/metrics.jsonl"))
        if logs and len(logs[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed = logs[0].parent.name
    second = _worker(flags, out, tmp_path / "second.log", "--tune_trials=2", "--tune_prune_every=0", *where)
    assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-3000:]
    study = _study(url)
    by_number = {t.number: t for t in study.trials}
    dead = by_number[int(killed)]
    assert dead.state.name == "FAIL"
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == dead.params
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2


def test_the_budget_is_a_constraint_never_a_best_trial(tmp_path):
    """An infeasible trial with the lowest objective is never chosen, nor written to best.flags."""
    dims = parse_space("beta:1:10", 2)
    study = optuna.create_study(direction="minimize")
    dist = {"beta": dims[0].distribution()}
    attrs = lambda lost, cons: {"forget_acc": 0.3, "forget_nll_rise": 0.1, "retain_acc_lost": lost,
                                "retain_nll_gained": 0.0, "constraints": cons}
    for value, beta, lost in ((1.0, 2.0, 5.0), (4.0, 3.0, 1.0), (6.0, 4.0, 0.0)):  # the lowest breaks acc:2
        study.add_trial(optuna.trial.create_trial(params={"beta": beta}, distributions=dist, value=value,
                                                  user_attrs={**attrs(lost, [lost - 2.0]), "run_dir": "x"}))
    best = best_trial(study)
    assert best.params["beta"] == 3.0
    cfg = config_with(mode="tune", tune_space="beta:1:10", output_dir=str(tmp_path), forget_corpora=["a", "b"])
    assert "--beta=3.0" in best_flags(cfg, dims, best)
    rows = rows_of(study, dims)
    assert [r["feasible"] for r in rows] == [False, True, True]
    assert "Chosen: trial 1" in markdown(cfg, rows, dims, best, None, None)


def test_space_and_budget_grammar():
    dims = parse_space("layer_id:3:9,beta:2:12:log,lr:1e-3:1e-2:log,method:rmu|adaptive_rmu,alpha.1:30:3000:log", 2, 30)
    assert [d.name for d in dims] == ["layer_id", "beta", "lr", "method", "alpha.1"]
    assert dims[0] == Dimension("layer_id", None, "int", 3.0, 9.0, False)
    assert dims[3].choices == ("rmu", "adaptive_rmu") and dims[4].index == 1 and dims[4].log
    assert isinstance(dims[0].distribution(), optuna.distributions.IntDistribution)
    assert parse_budget("acc:2,nll:0.05") == {"acc": 2.0, "nll": 0.05} and parse_budget("nll:0.1") == {"nll": 0.1}
    for bad in ("beta:0:2:log", "lr:1:2:lin", "layer_id:a:3", "method:sgd", "beta", "beta:1:2,beta:2:3", "lr:-1:1"):
        with pytest.raises(UserError):
            parse_space(bad, 2, 30)
    tune = dict(mode="tune", tune_space="beta:1:2", output_dir="gs://bucket/tune")
    with pytest.raises(UserError, match="need a POSIX filesystem; give the study an RDB URL"):
        check(config_with(**tune))
    with pytest.raises(UserError, match="journal file needs a POSIX"):
        check(config_with(**tune, tune_storage="journal:/x/j.log"))
    with pytest.raises(UserError, match="SQLite needs a POSIX"):
        check(config_with(**tune, tune_storage="sqlite:///x.db"))
    assert storage_spec(config_with(**tune, tune_storage="postgresql://h/db")) == ("rdb", "postgresql://h/db")


@pytest.mark.slow
def test_seeds_make_a_trial_the_mean_of_its_runs(tmp_path, tiny_llama):
    """--seeds=2: each trial is two runs side by side (trials/NNNN/seed_<s>/, control vectors of --seed and
    --seed+1), scored as their mean; best.flags carries --seeds; the chosen trial's test scores average
    both seeds' checkpoints."""
    import json

    import numpy as np
    flags, out = _flagfile(tmp_path, tiny_llama, steps=4), tmp_path / "tune"
    result = run_cli(f"--flagfile={flags}", "--mode=tune", "--tune_space=beta:1:10:log", f"--output_dir={out}",
                     "--tune_trials=2", "--tune_prune_every=0", "--seeds=2", "--seed=7", env=ENV, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["identity"]["objective"]["seeds"] == 2
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2
    for t in complete:
        trial_dir = out / "trials" / f"{t.number:04d}"
        assert sorted(p.name for p in trial_dir.iterdir()) == ["seed_7", "seed_8"]
        u7, u8 = (np.load(trial_dir / f"seed_{s}" / "control_vectors.npy") for s in (7, 8))
        assert not np.allclose(u7, u8)
        assert [len(read_metrics(trial_dir / f"seed_{s}")) for s in (7, 8)] == [4, 4]
        per_seed, results = t.user_attrs["seed_results"], t.user_attrs["results"]
        assert t.user_attrs["seeds"] == [7, 8] and len(per_seed) == 2
        for task in ("demo_bio", "demo_retain"):
            assert results[task]["acc"] == pytest.approx(np.mean([r[task]["acc"] for r in per_seed]))
            assert results[task]["seeds"] == 2 and results[task]["acc_ci"][0] <= results[task]["acc"] <= results[task]["acc_ci"][1]
        assert t.user_attrs["forget_acc"] == pytest.approx(results["demo_bio"]["acc"])
    best = best_trial(study)
    assert "--seeds=2" in (out / "best.flags").read_text()
    saved = json.loads((out / "best_test.json").read_text())
    assert saved["trial"] == best.number and saved["chosen"]["demo_bio"]["seeds"] == 2
    assert "the mean of its 2 seeds" in (out / "tune.md").read_text()


def test_a_list_setting_is_searched_by_choices():
    """--tune_space=update_params:a|b+c: which parameters train is a searched choice; + joins several."""
    from armu_jax.search import trial_config
    dims = parse_space("update_params:mlp.down_proj|mlp.down_proj+post_feedforward_layernorm|default", 2, 18)
    assert dims[0].choices == ("mlp.down_proj", "mlp.down_proj+post_feedforward_layernorm", "default")
    cfg = trial_config(config_with(), dims, {"update_params": "mlp.down_proj+post_feedforward_layernorm"}, "/tmp/t")
    assert cfg.update_params == ("mlp.down_proj", "post_feedforward_layernorm")
    with pytest.raises(UserError, match="give the choices as update_params:a"):
        parse_space("update_params:1:2", 2, 18)


@pytest.mark.slow
def test_tuning_under_attack_counts_the_worse_model(tmp_path, tiny_llama):
    """--tune_attack=relearn_retain: every trial's model is also relearned on retain texts the run did not use
    and scored again; the attacked forget scores are kept with the trial and its value is the worse (larger)
    objective of the unlearned and the attacked model."""
    from armu_jax.search import NLL_CAP
    flags, out = _flagfile(tmp_path, tiny_llama), tmp_path / "tune"
    worker = _worker(flags, out, tmp_path / "w.log", "--tune_trials=2", "--tune_prune_every=0",
                     "--tune_attack=relearn_retain", "--relearn_texts=4", "--relearn_steps=2", "--relearn_lr=1e-2",
                     "--relearn_max_len=32")
    assert worker.wait(timeout=400) == 0, (tmp_path / "w.log").read_text()[-3000:]
    assert "after relearn_retain:" in (tmp_path / "w.log").read_text()
    study = _study(f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["identity"]["objective"]["attack"] == "relearn_retain"
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2
    value = lambda s: s["forget_gap"] - min(s["forget_nll_rise"] or 0.0, NLL_CAP)
    for t in done:
        a, att = t.user_attrs, t.user_attrs["attacked"]
        assert att["forget_acc"] is not None and att["forget_nll"] != a["forget_nll"]  # relearning moved it
        assert t.value == pytest.approx(max(value(a), value(att)))
