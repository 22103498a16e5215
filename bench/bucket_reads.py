"""What a run reads of a checkpoint in a bucket: bytes and requests per process, 1 and 2 processes.

The embedded SmolLM2-135M (float32, 538 MB, one safetensors file) is put in a local GCS emulator
(tests/gcs.py: gcp-storage-emulator, nothing leaves the machine), then the same short run
(--layer_id=7, 2 steps, no export, --mesh=fsdp:4) is started with --model and --output_dir in the
bucket, as 1 process of 4 devices and as 2 processes of 2 devices (jax.distributed over gloo). Each
process prints what it read (hf_io.report_reads); this table collects those lines with each run's
wall time.

Usage: python bench/bucket_reads.py [--layer_id=7]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

LINE = re.compile(r"process (\d) read ([\d.]+) MB of the checkpoint's ([\d.]+) MB from \S+ in (\d+) requests")


def start(args: list[str], processes: int) -> list[tuple[int, str, float]]:
    import gcs
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // processes}",
           "JAX_PLATFORMS": "cpu"}
    port = gcs.free_port()
    extra = (lambda i: [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                        f"--process_id={i}"]) if processes > 1 else (lambda i: [])
    began = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "armu_jax.main", *args, *extra(i)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(processes)]
    done = [(p.wait(), p.communicate()[1]) for p in procs]
    wall = time.time() - began
    for code, stderr in done:
        if code:
            raise SystemExit(f"the run failed:\n{stderr[-3000:]}")
    return [(code, stderr, wall) for code, stderr in done]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer_id", type=int, default=7)
    args = parser.parse_args()
    import gcs

    from armu_jax.shipped import smollm2_dir
    with gcs.emulator(buckets=("bench",)):
        began = time.time()
        model = gcs.upload(smollm2_dir(), "gs://bench/smollm2-135m")
        print(f"uploaded the model to the emulator in {time.time() - began:.1f} s")
        rows = []
        for processes in (1, 2):
            run = [f"--model={model}", f"--layer_id={args.layer_id}", "--max_num_batches=2", "--export=false",
                   "--checkpoint_every=0", "--mesh=fsdp:4", f"--output_dir=gs://bench/runs/p{processes}"]
            for _, stderr, wall in start(run, processes):
                for m in LINE.finditer(stderr):
                    rows.append((processes, int(m[1]), float(m[2]), float(m[3]), int(m[4]), wall))
    print(f"\nSmolLM2-135M float32, --layer_id={args.layer_id}, --mesh=fsdp:4, model and run directory in the bucket\n")
    print("| processes | process | MB read | of the checkpoint's MB | share | requests | run wall s |")
    print("|---|---|---|---|---|---|---|")
    for processes, process, mb, total, requests, wall in rows:
        print(f"| {processes} | {process} | {mb:.1f} | {total:.1f} | {mb / total:.1%} | {requests} | {wall:.0f} |")


if __name__ == "__main__":
    main()
