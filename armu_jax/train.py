"""The unlearning run: validate everything, then feed batches to the jitted step, log, checkpoint, export.

Nothing is written until every input has been checked (run directory layout: armu_jax.rundir).
A failure during the run (non-finite loss or gradient, a checkpoint or export that cannot be
written) stops it with one line; the last good checkpoint and any earlier export stay intact.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from armu_jax import hosts, rundir, sharding
from armu_jax.checkpoints import Checkpointer
from armu_jax.config import RunConfig, validate
from armu_jax.data import UnlearningData, load_tokenizer, read_corpus
from armu_jax.embedded import resolve_model
from armu_jax.errors import RunFailure, UserError
from armu_jax.hf_io import export_trained, load_hf, parse_dtype
from armu_jax.model_config import ModelConfig
from armu_jax.params import truncate
from armu_jax.step import build_step

WATCHED = ("forget_loss", "retain_loss", "grad_norm")  # a non-finite one stops the run


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


class ProfileWindow:
    """--profile_start_step / --profile_num_steps: an XLA trace of those steps in <run>/profile (process 0).

    Steps carry StepTraceAnnotation (xprof's step view); the trace is closed whatever ends the run
    (last step, SIGTERM, error). A window starting at the first step this process runs begins one
    step later unless --profile_compile: that step's time is compilation, not the step.
    """

    def __init__(self, cfg: RunConfig, out: Path, first_step: int, is_main: bool):
        self.enabled = cfg.profile_start_step >= 0 and is_main
        self.start = cfg.profile_start_step
        if self.start == first_step and not cfg.profile_compile:
            self.start += 1
        self.last = self.start + cfg.profile_num_steps - 1
        self.directory, self.active = out / "profile", False

    def before(self, step: int) -> None:
        if self.enabled and step == self.start:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step == self.last:
            self.close(state)

    def close(self, state) -> None:
        if self.active:
            try:
                jax.block_until_ready(state)
            except RuntimeError:  # donated to a step that failed: nothing left to wait for
                pass
            jax.profiler.stop_trace()
            self.active = False


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


class Shared:
    """What the runs of one process share: the loaded model, tokenizer, corpora, tokenized batches and
    compiled steps. A standalone run makes its own; a sweep (armu_jax.sweep) passes one to every
    cell, so a cell costs its steps and nothing is loaded, tokenized or compiled twice.

    keep_full: load the whole model once (a sweep evaluates every cell on it) instead of layers 0..l.
    """

    def __init__(self, keep_full: bool = False):
        self.keep_full = keep_full
        self.models: dict = {}
        self.corpora: dict = {}
        self.tokenizers: dict = {}
        self.datasets: dict = {}
        self.steps: dict = {}  # build_step's cache

    def params(self, model_dir: Path, dtype, upto_layer, mesh):
        """load_hf's params (layers 0..upto_layer, or all): each tensor straight onto its shards."""
        key = (str(model_dir), dtype, mesh)
        if self.keep_full or upto_layer is None:
            if key not in self.models:
                self.models[key] = load_hf(model_dir, dtype, mesh=mesh)[1]
            return self.models[key]
        return load_hf(model_dir, dtype, upto_layer=upto_layer, mesh=mesh)[1]

    def corpus(self, spec: str, min_len: int) -> list[str]:
        if (spec, min_len) not in self.corpora:
            self.corpora[spec, min_len] = read_corpus(spec, min_len)
        return self.corpora[spec, min_len]

    def tokenizer(self, model_dir: Path):
        if str(model_dir) not in self.tokenizers:
            self.tokenizers[str(model_dir)] = load_tokenizer(model_dir)
        return self.tokenizers[str(model_dir)]

    def data(self, cfg: RunConfig, model_dir: Path, rows: int) -> UnlearningData:
        key = (str(model_dir), cfg.forget_corpora, cfg.retain_corpora, cfg.min_len, cfg.batch_size,
               cfg.forget_max_len, cfg.retain_max_len, cfg.pad_multiple, cfg.loss_mask, rows)
        if key not in self.datasets:
            self.datasets[key] = UnlearningData(
                self.tokenizer(model_dir), [self.corpus(c, cfg.min_len) for c in cfg.forget_corpora],
                [self.corpus(c, cfg.min_len) for c in cfg.retain_corpora], cfg.batch_size,
                list(cfg.forget_max_len), cfg.retain_max_len, cfg.pad_multiple, cfg.loss_mask, rows=rows)
        return self.datasets[key]


def run(cfg: RunConfig) -> Path:
    """Run the unlearning job described by cfg; returns the run directory."""
    return train(cfg)[0]


def train(cfg: RunConfig, shared: Shared | None = None) -> tuple[Path, dict]:
    """Run the unlearning job described by cfg: (run directory, the trained leaves {name: array})."""
    shared = shared or Shared()
    model_dir = resolve_model(cfg.model)
    model_cfg = ModelConfig.from_dir(model_dir)
    validate(cfg, model_cfg)
    out = rundir.check(cfg)
    for spec in (*cfg.forget_corpora, *cfg.retain_corpora):  # bad corpora fail here, before anything loads
        shared.corpus(spec, cfg.min_len)
    n = cfg.n_topics
    vectors = (load_control_vectors(cfg.control_vectors, n, model_cfg.hidden_size) if cfg.control_vectors
               else draw_control_vectors(cfg.seed, n, model_cfg.hidden_size))
    mesh = sharding.make_mesh(cfg.mesh)
    if cfg.eval_every and hosts.several():
        raise UserError("--eval_every runs on one process only; with several processes evaluate the export "
                        "afterwards (--mode=eval --model=<run>/hf)")
    dtype = parse_dtype(cfg.dtype)
    # With --eval_every the evaluator needs the whole model; otherwise only layers 0..l are read,
    # each tensor straight onto its shards.
    params = shared.params(model_dir, dtype, None if cfg.eval_every else cfg.layer_id, mesh)
    frozen = truncate(params, cfg.layer_id)
    if cfg.resume:
        vectors = np.load(out / "control_vectors.npy", allow_pickle=False)
    compiled = build_step(cfg, model_cfg, frozen, mesh, vectors, cache=shared.steps)
    data = shared.data(cfg, model_dir, compiled.rows)
    num_steps = data.num_steps(cfg.max_num_batches)
    eval_tasks = None
    if cfg.eval_every:  # bad evaluation files fail here, before the run directory is written
        from armu_jax.tasks import load_tasks
        eval_tasks = [t.limited(cfg.eval_limit) for t in load_tasks(cfg.eval_tasks)]

    # Everything is valid (on every process): now process 0 locks and writes the run directory.
    is_main = hosts.is_main()
    hosts.barrier("checked")
    lock = rundir.RunLock(out) if is_main else None
    try:
        if is_main and cfg.overwrite:
            rundir.clear(out)
        if is_main and not cfg.resume:
            rundir.write_flagfile(out, cfg)
            np.save(out / "control_vectors.npy", vectors)
        hosts.barrier("prepared")
        evaluator = None
        if cfg.eval_every:  # keeps the whole model; the step's layers 0..l are the same arrays
            from armu_jax.evaluate import InRunEvaluator
            evaluator = InRunEvaluator(model_dir, params, dtype, eval_tasks, cfg.eval_batch_size, mesh)
            frozen = truncate(evaluator.full, cfg.layer_id)
        del params
        frozen = jax.device_put(frozen, compiled.params_shardings)
        trained = _loop(cfg, out, compiled, frozen, data, num_steps, evaluator, is_main)
    finally:
        if lock:
            lock.release()
    return out, trained


def _loop(cfg, out: Path, compiled, frozen, data: UnlearningData, num_steps: int, evaluator, is_main: bool):
    stop = hosts.StopRequest()
    state = compiled.init(frozen)
    checkpointer = Checkpointer(out / "checkpoints", cfg.keep_checkpoints)
    start = 0
    if cfg.resume and checkpointer.latest_step() is not None:
        state = checkpointer.restore(state, compiled.state_shardings)
        start = int(state["step"])
    saved = start if cfg.resume else None
    metrics_file = out / "metrics.jsonl"
    kept = [l for l in metrics_file.read_text().splitlines() if json.loads(l)["step"] < start] \
        if metrics_file.exists() else []
    writer = None
    if is_main:
        metrics_file.write_text("".join(l + "\n" for l in kept))
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))

    began = time.time()
    bar = tqdm(range(start, num_steps), initial=start, total=num_steps, desc=f"{cfg.method} l={cfg.layer_id}",
               disable=not is_main)
    profile = ProfileWindow(cfg, out, start, is_main)
    try:
        with jax.set_mesh(compiled.mesh), metrics_file.open("a") as log:
            for step in bar:
                profile.before(step)
                batch = data.batch(step)
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = compiled.step(state, frozen, compiled.device_batch(batch.topic, batch.forget,
                                                                                        batch.retain))
                profile.after(step, state)
                record = {"step": step, **{k: v.item() for k, v in jax.device_get(metrics).items()},
                          "seconds": round(time.time() - began, 3)}
                bad = [k for k in WATCHED if not math.isfinite(record[k])]
                if bad:
                    kept_note = (f"the last good checkpoint is step {saved} in {out / 'checkpoints'}"
                                 if saved is not None else "no checkpoint had been written yet")
                    raise RunFailure(f"step {step}: {', '.join(f'{k}={record[k]}' for k in bad)} "
                                     f"{'is' if len(bad) == 1 else 'are'} not finite; "
                                     f"the run stopped without saving this step, {kept_note} "
                                     "(lower --lr or --alpha and start a new run)")
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
                stopping = stop.at(done)
                if stopping or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == num_steps:
                    _save(checkpointer, done, state, saved, out)
                    saved = done
                if stopping:
                    raise SystemExit(f"SIGTERM: checkpoint written at step {done} in {out}; continue with --resume")
    finally:
        profile.close(state)
        bar.close()
        _close(checkpointer, saved, out)
        if writer:
            writer.close()
    if cfg.export:
        export(resolve_model(cfg.model), out / "hf", state["trainable"], cfg.export_dtype)
    return state["trainable"]


def _save(checkpointer: Checkpointer, step: int, state, saved, out: Path) -> None:
    try:
        checkpointer.save(step, state)
    except Exception as err:  # orbax wraps the OSError of a full or unwritable disk in several types
        raise RunFailure(f"checkpoint of step {step} could not be written to {out / 'checkpoints'}: "
                         f"{_first_line(err)}; " + (f"the checkpoint of step {saved} is intact"
                                                    if saved is not None else "no earlier checkpoint")) from None


def _close(checkpointer: Checkpointer, saved, out: Path) -> None:
    try:
        checkpointer.close()
    except Exception as err:  # an asynchronous save that failed surfaces here
        raise RunFailure(f"checkpoint could not be finished in {out / 'checkpoints'}: {_first_line(err)}; "
                         f"earlier checkpoints are intact") from None


def export(model_dir: Path, target: Path, trainable: dict, dtype: str) -> Path:
    """The original checkpoint with the trained tensors swapped in, as a HF directory. Every process
    gathers the trained tensors (they may be sharded over several hosts); process 0 streams the
    export from the source files, the others wait for it."""
    trained = hosts.gather(trainable)
    try:
        if hosts.is_main():
            export_trained(trained, model_dir, target, dtype=dtype)
    finally:  # a failed export still releases the processes waiting for it
        hosts.barrier("exported")
    return target
