"""What several test modules share: tiny random Hugging Face models with odd dimensions (saved as
safetensors directories), the settings of a short run of one, the command line in a subprocess, the
metrics a run logged, and the published shapes of two big models."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_hf_model(tmp: Path, arch: str = "llama", kv_heads: int = 2, tied: bool = False, rope=None,
                  layers: int = 3, seed: int = 0, vocab: int = 131) -> Path:
    import torch
    import transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=60, intermediate_size=97, num_hidden_layers=layers,
                  num_attention_heads=6, num_key_value_heads=kv_heads, head_dim=10, rms_norm_eps=1e-5,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  max_position_embeddings=256)
    if arch == "llama":
        rope = rope or {"rope_type": "default", "rope_theta": 5000.0}
        config = transformers.LlamaConfig(rope_parameters=rope, **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.MistralConfig(sliding_window=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
        model = transformers.MistralForCausalLM(config)
    # Default init leaves norms at 1; perturb them so a wrong norm placement would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    out = tmp / f"{arch}-kv{kv_heads}-{'tied' if tied else 'untied'}"
    model.save_pretrained(out, safe_serialization=True)
    return out


# One tiny random model per family beyond Llama/Mistral, each with the family's features switched on:
# windows shorter than the test sequences, q/k/v biases, q/k norms, soft-caps, partial rotary, longrope.
FAMILY_COMMON = dict(vocab_size=131, hidden_size=60, intermediate_size=97, num_hidden_layers=3, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=10, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                     max_position_embeddings=256)
FAMILY_SETTINGS = {
    "mistral": dict(sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    "qwen3": dict(use_sliding_window=True, sliding_window=5, max_window_layers=2, tie_word_embeddings=True,
                  num_key_value_heads=3),
    "gemma2": dict(sliding_window=5, query_pre_attn_scalar=16, attn_logit_softcapping=1.5, final_logit_softcapping=0.5,
                   num_key_value_heads=1),
    "gemma3_text": dict(sliding_window=5, query_pre_attn_scalar=16, tie_word_embeddings=False,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 20000.0}}),
    "phi3": dict(sliding_window=5, original_max_position_embeddings=8,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.6,
                                  "short_factor": [1.0, 1.5, 2.0], "long_factor": [3.0, 5.0, 9.0],
                                  "original_max_position_embeddings": 8}),
    "olmo2": dict(rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=True),
}


def tiny_family_model(tmp: Path, family: str, seed: int = 0, vocab: int = 131, **overrides) -> Path:
    """A tiny random transformers model of `family` (a model_type), norms and biases perturbed so that a
    wrong placement shows; Gemma-2's q/k weights scaled so that its attention soft-cap binds."""
    import torch
    import transformers
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(family, **{**FAMILY_COMMON, **FAMILY_SETTINGS[family],
                                                          "vocab_size": vocab, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            if family == "gemma2" and (name.endswith("q_proj.weight") or name.endswith("k_proj.weight")):
                p.mul_(8.0)
    out = tmp / f"{family}-{seed}-{vocab}"
    model.save_pretrained(out, safe_serialization=True)
    return out


def with_tokenizer(model_dir: Path, tokenizer_dir: Path) -> Path:
    """model_dir with the tokenizer files of tokenizer_dir (SmolLM2's: its vocabulary is 49152)."""
    import shutil
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, model_dir / name)
    return model_dir


def run_settings(model_dir: Path, **extra) -> dict:
    """A short unlearning run of model_dir (the tiny Llama: layer 3, 32-token texts), as config_with's
    keyword arguments; extra overrides or adds settings."""
    base = dict(model=str(model_dir), layer_id=3, lr=1e-3, alpha=[50], forget_max_len=[32], retain_max_len=32,
                pad_multiple=32, checkpoint_every=0)
    return {**base, **extra}


def logged(a: dict, b: dict, keys) -> list[str]:
    """The keys of `keys` two metrics records of the same step both hold (the frozen-side metrics are on
    --log_every's steps only), checking that they hold the same ones."""
    assert a.keys() == b.keys(), (a.get("step"), sorted(a.keys() ^ b.keys()))
    return [k for k in keys if k in b]


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of <run_dir>/metrics.jsonl, one dict per logged step."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def cli_args(settings: dict) -> list[str]:
    """config_with's keyword arguments as command-line flags (lists joined by commas)."""
    return [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in settings.items()]


def cli_command(*args) -> list[str]:
    """The command line of `python -m armu_jax.main` with args (for a subprocess.Popen)."""
    return [sys.executable, "-m", "armu_jax.main", *map(str, args)]


def run_cli(*args, env: dict | None = None, prefix=(), cwd: Path = ROOT, timeout: float = 300):
    """`python -m armu_jax.main *args` in a subprocess, run to its end: the CompletedProcess, output
    captured as text. env: variables set on top of this process's environment; prefix: a command
    line the command is run through."""
    return subprocess.run([*prefix, *cli_command(*args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})


# The published configs (config.json) of two 7B/8B models, shapes only.
ZEPHYR_7B = {"architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
             "tie_word_embeddings": False}
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False}


def beyond_bound(result, reference) -> list:
    """What of a run's logged metrics and trained weights ((metrics rows, {name: array}) each) is off the
    reference run's by more than the bound test_run.py holds mesh runs to (1e-5 relative: float32 rounding of
    differently shaped products): [(step or "weights", key)]."""
    import numpy as np

    from armu_jax.step import DIAGNOSTICS
    (metrics, weights), (ref_metrics, ref_weights) = result, reference
    assert len(metrics) == len(ref_metrics)
    off = [(b["step"], key) for a, b in zip(metrics, ref_metrics)
           for key in logged(a, b, ("loss", "forget_loss", "retain_loss", "coeff", "grad_norm", *DIAGNOSTICS))
           if abs(a[key] - b[key]) > 1e-5 * abs(b[key]) + 1e-7]
    return off + [("weights", key) for key in ref_weights
                  if np.abs(weights[key] - ref_weights[key]).max() > 1e-5 * np.abs(ref_weights[key]).max()]


REAL_ERROR = 1e-3  # relative: the smallest real error (a wrong mask, eps or coefficient) a drift bound must still catch
# The retain loss measures the small gap between the updated and the frozen activations (and dominates the total
# loss once it grows): its last-bit drift reaches 0.4% at step 1 of a SmolLM2 run, and a real error there (pads
# counted, a wrong mask) moves it by tens of percent. Its bounds may reach 10% before they stop telling.
CEILINGS = {"retain_loss": 0.1, "loss": 0.1}


def drift_bound(ref, nudged, floor: float, margin: float = 10.0, absolute: float = 1e-6, what: str = "",
                key: str | None = None) -> float:
    """The bound a number (or an array, by its largest element) is held to: margin x its measured last-bit
    drift |ref - nudged| (the same run from inputs one ulp apart), at least floor x |ref|. A drift that
    grows would raise its own bound; past REAL_ERROR x |ref| (or `absolute`) the bound could no longer
    tell rounding from a real error, and this fails instead of passing by accident."""
    import numpy as np
    ref, nudged = np.asarray(ref, np.float64), np.asarray(nudged, np.float64)
    scale, drift = float(np.abs(ref).max()), float(np.abs(ref - nudged).max())
    bound = max(floor * scale, margin * drift)
    ceiling = CEILINGS.get(key, REAL_ERROR)  # the metric's (key's) ceiling, REAL_ERROR by default
    limit = max(ceiling * scale, absolute)
    assert bound <= limit, (f"{what}: the measured drift {drift:.3g} gives a bound {bound:.3g} above "
                            f"{ceiling:g} x |value| ({limit:.3g}): the test could no longer see a real error")
    return bound
