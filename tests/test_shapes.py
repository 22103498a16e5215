"""The shape plan (armu_jax.shapes): a run compiles the few programs it planned, before step 0, and a batch
padded up to its planned shape computes what it computes at its own."""
import numpy as np
import pytest
from helpers import beyond_bound, read_metrics, run_settings
from safetensors.numpy import load_file

from armu_jax import data as data_module
from armu_jax.config import config_with
from armu_jax.shapes import Costs, SideShape, plan
from armu_jax.train import run

COSTS = Costs(per_token=1e6, attention=2e3, rows=4, shards=1)


def _own(n: int, seed: int) -> list:
    """n steps' own (forget, retain) shapes: lengths and packed slots as a 4-row batch of 128-multiples has."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sides = []
        for top in (6, 4):
            length = 128 * int(rng.integers(1, top + 1))
            sides.append(SideShape(length, 128 * int(rng.integers(length // 128, 4 * length // 128 + 1))))
        out.append(tuple(sides))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_the_plan_keeps_to_its_budget_and_covers_every_batch(seed):
    """Every budget is met; every step's planned side holds its own (length and slots); steps whose sides were
    the same shape still are (a paired topic's retain carry stays reusable); more programs never add work; and a
    budget the own shapes fit in changes nothing."""
    own = _own(60, seed)
    works = []
    for budget in (2, 3, 4, 6, 10):
        p = plan(own, COSTS, budget)
        assert p.programs <= budget and len(p.steps) == len(own)
        for (f, r), shape in zip(own, p.steps):
            assert shape.forget.length >= f.length and shape.forget.slots >= f.slots
            assert shape.retain.length >= r.length and shape.retain.slots >= r.slots
        for (_, a), (_, b), sa, sb in zip(own, own[1:], p.steps, p.steps[1:]):
            assert a != b or sa.retain == sb.retain
        works.append(p.work)
    assert works == sorted(works, reverse=True) and works[-1] >= plan(own, COSTS, 10 ** 6).own_work
    whole = plan(own, COSTS, 10 ** 6)
    assert whole.work == whole.own_work and whole.programs == len({*own}) + len({r for _, r in own})
    one = plan(own, COSTS, 2)
    assert len(one.step_shapes) == 1 and one.step_shapes[0].forget == SideShape(
        max(f.length for f, _ in own), max(f.slots for f, _ in own))


def test_the_plan_keeps_short_and_long_batches_apart():
    """Twenty short and five long forget batches on one retain shape, three programs: the short ones keep a shape
    of their own (one step shape for all would pad every short batch to the long length)."""
    short, long = SideShape(128, 256), SideShape(768, 3072)
    retain = SideShape(256, 512)
    p = plan([(short, retain)] * 20 + [(long, retain)] * 5, COSTS, 3)
    assert {s.forget for s in p.step_shapes} == {short, long} and p.work == p.own_work


def _run(tmp_path, model, name, **settings):
    out = tmp_path / name
    run(config_with(**run_settings(model, max_num_batches=6, log_every=2, forget_max_len=[128], retain_max_len=128,
                                   output_dir=str(out), **settings)))
    return read_metrics(out), load_file(out / "hf" / "model.safetensors")


@pytest.mark.slow
def test_a_run_at_one_planned_shape_is_the_run_at_each_batchs_own(tmp_path, tiny_llama, capsys, monkeypatch):
    """--step_programs=2 (every batch padded up to one shape: more left padding, more packed filler) against a
    budget that keeps every batch at its own shape: the same metrics and trained weights to the mesh runs' bound.
    The planned programs all compile before step 0 (the count in metrics.jsonl does not move during the loop)
    and the summary line counts them. Negative control: padding that the loss reads (weight 1) is off."""
    own = _run(tmp_path, tiny_llama, "own", step_programs=100)
    assert "planned 6 steps" in capsys.readouterr().out
    one = _run(tmp_path, tiny_llama, "one", step_programs=2)
    printed = capsys.readouterr().out
    assert "planned 6 steps, 2 programs (1 step shapes, 1 retain) at +" in printed
    assert "+0.0%" not in printed.split("planned")[1].splitlines()[0]  # the batches' own shapes differ
    assert "(2 of the unlearning step;" in printed
    assert len({m["programs"] for m in one[0]}) == 1  # nothing compiled inside the loop
    assert beyond_bound(one, own) == []
    widen = data_module.widen

    def read_by_the_loss(side, length, pad_id):
        out = widen(side, length, pad_id)
        extra = length - side["weight"].shape[1]
        out["weight"][:, :extra] = 1.0
        return out
    monkeypatch.setattr(data_module, "widen", read_by_the_loss)
    assert ("weights", "model.layers.3.mlp.down_proj.weight") in beyond_bound(
        _run(tmp_path, tiny_llama, "wrong", step_programs=2), own)
