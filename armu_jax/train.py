"""The unlearning run: validate everything, then feed batches to the jitted step, log, checkpoint, export.

Run directory layout: flags.txt (a flagfile of the run), control_vectors.npy, metrics.jsonl,
tb/ (TensorBoard), checkpoints/ (orbax), hf/ (the final Hugging Face export).
"""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from armu_jax import sharding
from armu_jax.checkpoints import Checkpointer
from armu_jax.config import RunConfig, validate
from armu_jax.data import UnlearningData, load_tokenizer, read_corpus
from armu_jax.embedded import resolve_model
from armu_jax.errors import UserError
from armu_jax.hf_io import export_hf, load_hf, parse_dtype
from armu_jax.model import LlamaForCausalLM
from armu_jax.model_config import ModelConfig
from armu_jax.optimizer import make_optimizer
from armu_jax.step import StepSpec, init_state, make_step, merge, trainable_paths, truncate_params


def draw_control_vectors(seed: int, n_topics: int, hidden: int) -> np.ndarray:
    """One u = r / ||r|| per topic, r ~ Uniform[0, 1)^hidden, as the reference draws them."""
    r = np.random.default_rng(seed).random((n_topics, hidden), dtype=np.float64)
    return (r / np.linalg.norm(r, axis=1, keepdims=True)).astype(np.float32)


def load_control_vectors(path: str, n_topics: int, hidden: int) -> np.ndarray:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--control_vectors {path} does not exist")
    try:
        vectors = np.load(file, allow_pickle=False)
    except ValueError as err:
        raise UserError(f"--control_vectors {path} is not a plain .npy array ({err})") from None
    if vectors.shape != (n_topics, hidden):
        raise UserError(f"--control_vectors {path} has shape {vectors.shape}, expected ({n_topics}, {hidden}) "
                        "= (forget topics, hidden size)")
    norms = np.linalg.norm(vectors, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise UserError(f"--control_vectors {path}: rows must be unit vectors (norms {np.round(norms, 4).tolist()})")
    return vectors.astype(np.float32)


def check_output_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; pass a directory")
    non_empty = out.is_dir() and any(out.iterdir())
    if non_empty and not (cfg.resume or cfg.overwrite):
        raise UserError(f"--output_dir {out} exists and is not empty; pass --resume to continue it, "
                        "--overwrite to start afresh, or choose a new directory")
    if cfg.resume and not (out / "checkpoints").is_dir():
        raise UserError(f"--resume: {out} has no checkpoints/ to resume from")
    return out


def _write_flagfile(out: Path, cfg: RunConfig) -> None:
    lines = []
    for key, value in vars(cfg).items():
        if key in ("resume", "overwrite") or value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = str(value).lower()
        lines.append(f"--{key}={value}")
    (out / "flags.txt").write_text("\n".join(lines) + "\n")


class Interrupt:
    """SIGTERM sets a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.requested = True


def _device_batch(batch, shardings):
    tree = {"topic": np.int32(batch.topic), "forget": batch.forget, "retain": batch.retain}
    return jax.device_put(tree, shardings)


def run(cfg: RunConfig) -> Path:
    """Run the unlearning job described by cfg; returns the run directory."""
    model_dir = resolve_model(cfg.model)
    model_cfg = ModelConfig.from_dir(model_dir)
    validate(cfg, model_cfg.num_hidden_layers)
    out = check_output_dir(cfg)
    forget = [read_corpus(c, cfg.min_len) for c in cfg.forget_corpora]
    retain = [read_corpus(c, cfg.min_len) for c in cfg.retain_corpora]
    n = cfg.n_topics
    vectors = (load_control_vectors(cfg.control_vectors, n, model_cfg.hidden_size) if cfg.control_vectors
               else draw_control_vectors(cfg.seed, n, model_cfg.hidden_size))
    mesh = sharding.make_mesh(cfg.mesh)
    batch_sh = sharding.batch_sharding(mesh, cfg.batch_size)
    dtype = parse_dtype(cfg.dtype)
    _, params = load_hf(model_dir, dtype)
    try:
        paths = trainable_paths(params, cfg.update_layer_ids, cfg.update_params)
    except KeyError as err:
        raise UserError(f"--update_params: the model has no parameter {err.args[0]}; "
                        "use names like mlp.down_proj, mlp.up_proj, self_attn.o_proj") from None
    tokenizer = load_tokenizer(model_dir)
    data = UnlearningData(tokenizer, forget, retain, cfg.batch_size, list(cfg.forget_max_len),
                          cfg.retain_max_len, cfg.pad_multiple, cfg.loss_mask)
    num_steps = data.num_steps(cfg.max_num_batches)
    eval_tasks = None
    if cfg.eval_every:  # bad evaluation files fail here, before the run directory is written
        from armu_jax.tasks import load_tasks
        eval_tasks = [t.limited(cfg.eval_limit) for t in load_tasks(cfg.eval_tasks)]

    # Everything is valid: now the run directory is written.
    is_main = jax.process_index() == 0
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if is_main and not cfg.resume:
        _write_flagfile(out, cfg)
        np.save(out / "control_vectors.npy", vectors)
    if cfg.resume:
        vectors = np.load(out / "control_vectors.npy", allow_pickle=False)

    model = LlamaForCausalLM(model_cfg, dtype=dtype, param_dtype=dtype)
    evaluator = None
    if cfg.eval_every:  # keeps the whole model; the step's layers 0..l are the same arrays
        from armu_jax.evaluate import InRunEvaluator
        params = jax.device_put(params, sharding.param_shardings(params, mesh))
        evaluator = InRunEvaluator(model_dir, params, dtype, eval_tasks, cfg.eval_batch_size)
    frozen = truncate_params(params, cfg.layer_id)
    del params
    params_sh = sharding.param_shardings(frozen, mesh)
    frozen = jax.device_put(frozen, params_sh)
    optimizer = make_optimizer(cfg.optimizer, cfg.lr)
    abstract = jax.eval_shape(lambda p: init_state(p, paths, optimizer, n), frozen)
    state_sh = sharding.tree_shardings_by_path(abstract, mesh)
    state = jax.jit(lambda p: init_state(p, paths, optimizer, n), out_shardings=state_sh)(frozen)

    spec = StepSpec(model, cfg.layer_id, min(cfg.update_layer_ids), cfg.method, cfg.adaptive_coeff, cfg.beta,
                    cfg.steering_coeffs, cfg.alpha, cfg.norm_skip_first)
    repl = sharding.replicated(mesh)
    batch_tree_sh = {"topic": repl, "forget": batch_sh, "retain": batch_sh}
    step_fn = jax.jit(make_step(spec, optimizer, vectors), in_shardings=(state_sh, params_sh, batch_tree_sh),
                      out_shardings=(state_sh, repl), donate_argnums=0)

    checkpointer = Checkpointer(out / "checkpoints", cfg.keep_checkpoints)
    start = 0
    if cfg.resume and checkpointer.latest_step() is not None:
        state = checkpointer.restore(state, state_sh)
        start = int(state["step"])
    metrics_file = out / "metrics.jsonl"
    kept = [l for l in metrics_file.read_text().splitlines() if json.loads(l)["step"] < start] \
        if metrics_file.exists() else []
    if is_main:
        metrics_file.write_text("".join(l + "\n" for l in kept))
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))

    interrupt = Interrupt()
    began = time.time()
    bar = tqdm(range(start, num_steps), initial=start, total=num_steps, desc=f"{cfg.method} l={cfg.layer_id}",
               disable=not is_main)
    profiling = cfg.profile_start_step >= 0 and is_main
    with jax.set_mesh(mesh), metrics_file.open("a") as log:
        for step in bar:
            if profiling and step == cfg.profile_start_step:
                jax.profiler.start_trace(str(out / "profile"))
            state, metrics = step_fn(state, frozen, _device_batch(data.batch(step), batch_tree_sh))
            if profiling and step == cfg.profile_start_step + cfg.profile_num_steps - 1:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            record = {"step": step, **{k: v.item() for k, v in jax.device_get(metrics).items()},
                      "seconds": round(time.time() - began, 3)}
            if evaluator and ((step + 1) % cfg.eval_every == 0 or step + 1 == num_steps):
                record.update(evaluator(state["trainable"]))
                bar.write(f"step {step + 1}: " + " ".join(f"{k}={v:.3f}" for k, v in record.items()
                                                          if k.startswith("eval/")))
            if is_main:
                log.write(json.dumps(record) + "\n")
                log.flush()
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(key, value, step)
                if step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{record['loss']:.4g}", forget=f"{record['forget_loss']:.4g}",
                                    retain=f"{record['retain_loss']:.4g}")
            done = step + 1
            if interrupt.requested or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) \
                    or done == num_steps:
                checkpointer.save(done, state)
            if interrupt.requested:
                checkpointer.close()
                raise SystemExit(f"SIGTERM: checkpoint written at step {done} in {out}; continue with --resume")
    checkpointer.close()
    if writer:
        writer.close()
    if cfg.export and is_main:
        export(model_dir, out / "hf", state["trainable"], cfg.export_dtype)
    return out


def export(model_dir: Path, target: Path, trainable: dict, dtype: str) -> Path:
    """The full original model with the trained leaves swapped in, as a HF directory."""
    _, full = load_hf(model_dir, parse_dtype(dtype))
    trained = {k: np.asarray(jax.device_get(v)) for k, v in trainable.items()}
    return export_hf(merge(full, trained), model_dir, target, dtype=dtype, overwrite=True)
