"""The context of a command, derived once from its settings: the model directory (--model resolved:
a directory, or the embedded default), its ModelConfig, the device mesh and the dtype."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax

from armu_jax import sharding
from armu_jax.families import read_model_config
from armu_jax.shipped import resolve_model


@dataclass(frozen=True)
class RunContext:
    model_dir: Path
    model_cfg: object  # model_config.ModelConfig
    mesh: jax.sharding.Mesh
    dtype: str  # --dtype (model.parse_dtype gives the jnp dtype)

    @classmethod
    def of(cls, cfg, model: str | None = None) -> "RunContext":
        """cfg's context; model: another --model spelling (an export, the attacked run's original)."""
        model_dir = resolve_model(model or cfg.model)
        return cls(model_dir, read_model_config(model_dir), sharding.make_mesh(cfg.mesh), cfg.dtype)
