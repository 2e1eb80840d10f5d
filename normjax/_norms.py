"""Array-level norms: per-unit L2 norms and the band projection behind the max-norm family."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normjax._shard import auto_where_explicit, batch_spec, like


def acc_dtype(dtype: Any) -> np.dtype:
    """Dtype norms accumulate in: float64 for float64 leaves, float32 for everything else."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def unit_norms(w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    r"""L2 norm of every unit of ``w``: :math:`n = \sqrt{\sum_{i \in \text{axes}} w_i^2}`.

    Reduces ``axes`` with ``keepdims=True`` and accumulates in float32 (float64 for
    float64 input). ``axes`` is a tuple of ints (use ``resolve_axes`` for the ``axis=`` rules).
    The gradient is finite (zero) at a zero unit: the square root is only taken of non-zero
    sums. A unit holding a NaN has norm NaN, never 0.

    >>> import jax.numpy as jnp
    >>> unit_norms(jnp.array([[3.0, 0.0], [4.0, 0.0]]), (0,))
    Array([[5., 0.]], dtype=float32)
    """
    w = jnp.asarray(w)
    acc = acc_dtype(w.dtype)
    x = w.astype(acc)

    def safe_sqrt(sq):
        zero = sq == 0  # NaN stays NaN (a diverged unit must show in the logs), zero stays zero
        return jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, sq)))

    sq = jnp.sum(x * x, axis=axes, keepdims=True)
    if sq.size == 0:
        return safe_sqrt(sq)

    def rescaled(_):
        # Only taken when a sum of squares overflowed, went subnormal or is zero: divide each
        # unit by its largest magnitude first (one more pass over the leaf, paid only then).
        m = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
        ms = jnp.where(m > 0, m, 1)
        y = x / ms
        return m * safe_sqrt(jnp.sum(y * y, axis=axes, keepdims=True))

    small = float(np.finfo(acc).tiny) * 2.0**24
    # sq == 0 also goes the careful way: a unit of entries below 1e-23 squares to exactly 0.
    out_of_range = jnp.any(jnp.isinf(sq) | (sq < small))
    return jax.lax.cond(out_of_range, rescaled, lambda _: safe_sqrt(sq), None)


def band_project(
    w: jax.Array,
    axes: tuple[int, ...],
    min_value: Any | None,
    max_value: Any,
    rate: Any | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Moves every unit's norm into ``[min_value, max_value]``, keeping its direction.

    With :math:`n` the unit's L2 norm over ``axes`` and :math:`r` the rate,

    .. math::
       t = r\,\mathrm{clip}(n, a, b) + (1 - r)\,n, \qquad
       w' = \begin{cases} w\,t/n & n > 0,\ n \notin [a, b],\ r > 0 \\
                          w & \text{otherwise (bit for bit)} \end{cases}

    ``min_value=None`` means no lower bound and ``rate=None`` means 1, so
    ``band_project(w, axes, None, c)`` is the max-norm projection :math:`w \min(1, c/n)`.
    A zero unit stays zero (its direction is undefined).

    Returns ``(w_new, norms, moved)``: the projected array (dtype of ``w``), the norms
    before projection (keepdims, float32/float64) and a bool mask of the units moved.

    >>> import jax.numpy as jnp
    >>> w_new, n, moved = band_project(jnp.array([[3.0, 0.3], [4.0, 0.4]]), (0,), None, 1.0)
    >>> w_new
    Array([[0.6, 0.3],
           [0.8, 0.4]], dtype=float32)
    >>> moved
    Array([[ True, False]], dtype=bool)
    """
    w = jnp.asarray(w)
    n = unit_norms(w, axes)
    scale, moved = band_scale(n, min_value, max_value, rate)
    return apply_scale(w, scale), n, moved


def band_scale(n: jax.Array, min_value: Any | None, max_value: Any, rate: Any | None = None):
    """Per-unit factor of :func:`band_project` from the norms ``n``: ``(scale, moved)``.

    ``scale`` is exactly 1 where ``moved`` is False, so multiplying by it leaves those units
    bit for bit as they were (a multiply, not a per-element select, is what XLA fuses best).
    """
    acc = n.dtype
    b = jnp.asarray(max_value, acc)
    if min_value is None:
        clipped = jnp.minimum(n, b)
        outside = n > b
    else:
        a = jnp.asarray(min_value, acc)
        clipped = jnp.clip(n, a, b)
        outside = (n > 0) & ((n < a) | (n > b))
    if rate is None:
        target, moved = clipped, outside
    else:
        r = jnp.asarray(rate, acc)
        target = r * clipped + (1 - r) * n
        moved = outside & (r > 0)
    return jnp.where(moved, target / jnp.where(moved, n, 1), 1), moved


def apply_scale(w: jax.Array, scale: jax.Array) -> jax.Array:
    """``w * scale`` computed in the scale's (accumulation) dtype, returned in ``w``'s dtype."""
    return (w.astype(scale.dtype) * scale).astype(w.dtype)


def scaled_update(p: jax.Array, u: jax.Array, scale: jax.Array) -> jax.Array:
    r"""The update :math:`u'` with :math:`p + u' = (p + u) \cdot s`: :math:`u' = u s + p (s - 1)`.

    Where :math:`s = 1` it is :math:`u` itself (up to the sign of a zero), so ``p + u'`` is
    bit for bit what the optimizer alone gives; ``p + u`` is never materialised, which saves
    XLA a full-size temporary per leaf.
    """
    acc = scale.dtype
    return (u.astype(acc) * scale + p.astype(acc) * (scale - 1)).astype(u.dtype)


# --------------------------------------------------------------------------------------------
# Spectral norm: every estimator works on the matrix view of a leaf given by ResolvedDims
# (batch axes, row axes, column axes), batched over the batch axes.
# --------------------------------------------------------------------------------------------

HIGHEST = jax.lax.Precision.HIGHEST


def _dims(w: Any, dims: Any, name: str):
    from normjax._select import resolve_dims  # local: _select imports nothing from here

    return resolve_dims(dims, "<array>", w, name) if not hasattr(dims, "batch") else dims


def _batch_shape(w: jax.Array, d) -> tuple[int, ...]:
    return tuple(w.shape[a] for a in d.batch)


def _to_stack(w: jax.Array, d) -> jax.Array:
    """``(batch..., rows..., cols...)`` view reshaped to ``(B, R, C)``."""
    x = jnp.transpose(w, d.batch + d.rows + d.cols)
    b = int(np.prod([w.shape[a] for a in d.batch], dtype=np.int64))
    r = int(np.prod([w.shape[a] for a in d.rows], dtype=np.int64))
    return x.reshape(b, r, -1)


def _from_stack(x: jax.Array, w_shape: tuple[int, ...], d) -> jax.Array:
    perm = d.batch + d.rows + d.cols
    x = x.reshape(tuple(w_shape[a] for a in perm))
    return jnp.transpose(x, np.argsort(perm))


def broadcast_batch(s: jax.Array, w_shape: tuple[int, ...], d) -> jax.Array:
    """Reshapes a per-matrix value of shape ``batch_shape`` so it broadcasts against the leaf."""
    return s.reshape(tuple(w_shape[a] if a in d.batch else 1 for a in range(len(w_shape))))


def _matvec(w: jax.Array, u: jax.Array, d) -> jax.Array:
    """``W u`` per batch index, straight on the leaf's layout (no transpose is materialised)."""
    nb = len(d.batch)
    dn = ((d.cols, tuple(range(nb, nb + len(d.cols)))), (d.batch, tuple(range(nb))))
    return jax.lax.dot_general(w, u, dn, precision=HIGHEST, preferred_element_type=u.dtype)


def _rmatvec(w: jax.Array, v: jax.Array, d) -> jax.Array:
    """``W^T v`` per batch index, straight on the leaf's layout."""
    nb = len(d.batch)
    dn = ((d.rows, tuple(range(nb, nb + len(d.rows)))), (d.batch, tuple(range(nb))))
    return jax.lax.dot_general(w, v, dn, precision=HIGHEST, preferred_element_type=v.dtype)


def _vec_norm(x: jax.Array, nb: int) -> jax.Array:
    sq = jnp.sum(x * x, axis=tuple(range(nb, x.ndim)))
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1)), 0)


def init_power_vector(key: jax.Array, w: Any, dims: Any = None) -> jax.Array:
    """A random unit right-singular-vector guess, shape ``batch_shape + col_shape``, float32/64.

    >>> import jax, jax.numpy as jnp
    >>> init_power_vector(jax.random.key(0), jnp.ones((5, 3))).shape
    (3,)
    """
    d = _dims(w, dims, "init_power_vector")
    shape = tuple(np.shape(w)[a] for a in d.batch + d.cols)
    u = jax.random.normal(key, shape, acc_dtype(jnp.result_type(w)))
    return u / _vec_norm(u, len(d.batch)).reshape(u.shape[: len(d.batch)] + (1,) * len(d.cols))


def sigma_power(
    w: jax.Array, u: jax.Array, *, num_iters: int = 1, dims: Any = None
) -> tuple[jax.Array, jax.Array]:
    r"""Largest singular value by power iteration, warm-started from ``u``.

    Each iteration reads the matrix twice: :math:`v = W u / \lVert W u\rVert`,
    :math:`u = W^\top v / \lVert W^\top v \rVert`, and the estimate is
    :math:`\hat\sigma = \lVert W^\top v \rVert = v^\top W u_{\text{new}} \le \sigma_{\max}(W)`
    (a lower bound: it under-estimates until ``u`` has converged). The products run on the
    leaf's own layout with ``dot_general`` at ``Precision.HIGHEST``, so a sharded matrix is
    never gathered. A zero matrix gives :math:`\hat\sigma = 0` and keeps ``u``.

    Args:
      w: the leaf. ``dims`` (``None``, a ``MatrixDims``) picks its rows and columns.
      u: the previous right vector, shape ``batch_shape + col_shape``
        (:func:`init_power_vector` makes the first one).
      num_iters: iterations, ``>= 1``.

    Returns:
      ``(sigma, u)``: the estimate, shape ``batch_shape``, and the new unit vector.

    >>> import jax, jax.numpy as jnp
    >>> w = jnp.diag(jnp.array([3.0, 1.0]))
    >>> u0 = init_power_vector(jax.random.key(0), w)
    >>> sigma, u = sigma_power(w, u0, num_iters=30)
    >>> round(float(sigma), 5)
    3.0

    References:
      Miyato et al., "Spectral normalization for generative adversarial networks", ICLR 2018.
    """
    if int(num_iters) < 1:
        raise ValueError(f"sigma_power: num_iters must be >= 1, got {num_iters}")
    w, u = jnp.asarray(w), jnp.asarray(u)
    d = _dims(w, dims, "sigma_power")

    def body(w, u):
        x = w.astype(acc_dtype(w.dtype))
        return power_loop(lambda u: _matvec(x, u, d), lambda v: _rmatvec(x, v, d), u, len(d.batch), num_iters, x.dtype)

    return auto_where_explicit(body, (w, u), lambda: (batch_spec(w, d.batch), like(u)))


def power_loop(apply, apply_t, u: jax.Array, nb: int, num_iters: int, acc: Any) -> tuple[jax.Array, jax.Array]:
    """Power iteration on any linear map given ``apply`` (``A u``) and ``apply_t`` (``A^T v``).

    ``u`` has ``nb`` leading batch axes (one operator each). Returns ``(sigma, u)`` with
    ``sigma = ||A^T v||`` for the normalised ``v = A u / ||A u||``; a zero operator gives 0
    and keeps ``u``. Up to 4 iterations are unrolled (what a training step runs).
    """
    u = jnp.asarray(u).astype(acc)
    bshape = lambda s, t: s.reshape(s.shape + (1,) * (t.ndim - nb))

    def body(_, carry):
        _, u = carry
        v = apply(u)
        nv = _vec_norm(v, nb)
        v = v / bshape(jnp.where(nv > 0, nv, 1), v)
        t = apply_t(v)
        sigma = _vec_norm(t, nb)
        pos = sigma > 0
        return sigma, jnp.where(bshape(pos, t), t / bshape(jnp.where(pos, sigma, 1), t), u)

    carry = (jnp.zeros(u.shape[:nb], acc), u)
    if int(num_iters) <= 4:  # unrolled: what a training step uses
        for i in range(int(num_iters)):
            carry = body(i, carry)
        return carry
    return jax.lax.fori_loop(0, int(num_iters), body, carry)


def sigma_svd(w: jax.Array, *, dims: Any = None) -> jax.Array:
    """Exact largest singular value per batch index (SVD in float32/64), shape ``batch_shape``.

    >>> import jax.numpy as jnp
    >>> float(sigma_svd(jnp.array([[3.0, 0.0], [0.0, -4.0]])))
    4.0
    """
    w = jnp.asarray(w)
    d = _dims(w, dims, "sigma_svd")

    def body(w):
        x = _to_stack(w.astype(acc_dtype(w.dtype)), d)
        return jnp.linalg.svd(x, compute_uv=False)[:, 0].reshape(_batch_shape(w, d))

    return auto_where_explicit(body, (w,), lambda: batch_spec(w, d.batch))


def gram_margin(n: int, dtype: Any) -> float:
    """Relative margin added to a Gram bound to cover floating-point rounding (see sigma_gram)."""
    return 4.0 * float(np.sqrt(max(n, 1))) * float(np.finfo(dtype).eps)


def sigma_gram(w: jax.Array, *, num_iters: int = 8, dims: Any = None) -> jax.Array:
    r"""Certified upper bound on the largest singular value by Gram iteration.

    With :math:`G_0 = W` and :math:`G_{t+1} = G_t^\top G_t`, the singular values of
    :math:`G_t` are :math:`\sigma_i^{2^t}`, so

    .. math:: \sigma_{\max}(W) \le \lVert G_t \rVert_F^{2^{-t}}
              = \Big(\sum_i \sigma_i^{2^{t+1}}\Big)^{2^{-(t+1)}}
              \le \sigma_{\max}(W)\,\operatorname{rank}(W)^{2^{-(t+1)}},

    an upper bound for every ``t`` that converges to :math:`\sigma_{\max}` super-linearly
    (Delattre, Barthélemy, Araujo & Allauzen 2023). Each :math:`G_t` is divided by its
    Frobenius norm before squaring and the logarithms of those norms are accumulated, so
    nothing overflows. The first product is the smaller Gram matrix (:math:`n = \min(R, C)`);
    every product runs at ``Precision.HIGHEST``. The bound holds in exact arithmetic; to cover
    float32 rounding it is multiplied by ``1 + 4 sqrt(n) eps`` (:func:`gram_margin`,
    ``3e-5`` for ``n = 768``), and never falls below float64 SVD in the tests.

    Args:
      w: the leaf; ``dims`` as in :func:`sigma_power`.
      num_iters: Gram iterations ``t >= 1`` (each is one ``n x n`` matrix product).

    Returns:
      The bound per batch index, shape ``batch_shape``; exactly 0 for a zero matrix.

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[2.0, 1.0], [0.0, 1.0]])             # sigma_max = 2.2882...
    >>> bound = float(sigma_gram(w, num_iters=6))
    >>> 2.2882456 <= bound < 2.2883
    True

    References:
      Delattre, Barthélemy, Araujo & Allauzen, "Efficient bound of Lipschitz constant for
      convolutional layers by Gram iteration", ICML 2023.
    """
    if int(num_iters) < 1:
        raise ValueError(f"sigma_gram: num_iters must be >= 1, got {num_iters}")
    w = jnp.asarray(w)
    d = _dims(w, dims, "sigma_gram")

    def body(w):
        x = _to_stack(w.astype(acc_dtype(w.dtype)), d)
        return gram_stack(x, int(num_iters)).reshape(_batch_shape(w, d))

    return auto_where_explicit(body, (w,), lambda: batch_spec(w, d.batch))


def gram_stack(x: jax.Array, num_iters: int, extra_margin: float = 0.0) -> jax.Array:
    """The Gram-iteration bound of every matrix of a ``(B, R, C)`` stack, real or complex.

    The bound is multiplied by ``1 + gram_margin(min(R, C)) + extra_margin``; a zero matrix
    gives exactly 0, with finite gradients. Real dtype of the result: that of ``|x|``.
    """
    if x.shape[1] < x.shape[2]:
        x = jnp.swapaxes(x, 1, 2)  # (B, big, small): the Gram matrix is small x small
    real = jnp.real(x).dtype

    def fro(m):  # with a finite (zero) gradient at a zero matrix
        sq = jnp.sum(jnp.real(m * jnp.conj(m)), axis=(1, 2))
        return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1)), 0)

    f0 = fro(x)
    nonzero = f0 > 0
    safe = lambda f: jnp.where(nonzero, f, 1)
    log_bound = jnp.log(safe(f0))
    h = x / safe(f0)[:, None, None].astype(x.dtype)
    for t in range(1, num_iters + 1):
        g = jnp.einsum("bij,bik->bjk", jnp.conj(h), h, precision=HIGHEST, preferred_element_type=x.dtype)
        f = safe(fro(g))
        log_bound = log_bound + jnp.log(f) * (0.5**t)
        h = g / f[:, None, None].astype(x.dtype)
    bound = jnp.exp(log_bound) * (1 + gram_margin(x.shape[2], real) + extra_margin)
    return jnp.where(nonzero, bound, 0).astype(real)


def clip_singular_values(w: jax.Array, max_value: Any, *, dims: Any = None) -> tuple[jax.Array, jax.Array]:
    r"""Euclidean projection onto the spectral ball: singular values :math:`\min(s_i, c)`.

    Computed as :math:`W' = W - U \operatorname{diag}(\max(s - c, 0)) V^\top` so matrices
    already inside come back bit for bit. Returns ``(w_new, sigma)`` with sigma the exact
    largest singular value before the projection, shape ``batch_shape``.

    >>> import jax.numpy as jnp
    >>> w_new, s = clip_singular_values(jnp.diag(jnp.array([3.0, 0.5])), 1.0)
    >>> w_new
    Array([[1. , 0. ],
           [0. , 0.5]], dtype=float32)
    """
    w = jnp.asarray(w)
    d = _dims(w, dims, "clip_singular_values")
    acc = acc_dtype(w.dtype)
    c = jnp.asarray(max_value, acc)

    def body(w, c):
        y, sigma = clip_stack(_to_stack(w.astype(acc), d), c)
        moved = sigma > c
        w_new = jnp.where(
            broadcast_batch(moved.reshape(_batch_shape(w, d)), w.shape, d),
            _from_stack(y, w.shape, d).astype(w.dtype),
            w,
        )
        return w_new, sigma.reshape(_batch_shape(w, d))

    return auto_where_explicit(body, (w, c), lambda: (like(w), batch_spec(w, d.batch)))


def clip_stack(x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Singular values ``min(s, c)`` for every matrix of a ``(B, R, C)`` stack, real or complex.

    Returns ``(y, sigma)``: matrices with ``sigma <= c`` come back bit for bit; ``sigma`` is
    the largest singular value of each before the clip.
    """
    sigma = jnp.linalg.svd(x, compute_uv=False)[:, 0]
    moved = sigma > c
    # The SVD's gradient is NaN at repeated singular values (a zero matrix, an orthogonal
    # one). Matrices left alone therefore go through the vector SVD on a fixed matrix with
    # distinct singular values, so their gradient is exactly the identity.
    k = min(x.shape[1:])
    diag = jnp.arange(k, 0, -1).astype(x.dtype)
    safe = jnp.zeros(x.shape[1:], x.dtype).at[jnp.arange(k), jnp.arange(k)].set(diag)
    u, s, vt = jnp.linalg.svd(jnp.where(moved[:, None, None], x, safe), full_matrices=False)
    excess = jnp.maximum(s - c, 0).astype(x.dtype)
    delta = jnp.einsum("bik,bk,bkj->bij", u, excess, vt, precision=HIGHEST, preferred_element_type=x.dtype)
    return jnp.where(moved[:, None, None], x - delta, x), sigma


def spectral_scale(sigma: jax.Array, max_value: Any, mode: str) -> tuple[jax.Array, jax.Array]:
    """Per-matrix factor for ``"rescale"`` (``min(1, c/sigma)``) or ``"normalize"`` (``c/sigma``).

    Returns ``(scale, moved)``; a zero matrix (sigma 0) is never moved.
    """
    c = jnp.asarray(max_value, sigma.dtype)
    if mode == "rescale":
        moved = sigma > c
    elif mode == "normalize":
        moved = (sigma > 0) & (sigma != c)
    else:  # pragma: no cover - validated by callers
        raise ValueError(f"unknown mode {mode!r}")
    return jnp.where(moved, c / jnp.where(moved, sigma, 1), 1), moved
