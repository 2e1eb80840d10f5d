"""Pure projections over parameter pytrees: the same maths as the transforms, no state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from normjax._norms import (
    apply_scale,
    band_project,
    broadcast_batch,
    spectral_scale,
)
from normjax._conv import check_conv, leaf_clip, leaf_sigma, resolve_spec
from normjax._select import (
    Axis,
    Dims,
    PyTree,
    Where,
    check_scalar,
    is_concrete,
    resolve_axes,
    select,
)


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


SPECTRAL_MODES = ("rescale", "normalize", "clip")


def check_mode(mode: str, name: str) -> None:
    if mode not in SPECTRAL_MODES:
        raise ValueError(f"{name}: unknown mode {mode!r}; expected one of {SPECTRAL_MODES}")


def project_spectral_leaf(w: jax.Array, max_value: Any, mode: str, d: Any, sigma: jax.Array | None = None):
    """Projects one leaf given its sigma per batch index (computed exactly when ``None``).

    Returns ``(w_new, moved, sigma)`` with ``moved`` broadcastable to ``w``.
    """
    if mode == "clip":
        w_new, sigma = leaf_clip(w, max_value, d)
        moved = sigma > jnp.asarray(max_value, sigma.dtype)
        return w_new, broadcast_batch(moved, w.shape, d), sigma
    if sigma is None:
        sigma = leaf_sigma(w, d, "svd", 1)[0]
    scale, moved = spectral_scale(sigma, max_value, mode)
    return apply_scale(w, broadcast_batch(scale, w.shape, d)), broadcast_batch(moved, w.shape, d), sigma


def project_spectral_norm(
    params: PyTree, max_value: Any, *, mode: str = "clip", dims: Dims = None, where: Where = None
) -> PyTree:
    r"""Exact spectral-norm projection of every selected matrix (SVD in float32/64).

    Each selected leaf is viewed as a stack of matrices :math:`W` (``dims``: rows = all axes
    but the last and columns = the last by default, the reshaped kernel of Miyato et al.
    2018; a :class:`MatrixDims` makes other axes batch axes, each with its own sigma). With
    :math:`W = U \operatorname{diag}(s) V^\top` and :math:`c` = ``max_value``:

    - ``"clip"``: :math:`U \operatorname{diag}(\min(s, c)) V^\top`, the Euclidean (Frobenius)
      projection onto :math:`\{W : \sigma_{\max}(W) \le c\}`;
    - ``"rescale"``: :math:`W \min(1, c / s_1)`;
    - ``"normalize"``: :math:`W c / s_1` (spectral normalization; zero matrices stay zero).

    A leaf that ``dims`` maps to a :class:`ConvSpec` (see :func:`spectral_norm`) is scaled by
    the exact operator norm of its convolution; ``"clip"`` on it is the Fourier clip of
    :func:`conv_clip` and needs circular padding.

    Matrices already inside the ball (``clip``, ``rescale``) come back bit for bit. The SVD
    needs the whole matrix, so a sharded leaf is gathered for it; the result keeps the
    leaf's sharding. ``where`` as in :func:`project_max_norm`.

    >>> import jax.numpy as jnp, normjax as nj
    >>> w = jnp.array([[4.0, 0.0], [0.0, 1.0]])
    >>> nj.project_spectral_norm({"w": w}, 2.0)["w"]
    Array([[2., 0.],
           [0., 1.]], dtype=float32)
    >>> nj.project_spectral_norm({"w": w}, 2.0, mode="rescale")["w"]
    Array([[2. , 0. ],
           [0. , 0.5]], dtype=float32)

    References:
      Miyato et al., "Spectral normalization for generative adversarial networks", ICLR 2018.
    """
    name = "project_spectral_norm"
    check_scalar(max_value, "max_value", name, positive=True)
    check_mode(mode, name)
    treedef, leaves = select(params, where, name)
    out = []
    for leaf in leaves:
        if leaf.selected:
            d = resolve_spec(dims, leaf.path, leaf.value, name)
            check_conv(d, leaf.path, name, estimator="svd", mode=mode)
            leaf = project_spectral_leaf(jnp.asarray(leaf.value), max_value, mode, d)[0]
        else:
            leaf = leaf.value
        out.append(leaf)
    return treedef.unflatten(out)


def spectral_norms(
    params: PyTree,
    *,
    estimator: str = "svd",
    num_iters: int = 8,
    dims: Dims = None,
    where: Where = None,
) -> dict[str, jax.Array]:
    """The largest singular value of every selected matrix, keyed by leaf path.

    ``estimator="svd"`` is exact; ``"gram"`` is the certified upper bound of
    :func:`sigma_gram` with ``num_iters`` iterations. Each value has the leaf's batch shape.
    ``dims`` as in :func:`spectral_norm`: leaves mapped to a :class:`ConvSpec` report the
    operator norm of their convolution (:func:`conv_sigma_gram`, or exact: the FFT for
    circular padding, the materialised operator otherwise).

    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.spectral_norms({"a": {"kernel": 2 * jnp.eye(3)}, "b": {"bias": jnp.ones(3)}})
    {'a/kernel': Array(2., dtype=float32)}
    """
    name = "spectral_norms"
    if estimator not in ("svd", "gram"):
        raise ValueError(f"{name}: estimator must be 'svd' or 'gram', got {estimator!r}")
    _, leaves = select(params, where, name)
    out = {}
    for leaf in leaves:
        if leaf.selected:
            d = resolve_spec(dims, leaf.path, leaf.value, name)
            check_conv(d, leaf.path, name, estimator=estimator)
            out[leaf.path] = leaf_sigma(jnp.asarray(leaf.value), d, estimator, num_iters)[0]
    return out


def lipschitz_bound(
    params: PyTree,
    *,
    estimator: str = "gram",
    num_iters: int = 8,
    dims: Dims = None,
    where: Where = None,
) -> jax.Array:
    r"""Certified Lipschitz bound (L2 to L2) of a feed-forward stack of the selected layers.

    For :math:`f = \phi_K \circ A_K \circ \dots \circ \phi_1 \circ A_1` with affine layers
    :math:`A_k(x) = x W_k + b_k` and 1-Lipschitz activations :math:`\phi_k` (ReLU, tanh,
    GroupSort, ...), :math:`\mathrm{Lip}(f) \le \prod_k \sigma_{\max}(W_k)`. This returns that
    product over every selected matrix (every batch index too, as for layers stacked for
    ``scan``), each factor a certified upper bound from Gram iteration (``"gram"``) or the
    exact value (``"svd"``). Biases are not selected by default and do not matter.

    It is a bound for a *sequential* network whose linear layers are exactly the selected
    leaves. Convolution kernels need ``dims`` rules mapping them to a :class:`ConvSpec`, so
    their factor is the operator norm of the convolution (:func:`conv_sigma_gram` or exact);
    a kernel left to the default matrix view contributes the reshaped-kernel sigma, which is
    *not* a bound on the convolution and makes the product no certificate. It does not cover
    residual connections (use :math:`\prod (1 + L_k)`) or attention. Flatten, ReLU, max
    pooling and average pooling (norm at most 1) can sit between the layers.

    >>> import jax.numpy as jnp, normjax as nj
    >>> params = {"l1": {"kernel": 2 * jnp.eye(3)}, "l2": {"kernel": 0.5 * jnp.ones((3, 1))}}
    >>> round(float(nj.lipschitz_bound(params, estimator="svd")), 4)   # 2 * 0.5 * sqrt(3)
    1.7321
    """
    sigmas = spectral_norms(params, estimator=estimator, num_iters=num_iters, dims=dims, where=where)
    bound = jnp.ones((), jnp.float32)
    for s in sigmas.values():
        bound = bound * jnp.prod(s.astype(jnp.float32))
    return bound
