"""Run armu_jax on several GPU nodes with SLURM: writes a batch script and submits it with sbatch.

    python -m launch.slurm --nodes=2 --gpus_per_node=4 --flagfile=configs/llama3_8b_wmdp_adaptive.flags \
        [--model=gs://bucket/llama-3-8b] [--output_dir=gs://bucket/runs/l8] \
        [--partition=gpu] [--time=04:00:00] [--dry_run] [-- flags]

One process per node (srun), each seeing its node's GPUs; with --multihost, jax.distributed finds
the others from SLURM's environment. The mesh is fsdp over all GPUs of all nodes. --model and
--output_dir go to every task as they are (gs:// URLs, or paths every node mounts).

Workers of one study (--mode=tune, or a sweep with --tune_storage): --tune_workers=N submits a job
array of N tasks, each one node with --gpus_per_node GPUs running the same command (fsdp over its
GPUs); together they are N workers of the study in --tune_storage, which every node must reach (a
journal file on a shared filesystem, journal:/shared/study.log, or postgresql://...):

    python -m launch.slurm --tune_workers=8 --gpus_per_node=2 --flagfile=configs/zephyr7b_wmdp_adaptive.flags \
        --output_dir=/shared/runs/tune -- --mode=tune --tune_space=layer_id:5:12,beta:2:12:log \
        --tune_storage=journal:/shared/runs/tune/study.log --tune_trials=64
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from armu_jax.errors import UserError, run_cli
from launch.common import base_parser, execute, run_command


def worker_script(args) -> str:
    """--tune_workers=N: a job array of N one-node tasks, each a worker of the study."""
    text = " ".join(args.flags) + "\n" + (Path(args.flagfile).read_text() if Path(args.flagfile).is_file() else "")
    if "--mode=tune" not in text and "--mode=sweep" not in text:
        raise UserError("--tune_workers starts workers of a study: give -- --mode=tune (or --mode=sweep with --tune_storage)")
    if "--tune_storage=" not in text:
        raise UserError("--tune_workers: the workers on several nodes need a study every node reaches: "
                        "-- --tune_storage=journal:/shared/path/study.log or postgresql://USER:PASS@HOST/DB "
                        "(SQLite's locks are unreliable on a network filesystem)")
    if args.nodes != 1:
        raise UserError("--tune_workers: each worker is one node (--nodes=1, its --gpus_per_node GPUs)")
    command = run_command(args.flagfile, [f"--mesh=fsdp:{args.gpus_per_node}", *args.flags], multihost=False,
                          python="python", output_dir=args.output_dir, model=args.model)
    return _script(args, [f"--array=0-{args.tune_workers - 1}", "--nodes=1", "--ntasks=1"], "%A_%a", command)


def batch_script(args) -> str:
    if args.tune_workers:
        return worker_script(args)
    total = args.nodes * args.gpus_per_node
    command = run_command(args.flagfile, [f"--mesh=fsdp:{total}", *args.flags], multihost=True,
                          python="python", output_dir=args.output_dir, model=args.model)
    return _script(args, [f"--nodes={args.nodes}", "--ntasks-per-node=1"], "%j", command)


def _script(args, layout: list[str], log: str, command: list[str]) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={args.job_name}", *(f"#SBATCH {o}" for o in layout),
             f"#SBATCH --gpus-per-node={args.gpus_per_node}", f"#SBATCH --time={args.time}",
             f"#SBATCH --output={args.job_name}-{log}.log"]
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    lines += ["set -euo pipefail", "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 JAX_DEFAULT_MATMUL_PRECISION=highest",
              f"srun {shlex.join(command)}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = base_parser("armu_jax on several GPU nodes with SLURM")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, required=True)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--job_name", default="armu_jax")
    parser.add_argument("--tune_workers", type=int, default=0,
                        help="a job array of N one-node workers of one study (--mode=tune, or a sweep with --tune_storage)")
    parser.add_argument("--script", default="armu_jax.sbatch", help="where the batch script is written")
    args = parser.parse_args(argv)
    script = batch_script(args)
    if args.dry_run:
        print(f"# {args.script}\n{script}", end="")
    else:
        Path(args.script).write_text(script)
    return execute([("submit", ["sbatch", args.script])], args.dry_run)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
