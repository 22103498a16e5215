"""Model families as data: each maps its config.json onto the feature fields of ModelConfig.

The one decoder in model.py reads only those fields, so adding a family is a table entry here
(checked against transformers' modeling code of the pinned version), never a copy of the model.
Defaults are those of the family's transformers config class, used where a config.json leaves a key
out, so a hub checkpoint reads as transformers reads it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from armu_jax import storage
from armu_jax.errors import UserError
from armu_jax.model_config import ModelConfig, Rope

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


@dataclass(frozen=True)
class Family:
    """A family: its defaults (transformers' config class) and its fixed features."""
    name: str
    model_type: str
    defaults: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    # Whether `attention_bias` puts a bias on q/k/v/o (Llama, Gemma, Qwen3, OLMo-2), and `mlp_bias` on the MLP.
    attention_bias_key: bool = True
    mlp_bias_key: bool = False
    # The params --update_params names by default (the MLP output is re-normalised in post-norm families).
    default_update_params: tuple = ("mlp.down_proj",)
    examples: str = ""


_GEMMA = dict(norm_offset=1.0, norm_weight_first=True, scale_embeddings=True)
# Measured on tiny random models (bench/post_norm.py, docs/families.md): with the MLP output
# re-normalised by post_feedforward_layernorm, updating down_proj alone cannot move the layer output
# towards c*u; updating that norm's weight as well can.
_POST_NORM_UPDATE = ("mlp.down_proj", "post_feedforward_layernorm")

FAMILIES = {
    "LlamaForCausalLM": Family("llama", "llama", {"rms_norm_eps": 1e-6}, mlp_bias_key=True,
                               examples="Llama-2/3/3.1/3.2, SmolLM2"),
    "MistralForCausalLM": Family("mistral", "mistral", {"rms_norm_eps": 1e-6, "sliding_window": 4096,
                                                        "num_key_value_heads": 8},
                                 attention_bias_key=False, examples="Mistral, Zephyr, Mistral-Nemo"),
    "Qwen2ForCausalLM": Family("qwen2", "qwen2", {"rms_norm_eps": 1e-6, "num_key_value_heads": 32},
                               {"biases": ATTN[:3]}, attention_bias_key=False, examples="Qwen2, Qwen2.5"),
    "Qwen3ForCausalLM": Family("qwen3", "qwen3", {"rms_norm_eps": 1e-6, "head_dim": 128, "num_key_value_heads": 32},
                               {"qk_norm": "head"}, examples="Qwen3 (dense)"),
    "Gemma2ForCausalLM": Family("gemma2", "gemma2", {"rms_norm_eps": 1e-6, "head_dim": 256, "tie_word_embeddings": True,
                                                     "query_pre_attn_scalar": 256, "sliding_window": 4096,
                                                     "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                                     "num_key_value_heads": 4, "hidden_activation": "gelu_pytorch_tanh"},
                                {**_GEMMA, "layer_norms": "sandwich"}, default_update_params=_POST_NORM_UPDATE,
                                examples="Gemma-2"),
    "Gemma3ForCausalLM": Family("gemma3", "gemma3_text", {"rms_norm_eps": 1e-6, "head_dim": 256,
                                                          "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
                                                          "sliding_window": 4096, "num_key_value_heads": 4,
                                                          "hidden_activation": "gelu_pytorch_tanh",
                                                          "rope_theta": 1_000_000.0},
                                {**_GEMMA, "layer_norms": "sandwich", "qk_norm": "head"},
                                default_update_params=_POST_NORM_UPDATE, examples="Gemma-3 text (1B)"),
    "Phi3ForCausalLM": Family("phi3", "phi3", {"rms_norm_eps": 1e-5, "sliding_window": None,
                                               "original_max_position_embeddings": 4096},
                              {"fused_qkv": True, "fused_gate_up": True}, attention_bias_key=False,
                              examples="Phi-3, Phi-3.5-mini"),
    "Olmo2ForCausalLM": Family("olmo2", "olmo2", {"rms_norm_eps": 1e-5},
                               {"layer_norms": "post", "qk_norm": "full", "norm_weight_first": True},
                               default_update_params=_POST_NORM_UPDATE, examples="OLMo-2"),
}
BY_MODEL_TYPE = {f.model_type: arch for arch, f in FAMILIES.items()}
SUPPORTED = "; ".join(f"{arch} ({f.examples})" for arch, f in FAMILIES.items())
_MOE_MARKERS = ("moe", "mixtral", "expert")


def family_of(hf: dict) -> tuple[str, Family]:
    """The family of a config.json. A supported architecture whose file also names remote code (auto_map,
    as Phi-3.5's does on the hub) is read with armu_jax's own port, as transformers reads it without
    trust_remote_code; any other auto_map is refused: armu_jax never runs remote code."""
    archs = hf.get("architectures") or [BY_MODEL_TYPE.get(hf.get("model_type"), str(hf.get("model_type")))]
    arch = archs[0]
    if arch in FAMILIES and hf.get("model_type", FAMILIES[arch].model_type) == FAMILIES[arch].model_type:
        return arch, FAMILIES[arch]
    if "auto_map" in hf:
        raise UserError(f"config.json has auto_map (remote code) for {arch!r}; armu_jax never runs remote code. "
                        f"Supported: {SUPPORTED}")
    if arch == "Gemma3ForConditionalGeneration":
        raise UserError("Gemma3ForConditionalGeneration (the multimodal 4B-27B checkpoints, language model under "
                        "language_model.*) is not supported; use a text-only Gemma3ForCausalLM checkpoint "
                        f"(e.g. gemma-3-1b). Supported: {SUPPORTED}")
    text = f"{arch} {hf.get('model_type', '')}".lower()
    if any(marker in text for marker in _MOE_MARKERS) or hf.get("num_local_experts") or hf.get("num_experts"):
        raise UserError(f"{arch} is a mixture-of-experts model, which armu_jax does not support; "
                        f"supported (dense): {SUPPORTED}")
    raise UserError(f"unsupported architecture {arch!r}; supported: {SUPPORTED}")


def model_config_fields(hf: dict) -> dict:
    """ModelConfig's fields from a config.json dict (one line naming the key for anything unsupported)."""
    arch, family = family_of(hf)
    hf = {**family.defaults, **hf}  # transformers' defaults where the file leaves a key out
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise UserError(f"config.json: {key} is {hf.get(key)!r}; a {arch} config needs a positive integer")
    if hf.get("use_bidirectional_attention"):
        raise UserError("config.json: use_bidirectional_attention=true (an encoder variant) is not supported; "
                        "armu_jax runs causal decoders")
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if activation not in ACTIVATIONS:
        raise UserError(f"config.json: activation {activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise UserError(f"config.json: num_key_value_heads is {kv_heads!r}; it must be a positive integer dividing "
                        f"num_attention_heads ({heads})")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    layers = hf["num_hidden_layers"]
    layer_types, window = _layer_types(hf, family, layers)
    rope, rope_local = _ropes(hf, family, head_dim)
    biases = tuple(family.features.get("biases", ()))
    if family.attention_bias_key and hf.get("attention_bias"):
        biases += ATTN
    if family.mlp_bias_key and hf.get("mlp_bias"):
        biases += MLP
    features = {k: v for k, v in family.features.items() if k != "biases"}
    if family.name.startswith("gemma"):
        features.update(query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
                        attn_logit_softcapping=_optional_float(hf.get("attn_logit_softcapping")),
                        final_logit_softcapping=_optional_float(hf.get("final_logit_softcapping")))
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=rope.theta,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_type=rope.type,
        rope_scaling=rope.scaling, sliding_window=window, family=family.name, layer_types=layer_types,
        rope=rope, rope_local=rope_local, biases=biases, activation=ACTIVATIONS[activation], **features)


def _optional_float(value):
    return None if value is None else float(value)


def _layer_types(hf: dict, family: Family, layers: int) -> tuple[tuple, int | None]:
    """(per-layer "full"/"sliding", the window) as transformers derives them for the family."""
    window = hf.get("sliding_window")
    if family.name in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        window = None
    if family.name in ("llama", "olmo2"):
        window = None
    if window is not None and (not isinstance(window, int) or window < 1):
        raise UserError(f"config.json: sliding_window is {window!r}; it must be a positive integer or null")
    if family.name in ("mistral", "phi3"):  # transformers reads only sliding_window there: every layer
        types = ["sliding"] * layers
    elif hf.get("layer_types") is not None:
        named = hf["layer_types"]
        unknown = sorted({t for t in named if t not in LAYER_TYPES})
        if unknown or len(named) != layers:
            raise UserError(f"config.json: layer_types {unknown or named!r} not supported (need {layers} entries "
                            f"of {', '.join(LAYER_TYPES)})")
        types = [LAYER_TYPES[t] for t in named]
    elif family.name in ("qwen2", "qwen3"):
        types = ["sliding" if i >= hf.get("max_window_layers", 28) else "full" for i in range(layers)]
    elif family.name == "gemma2":
        types = ["sliding" if (i + 1) % 2 else "full" for i in range(layers)]
    elif family.name == "gemma3":
        pattern = hf.get("sliding_window_pattern", 6)
        types = ["sliding" if (i + 1) % pattern else "full" for i in range(layers)]
    else:
        types = ["full"] * layers
    if window is None:
        types = ["full"] * layers
    return (tuple(types) if "sliding" in types else ()), (window if "sliding" in types else None)


def _ropes(hf: dict, family: Family, head_dim: int) -> tuple[Rope, Rope | None]:
    """The full-attention layers' RoPE and, where it differs, the sliding layers' (Gemma-3)."""
    params = hf.get("rope_parameters")
    if family.name == "gemma3":
        if isinstance(params, dict) and "full_attention" in params:
            full, local = dict(params["full_attention"] or {}), dict(params.get("sliding_attention") or {})
        else:  # the hub's format: rope_theta, rope_local_base_freq, rope_scaling for the global layers
            full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1_000_000.0)}
            local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
        local.setdefault("rope_theta", 10_000.0)
        full.setdefault("rope_theta", 1_000_000.0)
        return _rope(full, hf, head_dim), _rope(local, hf, head_dim)
    rope = dict(params or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return _rope(rope, hf, head_dim), None


def _rope(rope: dict, hf: dict, head_dim: int) -> Rope:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(f"config.json: unsupported RoPE type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    fraction = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    if not 0 < fraction <= 1 or int(head_dim * fraction) % 2:
        raise UserError(f"config.json: partial_rotary_factor {fraction} must give an even rotary size of the "
                        f"head_dim {head_dim}")
    theta, scaling, attention_factor = float(rope["rope_theta"]), (), 1.0
    try:
        if kind == "linear":
            scaling = (float(rope["factor"]),)
        elif kind == "llama3":
            scaling = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                       float(rope["original_max_position_embeddings"]))
        elif kind == "longrope":
            original = rope.get("original_max_position_embeddings") or hf["original_max_position_embeddings"]
            short, long = tuple(map(float, rope["short_factor"])), tuple(map(float, rope["long_factor"]))
            if len(short) != int(head_dim * fraction) // 2 or len(long) != len(short):
                raise UserError(f"config.json: longrope short_factor/long_factor need {int(head_dim * fraction) // 2} "
                                f"values each, have {len(short)}/{len(long)}")
            factor = rope.get("factor") or hf["max_position_embeddings"] / original
            attention_factor = rope.get("attention_factor")
            if attention_factor is None:
                attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
            scaling = (short, long, int(original))
    except KeyError as err:
        raise UserError(f"config.json: RoPE type {kind!r} needs {err.args[0]!r}") from None
    return Rope(theta, kind, scaling, float(attention_factor), fraction)


def update_params_for(names, model_cfg) -> tuple:
    """--update_params as given, or the family's default for ("default",)."""
    if tuple(names) != ("default",):
        return tuple(names)
    return next(f.default_update_params for f in FAMILIES.values() if f.name == model_cfg.family)


def model_config_of(hf: dict) -> ModelConfig:
    """The ModelConfig of a config.json dict."""
    return ModelConfig(**model_config_fields(hf))


def read_model_config(path) -> ModelConfig:
    """The ModelConfig of a Hugging Face model directory (local or gs://); one line for a missing or bad file."""
    config_file = storage.path(path) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json; pass a Hugging Face model directory")
    try:
        hf = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{config_file} is not valid JSON ({err}); restore the model's config.json") from None
    if not isinstance(hf, dict):
        raise UserError(f"{config_file} does not hold a JSON object; restore the model's config.json")
    return model_config_of(hf)
