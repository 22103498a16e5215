"""Gemma-3-270M, the second embedded model: the Flax port against transformers on its real weights.

Logits and every layer's residual stream, on texts of 11, 48 and 96 tokens (left-padded into one batch)
and on one of 600 tokens, longer than the 512-token sliding window: from position 512 on, the sliding
layers (five of every six) see only the last 512 tokens while the full layers see them all. Then the
port with one Gemma feature changed must miss the same bound (negative controls).

The bound is measured, not guessed: every weight of the port one ulp up moves its float32 outputs by
`drift` (per batch: the logits' max |difference| and, per layer, the largest relative change of a
token's residual stream, ||dh|| / ||h||; Gemma's first token reaches |h| ~ 1e5 while the others stay
near 3e3, so a plain max |difference| would only see the first token). Measured on the test machine:
logits 4.6e-5 from transformers' on the short texts and 1.1e-4 on the long one (largest |logit| 35-38),
1.0x and 2.0x the drift; layers up to 1.7x and 3.1x theirs (transformers' own one-ulp drift of the
logits is 0.7-0.9x the port's). SLACK = 10 leaves room for another CPU's rounding; the mildest
control, the window one token wider, moves the long text's logits by ~3000x the drift.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from armu_jax import shipped
from armu_jax.data import load_tokenizer
from armu_jax.errors import UserError
from armu_jax.hf_io import load_hf
from armu_jax.model import CausalLM, DecoderLayer, _defaults
from armu_jax.shipped import resolve_model, wiki_summaries_path

pytestmark = pytest.mark.reference

SHORT, LONG = (11, 48, 96), 600
KEEP = 64  # the long text's logits are compared at its last 64 positions (536..599: all past the window)
SLACK = 10


def _left_pad(rows, pad_id):
    length = max(map(len, rows))
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, length - len(row):], mask[r, length - len(row):] = row, 1
    return ids, mask


def _batches(model_dir):
    """(ids, mask, keep): the short texts (every logit compared), then the long one (the last KEEP)."""
    tokenizer = load_tokenizer(model_dir)
    wiki = json.loads(wiki_summaries_path().read_text())
    extracts = [wiki[title]["extract"] for title in sorted(wiki)]
    texts = ["The mitochondrion is the powerhouse of the cell.", extracts[0], " ".join(extracts[1:4])]
    short = [list(tokenizer(text)["input_ids"])[:n] for text, n in zip(texts, SHORT)]
    long = [list(tokenizer(" ".join(extracts[10:40]))["input_ids"])[:LONG]]
    assert [len(row) for row in short] == list(SHORT) and len(long[0]) == LONG
    assert all(row[0] == 2 for row in short + long)  # Gemma's <bos> first, as the tokenizer adds it
    return [(*_left_pad(short, tokenizer.pad_token_id), None), (*_left_pad(long, tokenizer.pad_token_id), KEEP)]


def _transformers(model_dir, batches):
    """Per batch: float32 logits (the last `keep` positions) and hidden states after each layer (the
    last one after the final norm)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for ids, mask, keep in batches:
            res = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True,
                        logits_to_keep=keep or 0)
            out.append((res.logits.numpy(), [h.numpy() for h in res.hidden_states[1:]]))
    return out


def _port(cfg):
    """The port's forward as transformers' above (one compile per batch shape, reused for other params)."""
    model = CausalLM(cfg)

    def forward(module, ids, mask, keep):
        mask, positions = _defaults(ids, mask, None)
        h = module.model(ids, mask, positions)
        return module._head(h if keep is None else h[:, -keep:]), h

    def run(params, ids, mask, keep):
        (logits, final), state = model.apply(
            params, ids, mask, keep, method=forward, mutable=["intermediates"],
            capture_intermediates=lambda mdl, method: isinstance(mdl, DecoderLayer) and method == "__call__")
        layers = state["intermediates"]["model"]
        return logits, [layers[f"layers_{i}"]["__call__"][0] for i in range(cfg.num_hidden_layers - 1)] + [final]

    jitted = jax.jit(run, static_argnums=3)
    return lambda params, batches: [jax.tree_util.tree_map(np.asarray, jitted(params, ids, mask, keep))
                                    for ids, mask, keep in batches]


def _errors(got, want, batches):
    """Per batch: (max |logit difference|, per layer the max over real tokens of ||dh|| / ||h||)."""
    out = []
    for (logits, hidden), (want_logits, want_hidden), (_, mask, keep) in zip(got, want, batches):
        real = mask.astype(bool)
        logit_real = real if keep is None else real[:, -keep:]
        layers = [(np.linalg.norm(h - w, axis=-1) / np.linalg.norm(w, axis=-1))[real].max()
                  for h, w in zip(hidden, want_hidden)]
        out.append((np.abs(logits - want_logits)[logit_real].max(), np.array(layers)))
    return out


@pytest.fixture(scope="module")
def gemma(gemma3_dir):
    batches = _batches(gemma3_dir)
    want = _transformers(gemma3_dir, batches)
    cfg, params = load_hf(gemma3_dir)
    port = _port(cfg)
    ours = port(params, batches)
    up = jax.tree_util.tree_map(lambda p: jnp.nextafter(p, jnp.inf), params)
    drift = _errors(port(up, batches), ours, batches)
    del up
    return dict(cfg=cfg, params=params, batches=batches, want=want, ours=ours, drift=drift)


def test_gemma3_270m_matches_transformers_on_every_layer(gemma):
    assert gemma["cfg"].family == "gemma3" and gemma["cfg"].sliding_window == 512
    assert gemma["cfg"].layer_types.count("full") == 3
    for name, (diff, layers), (drift, layer_drift) in zip(("short", "long"), _errors(gemma["ours"], gemma["want"],
                                                                                     gemma["batches"]),
                                                          gemma["drift"]):
        print(f"Gemma-3-270M {name}: max |logit diff| {diff:.2e} (one-ulp drift {drift:.2e}); "
              f"layers at most {np.max(layers / layer_drift):.2f}x their drift")
        assert diff <= SLACK * drift
        assert np.all(layers <= SLACK * layer_drift), (layers / layer_drift).round(2)


@pytest.mark.parametrize("feature,batch,change", [
    ("sliding window (one token wider)", 1, dict(sliding_window=513)),
    ("embedding scale sqrt(640)", 0, dict(scale_embeddings=False)),
    ("local RoPE base 1e4 of the sliding layers", 0, dict(rope_local=None)),
])
def test_gemma3_270m_misses_without_a_feature(gemma, feature, batch, change):
    batches = gemma["batches"][batch:batch + 1]
    off = _port(dataclasses.replace(gemma["cfg"], **change))(gemma["params"], batches)
    diff, _ = _errors(off, gemma["want"][batch:batch + 1], batches)[0]
    drift = gemma["drift"][batch][0]
    print(f"Gemma-3-270M without the {feature}: max |logit diff| {diff:.2e} = {diff / drift:.0f}x the drift")
    assert diff > 10 * SLACK * drift


def test_gemma3_270m_is_embedded_with_its_terms(gemma3_dir, tmp_path, monkeypatch):
    """--model=gemma3-270m is the converted directory, float32 safetensors with the Gemma terms beside them;
    chunks that do not make up the expected file are refused in one line."""
    assert resolve_model("gemma3-270m") == gemma3_dir
    assert (gemma3_dir / "GEMMA_TERMS.html").stat().st_size > 100_000 and (gemma3_dir / "NOTICE.md").is_file()
    config = json.loads((gemma3_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in config
    assert [p.name for p in gemma3_dir.glob("*.safetensors")] == ["model.safetensors"]
    monkeypatch.setattr(shipped, "GEMMA_GGUF_SHA256", "0" * 64)
    with pytest.raises(UserError, match="chunk wheels passed their checksums") as err:
        shipped._assemble_gemma_gguf(tmp_path / "gemma.gguf")
    assert "\n" not in str(err.value) and "253113024 bytes" in str(err.value)
