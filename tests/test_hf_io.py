"""HF checkpoints in and out: round trips, atomic exports, and the refusals."""
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers import tiny_hf_model
from safetensors.numpy import load_file

from armu_jax.errors import UserError
from armu_jax.families import read_model_config
from armu_jax.hf_io import export_hf, export_trained, load_hf
from armu_jax.params import flatten, name_of
from armu_jax.sharding import make_mesh, param_shardings


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_identical(tmp_path, tied):
    src = tiny_hf_model(tmp_path, "llama", 2, tied)
    _, params = load_hf(src)
    out = export_hf(params, src, tmp_path / "export")
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert ("lm_head.weight" in after) == (not tied)

    ids = torch.randint(3, 131, (2, 9))
    original = transformers.AutoModelForCausalLM.from_pretrained(src)
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert exported.config.tie_word_embeddings == tied
    with torch.no_grad():
        assert torch.equal(original(ids).logits, exported(ids).logits)


def test_export_dtype_and_refusal(tmp_path):
    src = tiny_hf_model(tmp_path, "mistral", 1)
    _, params = load_hf(src)
    out = export_hf(params, src, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    marker = (out / "config.json").read_text()
    with pytest.raises(UserError, match="exists and is not empty"):
        export_hf(params, src, out)
    assert (out / "config.json").read_text() == marker
    export_hf(params, src, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bf16")]


def test_sharded_index_loads(tmp_path):
    src = tiny_hf_model(tmp_path, "llama", 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    _, a = load_hf(src)
    _, b = load_hf(sharded)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_load_onto_a_mesh_places_shards_from_the_file(tmp_path):
    src = tiny_hf_model(tmp_path, "llama", 2, vocab=132)  # vocab and hidden divide over fsdp:4
    _, plain = load_hf(src, upto_layer=1)
    mesh = make_mesh("data:2,fsdp:4")
    _, placed = load_hf(src, upto_layer=1, mesh=mesh)
    assert jax.tree.structure(plain) == jax.tree.structure(placed)
    for a, b, want in zip(jax.tree.leaves(plain), jax.tree.leaves(placed),
                          jax.tree.leaves(param_shardings(placed, mesh))):
        assert b.sharding == want and np.array_equal(np.asarray(a), np.asarray(b))
    embedding = placed["params"]["model"]["embed_tokens"]["embedding"]
    assert {s.data.shape for s in embedding.addressable_shards} == {(33, 60)}  # each device: its quarter
    assert "layers_2" not in placed["params"]["model"]  # layers above 1 are never read


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_export_keeps_the_source_layout(tmp_path, dtype):
    src = tiny_hf_model(tmp_path, "llama", 2)
    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="20KB")
    _, params = load_hf(sharded)
    rng = np.random.default_rng(0)
    trained = {name_of(path): rng.standard_normal(value.shape).astype(np.float32)
               for path, value in flatten(params).items() if path[-2:] == ("down_proj", "kernel")}
    out = export_trained(trained, sharded, tmp_path / "export", dtype=dtype)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    source_index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == source_index["weight_map"]  # same files, same tensors in each
    assert index["metadata"]["total_size"] == sum(
        (4 if dtype == "float32" else 2) * np.asarray(v).size for v in flatten(params).values())
    _, back = load_hf(out)
    for path, value in flatten(back).items():
        want = trained.get(name_of(path), np.asarray(flatten(params)[path]))
        want = np.asarray(jax.numpy.asarray(want).astype(dtype).astype(np.float32))
        assert np.array_equal(np.asarray(value, np.float32), want), path
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    weight = exported.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
    assert np.array_equal(weight, np.asarray(jax.numpy.asarray(trained["model/layers_1/mlp/down_proj/kernel"].T)
                                             .astype(dtype).astype(np.float32)))


def test_bad_model_directories(tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    src = tiny_hf_model(tmp_path, "llama", 2)
    (pickled / "config.json").write_text((src / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match="only pickle weights.*safetensors only"):
        load_hf(pickled)

    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((src / "config.json").read_text())
    # A supported architecture naming remote code (Phi-3.5's hub config does) is read with the native
    # port and never runs that code; an unknown model type with remote code is refused.
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    assert read_model_config(remote).family == "llama"
    (remote / "config.json").write_text(json.dumps({**config, "model_type": "custom", "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(UserError, match="remote code"):
        load_hf(remote)

    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_hf(other)
