"""The sharding table and the train-state shardings: every leaf has a rule, or it is an error."""
import jax
import jax.numpy as jnp
import pytest
from helpers import ZEPHYR_7B

from armu_jax import sharding
from armu_jax.compile_report import abstract_step
from armu_jax.config import config_with, flagfile_text, from_flagfile
from armu_jax.errors import UserError
from armu_jax.families import model_config_of


def _abstract_step(mesh_spec: str):
    model_cfg = model_config_of({**ZEPHYR_7B, "num_hidden_layers": 4, "vocab_size": 512})
    return abstract_step(config_with(layer_id=3, mesh=mesh_spec), model_cfg)[0]


def test_state_is_sharded_like_its_parameters():
    step = _abstract_step("data:2,fsdp:4")
    names = step.trainable
    assert names == ("model/layers_1/mlp/down_proj/kernel", "model/layers_2/mlp/down_proj/kernel",
                     "model/layers_3/mlp/down_proj/kernel")
    for name in names:  # the trainable copy and both Adam moments: rows (the kernel's input dim) over fsdp
        for leaf in (step.state_shardings["trainable"][name], step.state_shardings["opt_state"].mu[name],
                     step.state_shardings["opt_state"].nu[name]):
            assert leaf.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert step.state_shardings["coeffs"].spec == jax.sharding.PartitionSpec()
    assert step.rows == 8  # batch 4 padded to data x fsdp = 8 rows


def test_a_leaf_without_a_rule_is_an_error():
    step = _abstract_step("fsdp:2")
    state = {**step.abstract_state, "extra": jax.ShapeDtypeStruct((3, 4), jnp.float32)}
    with pytest.raises(UserError, match="train-state leaf extra .* has no sharding rule"):
        sharding.state_shardings(state, step.mesh, step.trainable)
    with pytest.raises(UserError, match="parameter model/layers_0/mlp/new_proj/kernel matches no sharding rule"):
        sharding.param_spec("model/layers_0/mlp/new_proj/kernel", (8, 8), step.mesh)


def test_settings_round_trip_through_a_flagfile(tmp_path):
    cfg = config_with(layer_id=9, alpha=[100, 200], forget_max_len=[64], update_params=["mlp.up_proj"],
                      norm_skip_first=True, output_dir=str(tmp_path / "run"))
    (tmp_path / "run.flags").write_text(flagfile_text(cfg))
    assert from_flagfile(tmp_path / "run.flags") == cfg
    assert cfg.alpha == (100.0, 200.0) and cfg.forget_max_len == (64, 64) and cfg.update_layer_ids == (7, 8, 9)
    with pytest.raises(UserError, match="unknown setting 'layer'"):
        config_with(layer=3)
