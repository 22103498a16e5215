"""The run's shape plan: every batch is known before step 0, so a few shapes are chosen up front.

Every distinct batch shape is a new XLA program (tens of seconds on a GPU or TPU for a 7B step). A side's
own shape is its padded length L (its longest row, rounded up to --pad_multiple) and, when the step packs
(armu_jax.packing), its packed slots N per shard. The plan groups the sides' own shapes so that the run
compiles at most `budget` programs: one unlearning-step program per (forget shape, retain shape) pair that
some step uses, and one retain-side program per retain shape (the frozen model's retain activations, the
carry a paired topic's step reuses). Each batch is then padded up to its group's shape: more left padding
(masked out, zero loss weight, as --pad_multiple's) and more packed filler slots (read by nothing), so
every step computes what it computed at its own shape.

The grouping is greedy: starting from one group per own shape, it repeatedly merges the two groups of a
side whose merge removes programs at the least added work per program removed (work: a side's per-token
FLOPs on its tokens plus the attention's on its L x L scores), and last the merge that reaches the budget at
the least added work.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from armu_jax import packing


@dataclass(frozen=True, order=True)
class SideShape:
    """One side's shape on the devices: padded length, and packed slots per shard (0: not packed)."""
    length: int
    slots: int = 0

    def __str__(self) -> str:
        return f"{self.length}" + (f"/{self.slots}" if self.slots else "")


@dataclass(frozen=True, order=True)
class StepShape:
    forget: SideShape
    retain: SideShape

    def __str__(self) -> str:
        return f"forget {self.forget}, retain {self.retain}"


def own_shape(side: dict, shards: int, pack_multiple: int) -> SideShape:
    """A tokenized side's own shape: its padded length, and (packing) the slots its fullest shard needs."""
    length = side["input_ids"].shape[1]
    if not pack_multiple:
        return SideShape(length)
    return SideShape(length, packing.slots_needed(side["attention_mask"], shards, pack_multiple))


@dataclass(frozen=True)
class Costs:
    """Relative work of a side per step: per_token x tokens + attention x rows x L^2 (one layer's FLOPs)."""
    per_token: float
    attention: float
    rows: int
    shards: int

    @classmethod
    def of(cls, model_cfg, rows: int, shards: int) -> "Costs":
        d, heads, kv, hd, m = (model_cfg.hidden_size, model_cfg.num_attention_heads, model_cfg.num_key_value_heads,
                               model_cfg.head_dim, model_cfg.intermediate_size)
        per_token = 2 * (d * hd * (2 * heads + 2 * kv) + 3 * d * m)
        return cls(float(per_token), float(4 * heads * hd), rows, shards)

    def side(self, shape: SideShape) -> float:
        tokens = shape.slots * self.shards if shape.slots else self.rows * shape.length
        return self.per_token * tokens + self.attention * self.rows * shape.length ** 2


@dataclass(frozen=True)
class ShapePlan:
    """Each step's planned shape (steps[i]) and the programs they need."""
    steps: tuple[StepShape, ...]
    own_work: float  # the work of every step at its own shape
    work: float  # at its planned shape

    @property
    def step_shapes(self) -> list[StepShape]:
        return sorted(set(self.steps))

    @property
    def retain_shapes(self) -> list[SideShape]:
        return sorted({s.retain for s in self.steps})

    @property
    def programs(self) -> int:
        return len(self.step_shapes) + len(self.retain_shapes)

    def describe(self) -> str:
        extra = 100 * (self.work / self.own_work - 1) if self.own_work else 0.0
        shapes = "; ".join(f"{s} x{self.steps.count(s)}" for s in self.step_shapes)
        return (f"{len(self.steps)} steps, {self.programs} programs ({len(self.step_shapes)} step shapes, "
                f"{len(self.retain_shapes)} retain) at +{extra:.1f}% work over each batch's own shape "
                f"(lengths/packed slots: {shapes})")


def plan(own: list[tuple[SideShape, SideShape]], costs: Costs, budget: int) -> ShapePlan:
    """The shapes of steps whose own (forget, retain) shapes are `own`, at most `budget` programs (at least
    two: one step shape and its retain side): the greedy grouping's plan with and without the last rule
    (_greedy's `land`), whichever adds less work."""
    return min((_greedy(own, costs, budget, land) for land in (False, True)), key=lambda p: p.work)


def _greedy(own, costs: Costs, budget: int, land: bool) -> ShapePlan:
    forget = _Groups(sorted({f for f, _ in own}), [f for f, _ in own], costs)
    retain = _Groups(sorted({r for _, r in own}), [r for _, r in own], costs)
    count = lambda fg, rg: len(set(zip(fg.tolist(), rg.tolist()))) + len(set(rg.tolist()))
    while count(forget.of_step, retain.of_step) > budget:
        now = count(forget.of_step, retain.of_step)
        best = None
        for side, other, order in ((forget, retain, 0), (retain, forget, 1)):
            for a, b, added in side.candidates():
                merged = np.where(side.of_step == b, a, side.of_step)
                fewer = now - (count(merged, other.of_step) if order == 0 else count(other.of_step, merged))
                if fewer <= 0:
                    continue
                # the least work per program removed; once a merge reaches the budget, the least work among those
                above = not land or now - fewer > budget
                score = (above, added / fewer if above else added)
                if best is None or score < best[0]:
                    best = (score, side, a, b)
        _, side, a, b = best
        side.merge(a, b)
    steps = tuple(StepShape(forget.shape_of(i), retain.shape_of(i)) for i in range(len(own)))
    own_work = sum(costs.side(f) + costs.side(r) for f, r in own)
    work = sum(costs.side(s.forget) + costs.side(s.retain) for s in steps)
    return ShapePlan(steps, own_work, work)


class _Groups:
    """One side's groups of own shapes: a group's shape is the largest of its members in each dimension."""

    def __init__(self, shapes: list[SideShape], per_step: list[SideShape], costs: Costs):
        index = {s: k for k, s in enumerate(shapes)}
        self.costs = costs
        self.shape = {k: s for k, s in enumerate(shapes)}
        self.of_step = np.array([index[s] for s in per_step], np.int64)

    def shape_of(self, step: int) -> SideShape:
        return self.shape[int(self.of_step[step])]

    def candidates(self):
        """(a, b, added work) for every pair of groups (a keeps its id)."""
        ids = sorted(self.shape)
        uses = {k: int(np.sum(self.of_step == k)) for k in ids}
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                union = self._union(self.shape[a], self.shape[b])
                added = sum(uses[k] * (self.costs.side(union) - self.costs.side(self.shape[k])) for k in (a, b))
                yield a, b, added

    def merge(self, a: int, b: int) -> None:
        self.shape[a] = self._union(self.shape[a], self.shape.pop(b))
        self.of_step[self.of_step == b] = a

    @staticmethod
    def _union(x: SideShape, y: SideShape) -> SideShape:
        return SideShape(max(x.length, y.length), max(x.slots, y.slots))


def plan_steps(data, num_steps: int, compiled, model_cfg, budget: int) -> ShapePlan:
    """The plan of a run's steps 0..num_steps-1 (data: data.UnlearningData, every batch tokenized here;
    compiled: the step.CompiledStep that will run them)."""
    own = []
    for step in range(num_steps):
        batch = data.batch(step)
        shape = compiled.own_shape(batch.forget, batch.retain)
        own.append((shape.forget, shape.retain))
    return plan(own, Costs.of(model_cfg, compiled.rows, compiled.shards), budget)
