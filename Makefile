# Two entry points for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Test processes: one per core (tests are dominated by single-threaded XLA compiles); files stay
# whole on one worker so module fixtures run once. PYTEST_WORKERS=0 runs in this process.
PYTEST_WORKERS ?= auto

.PHONY: demo test test-aot compile-sweep venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/compare_digits.py $(DEMO_ARGS)

test: venv
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Compiles the kernels and examples for TPU (v5e, v6e, v5p) and H100 targets without the
# devices: installs the `aot` extra (libtpu and the CUDA plugin for the venv's jax, ~1.2 GB)
# into $(VENV) and runs the tests marked `aot`. GPU targets also need ptxas (CUDA >= 12.8) on PATH.
$(VENV)/.aot-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,aot]"
	touch $@

test-aot: $(VENV)/.aot-installed
	$(PY) -m pytest -m aot $(PYTEST_ARGS)

# The full compile sweep (every kernel x target x configuration); see benchmarks/RESULTS.md.
compile-sweep: $(VENV)/.aot-installed
	$(PY) benchmarks/compile_sweep.py $(SWEEP_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
