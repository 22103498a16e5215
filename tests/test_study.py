"""Workers of one study never draw the same setting (armu_jax/study.py: TPE seeded per trial from the study's
seed and the trial's number), and a study is reproducible from its seed.

Several processes are started at the same moment on one SQLite study and each asks for trials as a tune
worker does; a negative control runs the same with TPE seeded once per worker (what --mode=tune did),
which draws the same first setting in every worker."""
import json
import subprocess
import sys

import optuna
import pytest
from helpers import ROOT

from armu_jax.study import trial_seeded_sampler

SPACE = {"beta": optuna.distributions.FloatDistribution(2.0, 12.0, log=True),
         "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
         "layer_id": optuna.distributions.IntDistribution(3, 9)}

WORKER = """
import json, sys, time, optuna
from armu_jax.study import trial_seeded_sampler
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, start, per_trial = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "per_trial"
space = {"beta": optuna.distributions.FloatDistribution(2.0, 12.0, log=True),
         "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
         "layer_id": optuna.distributions.IntDistribution(3, 9)}
sampler = trial_seeded_sampler(0, 5) if per_trial else optuna.samplers.TPESampler(seed=0, n_startup_trials=5)
study = optuna.load_study(study_name="s", storage=url, sampler=sampler)
time.sleep(max(0.0, start - time.time()))  # every worker asks at the same moment
drawn = []
for _ in range(2):
    trial = study.ask(space)
    drawn.append([trial.number, trial.params])
    study.tell(trial, trial.params["beta"])
print(json.dumps(drawn))
"""


def _workers(tmp_path, n: int, mode: str) -> list:
    url = f"sqlite:///{tmp_path / f'{mode}.db'}"
    optuna.create_study(study_name="s", storage=url)
    import time
    start = time.time() + 6.0
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(start), mode], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    drawn = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        drawn += json.loads(out)
    return drawn


@pytest.mark.multiprocess
def test_workers_started_together_never_draw_alike(tmp_path):
    drawn = _workers(tmp_path, 4, "per_trial")
    settings = [json.dumps(p, sort_keys=True) for _, p in drawn]
    assert sorted(n for n, _ in drawn) == list(range(8))
    assert len(set(settings)) == len(settings), drawn
    # the control: TPE seeded once per worker draws the first setting in every worker
    control = [json.dumps(p, sort_keys=True) for _, p in _workers(tmp_path, 4, "per_worker")]
    assert len(set(control)) < len(control)


def test_trial_k_draws_the_same_whoever_runs_it():
    """Reproducible from the seed: trial k of two studies with the same seed draws the same setting (its random
    start), trials of one study differ, and another seed draws another start."""
    def first(seed, n=5):
        study = optuna.create_study(sampler=trial_seeded_sampler(seed, 5))
        out = []
        for _ in range(n):
            trial = study.ask(SPACE)
            out.append(trial.params)
            study.tell(trial, trial.params["beta"])
        return out
    a, b, c = first(0), first(0), first(1)
    assert a == b
    assert len({json.dumps(p, sort_keys=True) for p in a}) == 5
    assert a[0] != c[0]
