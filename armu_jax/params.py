"""The parameter tree, in one place: paths, HF names, flatten/unflatten, trainable leaves, truncation.

A Flax params tree is `{"params": {"model": {"layers_7": {"mlp": {"down_proj": {"kernel": ...}}}}}}`.
A parameter's *path* is its tuple of keys below the "params" root, e.g.
`("model", "layers_7", "mlp", "down_proj", "kernel")`; its *name* is that path joined by "/"
(`model/layers_7/mlp/down_proj/kernel`), which is how the sharding table, the trainable leaves
of the train state and the checkpoints refer to it. Its HF key is
`model.layers.7.mlp.down_proj.weight` (linear kernels transposed).
"""
from __future__ import annotations

import re

import jax

from armu_jax.errors import UserError

Path = tuple[str, ...]
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_FIXED = {"model.embed_tokens.weight": (("model", "embed_tokens", "embedding"), False),
          "model.norm.weight": (("model", "norm", "weight"), False),
          "lm_head.weight": (("lm_head", "kernel"), True)}


def name_of(path: Path) -> str:
    return "/".join(path)


def path_of_keys(keypath) -> Path:
    """A jax key path (DictKey / GetAttrKey / SequenceKey entries) as a tuple of strings."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)


def flatten(params: dict) -> dict[Path, object]:
    """{path: leaf} of a params tree (the "params" root left out)."""
    return {path_of_keys(kp): leaf for kp, leaf in jax.tree_util.tree_leaves_with_path(params["params"])}


def unflatten(flat: dict[Path, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return {"params": tree}


# ----------------------------------------------------------------------------- HF names

def hf_key_to_path(key: str) -> tuple[Path, bool]:
    """HF key -> (Flax param path, whether to transpose). Norm weights and biases are stored as they
    are, linear weights transposed."""
    if key in _FIXED:
        return _FIXED[key]
    match = _LAYER_KEY.fullmatch(key)
    if match:
        layer, rest, kind = match.groups()
        parts = rest.split(".")
        if kind == "bias":
            return ("model", f"layers_{layer}", *parts, "bias"), False
        if parts[-1].endswith("norm"):
            return ("model", f"layers_{layer}", *parts, "weight"), False
        return ("model", f"layers_{layer}", *parts, "kernel"), True
    raise UserError(f"unexpected tensor {key!r} in the checkpoint; not a parameter of a supported decoder")


def path_to_hf_key(path: Path) -> tuple[str, bool]:
    for key, (fixed, transpose) in _FIXED.items():
        if path == fixed:
            return key, transpose
    layer = path[1].removeprefix("layers_")
    suffix = "bias" if path[-1] == "bias" else "weight"
    return f"model.layers.{layer}.{'.'.join(path[2:-1])}.{suffix}", path[-1] == "kernel"


def layer_of(path: Path) -> int | None:
    """The decoder layer a path belongs to (None for the embedding, final norm and LM head)."""
    return int(path[1].removeprefix("layers_")) if len(path) > 1 and path[1].startswith("layers_") else None


# ----------------------------------------------------------------------------- trainable leaves

def trainable_names(params: dict, layers, names, flag: str = "--update_params", allow_all: bool = False) -> list[str]:
    """The names of the trainable leaves, e.g. mlp.down_proj of each updated layer: a projection names
    its kernel, a norm (post_feedforward_layernorm, self_attn.q_norm) its weight, and `X.bias` a bias;
    with allow_all, names ("all",): every leaf of params (relearning everything), and ("layers",): every leaf
    of the given layers. flag: the setting, for the error."""
    every = [name_of(p) for p in flatten(params)]
    if tuple(names) == ("all",) and allow_all:
        return every
    if tuple(names) == ("layers",) and allow_all:
        return [n for n in every if any(n.startswith(f"model/layers_{layer}/") for layer in layers)]
    present = set(every)
    wanted = []
    for layer in layers:
        for name in names:
            parts = name.split(".")
            leaf = [] if parts[-1] in ("kernel", "weight", "bias") else ["weight" if parts[-1].endswith("norm")
                                                                          else "kernel"]
            full = "/".join(["model", f"layers_{layer}", *parts, *leaf])
            if full not in present:
                raise UserError(f"{flag}: the model has no parameter {full} (use names like mlp.down_proj, "
                                "mlp.up_proj, self_attn.o_proj, post_feedforward_layernorm, self_attn.q_proj.bias)")
            wanted.append(full)
    return wanted


def take(params: dict, names) -> dict:
    """{name: leaf} of the named leaves."""
    flat = {name_of(p): v for p, v in flatten(params).items()}
    return {n: flat[n] for n in names}


def merge(params: dict, trainable: dict) -> dict:
    """params with the named leaves of `trainable` swapped in (the updated model)."""
    flat = flatten(params)
    for name, value in trainable.items():
        flat[tuple(name.split("/"))] = value
    return unflatten(flat)


def needed_upto(path: Path, layer_id: int) -> bool:
    """Whether layers 0..layer_id need the parameter: the embedding and those layers do; later
    layers, the final norm and the LM head do not."""
    layer = layer_of(path)
    return path == ("model", "embed_tokens", "embedding") or (layer is not None and layer <= layer_id)


def truncate(params: dict, layer_id: int) -> dict:
    """Only what layers 0..layer_id need."""
    return unflatten({p: v for p, v in flatten(params).items() if needed_upto(p, layer_id)})
