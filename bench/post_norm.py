"""What RMU can push where the MLP output is re-normalised (Gemma-2/3, OLMo-2), on tiny random models.

In those families down_proj's output passes through post_feedforward_layernorm before it joins the
residual stream, so scaling down_proj barely moves the layer output. For each family (and Qwen3 and
Phi-3, pre-norm, for contrast) this runs Adaptive RMU on the demo corpora with only mlp.down_proj
updated and with post_feedforward_layernorm's weight updated too, and reports how far the forget loss
falls and how close the unlearn layer's output on forget texts comes to the direction u (mean cosine
over real tokens), before and after. No real checkpoint of these families can be fetched here: the
family defaults (families.py) rest on these tiny-model numbers only.
Usage: python bench/post_norm.py [--steps 40] [--out post_norm.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

FAMILIES = ("gemma2", "gemma3_text", "olmo2", "qwen3", "phi3")
CHOICES = {"down_proj only": ["mlp.down_proj"],
           "down_proj + post_feedforward_layernorm": ["mlp.down_proj", "post_feedforward_layernorm"]}


def x10_effect(model_dir: Path) -> float:
    """Relative change of layer 2's output when its own down_proj is multiplied by 10."""
    import jax.numpy as jnp
    import numpy as np

    from armu_jax.hf_io import load_hf
    from armu_jax.model import CausalLM
    from armu_jax.params import flatten, unflatten
    cfg, params = load_hf(model_dir)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 1000, size=(2, 16)))
    model = CausalLM(cfg)
    base = model.apply(params, ids, layer=2, method=CausalLM.hidden_upto)
    flat = flatten(params)
    key = ("model", "layers_2", "mlp", "down_proj", "kernel")
    flat[key] = flat[key] * 10
    scaled = model.apply(unflatten(flat), ids, layer=2, method=CausalLM.hidden_upto)
    return float(jnp.linalg.norm(scaled - base) / jnp.linalg.norm(base))


def cosine_to_u(run: Path, model_dir: Path, layer: int, texts: list[str]) -> float:
    """Mean cosine of the layer-`layer` output with topic 0's u over real tokens of forget texts."""
    import jax.numpy as jnp
    import numpy as np

    from armu_jax.data import load_tokenizer
    from armu_jax.hf_io import load_hf
    from armu_jax.model import CausalLM
    cfg, params = load_hf(run / "hf" if (run / "hf").is_dir() else model_dir)
    u = np.load(run / "control_vectors.npy")[0]
    enc = load_tokenizer(model_dir)(texts, padding=True, truncation=True, max_length=32, return_tensors="np")
    h = np.asarray(CausalLM(cfg).apply(params, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]),
                                               layer=layer, method=CausalLM.hidden_upto))
    cos = (h @ u) / np.linalg.norm(h, axis=-1)
    return float(cos[enc["attention_mask"].astype(bool)].mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="post_norm.json")
    parser.add_argument("--down_proj_scale", type=float, default=1.0,
                        help="multiply every down_proj by this first: at random init its output is so small that "
                             "the post-norm's eps dominates; 100 puts it where trained weights are (eps negligible)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    from helpers import tiny_family_model, with_tokenizer

    from armu_jax.config import config_with
    from armu_jax.data import read_corpus
    from armu_jax.shipped import smollm2_dir
    from armu_jax.train import run
    tmp = Path(tempfile.mkdtemp(prefix="post_norm."))
    forget = read_corpus("demo:bio")[:8]
    rows = []
    print("| family | updated | x10 on down_proj moves the layer output by | forget loss first -> last topic-0 step "
          "| cosine(h_l, u) before -> after |")
    print("|---|---|---|---|---|")
    for family in args.families.split(","):
        extra = {"layer_types": ["sliding_attention", "full_attention"] * 2} if family == "gemma3_text" else {}
        model_dir = with_tokenizer(tiny_family_model(tmp, family, vocab=49152, num_hidden_layers=4, **extra),
                                   smollm2_dir())
        if args.down_proj_scale != 1.0:
            _scale_down_proj(model_dir, args.down_proj_scale)
        effect = x10_effect(model_dir)
        for label, names in CHOICES.items():
            if family in ("qwen3", "phi3") and "post" in label:
                continue
            out = tmp / f"{family}-{len(names)}"
            cfg = config_with(model=str(model_dir), layer_id=2, update_params=names, method="adaptive_rmu", beta=5,
                              lr=1e-2, alpha=[10], forget_max_len=[32], retain_max_len=32, pad_multiple=32,
                              max_num_batches=args.steps, checkpoint_every=0, output_dir=str(out))
            run(cfg)
            metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
            topic0 = [m for m in metrics if m["topic"] == 0]
            row = {"family": family, "updated": label, "x10_down_proj_effect": effect,
                   "forget_loss_first": topic0[0]["forget_loss"], "forget_loss_last": topic0[-1]["forget_loss"],
                   "cosine_before": _cosine_original(out, model_dir, forget), "cosine_after": cosine_to_u(out, model_dir, 2, forget)}
            rows.append(row)
            print(f"| {family} | {label} | {effect:.2e} | {row['forget_loss_first']:.4g} -> {row['forget_loss_last']:.4g} "
                  f"| {row['cosine_before']:.3f} -> {row['cosine_after']:.3f} |", flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=2))


def _scale_down_proj(model_dir: Path, factor: float) -> None:
    from safetensors.numpy import load_file, save_file
    tensors = load_file(model_dir / "model.safetensors")
    save_file({k: v * factor if "down_proj" in k else v for k, v in tensors.items()}, model_dir / "model.safetensors",
              metadata={"format": "pt"})


def _cosine_original(run: Path, model_dir: Path, texts) -> float:
    """cosine_to_u on the original model (the run's u, the unchanged weights)."""
    import shutil
    copy = run.parent / f"{run.name}-original"
    copy.mkdir(exist_ok=True)
    shutil.copy(run / "control_vectors.npy", copy / "control_vectors.npy")
    return cosine_to_u(copy, model_dir, 2, texts)


if __name__ == "__main__":
    main()
