"""A local GCS for the tests: gcp-storage-emulator (the JSON API on localhost, objects in memory;
tests/gcs_emulator.py adds the generation headers of a download that tensorstore needs),
started and stopped by the tests; the clients follow it through STORAGE_EMULATOR_HOST
(google-cloud-storage, gcsfs) and TENSORSTORE_GCS_HTTP_URL (tensorstore, and so orbax). Nothing
reaches the internet."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

EMULATOR = [sys.executable, str(Path(__file__).with_name("gcs_emulator.py"))]  # the emulator, two headers added


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env_for(url: str) -> dict:
    """The variables that point every client at the endpoint url."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "test", "NO_GCE_CHECK": "true"}


@contextmanager
def emulator(buckets=("bkt",)):
    """A running emulator with the given buckets; yields its URL, with this process's environment
    pointed at it (and put back after)."""
    port = free_port()
    proc = subprocess.Popen([*EMULATOR, "start", "--port", str(port), "--in-memory", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://localhost:{port}"
    saved = {k: os.environ.get(k) for k in env_for(url)}
    os.environ.update(env_for(url))
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.1)
        fs = filesystem()
        for bucket in buckets:
            fs.mkdir(bucket)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import gcsfs
        gcsfs.GCSFileSystem.clear_instance_cache()


def filesystem():
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()  # a new endpoint: no instance built for the last one
    from armu_jax import storage
    return storage.filesystem()


def upload(local: Path, url: str) -> str:
    """A local directory's files put under gs:// url; returns url."""
    fs = filesystem()
    for item in sorted(Path(local).rglob("*")):
        if item.is_file():
            fs.put_file(str(item), f"{url[5:]}/{item.relative_to(local)}")
    return url
