"""Launchers and profiles: the pod / GPU / SLURM launchers' dry runs, and a trace that opens."""
import subprocess
import sys

import pytest
from helpers import ROOT, run_settings

from armu_jax.config import config_with
from armu_jax.train import run

FLAGFILE = "configs/zephyr7b_wmdp_adaptive.flags"


def _dry_run(module: str, *args) -> str:
    result = subprocess.run([sys.executable, "-m", module, f"--flagfile={FLAGFILE}", "--dry_run", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tpu_pod_launcher_dry_run():
    out = _dry_run("launch.tpu_pod", "--tpu=pod-16", "--zone=us-west4-a", "--project=p", "--model=gs://b/zephyr",
                   "--output_dir=gs://b/runs/r1", "--", "--mesh=fsdp:-1")
    commands = [l for l in out.splitlines() if not l.startswith("#")]
    assert len(commands) == 4
    assert commands[0].startswith("gcloud compute tpus tpu-vm scp --recurse . ") and "--worker=all" in commands[0]
    assert "pip install -q -e '\"'\"'.[tpu]'\"'\"'" in commands[1] and "--worker=all" in commands[1]
    run_line = commands[2]
    assert "--worker=all" in run_line and "--zone us-west4-a --project p" in run_line
    assert (f"python3 -m armu_jax.main --flagfile={FLAGFILE} --multihost --output_dir=gs://b/runs/r1 "
            "--model=gs://b/zephyr --mesh=fsdp:-1") in run_line  # the URLs as they are
    assert "set -o pipefail" in run_line and "tee ~/armu_jax_run.log" in run_line
    assert commands[3].endswith("./pod-16-worker0.log --zone us-west4-a --project p --worker=0")


def test_multi_gpu_launcher_dry_run():
    out = _dry_run("launch.multi_gpu", "--gpus=2", "--", "--layer_id=9")
    line = out.splitlines()[1]
    assert line == ("XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 JAX_DEFAULT_MATMUL_PRECISION=highest CUDA_VISIBLE_DEVICES=0,1 "
                    f"python3 -m armu_jax.main --flagfile={FLAGFILE} --mesh=fsdp:2 --layer_id=9")


def test_slurm_launcher_dry_run_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launch.slurm", f"--flagfile={ROOT / FLAGFILE}", "--dry_run",
                             "--nodes=2", "--gpus_per_node=4", "--partition=gpu", "--output_dir=gs://b/r"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --gpus-per-node=4" in lines and "#SBATCH --partition=gpu" in lines
    assert f"srun python -m armu_jax.main --flagfile={ROOT / FLAGFILE} --multihost --output_dir=gs://b/r --mesh=fsdp:8" in lines
    assert lines[-1] == "sbatch armu_jax.sbatch" and not list(tmp_path.iterdir())


def test_slurm_tune_workers_are_a_job_array(tmp_path):
    common = [sys.executable, "-m", "launch.slurm", f"--flagfile={FLAGFILE}", "--gpus_per_node=2", "--dry_run",
              "--tune_workers=8", "--output_dir=/shared/tune", "--", "--mode=tune", "--tune_space=beta:2:12:log"]
    result = subprocess.run([*common, "--tune_storage=journal:/shared/tune/study.log"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "#SBATCH --array=0-7" in lines and "#SBATCH --nodes=1" in lines and "#SBATCH --gpus-per-node=2" in lines
    assert (f"srun python -m armu_jax.main --flagfile={FLAGFILE} --output_dir=/shared/tune --mesh=fsdp:2 --mode=tune "
            "--tune_space=beta:2:12:log --tune_storage=journal:/shared/tune/study.log") in lines
    refused = subprocess.run(common, cwd=ROOT, capture_output=True, text=True, timeout=120)  # no shared study
    assert refused.returncode == 2 and "need a study every node reaches" in refused.stderr


def test_launcher_refuses_a_url_without_a_bucket():
    result = subprocess.run([sys.executable, "-m", "launch.slurm", f"--flagfile={FLAGFILE}", "--nodes=2",
                             "--gpus_per_node=1", "--dry_run", "--output_dir=gs:///run"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "names no bucket" in result.stderr.strip().splitlines()[-1]


def test_launcher_refuses_stray_arguments():
    result = subprocess.run([sys.executable, "-m", "launch.multi_gpu", f"--flagfile={FLAGFILE}", "--gpus=2",
                             "--dry_run", "--", "layer_id=9"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: extra arguments must be armu_jax flags")


@pytest.mark.slow
def test_two_step_profile_window_writes_a_trace(tmp_path, tiny_llama):
    out = tmp_path / "run"
    run(config_with(**run_settings(tiny_llama, max_num_batches=5, profile_start_step=0,
                                   profile_num_steps=2, output_dir=str(out))))
    traces = list((out / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert b"step_num" in traces[0].read_bytes()  # the steps carry StepTraceAnnotation(step_num=...)
