"""Pure projections over parameter pytrees: the same maths as the transforms, no state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from normjax._norms import band_project
from normjax._select import Axis, PyTree, Where, check_scalar, is_concrete, resolve_axes, select


def _map_units(
    params: PyTree,
    where: Where,
    axis: Axis,
    name: str,
    fn: Callable[[jax.Array, tuple[int, ...]], jax.Array],
) -> PyTree:
    treedef, leaves = select(params, where, name)
    out = [
        fn(leaf.value, resolve_axes(axis, leaf.path, leaf.value, name)) if leaf.selected else leaf.value
        for leaf in leaves
    ]
    return treedef.unflatten(out)


def project_max_norm(params: PyTree, max_value: Any, *, axis: Axis = None, where: Where = None) -> PyTree:
    r"""Projects every selected unit onto the L2 ball of radius ``max_value``.

    For each unit :math:`w` (the slice of a leaf over ``axis``),

    .. math:: w' = w \cdot \min\!\left(1, \frac{c}{\lVert w \rVert_2}\right),

    the Euclidean projection onto :math:`\{w : \lVert w \rVert_2 \le c\}`: the max-norm
    constraint of Srebro & Shraibman (2005) used with dropout by Srivastava et al. (2014).
    Units already inside come back unchanged bit for bit (Keras's ``MaxNorm`` divides by
    ``norm + epsilon`` and shrinks them slightly; this does not). Zero units stay zero.

    Args:
      params: a pytree of arrays.
      max_value: the radius ``c > 0``.
      axis: axes forming one unit. ``None``: all axes but the last, i.e. the fan-in vector
        of each output unit in Flax's ``(in, out)`` and ``(h, w, in, out)`` layouts (Keras's
        ``MaxNorm(axis=0)`` default bounds the wrong slices of a conv kernel: use
        ``axis=[0, 1, 2]`` there, or ``None`` here). ``-1`` on an embedding table bounds each
        row, as ``torch.nn.Embedding(max_norm=...)`` does. A callable ``(path, leaf) -> axes``
        gives a per-leaf rule.
      where: which leaves. ``None``: floating leaves with ``ndim >= 2`` (never biases or
        scales); a regex searched in the path ``"a/b/kernel"``; a callable
        ``(path, leaf) -> bool``; or a pytree of bools (optax's mask convention).

    Returns:
      ``params`` with every selected leaf projected; other leaves returned as they are.

    Example:

    >>> import jax.numpy as jnp, normjax as nj
    >>> params = {"w": jnp.array([[3.0, 0.1], [4.0, 0.2]]), "b": jnp.array([10.0, 10.0])}
    >>> out = nj.project_max_norm(params, 1.0)
    >>> out["w"]
    Array([[0.6, 0.1],
           [0.8, 0.2]], dtype=float32)
    >>> out["b"] is params["b"]
    True

    References:
      Srebro & Shraibman, "Rank, trace-norm and max-norm", COLT 2005.
      Srivastava et al., "Dropout: a simple way to prevent neural networks from
      overfitting", JMLR 2014.
    """
    name = "project_max_norm"
    check_scalar(max_value, "max_value", name, positive=True)
    return _map_units(params, where, axis, name, lambda w, ax: band_project(w, ax, None, max_value)[0])


def project_unit_norm(params: PyTree, *, axis: Axis = None, where: Where = None) -> PyTree:
    r"""Scales every selected non-zero unit to unit L2 norm: :math:`w' = w / \lVert w \rVert_2`.

    Zero units stay zero (their direction is undefined). ``axis`` and ``where`` as in
    :func:`project_max_norm`. Keras's ``UnitNorm`` divides by ``norm + epsilon``; this
    divides by the norm itself.

    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.project_unit_norm({"w": jnp.array([[3.0, 0.0], [4.0, 0.0]])})["w"]
    Array([[0.6, 0. ],
           [0.8, 0. ]], dtype=float32)
    """
    name = "project_unit_norm"
    return _map_units(params, where, axis, name, lambda w, ax: band_project(w, ax, 1.0, 1.0)[0])


def project_min_max_norm(
    params: PyTree,
    min_value: Any,
    max_value: Any,
    *,
    rate: Any = 1.0,
    axis: Axis = None,
    where: Where = None,
) -> PyTree:
    r"""Moves every selected unit's norm toward ``[min_value, max_value]`` (Keras ``MinMaxNorm``).

    With :math:`n = \lVert w \rVert_2` and rate :math:`r \in [0, 1]`,

    .. math:: w' = w \cdot \frac{r\,\mathrm{clip}(n, a, b) + (1 - r)\,n}{n},

    so ``rate=1`` is the exact projection onto the shell :math:`a \le n \le b` and a smaller
    rate moves each norm part of the way each time it is applied, as Keras's ``rate`` does.
    Units already inside the shell, and zero units, come back unchanged bit for bit.

    >>> import numpy as np, jax.numpy as jnp, normjax as nj
    >>> w = jnp.array([[3.0, 0.3], [4.0, 0.4]])           # unit norms 5.0 and 0.5
    >>> np.asarray(nj.project_min_max_norm({"w": w}, 1.0, 2.0)["w"], np.float64).round(4)
    array([[1.2, 0.6],
           [1.6, 0.8]])
    >>> out = nj.project_min_max_norm({"w": w}, 1.0, 2.0, rate=0.5)["w"]   # norms 3.5, 0.75
    >>> np.asarray(out, np.float64).round(4)
    array([[2.1 , 0.45],
           [2.8 , 0.6 ]])
    """
    name = "project_min_max_norm"
    _check_min_max(min_value, max_value, rate, name)
    return _map_units(
        params, where, axis, name, lambda w, ax: band_project(w, ax, min_value, max_value, rate)[0]
    )


def _check_min_max(min_value: Any, max_value: Any, rate: Any, name: str) -> None:
    check_scalar(min_value, "min_value", name, nonnegative=True)
    check_scalar(max_value, "max_value", name, positive=True)
    check_scalar(rate, "rate", name, unit_interval=True)
    if is_concrete(min_value) and is_concrete(max_value):
        if float(min_value) > float(max_value):
            raise ValueError(f"{name}: min_value ({float(min_value)}) > max_value ({float(max_value)})")
