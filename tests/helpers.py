"""Tiny random Hugging Face models with odd dimensions, saved as safetensors directories."""
from pathlib import Path

import torch
import transformers


def tiny_hf_model(tmp: Path, arch: str = "llama", kv_heads: int = 2, tied: bool = False, rope=None,
                  layers: int = 3, seed: int = 0, vocab: int = 131) -> Path:
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=60, intermediate_size=97, num_hidden_layers=layers,
                  num_attention_heads=6, num_key_value_heads=kv_heads, head_dim=10, rms_norm_eps=1e-5,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  max_position_embeddings=256)
    if arch == "llama":
        rope = rope or {"rope_type": "default", "rope_theta": 5000.0}
        config = transformers.LlamaConfig(rope_parameters=rope, **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.MistralConfig(sliding_window=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
        model = transformers.MistralForCausalLM(config)
    # Default init leaves norms at 1; perturb them so a wrong norm placement would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    out = tmp / f"{arch}-kv{kv_heads}-{'tied' if tied else 'untied'}"
    model.save_pretrained(out, safe_serialization=True)
    return out
