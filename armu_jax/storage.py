"""Where files live: local paths and gs:// URLs through one layer.

A directory setting (--output_dir, --model, a sweep's or an export's directory) is either a local
path (pathlib.Path) or a gs:// URL (etils epath.Path: the path type orbax itself takes; without
TensorFlow its gs:// backend is fsspec's gcsfs). Everything else asks this module:

- path(): the setting as a path object, a URL checked (scheme, bucket) and never turned into a
  local directory named 'gs:'.
- check_bucket(): the endpoint reachable, the bucket there, the credentials accepted: one line each.
- read_range(): a byte range of a file (one GET with a Range header on GCS), counted per process
  in READS: what the model loader reports.
- write_bytes(): a whole file at once, atomic (a temporary file and os.replace locally; on GCS an
  object upload is atomic by itself: readers see the old object or the new one).
- open_write(): a file streamed (an export's tensors): locally a temporary name renamed at close;
  on GCS a resumable upload that becomes the object only at close.
- copy() / remove_tree() / local_copy(): an object copied (server-side within GCS), a directory
  removed, the small files of a remote model directory fetched once for the tokenizer.
- lock(): the run directory's lock: locally flock and a holder record created only if none exists (hosts
  sharing a filesystem that carries no flock between them see the record), refreshed while the run lives; on GCS an object created with the precondition
  ifGenerationMatch=0 (only if no such object exists), refreshed while the run lives and taken
  over only when its holder is gone (same host, process dead) or silent past LOCK_LEASE_S.

The CLI copies a directory down (or up) in one command: python -m armu_jax.storage cp SRC DST.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

# gcsfs >= 2026.8 asks a gRPC control API for each bucket's layout first (60 s timeout, then a
# fallback): plain JSON-API buckets, emulators included, need none of it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import atexit
import fcntl

from armu_jax.errors import UserError, first_line, run_cli  # noqa: E402

SCHEMES = ("gs",)
LOCK_LEASE_S = 300.0  # a lock not refreshed for this long belongs to a run that is gone
LOCK_REFRESH_S = 60.0
GCS_ENDPOINT = "https://storage.googleapis.com"


class Reads:
    """Bytes and requests this process has read from object storage (the model loader reports them)."""

    def __init__(self):
        self.bytes = self.requests = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n
            self.requests += 1


READS = Reads()


def is_url(value) -> bool:
    """A URL (scheme://...), as opposed to a local path."""
    text = str(value)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier()


def path(value, flag: str = "path"):
    """A directory or file setting as a path: pathlib.Path for a local path (~ expanded), epath.Path
    for a gs:// URL. A URL of another scheme, or without a bucket, is refused in one line."""
    if isinstance(value, Path) or not is_url(value):
        return Path(value).expanduser()
    text = str(value)
    parsed = urlparse(text)
    if parsed.scheme not in SCHEMES:
        raise UserError(f"{flag} {text}: {parsed.scheme}:// is not supported (nothing is written); use gs://bucket/path, "
                        "a local path, or a filesystem every process mounts")
    if not parsed.netloc:
        raise UserError(f"{flag} {text} names no bucket; write gs://BUCKET/path")
    from etils import epath  # only for gs:// paths
    return epath.Path(text.rstrip("/"))


def bucket_of(p) -> str:
    return urlparse(str(p)).netloc


def key_of(p) -> str:
    """'bucket/object/path' (gcsfs's spelling of a URL)."""
    parsed = urlparse(str(p))
    return f"{parsed.netloc}{parsed.path}".rstrip("/")


def filesystem():
    """The gcsfs file system (the instance epath's fsspec backend shares)."""
    import fsspec  # only for gs:// paths
    return fsspec.filesystem("gs")


def endpoint() -> str:
    return os.environ.get("STORAGE_EMULATOR_HOST") or GCS_ENDPOINT


def check_bucket(p, flag: str) -> None:
    """gs://BUCKET/...: the endpoint answers, the bucket exists and the credentials are accepted;
    else one line saying which and what to do. Local paths pass."""
    if not is_url(p):
        return
    where = endpoint()
    parsed = urlparse(where if "://" in where else f"http://{where}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=10).close()
    except OSError as err:
        raise UserError(f"{flag} {p}: cannot reach the storage endpoint {where} ({err.strerror or err}); check the "
                        "network (or STORAGE_EMULATOR_HOST) and try again") from None
    bucket = bucket_of(p)
    try:
        filesystem().ls(bucket, refresh=True)
    except FileNotFoundError:
        raise UserError(f"{flag} {p}: bucket {bucket} does not exist at {where}; create it "
                        f"(gcloud storage buckets create gs://{bucket}) or fix the name") from None
    except Exception as err:  # gcsfs: HttpError(401), OSError('Forbidden'), google.auth errors
        raise UserError(credential_message(p, flag, err)) from None


def credential_message(p, flag: str, err: BaseException) -> str:
    code = getattr(err, "code", None)
    text = first_line(err, 160)
    if code in (401, 403) or "Forbidden" in text or "credential" in text.lower() or "auth" in type(err).__module__:
        return (f"{flag} {p}: the storage service refused the credentials ({text}); run "
                "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS to a key with "
                f"access to gs://{bucket_of(p)}")
    return f"{flag} {p}: the bucket cannot be listed ({text})"


def size(p) -> int:
    if is_url(p):
        return int(filesystem().info(key_of(p))["size"])
    return Path(p).stat().st_size


def read_range(p, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file; from GCS one ranged GET, counted in READS."""
    if end <= start:
        return b""
    if is_url(p):
        data = filesystem().cat_file(key_of(p), start=start, end=end)
        READS.add(len(data))
        return data
    with open(p, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def read_bytes(p) -> bytes:
    if is_url(p):
        data = filesystem().cat_file(key_of(p))
        READS.add(len(data))
        return data
    return Path(p).read_bytes()


def write_bytes(p, data: bytes):
    """The whole file at once, atomically (see the module's note)."""
    if is_url(p):
        filesystem().pipe_file(key_of(p), data)
        return p
    with open_write(p) as f:
        f.write(data)
    return Path(p)


class open_write:
    """`with open_write(p) as f:` a file streamed; it appears at p only when the block ends without
    an error (locally a temporary name renamed; on GCS an upload finished only at close)."""

    def __init__(self, p):
        self.p = p

    def __enter__(self):
        if is_url(self.p):
            self.f = filesystem().open(key_of(self.p), "wb")
        else:
            self.p = Path(self.p)
            self.p.parent.mkdir(parents=True, exist_ok=True)
            self.temp = self.p.with_name(f".{self.p.name}.{os.getpid()}.tmp")
            self.f = self.temp.open("wb")
        return self.f

    def __exit__(self, kind, value, tb):
        if is_url(self.p):
            if kind is None:
                self.f.close()
            else:
                self.f.discard()  # the resumable upload is abandoned: no object appears
            return False
        try:
            self.f.close()  # a full disk may refuse the last bytes here
            if kind is None:
                os.replace(self.temp, self.p)
        except BaseException:
            self.temp.unlink(missing_ok=True)
            raise
        if kind is not None:
            self.temp.unlink(missing_ok=True)
        return False


def copy(src, dst) -> None:
    """One file: within GCS a server-side copy, else streamed through this process."""
    if is_url(src) and is_url(dst):
        filesystem().copy(key_of(src), key_of(dst))
    elif not is_url(src) and not is_url(dst):
        shutil.copy2(src, dst)
    elif is_url(dst):
        filesystem().put_file(str(src), key_of(dst))
    else:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        filesystem().get_file(key_of(src), str(dst))


def remove_tree(p) -> None:
    """A directory and everything under it (nothing to do if it is not there)."""
    if is_url(p):
        fs = filesystem()
        if fs.exists(key_of(p)):
            fs.rm(key_of(p), recursive=True)
        fs.invalidate_cache()
    elif Path(p).is_dir() and not Path(p).is_symlink():
        shutil.rmtree(p)
    elif Path(p).exists():
        Path(p).unlink()


def refresh(p) -> None:
    """Forget gcsfs's cached listings under p (objects another process wrote become visible)."""
    if is_url(p):
        filesystem().invalidate_cache(key_of(p))


def files_under(p) -> list[str]:
    """The relative names of every file under directory p, sorted."""
    if is_url(p):
        root = key_of(p)
        refresh(p)
        return sorted(name[len(root) + 1:] for name in filesystem().find(root))
    root = Path(p)
    return sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file())


_LOCAL_COPIES: dict[str, Path] = {}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".gguf")


def local_copy(model_dir) -> Path:
    """A local directory holding the small files of a remote model directory (config, tokenizer:
    transformers reads only local files; weights are skipped, they are read by byte range), fetched
    once per process into a temporary directory removed at exit. A local directory is returned as it is."""
    if not is_url(model_dir):
        return Path(model_dir)
    key = str(model_dir)
    if key not in _LOCAL_COPIES:
        target = Path(tempfile.mkdtemp(prefix="armu_jax-model-files-"))
        atexit.register(shutil.rmtree, target, True)
        for item in model_dir.iterdir():
            if not item.name.endswith(WEIGHT_SUFFIXES) and not item.is_dir():
                (target / item.name).write_bytes(read_bytes(item))
        _LOCAL_COPIES[key] = target
    return _LOCAL_COPIES[key]


class _HeldRecord:
    """What both locks share: a holder record {host, pid, token, time} that a thread rewrites every refresh while
    it is this lock's (its token), removed on release; the two in-use lines. A subclass says where the record
    lives: _holder() reads it, _write() and _remove() change it."""

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "time": time.time()}).encode()

    def _ours(self) -> bool:
        return (self._holder() or {}).get("token") == self.token

    def _start_refreshing(self, every: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, args=(every,), daemon=True)
        self._thread.start()

    def _refresh(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                if self._ours():
                    self._write(self._record())
            except Exception:  # a refresh that fails is retried at the next one
                pass

    def _release_record(self) -> None:
        self._stop.set()
        try:
            if self._ours():
                self._remove()
        except FileNotFoundError:
            pass

    def _in_use(self, holder: dict) -> UserError:
        return UserError(f"{self.what} is in use by another run ({_describe(holder)}); wait for it to finish or "
                         "choose another directory")

    def _taken_just_now(self) -> UserError:
        return UserError(f"{self.what} is in use by another run (it took the lock just now); choose another "
                         "directory")


class FileLock(_HeldRecord):
    """The lock on a local or shared directory, in two parts. flock on <dir>/.lock: a second run on this host
    stops at once. A holder record, <dir>/.lock.holder ({host, pid, token, time}), created only if none exists
    (O_EXCL: atomic on a local filesystem and on NFS) and rewritten every LOCK_REFRESH_S: a filesystem shared
    between hosts may not carry flock from one to another (NFS without its lock daemon, Lustre without
    -o flock, FUSE mounts); the record does. A record is taken over only when its holder is gone: written on
    this host (this process holds the flock, so its writer no longer runs: a run killed here and resumed), or
    not refreshed for LOCK_LEASE_S (its host is gone)."""

    def __init__(self, lock_path: Path, what: str, lease: float | None = None, refresh_s: float | None = None):
        lease = LOCK_LEASE_S if lease is None else lease  # the module's, read now (a test sets a short one)
        refresh_s = LOCK_REFRESH_S if refresh_s is None else refresh_s
        self.fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise UserError(f"{what} is in use by another run (pid {holder}); wait for it to finish or choose another "
                            "directory") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        self.holder_path = lock_path.with_name(lock_path.name + ".holder")
        self.what, self.lease, self.token = what, lease, uuid.uuid4().hex
        try:
            self._claim()
        except BaseException:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            raise
        self._start_refreshing(refresh_s)

    def _holder(self, path: Path | None = None) -> dict | None:
        """The record at path (the holder's by default); None: no record; {} one being written (or cut short)."""
        try:
            text = (path or self.holder_path).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return {}

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            return True
        written = holder.get("time")
        if written is None:  # cut short or being written: its file's age decides
            try:
                written = self.holder_path.stat().st_mtime
            except FileNotFoundError:
                return True
        return time.time() - float(written) > self.lease

    def _claim(self) -> None:
        holder = self._holder()
        if holder is not None:
            if not self._stale(holder):
                raise self._in_use(holder)
            self._set_aside(holder)
        try:
            fd = os.open(self.holder_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another run created it between our check and ours
            raise self._taken_just_now() from None
        with os.fdopen(fd, "wb") as f:
            f.write(self._record())

    def _set_aside(self, stale: dict) -> None:
        """Remove a stale record, and only it: moved to a name of this run's own, then read again; a record
        that is not the stale one (another run took the lock between our read and the move) is put back."""
        aside = self.holder_path.with_name(f"{self.holder_path.name}.stale-{self.token}")
        try:
            os.rename(self.holder_path, aside)
        except FileNotFoundError:  # another run removed it first: the exclusive create decides
            return
        moved = self._holder(aside)
        if stale and moved != stale:
            try:
                os.link(aside, self.holder_path)
            except FileExistsError:
                pass
            os.unlink(aside)
            raise self._taken_just_now()
        os.unlink(aside)

    def _write(self, record: bytes) -> None:
        write_bytes(self.holder_path, record)

    def _remove(self) -> None:
        self.holder_path.unlink()

    def release(self) -> None:
        self._release_record()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class ObjectLock(_HeldRecord):
    """The lock on GCS: an object created only if none exists (ifGenerationMatch=0, so of two runs
    starting together exactly one gets it), holding {host, pid, token, time}. A thread rewrites it
    every LOCK_REFRESH_S; release deletes it. An existing lock is taken over only when it is stale:
    written on this host by a process that no longer runs (a run killed here and resumed), or not
    refreshed for LOCK_LEASE_S (its host is gone)."""

    def __init__(self, lock_path, what: str, lease: float = LOCK_LEASE_S, refresh_s: float = LOCK_REFRESH_S):
        self.key, self.what, self.lease = key_of(lock_path), what, lease
        self.token = uuid.uuid4().hex
        fs = filesystem()
        fs.invalidate_cache()
        if fs.exists(self.key):
            holder = self._holder()
            if not self._stale(holder):
                raise self._in_use(holder)
            fs.rm(self.key)
        try:
            fs.pipe_file(self.key, self._record(), mode="create")
        except FileExistsError:  # another run created it between our check and our write (HTTP 412)
            raise self._taken_just_now() from None
        self._start_refreshing(refresh_s)

    def _holder(self) -> dict:
        try:
            return json.loads(filesystem().cat_file(self.key))
        except (ValueError, FileNotFoundError):
            return {}

    def _stale(self, holder: dict) -> bool:
        if time.time() - float(holder.get("time", 0)) > self.lease:
            return True
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, OverflowError):
                return False
        return False

    def _write(self, record: bytes) -> None:
        filesystem().pipe_file(self.key, record)

    def _remove(self) -> None:
        filesystem().rm(self.key)

    def release(self) -> None:
        self._release_record()


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    age = time.time() - float(holder.get("time", 0))
    return f"pid {holder.get('pid')} on {holder.get('host')}, refreshed {age:.0f} s ago"


LOCK_FILES = (".lock", ".lock.holder")  # what a run directory's lock keeps in it (a new run's directory may hold them)


def lock(directory, what: str):
    """An exclusive lock on a run directory (see FileLock, ObjectLock)."""
    if is_url(directory):
        return ObjectLock(directory / ".lock", what)
    Path(directory).mkdir(parents=True, exist_ok=True)
    return FileLock(Path(directory) / ".lock", what)


class AppendLog:
    """A text file written line by line (metrics.jsonl). Locally appended and flushed per line; on
    GCS (objects cannot be appended to) the whole text is rewritten at most every `every` seconds
    and at flush()/close(), so a kill loses at most that much of the log, as checkpoints bound it."""

    def __init__(self, p, text: str = "", every: float = 10.0):
        self.p, self.every, self.remote = p, every, is_url(p)
        write_bytes(p, text.encode())
        if self.remote:
            self.buffer, self.written = io.StringIO(), time.time()
            self.buffer.write(text)
        else:
            self.handle = Path(p).open("a", encoding="utf-8")

    def write(self, line: str) -> None:
        if not self.remote:
            self.handle.write(line)
            self.handle.flush()
            return
        self.buffer.write(line)
        if time.time() - self.written >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.remote:
            write_bytes(self.p, self.buffer.getvalue().encode())
            self.written = time.time()

    def close(self) -> None:
        if self.remote:
            self.flush()
        else:
            self.handle.close()


class _EventFile:
    """A TensorBoard event file in a bucket (tensorboardX's writer protocol: write, flush, close):
    the records so far, rewritten as one object at most every `every` seconds and at close
    (tensorboardX flushes every few events); closing twice uploads once."""

    def __init__(self, url: str, every: float = 10.0):
        self.url, self.buffer, self.dirty, self.every, self.written = url, io.BytesIO(), False, every, 0.0

    def write(self, data: bytes) -> None:
        self.buffer.write(data)
        self.dirty = True

    def flush(self, force: bool = False) -> None:
        if self.dirty and (force or time.time() - self.written >= self.every):
            write_bytes(self.url, self.buffer.getvalue())
            self.dirty, self.written = False, time.time()

    def close(self) -> None:
        self.flush(force=True)


class _EventFiles:
    def open(self, url):
        return _EventFile(url)

    def directory_check(self, url):
        pass  # no directories on GCS


def use_for_tensorboard() -> None:
    """tensorboardX writes gs:// event files through this layer (its own writer re-uploads from
    __del__, after the run, and authenticates apart from gcsfs)."""
    from tensorboardX import record_writer  # only when a run logs
    record_writer.register_writer_factory("gs", _EventFiles())


def copy_tree(src, dst) -> int:
    """Every file under src to dst (either side local or gs://); refuses a dst that holds files.
    Returns the number of files copied."""
    src, dst = path(src, "source"), path(dst, "target")
    for p, flag in ((src, "source"), (dst, "target")):
        check_bucket(p, flag)
    if not src.is_dir():
        raise UserError(f"source {src} is not a directory")
    if dst.exists() and files_under(dst):
        raise UserError(f"target {dst} is not empty; choose a new directory (nothing is overwritten)")
    names = files_under(src)
    from tqdm import tqdm  # only for uploads
    for name in tqdm(names, desc=f"copying {src}", unit="file"):
        target = dst / name
        if not is_url(target):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        copy(src / name, target)
    return len(names)


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[1] != "cp":
        print("usage: python -m armu_jax.storage cp SRC DST   (a directory, either side local or gs://)",
              file=sys.stderr)
        return 2
    n = copy_tree(argv[2], argv[3])
    print(f"armu_jax: copied {n} files from {argv[2]} to {argv[3]}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv))

