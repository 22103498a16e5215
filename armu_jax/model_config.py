"""The model's shape and features (families.py reads them from a Hugging Face config.json, per family).

One decoder (model.py) serves every supported family; what differs between Llama, Qwen, Gemma, Phi-3
and OLMo-2 is a handful of feature fields here: biases, q/k norms, where the norms sit, the norm's
weight offset, embedding scale, attention scale and soft-caps, the activation, sliding-window layers
and RoPE per layer type, and how the checkpoint stores fused projections.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rope:
    """One layer type's rotary embedding, as transformers computes it.

    type: default, linear, llama3 or longrope. scaling: linear (factor,); llama3 (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings); longrope (short_factor tuple, long_factor tuple,
    original_max_position_embeddings). attention_factor multiplies cos and sin (longrope's; 1 otherwise).
    fraction: the leading fraction of each head that is rotated (Phi-3's partial_rotary_factor).
    """
    theta: float = 10000.0
    type: str = "default"
    scaling: tuple = ()
    attention_factor: float = 1.0
    fraction: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    rope_type: str = "default"
    # (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings); unused by "default".
    rope_scaling: tuple = ()
    # Window of the sliding-attention layers (a query sees itself and the window - 1 tokens before it).
    sliding_window: int | None = None
    family: str = "llama"
    # Per layer: "full" or "sliding" (empty: every layer full).
    layer_types: tuple = ()
    # RoPE of the full-attention layers, and of the sliding ones where it differs (Gemma-3's local base).
    rope: Rope = Rope()
    rope_local: Rope | None = None
    # Projections with a bias, e.g. ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") for Qwen2.
    biases: tuple = ()
    qk_norm: str = "none"  # none; head: RMSNorm over head_dim before RoPE (Qwen3, Gemma-3); full: over the projection (OLMo-2)
    norm_offset: float = 0.0  # the norm scales by (offset + weight): Gemma's 1 + w
    norm_weight_first: bool = False  # weight * x in float32, then cast (Gemma, OLMo-2); else cast, then weight * x
    layer_norms: str = "pre"  # pre: Llama; sandwich: Gemma-2/3's four norms; post: OLMo-2's post-norms only
    scale_embeddings: bool = False  # embeddings x sqrt(hidden) (Gemma)
    query_pre_attn_scalar: float | None = None  # scores / sqrt(this) (Gemma); default head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    activation: str = "silu"  # silu or gelu_tanh
    fused_qkv: bool = False  # the checkpoint stores self_attn.qkv_proj (Phi-3)
    fused_gate_up: bool = False  # the checkpoint stores mlp.gate_up_proj (Phi-3)

    def layer_type(self, index: int) -> str:
        return self.layer_types[index] if self.layer_types else "full"

    def rope_of(self, layer_type: str) -> Rope:
        return self.rope_local if layer_type == "sliding" and self.rope_local is not None else self.rope
