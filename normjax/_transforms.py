"""optax ``GradientTransformation``\\ s that keep ``params + updates`` inside a norm set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import numpy as np

from normjax._norms import (
    band_scale,
    broadcast_batch,
    scaled_update,
    spectral_scale,
    unit_norms,
)
from normjax._conv import check_conv, leaf_clip, leaf_init_vector, leaf_sigma, resolve_spec
from normjax._project import _check_min_max, check_mode
from normjax._select import Axis, Dims, PyTree, Where, check_scalar, resolve_axes, select


class NormState(NamedTuple):
    """State of :func:`max_norm`, :func:`unit_norm` and :func:`min_max_norm`: what to log.

    Each field maps the path of every selected leaf (``"layer/kernel"``) to a float32
    scalar computed on ``params + updates`` *before* the projection of the last step
    (zeros after ``init``).

    Attributes:
      largest_norm: the largest unit norm of the leaf.
      smallest_norm: the smallest unit norm of the leaf.
      clipped_fraction: the fraction of the leaf's units the projection moved.

    Read it from a chain with ``optax.tree_utils.tree_get(opt_state, "largest_norm")``.
    """

    largest_norm: dict[str, jax.Array]
    smallest_norm: dict[str, jax.Array]
    clipped_fraction: dict[str, jax.Array]


def _stats(n: jax.Array, moved: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    f32 = jnp.float32
    if n.size == 0:
        z = jnp.zeros((), f32)
        return z, z, z
    return jnp.max(n).astype(f32), jnp.min(n).astype(f32), jnp.mean(moved.astype(f32))


def _selected(params: PyTree, where: Where, name: str, resolve: Callable[[str, Any], Any]):
    """Flattens params; resolves (and so validates) the per-leaf spec of every selected leaf."""
    treedef, leaves = select(params, where, name)
    return treedef, [(leaf, resolve(leaf.path, leaf.value) if leaf.selected else None) for leaf in leaves]


def _project_updates(
    updates: PyTree,
    params: PyTree | None,
    where: Where,
    name: str,
    resolve: Callable[[str, Any], Any],
    update_leaf: Callable[[str, jax.Array, jax.Array, Any], tuple[jax.Array, Any]],
) -> tuple[PyTree, dict[str, Any]]:
    """The shared update path over the selected leaves of ``params``.

    ``update_leaf(path, p, u, spec) -> (u_new, aux)`` returns the update that takes ``p`` to
    the projection of ``p + u`` (see :func:`scaled_update`); unselected leaves and ``None``
    updates pass through untouched. Returns the updates and ``{path: aux}``.
    """
    if params is None:
        raise ValueError(
            f"{name}: update() needs params (call tx.update(updates, state, params)); "
            "a projection acts on params + updates"
        )
    treedef, leaves = _selected(params, where, name, resolve)
    out, aux = [], {}
    for (leaf, spec), u in zip(leaves, treedef.flatten_up_to(updates)):
        if spec is None or u is None:
            out.append(u)
            continue
        u_new, aux[leaf.path] = update_leaf(leaf.path, jnp.asarray(leaf.value), jnp.asarray(u), spec)
        out.append(u_new)
    return treedef.unflatten(out), aux


def _unit_band_transform(
    name: str, min_value: Any, max_value: Any, rate: Any, axis: Axis, where: Where
) -> optax.GradientTransformation:
    """Projected-gradient transform onto ``{w : min_value <= ||unit|| <= max_value}``."""

    def resolve(path: str, leaf: Any) -> tuple[int, ...]:
        return resolve_axes(axis, path, leaf, name)

    def init_fn(params: PyTree) -> NormState:
        _, leaves = _selected(params, where, name, resolve)
        zeros = {leaf.path: jnp.zeros((), jnp.float32) for leaf, spec in leaves if spec is not None}
        return NormState(dict(zeros), dict(zeros), dict(zeros))

    def update_leaf(path: str, p: jax.Array, u: jax.Array, axes: tuple[int, ...]):
        # p + u feeds only the norm reduction, where XLA fuses it; the update is rebuilt
        # from p and u with the per-unit factor (exactly 1 for units left alone).
        n = unit_norms(p + u.astype(p.dtype), axes)
        scale, moved = band_scale(n, min_value, max_value, rate)
        return scaled_update(p, u, scale), _stats(n, moved)

    def update_fn(updates: PyTree, state: NormState, params: PyTree | None = None):
        del state
        updates, aux = _project_updates(updates, params, where, name, resolve, update_leaf)
        fields = [{path: stats[i] for path, stats in aux.items()} for i in range(3)]
        return updates, NormState(*fields)

    return optax.GradientTransformation(init_fn, update_fn)


def max_norm(max_value: Any, *, axis: Axis = None, where: Where = None) -> optax.GradientTransformation:
    r"""Keeps every unit's L2 norm at most ``max_value``; put it last in ``optax.chain``.

    ``update(updates, state, params)`` returns :math:`u'` with

    .. math:: \text{params} + u' = P(\text{params} + u), \qquad
              P(w) = w \cdot \min\!\left(1, \frac{c}{\lVert w \rVert_2}\right)

    per unit, i.e. projected gradient descent onto the max-norm ball (Srebro & Shraibman
    2005), the constraint Srivastava et al. (2014) pair with dropout. Units that end inside
    the ball keep their update bit for bit; unselected leaves keep theirs unchanged.
    ``axis`` and ``where`` as in :func:`project_max_norm`; ``max_value`` may be injected
    with ``optax.inject_hyperparams``.

    The state, :class:`NormState`, holds for each selected leaf path the largest unit norm
    before projection and the fraction of units clipped.

    >>> import jax.numpy as jnp, optax, normjax as nj
    >>> params = {"w": jnp.array([[0.6, 0.0], [0.8, 0.1]])}
    >>> tx = optax.chain(optax.sgd(1.0), nj.max_norm(1.0))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([[-0.6, 0.0], [-0.8, 0.0]])}      # doubles column 0
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([[0.6, 0. ],
           [0.8, 0.1]], dtype=float32)
    >>> state[1].largest_norm["w"], state[1].clipped_fraction["w"]
    (Array(2., dtype=float32), Array(0.5, dtype=float32))

    References:
      Srebro & Shraibman, "Rank, trace-norm and max-norm", COLT 2005.
      Srivastava et al., "Dropout: a simple way to prevent neural networks from
      overfitting", JMLR 2014.
    """
    check_scalar(max_value, "max_value", "max_norm", positive=True)
    return _unit_band_transform("max_norm", None, max_value, None, axis, where)


def unit_norm(*, axis: Axis = None, where: Where = None) -> optax.GradientTransformation:
    r"""Keeps every non-zero unit at L2 norm exactly 1 (:math:`w' = w / \lVert w\rVert_2`).

    Zero units stay zero. Same contract and state as :func:`max_norm`;
    ``clipped_fraction`` counts the units rescaled.

    >>> import jax.numpy as jnp, optax, normjax as nj
    >>> params = {"w": jnp.array([[0.6], [0.8]])}
    >>> tx = optax.chain(optax.sgd(1.0), nj.unit_norm())
    >>> updates, _ = tx.update({"w": jnp.array([[-2.4], [-3.2]])}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([[0.6],
           [0.8]], dtype=float32)
    """
    return _unit_band_transform("unit_norm", 1.0, 1.0, None, axis, where)


def min_max_norm(
    min_value: Any,
    max_value: Any,
    *,
    rate: Any = 1.0,
    axis: Axis = None,
    where: Where = None,
) -> optax.GradientTransformation:
    r"""Moves every unit's norm toward ``[min_value, max_value]`` after each step (Keras's ``MinMaxNorm``).

    Per unit, with :math:`n = \lVert w \rVert_2`,

    .. math:: w' = w \cdot \frac{r\,\mathrm{clip}(n, a, b) + (1 - r)\,n}{n}

    applied to ``params + updates``. ``rate=1`` projects onto the shell exactly; a smaller
    rate moves each norm that fraction of the way per step. Units inside the shell and zero
    units keep their update bit for bit. ``min_value``, ``max_value`` and ``rate`` may be
    injected with ``optax.inject_hyperparams``. State: :class:`NormState`.

    >>> import numpy as np, jax.numpy as jnp, optax, normjax as nj
    >>> params = {"w": jnp.array([[0.3], [0.4]])}               # norm 0.5
    >>> tx = optax.chain(optax.sgd(0.0), nj.min_max_norm(1.0, 2.0, rate=0.5))
    >>> updates, _ = tx.update({"w": jnp.zeros((2, 1))}, tx.init(params), params)
    >>> np.asarray(optax.apply_updates(params, updates)["w"], np.float64).round(4)  # norm 0.75
    array([[0.45],
           [0.6 ]])
    """
    _check_min_max(min_value, max_value, rate, "min_max_norm")
    return _unit_band_transform("min_max_norm", min_value, max_value, rate, axis, where)


class SpectralNormState(NamedTuple):
    """State of :func:`spectral_norm`, keyed by the path of every selected leaf.

    Attributes:
      u: the power-iteration right vectors, shape ``batch_shape + col_shape`` for a matrix
        view and ``batch_shape + input_shape + (in,)`` for a convolution, float32 (float64
        for float64 leaves); empty for ``estimator="gram"`` and ``"svd"``.
      sigma: the sigma estimate of ``params + updates`` before the last projection, one per
        batch index (shape ``batch_shape``), float32: what to log. Zeros after ``init``.
    """

    u: dict[str, jax.Array]
    sigma: dict[str, jax.Array]


SPECTRAL_ESTIMATORS = ("power", "gram", "svd")
DEFAULT_NUM_ITERS = {"power": 1, "gram": 8, "svd": 1}
INIT_POWER_ITERS = 30


def spectral_norm(
    max_value: Any,
    *,
    estimator: str = "power",
    num_iters: int | None = None,
    mode: str = "rescale",
    dims: Dims = None,
    where: Where = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""Keeps the largest singular value of every selected matrix at most ``max_value``.

    Put it last in ``optax.chain``: ``update`` returns :math:`u'` with
    :math:`\text{params} + u' = P(\text{params} + u)`, where for each matrix :math:`W` of the
    ``dims`` view (one per batch index) and :math:`\hat\sigma` the estimate below,

    - ``mode="rescale"``: :math:`P(W) = W \min(1, c / \hat\sigma)`;
    - ``mode="normalize"``: :math:`P(W) = W c / \hat\sigma` (spectral normalization,
      Miyato et al. 2018, applied to the stored weight instead of inside the layer);
    - ``mode="clip"``: singular values :math:`\min(s_i, c)`, the exact Euclidean projection
      (needs ``estimator="svd"``).

    Estimators of :math:`\sigma_{\max}`:

    - ``"power"``: ``num_iters`` power iterations a step (default 1), warm-started from the
      vectors in the state; it under-estimates (a lower bound), by less as training goes on.
    - ``"gram"``: Gram iteration (Delattre et al. 2023, default 8 iterations), a certified
      upper bound: after every step :math:`\sigma_{\max} \le c` holds for sure.
    - ``"svd"``: exact.

    Convolutions: ``dims`` may map a leaf to a :class:`ConvSpec` (the input shape, strides,
    padding, dilation and groups of the layer, as ``flax.linen.Conv`` takes them), usually
    through path rules ``{regex: spec}``. Such a leaf is bounded by the operator norm of
    :math:`x \mapsto \mathrm{conv}(x, K)`, not by the sigma of the reshaped kernel (which can
    be 30-40% below it): ``"power"`` iterates through the convolution and its transpose with
    the input-shaped vector kept in the state, ``"gram"`` is the certified Fourier bound of
    :func:`conv_sigma_gram`, ``"svd"`` is exact (:func:`conv_sigma_fft` for circular padding,
    the materialised operator otherwise), and ``mode="clip"`` is the Fourier clip of
    :func:`conv_clip` (circular padding only).

    The state, :class:`SpectralNormState`, keeps the power vectors and, for logging, the
    estimate of every selected leaf and batch index before the projection. ``max_value`` may
    be injected with ``optax.inject_hyperparams``. Matrices left alone keep their update bit
    for bit; unselected leaves (biases, by default) are untouched.

    Args:
      max_value: the bound :math:`c > 0`.
      estimator: ``"power"``, ``"gram"`` or ``"svd"``.
      num_iters: iterations of the estimator per step; ``None`` picks 1 for power and 8 for
        gram (ignored by svd).
      mode: ``"rescale"``, ``"normalize"`` or ``"clip"``.
      dims: the view of each leaf: ``None`` (rows = all axes but the last), a
        :class:`MatrixDims`, a :class:`ConvSpec`, a mapping ``{regex: view}`` searched in the
        leaf's path (first match wins, no match means ``None``), or a callable
        ``(path, leaf) -> view``.
      where: which leaves, as in :func:`max_norm`.
      seed: seeds the initial power vectors (each leaf folds in its index).

    >>> import jax.numpy as jnp, optax, normjax as nj
    >>> params = {"w": jnp.array([[2.0, 0.0], [0.0, 0.5]])}
    >>> tx = optax.chain(optax.sgd(1.0), nj.spectral_norm(1.0, estimator="svd"))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.zeros((2, 2))}, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([[1.  , 0.  ],
           [0.  , 0.25]], dtype=float32)
    >>> state[1].sigma["w"]
    Array(2., dtype=float32)

    A convolution bounded by its operator norm on 8x8 inputs (certified by Gram iteration):

    >>> import jax
    >>> params = {"conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 1, 4))}}
    >>> rules = {"conv": nj.ConvSpec((8, 8), padding="SAME")}
    >>> tx = optax.chain(optax.sgd(0.1), nj.spectral_norm(1.0, estimator="gram", dims=rules))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)["conv"]["kernel"]
    >>> bool(nj.conv_spectral_norm(new, (8, 8), method="svd") <= 1.0)
    True

    References:
      Miyato et al., "Spectral normalization for generative adversarial networks", ICLR 2018.
      Delattre et al., "Efficient bound of Lipschitz constant for convolutional layers by
      Gram iteration", ICML 2023.
    """
    name = "spectral_norm"
    check_scalar(max_value, "max_value", name, positive=True)
    check_mode(mode, name)
    if estimator not in SPECTRAL_ESTIMATORS:
        raise ValueError(f"{name}: unknown estimator {estimator!r}; expected one of {SPECTRAL_ESTIMATORS}")
    if mode == "clip" and estimator != "svd":
        raise ValueError(
            f"{name}: mode='clip' clamps every singular value and needs the full SVD; "
            f"use estimator='svd' (or mode='rescale' with estimator={estimator!r})"
        )
    iters = DEFAULT_NUM_ITERS[estimator] if num_iters is None else num_iters
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 1:
        raise ValueError(f"{name}: num_iters must be an int >= 1, got {num_iters!r}")
    iters = int(iters)

    def resolve(path: str, leaf: Any):
        spec = resolve_spec(dims, path, leaf, name)
        check_conv(spec, path, name, estimator=estimator, mode=mode)
        return spec

    def init_fn(params: PyTree) -> SpectralNormState:
        _, leaves = _selected(params, where, name, resolve)
        key = jax.random.key(seed)
        u, sigma = {}, {}
        for i, (leaf, d) in enumerate(leaves):
            if d is None:
                continue
            batch = tuple(np.shape(leaf.value)[a] for a in d.batch)
            sigma[leaf.path] = jnp.zeros(batch, jnp.float32)
            if estimator == "power":
                # Start from a converged vector, as torch's spectral_norm does (15 iterations),
                # so the first steps do not under-estimate sigma by tens of percent.
                u[leaf.path] = leaf_init_vector(jax.random.fold_in(key, i), leaf.value, d, INIT_POWER_ITERS)
        return SpectralNormState(u, sigma)

    def update_fn(updates: PyTree, state: SpectralNormState, params: PyTree | None = None):
        def update_leaf(path: str, p: jax.Array, u: jax.Array, d):
            w = p + u.astype(p.dtype)
            if mode == "clip":  # exact projection: the SVD needs w itself
                w_new, sigma = leaf_clip(w, max_value, d)
                moved = broadcast_batch(sigma > jnp.asarray(max_value, sigma.dtype), w.shape, d)
                return jnp.where(moved, (w_new - p).astype(u.dtype), u), (None, sigma.astype(jnp.float32))
            sigma, new_u = leaf_sigma(w, d, estimator, iters, state.u.get(path))
            scale, _ = spectral_scale(sigma, max_value, mode)
            return scaled_update(p, u, broadcast_batch(scale, w.shape, d)), (new_u, sigma.astype(jnp.float32))

        updates, aux = _project_updates(updates, params, where, name, resolve, update_leaf)
        new_u = {path: a[0].astype(state.u[path].dtype) for path, a in aux.items() if a[0] is not None}
        return updates, SpectralNormState(new_u, {path: a[1] for path, a in aux.items()})

    return optax.GradientTransformation(init_fn, update_fn)
