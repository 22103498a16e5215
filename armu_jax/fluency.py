"""What a model writes, and how fluent it is: greedy continuations of held-out prompts per task, and two
measures per continuation (--mode=eval --eval_generate=N).

- repetition: 1 - distinct bigrams / bigrams of the continuation's tokens (0: no bigram repeats; a
  model stuck on "alal.alal." scores near 1);
- NLL per token of the continuation given its prompt under a reference model (--eval_fluency_model, the
  original model for an unlearned one; default the model itself): gibberish costs the original model many
  nats per token, a fluent deflection few.

Prompts are the first PROMPT_WORDS words of a task's held-out texts (demo topics) or of its questions (MMLU,
WMDP), so forget and retain topics are prompted alike. Each task's means come with 95% bootstrap intervals
over prompts; every continuation is written to generations.jsonl.
"""
from __future__ import annotations

import numpy as np

from armu_jax import outputs, stats
from armu_jax.generate import greedy_ids

PROMPT_WORDS = 8


def prompts_of(task, n: int) -> list[str]:
    """The task's first n prompts: the first words of its held-out texts, else of its questions."""
    sources = task.nll_texts or [d.get("question", "") for d in task.docs]
    return [" ".join(text.split()[:PROMPT_WORDS]) for text in sources if text.split()][:n]


def repetition(tokens: list[int]) -> float:
    """1 - distinct bigrams / bigrams (0.0 for fewer than 2 tokens)."""
    pairs = list(zip(tokens, tokens[1:]))
    return 1.0 - len(set(pairs)) / len(pairs) if pairs else 0.0


def generate_report(model, params, tokenizer, tasks: list, n: int, new_tokens: int, reference, reference_params,
                    ) -> tuple[dict, list[dict]]:
    """({task: {n, repetition, repetition_ci, nll, nll_ci}}, a record per continuation). reference: the Scorer
    whose model measures the NLL (its params: reference_params)."""
    summary, records = {}, []
    for task in tasks:
        prompts = prompts_of(task, n)
        if not prompts:
            continue
        ids = greedy_ids(model, params, tokenizer, prompts, new_tokens)
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
        scored = [(p, t) for p, t in zip(prompts, texts) if t.strip()]
        lls = reference.loglikelihoods(reference_params, scored, desc=f"{task.name} fluency") if scored else []
        ll_of = dict(zip(scored, lls))
        rows = []
        for prompt, text, tokens in zip(prompts, texts, ids):
            count = max(len(tokens), 1)
            nll = -ll_of[(prompt, text)] / count if (prompt, text) in ll_of else float("nan")
            rows.append({"task": task.name, "prompt": prompt, "text": text, "tokens": len(tokens),
                         "repetition": repetition(tokens), "nll": nll})
        reps = [r["repetition"] for r in rows]
        nlls = [r["nll"] for r in rows if r["nll"] == r["nll"]]
        summary[task.name] = {"n": len(rows), "repetition": float(np.mean(reps)),
                              "repetition_ci": list(stats.bootstrap_mean(reps)),
                              "nll": float(np.mean(nlls)) if nlls else float("nan"),
                              "nll_ci": list(stats.bootstrap_mean(nlls)) if nlls else None}
        records += rows
    return summary, records


def format_generation(summary: dict, records: list[dict], shown: int = 2) -> str:
    """A table per task (repetition, reference NLL per token, with intervals) and a few continuations."""
    table = outputs.markdown_table(
        ["task", "n", "repetition [95% CI]", "reference NLL/token [95% CI]"],
        [[t, r["n"], f"{r['repetition']:.2f} [{stats.fmt_ci(r['repetition_ci'], 1, 2)}]",
          f"{r['nll']:.2f} [{stats.fmt_ci(r['nll_ci'], 1, 2)}]"] for t, r in summary.items()])
    lines = [table, ""]
    for task in summary:
        for r in [x for x in records if x["task"] == task][:shown]:
            lines.append(f"- {task}: {r['prompt']} **->** {r['text'].strip()}")
    return "\n".join(lines)
