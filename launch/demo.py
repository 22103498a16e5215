"""`make demo`: on an embedded model (Gemma-3-270M by default, SmolLM2-135M with --model=smollm2-135m),
evaluate the original model, run Adaptive RMU (the model's shipped flagfile) and RMU, evaluate both, attack
them, let each model continue a few held-out prompts, and write a report (markdown table + PNG).

RMU's steering coefficient: c = 6.5 was tuned for Zephyr-7B, whose layer-7 activations are far
smaller than these models'. We use the coefficient Adaptive RMU starts from on the same data (beta times
the original model's mean token norm at layer l over each forget corpus's first batch, averaged over
topics; start_coeff), so both methods steer with the same magnitude and differ only in how it is set:
one constant vs one per topic, fixed at each topic's first step. Known before training, it lets the two
runs share one compiled step side by side (train.train_cells), each with its own numbers and run directory.

The questions: every test-split question of the forget topics (biology 137, technology 68) and of the
physical sciences neighbour (117), and 200 of demo_retain's 659 spread evenly through its topics (every
topic keeps its share; --retain_limit=0 scores all 659). The original model's scores are computed once
per model, tasks and evaluator and kept in $ARMU_CACHE/demo/ (the model does not change between demos).

Usage: python -m launch.demo [--model gemma3-270m|smollm2-135m] [--lm_eval] [--limit N] [--output_dir DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import jax
import numpy as np

import armu_jax.evaluate as ev
from armu_jax import compare, outputs, stats
from armu_jax.attack import AttackedRun, attack_texts, recovery, run_attacks
from armu_jax.attack import fraction_text as pct
from armu_jax.cache import ProcessCache
from armu_jax.config import config_with, from_flagfile
from armu_jax.data import read_corpus, tokenize
from armu_jax.errors import RunFailure, run_cli
from armu_jax.evaluate import EvalSpec, evaluate_tasks, write_samples
from armu_jax.fluency import prompts_of
from armu_jax.generate import greedy
from armu_jax.lm_eval_mode import run_lm_eval, summary
from armu_jax.model import CausalLM
from armu_jax.objective import mean_token_norm, without_first_token
from armu_jax.rundir import read_metrics
from armu_jax.runtime import enable_compilation_cache, go_offline, release_memory_after_compiles
from armu_jax.sharding import make_mesh
from armu_jax.shipped import GEMMA_MODEL, cache_dir, resolve_model
from armu_jax.tasks import DEMO_EVAL_TOPICS, load_tasks, mean_chance
from armu_jax.train import export, train_cells

ROOT = Path(__file__).resolve().parents[1]
# Each embedded model: its name in the report and its shipped Adaptive RMU settings (found by --mode=tune).
MODELS = {"gemma3-270m": ("Gemma-3-270M", "configs/demo_gemma3-270m.flags"),
          "smollm2-135m": ("SmolLM2-135M", "configs/demo.flags")}
NLL_TOKENS = 16  # held-out NLL over each extract's first 16 tokens (Gemma's 262k-entry head costs ~1.7x its body per token)
RETAIN_LIMIT = 200  # demo_retain's questions (and texts), spread through its topics
CONTINUATION_TOKENS = 20


def _ci(r: dict, key: str, scale: float, digits: int) -> str:
    ci = r.get(f"{key}_ci")
    return f"{scale * r[key]:.{digits}f}" + (f" [{stats.fmt_ci(ci, scale, digits)}]" if ci else "")


def report_table(results: dict) -> str:
    """A row per topic (and per retain topic, indented): each model's acc and NLL with 95% intervals
    (Wilson for accuracy, the bootstrap over texts for NLL)."""
    rows = []
    for topic in DEMO_EVAL_TOPICS:
        cells = [topic]
        for res in results.values():
            r = res[f"demo_{topic}"]
            cells += [_ci(r, "acc", 100, 1), f"{100 * r['acc_norm']:.1f}", _ci(r, "nll", 1, 3)]
        rows.append(cells)
        for sub in results["original"][f"demo_{topic}"].get("by_topic", {}):
            cells = [f"  retain: {sub} (n={results['original'][f'demo_{topic}']['by_topic'][sub]['n']})"]
            for res in results.values():
                b = res[f"demo_{topic}"]["by_topic"][sub]
                cells += [_ci(b, "acc", 100, 1), "", ""]
            rows.append(cells)
    return outputs.markdown_table(["topic"] + [f"{m} {k}" for m in results for k in ("acc % [95% CI]", "acc_norm", "NLL [95% CI]")],
                                  rows)


PAIRS = (("rmu", "original"), ("adaptive_rmu", "original"), ("adaptive_rmu", "rmu"))


def paired_table(records: dict) -> str:
    """Paired differences on the same questions (McNemar's exact test) and texts (sign-flip test of NLL)."""
    rows = []
    for a, b in PAIRS:
        for topic in DEMO_EVAL_TOPICS:
            task = [f"demo_{topic}"]
            acc = compare.paired([records[a]], [records[b]], task, "acc")
            nll = compare.paired([records[a]], [records[b]], task, "nll")
            rows.append([f"{a} - {b}", topic, compare.fmt_paired(acc), compare.fmt_paired(nll, 1, 3)])
    return outputs.markdown_table(["comparison", "topic", "acc (points) [95% CI], p", "NLL [95% CI], p"], rows)


def plot(path: Path, results: dict, curves: dict, topic_names=()) -> list[dict]:
    """Accuracy and NLL per topic and model with 95% intervals, and both runs' losses (a line per topic);
    returns what is drawn."""
    fig, axes = outputs.figure(1, 3, figsize=(16, 4.5))
    width = 0.8 / len(results)
    colors = {name: f"C{k}" for k, name in enumerate(results)}
    for k, (name, res) in enumerate(results.items()):
        xs = [i + k * width for i in range(len(DEMO_EVAL_TOPICS))]
        rs = [res[f"demo_{t}"] for t in DEMO_EVAL_TOPICS]
        axes[0].bar(xs, [100 * r["acc"] for r in rs], width, label=name, color=colors[name])
        outputs.errorbars(axes[0], xs, [r["acc"] for r in rs], [r.get("acc_ci") for r in rs], "black", name, 100)
        axes[1].bar(xs, [r["nll"] for r in rs], width, label=name, color=colors[name])
        outputs.errorbars(axes[1], xs, [r["nll"] for r in rs], [r.get("nll_ci") for r in rs], "black", name)
    for ax, title in ((axes[0], "held-out description questions: acc % [95% CI]"),
                      (axes[1], "held-out NLL per token [95% CI]")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(DEMO_EVAL_TOPICS))], DEMO_EVAL_TOPICS)
        ax.set_title(title)
    chance = 100 * sum(r["chance"] for r in results["original"].values()) / len(results["original"])
    axes[0].axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    axes[0].set_ylim(0, 100)
    axes[0].legend(loc="upper left", fontsize=8, ncol=2)
    top = max(res[f"demo_{t}"].get("nll_ci", [0, res[f"demo_{t}"]["nll"]])[1] for res in results.values()
              for t in DEMO_EVAL_TOPICS)
    axes[1].set_ylim(0, top * 1.3)
    axes[1].legend(loc="upper right", fontsize=8, ncol=3)
    styles = ("-", ":", "-.", (0, (5, 1)))
    for name, metrics in curves.items():
        later = [m for m in metrics if m["step"] > 0]  # step 0's retain loss is 0: the models are equal
        for j, topic in enumerate(sorted({m.get("topic", 0) for m in later})):
            mine = [m for m in later if m.get("topic", 0) == topic]
            label = topic_names[topic] if topic < len(topic_names) else f"topic {topic}"
            axes[2].plot([m["step"] for m in mine], [m["forget_loss"] for m in mine], linestyle=styles[j % 4],
                         color=colors[name], linewidth=1, label=f"{name} forget, {label}")
            axes[2].plot([m["step"] for m in mine], [m["retain_loss"] for m in mine], linestyle=styles[j % 4],
                         color=colors[name], linewidth=0.6, alpha=0.5, label=f"{name} retain, {label}")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step (topics alternate)")
    axes[2].set_title("losses per topic (forget: MSE to c*u, bold; retain: alpha*MSE to frozen, faint)")
    axes[2].legend(fontsize=6)
    return outputs.save_figure(fig, path)


# The demo's attacks (python -m armu_jax.main --mode=attack has them all, with controls): the
# control vectors ablated, and 3 AdamW steps (lr 3e-5) of every parameter on 10 forget-topic texts the
# run did not train on, evaluated on the biology task (the topic the demo forgets). Every parameter, as
# when its published numbers were measured (--mode=attack relearns the run's layers by default); the demo
# holds both models anyway.
ATTACK_SETTINGS = dict(mode="attack", attacks=["ablate_u", "relearn_forget"], relearn_texts=10, relearn_steps=3,
                       relearn_lr=3e-5, relearn_max_len=64, attack_controls=False, relearn_params=["all"])
ATTACK_NOTE = ("u ablated after layer l; relearning: 10 unused forget-topic texts, 3 AdamW steps at lr 3e-5 of "
               "every parameter")


def attack_results(run_dir: Path, cache: ProcessCache, results: dict, name: str, limit: int, records: dict) -> dict:
    """The demo's attacks on one run, scored on demo_bio (original and unlearned scores and records reused):
    the recovered fractions with their bootstrap intervals, and attacked vs unlearned paired."""
    cfg = config_with(**ATTACK_SETTINGS)
    target = AttackedRun(str(run_dir))
    tasks = load_tasks(["demo_bio"], limit)
    known = {"original": {"demo_bio": results["original"]["demo_bio"]}, "unlearned": {"demo_bio": results[name]["demo_bio"]}}
    mine = {"original": records["original"], "unlearned": records[name]}
    scores, _, _ = run_attacks(cfg, target, tasks, attack_texts(cfg, target), NLL_TOKENS, known, cache, mine)
    fractions = recovery(scores, mine)
    out = {}
    for attack in ATTACK_SETTINGS["attacks"]:
        f = fractions[attack]["demo_bio"]
        out[attack] = {**scores[attack]["demo_bio"], "recovered_acc": f["acc"], "recovered_nll": f["nll"],
                       "recovered_acc_ci": f.get("acc_ci"), "recovered_nll_ci": f.get("nll_ci"),
                       "vs_unlearned": f.get("acc_vs_unlearned")}
    return out


def format_attacks(attacks: dict) -> str:
    rows = [[model, attack, f"{100 * r['acc']:.1f} / {r['nll']:.3f}",
             f"{pct(r['recovered_acc'], r.get('recovered_acc_ci'))} / {pct(r['recovered_nll'], r.get('recovered_nll_ci'))}",
             compare.fmt_paired(r.get("vs_unlearned"))]
            for model, per_attack in attacks.items() for attack, r in per_attack.items()]
    return outputs.markdown_table(["model", "attack", "bio acc / NLL", "recovered acc / NLL [95% CI]",
                                   "attacked - unlearned acc (pts) [95% CI], p"], rows)


def demo_tasks(limit: int, retain_limit: int) -> list:
    """The demo's test-split tasks: forget topics and the neighbour whole (or their first `limit`), demo_retain
    spread to retain_limit (Task.spread)."""
    tasks = load_tasks(["demo"], limit)
    return [t.spread(retain_limit) if t.name == "demo_retain" and not limit else t for t in tasks]


def original_key(model_dir: Path, tasks: list, nll_tokens: int) -> str:
    """What the original model's scores depend on: its weights file, the items and texts, the evaluator's code."""
    h = hashlib.sha256()
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    h.update(json.dumps([[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights]).encode())
    h.update(json.dumps([[t.name, t.requests(), t.nll_texts] for t in tasks], sort_keys=True).encode())
    h.update(str(nll_tokens).encode())
    h.update(Path(ev.__file__).read_bytes())
    return h.hexdigest()[:24]


def original_scores(model_dir: Path, tasks: list, evaluate) -> tuple[dict, list, str]:
    """The original model's (results, records): from $ARMU_CACHE/demo/<key>.json when an earlier demo wrote
    them, else evaluated and kept there (written atomically)."""
    path = cache_dir() / "demo" / f"original-{original_key(model_dir, tasks, NLL_TOKENS)}.json"
    if path.is_file():
        try:
            kept = json.loads(path.read_text())
            return kept["results"], kept["records"], f"kept from an earlier demo ({path})"
        except (OSError, ValueError, KeyError):
            pass  # a damaged copy: evaluate again and replace it
    records: list = []
    results = evaluate(records)
    outputs.write_json(path, {"results": results, "records": records})
    return results, records, f"evaluated now, kept in {path}"


def prompts(tasks: list) -> list[tuple[str, str]]:
    """(topic, prompt) of the held-out test articles: fluency.prompts_of's first prompt of biology, technology
    and the retain topics (the report's side-by-side continuations)."""
    by_name = {t.name: t for t in tasks}
    return [(topic, prompts_of(by_name[f"demo_{topic}"], 1)[0]) for topic in ("bio", "cyber", "retain")]


def continuations_table(texts: dict, chosen: list[tuple[str, str]]) -> str:
    rows = [[f"{topic}: {prompt}"] + [texts[name][k].replace("\n", " ").replace("|", "/").strip() for name in texts]
            for k, (topic, prompt) in enumerate(chosen)]
    return outputs.markdown_table(["prompt (held-out test article)"] + list(texts), rows)


def targets(results: dict, records: dict, name: str) -> list[str]:
    """The issue's targets for one unlearned model, each checked: forget topics at least halfway to chance
    (p < 0.01), retain within 2 points and not significantly lower, retain NLL up at most 0.1 nat/token."""
    lines = []
    for topic in ("bio", "cyber"):
        task = f"demo_{topic}"
        o, u = results["original"][task], results[name][task]
        gap = o["acc"] - o["chance"]
        fell = (o["acc"] - u["acc"]) / gap if gap > 0 else float("nan")
        p = compare.paired([records[name]], [records["original"]], [task], "acc")
        ok = fell >= 0.5 and p is not None and p["p"] < 0.01 and p["diff"] < 0
        lines.append(f"- {topic}: {100 * o['acc']:.1f} -> {100 * u['acc']:.1f}, {100 * fell:.0f}% of the way to chance "
                     f"(target: at least 50%, p < 0.01; p = {p['p']:.2g}): {'met' if ok else 'not met'}")
    p = compare.paired([records[name]], [records["original"]], ["demo_retain"], "acc")
    nll = results[name]["demo_retain"]["nll"] - results["original"]["demo_retain"]["nll"]
    ok = p["diff"] > -0.02 and not (p["p"] < 0.05 and p["diff"] < 0)
    lines.append(f"- retain accuracy {100 * p['diff']:+.1f} points (p = {p['p']:.2g}; target: within 2 points and not "
                 f"significantly lower): {'met' if ok else 'not met'}")
    lines.append(f"- retain NLL {nll:+.3f} nat/token (target: at most +0.1): {'met' if nll <= 0.1 else 'not met'}")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="armu_jax demo: RMU and Adaptive RMU on an embedded model")
    parser.add_argument("--model", default=GEMMA_MODEL, choices=sorted(MODELS), help="the embedded model (default %(default)s)")
    parser.add_argument("--limit", type=int, default=0, help="test-split questions per topic (0: all; demo_retain: "
                        "--retain_limit)")
    parser.add_argument("--retain_limit", type=int, default=RETAIN_LIMIT,
                        help="demo_retain's questions, spread through its topics (0: all 659)")
    parser.add_argument("--attack", default="adaptive_rmu", help="the models attacked: adaptive_rmu, rmu or both "
                        "(comma-separated; empty: none; each attack of each model costs about a minute on Gemma here)")
    parser.add_argument("--lm_eval", action="store_true", help="also score the exports with lm-eval (hf backend)")
    parser.add_argument("--output_dir", default=None, help="a new directory (default runs/demo-<model>-<time>)")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.retain_limit < 0:
        raise SystemExit("error: --limit and --retain_limit must be >= 0 (0: all)")
    args.attacked = [a for a in args.attack.split(",") if a]
    if set(args.attacked) - {"rmu", "adaptive_rmu"}:
        raise SystemExit(f"error: --attack={args.attack}: name rmu and/or adaptive_rmu")
    return args


class Phases:
    """The demo's phases, printed as they start, each timed (the report's per-phase seconds)."""

    def __init__(self):
        self.began = self.mark = time.time()
        self.done: list[tuple[str, float]] = []

    def __call__(self, text: str) -> None:
        now = time.time()
        if self.done:
            self.done[-1] = (self.done[-1][0], now - self.mark)
        self.mark = now
        self.done.append((text.split(" ", 1)[1].split(" (")[0], 0.0))
        print(f"{text}   [{now - self.began:.0f} s]")

    def end(self) -> list[tuple[str, float]]:
        self("[done] the report")
        return self.done[:-1]


def start_coeff(cfg, model, params, tokenizer) -> float:
    """RMU's c for the demo: the coefficient Adaptive RMU starts from, beta x the original model's mean token norm
    at layer l (without each text's first token with --norm_skip_first, as the step computes it) over each forget
    corpus's first --batch_size texts, the mean over the topics. Known before training, so that both methods run
    side by side in one compiled step (train.train_cells)."""
    upto = jax.jit(lambda p, ids, mask, pos: model.apply(p, ids, mask, pos, layer=cfg.layer_id,
                                                         method=CausalLM.hidden_upto))
    norms = []
    for spec, max_len in zip(cfg.forget_corpora, cfg.forget_max_len):
        b = tokenize(tokenizer, read_corpus(spec, cfg.min_len)[:cfg.batch_size], max_len, cfg.batch_size,
                     cfg.pad_multiple, cfg.loss_mask)
        h = upto(params, b["input_ids"], b["attention_mask"], b["positions"])
        weight = without_first_token(b["weight"], b["attention_mask"]) if cfg.norm_skip_first else b["weight"]
        norms.append(float(mean_token_norm(h, weight)))
    return cfg.beta * float(np.mean(norms))


def train_side_by_side(model_dir: Path, cfgs: list, cache) -> dict:
    """The runs in one compiled step (each its own numbers, state and run directory), then each exported to its
    run directory's hf/ as a run alone exports: {method: run directory}."""
    runs = {}
    for cfg, done in zip(cfgs, train_cells(cfgs, cache)):
        if isinstance(done, RunFailure):
            raise done
        run_dir, trained = done
        export(model_dir, run_dir / "hf", trained, cfg.export_dtype)
        runs[cfg.method] = run_dir
    return runs


def report_text(label, tasks, coeff, results, records, said, chosen, attacks, lm_eval_scores, how, seconds,
                phases) -> list[str]:
    chance = 100 * mean_chance(tasks)
    counts = ", ".join(f"{t.name[5:]} {len(t.docs)}" for t in tasks)
    text = ["# armu_jax demo\n", f"{label}; forget: Wikipedia biology and technology (cyber proxy); retain: other topics. "
            f"Held-out 4-way description questions from the test split ({counts}; chance {chance:.0f}%) and held-out "
            f"NLL per token (first {NLL_TOKENS} tokens of as many extracts). RMU c = {coeff:.1f}. [95% CI]: Wilson "
            "for accuracy, the bootstrap over texts for NLL.\n", report_table(results), "",
            "## Targets (Adaptive RMU against the original, paired on the same questions)\n",
            *targets(results, records, "adaptive_rmu"), "",
            "## Paired: the same questions under two models (McNemar's exact test; NLL: sign-flip test over texts)\n",
            paired_table(records), "",
            f"## What the models now say (greedy, {CONTINUATION_TOKENS} tokens)\n", continuations_table(said, chosen), ""]
    if attacks:
        text += [f"## Does it come back? ({ATTACK_NOTE})\n", format_attacks(attacks), ""]
    if lm_eval_scores:
        text += ["## lm-eval (hf backend) on the exports\n", "| model | task | acc | acc_norm |", "|---|---|---|---|"]
        text += [f"| {m} | {t} | {100 * r['acc']:.1f} | {100 * r.get('acc_norm', float('nan')):.1f} |"
                 for m, rows in lm_eval_scores.items() for t, r in rows.items()]
    text.append(f"\nOriginal model's scores: {how}. Total time: {seconds / 60:.1f} min ("
                + ", ".join(f"{name} {sec:.0f} s" for name, sec in phases) + ").")
    return text


def lm_eval_exports(model_dir: Path, runs: dict, out: Path, limit: int) -> dict:
    scores = {}
    for name, directory in (("original", model_dir), *((n, d / "hf") for n, d in runs.items())):
        print(f"lm-eval (hf backend) on {name}")
        scores[name] = summary(run_lm_eval(directory, ["demo"], out / "lm_eval" / name, limit=limit))
    return scores


def main(argv=None) -> int:
    args = parse_args(argv)
    phase = Phases()
    go_offline()
    enable_compilation_cache()
    release_memory_after_compiles()
    label, flags = MODELS[args.model]
    out = outputs.claim(args.output_dir or ROOT / "runs" / time.strftime(f"demo-{args.model}-%Y%m%d-%H%M%S"))
    flagfile = ROOT / flags
    print(f"armu_jax demo on {label} ({flags}): writing to {out}")
    tasks = demo_tasks(args.limit, args.retain_limit)
    print("questions: " + ", ".join(f"{t.name} {len(t.docs)}" for t in tasks))

    # One cache for the whole demo: one scorer (every model's params are its argument, shapes stay
    # compiled), one compiled step for both runs, the original model loaded once.
    cache = ProcessCache()
    model_dir, mesh = resolve_model(args.model), make_mesh("data:1")
    scorer = cache.scorer(EvalSpec(str(model_dir), "float32", 16, mesh))
    records: dict[str, list[dict]] = {}

    def evaluate(name, params):
        records[name] = []
        return evaluate_tasks(scorer, params, tasks, nll_tokens=NLL_TOKENS, samples=records[name])

    phase("[1/5] the original model")
    original, records["original"], how = original_scores(
        model_dir, tasks, lambda recs: evaluate_tasks(scorer, cache.params(model_dir, "float32", mesh), tasks,
                                                      nll_tokens=NLL_TOKENS, samples=recs))
    print(f"      {how}")
    results = {"original": original}

    adaptive_cfg = from_flagfile(flagfile, output_dir=str(out / "adaptive_rmu"), export=False)
    coeff = start_coeff(adaptive_cfg, scorer.model, cache.params(model_dir, "float32", mesh), scorer.tokenizer)
    phase(f"[2/5] Adaptive RMU and RMU side by side in one step ({flags}; RMU's c = {coeff:.1f}, the coefficient "
          "Adaptive RMU starts from)")
    runs = train_side_by_side(model_dir, [adaptive_cfg, from_flagfile(
        flagfile, method="rmu", steering_coeffs=[f"{coeff:.4f}"], output_dir=str(out / "rmu"), export=False)], cache)
    runs = {name: runs[name] for name in ("rmu", "adaptive_rmu")}  # the report's order
    curves = {name: read_metrics(runs[name]) for name in ("adaptive_rmu", "rmu")}

    phase("[3/5] evaluating the unlearned models")
    params = {"original": cache.params(model_dir, "float32", mesh)}
    for name, run_dir in runs.items():
        params[name] = cache.params(run_dir / "hf", "float32", mesh)
        results[name] = evaluate(name, params[name])

    phase("[4/5] what each model now says (greedy continuations of held-out prompts)")
    chosen = prompts(tasks)
    said = {name: greedy(scorer.model, p, scorer.tokenizer, [c for _, c in chosen], CONTINUATION_TOKENS)
            for name, p in params.items()}

    phase(f"[5/5] attacks on the forgotten biology ({', '.join(args.attacked) or 'none'}): {ATTACK_NOTE}")
    attacks = {name: attack_results(runs[name], cache, results, name, args.limit, records) for name in args.attacked}
    lm_eval_scores = lm_eval_exports(model_dir, runs, out, args.limit) if args.lm_eval else {}

    phases = phase.end()
    seconds = time.time() - phase.began
    text = report_text(label, tasks, coeff, results, records, said, chosen, attacks, lm_eval_scores, how, seconds,
                       phases)
    outputs.write_text(out / "report.md", "\n".join(text) + "\n")
    for name, recs in records.items():
        write_samples(out / f"samples_{name}.jsonl", recs)
    outputs.write_json(out / "results.json", {"model": args.model, "native": results, "lm_eval": lm_eval_scores,
                                              "attacks": attacks, "continuations": {"prompts": chosen, "said": said},
                                              "rmu_coeff": coeff, "seconds": seconds, "phases": dict(phases)})
    plot(out / "report.png", results, curves, from_flagfile(flagfile).forget_corpora)
    print("\n".join(text))
    print(f"report: {out / 'report.md'}, plot: {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
