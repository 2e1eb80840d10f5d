"""Shared helpers for the tests; jax flags are set once in the root conftest.py."""

import numpy as np


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

# a subprocess script of test_multiprocess.py (it joins a jax.distributed run at import)
collect_ignore = ["_multiprocess_worker.py"]
