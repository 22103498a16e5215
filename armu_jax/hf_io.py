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

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from armu_jax import tensor_files
from armu_jax.errors import RunFailure, UserError
from armu_jax.model_config import ModelConfig
from armu_jax.params import (expected_paths, flatten, hf_key_to_path, name_of, needed_upto, path_to_hf_key,
                             unflatten)
from armu_jax.sharding import param_spec

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


def load_hf(model_dir: str | os.PathLike, dtype=jnp.float32, upto_layer: int | None = None, mesh=None
            ) -> tuple[ModelConfig, dict]:
    """A local HF directory -> (ModelConfig, Flax params in `dtype`). With upto_layer, only what
    layers 0..upto_layer need is read (params.truncate's subset): later layers are never loaded.

    Each tensor is read from the memory-mapped file straight into its place: with a mesh, every
    device receives only its shard (sharding.PARAM_RULES), read from the file slice by slice, so no
    device and no host ever holds more than the tensors it needs; without one, device 0 holds it.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    cfg = ModelConfig.from_dir(model_dir)
    flat = {}
    for stored, key, path, transpose in _stored_params(model_dir, cfg):
        if upto_layer is None or needed_upto(path, upto_layer):
            flat[path] = _place(stored, key, path, transpose, np.dtype(dtype), mesh)
    expected = [p for p in expected_paths(cfg.num_hidden_layers, cfg.tie_word_embeddings)
                if upto_layer is None or needed_upto(p, upto_layer)]
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise UserError(f"{model_dir} lacks {len(missing)} parameters, e.g. {path_to_hf_key(missing[0])[0]}")
    return cfg, unflatten(flat)


def _stored_params(model_dir: Path, cfg: ModelConfig):
    """(file, key, Flax path, transpose) of every parameter tensor in the checkpoint, in file order
    (rotary caches and a tied model's lm_head are not parameters)."""
    for file in _weight_files(model_dir):
        try:
            stored = tensor_files.StoredTensors(file)
        except OSError as err:
            raise UserError(f"cannot read {file}: {err.strerror}") from None
        for key in stored.keys():
            if key.endswith("rotary_emb.inv_freq"):
                continue
            path, transpose = hf_key_to_path(key)
            if cfg.tie_word_embeddings and path == ("lm_head", "kernel"):
                continue
            yield stored, key, path, transpose


def _place(stored: tensor_files.StoredTensors, key: str, path, transpose: bool, dtype: np.dtype, mesh) -> jax.Array:
    """One stored tensor as a jax.Array: each addressable device's block is read from the file
    (HF's (out, in) slice for a (in, out) kernel block), cast on the host and placed on its device."""
    shape = stored.shape(key)
    if transpose:
        shape = shape[::-1]
    if mesh is None:
        where = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
        where = NamedSharding(mesh, param_spec(name_of(path), shape, mesh))

    def block(index):
        if transpose:
            return np.ascontiguousarray(stored.read(key, index[::-1]).T.astype(dtype))
        return stored.read(key, index).astype(dtype)
    return jax.make_array_from_callback(shape, where, block)


def export_hf(params: dict, source_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
              overwrite: bool = False) -> Path:
    """Write a params tree as a HF directory (config + tokenizer files copied from source_dir), atomically."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    _check_target(out_dir, overwrite)
    np_dtype = np.dtype(parse_dtype(dtype))
    entries = []
    for path, value in flatten(params).items():
        key, transpose = path_to_hf_key(path)
        shape = tuple(value.shape)[::-1] if transpose else tuple(value.shape)
        host = lambda value=value, transpose=transpose: _host(value, transpose, np_dtype)
        entries.append((key, shape, np_dtype, host))
    _write_atomically({"model.safetensors": entries}, source_dir, out_dir, dtype)
    return out_dir


def export_trained(trained: dict, source_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   dtype: str = "float32", overwrite: bool = True) -> Path:
    """The source checkpoint with the trained tensors (param name -> host array) swapped in, as a HF
    directory: streamed file by file, tensor by tensor, with the source's file layout, so the
    host holds one tensor at a time and no device holds anything."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    _check_target(out_dir, overwrite)
    np_dtype = np.dtype(parse_dtype(dtype))
    cfg = ModelConfig.from_dir(source_dir)
    files: dict[str, list] = {}
    unused = set(trained)
    for stored, key, path, transpose in _stored_params(source_dir, cfg):
        name = name_of(path)
        if name in trained:
            unused.discard(name)
            host = lambda value=trained[name], transpose=transpose: _host(value, transpose, np_dtype)
        elif stored.dtype(key) == np_dtype:  # unchanged and already in the export dtype: bytes copied
            host = stored.raw(key)
        else:
            host = lambda stored=stored, key=key: stored.read(key).astype(np_dtype)
        files.setdefault(stored.path.name, []).append((key, stored.shape(key), np_dtype, host))
    if unused:
        raise RunFailure(f"export: trained tensors {sorted(unused)} are not in {source_dir}")
    _write_atomically(files, source_dir, out_dir, dtype)
    return out_dir


def _host(value, transpose: bool, dtype: np.dtype) -> np.ndarray:
    """A parameter as a HF-layout host array in dtype."""
    value = np.asarray(jax.device_get(value))
    return (value.T if transpose else value).astype(dtype, copy=False)


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"export target {out_dir} exists and is not empty; choose another path or pass overwrite")


def _write_atomically(files: dict[str, list], source_dir: Path, out_dir: Path, dtype: str) -> None:
    """Build the directory beside the target, then swap it in; an earlier export is replaced only
    once the new one is complete, and restored if the swap fails. A write that fails (full disk,
    unwritable directory) leaves everything as it was and says so in one line."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new.", dir=out_dir.parent))
    old = None
    try:
        sizes = {name: tensor_files.write(tmp / name, entries, metadata={"format": "pt"})
                 for name, entries in files.items()}
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {key: name for name, entries in files.items() for key, *_ in entries}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
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
    except BaseException as err:
        if old is not None and not out_dir.exists():
            os.replace(old / out_dir.name, out_dir)
        if isinstance(err, OSError):
            raise RunFailure(f"export to {out_dir} failed: {err.strerror} ({err.filename or 'writing a tensor'}); "
                             "nothing was replaced, an earlier export there is intact") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
