"""The failures users hit: each is one line, exit 2 (usage) or 1 (during the run), and nothing is lost."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, cli_args, cli_command, read_metrics, run_cli, run_settings

from armu_jax.data import read_corpus, tokenize
from armu_jax.errors import UserError


def _main(settings: dict, *extra, prefix=(), wait=True):
    if not wait:
        return subprocess.Popen([*prefix, *cli_command(*cli_args(settings), *extra)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return run_cli(*cli_args(settings), *extra, prefix=prefix)


def _one_error_line(result, code: int, message: str) -> str:
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert result.returncode == code, result.stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], result.stderr[-3000:]
    assert not any(l.startswith("Traceback") for l in lines), result.stderr[-3000:]
    return lines[-1]


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory, tiny_llama):
    """A finished 4-step run of the tiny model (checkpoints at steps 2 and 4, an export), run once."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = _main(run_settings(tiny_llama, max_num_batches=4, checkpoint_every=2, output_dir=str(out)))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture
def finished_run(tmp_path, tiny_llama, finished_once):
    """A finished 4-step run of the tiny model: checkpoints at steps 2 and 4, an export; each test's
    own copy of the one run (the settings' --output_dir is restartable, so a copy resumes as the run)."""
    out = tmp_path / "run"
    shutil.copytree(finished_once, out, symlinks=True)
    settings = run_settings(tiny_llama, max_num_batches=4, checkpoint_every=2, output_dir=str(out))
    return settings, out


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_then_allowed(finished_run):
    settings, out = finished_run
    before = _snapshot(out)
    line = _one_error_line(_main(settings, "--resume", "--lr=0.002", "--beta=3"), 2,
                           "--resume with settings that differ")
    assert "--lr: run has 0.001, now 0.002" in line and "--beta: run has 5.0, now 3.0" in line
    assert _snapshot(out) == before
    # Output, logging and evaluation settings may change; with --allow_flag_changes anything may.
    assert _main(settings, "--resume", "--log_every=2", "--keep_checkpoints=5").returncode == 0
    resumed = _main(settings, "--resume", "--lr=0.002", "--max_num_batches=6", "--allow_flag_changes")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out)] == list(range(6))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_llama):
    out = tmp_path / "run"
    settings = run_settings(tiny_llama, max_num_batches=8, checkpoint_every=1, lr=1e30, output_dir=str(out))
    line = _one_error_line(_main(settings), 1, "not finite")
    step = int(line.split("step ")[1].split(":")[0])
    assert step >= 1 and f"the last good checkpoint is step {step}" in line
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == step  # the state after the bad step was never saved
    assert not (out / "hf").exists()


def _immutable(path: Path, on: bool) -> None:
    """Make a directory unwritable, also for root (chattr), else by permissions."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
    else:
        path.chmod(0o555 if on else 0o755)


@pytest.mark.slow
def test_unwritable_checkpoint_dir_fails_with_checkpoints_and_export_intact(finished_run):
    settings, out = finished_run
    before = _snapshot(out)
    _immutable(out / "checkpoints", True)
    try:
        result = _main(settings, "--resume", "--max_num_batches=8", "--allow_flag_changes")
    finally:
        _immutable(out / "checkpoints", False)
    line = _one_error_line(result, 1, "could not be written")
    assert "the checkpoint of step 4 is intact" in line
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith(("metrics", "tb/"))} == \
        {k: v for k, v in before.items() if not k.startswith(("metrics", "tb/"))}


def _with_file_size_limit(limit: int) -> list[str]:
    """A command prefix that stands in for a full disk, portably: writes past `limit` bytes fail with
    EFBIG. A fresh Python sets the limit (and ignores SIGXFSZ) and execs the command, so nothing is
    forked from the multithreaded test process."""
    code = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_full_disk_during_export_keeps_the_earlier_export(finished_run):
    settings, out = finished_run
    export_before = _snapshot(out / "hf")
    result = _main(settings, "--resume", "--max_num_batches=6", "--allow_flag_changes",
                   prefix=_with_file_size_limit(4 << 20))  # the export's weights are 12 MB
    line = _one_error_line(result, 1, "export to")
    assert "an earlier export there is intact" in line
    assert _snapshot(out / "hf") == export_before
    assert not [p for p in out.iterdir() if p.name.startswith(".hf.")]  # no half-written export left
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6  # the run itself finished and was checkpointed
    # once there is room, the same command finishes the work: the 6-step export replaces the 4-step one
    again = _main(settings, "--resume", "--max_num_batches=6", "--allow_flag_changes")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _snapshot(out / "hf") != export_before and (out / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_full_disk_during_an_evaluations_writes_leaves_nothing_half_written(tmp_path, tiny_llama):
    """--mode=eval whose reports cannot be written (a file-size limit standing in for a full disk): one line
    naming the file, no partial report left, and the same command with room writes them."""
    out = tmp_path / "eval"
    args = [f"--model={tiny_llama}", "--mode=eval", "--eval_tasks=demo_bio", "--eval_limit=8", f"--output_dir={out}"]
    result = run_cli(*args, prefix=_with_file_size_limit(2000))  # samples.jsonl (written first) does not fit
    _one_error_line(result, 1, "samples.jsonl could not be written (File too large)")
    assert not (out / "samples.jsonl").exists() and not (out / "eval.json").exists()  # eval.json: the finished mark
    assert not [p for p in out.iterdir() if p.name.startswith(".")] if out.exists() else True
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "samples.jsonl").stat().st_size > 2000 and (out / "eval.json").is_file()


@pytest.mark.slow
def test_second_run_on_the_same_directory_is_refused(tmp_path, tiny_llama):
    out = tmp_path / "run"
    settings = run_settings(tiny_llama, max_num_batches=300, checkpoint_every=0, output_dir=str(out))
    first = _main(settings, wait=False)
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # paused inside its loop, holding the lock
    assert first.poll() is None, first.stderr.read()[-2000:]
    flags_before = (out / "flags.txt").read_bytes()
    second = _main(settings, "--overwrite")
    line = _one_error_line(second, 2, "is in use by another run")
    assert f"(pid {first.pid})" in line
    # a run on another host of a shared filesystem that carries no flock between hosts: the holder record stops it
    other = _on_another_host(settings, "--overwrite", host="host-b")
    line = _one_error_line(other, 2, "is in use by another run")
    assert f"(pid {first.pid} on {socket.gethostname()}, refreshed" in line
    first.send_signal(signal.SIGTERM)  # the first run checkpoints where it is and stops, untouched
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 1
    assert (out / "flags.txt").read_bytes() == flags_before
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == list(range(len(steps))) and (out / "checkpoints" / str(len(steps))).is_dir()


def _on_another_host(settings: dict, *extra, host: str, lease: float | None = None):
    """The CLI as a process of another host sharing this filesystem (tests/other_host.py), run to its end."""
    env = {**os.environ, "ARMU_TEST_HOST": host, **({"ARMU_TEST_LOCK_LEASE_S": str(lease)} if lease else {})}
    command = [sys.executable, str(ROOT / "tests" / "other_host.py"), "armu_jax.main", *cli_args(settings), *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


TAKE = """
import sys, time
from pathlib import Path
from armu_jax import storage
from armu_jax.errors import UserError
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
try:
    lock = storage.lock(Path(sys.argv[1]), "--output_dir")
except UserError:
    print("refused")
else:
    print("got")
    time.sleep(2)
    lock.release()
"""


@pytest.mark.slow
def test_the_lock_holds_across_hosts_on_a_shared_filesystem(tmp_path, tiny_llama):
    """Hosts sharing the run directory's filesystem, which carries no flock between them (tests/other_host.py).
    A run SIGKILLed on this host leaves its holder record: another host is refused while it is fresh, and takes
    the directory over once it is older than the lease. Four hosts starting at one moment on a free directory,
    and again on a stale record: exactly one gets it each time."""
    out = tmp_path / "run"
    settings = run_settings(tiny_llama, max_num_batches=300, checkpoint_every=0, output_dir=str(out))
    first = _main(settings, wait=False)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.kill()
    first.wait()
    holder = json.loads((out / ".lock.holder").read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    short = {**settings, "max_num_batches": 3}
    refused = _on_another_host(short, "--overwrite", host="host-b")
    assert f"(pid {first.pid} on {socket.gethostname()}, refreshed" in _one_error_line(refused, 2, "in use")
    time.sleep(max(0.0, holder["time"] + 3 - time.time()))  # the record is now older than a 2 s lease
    taken = _on_another_host(short, "--overwrite", host="host-b", lease=2)
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2] and (out / "hf" / "config.json").is_file()
    assert not (out / ".lock.holder").exists()  # released at the end

    script = tmp_path / "take.py"
    script.write_text(TAKE)
    for stale in (False, True):
        free = tmp_path / f"race-{stale}"
        free.mkdir()
        if stale:
            (free / ".lock.holder").write_text(json.dumps({"host": "gone", "pid": 1, "token": "t", "time": 0}))
        start = f"{time.time() + 3:.3f}"
        procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "other_host.py"), str(script), str(free), start],
                                  cwd=ROOT, env={**os.environ, "ARMU_TEST_HOST": f"host-{k}"}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for k in range(4)]
        said = [p.communicate(timeout=120) for p in procs]
        assert sorted(o.strip() for o, _ in said) == ["got", "refused", "refused", "refused"], said


@pytest.mark.slow
def test_corpus_files_follow_the_documented_rules(tmp_path, smollm2_dir):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nbroken \xff byte\n")
    with pytest.raises(UserError, match=r"bad.txt:2: not valid UTF-8"):
        read_corpus(str(bad))
    record = tmp_path / "records.jsonl"
    record.write_text('{"text": "a"}\n{"title": "no text"}\n')
    with pytest.raises(UserError, match=r"records.jsonl:2: a JSON object without a string 'text' field"):
        read_corpus(str(record))
    for suffix in (".txt", ".jsonl"):  # CRLF files give the texts of their LF twins
        lf, crlf = tmp_path / f"lf{suffix}", tmp_path / f"crlf{suffix}"
        lines = ['{"text": "one"}', "raw line two", "three"]
        lf.write_bytes("\n".join(lines).encode() + b"\n")
        crlf.write_bytes("\r\n".join(lines).encode() + b"\r\n")
        assert read_corpus(str(crlf)) == read_corpus(str(lf))
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"text": "word " * 2_000_000}) + "\n")  # one 10 MB line
    from armu_jax.data import load_tokenizer
    texts = read_corpus(str(huge))
    assert len(texts) == 1 and len(texts[0]) == 10_000_000
    batch = tokenize(load_tokenizer(smollm2_dir), texts, 64, 4, 64, "none")
    assert batch["attention_mask"][0].sum() == 64  # truncated to the max length like any text


def _cut_short(checkpoint: Path) -> int:
    """Truncate a checkpoint's data files to half (a write cut off); returns how many were cut."""
    cut = 0
    for p in sorted(checkpoint.rglob("*")):
        if p.is_file() and p.stat().st_size > 64 and "metadata" not in p.name:
            with open(p, "r+b") as f:
                f.truncate(p.stat().st_size // 2)
            cut += 1
    return cut


@pytest.mark.cli
def test_resume_goes_past_a_damaged_checkpoint(finished_run, finished_once):
    """The newest checkpoint cut short: --resume says so in one line, sets it aside, continues from the one
    before and ends with the export of the run that was never damaged, with no traceback at exit."""
    from safetensors.numpy import load_file
    settings, out = finished_run
    shutil.rmtree(out / "hf")  # killed before its export
    assert _cut_short(out / "checkpoints" / "4") > 0
    result = _main(settings, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the checkpoint of step 4 cannot be restored" in result.stderr, result.stderr[-3000:]
    assert "continuing from the checkpoint of step 2" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (out / "damaged_checkpoints" / "4").is_dir() and (out / "checkpoints" / "4").is_dir()  # set aside, rewritten
    a, b = load_file(finished_once / "hf" / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)
    assert [m["loss"] for m in read_metrics(out)] == [m["loss"] for m in read_metrics(finished_once)]


@pytest.mark.cli
def test_resume_with_no_checkpoint_that_restores_is_one_line(finished_run):
    """The newest checkpoint gone and the one before cut short: one line naming both reasons, exit 2, nothing
    removed or moved, no traceback from the checkpointing library's threads."""
    settings, out = finished_run
    shutil.rmtree(out / "checkpoints" / "4")
    _cut_short(out / "checkpoints" / "2")
    before = _snapshot(out)
    line = _one_error_line(_main(settings, "--resume"), 2, "no checkpoint in")
    assert "step 2:" in line and "nothing was removed" in line
    assert _snapshot(out) == before


def _kill_when(proc, appears, timeout: float = 240) -> Path:
    """SIGKILL proc the moment appears() returns a path (polled every 2 ms): a kill during that write."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = appears()
        if found is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            return found
        time.sleep(0.002)
    raise AssertionError(f"the write never began (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")


def _first(directory: Path, pattern: str):
    return next(iter(directory.glob(pattern)), None) if directory.exists() else None


@pytest.mark.slow
def test_a_kill_during_the_export_leaves_nothing_taken_as_finished(finished_run, finished_once):
    """SIGKILL while the export's files are being written (its build directory beside hf/): the earlier export
    is intact or absent, never half-written; the same command with --resume then exports the run that was never
    killed, bit for bit."""
    from safetensors.numpy import load_file
    settings, out = finished_run
    shutil.rmtree(out / "hf")  # the run's own export is the one being written
    shutil.rmtree(out / "checkpoints" / "4")  # so that the resumed process runs steps 2..3, then exports
    proc = _main(settings, "--resume", wait=False)
    _kill_when(proc, lambda: _first(out, ".hf.build-*/*"))
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "hf").exists()  # nothing half-written is in the export's place
    again = _main(settings, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list(out.glob(".hf.build-*"))  # what the killed export left is cleared
    a, b = load_file(finished_once / "hf" / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)


def _killed_after_writing(name: str) -> list[str]:
    """A command prefix: the command runs as usual until its write of a file called `name` returns, then the
    process SIGKILLs itself (the next write, e.g. a finished mark, never happens)."""
    code = ("import os, runpy, signal, sys\nfrom armu_jax import storage\nreal = storage.write_bytes\n"
            "def write_bytes(path, data):\n    out = real(path, data)\n"
            f"    if str(path).endswith({name!r}):\n        os.kill(os.getpid(), signal.SIGKILL)\n    return out\n"
            "storage.write_bytes = write_bytes\nsys.argv = sys.argv[sys.argv.index('armu_jax.main'):]\n"
            "runpy.run_module('armu_jax.main', run_name='__main__')")
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_a_kill_between_an_evaluations_writes_is_not_taken_as_finished(tmp_path, tiny_llama):
    """--mode=eval SIGKILLed after samples.jsonl is written and before eval.json (written last, the finished
    mark): the directory is not a finished evaluation, and the same command writes every report."""
    out = tmp_path / "eval"
    args = [f"--model={tiny_llama}", "--mode=eval", "--eval_tasks=demo_bio", "--eval_limit=8", f"--output_dir={out}"]
    result = run_cli(*args, prefix=_killed_after_writing("samples.jsonl"))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (out / "samples.jsonl").is_file() and not (out / "eval.json").exists()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert report["results"]["demo_bio"]["n"] == 8
    assert len([r for r in samples if r.get("type") != "nll"]) == 8


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_keeps_the_one_before(finished_run):
    """The disk fills while a checkpoint is written (a file-size limit below its size, not a mock): one line
    naming the checkpoint, exit 1, the checkpoint of step 4 and the export intact, and --resume with room
    continues from step 4."""
    settings, out = finished_run
    export_before = _snapshot(out / "hf")
    size = max(p.stat().st_size for p in (out / "checkpoints" / "4").rglob("*") if p.is_file())
    result = _main(settings, "--resume", "--max_num_batches=6", "--allow_flag_changes",
                   prefix=_with_file_size_limit(size // 2))
    line = _one_error_line(result, 1, "could not be written")
    assert "checkpoint" in line and "step 4" in line, line
    assert _snapshot(out / "hf") == export_before
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    again = _main(settings, "--resume", "--max_num_batches=6", "--allow_flag_changes")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out)] == list(range(6))


@pytest.mark.slow
def test_a_full_disk_at_the_metrics_log_keeps_the_checkpoints(finished_run):
    """metrics.jsonl cannot grow (a file-size limit just above it): one line naming it, exit 1, the checkpoints
    and the export intact, and --resume with room logs every step once."""
    settings, out = finished_run
    checkpoints_before = _snapshot(out / "checkpoints")
    limit = (out / "metrics.jsonl").stat().st_size + 64  # the resumed run rewrites steps 0..3, then step 4 fails
    result = _main(settings, "--resume", "--max_num_batches=6", "--allow_flag_changes",
                   prefix=_with_file_size_limit(limit))
    _one_error_line(result, 1, "metrics.jsonl could not be written (File too large)")
    assert _snapshot(out / "checkpoints") == checkpoints_before
    again = _main(settings, "--resume", "--max_num_batches=6", "--allow_flag_changes")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out)] == list(range(6))
