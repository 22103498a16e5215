"""A sweep's cells per hour with --cells_per_step K = 1, 2, 4 (cells of one layer trained side by side).

The embedded default's sweep (configs/demo.flags: SmolLM2-135M, the demo corpora) at one layer: RMU and
Adaptive RMU, --seeds=2, so 4 cells; each K in a fresh process and a fresh sweep directory. Reports the
training time (each group once: its cells share it), the evaluation time, the whole command's wall time
(loading, compiling and the original model's evaluation included) and cells per hour of training alone and
of the whole sweep, against K = 1 in the same run.
Usage: python bench/cells_per_hour.py [--ks 1,2,4] [--steps 40] [--eval_limit 20] [--layer 5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_sweep(k: int, out: Path, args) -> dict:
    command = [sys.executable, "-m", "armu_jax.main", f"--flagfile={ROOT / 'configs' / 'demo.flags'}", "--mode=sweep",
               f"--output_dir={out}", f"--sweep_layers={args.layer}", "--seeds=2", f"--cells_per_step={k}",
               f"--max_num_batches={args.steps}", "--eval_tasks=demo_bio,demo_retain", f"--eval_limit={args.eval_limit}",
               "--eval_nll_tokens=32", "--checkpoint_every=0"]
    began = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - began
    if done.returncode:
        raise SystemExit(f"K={k}: the sweep failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("cells/*/result.json"))]
    groups = {}  # a group's cells share its training time: count it once; a cell run alone is its own group
    for r in rows:
        size = r.get("side_by_side") or 1
        key = ("alone", r["name"]) if size == 1 else ("group", size, r["layer"], r["train_seconds"])
        groups.setdefault(key, []).append(r)
    train = sum(members[0]["train_seconds"] for members in groups.values())
    evaluation = sum(r["eval_seconds"] for r in rows)
    return {"k": k, "cells": len(rows), "ok": sum(r["status"] == "ok" for r in rows), "train_s": train,
            "eval_s": evaluation, "wall_s": wall, "forget_acc": [round(r["forget_acc"], 4) for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ks", default="1,2,4")
    parser.add_argument("--steps", type=int, default=40, help="--max_num_batches of each cell")
    parser.add_argument("--eval_limit", type=int, default=20)
    parser.add_argument("--layer", type=int, default=5)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in args.ks.split(",")):
            results.append(run_sweep(k, Path(tmp) / f"k{k}", args))
            r = results[-1]
            print(f"K={k}: {r['ok']}/{r['cells']} cells ok, train {r['train_s']:.1f} s, eval {r['eval_s']:.1f} s, "
                  f"wall {r['wall_s']:.1f} s", flush=True)
    base = results[0]
    print(f"\nSmolLM2-135M, layer {args.layer}, {args.steps} steps per cell (64 tokens, batch 4, float32), 4 cells "
          f"(RMU and Adaptive RMU x 2 seeds), eval {args.eval_limit} questions per task; CPU")
    print("| K | training s | cells/hour (training) | x K=1 | whole sweep s | cells/hour (whole) | x K=1 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        per_hour_train, per_hour = 3600 * r["cells"] / r["train_s"], 3600 * r["cells"] / r["wall_s"]
        print(f"| {r['k']} | {r['train_s']:.1f} | {per_hour_train:.0f} | {base['train_s'] / r['train_s']:.2f} | "
              f"{r['wall_s']:.1f} | {per_hour:.0f} | {base['wall_s'] / r['wall_s']:.2f} |")
    same = all(r["forget_acc"] == base["forget_acc"] for r in results)
    print(f"\nevery K gives the same forget accuracies: {same}")


if __name__ == "__main__":
    main()
