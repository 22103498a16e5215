"""The unlearning step: one pure function (state, frozen_params, batch) -> (state, metrics).

Only layers 0..l run. Layers below the lowest updated layer are the same in the frozen and
the updated model, so their output is computed once per batch without gradient and shared;
layers lo..l run twice (frozen weights, updated weights). The updated model is the frozen
params with the trainable leaves swapped in, so memory holds one model plus a copy of the
trainable tensors, and gradients and optimizer state exist only for those.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from armu_jax import sharding
from armu_jax.hf_io import parse_dtype
from armu_jax.model import LlamaForCausalLM
from armu_jax.families import update_params_for
from armu_jax.model_config import ModelConfig
from armu_jax.objective import mean_cosine, mean_token_norm, rmu_loss, without_first_token
from armu_jax.optimizer import make_optimizer
from armu_jax.params import merge, take, trainable_names


@dataclass(frozen=True)
class StepSpec:
    """What the step is compiled for (static under jit). The method and its numbers (beta, c, alpha,
    the control vectors) are arguments instead, in the batch's "settings": one compiled step serves
    every cell of a sweep over them (armu_jax.sweep)."""
    model: LlamaForCausalLM
    layer_id: int
    lowest_update_layer: int
    adaptive_coeff: str  # "per_batch" (paper) | "first_batch" (public code)
    norm_skip_first: bool = False  # exclude each row's first real token from the adaptive norm


def run_settings(cfg, control_vectors: np.ndarray) -> dict:
    """The step's per-run numbers: {adaptive, beta, steering [n], alpha [n], control_vectors [n, D]}."""
    return {"adaptive": np.bool_(cfg.method == "adaptive_rmu"), "beta": np.float32(cfg.beta),
            "steering": np.asarray(cfg.steering_coeffs, np.float32), "alpha": np.asarray(cfg.alpha, np.float32),
            "control_vectors": np.asarray(control_vectors, np.float32)}


def init_state(params, names, optimizer: optax.GradientTransformation, n_topics: int) -> dict:
    trainable = {n: jnp.array(v, copy=True) for n, v in take(params, names).items()}
    return {
        "step": jnp.zeros([], jnp.int32),
        "trainable": trainable,
        "opt_state": optimizer.init(trainable),
        "coeffs": jnp.ones([n_topics], jnp.float32),
        "coeff_ready": jnp.zeros([n_topics], bool),
    }


def make_step(spec: StepSpec, optimizer: optax.GradientTransformation):
    model = spec.model
    lo, hi = spec.lowest_update_layer, spec.layer_id

    def prefix(params, b):
        h = model.apply(params, b["input_ids"], b["attention_mask"], b["positions"], layer=lo - 1,
                        method=LlamaForCausalLM.hidden_upto)
        return jax.lax.stop_gradient(h)

    def upper(params, h, b):
        return model.apply(params, h, b["attention_mask"], b["positions"], start=lo, end=hi,
                           method=LlamaForCausalLM.run_layers)

    def norm_weight(w, mask):
        """The weight of the adaptive norm: with norm_skip_first, without each row's first real token."""
        return without_first_token(w, mask) if spec.norm_skip_first else w

    def step(state, frozen_params, batch):
        topic, run = batch["topic"], batch["settings"]
        f, r = batch["forget"], batch["retain"]
        prefix_f, prefix_r = prefix(frozen_params, f), prefix(frozen_params, r)
        frozen_f = jax.lax.stop_gradient(upper(frozen_params, prefix_f, f))
        frozen_r = jax.lax.stop_gradient(upper(frozen_params, prefix_r, r))

        def loss_fn(trainable):
            updated = merge(frozen_params, trainable)
            h_f, h_r = upper(updated, prefix_f, f), upper(updated, prefix_r, r)
            if spec.adaptive_coeff == "per_batch":  # paper: beta * ||h_l^frozen(x_forget)||
                adaptive = run["beta"] * mean_token_norm(frozen_f, norm_weight(f["weight"], f["attention_mask"]))
            else:  # public code: from the updated model on the topic's first batch, then fixed
                fresh = run["beta"] * mean_token_norm(jax.lax.stop_gradient(h_f),
                                                      norm_weight(f["weight"], f["attention_mask"]))
                adaptive = jnp.where(state["coeff_ready"][topic], state["coeffs"][topic], fresh)
            coeff = jnp.where(run["adaptive"], adaptive, run["steering"][topic])  # RMU: the fixed c
            loss, (forget, retain) = rmu_loss(h_f, h_r, frozen_r, run["control_vectors"][topic], coeff,
                                              run["alpha"][topic], f["weight"], r["weight"])
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
            "loss": loss, "grad_norm": optax.tree.norm(grads), "forget_loss": forget, "retain_loss": retain, "coeff": coeff, "topic": topic,
            "forget_cosine": mean_cosine(h_f, frozen_f, f["weight"]),
            "retain_cosine": mean_cosine(h_r, frozen_r, r["weight"]),
            "forget_norm_updated": mean_token_norm(h_f, f["weight"]),
            "forget_norm_frozen": mean_token_norm(frozen_f, f["weight"]),
            "retain_norm_updated": mean_token_norm(h_r, r["weight"]),
            "retain_norm_frozen": mean_token_norm(frozen_r, r["weight"]),
        }
        return new_state, metrics

    return step


@dataclass(frozen=True)
class CompiledStep:
    """The jitted step with everything needed to feed it, built once by build_step.

    step(state, frozen, batch) -> (state, metrics), jitted with explicit shardings and the state
    donated; init(frozen) -> the initial state, laid out with state_shardings. `settings` (this
    run's method and numbers) ride in every batch; `with_settings` gives the same
    compiled step for another run's (a sweep's next cell: nothing recompiles).
    """
    step: object
    init: object
    mesh: jax.sharding.Mesh
    params_shardings: object
    state_shardings: object
    batch_shardings: dict
    abstract_state: object
    trainable: tuple[str, ...]
    rows: int  # batch rows on device: --batch_size padded to a multiple of data x fsdp
    settings: dict  # run_settings, on the host (a few numbers; placed with every batch)

    def with_settings(self, cfg, control_vectors: np.ndarray) -> "CompiledStep":
        return dataclasses.replace(self, settings=run_settings(cfg, control_vectors))

    def device_batch(self, topic: int, forget: dict, retain: dict) -> dict:
        tree = {"topic": np.int32(topic), "forget": forget, "retain": retain, "settings": self.settings}
        return sharding.place(tree, self.batch_shardings)

    def abstract_batch(self, forget_length: int, retain_length: int) -> dict:
        """ShapeDtypeStructs of a batch with these padded lengths (for ahead-of-time compiles)."""
        def side(length, sh):
            shape = (self.rows, length)
            return {"input_ids": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
                    "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
                    "positions": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
                    "weight": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)}
        sh = self.batch_shardings
        settings = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh["topic"]),
                                self.settings)
        return {"topic": jax.ShapeDtypeStruct((), jnp.int32, sharding=sh["topic"]),
                "forget": side(forget_length, sh["forget"]), "retain": side(retain_length, sh["retain"]),
                "settings": settings}

    def lower(self, frozen, forget_length: int, retain_length: int):
        """The step lowered for abstract arguments (frozen may be ShapeDtypeStructs); .compile() it."""
        abstract = lambda tree, shardings: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
        with jax.set_mesh(self.mesh):
            return self.step.lower(abstract(self.abstract_state, self.state_shardings),
                                   abstract(frozen, self.params_shardings),
                                   self.abstract_batch(forget_length, retain_length))


def compiled_key(cfg, mesh: jax.sharding.Mesh) -> tuple:
    """What a compiled step depends on besides the model: cells of a sweep that agree on it share one."""
    return (cfg.layer_id, tuple(cfg.update_layer_ids), tuple(cfg.update_params), cfg.adaptive_coeff,
            cfg.norm_skip_first, cfg.optimizer, cfg.lr, cfg.n_topics, cfg.batch_size, cfg.dtype, mesh)


def build_step(cfg, model_cfg: ModelConfig, frozen, mesh: jax.sharding.Mesh,
               control_vectors: np.ndarray, cache: dict | None = None) -> CompiledStep:
    """The one place a step is built: for train.run, the sweep, the bench and the compile checks alike.

    frozen: the params of layers 0..l (arrays or ShapeDtypeStructs; only shapes are read here).
    cache: {compiled_key: CompiledStep} kept by the caller (a sweep): a step built before for the same
    key is reused with this run's settings, so jax's compilation cache of it carries over.
    """
    key = (model_cfg, compiled_key(cfg, mesh))
    if cache is not None and key in cache:
        return cache[key].with_settings(cfg, control_vectors)
    dtype = parse_dtype(cfg.dtype)
    model = LlamaForCausalLM(model_cfg, dtype=dtype, param_dtype=dtype)
    names = tuple(trainable_names(frozen, cfg.update_layer_ids, update_params_for(cfg.update_params, model_cfg)))
    optimizer = make_optimizer(cfg.optimizer, cfg.lr)
    init = lambda p: init_state(p, names, optimizer, cfg.n_topics)
    abstract_state = jax.eval_shape(init, frozen)
    params_sh = sharding.param_shardings(frozen, mesh)
    state_sh = sharding.state_shardings(abstract_state, mesh, names)
    rows = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)
    batch_sh = {"topic": repl, "forget": rows, "retain": rows, "settings": repl}
    spec = StepSpec(model, cfg.layer_id, min(cfg.update_layer_ids), cfg.adaptive_coeff, cfg.norm_skip_first)
    step = jax.jit(make_step(spec, optimizer), in_shardings=(state_sh, params_sh, batch_sh),
                   out_shardings=(state_sh, repl), donate_argnums=0)
    compiled = CompiledStep(step=step, init=jax.jit(init, out_shardings=state_sh), mesh=mesh,
                            params_shardings=params_sh, state_shardings=state_sh, batch_shardings=batch_sh,
                            abstract_state=abstract_state, trainable=names,
                            rows=sharding.batch_rows(mesh, cfg.batch_size),
                            settings=run_settings(cfg, control_vectors))
    if cache is not None:
        cache[key] = compiled
    return compiled
