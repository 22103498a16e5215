"""A whole run from a cold start, as a user meets it: armu_jax against the PyTorch reference loop, same batches.

Each side is a fresh process timed from its start to its exit (the reference: load both models, run the
steps, save the unlearned model; armu_jax: `python -m armu_jax.main`, from flags to the HF export), with its
peak RSS. armu_jax runs twice on one new XLA compilation cache directory: cold (empty, a first run) and warm
(the same run again). The per-step times are each side's own (armu_jax: metrics.jsonl's seconds, whose
first step includes whatever the run had not compiled ahead of it).
Usage: python bench/first_run.py [--steps 16] [--forget_max_len 512 768] [--retain_max_len 512] [-- FLAGS...]
(FLAGS go to armu_jax only, e.g. --pack_tokens=false or --step_programs=4).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds from start to exit, peak RSS MB, stdout) of a child process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


def reference_child(steps: int, forget_max_len: list[int], retain_max_len: int) -> None:
    """The reference loop in this process (started by main): per-step seconds, then the save."""
    from step_time import make_torch_side
    if retain_max_len != forget_max_len[0]:
        raise SystemExit("the reference bench side reads retain texts at the first topic's length")
    step = make_torch_side(retain_max_len, tuple(forget_max_len))()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as out:
        step.save(out)
    print(json.dumps({"steps": times}))


def jax_run(steps: int, forget_max_len: list[int], retain_max_len: int, xla_cache: str, out: str,
            extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "armu_jax.main", "--max_num_batches", str(steps),
           f"--forget_max_len={','.join(map(str, forget_max_len))}", f"--retain_max_len={retain_max_len}",
           "--dtype=float32", f"--output_dir={out}", *extra]
    wall, peak, text = timed(cmd, {**os.environ, "ARMU_XLA_CACHE": xla_cache})
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in records]
    per_step = [seconds[0]] + [b - a for a, b in zip(seconds, seconds[1:])]
    summary = [line for line in text.splitlines() if "steps in" in line or "planned" in line]
    return {"wall": wall, "peak": peak, "steps": per_step, "programs": records[-1]["programs"],
            "compile_seconds": records[-1]["compile_seconds"], "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--forget_max_len", type=int, nargs=2, default=[512, 768])
    parser.add_argument("--retain_max_len", type=int, default=512)
    parser.add_argument("--no_reference", action="store_true", help="armu_jax's cold and warm runs only")
    parser.add_argument("--reference_child", action="store_true")
    parser.add_argument("flags", nargs="*", help="after --: flags for armu_jax")
    args = parser.parse_args()
    if args.reference_child:
        return reference_child(args.steps, args.forget_max_len, args.retain_max_len)
    lengths = ["--forget_max_len", *map(str, args.forget_max_len), "--retain_max_len", str(args.retain_max_len)]
    rows = {}
    if not args.no_reference:
        wall, peak, text = timed([sys.executable, str(Path(__file__).resolve()), "--reference_child", "--steps",
                                  str(args.steps), *lengths])
        steps = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])["steps"]
        rows["reference"] = {"wall": wall, "peak": peak, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("cold", "warm"):
            rows[f"armu_jax {name}"] = jax_run(args.steps, args.forget_max_len, args.retain_max_len,
                                               f"{tmp}/xla", f"{tmp}/run_{name}", args.flags)
    print(f"SmolLM2-135M, Adaptive RMU, layer 7, batch 4, {args.steps} steps, forget {args.forget_max_len} / retain "
          f"{args.retain_max_len} tokens, float32, CPU; each side a fresh process, timed from its start to its "
          f"exit (armu_jax flags: {' '.join(args.flags) or 'defaults'})")
    ref = rows.get("reference")
    print("| run | wall s | x reference | median step s | x reference | programs | compile s | peak RSS MB | x reference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        med = statistics.median(row["steps"])
        ratio = lambda a, b: f"{a / b:.2f}" if ref else "-"
        print(f"| {name} | {row['wall']:.1f} | {ratio(ref['wall'], row['wall']) if ref else '-'} | {med:.3f} | "
              f"{ratio(statistics.median(ref['steps']), med) if ref else '-'} | {row.get('programs', '-')} | "
              f"{row.get('compile_seconds', '-')} | {row['peak']:.0f} | {ratio(row['peak'], ref['peak']) if ref else '-'} |")
    for name, row in rows.items():
        for line in row.get("summary", []):
            print(f"{name}: {line}")


if __name__ == "__main__":
    main()
