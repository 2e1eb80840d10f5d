"""Array-level norms: per-unit L2 norms and the band projection behind the max-norm family."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def acc_dtype(dtype: Any) -> np.dtype:
    """Dtype norms accumulate in: float64 for float64 leaves, float32 for everything else."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def unit_norms(w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    r"""L2 norm of every unit of ``w``: :math:`n = \sqrt{\sum_{i \in \text{axes}} w_i^2}`.

    Reduces ``axes`` with ``keepdims=True`` and accumulates in float32 (float64 for
    float64 input). The gradient is finite (zero) at a zero unit: the square root is only
    taken of strictly positive sums.

    >>> import jax.numpy as jnp
    >>> unit_norms(jnp.array([[3.0, 0.0], [4.0, 0.0]]), (0,))
    Array([[5., 0.]], dtype=float32)
    """
    w = jnp.asarray(w)
    x = w.astype(acc_dtype(w.dtype))
    sq = jnp.sum(x * x, axis=axes, keepdims=True)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1)), 0)


def band_project(
    w: jax.Array,
    axes: tuple[int, ...],
    min_value: Any | None,
    max_value: Any,
    rate: Any | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Moves every unit's norm into ``[min_value, max_value]``, keeping its direction.

    With :math:`n` the unit's L2 norm over ``axes`` and :math:`r` the rate,

    .. math::
       t = r\,\mathrm{clip}(n, a, b) + (1 - r)\,n, \qquad
       w' = \begin{cases} w\,t/n & n > 0,\ n \notin [a, b],\ r > 0 \\
                          w & \text{otherwise (bit for bit)} \end{cases}

    ``min_value=None`` means no lower bound and ``rate=None`` means 1, so
    ``band_project(w, axes, None, c)`` is the max-norm projection :math:`w \min(1, c/n)`.
    A zero unit stays zero (its direction is undefined).

    Returns ``(w_new, norms, moved)``: the projected array (dtype of ``w``), the norms
    before projection (keepdims, float32/float64) and a bool mask of the units moved.

    >>> import jax.numpy as jnp
    >>> w_new, n, moved = band_project(jnp.array([[3.0, 0.3], [4.0, 0.4]]), (0,), None, 1.0)
    >>> w_new
    Array([[0.6, 0.3],
           [0.8, 0.4]], dtype=float32)
    >>> moved
    Array([[ True, False]], dtype=bool)
    """
    w = jnp.asarray(w)
    n = unit_norms(w, axes)
    acc = n.dtype
    b = jnp.asarray(max_value, acc)
    if min_value is None:
        clipped = jnp.minimum(n, b)
        outside = n > b
    else:
        a = jnp.asarray(min_value, acc)
        clipped = jnp.clip(n, a, b)
        outside = (n > 0) & ((n < a) | (n > b))
    if rate is None:
        target, moved = clipped, outside
    else:
        r = jnp.asarray(rate, acc)
        target = r * clipped + (1 - r) * n
        moved = outside & (r > 0)
    scale = target / jnp.where(moved, n, 1)
    w_new = jnp.where(moved, (w.astype(acc) * scale).astype(w.dtype), w)
    return w_new, n, moved
