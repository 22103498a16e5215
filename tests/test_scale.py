"""The shipped 7B/8B flagfiles compile on their mesh and fit a device: the step is lowered and
compiled ahead of time on abstract parameters of the real shapes (nothing is allocated), and
XLA's memory analysis of the partitioned program gives the bytes per device."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from armu_jax import sharding
from armu_jax.config import define_flags, from_flags
from armu_jax.hf_io import parse_dtype
from armu_jax.model import LlamaForCausalLM
from armu_jax.model_config import ModelConfig
from armu_jax.optimizer import make_optimizer
from armu_jax.step import StepSpec, init_state, make_step, trainable_paths, truncate_params

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
# The published configs (config.json) of the two models, shapes only.
ZEPHYR_7B = {"architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
             "tie_word_embeddings": False}
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False}
# zephyr7b_wmdp_rmu.flags differs from the adaptive one only in how c is set: same shapes, same program size.
CASES = {"zephyr7b_wmdp_adaptive.flags": ZEPHYR_7B, "llama3_8b_wmdp_adaptive.flags": LLAMA3_8B}


def _config(flagfile: Path):
    define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", f"--flagfile={flagfile}"])
    cfg = from_flags()
    flags.FLAGS.unparse_flags()
    return cfg


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@pytest.mark.parametrize("name", sorted(CASES))
def test_big_flagfile_compiles_and_fits(name):
    cfg = _config(ROOT / "configs" / name)
    model_cfg = ModelConfig.from_hf_dict(CASES[name])
    dtype = parse_dtype(cfg.dtype)
    model = LlamaForCausalLM(model_cfg, dtype=dtype, param_dtype=dtype)
    full = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    frozen = truncate_params(full, cfg.layer_id)
    paths = trainable_paths(frozen, cfg.update_layer_ids, cfg.update_params)
    mesh = sharding.make_mesh(cfg.mesh)
    params_sh = sharding.param_shardings(frozen, mesh)
    optimizer = make_optimizer(cfg.optimizer, cfg.lr)
    abstract_state = jax.eval_shape(lambda p: init_state(p, paths, optimizer, cfg.n_topics), frozen)
    state_sh = sharding.tree_shardings_by_path(abstract_state, mesh)
    batch_sh = sharding.batch_sharding(mesh, cfg.batch_size)
    repl = sharding.replicated(mesh)

    def side(length):
        shape = (cfg.batch_size, -(-length // cfg.pad_multiple) * cfg.pad_multiple)
        return {"input_ids": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh),
                "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh),
                "positions": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh),
                "weight": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sh)}

    batch = {"topic": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
             "forget": side(max(cfg.forget_max_len)), "retain": side(cfg.retain_max_len)}
    vectors = np.ones((cfg.n_topics, model_cfg.hidden_size), np.float32) / np.sqrt(model_cfg.hidden_size)
    spec = StepSpec(model, cfg.layer_id, min(cfg.update_layer_ids), cfg.method, cfg.adaptive_coeff, cfg.beta,
                    cfg.steering_coeffs, cfg.alpha, cfg.norm_skip_first)
    batch_tree_sh = {"topic": repl, "forget": batch_sh, "retain": batch_sh}
    step = jax.jit(make_step(spec, optimizer, vectors), in_shardings=(state_sh, params_sh, batch_tree_sh),
                   out_shardings=(state_sh, repl), donate_argnums=0)
    with jax.set_mesh(mesh):
        compiled = step.lower(_abstract(abstract_state, state_sh), _abstract(frozen, params_sh), batch).compile()
    mem = compiled.memory_analysis()
    per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                  - mem.alias_size_in_bytes)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    expected_args = n_params * jnp.dtype(dtype).itemsize / mesh.size  # params sharded over the mesh
    print(f"{name}: mesh {dict(mesh.shape)}, layers 0..{cfg.layer_id} = {n_params / 1e9:.2f}B params; per device: "
          f"arguments {mem.argument_size_in_bytes / GIB:.2f} GiB, temporaries {mem.temp_size_in_bytes / GIB:.2f} GiB, "
          f"total {per_device / GIB:.2f} GiB")
    # The frozen params are sharded (fsdp), not replicated, and the whole step fits a 40 GB device.
    assert mem.argument_size_in_bytes <= 1.5 * expected_args + 2 * GIB
    assert per_device <= 40 * GIB
