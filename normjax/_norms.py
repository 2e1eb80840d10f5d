"""Array-level norms: per-unit L2 norms and the band projection behind the max-norm family.

Scaling. Every estimator and projection here that squares, multiplies or divides first divides
each unit or matrix by a power of two taken from the exponent of its largest entry
(:func:`exponent_of_max`, :func:`ldexp`): the division is exact, the largest entry lands in
``[1, 2)``, nothing overflows when squared and nothing that matters underflows; the result is
multiplied back by the same power of two at the end. Powers of two are built from their bits,
never by ``exp2`` (not exact on every backend) or by a reciprocal (``x / m`` compiles to
``x * (1 / m)``, and ``1 / m`` is flushed to zero for ``m > 2**126`` in float32). XLA on CPU
flushes subnormal inputs and results to zero, so a subnormal entry reads as 0 in arithmetic;
the certified bounds add an allowance for them (:func:`gram_stack`) and everything that
promises "bit for bit" selects the input instead of multiplying it by one.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from normjax._shard import auto_where_explicit, batch_spec, like


def acc_dtype(dtype: Any) -> np.dtype:
    """Dtype norms accumulate in: float64 for float64 leaves, float32 for everything else."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# --------------------------------------------------------------------------------------------
# Exact power-of-two scaling, shared by every estimator and projection
# --------------------------------------------------------------------------------------------


class _Fmt(NamedTuple):
    int: Any  # the integer type of the same width
    nmant: int  # explicit mantissa bits
    bias: int  # exponent bias
    minexp: int  # exponent of the smallest normal number
    maxexp: int  # exponent of the largest finite number
    u: float  # unit roundoff, 2**-(nmant + 1)


def _fmt(dtype: Any) -> _Fmt:
    fi = jnp.finfo(dtype)
    ints = {8: np.int64, 4: np.int32, 2: np.int16}
    bias = 1 - int(fi.minexp)
    return _Fmt(ints[np.dtype(dtype).itemsize], int(fi.nmant), bias, int(fi.minexp), int(fi.maxexp) - 1, 2.0 ** -(int(fi.nmant) + 1))


def _abs_bits(x: jax.Array) -> jax.Array:
    """The bits of ``|x|`` as integers: ordered like ``|x|`` (NaN above inf), exact for subnormals."""
    f = _fmt(x.dtype)
    return jax.lax.bitcast_convert_type(x, f.int) & np.array(np.iinfo(f.int).max, f.int)


def _real_bits(x: jax.Array) -> jax.Array:
    """:func:`_abs_bits` of a real array, of ``max(|re|, |im|)`` for a complex one."""
    if jnp.iscomplexobj(x):
        return jnp.maximum(_abs_bits(jnp.real(x)), _abs_bits(jnp.imag(x)))
    return _abs_bits(x)


def _bits_exponent(bits: jax.Array, dtype: Any) -> jax.Array:
    """``floor(log2 |x|)`` (int32) from :func:`_abs_bits`: 0 for 0, ``minexp`` for a subnormal,
    ``maxexp + 1`` for inf and NaN."""
    f = _fmt(dtype)
    field = (bits >> f.nmant).astype(np.int32)
    return jnp.where(bits == 0, 0, jnp.where(field == 0, f.minexp, field - f.bias))


def exponent_of_max(x: jax.Array, axes: Any = None, keepdims: bool = False) -> jax.Array:
    """``floor(log2 max |x|)`` over ``axes`` (int32), read from the bits: exact, no rounding, and
    0 where the slice is zero or empty. ``ldexp(x, -e)`` has its largest entry in ``[1, 2)``.

    >>> import jax.numpy as jnp
    >>> exponent_of_max(jnp.array([[3e38, 1.0], [0.0, 1e-3]]), axes=1)
    Array([127,  -10], dtype=int32)
    """
    x = jnp.asarray(x)
    bits = jnp.max(_real_bits(x), axis=axes, keepdims=keepdims, initial=0)
    return _bits_exponent(bits, jnp.real(x).dtype)


def _pow2(k: jax.Array, dtype: Any) -> jax.Array:
    """``2.0**k`` exactly, from its bits; ``k`` is clipped to the normal range of ``dtype``."""
    f = _fmt(dtype)
    k = jnp.clip(jnp.asarray(k), f.minexp, f.maxexp).astype(f.int)
    return jax.lax.bitcast_convert_type((k + f.bias) << f.nmant, np.dtype(dtype))


def ldexp(x: jax.Array, k: Any) -> jax.Array:
    """``x * 2**k`` for an integer array ``k``, exact unless the result over- or underflows.

    Two multiplications by powers of two that are themselves normal numbers, so any ``k``
    between ``2 minexp`` and ``2 maxexp`` works (``x * 2**-140`` is not ``x * 0``).
    """
    x = jnp.asarray(x)
    k = jnp.asarray(k, np.int32)
    real = jnp.real(x).dtype
    k1 = k >> 1  # floor(k / 2): both halves are normal powers of two
    return x * _pow2(k1, real).astype(x.dtype) * _pow2(k - k1, real).astype(x.dtype)


def _count_subnormal(x: jax.Array, axes: Any, keepdims: bool = False) -> jax.Array:
    """How many entries (real and imaginary parts counted apart) are subnormal."""
    f = _fmt(jnp.real(x).dtype)
    lo = np.array(1 << f.nmant, f.int)  # bits of the smallest normal number

    def sub(part):
        b = _abs_bits(part)
        return ((b > 0) & (b < lo)).astype(np.int32)

    count = sub(jnp.real(x)) + (sub(jnp.imag(x)) if jnp.iscomplexobj(x) else 0)
    return jnp.sum(count, axis=axes, keepdims=keepdims)


class Split(NamedTuple):
    """A non-negative number ``mant * 2**exp`` with a float mantissa and an int32 exponent.

    What :func:`unit_norms` and the estimators return with ``split=True``: a norm that
    overflows the dtype (a float32 unit of entries near ``3e38``) is still known exactly, so
    :func:`band_scale` / :func:`spectral_scale` can scale that unit to the ball instead of
    reading an ``inf``. :meth:`value` gives the plain float (``inf`` on overflow).
    """

    mant: jax.Array
    exp: jax.Array

    def value(self) -> jax.Array:
        return ldexp(self.mant, self.exp)

    @staticmethod
    def stack(parts: list) -> "Split":
        """The norms of several same-shaped leaves stacked on a new leading axis (a group)."""
        return Split(jnp.stack([n.mant for n in parts]), jnp.stack([n.exp for n in parts]))


def _normalise(n: Any) -> tuple[jax.Array, jax.Array]:
    """``(m, e)`` with ``n = m * 2**e`` and ``m`` in ``[1, 2)``, or ``m`` 0 / inf / NaN (``e`` 0).

    ``n`` is a non-negative float array or a :class:`Split`. A subnormal ``n`` reads as 0.
    """
    if isinstance(n, Split):
        m0, e0 = jnp.asarray(n.mant), jnp.asarray(n.exp, np.int32)
    else:
        m0 = jnp.asarray(n)
        e0 = jnp.zeros_like(m0, dtype=np.int32)
    f = _fmt(m0.dtype)
    bits = _abs_bits(m0)
    field = (bits >> f.nmant).astype(np.int32)
    normal = (field > 0) & (field <= f.maxexp + f.bias)
    k = jnp.where(normal, field - f.bias, 0)
    # ldexp, not a bitcast: the same exact value, and differentiable in the input mantissa
    m = jnp.where(normal, ldexp(m0, -k), jnp.where(field == 0, jnp.zeros_like(m0), m0))
    return m, jnp.where(normal, k + e0, 0)


def _less(m1: jax.Array, e1: jax.Array, m2: jax.Array, e2: jax.Array) -> jax.Array:
    """``m1 2**e1 < m2 2**e2`` for :func:`_normalise`d pairs (0, inf and NaN included)."""
    normal = (m1 > 0) & (m2 > 0) & jnp.isfinite(m1) & jnp.isfinite(m2)
    by_value = (e1 < e2) | ((e1 == e2) & (m1 < m2))
    return jnp.where(normal, by_value, m1 < m2)


def _encode(fm: jax.Array, fk: jax.Array) -> jax.Array:
    """One float array for the factor ``fm * 2**fk`` (``fm >= 0``), for :func:`_apply_factor`.

    In range it is the factor itself (exact: built from bits). A factor below the smallest
    normal number or above the largest finite one (``c / n`` for a float32 unit of norm
    ``> c * 2**126``) is stored as ``-sqrt(factor)``, normal again, and applied as two
    multiplications; below ``2**(2 minexp)`` it is 0.
    """
    f = _fmt(fm.dtype)
    m, e = _normalise(fm)
    e = e + fk
    in_range = (e >= f.minexp) & (e <= f.maxexp)
    plain = ldexp(m, e)
    odd = (e & 1) == 1
    half = jnp.where(odd, e - 1, e) >> 1
    root = jnp.sqrt(jnp.where(odd, 2 * m, m))  # in [1, 2): one rounding of half an ulp
    root = jnp.where(half > f.maxexp, float(jnp.finfo(fm.dtype).max), ldexp(root, half))
    coded = jnp.where(half < f.minexp, 0, -root)
    finite = jnp.isfinite(m) & (m > 0)
    return jnp.where(finite, jnp.where(in_range, plain, coded), jnp.where(jnp.isnan(m), m, jnp.where(m > 0, jnp.inf, 0)))


def _apply_factor(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x`` times the factor ``scale`` encodes (:func:`_encode`): ``x * s``, or ``(x * r) * r``
    with ``r = -s`` for a factor out of the dtype's range; a zero factor gives 0 even for inf."""
    r = jnp.abs(scale)
    t = jnp.where(scale < 0, (x * r) * r, x * scale)
    return jnp.where(scale == 0, jnp.zeros_like(t), t)


def decode_scale(scale: jax.Array) -> jax.Array:
    """The factor an encoded ``scale`` stands for, as a plain float (for logging: a factor
    outside the dtype's range reads 0 or inf)."""
    return jnp.where(scale < 0, scale * scale, scale)


def _shrinks(scale: jax.Array) -> jax.Array:
    """Whether the encoded factor is below 1 (a shrink: rounding goes toward zero)."""
    return jnp.abs(scale) < 1


@jax.custom_jvp
def _exact_with_smooth_tangent(exact: jax.Array, smooth: jax.Array) -> jax.Array:
    """``exact`` (a directed rounding of ``smooth``) with the tangent of ``smooth``."""
    del smooth
    return exact


@_exact_with_smooth_tangent.defjvp
def _exact_jvp(primals, tangents):
    exact, _ = primals
    return exact, tangents[1].astype(exact.dtype)


def _round_inward(t: jax.Array, dtype: Any, shrink: jax.Array) -> jax.Array:
    """``t`` rounded to ``dtype`` toward zero where ``shrink``, away from zero elsewhere.

    Directed rounding so that a unit's norm never crosses the bound it was scaled to: a shrunk
    entry is never larger in magnitude than its target, a grown one never smaller. When
    ``dtype`` is ``t``'s own dtype there is nothing finer to round from and ``t`` is returned.
    """
    dtype = np.dtype(dtype)
    if dtype == t.dtype:
        return t
    ts = jax.lax.stop_gradient(t)
    r = ts.astype(dtype)
    back = r.astype(t.dtype)
    toward = jnp.nextafter(r, jnp.zeros_like(r))
    away = jnp.nextafter(r, jnp.where(ts < 0, -jnp.inf, jnp.inf).astype(dtype))
    r = jnp.where(shrink & (jnp.abs(back) > jnp.abs(ts)), toward, r)
    r = jnp.where(~shrink & (jnp.abs(back) < jnp.abs(ts)), away, r)
    return _exact_with_smooth_tangent(r, t.astype(dtype))


# --------------------------------------------------------------------------------------------
# Unit norms and the max-norm family
# --------------------------------------------------------------------------------------------


def _safe_sqrt(sq: jax.Array) -> jax.Array:
    zero = sq == 0  # NaN stays NaN (a diverged unit must show in the logs), zero stays zero
    return jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, sq)))


def _shifts(size: int, dtype: Any) -> tuple[int, int]:
    """``(a, b)``: the exponents of :func:`unit_norms`' two scaled sums for units of ``size``
    entries accumulated in ``dtype`` (see there for the bounds they meet)."""
    f = _fmt(dtype)
    lg = float(np.log2(max(size, 1)))
    emax, emin, prec = f.maxexp + 1, f.minexp, f.nmant + 1  # |x| < 2**emax, tiny = 2**emin, u = 2**-prec
    # a: N (2**emax 2**-a)**2 < 2**emax (no overflow), and squares flushed below tiny lose
    #    less than u of a sum that overflowed unscaled: a <= (emax - emin - prec - lg) / 2
    # b: the smallest subnormal entry's scaled square keeps u relative to the lost half-ulps
    #    (gradual underflow; a flushing backend needs only b >= -emin / 2), and a sum below
    #    N tiny / u unscaled stays finite scaled: b < (emax - emin - prec - lg) / 2
    a = int(np.ceil((emax + lg) / 2)) + 1
    b = int(np.ceil((lg - emin + 2 * prec - 2) / 2))
    if a > (emax - emin - prec - lg) / 2 or b >= (emax - emin - prec - lg) / 2:
        raise ValueError(f"unit_norms: units of {size} entries are too large for {np.dtype(dtype).name} accumulation")
    return a, b


def _direct_threshold(size: int, dtype: Any) -> float:
    """The smallest direct sum of squares taken as it is: ``size * tiny / u``. Squares lost to
    underflow (flushed below ``tiny``) add up to less than ``size * tiny``, under ``u`` relative."""
    f = _fmt(dtype)
    return float(jnp.finfo(dtype).tiny) * size / f.u


def _combine(p: jax.Array, u: jax.Array | None) -> jax.Array:
    """The array whose norms are taken: ``p``, or ``p + u`` as ``optax.apply_updates`` rounds it,
    in the accumulation dtype."""
    if u is None:
        return p.astype(acc_dtype(p.dtype))
    return (p + u.astype(p.dtype)).astype(acc_dtype(p.dtype))


@functools.partial(jax.jit, static_argnums=(1,))  # traced once per shape: a model's blocks share it
def _three_sums(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(mant, exp)`` of the norms over ``axes`` (keepdims) from three sums of squares of ``x``
    (plain, shifted by ``2**-a`` and by ``2**b``) that XLA reduces in one fused pass."""
    size = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    a, b = _shifts(size, x.dtype)
    xh, xl = x * np.asarray(2.0**-a, x.dtype), x * np.asarray(2.0**b, x.dtype)
    # three plain sums, not one variadic reduction: TPU fuses them into one pass either way, and
    # its cost model charges the variadic form 4% more bytes on the tree (901 vs 866 MiB)
    s0, sh, sl = (jnp.sum(v * v, axis=axes, keepdims=True) for v in (x, xh, xl))
    use_hi = jnp.isinf(s0)  # some square or partial sum overflowed (or an entry is inf)
    use_lo = s0 < _direct_threshold(size, x.dtype)  # squares lost to underflow could matter (0 too)
    sq = jnp.where(use_hi, sh, jnp.where(use_lo, sl, s0))
    e = jnp.where(use_hi, a, jnp.where(use_lo, -b, 0)).astype(np.int32)
    return _safe_sqrt(sq), e


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _norm_split(axes: tuple[int, ...], p: jax.Array, u: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(mant, exp)``, the norms of :func:`_combine` ``(p, u)`` over ``axes`` (keepdims).

    On TPU and GPU: :func:`_three_sums`, one fused pass and no branch. On CPU, where XLA
    reduces a materialised array fast (YNNPACK) but a variadic reduction slowly, the plain sum
    of squares, and :func:`_three_sums` under a ``cond`` only when some unit's sum overflowed
    or fell below ``N tiny / u`` (0 included); the cond's operands are ``p`` and ``u``
    themselves, so the sum is never materialised for it. Both give the same norms.
    """
    return _norm_split_body(axes, p, u)


@functools.partial(jax.jit, static_argnums=(0,))  # traced and lowered once per shape and dtype
def _norm_split_body(axes: tuple[int, ...], p: jax.Array, u: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    x = _combine(p, u)
    size = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))

    def cpu(p, u):
        s0 = jnp.sum(x * x, axis=axes, keepdims=True)
        needs = jnp.isinf(s0) | (s0 < _direct_threshold(size, x.dtype))
        return jax.lax.cond(
            jnp.any(needs),
            lambda p, u: _three_sums(_combine(p, u), axes),
            lambda p, u: (_safe_sqrt(s0), jnp.zeros_like(s0, dtype=np.int32)),
            p,
            u,
        )

    return jax.lax.platform_dependent(p, u, cpu=cpu, default=lambda p, u: _three_sums(x, axes))


def _norm_split_jvp_rule(axes, primals, tangents):
    p, u = primals
    dp, du = tangents
    mant, e = _norm_split(axes, p, u)
    # d||x|| = <x, dx> / ||x||, on the same power-of-two scale as the primal: exact shifts
    x, dx = _combine(p, u), _combine(dp, du)
    xs, dxs = ldexp(x, -e), ldexp(dx, -e)
    dot = jnp.sum(xs * dxs, axis=axes, keepdims=True)
    dm = jnp.where(mant > 0, dot / jnp.where(mant > 0, mant, 1), 0)
    return (mant, e), (dm, np.zeros(e.shape, jax.dtypes.float0))


_norm_split.defjvp(_norm_split_jvp_rule)


def unit_norms(w: jax.Array | tuple[jax.Array, jax.Array], axes: tuple[int, ...], *, split: bool = False) -> Any:
    r"""L2 norm of every unit of ``w``: :math:`n = \sqrt{\sum_{i \in \text{axes}} w_i^2}`.

    Reduces ``axes`` with ``keepdims=True`` and accumulates in float32 (float64 for
    float64 input). ``axes`` is a tuple of ints (use ``resolve_axes`` for the ``axis=`` rules).
    The gradient is finite (zero) at a zero unit. A unit holding a NaN has norm NaN, never 0;
    one holding an inf has norm inf.

    One pass over the leaf, with no branch on TPU and GPU: three sums of squares are reduced
    together (on CPU, where XLA runs a variadic reduction slowly, the plain sum first and the
    three under a ``cond`` only when some unit needs them),
    :math:`S_0 = \sum w_i^2`, :math:`S_{hi} = \sum (w_i 2^{-a})^2` and
    :math:`S_{lo} = \sum (w_i 2^{b})^2` (exact power-of-two shifts), and each unit takes
    :math:`\sqrt{S_0}` unless it overflowed (then :math:`2^a \sqrt{S_{hi}}`) or fell below
    :math:`N\,\mathrm{tiny}/u` (then :math:`2^{-b} \sqrt{S_{lo}}`), with :math:`N` the unit's
    size. With :math:`|w_i| < 2^{e_{max}}`, smallest normal :math:`2^{e_{min}}`, unit roundoff
    :math:`2^{-p}` and :math:`L = \log_2 N`, the shifts
    :math:`a = \lceil (e_{max} + L)/2 \rceil + 1` and
    :math:`b = \lceil (L - e_{min} + 2p - 2)/2 \rceil` (float32, :math:`N = 768`: :math:`a = 70`,
    :math:`b = 91`) keep every selected sum finite and lose to underflow less than :math:`u` of
    it (up to units of about :math:`2^{29}` entries in float32): the norm is accurate to a few
    ulps from the smallest entry to the largest finite one, and a unit reads 0 only when every
    entry is 0
    (subnormal entries read as 0 where the backend flushes them, as XLA on CPU and TPU does).

    ``w`` may also be a pair ``(p, u)``: the norms of ``p + u`` (``u`` cast to ``p``'s dtype, as
    ``optax.apply_updates`` adds them), computed without materialising the sum, which a compiled
    step fuses into the reduction.

    With ``split=True`` returns a :class:`Split` ``(mant, exp)``, norm ``mant * 2**exp``, which
    stays exact where the norm itself overflows the dtype (it is ``inf`` as a plain float).

    >>> import jax.numpy as jnp
    >>> unit_norms(jnp.array([[3.0, 0.0], [4.0, 0.0]]), (0,))
    Array([[5., 0.]], dtype=float32)
    >>> big = unit_norms(jnp.full((4, 1), 3e38), (0,), split=True)   # 6e38: beyond float32
    >>> big.value()
    Array([[inf]], dtype=float32)
    >>> round(float(big.mant[0, 0]) * 2.0 ** int(big.exp[0, 0]) / 1e38, 5)
    6.0
    >>> unit_norms(jnp.full((4, 1), 1e-30), (0,))     # every square underflows in float32
    Array([[2.e-30]], dtype=float32)

    References:
      Blue, "A portable Fortran program to find the Euclidean norm of a vector", ACM TOMS 4(1),
      1978 (three accumulators for big, medium and small entries, scaled by constants; here
      each accumulator sums every entry, so the choice is made per unit after one pass).
      Anderson, "Algorithm 978: Safe scaling in the Level 1 BLAS", ACM TOMS 44(1), 2017.
    """
    if isinstance(w, tuple):  # (p, u): the norms of p + u, which is then never materialised
        p, u = (jnp.asarray(a) for a in w)
    else:
        p, u = jnp.asarray(w), None
    acc = acc_dtype(p.dtype)
    axes = tuple(a % max(p.ndim, 1) for a in axes)
    sq_shape = tuple(1 if a in axes else d for a, d in enumerate(p.shape))
    if p.size == 0 or 0 in sq_shape:
        n = jnp.zeros(sq_shape, acc)
        return Split(n, jnp.zeros(sq_shape, np.int32)) if split else n
    mant, e = _norm_split(axes, p, u)
    return Split(mant, e) if split else ldexp(mant, e)


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
    A zero unit stays zero (its direction is undefined). A unit whose norm is inf (an inf
    entry) comes back as zeros, inside the ball; one holding a NaN is left as it is. Moved
    entries are rounded to ``w``'s dtype toward the ball (:func:`apply_scale`).

    Returns ``(w_new, norms, moved)``: the projected array (dtype of ``w``), the norms
    before projection (keepdims, float32/float64; ``inf`` where a norm overflows) and a bool
    mask of the units moved.

    >>> import jax.numpy as jnp
    >>> w_new, n, moved = band_project(jnp.array([[3.0, 0.3], [4.0, 0.4]]), (0,), None, 1.0)
    >>> w_new
    Array([[0.6, 0.3],
           [0.8, 0.4]], dtype=float32)
    >>> moved
    Array([[ True, False]], dtype=bool)
    """
    w = jnp.asarray(w)
    n = unit_norms(w, axes, split=True)
    scale, moved = band_scale(n, min_value, max_value, rate)
    return apply_scale(w, scale), n.value(), moved


def band_scale(n: Any, min_value: Any | None, max_value: Any, rate: Any | None = None):
    """Per-unit factor of :func:`band_project` from the norms ``n``: ``(scale, moved)``.

    ``n`` is a float array or a :class:`Split` (``unit_norms(..., split=True)``, exact even
    where the norm overflows the dtype). ``scale`` is exactly 1 where ``moved`` is False.
    It is an *encoded* factor, to be applied only by :func:`apply_scale` or
    :func:`scaled_update`: the factor itself when it is a normal number, ``-sqrt(factor)``
    when it is not (``c / n`` below ``2**-126`` in float32, a unit of norm ``> c * 2**126``).
    A norm of inf gives the factor 0 (the unit becomes zeros, inside the ball), a NaN norm
    leaves the unit alone.

    >>> import jax.numpy as jnp
    >>> band_scale(jnp.array([0.5, 4.0]), None, 2.0)
    (Array([1. , 0.5], dtype=float32), Array([False,  True], dtype=bool))
    """
    m, e = _normalise(n)
    acc = m.dtype
    bm, be = _normalise(jnp.asarray(max_value, acc))
    above = _less(bm, be, m, e)
    if min_value is None:
        outside = above
        grow = jnp.zeros_like(above)
        cm, ce = bm, be
    else:
        am, ae = _normalise(jnp.asarray(min_value, acc))
        below = (m > 0) & _less(m, e, am, ae)
        outside = above | below
        grow = below
        cm, ce = jnp.where(below, am, bm), jnp.where(below, ae, be)
    # rho = clip(n, a, b) / n = q * 2**k, q in (1/2, 2]; for an inf norm q is 0
    q = cm / jnp.where(m > 0, m, 1) * jnp.where(jnp.isinf(m), 0, 1).astype(acc)
    k = ce - e
    if rate is None:
        fm, fk = q, k
        moved = outside
    else:
        r = jnp.asarray(rate, acc)
        moved = outside & (r > 0)
        # shrink: r rho + (1 - r) (a normal number unless r == 1); grow: rho (r + (1 - r) / rho)
        shrink_m = jnp.where(r == 1, q, r * ldexp(q, k) + (1 - r))
        shrink_k = jnp.where(r == 1, k, 0)
        grow_m = q * (r + (1 - r) * ldexp(1 / jnp.where(q > 0, q, 1), -k))
        fm, fk = jnp.where(grow, grow_m, shrink_m), jnp.where(grow, k, shrink_k)
    return jnp.where(moved, _encode(fm, fk), jnp.ones_like(fm)), moved


def apply_scale(w: jax.Array, scale: jax.Array) -> jax.Array:
    """``w`` times the per-unit factor ``scale`` (:func:`band_scale`, :func:`spectral_scale`).

    Computed in the scale's (accumulation) dtype and rounded to ``w``'s dtype *toward the
    ball*: toward zero where the factor shrinks, away from zero where it grows, so a unit
    moved onto its bound never ends outside it by the final rounding (bfloat16 / float16).
    Where ``scale == 1`` the entries of ``w`` are returned as they are (a select, not a
    multiply: subnormal entries are not flushed). The gradient is that of ``w * factor``.

    >>> import jax.numpy as jnp
    >>> apply_scale(jnp.array([[3.0], [4.0]], jnp.bfloat16), jnp.array([[0.2]]))  # 0.6 -> below
    Array([[0.597656],
           [0.796875]], dtype=bfloat16)
    """
    w = jnp.asarray(w)
    scale = jnp.asarray(scale)
    t = _apply_factor(w.astype(scale.dtype), scale)
    out = _round_inward(t, w.dtype, _shrinks(scale)).astype(w.dtype)
    return jnp.where(scale == 1, w, out)


def _broadcast_axes(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The axes of ``shape`` over which a ``scale_shape`` factor is broadcast (one factor each)."""
    s = (1,) * (len(shape) - len(scale_shape)) + tuple(scale_shape)
    return tuple(a for a in range(len(shape)) if s[a] == 1)


def scaled_update(
    p: jax.Array, u: jax.Array, scale: jax.Array, *, max_value: Any | None = None, gain: float = 1.0
) -> jax.Array:
    r"""The update :math:`u'` that takes ``p`` to :math:`(p + u)\,s` under ``optax.apply_updates``.

    Contract. ``scale`` is the per-unit (per-matrix) encoded factor of :func:`band_scale` or
    :func:`spectral_scale`, broadcastable to ``p``. ``optax.apply_updates(p, u')`` computes
    ``(p + u').astype(p.dtype)``; the result :math:`r` is what this function controls:

    - where :math:`s = 1` it returns ``u`` itself, bit for bit;
    - elsewhere :math:`w = p + u` (rounded to ``p``'s dtype, as the optimizer alone would give),
      the target :math:`t = w s` (accumulation dtype), and :math:`u'` is chosen so that
      :math:`r` is the value of ``p``'s dtype nearest :math:`t` *on the side of the ball*:
      :math:`|r_i| \le |t_i|` (same sign or 0) where :math:`s < 1`, :math:`|r_i| \ge |t_i|`
      where :math:`s > 1`. A norm that is monotone in the magnitudes of the entries (the L2
      norm of a unit) therefore never ends above the bound it was scaled to.

    Why not :math:`u' = p (s - 1) + u s`: rounded to the leaf's dtype, :math:`u'` is about
    :math:`-p` when :math:`s` is small, with an error of half an ulp of :math:`p`, i.e.
    :math:`\epsilon / (2 s)` relative to the target (a bfloat16 unit shrunk 512x ended at 0,
    one shrunk 113x at :math:`1.026\,c`). Here :math:`u'` is rounded to nearest from the
    exact-enough :math:`t - p` and then moved by one ulp at a time (at most twice; else
    :math:`u' = -p`, :math:`r = 0`) until :math:`r = p \oplus u'` lies on the right side.
    That is exact whenever :math:`t` is reachable: :math:`p \oplus u'` can only take values on
    the grid of :math:`u'`, so an entry whose target is below about one ulp of :math:`p`
    (:math:`s \lesssim \epsilon`, a shrink by 128x in bfloat16, 1024x in float16, :math:`10^7`
    in float32) comes out 0 or one grid step below its target: inside the ball, with an error
    of at most :math:`2\,\mathrm{ulp}(u'_i) + \mathrm{ulp}(t_i)` per entry.

    Spectral norms are not monotone in the magnitudes of the entries: a rounding error
    :math:`E = r - w s` can lift :math:`\sigma_{\max}` by up to :math:`\lVert E \rVert_2`.
    Per entry, :math:`|E_i| \le \mathrm{ulp}(t_i)` (the target in ``p``'s dtype)
    :math:`+ 2\,\mathrm{ulp}(u'_i) + \mathrm{ulp}(r_i)` (the grid of :math:`p \oplus u'`)
    :math:`+ 2 u |t_i|` (:math:`t` itself, in the accumulation dtype) :math:`\le B_i =
    \epsilon (4 |t_i| + 2.01 |t_i - p_i|) + 4\,\mathrm{denorm}`, with :math:`\epsilon` the
    spacing of ``p``'s dtype at 1 (:math:`\mathrm{ulp}(x) \le \epsilon |x|`, :math:`\epsilon
    \ge 2u`) and :math:`|u'_i| \le 1.005 |t_i - p_i|`. With ``max_value=c`` (for a certified
    :math:`s \le c / \sigma_{\max}(w)`: the ``"gram"`` estimator) the target is lowered to
    :math:`t (1 - \beta)`, :math:`\beta = g \lVert B \rVert_F / c + 2 \epsilon` (the
    :math:`2\epsilon` covers the rounding of :math:`s` itself), :math:`\lVert B \rVert_F` taken
    per matrix (over the axes ``scale`` is broadcast along), and ``gain`` :math:`g` a bound on
    :math:`\lVert A_E \rVert_2 / \lVert E \rVert_F` for the leaf's operator: 1 for a matrix,
    :math:`\sqrt{\prod \text{kernel size}}` for a convolution. Then
    :math:`\sigma_{\max}(r) \le c(1 - \beta) + \lVert E \rVert_2 \le c` for sure
    (:math:`\beta \ge 1`: the matrix becomes 0). The price, :math:`\beta`, is about
    :math:`4 \epsilon \lVert t \rVert_F / c` for a small step: :math:`10^{-6}` in float32, a
    few percent in bfloat16 (its 8 bits cannot certify more). Without ``max_value`` the
    spectral norm lands within :math:`\lVert B \rVert_F` of :math:`s\,\sigma_{\max}(w)`,
    usually below it (rounding toward zero shrinks the dominant direction).

    Units containing an inf get the factor 0 from :func:`band_scale` and come back as zeros
    (as :func:`band_project` returns them); a NaN unit is left alone; an entry of ``p`` that is
    itself inf or NaN keeps its update (no finite update moves it). The gradient is that of
    :math:`w s - p`.
    """
    p, u = jnp.asarray(p), jnp.asarray(u)
    scale = jnp.asarray(scale)
    if max_value is not None:
        return _careful_update(p, u, scale, max_value, gain)
    # A per-leaf cond, not a select: the careful path costs several times the simple one, and
    # on XLA:CPU the cond also keeps the scheduler from holding every leaf's update alive at
    # once (benchmarks/RESULTS.md, "Performance and scale": without it the step was slower)
    return jax.lax.cond(_mild(scale), _simple_update, lambda p, u, s: _careful_update(p, u, s), p, u, scale)


def _mild(scale: jax.Array, axis: Any = None) -> jax.Array:
    """Whether every encoded factor (over ``axis``) is a plain one in ``[1/2, 2]``
    (:func:`_simple_update` holds)."""
    return jnp.all((jnp.abs(scale) >= 0.5) & (jnp.abs(scale) <= 2) & (scale > 0), axis=axis)


@jax.jit  # traced and lowered once per shape and dtype, then called by every such leaf
def _simple_update(p: jax.Array, u: jax.Array, scale: jax.Array) -> jax.Array:
    """:func:`scaled_update` for factors in ``[1/2, 2]``.

    The target rounded toward the ball (``t_r``) and ``p`` are within a factor 2 of each other
    wherever ``p`` dominates the entry, so ``t_r - p`` is exact (Sterbenz) and ``p + (t_r - p)``
    lands on ``t_r``; elsewhere the entry is below the rounding of ``p + u`` itself. One pass,
    no correction steps: the training-step hot path.
    """
    pt, ut, acc = p.dtype, u.dtype, scale.dtype
    st = jnp.promote_types(pt, ut)
    w = (p.astype(st) + u.astype(st)).astype(pt)
    t = _apply_factor(w.astype(acc), scale)
    target = _round_inward(t, pt, _shrinks(scale))
    v = (jax.lax.stop_gradient(target).astype(st) - p.astype(st)).astype(ut)
    v = _exact_with_smooth_tangent(v, (t - p.astype(acc)).astype(ut))
    return jnp.where(scale == 1, u, v)


@functools.partial(jax.jit, static_argnames=("gain",))
def _careful_update(p: jax.Array, u: jax.Array, scale: jax.Array, max_value: Any | None = None, gain: float = 1.0) -> jax.Array:
    """:func:`scaled_update` for any factor: the target rounded inward, then ``u'`` moved one ulp
    at a time until ``p + u'`` lies on the ball's side of it (the contract spelled out there)."""
    pt, ut = p.dtype, u.dtype
    st = jnp.promote_types(pt, ut)  # the dtype p + u' is computed in before the cast to p's
    acc = scale.dtype

    def land(v):  # what optax.apply_updates(p, v) gives
        return (p.astype(st) + v.astype(st)).astype(pt)

    w = land(u)
    t = _apply_factor(w.astype(acc), scale)
    shrink = _shrinks(scale)
    pa = p.astype(acc)
    if max_value is not None:
        c = jnp.asarray(max_value, acc)
        eps = float(jnp.finfo(pt).eps)  # >= 2 u of the accumulation dtype
        denorm = float(jnp.finfo(pt).smallest_subnormal)
        ts = jax.lax.stop_gradient(t)
        bound = eps * (4 * jnp.abs(ts) + 2.01 * jnp.abs(ts - pa)) + 4 * denorm
        fro = unit_norms(bound, _broadcast_axes(p.shape, scale.shape))
        beta = gain * fro / c + 2 * eps
        t = jnp.where(beta < 1, t * (1 - jnp.minimum(beta, 1)), jnp.zeros_like(t))
    target = _round_inward(t, pt, shrink)  # in p's dtype, on the ball's side of t
    ts, pa_s = jax.lax.stop_gradient(target).astype(acc), jax.lax.stop_gradient(pa)
    v = (ts - pa_s).astype(ut)
    for _ in range(2):  # one step suffices in exact analysis; the second is a guard
        r = land(v).astype(acc)
        bad = jnp.where(shrink, (jnp.abs(r) > jnp.abs(ts)) | (r * ts < 0), jnp.abs(r) < jnp.abs(ts))
        v = jnp.where(bad, jnp.nextafter(v, jnp.where(r < ts, jnp.inf, -jnp.inf).astype(ut)), v)
    r = land(v).astype(acc)
    still = shrink & ((jnp.abs(r) > jnp.abs(ts)) | (r * ts < 0))
    v = jnp.where(still, (-p).astype(ut), v)  # p + (-p) == 0 exactly: inside for sure
    v = jnp.where(jnp.isfinite(p), v, u)  # an inf in p itself cannot be moved by an update
    v = _exact_with_smooth_tangent(v, (t - pa).astype(ut))
    # the same select as _simple_update's, written differently on purpose: XLA hoists an
    # instruction common to both branches of a cond out of it, and then the cond returns u and
    # v (two full-size results) instead of one (TPU cost model, spectral power step on the
    # issue's tree: 1037.6 -> 1001.6 MiB)
    return jnp.where(scale != 1, v, u)


def scaled_updates(ps: list, us: list, scale: jax.Array) -> list:
    """:func:`scaled_update` of several leaves of one shape, dtypes and sharding; ``scale`` holds
    their factors stacked on a new leading axis (computed once for the group).

    Each leaf keeps its own ``cond`` (one-pass update, or the careful one when one of its
    factors is outside ``[1/2, 2]``): on XLA:CPU a cond per leaf keeps the scheduler from holding
    every leaf's update alive at once. Which branch each leaf takes is one reduction over the
    stack, and the stacked factors enter every cond whole, sliced inside, so XLA does not fuse
    a copy of the group's per-unit arithmetic into each leaf.
    """
    ps, us = [jnp.asarray(p) for p in ps], [jnp.asarray(u) for u in us]
    mild = _mild(scale, axis=tuple(range(1, scale.ndim)))
    return [
        jax.lax.cond(
            mild[j],
            lambda p, u, s, j=j: _simple_update(p, u, s[j]),
            lambda p, u, s, j=j: _careful_update(p, u, s[j]),
            p,
            u,
            scale,
        )
        for j, (p, u) in enumerate(zip(ps, us))
    ]


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
    """``(batch..., rows..., cols...)`` view reshaped to ``(B, R, C)`` (empty views too)."""
    x = jnp.transpose(w, d.batch + d.rows + d.cols)
    size = lambda axes: int(np.prod([w.shape[a] for a in axes], dtype=np.int64))
    return x.reshape(size(d.batch), size(d.rows), size(d.cols))


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


def _matrix_exponent(x: jax.Array, d) -> jax.Array:
    """:func:`exponent_of_max` of every matrix of the leaf ``x``, shape ``batch_shape``."""
    e = exponent_of_max(x, axes=d.rows + d.cols)  # remaining axes: the batch axes, sorted
    return jnp.transpose(e, np.argsort(np.argsort(d.batch))) if len(d.batch) > 1 else e


def _empty_view(w: jax.Array, d) -> bool:
    return any(w.shape[a] == 0 for a in d.rows + d.cols)


def init_power_vector(key: jax.Array, w: Any, dims: Any = None) -> jax.Array:
    """A random unit right-singular-vector guess, shape ``batch_shape + col_shape``, float32/64.

    >>> import jax, jax.numpy as jnp
    >>> init_power_vector(jax.random.key(0), jnp.ones((5, 3))).shape
    (3,)
    """
    d = _dims(w, dims, "init_power_vector")
    shape = tuple(np.shape(w)[a] for a in d.batch + d.cols)
    u = jax.random.normal(key, shape, acc_dtype(jnp.result_type(w)))
    n = _vec_norm(u, len(d.batch))
    n = jnp.where(n > 0, n, 1)
    return u / n.reshape(u.shape[: len(d.batch)] + (1,) * len(d.cols))


def sigma_power(
    w: jax.Array, u: jax.Array, *, num_iters: int = 1, dims: Any = None
) -> tuple[jax.Array, jax.Array]:
    r"""Largest singular value by power iteration, warm-started from ``u``.

    Each iteration reads the matrix twice: :math:`v = W u / \lVert W u\rVert`,
    :math:`u = W^\top v / \lVert W^\top v \rVert`, and the estimate is
    :math:`\hat\sigma = \lVert W^\top v \rVert = v^\top W u_{\text{new}} \le \sigma_{\max}(W)`
    (a lower bound: it under-estimates until ``u`` has converged; rounding can lift it by at
    most :math:`\gamma_R \sqrt{\min(R, C)}` relative, :math:`\gamma_k = k u / (1 - k u)`).
    The products run on the leaf's own layout with ``dot_general`` at ``Precision.HIGHEST``,
    so a sharded matrix is never gathered. Each matrix is first divided by the power of two of
    its largest entry (exact, see the module docstring), so ``1e20 * eye`` and
    ``1e-20 * eye`` work; the estimate is multiplied back (``inf`` if it overflows). A zero
    (or empty) matrix gives :math:`\hat\sigma = 0` and keeps ``u``.

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
    >>> round(float(sigma_power(1e30 * w, u0, num_iters=30)[0]) / 1e30, 5)   # ||W u||^2 > 3e38
    3.0

    References:
      Miyato et al., "Spectral normalization for generative adversarial networks", ICLR 2018.
    """
    if int(num_iters) < 1:
        raise ValueError(f"sigma_power: num_iters must be >= 1, got {num_iters}")
    w, u = jnp.asarray(w), jnp.asarray(u)
    d = _dims(w, dims, "sigma_power")
    acc = acc_dtype(w.dtype)
    if _empty_view(w, d):
        return jnp.zeros(_batch_shape(w, d), acc), u.astype(acc)

    return auto_where_explicit(
        lambda w, u: _sigma_power_body(w, u, d, int(num_iters)), (w, u), lambda: (batch_spec(w, d.batch), like(u))
    )


@functools.partial(jax.jit, static_argnums=(2, 3))  # traced and lowered once per shape and view
def _sigma_power_body(w: jax.Array, u: jax.Array, d: Any, num_iters: int) -> tuple[jax.Array, jax.Array]:
    acc = acc_dtype(w.dtype)
    x = w.astype(acc)
    # The hot path iterates on the leaf as it is (one read of it per product, as before the
    # scaling existed). Only when some sigma leaves [2**-60, 2**60], where a sum of squares
    # of W u could over- or underflow, is the step redone on the scaled matrices.
    sigma, v = power_loop(lambda u: _matvec(x, u, d), lambda v: _rmatvec(x, v, d), u, len(d.batch), num_iters, acc)
    safe = jnp.all((sigma >= 2.0**-60) & (sigma <= 2.0**60))
    return jax.lax.cond(safe, lambda _: (sigma, v), lambda _: _power_scaled(x, u, d, num_iters), None)


def _power_scaled(x: jax.Array, u: jax.Array, d: Any, num_iters: int) -> tuple[jax.Array, jax.Array]:
    """The power iteration on every matrix of ``x`` divided by the power of two of its largest
    entry (exact), the estimate multiplied back: :func:`sigma_power`'s rare branch."""
    acc = x.dtype
    e = exponent_of_max(x, axes=d.rows + d.cols, keepdims=True)
    xs = ldexp(x, -e)
    sigma, v = power_loop(lambda u: _matvec(xs, u, d), lambda v: _rmatvec(xs, v, d), u, len(d.batch), num_iters, acc)
    return ldexp(sigma, _matrix_exponent(x, d)), v


def sigma_power_of_sum(
    p: jax.Array, u: jax.Array, vec: jax.Array, *, num_iters: int = 1, dims: Any = None
) -> tuple[jax.Array, jax.Array]:
    """:func:`sigma_power` of ``p + u`` (``u`` cast to ``p``'s dtype, as ``optax.apply_updates``
    adds them): what :func:`spectral_norm`'s power estimator runs on every training step.

    On CPU, for a float32/float64 leaf, each product is taken on ``p`` and ``u`` apart,
    :math:`(P + U) x = P x + U x`, so the sum is never written to memory: XLA:CPU does not fuse
    an elementwise producer into a dot, and the materialised sum cost one write and two more
    reads per step (benchmarks/RESULTS.md, "Performance and scale"). The estimate is then that
    of the unrounded sum, within a float32 rounding of the matrix (``2**-24`` relative per
    entry) of :func:`sigma_power` on the rounded one. Other backends, other dtypes (a bfloat16
    sum would differ by its own rounding) and the rare rescaled branch (some estimate outside
    ``[2**-60, 2**60]``) take :func:`sigma_power` of the rounded sum itself.
    """
    p, u = jnp.asarray(p), jnp.asarray(u)
    d = _dims(p, dims, "sigma_power")
    acc = acc_dtype(p.dtype)

    def rounded(p, u, vec):
        return sigma_power(p + u.astype(p.dtype), vec, num_iters=int(num_iters), dims=d)

    if _empty_view(p, d) or p.dtype != acc or u.dtype != acc:
        return rounded(p, u, vec)

    def cpu(p, u, vec):
        return auto_where_explicit(
            lambda p, u, vec: _sigma_power_sum_body(p, u, vec, d, int(num_iters)),
            (p, u, vec),
            lambda: (batch_spec(p, d.batch), like(vec)),
        )

    return jax.lax.platform_dependent(p, u, vec, cpu=cpu, default=rounded)


@functools.partial(jax.jit, static_argnums=(3, 4))  # traced and lowered once per shape and view
def _sigma_power_sum_body(p: jax.Array, u: jax.Array, vec: jax.Array, d: Any, num_iters: int) -> tuple[jax.Array, jax.Array]:
    acc = acc_dtype(p.dtype)
    sigma, v = power_loop(
        lambda z: _matvec(p, z, d) + _matvec(u, z, d),
        lambda z: _rmatvec(p, z, d) + _rmatvec(u, z, d),
        vec,
        len(d.batch),
        num_iters,
        acc,
    )
    safe = jnp.all((sigma >= 2.0**-60) & (sigma <= 2.0**60))
    return jax.lax.cond(safe, lambda p, u: (sigma, v), lambda p, u: _power_scaled(p + u, vec, d, num_iters), p, u)


def power_loop(apply, apply_t, u: jax.Array, nb: int, num_iters: int, acc: Any) -> tuple[jax.Array, jax.Array]:
    """Power iteration on any linear map given ``apply`` (``A u``) and ``apply_t`` (``A^T v``).

    ``u`` has ``nb`` leading batch axes (one operator each). Returns ``(sigma, u)`` with
    ``sigma = ||A^T v||`` for the normalised ``v = A u / ||A u||``; a zero operator gives 0
    and keeps ``u``. Up to 4 iterations are unrolled (what a training step runs). The caller
    scales the operator so that ``||A u||**2`` cannot overflow (see :func:`sigma_power`).
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

    Each matrix is divided by the power of two of its largest entry before the SVD and the
    result multiplied back, so huge and tiny matrices are exact too. Empty matrices give 0.

    >>> import jax.numpy as jnp
    >>> float(sigma_svd(jnp.array([[3.0, 0.0], [0.0, -4.0]])))
    4.0
    >>> round(float(sigma_svd(jnp.array([[3e38, 0.0], [0.0, -1e38]]))) / 3e38, 6)
    1.0
    """
    w = jnp.asarray(w)
    d = _dims(w, dims, "sigma_svd")
    acc = acc_dtype(w.dtype)
    if _empty_view(w, d):
        return jnp.zeros(_batch_shape(w, d), acc)

    def body(w):
        x = _to_stack(w.astype(acc), d)
        e = exponent_of_max(x, axes=(1, 2))
        s = jnp.linalg.svd(ldexp(x, -e[:, None, None]), compute_uv=False)[:, 0]
        return ldexp(s, e).reshape(_batch_shape(w, d))

    return auto_where_explicit(body, (w,), lambda: batch_spec(w, d.batch))


def _gamma(k: float, u: float) -> float:
    """Higham's :math:`\\gamma_k = k u / (1 - k u)` (inf when ``k u >= 1``)."""
    return k * u / (1 - k * u) if k * u < 1 else float("inf")


def gram_margin(n: int, dtype: Any, *, inner: int | None = None, num_iters: int = 8, complex_: bool = False) -> float:
    """The a-priori (worst-case) relative rounding margin of :func:`gram_stack`.

    For an ``inner x n`` matrix (``inner >= n``; default ``inner = n``) with ``num_iters``
    Gram iterations, assuming nothing about its spectrum (stable rank ``n``): the margin
    :func:`gram_stack` adds is never larger, and is much smaller once the iteration has
    converged (it bounds the stable rank a posteriori). See :func:`sigma_gram`.

    >>> round(gram_margin(2, "float32", inner=30000), 6)  # a 30000 x 2 matrix, blocked
    2.2e-05
    >>> round(gram_margin(768, "float32"), 3)              # 768 x 768 of stable rank 768
    0.036
    """
    f = _fmt(dtype)
    inner = n if inner is None else max(int(inner), int(n))
    t = max(1, min(int(num_iters), _MAX_GRAM_ITERS))
    blocks = _gram_blocks(inner, n)
    log_m = 0.0
    for i in range(1, t + 1):
        eta = (_product_error(inner, dtype, complex_, blocks) if i == 1 else _product_error(n, dtype, complex_)) * n
        if eta >= 0.5:
            return float("inf")
        log_m += -np.log1p(-eta) * 0.5**i
    count = n * n * (2 if complex_ else 1)
    log_m += 0.5**t * np.log((1 + f.u) / np.sqrt(1 - _gamma(count + 1, f.u)))
    return float(np.expm1(log_m) + 24 * f.u)


_MAX_GRAM_ITERS = 24  # 2**-24: further iterations change nothing a float32 can hold


def sigma_gram(w: jax.Array, *, num_iters: int = 8, dims: Any = None) -> jax.Array:
    r"""Certified upper bound on the largest singular value by Gram iteration.

    With :math:`G_0 = W` and :math:`G_{t+1} = G_t^\top G_t`, the singular values of
    :math:`G_t` are :math:`\sigma_i^{2^t}`, so

    .. math:: \sigma_{\max}(W) \le \lVert G_t \rVert_F^{2^{-t}}
              = \Big(\sum_i \sigma_i^{2^{t+1}}\Big)^{2^{-(t+1)}}
              \le \sigma_{\max}(W)\,\operatorname{rank}(W)^{2^{-(t+1)}},

    an upper bound for every ``t`` that converges to :math:`\sigma_{\max}` super-linearly
    (Delattre, Barthélemy, Araujo & Allauzen 2023). Every product runs at
    ``Precision.HIGHEST``; the first is the smaller Gram matrix (:math:`n = \min(R, C)`
    columns, :math:`k_1 = \max(R, C)` terms per entry), the later ones have :math:`n` terms.

    **Rounding.** The bound holds in exact arithmetic; the one returned holds in floating
    point (unit roundoff :math:`u`, :math:`\gamma_k = k u / (1 - k u)`, IEEE arithmetic with
    any summation order). Let :math:`H_0 = W 2^{-e_0}`, :math:`\hat G_t = fl(H_{t-1}^\top
    H_{t-1})`, :math:`H_t = \hat G_t 2^{-e_t}`, every :math:`2^{-e}` the power of two of the
    largest entry: the scalings are exact (no Frobenius division rounds), the largest entry of
    each :math:`H_t` lies in :math:`[1, 2)`, so nothing overflows and :math:`s_t =
    \sigma_{\max}(H_t) \ge 1`. The roundings left are:

    1. each product (:func:`_product_error`): :math:`\hat G_t = H^\top H + E_t`,
       :math:`\lVert E_t \rVert_2 \le \lVert E_t \rVert_F \le c_t \lVert H_{t-1} \rVert_F^2`,
       :math:`c_t = \gamma_{k_t}` (complex: :math:`\sqrt 2 \gamma_{k_t + 2}`), so by Weyl
       :math:`\sigma_{\max}(\hat G_t) \ge s_{t-1}^2 (1 - \eta_t)` with :math:`\eta_t = c_t
       \lVert H_{t-1}\rVert_F^2 / s_{t-1}^2`: the inner dimension times the stable rank
       (:math:`\le n`). The first product has :math:`k_1 = \max(R, C)` terms: a tall
       :math:`30000 \times 2` matrix has :math:`\eta_1 \approx 30000 \cdot 2u`, not
       :math:`2u`; it is therefore summed in about :math:`\sqrt{k_1}` blocks when the
       partial products fit in the matrix's size (:math:`c_1 = \gamma_{k_1/b} + \gamma_b(1 +
       \gamma_{k_1/b})`);
    2. the Frobenius norms (:func:`_fro_up`): the computed norm times :math:`(1 + u) /
       \sqrt{1 - \gamma_{N+1}}` is never below the exact one (:math:`N` squares);
    3. the final :math:`\log_2`, :math:`\exp_2` and products (:func:`_evaluate`): a budget of
       :math:`16u` plus a few :math:`u` per unit of the exponent.

    Unrolling :math:`\log_2 s_t \ge 2 \log_2 s_{t-1} + \log_2(1 - \eta_t) - e_t` gives

    .. math:: \log_2 \sigma_{\max}(W) \le e_0 + \sum_{t=1}^{T-1} 2^{-t} e_t
              + 2^{-T} \log_2 \lVert \hat G_T \rVert_F
              - \sum_{t=1}^{T} 2^{-t} \log_2 (1 - \eta_t):

    the root :math:`2^{-t}` halves the weight of each later product's error, the first
    (weight :math:`1/2`, the largest inner dimension) dominates, and the last Frobenius norm
    enters with weight :math:`2^{-T}`. The stable ranks are bounded *a posteriori*:
    :math:`s_{T-1}^2 \ge \lVert \hat G_T \rVert_F / \sqrt n - \lVert E_T\rVert` and
    :math:`s_{t-1}^2 \ge 2^{e_t} s_t - \lVert E_t \rVert` going back, so a converged
    iteration pays about :math:`c_1 \cdot \text{stable rank}(W) / 2`, not :math:`c_1 n / 2`
    (:func:`gram_margin` gives that worst case: :math:`2 \cdot 10^{-5}` for
    :math:`30000 \times 2`, :math:`3.6\%` for a :math:`768 \times 768` matrix of flat
    spectrum; a Gaussian :math:`256 \times 256` pays about :math:`7 \cdot 10^{-4}`, a
    Gaussian :math:`768 \times 768` :math:`0.6\%`: the price of a worst-case guarantee
    against float32 rounding in a product of 768-term sums). If some
    :math:`\eta_t \ge 1/2` the iteration certifies nothing better than the Frobenius norm
    (rounded up), which is returned; the result is never above it. Subnormal entries (read as
    0 by CPU XLA) add :math:`2 \sqrt{\#\text{subnormal}}\cdot\text{tiny}`. More than 24
    iterations run as 24. The tests check the bound against float64 SVD, and each allowance
    against measured float32 errors (it fails them when set to 0).

    Args:
      w: the leaf; ``dims`` as in :func:`sigma_power`.
      num_iters: Gram iterations ``t >= 1`` (each is one ``n x n`` matrix product).

    Returns:
      The bound per batch index, shape ``batch_shape``; exactly 0 for a zero or empty
      matrix; ``inf`` if the bound overflows the dtype.

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[2.0, 1.0], [0.0, 1.0]])             # sigma_max = 2.2882...
    >>> bound = float(sigma_gram(w, num_iters=6))
    >>> 2.2882456 <= bound < 2.2883
    True
    >>> 244.94897 < float(sigma_gram(jnp.ones((30000, 2)))) < 244.953   # sqrt(60000): tall
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


def _fro_sq(m: jax.Array) -> jax.Array:
    """Squared Frobenius norm of every matrix of a ``(B, R, C)`` stack (real result)."""
    return jnp.sum(jnp.real(m * jnp.conj(m)), axis=(1, 2))


def _fro_up(m: jax.Array) -> jax.Array:
    r"""A certified upper bound on the Frobenius norm of every matrix of a ``(B, R, C)`` stack.

    The computed sum of :math:`N` squares (a complex entry counts twice) is at least
    :math:`(1 - \gamma_{N+1})` times the exact one in any order, the square root adds half
    an ulp: the computed norm times :math:`(1 + u) / \sqrt{1 - \gamma_{N+1}}` is never below
    the exact norm (the entries must not overflow when squared: callers scale them first).
    """
    real = jnp.real(m).dtype
    count = m.shape[1] * m.shape[2] * (2 if jnp.iscomplexobj(m) else 1)
    u = _fmt(real).u
    factor = (1 + u) / np.sqrt(max(1 - _gamma(count + 1, u), 1e-300))
    return _safe_sqrt(_fro_sq(m)) * factor


def _product_error(k: int, dtype: Any, cplx: bool, blocks: int = 1) -> float:
    r"""``c`` with ``||fl(H^H H) - H^H H||_F <= c ||H||_F**2`` for an inner dimension ``k``.

    Any summation order: :math:`|fl(x^\top y) - x^\top y| \le \gamma_k |x|^\top |y|`
    (complex: :math:`\sqrt 2 \gamma_{k+2}`), and :math:`\lVert |H|^\top |H| \rVert_F \le
    \lVert H \rVert_F^2`. Summed in ``blocks`` partial products (:func:`_blocked_gram`):
    :math:`c_{k/b} + c_b (1 + c_{k/b})`.
    """
    u = _fmt(dtype).u
    c = (lambda m: np.sqrt(2) * _gamma(m + 2, u)) if cplx else (lambda m: _gamma(m, u))
    if blocks <= 1:
        return c(k)
    size = -(-k // blocks)
    return c(size) + c(blocks) * (1 + c(size))


def _blocked_gram(h: jax.Array, blocks: int) -> jax.Array:
    """``h^H h`` for a ``(B, k, n)`` stack as a sum of ``blocks`` partial Gram matrices.

    Zero rows pad ``k`` to a multiple (they add exact zeros); the optimization barrier keeps
    XLA from merging the sum into the products (which would undo the error bound).
    """
    if blocks <= 1:
        return jnp.einsum("bij,bik->bjk", jnp.conj(h), h, precision=HIGHEST, preferred_element_type=h.dtype)
    nb, k, n = h.shape
    size = -(-k // blocks)
    h = jnp.pad(h, ((0, 0), (0, size * blocks - k), (0, 0))).reshape(nb, blocks, size, n)
    part = jnp.einsum("bkij,bkil->bkjl", jnp.conj(h), h, precision=HIGHEST, preferred_element_type=h.dtype)
    return jnp.sum(jax.lax.optimization_barrier(part), axis=1)


def _gram_blocks(k: int, n: int) -> int:
    """Blocks of the first product: about sqrt(k), with a partial-product buffer (blocks * n * n)
    no larger than the matrix (k * n), so only tall matrices are blocked."""
    return max(1, min(int(np.sqrt(k)), k // max(n, 1)))


def _evaluate(frac: jax.Array, g_up: jax.Array, log_margin: jax.Array, num_iters: int) -> jax.Array:
    r"""``2**(frac + log2(g_up) 2**-T + log_margin / ln 2)``, rounded up: never below the exact value.

    The evaluation error: ``log2`` (a few ulps of :math:`|\log_2 g|`, weight :math:`2^{-T}`),
    the sum (:math:`3u` of :math:`|arg|`), ``exp2`` (a few ulps) and up to two roundings of the
    result by callers: :math:`16u + \ln 2\,(3u(|arg| + 1) + 2^{-T} 4u (|\log_2 g| + 1))`.
    The same budget covers the :math:`O(u \eta)` rounding of the margin's own terms.
    """
    u = _fmt(frac.dtype).u
    log2_g = jnp.log2(g_up)
    arg = frac + log2_g * 0.5**num_iters + log_margin / np.log(2)
    err = 16 * u + np.log(2) * (3 * u * (jnp.abs(arg) + 1) + 0.5**num_iters * 4 * u * (jnp.abs(log2_g) + 1))
    return jnp.exp2(arg) * (1 + jax.lax.stop_gradient(err))


def gram_stack(x: jax.Array, num_iters: int, extra_margin: float = 0.0) -> jax.Array:
    """The Gram-iteration bound of every matrix of a ``(B, R, C)`` stack, real or complex.

    Certified in floating point: see :func:`sigma_gram` for the rounding analysis this
    implements (exact power-of-two scalings, the a-posteriori margin, the Frobenius fallback,
    the subnormal allowance). The result is multiplied by ``1 + extra_margin`` on top (a
    caller's own error allowance). A zero or empty matrix gives exactly 0, with finite
    gradients. Real dtype of the result: that of ``|x|``.
    """
    if x.shape[1] < x.shape[2]:
        x = jnp.swapaxes(x, 1, 2)  # (B, big, small): the Gram matrix is small x small
    real = jnp.real(x).dtype
    nb, k1, n = x.shape
    if k1 == 0 or n == 0:
        return jnp.zeros((nb,), real)
    f = _fmt(real)
    cplx = jnp.iscomplexobj(x)
    T = max(1, min(int(num_iters), _MAX_GRAM_ITERS))
    sg = jax.lax.stop_gradient
    blocks = _gram_blocks(k1, n)

    bits = jnp.max(_real_bits(x), axis=(1, 2), initial=0)
    e0 = _bits_exponent(bits, real)
    nonzero = bits > 0
    h = ldexp(x, -e0[:, None, None])  # exact: the largest entry in [1, 2)
    fro0 = _fro_up(h)

    # exact scalings, rounded products; record ||H_{t-1}||_F (rounded up), e_t, the error constant
    phi, exps, prods = [], [], []
    for t in range(1, T + 1):
        phi.append(sg(fro0 if t == 1 else _fro_up(h)))
        g = _blocked_gram(h, blocks if t == 1 else 1)
        prods.append(_product_error(k1 if t == 1 else n, real, cplx, blocks if t == 1 else 1))
        if t < T:
            e_t = exponent_of_max(g, axes=(1, 2))
            exps.append(e_t)
            h = ldexp(g, -e_t[:, None, None])
    g_up = _fro_up(g)  # >= ||G_T||_F
    pos = g_up > 0
    g_up = jnp.where(pos, g_up, 1)

    # a-posteriori lower bounds L_t <= s_t**2 (s_t >= 1: the largest entry of H_t is >= 1),
    # from the last product back: s_{T-1}^2 >= ||G_T||_F / sqrt(n) - ||E_T||,
    # s_{t-1}^2 >= 2^{e_t} s_t - ||E_t||; then eta_t = c_t ||H_{t-1}||_F^2 / s_{t-1}^2, the stable
    # rank capped at n. (Their own rounding, O(u eta), is in _evaluate's budget.)
    eps_t = [prods[t] * phi[t] ** 2 for t in range(T)]  # ||E_{t+1}||_2 <= eps_t[t]
    lower = [None] * T
    lower[T - 1] = jnp.maximum(sg(g_up) / np.sqrt(n) - eps_t[T - 1], 1)
    for t in range(T - 1, 0, -1):
        lower[t - 1] = jnp.maximum(ldexp(jnp.sqrt(lower[t]), exps[t - 1]) - eps_t[t - 1], 1)
    log_margin = jnp.zeros((nb,), real)
    certified = jnp.ones((nb,), bool)
    for t in range(T):
        eta = prods[t] * jnp.minimum(float(n), phi[t] ** 2 / lower[t])
        certified = certified & (eta < 0.5)  # beyond: the Frobenius norm does as well
        log_margin = log_margin - jnp.log1p(-jnp.minimum(eta, 0.5)) * 0.5 ** (t + 1)

    # e_0 + sum_t e_t 2^-t: an integer part and an exact fraction (T <= 24)
    num = jnp.zeros((nb,), np.int32)
    for t, e_t in enumerate(exps, start=1):
        num = num + (e_t << (T - t))
    whole = num >> T
    frac = (num - (whole << T)).astype(real) * 0.5**T
    mant = _evaluate(frac, g_up, sg(log_margin), T) * (1 + extra_margin)
    bound = ldexp(ldexp(mant, whole), e0)
    fro_bound = ldexp(fro0, e0)  # the Frobenius norm: certified whatever the iteration did
    bound = jnp.where(certified, jnp.minimum(bound, fro_bound), fro_bound)

    # subnormal entries read as zero: sigma moves by at most ||flushed||_F <= sqrt(count) tiny
    tiny = float(jnp.finfo(real).tiny)
    sub = _count_subnormal(x, axes=(1, 2)).astype(real)
    bound = jnp.where(pos, bound, 0) + jnp.sqrt(sub) * (2 * tiny)
    inf_bits = np.array(0x7FF << 52 if f.int == np.int64 else 0xFF << 23, f.int)
    bound = jnp.where(bits == inf_bits, jnp.inf, jnp.where(bits > inf_bits, jnp.nan, bound))
    return jnp.where(nonzero, bound, 0).astype(real)


def clip_singular_values(w: jax.Array, max_value: Any, *, dims: Any = None) -> tuple[jax.Array, jax.Array]:
    r"""Euclidean projection onto the spectral ball: singular values :math:`\min(s_i, c)`.

    Matrices already inside come back bit for bit. Returns ``(w_new, sigma)`` with sigma the
    exact largest singular value before the projection, shape ``batch_shape``. Accurate at
    every scale (:func:`clip_stack`): the result has :math:`\sigma_{\max} \le c (1 + O(k u))`
    whether sigma was :math:`1.01 c` or :math:`10^{30} c`; the gradient is finite everywhere,
    repeated singular values included. Empty matrices come back as they are (sigma 0).

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
    if _empty_view(w, d):
        return w, jnp.zeros(_batch_shape(w, d), acc)

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


def _herm(m: jax.Array) -> jax.Array:
    return jnp.conj(jnp.swapaxes(m, -1, -2))


def _clip_parts(x: jax.Array, c: jax.Array):
    """SVD pieces of the clip ``U min(S, c) V^H`` for a ``(B, R, C)`` stack and ``(B,)`` bounds."""
    u, s, vh = jnp.linalg.svd(x, full_matrices=False)
    s = s.astype(c.dtype)
    f = jnp.minimum(s, c[:, None])
    return u, s, vh, f


@jax.custom_jvp
def _clip_core(x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(U min(S, c) V^H, s_max)`` for every matrix of a scaled stack, with finite derivatives.

    Below ``2c`` the clip is computed as ``x - U (S - c)_+ V^H`` (what moves is small: the
    error is a few ulps of ``s - c``); above, as ``U min(S, c) V^H`` itself, which does not
    cancel (``x - U (S - c) V^H`` from ``sigma = 10^4 c`` kept an error of ``10^4`` ulps of
    ``c``).
    """
    u, s, vh, f = _clip_parts(x, c)
    small = s[:, 0] <= 2 * c
    coef = jnp.where(small[:, None], f - s, f).astype(x.dtype)
    y = jnp.einsum("bik,bk,bkj->bij", u, coef, vh, precision=HIGHEST, preferred_element_type=x.dtype)
    return jnp.where(small[:, None, None], x + y, y), s[:, 0]


@_clip_core.defjvp
def _clip_core_jvp(primals, tangents):
    r"""Derivative of :math:`X \mapsto U f(S) V^H`, :math:`f = \min(\cdot, c)` (Daleckii-Krein).

    With :math:`P = U^H dX V`: :math:`dY = U (A \circ \mathrm{He}(P) + B \circ \mathrm{Sk}(P))
    V^H + (dX V - U P) D V^H + U D (U^H dX - P V^H)`, :math:`A_{ij} = (f_i - f_j)/(s_i - s_j)`
    (:math:`f'(s_i)` on ties), :math:`B_{ij} = (f_i + f_j)/(s_i + s_j)` (1 at 0),
    :math:`D = f(s)/s` (1 at 0), plus :math:`U \mathbb 1[s > c] V^H dc`. Every coefficient is
    in :math:`[0, 1]`: no division by a gap between singular values, so repeated singular
    values (``2 * eye``, an orthogonal matrix) have a finite derivative.
    """
    x, c = primals
    dx, dc = tangents
    u, s, vh, f = _clip_parts(x, c)
    small = s[:, 0] <= 2 * c
    coef = jnp.where(small[:, None], f - s, f).astype(x.dtype)
    y = jnp.einsum("bik,bk,bkj->bij", u, coef, vh, precision=HIGHEST, preferred_element_type=x.dtype)
    y = jnp.where(small[:, None, None], x + y, y)

    v = _herm(vh)
    cb = c[:, None, None]
    si, sj = s[:, :, None], s[:, None, :]
    fi, fj = f[:, :, None], f[:, None, :]
    low_i, low_j = si <= cb, sj <= cb
    gap = si - sj
    mixed = low_i != low_j
    a = jnp.where(mixed, (fi - fj) / jnp.where(mixed & (gap != 0), gap, 1), jnp.where(low_i & low_j, 1.0, 0.0))
    a = jnp.clip(a, 0, 1)
    tot = si + sj
    b = jnp.where(tot > 0, (fi + fj) / jnp.where(tot > 0, tot, 1), 1.0)
    dd = jnp.where(s > 0, f / jnp.where(s > 0, s, 1), 1.0)
    mm = lambda p, q: jnp.matmul(p, q, precision=HIGHEST)
    p = mm(mm(_herm(u), dx), v)
    he, sk = (p + _herm(p)) / 2, (p - _herm(p)) / 2
    core = a.astype(x.dtype) * he + b.astype(x.dtype) * sk
    ddc = dd.astype(x.dtype)
    left = mm(dx, v) - mm(u, p)  # (I - U U^H) dX V
    right = mm(_herm(u), dx) - mm(p, vh)  # U^H dX (I - V V^H)
    dy = mm(mm(u, core), vh) + mm(left * ddc[:, None, :], vh) + mm(u * ddc[:, None, :], right)
    above = (s > c[:, None]).astype(x.dtype) * dc[:, None].astype(x.dtype)
    dy = dy + jnp.einsum("bik,bk,bkj->bij", u, above, vh, precision=HIGHEST)
    ds = jnp.real(p[:, 0, 0]).astype(s.dtype)
    return (y, s[:, 0]), (dy, ds)


def clip_stack(x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Singular values ``min(s, c)`` for every matrix of a ``(B, R, C)`` stack, real or complex.

    Returns ``(y, sigma)``: matrices with ``sigma <= c`` come back bit for bit; ``sigma`` is
    the largest singular value of each before the clip. Each matrix (and ``c`` with it) is
    divided by the power of two of its largest entry first (exact), the SVD and the
    reconstruction run on that, and the result is multiplied back. The clipped part is
    rebuilt from ``U min(S, c) V^H`` when sigma > 2c (no cancellation: sigma of the result is
    ``c (1 + O(k u))`` at any scale) and as ``x - U (S - c)_+ V^H`` below (closest to ``x``).
    The derivative is finite everywhere (a custom JVP, :func:`_clip_core`).
    """
    real = jnp.real(x).dtype
    if x.shape[1] == 0 or x.shape[2] == 0:
        return x, jnp.zeros(x.shape[:1], real)
    c = jnp.broadcast_to(jnp.asarray(c, real), x.shape[:1])
    e = exponent_of_max(x, axes=(1, 2))
    xs = ldexp(x, -e[:, None, None])
    cs = ldexp(c, -e)
    y, s = _clip_core(xs, cs)
    sigma = ldexp(s, e)
    moved = s > cs
    return jnp.where(moved[:, None, None], ldexp(y, e[:, None, None]), x), sigma


def spectral_scale(sigma: Any, max_value: Any, mode: str) -> tuple[jax.Array, jax.Array]:
    """Per-matrix factor for ``"rescale"`` (``min(1, c/sigma)``) or ``"normalize"`` (``c/sigma``).

    Returns ``(scale, moved)``; a zero matrix (sigma 0) is never moved, an inf sigma gives
    the factor 0 and a NaN sigma leaves the matrix alone. ``sigma`` may be a :class:`Split`.
    ``scale`` is encoded like :func:`band_scale`'s: apply it with :func:`apply_scale` or
    :func:`scaled_update` (the latter with ``max_value=c`` after a certified estimator).
    """
    if mode == "rescale":
        return band_scale(sigma, None, max_value)
    if mode == "normalize":
        return band_scale(sigma, max_value, max_value)
    raise ValueError(f"unknown mode {mode!r}")  # pragma: no cover - validated by callers
