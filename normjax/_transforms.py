"""optax ``GradientTransformation``\\ s that keep ``params + updates`` inside a norm set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from normjax._checks import (
    SPECTRAL_ESTIMATORS,
    SPECTRAL_MODES,
    check_min_max,
    check_scalar,
    choice,
    poison,
    positive_int,
    runtime_valid,
)
from normjax._norms import (
    Split,
    apply_scale,
    band_scale,
    decode_scale,
    scaled_update,
    scaled_updates,
    spectral_scale,
    unit_norms,
)
from normjax._shard import spec_of
from normjax._select import Axis, PyTree, Where
from normjax._views import View, leaf_views

EMPTY = optax.MaskedNode()
"""The state entry of a leaf a transform does not constrain: an empty pytree node."""


class NormState(NamedTuple):
    """State of :func:`max_norm`, :func:`unit_norm` and :func:`min_max_norm`: what to log.

    Every field is a pytree shaped like the params (optax's convention): a float32 scalar for
    each constrained leaf, an empty ``optax.MaskedNode()`` for every other leaf, so no two
    leaves can collide. Values are computed on ``params + updates`` of the last step (zeros
    after ``init``); a leaf whose update was ``None`` keeps its previous values.

    Attributes:
      largest_norm: the largest unit norm of the leaf before the projection.
      largest_norm_after: the largest unit norm after it (``<= max_value`` up to rounding).
      smallest_norm: the smallest unit norm before the projection.
      clipped_fraction: the fraction of the leaf's units the projection moved.

    Read it from a chain with ``optax.tree_utils.tree_get(opt_state, "largest_norm")``.
    """

    largest_norm: PyTree
    largest_norm_after: PyTree
    smallest_norm: PyTree
    clipped_fraction: PyTree


class SpectralNormState(NamedTuple):
    """State of :func:`spectral_norm`, every field a pytree shaped like the params.

    Attributes:
      u: the power-iteration vectors of each constrained leaf, shape
        ``batch_shape + col_shape`` for a matrix view and ``batch_shape + input_shape + (in,)``
        for a convolution, float32 (float64 for float64 leaves); ``optax.MaskedNode()`` for
        ``estimator="gram"``/``"svd"`` and for leaves not constrained.
      sigma: the sigma estimate of ``params + updates`` before the last projection, one per
        batch index (shape ``batch_shape``), float32: what to log. Zeros after ``init``.
      sigma_after: the same estimate after the projection: ``sigma * min(1, c / sigma)`` for
        ``"rescale"``, ``c`` for ``"normalize"`` (0 for a zero matrix), ``min(sigma, c)`` for
        ``"clip"`` (exact there).
    """

    u: PyTree
    sigma: PyTree
    sigma_after: PyTree


def _flat_state(treedef, field: PyTree) -> list[Any]:
    return treedef.flatten_up_to(field)


def _update_leaves(
    name: str,
    updates: PyTree,
    params: PyTree | None,
    leaves_of: Callable[[PyTree], tuple[Any, list]],
    update_leaf: Callable[[int, str, jax.Array, jax.Array, View], tuple[jax.Array, tuple]],
    old: tuple[list, ...],
) -> tuple[PyTree, tuple[PyTree, ...]]:
    """The shared update path: ``update_leaf(i, path, p, u, view) -> (u_new, per-field values)``
    for every constrained leaf; other leaves' updates pass through untouched, and a leaf whose
    update is ``None`` keeps its old state values (``old``: the flattened state fields)."""
    if params is None:
        raise ValueError(
            f"{name}: update() needs params (call tx.update(updates, state, params)); "
            "a projection acts on params + updates"
        )
    treedef, leaves = leaves_of(params)
    out = []
    fields = [list(f) for f in old]
    for i, ((path, p, view), u) in enumerate(zip(leaves, treedef.flatten_up_to(updates))):
        if view is None or u is None:
            out.append(u)
            continue
        u_new, values = update_leaf(i, path, jnp.asarray(p), jnp.asarray(u), view)
        for f, value in zip(fields, values):
            f[i] = value
        out.append(u_new)
    return treedef.unflatten(out), tuple(treedef.unflatten(f) for f in fields)


def _band_group(ps: list, us: list, axes: tuple[int, ...], min_value: Any, max_value: Any, rate: Any, ok: Any):
    """The band projection's update and :class:`NormState` statistics for a group of leaves of
    one shape, dtypes and sharding: ``(updates, (largest, largest_after, smallest, clipped))``,
    each statistic a ``(len(ps),)`` float32 vector.

    Per leaf: the norms of ``p + u`` (:func:`unit_norms`, fused into the reduction) and the
    update's ``cond`` (:func:`scaled_updates`). Once for the group, on the stacked per-unit
    norms (small arrays): :func:`band_scale` and the statistics, so a compiled step holds that
    code once per group of a model's repeated blocks instead of once per leaf (at 12 GPT-2
    blocks the compiled step shrank from 48.8k to 28.5k HLO lines).
    """
    norms = [unit_norms((p, u), axes, split=True) for p, u in zip(ps, us)]
    split = Split.stack(norms)
    scale, moved = band_scale(split, min_value, max_value, rate)
    scale = poison(scale, ok)
    n = split.value()
    after = jnp.where(scale == 0, 0, n * decode_scale(scale))
    f32, red = jnp.float32, tuple(range(1, n.ndim))
    stats = (
        jnp.max(n, axis=red).astype(f32),
        jnp.max(after, axis=red).astype(f32),
        jnp.min(n, axis=red).astype(f32),
        jnp.mean(moved.astype(f32), axis=red),
    )
    return scaled_updates(ps, us, scale), stats


def _unit_band_transform(
    name: str, min_value: Any, max_value: Any, rate: Any, axis: Axis, where: Where, views: PyTree | None
) -> optax.GradientTransformation:
    """Projected-gradient transform onto ``{w : min_value <= ||unit|| <= max_value}``."""

    def leaves_of(params):
        return leaf_views(params, name, where=where, views=views, axis=axis)

    def init_fn(params: PyTree) -> NormState:
        treedef, leaves = leaves_of(params)
        zeros = [EMPTY if view is None else jnp.zeros((), jnp.float32) for _, _, view in leaves]
        return NormState(*(treedef.unflatten(zeros) for _ in NormState._fields))

    def update_fn(updates: PyTree, state: NormState, params: PyTree | None = None):
        if params is None:
            raise ValueError(
                f"{name}: update() needs params (call tx.update(updates, state, params)); "
                "a projection acts on params + updates"
            )
        treedef, leaves = leaves_of(params)
        us = treedef.flatten_up_to(updates)
        fields = [list(_flat_state(treedef, f)) for f in state]
        out = list(us)
        # Leaves of one shape, dtypes, unit axes and sharding (a model's repeated blocks) form a
        # group: the per-unit factors and the statistics are computed once for the stacked
        # group, not once per leaf; the reduction and the update stay per leaf (p + u is never
        # materialised for them). See _band_group.
        groups: dict[Any, list[int]] = {}
        for i, ((_, p, view), u) in enumerate(zip(leaves, us)):
            if view is None or u is None:
                continue
            p, u = jnp.asarray(p), jnp.asarray(u)
            if p.size == 0:
                for f in fields:
                    f[i] = jnp.zeros((), jnp.float32)
                continue
            key = (p.shape, p.dtype, u.dtype, view.unit_axes, spec_of(p), spec_of(u))
            groups.setdefault(key, []).append(i)
        ok = runtime_valid(min_value, max_value, rate)
        for idx in groups.values():
            ps = [jnp.asarray(leaves[i][1]) for i in idx]
            u_new, stats = _band_group(ps, [jnp.asarray(us[i]) for i in idx], leaves[idx[0]][2].unit_axes, min_value, max_value, rate, ok)
            for j, i in enumerate(idx):
                out[i] = u_new[j]
                for f, value in zip(fields, stats):
                    f[i] = value[j]
        return treedef.unflatten(out), NormState(*(treedef.unflatten(f) for f in fields))

    return optax.GradientTransformation(init_fn, update_fn)


def max_norm(
    max_value: Any, *, axis: Axis = None, where: Where = None, views: PyTree | None = None
) -> optax.GradientTransformation:
    r"""Keeps every unit's L2 norm at most ``max_value``; put it last in ``optax.chain``.

    ``update(updates, state, params)`` returns :math:`u'` with

    .. math:: \text{params} + u' = P(\text{params} + u), \qquad
              P(w) = w \cdot \min\!\left(1, \frac{c}{\lVert w \rVert_2}\right)

    per unit, i.e. projected gradient descent onto the max-norm ball (Srebro & Shraibman
    2005), the constraint Srivastava et al. (2014) pair with dropout. Units that end inside
    the ball keep their update bit for bit; unselected leaves keep theirs unchanged.
    ``axis``, ``where`` and ``views`` as in :func:`project_max_norm` (with
    ``views=infer_views(...)`` every unit is one output unit's true fan-in, in any layout);
    ``max_value`` may be injected with ``optax.inject_hyperparams``.

    The state, :class:`NormState`, is shaped like the params and holds for each constrained
    leaf the largest unit norm before and after the projection, the smallest, and the fraction
    of units clipped.

    >>> import jax.numpy as jnp, optax, normjax as nj
    >>> params = {"w": jnp.array([[0.6, 0.0], [0.8, 0.1]])}
    >>> tx = optax.chain(optax.sgd(1.0), nj.max_norm(1.0))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([[-0.6, 0.0], [-0.8, 0.0]])}      # doubles column 0
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([[0.6, 0. ],
           [0.8, 0.1]], dtype=float32)
    >>> state[1].largest_norm["w"], state[1].largest_norm_after["w"], state[1].clipped_fraction["w"]
    (Array(2., dtype=float32), Array(1., dtype=float32), Array(0.5, dtype=float32))

    References:
      Srebro & Shraibman, "Rank, trace-norm and max-norm", COLT 2005.
      Srivastava et al., "Dropout: a simple way to prevent neural networks from
      overfitting", JMLR 2014.
    """
    check_scalar(max_value, "max_value", "max_norm", positive=True)
    return _unit_band_transform("max_norm", None, max_value, None, axis, where, views)


def unit_norm(*, axis: Axis = None, where: Where = None, views: PyTree | None = None) -> optax.GradientTransformation:
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
    return _unit_band_transform("unit_norm", 1.0, 1.0, None, axis, where, views)


def min_max_norm(
    min_value: Any,
    max_value: Any,
    *,
    rate: Any = 1.0,
    axis: Axis = None,
    where: Where = None,
    views: PyTree | None = None,
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
    check_min_max(min_value, max_value, rate, "min_max_norm")
    return _unit_band_transform("min_max_norm", min_value, max_value, rate, axis, where, views)


DEFAULT_NUM_ITERS = {"power": 1, "gram": 8, "svd": 1, "matmul": 12}
CERTIFY_GRAM_ITERS = 16  # a flat spectrum (what a clip leaves) is Gram iteration's worst case: rank**(2**-17)


def _land(p, u, target, moved, view, c, ok, new_u, sigma):
    """The certified landing: the update that takes ``p`` to ``target`` where ``moved``, rounded as
    ``apply_updates`` will round it, then bounded by Gram iteration (certified) and scaled onto the
    ball with :func:`scaled_update`'s margin where the bound is above ``c``."""
    u1 = jnp.where(moved, (target - p.astype(target.dtype)).astype(u.dtype), u)
    w1 = (p + u1).astype(p.dtype)
    bound, _ = view.sigma(w1, "gram", CERTIFY_GRAM_ITERS)
    scale, _ = spectral_scale(bound, c, "rescale")
    scale = poison(scale, ok)
    u_new = scaled_update(p, u1, view.broadcast(scale, p.shape), max_value=c, gain=view.gain)
    after = jnp.where(scale == 0, 0, bound * decode_scale(scale)).astype(jnp.float32)
    return u_new, (new_u, sigma.astype(jnp.float32), after)


def check_spectral_combination(name: str, mode: str, estimator: str, certify: bool) -> None:
    """Which ``mode`` goes with which ``estimator`` (shared by the transform and the projection)."""
    if not isinstance(certify, bool):
        raise TypeError(f"{name}: certify must be True or False, got {certify!r}")
    if estimator == "matmul" and mode not in ("clip", "orthogonalize"):
        raise ValueError(
            f"{name}: estimator='matmul' computes mode='clip' or mode='orthogonalize' with matmuls only; "
            f"mode={mode!r} needs a sigma estimate: estimator 'power', 'gram' or 'svd'"
        )
    if mode in ("clip", "orthogonalize") and estimator not in ("svd", "matmul"):
        raise ValueError(
            f"{name}: mode={mode!r} changes every singular value: use estimator='svd' (exact) or "
            f"estimator='matmul' (polynomial iterations, no SVD); or mode='rescale' with estimator={estimator!r}"
        )
    if mode == "hammer" and estimator != "power":
        raise ValueError(f"{name}: mode='hammer' moves the top singular value along the power vectors; use estimator='power'")
INIT_POWER_ITERS = 30


def spectral_norm(
    max_value: Any,
    *,
    estimator: str = "power",
    num_iters: int | None = None,
    mode: str = "rescale",
    dims: Any = None,
    where: Where = None,
    views: PyTree | None = None,
    seed: int = 0,
    certify: bool = False,
) -> optax.GradientTransformation:
    r"""Keeps the largest singular value of every selected matrix at most ``max_value``.

    Put it last in ``optax.chain``: ``update`` returns :math:`u'` with
    :math:`\text{params} + u' = P(\text{params} + u)`, where for each matrix :math:`W` of the
    leaf's view (one per batch index) and :math:`\hat\sigma` the estimate below,

    - ``mode="rescale"``: :math:`P(W) = W \min(1, c / \hat\sigma)`;
    - ``mode="normalize"``: :math:`P(W) = W c / \hat\sigma` (spectral normalization,
      Miyato et al. 2018, applied to the stored weight instead of inside the layer);
    - ``mode="clip"``: singular values :math:`\min(s_i, c)`, the Euclidean projection: exact
      with ``estimator="svd"``, by matmuls only with ``estimator="matmul"`` (no SVD, eigh or
      QR: :func:`spectral_clip`, within about 5e-5 of c above it);
    - ``mode="orthogonalize"``: every non-zero singular value set to :math:`c`
      (:math:`c\,UV^\top`; ``"svd"`` exact, ``"matmul"`` by :func:`msign`);
    - ``mode="soft_cap"``: :math:`s \mapsto s(1 - \beta (s/m)^2)`, :math:`\beta = 1 - c/m`, with
      :math:`m` the estimate of :math:`\sigma_{\max}(W)` (:func:`spectral_soft_cap`): two
      matmuls, the largest singular value lands on :math:`c` and small ones barely move. With
      ``"gram"`` :math:`m` is a certified bound, so :math:`\sigma \le c` after every step (in
      exact arithmetic; ``certify=True`` adds the rounding). The strength :math:`\beta` follows
      how far the step went: after a Muon step of size :math:`\eta` from inside the ball
      :math:`m \le c + \eta`, so :math:`\beta \le \eta / (c + \eta)`, the coupling of
      Newhouse et al. 2025 without a learning rate to pass;
    - ``mode="hammer"``: the top singular value along the power vectors kept in the state
      set to :math:`c` (:func:`spectral_hammer`, Newhouse et al. 2025); needs ``"power"``.

    ``certify=True`` lands every changed matrix inside the ball for sure, rounding included:
    the new matrix, rounded as ``optax.apply_updates`` will round it, is bounded by Gram
    iteration (certified, also for convolutions) and scaled onto :math:`c (1 - \beta)` with
    the margin of :func:`scaled_update` where it is above (``estimator="gram"`` with
    ``"rescale"``/``"normalize"`` always does this).

    Estimators of :math:`\sigma_{\max}`:

    - ``"power"``: ``num_iters`` power iterations a step (default 1), warm-started from the
      vectors in the state; it under-estimates (a lower bound), by less as training goes on.
    - ``"gram"``: Gram iteration (Delattre et al. 2023, default 8 iterations), a certified
      upper bound: after every step :math:`\sigma_{\max} \le c` holds for sure.
    - ``"svd"``: exact.
    - ``"matmul"``: none (``mode="clip"``/``"orthogonalize"`` by polynomial iterations:
      ``num_iters`` steps, default 12). The logged ``sigma`` is then the upper bound
      :math:`\lVert WW^\top\rVert_F^{1/2}` (within :math:`\operatorname{rank}^{1/4}` of sigma).

    Views: with ``views=infer_views(apply_fn, params, x)`` every leaf is bounded as the model
    uses it: a Flax or Equinox convolution by the operator norm of
    :math:`x \mapsto \mathrm{conv}(x, K)` at its input size (not the sigma of the reshaped
    kernel, which can be 30-40% below it), an attention projection ``(d, heads, head_dim)``
    as one ``d x (heads * head_dim)`` matrix, a scan-stacked ``(L, in, out)`` kernel with one
    sigma per layer; biases and scales are never touched. Without views, ``dims`` is the
    manual override: ``None`` (rows = all axes but the last), a :class:`MatrixDims`, a
    :class:`ConvSpec`, a mapping ``{regex: view}`` (regexes match whole path components;
    each must match a leaf; a leaf matched by two raises; unmatched leaves get the default) or
    a callable ``(path, leaf) -> view``. For a convolution ``"power"`` iterates through the
    convolution and its transpose with the input-shaped vector kept in the state, ``"gram"``
    is the certified bound of :func:`conv_sigma_gram`, ``"svd"`` is exact, and
    ``mode="clip"`` is the Fourier clip of :func:`conv_clip` (circular padding only).

    The state, :class:`SpectralNormState`, is shaped like the params: the power vectors and,
    for logging, the estimate of every selected leaf and batch index before and after the
    projection. ``max_value`` may be injected with ``optax.inject_hyperparams``. Matrices
    left alone keep their update bit for bit; unselected leaves are untouched.

    Args:
      max_value: the bound :math:`c > 0`.
      estimator: ``"power"``, ``"gram"``, ``"svd"`` or ``"matmul"``.
      num_iters: iterations of the estimator per step; ``None`` picks 1 for power, 8 for
        gram and 12 for matmul (ignored by svd).
      mode: ``"rescale"``, ``"normalize"``, ``"clip"``, ``"orthogonalize"``, ``"soft_cap"``
        or ``"hammer"``.
      dims: the manual view of each leaf (see above); not with ``views``.
      where: which leaves, as in :func:`max_norm`.
      views: a pytree shaped like params from :func:`infer_views`.
      seed: seeds the initial power vectors (each leaf folds in its index).
      certify: land every changed matrix inside the ball for sure (see above).

    >>> import jax, jax.numpy as jnp, optax, normjax as nj
    >>> params = {"w": jnp.array([[2.0, 0.0], [0.0, 0.5]])}
    >>> tx = optax.chain(optax.sgd(1.0), nj.spectral_norm(1.0, estimator="svd"))
    >>> state = tx.init(params)
    >>> updates, state = jax.jit(tx.update)({"w": jnp.zeros((2, 2))}, state, params)  # as in a jitted step
    >>> optax.apply_updates(params, updates)["w"]
    Array([[1.  , 0.  ],
           [0.  , 0.25]], dtype=float32)
    >>> state[1].sigma["w"], state[1].sigma_after["w"]
    (Array(2., dtype=float32), Array(1., dtype=float32))

    A convolution bounded by its operator norm on 8x8 inputs (certified by Gram iteration):

    >>> params = {"conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 1, 4))}}
    >>> rules = {"conv": nj.ConvSpec((8, 8), padding="SAME")}
    >>> tx = optax.chain(optax.sgd(0.1), nj.spectral_norm(1.0, estimator="gram", dims=rules))
    >>> updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
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
    choice(mode, SPECTRAL_MODES, "mode", name)
    choice(estimator, SPECTRAL_ESTIMATORS, "estimator", name)
    check_spectral_combination(name, mode, estimator, certify)
    iters = positive_int(DEFAULT_NUM_ITERS[estimator] if num_iters is None else num_iters, "num_iters", name)

    def leaves_of(params):
        treedef, leaves = leaf_views(params, name, where=where, views=views, dims=dims, purpose="spectral")
        for path, _, view in leaves:
            if view is not None:
                view.check(path, name, estimator, mode)
                if certify:
                    view.check(path, name, "gram", None)
        return treedef, leaves

    def init_fn(params: PyTree) -> SpectralNormState:
        treedef, leaves = leaves_of(params)
        key = jax.random.key(seed)
        u, sigma = [], []
        for i, (_, v, view) in enumerate(leaves):
            if view is None:
                u.append(EMPTY)
                sigma.append(EMPTY)
                continue
            sigma.append(jnp.zeros(tuple(jnp.shape(v)[a] for a in view.batch), jnp.float32))
            # Start from a converged vector, as torch's spectral_norm does (15 iterations),
            # so the first steps do not under-estimate sigma by tens of percent.
            u.append(view.init_vector(jax.random.fold_in(key, i), jnp.asarray(v), INIT_POWER_ITERS) if estimator == "power" else EMPTY)
        return SpectralNormState(treedef.unflatten(u), treedef.unflatten(sigma), treedef.unflatten(sigma))

    def update_fn(updates: PyTree, state: SpectralNormState, params: PyTree | None = None):
        treedef = jax.tree.structure(params) if params is not None else None
        old = tuple(_flat_state(treedef, f) for f in state) if treedef is not None else ((),) * 3
        c = max_value

        def update_leaf(i, path, p, u, view):
            w = p + u.astype(p.dtype)
            f32 = jnp.float32
            ok = runtime_valid(max_value=c)
            cc = lambda s: jnp.asarray(c, s.dtype)
            if mode in ("rescale", "normalize"):
                sigma, new_u = view.sigma_of_sum(p, u, estimator, iters, old[0][i] if estimator == "power" else None)
                scale, _ = spectral_scale(sigma, c, mode)
                scale = poison(scale, ok)
                new_u = EMPTY if new_u is None else new_u.astype(old[0][i].dtype)
                after = jnp.where(scale == 0, 0, sigma * decode_scale(scale)).astype(f32)
                # "gram" certifies sigma: the update then also covers its own rounding (scaled_update's
                # max_value), so sigma <= c holds after the step for sure, not only up to rounding
                certified = dict(max_value=c, gain=view.gain) if estimator == "gram" or certify else {}
                if certify and estimator != "gram":  # the estimate is not a bound: land by a Gram bound
                    target = apply_scale(w, view.broadcast(scale, w.shape))
                    moved = view.broadcast(scale != 1, w.shape)
                    return _land(p, u, target, moved, view, c, ok, new_u, sigma)
                u_new = scaled_update(p, u, view.broadcast(scale, w.shape), **certified)
                return u_new, (new_u, sigma.astype(f32), after)
            new_u = EMPTY
            if mode == "clip" and estimator == "svd":  # exact projection: the SVD needs w itself
                target, sigma = view.clip(w, c)
                moved_b = sigma > cc(sigma)
                after = jnp.minimum(sigma, cc(sigma))
            elif mode == "orthogonalize" and estimator == "svd":
                target = view.orthogonalize_svd(w, c)
                sigma = view.sigma(w, "svd", 1)[0]
                moved_b = jnp.ones(sigma.shape, bool)
                after = jnp.where(sigma > 0, cc(sigma), 0)
            elif mode in ("clip", "orthogonalize"):  # estimator="matmul"
                target, moved_b, sigma = view.matmul(w, c, mode, iters)
                after = jnp.minimum(sigma, cc(sigma)) if mode == "clip" else jnp.where(sigma > 0, cc(sigma), 0)
            elif mode == "soft_cap":
                sigma, vec = view.sigma(w, estimator, iters, old[0][i] if estimator == "power" else None)
                new_u = EMPTY if vec is None else vec.astype(old[0][i].dtype)
                target, moved_b, _ = view.matmul(w, c, "soft_cap", 0, bound=sigma)
                after = jnp.minimum(sigma, cc(sigma))
            else:  # hammer
                _, vec = view.sigma(w, "power", iters, old[0][i])
                new_u = vec.astype(old[0][i].dtype)
                target, sigma = view.hammer(w, c, vec)
                moved_b = sigma > cc(sigma)
                after = jnp.minimum(sigma, cc(sigma))
            moved = view.broadcast(moved_b, w.shape) | jnp.logical_not(ok)
            target = poison(target, ok)
            if certify:
                return _land(p, u, target, moved, view, c, ok, new_u, sigma)
            u_new = jnp.where(moved, (target - p.astype(target.dtype)).astype(u.dtype), u)
            return u_new, (new_u, sigma.astype(f32), poison(after, ok).astype(f32))

        updates, fields = _update_leaves(name, updates, params, leaves_of, update_leaf, old)
        return updates, SpectralNormState(*fields)

    return optax.GradientTransformation(init_fn, update_fn)
