"""Run and model directories in a bucket, against a real GCS JSON API on localhost (tests/gcs.py):
orbax and tensorstore reach it; a run with the model and the run directory in the bucket, SIGKILLed
after a checkpoint and resumed, exports byte for byte what the same run on local disk exports; 2
processes on a bucket run directory give the run of one, each reading only its shards; a sweep and
--mode=eval write there; a local directory other hosts cannot see, an unreachable endpoint, a
missing bucket, refused credentials and a URL without a bucket are one line each."""
import http.server
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import gcs
import numpy as np
import pytest
from helpers import ROOT, cli_args, cli_command, drift_bound, logged, run_cli, run_settings

from armu_jax import storage
from armu_jax.config import config_with
from armu_jax.errors import UserError
from armu_jax.tensor_files import StoredTensors
from armu_jax.train import run

pytestmark = pytest.mark.gcs

# 6 steps, a checkpoint every 2, on 4 devices sharded fsdp:4 (so 2 processes of 2 devices each hold
# half of each sharded tensor).
STEPS = dict(max_num_batches=6, checkpoint_every=2, mesh="fsdp:4")
COMPARED = ("loss", "forget_loss", "retain_loss", "coeff", "forget_cosine")
READ_LINE = re.compile(r"process (\d) read ([\d.]+) MB of the checkpoint's ([\d.]+) MB from \S+ in (\d+) requests")


@pytest.fixture(scope="module")
def bucket(tiny_llama):
    """The emulator, with the tiny Llama uploaded to gs://bkt/models/tiny: yields the model's URL."""
    with gcs.emulator(buckets=("bkt",)):
        yield gcs.upload(tiny_llama, "gs://bkt/models/tiny")


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, tiny_llama):
    """The run on local disk in this process, and again from weights one float32 ulp apart (the
    drift that sets how far another reduction order, gloo's across processes, may move a number)."""
    root = tmp_path_factory.mktemp("local")
    out = root / "run"
    run(config_with(**run_settings(tiny_llama, **STEPS), output_dir=str(out)))
    nudged = _nudged(tiny_llama, root / "nudged")
    run(config_with(**run_settings(nudged, **STEPS), output_dir=str(root / "nudged-run")))
    return out, root / "nudged-run"


def _nudged(source: Path, directory: Path) -> Path:
    from armu_jax import tensor_files
    directory.mkdir()
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (directory / item.name).symlink_to(item)
    stored = StoredTensors(source / "model.safetensors")
    tensor_files.write(directory / "model.safetensors",
                       [(k, stored.shape(k), stored.dtype(k), lambda k=k: np.nextafter(stored.read(k), np.inf))
                        for k in stored.keys()])
    return directory


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in storage.path(str(run_dir)).joinpath("metrics.jsonl").read_text().splitlines()]


def _export_bytes(run_dir) -> dict:
    hf = storage.path(str(run_dir)) / "hf"
    return {name: storage.read_bytes(hf / name) for name in storage.files_under(hf)}


def test_orbax_and_tensorstore_work_against_the_emulator(bucket):
    """The libraries themselves, before the run uses them: orbax saves and restores a sharded state
    in the bucket; tensorstore reads a block of an array it wrote there."""
    import jax
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from etils import epath
    mesh = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[:4])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    state = {"w": jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4), sharding), "step": np.int32(3)}
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(epath.Path("gs://bkt/probe/ckpt"), options=options) as manager:
        manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    assert "probe/ckpt/3/commit_success.txt" in " ".join(gcs.filesystem().find("bkt/probe"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)
    with ocp.CheckpointManager(epath.Path("gs://bkt/probe/ckpt"), options=options) as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    assert np.array_equal(np.asarray(restored["state"]["w"]), np.asarray(state["w"]))
    assert restored["state"]["w"].sharding == sharding
    array = ts.open({"driver": "zarr", "kvstore": "gs://bkt/probe/array"}, create=True, dtype=ts.float32,
                    shape=[6, 5]).result()
    array.write(np.arange(30, dtype=np.float32).reshape(6, 5)).result()
    assert array[2:4, 1:3].read().result().tolist() == [[11, 12], [16, 17]]


def test_bucket_run_killed_and_resumed_exports_what_the_local_run_does(bucket, local_runs):
    local, _ = local_runs
    settings = run_settings(bucket, **STEPS)
    out = "gs://bkt/runs/killed"
    proc = subprocess.Popen(cli_command(*cli_args(settings), f"--output_dir={out}"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs, deadline = gcs.filesystem(), time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        fs.invalidate_cache()
        if fs.exists("bkt/runs/killed/checkpoints/4/commit_success.txt"):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not fs.exists("bkt/runs/killed/hf/config.json"), "the run should have been killed before its export"
    assert fs.exists("bkt/runs/killed/.lock")  # a killed run leaves its lock; its dead pid frees it

    resumed = run_cli(*cli_args(settings), f"--output_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    line = READ_LINE.search(resumed.stderr)
    assert line and float(line[2]) < float(line[3]), resumed.stderr[-2000:]  # layers 0..3 and the embedding only
    assert [m["step"] for m in _metrics(out)] == list(range(6))
    for a, b in zip(_metrics(out), _metrics(local)):
        assert all(a[k] == b[k] for k in logged(a, b, COMPARED)), (a, b)
    assert _export_bytes(out) == _export_bytes(local)  # every file of the export, byte for byte
    assert not fs.exists("bkt/runs/killed/.lock")  # released at the end
    assert storage.files_under("gs://bkt/runs/killed/tb")  # TensorBoard's event files are in the bucket


def test_two_processes_on_a_bucket_give_the_run_of_one_and_read_only_their_shards(bucket, local_runs, tmp_path):
    local, nudged = local_runs
    out = "gs://bkt/runs/two"
    port = gcs.free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    logs = [tmp_path / f"process{i}.log" for i in range(2)]  # files, not pipes: a full pipe would stall a process
    procs = [subprocess.Popen(cli_command(*cli_args(run_settings(bucket, **STEPS)), f"--output_dir={out}",
                                          f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                          f"--process_id={i}"),
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=logs[i].open("w"))
             for i in range(2)]
    results = [(p.wait(timeout=400), log.read_text()) for p, log in zip(procs, logs)]
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    reads = {int(m[1]): (float(m[2]), int(m[4])) for _, stderr in results for m in READ_LINE.finditer(stderr)}
    single = one_process_reads(bucket) / 1e6
    assert sorted(reads) == [0, 1]
    for process, (mb, requests) in reads.items():  # each process its half of the sharded tensors
        assert requests > 0
        assert mb < 0.7 * single, (process, mb, single)
    ref, drift = _metrics(local), _metrics(nudged)
    for a, b, c in zip(_metrics(out), ref, drift):
        for key in logged(a, b, COMPARED):
            assert abs(a[key] - b[key]) <= drift_bound(b[key], c[key], 1e-6, what=f"step {a['step']} {key}",
                                                   key=key), (a["step"], key)
    two, one = StoredTensors(storage.path(out) / "hf" / "model.safetensors"), StoredTensors(local / "hf" / "model.safetensors")
    other = StoredTensors(nudged / "hf" / "model.safetensors")
    for key in one.keys():
        if "down_proj" in key:
            scale = drift_bound(one.read(key), other.read(key), 1e-6, what=key)
            assert np.abs(two.read(key) - one.read(key)).max() <= scale, key
        else:
            assert np.array_equal(two.read(key), one.read(key)), key


def one_process_reads(bucket) -> int:
    """The bytes one process with 4 devices reads of the checkpoint for the same run (layers 0..3)."""
    from armu_jax import sharding
    from armu_jax.hf_io import load_hf
    before = storage.READS.bytes
    load_hf(bucket, upto_layer=3, mesh=sharding.make_mesh("fsdp:4"))
    return storage.READS.bytes - before


def test_sweep_and_eval_write_to_the_bucket(bucket, tmp_path, tiny_llama):
    from armu_jax.evaluate import evaluate_cli
    from armu_jax.sweep import sweep_cli
    settings = run_settings(bucket, max_num_batches=2, checkpoint_every=0)
    rows = sweep_cli(config_with(**settings, mode="sweep", sweep_layers="3", sweep_methods=["adaptive_rmu"],
                                 eval_tasks=["demo_bio"], eval_limit=4, eval_nll_tokens=16,
                                 output_dir="gs://bkt/sweep"))
    assert [r["status"] for r in rows] == ["ok"]
    names = storage.files_under("gs://bkt/sweep")
    assert {"sweep.csv", "sweep.md", "sweep.png", "sweep_flags.txt", "original.json"} <= set(names)
    assert any(n.startswith("cells/l03_adaptive_rmu") and n.endswith("result.json") for n in names)
    assert ".lock" not in names
    row = json.loads(storage.path("gs://bkt/sweep").joinpath(
        next(n for n in names if n.endswith("result.json"))).read_text())
    assert row["forget_acc"] == rows[0]["forget_acc"]

    # --mode=eval of the model in the bucket, written to the bucket: the numbers of the same model on disk
    for model, out in ((bucket, "gs://bkt/eval"), (str(tiny_llama), str(tmp_path / "eval"))):
        evaluate_cli(config_with(mode="eval", model=model, eval_tasks=["demo_bio"], eval_limit=4, eval_nll_tokens=16,
                                 output_dir=out))
    remote = json.loads(storage.path("gs://bkt/eval/eval.json").read_text())["results"]["demo_bio"]
    local = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]["demo_bio"]
    assert remote["acc"] == local["acc"] and remote["nll"] == local["nll"]
    original = json.loads(storage.path("gs://bkt/sweep/original.json").read_text())["demo_bio"]
    assert original["acc"] == local["acc"]


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A storage endpoint that refuses every request's credentials (401), as GCS does a bad token."""

    def do_GET(self):
        body = json.dumps({"error": {"code": 401, "message": "Request is missing required authentication credential."}})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_bad_bucket_inputs_are_one_line_each(bucket, monkeypatch):
    from armu_jax import outputs
    fs = gcs.filesystem()
    before = fs.find("bkt")
    cases = {"gs:///run": "names no bucket", "s3://bkt/run": "s3:// is not supported",
             "gs://nobucket/run": "bucket nobucket does not exist"}
    for url, message in cases.items():
        with pytest.raises(UserError, match=message):
            outputs.claim(url)
    # A bucket path that holds another run: refused by the command, exit 2, one line.
    taken = run_cli(*cli_args(run_settings(bucket)), "--output_dir=gs://bkt/runs/killed")
    assert taken.returncode == 2 and "exists and is not empty" in taken.stderr.strip().splitlines()[-1]
    missing = run_cli(*cli_args(run_settings("gs://nobucket/model")), "--output_dir=gs://bkt/new")
    assert missing.returncode == 2 and "bucket nobucket does not exist" in missing.stderr.strip().splitlines()[-1]
    fs.invalidate_cache()
    assert fs.find("bkt") == before  # nothing written

    server = http.server.ThreadingHTTPServer(("localhost", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        refused = run_cli(*cli_args(run_settings(bucket)), "--output_dir=gs://bkt/new",
                          env={"STORAGE_EMULATOR_HOST": f"http://localhost:{server.server_port}"})
    finally:
        server.shutdown()
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "refused the credentials" in refused.stderr.strip().splitlines()[-1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://localhost:{gcs.free_port()}")
    with pytest.raises(UserError, match="cannot reach the storage endpoint"):
        outputs.claim("gs://bkt/new")


def test_lock_object_excludes_a_second_run_and_frees_a_dead_ones(bucket, monkeypatch):
    lock = storage.lock(storage.path("gs://bkt/locked"), "--output_dir gs://bkt/locked")
    with pytest.raises(UserError, match="in use by another run"):
        storage.lock(storage.path("gs://bkt/locked"), "--output_dir gs://bkt/locked")
    lock.release()
    fs = gcs.filesystem()
    assert not fs.exists("bkt/locked/.lock")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs, on this host: its lock is stale
    fs.pipe_file("bkt/locked/.lock", json.dumps({"host": os.uname().nodename, "pid": dead.pid, "time": time.time()}).encode())
    storage.lock(storage.path("gs://bkt/locked"), "x").release()
    fs.pipe_file("bkt/locked/.lock", json.dumps({"host": "elsewhere", "pid": 1, "time": time.time() - 3600}).encode())
    storage.lock(storage.path("gs://bkt/locked"), "x").release()  # silent for an hour: its host is gone
    # Two runs that both saw no lock: the create carries ifGenerationMatch=0, and the store refuses it
    # (HTTP 412) for the second, whose lock then fails in one line; the first's lock object is untouched.
    first = storage.lock(storage.path("gs://bkt/locked"), "x")
    held = fs.cat_file("bkt/locked/.lock")
    with pytest.raises(FileExistsError):  # the precondition sent and honoured, on its own
        storage.filesystem().pipe_file("bkt/locked/.lock", b"{}", mode="create")
    monkeypatch.setattr(storage.filesystem(), "exists", lambda path, **kw: False)  # it saw no lock
    with pytest.raises(UserError, match="took the lock just now"):
        storage.lock(storage.path("gs://bkt/locked"), "x")
    monkeypatch.undo()
    assert fs.cat_file("bkt/locked/.lock") == held
    first.release()


def test_a_local_directory_other_hosts_cannot_see_is_refused(tmp_path, tiny_llama):
    """Each process in its own working directory, --output_dir relative: as workers with their own disks."""
    port = gcs.free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    cwds = [tmp_path / "host0", tmp_path / "host1"]
    procs = []
    for i, cwd in enumerate(cwds):
        cwd.mkdir()
        procs.append(subprocess.Popen(cli_command(*cli_args(run_settings(tiny_llama, mesh="fsdp:4")), "--output_dir=run",
                                                  f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                                  f"--process_id={i}"),
                                      cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=(cwd.parent / f"{i}.log").open("w")))
    for i, p in enumerate(procs):
        code, stderr = p.wait(timeout=300), (tmp_path / f"{i}.log").read_text()
        assert code == 2, stderr[-2000:]
        assert "is not visible to process 1" in stderr.strip().splitlines()[-1]
        assert "use a bucket" in stderr
    assert not (cwds[0] / "run").exists() and not (cwds[1] / "run").exists()  # nothing written, the token removed


def test_copy_a_directory_down_from_the_bucket_in_one_command(bucket, tmp_path, tiny_llama):
    """python -m armu_jax.storage cp gs://... DIR (what the README gives lm-eval users): every file, byte for byte;
    a target that holds files is refused."""
    from armu_jax.storage import main
    assert main(["storage", "cp", bucket, str(tmp_path / "down")]) == 0
    names = sorted(p.name for p in tiny_llama.iterdir())
    assert sorted(p.name for p in (tmp_path / "down").iterdir()) == names
    assert all((tmp_path / "down" / n).read_bytes() == (tiny_llama / n).read_bytes() for n in names)
    with pytest.raises(UserError, match="is not empty"):
        main(["storage", "cp", bucket, str(tmp_path / "down")])
