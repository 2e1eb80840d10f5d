"""Every guarantee at every scale and dtype (issue 10, array level).

Certified bounds are never below the float64 truth, nothing overflows or underflows, the update
form lands inside the ball, the exact clip is accurate from any sigma, gradients are finite at
repeated singular values, empty leaves pass through. Each rounding allowance of the library is
checked against measured float32 errors here, so setting it to 0 fails a test:

- ``_fro_up`` (Frobenius norms rounded up): ``test_frobenius_norm_rounded_up``;
- ``_product_error`` (the Gram products, blocked or not): ``test_gram_product_error_bound``;
- ``_evaluate`` (log2 / exp2 / products of the final bound): ``test_final_evaluation_rounds_up``;
- the Gram margin as a whole: ``test_gram_never_below_svd_on_tall_wide_and_rank_one``;
- the subnormal allowances of ``gram_stack`` and ``conv_sigma_gram``:
  ``test_subnormal_entries_keep_the_bound_certified``;
- ``_fft_error`` (the FFT allowance of ``conv_sigma_gram``): ``test_fft_error_allowance``;
- ``scaled_update``'s operator margin (``max_value=``): ``test_certified_update_stays_inside``;
- ``_shifts`` (the overflow shift of the one-pass unit norms):
  ``test_unit_norms_in_one_pass_from_tiny_to_huge``.

Tolerances are stated per test, from the rounding analysis in the docstrings of
``normjax._norms`` (u = 2**-24 is float32's unit roundoff, eps = 2u its spacing at 1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normjax as nj

# full XLA optimisation, as users compile (tests/conftest.py: full_optimization)
pytestmark = pytest.mark.usefixtures("full_optimization")
from normjax import _norms as N
from normjax._conv import ConvSpec, _fft_error, conv_sigma_fft, conv_sigma_gram, conv_sigma_power, conv_sigma_svd

U = 2.0**-24  # float32 unit roundoff
F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
EPS = {F32: 2.0**-23, BF16: 2.0**-7, F16: 2.0**-10}  # spacing at 1: ulp(x) <= eps |x|
RANGE = {F32: (-126, 127), BF16: (-126, 127), F16: (-14, 15)}  # normal exponents
TINY = {d: float(jnp.finfo(d).tiny) for d in (F32, BF16, F16)}
STACK = nj.MatrixDims(in_axes=-2, out_axes=-1)  # leading axes: a batch of matrices
PROPS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _x64():
    """float64 inside a block (jax.enable_x64 since jax 0.8; jax.experimental's before)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


def np_sigma(w):
    """float64 largest singular value of every matrix of a stack (last two axes)."""
    return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[..., 0]


def dense_same_1d(k, n):
    """float64 matrix of the 1-D 'SAME' cross-correlation of a (3, in, out) kernel on n pixels."""
    taps, cin, cout = k.shape
    a = np.zeros((n * cin, n * cout))
    for j in range(n):
        for t in range(taps):
            src = j + t - (taps - 1) // 2
            if 0 <= src < n:
                a[src * cin : (src + 1) * cin, j * cout : (j + 1) * cout] += np.asarray(k[t], np.float64)
    return a


def norms64(x, axes):
    return np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=axes))


def kinds(kind, shape, rng):
    """A float64 matrix stack of the given kind, largest entry 1 in magnitude."""
    *b, r, c = shape
    if kind == "gauss":
        m = rng.normal(size=shape)
    elif kind == "constant":
        m = np.ones(shape)
    elif kind == "rank1":
        m = rng.normal(size=tuple(b) + (r, 1)) * rng.normal(size=tuple(b) + (1, c))
    else:  # repeated singular values: 2 * a matrix with orthonormal columns or rows
        q = np.linalg.qr(rng.normal(size=tuple(b) + (max(r, c), min(r, c))))[0]
        m = 2 * (q if r >= c else np.swapaxes(q, -1, -2))
    return m / np.max(np.abs(m))


# --------------------------------------------------------------------------------------------
# Item 1: the Gram bound and the rounding allowances it is made of
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_iters", [1, 8])
def test_gram_never_below_svd_on_tall_wide_and_rank_one(num_iters):
    """ones((30000, 2)) was 244.9102 < 244.9490 (the margin counted min(R, C) terms, the first
    product sums max(R, C)); 500 x 2 was 2e-6 low. Rank-one stacks converge at once, so the
    rounding of the products is all that separates the bound from sigma: without the margin
    they fall below it (by ~3e-7). Upper side: the a-priori worst case gram_margin plus the
    iteration's own looseness rank**(2**-(T+1)) - 1."""
    rng = np.random.default_rng(0)
    cases = [np.ones((1, 30000, 2)), np.ones((1, 500, 2)), np.ones((1, 2, 500))]
    cases += [rng.normal(size=(16, 3000, 1)) * rng.normal(size=(16, 1, 3))]
    cases += [np.swapaxes(rng.normal(size=(16, 200, 1)) * rng.normal(size=(16, 1, 64)), 1, 2)]
    gram = jax.jit(functools.partial(nj.sigma_gram, num_iters=num_iters, dims=STACK))  # one compile per shape
    for m in cases:
        m = np.asarray(m, np.float32)
        ref = np_sigma(m)
        got = np.asarray(gram(jnp.asarray(m)), np.float64)
        assert np.all(got >= ref), (m.shape, np.min(got / ref - 1))
        r, c = m.shape[-2:]
        worst = N.gram_margin(min(r, c), np.float32, inner=max(r, c), num_iters=num_iters)
        loose = min(r, c) ** 0.5 ** (num_iters + 1)
        assert np.all(got <= ref * loose * (1 + worst)), (m.shape, np.max(got / ref - 1))
    m = np.ones((30000, 2), np.float32)
    assert float(jax.jit(nj.sigma_gram)(jnp.asarray(m))) >= np.sqrt(60000.0)


def test_frobenius_norm_rounded_up():
    """_fro_up: computed norm * (1 + u) / sqrt(1 - gamma_{N+1}) >= the exact norm, any order of
    summation. Half of these random stacks have a computed norm below the float64 one."""
    rng = np.random.default_rng(1)
    for shape in [(64, 1, 1), (64, 7, 5), (16, 300, 30)]:
        x = np.asarray(rng.uniform(1, 2, size=shape) * rng.choice([-1, 1], size=shape), np.float32)
        ref = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=(1, 2)))
        assert np.all(np.asarray(N._fro_up(jnp.asarray(x)), np.float64) >= ref)
    z = rng.normal(size=(32, 6, 4)) + 1j * rng.normal(size=(32, 6, 4))
    z = np.asarray(z, np.complex64)
    ref = np.sqrt(np.sum(np.abs(z.astype(np.complex128)) ** 2, axis=(1, 2)))
    assert np.all(np.asarray(N._fro_up(jnp.asarray(z)), np.float64) >= ref)


@pytest.mark.parametrize("k,n,cplx", [(4000, 3, False), (4000, 3, True), (64, 64, False), (40, 6, True)])
def test_gram_product_error_bound(k, n, cplx):
    """||fl(H^H H) - H^H H||_F <= c ||H||_F^2 with c = _product_error (gamma_k, or sqrt 2
    gamma_{k+2} complex; blocked: c_{k/b} + c_b (1 + c_{k/b})), measured in float64."""
    rng = np.random.default_rng(2)
    h = rng.uniform(1, 2, size=(8, k, n)) * rng.choice([-1, 1], size=(8, k, n))
    if cplx:
        h = h + 1j * rng.uniform(1, 2, size=(8, k, n))
    dtype = np.complex64 if cplx else np.float32
    h = np.asarray(h, dtype)
    h64 = h.astype(np.complex128 if cplx else np.float64)
    exact = np.einsum("bij,bik->bjk", np.conj(h64), h64)
    blocks = N._gram_blocks(k, n)
    got = np.asarray(N._blocked_gram(jnp.asarray(h), blocks))
    err = np.sqrt(np.sum(np.abs(got - exact) ** 2, axis=(1, 2)))
    bound = N._product_error(k, np.float32, cplx, blocks) * np.sum(np.abs(h64) ** 2, axis=(1, 2))
    assert np.all(err > 0) and np.all(err <= bound), (np.max(err / bound), blocks)


def test_final_evaluation_rounds_up():
    """_evaluate: exp2(frac + log2(g) 2^-T + m / ln 2) * (1 + err) >= the float64 value."""
    rng = np.random.default_rng(3)
    frac = np.asarray(rng.integers(0, 2**20, size=4096) * 2.0**-20, np.float32)
    g = np.asarray(np.exp(rng.uniform(0, 20, size=4096)), np.float32)
    m = np.asarray(rng.uniform(0, 1e-3, size=4096), np.float32)
    for t in (1, 8, 24):
        got = np.asarray(N._evaluate(jnp.asarray(frac), jnp.asarray(g), jnp.asarray(m), t), np.float64)
        exact = 2.0 ** (frac.astype(np.float64) + np.log2(g.astype(np.float64)) * 0.5**t + m.astype(np.float64) / np.log(2))
        assert np.all(got >= exact), (t, np.min(got / exact - 1))
        assert np.all(got <= exact * (1 + 256 * U)), t  # and only a few dozen ulps above


def test_fft_error_allowance():
    """_fft_error: every output of the float32 rfftn on the grid is within eps_N * sum |y| of
    the float64 transform, for dense and sparse (kernel-like) inputs on power-of-two, mixed-radix
    and prime grids. conv_sigma_gram adds eps_N sqrt(taps) ||K||_F >= ||K^(w) - K(w)||_F."""
    rng = np.random.default_rng(4)
    for grid in [(64,), (4096,), (6, 6), (32, 32), (7, 13), (97,), (10, 10, 10)]:
        for taps in (3, None):
            y = rng.normal(size=(16,) + grid)
            if taps is not None:  # a kernel embedded in the grid: `taps` entries per axis
                keep = np.zeros(grid, bool)
                keep[tuple(slice(0, taps) for _ in grid)] = True
                y = y * keep
            y = np.asarray(y, np.float32)
            axes = tuple(range(1, len(grid) + 1))
            got = np.asarray(jnp.fft.rfftn(jnp.asarray(y), axes=axes))
            exact = np.fft.rfftn(y.astype(np.float64), axes=axes)
            scale = np.sum(np.abs(y.astype(np.float64)), axis=axes).reshape((-1,) + (1,) * len(grid))
            err = np.max(np.abs(got - exact) / scale)
            assert 0 < err <= _fft_error((grid, None, None, None), np.float32), (grid, taps, err)


def test_subnormal_entries_keep_the_bound_certified():
    """CPU XLA reads subnormal inputs as 0. gram_stack adds 2 sqrt(#subnormal) tiny; for a
    kernel, 2 sqrt(taps * #subnormal) tiny. Without it these bounds are 0 (below the truth)."""
    tiny = TINY[F32]
    w = np.asarray(np.full((3, 2), tiny / 3) * np.array([1.0, -0.5]), np.float32)  # all subnormal
    assert np.all(np.abs(w) < tiny) and np.all(w != 0)
    mixed = np.asarray(np.diag([tiny, tiny * 0.75]), np.float32)  # one normal, one subnormal entry
    k = np.asarray(np.full((3, 1, 1), tiny / 4), np.float32)
    spec = ConvSpec((8,), padding="CIRCULAR")
    # one compile; the arrays are arguments, never constants folded at compile time
    got_w, got_mixed, got_k = (float(v) for v in jax.jit(
        lambda w, mixed, k: (nj.sigma_gram(w), nj.sigma_gram(mixed), conv_sigma_gram(k, spec))
    )(jnp.asarray(w), jnp.asarray(mixed), jnp.asarray(k)))
    ref = np_sigma(w)
    assert got_w >= ref > 0
    assert got_mixed >= np_sigma(mixed)
    assert got_k >= 3 * float(k[0, 0, 0]) > 0


# --------------------------------------------------------------------------------------------
# Item 2: every magnitude, one scaling strategy
# --------------------------------------------------------------------------------------------


CIRC, SAME = ConvSpec((8,), padding="CIRCULAR"), ConvSpec((8,))


@jax.jit
def _all_estimates(w, kern):
    u0 = nj.init_power_vector(jax.random.key(0), w, STACK)
    uc = jax.random.normal(jax.random.key(2), (8, 2))
    return dict(
        gram=nj.sigma_gram(w, dims=STACK),
        svd=nj.sigma_svd(w, dims=STACK),
        power=nj.sigma_power(w, u0, num_iters=100, dims=STACK)[0],
        fft=conv_sigma_fft(kern, CIRC),
        cgram=conv_sigma_gram(kern, CIRC),
        cpower=conv_sigma_power(kern, uc, CIRC, num_iters=50)[0],
        same_gram=conv_sigma_gram(kern, SAME),
        same_svd=conv_sigma_svd(kern, SAME),
    )


@pytest.mark.parametrize("k", [-120, -66, 0, 66, 126])
def test_estimators_at_extreme_magnitudes(k):
    """1e20 * eye gave NaN (gram) and 0 (power); 1e-20 * eye gave 0 (gram, power); the conv
    Gram bound the same. Scaled by the power of two of the largest entry, they are exact
    multiples of their values at scale 1. power: 100 iterations from a random start, at most
    sigma (1 + gamma_R sqrt(min(R, C))); svd / fft: float32 SVD accuracy (4e-6); subnormal
    entries (read as 0) allow 2 sqrt(#entries) tiny more."""
    rng = np.random.default_rng(5)
    m = np.asarray(np.ldexp(rng.normal(size=(4, 9, 5)) / 4, k), np.float32)
    kern = np.asarray(np.ldexp(rng.normal(size=(3, 2, 2)) / 3, k), np.float32)
    out = {key: np.asarray(v, np.float64) for key, v in _all_estimates(jnp.asarray(m), jnp.asarray(kern)).items()}
    ref = np_sigma(m)
    flushed = 2 * np.sqrt(9 * 5) * TINY[F32]
    assert np.all(out["gram"] >= ref)
    np.testing.assert_allclose(out["svd"], ref, rtol=4e-6, atol=flushed)
    s = out["power"]
    assert np.all(s <= ref * (1 + (9 + 2) * U * np.sqrt(5)) + flushed) and np.all(s >= ref * (1 - 1e-4) - flushed)
    exact = np.max(np.linalg.svd(np.fft.fft(np.concatenate([kern, np.zeros((5, 2, 2))]).astype(np.float64), axis=0), compute_uv=False))
    np.testing.assert_allclose(out["fft"], exact, rtol=4e-6, atol=flushed)
    assert out["cgram"] >= exact and out["cpower"] >= exact * (1 - 1e-4) - flushed
    same = np_sigma(dense_same_1d(kern, 8))
    assert out["same_gram"] >= same
    np.testing.assert_allclose(out["same_svd"], same, rtol=4e-6, atol=flushed)


@jax.jit
def _eye_estimates(e, k):
    power = nj.sigma_power(e, nj.init_power_vector(jax.random.key(1), e), num_iters=3)[0]
    return nj.sigma_gram(e), power, conv_sigma_gram(k, CIRC)


def test_one_e20_eye():
    for scale in (1e20, 1e-20):  # both through one compile: the arrays are arguments
        e = jnp.asarray(scale * np.eye(2), F32)
        k = jnp.asarray(scale * np.ones((3, 1, 1)), F32)
        gram, s, kgram = (float(v) for v in _eye_estimates(e, k))
        assert gram >= float(np.float32(scale))
        assert s == pytest.approx(float(np.float32(scale)), rel=1e-6)
        assert kgram >= 3 * float(np.float32(scale))


def test_max_norm_of_huge_units():
    """Float32 entries above ~8.5e37 were never projected (x / m -> x * (1/m), 1/m flushed to 0,
    the norm read 0). Units of 3e38 have a norm (6e38) beyond float32: band_project's split
    norm still scales them to c; project_max_norm and the transform read that norm as inf and
    zero the unit (inside the ball) until they pass unit_norms(..., split=True) to band_scale.
    A step of the transform from p = 5e37 can only land on the grid of p + u' (ulp(5e37) ~ 4e30):
    at 0, inside."""
    for entry in (1e38, 3e38):
        w = jnp.full((4, 3), entry, F32)
        p = jnp.full((4, 3), entry / 2, F32)
        tx = nj.max_norm(1.0)
        upd, _ = tx.update(p, tx.init(p), p)  # w = p + p
        for out in (nj.project_max_norm(w, 1.0), optax.apply_updates(p, upd), N.band_project(w, (0,), None, 1.0)[0]):
            assert np.all(norms64(out, 0) <= 1 + 8 * U), norms64(out, 0)
    n = norms64(nj.project_max_norm(jnp.full((4, 3), 1e38, F32), 1.0), 0)
    assert np.all(n >= 1 - EPS[F32] - 8 * U), n
    n = norms64(N.band_project(jnp.full((4, 3), 3e38, F32), (0,), None, 1.0)[0], 0)
    assert np.all(n >= 1 - EPS[F32] - 8 * U), n


def test_norms_and_sigma_of_overflowing_units_in_split_form():
    n = nj.unit_norms(jnp.full((4, 1), 3e38, F32), (0,), split=True)
    assert float(n.mant[0, 0]) * 2.0 ** int(n.exp[0, 0]) == pytest.approx(6e38, rel=1e-6)
    scale, moved = N.band_scale(n, None, 2.0)
    assert bool(moved[0, 0]) and float(scale[0, 0]) < 0  # a factor below 2**-126: encoded
    out = N.apply_scale(jnp.full((4, 1), 3e38, F32), scale)
    assert norms64(out, 0)[0] == pytest.approx(2.0, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Item 3: the update form lands inside the ball
# --------------------------------------------------------------------------------------------


def _step(tx, p, u):
    upd, _ = tx.update(u, tx.init(p), p)
    return optax.apply_updates(p, upd), upd


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("shrink", [1.5, 113.0, 600.0, 5000.0, 1e6])
def test_max_norm_update_lands_inside(dtype, shrink):
    """u' = p (s - 1) rounded to the leaf's dtype put a bfloat16 unit shrunk 113x at 1.026 c and
    zeroed one shrunk 512x. Now the result is rounded toward the ball on the grid p + u' can
    reach: norm <= c (to the float32 norm's own rounding, (N + 4) u), and at least
    c - eps (c + 2.01 ||t - p||) (t the target: one ulp of t and two of u' per entry)."""
    if dtype == F16 and shrink > 6e4 / 8:
        pytest.skip("beyond float16's range")
    rng = np.random.default_rng(6)
    c = 1.0
    m = rng.normal(size=(8, 6))
    p = jnp.asarray(m / norms64(m, 0) * c * shrink, dtype)
    out, _ = _step(nj.max_norm(c), p, jnp.zeros_like(p))
    n = norms64(out, 0)
    w = np.asarray(p, np.float64)
    t = w / norms64(w, 0) * c
    low = c - EPS[dtype] * (c + 2.01 * norms64(t - w, 0)) - 8 * 8 * U
    assert np.all(n <= c * (1 + (8 + 4) * U)), (dtype, shrink, n.max())
    assert np.all(n >= low), (dtype, shrink, n, low)


def test_units_left_alone_keep_their_update_bit_for_bit():
    """Subnormal entries too (they were flushed by a multiply by one); a unit holding an inf
    (here: p + u overflows) comes back as zeros from both the projection and the transform
    (it kept the inf in one, gave NaN in the other); a NaN unit is left as it is."""
    tiny = TINY[F32]
    p = jnp.asarray(np.array([[tiny / 8, 0.3, 3.0, 3e38, 0.1], [0.5, tiny / 4, 4.0, 1.0, np.nan]]), F32)
    u = jnp.asarray(np.array([[tiny / 16, 0.0, 0.0, 3e38, 0.0], [1e-3, 0.0, 0.0, 0.0, 0.0]]), F32)
    out, upd = _step(nj.max_norm(1.0), p, u)
    np.testing.assert_array_equal(np.asarray(upd[:, :2]), np.asarray(u[:, :2]))  # bit for bit
    w = np.asarray(optax.apply_updates(p, u))
    np.testing.assert_array_equal(np.asarray(out[:, :2]), w[:, :2])
    assert norms64(out[:, 2:3], 0)[0] <= 1 + 8 * U
    proj = np.asarray(nj.project_max_norm(p, 1.0))
    np.testing.assert_array_equal(proj[:, :2], np.asarray(p[:, :2]))
    np.testing.assert_array_equal(np.asarray(out)[:, 3], [0.0, 0.0])  # the inf unit
    np.testing.assert_array_equal(np.asarray(nj.project_max_norm(p + u, 1.0))[:, 3], [0.0, 0.0])
    assert np.isnan(proj[1, 4]) and np.isnan(np.asarray(out)[1, 4])  # NaN stays visible


@pytest.mark.parametrize("dtype", [F32, np.float64])
@pytest.mark.parametrize("rows", [2, 768, 4096])
def test_unit_norms_in_one_pass_from_tiny_to_huge(dtype, rows):
    """One pass, three sums: every unit's norm within a few ulps of float64/extended NumPy from
    the smallest normal entry to the largest finite one; a unit reads 0 only when it is 0.
    Units: zero, ordinary, huge (the direct sum overflows; at the largest finite value the
    2**-a sum itself is one step from overflowing for 4096 rows), tiny (every square
    underflows), small (the direct sum is below N tiny / u), the smallest normal number, and
    one huge entry among tiny ones. Narrowing the overflow shift a by 2 fails here. The
    underflow shift b is sized for gradual underflow (subnormal entries, GPU); on this CPU,
    which flushes them, b >= -emin / 2 would do, so narrowing b by 2 passes."""
    with jax.enable_x64(dtype == np.float64):
        _check_one_pass_norms(dtype, rows)


def _check_one_pass_norms(dtype, rows):
    fi = np.finfo(dtype)
    big, tiny = float(fi.max), float(fi.tiny)
    cols = [0.0, 1.0, big ** 0.5 * 4, big, tiny ** 0.5 / 4, tiny ** 0.5 * 2 ** -((np.log2(rows) + 4) // 2), tiny]
    x = np.zeros((rows, len(cols) + 1), np.float64)
    for j, c in enumerate(cols):  # no subnormal entry: the tiny column grows, the others shrink
        x[:, j] = c * (1 + (0.25 if c == tiny else -0.25) * (np.arange(rows) % 3))
    x[:, -1] = tiny * 4
    x[0, -1] = big / 2
    x = x.astype(dtype)
    ref = [np.sqrt(np.sum(np.square(x[:, j].astype(np.longdouble)))) for j in range(x.shape[1])]  # 80-bit: no overflow
    sp = nj.unit_norms(jnp.asarray(x), (0,), split=True)
    got = [np.ldexp(np.longdouble(m), int(e)) for m, e in zip(np.asarray(sp.mant, np.float64)[0], np.asarray(sp.exp)[0])]
    for j, (g, r) in enumerate(zip(got, ref)):
        if r == 0:
            assert g == 0, j
        else:
            assert abs(g - r) <= 8 * fi.eps * r, (j, g, r)
    # the same through the (p, u) form and under jit
    jitted = jax.jit(lambda p, u: nj.unit_norms((p, u), (0,), split=True))(jnp.asarray(x), jnp.zeros_like(jnp.asarray(x)))
    np.testing.assert_array_equal(np.asarray(jitted.exp), np.asarray(sp.exp))
    np.testing.assert_allclose(np.asarray(jitted.mant), np.asarray(sp.mant), rtol=4 * fi.eps)
    # TPU/GPU take the branch-free three sums for every unit; CPU only for units that need them
    mant3, exp3 = N._three_sums(jnp.asarray(x), (0,))
    assert int(np.asarray(exp3)[0, 1]) == 0  # an ordinary unit: the plain sum
    got3 = [np.ldexp(np.longdouble(m), int(e)) for m, e in zip(np.asarray(mant3, np.float64)[0], np.asarray(exp3)[0])]
    np.testing.assert_allclose(np.asarray(got3), np.asarray(got), rtol=4 * fi.eps)


def test_spectral_update_from_sigma_1e4():
    """float32, sigma 1e4 -> 1 in one step: 'gram' ended at 1 + 1.9e-4 and 'svd' likewise; now
    the entries are rounded toward zero on the grid p + u' can reach: at most c plus the
    documented ||B||_F tolerance, in practice below c."""
    rng = np.random.default_rng(7)
    for est in ("gram", "svd"):
        m = rng.normal(size=(16, 8))
        p = jnp.asarray(m / np_sigma(m) * 1e4, F32)
        out, _ = _step(nj.spectral_norm(1.0, estimator=est), {"k": p}, {"k": jnp.zeros_like(p)})
        got = np_sigma(out["k"])
        assert got <= 1.0, (est, got - 1)
        # svd: the grid of u' ~ -p, ulp(1e4 / 4) / 0.25; gram (certified through its own
        # rounding) aims below c by beta ~ 2.01 eps ||t - p||_F / c, 4.4e-3 here
        assert got >= 1 - (4e-3 if est == "svd" else 1e-2), (est, got - 1)


def test_certified_update_stays_inside():
    """Rounding toward zero entry by entry can still raise sigma_max: W = [[1, 1], [1, -1]] scaled
    by 1/sqrt 2 to sigma 1, with p = [[1, 1], [1, -8]] in bfloat16, lands at
    [[0.707, 0.707], [0.707, -0.6875]], sigma 1.0028. scaled_update(..., max_value=c) lowers the
    target by beta = ||B||_F / c + 2 eps and lands below 1."""
    p = jnp.asarray([[1.0, 1.0], [1.0, -8.0]], BF16)
    u = jnp.asarray([[0.0, 0.0], [0.0, 7.0]], BF16)
    w = np.asarray(p + u, np.float64)
    scale, _ = N.spectral_scale(jnp.asarray(np_sigma(w), F32).reshape(1, 1), 1.0, "rescale")
    plain = np.asarray(optax.apply_updates(p, N.scaled_update(p, u, scale)), np.float64)
    assert np_sigma(plain) > 1.0  # what the margin is for
    safe = np.asarray(optax.apply_updates(p, N.scaled_update(p, u, scale, max_value=1.0)), np.float64)
    assert np_sigma(safe) <= 1.0
    assert np_sigma(safe) >= 0.75  # beta here: 2^-7 (4 sqrt 2 + 2.01 * 7.3) / 1 ~ 0.16


# --------------------------------------------------------------------------------------------
# Item 4 and 5: the exact clip, accurate from any sigma, with finite gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [1.5, 100.0, 1e4, 1e30])
def test_clip_is_accurate_from_any_sigma(sigma):
    """From sigma 100 the clip gave 1 + 9.4e-5, from 1e4 1 + 1e-2 (W - U diag(s - c) V^T
    cancels). Rebuilt as U min(S, c) V^T above 2c: sigma <= c (1 + 4 k (k + 2) u), k = min(R, C)
    (the reconstruction's products and the SVD's orthogonality). Inside: bit for bit."""
    rng = np.random.default_rng(8)
    m = rng.normal(size=(3, 12, 6))
    m = np.asarray(m / np_sigma(m)[:, None, None] * np.array([sigma, sigma * 3, 0.5])[:, None, None], np.float32)
    out = np.asarray(nj.project_spectral_norm(jnp.asarray(m), 1.0, mode="clip", dims=STACK))
    got = np_sigma(out)
    assert np.all(got[:2] <= 1 + 4 * 6 * 8 * U), got - 1
    assert np.all(got[:2] >= 1 - 4 * 6 * 8 * U), got - 1
    np.testing.assert_array_equal(out[2], m[2])


def test_clip_gradient_at_repeated_singular_values():
    """2 * eye(3, 2) clipped to 1: NaN gradients before (the SVD's derivative divides by
    s_i^2 - s_j^2). The map is smooth there; the custom JVP agrees with central differences."""
    f = lambda w: jnp.sum(jnp.sin(nj.project_spectral_norm(w, 1.0, mode="clip") * jnp.arange(1.0, 7.0, dtype=w.dtype).reshape(3, 2)))
    g = jax.jit(jax.grad(f))(2 * jnp.eye(3, 2))
    assert np.all(np.isfinite(np.asarray(g)))
    q = np.linalg.qr(np.random.default_rng(9).normal(size=(4, 4)))[0]
    g = jax.jit(jax.grad(lambda w: jnp.sum(nj.project_spectral_norm(w, 1.0, mode="clip"))))(jnp.asarray(3 * q, F32))
    assert np.all(np.isfinite(np.asarray(g)))
    with _x64():
        rng = np.random.default_rng(10)
        for w0 in (2 * np.eye(3, 2), np.diag([3.0, 3.0, 0.5]), np.diag([0.5, 0.5])):
            w0 = jnp.asarray(w0, jnp.float64)
            v = jnp.asarray(rng.normal(size=w0.shape), jnp.float64)
            weights = jnp.arange(1.0, w0.size + 1.0, dtype=jnp.float64).reshape(w0.shape)
            fw = lambda w: jnp.sum(jnp.sin(N.clip_singular_values(w, 1.0)[0] * weights))
            h = 1e-6
            jvp, fd = jax.jit(lambda w, v: (jax.jvp(fw, (w,), (v,))[1], (fw(w + h * v) - fw(w - h * v)) / (2 * h)))(w0, v)
            np.testing.assert_allclose(float(jvp), float(fd), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Item 6: empty leaves
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (2, 0, 3)])
def test_empty_leaves_come_back_unchanged(shape):
    """(0, 5) crashed max-norm ("zero-size array to reduction operation") and every spectral
    estimator (ZeroDivisionError). Now: unchanged leaves, sigma 0."""
    d = None if len(shape) == 2 else STACK

    @jax.jit
    def run(w):
        out = dict(
            max_norm=nj.project_max_norm(w, 1.0),
            clip=nj.project_spectral_norm(w, 1.0, mode="clip", dims=d),
            rescale=nj.project_spectral_norm(w, 1.0, mode="rescale", dims=d),
            gram=nj.sigma_gram(w, dims=d),
            svd=nj.sigma_svd(w, dims=d),
            power=nj.sigma_power(w, nj.init_power_vector(jax.random.key(0), w, d), dims=d)[0],
        )
        p = {"k": w}
        for i, tx in enumerate((nj.max_norm(1.0), nj.spectral_norm(1.0, dims=d), nj.spectral_norm(1.0, estimator="gram", dims=d))):
            out[f"tx{i}"] = tx.update(p, tx.init(p), p)[0]["k"]
        return out

    w = jnp.zeros(shape, F32)
    out = run(w)
    for key in ("max_norm", "clip", "rescale", "tx0", "tx1", "tx2"):
        assert out[key].shape == shape
    for key in ("gram", "svd", "power"):
        np.testing.assert_array_equal(np.asarray(out[key]), np.zeros(shape[:-2]))


# --------------------------------------------------------------------------------------------
# Properties over magnitudes, dtypes and shapes
# --------------------------------------------------------------------------------------------

DTYPES = st.sampled_from([F32, BF16, F16])
SHAPES = st.sampled_from([(1, 6, 3), (1, 3, 6), (2, 5, 4), (1, 40, 2)])
KINDS = st.sampled_from(["gauss", "constant", "rank1", "repeated"])


@functools.partial(jax.jit, static_argnums=1)
def _estimates(w, num_iters):
    u0 = nj.init_power_vector(jax.random.key(0), w, STACK)
    return (nj.sigma_gram(w, dims=STACK), nj.sigma_svd(w, dims=STACK), nj.sigma_power(w, u0, num_iters=num_iters, dims=STACK)[0])


@PROPS
@given(dtype=DTYPES, shape=SHAPES, kind=KINDS, frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_estimator_properties(dtype, shape, kind, frac, seed):
    """Largest entries 2**k from the smallest normal to the largest finite exponent of the dtype:
    gram >= float64 SVD always; svd within 4e-6 (plus an absolute 2 sqrt(RC) tiny for subnormal
    entries read as 0); power <= sigma (1 + gamma_R sqrt(min(R, C))) + the same absolute term."""
    lo, hi = RANGE[dtype]
    k = int(round(lo + frac * (hi - lo)))
    rng = np.random.default_rng(seed)
    w = jnp.asarray(np.ldexp(kinds(kind, shape, rng), k), dtype)
    ref = np_sigma(w)
    r, c = w.shape[-2:]
    absol = 2 * np.sqrt(r * c) * TINY[F32]
    gram, svd, power = (np.asarray(x, np.float64) for x in _estimates(w, 30))
    assert np.all(gram >= ref), (k, gram / ref - 1)
    fits = ref < 0.99 * float(jnp.finfo(F32).max)  # else the float32 result is inf
    np.testing.assert_allclose(svd[fits], ref[fits], rtol=4e-6, atol=absol)
    assert np.all(np.isinf(svd[~fits])) and np.all(np.isinf(gram[~fits]))
    assert np.all(power[fits] <= ref[fits] * (1 + (max(r, c) + 2) * U * np.sqrt(min(r, c))) + absol), (k, power / ref - 1)


@functools.partial(jax.jit, static_argnums=1)
def _max_norm_both(w, c):
    tx = nj.max_norm(c)
    p = w * jnp.asarray(0.5, w.dtype)  # p + p == w, but for subnormals (flushed)
    upd, _ = tx.update(p, tx.init(p), p)
    return nj.project_max_norm(w, c), optax.apply_updates(p, upd), optax.apply_updates(p, p)


@PROPS
@given(dtype=DTYPES, kind=KINDS, frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_max_norm_properties(dtype, kind, frac, seed):
    """Units of every magnitude of the dtype, c = 1.5. The projection and one step of
    the transform (with optax.apply_updates) land at norm <= c (1 + (N + 4) u); a unit above
    the ball ends no lower than c (1 - eps - (N + 4) u) - sqrt(N) tiny (one ulp of the dtype
    per entry, rounded toward zero, and entries flushed below the normal range) in the
    projection, and the transform's own lower bound below; units inside come back bit for bit.
    (The transform and the projection read norms with unit_norms(..., split=True): a unit whose
    norm is beyond float32's range is still scaled to c.)"""
    lo, hi = RANGE[dtype]
    k = int(round(lo + 1 + frac * (hi - lo - 2)))
    rng = np.random.default_rng(seed)
    m = kinds(kind, (1, 6, 5), rng)[0]
    w = jnp.asarray(np.ldexp(m, k), dtype)
    c = 1.5
    proj, step, plain = _max_norm_both(w, c)
    n_in = norms64(w, 0)
    nt = 6
    tol = (nt + 4) * U
    inside = n_in <= c
    for out, alone in ((proj, w), (step, plain)):
        n = norms64(out, 0)
        assert np.all(n <= c * (1 + tol)), (k, n / c - 1)
        np.testing.assert_array_equal(np.asarray(out)[:, inside], np.asarray(alone)[:, inside])
    above = n_in > c * (1 + tol)
    n = norms64(proj, 0)
    floor = c * (1 - EPS[dtype] - tol) - np.sqrt(nt) * TINY[dtype]
    assert np.all(n[above] >= floor), (k, n[above] / c - 1)
    wf = np.asarray(w, np.float64)
    t = wf / np.maximum(n_in, 1e-300) * c
    p = wf / 2
    low = c - EPS[dtype] * (c + 2.01 * norms64(t - p, 0)) - tol * c - np.sqrt(nt) * TINY[dtype]
    check = above & (n_in < float(jnp.finfo(F32).max))
    assert np.all(norms64(step, 0)[check] >= low[check]), (k, norms64(step, 0)[check] / c - 1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _spectral_step(p, u, estimator, certified):
    sigma = nj.sigma_gram(p + u, dims=STACK) if estimator == "gram" else nj.sigma_svd(p + u, dims=STACK)
    scale, _ = N.spectral_scale(sigma, 1.0, "rescale")
    upd = N.scaled_update(p, u, scale[:, None, None], max_value=1.0 if certified else None)
    return optax.apply_updates(p, upd)


@PROPS
@given(dtype=DTYPES, kind=KINDS, frac=st.floats(0, 1), grow=st.integers(-2, 40), seed=st.integers(0, 2**16))
def test_spectral_update_properties(dtype, kind, frac, grow, seed):
    """One rescale step to sigma <= 1 from sigma = 2**grow, every dtype: with a certified sigma
    (gram) and max_value the result is inside for sure; with the exact sigma (svd) and no margin
    it is within ||B||_F of 1 (B_i = eps (4 |t_i| + 2.01 |t_i - p_i|) + 4 denorm, the bound on
    each entry's rounding)."""
    if dtype == F16:
        grow = min(grow, 12)
    rng = np.random.default_rng(seed)
    m = kinds(kind, (2, 6, 4), rng)
    m = m / np_sigma(m)[:, None, None] * 2.0**grow
    p = jnp.asarray(m * (0.5 + 0.5 * frac), dtype)
    u = jnp.asarray(m, dtype) - p
    out = _spectral_step(p, u, "gram", True)
    assert np.all(np_sigma(out) <= 1.0), np_sigma(out)
    out = _spectral_step(p, u, "svd", False)
    w = np.asarray(p + u, np.float64)
    t = w / np_sigma(w)[:, None, None] * np.minimum(1, np_sigma(w))[:, None, None]
    b = EPS[dtype] * (4 * np.abs(t) + 2.01 * np.abs(t - np.asarray(p, np.float64))) + 4 * float(jnp.finfo(dtype).smallest_subnormal)
    slack = np.sqrt(np.sum(b**2, axis=(1, 2))) + 4e-6  # + the float32 SVD's own error
    assert np.all(np_sigma(out) <= 1 + slack), (np_sigma(out) - 1, slack)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_grouped_leaves_match_leaf_by_leaf(dtype):
    """Same-shaped leaves share one band computation and one stacked statistics pass; each
    leaf's update and statistics must still be exactly its own: one leaf shrunk 100x (the
    careful update), one mildly, one inside the ball, plus a leaf of another shape and an
    unconstrained bias. Checked bit for bit against the public per-leaf pieces."""
    rng = np.random.default_rng(3)
    c = 1.0
    shape = (6, 5)
    p = {f"k{i}": jnp.asarray(rng.normal(size=shape) * s, dtype) for i, s in enumerate([40.0, 0.5, 0.1])}
    p["other"] = jnp.asarray(rng.normal(size=(4, 7)), dtype)
    p["bias"] = jnp.asarray(rng.normal(size=(5,)), dtype)
    u = {k: jnp.asarray(rng.normal(size=v.shape) * 0.05, dtype) for k, v in p.items()}
    tx = nj.max_norm(c)
    upd, state = jax.jit(tx.update)(u, tx.init(p), p)
    np.testing.assert_array_equal(np.asarray(upd["bias"]), np.asarray(u["bias"]))
    @jax.jit  # jitted like the transform: XLA's summation order, not eager NumPy-style
    def one_leaf(p, u):
        split = N.unit_norms((p, u), (0,), split=True)
        scale, moved = N.band_scale(split, None, c)
        return N.scaled_update(p, u, scale), split, moved

    for k in ["k0", "k1", "k2", "other"]:
        want, split, moved = one_leaf(p[k], u[k])
        np.testing.assert_array_equal(np.asarray(upd[k]), np.asarray(want), err_msg=k)
        n = np.asarray(split.value())
        assert float(state.largest_norm[k]) == float(n.max()), k
        assert float(state.smallest_norm[k]) == float(n.min()), k
        assert float(state.clipped_fraction[k]) == float(np.float32(np.mean(np.asarray(moved)))), k
    assert float(state.clipped_fraction["k0"]) == 1.0 and float(state.clipped_fraction["k2"]) == 0.0
