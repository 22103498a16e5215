"""Run a module as a process of another host that shares this one's filesystem, where flock does not reach from
host to host (NFS without its lock daemon, Lustre without -o flock, a FUSE mount): socket.gethostname() says
$ARMU_TEST_HOST and flock locks nothing; $ARMU_TEST_LOCK_LEASE_S shortens the lock's lease.

    python tests/other_host.py armu_jax.main --output_dir=...     (the module's arguments follow)
    python tests/other_host.py script.py ARGS...
"""
import fcntl
import os
import runpy
import socket
import sys

socket.gethostname = lambda: os.environ.get("ARMU_TEST_HOST", "another-host")
fcntl.flock = lambda fd, operation: None

if os.environ.get("ARMU_TEST_LOCK_LEASE_S"):
    from armu_jax import storage
    storage.LOCK_LEASE_S = float(os.environ["ARMU_TEST_LOCK_LEASE_S"])

target, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
