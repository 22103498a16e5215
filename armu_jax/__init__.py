"""armu_jax: RMU and Adaptive RMU unlearning in JAX/Flax."""
from armu_jax.runtime import choose_platforms as _choose_platforms

_choose_platforms()  # before anything imports jax: a machine without a TPU never initialises libtpu
