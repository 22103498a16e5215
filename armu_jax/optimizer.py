"""Optimizers for the trainable leaves.

`hf_adamw` is the arithmetic of the reference's transformers.AdamW (2024): eps added to
sqrt(v) (not to the bias-corrected sqrt(v_hat)), the bias correction folded into the step
size, decoupled weight decay applied after the update. With gradients near 1e-7 and
eps = 1e-6 this differs materially from optax.adamw, which adds eps to sqrt(v_hat).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from armu_jax.errors import UserError


class HFAdamWState(NamedTuple):
    count: jnp.ndarray
    mu: optax.Updates
    nu: optax.Updates


def _one_minus_power(beta: float, t):
    """1 - beta**t, accurate in float32 when beta is close to 1."""
    return -jnp.expm1(t * jnp.float32(math.log1p(-(1.0 - beta))))


def hf_adamw(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
             weight_decay: float = 0.0) -> optax.GradientTransformation:
    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return HFAdamWState(jnp.zeros([], jnp.int32), zeros, jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state, params):
        count = state.count + 1
        t = count.astype(jnp.float32)
        mu = jax.tree_util.tree_map(lambda m, g: m * b1 + g * (1 - b1), state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: v * b2 + g * g * (1 - b2), state.nu, grads)
        step_size = lr * jnp.sqrt(_one_minus_power(b2, t)) / _one_minus_power(b1, t)

        def leaf_update(m, v, p):
            step = -step_size * m / (jnp.sqrt(v) + eps)
            return step - lr * weight_decay * (p + step) if weight_decay else step

        return jax.tree_util.tree_map(leaf_update, mu, nu, params), HFAdamWState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def torch_adamw(lr: float, weight_decay: float) -> optax.GradientTransformation:
    """torch.optim.AdamW's update (decoupled weight decay, eps 1e-8 added to sqrt(v_hat)): the
    relearning attack's fine-tuning optimizer."""
    return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    """The reference's optimizer settings: lr, betas (0.9, 0.999), eps 1e-6, no weight decay."""
    if name == "hf_adamw":
        return hf_adamw(lr)
    if name == "adamw":
        return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0)
    raise UserError(f"unknown optimizer {name!r}; use hf_adamw (reference) or adamw (optax)")
