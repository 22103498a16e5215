"""Hugging Face checkpoints in and out: safetensors only (never pickle), a key map plus transposes.

HF stores linear weights as (out, in); Flax kernels are (in, out). Embeddings and norms are
stored as they are. Tied embeddings have no `lm_head.weight` in either direction.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from armu_jax.errors import UserError
from armu_jax.model_config import ModelConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def parse_dtype(name: str):
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def hf_key_to_path(key: str) -> tuple[tuple[str, ...], bool]:
    """HF key -> (Flax param path, whether to transpose)."""
    if key == "model.embed_tokens.weight":
        return ("model", "embed_tokens", "embedding"), False
    if key == "model.norm.weight":
        return ("model", "norm", "weight"), False
    if key == "lm_head.weight":
        return ("lm_head", "kernel"), True
    match = _LAYER_KEY.fullmatch(key)
    if match:
        layer, rest = match.groups()
        parts = rest.split(".")
        if parts[-1].endswith("layernorm"):
            return ("model", f"layers_{layer}", *parts, "weight"), False
        return ("model", f"layers_{layer}", *parts, "kernel"), True
    raise UserError(f"unexpected tensor {key!r} in the checkpoint; not a Llama/Mistral parameter")


def path_to_hf_key(path: tuple[str, ...]) -> tuple[str, bool]:
    if path == ("model", "embed_tokens", "embedding"):
        return "model.embed_tokens.weight", False
    if path == ("model", "norm", "weight"):
        return "model.norm.weight", False
    if path == ("lm_head", "kernel"):
        return "lm_head.weight", True
    layer = path[1].removeprefix("layers_")
    return f"model.layers.{layer}.{'.'.join(path[2:-1])}.weight", path[-1] == "kernel"


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


def _nest(flat: dict[tuple[str, ...], jnp.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def load_hf(model_dir: str | os.PathLike, dtype=jnp.float32) -> tuple[ModelConfig, dict]:
    """A local HF directory -> (ModelConfig, Flax params in `dtype`)."""
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
                value = f.get_tensor(key).astype(dtype)
                flat[path] = value.T if transpose else value
    if cfg.tie_word_embeddings:
        flat.pop(("lm_head", "kernel"), None)
    expected = expected_paths(cfg)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise UserError(f"{model_dir} lacks {len(missing)} parameters, e.g. {path_to_hf_key(missing[0])[0]}")
    return cfg, {"params": _nest(flat)}


def expected_paths(cfg: ModelConfig) -> list[tuple[str, ...]]:
    paths = [("model", "embed_tokens", "embedding"), ("model", "norm", "weight")]
    for i in range(cfg.num_hidden_layers):
        base = ("model", f"layers_{i}")
        paths += [base + (n, "weight") for n in ("input_layernorm", "post_attention_layernorm")]
        paths += [base + ("self_attn", p, "kernel") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        paths += [base + ("mlp", p, "kernel") for p in ("gate_proj", "up_proj", "down_proj")]
    if not cfg.tie_word_embeddings:
        paths.append(("lm_head", "kernel"))
    return paths


def flatten(params: dict) -> dict[tuple[str, ...], jnp.ndarray]:
    flat = {}
    for keypath, value in jax.tree_util.tree_leaves_with_path(params["params"]):
        flat[tuple(k.key for k in keypath)] = value
    return flat


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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((source_dir / "config.json").read_text())
        config.pop("torch_dtype", None)
        config["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for item in source_dir.iterdir():
            is_weights = item.name.startswith("model") and (item.suffix == ".safetensors" or item.name.endswith(".index.json"))
            if item.is_file() and item.name != "config.json" and not is_weights and item.suffix not in PICKLE_SUFFIXES:
                shutil.copy2(item, tmp / item.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir

