"""The model's shape, read from (and written back to) a Hugging Face config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from armu_jax.errors import UserError

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
    sliding_window: int | None = None

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "ModelConfig":
        if "auto_map" in hf:
            raise UserError("config.json has auto_map (remote code); armu_jax never runs remote code. "
                            f"Supported: {', '.join(SUPPORTED_ARCHITECTURES)} with the standard config")
        archs = hf.get("architectures") or [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
                                             .get(hf.get("model_type"), str(hf.get("model_type")))]
        if archs[0] not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"unsupported architecture {archs[0]!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
                            "(Llama-2/3, Mistral/Zephyr, SmolLM2)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise UserError("attention_bias/mlp_bias models are not supported (Llama and Mistral use none)")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UserError(f"unsupported RoPE type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        scaling = ()
        if rope_type == "linear":
            scaling = (float(rope["factor"]),)
        elif rope_type == "llama3":
            scaling = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                       float(rope["original_max_position_embeddings"]))
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_type=rope_type,
            rope_scaling=scaling,
            sliding_window=hf.get("sliding_window") if archs[0] == "MistralForCausalLM" else None,
        )

    @classmethod
    def from_dir(cls, path: Path) -> "ModelConfig":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise UserError(f"{path} has no config.json; pass a Hugging Face model directory")
        return cls.from_hf_dict(json.loads(config_file.read_text()))
