"""bench/gpu_check.py runs where there is no accelerator (on the CPU, a tiny model of Zephyr's family):
its table has every row, the lean step costs fewer FLOPs than the diagnostic one (the frozen forget
forward it skips), the float32 comparison's drift-derived bound is above zero and a device 1% off fails it, and chips' peaks are found."""
import json
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def gpu_check_device():
    import jax
    return jax.devices("cpu")[0]


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path, capsys):
    config = json.loads((ROOT / "configs/models/zephyr-7b-beta/config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = gpu_check.main(["--model", str(tmp_path), "--max_len", "32", "--steps", "1", "--out", str(tmp_path / "r.json")])
    speed = result["speed"]
    assert 0 < speed["lean"]["flops"] < speed["diagnostic"]["flops"]
    layer = 2 * 4 * 32 * (3 * 64 * 128 + 2 * 64 * 64 + 2 * 64 * 32)  # one layer's forward on a side, roughly
    assert speed["diagnostic"]["flops"] - speed["lean"]["flops"] > 0.5 * 3 * layer  # layers 5..7 of the forget side
    f32 = result["float32"]
    # without an accelerator the device's run is the CPU's own (one program compiled once): nothing to tell apart
    assert f32["loss_rel"] == 0.0 and f32["update_rel"] == 0.0 and f32["passed"]
    assert 0 < f32["update_drift"] < 1e-3 and all(v > 0 for v in f32["losses"])
    # the control: a device whose updates are 1% off (its lr 1% high) fails the bound
    wrong = gpu_check.float32_check(tmp_path, gpu_check_device(), device_lr_scale=1.01)
    assert not wrong["passed"] and wrong["update_rel"] > 10 * wrong["bounds"]["update"], wrong
    table = capsys.readouterr().out
    for row in ("| device | cpu", "| lean step |", "| diagnostic step |", "| peak device memory |", "float32 vs CPU"):
        assert row in table
    assert json.loads((tmp_path / "r.json").read_text())["platform"] == "cpu"
    assert gpu_check.peak_of("NVIDIA H100 80GB HBM3") == 989e12 and gpu_check.peak_of("TPU v5 lite") == 197e12
    assert gpu_check.peak_of("NVIDIA A100-SXM4-40GB") == 312e12 and gpu_check.peak_of("Some new chip") is None
    assert gpu_check.peak_of("NVIDIA H100 PCIe") == 756e12 and gpu_check.peak_of("NVIDIA H100 NVL") == 835e12
    assert gpu_check.peak_of("NVIDIA L40") == 181e12 and gpu_check.peak_of("NVIDIA L4") == 121e12
    assert gpu_check.peak_of("NVIDIA L40S") == 362e12 and gpu_check.peak_of("NVIDIA A40") == 149.7e12
    assert gpu_check.peak_of("Tesla V100-SXM2-16GB") is None  # no bf16 tensor cores: no MFU claimed
