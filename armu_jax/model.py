"""A Flax (linen) port of Hugging Face's decoders (Llama, Mistral, Qwen2/3, Gemma-2/3, Phi-3, OLMo-2), with HF
parameter names: one decoder, each family's differences being ModelConfig fields (families.py).

Parameter paths mirror HF's keys (`model/layers_7/mlp/down_proj/kernel` is
`model.layers.7.mlp.down_proj.weight` transposed), RoPE is HF's `rotate_half` form, and
attention follows HF's SDPA semantics on padded batches: a query whose keys are all masked
(a left-pad position) gets a zero attention output.

Besides the full forward, two partial forwards serve the unlearning step:
`hidden_upto` (layers 0..l, nothing after) and `run_layers` (layers a..b from a given
residual stream).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from armu_jax import packing as packing_lib
from armu_jax.errors import UserError
from armu_jax.model_config import ModelConfig, Rope

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: str):
    """A dtype setting (--dtype, --export_dtype) as the jnp dtype."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def rope_inv_freq(rope: Rope, head_dim: int, dtype=jnp.float32, long: bool = False) -> jnp.ndarray:
    """HF's inverse frequencies of the rotated part of a head, with the linear, Llama-3 and LongRoPE
    scalings (long: LongRoPE's long factors, which transformers takes beyond the original context)."""
    dim = int(head_dim * rope.fraction)
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, dim, 2, dtype=dtype) / dim))
    if rope.type == "linear":
        return inv_freq / rope.scaling[0]
    if rope.type == "llama3":
        factor, low_freq_factor, high_freq_factor, old_context = rope.scaling
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    if rope.type == "longrope":
        short, long_factors, _ = rope.scaling
        ext = jnp.asarray(long_factors if long else short, dtype)
        return 1.0 / (ext * rope.theta ** (jnp.arange(0, dim, 2, dtype=dtype) / dim))
    return inv_freq


def rope_tables(rope: Rope, head_dim: int, positions, dtype):
    """(cos, sin) [B, T, rotary dim] at the positions, as HF's rotary embedding gives them."""
    rope_dtype = jnp.promote_types(dtype, jnp.float32)  # as HF: angles in at least float32
    inv_freq = rope_inv_freq(rope, head_dim, rope_dtype)
    if rope.type == "longrope":  # transformers switches to the long factors past the original context
        beyond = jnp.max(positions) + 1 > rope.scaling[2]
        inv_freq = jnp.where(beyond, rope_inv_freq(rope, head_dim, rope_dtype, long=True), inv_freq)
    freqs = positions.astype(rope_dtype)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if rope.attention_factor != 1.0:
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    return cos.astype(dtype), sin.astype(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """x: [B, T, H, hd]; cos/sin: [B, T, rotary dim]; dimensions past the rotary ones pass unchanged."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]


class RMSNorm(nn.Module):
    """RMSNorm as each family writes it: scale by (offset + weight), Gemma's offset being 1; Llama casts the
    normalised x to the compute dtype before the weight, Gemma and OLMo-2 multiply in float32 first."""
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    offset: float = 0.0
    weight_first: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.weight_first:
            return ((self.offset + weight.astype(jnp.float32)) * x32).astype(self.dtype)
        return (self.offset + weight).astype(self.dtype) * x32.astype(self.dtype)


def blocked_dot_general(block: int):
    """A dot_general summing the contraction in blocks of about `block`, then adding the partials.

    XLA's CPU float32 dot accumulates a long contraction with an error that grows with its
    length (9e-5 on a 576-long dot of unit normals, where torch gets 4e-5); summing 64-long
    partials brings it to 2e-5. It costs several times the time, so it is for checks, not runs.
    """
    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        (lhs_contract, rhs_contract), batch = dimension_numbers
        if lhs_contract != (lhs.ndim - 1,) or rhs_contract != (0,) or batch != ((), ()):
            return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                       preferred_element_type=preferred_element_type)
        size = lhs.shape[-1]
        parts = max(1, size // block)
        while size % parts:
            parts -= 1
        lhs = lhs.reshape(lhs.shape[:-1] + (parts, size // parts))
        rhs = rhs.reshape((parts, size // parts) + rhs.shape[1:])
        return jnp.einsum("...ck,ckn->c...n", lhs, rhs, precision=precision,
                          preferred_element_type=preferred_element_type).sum(0)
    return dot_general


def _dense(features, name, dtype, param_dtype, dot_block=0, bias=False):
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02),
                    dot_general=blocked_dot_general(dot_block) if dot_block else None)


def _softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


class _Block(nn.Module):
    """What every part of a decoder layer is configured with."""
    cfg: ModelConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    dot_block: int = 0

    def dense(self, features: int, name: str, prefix: str):
        return _dense(features, name, self.dtype, self.param_dtype, self.dot_block,
                      bias=f"{prefix}.{name}" in self.cfg.biases)

    def norm(self, name: str):
        return RMSNorm(self.cfg.rms_norm_eps, self.dtype, self.param_dtype, self.cfg.norm_offset,
                       self.cfg.norm_weight_first, name=name)


class Attention(_Block):
    @nn.compact
    def __call__(self, x, cos, sin, allowed, packing=None, cache=None):
        """x [B, T, D]; or with packing (armu_jax.packing's layout) the packed tokens [S, N, D]: the
        projections run on them, the scores and the value products in the padded [B, T] layout of allowed.
        cache (generation): (keys, values [B, S, kv, hd], at): x's keys and values are written at positions
        at..at+T of the cache, the queries attend over all S (allowed [B, T, S]); returns (out, new cache)."""
        cfg = self.cfg
        batch, length, _ = x.shape
        heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        groups = heads // kv
        q = self.dense(heads * hd, "q_proj", "self_attn")(x)
        k = self.dense(kv * hd, "k_proj", "self_attn")(x)
        v = self.dense(kv * hd, "v_proj", "self_attn")(x)
        if cfg.qk_norm == "full":  # OLMo-2: over the whole projection
            q, k = self.norm("q_norm")(q), self.norm("k_norm")(k)
        q, k = q.reshape(batch, length, heads, hd), k.reshape(batch, length, kv, hd)
        if cfg.qk_norm == "head":  # Qwen3, Gemma-3: per head, before RoPE
            q, k = self.norm("q_norm")(q), self.norm("k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.reshape(batch, length, kv, hd)
        if cache is not None:
            return self._cached(q, k, v, allowed, cache)
        if packing is not None:
            batch, length = allowed.shape[:2]
            # A pad position's query sees no key and is a key no query sees: no gradient reaches it.
            q, k, v = (packing_lib.unpack(t, packing, batch, pad_grad=False) for t in (q, k, v))
        # Grouped-query attention without repeating K/V: each KV head's query heads side by side,
        # [B, kv, groups x T, hd], so the scores are one batched matmul per KV head.
        q = jnp.transpose(q.reshape(batch, length, kv, groups, hd), (0, 2, 3, 1, 4))
        k, v = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
        out = self.attend(q, k, v, allowed)
        out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, length, heads * hd)
        if packing is not None:
            out = packing_lib.pack(out, packing)
        return self.dense(cfg.hidden_size, "o_proj", "self_attn")(out)

    def _cached(self, q, k, v, allowed, cache):
        cfg = self.cfg
        keys, values, at = cache
        keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, at, 0, 0))
        values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, at, 0, 0))
        batch, length, heads = q.shape[0], q.shape[1], cfg.num_attention_heads
        kv = cfg.num_key_value_heads
        qg = jnp.transpose(q.reshape(batch, length, kv, heads // kv, cfg.head_dim), (0, 2, 3, 1, 4))
        scale = math.sqrt(cfg.query_pre_attn_scalar or cfg.head_dim)
        score_dtype = jnp.promote_types(self.dtype, jnp.float32)
        scores = jnp.einsum("bkgqd,bskd->bkgqs", qg, keys, preferred_element_type=score_dtype) / scale
        scores = _softcap(scores, cfg.attn_logit_softcapping)
        probs = jax.nn.softmax(jnp.where(allowed[:, None, None], scores, jnp.finfo(score_dtype).min), axis=-1)
        out = jnp.einsum("bkgqs,bskd->bkgqd", probs.astype(self.dtype), values)
        out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, length, heads * cfg.head_dim)
        return self.dense(cfg.hidden_size, "o_proj", "self_attn")(out), (keys, values, at)

    def attend(self, q, k, v, allowed):
        """q: [B, kv, groups, Tq, hd], k/v: [B, kv, Tk, hd], allowed: [B, Tq, Tk] -> [B, kv, groups, Tq, hd]."""
        cfg = self.cfg
        return attend(q, k, v, allowed, scale=math.sqrt(cfg.query_pre_attn_scalar or q.shape[-1]),
                      softcap=cfg.attn_logit_softcapping, dtype=self.dtype, chunks=query_chunks(q.shape[3]))


MAX_QUERY_CHUNKS = 4  # 1: one block, every score computed (bench A/B)
MIN_QUERY_BLOCK = 128  # rows shorter than 2 blocks run in one (tests set 64 to reach the blocks on short rows)


def query_chunks(length: int) -> int:
    """How many query blocks attend() splits a length into: one per MIN_QUERY_BLOCK positions, at most
    MAX_QUERY_CHUNKS. A block of queries needs only the keys up to its last query, so 4 blocks compute 5/8 of
    the scores, 2 blocks 3/4. More blocks measured no faster on a CPU (bench/step_time.py) and compile
    longer; rows under 256 positions (the evaluator's short buckets, the demo's 64-token extracts) keep one
    block, whose program compiles fastest."""
    return max(1, min(MAX_QUERY_CHUNKS, length // MIN_QUERY_BLOCK))


def attend(q, k, v, allowed, *, scale: float, softcap: float | None = None, dtype=jnp.float32, chunks: int = 1):
    """Masked softmax attention, HF SDPA's semantics: q [B, kv, groups, Tq, hd], k/v [B, kv, Tk, hd] (Tq == Tk),
    allowed [B, Tq, Tk] -> [B, kv, groups, Tq, hd]; a query with no visible key (left padding) attends to nothing.

    Every mask here is causal (a query sees no later key), so with chunks > 1 the queries are split into that many
    blocks and a block's scores are computed against the keys up to its last query only: the same values, the
    softmax over fewer masked entries (exp of the mask's minimum is 0 either way)."""
    batch, kv, groups, length, hd = q.shape
    score_dtype = jnp.promote_types(dtype, jnp.float32)  # softmax in at least float32
    bounds = [round(length * i / chunks) for i in range(chunks + 1)]
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows, keys = hi - lo, hi
        scores = jnp.einsum("bkqd,bksd->bkqs", q[:, :, :, lo:hi].reshape(batch, kv, groups * rows, hd),
                            k[:, :, :keys], preferred_element_type=score_dtype) / scale
        scores = _softcap(scores.reshape(batch, kv, groups, rows, keys), softcap)
        mask = allowed[:, None, None, lo:hi, :keys]
        probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(score_dtype).min), axis=-1).astype(dtype)
        out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(batch, kv, groups * rows, keys), v[:, :, :keys])
        # No visible key: softmax gave the mean of the values; zero the (smaller) output, not the probabilities.
        seen = jnp.any(allowed[:, lo:hi, :keys], axis=-1)[:, None, None, :, None]
        outs.append(jnp.where(seen, out.reshape(batch, kv, groups, rows, hd), 0.0))
    return outs[0] if chunks == 1 else jnp.concatenate(outs, axis=3)


class MLP(_Block):
    @nn.compact
    def __call__(self, x, part: str = "all"):
        """part "all": the MLP; "act": only the down projection's input act(gate(x)) * up(x); "down": x is that
        input, only the down projection."""
        if part != "down":
            gate = self.dense(self.cfg.intermediate_size, "gate_proj", "mlp")(x)
            up = self.dense(self.cfg.intermediate_size, "up_proj", "mlp")(x)
            x = (nn.silu(gate) if self.cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)) * up
            if part == "act":
                return x
        return self.dense(self.cfg.hidden_size, "down_proj", "mlp")(x)


class DecoderLayer(_Block):
    """One layer; where its norms sit is the family's (cfg.layer_norms):
    pre (Llama): h + attn(norm(h)), then h + mlp(norm(h));
    sandwich (Gemma-2/3): h + post_norm(attn(norm(h))), then h + post_norm(mlp(pre_norm(h)));
    post (OLMo-2): h + post_norm(attn(h)), then h + post_norm(mlp(h))."""

    @nn.compact
    def __call__(self, h, cos, sin, allowed, mid=None, keep_mid: bool = False, packing=None, cache=None):
        """mid: (the residual stream after attention, the down projection's input) computed before: only the
        down projection and what follows it run. keep_mid: also return that pair (out, mid). cache: the
        attention's key/value cache (Attention), returned beside the output: (out, cache)."""
        kind = self.cfg.layer_norms
        mlp = MLP(self.cfg, self.dtype, self.param_dtype, self.dot_block, name="mlp")
        if mid is None:
            attn = Attention(self.cfg, self.dtype, self.param_dtype, self.dot_block, name="self_attn")

            def attention(x):
                nonlocal cache
                if cache is None:
                    return attn(x, cos, sin, allowed, packing)
                out, cache = attn(x, cos, sin, allowed, cache=cache)
                return out
            if kind == "pre":
                h = h + attention(self.norm("input_layernorm")(h))
                x = self.norm("post_attention_layernorm")(h)
            else:
                x = h if kind == "post" else self.norm("input_layernorm")(h)
                h = h + self.norm("post_attention_layernorm")(attention(x))
                x = h if kind == "post" else self.norm("pre_feedforward_layernorm")(h)
            act = mlp(x, part="act")
        else:
            h, act = mid
        down = mlp(act, part="down")
        out = h + down if kind == "pre" else h + self.norm("post_feedforward_layernorm")(down)
        if cache is not None:
            return out, cache
        return (out, (h, act)) if keep_mid else out


class DecoderStack(nn.Module):
    """The decoder stack of every family: embeddings, the layers, the final norm."""
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dot_block: int = 0

    def setup(self):
        self.embed_tokens = nn.Embed(self.cfg.vocab_size, self.cfg.hidden_size, dtype=self.dtype,
                                     param_dtype=self.param_dtype, embedding_init=nn.initializers.normal(0.02))
        self.layers = [DecoderLayer(self.cfg, self.dtype, self.param_dtype, self.dot_block, name=f"layers_{i}")
                       for i in range(self.cfg.num_hidden_layers)]
        self.norm = RMSNorm(self.cfg.rms_norm_eps, self.dtype, self.param_dtype, self.cfg.norm_offset,
                            self.cfg.norm_weight_first)

    def embed(self, input_ids):
        h = self.embed_tokens(input_ids)
        if self.cfg.scale_embeddings:  # Gemma: x sqrt(hidden), the scale rounded to the compute dtype
            h = h * jnp.asarray(self.cfg.hidden_size ** 0.5, jnp.float32).astype(h.dtype)
        return h

    def run_layers(self, h, attention_mask, positions, start: int, end: int, allowed=None, mid=None,
                   keep_mid: bool = False, packing=None):
        """Layers start..end (inclusive) applied to the residual stream h: [B, T, D]. Attention is causal
        over the attention_mask's tokens, or follows `allowed` [B, T(query), T(key)] when given; sliding
        layers further limit each query to keys fewer than the window positions before it. mid / keep_mid: layer start's (DecoderLayer), given or also returned.
        packing (armu_jax.packing's layout of the [B, T] attention_mask and positions): h holds the packed
        tokens [S, N, D] (as does mid), only the attention's products run padded."""
        length = h.shape[1] if packing is None else attention_mask.shape[1]
        if allowed is None:
            causal = jnp.tril(jnp.ones((length, length), dtype=bool))
            allowed = causal[None] & attention_mask.astype(bool)[:, None, :]
        kinds = {self.cfg.layer_type(i) for i in range(start, end + 1)}
        masks = {"full": allowed}
        if "sliding" in kinds:
            distance = positions[:, :, None] - positions[:, None, :]
            masks["sliding"] = allowed & (distance < self.cfg.sliding_window)
        # One (cos, sin) per distinct RoPE: Gemma-2's sliding and full layers share one, Gemma-3's do not.
        tables = {rope: rope_tables(rope, self.cfg.head_dim, positions if packing is None else packing["positions"],
                                    self.dtype)
                  for rope in {self.cfg.rope_of(kind) for kind in kinds}}
        ablate = self.has_variable("ablation", "directions")  # --mode=attack's direction ablation
        for index in range(start, end + 1):
            kind = self.cfg.layer_type(index)
            if index == start and (mid is not None or keep_mid):
                h = self.layers[index](h, *tables[self.cfg.rope_of(kind)], masks[kind], mid=mid, keep_mid=keep_mid,
                                       packing=packing)
                h, mid = h if keep_mid else (h, None)
            else:
                h = self.layers[index](h, *tables[self.cfg.rope_of(kind)], masks[kind], packing=packing)
            if ablate:  # h <- h - Q Q^T h with layer index's orthonormal Q [D, k] (zero: unchanged)
                q = self.get_variable("ablation", "directions")[index].astype(h.dtype)
                h = h - (h @ q) @ q.T
        return (h, mid) if keep_mid else h

    def decode(self, input_ids, positions, key_positions, key_valid, caches, at):
        """The tokens input_ids [B, T] at `positions`, written into every layer's cache at at..at+T and
        attending over the cache's keys (their positions key_positions and validity key_valid [B, S], these
        tokens' included): the final norm's output [B, T, D] and the new caches."""
        h = self.embed(input_ids)
        causal = key_valid[:, None, :] & (key_positions[:, None, :] <= positions[:, :, None])
        masks = {"full": causal}
        if "sliding" in {self.cfg.layer_type(i) for i in range(self.cfg.num_hidden_layers)}:
            masks["sliding"] = causal & (positions[:, :, None] - key_positions[:, None, :] < self.cfg.sliding_window)
        tables = {rope: rope_tables(rope, self.cfg.head_dim, positions, self.dtype)
                  for rope in {self.cfg.rope_of(self.cfg.layer_type(i)) for i in range(self.cfg.num_hidden_layers)}}
        new = []
        for index, layer in enumerate(self.layers):
            kind = self.cfg.layer_type(index)
            h, cache = layer(h, *tables[self.cfg.rope_of(kind)], masks[kind], cache=(*caches[index], at))
            new.append(cache[:2])
        return self.norm(h), new

    def __call__(self, input_ids, attention_mask, positions, upto: int | None = None, allowed=None, packing=None):
        last = self.cfg.num_hidden_layers - 1 if upto is None else upto
        h = self.embed(input_ids if packing is None else packing["ids"])
        h = self.run_layers(h, attention_mask, positions, 0, last, allowed, packing=packing)
        return h if upto is not None else self.norm(h)


def _defaults(input_ids, attention_mask, positions):
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, dtype=jnp.int32)
    if positions is None:  # as HF without position_ids: 0..T-1 on every row, padded or not
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    return attention_mask, positions


class CausalLM(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dot_block: int = 0  # > 0: blocked float32 accumulation in the dense layers (accurate, slow)

    def setup(self):
        self.model = DecoderStack(self.cfg, self.dtype, self.param_dtype, self.dot_block)
        if not self.cfg.tie_word_embeddings:
            self.lm_head = _dense(self.cfg.vocab_size, "lm_head", self.dtype, self.param_dtype, self.dot_block)

    def _head(self, h):
        if self.cfg.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(h).astype(jnp.float32)
        else:
            logits = self.lm_head(h).astype(jnp.float32)
        return _softcap(logits, self.cfg.final_logit_softcapping)

    def __call__(self, input_ids, attention_mask=None, positions=None):
        """Logits [B, T, V] in float32."""
        attention_mask, positions = _defaults(input_ids, attention_mask, positions)
        return self._head(self.model(input_ids, attention_mask, positions))

    def logits_packed(self, input_ids, positions, segment, branch, at):
        """Logits [B, C, V] at positions at: [B, C] of packed rows (the native evaluator's layout).

        A row holds several sequences (segment: [B, T] their index in the row, -1 on padding), each a
        shared prefix (branch 0) followed by branches 1, 2, ... (e.g. a question's context once and
        its four answers behind it). A token sees the earlier tokens of its own segment that are in
        the prefix or in its own branch; positions restart for every branch after the prefix, so each
        branch is computed exactly as if it followed the prefix alone.
        """
        return self._head(self.hidden_packed(input_ids, positions, segment, branch, at))

    def hidden_packed(self, input_ids, positions, segment, branch, at):
        """The last layer's normed hidden states [B, C, D] at positions at of packed rows (logits_packed
        without the head: the evaluator runs the head over them in chunks, see head)."""
        index = jnp.arange(input_ids.shape[1])
        allowed = ((segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
                   & (index[None, None, :] <= index[None, :, None])
                   & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])))
        h = self.model(input_ids, None, positions, allowed=allowed)
        return jnp.take_along_axis(h, at[..., None], axis=1)

    def hidden(self, input_ids, attention_mask=None, positions=None):
        """The last layer's normed hidden states [B, T, D]: __call__ without the head (relearning's loss runs
        the head in chunks, see target_logprobs)."""
        attention_mask, positions = _defaults(input_ids, attention_mask, positions)
        return self.model(input_ids, attention_mask, positions)

    def head(self, h):
        """Logits [..., V] in float32 of the last layer's normed hidden states h (the LM head, tied or not,
        and the family's final soft-capping)."""
        return self._head(h)

    def decode(self, input_ids, positions, key_positions, key_valid, caches, at):
        """Logits [B, V] of the last of input_ids' tokens, with every layer's key/value cache (DecoderStack.decode)
        updated: (logits, caches). Greedy generation (armu_jax/generate.py) prefills the prompts, then decodes
        a token at a time."""
        h, caches = self.model.decode(input_ids, positions, key_positions, key_valid, caches, at)
        return self._head(h[:, -1]), caches

    def hidden_upto(self, input_ids, attention_mask=None, positions=None, *, layer: int, packing=None):
        """Residual-stream output of decoder layer `layer` (HF's hidden_states[layer + 1]); later layers are not run.
        packing: of the real tokens only, packed ([S, N, D], armu_jax.packing)."""
        attention_mask, positions = _defaults(input_ids, attention_mask, positions)
        return self.model(input_ids, attention_mask, positions, upto=layer, packing=packing)

    def run_layers(self, h, attention_mask, positions, *, start: int, end: int, mid=None, keep_mid: bool = False,
                   packing=None):
        """Layers start..end (inclusive) from the residual stream h entering layer `start`; mid / keep_mid:
        layer start's residual stream after attention and its down projection's input, given (only what
        follows runs) or also returned ((h, mid))."""
        return self.model.run_layers(h, attention_mask, positions, start, end, mid=mid, keep_mid=keep_mid,
                                     packing=packing)


# Positions per run of the LM head in target_logprobs. The head's logits are [positions, vocabulary] in float32:
# all of a batch's at once are 4 GB for Gemma's 262k vocabulary at 4096 positions, allocated and written twice
# (logits, then log-softmax), and the page faults alone cost a quarter of a CPU evaluation's time. In chunks of
# 1024 they are 1 GB, and a matmul of 1024 rows still runs at the speed of a whole batch's (bench: 102 GFLOP/s
# at 1024 rows, 126 at 2048, 73 at 256 on 2 CPU cores); demo_bio on Gemma: 19.0 s -> 17.2 s, system time
# 7.3 s -> 3.7 s.
HEAD_CHUNK = 1024


def target_logprobs(model: CausalLM, params, h, targets, chunk: int = HEAD_CHUNK):
    """log p(targets | h) = logit[target] - logsumexp(logits) of the normed hidden states h: [..., D] and
    targets: [...], in float32, the head run `chunk` positions at a time. Under a gradient each chunk is
    rematerialized in the backward pass (jax.checkpoint), so neither the logits nor their gradient are ever
    held whole."""
    shape = targets.shape
    n = targets.size
    chunk = min(chunk, n)
    k = -(-n // chunk)
    h = jnp.pad(h.reshape(n, h.shape[-1]), ((0, k * chunk - n), (0, 0))).reshape(k, chunk, h.shape[-1])
    t = jnp.pad(targets.reshape(n), (0, k * chunk - n)).reshape(k, chunk)

    @jax.checkpoint
    def one(chunk_of):
        hidden, target = chunk_of
        logits = model.apply(params, hidden, method=CausalLM.head)
        return jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)

    return jax.lax.map(one, (h, t)).reshape(k * chunk)[:n].reshape(shape)


def empty_caches(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> list:
    """Every layer's (keys, values) generation cache, zeros [batch, length, kv heads, head dim]."""
    shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_hidden_layers)]


def abstract_params(model: CausalLM) -> dict:
    """The model's params tree as ShapeDtypeStructs (shapes and dtypes, nothing allocated)."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
