r"""Matmul-only spectral maps: the polar factor by odd polynomials, spectral clip, soft cap, hammer.

Nothing here calls an SVD, ``eigh`` or QR: every map is a short sequence of matrix products, so
it compiles in seconds for TPUs and GPUs (where ``jnp.linalg.svd`` of a 768x768 matrix takes
minutes to compile for a TPU) and runs at matmul speed.

**The matrix sign (polar factor).** For :math:`X = U \operatorname{diag}(s) V^\top`, an odd
polynomial :math:`p(x) = a x + b x^3 + c x^5` acts on the singular values alone:
:math:`p(X) := aX + b XX^\top X + c (XX^\top)^2 X = U \operatorname{diag}(p(s)) V^\top`. After
scaling :math:`X` so that :math:`s_i \le 1`, a composition of such polynomials that maps
:math:`[\ell, 1]` close to 1 gives :math:`\operatorname{msign}(X) = UV^\top` (zero singular
values stay 0). The coefficients of each step are the minimax ones for the interval the
previous steps leave (Remez exchange on :math:`\max_{x \in [\ell_k, u_k]} |1 - p_k(x)|`, the
greedy composition shown optimal by Amsel, Persson, Musco & Gower 2025, "The Polar Express"),
computed here once in float64 with the interval widened by 2% at each step so that rounding
never pushes a singular value past the end where a steep polynomial turns down. With
:math:`\ell_0 = 10^{-5}` twelve steps bring every singular value in :math:`[10^{-5}, 1]` to
within :math:`10^{-6}` of 1 in exact arithmetic (see :func:`polar_schedule`).

**Spectral clip.** With :math:`Q = \operatorname{msign}(X)` (rows the smaller side),
:math:`H = \operatorname{sym}(X Q^\top) = U \operatorname{diag}(s) U^\top` and
:math:`P = \tfrac12 (I + \operatorname{msign}(H - cI))`, the projector on the singular
directions with :math:`s > c`,

.. math:: \operatorname{clip}_c(X) = U \operatorname{diag}(\min(s, c)) V^\top = X + P (cQ - X):

the singular values above :math:`c` are set to :math:`c` and the others are kept (where the
sign is unresolved, near :math:`s = c`, the value ends between :math:`s` and :math:`c`). The
steps run as one ``lax.scan`` body and the clip's second pass reuses the first's code, so the
compiled program does not grow with the number of steps.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normjax._norms import exponent_of_max, ldexp

__all__ = ["polar_schedule", "msign_stack", "clip_stack_matmul", "orthogonalize_stack", "soft_cap_stack", "hammer_stack"]

HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_POLAR_ITERS = 12
POLAR_LOWER = 1e-5
_SAFETY = 1.02  # each step's interval is widened by 2% at the top
_NEWTON_SCHULZ = (15 / 8, -10 / 8, 3 / 8)
_SECOND_PASS = 64.0  # a clip from further than this (normaliser / c) runs twice  # the quintic with a third-order fixed point at 1


def _poly_range(co: tuple[float, float, float], lo: float, hi: float) -> tuple[float, float]:
    """min and max of ``a x + b x^3 + c x^5`` over ``[lo, hi]`` (ends and critical points)."""
    a, b, c = co
    xs = [lo, hi]
    if c != 0:
        for t in np.roots([5 * c, 3 * b, a]):
            if abs(t.imag) < 1e-12 and t.real > 0 and lo < math.sqrt(t.real) < hi:
                xs.append(math.sqrt(t.real))
    vals = [a * x + b * x**3 + c * x**5 for x in xs]
    return min(vals), max(vals)


def _minimax_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """The odd quintic minimising ``max |1 - p|`` on ``[lo, hi]`` by Remez exchange (float64)."""
    grid = np.unique(np.concatenate([np.geomspace(lo, hi, 6000), np.linspace(lo, hi, 6000)]))
    ref = np.geomspace(lo, hi, 4)
    coef = None
    for _ in range(60):
        mat = np.stack([ref, ref**3, ref**5, (-1.0) ** np.arange(4)], axis=1)
        try:
            a, b, c, _e = np.linalg.solve(mat, np.ones(4))
        except np.linalg.LinAlgError:
            break
        coef = (float(a), float(b), float(c))
        err = 1.0 - (a * grid + b * grid**3 + c * grid**5)
        d = np.diff(err)
        idx = [0] + [i for i in range(1, len(grid) - 1) if d[i - 1] * d[i] <= 0] + [len(grid) - 1]
        pts: list[float] = []
        vals: list[float] = []
        for i in idx:
            if pts and np.sign(err[i]) == np.sign(vals[-1]):
                if abs(err[i]) > abs(vals[-1]):
                    pts[-1], vals[-1] = grid[i], err[i]
            else:
                pts.append(grid[i])
                vals.append(err[i])
        while len(pts) > 4:
            k = 0 if abs(vals[0]) < abs(vals[-1]) else -1
            pts.pop(k)
            vals.pop(k)
        if len(pts) < 4 or np.allclose(pts, ref, rtol=1e-13, atol=0):
            break
        ref = np.asarray(pts)
    return coef if coef is not None else _NEWTON_SCHULZ


@functools.lru_cache(maxsize=None)
def polar_schedule(num_iters: int = DEFAULT_POLAR_ITERS, lower: float = POLAR_LOWER) -> tuple[tuple[float, float, float], ...]:
    """Per-step coefficients ``(a, b, c)`` of the odd quintics whose composition maps
    ``[lower, 1]`` to (nearly) 1.

    Step ``k`` is the minimax quintic on ``[l_k, 1.02 u_k]`` where ``[l_k, u_k]`` is the image of
    ``[lower, 1]`` under the previous steps (computed exactly from the critical points); once
    the interval is within 1e-3 of 1 the steps are Newton–Schulz's ``(15, -10, 3) / 8``.

    >>> [round(c, 3) for c in polar_schedule(8)[0]]
    [8.347, -23.822, 16.997]
    """
    out = []
    lo, hi = float(lower), 1.0
    for _ in range(int(num_iters)):
        top = hi * _SAFETY
        co = _NEWTON_SCHULZ if top - lo < 1e-3 else _minimax_quintic(lo, top)
        lo, hi = _poly_range(co, lo, top)
        lo = max(lo, 1e-30)
        out.append(co)
    return tuple(out)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("bij,bjk->bik", a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


def _gram_rows(x: jax.Array) -> jax.Array:
    return jnp.einsum("bij,bkj->bik", x, x, precision=HIGHEST, preferred_element_type=jnp.float32)


def msign_stack(x: jax.Array, num_iters: int = DEFAULT_POLAR_ITERS, lower: float = POLAR_LOWER) -> jax.Array:
    """``U V^T`` of every matrix of a ``(B, R, C)`` float32 stack by the polynomial schedule.

    Each matrix is first divided by the power of two of its largest entry (exact; nothing
    overflows when squared), then by :math:`\\lVert X X^\\top \\rVert_F^{1/2} \\ge s_1` (so every
    singular value is at most 1). Products
    run at ``Precision.HIGHEST``; the Gram side is the smaller one. A zero matrix gives 0.
    """
    tall = x.shape[1] > x.shape[2]
    if tall:
        x = jnp.swapaxes(x, 1, 2)
    e = exponent_of_max(x, axes=(1, 2))
    x = ldexp(x, -e[:, None, None])
    g = _gram_rows(x)
    s2 = jnp.sqrt(jnp.sum(g * g, axis=(1, 2)))  # ||X X^T||_F >= s_1^2
    s2 = jnp.where(s2 > 0, s2, 1.0)[:, None, None]
    x = x / jnp.sqrt(s2)
    sched = polar_schedule(num_iters, lower)

    def step(x, co):
        g = _gram_rows(x)
        return co[0] * x + _mm(co[1] * g + co[2] * _mm(g, g), x), None

    # every step is one loop body: compiled once, however many steps (a TPU compiles each
    # HIGHEST-precision product as several bf16 passes; unrolled, that took minutes per leaf)
    if sched:
        x, _ = jax.lax.scan(step, x, jnp.asarray(sched, x.dtype))
    return jnp.swapaxes(x, 1, 2) if tall else x


def clip_stack_matmul(x: jax.Array, c: jax.Array, num_iters: int = DEFAULT_POLAR_ITERS) -> jax.Array:
    r"""Every singular value ``s -> min(s, c)`` (``c`` per matrix, shape ``(B,)``).

    With the rows side the smaller one (else the transpose): :math:`Q = \operatorname{msign}(X)`,
    :math:`H = \operatorname{sym}(X Q^\top) = U \operatorname{diag}(q(s)\,s) U^\top`,
    :math:`P = \tfrac12 (I + \operatorname{msign}(H - cI))` the projector on the singular
    directions with :math:`s > c`, and :math:`X + P (cQ - X)`. Where :math:`q(s)` has not
    converged (singular values far below the largest, rounding noise of a low-rank matrix)
    :math:`q(s) s - c \approx -c` is far from 0, so :math:`P` is 0 there and those directions
    keep :math:`X` itself (relative error of the order of the sign's); near :math:`s = c` an
    unresolved sign leaves the value between :math:`s` and :math:`c` (error below
    :math:`|s - c|`).
    """
    tall = x.shape[1] > x.shape[2]
    if tall:
        x = jnp.swapaxes(x, 1, 2)
    c = c[:, None, None]
    q = msign_stack(x, num_iters)
    h = jnp.einsum("bij,bkj->bik", x, q, precision=HIGHEST, preferred_element_type=jnp.float32)
    h = 0.5 * (h + jnp.swapaxes(h, 1, 2))
    eye = jnp.eye(h.shape[1], dtype=h.dtype)
    p = 0.5 * (eye + msign_stack(h - c * eye, num_iters))
    out = x + _mm(p, c * q - x)
    return jnp.swapaxes(out, 1, 2) if tall else out


def orthogonalize_stack(x: jax.Array, c: jax.Array, num_iters: int = DEFAULT_POLAR_ITERS) -> jax.Array:
    """``c U V^T``: every singular value above ``1e-6`` of the normaliser set to ``c``, the rest
    (the rounding noise of a low-rank matrix, which ``msign`` amplifies) to 0: ``c P Q`` with
    ``Q = msign(X)`` and ``P = (I + msign(sym(X Q^T) - tau I)) / 2``, ``tau = 1e-6 ||XX^T||_F^{1/2}``."""
    tall = x.shape[1] > x.shape[2]
    if tall:
        x = jnp.swapaxes(x, 1, 2)
    q = msign_stack(x, num_iters)
    h = jnp.einsum("bij,bkj->bik", x, q, precision=HIGHEST, preferred_element_type=jnp.float32)
    h = 0.5 * (h + jnp.swapaxes(h, 1, 2))
    tau = 1e-6 * _normaliser(x)[:, None, None]
    eye = jnp.eye(h.shape[1], dtype=h.dtype)
    # resolve the sign down to 1e-7 (four more steps), well below tau: noise ends at -tau, far from 0
    p = 0.5 * (eye + msign_stack(h - tau * eye, num_iters + 4, 1e-7))
    out = c[:, None, None] * _mm(p, q)
    return jnp.swapaxes(out, 1, 2) if tall else out


def soft_cap_stack(x: jax.Array, c: jax.Array, m: jax.Array) -> jax.Array:
    r"""The spectral soft cap: ``s -> p(s) = s (1 - beta (s/m)^2)`` with ``beta = 1 - c/m``.

    ``m`` (per matrix) must bound every singular value. When ``m <= 1.5 c``, ``beta <= 1/3`` and
    ``p`` is increasing on ``[0, m]`` with ``p(m) = c``: every singular value ends at most ``c``,
    small ones barely move (``p(s) / s = 1 - beta (s/m)^2``), and the map is two matmuls. When
    ``m > 1.5 c`` the matrix is first scaled by ``1.5 c / m``. With ``m <= c`` nothing changes.
    """
    c = c[:, None, None]
    m = m[:, None, None]
    shrink = jnp.where(m > 1.5 * c, 1.5 * c / jnp.where(m > 0, m, 1.0), 1.0)
    x = x * shrink
    m = jnp.minimum(m, 1.5 * c)
    beta = jnp.where(m > c, 1.0 - c / jnp.where(m > 0, m, 1.0), 0.0)
    mm = jnp.where(m > 0, m, 1.0)
    if x.shape[1] <= x.shape[2]:
        cubic = _mm(_gram_rows(x), x)
    else:
        cubic = _mm(x, _gram_rows(jnp.swapaxes(x, 1, 2)))
    return x - (beta / (mm * mm)) * cubic


def hammer_stack(x: jax.Array, c: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""The spectral hammer along a unit right vector ``v`` (``(B, C)``, the power vector):
    with ``s = ||X v||`` and ``u = X v / s``, ``X + min(c - s, 0) u v^T``. Then ``X v = min(s, c) u``:
    the top singular value (when ``v`` is its vector) is set to ``c``, nothing else moves.
    Returns the new stack and ``s``."""
    xv = jnp.einsum("brc,bc->br", x, v, precision=HIGHEST)
    s = jnp.sqrt(jnp.sum(xv * xv, axis=1))
    u = xv / jnp.where(s > 0, s, 1.0)[:, None]
    step = jnp.minimum(c - s, 0.0)
    return x + step[:, None, None] * u[:, :, None] * v[:, None, :], s


# ------------------------------------------------------------------------------------------
# Leaves: the stack of matrices of a view
# ------------------------------------------------------------------------------------------

MATMUL_MODES = ("clip", "orthogonalize")


def _leaf_stack(w: jax.Array, dims: Any, name: str):
    from normjax._norms import _dims, _to_stack

    w = jnp.asarray(w)
    d = _dims(w, dims, name)
    from normjax._norms import acc_dtype

    return w, d, _to_stack(w.astype(acc_dtype(w.dtype)), d)


def _per_matrix(value: Any, nb: int, dtype: Any) -> jax.Array:
    v = jnp.asarray(value, dtype)
    return jnp.broadcast_to(v.reshape(-1) if v.size == nb else v, (nb,)) if v.ndim else jnp.full((nb,), v)


def _normaliser(x: jax.Array) -> jax.Array:
    """``||X X^T||_F^{1/2}`` (smaller side) of every matrix: ``>= sigma_max``, at most
    ``rank^{1/4}`` times it. Computed on the power-of-two-scaled matrices (no overflow)."""
    if x.shape[1] > x.shape[2]:
        x = jnp.swapaxes(x, 1, 2)
    e = exponent_of_max(x, axes=(1, 2))
    g = _gram_rows(ldexp(x, -e[:, None, None]))
    return ldexp(jnp.sqrt(jnp.sqrt(jnp.sum(g * g, axis=(1, 2)))), e)


def matmul_leaf(w: jax.Array, max_value: Any, mode: str, dims: Any, num_iters: int, *, bound: Any = None, name: str = "spectral"):
    """``mode`` (``"clip"``, ``"orthogonalize"``, ``"soft_cap"``) on every matrix of a leaf.

    Returns ``(w_new, moved, upper)``: ``w_new`` in the accumulation dtype (float32 for
    float32 and narrower leaves) shaped like the leaf; ``moved`` (``batch_shape``): the
    matrices that changed (a clip leaves a matrix whose normaliser is at most ``c`` as it is);
    ``upper``: the upper bound on sigma used (the normaliser ``||W W^T||_F^{1/2}``, or
    ``bound``). ``bound``: for ``"soft_cap"``, an upper bound on every matrix's sigma.
    """
    from normjax._norms import _dims, _empty_view
    from normjax._shard import auto_where_explicit, batch_spec, like

    w = jnp.asarray(w)
    d = _dims(w, dims, name)
    c_arr = jnp.asarray(max_value, jnp.float32)
    b_arr = jnp.asarray(0.0 if bound is None else bound, jnp.float32)
    if _empty_view(w, d):
        return _matmul_body(w, c_arr, b_arr, mode, d, num_iters, name)
    return auto_where_explicit(
        lambda w, c, b: _matmul_body(w, c, b, mode, d, num_iters, name),
        (w, c_arr, b_arr),
        lambda: (like(w), batch_spec(w, d.batch), batch_spec(w, d.batch)),
    )


def _matmul_body(w, max_value, bound, mode, d, num_iters, name):
    from normjax._norms import _batch_shape, _empty_view, _from_stack, _to_stack, acc_dtype

    x = _to_stack(w.astype(acc_dtype(w.dtype)), d)
    shape = _batch_shape(w, d)
    if _empty_view(w, d):
        return w.astype(x.dtype), jnp.zeros(shape, bool), jnp.zeros(shape, x.dtype)
    nb = x.shape[0]
    c = _per_matrix(max_value, nb, x.dtype)
    if mode == "clip":
        s = _normaliser(x)
        moved = s > c
        # far outside the ball X - PX cancels (error ~ eps s / c): a second pass from near c
        # (sigma <= c (1 + eps s / c)) is then accurate. Both passes are one loop body (compiled
        # once); the second runs only when some matrix needs it.
        far = s > _SECOND_PASS * c
        passes = 1 + jnp.any(far).astype(jnp.int32)

        def one_pass(i, y):
            which = jnp.where(i == 0, moved, far)
            return jnp.where(which[:, None, None], clip_stack_matmul(y, c, num_iters), y)

        y = jax.lax.fori_loop(0, passes, one_pass, x)
    elif mode == "orthogonalize":
        s = _normaliser(x)
        y = orthogonalize_stack(x, c, num_iters)
        moved = jnp.ones((nb,), bool)
    elif mode == "soft_cap":
        s = _per_matrix(bound, nb, x.dtype)
        moved = s > c
        y = jnp.where(moved[:, None, None], soft_cap_stack(x, c, s), x)
    else:  # pragma: no cover - callers validate
        raise ValueError(f"{name}: unknown matmul mode {mode!r}")
    out = _from_stack(y, w.shape, d)
    return out, moved.reshape(shape), s.reshape(shape)


def orthogonalize_svd(w: jax.Array, max_value: Any, dims: Any):
    """``c U V^T`` of every matrix by SVD (zero singular values stay 0), float32."""
    from normjax._norms import _empty_view, _from_stack

    w, d, x = _leaf_stack(w, dims, "orthogonalize")
    if _empty_view(w, d):
        return w.astype(x.dtype)
    u, sv, vt = jnp.linalg.svd(x, full_matrices=False)
    tol = jnp.max(sv, axis=1, keepdims=True) * (max(x.shape[1:]) * jnp.finfo(x.dtype).eps)
    keep = (sv > tol).astype(x.dtype)
    c = _per_matrix(max_value, x.shape[0], x.dtype)
    y = jnp.einsum("bik,bk,bkj->bij", u, keep * c[:, None], vt, precision=HIGHEST)
    return _from_stack(y, w.shape, d)


def hammer_leaf(w: jax.Array, max_value: Any, v: jax.Array, dims: Any, name: str = "spectral"):
    """The hammer on every matrix of a leaf along the right vectors ``v`` (``batch + cols``,
    the power vector of :func:`sigma_power`). Returns ``(w_new, s)`` (float32, ``batch_shape``)."""
    from normjax._norms import _dims
    from normjax._shard import auto_where_explicit, batch_spec, like

    w = jnp.asarray(w)
    d = _dims(w, dims, name)

    def body(w, c, v):
        from normjax._norms import _batch_shape, _from_stack, _to_stack, acc_dtype

        x = _to_stack(w.astype(acc_dtype(w.dtype)), d)
        nb = x.shape[0]
        vs = jnp.asarray(v, x.dtype).reshape(nb, x.shape[2])
        vn = jnp.sqrt(jnp.sum(vs * vs, axis=1, keepdims=True))
        vs = vs / jnp.where(vn > 0, vn, 1.0)
        y, s = hammer_stack(x, _per_matrix(c, nb, x.dtype), vs)
        return _from_stack(y, w.shape, d), s.reshape(_batch_shape(w, d))

    return auto_where_explicit(body, (w, jnp.asarray(max_value, jnp.float32), jnp.asarray(v)), lambda: (like(w), batch_spec(w, d.batch)))


# ------------------------------------------------------------------------------------------
# Public pure functions
# ------------------------------------------------------------------------------------------


def msign(w: jax.Array, *, dims: Any = None, num_iters: int = DEFAULT_POLAR_ITERS) -> jax.Array:
    r"""The polar factor :math:`UV^\top` of every matrix of ``w``, by matmuls only.

    ``dims`` picks rows and columns (``None``: all axes but the last, and the last; a
    :class:`MatrixDims` makes other axes batch axes). Singular values down to about
    :math:`10^{-5}\,\lVert WW^\top\rVert_F^{1/2}` come out within :math:`10^{-6}` of 1 with
    the default 12 steps; smaller ones (rounding noise of a low-rank matrix) come out between 0
    and 1. The result has the leaf's dtype. See the module docstring for the schedule
    (Amsel et al. 2025, "The Polar Express"; Björck & Bowie 1971 for the iteration family).

    >>> import jax.numpy as jnp
    >>> q = msign(jnp.array([[3.0, 0.0], [0.0, 0.01]]))
    >>> bool(jnp.allclose(q, jnp.eye(2), atol=1e-5))
    True
    """
    w, d, x = _leaf_stack(w, dims, "msign")
    from normjax._norms import _empty_view, _from_stack

    if _empty_view(w, d):
        return w
    return _from_stack(msign_stack(x, int(num_iters)), w.shape, d).astype(w.dtype)


def spectral_clip(w: jax.Array, max_value: Any, *, dims: Any = None, num_iters: int = DEFAULT_POLAR_ITERS) -> jax.Array:
    r"""Singular values :math:`\min(s_i, c)` by matmuls only (no SVD): the Euclidean projection
    onto the spectral ball. In float32 with the default 12 steps, singular values above :math:`c`
    land within about :math:`5 \cdot 10^{-5}` of it and those below move by at most about
    :math:`3 \cdot 10^{-4}` relative, or by the float32 floor :math:`\sim 10^{-7} s_1` that an
    SVD computed in float32 also has (``benchmarks/RESULTS.md``, "Matmul-only spectral maps",
    has the table). Further out float32
    cancellation costs about :math:`10^{-7} s_1 / c`: a second pass (run only when the normaliser
    exceeds :math:`64c`) keeps the largest at :math:`c` (within 2e-4 at :math:`s_1 = 10^7 c`),
    and the other clipped values land in :math:`[c(1 - 2 \cdot 10^{-6} s_1/c), c]`. A matrix with
    :math:`\lVert WW^\top\rVert_F^{1/2} \le c` (surely inside) comes back as it is. Compare
    :func:`clip_singular_values` (exact, SVD); ``certify=True`` in the transform makes
    :math:`\sigma \le c` sure.

    >>> import jax.numpy as jnp
    >>> w = spectral_clip(jnp.diag(jnp.array([3.0, 0.5])), 1.0)
    >>> bool(jnp.allclose(w, jnp.diag(jnp.array([1.0, 0.5])), atol=1e-5))
    True
    """
    out, _, _ = matmul_leaf(w, max_value, "clip", dims, int(num_iters), name="spectral_clip")
    return out.astype(jnp.asarray(w).dtype)


def orthogonalize(w: jax.Array, scale: Any = 1.0, *, dims: Any = None, num_iters: int = DEFAULT_POLAR_ITERS) -> jax.Array:
    r"""``scale`` times the polar factor: every singular value above :math:`10^{-6}` of
    :math:`\lVert WW^\top\rVert_F^{1/2}` set to ``scale``, smaller ones (what float32 keeps of a
    low-rank matrix's zeros) to 0 (the
    Stiefel constraint of gradient-norm-preserving networks; Björck orthonormalisation as in
    Anil, Lucas & Grosse 2019), by matmuls only.

    >>> import jax.numpy as jnp
    >>> w = orthogonalize(jnp.array([[2.0, 0.0], [0.0, 0.5]]), 3.0)
    >>> bool(jnp.allclose(w, 3.0 * jnp.eye(2), atol=1e-4))
    True
    """
    out, _, _ = matmul_leaf(w, scale, "orthogonalize", dims, int(num_iters), name="orthogonalize")
    return out.astype(jnp.asarray(w).dtype)


def spectral_soft_cap(w: jax.Array, max_value: Any, bound: Any, *, dims: Any = None) -> jax.Array:
    r"""The spectral soft cap :math:`s \mapsto s\,(1 - \beta (s/m)^2)`, :math:`\beta = 1 - c/m`,
    given ``bound`` :math:`m \ge \sigma_{\max}` per matrix: every singular value ends at most
    :math:`c` (exactly :math:`c` for :math:`s = m`), small ones move by the factor
    :math:`1 - \beta (s/m)^2`; two matmuls. For :math:`m > 1.5c` the matrix is first scaled by
    :math:`1.5c/m`. An odd polynomial of the matrix like Newhouse et al. 2025's soft cap, with
    the strength set by the bound instead of a fixed coupling to the learning rate (see
    :func:`normjax.spectral_norm`, ``mode="soft_cap"``).

    >>> import jax.numpy as jnp
    >>> w = spectral_soft_cap(jnp.diag(jnp.array([1.2, 0.1])), 1.0, 1.2)
    >>> [round(float(v), 4) for v in jnp.diag(w)]
    [1.0, 0.0999]
    """
    out, _, _ = matmul_leaf(w, max_value, "soft_cap", dims, 0, bound=bound, name="spectral_soft_cap")
    return out.astype(jnp.asarray(w).dtype)


def spectral_hammer(w: jax.Array, max_value: Any, v: jax.Array, *, dims: Any = None) -> jax.Array:
    r"""The spectral hammer: with ``v`` a unit right singular vector estimate (the power vector
    of :func:`sigma_power`), :math:`s = \lVert Wv \rVert`, :math:`u = Wv/s`:
    :math:`W + \min(c - s, 0)\,u v^\top`. When ``v`` is the top right singular vector the top
    singular value becomes :math:`\min(s, c)` and nothing else moves (Newhouse et al. 2025).

    >>> import jax.numpy as jnp
    >>> w = spectral_hammer(jnp.diag(jnp.array([3.0, 0.5])), 1.0, jnp.array([1.0, 0.0]))
    >>> w
    Array([[1. , 0. ],
           [0. , 0.5]], dtype=float32)
    """
    out, _ = hammer_leaf(w, max_value, v, dims, name="spectral_hammer")
    return out.astype(jnp.asarray(w).dtype)
