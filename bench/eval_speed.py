"""The native JAX evaluator vs lm-eval's hf backend (torch) on the same items and the same model.

Items: the three demo tasks (description questions) and an MMLU subset, float32, SmolLM2.
Times are wall-clock of the scoring call on each side with the model already loaded (lm-eval:
simple_evaluate on a preloaded HFLM, at its default batch size 1 and at ours; native: Scorer over
the same requests), the native side once cold (including XLA compilation, persistent cache off)
and once warm. Both sides must
choose the same answers; the script says so.
Usage: python bench/eval_speed.py [--demo 40] [--mmlu 100] [--batch 16]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=int, default=40, help="items per demo task")
    parser.add_argument("--mmlu", type=int, default=100, help="MMLU questions")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lm_eval_batches", default="1,16", help="lm-eval batch sizes (1 is its default)")
    args = parser.parse_args()
    from armu_jax.runtime import go_offline
    go_offline()

    import numpy as np
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from armu_jax.embedded import smollm2_dir
    from armu_jax.evaluate import scorer_for
    from armu_jax.tasks import load_tasks, write_lm_eval_tasks

    model_dir = smollm2_dir()
    limits = {"demo_bio": args.demo, "demo_cyber": args.demo, "demo_retain": args.demo, "mmlu": args.mmlu}
    tasks = [t.limited(limits[t.name]) for t in load_tasks(["demo", "mmlu"])]
    n_requests = sum(len(t.requests()) for t in tasks)

    scorer = scorer_for(model_dir, batch_size=args.batch)
    timings = {}
    for label in ("native_cold", "native_warm"):
        began = time.perf_counter()
        native = {t.name: scorer.multiple_choice(t) for t in tasks}
        timings[label] = time.perf_counter() - began

    task_dir = ROOT / "runs" / "bench_eval_tasks"
    names = write_lm_eval_tasks(tasks, task_dir)
    manager = TaskManager(include_path=str(task_dir))
    agree = True
    lm_batches = [int(b) for b in args.lm_eval_batches.split(",")]
    for lm_batch in lm_batches:
        hflm = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=lm_batch, device="cpu")
        key = f"lm_eval_batch{lm_batch}"
        timings[key] = 0.0
        for task, name in zip(tasks, names):
            began = time.perf_counter()
            res = lm_eval.simple_evaluate(model=hflm, tasks=[name], task_manager=manager,
                                          limit=limits[task.name], log_samples=True)
            timings[key] += time.perf_counter() - began
            samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
            theirs = [int(np.argmax([float(r[0]) for r in s["filtered_resps"]])) for s in samples]
            agree &= theirs == [d["pred"] for d in native[task.name]["docs"]]

    report = {"requests": n_requests, "batch_size": args.batch, "agree": agree,
              **{k: round(v, 2) for k, v in timings.items()}}
    for lm_batch in lm_batches:
        lm = timings[f"lm_eval_batch{lm_batch}"]
        report[f"speedup_warm_vs_lm_eval_batch{lm_batch}"] = round(lm / timings["native_warm"], 2)
        report[f"speedup_cold_vs_lm_eval_batch{lm_batch}"] = round(lm / timings["native_cold"], 2)
    print(json.dumps(report, indent=2))
    print(f"same answers on every item: {agree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
