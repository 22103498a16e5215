"""Native evaluation on the Flax model: lm-eval's multiple-choice scoring and held-out NLL, in JAX.

Multiple choice computes what lm-eval's `hf` backend and `multiple_choice` output type compute:
a request (context, continuation) is split as HFLM._encode_pair does (trailing whitespace of the
context moves to the continuation; continuation tokens are those of context+continuation past
the context's tokens; no special tokens), truncated from the left to the model's max length,
and scored by the summed log-probability of the continuation tokens. acc takes the argmax,
acc_norm the argmax of log-likelihood per character of the choice (without the delimiter).

Speed: requests are sorted by length and batched with few padded shapes (see _bucket), and
the LM head and log-softmax run only at the scored positions, not over the whole sequence;
requests that differ only in a one-token continuation (A/B/C/D) share one forward.
"""
from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from armu_jax import sharding
from armu_jax.errors import UserError
from armu_jax.hf_io import parse_dtype
from armu_jax.model import LlamaForCausalLM
from armu_jax.params import merge
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
def _scored_logprobs(model, params, ids, mask, at, targets):
    """log p(targets[b, k, c] | ids[b, :at[b, c] + 1]): [B, K, C] in float32 (K target sets per row)."""
    logits = model.apply(params, ids, mask, at, method=LlamaForCausalLM.logits_at)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, C, V]
    return jnp.take_along_axis(logp[:, None], targets[..., None], axis=-1)[..., 0]


class Scorer:
    """Batched, jitted log-likelihoods of token sequences on one model."""

    def __init__(self, model: LlamaForCausalLM, params, tokenizer, batch_size: int = 16, max_length: int = 2048,
                 mesh=None):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        # On a mesh the rows of a batch are split over data x fsdp (params are laid out by the caller).
        self.batch_size = sharding.batch_rows(mesh, batch_size) if mesh is not None else batch_size
        self.rows = sharding.batch_sharding(mesh) if mesh is not None else None
        self.max_length = max_length

    # -- lm-eval's request encoding (HFLM._encode_pair and _loglikelihood_tokens' truncation)
    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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

    def _row(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """Model input and how many of its last positions are scored (lm-eval's left truncation)."""
        inp = (context + continuation)[-(self.max_length + 1):][:-1]
        return inp, len(continuation)

    # -- scoring
    def _score_rows(self, rows: list[tuple[list[int], list[int], list[int]]], desc: str) -> list[np.ndarray]:
        """rows: (input tokens, positions scored, target tokens); per row the target log-probs.

        Rows with the same input and positions (e.g. one MMLU question's four one-letter answers)
        share one forward: each is a target set of that sequence.
        """
        groups: dict[tuple, list[int]] = {}
        for i, (tokens, positions, _) in enumerate(rows):
            groups.setdefault((tuple(tokens), tuple(positions)), []).append(i)
        keys = sorted(groups, key=lambda key: -len(key[0]))
        out: list[np.ndarray | None] = [None] * len(rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        bs = self.batch_size
        for start in tqdm(range(0, len(keys), bs), desc=desc, leave=False, unit="batch"):
            chunk = keys[start:start + bs]
            length = _bucket(max(len(tokens) for tokens, _ in chunk), 16)
            width = _bucket(max(len(positions) for _, positions in chunk), 8)
            sets = _bucket(max(len(groups[key]) for key in chunk), 1)
            ids = np.full((bs, length), pad, np.int32)
            mask = np.zeros((bs, length), np.int32)
            at = np.zeros((bs, width), np.int32)
            targets = np.zeros((bs, sets, width), np.int32)
            for r, (tokens, positions) in enumerate(chunk):
                ids[r, :len(tokens)], mask[r, :len(tokens)] = tokens, 1
                at[r, :len(positions)] = positions
                for k, i in enumerate(groups[(tokens, positions)]):
                    targets[r, k, :len(rows[i][2])] = rows[i][2]
            if self.rows is not None:
                ids, mask, at, targets = sharding.place((ids, mask, at, targets), (self.rows,) * 4)
            logp = np.asarray(_scored_logprobs(self.model, self.params, ids, mask, at, targets), np.float64)
            for r, key in enumerate(chunk):
                for k, i in enumerate(groups[key]):
                    out[i] = logp[r, k, :len(key[1])]
        return out

    def loglikelihoods(self, pairs: list[tuple[str, str]], desc: str = "scoring") -> np.ndarray:
        """Summed log-probability of each continuation given its context, as lm-eval's loglikelihood."""
        rows = []
        for context, continuation in pairs:
            ctx, cont = self._encode_pair(context, continuation)
            inp, n = self._row(ctx, cont)
            rows.append((inp, list(range(len(inp) - n, len(inp))), cont))
        return np.array([float(lp.sum()) for lp in self._score_rows(rows, desc)], np.float64)

    def multiple_choice(self, task: Task) -> dict:
        """acc (and acc_norm) of a task, with each doc's log-likelihoods and predictions."""
        ll = self.loglikelihoods(task.requests(), desc=task.name)
        acc = acc_norm = 0
        cursor = 0
        preds = []
        for doc in task.docs:
            choices = task.choices(doc)
            scores = ll[cursor:cursor + len(choices)]
            cursor += len(choices)
            pred = int(np.argmax(scores))
            pred_norm = int(np.argmax(scores / np.array([float(len(c)) for c in choices])))
            acc += pred == doc["answer"]
            acc_norm += pred_norm == doc["answer"]
            preds.append({"pred": pred, "pred_norm": pred_norm, "loglikelihoods": scores.tolist()})
        n = len(task.docs)
        result = {"acc": acc / n, "n": n, "docs": preds}
        if "acc_norm" in task.metrics:
            result["acc_norm"] = acc_norm / n
        return result

    def nll_per_token(self, texts: list[str], max_tokens: int = 128, desc: str = "nll") -> float:
        """Mean negative log-likelihood per predicted token of the texts (each cut to max_tokens)."""
        encoded = [self._tokens(t)[:max_tokens] for t in texts]
        rows = [(e[:-1], list(range(len(e) - 1)), e[1:]) for e in encoded if len(e) >= 2]
        if not rows:
            raise UserError("no held-out text of at least 2 tokens to compute NLL on")
        logps = self._score_rows(rows, desc)
        return float(-sum(lp.sum() for lp in logps) / sum(len(lp) for lp in logps))


def evaluate_tasks(scorer: Scorer, tasks: list[Task], limit: int = 0, nll: bool = True,
                   nll_tokens: int = 128) -> dict:
    """{task: {acc, acc_norm?, n, nll?}} for each task (nll, over each text's first nll_tokens
    tokens, for tasks with held-out texts)."""
    results = {}
    for task in tasks:
        task = task.limited(limit)
        res = scorer.multiple_choice(task)
        res.pop("docs")
        if nll and task.nll_texts:
            res["nll"] = scorer.nll_per_token(task.nll_texts, nll_tokens, desc=f"{task.name} nll")
        results[task.name] = res
    return results


def max_length_of(model_dir: Path) -> int:
    """lm-eval HFLM's max_length: the config's max_position_embeddings (else 2048)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 2048)


def scorer_for(model_dir: Path, dtype=jnp.float32, batch_size: int = 16, params=None, mesh=None) -> Scorer:
    """A Scorer of the HF model in model_dir (or of given params of its shape), in dtype; with a mesh,
    the params are sharded by the sharding table and each batch's rows over data x fsdp."""
    from armu_jax.data import load_tokenizer
    from armu_jax.hf_io import load_hf
    from armu_jax.model_config import ModelConfig
    if params is None:
        cfg, params = load_hf(model_dir, dtype, mesh=mesh)
    else:
        cfg = ModelConfig.from_dir(model_dir)
    if mesh is not None:
        params = jax.device_put(params, sharding.param_shardings(params, mesh))
    return Scorer(LlamaForCausalLM(cfg, dtype=dtype, param_dtype=dtype), params, load_tokenizer(model_dir),
                  batch_size, max_length_of(model_dir), mesh)


class InRunEvaluator:
    """--eval_every: the native evaluator on the current weights, as flat metrics for the run log."""

    def __init__(self, model_dir: Path, full_params, dtype, tasks: list[Task], batch_size: int = 16, mesh=None):
        self.tasks = tasks
        self.scorer = scorer_for(model_dir, dtype, batch_size, params=full_params, mesh=mesh)
        self.full = self.scorer.params

    def __call__(self, trainable: dict) -> dict:
        self.scorer.params = merge(self.full, trainable)
        record = {}
        for name, res in evaluate_tasks(self.scorer, self.tasks).items():
            for key in ("acc", "acc_norm", "nll"):
                if key in res:
                    record[f"eval/{name}/{key}"] = res[key]
        return record


def format_table(results: dict) -> str:
    lines = ["| task | n | acc | acc_norm | NLL/token |", "|---|---|---|---|---|"]
    for name, r in results.items():
        norm = f"{100 * r['acc_norm']:.1f}" if "acc_norm" in r else "-"
        nll = f"{r['nll']:.3f}" if "nll" in r else "-"
        lines.append(f"| {name} | {r['n']} | {100 * r['acc']:.1f} | {norm} | {nll} |")
    return "\n".join(lines)


def evaluate_cli(cfg) -> None:
    """--mode=eval: the native evaluator on --model over --eval_tasks; JSON to --output_dir/eval.json."""
    from armu_jax.embedded import resolve_model
    model_dir = resolve_model(cfg.model)
    tasks = load_tasks(cfg.eval_tasks)  # bad task files fail here, before the model is loaded
    if cfg.output_dir and (Path(cfg.output_dir) / "eval.json").exists():
        raise UserError(f"{Path(cfg.output_dir) / 'eval.json'} exists; choose a new --output_dir")
    began = time.time()
    scorer = scorer_for(model_dir, parse_dtype(cfg.dtype), cfg.eval_batch_size, mesh=sharding.make_mesh(cfg.mesh))
    results = evaluate_tasks(scorer, tasks, limit=cfg.eval_limit)
    print(format_table(results))
    print(f"native evaluation: {time.time() - began:.1f} s")
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps({"model": str(model_dir), "dtype": cfg.dtype, "mesh": cfg.mesh,
                                                   "results": results}, indent=2))
        print(f"wrote {out / 'eval.json'}")
