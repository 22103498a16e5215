"""Run armu_jax on every worker of a TPU VM slice or pod: copy the code, install, launch, fetch the log.

    python -m launch.tpu_pod --tpu=my-v5e-16 --zone=us-west4-a --flagfile=configs/zephyr7b_wmdp_adaptive.flags \
        --model=gs://my-bucket/zephyr-7b-beta --output_dir=gs://my-bucket/runs/zephyr-l7 \
        [--project=P] [--dry_run] -- --mesh=fsdp:-1

--model and --output_dir are passed to every worker as they are: gs:// URLs (each worker reads only
the byte ranges of its shards of layers 0..l; flags, metrics, TensorBoard, orbax checkpoints and the
export go to the bucket), or paths every worker mounts (NFS). A local directory the workers do not
share is refused by the run itself, before anything is written.

Every worker runs the same command with --multihost: jax.distributed.initialize() finds the other
workers from the TPU VM metadata; process 0 writes the run directory. Its log comes back as
./<tpu>-worker0.log.
"""
from __future__ import annotations

import shlex
import sys

from armu_jax.errors import run_cli
from launch.common import base_parser, execute, run_command

REMOTE_DIR = "~/armu_jax"
LOG = "~/armu_jax_run.log"


def steps(args) -> list[tuple[str, list[str]]]:
    where = ["--zone", args.zone] + (["--project", args.project] if args.project else [])
    ssh = lambda command: ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, *where, "--worker=all",
                           "--command", command]
    env = "export TPU_STDERR_LOG_LEVEL=2 JAX_COMPILATION_CACHE_DIR=~/.cache/armu_jax/xla"
    run = shlex.join(run_command(args.flagfile, args.flags, multihost=True, output_dir=args.output_dir,
                                 model=args.model))
    return [
        ("copy the code to every worker",
         ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", ".", f"{args.tpu}:{REMOTE_DIR}", *where,
          "--worker=all"]),
        ("install armu_jax with the TPU jax on every worker",
         ssh(f"cd {REMOTE_DIR} && python3 -m pip install -q 'torch==2.13.0' --index-url "
             f"https://download.pytorch.org/whl/cpu && python3 -m pip install -q -e '.[tpu]'")),
        ("run on every worker (process 0 writes the run directory)",
         ssh(f"set -o pipefail && {env} && cd {REMOTE_DIR} && {run} 2>&1 | tee {LOG}")),
        ("fetch process 0's log",
         ["gcloud", "compute", "tpus", "tpu-vm", "scp", f"{args.tpu}:{LOG}", f"./{args.tpu}-worker0.log", *where,
          "--worker=0"]),
    ]


def main(argv=None) -> int:
    parser = base_parser("armu_jax on every worker of a TPU VM slice or pod")
    parser.add_argument("--tpu", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    args = parser.parse_args(argv)
    return execute(steps(args), args.dry_run)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
