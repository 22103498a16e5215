"""The command line: every shipped flagfile parses; bad input gets one line, exit 2, nothing written."""
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, run_cli

from armu_jax.config import from_flagfile


@pytest.mark.parametrize("flagfile", sorted((ROOT / "configs").glob("*.flags")), ids=lambda p: p.name)
def test_shipped_flagfiles_parse(flagfile):
    cfg = from_flagfile(flagfile)
    # the demo's layers were searched by --mode=tune (docs/experiments.md): SmolLM2's by hand and by the tool, Gemma's
    layer = {"demo.flags": 5, "demo_tuned.flags": 9, "demo_gemma3-270m.flags": 7}.get(flagfile.name, 7)
    assert cfg.n_topics == 2 and len(cfg.alpha) == 2 and cfg.update_layer_ids == (layer - 2, layer - 1, layer)
    assert cfg.layer_id == layer and cfg.batch_size == 4
    assert from_flagfile(flagfile, layer_id=9).layer_id == 9  # overrides win over the file


def _main(tmp: Path, *args):
    return run_cli(*args, env={"HF_HOME": str(tmp / "empty-hf-home")})  # no cached lm-eval datasets


def _bad_cases(tmp: Path) -> dict:
    """Each case's flags and the message its error line has; the files they name in tmp are written by
    _write_bad_inputs (not here: the case names are read at collection time)."""
    empty, wrong = tmp / "empty.txt", tmp / "wrong.npy"
    return {
        "missing corpus": (["--forget_corpora=nope.jsonl,demo:cyber"], "corpus file nope.jsonl does not exist"),
        "empty after min_len": ([f"--forget_corpora={empty},demo:cyber", "--min_len=10"],
                                "no text longer than min_len=10"),
        "layer outside model": (["--layer_id=30", "--update_layer_ids=28"], "outside the model's 30 layers"),
        "update above layer": (["--update_layer_ids=6,8"], "include layers above --layer_id=7"),
        "alpha count": (["--alpha=1,2,3"], "--alpha has 3 values but there are 2 forget topics"),
        "coefficient count": (["--method=rmu", "--steering_coeffs=1,2,3"], "--steering_coeffs has 3 values"),
        "beta": (["--beta=0"], "--beta=0.0: must be > 0"),
        "batch size": (["--batch_size=0"], "--batch_size=0: must be at least 1"),
        "control vectors shape": ([f"--control_vectors={wrong}"], "has shape (3, 576), expected (2, 576)"),
        "bad mesh": (["--mesh=data:16"], "needs 16 devices, this run has 8"),
        "missing eval file": (["--eval_every=5", f"--eval_tasks=wmdp_bio:{tmp / 'nope.jsonl'}"], "does not exist"),
        "native eval of a bad file": (["--mode=eval", f"--eval_tasks={empty}.jsonl"], "does not exist"),
        "lm-eval without a cached dataset": (["--mode=lm_eval", "--eval_tasks=wmdp_bio"],
                                             "not in the local HF cache"),
        "lm-eval on a mesh": (["--mode=lm_eval", "--mesh=fsdp:2"], "applies to the JAX evaluator"),
        "missing flagfile": ([f"--flagfile={tmp / 'nope.flags'}"], "nope.flags"),
    }


def _write_bad_inputs(tmp: Path) -> None:
    (tmp / "empty.txt").write_text("short\nx\n")
    np.save(tmp / "wrong.npy", np.ones((3, 576), np.float32) / 24.0)


@pytest.mark.cli
@pytest.mark.parametrize("case", list(_bad_cases(Path("unused"))))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    _write_bad_inputs(tmp_path)
    args, message = _bad_cases(tmp_path)[case]
    out = tmp_path / "run"
    result = _main(tmp_path, f"--output_dir={out}", *args)
    assert result.returncode == 2  # usage errors exit 2; failures during a run exit 1 (test_failures)
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr[-2000:]
    assert not out.exists()


@pytest.mark.cli
def test_existing_output_dir_is_refused_and_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = _main(tmp_path, f"--output_dir={out}", "--max_num_batches=1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --output_dir")
    assert "exists and is not empty" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
