# make demo / make test / make bench: each builds .venv with what it needs when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test bench clean

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

test: $(VENV)/.test-deps
	$(PY) -m pytest -q

bench: $(VENV)/.bench-deps
	$(PY) benchmarks/bench_maxnorm.py
	$(PY) benchmarks/bench_spectral.py
	$(PY) benchmarks/bench_conv.py
	$(PY) benchmarks/bench_certificate.py
	$(PY) benchmarks/bench_matmul.py
	$(PY) benchmarks/power_tracking.py

clean:
	rm -rf $(VENV) build *.egg-info
