"""Test set-up: 8 fake CPU devices for mesh tests (added to any XLA_FLAGS given, e.g. a baseline ISA),
everything offline; the model directories several modules use, built once per session.

Fixtures: smollm2_dir (the embedded SmolLM2-135M), gemma3_dir (the embedded Gemma-3-270M), tiny_llama
(a tiny random Llama with SmolLM2's tokenizer). Plain helpers (settings of a short run, the command
line, the metrics reader) are in helpers.py. Tests treat the shared directories as read-only."""
import os
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# CPU only, also with libtpu installed: a process that initialises libtpu holds its machine-wide
# lock, and the TPU compile test's own process needs it (get_topology_desc works without it).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the suite's processes (both workers, every CLI subprocess), kept with the
# checkout's pytest cache: the tiny models' programs recur across tests and compile once. Every program is kept
# (the CLI's default keeps those over a second). A program is found by its HLO's hash, so a test that patches
# the code it traces compiles its own.
os.environ.setdefault("ARMU_XLA_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla"))
os.environ.setdefault("ARMU_XLA_CACHE_MIN_SECONDS", "0")

import pytest  # noqa: E402

from armu_jax.runtime import enable_compilation_cache  # noqa: E402

enable_compilation_cache()


@pytest.fixture(scope="session")
def smollm2_dir():
    from armu_jax.shipped import smollm2_dir as build
    return build()


@pytest.fixture(scope="session")
def gemma3_dir():
    from armu_jax.shipped import gemma3_dir as build
    return build()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_dir):
    """A tiny random Llama (4 layers, 2 kv heads, seed 0) with SmolLM2's tokenizer and its vocabulary
    of 49152: the model of the runs in test_unlearning, test_run, test_failures, test_launch,
    test_attack, test_norms and test_sweep."""
    from helpers import tiny_hf_model, with_tokenizer
    return with_tokenizer(tiny_hf_model(tmp_path_factory.mktemp("tiny-llama"), "llama", 2, layers=4, vocab=49152),
                          smollm2_dir)


# The longest modules first (measured: `make test` prints the slowest tests). make test's two workers take
# whole modules (--dist loadscope) in collection order; collected alphabetically, the longest (the SmolLM2
# reference loops, ~6 min) started last and left the other worker idle at the end. Within a module, the
# file's own order.
LONGEST_FIRST = ("test_unlearning_smollm2.py", "test_multihost.py", "test_evaluate.py", "test_compile.py",
                 "test_tune.py", "test_failures.py", "test_unlearning.py", "test_sweep.py", "test_gemma.py",
                 "test_generate.py", "test_packing.py", "test_gpu_check.py", "test_shapes.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
