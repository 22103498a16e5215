"""The native JAX evaluator vs lm-eval's hf backend (torch) on the same items and the same model.

Items: the three demo tasks (description questions) and an MMLU subset, float32, SmolLM2.
Times are wall-clock of the scoring call on each side with the model already loaded (lm-eval:
simple_evaluate on a preloaded HFLM at several batch sizes, 1 being its default; native: Scorer
over the same requests), the native side once cold (including XLA compilation) and once warm,
packed (each context once with its continuations behind it, several sequences per row) and, for
reference, one request per row (--pack_tokens 0, lm-eval's layout). The speed-up is against
lm-eval at its best batch size. Both sides must choose the same answers; the script says so.
Usage: python bench/eval_speed.py [--demo 40] [--mmlu 100] [--batch 16] [--lm_eval_batches 1,8,16,32]
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
    parser.add_argument("--lm_eval_batches", default="1,8,16,32", help="lm-eval batch sizes (1 is its default)")
    parser.add_argument("--pack_tokens", type=int, default=256, help="native rows' packed length")
    args = parser.parse_args()
    from armu_jax.runtime import go_offline
    go_offline()

    import lm_eval
    import numpy as np
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from armu_jax.evaluate import EvalSpec, build_scorer, load_params
    from armu_jax.shipped import smollm2_dir
    from armu_jax.tasks import load_tasks, write_lm_eval_tasks

    model_dir = smollm2_dir()
    limits = {"demo_bio": args.demo, "demo_cyber": args.demo, "demo_retain": args.demo, "mmlu": args.mmlu}
    tasks = load_tasks(["demo", "mmlu"], limits)
    n_requests = sum(len(t.requests()) for t in tasks)

    scorer = build_scorer(EvalSpec(str(model_dir), batch_size=args.batch, pack_tokens=args.pack_tokens))
    alone = build_scorer(EvalSpec(str(model_dir), batch_size=args.batch, pack_tokens=0))
    params = load_params(model_dir)
    timings, tokens = {}, {}
    for label, which in (("native_cold", scorer), ("native_warm", scorer), ("one_per_row_cold", alone),
                         ("one_per_row_warm", alone)):
        which.tokens_run = 0
        began = time.perf_counter()
        results = {t.name: which.multiple_choice(params, t) for t in tasks}
        timings[label] = time.perf_counter() - began
        tokens[label.rsplit("_", 1)[0]] = which.tokens_run
        if which is scorer:
            native = results

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

    best = min(lm_batches, key=lambda b: timings[f"lm_eval_batch{b}"])
    report = {"requests": n_requests, "batch_size": args.batch, "pack_tokens": args.pack_tokens, "agree": agree,
              "tokens_run": tokens, **{k: round(v, 2) for k, v in timings.items()}, "lm_eval_best_batch": best}
    for lm_batch in lm_batches:
        lm = timings[f"lm_eval_batch{lm_batch}"]
        report[f"speedup_warm_vs_lm_eval_batch{lm_batch}"] = round(lm / timings["native_warm"], 2)
    lm = timings[f"lm_eval_batch{best}"]
    report["speedup_warm_vs_lm_eval_best"] = round(lm / timings["native_warm"], 2)
    report["speedup_cold_vs_lm_eval_best"] = round(lm / timings["native_cold"], 2)
    report["speedup_one_per_row_warm_vs_lm_eval_best"] = round(lm / timings["one_per_row_warm"], 2)
    print(json.dumps(report, indent=2))
    print(f"same answers on every item: {agree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
