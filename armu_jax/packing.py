"""Real tokens only: a left-padded batch's per-token work on its real tokens and one pad token.

A left-padded batch of the reference ([rows, T], pads first) spends most of its positions on padding
(53% of the demo's): every pad position attends to no key (HF SDPA: a query with no visible key gets a
zero attention output), so its residual stream is a function of the pad token's id alone, the same at
every pad position, and no real token ever reads it. The step therefore runs the per-token work
(projections, MLPs, norms) on the real tokens packed side by side plus one pad token standing for all
pad positions ([S, N] with S the batch's shards, N a multiple of the padding multiple), and only the
attention's score and value products in the padded [rows, T, T] layout, as before. `unpack` gives the
loss and the metrics the padded [rows, T, D] activations, the same values at every position (a pad
position the pad token's); its gradient sums the pad positions' into the pad token, so the reference's
MSE over pad positions (--loss_mask=none) is reproduced, gradient included.

`layout` (host, numpy) builds the index maps of one side; `pack` / `unpack` (device) move activations
between the layouts, each with a gradient that is a gather too (no scatter). Each of the S shards packs
its own rows (sharding.batch_sharding's split), so on a mesh every device gathers only its own.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def packed_length(counts, multiple: int) -> int:
    """N: the largest shard's slots (its real tokens, plus the pad token if it has pads), rounded up."""
    return max(1, -(-int(max(counts)) // multiple)) * multiple


def slots_needed(attention_mask, shards: int, multiple: int) -> int:
    """N of a side with this mask [rows, T]: its fullest shard's real tokens and pad token, rounded up."""
    mask = np.asarray(attention_mask).astype(bool)
    rows, length = mask.shape
    if rows % shards:
        raise ValueError(f"{rows} rows do not split over {shards} shards")
    mask = mask.reshape(shards, rows // shards * length)
    return packed_length(mask.sum(1) + (~mask).any(1), multiple)


def max_packed_length(rows: int, length: int, shards: int, multiple: int) -> int:
    """N for the fullest batch of [rows, length] (every position real): ahead-of-time compiles, reports."""
    return packed_length([rows // shards * length], multiple)


def layout(side: dict, shards: int, multiple: int, slots: int = 0) -> dict:
    """The packed layout of one tokenized side ({input_ids, attention_mask, positions} [rows, T]):
    ids, positions [S, N] (real tokens in order, then the pad token, then filler that nothing reads);
    to_packed [S, N]: each slot's padded position within its shard (rows_s x T: none, for the pad token
    and filler); to_padded [S, rows_s x T]: each padded position's slot (pads: the pad token's);
    pad_token [S, N]: 1.0 on the pad token's slot. slots: N at least this (a planned shape, armu_jax.shapes)."""
    mask = np.asarray(side["attention_mask"]).astype(bool)
    rows, length = mask.shape
    if rows % shards:
        raise ValueError(f"{rows} rows do not split over {shards} shards")
    span = rows // shards * length
    mask = mask.reshape(shards, span)
    ids = np.asarray(side["input_ids"]).reshape(shards, span)
    positions = np.asarray(side["positions"]).reshape(shards, span)
    counts = mask.sum(1) + (~mask).any(1)
    n = max(packed_length(counts, multiple), slots)
    out = {"ids": np.zeros((shards, n), np.int32), "positions": np.zeros((shards, n), np.int32),
           "to_packed": np.full((shards, n), span, np.int32), "to_padded": np.zeros((shards, span), np.int32),
           "pad_token": np.zeros((shards, n), np.float32)}
    for s in range(shards):
        real = np.flatnonzero(mask[s])
        k = len(real)
        out["ids"][s, :k], out["positions"][s, :k] = ids[s, real], positions[s, real]
        out["to_packed"][s, :k] = real
        out["to_padded"][s, real] = np.arange(k)
        if k < span:  # the pad token: every pad position's slot
            out["ids"][s, k:] = ids[s, np.argmin(mask[s])]
            out["to_padded"][s, ~mask[s]] = k
            out["pad_token"][s, k] = 1.0
    return out


def abstract_layout(rows: int, length: int, n: int, shards: int, sharding=None) -> dict:
    """ShapeDtypeStructs of layout's arrays for [rows, length] sides packed to n slots."""
    span = rows // shards * length
    shapes = {"ids": ((shards, n), jnp.int32), "positions": ((shards, n), jnp.int32),
              "to_packed": ((shards, n), jnp.int32), "to_padded": ((shards, span), jnp.int32),
              "pad_token": ((shards, n), jnp.float32)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def _take(x, index):
    """x [S, M, ...], index [S, K] -> [S, K, ...]: each shard's rows of x at its indices."""
    return jax.vmap(lambda a, i: a[i])(x, index)


def _with_zero(x):
    """x [S, M, ...] with a zero row appended along M (what index M gathers)."""
    return jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)


def _no_grad(lay: dict):
    return jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0) if a.dtype == jnp.int32 else jnp.zeros_like(a),
                        lay)


def _real_positions(lay: dict, ndim: int):
    """[S, M, 1...]: 1.0 where the padded position holds a real token (its slot is not the pad token's)."""
    real = 1.0 - _take(lay["pad_token"], lay["to_padded"])
    return real.reshape(real.shape + (1,) * (ndim - 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _unpack(x, lay, pad_grad: bool):
    return _take(x, lay["to_padded"])


def _unpack_fwd(x, lay, pad_grad):
    return _unpack(x, lay, pad_grad), lay


def _unpack_bwd(pad_grad, lay, g):
    """Each real slot's gradient from its one position; the pad token's, the sum over the pad positions
    (pad_grad False: none, for a caller whose pad positions' gradient is zero, as the attention's masked keys
    and queries)."""
    grad = _take(_with_zero(g), lay["to_packed"])
    if pad_grad:  # as a product [S, 1, M] x [S, M, F] (a reduction over M is 20x slower on XLA's CPU)
        pads = (1.0 - _real_positions(lay, 2)).astype(g.dtype)
        summed = jnp.einsum("sm,smf->sf", pads, g.reshape(*g.shape[:2], -1), precision="highest")
        pad_token = lay["pad_token"].astype(g.dtype)
        grad = grad + (pad_token[..., None] * summed[:, None, :]).reshape(grad.shape)
    return grad, _no_grad(lay)


_unpack.defvjp(_unpack_fwd, _unpack_bwd)


@jax.custom_vjp
def _pack(x, lay):
    return _take(_with_zero(x), lay["to_packed"])


def _pack_fwd(x, lay):
    return _pack(x, lay), lay


def _pack_bwd(lay, g):
    """Each real position's gradient from its slot; the pad positions' none."""
    back = _take(g, lay["to_padded"])
    return back * _real_positions(lay, back.ndim).astype(g.dtype), _no_grad(lay)


_pack.defvjp(_pack_fwd, _pack_bwd)


def unpack(x, lay: dict, rows: int, pad_grad: bool = True):
    """Packed [S, N, ...] -> padded [rows, T, ...] (pad positions get the pad token's values). pad_grad False:
    the caller's gradient at pad positions is zero (the attention's), so the pad token takes none from them."""
    out = _unpack(x, lay, pad_grad)
    return out.reshape(rows, -1, *x.shape[2:])


def pack(x, lay: dict):
    """Padded [rows, T, ...] -> packed [S, N, ...] (the pad token and filler get zeros)."""
    shards = lay["to_padded"].shape[0]
    return _pack(x.reshape(shards, -1, *x.shape[2:]), lay)
