"""What a sweep cell costs next to the same run started alone from the command line.

Runs configs/demo.flags (Adaptive RMU, layer 5) alone, as a user would (`python -m armu_jax.main`,
a fresh process: imports, model load, tokenization, compilation from the persistent cache,
the steps; no export, no evaluation), then a sweep of three cells at the same layer
(Adaptive RMU, RMU, Adaptive RMU with another beta) in one process, and compares each cell's
training time (sweep.csv's train_seconds) and its first step's extra time over a typical step
(first_step_seconds: compilation, if any) with the standalone run.
Usage: python bench/sweep_cost.py [--steps 120]
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    base = [sys.executable, "-m", "armu_jax.main", f"--flagfile={ROOT / 'configs' / 'demo.flags'}",
            f"--max_num_batches={args.steps}", "--checkpoint_every=0"]
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        subprocess.run(base + [f"--output_dir={tmp}/alone", "--export=false"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        alone = time.perf_counter() - began
        records = [json.loads(l) for l in (Path(tmp) / "alone" / "metrics.jsonl").read_text().splitlines()]
        steps_alone = records[-1]["seconds"]
        first_alone = records[0]["seconds"] - (records[-1]["seconds"] - records[0]["seconds"]) / (len(records) - 1)

        began = time.perf_counter()
        subprocess.run(base + ["--mode=sweep", "--sweep_methods=adaptive_rmu,rmu", "--sweep_betas=5,8",
                               "--sweep_steering_coeffs=518.8", "--eval_tasks=demo_bio", "--eval_limit=8",
                               "--eval_nll_tokens=16", f"--output_dir={tmp}/sweep"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sweep = time.perf_counter() - began
        with open(Path(tmp) / "sweep" / "sweep.csv") as f:
            rows = list(csv.DictReader(f))
    report = {"standalone_process_seconds": round(alone, 1), "standalone_steps_seconds": round(steps_alone, 1),
              "standalone_first_step_extra_seconds": round(first_alone, 2),
              "sweep_process_seconds": round(sweep, 1),
              "cells": [{k: r[k] for k in ("method", "beta", "coeff", "train_seconds", "first_step_seconds")}
                        for r in rows]}
    later = [float(r["train_seconds"]) for r in rows[1:]]
    report["later_cell_train_seconds_mean"] = round(sum(later) / len(later), 1)
    report["saved_per_later_cell_vs_standalone_process"] = round(alone - report["later_cell_train_seconds_mean"], 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
