"""Process set-up shared by every command: offline Hugging Face libraries and the XLA compilation cache."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os

from armu_jax.errors import UserError
from armu_jax.shipped import cache_dir

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def has_tpu() -> bool:
    """A TPU is attached: its device files (/dev/accel* on v2-v4 and v5e, /dev/vfio/N on v5p and v6e) or
    TPU_ACCELERATOR_TYPE (set on TPU VMs)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                or os.environ.get("TPU_ACCELERATOR_TYPE"))


def has_gpu() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/dri/renderD*") and glob.glob("/dev/kfd"))


def choose_platforms() -> None:
    """JAX_PLATFORMS=cpu on a machine with neither TPU nor GPU (cuda,cpu on an NVIDIA machine with jax's
    CUDA 12 or CUDA 13 plugin), unless the user set it. With libtpu
    installed (for the compile reports) jax would otherwise initialise it at the first device query:
    warnings about the accelerator type, an E0000 TPU_WORKER_HOSTNAMES error line, and libtpu's
    machine-wide lock held for the whole process (a --mode=compile --topology beside it then fails).
    Compiling for a TPU topology does not need the TPU platform (compile_report.topology_devices)."""
    if "JAX_PLATFORMS" in os.environ or has_tpu():
        return
    if not has_gpu():
        os.environ["JAX_PLATFORMS"] = "cpu"
    elif glob.glob("/dev/nvidia[0-9]*") and _installed("jax_plugins.xla_cuda12", "jax_cuda12_plugin",
                                                       "jax_plugins.xla_cuda13", "jax_cuda13_plugin"):
        os.environ["JAX_PLATFORMS"] = "cuda,cpu"  # the GPU, and never libtpu


def _installed(*modules: str) -> bool:
    import importlib.util  # the mode's module is imported only when it runs
    for name in modules:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:
            continue
    return False


def go_offline() -> None:
    """Nothing is ever downloaded from a hub: transformers, datasets and lm-eval read local files only."""
    os.environ.update(OFFLINE)


def load_cached_dataset(name: str, config: str | None, split: str, what: str, fix: str):
    """A Hugging Face dataset from the local cache only; one error line (what, fix) when it is not there."""
    go_offline()
    try:
        import datasets  # heavy: only to switch it offline when loaded
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # datasets raises many types when offline and uncached
        raise UserError(f"{what}: {name} is not in the local Hugging Face datasets cache and nothing is "
                        f"downloaded ({type(err).__name__}); {fix}") from None


def enable_compilation_cache() -> None:
    """Persist XLA compilations under the cache dir (or $ARMU_XLA_CACHE): a rerun skips recompiling the same
    shapes (it still traces them and loads the programs). Programs that compiled in under a second are not kept
    ($ARMU_XLA_CACHE_MIN_SECONDS: the test suite keeps every one, its tiny models' programs recur)."""
    import jax  # jax loads only once the flags are good (a bad flag fails in 0.1 s)

    jax.config.update("jax_compilation_cache_dir", os.environ.get("ARMU_XLA_CACHE") or str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("ARMU_XLA_CACHE_MIN_SECONDS", "1.0")))


_TRIMMING = []
trims = [0]  # compilations seen by the listener, each followed by a trim where glibc has one (tests)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (None elsewhere)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        return trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def trim_heap() -> None:
    """Hand the C heap's freed pages back to the system (glibc's malloc_trim; nothing elsewhere): after a
    compilation, and after each attack of --mode=attack (a relearning step's XLA buffers, 0.5 GB on SmolLM2,
    stayed resident once freed)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_memory_after_compiles() -> None:
    """After every XLA compilation, hand the C heap's freed pages back to the system (glibc's malloc_trim).

    XLA's CPU compiler (LLVM) allocates and frees hundreds of MB per program; glibc keeps the freed pages,
    so a run's resident memory grew by each compile's leftovers and its peak was leftovers plus the step's
    buffers. Measured on the bench's step (SmolLM2, 512 tokens): 170-235 MB returned after each compile.
    Called once per process (main, the demo, the bench's JAX side); nothing happens without glibc."""

    import jax  # jax loads only once the flags are good (a bad flag fails in 0.1 s)
    if _TRIMMING:
        return

    def after(event: str, _seconds: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            trim_heap()
            trims[0] += 1
    jax.monitoring.register_event_duration_secs_listener(after)
    _TRIMMING.append(after)


COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_seconds",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_seconds",
                  "/jax/core/compile/backend_compile_duration": "compile_seconds"}
STEP_PROGRAMS = ("unlearning_step", "retain_side")  # the unlearning step's programs (step.make_step)
_COUNTS = {"programs": 0, "step_programs": 0, "cache_hits": 0, "trace_seconds": 0.0, "lower_seconds": 0.0,
           "compile_seconds": 0.0}


def count_compiles() -> None:
    """Count this process's XLA programs from jax.monitoring's events (once per process; compile_counts
    reads them): every backend compilation (a persistent-cache hit included: it still traces, lowers and
    loads), the unlearning step's among them, the cache hits, and the seconds of each stage."""
    import jax  # jax loads only once the flags are good (a bad flag fails in 0.1 s)
    if _COUNTS.get("listening"):
        return
    _COUNTS["listening"] = True

    def duration(event: str, seconds: float, **kwargs):
        key = COMPILE_EVENTS.get(event)
        if key is None:
            return
        _COUNTS[key] += seconds
        if key == "compile_seconds":
            _COUNTS["programs"] += 1
            name = str(kwargs.get("fun_name", ""))
            _COUNTS["step_programs"] += any(p in name for p in STEP_PROGRAMS)

    def event(name: str, **_):
        if name == "/jax/compilation_cache/cache_hits":
            _COUNTS["cache_hits"] += 1
    jax.monitoring.register_event_duration_secs_listener(duration)
    jax.monitoring.register_event_listener(event)


def compile_counts() -> dict:
    """The counts so far (count_compiles): subtract two readings for what happened between them."""
    return {k: v for k, v in _COUNTS.items() if k != "listening"}


def compile_delta(since: dict) -> dict:
    """What compiled since the reading `since`: programs, the step's, cache hits, and the seconds (rounded)."""
    now = compile_counts()
    return {k: round(now[k] - since[k], 2) if isinstance(now[k], float) else now[k] - since[k] for k in now}


def describe_compiles(delta: dict) -> str:
    seconds = delta["trace_seconds"] + delta["lower_seconds"] + delta["compile_seconds"]
    return (f"{delta['programs']} programs ({delta['step_programs']} of the unlearning step; "
            f"{delta['cache_hits']} loaded from the compilation cache) in {seconds:.1f} s of tracing, lowering "
            f"and compiling")
