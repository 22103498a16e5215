"""The one output policy (armu_jax.outputs), the process cache and the platform choice."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from armu_jax import outputs
from armu_jax.cache import ProcessCache
from armu_jax.config import config_with
from armu_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_claim_refuses_what_would_overwrite(tmp_path):
    assert outputs.claim(tmp_path / "new") == tmp_path / "new" and not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; pass a directory"):
        outputs.claim(tmp_path / "file")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "eval.json").write_text("{}")
    with pytest.raises(UserError, match="exists and is not empty; choose a new directory"):
        outputs.claim(tmp_path / "used")
    with pytest.raises(UserError, match="eval.json exists; choose a new --output_dir"):
        outputs.claim(tmp_path / "used", ("eval.json",))
    assert outputs.claim(tmp_path / "used", ("norms.json",)) == tmp_path / "used"
    assert outputs.claim(tmp_path / "used", ignore=("eval.json",)) == tmp_path / "used"
    with pytest.raises(UserError, match="--output_dir is required: for the report"):
        outputs.claim(None, purpose="for the report")


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "report.json"
    outputs.write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        outputs.write_json(target, {"a": object()})  # fails half-way through serialising
    assert target.read_text() == '{\n  "a": 1\n}\n'
    outputs.write_npy(tmp_path / "u.npy", np.eye(2, dtype=np.float32))
    assert np.array_equal(np.load(tmp_path / "u.npy"), np.eye(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "u.npy"]  # no temporary left


def test_build_directory_never_leaves_half_a_directory(tmp_path):
    target = tmp_path / "export"

    def failing(tmp):
        (tmp / "part").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        outputs.build_directory(target, failing)
    assert list(tmp_path.iterdir()) == []
    outputs.build_directory(target, lambda tmp: (tmp / "v").write_text("1"))
    with pytest.raises(UserError, match="exists"):
        outputs.build_directory(target, lambda tmp: (tmp / "v").write_text("2"))
    with pytest.raises(OSError):
        outputs.build_directory(target, failing, replace=True)
    assert (target / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    outputs.build_directory(target, lambda tmp: (tmp / "v").write_text("2"), replace=True)
    assert (target / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_save_figure_returns_the_data_drawn(tmp_path):
    fig, ax = outputs.figure()
    ax.plot([0, 1, 2], [3.0, 4.0, 5.0], label="curve")
    ax.bar([0, 1], [7.0, 8.0], label="bars")
    ax.axhline(25, label="chance")
    outputs.errorbars(ax, [0, 1, 2], [0.03, 0.04, 0.05], [(0.02, 0.035), None, (0.045, 0.06)], "C0", "curve", 100)
    ax.set_title("panel")
    drawn = outputs.save_figure(fig, tmp_path / "f.png")
    assert drawn == [{"title": "panel", "lines": {"curve": ([0.0, 1.0, 2.0], [3.0, 4.0, 5.0])},
                      "bars": {"bars": [7.0, 8.0]}, "hlines": {"chance": 25.0},
                      "errorbars": {"curve": [pytest.approx((2.0, 3.5)), pytest.approx((4.5, 6.0))]}}]
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table():
    assert outputs.markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_step_spec_is_the_key_of_the_compiled_step(smollm2_dir):
    """Settings the step is compiled for change the spec (a new compile); the method and its numbers,
    lr included, do not (one compiled step serves every cell of a sweep or trial of a tune over them)."""
    from armu_jax.families import read_model_config
    from armu_jax.sharding import make_mesh
    from armu_jax.step import StepSpec
    model_cfg, mesh = read_model_config(smollm2_dir), make_mesh("data:1")
    spec = lambda **kw: StepSpec.of(config_with(**kw), model_cfg, mesh)
    assert spec() == spec(method="rmu", beta=3.0, alpha=["10"], steering_coeffs=["20"], seed=1, lr=1e-4)
    for changed in (dict(layer_id=6), dict(update_layer_ids=[7]), dict(batch_size=8),
                    dict(adaptive_coeff="per_batch"), dict(norm_skip_first=True), dict(optimizer="adamw"),
                    dict(dtype="bfloat16"), dict(update_params=["mlp.up_proj"]), dict(pack_tokens=False),
                    dict(pad_multiple=64),
                    dict(forget_corpora=["demo:bio"], retain_corpora=["demo:retain"], forget_max_len=["512"])):
        assert spec(**changed) != spec(), changed
    # every field of the spec is read from a setting (or the model and mesh): none is left at a default, but
    # cells, the runs side by side, which the sweep sets from --cells_per_step for each group (train.train_cells)
    assert {f.name for f in dataclasses.fields(StepSpec)} == {
        "model_cfg", "dtype", "layer_id", "update_layer_ids", "update_params", "adaptive_coeff", "norm_skip_first",
        "optimizer", "n_topics", "batch_size", "mesh", "cells", "pack_multiple"}
    assert spec().cells == 1 and spec(mode="sweep", cells_per_step=4, output_dir="runs/x").cells == 1


def test_the_process_cache_builds_each_entry_once():
    cache = ProcessCache()
    calls = []
    for _ in range(3):
        assert cache.get("thing", ("a", 1), lambda: calls.append(1) or "built") == "built"
    assert calls == [1] and cache.built == {"thing": 1}
    assert cache.corpus("demo:bio", 0) is cache.corpus("demo:bio", 0)


def test_a_machine_without_a_tpu_never_initialises_libtpu():
    """libtpu is installed for the compile reports; without JAX_PLATFORMS a CPU machine's process must
    not load it (its warnings, its TPU_WORKER_HOSTNAMES error line, its machine-wide lock)."""
    from armu_jax.runtime import has_gpu, has_tpu
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import armu_jax, os, jax; jax.devices(); print(os.environ.get('JAX_PLATFORMS'), jax.default_backend())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    if not has_tpu() and not has_gpu():
        assert result.stdout.split() == ["cpu", "cpu"]
        assert "TPU" not in result.stderr and "E0000" not in result.stderr, result.stderr
    user = subprocess.run([sys.executable, "-c", "import armu_jax, os; print(os.environ['JAX_PLATFORMS'])"],
                          capture_output=True, text=True, env={**env, "JAX_PLATFORMS": "cpu,tpu"}, timeout=60)
    assert user.stdout.strip() == "cpu,tpu"  # a user's choice is kept


def test_heap_is_trimmed_after_each_compile():
    """release_memory_after_compiles: one trim per XLA compilation (a count only, without glibc), none for a
    call that reuses one, registered once however often it is called."""
    import jax
    import jax.numpy as jnp

    from armu_jax import runtime
    runtime.release_memory_after_compiles()
    runtime.release_memory_after_compiles()
    assert len(runtime._TRIMMING) == 1
    seven, nine = jnp.ones(7), jnp.ones(9)
    before = runtime.trims[0]
    fn = jax.jit(lambda x: jnp.sin(x) * 3.25 + 1.0)
    fn(seven)
    fn(seven)
    assert runtime.trims[0] == before + 1
    fn(nine)  # a new shape: a new compilation
    assert runtime.trims[0] == before + 2
