"""The Flax port against Hugging Face transformers: logits, hidden states, partial forwards."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import tiny_hf_model

from armu_jax import model as model_lib
from armu_jax.hf_io import load_hf
from armu_jax.model import CausalLM, attend, query_chunks

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _hf_logits(model_dir, ids, mask, perturb=False):
    """transformers' float32 logits and hidden states; perturb: every weight one ulp up first (the
    smallest change of the inputs, to measure how far float32 rounding alone moves the logits)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        if perturb:
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


# The tiny models' logits are about 1 in size (max |logit| 0.54-1.11) and their float32 forward differs from
# transformers' by 1.8e-7 to 3.6e-7 (2-3 ulps of 1.0; llama kv2 tied, mistral kv6 tied, llama3 rope, measured
# on this machine), layer 1's hidden state by 2.2e-8 of 0.12. Another CPU's rounding adds a few ulps. TOL is
# ~30x the measured drift: it passes any CPU's rounding, and a real error fails it by orders of magnitude
# (test_families.py's negative controls: each feature switched off must exceed 10x this bound, and does).
TOL = 1e-5


def _batch(rng, vocab, length=17, pad_rows=(0, 5, 11)):
    ids = rng.integers(3, vocab, size=(len(pad_rows), length))
    mask = np.ones_like(ids)
    for row, pads in enumerate(pad_rows):  # left padding with pad = eos = 2
        ids[row, :pads] = 2
        mask[row, :pads] = 0
    return ids, mask


@pytest.mark.parametrize("arch,kv_heads,tied,rope", [
    ("llama", 1, False, None), ("llama", 2, True, None), ("llama", 6, False, None),
    ("llama", 2, False, LLAMA3_ROPE), ("mistral", 1, False, None), ("mistral", 2, False, None),
    ("mistral", 6, True, None),
])
def test_logits_match_hf(tmp_path, arch, kv_heads, tied, rope):
    model_dir = tiny_hf_model(tmp_path, arch, kv_heads, tied, rope)
    cfg, params = load_hf(model_dir)
    model = CausalLM(cfg)
    ids, mask = _batch(np.random.default_rng(0), cfg.vocab_size)
    want, hidden = _hf_logits(model_dir, ids, mask)
    got = np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(got - want)[real].max() <= TOL
    # Pad positions too (HF SDPA gives them a zero attention output): the reference loss sees them.
    assert np.abs(got - want).max() <= TOL
    h1 = model.apply(params, jnp.asarray(ids), jnp.asarray(mask), layer=1, method=CausalLM.hidden_upto)
    assert np.abs(np.asarray(h1) - hidden[2]).max() <= TOL


@pytest.mark.parametrize("arch,length", [("llama", 150), ("mistral", 200)])
def test_long_rows_match_hf(tmp_path, monkeypatch, arch, length):
    """Rows split into query blocks by attend() (blocks of 64 here: 2 at 150, 3 at 200; Mistral's 64-token
    window shorter than the rows), heavily left-padded (one row with a single real token): HF's logits."""
    monkeypatch.setattr(model_lib, "MIN_QUERY_BLOCK", 64)
    assert query_chunks(length) > 1
    model_dir = tiny_hf_model(tmp_path, arch, 2)
    cfg, params = load_hf(model_dir)
    ids, mask = _batch(np.random.default_rng(1), cfg.vocab_size, length, pad_rows=(0, 70, length - 1))
    want, _ = _hf_logits(model_dir, ids, mask)
    got = np.asarray(jax.jit(CausalLM(cfg).apply)(params, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(got - want).max() <= TOL


@pytest.mark.slow
def test_attend_blocks_equal_one_block():
    """attend() with the queries split into 2, 3, 4 blocks against one block: outputs and the gradients of
    q, k, v, left padding and an all-pad row included, within 4x what a one-ulp change of q moves them."""
    rng = np.random.default_rng(0)
    batch, kv, groups, length, hd = 3, 2, 3, 130, 8
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
               [(batch, kv, groups, length, hd), (batch, kv, length, hd), (batch, kv, length, hd)])
    real = np.arange(length)[None, :] >= np.array([0, 57, length])[:, None]  # pads first; the last row all pad
    allowed = jnp.asarray(np.tril(np.ones((length, length), bool))[None] & real[:, None, :])
    weights = jnp.asarray(rng.normal(size=(batch, kv, groups, length, hd)), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)  # one program per block count (op by op took 20 s)
    def run(chunks, q):
        def loss(q, k, v):
            out = attend(q, k, v, allowed, scale=3.0, chunks=chunks)
            return jnp.sum(out * weights), out
        grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    def outputs(chunks, q):
        out, grads = run(chunks, q)
        return [np.asarray(out), *map(np.asarray, grads)]

    want = outputs(1, q)
    drift = [np.abs(a - b).max() for a, b in zip(outputs(1, jnp.nextafter(q, jnp.inf)), want)]
    assert min(drift) > 0
    assert np.all(want[0][2] == 0) and np.all(want[1][2] == 0)  # no visible key: no output, no gradient
    for chunks in (2, 3, 4):
        got = outputs(chunks, q)
        for name, a, b, bound in zip(("output", "dq", "dk", "dv"), got, want, drift):
            assert np.abs(a - b).max() <= 4 * bound, (chunks, name, np.abs(a - b).max(), bound)


@pytest.mark.reference
def test_smollm2_matches_transformers(smollm2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    sentences = ["The mitochondrion is the powerhouse of the cell.",
                 "Alan Turing proposed a test of machine intelligence in 1950.",
                 "Paris is the capital of France."]
    enc = tokenizer(sentences, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    want, hidden = _hf_logits(smollm2_dir, ids, mask)
    real = mask.astype(bool)
    # SmolLM2's residual stream reaches 2.5e4 on first tokens and logits reach 40, so float32
    # rounding alone moves its logits: weights one ulp apart move them by `drift` (6.8e-5 on the
    # test machine; transformers' own eager and SDPA paths differ by 8e-5). Tolerances are
    # multiples of that drift, measured here, so they hold on any CPU model.
    drift = np.abs(_hf_logits(smollm2_dir, ids, mask, perturb=True)[0] - want)[real].max()
    cfg, params = load_hf(smollm2_dir)
    model = CausalLM(cfg)
    got = np.asarray(jax.jit(model.apply)(params, ids, mask))
    diff = np.abs(got - want)[real].max()
    print(f"SmolLM2 max |logit diff| (float32, real tokens) = {diff:.2e}, one-ulp drift {drift:.2e}")
    # XLA's CPU dot accumulates long contractions less accurately than torch's: 2x the drift here.
    assert diff <= 4 * drift
    # With blocked float32 accumulation in the dense layers the port is as close to transformers as
    # transformers is to itself under a one-ulp change (1.25x here, 1.5x with a baseline-ISA XLA).
    blocked = CausalLM(cfg, dot_block=64)
    got_blocked = np.asarray(jax.jit(blocked.apply)(params, ids, mask))
    diff_blocked = np.abs(got_blocked - want)[real].max()
    print(f"SmolLM2 max |logit diff| with dot_block=64 = {diff_blocked:.2e}")
    assert diff_blocked <= 2 * drift

    layer7 = model.apply(params, ids, mask, layer=7, method=CausalLM.hidden_upto)
    # The residual stream reaches ~840 at layer 7: float32 agreement is relative to that scale; 2e-6 of it is
    # ~17 ulps of the largest entry after 8 layers whose sums of 576 terms each round (a few ulps per layer).
    assert np.abs(np.asarray(layer7) - hidden[8]).max() <= 2e-6 * np.abs(hidden[8]).max()

    # Layers 0..4, then 5..7 from that residual stream, equals the direct layer-7 output: the same operations
    # in two programs, which XLA may fuse differently (a few ulps: 1e-6 of the scale is ~8 ulps).
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    prefix = model.apply(params, ids, mask, layer=4, method=CausalLM.hidden_upto)
    resumed = model.apply(params, prefix, mask, positions, start=5, end=7, method=CausalLM.run_layers)
    assert np.abs(np.asarray(resumed) - np.asarray(layer7)).max() <= 1e-6 * np.abs(hidden[8]).max()

    # capture_intermediates filtered to one layer gives the same tensor.
    _, state = model.apply(params, ids, mask, capture_intermediates=lambda mdl, method: (
        mdl.path == ("model", "layers_7") and method == "__call__"), mutable=["intermediates"])
    captured = state["intermediates"]["model"]["layers_7"]["__call__"][0]
    assert np.abs(np.asarray(captured) - np.asarray(layer7)).max() == 0.0

    # bfloat16 params and compute stay close to float32 (relative to the logit scale).
    _, params16 = load_hf(smollm2_dir, jnp.bfloat16)
    model16 = CausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    got16 = np.asarray(jax.jit(model16.apply)(params16, ids, mask))
    rel = np.abs(got16 - got)[real].mean() / np.abs(got)[real].mean()
    top1 = (got16.argmax(-1) == got.argmax(-1))[real].mean()
    print(f"bf16 vs f32: mean rel logit diff {rel:.3f}, top-1 agreement {top1:.3f}")
    assert rel <= 0.05 and top1 >= 0.9
