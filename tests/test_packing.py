"""Real tokens only (armu_jax.packing): the layouts, their gradients, and a run packed against one padded."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import beyond_bound, read_metrics, run_settings
from safetensors.numpy import load_file, save_file

from armu_jax import packing
from armu_jax.config import config_with
from armu_jax.data import load_tokenizer
from armu_jax.train import run

PAD = 7


def _side(lengths, length=6, rows=4):
    """A left-padded side: row r holds lengths[r] real tokens (ids 100 + 10 r + i) after PAD ids."""
    ids = np.full((rows, length), PAD, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for r, n in enumerate(lengths):
        if n:
            ids[r, -n:], mask[r, -n:] = 100 + 10 * r + np.arange(n), 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32) - 2, (rows, length)).copy()
    return {"input_ids": ids, "attention_mask": mask, "positions": positions}


def test_layout_packs_each_shards_real_tokens_and_one_pad_token():
    side = _side([6, 2, 0, 3])  # a full row, two padded, an empty one; 2 shards of 2 rows
    lay = packing.layout(side, shards=2, multiple=4)
    # shard 0: 8 real + the pad token = 9 slots; shard 1: 3 real + pad = 4; rounded up to 12
    assert lay["ids"].shape == (2, 12)
    assert lay["ids"][0, :9].tolist() == [100, 101, 102, 103, 104, 105, 110, 111, PAD]
    assert lay["ids"][1, :4].tolist() == [130, 131, 132, PAD]
    assert lay["pad_token"][0].tolist() == [0] * 8 + [1] + [0] * 3
    assert lay["positions"][0, :8].tolist() == [-2, -1, 0, 1, 2, 3, 2, 3]  # each token keeps its padded position
    # every padded position maps to its token's slot; every pad position to the pad token's
    flat_ids = side["input_ids"].reshape(2, 12)
    assert (np.take_along_axis(lay["ids"], lay["to_padded"], axis=1) == flat_ids).all()
    # a shard without pads has no pad token, and a batch of full rows needs no more slots than tokens
    full = packing.layout(_side([6, 6, 6, 6]), shards=2, multiple=4)
    assert full["ids"].shape == (2, 12) and full["pad_token"].sum() == 0
    assert packing.max_packed_length(4, 6, 2, 4) == 12


def test_unpack_and_pack_give_the_padded_values_and_their_gradients():
    """unpack(per-token values of the packed ids) = the same per-token function of the padded ids, and both
    custom gradients equal autodiff through plain gathers (a scatter-add), pad positions summed into the pad
    token."""
    side = _side([6, 2, 0, 3])
    lay = packing.layout(side, shards=2, multiple=4)
    table = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
    padded = packing.unpack(jnp.asarray(table[lay["ids"]]), lay, rows=4)
    np.testing.assert_array_equal(padded, table[side["input_ids"]])

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 12, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    plain_unpack = lambda x: jax.vmap(lambda a, i: a[i])(x, lay["to_padded"]).reshape(4, 6, 3)
    # Gradients of gathers: each entry a sum of at most 4 products of normal(0, 1) numbers (a pad token's
    # gradient sums its pad positions), so two orders of summation differ by a few ulps of ~1 (<= 1e-6);
    # a wrong index moves an entry by ~1.
    got = jax.grad(lambda x: jnp.sum(w * packing.unpack(x, lay, rows=4)))(x)
    want = jax.grad(lambda x: jnp.sum(w * plain_unpack(x)))(x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(got[0, 8]).sum()) > 0  # the pad token's gradient: its pad positions' sum

    # pad_grad=False drops exactly the pad positions' part (for callers whose pad gradient is zero)
    real = jnp.asarray(side["attention_mask"][..., None], jnp.float32)
    no_pads = jax.grad(lambda x: jnp.sum(w * packing.unpack(x, lay, rows=4, pad_grad=False)))(x)
    np.testing.assert_allclose(no_pads, jax.grad(lambda x: jnp.sum(w * real * plain_unpack(x)))(x), rtol=1e-6,
                               atol=1e-6)

    y = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 12, 3)), jnp.float32)
    packed = packing.pack(y, lay)
    np.testing.assert_array_equal(packed[0, :8], np.asarray(y).reshape(2, 12, 3)[0][side["attention_mask"][:2].reshape(-1) == 1])
    assert float(jnp.abs(packed[0, 8:]).sum()) == 0  # the pad token and filler get zeros
    plain_pack = lambda y: jax.vmap(lambda a, i: a[i])(
        jnp.concatenate([y.reshape(2, 12, 3), jnp.zeros((2, 1, 3))], axis=1), lay["to_packed"])
    np.testing.assert_allclose(jax.grad(lambda y: jnp.sum(v * packing.pack(y, lay)))(y),
                               jax.grad(lambda y: jnp.sum(v * plain_pack(y)))(y), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_a_packed_run_matches_the_padded_run(tmp_path, tiny_llama, monkeypatch):
    """--pack_tokens (the default) against --pack_tokens=false, reference loss (pads in the MSE), on one device
    and on data:2,fsdp:4 (each of the 8 shards packs its own row): every logged metric and the trained weights
    agree to the bound test_run.py holds mesh runs to (float32 rounding of differently shaped products).
    Negative control: a packed run whose loss drops the pad positions' gradient (pad_grad=False) is off.
    The tiny Llama's pad row of the embedding is zero (HF's padding_idx init), which would make every pad
    position's state zero and its gradient nothing: here that row is set, as a trained model's is."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    weights = load_file(model / "model.safetensors")
    pad = load_tokenizer(model).pad_token_id
    embed = weights["model.embed_tokens.weight"]
    assert not embed[pad].any()
    embed[pad] = np.random.default_rng(0).normal(0, embed.std(), embed.shape[1])
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})

    def one(name, **settings):
        out = tmp_path / name
        # texts of up to 128 tokens: 23% of the demo batches' positions are pads (none at run_settings' 32); one
        # planned step shape per run (--step_programs=2: the step and the retain side), test_shapes covers the plan
        run(config_with(**run_settings(model, max_num_batches=6, log_every=2, forget_max_len=[128],
                                       retain_max_len=128, step_programs=2, output_dir=str(out),
                                       **settings)))
        return read_metrics(out), load_file(out / "hf" / "model.safetensors")

    padded = one("padded", pack_tokens=False)
    assert any("forget_cosine" in m for m in padded[0])  # the diagnostic steps compared too
    assert beyond_bound(one("packed"), padded) == []
    assert beyond_bound(one("packed_mesh", mesh="data:2,fsdp:4"), padded) == []
    unpack = packing.unpack
    monkeypatch.setattr(packing, "unpack", lambda x, lay, rows, pad_grad=True: unpack(x, lay, rows, pad_grad=False))
    assert ("weights", "model.layers.3.mlp.down_proj.weight") in beyond_bound(one("no_pad_grad"), padded)
