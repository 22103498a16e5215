"""Greedy continuations (armu_jax/generate.py) against transformers' generate(do_sample=False) on the
embedded SmolLM2-135M: the same tokens, and the same stop at eos.

Two float32 implementations may pick different tokens where the top two logits are within their
rounding of each other. The bound for such a tie is measured, not guessed: test_model.py holds the port's
logits to transformers' within a few 1e-5 on SmolLM2; TIE = 1e-3 is 20x that. Where the tokens differ,
the test requires transformers' own logits at that step to be within TIE of each other (a real tie);
any other difference fails.
"""
import numpy as np
import pytest
import torch
import transformers

from armu_jax.data import load_tokenizer
from armu_jax.generate import greedy, greedy_ids
from armu_jax.hf_io import load_hf
from armu_jax.model import CausalLM

pytestmark = pytest.mark.reference

PROMPTS = ["The mitochondrion is", "A compiler translates", "Paris is the capital of"]
NEW = 12
TIE = 1e-3


def _hf_greedy(model, tokenizer, prompt: str) -> tuple[list[int], list[np.ndarray]]:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
    new = out.sequences[0, ids.shape[1]:].tolist()
    return new, [s[0].numpy() for s in out.scores]


def test_greedy_matches_transformers(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    cfg, params = load_hf(smollm2_dir)
    mine = greedy_ids(CausalLM(cfg), params, tokenizer, PROMPTS, NEW)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    hf.generation_config.eos_token_id = tokenizer.eos_token_id
    for prompt, ours in zip(PROMPTS, mine):
        theirs, scores = _hf_greedy(hf, tokenizer, prompt)
        if tokenizer.eos_token_id in theirs:  # ours stops before eos and leaves it out
            theirs = theirs[:theirs.index(tokenizer.eos_token_id)]
        if ours != theirs:
            k = next(i for i in range(min(len(ours), len(theirs))) if ours[i] != theirs[i])
            gap = scores[k][theirs[k]] - scores[k][ours[k]]
            assert gap < TIE, f"{prompt!r}: token {k} is {ours[k]}, transformers' {theirs[k]} (logit gap {gap:.2e})"
        assert len(ours) == len(theirs) == NEW


class _StopAt:
    """The tokenizer with another eos id."""

    def __init__(self, tokenizer, eos: int):
        self.tokenizer, self.eos_token_id = tokenizer, eos

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def test_greedy_stops_at_eos(smollm2_dir):
    """With eos set to the third token the first prompt continues with, that row stops before it (at most two
    tokens, kept); the other rows run on to the limit unless they meet the same token."""
    tokenizer = load_tokenizer(smollm2_dir)
    cfg, params = load_hf(smollm2_dir)
    model = CausalLM(cfg)
    free = greedy_ids(model, params, tokenizer, PROMPTS, 6)
    stop = free[0][2]
    stopped = greedy_ids(model, params, _StopAt(tokenizer, stop), PROMPTS, 6)
    assert len(stopped[0]) <= 2
    for a, b in zip(free, stopped):
        assert b == (a[:a.index(stop)] if stop in a else a)
    assert greedy(model, params, tokenizer, PROMPTS[:1], 6)[0] == tokenizer.decode(free[0], skip_special_tokens=True)


def test_the_cache_gives_what_the_whole_row_gives(gemma3_dir):
    """Gemma-3-270M (sliding-window and full layers, q/k norms): prompts of different lengths,
    left-padded into one prefill, then one token at a time from the key/value cache, continue exactly as
    running the whole row again for every token does: the same tokens."""
    tokenizer = load_tokenizer(gemma3_dir)
    cfg, params = load_hf(gemma3_dir)
    model = CausalLM(cfg)
    prompts = ["The heart pumps blood", "In computer networking, a firewall is a system that"]
    cached = greedy_ids(model, params, tokenizer, prompts, 6)
    whole = greedy_ids(model, params, tokenizer, prompts, 6, cached=False)
    assert cached == whole and all(len(c) == 6 for c in cached), (cached, whole)


def test_repetition_and_prompts():
    from armu_jax.fluency import prompts_of, repetition
    from armu_jax.tasks import load_tasks
    assert repetition([1, 2, 3, 4]) == 0.0 and repetition([5]) == 0.0
    assert repetition([7, 8, 7, 8, 7, 8]) == pytest.approx(1 - 2 / 5)  # bigrams 78 87 78 87 78: 2 distinct of 5
    bio = load_tasks(["demo_bio"])[0]
    assert prompts_of(bio, 2) == [" ".join(t.split()[:8]) for t in bio.nll_texts[:2]]
    mmlu = load_tasks(["mmlu"], 3)[0]
    assert prompts_of(mmlu, 5) == [" ".join(d["question"].split()[:8]) for d in mmlu.docs[:3]]


@pytest.mark.cli
def test_eval_generates_and_measures_fluency(tmp_path, tiny_llama, smollm2_dir):
    """--mode=eval --eval_generate: every continuation in generations.jsonl with its repetition and its NLL per
    token under --eval_fluency_model (SmolLM2 here), which is what transformers computes for that text."""
    import json

    from helpers import run_cli
    out = tmp_path / "eval"
    result = run_cli(f"--model={tiny_llama}", "--mode=eval", "--eval_tasks=demo_bio,demo_retain", "--eval_limit=3",
                     "--eval_generate=2", "--eval_generate_tokens=6", f"--eval_fluency_model={smollm2_dir}",
                     f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "What the model writes" in result.stdout and "repetition" in result.stdout
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    summary = json.loads((out / "eval.json").read_text())["generation"]
    assert [r["task"] for r in records] == ["demo_bio"] * 2 + ["demo_retain"] * 2
    assert summary["demo_bio"]["n"] == 2
    assert summary["demo_bio"]["repetition"] == pytest.approx(np.mean([r["repetition"] for r in records[:2]]))
    tokenizer = load_tokenizer(smollm2_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    for r in records:
        if not r["text"].strip():
            continue
        context = tokenizer(r["prompt"])["input_ids"]
        whole = tokenizer(r["prompt"] + r["text"])["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].double(), -1)
        nll = -sum(float(logp[i - 1, whole[i]]) for i in range(len(context), len(whole)))
        assert r["nll"] == pytest.approx(nll / r["tokens"], abs=2e-3), r
