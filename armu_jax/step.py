"""The unlearning step: one pure function (state, frozen_params, batch) -> (state, metrics).

Only layers 0..l run. Layers below the lowest updated layer are the same in the frozen and
the updated model, so their output is computed once per batch without gradient and shared;
layers lo..l run twice (frozen weights, updated weights). The updated model is the frozen
params with the trainable leaves swapped in, so memory holds one model plus a copy of the
trainable tensors, and gradients and optimizer state exist only for those.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from armu_jax.model import LlamaForCausalLM
from armu_jax.objective import mean_cosine, mean_token_norm, rmu_loss


@dataclass(frozen=True)
class StepSpec:
    """What the step needs besides its arguments (static under jit)."""
    model: LlamaForCausalLM
    layer_id: int
    lowest_update_layer: int
    method: str  # "rmu" | "adaptive_rmu"
    adaptive_coeff: str  # "per_batch" (paper) | "first_batch" (public code)
    beta: float
    steering_coeffs: tuple[float, ...]
    alphas: tuple[float, ...]
    norm_skip_first: bool = False  # exclude each row's first real token from the adaptive norm


def trainable_paths(params, layers, names) -> list[str]:
    """The "/"-joined paths (without the 'params/' root) of the trainable leaves, e.g. mlp.down_proj of each layer."""
    flat = traverse_util.flatten_dict(params["params"], sep="/")
    wanted = []
    for layer in layers:
        for name in names:
            path = f"model/layers_{layer}/{name.replace('.', '/')}/kernel"
            if path not in flat:
                raise KeyError(path)
            wanted.append(path)
    return wanted


def take_trainable(params, paths) -> dict:
    flat = traverse_util.flatten_dict(params["params"], sep="/")
    return {p: flat[p] for p in paths}


def merge(params, trainable: dict):
    flat = traverse_util.flatten_dict(params["params"], sep="/")
    flat.update(trainable)
    return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def init_state(params, paths, optimizer: optax.GradientTransformation, n_topics: int) -> dict:
    trainable = {p: jnp.array(v, copy=True) for p, v in take_trainable(params, paths).items()}
    return {
        "step": jnp.zeros([], jnp.int32),
        "trainable": trainable,
        "opt_state": optimizer.init(trainable),
        "coeffs": jnp.ones([n_topics], jnp.float32),
        "coeff_ready": jnp.zeros([n_topics], bool),
    }


def make_step(spec: StepSpec, optimizer: optax.GradientTransformation, control_vectors: np.ndarray):
    model = spec.model
    lo, hi = spec.lowest_update_layer, spec.layer_id
    control_vectors = jnp.asarray(control_vectors, jnp.float32)
    alphas = jnp.asarray(spec.alphas, jnp.float32)
    steering = jnp.asarray(spec.steering_coeffs, jnp.float32)

    def prefix(params, b):
        h = model.apply(params, b["input_ids"], b["attention_mask"], b["positions"], layer=lo - 1,
                        method=LlamaForCausalLM.hidden_upto)
        return jax.lax.stop_gradient(h)

    def upper(params, h, b):
        return model.apply(params, h, b["attention_mask"], b["positions"], start=lo, end=hi,
                           method=LlamaForCausalLM.run_layers)

    def norm_weight(w, mask):
        """The weight of the adaptive norm: with norm_skip_first, each row's first real token
        (the attention sink, whose norm is ~6x the others' on SmolLM2) is left out."""
        if not spec.norm_skip_first:
            return w
        first = jnp.argmax(mask, axis=1)
        return w * (jnp.arange(w.shape[1])[None, :] != first[:, None])

    def step(state, frozen_params, batch):
        topic = batch["topic"]
        f, r = batch["forget"], batch["retain"]
        prefix_f, prefix_r = prefix(frozen_params, f), prefix(frozen_params, r)
        frozen_f = jax.lax.stop_gradient(upper(frozen_params, prefix_f, f))
        frozen_r = jax.lax.stop_gradient(upper(frozen_params, prefix_r, r))

        def loss_fn(trainable):
            updated = merge(frozen_params, trainable)
            h_f, h_r = upper(updated, prefix_f, f), upper(updated, prefix_r, r)
            if spec.method == "rmu":
                coeff = steering[topic]
            elif spec.adaptive_coeff == "per_batch":  # paper: beta * ||h_l^frozen(x_forget)||
                coeff = spec.beta * mean_token_norm(frozen_f, norm_weight(f["weight"], f["attention_mask"]))
            else:  # public code: from the updated model on the topic's first batch, then fixed
                fresh = spec.beta * mean_token_norm(jax.lax.stop_gradient(h_f), norm_weight(f["weight"], f["attention_mask"]))
                coeff = jnp.where(state["coeff_ready"][topic], state["coeffs"][topic], fresh)
            loss, (forget, retain) = rmu_loss(h_f, h_r, frozen_r, control_vectors[topic], coeff, alphas[topic],
                                              f["weight"], r["weight"])
            return loss, (forget, retain, coeff, h_f, h_r)

        (loss, (forget, retain, coeff, h_f, h_r)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["trainable"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        new_state = {
            "step": state["step"] + 1,
            "trainable": optax.apply_updates(state["trainable"], updates),
            "opt_state": opt_state,
            "coeffs": state["coeffs"].at[topic].set(coeff),
            "coeff_ready": state["coeff_ready"].at[topic].set(True),
        }
        metrics = {
            "loss": loss, "forget_loss": forget, "retain_loss": retain, "coeff": coeff, "topic": topic,
            "forget_cosine": mean_cosine(h_f, frozen_f, f["weight"]),
            "retain_cosine": mean_cosine(h_r, frozen_r, r["weight"]),
            "forget_norm_updated": mean_token_norm(h_f, f["weight"]),
            "forget_norm_frozen": mean_token_norm(frozen_f, f["weight"]),
            "retain_norm_updated": mean_token_norm(h_r, r["weight"]),
            "retain_norm_frozen": mean_token_norm(frozen_r, r["weight"]),
        }
        return new_state, metrics

    return step


def truncate_params(params, layer_id: int):
    """Only what layers 0..layer_id need: the embedding and those layers (no final norm, no LM head)."""
    model = params["params"]["model"]
    kept = {"embed_tokens": model["embed_tokens"]}
    kept.update({f"layers_{i}": model[f"layers_{i}"] for i in range(layer_id + 1)})
    return {"params": {"model": kept}}
