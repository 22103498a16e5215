"""JAX step vs the PyTorch reference loop on SmolLM2, demo corpora, layer 7, batch 4, same batches.

Step times alternate JAX / torch in one process (median seconds each, after a warm-up pass that
compiles every batch shape); the JAX step is taken as a run takes it (the diagnostic variant every
--log_every steps, the lean one between). Peak memory is each side's whole-process peak RSS (and
above its own baseline after loading its imports, corpora and tokenizer), measured in a child process
per side that imports only what that side needs (the JAX child no torch, no transformers: as a run).
Usage: python bench/step_time.py [--steps 8] [--max_len 512] [--log_every 10]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import armu_jax  # noqa: E402,F401  (first, as in a run: it picks the platform before jax starts)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


LAYER, LR, ALPHA, BETA = 7, 5e-5, 1200.0, 5.0


def _inputs():
    """The corpora and control vectors both sides use (no torch, no transformers)."""
    import numpy as np

    from armu_jax.data import read_corpus
    forget = [read_corpus("demo:bio"), read_corpus("demo:cyber")]
    retain = [read_corpus("demo:retain")] * 2
    vectors = np.random.default_rng(0).random((2, 576)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return forget, retain, vectors


def make_jax_side(max_len: int, log_every: int, reuse_retain: bool = True, pack_tokens: bool = True):
    """The JAX step as a run takes it: the run's tokenizer (armu_jax.data.load_tokenizer: no torch), the
    lean step between --log_every's steps, the diagnostic one on them. Imports only what a run does."""
    import jax

    from armu_jax.config import config_with
    from armu_jax.data import UnlearningData, load_tokenizer
    from armu_jax.hf_io import load_hf
    from armu_jax.runtime import release_memory_after_compiles
    from armu_jax.sharding import make_mesh
    from armu_jax.shipped import smollm2_dir
    from armu_jax.step import StepSpec, build_step, executable_flops
    from armu_jax.train import same_side

    model_dir = smollm2_dir()
    forget, retain, vectors = _inputs()
    tokenizer = load_tokenizer(model_dir)
    release_memory_after_compiles()  # as main and the demo

    def jax_side():
        model_cfg, params = load_hf(model_dir, upto_layer=LAYER)
        cfg = config_with(layer_id=LAYER, lr=LR, alpha=[ALPHA], beta=BETA, method="adaptive_rmu",
                          adaptive_coeff="first_batch", pack_tokens=pack_tokens)
        spec = StepSpec.of(cfg, model_cfg, make_mesh(cfg.mesh))
        compiled = build_step(spec, params).with_settings(cfg, vectors)
        data = UnlearningData(tokenizer, forget, retain, 4, [max_len, max_len], max_len, 128, "none",
                              rows=compiled.rows)
        frozen = jax.device_put(params, compiled.params_shardings)
        holder = {"state": compiled.init(frozen), "carried": None}

        def step(i):
            b = data.batch(i)
            carried = holder["carried"]  # the paired topic's retain activations, as train.run_steps reuses them
            reuse = reuse_retain and carried is not None and same_side(carried[0], b.retain)
            holder["state"], metrics, carry = compiled.run(holder["state"], frozen, b.topic, b.forget, b.retain,
                                                           carry=carried[1] if reuse else None,
                                                           diagnostics=i % log_every == 0)
            holder["carried"] = (b.retain, carry)
            return float(metrics["loss"])

        def flops(i):
            """XLA's FLOP count of step i's programs (the retain side's only where it is not reused)."""
            b = data.batch(i)
            shape = compiled.own_shape(b.forget, b.retain)
            reuse = reuse_retain and i > 0 and same_side(data.batch(i - 1).retain, b.retain)
            key = (shape, i % log_every == 0)
            if key not in flops_of:
                flops_of[key] = compiled.step_flops(*key)
            return flops_of[key] if reuse else flops_of[key] + executable_flops(compiled.executable("retain", shape.retain))
        flops_of = {}
        step.flops = flops
        step.compiled, step.frozen, step.data, step.holder = compiled, frozen, data, holder  # bench/fusion_profile.py
        return step
    return jax_side


def make_torch_side(max_len: int, forget_max_len: tuple[int, int] | None = None):
    """The PyTorch reference loop (transformers' tokenizer and models, tests/reference_rmu's pieces)."""
    import torch
    import torch.nn.functional as F
    import transformers
    from reference_rmu import HFAdamW, forward_with_cache

    from armu_jax.data import load_tokenizer
    from armu_jax.shipped import smollm2_dir
    model_dir = smollm2_dir()
    forget, retain, vectors = _inputs()
    tokenizer = load_tokenizer(model_dir, "transformers")
    layer, lr, alpha, beta = LAYER, LR, ALPHA, BETA

    def torch_side():
        frozen = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        updated = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for p in list(frozen.parameters()) + list(updated.parameters()):
            p.requires_grad_(False)
        trained = [updated.model.layers[i].mlp.down_proj.weight for i in (5, 6, 7)]
        for p in trained:
            p.requires_grad_(True)
        opt = HFAdamW(trained, lr=lr)
        chunks = lambda texts: [texts[i:i + 4] for i in range(0, len(texts), 4)]
        f_chunks, r_chunks = [chunks(t) for t in forget], [chunks(t) for t in retain]
        coeffs = {}

        def step(i):
            topic, b = i % 2, i // 2
            u = torch.tensor(vectors[topic]).view(1, 1, -1)
            fin = tokenizer(f_chunks[topic][b], return_tensors="pt", padding=True, truncation=True,
                            max_length=(forget_max_len or (max_len, max_len))[topic])
            h_f = forward_with_cache(updated, fin, updated.model.layers[layer], no_grad=False)
            if topic not in coeffs:
                coeffs[topic] = beta * torch.mean(h_f.detach().norm(dim=-1).mean(dim=1), dim=0).item()
            rin = tokenizer(r_chunks[topic][b], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_len)
            h_r = forward_with_cache(updated, rin, updated.model.layers[layer], no_grad=False)
            h_rf = forward_with_cache(frozen, rin, frozen.model.layers[layer], no_grad=True)
            loss = F.mse_loss(h_f, u.expand_as(h_f) * coeffs[topic]) + alpha * F.mse_loss(h_r, h_rf)
            for p in trained:
                p.grad = None
            loss.backward()
            opt.step()
            return loss.item()
        step.save = lambda path: updated.save_pretrained(path)  # the reference's last act (bench/first_run.py)
        return step

    return torch_side


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """This CPU's float32 matmul FLOP/s through XLA (best of a few n x n products)."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(lambda x: x @ x)
    dot(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def child(side: str, steps: int, max_len: int, log_every: int, pack_tokens: bool) -> None:
    """One side alone: its peak RSS above the baseline of its own imports, corpora and tokenizer."""
    make = make_jax_side(max_len, log_every, pack_tokens=pack_tokens) if side == "jax" else make_torch_side(max_len)
    base = peak_rss_mb()
    step = make()
    for i in range(steps):
        step(i)
    print(json.dumps({"side": side, "peak_mb_above_base": peak_rss_mb() - base, "peak_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--log_every", type=int, default=10, help="a run's cadence of the diagnostic step")
    parser.add_argument("--jax_only", action="store_true", help="only the JAX step's time and FLOP/s (A/B runs)")
    parser.add_argument("--no_reuse", action="store_true", help="compute the paired topics' retain side twice (A/B)")
    parser.add_argument("--no_pack", action="store_true", help="the per-token work on every padded position (A/B)")
    parser.add_argument("--child", choices=["jax", "torch"])
    args = parser.parse_args()
    if args.jax_only:
        step = make_jax_side(args.max_len, args.log_every, not args.no_reuse, not args.no_pack)()
        for i in range(args.steps):
            step(i)
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
        achieved = sum(step.flops(i) for i in range(args.steps)) / sum(times)
        print(f"jax median step {statistics.median(times):.3f} s, {achieved / 1e9:.1f} GFLOP/s, "
              f"{sum(step.flops(i) for i in range(args.steps)) / args.steps / 1e9:.1f} GFLOP/step")
        return
    if args.child:
        return child(args.child, args.steps, args.max_len, args.log_every, not args.no_pack)

    # Memory first, each side in a fresh child process started while this one is still small
    # (Linux keeps a process's peak RSS across exec, so a child of a large parent would inherit it).
    memory = {}
    for side in ("jax", "torch"):
        out = subprocess.run([sys.executable, __file__, "--child", side, "--steps", str(args.steps),
                              "--max_len", str(args.max_len), "--log_every", str(args.log_every),
                              *(["--no_pack"] if args.no_pack else [])],
                             capture_output=True, text=True, check=True)
        memory[side] = json.loads(out.stdout.strip().splitlines()[-1])
    jax_step = make_jax_side(args.max_len, args.log_every, pack_tokens=not args.no_pack)()
    torch_step = make_torch_side(args.max_len)()
    for i in range(args.steps):  # warm-up: compiles every JAX shape, warms torch's allocator
        jax_step(i)
    times = {"jax": [], "torch": []}
    for i in range(args.steps):
        for name, fn in (("jax", jax_step), ("torch", torch_step)):
            t0 = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    achieved = sum(jax_step.flops(i) for i in range(args.steps)) / sum(times["jax"])
    peak = matmul_peak()
    print(f"SmolLM2-135M, layer 7, batch 4, max_len {args.max_len}, {args.steps} steps, float32, CPU; jax: the "
          f"diagnostics every {args.log_every} steps (--log_every), each batch at its own shape, after a warm-up "
          "pass that compiles them (bench/first_run.py: a whole run from a cold start)")
    print(f"median step: jax {med['jax']:.3f} s, torch reference {med['torch']:.3f} s, "
          f"speed-up {med['torch'] / med['jax']:.2f}x")
    print(f"jax step: {achieved / 1e9:.1f} GFLOP/s (XLA's count) = {100 * achieved / peak:.0f}% of this CPU's "
          f"float32 matmul peak through XLA ({peak / 1e9:.1f} GFLOP/s, 2048^2 products)")
    print(f"peak RSS: jax {memory['jax']['peak_mb']:.0f} MB, torch {memory['torch']['peak_mb']:.0f} MB, "
          f"ratio {memory['jax']['peak_mb'] / memory['torch']['peak_mb']:.2f}")
    above = {k: v["peak_mb_above_base"] for k, v in memory.items()}
    print(f"peak above the shared baseline (imports, corpora, tokenizer): jax {above['jax']:.0f} MB, "
          f"torch {above['torch']:.0f} MB, ratio {above['jax'] / above['torch']:.2f}")


if __name__ == "__main__":
    main()
