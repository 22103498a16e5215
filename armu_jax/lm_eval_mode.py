"""The lm-eval path: lm-eval-harness's Python API with its `hf` backend on a HF checkpoint, offline.

Our tasks (demo_*, mmlu from local CSVs, wmdp_*:FILE, *.jsonl) run through task YAMLs generated
from the same prompts the native evaluator uses, written with their docs into
<output_dir>/lm_eval_tasks/ (reusable with `lm_eval --include_path`). Any other task name (or `lm_eval:NAME`) is lm-eval's built-in task,
which needs its dataset in the local HF cache: nothing is downloaded, a missing dataset is one
clear error. lm-eval's results JSON is saved as <output_dir>/lm_eval_results.json and, with log_samples
(--mode=lm_eval always), a record per question as <output_dir>/samples.jsonl, in the native evaluator's format.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from armu_jax import outputs, storage
from armu_jax.errors import UserError
from armu_jax.evaluate import write_samples
from armu_jax.runtime import go_offline
from armu_jax.shipped import resolve_model
from armu_jax.tasks import TASK_GRAMMAR, lm_eval_task_name, resolve_tasks, write_lm_eval_tasks


def _check_builtin(names: list[str], task_manager) -> None:
    from lm_eval.tasks import get_task_dict  # heavy: only --mode=lm_eval and its tests
    for name in names:
        if name not in task_manager.all_tasks:
            raise UserError(f"lm-eval has no task {name!r}; ours are {TASK_GRAMMAR}")
        try:
            get_task_dict([name], task_manager)
        except Exception as err:  # datasets raises several kinds when offline and uncached
            raise UserError(f"lm-eval task {name}: its dataset is not in the local HF cache and nothing is "
                            f"downloaded ({type(err).__name__}); use a local file, e.g. "
                            f"--eval_tasks={name}:/path/to/{name}.jsonl") from None


def run_lm_eval(model_dir: Path, specs, output_dir: Path, limit: int = 0, batch_size: int = 16,
                dtype: str = "float32", log_samples: bool = False, split: str = "test") -> dict:
    """Run lm-eval (hf backend) on model_dir over --eval_tasks specs (our tasks: the items of --eval_split);
    returns lm-eval's results dict (also saved as JSON)."""
    go_offline()
    tasks, builtin = resolve_tasks(specs, builtin_ok=True, split=split)
    return run_lm_eval_on(model_dir, tasks, builtin, output_dir, limit, batch_size, dtype, log_samples)


def run_lm_eval_on(model_dir: Path, tasks: list, builtin: list[str], output_dir: Path, limit: int = 0,
                   batch_size: int = 16, dtype: str = "float32", log_samples: bool = False) -> dict:
    """run_lm_eval on our Task objects (e.g. each cut to its own length) and lm-eval's built-in tasks."""
    go_offline()
    if storage.is_url(model_dir):
        raise UserError(f"--mode=lm_eval reads a local model directory (lm-eval's HF model loads local files); copy "
                        f"it down first: python -m armu_jax.storage cp {model_dir} <local dir>")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a HF model directory (no config.json); pass a run's hf/ export")
    output_dir = outputs.claim(output_dir, ("lm_eval_results.json", "samples.jsonl"))
    target = output_dir / "lm_eval_results.json"
    import lm_eval  # heavy: only --mode=lm_eval and its tests
    from lm_eval.tasks import TaskManager  # heavy: only --mode=lm_eval and its tests
    if builtin:
        _check_builtin(builtin, TaskManager())
    task_dir = output_dir / "lm_eval_tasks"
    names = write_lm_eval_tasks(tasks, task_dir)
    task_manager = TaskManager(include_path=str(task_dir))
    import torch  # heavy: only conversion, parity and lm-eval
    device = "cuda" if torch.cuda.is_available() else "cpu"
    began = time.time()
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype, "trust_remote_code": False},
        tasks=names + builtin, task_manager=task_manager, limit=limit or None, batch_size=batch_size,
        device=device, log_samples=log_samples)
    results["armu_jax"] = {"seconds": time.time() - began, "model": str(model_dir), "tasks": names + builtin}
    from lm_eval.utils import handle_non_serializable  # heavy: only --mode=lm_eval and its tests
    saved = {k: v for k, v in results.items() if k != "samples"}  # the samples go to samples.jsonl
    outputs.write_json(target, saved, default=handle_non_serializable)
    if results.get("samples"):
        write_samples(output_dir / "samples.jsonl", lm_eval_records(results, tasks, builtin))
    return results


def lm_eval_records(results: dict, tasks: list, builtin: list[str]) -> list[dict]:
    """lm-eval's logged samples as the native evaluator's records (armu_jax.evaluate.Scorer.multiple_choice):
    task (ours; lm-eval's name in lm_eval_task), doc_id, target, loglikelihoods, pred, pred_norm (argmax of
    log-likelihood per character of the choice, as acc_norm), and lm-eval's own acc / acc_norm as 0/1."""
    ours = {lm_eval_task_name(t): t for t in tasks}
    records = []
    for name in [*ours, *builtin]:
        for sample in sorted(results["samples"].get(name, []), key=lambda s: s["doc_id"]):
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            task = ours.get(name)
            record = {"task": task.name if task else name, "lm_eval_task": name, "doc_id": sample["doc_id"],
                      "target": sample.get("target"), "loglikelihoods": lls, "pred": int(np.argmax(lls))}
            if task is not None:
                lengths = np.array([float(len(c)) for c in task.choices(task.docs[sample["doc_id"]])])
                record["pred_norm"] = int(np.argmax(np.array(lls) / lengths))
            for key in ("acc", "acc_norm"):
                if key in sample:
                    record[key] = int(round(float(sample[key])))
            records.append(record)
    return records


def summary(results: dict) -> dict:
    """{task: {acc, acc_norm?}} from lm-eval's results."""
    out = {}
    for task, metrics in results["results"].items():
        row = {}
        for key in ("acc", "acc_norm"):
            if f"{key},none" in metrics:
                row[key] = metrics[f"{key},none"]
        out[task] = row
    return out


def per_doc_predictions(results: dict, task: str) -> list[dict]:
    """From log_samples: per doc (in doc_id order) the loglikelihoods and argmax, as lm-eval scored them."""
    docs = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        docs.append({"doc_id": sample["doc_id"], "loglikelihoods": lls, "acc": sample.get("acc"),
                     "acc_norm": sample.get("acc_norm")})
    return docs


def lm_eval_cli(cfg) -> None:
    """--mode=lm_eval: lm-eval's hf backend on --model over --eval_tasks, results in --output_dir."""
    # --mesh is checked with the evaluation group (config.check_evaluation)
    if cfg.output_dir and storage.is_url(cfg.output_dir):
        raise UserError(f"--mode=lm_eval writes lm-eval's task files and results to a local --output_dir (not "
                        f"{cfg.output_dir}); copy them up after: python -m armu_jax.storage cp <dir> {cfg.output_dir}")
    out = outputs.claim(cfg.output_dir, ("lm_eval_results.json", "samples.jsonl"), purpose="lm-eval's results JSON and task files")
    results = run_lm_eval(resolve_model(cfg.model), cfg.eval_tasks, out, cfg.eval_limit,
                          cfg.eval_batch_size, dtype=cfg.dtype, log_samples=True, split=cfg.eval_split)
    for task, row in summary(results).items():
        print(task, " ".join(f"{k}={v:.4f}" for k, v in row.items()))
    print(f"lm-eval: {results['armu_jax']['seconds']:.1f} s; wrote {out / 'lm_eval_results.json'} and "
          f"{out / 'samples.jsonl'} (a record per question)")
