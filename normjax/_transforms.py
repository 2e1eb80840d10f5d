"""optax ``GradientTransformation``\\ s that keep ``params + updates`` inside a norm set."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from normjax._norms import band_project
from normjax._project import _check_min_max
from normjax._select import Axis, PyTree, Where, check_scalar, resolve_axes, select


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


def _unit_band_transform(
    name: str, min_value: Any, max_value: Any, rate: Any, axis: Axis, where: Where
) -> optax.GradientTransformation:
    """Projected-gradient transform onto ``{w : min_value <= ||unit|| <= max_value}``."""

    def selected_leaves(params: PyTree):
        treedef, leaves = select(params, where, name)
        axes = [resolve_axes(axis, l.path, l.value, name) if l.selected else None for l in leaves]
        return treedef, leaves, axes

    def init_fn(params: PyTree) -> NormState:
        _, leaves, _ = selected_leaves(params)  # validates where= and axis= at init
        zeros = {l.path: jnp.zeros((), jnp.float32) for l in leaves if l.selected}
        return NormState(dict(zeros), dict(zeros), dict(zeros))

    def update_fn(updates: PyTree, state: NormState, params: PyTree | None = None):
        del state
        if params is None:
            raise ValueError(
                f"{name}: update() needs params (call tx.update(updates, state, params)); "
                "a projection acts on params + updates"
            )
        treedef, leaves, axes = selected_leaves(params)
        flat_updates = treedef.flatten_up_to(updates)
        out, largest, smallest, frac = [], {}, {}, {}
        for leaf, ax, u in zip(leaves, axes, flat_updates):
            if not leaf.selected or u is None:
                out.append(u)
                continue
            p = jnp.asarray(leaf.value)
            u = jnp.asarray(u)
            w = p + u.astype(p.dtype)
            w_new, n, moved = band_project(w, ax, min_value, max_value, rate)
            # Units left alone keep their update bit for bit, so params + u is untouched.
            out.append(jnp.where(moved, (w_new - p).astype(u.dtype), u))
            largest[leaf.path], smallest[leaf.path], frac[leaf.path] = _stats(n, moved)
        return treedef.unflatten(out), NormState(largest, smallest, frac)

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
