"""The native evaluator: the same answers as lm-eval's hf backend, NLL as transformers, held-out demo data."""
import json

import numpy as np
import pytest
import torch
import transformers

from armu_jax.data import is_held_out, read_corpus
from armu_jax.errors import UserError
from armu_jax.evaluate import load_params, read_samples, scorer_for, write_samples
from armu_jax.lm_eval_mode import per_doc_predictions, run_lm_eval_on
from armu_jax.stats import wilson
from armu_jax.tasks import demo_task, load_tasks, mean_chance, mmlu_task


@pytest.mark.reference
def test_nll_matches_transformers(smollm2_dir):
    texts = demo_task("bio").nll_texts[:5]
    scorer = scorer_for(smollm2_dir, batch_size=4)
    ours = scorer.nll_per_token(load_params(smollm2_dir), texts, max_tokens=48)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    total = count = 0.0
    for text in texts:
        ids = torch.tensor([scorer.tokenizer(text, add_special_tokens=False)["input_ids"][:48]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        total -= logp.gather(1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    print(f"held-out NLL: ours {ours:.6f}, transformers {total / count:.6f}")
    # A mean NLL of ~3 nat over float32 log-softmaxes of 49k entries (one ulp of 3 is 2.4e-7; the logits differ
    # from transformers' by ~1e-4 at most, test_gemma/test_model, and a mean over thousands of tokens averages
    # that down): 1e-4 passes any CPU's rounding; a token off by one or a missing shift moves it by >0.1.
    assert abs(ours - total / count) <= 1e-4


def test_demo_tasks_are_deterministic_and_held_out():
    for topic in ("bio", "cyber", "retain", "physical"):
        a, b = demo_task(topic), demo_task(topic)
        assert a.docs == b.docs and a.requests() == b.requests() and len(a.docs) > 50
        assert all(is_held_out(doc["title"]) for doc in a.docs)
        assert all(len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4 for doc in a.docs)
        answers = np.bincount([doc["answer"] for doc in a.docs], minlength=4) / len(a.docs)
        assert answers.min() > 0.15  # the correct answer's position is spread over A-D
        train = set(read_corpus("demo:retain" if topic == "physical" else f"demo:{topic}"))  # physical: of retain
        assert not train & set(a.nll_texts)
    assert demo_task("bio", seed=1).docs != demo_task("bio").docs


def test_mmlu_is_interleaved_over_subjects():
    task = mmlu_task()
    assert len(task.docs) == 14042
    first = task.docs[:57]
    assert len({d["subject"] for d in first}) == 57
    assert first[0]["description"] == ("The following are multiple choice questions (with answers) about "
                                       "abstract algebra.\n\n")


@pytest.mark.reference
def test_native_answers_equal_lm_eval(tmp_path, smollm2_dir):
    """Same items, same model (float32): every chosen answer (acc and acc_norm) is lm-eval's."""
    wmdp = tmp_path / "bio.jsonl"  # a WMDP-format file (from MMLU biology questions) for the wrapper task
    docs = [d for d in mmlu_task().docs if d["subject"] == "college_biology"][:8]
    wmdp.write_text("".join(json.dumps({k: d[k] for k in ("question", "choices", "answer")}) + "\n" for d in docs))
    specs = ["demo", "mmlu", f"wmdp_bio:{wmdp}"]
    limits = {"demo_bio": 6, "demo_cyber": 6, "demo_retain": 6, "demo_physical": 6, "mmlu": 8,
              "wmdp_bio": 8}  # mmlu: 8 subjects (one batch)
    tasks = load_tasks(specs, limits, "all")  # every item of the 8-question file
    scorer, params = scorer_for(smollm2_dir, batch_size=8), load_params(smollm2_dir)
    native = {t.name: scorer.multiple_choice(params, t) for t in tasks}

    results = run_lm_eval_on(smollm2_dir, tasks, [], tmp_path / "lm_eval", batch_size=8, log_samples=True)
    theirs = {}
    for task in tasks:  # lm-eval's names: demo_* as ours, mmlu_local and wmdp_bio_local for the wrappers
        name = task.name if task.name.startswith("demo_") else f"{task.name}_local"
        theirs[task.name] = (results["results"][name], per_doc_predictions(results, name))

    for name, ours in native.items():
        metrics, docs = theirs[name]
        assert len(docs) == ours["n"] == limits[name]
        lls_ours = np.array([d["loglikelihoods"] for d in ours["docs"]])
        lls_theirs = np.array([d["loglikelihoods"] for d in docs])
        print(f"{name}: acc {ours['acc']:.3f} (lm-eval {metrics['acc,none']:.3f}), "
              f"max |loglikelihood diff| {np.abs(lls_ours - lls_theirs).max():.1e}")
        # A summed log-likelihood over up to ~40 tokens, each a float32 log-softmax whose logits differ from
        # torch's by up to ~1e-4 (SmolLM2's one-ulp drift is 2.6e-5 of logits ~30, test_model): 40 x 5e-5 =
        # 2e-3. A wrong token boundary or a missing bos moves it by >0.1 (the bos control below: >100x).
        assert np.abs(lls_ours - lls_theirs).max() <= 2e-3
        assert [d["pred"] for d in ours["docs"]] == list(lls_theirs.argmax(1))
        assert [d["acc"] for d in docs] == [float(d["pred"] == t["answer"]) for d, t in
                                            zip(ours["docs"], next(x for x in tasks if x.name == name).docs)]
        assert ours["acc"] == metrics["acc,none"]
        if "acc_norm" in ours:
            assert [d["acc_norm"] for d in docs] == [
                float(d["pred_norm"] == t["answer"]) for d, t in
                zip(ours["docs"], next(x for x in tasks if x.name == name).docs)]
            assert ours["acc_norm"] == metrics["acc_norm,none"]

    # samples.jsonl of both evaluators, item by item: the same questions, the same 0/1 scores, the same
    # log-likelihoods (to the float32 drift above); each file's mean is the accuracy it reports
    native_file = tmp_path / "native_samples.jsonl"
    write_samples(native_file, [d for ours in native.values() for d in ours["docs"]])
    mine, lm_eval = read_samples(native_file), read_samples(tmp_path / "lm_eval" / "samples.jsonl")
    assert len(mine) == len(lm_eval) == sum(limits.values())
    key = lambda r: (r["task"], r["doc_id"])
    for a, b in zip(sorted(mine, key=key), sorted(lm_eval, key=key)):
        assert key(a) == key(b) and a["acc"] == b["acc"]
        assert a["acc_norm"] == b.get("acc_norm", a["acc_norm"])  # lm-eval logs acc_norm where the task has it
        assert a["target"] == b["target"] and a["pred"] == b["pred"] and a["pred_norm"] == b["pred_norm"]
        assert np.abs(np.array(a["loglikelihoods"]) - b["loglikelihoods"]).max() <= 2e-3
    assert sum("acc_norm" in r for r in lm_eval) >= limits["demo_bio"]
    for name, ours in native.items():
        assert np.mean([r["acc"] for r in lm_eval if r["task"] == name]) == pytest.approx(ours["acc"])
        low, high = ours["acc_ci"]
        assert low <= ours["acc"] <= high and (low, high) == pytest.approx(wilson(ours["acc"] * ours["n"], ours["n"]))


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "choices": ["a", "b", "c", "d"]}\n', "expected an object with 'question', 'choices'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0}\n', "'choices' must be a list of 4 strings"),
    ('{"question": "q", "choices": ["a", "b", "c", "d"], "answer": "B"}\n', "'answer' must be an integer"),
    ('not json\n', "not valid JSON"),
    ('\n', "no questions in the file"),
])
def test_malformed_wmdp_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bio.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_tasks([f"wmdp_bio:{path}"])


def test_bad_evaluation_sources_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tasks([f"wmdp_cyber:{tmp_path / 'missing.jsonl'}"])
    with pytest.raises(UserError, match="cais/wmdp is not in the local Hugging Face datasets cache"):
        load_tasks(["wmdp_bio"])
    with pytest.raises(UserError, match="no <subject>_test.csv files"):
        load_tasks([f"mmlu:{tmp_path}"])
    (tmp_path / "anatomy_test.csv").write_text("question,A,B,C,D\n")
    with pytest.raises(UserError, match="expected 6 columns"):
        load_tasks([f"mmlu:{tmp_path}"])
    with pytest.raises(UserError, match="unknown evaluation task"):
        load_tasks(["hellaswagg"])


@pytest.mark.slow
def test_bf16_export_evaluated_in_bf16_on_a_mesh(tmp_path, smollm2_dir):
    """--dtype and --mesh reach the evaluator: a bf16 export scored in bf16 with params sharded over
    data:2,fsdp:4 chooses the answers the float32 model chooses, up to bf16 rounding."""
    import jax.numpy as jnp

    from armu_jax.hf_io import export_hf, load_hf
    from armu_jax.sharding import make_mesh
    bf16 = export_hf(load_hf(smollm2_dir)[1], smollm2_dir, tmp_path / "bf16", dtype="bfloat16")
    task = demo_task("bio").limited(12)
    reference = scorer_for(smollm2_dir, batch_size=8).multiple_choice(load_params(smollm2_dir), task)
    mesh = make_mesh("data:2,fsdp:4")
    scorer = scorer_for(bf16, "bfloat16", batch_size=8, mesh=mesh)
    params = load_params(bf16, "bfloat16", mesh)
    embedding = params["params"]["model"]["embed_tokens"]["embedding"]
    assert embedding.dtype == jnp.bfloat16 and embedding.sharding.spec[0] == "fsdp"
    assert len(embedding.addressable_shards) == 8 and embedding.addressable_shards[0].data.shape[0] == 49152 // 4
    ours = scorer.multiple_choice(params, task)
    lls, ref_lls = (np.array([d["loglikelihoods"] for d in r["docs"]]) for r in (ours, reference))
    rel = np.abs(lls - ref_lls).max() / np.abs(ref_lls).max()
    agree = np.mean([a["pred"] == b["pred"] for a, b in zip(ours["docs"], reference["docs"])])
    print(f"bf16 on data:2,fsdp:4 vs float32: max relative loglikelihood diff {rel:.3f}, answers agree {agree:.2f}")
    assert rel <= 0.05 and agree >= 0.8


@pytest.mark.slow
def test_shared_prefix_scores_as_one_request_per_row(smollm2_dir):
    """The packed, shared-prefix layout (a context once, its continuations behind it, several per row)
    gives the log-likelihoods of one request per row (lm-eval's layout), on questions with long
    contexts and one-letter answers (MMLU), short contexts and multi-token answers (demo) and NLL:
    to 1e-5 of the largest |log-likelihood|, or 10x what weights one float32 ulp apart move the
    packed scores on this CPU if that is more (measured: 4e-7 and 4e-6 of it, drift 1e-6 and 4e-6)."""
    import jax
    import jax.numpy as jnp

    from armu_jax.evaluate import EvalSpec, build_scorer
    packed = scorer_for(smollm2_dir, batch_size=8)
    alone = build_scorer(EvalSpec(str(smollm2_dir), batch_size=8, pack_tokens=0))
    params = load_params(smollm2_dir)
    nudged = jax.tree.map(lambda x: jnp.nextafter(x, jnp.inf), params)
    for task in (demo_task("bio").limited(10), mmlu_task().limited(4)):
        requests = task.requests()
        ours, reference = packed.loglikelihoods(params, requests), alone.loglikelihoods(params, requests)
        tokens_packed, tokens_alone = packed.tokens_run, alone.tokens_run
        drift = np.abs(packed.loglikelihoods(nudged, requests) - ours).max()
        diff, scale = np.abs(ours - reference).max(), np.abs(reference).max()
        print(f"{task.name}: max |loglikelihood diff| {diff:.1e} of {scale:.1f} (one-ulp drift {drift:.1e}), "
              f"tokens run {tokens_packed} packed vs {tokens_alone} one per row")
        assert diff <= max(1e-5 * scale, 10 * drift)
        assert tokens_packed < tokens_alone
        packed.tokens_run = alone.tokens_run = 0
    texts = demo_task("cyber").nll_texts[:12]
    assert packed.nll_per_token(params, texts, 64) == pytest.approx(alone.nll_per_token(params, texts, 64), rel=1e-5)


def test_tasks_know_their_role_and_chance_and_are_limited_in_one_place(tmp_path):
    wmdp = tmp_path / "cyber.jsonl"
    wmdp.write_text("".join(json.dumps({"question": f"q{i}", "choices": list("abcd"), "answer": i % 4}) + "\n"
                            for i in range(5)))
    tasks = load_tasks(["demo", "mmlu", f"wmdp_cyber:{wmdp}"], limit=3)
    assert {t.name: t.role for t in tasks} == {"demo_bio": "forget", "demo_cyber": "forget", "demo_retain": "retain",
                                                "demo_physical": "neighbour", "mmlu": "retain", "wmdp_cyber": "forget"}
    assert all(len(t.docs) == 3 and t.chance == 0.25 for t in tasks)
    assert mean_chance(tasks, "forget") == 0.25 and mean_chance(tasks, "other") is None
    assert len(tasks[0].nll_texts) == 3
    with pytest.raises(UserError, match="--eval_limit=-1: must be >= 0"):
        load_tasks(["demo"], limit=-1)


@pytest.mark.reference
def test_native_answers_equal_lm_eval_on_gemma(tmp_path, gemma3_dir, monkeypatch):
    """Gemma-3-270M: lm-eval encodes every context with the tokenizer's own <bos> (tok_encode without
    add_bos_token); so does the native scorer, and every log-likelihood and pick is lm-eval's. The control:
    the same scorer without the <bos> is far off (Gemma without its first token is another model)."""
    tasks = load_tasks(["demo_bio", "demo_cyber"], {"demo_bio": 6, "demo_cyber": 4}, "test")
    scorer, params = scorer_for(gemma3_dir, batch_size=8), load_params(gemma3_dir)
    native = {t.name: scorer.multiple_choice(params, t) for t in tasks}
    results = run_lm_eval_on(gemma3_dir, tasks, [], tmp_path / "lm_eval", batch_size=8, log_samples=True)
    worst = 0.0
    for task in tasks:
        ours, docs = native[task.name], per_doc_predictions(results, task.name)
        lls_ours = np.array([d["loglikelihoods"] for d in ours["docs"]])
        lls_theirs = np.array([d["loglikelihoods"] for d in docs])
        worst = max(worst, float(np.abs(lls_ours - lls_theirs).max()))
        assert [d["pred"] for d in ours["docs"]] == list(lls_theirs.argmax(1))
    print(f"Gemma: max |loglikelihood diff| against lm-eval {worst:.1e}")
    assert worst <= 2e-3
    monkeypatch.setattr(type(scorer), "_tokens", lambda self, text: self.tokenizer(text, add_special_tokens=False)["input_ids"])
    without = scorer.multiple_choice(params, tasks[0])
    off = np.abs(np.array([d["loglikelihoods"] for d in without["docs"]])
                 - np.array([d["loglikelihoods"] for d in native[tasks[0].name]["docs"]])).max()
    assert off > 100 * 2e-3, off


def test_wmdp_task_groups_and_the_papers_table(tmp_path):
    """wmdp_neighbours: the five MMLU subjects the WMDP paper sets beside WMDP, each its own task, and the rest
    of MMLU as one; wmdp_report:DIR adds WMDP-Bio and WMDP-Cyber from the user's files; a missing file is one
    line; the lm-eval names never shadow lm-eval's own mmlu_* tasks; the table has the paper's columns."""
    from armu_jax.evaluate import wmdp_table
    from armu_jax.tasks import lm_eval_task_name, resolve_tasks
    whole = {t.name: t for t in load_tasks(["mmlu"], 0, "all")}["mmlu"]
    groups = {t.name: t for t in load_tasks(["wmdp_neighbours"], 0, "all")}
    assert list(groups) == ["mmlu_college_biology", "mmlu_high_school_biology", "mmlu_virology",
                            "mmlu_college_computer_science", "mmlu_computer_security", "mmlu_rest"]
    assert sum(len(t.docs) for t in groups.values()) == len(whole.docs)
    assert {d["subject"] for d in groups["mmlu_virology"].docs} == {"virology"}
    assert len(groups["mmlu_college_biology"].docs) == 144 and len(groups["mmlu_computer_security"].docs) == 100
    assert [t.role for t in groups.values()] == ["neighbour"] * 5 + ["retain"]
    assert "college_biology" not in {d["subject"] for d in groups["mmlu_rest"].docs}
    assert {lm_eval_task_name(t) for t in groups.values()} == {f"{n}_local" for n in groups}
    test_split = {t.name: t for t in load_tasks(["wmdp_neighbours"])}  # the project's split applies to each
    assert 0 < len(test_split["mmlu_virology"].docs) < len(groups["mmlu_virology"].docs)

    with pytest.raises(UserError, match=r"wmdp_report:.*: no wmdp_bio.jsonl or wmdp-bio.jsonl or bio.jsonl there"):
        resolve_tasks([f"wmdp_report:{tmp_path}"])
    doc = {"question": "Which?", "choices": ["a", "b", "c", "d"], "answer": 1}
    (tmp_path / "wmdp-bio.jsonl").write_text(json.dumps(doc) + "\n")
    (tmp_path / "cyber.jsonl").write_text((json.dumps(doc) + "\n") * 2)
    report = {t.name: t for t in load_tasks([f"wmdp_report:{tmp_path}"], 0, "all")}
    assert list(report)[:3] == ["wmdp_bio", "wmdp_cyber", "mmlu"] and len(report["wmdp_cyber"].docs) == 2
    assert "cybersecurity" in report["wmdp_cyber"].docs[0]["description"]

    result = lambda acc, n: {"acc": acc, "acc_ci": [acc - 0.1, acc + 0.1], "n": n}
    table = wmdp_table({"original": {"wmdp_bio": result(0.6, 1273), "mmlu": result(0.58, 14042),
                                     "mmlu_virology": result(0.5, 166)},
                        "rmu": {"wmdp_bio": result(0.31, 1273), "mmlu": result(0.57, 14042)}})
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [" model ", " WMDP-Bio ", " MMLU ", " Virology "]
    assert "31.0 [21.0-41.0] (n=1273)" in lines[3] and lines[3].rstrip().endswith("| - |")


@pytest.mark.cli
def test_eval_prints_and_writes_the_wmdp_table(tmp_path, tiny_llama):
    """--mode=eval --eval_tasks=wmdp_report:DIR: the paper's table on stdout and in wmdp_report.md, every
    column's numbers those of eval.json."""
    from helpers import run_cli
    doc = {"question": "Which?", "choices": ["a", "b", "c", "d"], "answer": 1}
    for name in ("bio.jsonl", "cyber.jsonl"):
        (tmp_path / name).write_text((json.dumps(doc) + "\n") * 4)
    out = tmp_path / "eval"
    result = run_cli(f"--model={tiny_llama}", "--mode=eval", f"--eval_tasks=wmdp_report:{tmp_path}", "--eval_limit=4",
                     "--eval_split=all", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "wmdp_report.md").read_text()
    assert "| WMDP-Bio | WMDP-Cyber | MMLU | College Bio. | HS Bio. | Virology | College CS | Computer Sec." in table
    assert "WMDP-Bio" in result.stdout and "Computer Sec." in result.stdout
    results = json.loads((out / "eval.json").read_text())["results"]
    assert f"{100 * results['wmdp_bio']['acc']:.1f} [" in table and results["mmlu_virology"]["n"] == 4
