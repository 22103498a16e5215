"""Greedy continuations of prompts: what a model now says, for the demo's side-by-side report.

Greedy decoding as transformers' `generate(do_sample=False)` does it: each step appends the argmax of
the next-token logits, and a row stops at the tokenizer's eos (what it emitted up to there is kept).
Prompts are encoded with the tokenizer's own special tokens (Gemma's <bos>; SmolLM2 has none), as
transformers' tokenizer call gives them to `generate`.

Every step runs the whole fixed-length row again (no key/value cache): one compiled program for all
steps and prompts, at a cost that is small for the demo's handful of short prompts (a few prompts
x tens of tokens) and grows with the square of the length: this is not a serving loop.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from armu_jax.errors import UserError
from armu_jax.model import CausalLM


@partial(jax.jit, static_argnums=0)
def _next_tokens(model, params, ids, positions, segment, at):
    """argmax of the next-token logits at position at[b] of each row: [B]."""
    branch = jnp.zeros_like(ids)
    logits = model.apply(params, ids, positions, segment, branch, at[:, None], method=CausalLM.logits_packed)
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)


def greedy(model: CausalLM, params, tokenizer, prompts: list[str], new_tokens: int = 24) -> list[str]:
    """Each prompt's greedy continuation (the decoded new tokens, special tokens left out)."""
    return [tokenizer.decode(o, skip_special_tokens=True) for o in greedy_ids(model, params, tokenizer, prompts,
                                                                              new_tokens)]


def greedy_ids(model: CausalLM, params, tokenizer, prompts: list[str], new_tokens: int = 24) -> list[list[int]]:
    """Each prompt's greedy new tokens, up to new_tokens or before the first eos."""
    if new_tokens < 1:
        raise UserError(f"new_tokens={new_tokens}: must be at least 1")
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    if any(not e for e in encoded):
        raise UserError("an empty prompt: greedy continuation needs at least one token")
    length = -(-(max(map(len, encoded)) + new_tokens) // 16) * 16  # one shape for every step
    rows = len(prompts)
    ids = np.zeros((rows, length), np.int32)
    segment = np.full((rows, length), -1, np.int32)
    for r, e in enumerate(encoded):
        ids[r, :len(e)] = e
        segment[r, :len(e)] = 0
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    ends = np.array([len(e) for e in encoded], np.int32)  # the next free position of each row
    done = np.zeros(rows, bool)
    eos = tokenizer.eos_token_id
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(new_tokens):
        nxt = np.asarray(_next_tokens(model, params, ids, positions, segment, ends - 1))
        for r in range(rows):
            if done[r]:
                continue
            if eos is not None and int(nxt[r]) == eos:
                done[r] = True
                continue
            out[r].append(int(nxt[r]))
            ids[r, ends[r]] = nxt[r]
            segment[r, ends[r]] = 0
            ends[r] += 1
        if done.all():
            break
    return out
