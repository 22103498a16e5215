"""The compile table of docs/scale.md and docs/families.md: the 7-9B flagfiles compiled for TPU slices, and today's families.

Each row is --mode=compile's report (armu_jax.compile_report) for one flagfile on one topology,
mesh fsdp over all chips. Takes minutes per row on a CPU (XLA's TPU compiler at 7B shapes).
`--families` gives the rows of configs/models' other families at the paper's settings (the Llama-3-8B
flagfile: bf16, layer 7, batch 4, 768/512 tokens, the family's default updated parameters) on v5e-8
and on one device of this machine's CPU backend (`cpu:1`, the estimate for one GPU: no deviceless GPU
compile exists in this jax without a CUDA plugin).
Usage: python bench/compile_table.py [--families] [--topologies v5e:2x4,cpu:1] [--out compile_table.json]
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
FAMILY_ROWS = [("llama3_8b_wmdp_adaptive.flags", m) for m in
               ("qwen2.5-7b", "qwen3-8b", "gemma-2-9b", "gemma-2-2b", "phi-3.5-mini", "llama-3.1-8b")]
FAMILY_TOPOLOGIES = [("v5e:2x4", "fsdp:-1"), ("cpu:1", "data:1")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="compile_table.json")
    parser.add_argument("--families", action="store_true", help="the other families' rows")
    parser.add_argument("--topologies", default=None, help="comma-separated subset, e.g. v5e:2x4,cpu:1")
    parser.add_argument("--models", default=None, help="comma-separated subset of the rows' models")
    args = parser.parse_args()
    rows_wanted, topologies = (FAMILY_ROWS, FAMILY_TOPOLOGIES) if args.families else (ROWS, TOPOLOGIES)
    if args.models:
        rows_wanted = [r for r in rows_wanted if r[1] in args.models.split(",")]
    if args.topologies:
        topologies = [t for t in topologies if t[0] in args.topologies.split(",")]
    from armu_jax.compile_report import GIB, report
    from armu_jax.config import from_flagfile
    from armu_jax.families import read_model_config
    rows = []
    print("| model | topology | mesh | GiB/device (args + temps) | fits | TFLOP/step | ms at peak | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for flagfile, model in rows_wanted:
        model_dir = ROOT / "configs" / "models" / model
        for topology, mesh in topologies:
            extra = {"update_params": ["default"]} if args.families else {}
            cfg = from_flagfile(ROOT / "configs" / flagfile, model=str(model_dir), mesh=mesh, **extra,
                                topology=None if topology.startswith("cpu") else topology)
            rep = report(cfg, read_model_config(model_dir))
            rows.append({"flagfile": flagfile, "model": model, **rep})
            Path(args.out).write_text(json.dumps(rows, indent=2))
            per = rep["per_device_bytes"]
            peak = "-" if rep["seconds_at_peak"] is None else f"{1e3 * rep['seconds_at_peak']:.1f}"
            fits = {True: "yes", False: "NO", None: "-"}[rep["fits"]]
            print(f"| {model} | {topology} | {','.join(f'{k}:{v}' for k, v in rep['mesh'].items())} | "
                  f"{per['total'] / GIB:.2f} ({per['arguments'] / GIB:.2f} + {per['temporaries'] / GIB:.2f}) | "
                  f"{fits} | {rep['flops_per_step'] / 1e12:.1f} | {peak} | {rep['compile_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
