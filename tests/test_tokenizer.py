"""The tokenizer without transformers (armu_jax.tokenizer) gives AutoTokenizer's ids, masks and padding on
every demo corpus, for the embedded model's files and for the generic configurations of other families
(add_bos_token, add_eos_token, a BOS post-processor in tokenizer.json); the configurations transformers
rebuilds from a class keep transformers; a run's tokenizer imports no torch."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

from armu_jax.data import load_tokenizer, read_corpus, tokenize
from armu_jax.shipped import smollm2_dir
from armu_jax.tokenizer import TokenizersTokenizer, native_reason

CORPORA = ("demo:bio", "demo:cyber", "demo:retain")


def _variant(tmp_path, name, config: dict, post_processor=None, model_type=None):
    """SmolLM2's tokenizer files with another tokenizer_config.json (and tokenizer.json post-processor)."""
    d = tmp_path / name
    d.mkdir()
    src = smollm2_dir()
    tok = json.loads((src / "tokenizer.json").read_text())
    if post_processor is not None:
        tok["post_processor"] = post_processor
    (d / "tokenizer.json").write_text(json.dumps(tok))
    base = json.loads((src / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**base, **config}))
    shutil.copy(src / "config.json", d / "config.json")
    if model_type:
        (d / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), "model_type": model_type}))
    return d


def _same(ours, theirs, texts, max_lens=(8, 64, 512)):
    for max_len in max_lens:
        for i in range(0, len(texts), 64):
            a = tokenize(ours, texts[i:i + 64], max_len, 64, 32, "none")
            b = tokenize(theirs, texts[i:i + 64], max_len, 64, 32, "none")
            for key in a:
                assert np.array_equal(a[key], b[key]), (max_len, i, key)
    for text in texts[:50]:  # the evaluator's continuation ids
        assert ours(text, add_special_tokens=False)["input_ids"] == theirs(text, add_special_tokens=False)["input_ids"]
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == \
        (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id)


@pytest.mark.reference
def test_the_embedded_tokenizer_matches_transformers_on_every_corpus():
    ours, theirs = load_tokenizer(smollm2_dir()), load_tokenizer(smollm2_dir(), "transformers")
    assert isinstance(ours, TokenizersTokenizer) and not isinstance(theirs, TokenizersTokenizer)
    for corpus in CORPORA:
        _same(ours, theirs, read_corpus(corpus))


LLAMA3_POST = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
               "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": "<|im_start|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
               "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}


@pytest.mark.parametrize("name,config,post", [
    ("fast_class", {"tokenizer_class": "PreTrainedTokenizerFast"}, None),
    ("add_bos", {"add_bos_token": True}, None),  # a generic class: tokenizer.json decides, not these keys
    ("add_eos", {"add_eos_token": True}, None),
    ("add_both", {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": True}, None),
    ("no_bos_token", {"bos_token": None}, None),  # Qwen-style: no bos
    ("llama3_post", {"tokenizer_class": "PreTrainedTokenizerFast"}, LLAMA3_POST),  # Llama-3: BOS from tokenizer.json
    ("post_and_keys", {"add_bos_token": False, "add_eos_token": True}, LLAMA3_POST),
])
def test_generic_configurations_match_transformers(tmp_path, name, config, post):
    d = _variant(tmp_path, name, config, post)
    assert native_reason(d) is None
    ours, theirs = load_tokenizer(d), load_tokenizer(d, "transformers")
    assert isinstance(ours, TokenizersTokenizer)
    texts = read_corpus("demo:bio")[:128] + read_corpus("demo:retain")[:64]
    _same(ours, theirs, texts, (8, 128))
    first = ours(texts[:4], padding=True, truncation=True, max_length=8, return_tensors="np")
    bos = first["input_ids"][first["attention_mask"] == 1].reshape(4, -1)[:, 0] == 1
    assert bos.all() == (post is not None) and (bos.any() or post is None)  # the BOS template is honoured


@pytest.mark.parametrize("config,model_type,why", [
    ({"tokenizer_class": "LlamaTokenizer"}, None, "rebuilt by transformers"),
    ({"tokenizer_class": "Qwen2Tokenizer"}, None, "rebuilt by transformers"),
    ({"tokenizer_class": "GemmaTokenizer"}, None, "rebuilt by transformers"),
    ({"tokenizer_class": "GPT2Tokenizer"}, None, "rebuilt by transformers"),
    ({}, "mistral", "Mistral"),
    ({"pad_token": "<|not-in-vocab|>"}, None, "not in tokenizer.json"),
])
def test_configurations_transformers_rebuilds_keep_transformers(tmp_path, config, model_type, why):
    d = _variant(tmp_path, "v", config, model_type=model_type)
    assert why in native_reason(d)


def test_a_runs_tokenizer_imports_no_torch():
    code = ("import sys; from armu_jax.data import load_tokenizer; from armu_jax.shipped import smollm2_dir; "
            "import armu_jax.train, armu_jax.evaluate; load_tokenizer(smollm2_dir()); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
