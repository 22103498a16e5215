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
from armu_jax.families import update_params_for
from armu_jax.model import LlamaForCausalLM, parse_dtype
from armu_jax.model_config import ModelConfig
from armu_jax.objective import mean_cosine, mean_token_norm, rmu_loss, without_first_token
from armu_jax.optimizer import make_optimizer
from armu_jax.params import merge, take, trainable_names


@dataclass(frozen=True)
class StepSpec:
    """What the step is compiled for, built once from the settings (StepSpec.of): build_step reads only
    this, and the process cache (armu_jax.cache) keys compiled steps by it. The method and its
    numbers (beta, c, alpha, lr, the control vectors) are not in it: they ride in every batch's
    "settings", so one compiled step serves every cell of a sweep or trial of a tune over them
    (armu_jax.sweep, armu_jax.tune)."""
    model_cfg: ModelConfig
    dtype: str
    layer_id: int
    update_layer_ids: tuple[int, ...]
    update_params: tuple[str, ...]  # resolved for the family (families.update_params_for)
    adaptive_coeff: str  # "per_batch" (paper) | "first_batch" (public code)
    norm_skip_first: bool  # exclude each row's first real token from the adaptive norm
    optimizer: str
    n_topics: int
    batch_size: int
    mesh: jax.sharding.Mesh

    @classmethod
    def of(cls, cfg, model_cfg: ModelConfig, mesh: jax.sharding.Mesh) -> "StepSpec":
        return cls(model_cfg, cfg.dtype, cfg.layer_id, tuple(cfg.update_layer_ids),
                   tuple(update_params_for(cfg.update_params, model_cfg)), cfg.adaptive_coeff, cfg.norm_skip_first,
                   cfg.optimizer, cfg.n_topics, cfg.batch_size, mesh)

    @property
    def model(self) -> LlamaForCausalLM:
        dtype = parse_dtype(self.dtype)
        return LlamaForCausalLM(self.model_cfg, dtype=dtype, param_dtype=dtype)

    @property
    def lowest_update_layer(self) -> int:
        return min(self.update_layer_ids)


def run_settings(cfg, control_vectors: np.ndarray) -> dict:
    """The step's per-run numbers: {adaptive, beta, lr, steering [n], alpha [n], control_vectors [n, D]}."""
    return {"adaptive": np.bool_(cfg.method == "adaptive_rmu"), "beta": np.float32(cfg.beta), "lr": np.float32(cfg.lr),
            "steering": np.asarray(cfg.steering_coeffs, np.float32), "alpha": np.asarray(cfg.alpha, np.float32),
            "control_vectors": np.asarray(control_vectors, np.float32)}


# ----------------------------------------------------------------------------- training some leaves

def init_trainer_state(params, names, optimizer: optax.GradientTransformation, **extra) -> dict:
    """{step, trainable (copies of the leaves `names`), opt_state, **extra}."""
    trainable = {n: jnp.array(v, copy=True) for n, v in take(params, names).items()}
    return {"step": jnp.zeros([], jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable), **extra}


def trainer_step(loss_fn, optimizer, finish=None):
    """step(state, params, batch) -> (state, metrics) training state["trainable"] on
    loss_fn(trainable, state, params, batch) -> (loss, aux): its gradient and the optimizer's update.
    optimizer: an optax.GradientTransformation, or optimizer(batch) -> one (its lr read from the batch,
    an argument of the compiled step). finish(state, loss, aux, grads) -> (other state entries to set,
    metrics); default: the loss."""
    finish = finish or (lambda state, loss, aux, grads: ({}, loss))
    optimizer_for = optimizer if callable(optimizer) else (lambda batch: optimizer)

    def step(state, params, batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"], state, params, batch)
        updates, opt_state = optimizer_for(batch).update(grads, state["opt_state"], state["trainable"])
        extra, metrics = finish(state, loss, aux, grads)
        return {**state, **extra, "step": state["step"] + 1,
                "trainable": optax.apply_updates(state["trainable"], updates), "opt_state": opt_state}, metrics

    return step


@dataclass(frozen=True)
class Trainer:
    """A jitted trainer_step with explicit shardings (the state donated), and its jitted init."""
    step: object
    init: object
    mesh: jax.sharding.Mesh
    params_shardings: object
    state_shardings: object
    batch_shardings: object
    abstract_state: object
    trainable: tuple[str, ...]


def compile_trainer(step_fn, init_fn, params, names, mesh: jax.sharding.Mesh, batch_shardings,
                    carry_shardings=None) -> Trainer:
    """The one place a training step is jitted (the unlearning step and the relearning attack alike):
    params laid out by the sharding table, the state by its rules (moments like their parameters),
    batches by batch_shardings, metrics replicated; a step that also returns a carry for the next step
    (the unlearning step's retain activations) lays it out by carry_shardings. params may be
    ShapeDtypeStructs."""
    abstract_state = jax.eval_shape(init_fn, params)
    params_sh = sharding.param_shardings(params, mesh)
    state_sh = sharding.state_shardings(abstract_state, mesh, names)
    step = jax.jit(step_fn, in_shardings=(state_sh, params_sh, batch_shardings),
                   out_shardings=(state_sh, sharding.replicated(mesh), *([carry_shardings] if carry_shardings else [])),
                   donate_argnums=0)
    return Trainer(step, jax.jit(init_fn, out_shardings=state_sh), mesh, params_sh, state_sh, batch_shardings,
                   abstract_state, tuple(names))


# ----------------------------------------------------------------------------- the unlearning step

DIAGNOSTICS = ("forget_cosine", "retain_cosine", "forget_norm_updated", "forget_norm_frozen", "retain_norm_updated",
               "retain_norm_frozen")  # the frozen-side metrics: only in the diagnostic variant (--log_every's steps)


def make_step(spec: StepSpec, optimizer, diagnostics: bool = True, reuse_retain: bool = False):
    """optimizer(lr) -> the optax transformation; lr is the batch's settings["lr"] (a traced scalar: trials
    that differ only in lr share one compiled step). diagnostics: also the cosines and norms of DIAGNOSTICS;
    without them, the frozen model's layers lo..l on the forget batch run only where the loss reads them
    (the paper's per-batch coefficient): in first_batch and RMU they fed nothing but those metrics.

    step(state, params, batch) -> (state, metrics, carry): carry holds the retain batch's frozen activations
    (the prefix's output and layer l's). With reuse_retain the step takes them as batch["retain_carry"]
    instead of computing them: the next step's, when its retain batch is the same (the paired topics'
    steps on one retain corpus, the reference's wikitext twice). A program of its own, not a lax.cond:
    XLA's buffers for a conditional's branches added 4.6 GiB per device to the Llama-3-8B step."""
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

    def loss_fn(trainable, state, frozen_params, batch):
        topic, run = batch["topic"], batch["settings"]
        f, r = batch["forget"], batch["retain"]
        prefix_f = prefix(frozen_params, f)
        needs_frozen_f = diagnostics or spec.adaptive_coeff == "per_batch"
        frozen_f = jax.lax.stop_gradient(upper(frozen_params, prefix_f, f)) if needs_frozen_f else None

        if reuse_retain:
            prefix_r, frozen_r = batch[CARRY]["prefix"], batch[CARRY]["frozen"]
        else:
            prefix_r = prefix(frozen_params, r)
            frozen_r = jax.lax.stop_gradient(upper(frozen_params, prefix_r, r))
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
        return loss, (topic, forget, retain, coeff, h_f, h_r, frozen_f, frozen_r, f["weight"], r["weight"], prefix_r)

    def finish(state, loss, aux, grads):
        topic, forget, retain, coeff, h_f, h_r, frozen_f, frozen_r, w_f, w_r, prefix_r = aux
        carry = {"prefix": prefix_r, "frozen": frozen_r}
        extra = {"coeffs": state["coeffs"].at[topic].set(coeff),
                 "coeff_ready": state["coeff_ready"].at[topic].set(True)}
        metrics = {
            "loss": loss, "grad_norm": optax.tree.norm(grads), "forget_loss": forget, "retain_loss": retain,
            "coeff": coeff, "topic": topic, CARRY: carry}
        if not diagnostics:
            return extra, metrics
        metrics |= {
            "forget_cosine": mean_cosine(h_f, frozen_f, w_f),
            "retain_cosine": mean_cosine(h_r, frozen_r, w_r),
            "forget_norm_updated": mean_token_norm(h_f, w_f),
            "forget_norm_frozen": mean_token_norm(frozen_f, w_f),
            "retain_norm_updated": mean_token_norm(h_r, w_r),
            "retain_norm_frozen": mean_token_norm(frozen_r, w_r),
        }
        return extra, metrics

    train = trainer_step(loss_fn, lambda batch: optimizer(batch["settings"]["lr"]), finish)

    def step(state, params, batch):
        state, metrics = train(state, params, batch)
        carry = metrics.pop(CARRY)
        return state, metrics, carry
    return step


CARRY = "retain_carry"


@dataclass(frozen=True)
class CompiledStep:
    """The jitted unlearning step with everything needed to feed it, built once by build_step.

    step(state, frozen, batch) -> (state, metrics, retain carry), jitted with explicit shardings and
    the state donated; lean_step the same without the metrics of DIAGNOSTICS (the run's steps between
    --log_every's), reuse_step the lean step on the step before's retain carry (make_step), each
    compiled on its first call; init(frozen) -> the initial state, laid out with state_shardings.
    `settings` (this
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
    lean_step: object = None
    reuse_step: object = None  # the lean step taking the step before's retain carry (batch from device_batch(carry=))
    hidden: int = 0  # the residual stream's width and dtype (the retain carry's)
    dtype: str = "float32"
    settings: dict | None = None  # run_settings, on the host (a few numbers; placed with every batch)

    def with_settings(self, cfg, control_vectors: np.ndarray) -> "CompiledStep":
        return dataclasses.replace(self, settings=run_settings(cfg, control_vectors))

    def device_batch(self, topic: int, forget: dict, retain: dict, carry: dict | None = None) -> dict:
        """A batch on its devices; with carry (the step before's, whose retain side was this one) a batch for
        reuse_step."""
        tree = {"topic": np.int32(topic), "forget": forget, "retain": retain, "settings": self.settings}
        placed = sharding.place(tree, self.batch_shardings)
        return placed if carry is None else {**placed, CARRY: carry}

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


def build_step(spec: StepSpec, frozen) -> CompiledStep:
    """The one place the unlearning step is built: for train, the sweep, the bench and the compile
    report alike (cached by spec in armu_jax.cache). frozen: the params of layers 0..l (arrays or
    ShapeDtypeStructs; only shapes are read). Give it a run's numbers with .with_settings(cfg, u)."""
    names = tuple(trainable_names(frozen, spec.update_layer_ids, spec.update_params))
    optimizer = lambda lr: make_optimizer(spec.optimizer, lr)
    n_topics = spec.n_topics
    init = lambda p: init_trainer_state(p, names, optimizer(1.0), coeffs=jnp.ones([n_topics], jnp.float32),
                                        coeff_ready=jnp.zeros([n_topics], bool))
    rows, repl = sharding.batch_sharding(spec.mesh), sharding.replicated(spec.mesh)
    batch_sh = {"topic": repl, "forget": rows, "retain": rows, "settings": repl}
    trainer = compile_trainer(make_step(spec, optimizer), init, frozen, names, spec.mesh, batch_sh, rows)
    variant = lambda **kw: compile_trainer(make_step(spec, optimizer, diagnostics=False, **kw), init, frozen, names,
                                           spec.mesh, {**batch_sh, CARRY: rows} if kw else batch_sh, rows).step
    return CompiledStep(step=trainer.step, lean_step=variant(), reuse_step=variant(reuse_retain=True),
                        hidden=spec.model_cfg.hidden_size, dtype=spec.dtype, init=trainer.init, mesh=spec.mesh,
                        params_shardings=trainer.params_shardings,
                        state_shardings=trainer.state_shardings, batch_shardings=batch_sh,
                        abstract_state=trainer.abstract_state, trainable=names,
                        rows=sharding.batch_rows(spec.mesh, spec.batch_size))

