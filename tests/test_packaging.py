"""Packaging and set-up: a plain (non-editable) install runs --mode=lm_eval from another directory (nothing is
read from the checkout); the embedded default prepared by two processes at once is built once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.cli
def test_installed_package_runs_lm_eval_elsewhere(tmp_path, smollm2_dir):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=600)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import armu_jax; print(armu_jax.__file__)"], cwd=workdir,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(target)), where
    out = workdir / "scores"
    result = subprocess.run([sys.executable, "-m", "armu_jax.main", "--mode=lm_eval", f"--model={smollm2_dir}",
                             "--eval_tasks=demo_bio", "--eval_limit=2", f"--output_dir={out}"],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "lm_eval_results.json").read_text())
    assert results["n-samples"]["demo_bio"]["effective"] == 2
    # the installed package's lm-eval scores what the native evaluator scores on the same two questions
    from armu_jax.evaluate import load_params, scorer_for
    from armu_jax.tasks import load_tasks
    native = scorer_for(smollm2_dir).multiple_choice(load_params(smollm2_dir), load_tasks(["demo_bio"], 2)[0])
    assert results["results"]["demo_bio"]["acc,none"] == native["acc"]
    assert (out / "lm_eval_tasks" / "demo_bio.yaml").is_file()


def test_two_prepares_at_once_build_the_cache_once(tmp_path):
    """Two processes preparing one cache: the second waits for the first and uses its result; a half-built
    directory left by a killed build is removed, never used."""
    import subprocess
    import sys
    (tmp_path / ".thing.build-killed").mkdir()
    (tmp_path / ".thing.build-killed" / "partial").write_text("half")
    script = f"""
import time
from pathlib import Path
from armu_jax.shipped import _build_atomically
def build(out):
    with open({str(tmp_path / 'builds.log')!r}, 'a') as log:
        log.write('build\\n')
    time.sleep(1.0)
    (out / 'done').write_text('complete')
print((_build_atomically(Path({str(tmp_path / 'thing')!r}), build) / 'done').read_text())
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert [out.strip() for out, _ in results] == ["complete", "complete"]
    assert (tmp_path / "builds.log").read_text() == "build\n"
    assert not (tmp_path / ".thing.build-killed").exists()
