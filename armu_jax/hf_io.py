"""Hugging Face checkpoints in and out: safetensors only (never pickle), a key map plus transposes.

HF stores linear weights as (out, in); Flax kernels are (in, out). Embeddings, norms and biases are
stored as they are. Tied embeddings have no `lm_head.weight` in either direction. Fused projections
(Phi-3's `qkv_proj` and `gate_up_proj`) are row blocks of one stored tensor: each block loads as its
own parameter (q/k/v_proj, gate/up_proj), read straight from its rows, and is fused again on export.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from armu_jax import outputs, storage, tensor_files
from armu_jax.errors import RunFailure, UserError
from armu_jax.families import read_model_config
from armu_jax.model import CausalLM, abstract_params, parse_dtype
from armu_jax.model_config import ModelConfig
from armu_jax.params import flatten, hf_key_to_path, name_of, needed_upto, path_to_hf_key, unflatten
from armu_jax.sharding import param_spec

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _weight_files(model_dir) -> list:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is not a safetensors index (JSON with a weight_map of tensor -> file); "
                            "restore it from the model's source") from None
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise UserError(f"{index} names {missing[0]}, which is not in {model_dir}; the download is incomplete")
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
    model_dir = storage.path(model_dir, "--model")
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    cfg = read_model_config(model_dir)
    reads = (storage.READS.bytes, storage.READS.requests)
    expected = expected_paths(cfg)
    flat = {}
    for stored, key, path, transpose, rows in _stored_params(model_dir, cfg):
        if path not in expected:
            raise UserError(f"{model_dir}: tensor {key} is not a parameter of this {cfg.family} config "
                            "(config.json and the weights disagree, e.g. on attention_bias or tied embeddings)")
        shape = stored.shape(key) if rows is None else (rows[1] - rows[0], *stored.shape(key)[1:])
        if tuple(shape[::-1] if transpose else shape) != expected[path]:
            want = expected[path][::-1] if transpose else expected[path]
            raise UserError(f"{model_dir}: tensor {key} has shape {tuple(shape)}, config.json implies {tuple(want)}; "
                            "the config and the weights are of different models")
        if upto_layer is None or needed_upto(path, upto_layer):
            flat[path] = _place(stored, key, path, transpose, rows, np.dtype(dtype), mesh)
    missing = sorted(p for p in set(expected) - set(flat) if upto_layer is None or needed_upto(p, upto_layer))
    if missing:
        raise UserError(f"{model_dir} lacks {len(missing)} parameters, e.g. {path_to_hf_key(missing[0])[0]}")
    if storage.is_url(model_dir):
        report_reads(model_dir, reads)
    return cfg, unflatten(flat)


def report_reads(model_dir, before: tuple[int, int]) -> dict:
    """One line on stderr: what this process read of a checkpoint in a bucket (bytes, requests)
    against the checkpoint's size."""
    total = sum(storage.size(f) for f in _weight_files(model_dir))
    read = {"process": jax.process_index(), "bytes": storage.READS.bytes - before[0],
            "requests": storage.READS.requests - before[1], "checkpoint_bytes": total}
    print(f"armu_jax: process {read['process']} read {read['bytes'] / 1e6:.2f} MB of the checkpoint's "
          f"{total / 1e6:.2f} MB from {model_dir} in {read['requests']} requests", file=sys.stderr)
    return read


def expected_paths(cfg: ModelConfig) -> dict:
    """{path: shape} of every parameter of the decoder for this config (the model's own tree, not a
    hand-kept list): one layer's parameters are traced abstractly and repeated for each layer."""
    one = dataclasses.replace(cfg, num_hidden_layers=1, layer_types=cfg.layer_types[:1])
    paths = {}
    for path, leaf in flatten(abstract_params(CausalLM(one))).items():
        if path[1:2] == ("layers_0",):
            paths.update({(path[0], f"layers_{i}", *path[2:]): tuple(leaf.shape) for i in range(cfg.num_hidden_layers)})
        else:
            paths[path] = tuple(leaf.shape)
    return paths


def fused_parts(cfg: ModelConfig, key: str) -> list[tuple[str, int, int]] | None:
    """(key of the part, first row, end row) of each projection fused into a stored tensor (Phi-3's
    qkv_proj, gate_up_proj), or None for an ordinary tensor."""
    match = re.fullmatch(r"(model\.layers\.\d+\.)(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight", key)
    if not match:
        return None
    prefix, name = match.groups()
    if name == "self_attn.qkv_proj" and cfg.fused_qkv:
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        blocks = [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)]
    elif name == "mlp.gate_up_proj" and cfg.fused_gate_up:
        blocks = [("mlp.gate_proj", cfg.intermediate_size), ("mlp.up_proj", cfg.intermediate_size)]
    else:
        return None
    parts, start = [], 0
    for part, rows in blocks:
        parts.append((f"{prefix}{part}.weight", start, start + rows))
        start += rows
    return parts


def _stored_params(model_dir, cfg: ModelConfig):
    """(file, key, Flax path, transpose, rows) of every parameter tensor in the checkpoint, in file order
    (rotary caches and a tied model's lm_head are not parameters); rows: the (start, end) block of a
    fused tensor that holds the parameter, else None."""
    for file in _weight_files(model_dir):
        try:
            stored = tensor_files.StoredTensors(file)
        except OSError as err:
            raise UserError(f"cannot read {file}: {err.strerror}") from None
        for key in stored.keys():
            if key.endswith("rotary_emb.inv_freq"):
                continue
            parts = fused_parts(cfg, key)
            if parts is not None:
                if stored.shape(key)[0] != parts[-1][2]:
                    raise UserError(f"{file}: {key} has {stored.shape(key)[0]} rows, the config implies {parts[-1][2]}")
                for part, start, end in parts:
                    path, transpose = hf_key_to_path(part)
                    yield stored, key, path, transpose, (start, end)
                continue
            path, transpose = hf_key_to_path(key)
            if cfg.tie_word_embeddings and path == ("lm_head", "kernel"):
                continue
            yield stored, key, path, transpose, None


def _place(stored: tensor_files.StoredTensors, key: str, path, transpose: bool, rows, dtype: np.dtype,
           mesh) -> jax.Array:
    """One stored tensor (or the rows of it a fused projection gives this parameter) as a jax.Array:
    each addressable device's block is read from the file (HF's (out, in) slice for a (in, out) kernel
    block), cast on the host and placed on its device."""
    shape = stored.shape(key)
    if rows is not None:
        shape = (rows[1] - rows[0],) + shape[1:]
    if transpose:
        shape = shape[::-1]
    if mesh is None:
        where = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
        where = NamedSharding(mesh, param_spec(name_of(path), shape, mesh))

    def stored_index(index):
        index = index[::-1] if transpose else tuple(index)
        if rows is None:
            return index
        first, *rest = index
        begin, end, _ = first.indices(rows[1] - rows[0])
        return (slice(rows[0] + begin, rows[0] + end), *rest)

    read = lambda index: stored.read(key, index)
    if storage.is_url(stored.path):  # one ranged read of the rows this process's devices need
        read = _rows_once(stored, key, [stored_index(i) for i in where.addressable_devices_indices_map(shape).values()])

    def block(index):
        values = read(stored_index(index))
        return np.ascontiguousarray(values.T.astype(dtype)) if transpose else values.astype(dtype)
    return jax.make_array_from_callback(shape, where, block)


def _rows_once(stored: tensor_files.StoredTensors, key: str, indices: list):
    """A reader of blocks of a stored tensor in a bucket that fetches, with one ranged request, the
    stored rows that any of `indices` (this process's devices' blocks) covers, and slices each block
    from them: a column block costs the tensor's rows once per process, not once per device."""
    rows = stored.shape(key)[0] if stored.shape(key) else 0
    spans = [(index[0] if index else slice(None)).indices(rows)[:2] for index in indices] or [(0, rows)]
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    fetched = stored.read(key, (slice(lo, hi),))

    def read(index):
        first, *rest = tuple(index) or (slice(None),)
        begin, end, step = first.indices(rows)
        return np.array(fetched[(slice(begin - lo, end - lo, step), *rest)])
    return read


def export_hf(params: dict, source_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
              overwrite: bool = False) -> Path:
    """Write a params tree as a HF directory (config + tokenizer files copied from source_dir), atomically;
    projections the family stores fused are fused again."""
    source_dir, out_dir = storage.path(source_dir, "--model"), storage.path(out_dir, "export target")
    _check_target(out_dir, overwrite)
    np_dtype = np.dtype(parse_dtype(dtype))
    cfg = read_model_config(source_dir)
    tensors = {}
    for path, value in flatten(params).items():
        key, transpose = path_to_hf_key(path)
        tensors[key] = (value, transpose)
    entries = []
    for key in list(tensors):
        fused = _fused_key(cfg, key)
        if fused is None:
            value, transpose = tensors[key]
            shape = tuple(value.shape)[::-1] if transpose else tuple(value.shape)
            host = lambda value=value, transpose=transpose: _host(value, transpose, np_dtype)
            entries.append((key, shape, np_dtype, host))
        elif fused[1] == 0:  # the first part writes the fused tensor
            parts = fused_parts(cfg, fused[0])
            values = [tensors[part][0] for part, *_ in parts]
            shape = (parts[-1][2], values[0].shape[0])
            host = lambda values=values: np.concatenate([_host(v, True, np_dtype) for v in values])
            entries.append((fused[0], shape, np_dtype, host))
    _write_atomically({"model.safetensors": entries}, source_dir, out_dir, dtype)
    return out_dir


def _fused_key(cfg: ModelConfig, key: str) -> tuple[str, int] | None:
    """(the stored fused key, first row) of a parameter the family stores fused, else None."""
    match = re.fullmatch(r"(model\.layers\.\d+\.)(self_attn|mlp)\.\w+_proj\.weight", key)
    if not match:
        return None
    fused = match.group(1) + ("self_attn.qkv_proj.weight" if match.group(2) == "self_attn" else "mlp.gate_up_proj.weight")
    for part, start, _ in fused_parts(cfg, fused) or ():
        if part == key:
            return fused, start
    return None


def export_trained(trained: dict, source_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   dtype: str = "float32", overwrite: bool = True, clean_stale: bool = False) -> Path:
    """The source checkpoint with the trained tensors (param name -> host array) swapped in, as a HF
    directory: streamed file by file, tensor by tensor, with the source's file layout, so the
    host holds one tensor at a time and no device holds anything. A fused tensor with a trained part
    is read and that part's rows replaced. clean_stale (a caller holding the directory's lock, as a run
    does): what a killed export left beside out_dir is removed first (outputs.build_directory)."""
    source_dir, out_dir = storage.path(source_dir, "--model"), storage.path(out_dir, "export target")
    _check_target(out_dir, overwrite)
    np_dtype = np.dtype(parse_dtype(dtype))
    cfg = read_model_config(source_dir)
    files: dict[str, list] = {}
    unused = set(trained)
    replaced: dict[str, list] = {}  # stored key -> [(rows or None, trained name, transpose)]
    order = {}  # stored key -> its file, in file order
    for stored, key, path, transpose, rows in _stored_params(source_dir, cfg):
        name = name_of(path)
        order.setdefault(key, stored)
        if name in trained:
            unused.discard(name)
            replaced.setdefault(key, []).append((rows, name, transpose))
    for key, stored in order.items():
        swaps = replaced.get(key)
        if swaps and swaps[0][0] is None:  # a whole tensor trained
            _, name, transpose = swaps[0]
            host = lambda value=trained[name], transpose=transpose: _host(value, transpose, np_dtype)
        elif swaps:
            def host(stored=stored, key=key, swaps=swaps):
                values = stored.read(key).astype(np_dtype)
                for (start, end), name, transpose in swaps:
                    values[start:end] = _host(trained[name], transpose, np_dtype)
                return values
        elif stored.dtype(key) == np_dtype:  # unchanged and already in the export dtype: bytes copied
            host = stored.raw(key)
        else:
            host = lambda stored=stored, key=key: stored.read(key).astype(np_dtype)
        files.setdefault(stored.path.name, []).append((key, stored.shape(key), np_dtype, host))
    if unused:
        raise RunFailure(f"export: trained tensors {sorted(unused)} are not in {source_dir}")
    _write_atomically(files, source_dir, out_dir, dtype, clean_stale)
    return out_dir


def _host(value, transpose: bool, dtype: np.dtype) -> np.ndarray:
    """A parameter as a HF-layout host array in dtype."""
    value = np.asarray(jax.device_get(value))
    return (value.T if transpose else value).astype(dtype, copy=False)


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if not overwrite:
        outputs.claim(out_dir, flag="export target", hint="choose another path or pass overwrite")


def _write_atomically(files: dict[str, list], source_dir, out_dir, dtype: str, clean_stale: bool = False) -> None:
    """Build the directory beside the target, then swap it in; an earlier export is replaced only
    once the new one is complete, and restored if the swap fails. A write that fails (full disk,
    unwritable directory) leaves everything as it was and says so in one line. In a bucket the
    export is written in place with config.json last (outputs.build_directory's marker): an export
    without config.json is one that did not finish."""
    def build(tmp) -> None:
        sizes = {name: tensor_files.write(tmp / name, entries, metadata={"format": "pt"})
                 for name, entries in files.items()}
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {key: name for name, entries in files.items() for key, *_ in entries}}
            outputs.write_text(tmp / "model.safetensors.index.json", json.dumps(index, indent=2))
        for item in source_dir.iterdir():
            is_weights = item.name.startswith("model") and (item.suffix == ".safetensors"
                                                            or item.name.endswith(".index.json"))
            if (not item.is_dir() and item.name != "config.json" and not is_weights
                    and item.suffix not in PICKLE_SUFFIXES):
                storage.copy(item, tmp / item.name)
        config = json.loads((source_dir / "config.json").read_text())
        config.pop("torch_dtype", None)
        config["dtype"] = dtype
        outputs.write_text(tmp / "config.json", json.dumps(config, indent=2))

    try:
        outputs.build_directory(out_dir, build, replace=True, clean_stale=clean_stale, marker="config.json")
    except OSError as err:
        raise RunFailure(f"export to {out_dir} failed: {err.strerror or err} ({err.filename or 'writing a tensor'}); "
                         "nothing was replaced, an earlier export there is intact") from None
