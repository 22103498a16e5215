"""A plain (non-editable) install runs --mode=lm_eval from another directory: nothing is read from the checkout."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    assert 0.0 <= results["results"]["demo_bio"]["acc,none"] <= 1.0
    assert (out / "lm_eval_tasks" / "demo_bio.yaml").is_file()
