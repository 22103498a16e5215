"""The RMU / Adaptive RMU objective on layer-l activations, with the reference's logged statistics.

Every mean is weighted by a [B, L] weight that is 1 on the positions the reference averages
over (its [B, T] window, pads included, or only real tokens) and 0 on extra padding.
"""
from __future__ import annotations

import jax.numpy as jnp


def weighted_mse(a, b, weight):
    """mean over B*T*D of (a - b)^2 on the weighted positions (torch's mse_loss on the window)."""
    sq = jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=-1)
    return jnp.sum(sq * weight) / (jnp.sum(weight) * a.shape[-1])


def _row_mean_then_batch_mean(values, weight):
    """Per-row mean over weighted positions, then the mean over rows that have any weight."""
    row_weight = jnp.sum(weight, axis=1)
    row_mean = jnp.sum(values * weight, axis=1) / jnp.maximum(row_weight, 1.0)
    rows = (row_weight > 0).astype(jnp.float32)
    return jnp.sum(row_mean * rows) / jnp.sum(rows)


def without_first_token(weight, mask):
    """weight with each row's first real token (mask's first 1; the attention sink, whose norm is
    ~6x the others' on SmolLM2) left out."""
    first = jnp.argmax(mask, axis=1)
    return weight * (jnp.arange(weight.shape[1])[None, :] != first[:, None])


def mean_token_norm(h, weight):
    """torch.mean(h.norm(dim=-1).mean(dim=1), dim=0): the adaptive coefficient's norm."""
    return _row_mean_then_batch_mean(jnp.linalg.norm(h.astype(jnp.float32), axis=-1), weight)


def mean_cosine(a, b, weight, eps: float = 1e-8):
    """cosine_similarity(a, b, dim=-1).mean() over the weighted positions."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    denom = jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)
    cos = jnp.sum(a * b, axis=-1) / denom
    return jnp.sum(cos * weight) / jnp.sum(weight)


def rmu_loss(h_forget, h_retain, h_retain_frozen, control_vector, coeff, alpha, w_forget, w_retain):
    """forget = MSE(h_forget, coeff * u); retain = alpha * MSE(h_retain, h_retain_frozen)."""
    target = (coeff * control_vector)[None, None, :]
    forget = weighted_mse(h_forget, target, w_forget)
    retain = alpha * weighted_mse(h_retain, h_retain_frozen, w_retain)
    return forget + retain, (forget, retain)
