"""Orbax checkpoints of the train state, restored onto the same shardings.

A save or close that fails (full disk, unwritable directory) is a RunFailure naming the last good
checkpoint, which stays intact.
"""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from armu_jax import storage
from armu_jax.errors import RunFailure, first_line


class Checkpointer:
    def __init__(self, directory: Path, keep: int):
        # Synchronous: a save that fails raises at that step, so the run knows exactly which checkpoint
        # is the last good one. The state saved is only the trainable leaves and their optimizer
        # moments, small next to the model.
        # A gs:// directory is an epath.Path (storage.path): orbax writes its metadata through epath
        # and the arrays through tensorstore's gcs driver, and marks a finished step with
        # commit_success.txt where a local save renames a temporary directory.
        self.directory = directory if storage.is_url(directory) else Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.saved: int | None = None  # the step of the last good checkpoint (this run's or the resumed one)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
        except Exception as err:  # orbax wraps the OSError of a full or unwritable disk in several types
            kept = f"the checkpoint of step {self.saved} is intact" if self.saved is not None else "no earlier checkpoint"
            raise RunFailure(f"checkpoint of step {step} could not be written to {self.directory}: "
                             f"{first_line(err, 300)}; {kept}") from None
        self.saved = step

    def restore(self, state_like, shardings):
        """The latest state, restored as arrays with the given shardings."""
        target = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                        state_like, shardings)
        step = self.manager.latest_step()
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        self.saved = step
        return restored["state"]

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as err:  # an asynchronous save that failed surfaces here
            raise RunFailure(f"checkpoint could not be finished in {self.directory}: {first_line(err, 300)}; "
                             "earlier checkpoints are intact") from None
