"""The README's compile table: the Zephyr-7B and Llama-3-8B flagfiles compiled for TPU slices.

Each row is --mode=compile's report (armu_jax.compile_report) for one flagfile on one topology,
mesh fsdp over all chips. Takes minutes per row on a CPU (XLA's TPU compiler at 7B shapes).
Usage: python bench/compile_table.py [--out compile_table.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

ROWS = [("zephyr7b_wmdp_adaptive.flags", "zephyr-7b-beta"), ("llama3_8b_wmdp_adaptive.flags", "llama-3-8b")]
TOPOLOGIES = [("v5e:2x4", "fsdp:-1"), ("v5e:4x4", "fsdp:-1"), ("v4:2x2x1", "fsdp:-1")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="compile_table.json")
    args = parser.parse_args()
    from armu_jax.compile_report import GIB, report
    from armu_jax.config import from_flagfile
    from armu_jax.model_config import ModelConfig
    rows = []
    print("| flagfile | topology | mesh | GiB/device (args + temps) | fits | TFLOP/step | ms at peak | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for flagfile, model in ROWS:
        model_dir = ROOT / "configs" / "models" / model
        for topology, mesh in TOPOLOGIES:
            cfg = from_flagfile(ROOT / "configs" / flagfile, model=str(model_dir), topology=topology, mesh=mesh)
            rep = report(cfg, ModelConfig.from_dir(model_dir))
            rows.append({"flagfile": flagfile, **rep})
            per = rep["per_device_bytes"]
            print(f"| {flagfile} | {topology} | {','.join(f'{k}:{v}' for k, v in rep['mesh'].items())} | "
                  f"{per['total'] / GIB:.2f} ({per['arguments'] / GIB:.2f} + {per['temporaries'] / GIB:.2f}) | "
                  f"{'yes' if rep['fits'] else 'NO'} | {rep['flops_per_step'] / 1e12:.1f} | "
                  f"{1e3 * rep['seconds_at_peak']:.1f} | {rep['compile_seconds']:.0f} |", flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
