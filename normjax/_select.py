"""Which leaves a constraint touches (``where=``), path rules, and which axes form a unit or a matrix.

Paths are written ``"a/b/kernel"`` (:func:`path_str`). A string in ``where=`` or a key of a rule
mapping (``dims={regex: view}``) is a regular expression that must match a run of *whole path
components*: ``"Conv_1"`` matches ``"Conv_1/kernel"`` but not ``"Conv_10/kernel"``,
``"kernel"`` matches every ``.../kernel``, ``"Dense_.*"`` every dense layer, and ``"weight$"``
or ``"^enc/"`` work as anchors. A pattern that matches no leaf raises, naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from normjax._viewtypes import MatrixDims

PyTree: TypeAlias = Any
Where: TypeAlias = None | str | re.Pattern[str] | Callable[[str, Any], bool] | PyTree
"""Leaf selection: ``None`` (see :func:`default_selected`), a regular expression matched
against whole components of the leaf's path ``"a/b/kernel"``, a callable
``(path, leaf) -> bool``, or a pytree of bools shaped like (a prefix of) the parameters, as in
``optax.masked``."""

Axis: TypeAlias = None | int | Sequence[int] | Callable[[str, Any], "int | Sequence[int] | None"]
"""Axes reduced to form one unit's norm: ``None`` (all but the last), an int, a tuple,
or a callable ``(path, leaf) -> axes`` giving a per-leaf rule."""

NOT_MATRIX_NAMES = ("bias", "b", "scale")
"""Without views, leaves whose last path entry is one of these are never selected by default."""


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


def compile_rule(pattern: str | re.Pattern[str], name: str) -> re.Pattern[str]:
    """A path regex that matches only runs of whole path components (see the module docstring).

    >>> [bool(compile_rule("Conv_1", "demo").search(p)) for p in ("Conv_1/kernel", "Conv_10/kernel", "a/Conv_1")]
    [True, False, True]
    >>> bool(compile_rule("^enc/", "demo").search("enc/kernel")), bool(compile_rule("ker", "demo").search("kernel"))
    (True, False)
    """
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    if not isinstance(text, str):
        raise TypeError(f"{name}: a path rule must be a string or a compiled regex, got {pattern!r}")
    flags = pattern.flags if isinstance(pattern, re.Pattern) else 0
    try:
        return re.compile(r"(?:^|(?<=/)|(?=/))(?:" + text + r")(?:(?=/|$)|(?<=/))", flags)
    except re.error as e:
        raise ValueError(f"{name}: {text!r} is not a valid regular expression: {e}") from e


def match_rules(rules: Mapping[Any, Any], paths: Sequence[str], name: str, label: str) -> list[Any]:
    """For each path, the value of the one rule whose key matches it (``None`` if none does).

    Every key must match at least one path, and no path may match two keys: both raise a
    ``ValueError`` naming the key(s) and the leaf.
    """
    compiled = [(key, compile_rule(key, name), value) for key, value in rules.items()]
    out: list[Any] = []
    used = {key: False for key, _, _ in compiled}
    for p in paths:
        hits = [(key, value) for key, rx, value in compiled if rx.search(p)]
        if len(hits) > 1:
            raise ValueError(
                f"{name}: leaf {p!r} is matched by two {label} keys, {hits[0][0]!r} and {hits[1][0]!r}; "
                f"make the patterns disjoint (they match whole path components)"
            )
        for key, _ in hits:
            used[key] = True
        out.append(hits[0][1] if hits else None)
    unused = [key for key, u in used.items() if not u]
    if unused:
        raise ValueError(
            f"{name}: {label} key {unused[0]!r} matches no leaf (patterns match whole path components, "
            f"e.g. 'Conv_0' or 'Conv_0/kernel'); the leaves are: {_sample(paths)}"
        )
    return out


def _sample(paths: Sequence[str], k: int = 8) -> str:
    shown = ", ".join(repr(p) for p in paths[:k])
    return shown + (f", ... ({len(paths)} leaves)" if len(paths) > k else "")


def is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def default_selected(path: str, leaf: Any) -> bool:
    """The selection without views and without ``where=``: a floating-point leaf with
    ``ndim >= 2`` whose last path entry is not ``bias``, ``b`` or ``scale``.

    A heuristic: it cannot know a stacked ``(L, d)`` bias under another name. :func:`normjax.infer_views`
    reads each leaf's role from the model instead.
    """
    return is_float(leaf) and np.ndim(leaf) >= 2 and path.rsplit("/", 1)[-1] not in NOT_MATRIX_NAMES


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
            raise TypeError(f"{name}: where= mask entry at {path_str(p)!r} is {m!r}; a mask holds Python bools")
        out.append(bool(m))
    return out


def where_selected(where: Where, params: PyTree, paths: Sequence[str], values: Sequence[Any], name: str) -> list[bool]:
    """One bool per leaf for an explicit ``where=`` (not ``None``). A regex matching no leaf raises."""
    if isinstance(where, (str, re.Pattern)):
        rx = compile_rule(where, name)
        sel = [rx.search(p) is not None for p in paths]
        if not any(sel):
            text = where.pattern if isinstance(where, re.Pattern) else where
            raise ValueError(
                f"{name}: where={text!r} matches no leaf (patterns match whole path components); "
                f"the leaves are: {_sample(list(paths))}"
            )
        return sel
    if callable(where):
        return [bool(where(p, v)) for p, v in zip(paths, values)]
    return _mask_leaves(where, params, name)


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
    if isinstance(axes, (int, np.integer)) and not isinstance(axes, bool):
        given: tuple = (axes,)
    elif isinstance(axes, Sequence) and not isinstance(axes, str):
        given = tuple(axes)
    else:
        raise TypeError(f"{name}: {label}= must be an int or a sequence of ints, got {axes!r} for leaf {path!r}")
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


class ResolvedDims(NamedTuple):
    """A validated matrix view of one leaf: sorted non-negative axes."""

    batch: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]


def resolve_dims(dims: Any, path: str, leaf: Any, name: str) -> ResolvedDims:
    """Validates a matrix view (``None``: rows = all axes but the last) for one leaf.

    >>> import numpy as np
    >>> resolve_dims(None, "conv/kernel", np.zeros((3, 3, 4, 8)), "spectral_norm")
    ResolvedDims(batch=(), rows=(0, 1, 2), cols=(3,))
    >>> resolve_dims(MatrixDims(-2, -1), "stack/kernel", np.zeros((6, 4, 8)), "spectral_norm")
    ResolvedDims(batch=(0,), rows=(1,), cols=(2,))
    """
    ndim, shape = np.ndim(leaf), np.shape(leaf)
    if dims is None:
        if ndim < 2:
            raise ValueError(
                f"{name}: leaf {path!r} has shape {shape}; a matrix view needs ndim >= 2 "
                f"(pass dims=MatrixDims(...) or leave this leaf out with where=)"
            )
        return ResolvedDims((), tuple(range(ndim - 1)), (ndim - 1,))
    if not isinstance(dims, MatrixDims):
        raise TypeError(f"{name}: expected None or a MatrixDims for leaf {path!r}, got {dims!r}")
    rows = normalize_axes(dims.in_axes, ndim, path, shape, "MatrixDims.in_axes", name)
    cols = normalize_axes(dims.out_axes, ndim, path, shape, "MatrixDims.out_axes", name)
    if not rows:
        raise ValueError(f"{name}: {dims} has no in_axes for leaf {path!r}; the fan-in needs at least one axis")
    if set(rows) & set(cols):
        raise ValueError(
            f"{name}: {dims} overlaps: axes {sorted(set(rows) & set(cols))} are both rows and columns "
            f"for leaf {path!r} of shape {shape}"
        )
    batch = tuple(a for a in range(ndim) if a not in rows and a not in cols)
    return ResolvedDims(batch, rows, cols)


def by_path(tree: PyTree) -> dict[str, Any]:
    """A params-shaped pytree (a transform's state field, :func:`spectral_norms`) as
    ``{"a/b/kernel": value}``, for logging. Empty placeholders (``optax.MaskedNode``, ``None``)
    are left out; two leaves whose paths print the same raise.

    >>> import jax.numpy as jnp, normjax as nj
    >>> state = nj.max_norm(1.0).init({"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}})
    >>> nj.by_path(state.largest_norm)
    {'dense/kernel': Array(0., dtype=float32)}
    """
    out: dict[str, Any] = {}
    for p, v in jax.tree_util.tree_leaves_with_path(tree):
        key = path_str(p)
        if key in out:
            raise ValueError(f"by_path: two leaves are both written {key!r}; index the pytree itself instead")
        out[key] = v
    return out
