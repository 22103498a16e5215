"""Families end to end: a 3-step unlearning run with export that transformers reloads, --mode=parity on
every family's tiny model, and the native evaluator against lm-eval on a non-Llama family."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from helpers import read_metrics, run_cli, tiny_family_model, with_tokenizer
from safetensors.numpy import load_file

from armu_jax import families
from armu_jax.config import config_with
from armu_jax.evaluate import load_params, scorer_for
from armu_jax.families import read_model_config
from armu_jax.lm_eval_mode import per_doc_predictions, run_lm_eval_on
from armu_jax.parity import parity_cli
from armu_jax.tasks import load_tasks
from armu_jax.train import run

FAMILIES = ("qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2")
VOCAB = 49152  # SmolLM2's tokenizer


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("families")
    return {f: with_tokenizer(tiny_family_model(tmp, f, vocab=VOCAB), smollm2_dir) for f in FAMILIES}


@pytest.mark.slow
def test_three_step_runs_export_what_transformers_reloads(tmp_path, family_dirs):
    for family, model_dir in family_dirs.items():
        out = tmp_path / family
        run(config_with(model=str(model_dir), layer_id=2, lr=1e-2, alpha=[10], forget_max_len=[24],
                        retain_max_len=24, pad_multiple=24, max_num_batches=3, checkpoint_every=0, output_dir=str(out)))
        metrics = read_metrics(out)
        assert [m["step"] for m in metrics] == [0, 1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
        original = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
        assert type(reloaded) is type(original)
        before, after = load_file(model_dir / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
        assert set(before) == set(after)
        changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
        # The family's default updated parameters of layers 0..2; Phi-3's down_proj is unfused, its
        # fused qkv/gate_up tensors are copied unchanged.
        names = families.update_params_for(("default",), read_model_config(model_dir))
        suffixes = [f".{n}.weight" for n in names]
        want = sorted(f"model.layers.{i}{s}" for i in range(3) for s in suffixes)
        assert changed == want, family
        state = reloaded.state_dict()
        assert all(torch.equal(state[k], torch.from_numpy(after[k])) for k in after if k in state)


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_mode_passes_on_every_family(tmp_path, family_dirs, family):
    out = tmp_path / "parity"
    assert parity_cli(config_with(mode="parity", model=str(family_dirs[family]), output_dir=str(out))) == 0
    report = json.loads((out / "parity.json").read_text())
    tokens, mask, logits = (np.load(out / f"{n}.npy") for n in ("tokens", "mask", "logits"))
    assert logits.shape == (*tokens.shape, VOCAB) and mask.shape == tokens.shape and logits.dtype == np.float32
    assert report["passed"] and report["first_departing_layer"] is None
    assert report["max_abs_logit_diff"] <= 1e-4 * report["max_abs_logit"]
    assert report["real_tokens"] == int(mask.sum()) < mask.size  # left padding present


def test_parity_mode_finds_a_wrong_port(tmp_path, family_dirs, monkeypatch):
    """Gemma-2 read without its embedding scale: exit 1, the departure found at layer 0."""
    arch = "Gemma2ForCausalLM"
    broken = dataclasses.replace(families.FAMILIES[arch],
                                 features={**families.FAMILIES[arch].features, "scale_embeddings": False})
    monkeypatch.setitem(families.FAMILIES, arch, broken)
    out = tmp_path / "parity"
    assert parity_cli(config_with(mode="parity", model=str(family_dirs["gemma2"]), output_dir=str(out))) == 1
    report = json.loads((out / "parity.json").read_text())
    assert not report["passed"] and report["first_departing_layer"] == 0


@pytest.mark.reference
def test_native_answers_equal_lm_eval_on_gemma2(tmp_path, family_dirs):
    """Soft-caps, sliding windows (5 tokens, shorter than every question) and the packed, shared-prefix
    layout: every chosen answer is lm-eval's."""
    model_dir = family_dirs["gemma2"]
    tasks = load_tasks(["demo"], 8)
    params = load_params(model_dir)
    native = {t.name: scorer_for(model_dir, batch_size=8).multiple_choice(params, t) for t in tasks}
    results = run_lm_eval_on(model_dir, tasks, [], tmp_path / "lm_eval", batch_size=8, log_samples=True)
    for task in tasks:
        ours, docs = native[task.name], per_doc_predictions(results, task.name)
        lls_ours = np.array([d["loglikelihoods"] for d in ours["docs"]])
        lls_theirs = np.array([d["loglikelihoods"] for d in docs])
        print(f"{task.name}: max |loglikelihood diff| {np.abs(lls_ours - lls_theirs).max():.1e}")
        assert np.abs(lls_ours - lls_theirs).max() <= 2e-3
        assert [d["pred"] for d in ours["docs"]] == list(lls_theirs.argmax(1))
        assert ours["acc"] == results["results"][task.name]["acc,none"]


def test_parity_mode_refuses_bad_input_before_writing(tmp_path, family_dirs):
    from armu_jax.errors import UserError
    model = str(family_dirs["qwen2"])
    with pytest.raises(UserError, match="does not exist"):
        parity_cli(config_with(mode="parity", model=model, parity_texts=str(tmp_path / "none.txt"),
                               output_dir=str(tmp_path / "a")))
    bad = tmp_path / "texts.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(UserError, match=r"texts.jsonl:2 is not a JSON object with a \"text\" field"):
        parity_cli(config_with(mode="parity", model=model, parity_texts=str(bad), output_dir=str(tmp_path / "b")))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        parity_cli(config_with(mode="parity", model=model, output_dir=str(taken)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]


def test_unsupported_model_on_the_command_line_is_one_line_exit_2(tmp_path, family_dirs):
    """A mixture-of-experts config.json given to a run: one error line, exit 2, no run directory."""
    import shutil
    moe = tmp_path / "moe"
    shutil.copytree(family_dirs["qwen3"], moe)
    hf = json.loads((moe / "config.json").read_text())
    hf.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=8)
    (moe / "config.json").write_text(json.dumps(hf))
    out = tmp_path / "run"
    result = run_cli(f"--model={moe}", f"--output_dir={out}")
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2 and lines[-1].startswith("error: ") and "mixture-of-experts" in lines[-1]
    assert not any(line.startswith("Traceback") for line in lines) and not out.exists()
