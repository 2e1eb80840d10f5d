"""Shared helpers for the tests; jax flags are set once in the root conftest.py."""

import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest


def np_unit_norms(w, axes):
    """Float64 NumPy reference of every unit's L2 norm (keepdims)."""
    x = np.asarray(w, np.float64)
    return np.sqrt(np.sum(x * x, axis=tuple(axes), keepdims=True))


def np_band(w, axes, lo, hi, rate=1.0):
    """Float64 closed form of the max/min-max/unit-norm projections (Keras's rate meaning)."""
    x = np.asarray(w, np.float64)
    n = np_unit_norms(x, axes)
    lo = 0.0 if lo is None else lo
    target = rate * np.clip(n, lo, hi) + (1 - rate) * n
    scale = np.where(n > 0, target / np.where(n > 0, n, 1), 1.0)
    return x * scale


@pytest.fixture
def full_optimization():
    """XLA's full optimisation for one test, as a user's training step compiles: the root
    conftest.py turns most of it off for the session (JAX_DISABLE_MOST_OPTIMIZATIONS: compile
    time), which leaves the HLO alone but changes the machine code LLVM emits. The guarantee
    tests (test_guarantees.py, test_max_norm.py), test_conv.py's training-step tests and the
    TPU compile checks (test_tpu_aot.py) run with it, so their bit-for-bit, margin and
    compiled-program checks hold for the code users run.

    The flag is not part of jax's jit cache key: a library function called eagerly with the
    same shapes by an earlier, unoptimised test keeps that executable here. The programs these
    tests build themselves (their jitted steps) compile fresh. Clearing the caches on every
    switch made test_guarantees.py and test_max_norm.py take twice as long (67 -> 133 s)."""
    from jax._src import compiler  # the flag's current value: jax.config has no getter for it

    old = compiler._DISABLE_MOST_OPTIMIZATIONS.value
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


# a subprocess script of test_multiprocess.py (it joins a jax.distributed run at import)
collect_ignore = ["_multiprocess_worker.py"]


# --------------------------------------------------------------------------------------------
# tests/test_examples.py: its example scripts run in the background while the other tests run.
# --------------------------------------------------------------------------------------------

EXAMPLES = "test_examples.py"
_examples = {}  # "runs": the module's ExampleRuns, "dir": where their outputs go


def pytest_collection_modifyitems(session, config, items):
    """test_examples.py runs last, so that its scripts (started with the tests) have had the
    whole session to run beside the other tests; the order within each part is kept."""
    items[:] = [item for item in items if item.path.name != EXAMPLES] + [item for item in items if item.path.name == EXAMPLES]


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """Starts the selected examples (each a process of its own) before the first test runs."""
    if session.config.option.collectonly:
        return
    module = next((item.module for item in session.items if item.path.name == EXAMPLES), None)
    scripts = module.selected_scripts(session.items) if module is not None else []
    if scripts:
        _examples["dir"] = Path(tempfile.mkdtemp(prefix="normjax-examples-"))
        _examples["runs"] = module.start_in_background(scripts, _examples["dir"])


def pytest_sessionfinish(session):
    if "runs" in _examples:
        _examples.pop("runs").stop()
        shutil.rmtree(_examples.pop("dir"), ignore_errors=True)
