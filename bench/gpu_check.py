"""The unlearning step on whatever accelerator jax finds: a Zephyr-7B-shaped model at the paper's settings,
and the float32 step against the CPU's.

    python bench/gpu_check.py [--model configs/models/zephyr-7b-beta] [--steps 5] [--out gpu_check.json]

1. Zephyr-7B's shapes (configs/models/zephyr-7b-beta/config.json; no download): random bfloat16 weights
   of layers 0..7 (what the step reads), the paper's step (layer 7, down_proj of layers 5-7 updated,
   batch 4, 512 forget and 512 retain tokens, Adaptive RMU with the code's first-batch coefficient,
   alpha 1200, lr 5e-5, HF AdamW): the compile time, the median step time (the lean step a run takes
   between --log_every's steps, and the diagnostic one), XLA's FLOPs per step over the step time
   over the chip's bf16 peak (MFU), and the device's peak memory.
2. The float32 step (precision "highest") on a small model of the same family, the same weights
   and batches on the accelerator and on the CPU: the largest relative difference of the losses over
   3 steps and of the trained tensors.

Prints one table (markdown) and, with --out, writes it as JSON. On a machine without an accelerator it
runs on the CPU (use a small --model there: tests/test_bench.py does); the table says which device ran.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
import armu_jax  # noqa: E402,F401  (first, as in a run: it picks the platform before jax starts)

# Dense (not sparse) bf16 tensor peak per chip from the vendors' data sheets, matched on device_kind by the
# longest name it contains: "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL"
# their own; "L40" is not "L4". None: the chip has no bf16 tensor cores (the V100: fp16 only), so no MFU.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "GH200": 989e12,
             "B200": 2250e12, "A100": 312e12, "A40": 149.7e12, "A10G": 125e12, "A10": 125e12, "L40S": 362e12,
             "L40": 181e12, "L4": 121e12, "RTX 4090": 165e12, "RTX A6000": 154.8e12, "V100": None,
             "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
             "TPU v6 lite": 918e12, "TPU v6e": 918e12}
PAPER = dict(method="adaptive_rmu", adaptive_coeff="first_batch", layer_id=7, update_layer_ids=[5, 6, 7],
             update_params=["mlp.down_proj"], alpha=[1200.0, 1200.0], beta=5.0, lr=5e-5, batch_size=4,
             optimizer="hf_adamw", forget_corpora=["a", "b"], retain_corpora=["r", "r"], mesh="data:1")


def peak_of(kind: str) -> float | None:
    """The chip's bf16 peak from its device_kind (the longest matching name), None when unknown."""
    names = [n for n in BF16_PEAK if n.lower() in kind.lower()]
    return BF16_PEAK[max(names, key=len)] if names else None


def random_params(abstract, device, dtype, seed: int = 0):
    """Random normal(0, 0.02) weights of an abstract params tree (norm scales 1), made on `device`."""
    import jax
    import jax.numpy as jnp
    leaves, tree = jax.tree.flatten_with_path(abstract)
    placed = jax.sharding.SingleDeviceSharding(device)
    makers = {}  # one compiled maker per (shape, norm or not): layers share their shapes

    def maker(shape, norm: bool):
        if (shape, norm) not in makers:
            make = (lambda key: jnp.ones(shape, dtype)) if norm else \
                (lambda key: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
            makers[shape, norm] = jax.jit(make, out_shardings=placed)
        return makers[shape, norm]
    out = [maker(tuple(leaf.shape), "norm" in jax.tree_util.keystr(path))(jax.random.fold_in(jax.random.PRNGKey(seed), k))
           for k, (path, leaf) in enumerate(leaves)]
    return jax.tree.unflatten(tree, out)


def batch(rows: int, length: int, vocab: int, seed: int) -> dict:
    import numpy as np
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, vocab, (rows, length), dtype=np.int32),
            "attention_mask": np.ones((rows, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
            "weight": np.ones((rows, length), np.float32)}


def build(model_cfg, dtype: str, device, max_len: int, seed: int = 0, lr_scale: float = 1.0):
    """(compiled step, frozen params on device, batches) of the paper's step for model_cfg (its lr x lr_scale)."""
    import jax
    import numpy as np

    from armu_jax.config import config_with
    from armu_jax.model import abstract_params
    from armu_jax.params import truncate
    from armu_jax.sharding import make_mesh
    from armu_jax.step import StepSpec, build_step
    cfg = config_with(**{**PAPER, "lr": PAPER["lr"] * lr_scale}, dtype=dtype, forget_max_len=[max_len],
                      retain_max_len=max_len)
    spec = StepSpec.of(cfg, model_cfg, make_mesh(cfg.mesh, [device]))
    frozen = random_params(truncate(abstract_params(spec.model), cfg.layer_id), device, spec.model.param_dtype, seed)
    vectors = np.random.default_rng(seed).random((2, model_cfg.hidden_size)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    compiled = build_step(spec, frozen).with_settings(cfg, vectors)
    frozen = jax.device_put(frozen, compiled.params_shardings)
    batches = [(i % 2, batch(compiled.rows, max_len, model_cfg.vocab_size, 2 * i + seed),
                batch(compiled.rows, max_len, model_cfg.vocab_size, 2 * i + 1 + seed)) for i in range(2)]
    return compiled, frozen, batches


def speed(model_dir: Path, device, steps: int, max_len: int) -> dict:
    import jax

    from armu_jax.families import read_model_config
    from armu_jax.step import executable_flops
    model_cfg = read_model_config(model_dir)
    compiled, frozen, batches = build(model_cfg, "bfloat16", device, max_len)
    state = compiled.init(frozen)
    result = {}
    shape = compiled.own_shape(batches[0][1], batches[0][2])
    with jax.set_mesh(compiled.mesh):
        began = time.perf_counter()
        programs = [compiled.executable(kind, s) for kind, s in compiled.programs([shape])]  # retain side, step
        compile_seconds = time.perf_counter() - began
        for name, diagnostics in (("lean", False), ("diagnostic", True)):
            state, metrics, _ = compiled.run(state, frozen, *batches[0], diagnostics=diagnostics)  # warm-up
            jax.block_until_ready(metrics)
            times = []
            for i in range(steps):
                began = time.perf_counter()
                state, metrics, _ = compiled.run(state, frozen, *batches[(i + 1) % 2], diagnostics=diagnostics)
                jax.block_until_ready((state, metrics))
                times.append(time.perf_counter() - began)
            result[name] = {"compile_s": compile_seconds, "step_s": statistics.median(times),
                            "flops": compiled.step_flops(shape, diagnostics) + executable_flops(programs[0]),
                            "loss": float(metrics["loss"])}
    stats = device.memory_stats() or {}
    result["peak_bytes"] = stats.get("peak_bytes_in_use")
    result["params_billion"] = sum(x.size for x in jax.tree.leaves(frozen)) / 1e9
    return result


def small_config(model_dir: Path):
    """model_dir's family at a small size: 8 layers of 128 (the float32 comparison's model)."""
    from armu_jax.families import model_config_of
    hf = json.loads((model_dir / "config.json").read_text())
    heads = 4
    hf.update(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=heads,
              num_key_value_heads=min(hf.get("num_key_value_heads", heads), 2), vocab_size=1024, head_dim=32)
    return model_config_of(hf)


MARGIN = 10  # the device may differ from the CPU by 10x the CPU's own last-bit drift (as the suite's bounds)


def _float32_runs(model_cfg, dev, steps: int, lr_scale: float, nudges) -> list:
    """(losses, {trained tensor: update}) of `steps` float32 steps on dev, one per entry of nudges (True: every
    initial weight one ulp up), all from one compiled step."""
    import jax
    import numpy as np
    compiled, frozen, batches = build(model_cfg, "float32", dev, 64, lr_scale=lr_scale)
    runs = []
    for nudge in nudges:
        weights = frozen
        if nudge:
            weights = jax.tree.map(lambda x: np.nextafter(np.asarray(x), np.float32(np.inf)), frozen)
            weights = jax.device_put(weights, compiled.params_shardings)
        state, losses = compiled.init(weights), []
        initial = {k: np.asarray(v) for k, v in jax.device_get(state["trainable"]).items()}
        with jax.set_mesh(compiled.mesh):
            for i in range(steps):
                state, metrics, _ = compiled.run(state, weights, *batches[i % 2])
                losses.append(float(metrics["loss"]))
        trained = jax.device_get(state["trainable"])
        runs.append((np.array(losses), {k: np.asarray(trained[k]) - initial[k] for k in initial}))
    return runs


_CPU_RUNS: dict = {}  # the CPU's plain and nudged runs per (model, steps): a second check (the control) reuses them


def float32_check(model_dir: Path, device, steps: int = 3, device_lr_scale: float = 1.0) -> dict:
    """The float32 step on `device` and on the CPU from the same weights and batches, held to a bound: the
    largest difference of the losses (relative) and of the weight updates (trained - initial, relative to
    the CPU's largest update) must stay within MARGIN x how far the CPU's own run moves when every initial
    weight is one ulp up. Comparing updates, not whole weights, a wrong gradient cannot hide under the
    weights' magnitude. device_lr_scale: the device's lr scaled (the test's negative control)."""
    import jax
    import numpy as np
    model_cfg = small_config(model_dir)
    cpu = jax.devices("cpu")[0]
    with jax.default_matmul_precision("highest"):
        key = (str(model_dir), steps)
        if key not in _CPU_RUNS:
            _CPU_RUNS[key] = _float32_runs(model_cfg, cpu, steps, 1.0, (False, True))
        cpu_runs = _CPU_RUNS[key]
        if device == cpu and device_lr_scale == 1.0:  # on a machine without an accelerator: the same program
            device_run = cpu_runs[0]
        else:
            device_run, = _float32_runs(model_cfg, device, steps, device_lr_scale, (False,))
    runs = {"device": device_run, "cpu": cpu_runs[0], "nudged": cpu_runs[1]}
    (la, ua), (lb, ub), (lc, uc) = runs["device"], runs["cpu"], runs["nudged"]
    scale = max(float(np.abs(ub[k]).max()) for k in ub)
    update_rel = max(float(np.abs(ua[k] - ub[k]).max()) for k in ub) / scale
    update_drift = max(float(np.abs(uc[k] - ub[k]).max()) for k in ub) / scale
    loss_rel = float(np.max(np.abs(la - lb) / np.abs(lb)))
    loss_drift = float(np.max(np.abs(lc - lb) / np.abs(lb)))
    bounds = {"loss": MARGIN * loss_drift + 1e-7, "update": MARGIN * update_drift + 1e-7}
    return {"loss_rel": loss_rel, "update_rel": update_rel, "loss_drift": loss_drift, "update_drift": update_drift,
            "bounds": bounds, "passed": loss_rel <= bounds["loss"] and update_rel <= bounds["update"],
            "losses": la.tolist(), "cpu_losses": lb.tolist()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "configs/models/zephyr-7b-beta"), help="a config.json's directory")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--out", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    import jax
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    peak = peak_of(kind) if device.platform != "cpu" else None
    model_dir = Path(args.model)
    s = speed(model_dir, device, args.steps, args.max_len)
    f32 = float32_check(model_dir, device)
    gib = lambda b: "n/a (the device reports none)" if b is None else f"{b / 2 ** 30:.2f} GiB"
    rows = [("device", f"{device.platform}: {kind} (jax {jax.__version__})"),
            ("model", f"{model_dir.name} shapes, layers 0..7 random bf16 ({s['params_billion']:.2f} B params)"),
            ("step", f"Adaptive RMU (first batch), layer 7, down_proj 5-7, batch 4, {args.max_len} + {args.max_len} "
                     "tokens, HF AdamW")]
    for name in ("lean", "diagnostic"):
        r = s[name]
        achieved = r["flops"] / r["step_s"]
        mfu = f", MFU {100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16" if peak else ""
        rows.append((f"{name} step", f"{r['step_s'] * 1e3:.1f} ms (compile {r['compile_s']:.1f} s), "
                                      f"{r['flops'] / 1e12:.2f} TFLOP/step, {achieved / 1e12:.2f} TFLOP/s{mfu}"))
    rows += [("peak device memory", gib(s["peak_bytes"])),
             ("float32 vs CPU (precision highest, 3 steps, 8 layers of 128)",
              f"{'PASS' if f32['passed'] else 'FAIL'}: loss rel. diff {f32['loss_rel']:.1e} (bound "
              f"{f32['bounds']['loss']:.1e}), weight update rel. diff {f32['update_rel']:.1e} (bound "
              f"{f32['bounds']['update']:.1e}; {MARGIN}x the CPU's own one-ulp drift)")]
    print("| check | result |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows))
    result = {"device": kind, "platform": device.platform, "peak_bf16_flops": peak, "speed": s, "float32": f32,
              "table": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
