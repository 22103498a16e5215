"""What the runs of one process share, keyed by the specs they are built for.

A standalone command makes one ProcessCache; a sweep passes its one to every cell, and the
attack mode to every relearning run, so nothing is loaded, tokenized or compiled twice: the
model's params, tokenizers, corpora, tokenized batches (data.DataSpec), compiled unlearning
steps (step.StepSpec), scorers (evaluate.EvalSpec) and relearning programs (attack.RelearnSpec,
which attack.py keeps here with get("relearn", ...): the cache imports no mode). The keys are the
frozen specs themselves, so a setting a builder reads is in its key by construction; nothing is
cached at module level.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from armu_jax import storage
from armu_jax.data import UnlearningData, load_tokenizer, read_corpus
from armu_jax.evaluate import build_scorer
from armu_jax.hf_io import load_hf
from armu_jax.model import parse_dtype
from armu_jax.shapes import plan_steps
from armu_jax.step import build_step


class ProcessCache:
    """keep_full: load each model whole once (a sweep evaluates every cell on it) instead of layers
    0..l per run."""

    def __init__(self, keep_full: bool = False):
        self.keep_full = keep_full
        self._entries: dict = {}
        self.built: dict[str, int] = {}  # kind -> how many entries were built (the tests check it)

    def get(self, kind: str, key, build):
        """The entry (kind, key), built by build() the first time."""
        if (kind, key) not in self._entries:
            self._entries[kind, key] = build()
            self.built[kind] = self.built.get(kind, 0) + 1
        return self._entries[kind, key]

    def params(self, model_dir: Path, dtype: str, mesh, upto_layer: int | None = None):
        """load_hf's params of layers 0..upto_layer (all: None, or keep_full), each tensor on its shards;
        only whole models are kept."""
        if self.keep_full or upto_layer is None:
            return self.get("params", (str(model_dir), dtype, mesh),
                            lambda: load_hf(model_dir, parse_dtype(dtype), mesh=mesh)[1])
        return load_hf(model_dir, parse_dtype(dtype), upto_layer=upto_layer, mesh=mesh)[1]

    @contextmanager
    def whole_model(self, model_dir: Path, dtype: str, mesh):
        """params(model_dir) for a block: kept after it only if the cache held them before (the attack mode holds
        one model at a time unless its caller keeps both)."""
        key = ("params", (str(model_dir), dtype, mesh))
        held = key in self._entries
        try:
            yield self.params(model_dir, dtype, mesh)
        finally:
            if not held:
                self._entries.pop(key, None)

    def tokenizer(self, model_dir: Path):
        return self.get("tokenizer", str(model_dir), lambda: load_tokenizer(model_dir))

    def corpus(self, spec: str, min_len: int) -> list[str]:
        return self.get("corpus", (spec, min_len), lambda: read_corpus(spec, min_len))

    def data(self, spec):
        """UnlearningData of a data.DataSpec (its batches tokenized once, on first use)."""
        return self.get("data", spec, lambda: UnlearningData.from_spec(spec, self.tokenizer(storage.path(spec.model_dir)),
                                                                        self.corpus))

    def step(self, spec, frozen):
        """The compiled unlearning step of a step.StepSpec (without a run's settings)."""
        return self.get("step", spec, lambda: build_step(spec, frozen))

    def plan(self, data, num_steps: int, compiled, model_cfg, budget: int):
        """shapes.plan_steps of a run's batches (data: the cached UnlearningData of its DataSpec), planned once
        for every run on the same batches and step layout."""
        key = (id(data), num_steps, compiled.rows, compiled.shards, compiled.pack_multiple, model_cfg, budget)
        return self.get("plan", key, lambda: plan_steps(data, num_steps, compiled, model_cfg, budget))

    def scorer(self, spec):
        """The Scorer of an evaluate.EvalSpec."""
        return self.get("scorer", spec, lambda: build_scorer(spec, self.tokenizer(storage.path(spec.model_dir))))
