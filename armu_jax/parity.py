"""--mode=parity: the Flax port against transformers on one checkpoint, as MaxText's logit checker does.

Both run the same token ids (the checkpoint's tokenizer, left-padded as every mode pads): transformers
first (CPU torch, --dtype), its logits and hidden states kept as float32 host arrays and the torch
model freed, then the Flax port, so a 7-9B checkpoint needs one copy of the weights in --dtype at a
time (about 2 bytes per parameter in bfloat16, 4 in float32) plus the two sets of activations.

Reported: max and mean |logit difference| at real tokens, top-1 agreement, and the first layer
whose residual stream departs (max |difference| above the tolerance relative to that layer's
largest activation). Written to --output_dir: parity.json, tokens.npy and mask.npy ([texts, length]:
the ids run and which are real tokens), logits.npy (the port's float32 logits [texts, length, vocab]).
Exit 1 when the logits miss the tolerance (TOLERANCE; docs/families.md).
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from armu_jax import outputs
from armu_jax.data import load_tokenizer
from armu_jax.errors import RunFailure, UserError
from armu_jax.families import read_model_config
from armu_jax.hf_io import load_hf
from armu_jax.model import CausalLM, DecoderLayer, parse_dtype
from armu_jax.shipped import resolve_model

BUILTIN_TEXTS = (
    "The mitochondrion is the powerhouse of the cell, producing most of its ATP.",
    "Alan Turing proposed a test of machine intelligence in 1950.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Paris is the capital of France; Berlin is the capital of Germany.",
)
# (max |logit diff| relative to the largest |logit|, mean |diff| relative to the mean |logit|, min top-1)
TOLERANCE = {"float32": (1e-4, 1e-4, 0.0), "bfloat16": (None, 0.05, 0.9)}
LAYER_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.05}  # a layer departs above this x its largest activation


def read_texts(path: str | None) -> list[str]:
    if path is None:
        return list(BUILTIN_TEXTS)
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--parity_texts {path} does not exist; pass a .txt (one text a line) or .jsonl ({{\"text\"}})")
    if file.suffix not in (".txt", ".jsonl"):
        raise UserError(f"--parity_texts {path}: use a .txt (one text a line) or .jsonl ({{\"text\"}}) file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"--parity_texts {path} is not UTF-8 text (byte {err.start + 1}); save it as UTF-8") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"--parity_texts {path}:{number} is not a JSON object with a \"text\" field") from None
        else:
            texts.append(line)
    if not texts:
        raise UserError(f"--parity_texts {path} holds no text")
    return texts


def _transformers_side(model_dir: Path, ids, mask, dtype: str):
    """transformers' logits [N, T, V] and residual streams after layers 0..L-2 [L-1, N, T, D], float32."""
    import torch  # heavy: only conversion, parity and lm-eval
    import transformers  # heavy: only conversion and parity
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    logits = out.logits.float().numpy()
    hidden = np.stack([h.float().numpy() for h in out.hidden_states[1:-1]])  # the last one is after the norm
    del model, out
    gc.collect()
    return logits, hidden


def _flax_side(model_dir: Path, ids, mask, dtype: str):
    jdtype = parse_dtype(dtype)
    cfg, params = load_hf(model_dir, jdtype)
    model = CausalLM(cfg, dtype=jdtype, param_dtype=jdtype)

    def forward(params, ids, mask):
        return model.apply(params, ids, mask, mutable=["intermediates"],
                           capture_intermediates=lambda mdl, method: isinstance(mdl, DecoderLayer)
                           and method == "__call__")
    logits, state = jax.jit(forward)(params, jnp.asarray(ids), jnp.asarray(mask))
    layers = state["intermediates"]["model"]
    hidden = np.stack([np.asarray(layers[f"layers_{i}"]["__call__"][0], np.float32)
                       for i in range(cfg.num_hidden_layers - 1)])
    return cfg, np.asarray(logits, np.float32), hidden


def compare(want_logits, got_logits, want_hidden, got_hidden, mask, dtype: str) -> dict:
    real = mask.astype(bool)
    diff = np.abs(got_logits - want_logits)[real]
    scale_max, scale_mean = float(np.abs(want_logits[real]).max()), float(np.abs(want_logits[real]).mean())
    top1 = float((got_logits.argmax(-1) == want_logits.argmax(-1))[real].mean())
    departs = None
    layer_rel = []
    for layer in range(want_hidden.shape[0]):
        rel = float(np.abs(got_hidden[layer] - want_hidden[layer])[real].max() / np.abs(want_hidden[layer][real]).max())
        layer_rel.append(rel)
        if departs is None and rel > LAYER_TOLERANCE[dtype]:
            departs = layer
    max_tol, mean_tol, top1_min = TOLERANCE[dtype]
    passed = ((max_tol is None or diff.max() <= max_tol * scale_max) and diff.mean() <= mean_tol * scale_mean
              and top1 >= top1_min)
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "max_abs_logit": scale_max, "mean_abs_logit": scale_mean, "top1_agreement": top1,
            "first_departing_layer": departs, "layer_max_rel_diff": layer_rel,
            "tolerance": {"max_rel": max_tol, "mean_rel": mean_tol, "top1_min": top1_min,
                          "layer_rel": LAYER_TOLERANCE[dtype]}, "passed": bool(passed)}


def parity_cli(cfg) -> int:
    """--mode=parity on --model: prints the comparison, writes the files, returns 1 above the tolerance."""
    out = outputs.claim(cfg.output_dir, purpose="--mode=parity writes parity.json, tokens.npy, mask.npy and "
                        "logits.npy there")
    model_dir = resolve_model(cfg.model)
    model_cfg = read_model_config(model_dir)  # refuses an unsupported family before any work
    texts = read_texts(cfg.parity_texts)
    tokenizer = load_tokenizer(model_dir)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=cfg.parity_max_len, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    began = time.time()
    want_logits, want_hidden = _transformers_side(model_dir, ids, mask, cfg.dtype)
    _, got_logits, got_hidden = _flax_side(model_dir, ids, mask, cfg.dtype)
    report = {"model": str(model_dir), "family": model_cfg.family, "dtype": cfg.dtype, "texts": len(texts),
              "length": int(ids.shape[1]), "real_tokens": int(mask.sum()),
              **compare(want_logits, got_logits, want_hidden, got_hidden, mask, cfg.dtype),
              "seconds": round(time.time() - began, 1)}
    try:
        outputs.write_npy(out / "tokens.npy", ids)
        outputs.write_npy(out / "mask.npy", mask)
        outputs.write_npy(out / "logits.npy", got_logits)
        outputs.write_json(out / "parity.json", report)
    except OSError as err:
        raise RunFailure(f"parity: writing to {out} failed: {err.strerror}") from None
    departs = report["first_departing_layer"]
    print(f"parity {model_cfg.family} ({cfg.dtype}, {len(texts)} texts, {report['real_tokens']} tokens): "
          f"max |logit diff| {report['max_abs_logit_diff']:.3g} (largest |logit| {report['max_abs_logit']:.3g}), "
          f"mean {report['mean_abs_logit_diff']:.3g}, top-1 agreement {report['top1_agreement']:.4f}, "
          f"first departing layer: {'none' if departs is None else departs} -> "
          f"{'PASS' if report['passed'] else 'FAIL'}; wrote {out / 'parity.json'}")
    return 0 if report["passed"] else 1
