"""Peak host memory of --mode=attack against the training run it attacks (at most 2x is the aim).

A short run of the flagfile's settings (--steps steps, its export) is started as a child process, then
--mode=attack on that run as another; each child's peak RSS is read from wait4. Attack settings default to
a small evaluation (--eval_limit=8, 16 NLL tokens) and 2 relearning steps: the peak does not depend on how
many questions or steps there are, only on what is resident at once.

Usage: python bench/attack_memory.py [--flagfile configs/demo.flags] [--steps 20] [--out DIR]
       [-- extra attack flags, e.g. --relearn_params=all]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTACK_FLAGS = ["--eval_limit=8", "--eval_nll_tokens=16", "--relearn_steps=2"]


def _child(args: list[str], log: Path) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of `python -m armu_jax.main args`."""
    began = time.time()
    with log.open("w") as stderr:  # a file, not a pipe: nobody reads a pipe while wait4 waits
        child = subprocess.Popen([sys.executable, "-m", "armu_jax.main", *args], cwd=ROOT, stdout=stderr,
                                 stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"armu_jax {' '.join(args)} failed: {log.read_text()[-2000:]}")
    return usage.ru_maxrss * 1024 / 1e9, time.time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flagfile", default="configs/demo.flags")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="where the run and the attack go (default: a temporary dir)")
    parser.add_argument("extra", nargs="*", help="more --mode=attack flags (after --)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="attack-memory-"))
    out.mkdir(parents=True, exist_ok=True)
    run = out / "run"
    train_gb, train_s = _child([f"--flagfile={args.flagfile}", f"--max_num_batches={args.steps}", "--checkpoint_every=0",
                                f"--output_dir={run}"], out / "train.log")
    attack = ["--mode=attack", f"--run_dir={run}", f"--output_dir={out / 'attack'}",
              *ATTACK_FLAGS, *args.extra]
    attack_gb, attack_s = _child(attack, out / "attack.log")
    print(f"| {args.flagfile} | peak RSS (GB) | seconds |\n|---|---|---|")
    print(f"| training, {args.steps} steps and the export | {train_gb:.2f} | {train_s:.0f} |")
    print(f"| --mode=attack {' '.join(ATTACK_FLAGS + args.extra)} | {attack_gb:.2f} | {attack_s:.0f} |")
    print(f"attack / training: {attack_gb / train_gb:.2f}x (logs in {out})")


if __name__ == "__main__":
    main()
