"""--mode=compile: the step that runs, compiled ahead of time for this machine and for a TPU slice."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_hf_model

from armu_jax.compile_report import abstract_step, planned, report
from armu_jax.config import config_with, from_flagfile
from armu_jax.families import read_model_config

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
# Documented (docs/scale.md, "Compile reports"): the Zephyr-7B flagfile cut to layer 0 and 128 tokens,
# compiled for a v5e-8 slice (v5e:2x4) on mesh fsdp:8; the full flagfile rows take minutes each, layers 0..2 take
# 54 s here and give 1.86 GiB, layers 0..1 34 s and 1.18 GiB, layer 0 19 s.
ZEPHYR_V5E_SMALL_GIB = 0.51


def _tiny_config(tmp_path, **overrides):
    model = tiny_hf_model(tmp_path, "llama", 2, layers=4)
    settings = dict(model=str(model), layer_id=3, forget_max_len=[64], retain_max_len=64, pad_multiple=64)
    return config_with(**{**settings, **overrides}), read_model_config(model)


@pytest.mark.slow
def test_flops_count_the_whole_step_over_all_devices(tmp_path):
    """FLOPs double with the batch rows, and the sum over devices of a sharded step is the one-device count."""
    flops = {}
    for mesh, batch in (("data:1", 4), ("data:1", 8), ("data:2,fsdp:4", 8)):
        cfg, model_cfg = _tiny_config(tmp_path, mesh=mesh, batch_size=batch)
        rep = report(cfg, model_cfg)
        assert rep["per_device_bytes"]["total"] > 0 and rep["fits"] is None and rep["seconds_at_peak"] is None
        flops[(mesh, batch)] = rep["flops_per_step"]
    assert flops[("data:1", 8)] / flops[("data:1", 4)] == pytest.approx(2.0, rel=0.1)
    assert flops[("data:2,fsdp:4", 8)] == pytest.approx(flops[("data:1", 8)], rel=0.1)


@pytest.mark.tpu
def test_compile_for_a_tpu_slice_from_config_json_alone(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_WORKER_HOSTNAMES": "localhost"}
    cmd = [sys.executable, "-m", "armu_jax.main", "--flagfile=configs/zephyr7b_wmdp_adaptive.flags",
           "--mode=compile", "--model=configs/models/zephyr-7b-beta", "--topology=v5e:2x4", "--mesh=fsdp:-1",
           "--layer_id=0", "--update_layer_ids=0", "--forget_max_len=128", "--retain_max_len=128",
           f"--output_dir={out}", f"--xla_dump_dir={tmp_path / 'hlo'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rep = json.loads((out / "compile.json").read_text())
    assert rep["topology"] == "v5e:2x4" and rep["mesh"] == {"data": 1, "fsdp": 8} and rep["batch_rows"] == 8
    assert rep["device_memory_bytes"] == 16 * GIB and rep["fits"] is True
    total = rep["per_device_bytes"]["total"] / GIB
    assert abs(total - ZEPHYR_V5E_SMALL_GIB) <= 0.1 * ZEPHYR_V5E_SMALL_GIB, total
    assert rep["seconds_at_peak"] == pytest.approx(rep["flops_per_step"] / 8 / 197e12)
    assert "| v5e:2x4 | data:1,fsdp:8 |" in result.stdout
    assert any(p.suffix == ".txt" for p in (tmp_path / "hlo").iterdir())  # --xla_dump_dir got the HLO
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 2 and "compile.json exists" in again.stderr  # never overwritten


ANY_CHIP_COUNT = """
import json, sys
from armu_jax.compile_report import report
from armu_jax.config import config_with
from armu_jax.model_config import ModelConfig
from armu_jax.families import model_config_of, read_model_config
model_cfg = read_model_config(sys.argv[1])
for topology in sys.argv[2:]:
    cfg = config_with(model=sys.argv[1], layer_id=3, forget_max_len=[64], retain_max_len=64, pad_multiple=64,
                      mesh="fsdp:-1", dtype="bfloat16", topology=topology)
    rep = report(cfg, model_cfg)
    print(json.dumps({"topology": topology, "mesh": rep["mesh"], "rows": rep["batch_rows"],
                      "arguments": rep["per_device_bytes"]["arguments"]}))
"""


@pytest.mark.tpu
def test_fsdp_over_any_chip_count_takes_the_reference_batch(tmp_path):
    """--mesh=fsdp:-1 with batch 4 on 1, 2 (this machine), 16 and 256 chips (TPU slices via libtpu; 8 chips
    is the slice test above): rows padded to the chip count, parameters sharded over all of them."""
    model = tmp_path / "model"  # TPU-tile-sized dimensions; a config alone is enough to compile
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1024,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 128}))
    reports = {}
    for n in (1, 2):
        cfg = config_with(model=str(model), layer_id=3, forget_max_len=[64], retain_max_len=64, pad_multiple=64,
                          mesh=f"fsdp:{n}", dtype="bfloat16")
        rep = report(cfg, read_model_config(model))
        reports[n] = {"mesh": rep["mesh"], "rows": rep["batch_rows"], "arguments": rep["per_device_bytes"]["arguments"]}
    env = {**os.environ, "TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_WORKER_HOSTNAMES": "localhost"}
    result = subprocess.run([sys.executable, "-c", ANY_CHIP_COUNT, str(model), "v5e:4x4", "v5e:16x16"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for line, n in zip(result.stdout.splitlines(), (16, 256)):
        reports[n] = json.loads(line)
    for n, rep in reports.items():
        assert rep["mesh"] == {"data": 1, "fsdp": n} and rep["rows"] == max(4, n), (n, rep)
    # Parameters are split over every chip, so the argument bytes per chip fall with the count (compared
    # within a backend: TPU layouts pad small dimensions to tiles).
    arguments = [reports[n]["arguments"] for n in (1, 2)], [reports[n]["arguments"] for n in (16, 256)]
    assert all(a > b for side in arguments for a, b in zip(side, side[1:])), reports


def test_shipped_model_configs_are_the_published_shapes():
    zephyr = read_model_config(ROOT / "configs" / "models" / "zephyr-7b-beta")
    llama = read_model_config(ROOT / "configs" / "models" / "llama-3-8b")
    assert (zephyr.hidden_size, zephyr.num_hidden_layers, zephyr.num_key_value_heads, zephyr.sliding_window) == \
        (4096, 32, 8, 4096)
    assert (llama.vocab_size, llama.rope_theta, llama.sliding_window) == (128256, 500000.0, None)
    for name in ("zephyr7b_wmdp_adaptive.flags", "llama3_8b_wmdp_adaptive.flags"):
        assert from_flagfile(ROOT / "configs" / name).layer_id == 7


def test_the_report_plans_the_runs_shapes_when_its_corpora_are_here(tmp_path, tiny_llama):
    """With the corpora and the model's tokenizer at hand the report gives the run's step count and its planned
    shapes (within --step_programs); without them it says why and gives the step count the flags allow. (The
    plan of the step built from shapes alone: report() adds it to the compiled programs' figures.)"""
    settings = dict(model=str(tiny_llama), layer_id=3, forget_max_len=[128], retain_max_len=128, pad_multiple=32,
                    max_num_batches=12, step_programs=4)
    model_cfg = read_model_config(tiny_llama)
    step, _ = abstract_step(config_with(**settings), model_cfg)
    plan = planned(config_with(**settings), model_cfg, step)
    assert plan["steps"] == 12 and 2 <= plan["programs"] <= 4 and plan["shapes"]
    assert plan["planned_from"].startswith(f"12 steps, {plan['programs']} programs")
    absent = str(tmp_path / "absent.jsonl")
    plan = planned(config_with(**settings, forget_corpora=[absent, absent]), model_cfg, step)
    assert plan == {"steps": 12, "programs": 4, "shapes": None, "planned_from": plan["planned_from"]}
    assert plan["planned_from"].startswith("not planned:") and "does not exist" in plan["planned_from"]
