"""The device mesh and the one table that says how every parameter is sharded.

`--mesh` names axes and sizes, e.g. `data:1`, `fsdp:-1`, `data:2,fsdp:4` (at most one -1,
which takes the remaining devices). Batch rows are split over data x fsdp (padded with empty rows
to a multiple of it); parameters are split over fsdp along the dimension the table names. A parameter that matches no rule is
an error, never silently replicated.
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from armu_jax.errors import UserError
from armu_jax.params import name_of, path_of_keys

AXES = ("data", "fsdp")  # batches are split over both; parameters over fsdp
# Train-state leaves that are not parameter-shaped: the step counter and per-topic coefficients.
REPLICATED_STATE = ("step", "coeffs", "coeff_ready")

# (regex over the "/"-joined param path, the dimension sharded over fsdp or None).
PARAM_RULES = (
    (r"model/embed_tokens/embedding", 0),  # (vocab, hidden)
    (r"lm_head/kernel", 1),  # (hidden, vocab)
    (r"model/layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel", 0),  # (in, out)
    (r"model/layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/bias", None),  # (out,): small
    (r".*(layernorm|norm)/weight", None),  # includes self_attn/q_norm, k_norm
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


def make_mesh(spec: str, devices=None) -> Mesh:
    """The mesh of --mesh over `devices` (default: every device of every process; or a TPU
    topology's, to compile for it). A mesh over all devices follows their physical layout
    (jax.make_mesh); one smaller than a single-process run uses its first devices."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh(spec, len(devices))
    shape, count = tuple(sizes.values()), math.prod(sizes.values())
    types = (jax.sharding.AxisType.Auto,) * len(AXES)
    if count == len(devices):
        return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
    if jax.process_count() > 1:
        raise UserError(f"--mesh {spec!r} uses {count} of the {len(devices)} devices of {jax.process_count()} "
                        "processes; with several processes the mesh must cover every device (e.g. fsdp:-1)")
    return Mesh(np.asarray(devices[:count]).reshape(shape), AXES, axis_types=types)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    for pattern, dim in PARAM_RULES:
        if re.fullmatch(pattern, path):
            spec = [None] * len(shape)
            # A dimension that does not divide over fsdp (tiny test models) stays whole.
            if dim is not None and shape[dim] % mesh.shape["fsdp"] == 0:
                spec[dim] = "fsdp"
            return P(*spec)
    raise UserError(f"parameter {path} matches no sharding rule in armu_jax.sharding.PARAM_RULES")


def param_shardings(params, mesh: Mesh):
    """NamedShardings for a Flax params tree ({'params': {...}})."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: NamedSharding(mesh, param_spec(name_of(path_of_keys(kp)[1:]), leaf.shape, mesh)), params)


def state_shardings(state, mesh: Mesh, trainable_names):
    """Shardings for the train state, from its structure: a leaf under a trainable parameter's name
    (the trainable copy, optimizer moments) is sharded as that parameter; the step counter, the
    per-topic coefficients and scalar optimizer counters are replicated; any other leaf is an error."""
    names = set(trainable_names)

    def one(keypath, leaf):
        path = path_of_keys(keypath)
        param = next((k for k in path if k in names), None)
        if param is not None:
            return NamedSharding(mesh, param_spec(param, leaf.shape, mesh))
        if path[0] in REPLICATED_STATE or (path[0] == "opt_state" and leaf.ndim == 0):
            return NamedSharding(mesh, P())
        raise UserError(f"train-state leaf {'/'.join(path)} (shape {leaf.shape}) has no sharding rule in "
                        "armu_jax.sharding.state_shardings")
    return jax.tree_util.tree_map_with_path(one, state)


def batch_rows(mesh: Mesh, batch_size: int) -> int:
    """Rows a batch is padded to: the next multiple of data x fsdp, so any chip count takes the
    reference batch of 4. Padded rows carry zero loss weight and cost no more time per device than
    splitting the rows over a divisor of the mesh would (each device holds at least one row)."""
    parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-batch_size // parallel) * parallel


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over data x fsdp (pad them to batch_rows first)."""
    return NamedSharding(mesh, P(AXES))


def place(tree, shardings):
    """Host arrays onto their shardings (a tree of them, or a prefix: one sharding for a subtree).
    Each process hands over only the blocks its own devices hold, so with several hosts every host
    feeds its own rows and nothing is compared or sent across hosts (jax.device_put would check
    that every host passed the same whole array)."""
    def one(value, where):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, where, lambda index: value[index])
    return jax.tree.map(lambda where, subtree: jax.tree.map(lambda v: one(v, where), subtree), shardings, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
