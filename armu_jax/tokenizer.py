"""The model's tokenizer without transformers (and so without torch): tokenizer.json through the
`tokenizers` library, set up as transformers' AutoTokenizer sets up the same files, for the
configurations where that is the whole of what transformers does.

transformers (v5, as pinned) builds a generic tokenizer (tokenizer_class TokenizersBackend or
PreTrainedTokenizerFast in tokenizer_config.json) from tokenizer.json as it is: its post-processor
decides the special tokens (a Llama-3 BOS template, or none), and add_bos_token / add_eos_token in
tokenizer_config.json change nothing (measured on every combination: tests/test_tokenizer.py keeps it
so). What it adds of its own are the named special tokens missing from the vocabulary. A tokenizer
needing that, a model-specific class (LlamaTokenizer, GemmaTokenizer, Qwen2Tokenizer,
GPT2Tokenizer...: v5 rebuilds their normalizer, pre-tokenizer and post-processor from the class and
its add_bos_token rather than reading tokenizer.json's) or a Mistral model (whose pre-tokenizer regex
transformers patches) keeps transformers: `native_reason` says why.
A call is what data.tokenize, parity and the evaluator make of transformers': a list of texts,
padded to the longest on the left with the eos token and truncated on the right at max_length
(special tokens included), as numpy arrays; or one text's ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
MISTRAL_TYPES = ("mistral", "mixtral", "mistral3", "ministral", "pixtral", "voxtral")


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def native_reason(model_dir: Path) -> str | None:
    """None when TokenizersTokenizer reproduces AutoTokenizer on model_dir's files, else why not."""
    config = _read_json(model_dir / "tokenizer_config.json")
    if not (model_dir / "tokenizer.json").is_file():
        return "no tokenizer.json"
    cls = config.get("tokenizer_class")
    if cls not in GENERIC_CLASSES:
        return f"tokenizer_class {cls!r} is rebuilt by transformers from its class"
    if _read_json(model_dir / "config.json").get("model_type") in MISTRAL_TYPES:
        return "a Mistral model (transformers patches its pre-tokenizer)"
    from tokenizers import Tokenizer  # only when a tokenizer is built
    backend = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab = backend.get_vocab(with_added_tokens=True)
    specials = _special_tokens(model_dir, config)
    missing = [t for t in specials.values() if t is not None and t not in vocab]
    added = [_content(t) for t in (config.get("added_tokens_decoder") or {}).values()]
    missing += [t for t in added if t is not None and t not in vocab]
    if missing:
        return f"special tokens {missing} are not in tokenizer.json (transformers adds them)"
    for key in ("split_special_tokens", "add_prefix_space"):
        if config.get(key):
            return f"{key} is set"
    return None


def _special_tokens(model_dir: Path, config: dict) -> dict:
    """The named special tokens as transformers reads them: tokenizer_config.json over special_tokens_map.json."""
    named = {k: _content(v) for k, v in _read_json(model_dir / "special_tokens_map.json").items() if k in NAMED_SPECIAL}
    named.update({k: _content(config[k]) for k in NAMED_SPECIAL if k in config})
    return named


class TokenizersTokenizer:
    """tokenizer.json through `tokenizers`, with the reference's settings: pad = eos, left padding, right
    truncation. The attributes and calls of transformers' tokenizer that armu_jax uses."""

    padding_side = "left"
    truncation_side = "right"

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer  # only when a tokenizer is built
        self.model_dir = Path(model_dir)
        self.backend = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        config = _read_json(self.model_dir / "tokenizer_config.json")
        specials = _special_tokens(self.model_dir, config)
        self.bos_token, self.eos_token = specials.get("bos_token"), specials.get("eos_token")
        self.bos_token_id = self.token_id(self.bos_token)
        self.eos_token_id = self.token_id(self.eos_token)
        self.pad_token, self.pad_token_id = self.eos_token, self.eos_token_id

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def __call__(self, texts, padding: bool = False, truncation: bool = False, max_length: int | None = None,
                 return_tensors: str | None = None, add_special_tokens: bool = True) -> dict:
        if truncation and not max_length:
            raise ValueError("truncation needs max_length (transformers would take model_max_length: give it)")
        if truncation:
            self.backend.enable_truncation(max_length, direction=self.truncation_side)
        else:
            self.backend.no_truncation()
        if isinstance(texts, str):
            self.backend.no_padding()
            enc = self.backend.encode(texts, add_special_tokens=add_special_tokens)
            return {"input_ids": list(enc.ids), "attention_mask": list(enc.attention_mask)}
        if padding:
            self.backend.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id, pad_token=self.pad_token)
        else:
            self.backend.no_padding()
        encs = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ids, mask = [e.ids for e in encs], [e.attention_mask for e in encs]
        if return_tensors == "np":
            return {"input_ids": np.array(ids, dtype=np.int64), "attention_mask": np.array(mask, dtype=np.int64)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: this tokenizer gives numpy arrays ('np') or lists")
        return {"input_ids": ids, "attention_mask": mask}
