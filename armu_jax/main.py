"""python -m armu_jax.main --flagfile=configs/demo.flags [--flag=value ...]"""
from __future__ import annotations

import os

from absl import app, logging

from armu_jax.config import define_flags, from_flags
from armu_jax.errors import UserError

define_flags()


def enable_compilation_cache() -> None:
    """Persist XLA compilations under the cache dir: a rerun skips recompiling the same shapes."""
    import jax
    from armu_jax.embedded import cache_dir
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    enable_compilation_cache()
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):  # multi-host (TPU pods, multi-node GPU)
        import jax
        jax.distributed.initialize()
    try:
        cfg = from_flags()
        if cfg.mode == "eval":
            from armu_jax.evaluate import evaluate_cli
            evaluate_cli(cfg)
        elif cfg.mode == "lm_eval":
            from armu_jax.harness import lm_eval_cli
            lm_eval_cli(cfg)
        else:
            from armu_jax.train import run
            out = run(cfg)
            print(f"armu_jax: run written to {out}")
    except UserError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    app.run(main)
