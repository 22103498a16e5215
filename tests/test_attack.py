"""--mode=attack: direction ablation, relearning (against a PyTorch fine-tune), the report, bad input."""
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from armu_jax.attack import AttackedRun, ablation_variables, attack_cli, plot_report, relearn, relearn_names, text_batch
from armu_jax.config import config_with
from armu_jax.data import load_tokenizer, read_corpus
from armu_jax.errors import UserError
from armu_jax.evaluate import read_samples
from armu_jax.hf_io import load_hf
from armu_jax.model import CausalLM
from armu_jax.params import flatten, path_to_hf_key
from armu_jax.train import run


@pytest.fixture(scope="module")
def unlearned_run(tmp_path_factory, tiny_llama):
    """A short RMU run of a tiny Llama (vocab of SmolLM2's tokenizer) with known control vectors."""
    tmp = tmp_path_factory.mktemp("attack")
    model_dir = tiny_llama
    vectors = np.random.default_rng(7).random((2, 60)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.save(tmp / "u.npy", vectors)
    out = tmp / "run"
    run(config_with(model=str(model_dir), method="rmu", steering_coeffs=["20"], layer_id=2, lr=1e-2, alpha=[10],
                    forget_max_len=[32], retain_max_len=32, pad_multiple=32, max_num_batches=8, checkpoint_every=0,
                    control_vectors=str(tmp / "u.npy"), output_dir=str(out)))
    return out, model_dir, vectors


def _forward_upto(model_dir, variables, texts, layer):
    cfg, _ = load_hf(model_dir)
    model = CausalLM(cfg)
    batch = text_batch(load_tokenizer(model_dir), texts, 32)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    h = model.apply(variables, ids, mask, layer=layer, method=CausalLM.hidden_upto)
    return np.asarray(h)[mask.astype(bool)]


@pytest.mark.slow
def test_ablating_u_removes_its_component_from_layer_l_on(unlearned_run):
    out, _, vectors = unlearned_run
    target = AttackedRun(str(out))
    assert np.array_equal(target.vectors, vectors)
    _, params = load_hf(out / "hf")
    texts = read_corpus("demo:bio")[:6]
    variables = ablation_variables(params, vectors, 2, 4)
    for layer in (2, 3):
        before = _forward_upto(out / "hf", params, texts, layer)
        after = _forward_upto(out / "hf", variables, texts, layer)
        along = lambda h: np.abs(h @ vectors.T) / np.linalg.norm(h, axis=1, keepdims=True)  # |cos(h, u_k)|
        assert along(before).mean() > 0.3  # RMU pushed layer-l activations towards c * u
        assert along(after).max() < 1e-5  # ablated: no component along either u left
    below = _forward_upto(out / "hf", variables, texts, 1)  # layers before l are untouched
    assert np.array_equal(below, _forward_upto(out / "hf", params, texts, 1))


def _texts_and_batch(model_dir):
    texts = read_corpus("demo:retain")[:3]
    return text_batch(load_tokenizer(model_dir), texts, 24, 3)


@pytest.mark.slow
def test_relearning_with_lr_0_changes_nothing(unlearned_run):
    out, _, _ = unlearned_run
    cfg, params = load_hf(out / "hf")
    batch = _texts_and_batch(out / "hf")
    tuned, losses = relearn(CausalLM(cfg), params, relearn_names(params, ("all",), ()), batch,
                            steps=3, lr=0.0, weight_decay=0.01)
    assert len(losses) == 3 and losses[0] == losses[2] > 0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tuned)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_relearning_a_selection_changes_only_it_and_lays_it_out_like_the_step(unlearned_run):
    """--relearn_params=mlp.down_proj --relearn_layers=2 on a data:2,fsdp:4 mesh: only that tensor moves."""
    from armu_jax.sharding import make_mesh
    out, _, _ = unlearned_run
    cfg, params = load_hf(out / "hf")
    batch = _texts_and_batch(out / "hf")
    names = relearn_names(params, ("mlp.down_proj",), (2,))
    assert names == ["model/layers_2/mlp/down_proj/kernel"]
    tuned, _ = relearn(CausalLM(cfg), params, names, batch, steps=1, lr=1e-3, weight_decay=0.0,
                       mesh=make_mesh("data:2,fsdp:4"))
    changed = [p for p, v in flatten(tuned).items() if not np.array_equal(np.asarray(v), np.asarray(flatten(params)[p]))]
    assert changed == [("model", "layers_2", "mlp", "down_proj", "kernel")]
    with pytest.raises(UserError, match="has no parameter model/layers_2/mlp/side_proj/kernel"):
        relearn_names(params, ("mlp.side_proj",), (2,))


def test_relearn_params_layers_is_every_parameter_of_those_layers(tiny_llama):
    """--relearn_params=layers (the default): every leaf of --relearn_layers, nothing of the other layers, the
    embedding or the final norm; `all` is every leaf."""
    cfg, params = load_hf(tiny_llama)
    names = relearn_names(params, ("layers",), (1, 2))
    every = ["/".join(p) for p in flatten(params)]
    assert names and set(names) == {n for n in every if n.split("/")[1] in ("layers_1", "layers_2")}
    assert len(names) == 2 * len([n for n in every if n.split("/")[1] == "layers_0"])
    assert set(relearn_names(params, ("all",), (1,))) == set(every)


def test_relearning_loss_in_passes_is_the_one_pass_loss(tiny_llama):
    """lm_loss sums its batch 2 rows at a time, each pass's forward recomputed in the backward pass, and runs the
    head in chunks: loss and gradient equal one pass over all rows with whole logits (the formula it replaced,
    transformers' loss). Both are float32 sums of the same terms in another order, so they may differ by
    rounding: at most n float32 epsilons of their scale for a sum of n terms (n = the 110-odd real positions:
    7e-6; measured: 3e-7 on the loss, at most 0.07 of the bound on the gradients). A real error, a dropped row
    or a mis-weighted pad, moves them by far more."""
    import jax.numpy as jnp

    from armu_jax.attack import lm_loss

    cfg, params = load_hf(tiny_llama)
    model = CausalLM(cfg)
    texts = [t[: 40 + 25 * k] for k, t in enumerate(read_corpus("demo:retain")[:5])]  # 5 rows, padded unequally
    batch = text_batch(load_tokenizer(tiny_llama), texts, 24)
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # some rows are padded

    def whole(p):  # one pass, whole logits
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logp = jax.nn.log_softmax(model.apply(p, ids, mask, batch["positions"])[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        weight = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        return jnp.sum(nll * weight) / jnp.sum(weight)

    terms = int((batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).sum())
    bound = terms * np.finfo(np.float32).eps  # a float32 sum of `terms` terms, relative to its scale
    want, want_grad = jax.value_and_grad(whole)(params)
    got, got_grad = jax.jit(jax.value_and_grad(lambda p: lm_loss(model, p, batch, rows=2)))(params)
    loss_tol = bound * abs(float(want))
    assert abs(float(got - want)) <= loss_tol
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        scale = float(np.abs(b).max())
        assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= bound * scale
    # a dropped pass is caught: the last row left out moves the loss far past the bound
    short = {k: v[:4] for k, v in batch.items()}
    assert abs(float(lm_loss(model, params, short, rows=2)) - float(want)) > 100 * loss_tol


def _torch_fine_tune(model_dir, ids, mask, lr, weight_decay, nudge=False):
    """transformers' loss (labels = ids, pads -100) and torch.optim.AdamW, 3 steps; nudge: every weight
    one float32 ulp up first (the last-bit drift that sets the tolerance)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if nudge:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, eps=1e-8)
    labels = torch.tensor(np.where(mask == 1, ids, -100), dtype=torch.long)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, losses


@pytest.mark.reference
def test_relearning_matches_a_pytorch_fine_tune(unlearned_run):
    """Three AdamW steps on the same HF model and texts, all parameters, float32: losses to 1e-4, and
    every weight to 1e-4 of its tensor's scale, or 10x torch's own drift from a one-ulp nudge where
    that is larger (Adam normalises each gradient, so elements whose gradient is mostly rounding
    move by rounding: torch itself moves layer 3's down_proj by 2.5e-4 of its scale)."""
    _, model_dir, _ = unlearned_run
    batch = _texts_and_batch(model_dir)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lr, weight_decay = 1e-3, 0.01
    want, torch_losses = _torch_fine_tune(model_dir, ids, mask, lr, weight_decay)
    nudged, _ = _torch_fine_tune(model_dir, ids, mask, lr, weight_decay, nudge=True)

    cfg, params = load_hf(model_dir)
    start = {p: np.asarray(v) for p, v in flatten(params).items()}
    tuned, losses = relearn(CausalLM(cfg), params, relearn_names(params, ("all",), ()), batch,
                            steps=3, lr=lr, weight_decay=weight_decay)
    assert losses == pytest.approx(torch_losses, rel=1e-4)
    for path, value in flatten(tuned).items():
        key, transpose = path_to_hf_key(path)
        ref, drift = (want[key].T, (nudged[key] - want[key]).T) if transpose else (want[key], nudged[key] - want[key])
        got = np.asarray(value)
        tolerance = max(1e-4 * np.abs(ref).max(), 10 * np.abs(drift).max())
        assert np.abs(got - ref).max() <= tolerance, key
        assert not np.array_equal(got, start[path])  # it did move


@pytest.mark.slow
def test_attack_mode_end_to_end(unlearned_run, tmp_path, monkeypatch):
    out, _, _ = unlearned_run
    report_dir = tmp_path / "attack"
    cfg = config_with(mode="attack", run_dir=str(out), output_dir=str(report_dir), eval_tasks=["demo_bio"],
                      eval_limit=6, relearn_texts=4, relearn_steps=2, relearn_lr=1e-3, relearn_max_len=32,
                      ablate_k=2)
    import armu_jax.attack as attack_module
    held = []  # bytes of live arrays beyond those before the attack, at each evaluation and relearning
    before = sum(a.nbytes for a in jax.live_arrays())

    def spied(real):
        def call(*args, **kwargs):
            held.append(sum(a.nbytes for a in jax.live_arrays()) - before)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(attack_module, "evaluate_tasks", spied(attack_module.evaluate_tasks))
    monkeypatch.setattr(attack_module, "relearn", spied(attack_module.relearn))
    attack_cli(cfg)
    model_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(load_hf(out / "hf")[1]))
    assert len(held) == 12 and max(held) < 1.5 * model_bytes  # one model resident at a time (two: >= 2x)
    report = json.loads((report_dir / "attack.json").read_text())
    results = report["results"]
    assert list(results) == ["original", "unlearned", "ablate_u", "ablate_pca", "relearn_forget",
                             "control: relearn_forget on original", "relearn_retain",
                             "control: relearn_retain on original"]
    assert report["settings"]["relearn_params"] == ["layers"] and report["settings"]["relearn_layers"] == [0, 1, 2]
    for attack, per_task in report["recovery"].items():
        for task, fraction in per_task.items():
            o, u, a = (results[k][task]["nll"] for k in ("original", "unlearned", attack))
            if fraction["nll"] is not None:
                assert fraction["nll"] == pytest.approx((a - u) / (o - u))
                low, high = fraction["nll_ci"]  # the bootstrap over texts holds the point
                assert low <= fraction["nll"] <= high
            versus = fraction["acc_vs_unlearned"]  # paired on the same questions
            assert versus["test"] == "mcnemar_exact" and versus["diff"] == pytest.approx(
                results[attack][task]["acc"] - results["unlearned"][task]["acc"])
    # a record per question (and text) per model, whose means are the reported accuracies
    samples = read_samples(report_dir / "samples.jsonl")
    for name in results:
        mine = [r for r in samples if r["model"] == name and r.get("type") != "nll"]
        assert len(mine) == 6 and np.mean([r["acc"] for r in mine]) == pytest.approx(results[name]["demo_bio"]["acc"])
    assert len(report["relearn_texts"]["forget"]) == 4 and len(report["relearn_texts"]["retain"]) == 4
    used = AttackedRun(str(out)).texts_used(0)  # relearning texts are ones the run did not train on
    assert not set(report["relearn_texts"]["forget"]) & set(read_corpus("demo:bio")[:used])
    assert np.load(report_dir / "pca_directions.npy").shape == (2, 60)
    # the figure shows every model's accuracy and NLL per task, and the tasks' chance level
    acc_panel, nll_panel = plot_report(tmp_path / "again.png", report)
    assert acc_panel["bars"] == {name: [100 * results[name]["demo_bio"]["acc"]] for name in results}
    assert nll_panel["bars"] == {name: [results[name]["demo_bio"]["nll"]] for name in results}
    assert acc_panel["hlines"] == {"chance (25%)": 25.0}
    assert (report_dir / "attack.png").read_bytes()[:4] == b"\x89PNG"
    md = (report_dir / "attack.md").read_text()
    assert "| ablate_u | demo_bio |" in md and "| relearn_retain on original | demo_bio |" in md



def test_bad_attack_input_is_one_line_and_writes_nothing(unlearned_run, tmp_path):
    out, model_dir, _ = unlearned_run
    report_dir = tmp_path / "attack"
    cases = {
        "not a run": (dict(run_dir=str(model_dir)), "is not a run's directory with an export"),
        "unknown attack": (dict(run_dir=str(out), attacks=["jailbreak"]), "unknown attack jailbreak"),
        "K too large": (dict(run_dir=str(out), relearn_texts=100000), "is larger than the"),
    }
    no_vectors = tmp_path / "novectors"
    no_vectors.mkdir()
    (no_vectors / "flags.txt").write_text((out / "flags.txt").read_text())
    (no_vectors / "hf").symlink_to(out / "hf")
    cases["no control vectors"] = (dict(run_dir=str(no_vectors)), "has no control_vectors.npy")
    for name, (settings, message) in cases.items():
        with pytest.raises(UserError, match=message):
            attack_cli(config_with(mode="attack", output_dir=str(report_dir), **settings))
        assert not report_dir.exists(), name


def test_principal_directions_recover_planted_directions():
    """ablate_pca's directions: the top right singular vectors of the activation differences. Two directions
    planted with scales 10 and 5 over noise 0.01 come back (each up to sign, in order), orthonormal, and equal to
    torch's SVD of the same differences (an independent implementation)."""

    from armu_jax.attack import principal_directions
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(60, 2)))
    original = rng.normal(size=(500, 60)).astype(np.float32)
    planted = rng.normal(size=(500, 2)) * np.array([10.0, 5.0])
    unlearned = (original + planted @ basis.T + 0.01 * rng.normal(size=(500, 60))).astype(np.float32)
    found = principal_directions(unlearned, original, 2)
    assert found.shape == (2, 60)
    np.testing.assert_allclose(found @ found.T, np.eye(2), atol=1e-5)
    assert abs(found[0] @ basis[:, 0]) > 0.999 and abs(found[1] @ basis[:, 1]) > 0.999
    _, _, vt = torch.linalg.svd(torch.tensor(unlearned, dtype=torch.float64) - torch.tensor(original, dtype=torch.float64),
                                full_matrices=False)
    for mine, theirs in zip(found, vt[:2].numpy()):
        assert abs(float(mine @ theirs)) > 1 - 1e-6


@pytest.mark.slow
def test_rtt_and_kshot_attacks(unlearned_run, tmp_path):
    """relearn_rtt relearns on facts of the forget task's validation items and is scored on its test items (no
    title shared); kshot asks each test question after --kshot answered validation questions, on the unlearned
    model and (the control) on the original; both report recovered fractions as the other attacks."""
    from armu_jax.attack import attack_texts, validation_items
    from armu_jax.evaluate import scorer_for
    from armu_jax.tasks import load_tasks
    out, _, _ = unlearned_run
    report_dir = tmp_path / "attack"
    cfg = config_with(mode="attack", run_dir=str(out), output_dir=str(report_dir), eval_tasks=["demo_bio", "demo_retain"],
                      eval_limit=6, relearn_steps=2, relearn_lr=1e-3, relearn_max_len=32,
                      attacks=["relearn_rtt", "kshot"], kshot=3)
    facts = attack_texts(cfg, AttackedRun(str(out)))["rtt"]
    validation = {d["title"] for d in validation_items(cfg)[0].docs}
    test = {d["title"] for d in load_tasks(["demo_bio"])[0].docs}
    assert len(facts) == 64 and not validation & test
    assert all(f.split(" is ")[0] in validation for f in facts)  # "<title> is <its own description>"
    one = validation_items(cfg)[0]
    assert one.fact(one.docs[0]) == f"{one.docs[0]['title']} is {one.docs[0]['choices'][one.docs[0]['answer']]}"
    shot = load_tasks(["demo_bio"], 1)[0].with_shots(one.docs[:2])
    context = shot.context(shot.docs[0])
    assert context == f"{one.fact(one.docs[0])}\n\n{one.fact(one.docs[1])}\n\n{shot.docs[0]['title']} is"
    scorer = scorer_for(out / "hf")  # what a 2-shot question asks: the shots' tokens before the title
    assert len(scorer._encode_pair(context, " x")[0]) > len(scorer._encode_pair(f"{shot.docs[0]['title']} is", " x")[0]) + 8

    attack_cli(cfg)
    report = json.loads((report_dir / "attack.json").read_text())
    results = report["results"]
    assert set(results) == {"original", "unlearned", "relearn_rtt", "kshot", "control: relearn_rtt on original",
                            "control: kshot on original"}
    assert results["kshot"]["demo_retain"] == results["unlearned"]["demo_retain"]  # retain asked as before
    samples = read_samples(report_dir / "samples.jsonl")
    lls = lambda model, task: [r["loglikelihoods"] for r in samples if r["model"] == model and r["task"] == task
                               and r.get("type") != "nll"]
    assert len(lls("kshot", "demo_bio")) == 6 and lls("kshot", "demo_bio") != lls("unlearned", "demo_bio")
    assert lls("kshot", "demo_retain") == lls("unlearned", "demo_retain")
    assert set(report["recovery"]) == {"relearn_rtt", "kshot"}
    assert report["relearn_texts"]["rtt"] == facts
