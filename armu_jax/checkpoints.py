"""Orbax checkpoints of the train state, restored onto the same shardings.

A save or close that fails (full disk, unwritable directory) is a RunFailure naming the last good
checkpoint, which stays intact. A resume takes the newest checkpoint that restores and sets the damaged
newer ones aside (restore_newest).
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from armu_jax import storage
from armu_jax.errors import RunFailure, first_line


class CheckpointsDamaged(Exception):
    """No checkpoint of a run restores: the directory and [(step, why)] newest first."""

    def __init__(self, directory, skipped: list[tuple[int, str]]):
        self.directory, self.skipped = directory, skipped
        super().__init__("; ".join(f"step {step}: {why}" for step, why in skipped))


@contextlib.contextmanager
def _writer_errors_quiet():
    """A failed save's error is raised here as one line (save); orbax's writer threads would also log it with
    their tracebacks, and tensorstore's callbacks print one more per thread once the save's event loop has
    closed: those are dropped while the save runs, and after a save that failed."""
    def drop(record):
        return "orbax" not in record.pathname

    logger, tasks = logging.getLogger("absl"), logging.getLogger("asyncio")  # tasks: "exception never retrieved"
    hooks, level = (sys.unraisablehook, sys.excepthook, threading.excepthook), tasks.level
    logger.addFilter(drop)
    tasks.setLevel(logging.CRITICAL)
    sys.unraisablehook = sys.excepthook = threading.excepthook = lambda *args: None
    yield  # an exception here (a failed save) leaves them quiet: the process is on its way out with the save's
    # one line, and tensorstore's writer threads may still print for a while (after the manager has closed)
    logger.removeFilter(drop)
    tasks.setLevel(level)
    sys.unraisablehook, sys.excepthook, threading.excepthook = hooks


def _os_reason(err: Exception) -> str:
    """The operating system's reason in an orbax/tensorstore error ("File too large", "No space left on
    device"), else the error's first line."""
    found = re.search(r"([A-Z][A-Za-z ]+) \[os_error_code='(\d+)'\]", str(err))
    if found:
        return found.group(1)
    cause = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return first_line(err, 300)


class Checkpointer:
    def __init__(self, directory: Path, keep: int):
        # Synchronous: a save that fails raises at that step, so the run knows exactly which checkpoint
        # is the last good one. The state saved is only the trainable leaves and their optimizer
        # moments, small next to the model.
        # A gs:// directory is an epath.Path (storage.path): orbax writes its metadata through epath
        # and the arrays through tensorstore's gcs driver, and marks a finished step with
        # commit_success.txt where a local save renames a temporary directory.
        self.directory = directory if storage.is_url(directory) else Path(directory).absolute()
        self.options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)
        self.saved: int | None = None  # the step of the last good checkpoint (this run's or the resumed one)
        self.closed = False  # closed after a failed save (_close_quietly): close() then has nothing to do

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        with _writer_errors_quiet():
            try:
                self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
            except Exception as err:  # orbax wraps the OSError of a full or unwritable disk in several types
                self._close_quietly()  # its writer threads end while their errors are quiet (no tracebacks at exit)
                kept = f"the checkpoint of step {self.saved} is intact" if self.saved is not None else "no earlier checkpoint"
                raise RunFailure(f"checkpoint of step {step} could not be written to {self.directory}: "
                                 f"{_os_reason(err)}; {kept}: make room (or fix the permissions) and rerun with "
                                 "--resume") from None
        self.saved = step

    def restore(self, state_like, shardings):
        """The latest state, restored as arrays with the given shardings."""
        return self.restore_newest(state_like, shardings)[0]

    def restore_newest(self, state_like, shardings) -> tuple[dict, list[tuple[int, str]]]:
        """(state, skipped): the newest checkpoint that restores, as arrays with the given shardings, and the
        newer ones that did not, [(step, why)]. Those are set aside in <run>/damaged_checkpoints/<step> (not
        removed), so that the run can write its own checkpoints of those steps again. When none restores:
        CheckpointsDamaged, and nothing is moved."""
        target = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                        state_like, shardings)
        skipped: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
            except Exception as err:  # orbax raises many types for a damaged or foreign checkpoint
                skipped.append((step, first_line(err, 200)))
                continue
            if skipped:
                self._set_aside([s for s, _ in skipped])
            self.saved = step
            return restored["state"], skipped
        raise CheckpointsDamaged(self.directory, skipped)

    def damaged_dir(self):
        return self.directory.parent / "damaged_checkpoints"

    def _set_aside(self, steps: list[int]) -> None:
        """Move the damaged steps' directories aside (process 0 of a multi-process run; the others wait)."""
        self.manager.close()
        if jax.process_index() == 0:
            aside = self.damaged_dir()
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = aside / str(step)
                k = 1
                while target.exists():  # set aside before, by an earlier resume
                    target, k = aside / f"{step}.{k}", k + 1
                (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import (
                multihost_utils,  # a private or experimental jax module, loaded where it is used
            )
            multihost_utils.sync_global_devices("armu_jax: damaged checkpoints set aside")
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def _close_quietly(self) -> None:
        self.closed = True
        try:
            self.manager.close()
        except Exception:  # a manager whose save failed may fail to close too; the save's error is the one said
            pass

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as err:  # an asynchronous save that failed surfaces here
            raise RunFailure(f"checkpoint could not be finished in {self.directory}: {first_line(err, 300)}; "
                             "earlier checkpoints are intact") from None
