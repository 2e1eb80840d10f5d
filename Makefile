# make demo / make test / make bench: each builds .venv with what it needs when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test bench tpu-check tpu-bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.test-deps: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e '.[test,examples]'
	touch $@

$(VENV)/.bench-deps: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e '.[test,examples,bench]'
	touch $@

demo: $(VENV)/.test-deps
	$(PY) examples/maxnorm_digits.py
	$(PY) examples/spectral_digits.py
	$(PY) examples/conv_digits.py
	$(PY) examples/equinox_cnn.py
	$(PY) examples/nnx_attention.py
	$(PY) examples/lipschitz_vit.py

test: $(VENV)/.test-deps
	$(PY) tests/parallel.py

bench: $(VENV)/.bench-deps
	$(PY) benchmarks/bench_maxnorm.py
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/bench_spectral.py
	$(PY) benchmarks/bench_conv.py
	$(PY) benchmarks/bench_certificate.py
	$(PY) benchmarks/bench_matmul.py
	$(PY) benchmarks/power_tracking.py

# make tpu-check: compile every update step for one TPU v5e chip on this CPU-only machine and
# check what it compiled to (tests/test_tpu_aot.py; about 30 s on 2 cores); make tpu-bench then
# records compile time, memory_analysis() and cost_analysis() of each (benchmarks/tpu_aot.py,
# which rewrites its RESULTS.md block). libtpu (a ~210 MB wheel; the version jax's `tpu` extra
# pins for the installed jax) goes to its own folder, not site-packages: importable, it is
# loaded by every jax process that does not set JAX_PLATFORMS=cpu (make demo, make bench),
# which then logs TPU errors and holds /tmp/libtpu_lockfile. TPU_LIBRARY_PATH points jax at
# it; an importable libtpu (pip install 'jax[tpu]') works too. Only one process can load
# libtpu at a time. TPU_AOT_ARGS passes options to the benchmark, e.g.
# make tpu-bench TPU_AOT_ARGS='--timeout 300'.
TPU_AOT_ARGS ?=
LIBTPU_DIR := $(VENV)/libtpu-aot
LIBTPU_PIN = $(PY) -c "import importlib.metadata as m; print(next(r.split(';')[0].strip() for r in m.requires('jax') if r.startswith('libtpu') and 'tpu' in r.split(';')[1]))"
TPU_ENV = TPU_LIBRARY_PATH=$(abspath $(LIBTPU_DIR))/libtpu/libtpu.so

$(VENV)/.libtpu-aot: $(VENV)/.test-deps
	rm -rf $(LIBTPU_DIR)
	$(PIP) install --no-deps --target $(LIBTPU_DIR) "$$($(LIBTPU_PIN))"
	touch $@

tpu-check: $(VENV)/.test-deps $(VENV)/.libtpu-aot
	$(TPU_ENV) $(PY) -m pytest -q -m tpu_aot tests/test_tpu_aot.py

# make tpu-bench: compile time, memory_analysis() and cost_analysis() of every step for v5e,
# written to benchmarks/RESULTS.md (benchmarks/tpu_aot.py)
tpu-bench: $(VENV)/.test-deps $(VENV)/.libtpu-aot
	$(TPU_ENV) $(PY) benchmarks/tpu_aot.py $(TPU_AOT_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
