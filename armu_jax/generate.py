"""Greedy continuations of prompts: what a model now says (the demo's side-by-side report).

Greedy decoding as transformers' `generate(do_sample=False)` does it: each step appends the argmax of
the next-token logits, and a row stops at the tokenizer's eos (what it emitted up to there is kept).
Prompts are encoded with the tokenizer's own special tokens (Gemma's <bos>; SmolLM2 has none), as
transformers' tokenizer call gives them to `generate`.

With a key/value cache (CausalLM.decode): the prompts, left-padded to one length, run once (the
prefill), then every new token is one position through the layers, attending to the cached keys of the
prompt and of the tokens before it. Two compiled programs (prefill, step) serve every prompt of a length
bucket. `cached=False` runs the whole row again for every token instead (the reference the cache is
tested against).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from armu_jax.errors import UserError
from armu_jax.model import CausalLM, empty_caches


@partial(jax.jit, static_argnums=0)
def _next_tokens(model, params, ids, positions, segment, at):
    """argmax of the next-token logits at position at[b] of each row (the whole row run): [B]."""
    branch = jnp.zeros_like(ids)
    logits = model.apply(params, ids, positions, segment, branch, at[:, None], method=CausalLM.logits_packed)
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=0)
def _decode(model, params, ids, positions, key_positions, key_valid, caches, at):
    """(argmax of the last token's next-token logits [B], the updated caches)."""
    logits, caches = model.apply(params, ids, positions, key_positions, key_valid, caches, at, method=CausalLM.decode)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), caches


def greedy(model: CausalLM, params, tokenizer, prompts: list[str], new_tokens: int = 24, cached: bool = True) -> list[str]:
    """Each prompt's greedy continuation (the decoded new tokens, special tokens left out)."""
    return [tokenizer.decode(o, skip_special_tokens=True)
            for o in greedy_ids(model, params, tokenizer, prompts, new_tokens, cached)]


def _encode(tokenizer, prompts: list[str], new_tokens: int) -> list[list[int]]:
    if new_tokens < 1:
        raise UserError(f"new_tokens={new_tokens}: must be at least 1")
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    if any(not e for e in encoded):
        raise UserError("an empty prompt: greedy continuation needs at least one token")
    return encoded


def greedy_ids(model: CausalLM, params, tokenizer, prompts: list[str], new_tokens: int = 24,
               cached: bool = True) -> list[list[int]]:
    """Each prompt's greedy new tokens, up to new_tokens or before the first eos."""
    encoded = _encode(tokenizer, prompts, new_tokens)
    rows, eos = len(prompts), tokenizer.eos_token_id
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(rows, bool)

    def take(tokens) -> None:
        for r in range(rows):
            if done[r]:
                continue
            if eos is not None and int(tokens[r]) == eos:
                done[r] = True
            else:
                out[r].append(int(tokens[r]))
                done[r] = len(out[r]) >= new_tokens
    if cached:
        prompt = -(-max(map(len, encoded)) // 16) * 16  # left-padded prompts: few prefill shapes
        length = prompt + -(-new_tokens // 16) * 16
        ids = np.zeros((rows, prompt), np.int32)
        key_positions = np.zeros((rows, length), np.int32)
        key_valid = np.zeros((rows, length), bool)
        for r, e in enumerate(encoded):
            ids[r, prompt - len(e):] = e
            key_positions[r, prompt - len(e):prompt] = np.arange(len(e))
            key_valid[r, prompt - len(e):prompt] = True
        lengths = np.array([len(e) for e in encoded], np.int32)
        caches = empty_caches(model.cfg, rows, length, model.dtype)
        nxt, caches = _decode(model, params, ids, key_positions[:, :prompt], key_positions, key_valid, caches, 0)
        take(np.asarray(nxt))
        for t in range(new_tokens - 1):
            if done.all():
                break
            slot = prompt + t
            key_positions[:, slot] = lengths + t
            key_valid[:, slot] = True
            nxt, caches = _decode(model, params, np.asarray(nxt)[:, None], key_positions[:, slot:slot + 1],
                                  key_positions, key_valid, caches, slot)
            take(np.asarray(nxt))
        return out
    length = -(-(max(map(len, encoded)) + new_tokens) // 16) * 16  # one shape for every step
    ids = np.zeros((rows, length), np.int32)
    segment = np.full((rows, length), -1, np.int32)
    for r, e in enumerate(encoded):
        ids[r, :len(e)] = e
        segment[r, :len(e)] = 0
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    ends = np.array([len(e) for e in encoded], np.int32)  # the next free position of each row
    for _ in range(new_tokens):
        if done.all():
            break
        nxt = np.asarray(_next_tokens(model, params, ids, positions, segment, ends - 1))
        take(nxt)
        for r in range(rows):
            if ends[r] < length and not (eos is not None and int(nxt[r]) == eos):
                ids[r, ends[r]] = nxt[r]
                segment[r, ends[r]] = 0
                ends[r] += 1
    return out
