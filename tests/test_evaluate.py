"""The native evaluator: NLL against transformers; the demo tasks are deterministic and held out."""
import numpy as np
import torch
import transformers

from armu_jax.data import is_held_out, read_corpus
from armu_jax.evaluate import demo_mc_items, demo_nll_texts, scorer_for


def test_nll_matches_transformers(smollm2_dir):
    texts = demo_nll_texts("bio", limit=5)
    scorer = scorer_for(smollm2_dir, batch_size=4)
    ours = scorer.nll_per_token(texts, max_tokens=48)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    total = count = 0.0
    for text in texts:
        ids = torch.tensor([scorer.tokenizer(text, add_special_tokens=False)["input_ids"][:48]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        total -= logp.gather(1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    assert abs(ours - total / count) <= 1e-4


def test_demo_items_are_deterministic_and_held_out():
    for topic in ("bio", "cyber", "retain"):
        a, b = demo_mc_items(topic), demo_mc_items(topic)
        assert a == b and len(a) > 50
        assert all(is_held_out(item["title"]) for item in a)
        assert all(len(item["choices"]) == 4 and len(set(item["choices"])) == 4 for item in a)
        answers = np.bincount([item["answer"] for item in a], minlength=4) / len(a)
        assert answers.min() > 0.15  # the correct answer's position is spread over A-D
    train = set(read_corpus("demo:bio"))
    assert not train & set(demo_nll_texts("bio"))
