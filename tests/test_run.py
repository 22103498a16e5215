"""Whole runs: a multi-device mesh matches one device; SIGKILL + --resume is bit-identical."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import ROOT, cli_args, cli_command, logged, read_metrics, run_cli, run_settings
from safetensors.numpy import load_file

from armu_jax.config import config_with
from armu_jax.train import run


@pytest.mark.slow
def test_mesh_runs_match_one_device(tmp_path, tiny_llama):
    model_dir = tiny_llama
    results = {}
    for mesh in ("data:1", "fsdp:8", "data:2,fsdp:4"):  # batch 4: padded to 8 rows on the 8-device meshes
        out = tmp_path / mesh.replace(":", "").replace(",", "_")
        run(config_with(**run_settings(model_dir, mesh=mesh, batch_size=4, max_num_batches=6, output_dir=str(out))))
        results[mesh] = (read_metrics(out), load_file(out / "hf" / "model.safetensors"))
    ref_metrics, ref_weights = results["data:1"]
    for mesh in ("fsdp:8", "data:2,fsdp:4"):
        metrics, weights = results[mesh]
        for a, b in zip(metrics, ref_metrics):
            for key in logged(a, b, ("loss", "forget_loss", "retain_loss", "coeff", "forget_cosine")):
                assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]) + 1e-7, (mesh, a["step"], key)
        for key in ref_weights:
            scale = np.abs(ref_weights[key]).max()
            assert np.abs(weights[key] - ref_weights[key]).max() <= 1e-5 * scale, (mesh, key)


@pytest.mark.cli
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_llama):
    model_dir = tiny_llama
    settings = run_settings(model_dir, max_num_batches=10, checkpoint_every=2)
    straight = tmp_path / "straight"
    run(config_with(**settings, output_dir=str(straight)))

    killed = tmp_path / "killed"
    args = [*cli_args(settings), f"--output_dir={killed}"]
    proc = subprocess.Popen(cli_command(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "4").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "4").is_dir() and not (killed / "hf").exists()
    before = (killed / "metrics.jsonl").read_text().splitlines()[:4]  # steps 0..3, as the killed process wrote them

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(straight / "hf" / "model.safetensors"), load_file(killed / "hf" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in read_metrics(killed)]
    assert steps == list(range(10))
    # a resume, not a restart: the rows before the checkpoint are the killed process's own, byte for byte
    # (a run restarted from step 0 writes the same numbers with other wall-clock seconds)
    assert len(before) == 4 and (killed / "metrics.jsonl").read_text().splitlines()[:4] == before
    assert any(json.loads(line)["seconds"] != m["seconds"] for line, m in zip(before, read_metrics(straight)))
    assert [m["loss"] for m in read_metrics(killed)] == [m["loss"] for m in read_metrics(straight)]


@pytest.mark.slow
def test_eval_every_logs_the_native_scores(tmp_path, tiny_llama):
    """--eval_every: scores in metrics.jsonl at steps 3 and 6, the last equal to --mode=eval of the export."""
    from armu_jax.evaluate import evaluate_tasks, load_params, scorer_for
    from armu_jax.tasks import load_tasks
    model_dir = tiny_llama
    out = tmp_path / "run"
    run(config_with(**run_settings(model_dir, max_num_batches=6, eval_every=3, eval_tasks=["demo_bio"],
                                eval_limit=8, output_dir=str(out))))
    rows = [m for m in read_metrics(out) if "eval/demo_bio/acc" in m]
    assert [m["step"] for m in rows] == [2, 5]
    final = evaluate_tasks(scorer_for(out / "hf"), load_params(out / "hf"), load_tasks(["demo_bio"], 8))["demo_bio"]
    assert rows[-1]["eval/demo_bio/acc"] == final["acc"] and rows[-1]["eval/demo_bio/acc_norm"] == final["acc_norm"]
    assert abs(rows[-1]["eval/demo_bio/nll"] - final["nll"]) <= 1e-5 * final["nll"]
    assert rows[0]["eval/demo_bio/nll"] != rows[-1]["eval/demo_bio/nll"]  # the weights moved in between


@pytest.mark.slow
def test_seeds_change_the_control_vectors_and_nothing_else(tmp_path, tiny_llama):
    """--seeds=2: two runs side by side (seed_42/, seed_43/) whose flags differ only in --seed and whose
    control vectors differ; the batches are the same (the frozen model's norms on them, every step), and
    the same seed alone gives the same run."""
    from armu_jax.train import train_cli
    out = tmp_path / "runs"
    train_cli(config_with(**run_settings(tiny_llama, max_num_batches=3, seeds=2, export=False, output_dir=str(out))))
    a, b = out / "seed_42", out / "seed_43"
    flags = [set((d / "flags.txt").read_text().splitlines()) for d in (a, b)]
    differ = {line.split("=")[0] for line in flags[0] ^ flags[1]}
    assert differ == {"--seed", "--output_dir"}, differ
    ua, ub = np.load(a / "control_vectors.npy"), np.load(b / "control_vectors.npy")
    assert ua.shape == ub.shape and not np.allclose(ua, ub)
    ma, mb = read_metrics(a), read_metrics(b)
    for key in ("forget_norm_frozen", "retain_norm_frozen"):  # the same texts in the same order (logged steps 0, 2)
        assert [m[key] for m in ma if key in m] == pytest.approx([m[key] for m in mb if key in m], rel=1e-6)
        assert [m["step"] for m in ma if key in m] == [m["step"] for m in mb if key in m] == [0, 2]
    assert ma[0]["forget_loss"] != mb[0]["forget_loss"]  # a different target c*u
    alone = tmp_path / "alone"
    run(config_with(**run_settings(tiny_llama, max_num_batches=3, seed=43, export=False, output_dir=str(alone))))
    assert np.array_equal(np.load(alone / "control_vectors.npy"), ub)
    assert [m["loss"] for m in read_metrics(alone)] == pytest.approx([m["loss"] for m in mb], rel=1e-6)


def test_seeds_is_refused_where_it_would_be_ignored():
    from armu_jax.errors import UserError
    for mode in ("eval", "attack", "lm_eval", "norms"):
        with pytest.raises(UserError, match=f"--seeds=3 applies to --mode=train, sweep and tune only .--mode={mode}"):
            config_with(mode=mode, seeds=3)
    assert config_with(mode="sweep", seeds=3, output_dir="runs/x").seeds == 3
    assert config_with(mode="tune", seeds=3, tune_space="beta:1:2", output_dir="runs/x").seeds == 3


def test_the_host_prepares_the_next_batch_before_reading_a_step_and_stops_at_a_bad_one(tmp_path, tiny_llama, monkeypatch):
    """The loop reads step n's metrics only after step n+1's batch is built and dispatched (the host's work
    overlaps the device's); a non-finite step still stops the run naming that step, with metrics.jsonl
    holding only the steps before it and no checkpoint past it."""
    import jax

    from armu_jax import data, train
    from armu_jax.errors import RunFailure
    events = []
    batch, device_get = data.UnlearningData.batch, jax.device_get
    monkeypatch.setattr(data.UnlearningData, "batch", lambda self, step, shape=None: (  # the loop's: at a planned shape
        shape is not None and events.append(("batch", step))) or batch(self, step, shape))

    def read(tree):
        out = device_get(tree)
        if isinstance(out, dict) and "loss" in out:
            events.append(("read", len([e for e in events if e[0] == "read"])))
        return out
    monkeypatch.setattr(train.jax, "device_get", read)
    out = tmp_path / "run"
    run(config_with(**run_settings(tiny_llama, max_num_batches=5, checkpoint_every=0, export=False, output_dir=str(out))))
    assert events == [("batch", 0), ("batch", 1), ("read", 0), ("batch", 2), ("read", 1), ("batch", 3), ("read", 2),
                      ("batch", 4), ("read", 3), ("read", 4)]
    assert [m["step"] for m in read_metrics(out)] == list(range(5))
    seconds = [m["seconds"] for m in read_metrics(out)]
    assert seconds == sorted(seconds)
    bad = tmp_path / "bad"  # lr 1e30: a step goes non-finite with no checkpoint to cover for the deferred read
    with pytest.raises(RunFailure, match=r"^step (\d+): .* not finite.*no checkpoint had been written yet") as err:
        run(config_with(**run_settings(tiny_llama, max_num_batches=8, checkpoint_every=0, lr=1e30, export=False,
                                       output_dir=str(bad))))
    step = int(str(err.value).split("step ")[1].split(":")[0])
    assert [m["step"] for m in read_metrics(bad)] == list(range(step))
    assert not list((bad / "checkpoints").glob("[0-9]*"))


@pytest.mark.slow
def test_frozen_side_metrics_on_log_steps_only_and_the_run_unchanged(tmp_path, tiny_llama, method="adaptive_rmu"):
    """--log_every=3: the cosines and norms on steps 0, 3, 6 and the last only (the lean step between skips
    the frozen forget forward), everything else every step and the same as a run logging all of them
    (--log_every=1), within the float32 drift of another fusion, as are the trained weights."""
    from armu_jax.step import DIAGNOSTICS
    runs = {}
    for every in (1, 3):
        out = tmp_path / f"every{every}"
        run(config_with(**run_settings(tiny_llama, method=method, max_num_batches=8, log_every=every,
                                       output_dir=str(out))))
        runs[every] = (read_metrics(out), load_file(out / "hf" / "model.safetensors"))
    (full, w_full), (lean, w_lean) = runs[1], runs[3]
    assert [m["step"] for m in lean] == list(range(8))
    assert [m["step"] for m in lean if "forget_cosine" in m] == [0, 3, 6, 7]
    for a, b in zip(lean, full):
        assert set(DIAGNOSTICS) <= b.keys() and (set(DIAGNOSTICS) <= a.keys()) == (a["step"] in (0, 3, 6, 7))
        for key in [k for k in a if k not in ("seconds", "step", "topic", "programs", "compile_seconds")]:
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]) + 1e-7, (a["step"], key, a[key], b[key])
    for key in w_full:
        assert np.abs(w_lean[key] - w_full[key]).max() <= 1e-5 * np.abs(w_full[key]).max(), key


@pytest.mark.slow
def test_the_paired_topics_share_one_retain_forward(tmp_path, tiny_llama, monkeypatch):
    """With one retain corpus for both topics (the reference's wikitext twice) the second topic's step
    takes the first one's frozen retain activations (steps 1, 3, 5, a diagnostic step included: the last)
    instead of computing them again; the run is the one that computes them every step, to float32 noise."""
    from armu_jax import step as step_module
    from armu_jax import train
    reused = []
    run_step = step_module.CompiledStep.run
    monkeypatch.setattr(step_module.CompiledStep, "run", lambda self, state, frozen, topic, f, r, shape=None,
                        carry=None, diagnostics=True: (reused.append(carry is not None),
                                                       run_step(self, state, frozen, topic, f, r, shape, carry,
                                                                diagnostics))[1])
    settings = run_settings(tiny_llama, max_num_batches=6, retain_corpora=["demo:retain", "demo:retain"],
                            forget_corpora=["demo:bio", "demo:cyber"], alpha=[50, 50], forget_max_len=[32, 32])
    run(config_with(**settings, output_dir=str(tmp_path / "shared")))
    assert reused == [False, True, False, True, False, True]
    monkeypatch.setattr(train, "same_side", lambda a, b: False)
    reused.clear()
    run(config_with(**settings, output_dir=str(tmp_path / "twice")))
    assert reused == [False] * 6
    for a, b in zip(read_metrics(tmp_path / "shared"), read_metrics(tmp_path / "twice")):
        for key in logged(a, b, ("loss", "forget_loss", "retain_loss", "coeff", "grad_norm", "retain_cosine")):
            assert abs(a[key] - b[key]) <= 1e-6 * abs(b[key]) + 1e-9, (a["step"], key, a[key], b[key])
    shared, twice = (load_file(tmp_path / d / "hf" / "model.safetensors") for d in ("shared", "twice"))
    for key in shared:
        assert np.abs(shared[key] - twice[key]).max() <= 1e-6 * np.abs(twice[key]).max(), key
