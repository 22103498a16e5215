"""The device mesh and the one table that says how every parameter is sharded.

`--mesh` names axes and sizes, e.g. `data:1`, `fsdp:-1`, `data:2,fsdp:4` (at most one -1,
which takes the remaining devices; a mesh smaller than the host uses its first devices). Batches are split over data x fsdp; parameters are
split over fsdp along the dimension the table names. A parameter that matches no rule is
an error, never silently replicated.
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from armu_jax.errors import UserError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# (regex over the "/"-joined param path, the dimension sharded over fsdp or None).
PARAM_RULES = (
    (r"model/embed_tokens/embedding", 0),  # (vocab, hidden)
    (r"lm_head/kernel", 1),  # (hidden, vocab)
    (r"model/layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel", 0),  # (in, out)
    (r".*(layernorm|norm)/weight", None),
)


def parse_mesh(spec: str, n_devices: int) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        name, _, size = item.strip().partition(":")
        if name not in AXES or not re.fullmatch(r"-?\d+", size) or name in sizes:
            raise UserError(f"bad --mesh {spec!r}: use comma-separated axis:size with axes from {AXES}, "
                            "e.g. data:2,fsdp:4 or fsdp:-1")
        sizes[name] = int(size)
    unknown = [n for n, s in sizes.items() if s == -1]
    if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise UserError(f"bad --mesh {spec!r}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if n_devices % known:
            raise UserError(f"--mesh {spec!r}: {n_devices} devices do not divide by {known}")
        sizes[unknown[0]] = n_devices // known
    if math.prod(sizes.values()) > n_devices:
        raise UserError(f"--mesh {spec!r} needs {math.prod(sizes.values())} devices, this run has {n_devices}")
    return {axis: sizes.get(axis, 1) for axis in AXES}


def make_mesh(spec: str) -> Mesh:
    sizes = parse_mesh(spec, jax.device_count())
    count = math.prod(sizes.values())  # a mesh smaller than the host uses its first devices
    devices = np.asarray(jax.devices()[:count]).reshape(tuple(sizes.values()))
    return Mesh(devices, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    for pattern, dim in PARAM_RULES:
        if re.fullmatch(pattern, path):
            spec = [None] * len(shape)
            # A dimension that does not divide over fsdp (tiny test models) stays whole.
            if dim is not None and shape[dim] % mesh.shape["fsdp"] == 0:
                spec[dim] = "fsdp"
            return P(*spec)
    raise UserError(f"parameter {path} matches no sharding rule in armu_jax.sharding.PARAM_RULES")


def _path_str(keypath) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def param_shardings(params, mesh: Mesh):
    """NamedShardings for a Flax params tree ({'params': {...}})."""
    def one(keypath, leaf):
        path = _path_str(keypath).removeprefix("params/")
        return NamedSharding(mesh, param_spec(path, leaf.shape, mesh))
    return jax.tree_util.tree_map_with_path(one, params)


def tree_shardings_by_path(tree, mesh: Mesh):
    """Shardings for a tree whose dict keys include param paths (trainable leaves, optimizer moments)."""
    def one(keypath, leaf):
        for key in keypath:
            name = getattr(key, "key", None)
            if isinstance(name, str) and "/" in name:
                return NamedSharding(mesh, param_spec(name, leaf.shape, mesh))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % parallel:
        raise UserError(f"batch_size {batch_size} does not divide over the mesh's data x fsdp = {parallel} "
                        "devices; use a batch size that is a multiple of it or a smaller mesh")
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
