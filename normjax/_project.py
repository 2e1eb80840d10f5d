"""Pure projections over parameter pytrees: the same maths as the transforms, no state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normjax._checks import SPECTRAL_MODES, check_min_max, check_scalar, choice, poison, positive_int, runtime_valid
from normjax._norms import Split, acc_dtype, apply_scale, band_scale, scaled_update, spectral_scale, unit_norms
from normjax._select import Axis, PyTree, Where
from normjax._shard import spec_of
from normjax._views import View, leaf_views


def _scaled_leaf(w: jax.Array, scales: jax.Array, j: int) -> jax.Array:
    """:func:`apply_scale` of one leaf by its factors ``scales[j]`` (``scales``: the factors of
    its group of same-shaped leaves, stacked); on CPU behind a ``cond`` that returns the leaf as
    it is when no factor moves it (a trained model's usual step), with no pass over it.

    Adam then this projection on the GPT-2-small tree (85M float32 parameters, donated): 3.44x
    Adam's step with the select alone, 1.46x with the cond (``benchmarks/RESULTS.md``). The
    identity is the cond's false branch on purpose: as the true one, XLA:CPU copies the leaf
    into the cond's result. The stacked factors enter the cond whole and are sliced inside, so
    XLA does not fuse a copy of the group's per-unit arithmetic into each leaf. TPU keeps the
    select: its cost model charges the cond form more bytes (Adam + this projection on the
    issue's tree: 685.4 against 658.3 MiB, donated 1009.2 against 757.1 MiB).
    """

    def cpu(w, scales):
        return jax.lax.cond(jnp.any(scales[j] != 1), lambda w, s: apply_scale(w, s[j]), lambda w, s: w, w, scales)

    return jax.lax.platform_dependent(w, scales, cpu=cpu, default=lambda w, s: apply_scale(w, s[j]))


def _map_units(
    params: PyTree, name: str, bounds: tuple[Any, Any, Any], *, where: Where, axis: Axis, views: PyTree | None
) -> PyTree:
    """Every selected leaf's units moved into the band ``bounds = (min_value, max_value, rate)``.

    Leaves of one shape, dtype, unit axes and sharding (a model's repeated blocks) form a group:
    each leaf's norms are its own reduction, the per-unit factors (:func:`band_scale`) are
    computed once for the group's stacked norms, as the transforms do."""
    treedef, leaves = leaf_views(params, name, where=where, views=views, axis=axis)
    ok = runtime_valid(*bounds)
    out = [v for _, v, _ in leaves]
    groups: dict[Any, list[int]] = {}
    for i, (_, v, view) in enumerate(leaves):
        if view is not None:
            w = jnp.asarray(v)
            groups.setdefault((w.shape, w.dtype, view.unit_axes, spec_of(w)), []).append(i)
    for idx in groups.values():
        ws = [jnp.asarray(leaves[i][1]) for i in idx]
        norms = [unit_norms(w, leaves[idx[0]][2].unit_axes, split=True) for w in ws]
        scales = poison(band_scale(Split.stack(norms), *bounds)[0], ok)
        for j, i in enumerate(idx):
            out[i] = _scaled_leaf(ws[j], scales, j)
    return treedef.unflatten(out)


def project_max_norm(
    params: PyTree, max_value: Any, *, axis: Axis = None, where: Where = None, views: PyTree | None = None
) -> PyTree:
    r"""Projects every selected unit onto the L2 ball of radius ``max_value``.

    For each unit :math:`w` (a slice of a leaf: one output unit's fan-in),

    .. math:: w' = w \cdot \min\!\left(1, \frac{c}{\lVert w \rVert_2}\right),

    the Euclidean projection onto :math:`\{w : \lVert w \rVert_2 \le c\}`: the max-norm
    constraint of Srebro & Shraibman (2005) used with dropout by Srivastava et al. (2014).
    Units already inside come back unchanged bit for bit (Keras's ``MaxNorm`` divides by
    ``norm + epsilon`` and shrinks them slightly; this does not). Zero units stay zero.

    Args:
      params: a pytree of arrays.
      max_value: the radius ``c > 0``.
      axis: the manual override: axes forming one unit. ``None``: all axes but the last, i.e.
        the fan-in vector of each output unit in Flax's ``(in, out)`` and ``(h, w, in, out)``
        layouts (Keras's ``MaxNorm(axis=0)`` default bounds the wrong slices of a conv kernel:
        use ``axis=[0, 1, 2]`` there, or ``None`` here). ``-1`` on an embedding table bounds
        each row, as ``torch.nn.Embedding(max_norm=...)`` does. A callable
        ``(path, leaf) -> axes`` gives a per-leaf rule.
      where: which leaves. ``None``: with ``views``, every matrix, convolution and embedding;
        without, floating leaves with ``ndim >= 2`` whose last path entry is not ``bias``,
        ``b`` or ``scale``. A regex matching whole path components of ``"a/b/kernel"``; a
        callable ``(path, leaf) -> bool``; or a pytree of bools (optax's mask convention).
      views: a pytree shaped like params from :func:`infer_views`: each unit is then the
        true fan-in of one output unit in every layout (Equinox ``(out, in)``, attention
        ``(d, heads, head_dim)``, stacked ``(L, in, out)``, conv kernels, embedding rows).

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
    return _map_units(params, name, (None, max_value, None), where=where, axis=axis, views=views)


def project_unit_norm(
    params: PyTree, *, axis: Axis = None, where: Where = None, views: PyTree | None = None
) -> PyTree:
    r"""Scales every selected non-zero unit to unit L2 norm: :math:`w' = w / \lVert w \rVert_2`.

    Zero units stay zero (their direction is undefined). ``axis``, ``where`` and ``views`` as
    in :func:`project_max_norm`. Keras's ``UnitNorm`` divides by ``norm + epsilon``; this
    divides by the norm itself.

    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.project_unit_norm({"w": jnp.array([[3.0, 0.0], [4.0, 0.0]])})["w"]
    Array([[0.6, 0. ],
           [0.8, 0. ]], dtype=float32)
    """
    name = "project_unit_norm"
    return _map_units(params, name, (1.0, 1.0, None), where=where, axis=axis, views=views)


def project_min_max_norm(
    params: PyTree,
    min_value: Any,
    max_value: Any,
    *,
    rate: Any = 1.0,
    axis: Axis = None,
    where: Where = None,
    views: PyTree | None = None,
) -> PyTree:
    r"""Moves every selected unit's norm toward ``[min_value, max_value]`` (Keras ``MinMaxNorm``).

    With :math:`n = \lVert w \rVert_2` and rate :math:`r \in [0, 1]`,

    .. math:: w' = w \cdot \frac{r\,\mathrm{clip}(n, a, b) + (1 - r)\,n}{n},

    so ``rate=1`` is the exact projection onto the shell :math:`a \le n \le b` and a smaller
    rate moves each norm part of the way each time it is applied, as Keras's ``rate`` does.
    Units already inside the shell, and zero units, come back unchanged bit for bit.
    ``axis``, ``where`` and ``views`` as in :func:`project_max_norm`.

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
    check_min_max(min_value, max_value, rate, name)
    return _map_units(params, name, (min_value, max_value, rate), where=where, axis=axis, views=views)


def project_spectral_leaf(w: jax.Array, max_value: Any, mode: str, view: View, sigma: jax.Array | None = None):
    """Projects one leaf given its sigma per batch index (computed exactly when ``None``).

    Returns ``(w_new, scale_or_none, sigma)``: the projected leaf and, for the rescaling modes,
    the per-matrix factor (``None`` for ``"clip"``).
    """
    ok = runtime_valid(max_value=max_value)
    if mode == "clip":
        w_new, sigma = view.clip(w, max_value)
        return poison(w_new, ok), None, sigma
    if sigma is None:
        sigma = view.sigma(w, "svd", 1)[0]
    scale, _ = spectral_scale(sigma, max_value, mode)
    return apply_scale(w, view.broadcast(poison(scale, ok), w.shape)), scale, sigma


def _certified_round(t: jax.Array, dtype: Any, max_value: Any, view: View, num_iters: int) -> jax.Array:
    r"""``t`` (any dtype) scaled by ``f`` and rounded to ``dtype`` with :math:`\sigma \le c` for sure.

    With :math:`\hat\sigma` the Gram bound of ``t`` (accumulation dtype) and the rounding
    :math:`E = \mathrm{round}(f t) - f t` of at most :math:`(\epsilon/2 + u)|f t_i|` per entry
    (to nearest in ``dtype``, the product in the accumulation dtype),
    :math:`\sigma(\mathrm{round}(ft)) \le f\hat\sigma + g \lVert E\rVert_F \le f(\hat\sigma +
    g(\epsilon/2 + u)\lVert t\rVert_F)`, so :math:`f = \min(1, c / (\ldots))` (rounded down)
    lands at or below :math:`c` (``g``: the view's gain, 1 for a matrix). Matrices whose bound is
    already at most :math:`c` only get the rounding to ``dtype`` accounted for.
    """
    acc = acc_dtype(t.dtype)
    t = t.astype(acc)
    bound, _ = view.sigma(t, "gram", num_iters)
    axes = tuple(a for a in range(t.ndim) if a not in view.batch)
    fro = jnp.sqrt(jnp.sum(jnp.square(t), axis=axes)).reshape(bound.shape)
    eps_out = float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else 0.0
    u = float(jnp.finfo(acc).eps) / 2
    n = int(np.prod(t.shape))
    err = view.gain * (eps_out / 2 + u) * fro * (1 + (n + 4) * u)
    denom = (bound + err) * (1 + 4 * u)
    f = jnp.where(denom > max_value, max_value / jnp.where(denom > 0, denom, 1) * (1 - 4 * u), 1.0)
    return (t * view.broadcast(f.astype(acc), t.shape)).astype(dtype)


def project_spectral_norm(
    params: PyTree,
    max_value: Any,
    *,
    mode: str = "clip",
    estimator: str = "svd",
    num_iters: int | None = None,
    certify: bool = False,
    dims: Any = None,
    where: Where = None,
    views: PyTree | None = None,
) -> PyTree:
    r"""Spectral-norm projection of every selected matrix.

    Each selected leaf is viewed as a stack of matrices :math:`W` (from ``views``, or
    ``dims``: rows = all axes but the last and columns = the last by default, the reshaped
    kernel of Miyato et al. 2018; a :class:`MatrixDims` makes other axes batch axes, each
    with its own sigma). With :math:`W = U \operatorname{diag}(s) V^\top` and
    :math:`c` = ``max_value``:

    - ``"clip"``: :math:`U \operatorname{diag}(\min(s, c)) V^\top`, the Euclidean (Frobenius)
      projection onto :math:`\{W : \sigma_{\max}(W) \le c\}`: exact by SVD
      (``estimator="svd"``), or by matmuls only (``estimator="matmul"``, :func:`spectral_clip`);
    - ``"orthogonalize"``: :math:`c\,UV^\top` (SVD, or :func:`msign` with ``"matmul"``);
    - ``"rescale"``: :math:`W \min(1, c / s_1)`;
    - ``"normalize"``: :math:`W c / s_1` (spectral normalization; zero matrices stay zero);
    - ``"soft_cap"``: :func:`spectral_soft_cap` with the exact :math:`s_1` as its bound.

    ``certify=True`` bounds each changed matrix (in its own dtype) by Gram iteration and scales
    it onto :math:`c` with a rounding margin where the bound is above: :math:`\sigma \le c`
    for sure. A leaf whose view is a :class:`ConvSpec` (inferred, or from ``dims`` rules) is
    scaled by the exact operator norm of its convolution; ``"clip"`` on it is the Fourier clip
    of :func:`conv_clip` and needs circular padding; the matmul modes refuse it.

    Matrices already inside the ball (``clip``, ``rescale``) come back bit for bit. The SVD
    needs the whole matrix, so a sharded leaf is gathered for it; the result keeps the
    leaf's sharding. ``where`` and ``views`` as in :func:`project_max_norm`; ``dims`` as in
    :func:`spectral_norm`.

    >>> import jax.numpy as jnp, normjax as nj
    >>> w = jnp.array([[4.0, 0.0], [0.0, 1.0]])
    >>> nj.project_spectral_norm({"w": w}, 2.0)["w"]
    Array([[2., 0.],
           [0., 1.]], dtype=float32)
    >>> nj.project_spectral_norm({"w": w}, 2.0, mode="rescale")["w"]
    Array([[2. , 0. ],
           [0. , 0.5]], dtype=float32)
    >>> bool(jnp.allclose(nj.project_spectral_norm({"w": w}, 2.0, estimator="matmul")["w"], jnp.diag(jnp.array([2.0, 1.0])), atol=1e-5))
    True

    References:
      Miyato et al., "Spectral normalization for generative adversarial networks", ICLR 2018.
      Amsel, Persson, Musco & Gower, "The Polar Express", 2025 (the matmul iterations).
    """
    from normjax._transforms import CERTIFY_GRAM_ITERS, DEFAULT_NUM_ITERS, check_spectral_combination

    name = "project_spectral_norm"
    check_scalar(max_value, "max_value", name, positive=True)
    choice(mode, SPECTRAL_MODES, "mode", name)
    choice(estimator, ("svd", "matmul"), "estimator", name)
    if mode == "hammer":
        raise ValueError(f"{name}: mode='hammer' needs the power vectors kept in spectral_norm's state; use the transform")
    if estimator == "svd" and mode not in ("clip", "orthogonalize", "rescale", "normalize", "soft_cap"):  # pragma: no cover
        raise ValueError(f"{name}: unknown mode {mode!r}")
    check_spectral_combination(name, mode, estimator, certify)
    iters = positive_int(DEFAULT_NUM_ITERS[estimator] if num_iters is None else num_iters, "num_iters", name)
    treedef, leaves = leaf_views(params, name, where=where, views=views, dims=dims, purpose="spectral")
    out = []
    for path, v, view in leaves:
        if view is None:
            out.append(v)
            continue
        view.check(path, name, estimator if estimator == "matmul" else "svd", mode)
        if certify:
            view.check(path, name, "gram", None)
        w = jnp.asarray(v)
        ok = runtime_valid(max_value=max_value)
        if mode in ("clip", "rescale", "normalize") and estimator == "svd":
            w_new = project_spectral_leaf(w, max_value, mode, view)[0]
        elif mode == "orthogonalize" and estimator == "svd":
            w_new = poison(view.orthogonalize_svd(w, max_value), ok).astype(w.dtype)
        elif mode == "soft_cap":
            sigma = view.sigma(w, "svd", 1)[0]
            w_new = poison(view.matmul(w, max_value, "soft_cap", 0, bound=sigma)[0], ok).astype(w.dtype)
        else:
            w_new = poison(view.matmul(w, max_value, mode, iters)[0], ok).astype(w.dtype)
        if certify:
            w_new = _certified_round(w_new, w.dtype, max_value, view, CERTIFY_GRAM_ITERS)
        out.append(w_new)
    return treedef.unflatten(out)


def spectral_norms(
    params: PyTree,
    *,
    estimator: str = "svd",
    num_iters: int = 8,
    dims: Any = None,
    where: Where = None,
    views: PyTree | None = None,
) -> PyTree:
    """The largest singular value of every selected matrix, as a pytree shaped like params.

    ``estimator="svd"`` is exact; ``"gram"`` is the certified upper bound of
    :func:`sigma_gram` with ``num_iters`` iterations. Each value has the leaf's batch shape
    (one per stacked layer); unselected leaves are ``None``. Leaves whose view is a
    :class:`ConvSpec` report the operator norm of their convolution (:func:`conv_sigma_gram`,
    or exact: the FFT for circular padding, the materialised operator otherwise).
    ``dims``, ``where`` and ``views`` as in :func:`project_spectral_norm`.

    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.spectral_norms({"a": {"kernel": 2 * jnp.eye(3)}, "b": {"bias": jnp.ones(3)}})
    {'a': {'kernel': Array(2., dtype=float32)}, 'b': {'bias': None}}
    """
    name = "spectral_norms"
    choice(estimator, ("svd", "gram"), "estimator", name)
    iters = positive_int(num_iters, "num_iters", name)
    treedef, leaves = leaf_views(params, name, where=where, views=views, dims=dims, purpose="spectral")
    out = []
    for path, v, view in leaves:
        if view is not None:
            view.check(path, name, estimator)
            out.append(view.sigma(jnp.asarray(v), estimator, iters)[0])
        else:
            out.append(None)
    return treedef.unflatten(out)


def lipschitz_bound(
    params: PyTree,
    *,
    estimator: str = "gram",
    num_iters: int = 8,
    dims: Any = None,
    where: Where = None,
    views: PyTree | None = None,
) -> jax.Array:
    r"""Certified Lipschitz bound (L2 to L2) of a feed-forward stack of the selected layers.

    For :math:`f = \phi_K \circ A_K \circ \dots \circ \phi_1 \circ A_1` with affine layers
    :math:`A_k(x) = x W_k + b_k` and 1-Lipschitz activations :math:`\phi_k` (ReLU, tanh,
    GroupSort, ...), :math:`\mathrm{Lip}(f) \le \prod_k \sigma_{\max}(W_k)`. This returns that
    product over every selected matrix and convolution (every batch index too, as for layers
    stacked for ``scan``), each factor a certified upper bound from Gram iteration
    (``"gram"``) or the exact value (``"svd"``). Biases, scales and embeddings are never
    factors; the result is in float32 (float64 when a factor is float64), rounded up so
    rounding in the product cannot take it below the exact product of the factors.

    With ``views`` from :func:`infer_views`, each factor is the true operator: a convolution's
    operator norm, an attention projection's whole matrix, one sigma per stacked layer.
    Without views, convolution kernels need ``dims`` rules mapping them to a
    :class:`ConvSpec`; a leaf of 3 or more axes left to the shape default raises (its reshaped
    matrix is not a bound on a convolution), as does an empty selection.

    It is a bound for a *sequential* network whose linear layers are exactly the selected
    leaves, with 1-Lipschitz steps between them (flatten, ReLU, non-overlapping max or
    average pooling). It does not cover residual connections, overlapping pooling (a max
    pool whose windows cover an element ``m`` times stretches by up to :math:`\sqrt m`),
    activations steeper than 1 (gelu: 1.13) or attention: for the network as it runs use
    :func:`lipschitz_certificate`, which reads all of that from the model's graph.

    >>> import jax.numpy as jnp, normjax as nj
    >>> params = {"l1": {"kernel": 2 * jnp.eye(3)}, "l2": {"kernel": 0.5 * jnp.ones((3, 1))}}
    >>> round(float(nj.lipschitz_bound(params, estimator="svd")), 4)   # 2 * 0.5 * sqrt(3)
    1.7321
    """
    name = "lipschitz_bound"
    choice(estimator, ("svd", "gram"), "estimator", name)
    iters = positive_int(num_iters, "num_iters", name)
    _, leaves = leaf_views(params, name, where=where, views=views, dims=dims, purpose="spectral")
    factors = []
    for path, v, view in leaves:
        if view is None or not view.certifies:
            continue
        if getattr(view, "guessed", False):
            raise ValueError(
                f"{name}: leaf {path!r} of shape {np.shape(v)} has no convolution or explicit matrix view; "
                f"the sigma of its reshaped kernel is no bound on a convolution. Pass views=infer_views(...), "
                f"or dims={{{path.rsplit('/', 1)[0]!r}: ConvSpec(...) or MatrixDims(...)}}"
            )
        view.check(path, name, estimator)
        factors.append(view.sigma(jnp.asarray(v), estimator, iters)[0])
    if not factors:
        raise ValueError(f"{name}: no matrix or convolution selected: there is no bound to give")
    dtype = jnp.result_type(*[f.dtype for f in factors])
    bound = jnp.ones((), dtype)
    count = 0
    for f in factors:
        bound = bound * jnp.prod(f.astype(dtype))
        count += max(int(np.prod(f.shape)), 1)
    # each of the `count` products rounds to nearest (relative error <= eps/2): (1 + eps)^count
    # bounds their compound, so multiplying by it keeps the result above the exact product
    eps = float(np.finfo(dtype).eps)
    return bound * jnp.asarray((1 + eps) ** count * (1 + eps), dtype)
