"""`make demo`: on the embedded default, evaluate the original model, run Adaptive RMU
(configs/demo.flags) and RMU, evaluate both, and write a report (markdown table + PNG).

RMU's steering coefficient: c = 6.5 was tuned for Zephyr-7B, whose layer-7 activations are far
smaller than SmolLM2's (mean token norm ~136 here). We use the coefficient Adaptive RMU derives
(beta * the mean token norm on the first forget batch, averaged over topics), so both methods
steer with the same magnitude and differ only in how it is set.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import flags

from armu_jax.config import config_with, define_flags
from armu_jax.evaluate import evaluate_tasks, scorer_for
from armu_jax.tasks import DEMO_EVAL_TOPICS, load_tasks
from armu_jax.embedded import smollm2_dir
from armu_jax.main import enable_compilation_cache
from armu_jax.train import run

ROOT = Path(__file__).resolve().parents[1]
EVAL_LIMIT = 40


def demo_settings() -> dict:
    """configs/demo.flags as config_with() overrides."""
    define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["demo", f"--flagfile={ROOT / 'configs' / 'demo.flags'}"])
    names = [f.name for f in flags.FLAGS.get_flags_for_module("armu_jax.config")]
    settings = {n: flags.FLAGS[n].value for n in names if flags.FLAGS[n].present}
    flags.FLAGS.unparse_flags()
    return settings


def evaluate(model_dir: Path) -> dict:
    results = evaluate_tasks(scorer_for(model_dir), load_tasks(["demo"]), limit=EVAL_LIMIT)
    return {name[len("demo_"):]: r for name, r in results.items()}


def report(out: Path, results: dict, curves: dict) -> str:
    lines = ["| topic | model | acc | acc_norm | NLL/token |", "|---|---|---|---|---|"]
    for topic in DEMO_EVAL_TOPICS:
        for name, res in results.items():
            r = res[topic]
            lines.append(f"| {topic} | {name} | {100 * r['acc']:.1f} | {100 * r['acc_norm']:.1f} | {r['nll']:.3f} |")
    table = "\n".join(lines)
    (out / "report.md").write_text(f"# armu_jax demo\n\n{EVAL_LIMIT} held-out items per topic "
                                   f"(4-way, chance 25%).\n\n{table}\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / len(results)
    for k, (name, res) in enumerate(results.items()):
        xs = [i + k * width for i in range(len(DEMO_EVAL_TOPICS))]
        axes[0].bar(xs, [100 * res[t]["acc"] for t in DEMO_EVAL_TOPICS], width, label=name)
        axes[1].bar(xs, [res[t]["nll"] for t in DEMO_EVAL_TOPICS], width, label=name)
    for ax, title in ((axes[0], "description questions, acc (%)"), (axes[1], "held-out NLL per token")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(DEMO_EVAL_TOPICS))], DEMO_EVAL_TOPICS)
        ax.set_title(title)
        ax.legend()
    axes[0].axhline(25, color="gray", linestyle="--", linewidth=1)
    for name, metrics in curves.items():
        axes[2].plot([m["step"] for m in metrics], [m["forget_loss"] for m in metrics], label=f"{name} forget")
        axes[2].plot([m["step"] for m in metrics], [m["retain_loss"] for m in metrics], "--", label=f"{name} retain")
    axes[2].set_yscale("log")
    axes[2].set_title("losses")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    return table


def main() -> int:
    enable_compilation_cache()
    out = ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    settings = demo_settings()
    print(f"armu_jax demo: writing to {out}")
    results = {"original": evaluate(smollm2_dir())}
    adaptive = run(config_with(**settings, output_dir=str(out / "adaptive_rmu")))
    metrics = {"adaptive_rmu": [json.loads(l) for l in (adaptive / "metrics.jsonl").read_text().splitlines()]}
    first = {}
    for m in metrics["adaptive_rmu"]:
        first.setdefault(m["topic"], m["coeff"])
    coeff = sum(first.values()) / len(first)
    print(f"RMU steering coefficient c = {coeff:.1f} (the Adaptive RMU first-batch coefficient, mean over topics)")
    rmu = run(config_with(**{**settings, "method": "rmu", "steering_coeffs": [f"{coeff:.4f}"]},
                          output_dir=str(out / "rmu")))
    metrics["rmu"] = [json.loads(l) for l in (rmu / "metrics.jsonl").read_text().splitlines()]
    results["rmu"] = evaluate(rmu / "hf")
    results["adaptive_rmu"] = evaluate(adaptive / "hf")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(report(out, results, metrics))
    print(f"report: {out / 'report.md'}, plot: {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
