# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export ARMU_CACHE ?= $(HOME)/.cache/armu_jax
# the test targets' pytest-xdist workers (0: the tests in one process)
TEST_WORKERS ?= 2

.PHONY: demo test test-fast lint docs test-portable setup bench clean

setup: $(STAMP)

# torch is pinned and installed first so pip takes the local CPU build, never a CUDA one.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m armu_jax.shipped --prepare
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.demo

# ruff first (a second, and it fails the suite when it fails), then the tests in two worker processes
# (pytest-xdist), a module at a time each (--dist loadscope: a module's shared fixture, a finished run or
# a study, is built once; the two TPU-topology compiles, one module, never hold libtpu's lock at once).
# TEST_WORKERS=0 runs them in this process.
test: $(STAMP)
	$(PY) -m ruff check armu_jax launch bench tests
	$(PY) -m pytest -q --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope) tests

# The fast tier (under two minutes here): every test without a slow mark (pyproject.toml's markers).
test-fast: $(STAMP)
	$(PY) -m ruff check armu_jax launch bench tests
	$(PY) -m pytest -q --durations=5 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope) \
	  -m "not (cli or multiprocess or gcs or tpu or reference or slow)" tests

# The numerical tests again with XLA's CPU code limited to a baseline ISA and without fast math:
# the float32 rounding of another CPU model, on this one.
test-portable: $(STAMP)
	XLA_FLAGS="--xla_cpu_max_isa=SSE4_2 --xla_cpu_enable_fast_math=false" \
	  $(PY) -m pytest -q tests/test_model.py tests/test_unlearning.py tests/test_unlearning_smollm2.py tests/test_run.py tests/test_evaluate.py

lint: $(STAMP)
	$(PY) -m ruff check armu_jax launch bench tests

# docs/flags.md is generated from armu_jax/config.py (a test fails when it is stale).
docs: $(STAMP)
	$(PY) -m armu_jax.config > docs/flags.md

bench: $(STAMP)
	$(PY) bench/first_run.py
	$(PY) bench/step_time.py
	$(PY) bench/eval_speed.py

clean:
	rm -rf .venv runs
