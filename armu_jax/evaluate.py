"""Native evaluation on the Flax model: lm-eval-style multiple choice and held-out NLL per token.

Multiple choice follows lm-eval's `multiple_choice` output type: each choice is scored by the
summed log-likelihood of its continuation tokens after the context (continuation tokens are
those of context+continuation past the context's tokens); acc takes the argmax, acc_norm the
argmax of log-likelihood per character of the continuation.

The demo tasks are built from held-out Wikipedia articles (see data.is_held_out): for each
article, "<title> is" followed by one of four descriptions from articles of the same topic.
"""
from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from armu_jax.data import demo_topic_articles
from armu_jax.errors import UserError
from armu_jax.model import LlamaForCausalLM

DEMO_EVAL_TOPICS = ("bio", "cyber", "retain")


def _bucket(length: int) -> int:
    """Lengths padded to powers of two (>= 16): few shapes, so few compilations of the full model."""
    return max(16, 1 << (length - 1).bit_length())


def demo_mc_items(topic: str, seed: int = 0, limit: int = 0) -> list[dict]:
    """4-way 'which description fits this title' items from held-out articles of a demo topic."""
    articles = [a for a in demo_topic_articles(topic, held_out=True) if a.get("description")]
    descriptions = sorted({a["description"] for a in articles})
    rng = random.Random(f"{seed}:{topic}")
    items = []
    for article in articles:
        others = [d for d in descriptions if d != article["description"]]
        choices = rng.sample(others, 3) + [article["description"]]
        rng.shuffle(choices)
        items.append({"context": f"{article['title']} is", "choices": [" " + c for c in choices],
                      "answer": choices.index(article["description"]), "title": article["title"]})
    return items[:limit] if limit else items


def demo_nll_texts(topic: str, limit: int = 0) -> list[str]:
    texts = [a["extract"] for a in demo_topic_articles(topic, held_out=True)]
    return texts[:limit] if limit else texts


@partial(jax.jit, static_argnums=0)
def _token_logprobs(model, params, ids, mask):
    """log p(ids[:, t+1] | ids[:, :t+1]) for each t, [B, L-1]."""
    logits = model.apply(params, ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


class Scorer:
    """Batched, jitted scoring of (context, continuation) pairs with right padding."""

    def __init__(self, model: LlamaForCausalLM, params, tokenizer, batch_size: int = 16, max_len: int = 256):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size, self.max_len = batch_size, max_len

    def _encode(self, context: str, continuation: str) -> tuple[list[int], int]:
        ctx = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = self.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        n_cont = len(whole) - len(ctx)
        if len(whole) > self.max_len:  # keep the continuation, trim the context from the left
            whole = whole[-self.max_len:]
        return whole, n_cont

    def loglikelihoods(self, pairs: list[tuple[str, str]], desc: str = "scoring") -> np.ndarray:
        encoded = [self._encode(c, x) for c, x in pairs]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        out = np.zeros(len(encoded), np.float64)
        pad = self.tokenizer.pad_token_id
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, leave=False):
            index = order[start:start + self.batch_size]
            length = _bucket(max(len(encoded[i][0]) for i in index))
            ids = np.full((self.batch_size, length), pad, np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for row, i in enumerate(index):
                tokens = encoded[i][0]
                ids[row, :len(tokens)] = tokens
                mask[row, :len(tokens)] = 1
            logp = np.asarray(_token_logprobs(self.model, self.params, ids, mask))
            for row, i in enumerate(index):
                tokens, n_cont = encoded[i]
                out[i] = logp[row, len(tokens) - 1 - n_cont:len(tokens) - 1].sum()
        return out

    def multiple_choice(self, items: list[dict], desc: str = "multiple choice") -> dict:
        pairs = [(it["context"], choice) for it in items for choice in it["choices"]]
        ll = self.loglikelihoods(pairs, desc)
        acc = acc_norm = 0
        cursor = 0
        for it in items:
            n = len(it["choices"])
            scores = ll[cursor:cursor + n]
            cursor += n
            lengths = np.array([len(c) for c in it["choices"]], np.float64)
            acc += int(np.argmax(scores) == it["answer"])
            acc_norm += int(np.argmax(scores / lengths) == it["answer"])
        return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}

    def nll_per_token(self, texts: list[str], max_tokens: int = 128, desc: str = "nll") -> float:
        """Mean negative log-likelihood per predicted token of the texts (each truncated to max_tokens)."""
        total = count = 0.0
        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
        encoded = [e for e in encoded if len(e) >= 2]
        pad = self.tokenizer.pad_token_id
        for start in tqdm(range(0, len(encoded), self.batch_size), desc=desc, leave=False):
            chunk = encoded[start:start + self.batch_size]
            length = _bucket(max(len(e) for e in chunk))
            ids = np.full((self.batch_size, length), pad, np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for row, e in enumerate(chunk):
                ids[row, :len(e)] = e
                mask[row, :len(e)] = 1
            logp = np.asarray(_token_logprobs(self.model, self.params, ids, mask))
            valid = mask[:, 1:].astype(bool)
            total += -logp[valid].sum()
            count += valid.sum()
        return float(total / count)


def evaluate_demo(scorer: Scorer, limit: int = 0, nll_limit: int = 0) -> dict:
    """Per demo topic: acc, acc_norm on the description questions and held-out NLL per token."""
    results = {}
    for topic in DEMO_EVAL_TOPICS:
        mc = scorer.multiple_choice(demo_mc_items(topic, limit=limit), desc=f"{topic} questions")
        mc["nll"] = scorer.nll_per_token(demo_nll_texts(topic, nll_limit or limit), desc=f"{topic} nll")
        results[topic] = mc
    return results


def scorer_for(model_dir: Path, dtype=jnp.float32, batch_size: int = 16) -> Scorer:
    from armu_jax.data import load_tokenizer
    from armu_jax.hf_io import load_hf
    cfg, params = load_hf(model_dir, dtype)
    return Scorer(LlamaForCausalLM(cfg, dtype=dtype, param_dtype=dtype), params, load_tokenizer(model_dir),
                  batch_size)


def evaluate_cli(cfg) -> None:
    """--mode=eval: score --model on the demo tasks and print JSON."""
    from armu_jax.embedded import resolve_model
    if list(cfg.eval_tasks) != ["demo"]:
        raise UserError(f"--eval_tasks={','.join(cfg.eval_tasks)}: the native evaluator supports 'demo' here")
    results = evaluate_demo(scorer_for(resolve_model(cfg.model)), limit=cfg.eval_limit)
    print(json.dumps(results, indent=2))
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(results, indent=2))

