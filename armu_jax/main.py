"""python -m armu_jax.main --flagfile=configs/demo.flags [--flag=value ...]"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from armu_jax.config import define_flags, from_flag_values
from armu_jax.errors import USAGE_EXIT, run_cli
from armu_jax.runtime import enable_compilation_cache, go_offline

define_flags()


def dispatch() -> None:
    cfg = from_flag_values(flags.FLAGS)
    import jax
    from armu_jax import hosts
    hosts.start(cfg.coordinator_address, cfg.num_processes, cfg.process_id, cfg.multihost)
    if cfg.dtype == "float32":  # exact float32 matmuls on GPU (no TF32) and TPU (no bf16 passes)
        jax.config.update("jax_default_matmul_precision", "highest")
    if cfg.mode == "eval":
        from armu_jax.evaluate import evaluate_cli
        evaluate_cli(cfg)
    elif cfg.mode == "compile":
        from armu_jax.compile_report import compile_cli
        compile_cli(cfg)
    elif cfg.mode == "norms":
        from armu_jax.norms import norms_cli
        norms_cli(cfg)
    elif cfg.mode == "sweep":
        from armu_jax.sweep import sweep_cli
        sweep_cli(cfg)
    elif cfg.mode == "attack":
        from armu_jax.attack import attack_cli
        attack_cli(cfg)
    elif cfg.mode == "parity":
        from armu_jax.parity import parity_cli
        return parity_cli(cfg)
    elif cfg.mode == "lm_eval":
        from armu_jax.harness import lm_eval_cli
        lm_eval_cli(cfg)
    else:
        from armu_jax.train import run
        print(f"armu_jax: run written to {run(cfg)}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with its errors (unknown flag, bad value, missing flagfile) as one line, exit 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        print(f"error: {err}; see python -m armu_jax.main --helpfull", file=sys.stderr)
        sys.exit(USAGE_EXIT)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    go_offline()
    enable_compilation_cache()
    run_cli(dispatch)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
