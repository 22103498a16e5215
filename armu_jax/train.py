"""The unlearning run: validate everything, then feed batches to the jitted step, log, checkpoint, export.

Nothing is written until every input has been checked (run directory layout: armu_jax.rundir).
A failure during the run (non-finite loss or gradient, a checkpoint or export that cannot be
written) stops it with one line; the last good checkpoint and any earlier export stay intact.

The pieces, in order: prepare() (every check and load, nothing written), write_run_dir(),
run_steps() (the loop: the step, MetricsLog, the finite check, --eval_every, checkpoints,
SIGTERM, ProfileWindow), export().
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from armu_jax import hosts, outputs, rundir, storage
from armu_jax.cache import ProcessCache
from armu_jax.checkpoints import Checkpointer, CheckpointsDamaged
from armu_jax.config import RunConfig, seed_configs, validate
from armu_jax.context import RunContext
from armu_jax.data import DataSpec, UnlearningData
from armu_jax.errors import RunFailure, UserError, first_line
from armu_jax.evaluate import EvalSpec, InRunEvaluator
from armu_jax.hf_io import export_trained
from armu_jax.model import abstract_params
from armu_jax.params import truncate
from armu_jax.runtime import compile_counts, compile_delta, count_compiles, describe_compiles
from armu_jax.shapes import ShapePlan
from armu_jax.step import AheadOfTime, CompiledStep, StepSpec
from armu_jax.tasks import load_tasks

WATCHED = ("forget_loss", "retain_loss", "grad_norm")  # a non-finite one stops the run


def draw_control_vectors(seed: int, n_topics: int, hidden: int) -> np.ndarray:
    """One u = r / ||r|| per topic, r ~ Uniform[0, 1)^hidden, as the reference draws them."""
    r = np.random.default_rng(seed).random((n_topics, hidden), dtype=np.float64)
    return (r / np.linalg.norm(r, axis=1, keepdims=True)).astype(np.float32)


def load_control_vectors(path: str | Path, n_topics: int, hidden: int, what: str = "--control_vectors") -> np.ndarray:
    """A checked .npy of control vectors: [n_topics, hidden] unit rows, finite, no pickle."""
    file = storage.path(path, what)
    if not file.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        vectors = np.load(io.BytesIO(storage.read_bytes(file)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"{what} {path} is not a plain .npy array ({first_line(err)})") from None
    if not isinstance(vectors, np.ndarray):  # an .npz archive
        vectors.close()
        raise UserError(f"{what} {path} is an .npz archive; save the array with np.save as a .npy file")
    if vectors.shape != (n_topics, hidden):
        raise UserError(f"{what} {path} has shape {vectors.shape}, expected ({n_topics}, {hidden}) "
                        "= (forget topics, hidden size)")
    if not np.issubdtype(vectors.dtype, np.floating) or not np.isfinite(vectors).all():
        raise UserError(f"{what} {path}: expected finite floating-point numbers (dtype {vectors.dtype})")
    norms = np.linalg.norm(vectors, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise UserError(f"{what} {path}: rows must be unit vectors (norms {np.round(norms, 4).tolist()})")
    return vectors.astype(np.float32)


class ProfileWindow:
    """--profile_start_step / --profile_num_steps: an XLA trace of those steps in <run>/profile (process 0).

    Steps carry StepTraceAnnotation (xprof's step view); the trace is closed whatever ends the run
    (last step, SIGTERM, error). A window starting at the first step this process runs begins one
    step later unless --profile_compile: the planned programs compile before step 0, but the first step still
    pays one-time costs (its first transfers and allocations).
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


class MetricsLog:
    """metrics.jsonl (one JSON record per step) and TensorBoard scalars, written by process 0. On
    resume the records of steps before `start` are kept and later ones (not checkpointed) dropped."""

    def __init__(self, out, start: int, enabled: bool):
        self.file, self.enabled, self.writer, self.handle = out / "metrics.jsonl", enabled, None, None
        if not enabled:
            return
        kept = [r for r in rundir.read_metrics(out) if r["step"] < start]
        # In a bucket metrics.jsonl and the event file are rewritten every few seconds and before each
        # checkpoint (flush()).
        self.handle = storage.AppendLog(self.file, "".join(json_line(r) for r in kept))
        storage.use_for_tensorboard()
        from tensorboardX import SummaryWriter  # only when a run logs
        self.writer = SummaryWriter(str(out / "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self._failing_as_one_line():
            self.handle.write(json_line(record))
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(key, value, record["step"])

    def flush(self) -> None:
        if self.handle:
            with self._failing_as_one_line():
                self.handle.flush()
            self.writer.flush()

    def close(self) -> None:
        try:
            if self.handle:
                self.handle.close()
            if self.writer:
                self.writer.close()
        except OSError:  # a log that could not be written has said so (write, flush); closing it adds nothing
            pass

    @contextlib.contextmanager
    def _failing_as_one_line(self):
        try:
            yield
        except OSError as err:
            raise RunFailure(f"{self.file} could not be written ({err.strerror or first_line(err)}); the checkpoints "
                             "are intact: make room (or choose another --output_dir) and rerun with --resume") from None


def json_line(record: dict) -> str:
    return json.dumps(record) + "\n"


def check_finite(record: dict, step: int, saved: int | None, out: Path) -> None:
    """A non-finite loss or gradient norm stops the run, naming the last good checkpoint."""
    bad = [k for k in WATCHED if not math.isfinite(record[k])]
    if bad:
        kept = (f"the last good checkpoint is step {saved} in {out / 'checkpoints'}" if saved is not None
                else "no checkpoint had been written yet")
        raise RunFailure(f"step {step}: {', '.join(f'{k}={record[k]}' for k in bad)} "
                         f"{'is' if len(bad) == 1 else 'are'} not finite; "
                         f"the run stopped without saving this step, {kept} "
                         "(lower --lr or --alpha and start a new run)")


@dataclass
class Prepared:
    """A run checked and loaded, nothing written yet."""
    cfg: RunConfig
    run: RunContext
    out: Path
    vectors: np.ndarray
    params: dict  # layers 0..l, or the whole model with --eval_every
    compiled: CompiledStep
    data: UnlearningData
    num_steps: int
    eval_tasks: list | None
    plan: ShapePlan | None = None
    compiling: AheadOfTime | None = None  # the plan's programs, compiling while the weights load
    since: dict | None = None  # runtime.compile_counts() when the run began (its records count from there)


def control_vectors(cfg: RunConfig, out: Path, hidden: int) -> np.ndarray:
    """The run's u: on --resume the run's own (checked as --control_vectors is), else --control_vectors,
    else drawn with --seed."""
    if cfg.resume:
        return load_control_vectors(out / "control_vectors.npy", cfg.n_topics, hidden, what="the run's")
    if cfg.control_vectors:
        return load_control_vectors(cfg.control_vectors, cfg.n_topics, hidden)
    return draw_control_vectors(cfg.seed, cfg.n_topics, hidden)


def prepare(cfg: RunConfig, cache: ProcessCache, ahead: bool = True) -> Prepared:
    """Every check and load of a run (on every process); nothing is written. The step is built from the
    model's shapes, every batch tokenized and the shapes planned (armu_jax.shapes) before the weights load;
    ahead: the plan's programs compile on a thread pool meanwhile (Prepared.compiling)."""
    run = RunContext.of(cfg)
    validate(cfg, run.model_cfg)
    out = rundir.check(cfg)
    hosts.check_shared(out, "--output_dir")  # several processes: every one must see the directory
    for spec in (*cfg.forget_corpora, *cfg.retain_corpora):  # bad corpora fail here, before anything loads
        cache.corpus(spec, cfg.min_len)
    if cfg.eval_every and hosts.several():
        raise UserError("--eval_every runs on one process only; with several processes evaluate the export "
                        "afterwards (--mode=eval --model=<run>/hf)")
    vectors = control_vectors(cfg, out, run.model_cfg.hidden_size)
    eval_tasks = None
    if cfg.eval_every:  # bad evaluation files fail here, before the run directory is written
        eval_tasks = load_tasks(cfg.eval_tasks, cfg.eval_limit, cfg.eval_split)
    spec = StepSpec.of(cfg, run.model_cfg, run.mesh)
    compiled = cache.step(spec, truncate(abstract_params(spec.model), cfg.layer_id)).with_settings(cfg, vectors)
    data = cache.data(DataSpec.of(cfg, run.model_dir, compiled.rows))
    num_steps = data.num_steps(cfg.max_num_batches)
    plan = cache.plan(data, num_steps, compiled, run.model_cfg, cfg.step_programs)
    compiling = compiled.compile_ahead(plan.steps) if ahead else None
    try:
        # With --eval_every the evaluator needs the whole model; otherwise only layers 0..l are read,
        # each tensor straight onto its shards.
        params = cache.params(run.model_dir, cfg.dtype, run.mesh, None if cfg.eval_every else cfg.layer_id)
    except BaseException:
        if compiling:
            compiling.cancel()
        raise
    return Prepared(cfg, run, out, vectors, params, compiled, data, num_steps, eval_tasks, plan, compiling)


def write_run_dir(p: Prepared) -> None:
    """Process 0, holding the lock: --overwrite clears the directory; a new run writes flags.txt and u."""
    if p.cfg.overwrite:
        rundir.clear(p.out)
    if not p.cfg.resume:
        rundir.write_flagfile(p.out, p.cfg)
        outputs.write_npy(p.out / "control_vectors.npy", p.vectors)


def run(cfg: RunConfig) -> Path:
    """Run the unlearning job described by cfg; returns the run directory."""
    return train(cfg)[0]


def train_cli(cfg: RunConfig) -> None:
    """--mode=train; with --seeds=K, K runs side by side in <output_dir>/seed_<s>/ (each its own export)."""
    if cfg.seeds == 1:
        print(f"armu_jax: run written to {run(cfg)}")
        return
    configs = seed_run_configs(cfg)
    for seeded in configs:  # every seed's settings and directory checked before the first runs
        rundir.check(seeded)
    cache = ProcessCache()  # one model, tokenizer and compiled step for every seed
    for k, seeded in enumerate(configs):
        print(f"armu_jax: seed {seeded.seed} ({k + 1} of {len(configs)})")
        print(f"armu_jax: run written to {train(seeded, cache)[0]}")


def seed_run_configs(cfg: RunConfig) -> list[RunConfig]:
    """--seeds=K: the K runs, in <output_dir>/seed_<s>/ (s = --seed + k). With --resume, a seed whose
    directory has no checkpoint yet starts afresh (the run was stopped before it)."""
    if not cfg.output_dir:
        raise UserError("--seeds needs --output_dir: the K runs are written to <output_dir>/seed_<s>/")
    base = storage.path(cfg.output_dir, "--output_dir")
    configs = []
    for seeded in seed_configs(cfg):
        directory = base / f"seed_{seeded.seed}"
        resume = cfg.resume and (directory / "checkpoints").is_dir()
        configs.append(dataclasses.replace(seeded, output_dir=str(directory), resume=resume))
    return configs


def train(cfg: RunConfig, cache: ProcessCache | None = None, hook=None) -> tuple[Path, dict]:
    """Run the unlearning job described by cfg: (run directory, the trained leaves {name: array}).
    hook(steps_done, trainable), if given, is called after every step (--mode=tune's pruning: it may raise
    to stop the run)."""
    cache = cache or ProcessCache()
    count_compiles()
    began, since = time.time(), compile_counts()
    p = prepare(cfg, cache)
    p.since = since
    # Everything is valid (on every process): now process 0 locks and writes the run directory.
    is_main = hosts.is_main()
    if is_main:
        print(f"armu_jax: planned {p.plan.describe()}", flush=True)
    lock = None
    try:
        hosts.barrier("checked")
        lock = rundir.lock(p.out) if is_main else None
        if is_main:
            write_run_dir(p)
        hosts.barrier("prepared")
        evaluator = None
        frozen = truncate(p.params, cfg.layer_id)
        if cfg.eval_every:  # keeps the whole model; the step's layers 0..l are the same arrays
            scorer = cache.scorer(EvalSpec.of(cfg, p.run.model_dir, p.run.mesh))
            evaluator = InRunEvaluator(scorer, p.params, p.eval_tasks, cfg.eval_nll_tokens)
            frozen = truncate(evaluator.full, cfg.layer_id)
        p.params = None
        frozen = jax.device_put(frozen, p.compiled.params_shardings)
        trained = run_steps(p, frozen, evaluator, is_main, hook)
        if cfg.export:
            export(p.run.model_dir, p.out / "hf", trained, cfg.export_dtype)
    finally:
        if p.compiling:
            p.compiling.cancel()
        if lock:
            lock.release()
    if is_main:
        ahead = f" ({p.compiling.describe()})" if p.compiling else ""
        print(f"armu_jax: {p.num_steps} steps in {time.time() - began:.1f} s from the start of the run; "
              f"{describe_compiles(compile_delta(since))}{ahead}", flush=True)
    return p.out, trained


def same_side(a: dict, b: dict) -> bool:
    """Two tokenized sides (host arrays) are the same batch: every array equal."""
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)


@dataclass
class Lane:
    """One run of the loop: its directory, metrics log and checkpoints. Several side by side share one step
    (train_cells); a lane whose step is not finite stops alone (failure), the others go on."""
    out: Path
    log: MetricsLog
    checkpointer: Checkpointer
    failure: RunFailure | None = None


def run_steps(p: Prepared, frozen, evaluator, is_main: bool, hook=None) -> dict:
    """The loop from the last checkpoint (or step 0) to the end: returns the trained leaves."""
    return run_lanes([p], p.compiled, frozen, evaluator, is_main, hook)[0]


def _restore(checkpointer: Checkpointer, out: Path, state_like, shardings, is_main: bool = True):
    """The newest checkpoint that restores; a line per newer one that does not (set aside, not removed)."""
    try:
        state, skipped = checkpointer.restore_newest(state_like, shardings)
    except CheckpointsDamaged as err:
        detail = "; ".join(f"step {step}: {why}" for step, why in err.skipped)
        raise UserError(f"--resume: no checkpoint in {out / 'checkpoints'} can be restored ({detail}); nothing was "
                        "removed: start afresh with --overwrite or a new --output_dir") from None
    for step, why in skipped if is_main else ():
        print(f"armu_jax: --resume: the checkpoint of step {step} cannot be restored ({why}); set aside in "
              f"{checkpointer.damaged_dir() / str(step)}", file=sys.stderr)
    if skipped and is_main:
        print(f"armu_jax: --resume: continuing from the checkpoint of step {checkpointer.saved}", file=sys.stderr)
    return state


def resume_lanes(cfg, lanes: list[Lane], compiled: CompiledStep, frozen, is_main: bool):
    """(state, start step): the lanes' last checkpoint restored (side by side, each run's own, all at one
    step), or a fresh state at step 0."""
    state = compiled.init(frozen)
    hosts.LAST_CHECKPOINT.update(directory=str(lanes[0].checkpointer.directory))
    if not (cfg.resume and lanes[0].checkpointer.latest_step() is not None):
        return state, 0
    try:
        if compiled.cells > 1:  # each run's checkpoint is one run's state, as a run alone writes it
            runs = [_restore(lane.checkpointer, lane.out, compiled.run_abstract_state, compiled.run_state_shardings,
                             is_main) for lane in lanes]
            if len({lane.checkpointer.saved for lane in lanes}) > 1:
                raise UserError("--resume: runs side by side restored different steps ("
                                + ", ".join(f"{lane.out}: {lane.checkpointer.saved}" for lane in lanes)
                                + "); resume them one at a time")
            state = jax.device_put(jax.tree.map(lambda *xs: jax.numpy.stack(xs), *runs), compiled.state_shardings)
        else:
            state = _restore(lanes[0].checkpointer, lanes[0].out, state, compiled.state_shardings, is_main)
    except BaseException:
        for lane in lanes:  # orbax's threads, closed before the error reaches the exit (no tracebacks there)
            lane.checkpointer.manager.close()
        raise
    start = int(np.max(jax.device_get(state["step"])))
    hosts.LAST_CHECKPOINT.update(step=start, directory=str(lanes[0].checkpointer.directory))
    return state, start


class StepMetrics:
    """The loop's metrics, read one step late: the host waits for step n's numbers while step n + 1 is queued
    (MaxText's order). settle() reads the pending step, stops on a non-finite one (naming its step; no
    checkpoint is written past it: every save settles first) and writes a row per live lane."""

    def __init__(self, cfg, lanes: list[Lane], several: bool, since, bar, is_main: bool):
        self.cfg, self.lanes, self.several, self.since, self.bar, self.is_main = cfg, lanes, several, since, bar, is_main
        self.began = time.time()
        self.pending: list = []  # the last dispatched step's (step, metrics)

    def live(self) -> list[int]:
        return [k for k, lane in enumerate(self.lanes) if lane.failure is None]

    def dispatched(self, step: int, metrics) -> None:
        self.pending.append((step, metrics))

    def _record(self, step: int, values: dict, k: int) -> dict:
        compiles = compile_delta(self.since)
        return {"step": step, **{key: (v[k] if self.several else v).item() for key, v in values.items()},
                "seconds": round(time.time() - self.began, 3), "programs": compiles["programs"],
                "compile_seconds": round(compiles["trace_seconds"] + compiles["lower_seconds"]
                                         + compiles["compile_seconds"], 2)}

    def settle(self, extra=None) -> None:
        """The pending step's rows, with extra()'s entries (an in-run evaluation's) when given."""
        if not self.pending:
            return
        step, metrics = self.pending.pop()
        values = jax.device_get(metrics)
        for k in self.live():
            lane = self.lanes[k]
            record = self._record(step, values, k)
            try:
                check_finite(record, step, lane.checkpointer.saved, lane.out)
            except RunFailure as err:
                if not self.several:
                    raise
                lane.failure = err  # this run stops here; its log ends at the step before
                self.bar.write(f"{lane.out}: {err}")
                continue
            if extra:
                record.update(extra())
                self.bar.write(f"step {step + 1}: "
                               + " ".join(f"{key}={v:.3f}" for key, v in record.items() if key.startswith("eval/")))
            lane.log.write(record)
            if self.is_main and step % self.cfg.log_every == 0 and k == self.live()[0]:
                self.bar.set_postfix(loss=f"{record['loss']:.4g}", forget=f"{record['forget_loss']:.4g}",
                                     retain=f"{record['retain_loss']:.4g}")


def save_lanes(metrics: StepMetrics, done: int, run_state) -> None:
    """A checkpoint of every live lane at step done: the pending step settled first (a non-finite step stops
    the run before a checkpoint past it), then each log flushed (the log in a bucket holds every step its
    checkpoint has)."""
    metrics.settle()
    for k in metrics.live():
        metrics.lanes[k].log.flush()
        metrics.lanes[k].checkpointer.save(done, run_state(k))
    hosts.LAST_CHECKPOINT.update(step=done, directory=str(metrics.lanes[0].checkpointer.directory))


def close_lanes(lanes: list[Lane]) -> None:
    for lane in lanes:
        if lane.log:
            lane.log.close()
        lane.checkpointer.close()


def run_lanes(preps: list[Prepared], compiled: CompiledStep, frozen, evaluator, is_main: bool, hook=None) -> list:
    """The loop of one run, or of compiled.cells runs side by side (train_cells: the same batches, each its
    own numbers, state, metrics.jsonl and checkpoints), from their last checkpoint (or step 0) to the end.
    Its concerns are pieces: resume_lanes, StepMetrics (read a step late, checked, logged), the in-run
    evaluator and a tune's pruning hook, ProfileWindow, hosts.StopRequest (SIGTERM), save_lanes.
    Returns each run's trained leaves; side by side, a run stopped by a non-finite step gives its RunFailure
    instead (one run alone raises it)."""
    cfg, num_steps, data, several = preps[0].cfg, preps[0].num_steps, preps[0].data, compiled.cells > 1
    stop = hosts.StopRequest()
    lanes = [Lane(p.out, None, Checkpointer(p.out / "checkpoints", cfg.keep_checkpoints)) for p in preps]
    state, start = resume_lanes(cfg, lanes, compiled, frozen, is_main)
    for lane in lanes:
        lane.log = MetricsLog(lane.out, start, is_main)
    plan, since = preps[0].plan, preps[0].since or compile_counts()
    if preps[0].compiling:  # the planned programs: compiled before step 0
        preps[0].compiling.wait()
    bar = tqdm(range(start, num_steps), initial=start, total=num_steps,
               desc=f"{cfg.method} l={cfg.layer_id}" + (f" x{len(lanes)} runs" if several else ""), disable=not is_main)
    metrics_of = StepMetrics(cfg, lanes, several, since, bar, is_main)
    profile = ProfileWindow(cfg, lanes[0].out, start, is_main)
    carried = None  # (the step before's retain batch, its frozen retain activations on the devices)
    run_state = (lambda k: jax.tree.map(lambda x: x[k], state)) if several else (lambda k: state)
    try:
        with jax.set_mesh(compiled.mesh):
            for step in bar:
                profile.before(step)
                shape = plan.steps[step]
                batch = data.batch(step, shape)  # tokenized and placed while the device runs the step before
                logged = step % cfg.log_every == 0 or step + 1 == num_steps  # the frozen-side metrics' steps
                # the paired topic's retain batch again: its frozen activations from the step before
                reuse = carried is not None and same_side(carried[0], batch.retain)
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics, carry = compiled.run(state, frozen, batch.topic, batch.forget, batch.retain,
                                                         shape, carried[1] if reuse else None, logged)
                carried = (batch.retain, carry)
                profile.after(step, state)
                metrics_of.settle()  # the step before's
                metrics_of.dispatched(step, metrics)
                if not metrics_of.live():  # side by side: every run has stopped
                    break
                done = step + 1
                if evaluator and (done % cfg.eval_every == 0 or done == num_steps):
                    metrics_of.settle(lambda: evaluator(state["trainable"]))
                if hook:  # a tune's pruning: it sees only steps checked finite, and a pruned trial's log ends at its step
                    metrics_of.settle()
                    hook(done, state["trainable"])
                stopping = stop.at(done)
                if stopping or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == num_steps:
                    save_lanes(metrics_of, done, run_state)
                if stopping:
                    raise SystemExit(f"SIGTERM: checkpoint written at step {done} in "
                                     f"{', '.join(str(lane.out) for lane in lanes)}; continue with --resume")
            metrics_of.settle()
    finally:
        profile.close(state)
        bar.close()
        close_lanes(lanes)
    return [lane.failure or run_state(k)["trainable"] for k, lane in enumerate(lanes)]


def latest_checkpoint(out: Path) -> int | None:
    """The step of a run directory's latest checkpoint (None: none yet)."""
    if not (out / "checkpoints").is_dir():
        return None
    checkpointer = Checkpointer(out / "checkpoints", 1)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def train_cells(cfgs: list[RunConfig], cache: ProcessCache) -> list:
    """Runs that differ only in their method and its numbers (and seed) side by side in one compiled step
    (a sweep's --cells_per_step): each run is checked, written and checkpointed exactly as train() would,
    its metrics are those of the run alone; the batches, the frozen model's activations and the step are
    shared. Returns per run (run directory, trained leaves) or, for a run stopped by a non-finite step, its
    RunFailure. One process (the sweep's)."""
    count_compiles()
    since = compile_counts()
    preps = [prepare(c, cache, ahead=False) for c in cfgs]
    first = preps[0]
    spec = StepSpec.of(first.cfg, first.run.model_cfg, first.run.mesh)
    for p in preps[1:]:
        if (StepSpec.of(p.cfg, p.run.model_cfg, p.run.mesh) != spec or p.data is not first.data
                or p.num_steps != first.num_steps or p.cfg.resume != first.cfg.resume):
            raise ValueError(f"{p.out} cannot run side by side with {first.out}: another step, batches or resume")
    if any(p.cfg.export or p.cfg.eval_every for p in preps):
        raise ValueError("runs side by side neither export nor evaluate during the run (the sweep's cells do neither)")
    steps = {p.out: latest_checkpoint(p.out) if p.cfg.resume else None for p in preps}
    if len(set(steps.values())) > 1:
        raise ValueError(f"runs side by side must resume from the same step: {steps}")
    compiled = cache.step(dataclasses.replace(spec, cells=len(preps)), truncate(first.params, first.cfg.layer_id))
    compiled = compiled.with_cell_settings([p.cfg for p in preps], [p.vectors for p in preps])
    first.since, first.compiling = since, compiled.compile_ahead(first.plan.steps)
    locks = [rundir.lock(p.out) for p in preps]
    try:
        for p in preps:
            write_run_dir(p)
        frozen = jax.device_put(truncate(first.params, first.cfg.layer_id), compiled.params_shardings)
        for p in preps:
            p.params = None
        trained = run_lanes(preps, compiled, frozen, None, True)
    finally:
        for lock in locks:
            lock.release()
    return [t if isinstance(t, RunFailure) else (p.out, t) for p, t in zip(preps, trained)]


def export(model_dir: Path, target: Path, trainable: dict, dtype: str) -> Path:
    """The original checkpoint with the trained tensors swapped in, as a HF directory. Every process
    gathers the trained tensors (they may be sharded over several hosts); process 0 streams the
    export from the source files, the others wait for it."""
    trained = hosts.gather(trainable)
    try:
        if hosts.is_main():
            export_trained(trained, model_dir, target, dtype=dtype, clean_stale=True)  # the run holds the directory's lock
    finally:  # a failed export still releases the processes waiting for it
        hosts.barrier("exported")
    return target
