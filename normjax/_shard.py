"""Sharding: the spectral estimators under meshes with *explicit* axis types.

Under explicit axis types (``jax.make_mesh``'s default since jax 0.7) every operation must
say how its output is sharded, and some cannot: a contraction over an axis sharded on both
operands (power iteration on a row- or column-sharded kernel, a Gram product) is ambiguous,
and ``jnp.linalg.svd`` refuses a matrix sharded on its own axes. The estimators therefore run
their body in auto (GSPMD) mode, where XLA's partitioner picks the same all-reduces and the
same gather before an SVD that an auto mesh gets, and their outputs come back with explicit
shardings chosen here: a result shaped like an input keeps that input's sharding, and a
per-matrix value (sigma, shape ``batch_shape``) is sharded like the kernel's batch axes.
Under an auto mesh, or no mesh, the body runs as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P


def _explicit(mesh: Any) -> bool:
    return mesh is not None and not mesh.empty and any(t == AxisType.Explicit for t in mesh.axis_types)


def explicit_mesh(args: tuple = ()) -> Any:
    """The explicit mesh the computation runs under, or ``None``.

    The context's (``jax.set_mesh``) when it has an ``Explicit`` axis; else, when the arrays
    carry explicit shardings without a mesh context (arrays put on an explicit mesh, then
    passed to a jitted function), the abstract mesh of their type.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if _explicit(mesh):
        return mesh
    if not mesh.empty:
        return None  # an auto mesh context: GSPMD decides
    for a in args:
        arg_mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
        arg_mesh = getattr(arg_mesh, "abstract_mesh", arg_mesh)  # a concrete Mesh -> its abstract one
        if _explicit(arg_mesh):
            return arg_mesh
    return None


def spec_of(x: Any) -> tuple:
    """The partition spec of ``x``'s type, one entry per axis (``None`` where unsharded)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = tuple(getattr(sharding, "spec", None) or ())
    return spec + (None,) * (x.ndim - len(spec))


def batch_spec(w: Any, batch_axes: Sequence[int]) -> P:
    """The spec of a ``batch_shape`` result of ``w``: its batch axes' entries, in order."""
    spec = spec_of(w)
    return P(*(spec[a] for a in batch_axes))


def like(x: Any) -> P:
    """The spec of an output that keeps ``x``'s sharding."""
    return P(*spec_of(x))


def auto_where_explicit(fn: Callable[..., Any], args: tuple, out_specs: Callable[[], Any]) -> Any:
    """``fn(*args)``, traced in auto mode with outputs resharded to ``out_specs()`` under an
    explicit mesh; plain ``fn(*args)`` otherwise. ``args`` are arrays."""
    mesh = explicit_mesh(args)
    if mesh is None:
        return fn(*args)
    with contextlib.ExitStack() as stack:
        if jax.sharding.get_abstract_mesh().empty:  # explicit arrays, no mesh context: enter theirs
            stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
        return jax.sharding.auto_axes(fn, out_sharding=out_specs())(*args)
