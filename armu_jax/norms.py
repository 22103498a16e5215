"""--mode=norms: how large is each layer's residual stream? The answer sets RMU's steering coefficient.

One forward of the frozen model over --norms_texts texts of each forget corpus and of the
(first) retain corpus, tokenized as the unlearning step tokenizes them, with Flax's
capture_intermediates collecting every decoder layer's output. Per layer and corpus: the mean
token norm (each text's mean over its real tokens, then the mean over texts: the estimator
Adaptive RMU's coefficient uses), the same without each text's first token (an attention sink
on many models), the spread of token norms, and beta x norm, the coefficient Adaptive RMU would
use at that layer. Writes norms.json, norms.md and norms.png (norm vs layer, a line per corpus).
"""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from armu_jax import outputs, stats
from armu_jax.config import RunConfig
from armu_jax.context import RunContext
from armu_jax.data import load_tokenizer, read_corpus, tokenize
from armu_jax.evaluate import load_params
from armu_jax.model import CausalLM, DecoderLayer, parse_dtype
from armu_jax.objective import without_first_token


@partial(jax.jit, static_argnums=0)
def _layer_norm_sums(model: CausalLM, params, ids, mask, positions, weight):
    """Per layer and row: sum of token norms over the weighted tokens (all / without the first, as the
    step's norm_skip_first), their counts, and the sum of squared norms: each [L, B]."""
    weight_skip = without_first_token(weight, mask)
    last = model.cfg.num_hidden_layers - 1
    _, state = model.apply(params, ids, mask, positions, layer=last, method=CausalLM.hidden_upto,
                           capture_intermediates=lambda mdl, method: isinstance(mdl, DecoderLayer)
                           and method == "__call__", mutable=["intermediates"])
    layers = state["intermediates"]["model"]
    norms = jnp.stack([jnp.linalg.norm(layers[f"layers_{i}"]["__call__"][0].astype(jnp.float32), axis=-1)
                       for i in range(last + 1)])  # [L, B, T]
    per_layer = lambda w: jnp.broadcast_to(jnp.sum(w, -1), norms.shape[:2])
    return {"sum": jnp.sum(norms * weight, -1), "count": per_layer(weight),
            "sum_skip": jnp.sum(norms * weight_skip, -1), "count_skip": per_layer(weight_skip),
            "sum_sq": jnp.sum(jnp.square(norms) * weight, -1)}


def corpus_profile(model: CausalLM, params, tokenizer, texts: list[str], max_len: int, batch_size: int,
                   pad_multiple: int, desc: str = "norms") -> dict:
    """{mean, mean_skip_first, std}: lists over layers for these texts."""
    rows = {k: [] for k in ("sum", "count", "sum_skip", "count_skip", "sum_sq")}
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False, unit="batch"):
        chunk = texts[start:start + batch_size]
        batch = tokenize(tokenizer, chunk, max_len, batch_size, pad_multiple, "tokens")
        out = _layer_norm_sums(model, params, batch["input_ids"], batch["attention_mask"], batch["positions"],
                               batch["weight"])
        for key, value in out.items():
            rows[key].append(np.asarray(value, np.float64)[:, :len(chunk)])
    r = {k: np.concatenate(v, axis=1) for k, v in rows.items()}  # [L, N]
    per_text = r["sum"] / np.maximum(r["count"], 1)
    per_text_skip = r["sum_skip"] / np.maximum(r["count_skip"], 1)
    tokens = r["count"].sum(1)
    mean_token = r["sum"].sum(1) / tokens
    std = np.sqrt(np.maximum(r["sum_sq"].sum(1) / tokens - mean_token ** 2, 0.0))
    has_skip = r["count_skip"] > 0
    return {"mean": per_text.mean(1).tolist(),
            "mean_ci": [list(stats.bootstrap_mean(p)) for p in per_text],
            "mean_skip_first": [float(p[h].mean()) if h.any() else None for p, h in zip(per_text_skip, has_skip)],
            "mean_skip_first_ci": [list(stats.bootstrap_mean(p[h])) if h.any() else None
                                   for p, h in zip(per_text_skip, has_skip)],
            "text_spread": per_text.std(1).tolist(),
            "std": std.tolist(), "texts": len(texts), "tokens": int(tokens[0])}


def norms_cli(cfg: RunConfig) -> None:
    """--mode=norms over --model's layers; norms.json, norms.md, norms.png in --output_dir."""
    products = ("norms.json", "norms.md", "norms.png")
    out = outputs.claim(cfg.output_dir, products, purpose="the directory for norms.json, norms.md and norms.png")
    run = RunContext.of(cfg)
    corpora = {spec: (read_corpus(spec, cfg.min_len)[:cfg.norms_texts], max_len)
               for spec, max_len in zip((*cfg.forget_corpora, cfg.retain_corpora[0]),
                                        (*cfg.forget_max_len, cfg.retain_max_len))}
    began = time.time()
    dtype = parse_dtype(cfg.dtype)
    params = load_params(run.model_dir, cfg.dtype, run.mesh)
    model = CausalLM(run.model_cfg, dtype=dtype, param_dtype=dtype)
    tokenizer = load_tokenizer(run.model_dir)
    profiles = {spec: corpus_profile(model, params, tokenizer, texts, max_len, cfg.norms_batch_size,
                                     cfg.pad_multiple, desc=spec) for spec, (texts, max_len) in corpora.items()}
    for profile in profiles.values():
        norm = profile["mean_skip_first"] if cfg.norm_skip_first else profile["mean"]
        profile["coeff"] = [None if n is None else cfg.beta * n for n in norm]
    report = {"model": str(run.model_dir), "dtype": cfg.dtype, "beta": cfg.beta, "norm_skip_first": cfg.norm_skip_first,
              "texts_per_corpus": cfg.norms_texts, "corpora": profiles, "seconds": round(time.time() - began, 1)}
    outputs.write_json(out / "norms.json", report)
    outputs.write_text(out / "norms.md", format_norms(report) + "\n")
    plot_norms(out / "norms.png", report)
    print(format_norms(report))
    print(f"wrote {out / 'norms.json'}, {out / 'norms.md'}, {out / 'norms.png'} ({report['seconds']} s)")


def format_norms(report: dict) -> str:
    names = list(report["corpora"])
    fmt = lambda v: "-" if v is None else f"{v:.1f}"

    def with_ci(p, key, layer):
        ci = (p.get(f"{key}_ci") or [None] * (layer + 1))[layer]
        return fmt(p[key][layer]) + (f" [{ci[0]:.1f}-{ci[1]:.1f}]" if ci else "")
    rows = [[layer] + [" / ".join([with_ci(p, "mean", layer), with_ci(p, "mean_skip_first", layer),
                                   fmt(p["std"][layer]), fmt(p["coeff"][layer])])
                       for p in report["corpora"].values()]
            for layer in range(len(next(iter(report["corpora"].values()))["mean"]))]
    table = outputs.markdown_table(["layer"] + [f"{n} norm / w/o first / spread / coeff" for n in names], rows)
    return (f"Mean token norm of each layer's output (beta = {report['beta']}; coeff = beta x "
            f"{'norm without the first token' if report['norm_skip_first'] else 'norm'}). [95% interval]: the "
            "bootstrap over texts of the mean of per-text norms; spread: the standard deviation of token norms "
            "(norms.json also has text_spread, the standard deviation of the per-text means).\n\n" + table)


def plot_norms(path: Path, report: dict) -> list[dict]:
    """norm vs layer, a line per corpus (all tokens with its 95% interval over texts, and without the first);
    returns what is drawn."""
    fig, ax = outputs.figure(figsize=(8, 4.5))
    for k, (name, p) in enumerate(report["corpora"].items()):
        layers = range(len(p["mean"]))
        ax.plot(layers, p["mean"], color=f"C{k}", label=f"{name}: all tokens")
        if p.get("mean_ci"):
            outputs.errorbars(ax, list(layers), p["mean"], p["mean_ci"], f"C{k}", f"{name}: all tokens")
        ax.plot(layers, [np.nan if v is None else v for v in p["mean_skip_first"]], "--", color=f"C{k}",
                label=f"{name}: without the first")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean token norm of the layer's output")
    ax.set_yscale("log")
    ax.set_title(f"{Path(report['model']).name}: residual-stream norm by layer")
    ax.legend(fontsize=7)
    return outputs.save_figure(fig, path)
