"""Several processes (TPU pod workers, GPU nodes, SLURM tasks) running one job.

Every process runs the same command. `start` joins them with jax.distributed: from
--coordinator_address/--num_processes/--process_id, or from the cluster's environment (TPU VM
metadata, SLURM) with --multihost or when the environment says the job has several processes.
Process 0 writes the run directory (flags, metrics, TensorBoard, export); the others wait at
barriers where they must. A stop request (SIGTERM) on any process stops all of them at the same
step (jax's preemption sync), so the collective checkpoint is taken at one step everywhere.
"""
from __future__ import annotations

import atexit
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

from armu_jax import errors, storage
from armu_jax.config import check_host_arguments
from armu_jax.errors import UserError, first_line


# Environment variables that say this process is one of several, with how to read the count: srun
# sets SLURM_STEP_NUM_TASKS for the processes of a step (SLURM_NTASKS is also set for a batch
# script's single process, which must not wait for peers), mpirun OMPI_COMM_WORLD_SIZE, and a
# multi-host TPU slice lists its workers.
def _hostnames(value: str) -> int:
    """How many hosts a TPU_WORKER_HOSTNAMES list names (libtpu may leave a warning sentence there)."""
    names = value.split(",")
    if not all(re.fullmatch(r"[\w.\-:]+", n) for n in names):
        raise ValueError(value)
    return len(names)


CLUSTER_HINTS = {"SLURM_STEP_NUM_TASKS": int, "OMPI_COMM_WORLD_SIZE": int, "TPU_WORKER_HOSTNAMES": _hostnames}


def _cluster_processes() -> tuple[str, int] | None:
    """(variable, process count) when the environment describes a job of several processes."""
    for name, count in CLUSTER_HINTS.items():
        value = os.environ.get(name)
        if value:
            try:
                n = count(value)
            except ValueError:
                continue
            if n > 1:
                return name, n
    return None


def start(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
          multihost: bool) -> None:
    """Join the job's processes (before any jax computation), or do nothing for a single process."""
    check_host_arguments(coordinator_address, num_processes, process_id)
    if coordinator_address is not None:
        if num_processes == 1:
            return
    else:
        hint = _cluster_processes()
        if not (multihost or os.environ.get("JAX_COORDINATOR_ADDRESS") or hint):
            return
        if hint and not multihost:
            print(f"armu_jax: {hint[0]} says {hint[1]} processes; joining them with jax.distributed",
                  file=sys.stderr)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    # All None: jax reads the coordinator, count and index from the cluster (TPU VM metadata, SLURM).
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    if several():
        Watchdog().start()


# What the run last committed, for the line a lost process leaves (train.py sets it after every checkpoint).
LAST_CHECKPOINT: dict = {"step": None, "directory": None}
BEAT_SECONDS = 3.0  # each process writes its heartbeat to the coordination service this often
LOST_AFTER_SECONDS = 20.0  # a process silent this long (or the coordinator unreachable) is lost: every other stops


def _committed_on_disk(directory) -> int | None:
    """The newest step a local checkpoint directory holds in place (a checkpoint is renamed into its step's
    name when it commits, which can be just before its save returns, when another process is lost)."""
    if directory is None or storage.is_url(directory):
        return None
    try:
        return max((int(p.name) for p in Path(directory).iterdir() if p.name.isdigit()), default=None)
    except OSError:
        return None


def _checkpoint_text() -> str:
    steps = [s for s in (LAST_CHECKPOINT["step"], _committed_on_disk(LAST_CHECKPOINT["directory"])) if s is not None]
    if not steps:
        return "no checkpoint was committed yet"
    return f"the last committed checkpoint is step {max(steps)} in {LAST_CHECKPOINT['directory']}"


# What a collective's failure says when its peer process vanished (gloo on CPU, the coordination service).
PEER_GONE_SIGNS = ("Gloo", "gloo", "Connection reset by peer", "Connection closed by peer", "Socket closed")


class Watchdog:
    """Every process's heartbeat in jax.distributed's key-value store, and a watch on the others'.

    jax's own heartbeat notices a lost process only after its timeout (100 s) and then aborts every other
    process with a fatal-error dump; a process that fails with an error leaves the others waiting in a
    collective until the shutdown barrier gives up (5 minutes). Here a process that dies (SIGKILL, a lost
    host) stops beating, one that fails says so (errors.ON_FAILURE), and within LOST_AFTER_SECONDS every
    other process leaves one line naming it and the last committed checkpoint and exits 1. Relaunching
    the same command with --resume continues from that checkpoint."""

    def __init__(self):
        from jax._src import distributed  # a private or experimental jax module, loaded where it is used
        self.client = distributed.global_state.client
        self.me, self.count = jax.process_index(), jax.process_count()
        self.leaving = False
        errors.ON_FAILURE.append(self.failed)
        errors.BEFORE_FAILURE.append(self.peer_gone)
        atexit.register(self.done)  # runs before jax's own shutdown (registered earlier, run later)

    def start(self) -> None:
        threading.Thread(target=self._watch, name="armu_jax-watchdog", daemon=True).start()

    def done(self) -> None:
        """This process exits normally: the others must not take its silence for a loss (one may export for
        minutes after the others are done)."""
        self.leaving = True
        try:
            self.client.key_value_set(f"armu_jax/done/{self.me}", "1", allow_overwrite=True)
        except Exception:
            pass

    def peer_gone(self, text: str) -> None:
        """A failure whose cause is a peer that vanished (a collective's transport reset: the checkpoint's or a
        step's, when another process was killed inside it) is that peer's loss: wait for the watch to conclude
        (it prints the lost process's line and exits); any other failure, or none concluded, returns at once
        or after the wait, and the failure's own line follows."""
        if not any(sign in text for sign in PEER_GONE_SIGNS):
            return
        deadline = time.monotonic() + LOST_AFTER_SECONDS + 4 * BEAT_SECONDS
        while time.monotonic() < deadline and not self.leaving:
            time.sleep(BEAT_SECONDS / 2)

    def failed(self, code: int, reason: str) -> None:
        """This process failed: tell the others, give them a beat to read it, exit without jax's shutdown
        barrier (which would wait for processes that are stopping)."""
        self.leaving = True
        try:
            self.client.key_value_set(f"armu_jax/failed/{self.me}", reason[:300], allow_overwrite=True)
            time.sleep(2 * BEAT_SECONDS)
        except Exception:
            pass
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)

    def _lost(self, who: str, why: str) -> None:
        if self.leaving:
            return
        self.leaving = True
        print(f"\nerror: {who} of {self.count} was lost ({why}); this process (process {self.me}) stops too: "
              f"{_checkpoint_text()}. Relaunch the same command on every host with --resume", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)

    def _watch(self) -> None:
        seen = {peer: (None, time.monotonic()) for peer in range(self.count) if peer != self.me}
        reached = time.monotonic()
        noticed: dict = {}
        while not self.leaving:
            now = time.monotonic()
            try:
                self.client.key_value_set(f"armu_jax/beat/{self.me}", repr(time.time()), allow_overwrite=True)
                beats = {key.rsplit("/", 1)[-1]: value for key, value in self.client.key_value_dir_get("armu_jax/beat/")}
                failed = {key.rsplit("/", 1)[-1]: value for key, value in self.client.key_value_dir_get("armu_jax/failed/")}
                done = {key.rsplit("/", 1)[-1] for key, _ in self.client.key_value_dir_get("armu_jax/done/")}
                reached = now
            except Exception as err:  # the coordination service (in process 0) is gone
                if now - reached > LOST_AFTER_SECONDS:
                    self._lost("process 0", f"its coordination service is unreachable for {now - reached:.0f} s: "
                                            f"{first_line(err, 120)}")
                time.sleep(BEAT_SECONDS)
                continue
            for peer, reason in failed.items():  # after a grace: this process may be failing alike (a SIGTERM
                if peer != str(self.me):           # stops all at one step) and then says its own line
                    noticed.setdefault(peer, now)
                    if now - noticed[peer] >= 2 * BEAT_SECONDS:
                        self._lost(f"process {peer}", f"it failed: {reason}")
            for peer, (value, since) in seen.items():
                if str(peer) in done:
                    continue
                if beats.get(str(peer)) != value:
                    seen[peer] = (beats.get(str(peer)), now)
                elif now - since > LOST_AFTER_SECONDS:
                    self._lost(f"process {peer}", f"no heartbeat for {now - since:.0f} s")
            time.sleep(BEAT_SECONDS)



def is_main() -> bool:
    return jax.process_index() == 0


def several() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to wait for in one process)."""
    if several():
        from jax.experimental.multihost_utils import (
            sync_global_devices,  # a private or experimental jax module, loaded where it is used
        )
        sync_global_devices(name)


def check_shared(directory, flag: str) -> None:
    """With several processes, every one must see the same output directory (a bucket or a shared
    filesystem): process 0 writes a token file there, the others look for it after a barrier, and
    all stop with one line if any did not find it. The token (and a directory it created) is then
    removed, so nothing else has been written. One process: nothing to check."""
    if not several():
        return
    from jax.experimental.multihost_utils import (  # a private or experimental jax module, loaded where it is used
        broadcast_one_to_all,
        process_allgather,
    )

    name = int(broadcast_one_to_all(np.array(np.random.default_rng().integers(1, 2**31 - 1), np.int64)))
    token = directory / f".armu_jax-shared-{name}"
    created = False
    if is_main():
        created = not directory.exists()
        if not storage.is_url(directory):
            directory.mkdir(parents=True, exist_ok=True)
        storage.write_bytes(token, b"shared?")
    barrier("shared-token")
    storage.refresh(directory)
    seen = bool(is_main() or token.exists())
    everyone = np.asarray(process_allgather(np.array([seen], np.int32)))
    barrier("shared-token-read")
    if is_main():
        token.unlink()
        if created and not storage.is_url(directory) and not any(directory.iterdir()):
            directory.rmdir()
    if not everyone.all():
        missing = [i for i, ok in enumerate(everyone.reshape(-1)) if not ok]
        raise UserError(f"{flag} {directory} is not visible to process{'es' if len(missing) > 1 else ''} "
                        f"{', '.join(map(str, missing))} (each host sees its own local disk); use a bucket "
                        "(gs://BUCKET/path) or a filesystem every host mounts (NFS, gcsfuse)")


def gather(tree) -> dict:
    """Host numpy copies of (possibly sharded over several hosts) arrays, on every process."""
    from jax.experimental.multihost_utils import (
        process_allgather,  # a private or experimental jax module, loaded where it is used
    )
    return jax.tree.map(lambda x: np.asarray(process_allgather(x, tiled=True)), tree)


class StopRequest:
    """SIGTERM asks the run to checkpoint and stop at a step boundary.

    One process: a Python signal handler sets a flag. Several: XLA's preemption notifier (installed
    by jax.distributed) catches SIGTERM on whichever process gets it, and jax agrees on the first
    step every process can still reach; each process must ask at every step.
    """

    def __init__(self):
        self.flag = False
        if not several():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.flag = True

    def at(self, step: int) -> bool:
        """Whether to checkpoint and stop after `step` (steps done); asked once per step, in order."""
        if several():
            from jax.experimental.multihost_utils import (
                reached_preemption_sync_point,  # a private or experimental jax module, loaded where it is used
            )
            return reached_preemption_sync_point(step)
        return self.flag
