"""HF checkpoints in and out: round trips, atomic exports, and the refusals."""
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from armu_jax.errors import UserError
from armu_jax.hf_io import export_hf, load_hf
from helpers import tiny_hf_model


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
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(UserError, match="remote code"):
        load_hf(remote)

    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_hf(other)
