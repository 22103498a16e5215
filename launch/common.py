"""What the launchers share: the command every process runs, and dry-run printing."""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from armu_jax import storage
from armu_jax.errors import UserError


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--flagfile", required=True, help="the run's flagfile, e.g. configs/zephyr7b_wmdp_adaptive.flags")
    parser.add_argument("--dry_run", action="store_true", help="print what would run, run nothing")
    parser.add_argument("--output_dir", default=None,
                        help="the run directory, passed on as it is: a gs://bucket/path URL (every worker writes there) "
                             "or a filesystem every process mounts")
    parser.add_argument("--model", default=None,
                        help="the model, passed on as it is: a gs://bucket/path URL (each worker reads its shards) "
                             "or a directory every process sees")
    parser.add_argument("flags", nargs="*", help="more armu_jax flags after --, e.g. -- --layer_id=9")
    return parser


def run_command(flagfile: str, flags: list[str], multihost: bool, python: str = "python3", output_dir: str | None = None,
                model: str | None = None) -> list[str]:
    """The armu_jax command each process runs (--multihost: jax.distributed finds its peers);
    --output_dir and --model URLs go in unchanged (a URL without a bucket is refused here)."""
    bad = [f for f in flags if not f.startswith("--")]
    if bad:
        raise UserError(f"extra arguments must be armu_jax flags (--name=value), got {' '.join(bad)}")
    places = []
    for flag, value in (("--output_dir", output_dir), ("--model", model)):
        if value:
            storage.path(value, flag)  # the form only: the bucket is checked where the run starts
            places.append(f"{flag}={value}")
    return [python, "-m", "armu_jax.main", f"--flagfile={flagfile}", *(["--multihost"] if multihost else []), *places,
            *flags]


def execute(steps: list[tuple[str, list[str] | str]], dry_run: bool, env: dict | None = None) -> int:
    """Run (or, with dry_run, print) each (description, command) in order; stop at the first failure."""
    for description, command in steps:
        text = command if isinstance(command, str) else shlex.join(command)
        if dry_run:
            print(f"# {description}\n{text}")
            continue
        print(f"armu_jax launch: {description}", file=sys.stderr)
        result = subprocess.run(command, shell=isinstance(command, str), env=env)
        if result.returncode:
            print(f"error: {description} failed with exit status {result.returncode}", file=sys.stderr)
            return result.returncode
    return 0
