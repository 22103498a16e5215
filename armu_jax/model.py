"""A Flax (linen) port of Hugging Face's Llama/Mistral decoder, with HF parameter names.

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

from armu_jax.model_config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, dtype=jnp.float32) -> jnp.ndarray:
    """HF's inverse frequencies, including the linear and Llama-3 scalings."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=dtype) / cfg.head_dim))
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_scaling[0]
    if cfg.rope_type == "llama3":
        factor, low_freq_factor, high_freq_factor, old_context = cfg.rope_scaling
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """x: [B, T, H, hd]; cos/sin: [B, T, hd]."""
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * x32.astype(self.dtype)


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


def _dense(features, name, dtype, param_dtype, dot_block=0):
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02),
                    dot_general=blocked_dot_general(dot_block) if dot_block else None)


class _Block(nn.Module):
    """What every part of a decoder layer is configured with."""
    cfg: ModelConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    dot_block: int = 0

    def dense(self, features: int, name: str):
        return _dense(features, name, self.dtype, self.param_dtype, self.dot_block)


class Attention(_Block):
    @nn.compact
    def __call__(self, x, cos, sin, allowed):
        cfg = self.cfg
        batch, length, _ = x.shape
        kv, hd = cfg.num_key_value_heads, cfg.head_dim
        groups = cfg.num_attention_heads // kv
        q = self.dense(cfg.num_attention_heads * hd, "q_proj")(x)
        k = self.dense(kv * hd, "k_proj")(x)
        v = self.dense(kv * hd, "v_proj")(x)
        q = apply_rope(q.reshape(batch, length, cfg.num_attention_heads, hd), cos, sin)
        k = apply_rope(k.reshape(batch, length, kv, hd), cos, sin)
        v = v.reshape(batch, length, kv, hd)
        # Grouped-query attention without repeating K/V: query heads are [kv, groups].
        q = q.reshape(batch, length, kv, groups, hd)
        score_dtype = jnp.promote_types(self.dtype, jnp.float32)  # softmax in at least float32
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=score_dtype) / math.sqrt(hd)
        mask = allowed[:, None, None, :, :]
        scores = jnp.where(mask, scores, jnp.finfo(score_dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        # HF SDPA semantics: a query with no visible key (left padding) attends to nothing.
        probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, length, cfg.num_attention_heads * hd)
        return self.dense(cfg.hidden_size, "o_proj")(out)


class MLP(_Block):
    @nn.compact
    def __call__(self, x):
        gate = self.dense(self.cfg.intermediate_size, "gate_proj")(x)
        up = self.dense(self.cfg.intermediate_size, "up_proj")(x)
        return self.dense(self.cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(_Block):
    @nn.compact
    def __call__(self, h, cos, sin, allowed):
        norm = lambda name: RMSNorm(self.cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        h = h + Attention(self.cfg, self.dtype, self.param_dtype, self.dot_block, name="self_attn")(
            norm("input_layernorm")(h), cos, sin, allowed)
        return h + MLP(self.cfg, self.dtype, self.param_dtype, self.dot_block, name="mlp")(norm("post_attention_layernorm")(h))


class LlamaModel(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dot_block: int = 0

    def setup(self):
        self.embed_tokens = nn.Embed(self.cfg.vocab_size, self.cfg.hidden_size, dtype=self.dtype,
                                     param_dtype=self.param_dtype, embedding_init=nn.initializers.normal(0.02))
        self.layers = [DecoderLayer(self.cfg, self.dtype, self.param_dtype, self.dot_block, name=f"layers_{i}")
                       for i in range(self.cfg.num_hidden_layers)]
        self.norm = RMSNorm(self.cfg.rms_norm_eps, self.dtype, self.param_dtype)

    def run_layers(self, h, attention_mask, positions, start: int, end: int, allowed=None):
        """Layers start..end (inclusive) applied to the residual stream h: [B, T, D]. Attention is causal
        over the attention_mask's tokens, or follows `allowed` [B, T(query), T(key)] when given."""
        length = h.shape[1]
        if self.cfg.sliding_window is not None and length > self.cfg.sliding_window:
            raise ValueError(f"sequence length {length} exceeds the model's sliding window "
                             f"{self.cfg.sliding_window}; use a max length <= {self.cfg.sliding_window}")
        rope_dtype = jnp.promote_types(self.dtype, jnp.float32)  # as HF: angles in at least float32
        freqs = positions.astype(rope_dtype)[..., None] * rope_inv_freq(self.cfg, rope_dtype)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb).astype(self.dtype), jnp.sin(emb).astype(self.dtype)
        if allowed is None:
            causal = jnp.tril(jnp.ones((length, length), dtype=bool))
            allowed = causal[None] & attention_mask.astype(bool)[:, None, :]
        ablate = self.has_variable("ablation", "directions")  # --mode=attack's direction ablation
        for index in range(start, end + 1):
            h = self.layers[index](h, cos, sin, allowed)
            if ablate:  # h <- h - Q Q^T h with layer index's orthonormal Q [D, k] (zero: unchanged)
                q = self.get_variable("ablation", "directions")[index].astype(h.dtype)
                h = h - (h @ q) @ q.T
        return h

    def __call__(self, input_ids, attention_mask, positions, upto: int | None = None, allowed=None):
        last = self.cfg.num_hidden_layers - 1 if upto is None else upto
        h = self.run_layers(self.embed_tokens(input_ids), attention_mask, positions, 0, last, allowed)
        return h if upto is not None else self.norm(h)


def _defaults(input_ids, attention_mask, positions):
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, dtype=jnp.int32)
    if positions is None:  # as HF without position_ids: 0..T-1 on every row, padded or not
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    return attention_mask, positions


class LlamaForCausalLM(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dot_block: int = 0  # > 0: blocked float32 accumulation in the dense layers (accurate, slow)

    def setup(self):
        self.model = LlamaModel(self.cfg, self.dtype, self.param_dtype, self.dot_block)
        if not self.cfg.tie_word_embeddings:
            self.lm_head = _dense(self.cfg.vocab_size, "lm_head", self.dtype, self.param_dtype, self.dot_block)

    def _head(self, h):
        if self.cfg.tie_word_embeddings:
            return self.model.embed_tokens.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

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
        index = jnp.arange(input_ids.shape[1])
        allowed = ((segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
                   & (index[None, None, :] <= index[None, :, None])
                   & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])))
        h = self.model(input_ids, None, positions, allowed=allowed)
        return self._head(jnp.take_along_axis(h, at[..., None], axis=1))

    def hidden_upto(self, input_ids, attention_mask=None, positions=None, *, layer: int):
        """Residual-stream output of decoder layer `layer` (HF's hidden_states[layer + 1]); later layers are not run."""
        attention_mask, positions = _defaults(input_ids, attention_mask, positions)
        return self.model(input_ids, attention_mask, positions, upto=layer)

    def run_layers(self, h, attention_mask, positions, *, start: int, end: int):
        """Layers start..end (inclusive) from the residual stream h entering layer `start`."""
        return self.model.run_layers(h, attention_mask, positions, start, end)


def abstract_params(model: LlamaForCausalLM) -> dict:
    """The model's params tree as ShapeDtypeStructs (shapes and dtypes, nothing allocated)."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
