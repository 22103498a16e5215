"""The unlearning step: one pure function (state, frozen_params, batch) -> (state, metrics).

Only layers 0..l run. Layers below the lowest updated layer are the same in the frozen and
the updated model, so their output is computed once per batch without gradient and shared;
layers lo..l run twice (frozen weights, updated weights). The updated model is the frozen
params with the trainable leaves swapped in, so memory holds one model plus a copy of the
trainable tensors, and gradients and optimizer state exist only for those.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from armu_jax import packing, sharding
from armu_jax.families import update_params_for
from armu_jax.model import CausalLM, parse_dtype
from armu_jax.model_config import ModelConfig
from armu_jax.objective import mean_cosine, mean_token_norm, rmu_loss, without_first_token
from armu_jax.optimizer import make_optimizer
from armu_jax.params import merge, take, trainable_names
from armu_jax.shapes import SideShape, StepShape, own_shape


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
    cells: int = 1  # runs side by side in one step (a sweep's --cells_per_step): vmapped over their states
    pack_multiple: int = 0  # > 0: real tokens packed (armu_jax.packing) to a multiple of this; 0: padded

    @classmethod
    def of(cls, cfg, model_cfg: ModelConfig, mesh: jax.sharding.Mesh) -> "StepSpec":
        return cls(model_cfg, cfg.dtype, cfg.layer_id, tuple(cfg.update_layer_ids),
                   tuple(update_params_for(cfg.update_params, model_cfg)), cfg.adaptive_coeff, cfg.norm_skip_first,
                   cfg.optimizer, cfg.n_topics, cfg.batch_size, mesh,
                   pack_multiple=cfg.pad_multiple if cfg.pack_tokens else 0)

    @property
    def model(self) -> CausalLM:
        dtype = parse_dtype(self.dtype)
        return CausalLM(self.model_cfg, dtype=dtype, param_dtype=dtype)

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
    run_state_shardings: object = None  # one run's state (compile_trainer's runs > 1: one of the stacked runs)
    run_abstract_state: object = None


def stacked(init_fn, runs: int):
    """init_fn for `runs` runs side by side: every leaf of its state repeated on a new leading axis."""
    return lambda params: jax.tree.map(lambda x: jnp.broadcast_to(x, (runs, *x.shape)), init_fn(params))


def compile_trainer(step_fn, init_fn, params, names, mesh: jax.sharding.Mesh, batch_shardings,
                    carry_shardings=None, runs: int = 1) -> Trainer:
    """The one place a training step is jitted (the unlearning step and the relearning attack alike):
    params laid out by the sharding table, the state by its rules (moments like their parameters),
    batches by batch_shardings, metrics replicated; a step that also returns a carry for the next step
    (the unlearning step's retain activations) lays it out by carry_shardings. params may be
    ShapeDtypeStructs. runs > 1: init_fn's state for one run, the step's for that many stacked on a
    leading axis (each leaf laid out as one run's, whole along that axis)."""
    abstract_state = jax.eval_shape(init_fn, params)
    params_sh = sharding.param_shardings(params, mesh)
    state_sh = sharding.state_shardings(abstract_state, mesh, names)
    run_abstract_state, run_state_sh = abstract_state, state_sh
    if runs > 1:
        init_fn = stacked(init_fn, runs)
        abstract_state = jax.eval_shape(init_fn, params)
        state_sh = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *s.spec)),
                                state_sh)
    step = jax.jit(step_fn, in_shardings=(state_sh, params_sh, batch_shardings),
                   out_shardings=(state_sh, sharding.replicated(mesh), *([carry_shardings] if carry_shardings else [])),
                   donate_argnums=0)
    return Trainer(step, jax.jit(init_fn, out_shardings=state_sh), mesh, params_sh, state_sh, batch_shardings,
                   abstract_state, tuple(names), run_state_sh, run_abstract_state)


# ----------------------------------------------------------------------------- the unlearning step

DIAGNOSTICS = ("forget_cosine", "retain_cosine", "forget_norm_updated", "forget_norm_frozen", "retain_norm_updated",
               "retain_norm_frozen")  # the frozen-side metrics: read on --log_every's steps (batch["diagnostics"])


def make_step(spec: StepSpec, optimizer, share_lowest: bool = False):
    """(retain_side, step): the unlearning step as two programs, so that a run compiles one of each per shape
    (armu_jax.shapes) and no variants.

    retain_side(params, retain) -> carry: the retain batch's frozen activations (the prefix's output and layer
    l's, and layer lo's mid with share_lowest). The frozen model's activations depend only on the model and the
    batch, so they are computed before the gradient; a step whose retain batch is the step before's (the
    paired topics' steps on one retain corpus, the reference's wikitext twice) takes the same carry again.
    A program of its own rather than a lax.cond inside the step: XLA's buffers for a conditional's branches
    added 4.6 GiB per device to the Llama-3-8B step.

    step(state, params, batch) -> (state, metrics) with batch[CARRY] the carry of batch["retain"].
    optimizer(lr) -> the optax transformation; lr is the batch's settings["lr"] (a traced scalar: trials
    that differ only in lr share one compiled step). batch["diagnostics"] (a traced bool, --log_every's steps):
    the metrics of DIAGNOSTICS are read; the frozen model's layers lo..l on the forget batch then run in a
    lax.cond (first_batch and RMU: only those metrics read them; the paper's per-batch coefficient reads them
    every step). On other steps the DIAGNOSTICS metrics are computed but meaningless (the caller drops them).

    With spec.cells = K > 1 the state holds K runs stacked on a leading axis, and the settings K runs' numbers
    (stacked_settings): the updated side, the loss, its gradient and the optimizer are vmapped over the K
    runs, the frozen side shared.

    share_lowest (only mlp.down_proj trained in the lowest updated layer lo): layer lo's attention and
    gate/up projections are the same in both models, so the updated model takes them from the frozen
    model's forward of the same batch (the retain batch's, from the carry; the forget batch's where the loss
    reads the frozen forget side) and runs only lo's down projection and what follows.

    A side with "pack" (spec.pack_multiple, armu_jax.packing's layout) runs layers 0..l on its real tokens and
    one pad token ([S, N, D], the carry too); the loss and the metrics read them unpacked to [rows, T, D]."""
    parts = StepParts(spec, share_lowest)
    train = trainer_step(parts.loss_fn, lambda batch: optimizer(batch["settings"]["lr"]), parts.finish)
    if spec.cells > 1:  # each run its state and numbers; the batch and the frozen activations shared
        shared = lambda batch: {k: (0 if k == "settings" else None) for k in batch}
        train_runs = lambda state, params, batch: jax.vmap(train, in_axes=(0, None, shared(batch)))(state, params, batch)
    else:
        train_runs = train

    def unlearning_step(state, params, batch):
        acts = parts.frozen_side(params, batch)
        return train_runs(state, params, {**{k: v for k, v in batch.items() if k != CARRY}, ACTS: acts})
    return parts.retain_side, unlearning_step


class StepParts:
    """The pieces make_step assembles: the two models' sides (layers 0..lo-1 frozen, lo..l frozen or
    updated), the RMU loss with its coefficient, and the metrics. Pure functions of their arguments (the
    spec is static): each traces into the step's programs."""

    def __init__(self, spec: StepSpec, share_lowest: bool):
        self.spec, self.model, self.share_lowest = spec, spec.model, share_lowest
        self.lo, self.hi = spec.lowest_update_layer, spec.layer_id

    def prefix(self, params, b):
        h = self.model.apply(params, b["input_ids"], b["attention_mask"], b["positions"], layer=self.lo - 1,
                             packing=b.get("pack"), method=CausalLM.hidden_upto)
        return jax.lax.stop_gradient(h)

    def upper(self, params, h, b, mid=None, keep_mid=False):
        return self.model.apply(params, h, b["attention_mask"], b["positions"], start=self.lo, end=self.hi, mid=mid,
                                keep_mid=keep_mid, packing=b.get("pack"), method=CausalLM.run_layers)

    @staticmethod
    def padded(h, b):
        """An activation as the loss and the metrics read it: [rows, T, D] (unpacked when the side is packed)."""
        if h is None or "pack" not in b:
            return h
        return packing.unpack(h, b["pack"], b["attention_mask"].shape[0])

    def frozen_upper(self, params, h, b):
        """Layers lo..l of the frozen model: (output, layer lo's mid when share_lowest, else None)."""
        if self.share_lowest:
            out, mid = self.upper(params, h, b, keep_mid=True)
            return jax.lax.stop_gradient(out), jax.lax.stop_gradient(mid)
        return jax.lax.stop_gradient(self.upper(params, h, b)), None

    def norm_weight(self, w, mask):
        """The weight of the adaptive norm: with norm_skip_first, without each row's first real token."""
        return without_first_token(w, mask) if self.spec.norm_skip_first else w

    def retain_side(self, frozen_params, r):
        acts = {"prefix": self.prefix(frozen_params, r)}
        acts["frozen"], mid = self.frozen_upper(frozen_params, acts["prefix"], r)
        return acts | ({"mid": mid} if self.share_lowest else {})

    def frozen_side(self, frozen_params, batch):
        """The frozen model's activations the loss and the metrics read (no gradient flows into them)."""
        f, carry = batch["forget"], batch[CARRY]
        acts = {"prefix_f": self.prefix(frozen_params, f), "mid_f": None}
        if self.spec.adaptive_coeff == "per_batch":
            acts["frozen_f"], acts["mid_f"] = self.frozen_upper(frozen_params, acts["prefix_f"], f)
        else:  # only the diagnostic metrics read it
            acts["frozen_f"] = jax.lax.cond(batch["diagnostics"],
                                            lambda h: self.frozen_upper(frozen_params, h, f)[0], jnp.zeros_like,
                                            acts["prefix_f"])
        acts["prefix_r"], acts["frozen_r"], acts["mid_r"] = carry["prefix"], carry["frozen"], carry.get("mid")
        return acts

    def loss_fn(self, trainable, state, frozen_params, batch):
        topic, run, acts = batch["topic"], batch["settings"], batch[ACTS]
        f, r = batch["forget"], batch["retain"]
        frozen_f, frozen_r = self.padded(acts["frozen_f"], f), self.padded(acts["frozen_r"], r)
        updated = merge(frozen_params, trainable)
        h_f = self.padded(self.upper(updated, acts["prefix_f"], f, mid=acts["mid_f"]), f)
        h_r = self.padded(self.upper(updated, acts["prefix_r"], r, mid=acts["mid_r"]), r)
        if self.spec.adaptive_coeff == "per_batch":  # paper: beta * ||h_l^frozen(x_forget)||
            adaptive = run["beta"] * mean_token_norm(frozen_f, self.norm_weight(f["weight"], f["attention_mask"]))
        else:  # public code: from the updated model on the topic's first batch, then fixed
            fresh = run["beta"] * mean_token_norm(jax.lax.stop_gradient(h_f),
                                                  self.norm_weight(f["weight"], f["attention_mask"]))
            adaptive = jnp.where(state["coeff_ready"][topic], state["coeffs"][topic], fresh)
        coeff = jnp.where(run["adaptive"], adaptive, run["steering"][topic])  # RMU: the fixed c
        loss, (forget, retain) = rmu_loss(h_f, h_r, frozen_r, run["control_vectors"][topic], coeff,
                                          run["alpha"][topic], f["weight"], r["weight"])
        return loss, (topic, forget, retain, coeff, h_f, h_r, frozen_f, frozen_r, f["weight"], r["weight"])

    @staticmethod
    def finish(state, loss, aux, grads):
        topic, forget, retain, coeff, h_f, h_r, frozen_f, frozen_r, w_f, w_r = aux
        extra = {"coeffs": state["coeffs"].at[topic].set(coeff),
                 "coeff_ready": state["coeff_ready"].at[topic].set(True)}
        metrics = {
            "loss": loss, "grad_norm": optax.tree.norm(grads), "forget_loss": forget, "retain_loss": retain,
            "coeff": coeff, "topic": topic,
            "forget_cosine": mean_cosine(h_f, frozen_f, w_f),
            "retain_cosine": mean_cosine(h_r, frozen_r, w_r),
            "forget_norm_updated": mean_token_norm(h_f, w_f),
            "forget_norm_frozen": mean_token_norm(frozen_f, w_f),
            "retain_norm_updated": mean_token_norm(h_r, w_r),
            "retain_norm_frozen": mean_token_norm(frozen_r, w_r),
        }
        return extra, metrics


def executable_flops(compiled) -> float:
    """XLA's FLOP count of a compiled executable (for a partitioned program: one device's share)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def stacked_settings(settings: list[dict]) -> dict:
    """K runs' run_settings as one tree, each leaf stacked on a leading axis (a step of spec.cells = K)."""
    return jax.tree.map(lambda *leaves: np.stack(leaves), *settings)


ACTS = "frozen_acts"  # the frozen side's activations, handed to the loss inside the batch
CARRY = "retain_carry"


@dataclass(frozen=True)
class CompiledStep:
    """The jitted unlearning step with everything needed to feed it, built once by build_step.

    Two programs per shape (make_step): `retain` (params, retain side) -> the carry, and `step` (state, params,
    batch with the carry) -> (state, metrics), jitted with explicit shardings and the state donated. `run` feeds
    them a batch at a shapes.StepShape, through executables compiled ahead of time (compile_ahead, or on a
    shape's first use); `executables` is shared by every copy of this step (with_settings), so the runs of a
    sweep, a tune or --seeds compile each shape once. init(frozen) -> the initial state, laid out with
    state_shardings. `settings` (this run's method and numbers) ride in every batch; `with_settings` gives the
    same compiled step for another run's (a sweep's next cell: nothing recompiles).
    """
    step: object
    retain: object
    init: object
    mesh: jax.sharding.Mesh
    params_shardings: object
    state_shardings: object
    batch_shardings: dict
    abstract_state: object
    trainable: tuple[str, ...]
    rows: int  # batch rows on device: --batch_size padded to a multiple of data x fsdp
    hidden: int = 0  # the residual stream's width and dtype (the retain carry's)
    dtype: str = "float32"
    settings: dict | None = None  # run_settings, on the host (a few numbers; placed with every batch)
    cells: int = 1  # runs side by side (StepSpec.cells): the state and settings hold that many, stacked
    run_state_shardings: object = None  # one run's state (a checkpoint's), whatever `cells` is
    run_abstract_state: object = None
    pack_multiple: int = 0  # StepSpec.pack_multiple: > 0, device_batch adds each side's packed layout
    shards: int = 1  # the batch's shards (data x fsdp): each packs its own rows
    frozen_like: object = dataclasses.field(default=None, compare=False)  # the frozen params' ShapeDtypeStructs (no sharding): the programs' abstract input
    executables: dict = dataclasses.field(default_factory=dict, compare=False)  # (kind, shape) -> compiled

    def with_settings(self, cfg, control_vectors: np.ndarray) -> "CompiledStep":
        if self.cells != 1:
            raise ValueError(f"this step runs {self.cells} runs side by side: give each its settings (with_cell_settings)")
        return dataclasses.replace(self, settings=run_settings(cfg, control_vectors), executables=self.executables)

    def with_cell_settings(self, cfgs: list, control_vectors: list[np.ndarray]) -> "CompiledStep":
        """The step for these runs side by side (as many as `cells`), each with its own numbers and u."""
        if len(cfgs) != self.cells:
            raise ValueError(f"this step runs {self.cells} runs side by side, not {len(cfgs)}")
        return dataclasses.replace(self, settings=stacked_settings(
            [run_settings(c, u) for c, u in zip(cfgs, control_vectors)]), executables=self.executables)

    def own_shape(self, forget: dict, retain: dict) -> StepShape:
        """The shape a batch (host arrays) has by itself: its padded lengths and packed slots."""
        return StepShape(own_shape(forget, self.shards, self.pack_multiple),
                         own_shape(retain, self.shards, self.pack_multiple))

    def run(self, state, frozen, topic: int, forget: dict, retain: dict, shape: StepShape | None = None,
            carry=None, diagnostics: bool = True):
        """One step on a batch (host arrays, padded to shape's lengths; default its own shape): (state,
        metrics, carry). carry: the retain side's, from the step before when its retain batch was this one's
        (at this shape's retain side); else computed. diagnostics False: the DIAGNOSTICS metrics are left out."""
        shape = shape or self.own_shape(forget, retain)
        placed = self.device_batch(topic, forget, retain, shape, diagnostics)
        if carry is None:
            carry = self.executable("retain", shape.retain)(frozen, placed["retain"])
        state, metrics = self.executable("step", shape)(state, frozen, {**placed, CARRY: carry})
        if not diagnostics:
            metrics = {k: v for k, v in metrics.items() if k not in DIAGNOSTICS}
        return state, metrics, carry

    def device_batch(self, topic: int, forget: dict, retain: dict, shape: StepShape | None = None,
                     diagnostics: bool = True) -> dict:
        """A batch on its devices (without the carry), packed to shape's slots when the step packs."""
        shape = shape or self.own_shape(forget, retain)
        tree = {"topic": np.int32(topic), "forget": self.with_layout(forget, shape.forget.slots),
                "retain": self.with_layout(retain, shape.retain.slots), "settings": self.settings,
                "diagnostics": np.bool_(diagnostics)}
        return sharding.place(tree, {k: v for k, v in self.batch_shardings.items() if k != CARRY})

    def with_layout(self, side: dict, slots: int = 0) -> dict:
        """A tokenized side (host arrays) as this step reads it: with its packed layout when it packs."""
        if not self.pack_multiple:
            return side
        return {**side, "pack": packing.layout(side, self.shards, self.pack_multiple, slots)}

    def abstract_side(self, shape: SideShape) -> dict:
        """ShapeDtypeStructs of one side at this shape (for ahead-of-time compiles)."""
        sh = self.batch_shardings["forget"]
        dims = (self.rows, shape.length)
        out = {"input_ids": jax.ShapeDtypeStruct(dims, jnp.int32, sharding=sh),
               "attention_mask": jax.ShapeDtypeStruct(dims, jnp.int32, sharding=sh),
               "positions": jax.ShapeDtypeStruct(dims, jnp.int32, sharding=sh),
               "weight": jax.ShapeDtypeStruct(dims, jnp.float32, sharding=sh)}
        if self.pack_multiple:
            slots = shape.slots or packing.max_packed_length(self.rows, shape.length, self.shards, self.pack_multiple)
            out["pack"] = packing.abstract_layout(self.rows, shape.length, slots, self.shards, sh)
        return out

    def full_shape(self, forget_length: int, retain_length: int) -> StepShape:
        """The largest shape of these padded lengths (every position real): reports, the bench's FLOPs."""
        side = lambda length: SideShape(length, packing.max_packed_length(self.rows, length, self.shards,
                                                                          self.pack_multiple)
                                        if self.pack_multiple else 0)
        return StepShape(side(forget_length), side(retain_length))

    def abstract_batch(self, shape: StepShape) -> dict:
        """ShapeDtypeStructs of a step's batch at this shape, the carry included."""
        repl = self.batch_shardings["topic"]
        settings = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), self.settings)
        retain = self.abstract_side(shape.retain)
        with jax.set_mesh(self.mesh):
            carry = jax.eval_shape(self.retain, self._abstract_params(), retain)
        carry = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.batch_shardings[CARRY]),
                             carry)
        return {"topic": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl), "forget": self.abstract_side(shape.forget),
                "retain": retain, "settings": settings, "diagnostics": jax.ShapeDtypeStruct((), jnp.bool_, sharding=repl),
                CARRY: carry}

    def _abstract_params(self):
        return _laid_out(self.frozen_like, self.params_shardings)

    def _abstract_state(self):
        return _laid_out(self.abstract_state, self.state_shardings)

    def lower(self, kind: str, shape):
        """The program `kind` ("step": shape a StepShape; "retain": a SideShape) lowered for abstract arguments."""
        with jax.set_mesh(self.mesh):
            if kind == "retain":
                return self.retain.lower(self._abstract_params(), self.abstract_side(shape))
            return self.step.lower(self._abstract_state(), self._abstract_params(), self.abstract_batch(shape))

    def executable(self, kind: str, shape):
        """The compiled program `kind` at `shape`, compiled now if compile_ahead has not."""
        key = (kind, shape)
        if key not in self.executables:
            self.executables[key] = self.lower(kind, shape).compile()
        return self.executables[key]

    def step_flops(self, shape: StepShape, diagnostics: bool) -> float:
        """XLA's FLOP count of the step program at `shape` as a step with or without the frozen-side metrics runs
        it: XLA counts a lax.cond's costlier branch, so the step is compiled once more with the flag a constant
        (its cond folded away). One device's share on a mesh."""
        flag = jnp.bool_(diagnostics)
        fixed = jax.jit(lambda state, params, batch: self.step(state, params, {**batch, "diagnostics": flag}))
        batch = {k: v for k, v in self.abstract_batch(shape).items() if k != "diagnostics"}
        with jax.set_mesh(self.mesh):
            return executable_flops(fixed.lower(self._abstract_state(), self._abstract_params(), batch).compile())

    def programs(self, shapes) -> list[tuple[str, object]]:
        """The (kind, shape) programs that steps of these StepShapes run, retain sides first."""
        shapes = sorted(set(shapes))
        return [("retain", r) for r in sorted({s.retain for s in shapes})] + [("step", s) for s in shapes]

    def compile_ahead(self, shapes, workers: int | None = None) -> "AheadOfTime":
        """Compile the programs of these StepShapes in the background, `workers` at a time (default: the
        cores, at most 4); returns a handle to wait on (AheadOfTime.wait)."""
        return AheadOfTime(self, [p for p in self.programs(shapes) if p not in self.executables], workers)


def _laid_out(tree, shardings):
    """ShapeDtypeStructs of tree's leaves, each with its sharding (the programs' abstract arguments)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class AheadOfTime:
    """Programs compiled on a thread pool while the caller goes on (loads the weights, tokenizes). XLA's
    compiler releases the GIL, so `workers` programs compile side by side; tracing runs under the GIL."""

    def __init__(self, compiled: CompiledStep, todo: list, workers: int | None):
        self.compiled, self.todo = compiled, todo
        self.began, self.finished, self.waited = time.time(), time.time(), 0.0
        workers = workers or max(1, min(4, os.cpu_count() or 1, len(todo) or 1))
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile")
        self.futures = [self.pool.submit(self._build, key) for key in todo]

    def _build(self, key):
        kind, shape = key
        self.compiled.executables[key] = self.compiled.lower(kind, shape).compile()
        self.finished = max(self.finished, time.time())

    def wait(self) -> int:
        """Block until every program is compiled (raising the first failure); returns how many were."""
        began = time.time()
        try:
            for future in self.futures:
                future.result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.waited += time.time() - began
        return len(self.todo)

    def describe(self) -> str:
        return (f"{len(self.todo)} programs compiled ahead in {self.finished - self.began:.1f} s of wall time, "
                f"{self.waited:.1f} s of it waited for before step 0")

    def cancel(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def build_step(spec: StepSpec, frozen) -> CompiledStep:
    """The one place the unlearning step is built: for train, the sweep, the bench and the compile
    report alike (cached by spec in armu_jax.cache). frozen: the params of layers 0..l (arrays or
    ShapeDtypeStructs; only shapes are read). Give it a run's numbers with .with_settings(cfg, u)
    (spec.cells runs': .with_cell_settings)."""
    names = tuple(trainable_names(frozen, spec.update_layer_ids, spec.update_params))
    optimizer = lambda lr: make_optimizer(spec.optimizer, lr)
    lowest = f"model/layers_{spec.lowest_update_layer}/"
    share = all(n.startswith(lowest + "mlp/down_proj/") for n in names if n.startswith(lowest))
    n_topics = spec.n_topics
    init = lambda p: init_trainer_state(p, names, optimizer(1.0), coeffs=jnp.ones([n_topics], jnp.float32),
                                        coeff_ready=jnp.zeros([n_topics], bool))
    rows, repl = sharding.batch_sharding(spec.mesh), sharding.replicated(spec.mesh)
    batch_sh = {"topic": repl, "forget": rows, "retain": rows, "settings": repl, "diagnostics": repl, CARRY: rows}
    retain_side, unlearning_step = make_step(spec, optimizer, share_lowest=share)
    trainer = compile_trainer(unlearning_step, init, frozen, names, spec.mesh, batch_sh, runs=spec.cells)
    retain = jax.jit(retain_side, in_shardings=(trainer.params_shardings, rows), out_shardings=rows)
    frozen_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
    compiled = CompiledStep(step=trainer.step, retain=retain, hidden=spec.model_cfg.hidden_size, dtype=spec.dtype,
                            init=trainer.init, mesh=spec.mesh, params_shardings=trainer.params_shardings,
                            state_shardings=trainer.state_shardings, batch_shardings=batch_sh,
                            abstract_state=trainer.abstract_state, trainable=names,
                            rows=sharding.batch_rows(spec.mesh, spec.batch_size), cells=spec.cells,
                            run_state_shardings=trainer.run_state_shardings,
                            run_abstract_state=trainer.run_abstract_state, pack_multiple=spec.pack_multiple,
                            shards=spec.mesh.shape["data"] * spec.mesh.shape["fsdp"], frozen_like=frozen_like)
    return compiled
