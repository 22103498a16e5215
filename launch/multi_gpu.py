"""Run armu_jax on the GPUs of one host: one process sees all of them, the step is sharded over them.

    python -m launch.multi_gpu --gpus=2 --flagfile=configs/zephyr7b_wmdp_adaptive.flags [--dry_run] [-- flags]

Sets the mesh to fsdp over the GPUs (parameters split, batch rows split), lets XLA take 95% of
each GPU's memory, and keeps float32 matmuls exact (no TF32) so --dtype=float32 reproduces the
reference.
"""
from __future__ import annotations

import os
import shlex
import sys

from armu_jax.errors import run_cli
from launch.common import base_parser, execute, run_command

ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}


def main(argv=None) -> int:
    parser = base_parser("armu_jax on the GPUs of one host")
    parser.add_argument("--gpus", type=int, required=True, help="how many GPUs (CUDA_VISIBLE_DEVICES 0..N-1)")
    args = parser.parse_args(argv)
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(args.gpus))}
    command = run_command(args.flagfile, [f"--mesh=fsdp:{args.gpus}", *args.flags], multihost=False,
                          output_dir=args.output_dir, model=args.model)
    shown = " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(command)
    if args.dry_run:
        return execute([("run on this host's GPUs", shown)], True)
    return execute([("run on this host's GPUs", command)], False, env={**os.environ, **env})


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
