"""One view protocol: what a selected leaf is, and everything a constraint asks of it.

Every constraint, projection and certificate loops over ``(path, leaf, view)`` triples from
:func:`leaf_views` and asks the view the same few questions; none of them knows what a
convolution is. A resolved view answers:

- ``batch``: the leaf's batch axes (one unit set / one matrix per batch index);
- ``unit_axes``: the axes reduced to form one unit's norm (max-norm family);
- ``sigma(w, estimator, num_iters, u)``: ``(sigma, new_u)``, sigma of shape ``batch_shape``;
- ``init_vector(key, w, num_iters)``: a converged power vector for the state;
- ``clip(w, c)``: ``(w_new, sigma)``, the exact spectral clip;
- ``check(path, name, estimator, mode)``: refuse, naming the leaf, what it cannot do;
- ``broadcast(s, shape)``: a per-matrix value reshaped to broadcast against the leaf;
- ``certifies``: whether it is a factor of :func:`normjax.lipschitz_bound`.

Kinds: :class:`MatrixView` (a matrix stack: dense layers, attention projections, embeddings,
stacked layers), :class:`ConvView` (a convolution operator) and :class:`UnitView` (only unit
axes: the manual ``axis=`` of the max-norm family).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from normjax._conv import (
    ConvSpec,
    ResolvedConv,
    conv_clip,
    conv_refusal,
    conv_sigma_gram,
    conv_sigma_power,
    conv_sigma_svd,
    init_conv_power_vector,
    resolve_conv,
)
from normjax._norms import (
    broadcast_batch,
    clip_singular_values,
    init_power_vector,
    sigma_gram,
    sigma_power,
    sigma_power_of_sum,
    sigma_svd,
)
from normjax._polar import hammer_leaf, matmul_leaf, orthogonalize_svd
from normjax._select import (
    Axis,
    PyTree,
    ResolvedDims,
    Where,
    default_selected,
    is_float,
    match_rules,
    normalize_axes,
    path_str,
    resolve_axes,
    resolve_dims,
    where_selected,
)
from normjax._viewtypes import Embedding, MatrixDims, NotMatrix


def _not_spectral(kind: str, path: str, name: str):
    raise ValueError(f"{name}: leaf {path!r} has only unit axes ({kind}); spectral norms need a matrix or conv view")


@dataclasses.dataclass(frozen=True)
class UnitView:
    """Unit axes only (``axis=`` of the max-norm family): no matrix, no sigma."""

    unit_axes: tuple[int, ...]
    certifies: bool = False

    def check(self, path: str, name: str, estimator: str = "", mode: str | None = None) -> None:
        if estimator or mode:
            _not_spectral("axis=", path, name)


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """A stack of matrices: rows = fan-in axes, cols = fan-out axes, the rest batch axes."""

    dims: ResolvedDims
    certifies: bool = True
    # True for the shape-based default on a leaf of 3+ axes: a matrix view there is a guess
    # (a conv kernel's reshaped matrix is no bound on its operator), so certificates refuse it
    guessed: bool = False

    @property
    def batch(self) -> tuple[int, ...]:
        return self.dims.batch

    @property
    def unit_axes(self) -> tuple[int, ...]:
        return self.dims.rows

    gain = 1.0  # ||matrix of E||_2 <= ||E||_F: a rounding error's effect on sigma

    def broadcast(self, s: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return broadcast_batch(s, shape, self.dims)

    def check(self, path: str, name: str, estimator: str = "", mode: str | None = None) -> None:
        del path, name, estimator, mode

    def sigma(self, w: jax.Array, estimator: str, num_iters: int, u: jax.Array | None = None):
        if estimator == "power":
            return sigma_power(w, u, num_iters=num_iters, dims=self.dims)
        if estimator == "gram":
            return sigma_gram(w, num_iters=num_iters, dims=self.dims), None
        return sigma_svd(w, dims=self.dims), None

    def sigma_of_sum(self, p: jax.Array, u: jax.Array, estimator: str, num_iters: int, vec: jax.Array | None = None):
        """:meth:`sigma` of ``p + u`` as ``optax.apply_updates`` rounds it; the power estimator
        on a float32/float64 leaf on CPU takes the unrounded sum, its products on ``p`` and ``u``
        apart (:func:`sigma_power_of_sum`)."""
        if estimator == "power":
            return sigma_power_of_sum(p, u, vec, num_iters=num_iters, dims=self.dims)
        return self.sigma(p + u.astype(p.dtype), estimator, num_iters, vec)

    def init_vector(self, key: jax.Array, w: jax.Array, num_iters: int) -> jax.Array:
        return sigma_power(w, init_power_vector(key, w, self.dims), num_iters=num_iters, dims=self.dims)[1]

    def clip(self, w: jax.Array, max_value: Any):
        return clip_singular_values(w, max_value, dims=self.dims)

    def matmul(self, w: jax.Array, max_value: Any, mode: str, num_iters: int, bound: Any = None):
        """``(w_new, moved, upper)``: the matmul-only ``mode`` (clip, orthogonalize, soft_cap), float32."""
        return matmul_leaf(w, max_value, mode, self.dims, num_iters, bound=bound)

    def orthogonalize_svd(self, w: jax.Array, max_value: Any):
        """``c U V^T`` by SVD (the exact reference of ``mode="orthogonalize"``), float32."""
        return orthogonalize_svd(w, max_value, self.dims)

    def hammer(self, w: jax.Array, max_value: Any, v: jax.Array):
        return hammer_leaf(w, max_value, v, self.dims)


@dataclasses.dataclass(frozen=True)
class ConvView:
    """The operator :math:`x \\mapsto \\mathrm{conv}(x, K)` of a kernel leaf."""

    conv: ResolvedConv
    certifies: bool = True

    @property
    def batch(self) -> tuple[int, ...]:
        return self.conv.batch

    @property
    def unit_axes(self) -> tuple[int, ...]:
        """Every axis but the batch axes and the output-feature axis: each output channel's fan-in."""
        c = self.conv
        out_axis = c.kernel_perm[-1] if c.kernel_perm is not None else len(c.batch) + c.nd + 1
        return tuple(a for a in range(len(c.batch) + c.nd + 2) if a not in c.batch and a != out_axis)

    def broadcast(self, s: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return s.reshape(s.shape + (1,) * (len(shape) - s.ndim))

    @property
    def gain(self) -> float:
        """``||conv(., E)||_2 <= sqrt(prod(kernel_size)) ||E||_F`` (each input pixel meets every
        tap at most once per output): the effect of a kernel rounding error on the norm."""
        return float(np.sqrt(np.prod(self.conv.kernel_size)))

    def check(self, path: str, name: str, estimator: str = "", mode: str | None = None) -> None:
        if not estimator and mode is None:
            return
        reason = conv_refusal(self.conv, estimator=estimator, mode=mode)
        if reason is not None:
            raise ValueError(f"{name}: the convolution {path!r}: {reason}")

    def sigma(self, w: jax.Array, estimator: str, num_iters: int, u: jax.Array | None = None):
        if estimator == "power":
            return conv_sigma_power(w, u, self.conv, num_iters=num_iters)
        if estimator == "gram":
            return conv_sigma_gram(w, self.conv, num_iters=num_iters), None
        return conv_sigma_svd(w, self.conv), None

    def sigma_of_sum(self, p: jax.Array, u: jax.Array, estimator: str, num_iters: int, vec: jax.Array | None = None):
        return self.sigma(p + u.astype(p.dtype), estimator, num_iters, vec)

    def init_vector(self, key: jax.Array, w: jax.Array, num_iters: int) -> jax.Array:
        return conv_sigma_power(w, init_conv_power_vector(key, w, self.conv), self.conv, num_iters=num_iters)[1]

    def clip(self, w: jax.Array, max_value: Any):
        return conv_clip(w, max_value, self.conv)


View = UnitView | MatrixView | ConvView


def resolve_view(spec: Any, path: str, leaf: Any, name: str) -> View | None:
    """A user-facing view (``None`` = the shape default, ``MatrixDims``, ``ConvSpec``,
    ``Embedding``, ``NotMatrix``) validated against one leaf; ``None`` for a ``NotMatrix``."""
    if isinstance(spec, NotMatrix):
        return None
    if isinstance(spec, ConvSpec):
        return ConvView(resolve_conv(spec, path, leaf, name))
    if isinstance(spec, Embedding):
        ndim, shape = np.ndim(leaf), np.shape(leaf)
        rows = normalize_axes(spec.row_axes, ndim, path, shape, "Embedding.row_axes", name)
        batch = normalize_axes(spec.batch_axes, ndim, path, shape, "Embedding.batch_axes", name)
        feats = tuple(a for a in range(ndim) if a not in rows and a not in batch)
        if not rows or not feats or set(rows) & set(batch):
            raise ValueError(f"{name}: {spec} does not fit leaf {path!r} of shape {shape}: it needs row and feature axes")
        # each row is a unit: its features are the fan-in of the unit (max-norm reduces them)
        return MatrixView(ResolvedDims(batch, feats, rows), certifies=False)
    if spec is None or isinstance(spec, MatrixDims):
        d = resolve_dims(spec, path, leaf, name)
        return MatrixView(d, guessed=spec is None and np.ndim(leaf) >= 3)
    raise TypeError(
        f"{name}: the view of leaf {path!r} must be a MatrixDims, ConvSpec, Embedding, NotMatrix or None, got {spec!r}"
    )


def _rule_values(rules: Any, paths: list[str], values: list[Any], name: str, label: str) -> list[Any]:
    """Per-leaf values of ``dims=``/``axis=``: one value for all, ``{regex: value}`` or a callable."""
    if isinstance(rules, Mapping):
        return match_rules(rules, paths, name, label)
    if callable(rules) and not isinstance(rules, (MatrixDims, ConvSpec, Embedding, NotMatrix)):
        out = []
        for p, v in zip(paths, values):
            r = rules(p, v)
            if isinstance(r, Mapping):
                raise TypeError(f"{name}: the {label} callable returned a mapping for leaf {p!r}")
            out.append(r)
        return out
    return [rules] * len(paths)


_VIEW_TYPES = (MatrixDims, ConvSpec, Embedding, NotMatrix)


def _key_path(path: tuple) -> tuple:
    """A key path without the trailing ``.value`` of a Flax NNX ``Variable`` (wrapped or not)."""
    if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        return path[:-1]
    return path


def _views_for(views: PyTree, param_paths: list[tuple], name: str) -> list[Any]:
    """The view of every params leaf, matched by key path, so the same views work whether the
    params reach the transform wrapped in Flax NNX Variables (``nnx.Optimizer``'s
    ``init``) or pure (its ``update``)."""
    flat = jax.tree_util.tree_flatten_with_path(views, is_leaf=lambda x: x is None or isinstance(x, _VIEW_TYPES))[0]
    table = {_key_path(p): v for p, v in flat}
    out = []
    for p in param_paths:
        key = _key_path(p)
        if key not in table:
            raise ValueError(
                f"{name}: views= must be shaped like params (as infer_views returns it): it has no view for "
                f"leaf {path_str(p)!r}"
            )
        out.append(table[key])
    return out


def leaf_views(
    params: PyTree,
    name: str,
    *,
    where: Where = None,
    views: PyTree | None = None,
    axis: Axis = None,
    dims: Any = None,
    purpose: str = "units",
) -> tuple[Any, list[tuple[str, Any, View | None]]]:
    """Flattens ``params`` and resolves the view of every leaf, ``None`` where not constrained.

    ``purpose`` is ``"units"`` (max-norm family: ``axis=`` is the manual override) or
    ``"spectral"`` (``dims=``). With ``views`` (a pytree shaped like params, e.g. from
    :func:`normjax.infer_views`) a leaf is constrained when its view is a matrix, convolution
    or embedding and ``where`` (if given) selects it; ``axis``/``dims`` may not be given too.
    Without views, ``where=None`` selects :func:`default_selected` leaves.

    Raises ``ValueError`` when the selection is empty, when a ``where`` regex or a rule key
    matches no leaf, and ``TypeError`` for a non-float leaf selected explicitly.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    values = [v for _, v in flat]
    if views is not None and (axis is not None or dims is not None):
        raise TypeError(
            f"{name}: pass either views= or {'axis=' if axis is not None else 'dims='}, not both; "
            f"to override single leaves, put the view in the views pytree "
            f"(or use infer_views(..., overrides={{path: view}}))"
        )
    selected = [True] * len(paths) if where is None else where_selected(where, params, paths, values, name)
    if views is not None:
        specs = _views_for(views, [p for p, _ in flat], name)
    elif purpose == "units":
        specs = None
    else:
        specs = _rule_values(dims, paths, values, name, "dims")
    out = []
    for i, (p, v, s) in enumerate(zip(paths, values, selected)):
        if views is None and where is None:
            s = default_selected(p, v)
        if s and where is not None and not is_float(v):
            raise TypeError(
                f"{name}: leaf {p!r} (dtype {jax.numpy.result_type(v)}, shape {np.shape(v)}) was selected by "
                f"where= but is not floating point; only float leaves can be constrained"
            )
        if not s or not is_float(v):
            out.append((p, v, None))
            continue
        if specs is None:
            view: View | None = UnitView(resolve_axes(axis, p, v, name))
        else:
            view = resolve_view(specs[i], p, v, name)
        out.append((p, v, view))
    if paths and not any(view is not None for _, _, view in out):
        how = "views= and where=" if views is not None else ("where=" if where is not None else "the default selection")
        raise ValueError(
            f"{name}: {how} select(s) no leaf to constrain (float leaves with a matrix, convolution or "
            f"embedding view); the leaves are: {', '.join(repr(p) for p in paths[:8])}"
        )
    return treedef, out
