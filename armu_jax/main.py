"""python -m armu_jax.main --flagfile=configs/demo.flags [--flag=value ...]"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from armu_jax.config import check_flagfile, define_flags, from_flag_values, help_text, local_flagfile
from armu_jax.errors import USAGE_EXIT, UserError, run_cli
from armu_jax.runtime import enable_compilation_cache, go_offline, release_memory_after_compiles

define_flags()


# Each mode's entry point, imported when it runs: cli(cfg) -> exit code (None: 0).
MODES = {
    "train": "armu_jax.train:train_cli",
    "eval": "armu_jax.evaluate:evaluate_cli",
    "lm_eval": "armu_jax.lm_eval_mode:lm_eval_cli",
    "compile": "armu_jax.compile_report:compile_cli",
    "norms": "armu_jax.norms:norms_cli",
    "sweep": "armu_jax.sweep:sweep_cli",
    "attack": "armu_jax.attack:attack_cli",
    "parity": "armu_jax.parity:parity_cli",
    "tune": "armu_jax.tune:tune_cli",
}


def dispatch():
    cfg = from_flag_values(flags.FLAGS)
    import importlib  # the mode's module is imported only when it runs

    # jax and the run's modules load only once the flags are good: a bad flag is one line in 0.1 s
    import jax  # jax loads only once the flags are good (a bad flag fails in 0.1 s)

    from armu_jax import hosts  # the mode's module is imported only when it runs
    hosts.start(cfg.coordinator_address, cfg.num_processes, cfg.process_id, cfg.multihost)
    if cfg.dtype == "float32":  # exact float32 matmuls on GPU (no TF32) and TPU (no bf16 passes)
        jax.config.update("jax_default_matmul_precision", "highest")
    module, name = MODES[cfg.mode].split(":")
    result = getattr(importlib.import_module(module), name)(cfg)
    return result if isinstance(result, int) else None


HELP = ("--help", "-help", "-h", "--h", "-?", "--help=true", "--helpshort")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with its errors (unknown flag, bad value, missing flagfile) as one line, exit 2;
    --help prints the tool's settings by group (absl's own flags too: --helpfull)."""
    if any(arg in HELP for arg in argv[1:]):
        print(help_text(), end="")
        sys.exit(0)
    try:
        argv = list(argv)
        for i, arg in enumerate(argv[1:], 1):
            if arg.startswith(("--flagfile=", "-flagfile=")):
                check_flagfile(arg.split("=", 1)[1])
                argv[i] = "--flagfile=" + local_flagfile(arg.split("=", 1)[1])  # gs:// flagfiles too
        return flags.FLAGS(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USAGE_EXIT)
    except flags.Error as err:
        print(f"error: {err}; see python -m armu_jax.main --help", file=sys.stderr)
        sys.exit(USAGE_EXIT)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    go_offline()
    enable_compilation_cache()
    release_memory_after_compiles()
    run_cli(dispatch)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
