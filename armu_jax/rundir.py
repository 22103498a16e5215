"""The run directory: checked before anything is written, locked while a run uses it.

Layout: flags.txt (a flagfile of the run), control_vectors.npy, metrics.jsonl, tb/ (TensorBoard),
checkpoints/ (orbax), hf/ (the final Hugging Face export), .lock and .lock.holder (the lock of the
running process and its holder record).
A local directory or a gs:// URL (armu_jax.storage: what the lock and the atomic writes become there).
"""
from __future__ import annotations

import json

from armu_jax import outputs, storage
from armu_jax.config import RunConfig, differences, flagfile_text, from_flagfile
from armu_jax.errors import UserError


def check(cfg: RunConfig):
    """The run directory of cfg, refused (before anything is written) when it cannot be used as asked."""
    # --resume and --overwrite take a directory that is not empty; a new run needs an empty one.
    out = outputs.claim(cfg.output_dir, () if cfg.resume or cfg.overwrite else None, ignore=storage.LOCK_FILES,
                        purpose="the run directory for metrics, checkpoints and the export",
                        hint="pass --resume to continue it, --overwrite to start afresh, or choose a new directory")
    if cfg.resume:
        if not (out / "checkpoints").is_dir() or not (out / "flags.txt").is_file():
            raise UserError(f"--resume: {out} has no checkpoints/ and flags.txt to resume from")
        changed = differences(from_flagfile(out / "flags.txt"), cfg)
        if changed and not cfg.allow_flag_changes:
            raise UserError(f"--resume with settings that differ from {out / 'flags.txt'}: " + "; ".join(changed)
                            + "; rerun with the run's settings (--flagfile=" + str(out / "flags.txt")
                            + " --resume) or add --allow_flag_changes to continue anyway")
        read_metrics(out)  # a damaged log is refused now, before anything is written
    return out


def read_metrics(out) -> list[dict]:
    """metrics.jsonl's records. A last line cut short (the run was killed while writing it) is
    dropped; any other line that is not a record is refused in one line."""
    file = out / "metrics.jsonl"
    if not file.exists():
        return []
    lines = storage.read_bytes(file).decode("utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError
        except ValueError:
            if number == len(lines):
                break
            raise UserError(f"{file}:{number} is not a metrics record; the run directory is damaged: remove that "
                            "line, or start a new run") from None
        records.append(record)
    return records


def lock(out):
    """An exclusive lock on the run directory while the run uses it (storage.lock: flock on
    <dir>/.lock locally; on GCS an object created only if none exists)."""
    return storage.lock(out, f"--output_dir {out}")


def clear(out) -> None:
    """--overwrite: remove everything in the (locked) run directory except its lock."""
    storage.refresh(out)
    for item in out.iterdir():
        if item.name not in storage.LOCK_FILES:
            storage.remove_tree(item)


def write_flagfile(out, cfg: RunConfig) -> None:
    outputs.write_text(out / "flags.txt", flagfile_text(cfg))
