"""Test set-up: 8 fake CPU devices for mesh tests (added to any XLA_FLAGS given, e.g. a baseline ISA),
everything offline."""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# CPU only, also with libtpu installed: a process that initialises libtpu holds its machine-wide
# lock, and the TPU compile test's own process needs it (get_topology_desc works without it).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    from armu_jax.embedded import smollm2_dir as build
    return build()
