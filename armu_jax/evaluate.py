"""Native evaluation on the Flax model: lm-eval's multiple-choice scoring and held-out NLL, in JAX.

Multiple choice computes what lm-eval's `hf` backend and `multiple_choice` output type compute:
a request (context, continuation) is split as HFLM._encode_pair does (trailing whitespace of the
context moves to the continuation; continuation tokens are those of context+continuation past
the context's tokens; no special tokens), truncated from the left to the model's max length,
and scored by the summed log-probability of the continuation tokens. acc takes the argmax,
acc_norm the argmax of log-likelihood per character of the choice (without the delimiter).

Speed: requests with the same context are one sequence, the context once and every continuation
behind it (a shared prefix: each continuation attends to the context and to itself, with the
positions it would have alone), and such sequences are packed several to a row (attention stays
within each); rows have few padded shapes (see _bucket), and the LM head and log-softmax run
only at the scored positions, not over the whole sequence.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from armu_jax import outputs, sharding, stats, storage
from armu_jax.context import RunContext
from armu_jax.data import load_tokenizer
from armu_jax.errors import UserError
from armu_jax.families import read_model_config
from armu_jax.fluency import format_generation, generate_report
from armu_jax.hf_io import load_hf
from armu_jax.model import CausalLM, parse_dtype, target_logprobs
from armu_jax.params import merge
from armu_jax.shipped import resolve_model
from armu_jax.tasks import Task, load_tasks


def _bucket(length: int, least: int) -> int:
    """Padded lengths: multiples of 16 up to 128, then 2^k or 1.5 * 2^k (and >= least): few shapes
    (few compilations) and little padding."""
    length = max(length, least, 1)
    if 16 <= length <= 128:
        return -(-length // 16) * 16
    size = 1 << (length - 1).bit_length()
    return size * 3 // 4 if size >= 4 and size * 3 // 4 >= length else size


@partial(jax.jit, static_argnums=0)
def _scored_logprobs(model, params, ids, positions, segment, branch, at, targets):
    """log p(targets[b, c] | what position at[b, c] sees) of packed rows: [B, C] in float32 (model.target_logprobs:
    the head in chunks)."""
    h = model.apply(params, ids, positions, segment, branch, at, method=CausalLM.hidden_packed)
    return target_logprobs(model, params, h, targets)


@dataclass
class _Item:
    """A prefix and the continuations scored behind it; each continuation is scored whole (its first
    token at the prefix's last position), so a continuation of n tokens adds n - 1 to the row."""
    prefix: tuple[int, ...]
    branches: list[tuple[int, ...]]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(b) - 1 for b in self.branches)

    @property
    def entries(self) -> int:
        return sum(len(b) for b in self.branches)


def _pack(items: list[_Item], pack_tokens: int, window: int = 64) -> list[tuple[int, list[int]]]:
    """Rows (length, item indices): longest items first, each into the first of the last `window`
    open rows with room, else a new row of bucketed length max(its length, pack_tokens). With
    pack_tokens 0 every item gets its own row (as lm-eval)."""
    rows: list[tuple[int, list[int]]] = []
    free: list[int] = []
    for i in sorted(range(len(items)), key=lambda i: -items[i].length):
        length = items[i].length
        for r in range(max(0, len(rows) - window), len(rows)):
            if pack_tokens and free[r] >= length:
                rows[r][1].append(i)
                free[r] -= length
                break
        else:
            size = _bucket(max(length, pack_tokens), 16)
            rows.append((size, [i]))
            free.append(size - length)
    return rows


def _layout(items: list[_Item], members_of_rows: list[list[int]], n_rows: int, length: int, width: int, pad: int):
    """The packed arrays of one batch (ids, positions, segment, branch, at, targets) and where each
    branch's scores land: [(row, first entry, item, branch, tokens)]."""
    ids = np.full((n_rows, length), pad, np.int32)
    positions = np.zeros((n_rows, length), np.int32)
    segment = np.full((n_rows, length), -1, np.int32)
    branch = np.zeros((n_rows, length), np.int32)
    at = np.zeros((n_rows, width), np.int32)
    targets = np.zeros((n_rows, width), np.int32)
    where = []
    for r, members in enumerate(members_of_rows):
        cursor = entry = 0
        for s, i in enumerate(members):
            item = items[i]
            p = len(item.prefix)
            ids[r, cursor:cursor + p] = item.prefix
            positions[r, cursor:cursor + p] = np.arange(p)
            segment[r, cursor:cursor + p] = s
            last = cursor + p - 1  # the prefix's last token predicts each branch's first
            cursor += p
            for b, tokens in enumerate(item.branches):
                m = len(tokens) - 1
                ids[r, cursor:cursor + m] = tokens[:-1]
                positions[r, cursor:cursor + m] = np.arange(p, p + m)
                segment[r, cursor:cursor + m] = s
                branch[r, cursor:cursor + m] = b + 1
                at[r, entry] = last
                at[r, entry + 1:entry + 1 + m] = np.arange(cursor, cursor + m)
                targets[r, entry:entry + m + 1] = tokens
                where.append((r, entry, i, b, m + 1))
                entry += m + 1
                cursor += m
    return (ids, positions, segment, branch, at, targets), where


class Scorer:
    """Batched, jitted log-likelihoods of token sequences on one model's shapes; the params scored are
    an argument of every method, so one Scorer (and its compiled shapes) serves every model of those
    shapes (the original, an export, a sweep cell, an attacked model).

    Requests with the same context are one sequence: the context once, each continuation behind it
    (shared prefix), and several such sequences are packed into rows of about pack_tokens tokens
    (pack_tokens=0: one request per row, no sharing, lm-eval's layout).
    """

    def __init__(self, model: CausalLM, tokenizer, batch_size: int = 16, max_length: int = 2048,
                 mesh=None, pack_tokens: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.mesh = mesh
        # On a mesh the rows of a batch are split over data x fsdp (params are laid out by the caller).
        self.batch_size = sharding.batch_rows(mesh, batch_size) if mesh is not None else batch_size
        self.rows = sharding.batch_sharding(mesh) if mesh is not None else None
        self.max_length = max_length
        self.pack_tokens = pack_tokens
        self.tokens_run = 0  # token positions run through the model, padding included (bench/eval_speed.py)

    # -- lm-eval's request encoding (HFLM._encode_pair and _loglikelihood_tokens' truncation)
    def _tokens(self, text: str) -> list[int]:
        # lm-eval's tok_encode (add_bos_token unset): the tokenizer's own special tokens, so Gemma's
        # <bos> leads every context and held-out text and SmolLM2 (no template) gets none.
        return self.tokenizer(text)["input_ids"]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            prefix = self.tokenizer.bos_token_id
            prefix = self.tokenizer.eos_token_id if prefix is None else prefix
            return [prefix], self._tokens(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self._tokens(context + continuation), self._tokens(context)
        return ctx, whole[len(ctx):]

    def _split(self, context: list[int], continuation: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix, continuation) after lm-eval's left truncation of context + continuation to
        max_length + 1 tokens (the model sees all but the last)."""
        whole = (context + continuation)[-(self.max_length + 1):]
        if len(continuation) >= len(whole):
            raise UserError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                            f"{self.max_length}-token context")
        return tuple(whole[:-len(continuation)]), tuple(continuation)

    def place(self, variables):
        """variables laid out for this scorer: the params on its mesh by the sharding table (a no-op when
        they are), other collections (an attack's ablation directions) replicated."""
        if self.mesh is None:
            return variables
        params = {"params": variables["params"]}
        others = {k: v for k, v in variables.items() if k != "params"}
        return {**jax.device_put(params, sharding.param_shardings(params, self.mesh)),
                **jax.device_put(others, sharding.replicated(self.mesh))}

    # -- scoring
    def _score(self, params, items: list[_Item], desc: str) -> list[list[np.ndarray]]:
        """Per item, per branch: the log-probability of each of its tokens."""
        by_size: dict[int, list[list[int]]] = {}  # rows of one length batch together
        for size, members in _pack(items, self.pack_tokens):
            by_size.setdefault(size, []).append(members)
        batches = []
        for size, group in by_size.items():
            # Rows longer than pack_tokens come fewer to a batch (about batch_size x pack_tokens tokens):
            # the attention scores grow with rows x length^2, and on a CPU their memory traffic, not the
            # dense layers, then sets the pace.
            per_batch = self.batch_size if not self.pack_tokens else \
                max(1, min(self.batch_size, self.batch_size * self.pack_tokens // size))
            batches += [(size, group[k:k + per_batch]) for k in range(0, len(group), per_batch)]
        out: list[list[np.ndarray | None]] = [[None] * len(item.branches) for item in items]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for length, members_of_rows in tqdm(batches, desc=desc, leave=False, unit="batch"):
            n_rows = min(_bucket(len(members_of_rows), 1), self.batch_size)  # a last, partial batch: fewer rows
            if self.mesh is not None:
                n_rows = sharding.batch_rows(self.mesh, n_rows)
            self.tokens_run += n_rows * length
            width = _bucket(max(sum(items[i].entries for i in members) for members in members_of_rows), 8)
            arrays, where = _layout(items, members_of_rows, n_rows, length, width, pad)
            if self.rows is not None:
                arrays = sharding.place(arrays, (self.rows,) * 6)
            logp = np.asarray(_scored_logprobs(self.model, params, *arrays), np.float64)
            for r, entry, i, b, n in where:
                out[i][b] = logp[r, entry:entry + n]
        return out

    def loglikelihoods(self, params, pairs: list[tuple[str, str]], desc: str = "scoring",
                       memo: dict | None = None) -> np.ndarray:
        """Summed log-probability of each continuation given its context, as lm-eval's loglikelihood.
        memo (a dict kept for one params): requests scored before are not scored again (a neighbour
        task's questions that are also the retain task's), and what is scored here is added to it."""
        if memo is not None:
            todo = [p for p in dict.fromkeys(pairs) if ("ll", p) not in memo]
            if todo:
                memo.update({("ll", p): v for p, v in zip(todo, self.loglikelihoods(params, todo, desc))})
            return np.array([memo[("ll", p)] for p in pairs], np.float64)
        items: list[_Item] = []
        index: dict[tuple, int] = {}  # prefix -> item (packing: shared; else one item per request)
        slots = []
        for context, continuation in pairs:
            prefix, cont = self._split(*self._encode_pair(context, continuation))
            key = prefix if self.pack_tokens else len(items)
            if key not in index:
                index[key] = len(items)
                items.append(_Item(prefix, []))
            item = items[index[key]]
            if cont not in item.branches:
                item.branches.append(cont)
            slots.append((index[key], item.branches.index(cont)))
        scores = self._score(params, items, desc)
        return np.array([float(scores[i][b].sum()) for i, b in slots], np.float64)

    def multiple_choice(self, params, task: Task, memo: dict | None = None) -> dict:
        """acc (and acc_norm) of a task under params with their Wilson intervals, and one record per doc
        ("docs": task, doc_id, target, each choice's log-likelihood, the picks and whether each is right)."""
        ll = self.loglikelihoods(params, task.requests(), desc=task.name, memo=memo)
        cursor = 0
        records = []
        for doc_id, doc in enumerate(task.docs):
            choices = task.choices(doc)
            scores = ll[cursor:cursor + len(choices)]
            cursor += len(choices)
            pred = int(np.argmax(scores))
            pred_norm = int(np.argmax(scores / np.array([float(len(c)) for c in choices])))
            record = {"task": task.name, "doc_id": doc_id, "target": doc["answer"], "loglikelihoods": scores.tolist(),
                      "pred": pred, "pred_norm": pred_norm, "acc": int(pred == doc["answer"]),
                      "acc_norm": int(pred_norm == doc["answer"])}
            record.update({k: doc[k] for k in RECORD_KEYS if k in doc})
            records.append(record)
        result = {**accuracy(records, task.metrics), "n": len(records), "role": task.role, "chance": task.chance}
        topics = sorted({r["topic"] for r in records if "topic" in r})
        if len(topics) > 1:  # a task over several topics (demo_retain): each topic's share
            result["by_topic"] = {t: {**accuracy([r for r in records if r.get("topic") == t], ("acc",)),
                                      "n": sum(r.get("topic") == t for r in records)} for t in topics}
        result["docs"] = records
        return result

    def nll_records(self, params, texts: list[str], max_tokens: int = 128, desc: str = "nll",
                    task: str = "", memo: dict | None = None) -> list[dict]:
        """Per text (each cut to max_tokens; texts under 2 tokens are skipped): {task, doc_id, tokens (the
        predicted ones), nll (their summed negative log-likelihood)}. memo: as loglikelihoods'."""
        encoded = [tuple(self._tokens(t)[:max_tokens]) for t in texts]
        kept = [i for i, e in enumerate(encoded) if len(e) >= 2]
        if not kept:
            raise UserError("no held-out text of at least 2 tokens to compute NLL on")
        memo = {} if memo is None else memo
        todo = list(dict.fromkeys(encoded[i] for i in kept if ("nll", encoded[i]) not in memo))
        if todo:
            items = [_Item(e[:1], [e[1:]]) for e in todo]
            memo.update({("nll", e): branches[0] for e, branches in zip(todo, self._score(params, items, desc))})
        logps = [memo[("nll", encoded[i])] for i in kept]
        return [{"task": task, "doc_id": i, "tokens": len(lp), "nll": float(-lp.sum())} for i, lp in zip(kept, logps)]

    def nll_per_token(self, params, texts: list[str], max_tokens: int = 128, desc: str = "nll") -> float:
        """Mean negative log-likelihood per predicted token of the texts (each cut to max_tokens)."""
        return nll_of(self.nll_records(params, texts, max_tokens, desc))


RECORD_KEYS = ("topic", "title")  # doc fields copied into its record (the demo's Wikipedia topic and title)


def accuracy(records: list[dict], metrics=("acc", "acc_norm")) -> dict:
    """{acc, acc_ci, acc_norm?, acc_norm_ci?} of per-question records: the means of their 0/1 fields and
    the Wilson 95% intervals (armu_jax.stats)."""
    out = {}
    for key in ("acc", "acc_norm"):
        if key in metrics or key == "acc":
            correct = sum(r[key] for r in records)
            out[key] = correct / len(records) if records else float("nan")
            out[f"{key}_ci"] = list(stats.wilson(correct, len(records)))
    return out


def nll_of(records: list[dict]) -> float:
    """NLL per token of NLL records: their summed NLL over their summed tokens."""
    return float(sum(r["nll"] for r in records) / sum(r["tokens"] for r in records))


def evaluate_tasks(scorer: Scorer, params, tasks: list[Task], nll: bool = True, nll_tokens: int = 128,
                   samples: list | None = None) -> dict:
    """{task: {acc, acc_ci, acc_norm?, acc_norm_ci?, n, role, chance, by_topic?, nll?, nll_ci?, nll_n?}} of
    params on each task (nll, over each text's first nll_tokens tokens, for tasks with held-out texts; its
    interval a bootstrap over texts). With `samples` (a list), every question's and text's record is
    appended to it (samples.jsonl). Limit tasks with load_tasks(limit=)."""
    params = scorer.place(params)
    results = {}
    memo: dict = {}  # what one task scored, another with the same requests or texts reads (demo_physical in demo_retain)
    for task in tasks:
        res = scorer.multiple_choice(params, task, memo)
        records = res.pop("docs")
        if nll and task.nll_texts:
            texts = scorer.nll_records(params, task.nll_texts, nll_tokens, desc=f"{task.name} nll", task=task.name,
                                       memo=memo)
            res.update(nll=nll_of(texts), nll_ci=list(stats.bootstrap_ratio([r["nll"] for r in texts],
                                                                            [r["tokens"] for r in texts])),
                       nll_n=len(texts))
            records += [{**r, "type": "nll"} for r in texts]
        if samples is not None:
            samples += records
        results[task.name] = res
    return results


def write_samples(path, samples: list[dict]) -> None:
    """samples.jsonl: one record per scored question (and per held-out text, "type": "nll")."""
    outputs.write_text(path, "".join(json.dumps(r) + "\n" for r in samples))


def read_samples(path) -> list[dict]:
    return [json.loads(line) for line in storage.path(path).read_text().splitlines() if line.strip()]


def max_length_of(model_dir: Path) -> int:
    """lm-eval HFLM's max_length: the config's max_position_embeddings (else 2048)."""
    config = json.loads((storage.path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 2048)


@dataclass(frozen=True)
class EvalSpec:
    """What a Scorer is built for (the process cache keys scorers by it)."""
    model_dir: str  # its config.json (shapes, max length) and tokenizer
    dtype: str = "float32"
    batch_size: int = 16
    mesh: object = None
    pack_tokens: int = 256

    @classmethod
    def of(cls, cfg, model_dir: Path, mesh=None) -> "EvalSpec":
        return cls(str(model_dir), cfg.dtype, cfg.eval_batch_size, mesh)


def build_scorer(spec: EvalSpec, tokenizer=None) -> Scorer:
    """A Scorer for models of spec.model_dir's shapes, in spec.dtype; with a mesh, each batch's rows
    are split over data x fsdp and params are placed by the sharding table."""
    model_dir = storage.path(spec.model_dir)
    dtype = parse_dtype(spec.dtype)
    model = CausalLM(read_model_config(model_dir), dtype=dtype, param_dtype=dtype)
    return Scorer(model, tokenizer or load_tokenizer(model_dir), spec.batch_size, max_length_of(model_dir), spec.mesh,
                  spec.pack_tokens)


def scorer_for(model_dir: Path, dtype: str = "float32", batch_size: int = 16, mesh=None) -> Scorer:
    """build_scorer(EvalSpec(model_dir, dtype, batch_size, mesh))."""
    return build_scorer(EvalSpec(str(model_dir), dtype, batch_size, mesh))


def load_params(model_dir: Path, dtype: str = "float32", mesh=None):
    """The HF checkpoint in model_dir as Flax params (on mesh's shards when given)."""
    return load_hf(model_dir, parse_dtype(dtype), mesh=mesh)[1]


class InRunEvaluator:
    """--eval_every: the native evaluator on the current weights, as flat metrics for the run log."""

    def __init__(self, scorer: Scorer, full_params, tasks: list[Task], nll_tokens: int = 128):
        self.scorer, self.tasks, self.nll_tokens = scorer, tasks, nll_tokens
        self.full = scorer.place(full_params)

    def __call__(self, trainable: dict) -> dict:
        record = {}
        results = evaluate_tasks(self.scorer, merge(self.full, trainable), self.tasks, nll_tokens=self.nll_tokens)
        for name, res in results.items():
            for key in ("acc", "acc_norm", "nll"):
                if key in res:
                    record[f"eval/{name}/{key}"] = res[key]
        return record


def format_table(results: dict) -> str:
    """The markdown table of evaluate_tasks' results: each number with its 95% interval."""
    ci = lambda r, key, scale: f" [{stats.fmt_ci(r[key + '_ci'], scale, 1 if scale == 100 else 3)}]" if key + "_ci" in r else ""
    rows = [[name, r["n"], f"{100 * r['acc']:.1f}{ci(r, 'acc', 100)}",
             f"{100 * r['acc_norm']:.1f}{ci(r, 'acc_norm', 100)}" if "acc_norm" in r else "-",
             f"{r['nll']:.3f}{ci(r, 'nll', 1)}" if "nll" in r else "-"] for name, r in results.items()]
    table = outputs.markdown_table(["task", "n", "acc % [95% CI]", "acc_norm %", "NLL/token"], rows)
    topics = [(name, t, r) for name, res in results.items() for t, r in res.get("by_topic", {}).items()]
    if topics:
        table += "\n\n" + outputs.markdown_table(
            ["task", "topic", "n", "acc % [95% CI]"],
            [[name, t, r["n"], f"{100 * r['acc']:.1f} [{stats.fmt_ci(r['acc_ci'])}]"] for name, t, r in topics])
    return table


WMDP_COLUMNS = (("wmdp_bio", "WMDP-Bio"), ("wmdp_cyber", "WMDP-Cyber"), ("mmlu", "MMLU"),
                ("mmlu_college_biology", "College Bio."), ("mmlu_high_school_biology", "HS Bio."),
                ("mmlu_virology", "Virology"), ("mmlu_college_computer_science", "College CS"),
                ("mmlu_computer_security", "Computer Sec."), ("mmlu_rest", "MMLU, the other subjects"))


def wmdp_table(models: dict) -> str:
    """The WMDP paper's table (its Table 2 layout: WMDP, MMLU and MMLU's neighbouring subjects as columns), a
    row per model ({label: evaluate_tasks' results}), accuracy % with its Wilson 95% interval and n."""
    columns = [(key, label) for key, label in WMDP_COLUMNS if any(key in r for r in models.values())]
    rows = [[model] + [f"{100 * r[key]['acc']:.1f} [{stats.fmt_ci(r[key]['acc_ci'])}] (n={r[key]['n']})"
                       if key in r else "-" for key, _ in columns] for model, r in models.items()]
    return outputs.markdown_table(["model"] + [label for _, label in columns], rows)


INTERVALS = ("acc and acc_norm: Wilson 95% score intervals over questions; NLL per token: 95% percentile "
             "bootstrap over texts (2,000 resamples); samples.jsonl: a record per question and per text")


def evaluate_cli(cfg) -> None:
    """--mode=eval: the native evaluator on --model over --eval_tasks; JSON to --output_dir/eval.json and a
    record per question to --output_dir/samples.jsonl."""
    tasks = load_tasks(cfg.eval_tasks, cfg.eval_limit, cfg.eval_split)  # bad task files fail here, before the model is loaded
    # eval.json, written last, marks a finished evaluation: a directory without it (a run stopped or a disk
    # full while writing) is taken again, and its samples.jsonl replaced
    out = outputs.claim(cfg.output_dir, ("eval.json",)) if cfg.output_dir else None
    run = RunContext.of(cfg)
    began = time.time()
    scorer = build_scorer(EvalSpec.of(cfg, run.model_dir, run.mesh))
    samples: list[dict] = []
    params = load_params(run.model_dir, cfg.dtype, run.mesh)
    results = evaluate_tasks(scorer, params, tasks, nll_tokens=cfg.eval_nll_tokens, samples=samples)
    print(format_table(results))
    generation, generated = None, []
    if cfg.eval_generate:
        reference = resolve_model(cfg.eval_fluency_model) if cfg.eval_fluency_model else run.model_dir
        same = str(reference) == str(run.model_dir)
        ref_scorer = scorer if same else build_scorer(EvalSpec.of(cfg, reference, run.mesh))
        ref_params = params if same else load_params(reference, cfg.dtype, run.mesh)
        generation, generated = generate_report(scorer.model, scorer.place(params), scorer.tokenizer, tasks,
                                                cfg.eval_generate, cfg.eval_generate_tokens, ref_scorer,
                                                ref_scorer.place(ref_params))
        print(f"\nWhat the model writes ({cfg.eval_generate_tokens} greedy tokens per held-out prompt; fluency: "
              f"repetition, and NLL per token under {reference}):\n{format_generation(generation, generated)}")
    report = any(spec.split(":")[0] == "wmdp_report" for spec in cfg.eval_tasks)
    if report:
        table = wmdp_table({str(run.model_dir): results})
        print(f"\nThe WMDP paper's table (accuracy % [95% CI]):\n{table}")
    print(f"native evaluation: {time.time() - began:.1f} s ({INTERVALS})")
    if out is not None:
        write_samples(out / "samples.jsonl", samples)
        if generated:
            write_samples(out / "generations.jsonl", generated)
        if report:
            outputs.write_text(out / "wmdp_report.md", f"# {run.model_dir}\n\n{table}\n\n{INTERVALS}\n")
        outputs.write_json(out / "eval.json", {"model": str(run.model_dir), "dtype": cfg.dtype, "mesh": cfg.mesh,
                                               "split": cfg.eval_split, "intervals": INTERVALS, "results": results,
                                               **({"generation": generation} if generation else {})})
        print(f"wrote {out / 'eval.json'} and {out / 'samples.jsonl'}")
