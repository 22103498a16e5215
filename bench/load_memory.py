"""Peak host memory of a whole run (load, step, export) on a 1.3B checkpoint vs on SmolLM2.

A random Llama of about 1.3B parameters in bf16 (24 layers, hidden 2048, 4 safetensors files,
2.6 GB; SmolLM2's tokenizer) is built once in $ARMU_CACHE/bench. The same short run
(--layer_id=3, bf16, 2 steps, 64-token texts, export) is started as a child process on it and on
SmolLM2, and each child's peak RSS is read from wait4. What the big checkpoint costs beyond
SmolLM2 is what loading and exporting a model cost that the step does not need.

Usage: python bench/load_memory.py [--code DIR]  (DIR: another checkout to measure, e.g. an older commit)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=4, head_dim=128, vocab_size=49152)
FILES = 4
RUN_FLAGS = ["--layer_id=3", "--dtype=bfloat16", "--max_num_batches=2", "--forget_max_len=64",
             "--retain_max_len=64", "--pad_multiple=64", "--checkpoint_every=0"]


def _tensors() -> list[tuple[str, tuple[int, ...]]]:
    h, i, d = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["head_dim"]
    q, kv = SHAPE["num_attention_heads"] * d, SHAPE["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (SHAPE["vocab_size"], h))]
    for layer in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (SHAPE["vocab_size"], h))]


def build_checkpoint(directory: Path) -> Path:
    """The random 1.3B Llama, written tensor by tensor (never all in memory)."""
    import ml_dtypes

    from armu_jax import tensor_files
    from armu_jax.shipped import smollm2_dir
    if (directory / "model.safetensors.index.json").is_file():
        return directory
    tmp = Path(tempfile.mkdtemp(dir=directory.parent))
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def make(name, shape):
        if len(shape) == 1:
            return np.ones(shape, bf16)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)
    tensors = _tensors()
    per_file = -(-len(tensors) // FILES)
    weight_map = {}
    for n in range(FILES):
        name = f"model-{n + 1:05d}-of-{FILES:05d}.safetensors"
        chunk = tensors[n * per_file:(n + 1) * per_file]
        tensor_files.write(tmp / name, [(k, s, bf16, lambda k=k, s=s: make(k, s)) for k, s in chunk],
                           metadata={"format": "pt"})
        weight_map.update({k: name for k, _ in chunk})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((smollm2_dir() / "config.json").read_text())
    config.update(SHAPE, tie_word_embeddings=False, dtype="bfloat16", max_position_embeddings=2048)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for item in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(smollm2_dir() / item, tmp / item)
    tmp.rename(directory)
    return directory


def peak_of_run(model: str, code: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of one run as a child process."""
    env = {**os.environ, "PYTHONPATH": str(code), "JAX_PLATFORMS": "cpu"}
    log = out.parent / f"{out.name}.log"  # a file, not a pipe: nobody reads a pipe while wait4 waits
    began = time.time()
    with log.open("w") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "armu_jax.main", f"--model={model}", *RUN_FLAGS,
                                  f"--output_dir={out}"], env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"run on {model} failed: {log.read_text()[-2000:]}")
    return usage.ru_maxrss / 2**20, time.time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose armu_jax is measured")
    args = parser.parse_args()
    from armu_jax.shipped import cache_dir, smollm2_dir
    cache = cache_dir() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    print("building the random 1.3B checkpoint (once)...", file=sys.stderr)
    big = build_checkpoint(cache / "llama-1.3b-random-bf16")
    size = sum(f.stat().st_size for f in big.glob("*.safetensors")) / 2**30
    params = sum(int(np.prod(s)) for _, s in _tensors()) / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        small_peak, small_s = peak_of_run(str(smollm2_dir()), args.code, Path(tmp) / "small")
        big_peak, big_s = peak_of_run(str(big), args.code, Path(tmp) / "big")
    print(f"code: {args.code}")
    print(f"checkpoint: {params:.2f}B parameters, {size:.2f} GiB in {FILES} files; run: {' '.join(RUN_FLAGS)}")
    print(f"peak RSS  SmolLM2 {small_peak:.2f} GiB ({small_s:.0f} s)   1.3B {big_peak:.2f} GiB ({big_s:.0f} s)   "
          f"difference {big_peak - small_peak:.2f} GiB (target <= 1.5)")


if __name__ == "__main__":
    main()
