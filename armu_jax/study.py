"""The Optuna study under --mode=tune and a spread --mode=sweep: its storage (SQLite, an RDB URL or a
journal file), the workers' heartbeat and the failing and retrying of trials whose worker died.

Both modes use it; neither imports the other for it.
"""
from __future__ import annotations

import fcntl
import threading
import time
import warnings
from pathlib import Path

from armu_jax import storage
from armu_jax.config import RunConfig
from armu_jax.errors import UserError, first_line

MAX_RETRY = 1  # a trial whose worker died is retried once with its settings


def storage_spec(cfg: RunConfig) -> tuple[str, str]:
    """("rdb", URL) or ("journal", PATH) of the study; SQLite in the output directory by default."""
    spec = cfg.tune_storage
    remote_out = bool(cfg.output_dir) and storage.is_url(cfg.output_dir)
    if not spec:
        if remote_out:
            raise UserError(f"--output_dir={cfg.output_dir}: SQLite and the journal file need a POSIX filesystem; give "
                            "the study an RDB URL, --tune_storage=postgresql://USER:PASS@HOST/DB")
        return "rdb", f"sqlite:///{Path(cfg.output_dir).expanduser().resolve() / 'study.db'}"
    if spec.startswith("journal:"):
        if remote_out or storage.is_url(spec[len("journal:"):]):
            raise UserError(f"--tune_storage={spec}: the journal file needs a POSIX filesystem (a local or shared "
                            "mount); with a gs:// output directory use an RDB URL (postgresql://...)")
        return "journal", str(Path(spec[len("journal:"):]).expanduser())
    if "://" not in spec:
        raise UserError(f"--tune_storage={spec}: give an RDB URL (sqlite:///PATH, postgresql://USER:PASS@HOST/DB) "
                        "or journal:PATH")
    if spec.startswith("sqlite:") and remote_out:
        raise UserError(f"--tune_storage={spec}: SQLite needs a POSIX filesystem shared by the workers; with a gs:// "
                        "output directory use postgresql:// or mysql://")
    if storage.is_url(spec) and not spec.split(":")[0].startswith(("postgres", "mysql", "sqlite", "oracle", "mssql")):
        raise UserError(f"--tune_storage={spec}: Optuna storage is an RDB URL or journal:PATH, not an object-store URL")
    return "rdb", spec


def open_storage(cfg: RunConfig):
    """The Optuna storage of the study (heartbeat on RDB storage); one line when it cannot be opened."""
    import optuna  # optional: only the tune and spread sweeps load Optuna
    kind, where = storage_spec(cfg)
    try:
        if kind == "journal":
            from optuna.storages.journal import (  # optional: only the tune and spread sweeps load Optuna
                JournalFileBackend,
                JournalStorage,
            )
            Path(where).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(where))
        engine = {"connect_args": {"timeout": 120}} if where.startswith("sqlite") else {"pool_pre_ping": True}
        make = lambda: optuna.storages.RDBStorage(
            where, engine_kwargs=engine, heartbeat_interval=cfg.tune_heartbeat_seconds,
            grace_period=2 * cfg.tune_heartbeat_seconds,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
        if not where.startswith("sqlite:///"):
            return make()
        db = Path(where[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{db}.lock", "a") as lock:  # workers started together would race to create the schema
            fcntl.flock(lock, fcntl.LOCK_EX)
            return make()
    except ModuleNotFoundError as err:
        raise UserError(f"--tune_storage={cfg.tune_storage}: its database driver is not installed ({err.name}); "
                        f"pip install it (psycopg2-binary for PostgreSQL, PyMySQL for MySQL)") from None
    except Exception as err:  # sqlalchemy's OperationalError, ArgumentError, OSError ...
        raise UserError(f"--tune_storage={cfg.tune_storage or where}: cannot open the study's storage "
                        f"({first_line(err)})") from None


def quiet_optuna() -> None:
    """Our loop drives the heartbeat and the ask/tell itself (Optuna warns that heartbeats are meant for
    study.optimize, and that experimental features are experimental)."""

    import optuna  # optional: only the tune and spread sweeps load Optuna
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class Heartbeat:
    """A running trial's heartbeat: Optuna's on RDB storage; on a journal file a trial attribute with the
    time, written every --tune_heartbeat_seconds, which fail_stale() of any worker reads."""

    def __init__(self, study, trial, interval: int):
        import optuna  # optional: only the tune and spread sweeps load Optuna
        self.stop = threading.Event()
        rdb = isinstance(study._storage, optuna.storages.RDBStorage)
        beat = (lambda: study._storage.record_heartbeat(trial._trial_id)) if rdb else \
            (lambda: study._storage.set_trial_user_attr(trial._trial_id, "heartbeat", time.time()))
        beat()

        def loop():
            while not self.stop.wait(interval):
                try:
                    beat()
                except Exception:  # the trial finished meanwhile (or the storage hiccuped): the next beat decides
                    pass
        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join()


def fail_stale(study, interval: int) -> None:
    """Fail the running trials whose worker stopped beating (2 x interval) and retry each once."""
    import optuna  # optional: only the tune and spread sweeps load Optuna
    if isinstance(study._storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)
        return
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        last = t.user_attrs.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else now)
        if now - last > 2 * interval:
            try:
                if study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL):
                    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
                    retry(study, study._storage.get_trial(t._trial_id))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker failed it first


def trial_seeded_sampler(seed: int, startup_trials: int):
    """Optuna's TPE whose random draws are seeded per trial, from the study's seed and the trial's number.

    Every worker of a study is started with the same --tune_seed. Seeded once per worker (TPESampler(seed)),
    N workers started together draw the same random start: the same setting N times. Seeded per trial,
    each worker draws its trial's own numbers (the storage hands out each number once), and the study stays
    reproducible from its seed: trial k draws the same random setting whoever runs it, and TPE's choices
    follow from the trials finished before it."""
    import optuna  # optional: only the tune and spread sweeps load Optuna

    class TrialSeededTPE(optuna.samplers.TPESampler):
        def before_trial(self, study, trial):
            state = (seed * 1_000_003 + trial.number) % 2**32
            self._rng.rng.seed(state)
            self._random_sampler._rng.rng.seed(state)
            super().before_trial(study, trial)

    return TrialSeededTPE(seed=seed, n_startup_trials=startup_trials)
