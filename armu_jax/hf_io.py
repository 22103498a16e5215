"""Hugging Face checkpoints in and out: safetensors only (never pickle), a key map plus transposes.

HF stores linear weights as (out, in); Flax kernels are (in, out). Embeddings and norms are
stored as they are. Tied embeddings have no `lm_head.weight` in either direction.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from armu_jax.errors import RunFailure, UserError
from armu_jax.model_config import ModelConfig
from armu_jax.params import expected_paths, flatten, hf_key_to_path, needed_upto, path_to_hf_key, unflatten

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: str):
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise UserError(f"{model_dir} holds only pickle weights ({', '.join(sorted(pickles)[:3])}); armu_jax loads "
                        "safetensors only. Convert once with transformers: "
                        "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise UserError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def load_hf(model_dir: str | os.PathLike, dtype=jnp.float32, upto_layer: int | None = None
            ) -> tuple[ModelConfig, dict]:
    """A local HF directory -> (ModelConfig, Flax params in `dtype`). With upto_layer, only what
    layers 0..upto_layer need is read (params.truncate's subset): later layers are never loaded."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    cfg = ModelConfig.from_dir(model_dir)
    flat = {}
    for file in _weight_files(model_dir):
        with safe_open(file, framework="flax") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                path, transpose = hf_key_to_path(key)
                if upto_layer is not None and not needed_upto(path, upto_layer):
                    continue
                value = f.get_tensor(key).astype(dtype)
                flat[path] = value.T if transpose else value
    if cfg.tie_word_embeddings:
        flat.pop(("lm_head", "kernel"), None)
    expected = [p for p in expected_paths(cfg.num_hidden_layers, cfg.tie_word_embeddings)
                if upto_layer is None or needed_upto(p, upto_layer)]
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise UserError(f"{model_dir} lacks {len(missing)} parameters, e.g. {path_to_hf_key(missing[0])[0]}")
    return cfg, unflatten(flat)



def export_hf(params: dict, source_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
              overwrite: bool = False) -> Path:
    """Write params as a HF directory (config + tokenizer files copied from source_dir), atomically."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"export target {out_dir} exists and is not empty; choose another path or pass overwrite")
    jdtype = parse_dtype(dtype)
    tensors = {}
    for path, value in flatten(params).items():
        key, transpose = path_to_hf_key(path)
        value = jnp.asarray(value).astype(jdtype)
        tensors[key] = jnp.asarray(value.T if transpose else value)
    try:
        _write_atomically(tensors, source_dir, out_dir, dtype)
    except (OSError, SafetensorError) as err:  # safetensors reports a failed write as its own error type
        reason = f"{err.strerror} ({err.filename})" if isinstance(err, OSError) else str(err)
        raise RunFailure(f"export to {out_dir} failed: {reason}; nothing was replaced, an earlier export "
                         "there is intact") from None
    return out_dir


def _write_atomically(tensors: dict, source_dir: Path, out_dir: Path, dtype: str) -> None:
    """Build the directory beside the target, then swap it in; an earlier export is replaced only
    once the new one is complete, and restored if the swap fails."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new.", dir=out_dir.parent))
    old = None
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((source_dir / "config.json").read_text())
        config.pop("torch_dtype", None)
        config["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for item in source_dir.iterdir():
            is_weights = item.name.startswith("model") and (item.suffix == ".safetensors"
                                                            or item.name.endswith(".index.json"))
            if item.is_file() and item.name != "config.json" and not is_weights and item.suffix not in PICKLE_SUFFIXES:
                shutil.copy2(item, tmp / item.name)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old / out_dir.name, out_dir)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

