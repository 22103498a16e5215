"""The settings: groups, bounds, the generated reference and --help."""
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from armu_jax.config import GROUPS, SETTINGS, RunConfig, config_with, differences, flags_reference, from_flagfile
from armu_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_docs_flags_md_is_generated_from_the_settings():
    """docs/flags.md is what `python -m armu_jax.config` prints: regenerate it when a setting changes."""
    assert (ROOT / "docs" / "flags.md").read_text() == flags_reference(), \
        "docs/flags.md is stale; run: python -m armu_jax.config > docs/flags.md"
    for name, meta in SETTINGS.items():
        assert f"`--{name}`" in flags_reference() and meta["group"] in GROUPS


def test_help_lists_the_tools_settings_by_group():
    result = subprocess.run([sys.executable, "-m", "armu_jax.main", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    headers = [l.split(":")[0] for l in lines if l and not l.startswith(" ") and l.split(":")[0] in GROUPS]
    assert headers == list(GROUPS)
    listed = [l.split()[0][2:] for l in lines if l.startswith("  --")]
    assert sorted(listed) == sorted(SETTINGS)
    # in its group's section, in declaration order
    sections = {g: [] for g in GROUPS}
    current = None
    for line in lines:
        if line and not line.startswith(" ") and line.split(":")[0] in GROUPS:
            current = line.split(":")[0]
        elif line.startswith("  --"):
            sections[current].append(line.split()[0][2:])
    assert sections == {g: [n for n, m in SETTINGS.items() if m["group"] == g] for g in GROUPS}
    assert "pdb" not in result.stdout and "verbosity" not in result.stdout  # absl's own: --helpfull


def test_resume_compares_the_training_group_only(tmp_path):
    base = config_with(output_dir=str(tmp_path / "a"))
    for name, meta in SETTINGS.items():
        field = next(f for f in dataclasses.fields(RunConfig) if f.name == name)
        if meta["kind"] in ("int", "float") and getattr(base, name) is not None:
            changed = dataclasses.replace(base, **{field.name: getattr(base, name) + 1})
        elif meta["kind"] == "bool":
            changed = dataclasses.replace(base, **{name: not getattr(base, name)})
        elif meta["kind"] == "str":
            changed = dataclasses.replace(base, **{name: "other"})
        else:
            continue
        assert bool(differences(base, changed)) == (meta["group"] == "training"), name


def _below(bound: str, kind: str):
    limit = float(bound.lstrip(">="))
    strict = not bound.startswith(">=")
    if kind in ("int", "ints", "topic_ints"):
        return int(limit) if strict else int(limit) - 1
    return limit if strict else limit - 0.5


BOUNDED = [(n, m) for n, m in SETTINGS.items() if m["bound"]]


@pytest.mark.parametrize("name,meta", BOUNDED, ids=[n for n, _ in BOUNDED])
def test_every_bounded_setting_refuses_a_value_past_its_bound(name, meta):
    """One line naming the setting and its bound, for every numeric setting (lists: any one value)."""
    bad = _below(meta["bound"], meta["kind"])
    value = [str(bad)] if meta["kind"] in ("ints", "floats", "topic_floats", "topic_ints") else bad
    extra = {"update_layer_ids": [bad], "layer_id": 7} if name == "update_layer_ids" else {}
    if name == "process_id":
        extra = {"num_processes": 2, "coordinator_address": "localhost:1"}
    with pytest.raises(UserError, match=rf"--{name}=") as err:
        config_with(**{name: value, **extra})
    assert "must be" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", [n for n, m in SETTINGS.items() if m["kind"] in ("float", "floats", "topic_floats")])
def test_float_settings_refuse_nan_and_infinity(name):
    meta = SETTINGS[name]
    for value in ("nan", "inf"):
        with pytest.raises(UserError, match="must be a finite number|must be"):
            config_with(**{name: [value] if meta["kind"] != "float" else float(value)})


def test_bounds_hold_for_the_defaults_and_shipped_flagfiles():
    config_with()
    for flagfile in (ROOT / "configs").glob("*.flags"):
        from_flagfile(flagfile)
    assert all(math.isfinite(v) for v in (config_with().lr, config_with().beta))


def test_a_sequence_length_of_0_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "armu_jax.main", "--forget_max_len=0",
                             f"--output_dir={out}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert result.returncode == 2 and lines == ["error: --forget_max_len=0: must be at least 1"], result.stderr
    assert not out.exists()


def test_mode_settings_have_their_own_names():
    """--mode=norms and --mode=attack no longer borrow --eval_batch_size and --seed."""
    assert SETTINGS["norms_batch_size"]["group"] == "norms" and SETTINGS["attack_seed"]["group"] == "attack"
    assert "seed" not in SETTINGS["relearn_texts"]["help"].replace("attack_seed", "")
