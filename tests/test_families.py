"""Every family from the one decoder: logits against transformers, a negative control per feature, config
parsing against transformers' own, weights in and out, and one-line refusals."""
import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import tiny_family_model

from armu_jax.errors import UserError
from armu_jax.families import read_model_config
from armu_jax.hf_io import export_hf, load_hf
from armu_jax.model import CausalLM
from armu_jax.params import flatten, unflatten
from armu_jax.sharding import make_mesh, param_shardings

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2")


def _batches(vocab):
    """Left-padded batches longer than the windows (5) and than Phi-3's original context (8, so its long
    factors apply), and one shorter (its short factors)."""
    rng = np.random.default_rng(0)
    out = []
    for length, pads in ((17, (0, 5, 11)), (7, (0, 2, 4))):
        ids = rng.integers(3, vocab, size=(len(pads), length))
        mask = np.ones_like(ids)
        for row, n in enumerate(pads):
            ids[row, :n], mask[row, :n] = 2, 0
        out.append((ids, mask))
    return out


def _hf(model_dir, batches, perturb=False):
    """transformers' float32 logits and hidden states per batch; perturb: every weight one ulp up first (the
    drift float32 rounding alone causes, the unit of the tolerances)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        if perturb:
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
        for ids, mask in batches:
            res = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
            out.append((res.logits.numpy(), [h.numpy() for h in res.hidden_states]))
    return out


def _ours(cfg, params, batches):
    model = CausalLM(cfg)
    return [np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask))) for ids, mask in batches]


def _max_diff(got, want, batches):
    """Max |logit difference| at real tokens (Gemma-2 runs eager attention in transformers, whose left-pad
    positions get outputs from masked scores: only real tokens are comparable across families)."""
    return max(np.abs(g - w)[mask.astype(bool)].max() for g, (w, _), (_, mask) in zip(got, want, batches))


# The feature each negative control switches off, by family: the port must then miss transformers.
CONTROLS = {
    "mistral": [("sliding window", dict(layer_types=()))],
    "qwen2": [("q/k/v biases", dict(biases=())), ("sliding window", dict(layer_types=()))],
    "qwen3": [("per-head q/k norm", dict(qk_norm="none")), ("sliding window", dict(layer_types=()))],
    "gemma2": [("norm offset 1 + w", dict(norm_offset=0.0)), ("embedding scale", dict(scale_embeddings=False)),
               ("query_pre_attn_scalar", dict(query_pre_attn_scalar=None)),
               ("attention soft-cap", dict(attn_logit_softcapping=None)),
               ("final soft-cap", dict(final_logit_softcapping=None)), ("GELU-tanh", dict(activation="silu")),
               ("sandwich norms", dict(layer_norms="pre")), ("alternating windows", dict(layer_types=()))],
    "gemma3_text": [("per-head q/k norm", dict(qk_norm="none")), ("local RoPE base", dict(rope_local=None)),
                    ("layer_types windows", dict(layer_types=()))],
    "phi3": [("partial rotary", "partial"), ("longrope factors", "longrope"), ("sliding window", dict(layer_types=()))],
    "olmo2": [("q/k norm over the projection", dict(qk_norm="none")), ("post-norms only", "sandwich")],
}


def _switched_off(cfg, params, change):
    if isinstance(change, dict):
        return dataclasses.replace(cfg, **change), params
    if change == "partial":  # rotate the whole head (plain RoPE: the factors are for the rotated part only)
        return dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, fraction=1.0, type="default",
                                                                 scaling=(), attention_factor=1.0)), params
    if change == "longrope":
        return dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, type="default", scaling=(),
                                                                 attention_factor=1.0)), params
    # OLMo-2 with Gemma's sandwich: its inputs normalised too (unit norm weights added).
    flat = flatten(params)
    for i in range(cfg.num_hidden_layers):
        for name in ("input_layernorm", "pre_feedforward_layernorm"):
            flat[("model", f"layers_{i}", name, "weight")] = jnp.ones((cfg.hidden_size,))
    return dataclasses.replace(cfg, layer_norms="sandwich"), unflatten(flat)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_logits_match_transformers_and_each_feature_matters(tmp_path, family):
    model_dir = tiny_family_model(tmp_path, family)
    cfg, params = load_hf(model_dir)
    param_shardings(params, make_mesh("fsdp:2"))  # every parameter of the family has a sharding rule
    batches = _batches(cfg.vocab_size)
    want = _hf(model_dir, batches)
    drift = _max_diff([w for w, _ in _hf(model_dir, batches, perturb=True)], want, batches)
    # Tiny models: as the Llama tests, 1e-5 absolute, or 10x transformers' own one-ulp drift if larger.
    tol = max(1e-5, 10 * drift)
    diff = _max_diff(_ours(cfg, params, batches), want, batches)
    print(f"{family}: max |logit diff| {diff:.2e} (one-ulp drift {drift:.2e}, tolerance {tol:.2e})")
    assert diff <= tol
    ids, mask = batches[0]
    h1 = CausalLM(cfg).apply(params, jnp.asarray(ids), jnp.asarray(mask), layer=1,
                                     method=CausalLM.hidden_upto)
    assert np.abs(np.asarray(h1) - want[0][1][2])[mask.astype(bool)].max() <= tol
    for feature, change in CONTROLS[family]:
        off_cfg, off_params = _switched_off(cfg, params, change)
        off = _max_diff(_ours(off_cfg, off_params, batches), want, batches)
        print(f"  without {feature}: {off:.2e}")
        assert off > 10 * tol, f"{family}: switching off {feature} did not change the logits"


def test_families_export_back_and_transformers_reloads_them(tmp_path):
    for family in ("phi3", "qwen2", "gemma3_text"):
        model_dir = tiny_family_model(tmp_path, family)
        cfg, params = load_hf(model_dir)
        out = export_hf(params, model_dir, tmp_path / f"{family}-export")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        original = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        assert type(reloaded) is type(original)
        a, b = original.state_dict(), reloaded.state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), family


def test_fused_rows_load_sharded_over_a_mesh(tmp_path):
    """Phi-3's qkv_proj/gate_up_proj blocks, read block by block onto 4 devices, equal the whole load."""
    model_dir = tiny_family_model(tmp_path, "phi3", hidden_size=64, intermediate_size=96, head_dim=8,
                                  num_attention_heads=8, num_key_value_heads=4,
                                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5, "short_factor": [1.0, 2.0],
                                                   "long_factor": [3.0, 4.0], "original_max_position_embeddings": 8})
    _, whole = load_hf(model_dir)
    _, sharded = load_hf(model_dir, mesh=make_mesh("fsdp:4"))
    for path, value in flatten(whole).items():
        assert np.array_equal(np.asarray(value), np.asarray(flatten(sharded)[path])), path


def _transformers_config(path: Path):
    hf = json.loads((path / "config.json").read_text())
    model_type = hf.pop("model_type")
    hf.pop("architectures", None)
    return transformers.AutoConfig.for_model(model_type, **hf)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "models").iterdir() if p.is_dir()))
def test_shipped_configs_read_as_transformers_reads_them(name):
    """The hub-format config.json (legacy rope_scaling, no layer_types) gives the layer types, window,
    head size and RoPE that transformers' own config class derives."""
    path = ROOT / "configs" / "models" / name
    ours, theirs = read_model_config(path), _transformers_config(path)
    types = [{"full_attention": "full", "sliding_attention": "sliding"}[t]
             for t in (getattr(theirs, "layer_types", None) or ["full_attention"] * theirs.num_hidden_layers)]
    window = getattr(theirs, "sliding_window", None)
    if ours.family in ("mistral", "phi3") and window is not None:
        types = ["sliding"] * theirs.num_hidden_layers
    if window is None:
        types = ["full"] * theirs.num_hidden_layers
    assert [ours.layer_type(i) for i in range(ours.num_hidden_layers)] == types
    assert ours.sliding_window == (window if "sliding" in types else None)
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads)
    rope = theirs.rope_parameters
    rope = rope.get("full_attention", rope)
    assert ours.rope.theta == rope["rope_theta"] and ours.rope.type == rope["rope_type"]
    assert ours.tie_word_embeddings == bool(theirs.tie_word_embeddings)


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, "mixture-of-experts"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}, "mixture-of-experts"),
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "language_model"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "unsupported RoPE type 'yarn'"),
    ({"hidden_act": "relu"}, "activation 'relu' is not supported"),
    ({"layer_types": ["chunked_attention"] * 3}, "layer_types"),
    ({"num_hidden_layers": 0}, "num_hidden_layers is 0"),
])
def test_unsupported_configs_are_refused_naming_the_key(tmp_path, change, message):
    model_dir = tiny_family_model(tmp_path, "qwen2")
    hf = json.loads((model_dir / "config.json").read_text())
    hf.update(change)
    (model_dir / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match=message) as err:
        load_hf(model_dir)
    assert "\n" not in str(err.value)


def test_weights_the_config_does_not_declare_are_refused(tmp_path):
    """Qwen3 with attention biases in the file but attention_bias false in config.json."""
    biased = tiny_family_model(tmp_path, "qwen3", attention_bias=True)
    hf = json.loads((biased / "config.json").read_text())
    hf["attention_bias"] = False
    (biased / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match=r"proj\.bias is not a parameter of this qwen3 config"):
        load_hf(biased)
    shutil.rmtree(biased)
