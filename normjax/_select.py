"""Which leaves a constraint touches (``where=``) and which axes form a unit (``axis=``)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

PyTree: TypeAlias = Any
Where: TypeAlias = (
    None | str | re.Pattern[str] | Callable[[str, Any], bool] | PyTree
)
"""Leaf selection: ``None`` (float leaves with ``ndim >= 2``), a regular expression
searched in the leaf's path ``"a/b/kernel"``, a callable ``(path, leaf) -> bool``, or a
pytree of bools shaped like (a prefix of) the parameters, as in ``optax.masked``."""

Axis: TypeAlias = (
    None | int | Sequence[int] | Callable[[str, Any], "int | Sequence[int] | None"]
)
"""Axes reduced to form one unit's norm: ``None`` (all but the last), an int, a tuple,
or a callable ``(path, leaf) -> axes`` giving a per-leaf rule."""


def path_str(path: Sequence[Any]) -> str:
    """Writes a ``jax.tree_util`` key path as ``"a/b/kernel"``.

    A trailing ``.value`` attribute (the array inside a Flax NNX ``Variable``) is
    dropped, so the same parameter has the same path whether or not it is wrapped.

    >>> import jax
    >>> [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path({"a": [1.0, {"b": 2.0}]})]
    ['a/0', 'a/1/b']
    """
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:  # pragma: no cover - future key types
            parts.append(str(k))
    if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        parts.pop()
    return "/".join(parts)


class Leaf(NamedTuple):
    """One parameter leaf with its path and whether the constraint applies to it."""

    path: str
    value: Any
    selected: bool


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _mask_leaves(where: PyTree, params: PyTree, name: str) -> list[bool]:
    """Broadcasts a (prefix) mask pytree onto params and returns one bool per leaf."""

    def expand(m, sub):
        return jax.tree.map(lambda _: m, sub)

    try:
        full = jax.tree.map(expand, where, params)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{name}: the where= mask does not match the structure of params "
            f"(it must have the same structure as params, or a prefix of it).\n"
            f"  mask:   {jax.tree.structure(where)}\n  params: {jax.tree.structure(params)}"
        ) from e
    out = []
    for p, m in jax.tree_util.tree_leaves_with_path(full):
        if isinstance(m, jax.core.Tracer):
            raise TypeError(f"{name}: where= mask entry at {path_str(p)!r} is a traced value; masks must be static bools")
        if not isinstance(m, (bool, np.bool_)) and not (
            hasattr(m, "dtype") and np.shape(m) == () and np.asarray(m).dtype == np.bool_
        ):
            raise TypeError(
                f"{name}: where= mask entry at {path_str(p)!r} is {m!r}; a mask holds Python bools"
            )
        out.append(bool(m))
    return out


def select(params: PyTree, where: Where, name: str) -> tuple[Any, list[Leaf]]:
    """Flattens ``params`` and decides, per leaf, whether the constraint applies.

    Returns the treedef and one :class:`Leaf` per array leaf. ``None`` leaves and
    ``optax.MaskedNode`` are empty subtrees, so they never appear and pass through.

    Raises:
      TypeError: a leaf that is not floating point was selected explicitly.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    values = [v for _, v in flat]
    explicit = where is not None
    if where is None:
        sel = [_is_float(v) and np.ndim(v) >= 2 for v in values]
    elif isinstance(where, (str, re.Pattern)):
        pattern = re.compile(where)
        sel = [pattern.search(p) is not None for p in paths]
    elif callable(where):
        sel = [bool(where(p, v)) for p, v in zip(paths, values)]
    else:
        sel = _mask_leaves(where, params, name)
    leaves = []
    for p, v, s in zip(paths, values, sel):
        if s and explicit and not _is_float(v):
            raise TypeError(
                f"{name}: leaf {p!r} (dtype {jnp.result_type(v)}, shape {np.shape(v)}) was selected by "
                f"where= but is not floating point; only float leaves can be constrained"
            )
        leaves.append(Leaf(p, v, s))
    return treedef, leaves


def resolve_axes(axis: Axis, path: str, leaf: Any, name: str) -> tuple[int, ...]:
    """Normalises ``axis=`` for one leaf into a sorted tuple of non-negative axes.

    >>> import numpy as np
    >>> resolve_axes(None, "conv/kernel", np.zeros((3, 3, 4, 8)), "max_norm")
    (0, 1, 2)
    >>> resolve_axes(-1, "embed/embedding", np.zeros((10, 4)), "max_norm")
    (1,)
    """
    ndim = np.ndim(leaf)
    shape = np.shape(leaf)
    if callable(axis):
        axis = axis(path, leaf)
    if axis is None:
        if ndim < 2:
            raise ValueError(
                f"{name}: leaf {path!r} has shape {shape}; axis=None reduces all axes but the last, "
                f"which leaves no axis to reduce for a leaf with ndim < 2. Pass axis= explicitly "
                f"(axis=0 bounds a whole vector) or leave this leaf out with where="
            )
        return tuple(range(ndim - 1))
    return normalize_axes(axis, ndim, path, shape, "axis", name)


def normalize_axes(axes: Any, ndim: int, path: str, shape: tuple[int, ...], label: str, name: str) -> tuple[int, ...]:
    """An int or a sequence of ints as sorted non-negative axes of a leaf, with errors naming it."""
    given = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    out = []
    for a in given:
        if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
            raise TypeError(f"{name}: {label}= must hold ints, got {a!r} for leaf {path!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}: {label} {a} is out of range for leaf {path!r} of shape {shape} (ndim {ndim})")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: {label}={given} repeats an axis for leaf {path!r} of shape {shape}")
    return tuple(sorted(out))


def is_concrete(x: Any) -> bool:
    """True when ``x`` has a value now (not a tracer inside jit or inject_hyperparams)."""
    return not isinstance(x, jax.core.Tracer)


def check_scalar(
    value: Any,
    argname: str,
    name: str,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    unit_interval: bool = False,
) -> None:
    """Validates a hyperparameter when its value is known (skipped for tracers)."""
    if not is_concrete(value):
        return
    if isinstance(value, (str, bytes)) or np.ndim(value) != 0:
        raise TypeError(f"{name}: {argname} must be a real scalar, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: {argname} must be a real number, got {value!r}") from e
    if not math.isfinite(v):
        raise ValueError(f"{name}: {argname} must be finite, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{name}: {argname} must be > 0, got {v}")
    if nonnegative and not v >= 0:
        raise ValueError(f"{name}: {argname} must be >= 0, got {v}")
    if unit_interval and not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: {argname} must lie in [0, 1], got {v}")


class MatrixDims(NamedTuple):
    """Which axes of an N-d leaf form the rows and the columns of its matrix.

    Every axis in neither is a batch axis: each batch index is its own matrix with its own
    sigma (layers stacked for ``scan``, attention heads). Negative axes count from the end;
    the order of axes within ``in_axes`` or ``out_axes`` does not change any singular value.

    >>> MatrixDims(in_axes=-2, out_axes=-1)                 # (L, in, out): one sigma per layer
    MatrixDims(in_axes=-2, out_axes=-1)
    >>> MatrixDims(in_axes=0, out_axes=(1, 2))              # (d_model, heads, head_dim) as one matrix
    MatrixDims(in_axes=0, out_axes=(1, 2))
    """

    in_axes: int | Sequence[int]
    out_axes: int | Sequence[int]


Dims: TypeAlias = Any
"""View of a leaf for the spectral constraints: ``None`` (rows = all axes but the last,
columns = the last), a :class:`MatrixDims`, a ``ConvSpec`` (the leaf is a convolution
kernel), a mapping ``{regex: view}`` searched in the leaf's path, or a callable
``(path, leaf) -> view``."""


class ResolvedDims(NamedTuple):
    """A validated matrix view of one leaf: sorted non-negative axes."""

    batch: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]


def resolve_dims(dims: Dims, path: str, leaf: Any, name: str) -> ResolvedDims:
    """Validates ``dims=`` for one leaf.

    >>> import numpy as np
    >>> resolve_dims(None, "conv/kernel", np.zeros((3, 3, 4, 8)), "spectral_norm")
    ResolvedDims(batch=(), rows=(0, 1, 2), cols=(3,))
    >>> resolve_dims(MatrixDims(-2, -1), "stack/kernel", np.zeros((6, 4, 8)), "spectral_norm")
    ResolvedDims(batch=(0,), rows=(1,), cols=(2,))
    """
    ndim, shape = np.ndim(leaf), np.shape(leaf)
    if callable(dims) and not isinstance(dims, MatrixDims):
        dims = dims(path, leaf)
    if dims is None:
        if ndim < 2:
            raise ValueError(
                f"{name}: leaf {path!r} has shape {shape}; a matrix view needs ndim >= 2 "
                f"(pass dims=MatrixDims(...) or leave this leaf out with where=)"
            )
        return ResolvedDims((), tuple(range(ndim - 1)), (ndim - 1,))
    if not isinstance(dims, MatrixDims):
        raise TypeError(f"{name}: dims= must be None, a MatrixDims or a callable, got {dims!r} for leaf {path!r}")

    def norm(axes, which):
        out = normalize_axes(axes, ndim, path, shape, f"MatrixDims.{which}", name)
        if not out:
            raise ValueError(
                f"{name}: {dims} leaves no {'row' if which == 'in_axes' else 'column'} axis for leaf {path!r}; "
                f"in_axes and out_axes must each name at least one axis"
            )
        return out

    rows, cols = norm(dims.in_axes, "in_axes"), norm(dims.out_axes, "out_axes")
    if set(rows) & set(cols):
        raise ValueError(
            f"{name}: {dims} overlaps: axes {sorted(set(rows) & set(cols))} are both rows and columns "
            f"for leaf {path!r} of shape {shape}"
        )
    batch = tuple(a for a in range(ndim) if a not in rows and a not in cols)
    return ResolvedDims(batch, rows, cols)
