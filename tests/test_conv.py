"""Convolution operator norms against the float64 Jacobian of ``flax.linen.Conv``.

The reference for every number here is independent of the library: the layer
``flax.linen.Conv(..., use_bias=False)`` is applied (in float64, under ``jax.enable_x64``)
to every basis vector of its input space, which gives the full matrix of the linear map
``x -> conv(x, K)``; its largest singular value (``np.linalg.svd`` in float64) is the
operator norm. Flax owns the padding, stride, dilation and group semantics, so the library
is checked against what ``nn.Conv`` actually computes.

How exact each method is, and so the tolerances:

- ``"svd"`` and ``"fft"`` are exact up to float32 rounding of the SVD / FFT: ~1e-7 relative
  measured, asserted at 1e-5.
- ``"gram"`` is a certified upper bound. For CIRCULAR padding it is the exact norm times
  ``1 + (margin for float rounding)``, ~7e-6 measured, asserted within 1e-4. For zero padding
  it is the exact norm of the circular convolution on the grid grown by the padding (rounded
  up to a stride multiple), which is checked against its own flax reference; on the small
  grids here that is above the true norm by 3% (1-D, n = 8), 5-21% (2-D, n = 5..7) and
  41% (3-D, 4x4x4) (measured), 1.1% at 16x16 and 0.3% at 32x32.
- ``"power"`` is a lower bound by construction (``||A^T v||`` for a unit ``v``); 100
  iterations (the default) come within 2.7e-3 on these cases (measured), 1000 within 6e-5.
"""

import contextlib
import dataclasses
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import normjax as nj

C = 1.0  # the bound used by the transform and projection tests
EXACT = 1e-5  # relative tolerance of the exact methods (float32 SVD / FFT of a float32 kernel)
GRAM_TIGHT = 1e-4  # gram vs the exact norm of the circular convolution it bounds
CERTIFIED = 1 - 1e-7  # a certified bound may not fall below the float64 reference at all
# This file compiles ~300 small programs; XLA's CPU backend at optimisation level 0 compiles
# them ~4x faster (the same operations, only less optimised code). The tests of bit-for-bit
# claims across a training step (test_transform_bounds_the_convolutions, the sharded step) use
# the default jit with full optimisation, as a training step compiles (the full_optimization
# fixture: the root conftest.py turns most optimisation off for the rest of the session, and
# quick_jit keeps this file's other programs at level 0 when run without it).
quick_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# --------------------------------------------------------------------------------------------
# Independent float64 reference: the matrix of flax.linen.Conv.
# --------------------------------------------------------------------------------------------


def _flax_conv(kernel_shape, spec):
    nd = len(spec.input_shape)
    return nn.Conv(
        features=kernel_shape[-1],
        kernel_size=tuple(kernel_shape[-nd - 2 : -2]),
        strides=spec.strides,
        padding=spec.padding,
        kernel_dilation=spec.kernel_dilation,
        feature_group_count=spec.feature_group_count,
        use_bias=False,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
        precision=jax.lax.Precision.HIGHEST,
    )


@functools.cache
def _flax_apply(kernel_shape, spec):
    return quick_jit(_flax_conv(kernel_shape, spec).apply)  # one compile per shape and spec


def ref_matrix(kernel, spec):
    """float64 matrix of ``x -> nn.Conv(x)``: row ``i`` is the output for basis input ``e_i``."""
    k = np.asarray(kernel, np.float64)
    cin = k.shape[-2] * spec.feature_group_count
    n_in = math.prod(spec.input_shape) * cin
    with jax.enable_x64(True):
        basis = np.eye(n_in).reshape((n_in, *spec.input_shape, cin))
        y = _flax_apply(k.shape, spec)({"params": {"kernel": k}}, basis)
        assert y.dtype == jnp.float64
        return np.asarray(y).reshape(n_in, -1)  # the transpose of the operator: same singular values


def _one_blas_thread():
    """OpenBLAS threads spinning against XLA's CPU thread pools make a 200x400 float64 SVD
    take 1.6 s instead of 12 ms on a 2-core machine; one BLAS thread avoids that."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not a test dependency: only slower without it
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def ref_norm(kernel, spec):
    """float64 operator norm of every kernel of a stack (leading axes: one norm each)."""
    k = np.asarray(kernel, np.float64)
    nb = k.ndim - len(spec.input_shape) - 2
    mats = [ref_matrix(kk, spec) for kk in k.reshape((-1,) + k.shape[nb:])]
    with _one_blas_thread():
        s = [np.linalg.svd(m, compute_uv=False)[0] for m in mats]
    return np.array(s).reshape(k.shape[:nb])


def matrix_sigma(kernel):
    """float64 sigma of the reshaped kernel (rows = all axes but the last): Miyato's view."""
    k = np.asarray(kernel, np.float64)
    return np.linalg.svd(k.reshape(-1, k.shape[-1]), compute_uv=False)[0]


def _per(v, nd):
    return (v,) * nd if isinstance(v, int) else tuple(v)


def _pads(spec, kernel_shape):
    """Per-axis (low, high) zero padding as flax/lax define it (for the grown-grid reference)."""
    nd = len(spec.input_shape)
    ks = kernel_shape[-nd - 2 : -2]
    dil, strides = _per(spec.kernel_dilation, nd), _per(spec.strides, nd)
    k_eff = [(k - 1) * d + 1 for k, d in zip(ks, dil)]
    p = spec.padding
    if isinstance(p, str):
        if p == "CAUSAL":
            return [(k_eff[0] - 1, 0)]
        return list(jax.lax.padtype_to_pads(spec.input_shape, k_eff, strides, p))
    if isinstance(p, int):
        return [(p, p)] * nd
    return [(q, q) if isinstance(q, int) else tuple(q) for q in p]


def gram_target(kernel, spec):
    """float64 norm of the circular convolution the Gram bound is the norm of.

    CIRCULAR with dividing strides: the operator itself. CIRCULAR with a stride that does not
    divide: the unstrided circular convolution (the strided one keeps some of its rows).
    Zero padding: the strided circular convolution on the padded grid, rounded up to a stride
    multiple, where the kept outputs never wrap (a shift of the input does not change a norm).
    """
    strides = _per(spec.strides, len(spec.input_shape))
    if spec.padding == "CIRCULAR":
        if all(n % s == 0 for n, s in zip(spec.input_shape, strides)):
            return ref_norm(kernel, spec)
        return ref_norm(kernel, dataclasses.replace(spec, strides=1))
    grown = tuple(
        s * -(-(n + lo + hi) // s) for n, (lo, hi), s in zip(spec.input_shape, _pads(spec, np.shape(kernel)), strides)
    )
    return ref_norm(kernel, dataclasses.replace(spec, input_shape=grown, padding="CIRCULAR"))


def _kernel(shape, seed, scale=1.0):
    """Gaussian float32 kernel, roughly He-scaled (operator norms of order 1-3 here)."""
    rng = np.random.default_rng(seed)
    fan_in = math.prod(shape[-4:-1]) if len(shape) >= 4 else math.prod(shape[:-1])
    return (rng.normal(size=shape) * scale / np.sqrt(fan_in)).astype(np.float32)


def _call(spec, method, kernel, **kw):
    return nj.conv_spectral_norm(
        kernel,
        spec.input_shape,
        strides=spec.strides,
        padding=spec.padding,
        kernel_dilation=spec.kernel_dilation,
        feature_group_count=spec.feature_group_count,
        batch_dims=spec.batch_dims,
        method=method,
        **kw,
    )


@functools.partial(quick_jit, static_argnames=("spec", "method"))
def _norm(kernel, spec, method):
    """conv_spectral_norm under jit: one compile instead of one per primitive run eagerly."""
    return _call(spec, method, kernel)


_clip = quick_jit(nj.conv_clip, static_argnums=2)
_init_u = quick_jit(nj.init_conv_power_vector, static_argnums=2)  # eager random.normal compiles slowly


def test_reference_is_flax_conv():
    """The reference matrix really is the layer: it reproduces nn.Conv on a random input."""
    spec = nj.ConvSpec((6, 5), strides=(2, 1), padding=((1, 2), (0, 1)), kernel_dilation=(1, 2), feature_group_count=2)
    k = _kernel((3, 2, 2, 4), 0)
    x = np.random.default_rng(1).normal(size=(6, 5, 4))
    with jax.enable_x64(True):
        y = _flax_conv(k.shape, spec).apply({"params": {"kernel": jnp.asarray(k, jnp.float64)}}, jnp.asarray(x)[None])
    np.testing.assert_allclose(x.reshape(-1) @ ref_matrix(k, spec), np.asarray(y).reshape(-1), rtol=1e-12, atol=1e-12)
    assert not jax.config.jax_enable_x64  # float64 stays scoped to the reference


# --------------------------------------------------------------------------------------------
# Every method against the reference, over paddings, strides, dilations, groups and ranks.
# --------------------------------------------------------------------------------------------

S = nj.ConvSpec
# name: (kernel shape, spec). Kernels (*kernel_size, in // groups, out), inputs 3..8 per axis.
CASES = {
    "1d_causal_dilated_s2": ((3, 1, 2), S((8,), strides=2, padding="CAUSAL", kernel_dilation=2)),
    "1d_circular_s2": ((3, 2, 3), S((8,), strides=2, padding="CIRCULAR")),
    "1d_circular_kernel_larger_than_input": ((7, 1, 2), S((4,), padding="CIRCULAR")),
    "2d_same": ((3, 3, 2, 4), S((6, 6))),
    "2d_same_lower_even_kernel": ((2, 2, 2, 3), S((5, 5), padding="SAME_LOWER")),
    "2d_valid": ((3, 3, 2, 4), S((6, 6), padding="VALID")),
    "2d_int_pad": ((3, 3, 2, 3), S((5, 5), padding=2)),
    "2d_pairs": ((3, 2, 2, 3), S((5, 6), padding=((1, 0), (0, 2)))),
    "2d_same_s21": ((3, 3, 2, 3), S((6, 6), strides=(2, 1))),
    "2d_same_dilated": ((3, 3, 2, 2), S((7, 7), kernel_dilation=2)),
    "2d_same_depthwise_s2": ((3, 3, 1, 4), S((6, 6), strides=2, feature_group_count=2)),
    "2d_reflect_s21": ((3, 3, 2, 3), S((6, 5), strides=(2, 1), padding="REFLECT")),
    "2d_circular_s21": ((3, 3, 2, 4), S((6, 6), strides=(2, 1), padding="CIRCULAR")),
    "2d_circular_even_kernel_s2": ((4, 4, 1, 2), S((8, 8), strides=2, padding="CIRCULAR")),
    "2d_circular_groups2_s2": ((3, 3, 1, 4), S((6, 6), strides=2, padding="CIRCULAR", feature_group_count=2)),
    "2d_circular_groups2_s3": ((3, 3, 2, 4), S((6, 6), strides=3, padding="CIRCULAR", feature_group_count=2)),
    "2d_circular_dilated": ((3, 3, 2, 2), S((6, 6), padding="CIRCULAR", kernel_dilation=2)),
    "2d_circular_kernel_larger_than_input": ((5, 5, 1, 2), S((3, 3), padding="CIRCULAR")),
    "2d_circular_s2_not_dividing": ((3, 3, 2, 2), S((5, 6), strides=2, padding="CIRCULAR")),
    "3d_same": ((3, 3, 3, 1, 2), S((4, 4, 4))),
    "3d_circular_s2": ((3, 3, 3, 1, 2), S((4, 4, 4), strides=2, padding="CIRCULAR")),
    "stacked_2d_same": ((3, 3, 3, 2, 4), S((5, 5), batch_dims=1)),  # a leading batch axis: 3 convolutions
    "stacked_2d_circular_s2": ((2, 3, 3, 3, 1, 2), S((4, 4), strides=2, padding="CIRCULAR", batch_dims=2)),  # (2, 3) batch
}
# power iteration compiles the convolution and its transpose: a subset covering every code path
POWER_CASES = [
    "1d_causal_dilated_s2",
    "2d_same",
    "2d_reflect_s21",
    "2d_circular_groups2_s2",
    "3d_same",
    "stacked_2d_circular_s2",
]


def _fft_ok(spec):
    strides = _per(spec.strides, len(spec.input_shape))
    return spec.padding == "CIRCULAR" and all(n % s == 0 for n, s in zip(spec.input_shape, strides))


def _batch(k, spec):
    return k.shape[: k.ndim - len(spec.input_shape) - 2]


@functools.cache
def _case(name):
    shape, spec = CASES[name]
    k = _kernel(shape, seed=sorted(CASES).index(name))
    return k, spec, ref_norm(k, spec)


@functools.partial(quick_jit, static_argnames="spec")
def _exact_and_gram(kernel, spec):
    out = {"svd": _call(spec, "svd", kernel)}
    if spec.padding != "REFLECT":
        out["gram"] = _call(spec, "gram", kernel)
    if _fft_ok(spec):
        out["fft"] = _call(spec, "fft", kernel)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_exact_methods_and_gram_bound_against_flax_jacobian(name):
    k, spec, ref = _case(name)
    out = jax.tree.map(np.asarray, _exact_and_gram(jnp.asarray(k), spec))
    for v in out.values():
        assert v.shape == _batch(k, spec) and v.dtype == np.float32
    np.testing.assert_allclose(out["svd"], ref, rtol=EXACT)
    if _fft_ok(spec):
        np.testing.assert_allclose(out["fft"], ref, rtol=EXACT)
    else:
        match = "CIRCULAR padding only.*gram" if spec.padding != "CIRCULAR" else "must divide"
        with pytest.raises(ValueError, match=match):
            _call(spec, "fft", k)
    if spec.padding == "REFLECT":  # no Fourier bound for reflection: refused, not guessed
        with pytest.raises(ValueError, match="REFLECT"):
            _call(spec, "gram", k)
        return
    # certified upper bound, never above the norm of the circular convolution it embeds in
    assert np.all(out["gram"] >= ref * CERTIFIED), (out["gram"], ref)
    target = gram_target(k, spec)
    assert np.all(out["gram"] <= target * (1 + GRAM_TIGHT)), (out["gram"], target)
    if _fft_ok(spec):
        np.testing.assert_allclose(out["gram"], ref, rtol=GRAM_TIGHT)
    elif spec.padding == "CIRCULAR":
        np.testing.assert_allclose(out["gram"], target, rtol=GRAM_TIGHT)
    else:
        # zero padding, operators this small: also Gram iteration on the materialised operator,
        # whose t-th bound is at most sigma * rank^(2^-(t+1)) (t = 8 iterations by default)
        rank = min(ref_matrix(k.reshape((-1,) + k.shape[len(_batch(k, spec)):])[0], spec).shape)
        assert np.all(out["gram"] <= ref * rank ** (0.5**9) * (1 + GRAM_TIGHT)), (out["gram"] / ref, rank)


@functools.partial(quick_jit, static_argnames="spec")
def _power100(kernel, u, spec):
    return nj.conv_sigma_power(kernel, u, spec, num_iters=100)


@pytest.mark.parametrize("name", POWER_CASES)
def test_power_iteration_is_a_tight_lower_bound(name):
    k, spec, ref = _case(name)
    kj = jnp.asarray(k)
    batch = _batch(k, spec)
    cin = k.shape[-2] * spec.feature_group_count
    u = _init_u(jax.random.key(0), kj, spec)
    assert u.shape == batch + tuple(spec.input_shape) + (cin,) and u.dtype == jnp.float32
    sigmas = []
    for _ in range(30):  # 10 x 100 iterations, each warm-started from the last vector
        s, u = _power100(kj, u, spec)
        assert s.shape == batch and s.dtype == jnp.float32
        sigmas.append(np.asarray(s))
    sigmas = np.array(sigmas)
    axes = tuple(range(len(batch), u.ndim))
    np.testing.assert_allclose(np.sqrt(np.sum(np.asarray(u, np.float64) ** 2, axis=axes)), 1.0, rtol=1e-5)
    # ||A^T v|| for a unit v: never above the norm; warm-started iterations never lower it
    assert np.all(sigmas <= ref * (1 + EXACT)), sigmas.max(axis=0) / ref
    assert np.all(np.diff(sigmas, axis=0) >= -1e-6 * ref), sigmas
    np.testing.assert_allclose(sigmas[0], ref, rtol=5e-3)  # 100 iterations: measured <= 2.7e-3 below
    np.testing.assert_allclose(sigmas[-1], ref, rtol=2e-4)  # 1000: measured <= 6e-5 below


# --------------------------------------------------------------------------------------------
# What the reshaped kernel's sigma (Miyato et al.'s matrix view) is, and is not.
# --------------------------------------------------------------------------------------------


def test_reshaped_kernel_sigma_is_not_a_bound():
    # a seeded random 3x3x2x4 kernel on 6x6 inputs, SAME: the matrix view is a third too low
    k, _, ref = _case("2d_same")
    mat = float(nj.sigma_svd(jnp.asarray(k)))
    np.testing.assert_allclose(mat, matrix_sigma(k), rtol=EXACT)
    assert mat < 0.75 * ref, (mat, ref)  # measured 0.66
    # all-ones 3x3x1x1: the matrix view is ||ones(9)|| = 3; the operator sums 9 taps, so a
    # constant circular input is scaled by 9; with SAME zero padding on n x n it is the
    # Kronecker square of the tridiagonal ones matrix: (1 + 2 cos(pi / (n + 1)))^2 -> 9.
    ones = np.ones((3, 3, 1, 1), np.float32)
    np.testing.assert_allclose(float(nj.sigma_svd(jnp.asarray(ones))), 3.0, rtol=EXACT)
    circ = S((8, 8), padding="CIRCULAR")
    np.testing.assert_allclose(ref_norm(ones, circ), 9.0, rtol=1e-12)
    np.testing.assert_allclose(float(_norm(ones, circ, "fft")), 9.0, rtol=EXACT)
    for n in (5, 12):
        closed = (1 + 2 * np.cos(np.pi / (n + 1))) ** 2
        np.testing.assert_allclose(ref_norm(ones, S((n, n))), closed, rtol=1e-12)
        np.testing.assert_allclose(float(_norm(ones, S((n, n)), "svd")), closed, rtol=EXACT)
    # on 12x12 the operator norm is already 2.88x the matrix view
    assert float(_norm(ones, S((12, 12)), "svd")) > 2.8 * float(nj.sigma_svd(jnp.asarray(ones)))


@pytest.mark.parametrize(
    "shape, spec",
    [
        ((1, 1, 3, 5), S((5, 4))),  # 1x1 kernel: the operator is W^T at every pixel
        ((1, 1, 3, 5), S((5, 4), strides=2)),  # every kept pixel still sees W^T
        ((1, 3, 2), S((6,), padding="CIRCULAR")),
        ((2, 2, 2, 3), S((6, 4), strides=2, padding="VALID")),  # disjoint patches tiling the input
    ],
    ids=["1x1", "1x1_s2", "1d_1tap_circular", "2x2_s2_valid_patches"],
)
def test_reshaped_kernel_sigma_is_exact_without_overlap(shape, spec):
    """When no two output pixels share an input pixel the operator is block diagonal with
    copies of the reshaped kernel, so the two numbers agree."""
    k = _kernel(shape, 3)
    ref = ref_norm(k, spec)
    np.testing.assert_allclose(matrix_sigma(k), ref, rtol=1e-12)
    np.testing.assert_allclose(float(nj.sigma_svd(jnp.asarray(k))), ref, rtol=EXACT)
    np.testing.assert_allclose(float(_norm(k, spec, "svd")), ref, rtol=EXACT)


# --------------------------------------------------------------------------------------------
# The operator, its transpose, warm starts, zero kernels.
# --------------------------------------------------------------------------------------------

OPERATOR_CASES = [
    "1d_causal_dilated_s2",
    "2d_pairs",
    "2d_same_depthwise_s2",
    "2d_reflect_s21",
    "2d_circular_kernel_larger_than_input",
    "stacked_2d_same",
]


@pytest.mark.parametrize("name", OPERATOR_CASES)
def test_conv_operator_is_flax_conv_and_its_transpose(name):
    """apply's matrix is flax's (basis in, basis out) and apply_t's is its transpose."""
    k, spec, _ = _case(name)
    batch = _batch(k, spec)
    nb, bsize = len(batch), math.prod(batch)
    mats = np.stack([ref_matrix(kk, spec) for kk in k.reshape((-1,) + k.shape[nb:])])  # (B, n_in, n_out)
    n_in, n_out = mats.shape[1:]
    apply, apply_t = nj.conv_operator(jnp.asarray(k), spec)
    cin = k.shape[-2] * spec.feature_group_count
    in_shape = tuple(spec.input_shape) + (cin,)
    ein = np.eye(n_in, dtype=np.float32).reshape((n_in,) + (1,) * nb + in_shape)
    ein = np.broadcast_to(ein, (n_in,) + batch + in_shape)
    y = np.asarray(quick_jit(jax.vmap(apply))(ein))  # (n_in, *batch, *out, cout)
    out_shape = y.shape[1 + nb :]
    assert math.prod(out_shape) == n_out
    got = np.moveaxis(y.reshape(n_in, bsize, n_out), 1, 0)  # (B, n_in, n_out)
    np.testing.assert_allclose(got, mats, rtol=1e-6, atol=1e-6)
    eout = np.eye(n_out, dtype=np.float32).reshape((n_out,) + (1,) * nb + out_shape)
    eout = np.broadcast_to(eout, (n_out,) + batch + out_shape)
    xt = np.asarray(quick_jit(jax.vmap(apply_t))(eout))  # (n_out, *batch, *input, cin)
    assert xt.shape[1:] == batch + tuple(spec.input_shape) + (cin,)
    got_t = np.moveaxis(xt.reshape(n_out, bsize, n_in), 1, 0)  # (B, n_out, n_in)
    np.testing.assert_allclose(got_t, np.swapaxes(mats, 1, 2), rtol=1e-6, atol=1e-6)


@functools.partial(quick_jit, static_argnames="spec")
def _power1(kernel, u, spec):
    return nj.conv_sigma_power(kernel, u, spec, num_iters=1)


def test_power_warm_start():
    k, spec, ref = _case("2d_same")
    kj = jnp.asarray(k)
    u0 = _init_u(jax.random.key(3), kj, spec)
    assert u0.shape == (6, 6, 2)
    u_conv = u0
    for _ in range(30):
        s_conv, u_conv = _power100(kj, u_conv, spec)
    # one more iteration from a converged vector keeps sigma (and u)
    s1, u1 = _power1(kj, u_conv, spec)
    np.testing.assert_allclose(float(s1), float(s_conv), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u1), np.asarray(u_conv), atol=1e-3)
    # a cold start, one iteration per call: nondecreasing (||A u_k|| <= s_k <= ||A u_k+1||)
    s_prev, u = 0.0, u0
    for _ in range(4):
        s, u = _power1(kj, u, spec)
        assert s_prev * (1 - 1e-6) <= float(s) <= ref * (1 + EXACT)
        s_prev = float(s)
    assert s_prev < float(s_conv) * (1 - 1e-4)  # the cold start had not converged: not vacuous
    # the default of conv_spectral_norm is 100 iterations from init_conv_power_vector(key(seed))
    # (to float32 rounding: the programs differ; another seed or count is 1e-5 away or more)
    default = quick_jit(lambda kk, seed: _call(spec, "power", kk, seed=seed))
    s_default = float(default(kj, 3))
    np.testing.assert_allclose(s_default, float(_power100(kj, u0, spec)[0]), rtol=1e-6)
    assert abs(float(default(kj, 0)) / s_default - 1) > 1e-5
    s101 = quick_jit(lambda kk: _call(spec, "power", kk, seed=3, num_iters=101))(kj)
    assert abs(float(s101) / s_default - 1) > 1e-6
    # u without its channel axis
    with pytest.raises(ValueError, match=r"u has shape \(6, 6\)"):
        nj.conv_sigma_power(kj, jnp.ones((6, 6)), spec)


def test_zero_kernel():
    """Every method gives exactly 0 and the power vector stays finite (no 0/0)."""
    _, spec = CASES["2d_same"]
    z = jnp.zeros((3, 3, 2, 4), jnp.float32)
    for m, v in _exact_and_gram(z, spec).items():
        np.testing.assert_array_equal(np.asarray(v), 0.0, err_msg=m)
    u0 = _init_u(jax.random.key(0), z, spec)
    s, u = _power100(z, u0, spec)
    assert float(s) == 0.0 and bool(jnp.all(jnp.isfinite(u)))
    circ = S((6, 6), padding="CIRCULAR")
    for m, v in _exact_and_gram(z, circ).items():
        np.testing.assert_array_equal(np.asarray(v), 0.0, err_msg=m)
    z_new, sz = _clip(z, 1.0, circ)
    assert float(sz) == 0.0
    np.testing.assert_array_equal(np.asarray(z_new), 0.0)


def test_gram_on_a_16x16_same_convolution():
    """Zero padding on a larger input: the grown grid (18 vs 16) makes the bound tight."""
    k = _kernel((3, 3, 2, 4), 11)
    spec = S((16, 16))
    ref = ref_norm(k, spec)  # a 512 x 1024 matrix: still cheap in float64
    kj = jnp.asarray(k)
    gram = float(_norm(kj, spec, "gram"))
    assert ref * CERTIFIED <= gram <= ref * 1.02, gram / ref
    u = _init_u(jax.random.key(0), kj, spec)
    for _ in range(5):
        s, u = _power100(kj, u, spec)
    assert float(s) <= ref * (1 + EXACT) and float(s) <= gram
    np.testing.assert_allclose(float(s), ref, rtol=1e-4)
    assert gram <= float(s) * 1.02


# --------------------------------------------------------------------------------------------
# Fourier clip.
# --------------------------------------------------------------------------------------------


def _np_fourier_clip_full_support(k, c):
    """float64 NumPy projection of a kernel whose size equals the circular grid (Sedghi et al.):
    every kernel is then a circular convolution, so clipping every frequency is the projection."""
    f = np.fft.fft2(np.asarray(k, np.float64), axes=(0, 1))
    u, s, vh = np.linalg.svd(f, full_matrices=False)
    f_clip = np.einsum("...ik,...k,...kj->...ij", u, np.minimum(s, c), vh)
    return np.real(np.fft.ifft2(f_clip, axes=(0, 1)))


def test_conv_clip_lands_inside_and_beats_rescaling():
    rng = np.random.default_rng(4)
    p = rng.normal(size=2)
    q = rng.normal(size=3)
    peak = np.ones((3, 3, 1, 1)) * np.outer(p / np.linalg.norm(p), q / np.linalg.norm(q)) * 0.5
    base = _kernel((3, 3, 2, 3), 5)
    k = (base + peak).astype(np.float32)  # a large symbol at frequency 0, the rest of base size
    for spec in (S((8, 8), padding="CIRCULAR"), S((8, 8), strides=2, padding="CIRCULAR")):
        ref, ref_base = ref_norm(k, spec), ref_norm(base, spec)
        c = 1.1 * ref_base  # only the peak frequencies exceed c
        assert ref > 1.4 * c
        k_new, sigma = _clip(jnp.asarray(k), c, spec)
        assert k_new.dtype == jnp.float32 and k_new.shape == k.shape
        np.testing.assert_allclose(float(sigma), ref, rtol=EXACT)
        assert ref_norm(k_new, spec) <= c * (1 + EXACT)
        d_clip = np.linalg.norm(np.asarray(k_new, np.float64) - k)
        d_rescale = np.linalg.norm(k * (1 - c / ref))
        assert d_clip < 0.9 * d_rescale, d_clip / d_rescale  # measured 0.81 and 0.82
    # kernel size = grid: the Fourier clip is the exact projection, checked in NumPy
    k3 = _kernel((3, 3, 2, 3), 6)
    spec = S((3, 3), padding="CIRCULAR")
    c = 0.6 * ref_norm(k3, spec)
    k_new, _ = _clip(jnp.asarray(k3), c, spec)
    np.testing.assert_allclose(np.asarray(k_new, np.float64), _np_fourier_clip_full_support(k3, c), atol=2e-6)
    # inside: bit for bit, one batch index moved and one not
    stack = np.stack([k3 * (0.5 * c / ref_norm(k3, spec)), k3]).astype(np.float32)
    out, sig = _clip(jnp.asarray(stack), c, dataclasses.replace(spec, batch_dims=1))
    assert sig.shape == (2,)
    np.testing.assert_array_equal(np.asarray(out[0]), stack[0])
    assert not np.array_equal(np.asarray(out[1]), stack[1])
    np.testing.assert_allclose(ref_norm(out, spec), [0.5 * c, c], rtol=EXACT)
    for bad in (S((8, 8)), S((8, 8), padding="REFLECT"), S((5, 5), strides=2, padding="CIRCULAR")):
        with pytest.raises(ValueError, match="Fourier clip"):
            nj.conv_clip(jnp.asarray(k), 1.0, bad)


# --------------------------------------------------------------------------------------------
# The spectral_norm transform, projections and the Lipschitz bound with ConvSpec rules.
# --------------------------------------------------------------------------------------------

# x (6, 6, 2) -> conv1 3x3 -> relu -> conv2 3x3 stride 2 -> relu -> flatten (36) -> dense (3)
RULES = {r"^conv1/": S((6, 6)), r"^conv2/": S((6, 6), strides=2)}
CIRC_RULES = {r"^conv1/": S((6, 6), padding="CIRCULAR"), r"^conv2/": S((6, 6), strides=2, padding="CIRCULAR")}
KERNELS = ("conv1/kernel", "conv2/kernel", "dense/kernel")


def _net(seed=0, scale=2.0, dtype=jnp.float32):
    """Kernels about 2x (scale) a He init: operator norms ~3-5, all above C = 1."""
    rng = np.random.default_rng(seed)
    shapes = {"conv1": ((3, 3, 2, 4), 18), "conv2": ((3, 3, 4, 4), 36), "dense": ((36, 3), 36)}
    return {
        name: {
            "kernel": jnp.asarray(rng.normal(size=shape) * scale / np.sqrt(fan_in), dtype),
            "bias": jnp.asarray(rng.normal(size=shape[-1]), dtype),
        }
        for name, (shape, fan_in) in shapes.items()
    }


def _refs(params, rules):
    """float64 per-kernel reference: operator norm of the conv leaves, matrix sigma of dense."""
    out = {}
    for name in ("conv1", "conv2"):
        spec = next(s for r, s in rules.items() if r == f"^{name}/")
        out[f"{name}/kernel"] = float(ref_norm(params[name]["kernel"], spec))
    out["dense/kernel"] = float(matrix_sigma(params["dense"]["kernel"]))
    return out


def _step_fn(tx, jit=jax.jit):
    plain = optax.sgd(0.1)

    @jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        plain_updates, _ = plain.update(grads, plain.init(params), params)
        return optax.apply_updates(params, updates), state, updates, plain_updates

    return step


@pytest.mark.usefixtures("full_optimization")
@pytest.mark.parametrize("estimator", ["svd", "gram", "power"])
def test_transform_bounds_the_convolutions(estimator):
    params = _net()
    assert all(v > 2 * C for v in _refs(params, RULES).values())  # every kernel starts well outside
    tx = optax.chain(optax.sgd(0.1), nj.spectral_norm(C, estimator=estimator, dims=RULES))
    state = quick_jit(tx.init)(params)  # power: 30 iterations from random vectors
    sn = state[1]
    assert isinstance(sn, nj.SpectralNormState)
    assert set(nj.by_path(sn.sigma)) == set(KERNELS)
    assert all(v.shape == () and v.dtype == jnp.float32 for v in nj.by_path(sn.sigma).values())
    if estimator == "power":  # conv: input_shape + (in,); dense: (out,)
        shapes = {p: u.shape for p, u in nj.by_path(sn.u).items()}
        assert shapes == {"conv1/kernel": (6, 6, 2), "conv2/kernel": (6, 6, 4), "dense/kernel": (3,)}
        assert all(u.dtype == jnp.float32 for u in nj.by_path(sn.u).values())
    else:
        assert nj.by_path(sn.u) == {}
    chex.clear_trace_counter()
    step = _step_fn(tx)
    p = params
    for i in range(6):
        # random gradients that also grow the kernels (p + u ~ 1.3 p): every step projects
        grads = jax.tree.map(lambda r, x: r - np.float32(3) * x, _net(seed=10 + i, scale=0.2), p)
        before = _refs(jax.tree.map(lambda x, g: x - np.float32(0.1) * g, p, grads), RULES)
        new, new_state, updates, plain = step(p, state, grads)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        for name in ("conv1", "conv2", "dense"):  # biases are not selected: sgd's update bit for bit
            np.testing.assert_array_equal(np.asarray(updates[name]["bias"]), np.asarray(plain[name]["bias"]))
        after = _refs(new, RULES)
        logged = {path: float(v) for path, v in nj.by_path(new_state[1].sigma).items()}
        for path in KERNELS:
            assert before[path] > 1.1 * C  # the step had to project
            if estimator == "svd":  # exact, logged before the projection, lands on the sphere
                np.testing.assert_allclose(logged[path], before[path], rtol=EXACT)
                np.testing.assert_allclose(after[path], C, rtol=EXACT)
            if estimator == "gram":
                assert logged[path] >= before[path] * CERTIFIED
            if estimator != "power":
                assert after[path] <= C * (1 + EXACT), (i, path, after[path])
            else:  # one warm-started iteration a step: a lower bound, so at or a little above C
                assert C * (1 - EXACT) <= after[path] <= C * 1.01, (i, path, after[path])  # measured <= 1.0009
        p, state = new, new_state
    # kernels inside the ball come back bit for bit (the same compiled step)
    small = jax.tree.map(lambda x: x * np.float32(0.05), params)
    assert all(v < 0.5 * C for v in _refs(small, RULES).values())
    new, _, updates, plain = step(small, state, jax.tree.map(lambda x: x * np.float32(0.01), grads))
    chex.assert_trees_all_equal(updates, plain)


def test_transform_fourier_clip_mode():
    params = _net()
    tx = optax.chain(optax.sgd(0.1), nj.spectral_norm(C, estimator="svd", mode="clip", dims=CIRC_RULES))
    state = tx.init(params)
    grads = _net(seed=10, scale=0.5)
    new, state, _, plain = _step_fn(tx, quick_jit)(params, state, grads)
    for path, v in _refs(new, CIRC_RULES).items():
        assert v <= C * (1 + EXACT), (path, v)
    before = _refs(jax.tree.map(lambda x, g: x - np.float32(0.1) * g, params, grads), CIRC_RULES)
    for path in KERNELS:
        np.testing.assert_allclose(float(nj.by_path(state[1].sigma)[path]), before[path], rtol=EXACT)
    # the conv leaves are the Fourier clip of params + updates, not a rescaling of it
    w = params["conv1"]["kernel"] + plain["conv1"]["kernel"]
    np.testing.assert_allclose(
        np.asarray(new["conv1"]["kernel"]), np.asarray(_clip(w, C, CIRC_RULES[r"^conv1/"])[0]), rtol=1e-5, atol=1e-6
    )
    # a zero-padded convolution cannot be clipped: refused at init and at update, naming the leaf
    bad = nj.spectral_norm(C, estimator="svd", mode="clip", dims={**CIRC_RULES, r"^conv2/": S((6, 6), strides=2)})
    with pytest.raises(ValueError, match="conv2/kernel.*CIRCULAR"):
        bad.init(params)
    state_ok = nj.spectral_norm(C, estimator="svd", dims=RULES).init(params)  # same state structure
    with pytest.raises(ValueError, match="conv2/kernel.*CIRCULAR"):
        bad.update(grads, state_ok, params)
    with pytest.raises(ValueError, match="conv1/kernel.*CIRCULAR"):
        nj.project_spectral_norm(params, C, dims=RULES)  # mode="clip" is the projection's default


def test_transform_dims_callable_and_unmatched_rules():
    params = _net()
    # a callable returning ConvSpec (or None for the dense kernel's default view)
    by_fn = lambda path, leaf: {"conv1": RULES[r"^conv1/"], "conv2": RULES[r"^conv2/"]}.get(path.split("/")[0])
    tx = nj.spectral_norm(C, estimator="power", dims=by_fn)
    shapes = {p: u.shape for p, u in nj.by_path(jax.eval_shape(tx.init, params).u).items()}  # traced, not run
    assert shapes == {"conv1/kernel": (6, 6, 2), "conv2/kernel": (6, 6, 4), "dense/kernel": (3,)}
    norms = nj.by_path(quick_jit(lambda p: nj.spectral_norms(p, dims=by_fn))(params))
    refs = _refs(params, RULES)
    np.testing.assert_allclose([float(norms[p]) for p in KERNELS], [refs[p] for p in KERNELS], rtol=EXACT)
    # a rule that matches no leaf is an error naming it (a typo must not leave a conv at the matrix view)
    unmatched = {r"^encoder/": S((6, 6))}
    for make in (
        lambda: nj.spectral_norm(C, estimator="power", dims=unmatched).init(params),
        lambda: nj.spectral_norms(params, dims=unmatched),
        lambda: nj.lipschitz_bound(params, dims=unmatched),
        lambda: nj.project_spectral_norm(params, C, dims=unmatched),
    ):
        with pytest.raises(ValueError, match=r"dims key '\^encoder/' matches no leaf"):
            make()


def test_rules_match_whole_path_components_and_never_two():
    """``Conv_1`` must not pick ``Conv_10``'s kernel (that was a constraint 12% too loose), and a
    leaf matched by two rules raises naming both."""
    k = _kernel((3, 3, 2, 2), 3)
    params = {f"Conv_{i}": {"kernel": jnp.asarray(k * (1 + i / 10))} for i in (1, 10, 11)}
    rules = {"Conv_1": S((6, 6)), "Conv_10": S((6, 6), strides=2), "Conv_11": S((6, 6), padding="VALID")}
    got = nj.by_path(nj.spectral_norms(params, estimator="svd", dims=rules))
    for key, spec in rules.items():
        np.testing.assert_allclose(float(got[key + "/kernel"]), ref_norm(params[key]["kernel"], spec), rtol=EXACT)
    with pytest.raises(ValueError, match=r"'Conv_10/kernel' is matched by two dims keys, 'Conv_1.\*' and 'Conv_10'"):
        nj.spectral_norms(params, dims={"Conv_1.*": S((6, 6)), "Conv_10": S((6, 6))})


def test_transform_stacked_conv_kernels_one_norm_each():
    """A (layers, 3, 3, in, out) kernel (convolutions stacked for scan): one norm per layer."""
    spec = S((5, 5), batch_dims=1)
    k = _kernel((3, 3, 3, 2, 2), 8) * np.array([0.2, 1.5, 3.0], np.float32)[:, None, None, None, None]
    ref = ref_norm(k, spec)
    assert ref[0] < C < ref[1] < ref[2]
    params = {"blocks": {"kernel": jnp.asarray(k)}}
    rules = {"blocks": spec}
    state = jax.eval_shape(nj.spectral_norm(C, dims=rules).init, params)  # power: shapes only
    assert nj.by_path(state.u)["blocks/kernel"].shape == (3, 5, 5, 2) and nj.by_path(state.sigma)["blocks/kernel"].shape == (3,)
    tx = nj.spectral_norm(C, estimator="svd", dims=rules)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = jax.jit(tx.update)(zeros, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(nj.by_path(state.sigma)["blocks/kernel"]), ref, rtol=EXACT)
    new = np.asarray(optax.apply_updates(params, updates)["blocks"]["kernel"])
    np.testing.assert_array_equal(new[0], k[0])  # inside: bit for bit
    np.testing.assert_allclose(ref_norm(new, spec), [ref[0], C, C], rtol=EXACT)


@pytest.mark.parametrize("estimator", ["gram", "power"])
def test_transform_bfloat16_kernels(estimator):
    params = _net(dtype=jnp.bfloat16)
    tx = optax.chain(optax.sgd(0.1), nj.spectral_norm(C, estimator=estimator, dims=RULES))
    state = quick_jit(tx.init)(params)
    if estimator == "power":
        assert all(u.dtype == jnp.float32 for u in nj.by_path(state[1].u).values())
    update = quick_jit(tx.update)
    p = params
    for i in range(3):
        updates, state = update(jax.tree.map(jnp.zeros_like, p), state, p)
        p = optax.apply_updates(p, updates)
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((updates, p)))
    # storing the rescaled kernel in bfloat16 (8 significant bits) moves its norm by < 2^-8;
    # gram sits below C by its looseness on these 6x6 grids, power (a lower bound) at C, less
    # the rounding toward the ball of the update (nj.scaled_update: up to one ulp of the update,
    # 2^-7 of an entry shrunk 3x, so up to 2^-6 of the norm)
    for path, v in _refs(p, RULES).items():
        assert v <= C * (1 + 2.0**-7), (path, v)
        if estimator == "power":
            assert v >= C * (1 - 2.0**-6), (path, v)


def test_transform_inside_multisteps():
    params = _net()
    grads = _net(seed=10, scale=0.5)
    with jax.numpy_dtype_promotion("standard"):  # optax.MultiSteps counts steps in int32
        tx = optax.MultiSteps(optax.chain(optax.sgd(0.1), nj.spectral_norm(C, estimator="gram", dims=RULES)), 2)
        state, p = tx.init(params), params
        update = quick_jit(tx.update)
        for i in range(2):
            updates, state = update(grads, state, p)
            p = optax.apply_updates(p, updates)
            if i == 0:  # the first micro-step only accumulates
                chex.assert_trees_all_equal(p, params)
    for path, v in _refs(p, RULES).items():
        assert v <= C * (1 + EXACT), (path, v)


def _forward(params, x):
    h = x
    for name, spec in (("conv1", RULES[r"^conv1/"]), ("conv2", RULES[r"^conv2/"])):
        conv = nn.Conv(4, (3, 3), strides=spec.strides, padding=spec.padding, precision=jax.lax.Precision.HIGHEST)
        h = jax.nn.relu(conv.apply({"params": params[name]}, h))
    return h.reshape(h.shape[0], -1) @ params["dense"]["kernel"] + params["dense"]["bias"]


@quick_jit
def _whole_tree(params, small):
    """Every pure tree-level entry point with conv rules, in one program."""
    project = lambda p, mode, rules=RULES: nj.project_spectral_norm(p, C, mode=mode, dims=rules)
    return {
        "lip_gram": nj.lipschitz_bound(params, dims=RULES),
        "lip_svd": nj.lipschitz_bound(params, estimator="svd", dims=RULES),
        "matrix_view": nj.by_path(nj.spectral_norms(params, estimator="svd")),
        "norms_svd": nj.by_path(nj.spectral_norms(params, estimator="svd", dims=RULES)),
        "norms_gram": nj.by_path(nj.spectral_norms(params, estimator="gram", dims=RULES)),
        "rescale": project(params, "rescale"),
        "normalize": project(params, "normalize"),
        "clip_circular": project(params, "clip", CIRC_RULES),
        "small_rescale": project(small, "rescale"),
    }


def test_lipschitz_bound_spectral_norms_and_projection_with_conv_rules():
    params = _net()
    small = jax.tree.map(lambda x: x * np.float32(0.05), params)
    assert all(v < 0.5 * C for v in _refs(small, RULES).values())
    out = _whole_tree(params, small)
    refs = _refs(params, RULES)
    exact = math.prod(refs.values())
    # Gram factors: each the norm of the circular convolution on the grown grid (8x8 for both)
    targets = [
        float(gram_target(params["conv1"]["kernel"], RULES[r"^conv1/"])),
        float(gram_target(params["conv2"]["kernel"], RULES[r"^conv2/"])),
        refs["dense/kernel"],
    ]
    bound = float(out["lip_gram"])
    assert exact * CERTIFIED <= bound, (bound, exact)
    assert bound <= math.prod(targets) * 1.01, (bound, math.prod(targets), exact)  # + the dense Gram slack
    assert bound <= exact * 1.5, bound / exact  # the zero-padded 6x6 layers: measured 1.2x
    np.testing.assert_allclose(float(out["lip_svd"]), exact, rtol=3 * EXACT)
    # the certificate holds for the network: its Jacobian at random inputs is below both
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(16, 6, 6, 2)), jnp.float32)
    jac = quick_jit(jax.vmap(jax.jacrev(lambda x: _forward(params, x[None])[0])))(xs)  # (16, 3, 6, 6, 2)
    lip = np.linalg.norm(np.asarray(jac, np.float64).reshape(16, 3, -1), ord=2, axis=(1, 2))
    assert np.all(lip <= exact) and np.all(lip <= bound)
    # the matrix view of the conv kernels gives a smaller number: no certificate, so
    # lipschitz_bound refuses a conv kernel left to the shape default
    assert float(np.prod([float(v) for v in out["matrix_view"].values()])) < 0.8 * exact
    with pytest.raises(ValueError, match="'conv1/kernel' of shape .* has no convolution or explicit matrix view"):
        nj.lipschitz_bound(params, estimator="svd")
    # spectral_norms: exact with svd, an upper bound with gram
    assert set(out["norms_svd"]) == set(out["norms_gram"]) == set(KERNELS)
    for path in KERNELS:
        np.testing.assert_allclose(float(out["norms_svd"][path]), refs[path], rtol=EXACT)
        assert float(out["norms_gram"][path]) >= refs[path] * CERTIFIED
    # project_spectral_norm: rescale and normalize land on the sphere, the circular clip inside
    for mode in ("rescale", "normalize"):
        np.testing.assert_allclose(list(_refs(out[mode], RULES).values()), C, rtol=EXACT)
    assert all(v <= C * (1 + EXACT) for v in _refs(out["clip_circular"], CIRC_RULES).values())
    for key in ("rescale", "normalize", "clip_circular"):
        for name in ("conv1", "conv2", "dense"):  # biases are not selected
            np.testing.assert_array_equal(np.asarray(out[key][name]["bias"]), np.asarray(params[name]["bias"]))
    chex.assert_trees_all_equal(out["small_rescale"], small)  # inside: bit for bit


# --------------------------------------------------------------------------------------------
# Errors name the leaf.
# --------------------------------------------------------------------------------------------

LEAF = "enc/conv/kernel"


@pytest.mark.parametrize(
    "kernel_shape, spec, error, match",
    [
        ((3, 3, 2, 4), S((6, 6, 2)), ValueError, r"has 4 axes, but ConvSpec with input_shape \(6, 6, 2\) \(3 spatial axes\)"),  # channels
        ((3, 3, 1, 8), S((8,)), ValueError, r"has 4 axes, but ConvSpec with input_shape \(8,\) \(1 spatial axes\)"),  # rank
        ((3, 3, 2, 4), S((6, 0)), ValueError, "input_shape must hold >= 1 positive ints"),
        ((3, 3, 2, 4), S(6), TypeError, "input_shape must be a sequence"),
        ((3, 3, 2, 4), S((6, 6), strides=0), ValueError, "strides must be a positive int"),
        ((3, 3, 2, 4), S((6, 6), strides=(1, -1)), ValueError, "strides must be a positive int"),
        ((3, 3, 2, 4), S((6, 6), strides=(1, 1, 1)), ValueError, "strides must be a positive int or 2"),
        ((3, 3, 2, 4), S((6, 6), kernel_dilation=0), ValueError, "kernel_dilation"),
        ((3, 3, 1, 3), S((6, 6), feature_group_count=2), ValueError, "3 output features are not divisible"),
        ((3, 3, 2, 4), S((6, 6), feature_group_count=0), ValueError, "feature_group_count must be a positive"),
        ((3, 3, 2, 4), S((6, 6), padding="FULL"), ValueError, "unknown padding 'FULL'"),
        ((3, 3, 2, 4), S((6, 6), padding=((1, 1),)), ValueError, "1 entries for 2 spatial axes"),
        ((3, 3, 2, 4), S((6, 6), padding="CAUSAL"), ValueError, "CAUSAL padding is for 1-D"),
        ((3, 3, 2, 4), S((2, 6), padding="VALID"), ValueError, "empty output"),
        ((5, 5, 1, 2), S((2, 2), padding="REFLECT"), ValueError, "REFLECT padding .* needs an input larger"),
    ],
    ids=[
        "channel_axis_in_input_shape",
        "spatial_rank_differs",
        "zero_input_size",
        "input_shape_not_a_sequence",
        "zero_stride",
        "negative_stride",
        "strides_length",
        "zero_dilation",
        "groups_not_dividing_out",
        "zero_groups",
        "unknown_padding",
        "padding_length",
        "causal_2d",
        "valid_empty_output",
        "reflect_pad_too_large",
    ],
)
def test_bad_conv_specs_name_the_leaf(kernel_shape, spec, error, match):
    params = {"enc": {"conv": {"kernel": jnp.zeros(kernel_shape, jnp.float32), "bias": jnp.zeros(kernel_shape[-1])}}}
    rules = {"conv": spec}
    for call in (
        lambda: nj.spectral_norm(C, estimator="gram", dims=rules).init(params),
        lambda: nj.spectral_norm(C, estimator="power", dims=rules).init(params),
        lambda: nj.spectral_norms(params, dims=rules),
        lambda: nj.project_spectral_norm(params, C, mode="rescale", dims=rules),
    ):
        with pytest.raises(error, match=match) as info:
            call()
        assert LEAF in str(info.value), str(info.value)


def test_bad_method_and_dtype():
    k = jnp.ones((3, 3, 2, 4))
    with pytest.raises(ValueError, match="unknown method 'lanczos'"):
        nj.conv_spectral_norm(k, (6, 6), method="lanczos")
    with pytest.raises(TypeError, match="floating point"):
        nj.conv_spectral_norm(k.astype(jnp.int32), (6, 6))
    with pytest.raises(ValueError, match="REFLECT.*no certified"):
        nj.conv_spectral_norm(k, (6, 6), padding="REFLECT", method="gram")
    with pytest.raises(ValueError, match="num_iters must be >= 1"):
        nj.conv_sigma_power(k, jnp.ones((6, 6, 2)), S((6, 6)), num_iters=0)


def test_reflect_with_gram_is_refused_at_init_naming_the_leaf():
    params = {"enc": {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}}}
    rules = {"conv": S((6, 6), padding="REFLECT")}
    with pytest.raises(ValueError, match=LEAF):
        nj.spectral_norm(C, estimator="gram", dims=rules).init(params)
    with pytest.raises(ValueError, match=LEAF + ".*REFLECT"):
        nj.lipschitz_bound(params, dims=rules)
    # the estimators that do handle REFLECT are accepted, and power bounds it from below
    nj.spectral_norm(C, estimator="power", dims=rules).init(params)
    exact = nj.by_path(nj.spectral_norms(params, estimator="svd", dims=rules))[LEAF]
    assert float(exact) > 0


def test_svd_on_a_large_zero_padded_convolution_is_refused_naming_the_leaf():
    # (64*64*8) x (64*64*8) entries: far above the dense limit; the FFT route (CIRCULAR) is fine
    params = {"enc": {"conv": {"kernel": jnp.ones((3, 3, 8, 8))}}}
    with pytest.raises(ValueError, match=LEAF + ".*materialise"):
        nj.spectral_norm(C, estimator="svd", dims={"conv": S((64, 64))}).init(params)
    with pytest.raises(ValueError, match=LEAF + ".*materialise"):
        nj.project_spectral_norm(params, C, mode="rescale", dims={"conv": S((64, 64))})
    with pytest.raises(ValueError, match=LEAF + ".*materialise"):
        nj.spectral_norms(params, dims={"conv": S((64, 64))})
    circular = nj.by_path(nj.spectral_norms(params, dims={"conv": S((64, 64), padding="CIRCULAR")}))[LEAF]
    np.testing.assert_allclose(float(circular), 72.0, rtol=1e-5)  # all-ones: DC gain 9 * 8


# --------------------------------------------------------------------------------------------
# Property: the Gram bound is never below the true norm.
# --------------------------------------------------------------------------------------------


@st.composite
def conv_problems(draw):
    nd = draw(st.sampled_from([1, 2]))
    axis = lambda lo, hi: tuple(draw(st.integers(lo, hi)) for _ in range(nd))
    input_shape, kernel_size, strides, dilation = axis(3, 7), axis(1, 4), axis(1, 2), axis(1, 2)
    groups = draw(st.sampled_from([1, 2]))
    cin_g, cout = draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["SAME", "VALID", "CIRCULAR", "CAUSAL", "int", "pairs"]))
    if kind == "CAUSAL" and nd != 1:
        kind = "SAME"
    if kind == "int":
        padding = draw(st.integers(0, 2))
    elif kind == "pairs":
        padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(nd))
    else:
        padding = kind
    spec = S(input_shape, strides, padding, dilation, groups)
    shape = kernel_size + (cin_g, cout)
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    if padding != "CIRCULAR":
        padded = [n + lo + hi for n, (lo, hi) in zip(input_shape, _pads(spec, shape))]
        assume(all(p >= k for p, k in zip(padded, k_eff)))  # a non-empty output
    return shape, spec, draw(st.integers(0, 2**16))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_problems())
def test_gram_is_never_below_the_true_norm(problem):
    shape, spec, seed = problem
    k = _kernel(shape, seed)
    ref = ref_norm(k, spec)
    gram = float(_norm(k, spec, "gram"))
    assert gram >= ref * CERTIFIED, (gram, ref)
    # and never above the circular norm it stands for: 8 Gram iterations overshoot a matrix of
    # rank r by at most r^(1/512), and every per-frequency matrix here has <= 2 columns
    target = gram_target(k, spec)
    assert gram <= target * 2 ** (1 / 512) * (1 + GRAM_TIGHT), (gram, target)
    if spec.padding == "CIRCULAR":  # the circular norm itself
        assert gram >= target * CERTIFIED, (gram, target)
    else:  # operators this small also get Gram on the materialised operator: near the exact norm
        rank = min(ref_matrix(k, spec).shape)
        assert gram <= ref * rank ** (0.5**9) * (1 + GRAM_TIGHT), (gram / ref, rank)


# --------------------------------------------------------------------------------------------
# Sharding: a kernel split on its output channels.
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 CPU devices the root conftest.py fakes")
@pytest.mark.usefixtures("full_optimization")
@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_kernel_matches_one_device_and_keeps_its_sharding(axis_type):
    t = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[axis_type]
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(t,) * 2, devices=jax.devices()[:8])
    spec = S((6, 6), strides=2)
    k = _kernel((3, 3, 2, 8), 21, scale=2.0)
    assert ref_norm(k, spec) > 2 * C  # the transform step below has to project
    sharding = NamedSharding(mesh, P(None, None, None, "model"))
    ks = jax.device_put(k, sharding)
    assert ks.addressable_shards[0].data.shape == (3, 3, 2, 2)  # really split
    k1 = jax.device_put(k, jax.devices()[0])
    u0 = _init_u(jax.random.key(0), k, spec)
    power = jax.jit(lambda kk, u: nj.conv_sigma_power(kk, u, spec, num_iters=20))
    with jax.set_mesh(mesh):
        sharded = power(ks, u0)
    one_device = power(k1, u0)
    to_np = lambda tree: jax.tree.map(np.asarray, tree)
    chex.assert_trees_all_close(to_np(sharded), to_np(one_device), rtol=1e-5, atol=1e-6)

    # every estimator of the transform, and the Fourier clip of a circular layer
    circular = S((6, 6), strides=2, padding="CIRCULAR")
    txs = {
        "power": nj.spectral_norm(C, estimator="power", dims={"conv": spec}),
        "gram": nj.spectral_norm(C, estimator="gram", dims={"conv": spec}),
        "clip": nj.spectral_norm(C, estimator="svd", mode="clip", dims={"conv": circular}),
    }
    # where the exact norm lands: power from below (a hair over C), Gram above it (6x6 is small:
    # its padded-grid bound is loose), the Fourier clip inside with the largest value at C
    lands = {"power": (1 - EXACT, 1.01), "gram": (0.8, 1 + EXACT), "clip": (1 - 1e-4, 1 + 1e-5)}
    for name, constraint in txs.items():
        tx = optax.chain(optax.sgd(0.1), constraint)
        _check_sharded_step(mesh, k, tx, circular if name == "clip" else spec, lands[name])


def _check_sharded_step(mesh, k, tx, spec, lands):
    to_np = lambda tree: jax.tree.map(np.asarray, tree)

    def run(put):
        params = {"conv": {"kernel": put(k), "bias": put(np.linspace(-1, 1, 8, dtype=np.float32))}}
        grads = jax.tree.map(lambda x: x * np.float32(-1.0), params)  # grows the kernel: it must project
        state = quick_jit(tx.init)(params)
        step = jax.jit(lambda p, s, g: optax.apply_updates(p, tx.update(g, s, p)[0]))
        return params, step(params, state, grads)

    with jax.set_mesh(mesh):
        params_sh, new_sh = run(lambda x: jax.device_put(x, NamedSharding(mesh, P(*(None,) * (x.ndim - 1), "model"))))
    _, new_1 = run(lambda x: jax.device_put(x, jax.devices()[0]))
    for new, old in zip(jax.tree.leaves(new_sh), jax.tree.leaves(params_sh)):
        assert new.sharding.is_equivalent_to(old.sharding, old.ndim), (new.sharding, old.sharding)
    chex.assert_trees_all_close(to_np(new_sh), to_np(new_1), rtol=1e-5, atol=1e-6)
    sigma = ref_norm(new_sh["conv"]["kernel"], spec)
    assert C * lands[0] <= sigma <= C * lands[1], sigma


# --------------------------------------------------------------------------------------------
# Flax NNX: nnx.Conv's kernel has linen's layout; the rules match nnx.Optimizer's state paths.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["gram", "power"])
def test_flax_nnx_optimizer_with_conv_rules(estimator):
    nnx = pytest.importorskip("flax.nnx")

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 4, (3, 3), padding="SAME", rngs=rngs)
            self.conv2 = nnx.Conv(4, 4, (3, 3), strides=2, padding="SAME", rngs=rngs)
            self.head = nnx.Linear(4 * 3 * 3, 2, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
            return self.head(x.reshape(x.shape[0], -1))

    rules = {r"conv1/kernel": S((6, 6)), r"conv2/kernel": S((6, 6), strides=2)}
    model = CNN(nnx.Rngs(0))
    # regression to a target far beyond what 1-Lipschitz layers reach: every kernel is pushed out
    tx = optax.chain(optax.sgd(0.1), nj.spectral_norm(C, estimator=estimator, dims=rules))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(8, 6, 6, 1)).astype(np.float32))

    @nnx.jit
    def train_step(model, opt):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - 5.0) ** 2))(model)
        opt.update(model, grads)

    seen = []  # the conv1 sigma the transform saw before each projection
    for _ in range(20):
        train_step(model, opt)
        seen.append(float(nj.by_path(optax.tree_utils.tree_get(opt.opt_state, "sigma"))["conv1/kernel"][...]))
    sigma = nj.by_path(optax.tree_utils.tree_get(opt.opt_state, "sigma"))
    assert set(sigma) == {"conv1/kernel", "conv2/kernel", "head/kernel"}
    u = nj.by_path(optax.tree_utils.tree_get(opt.opt_state, "u"))
    if estimator == "power":  # input-shaped power vectors for the conv leaves, a vector for the dense one
        assert u["conv1/kernel"].shape == (6, 6, 1) and u["conv2/kernel"].shape == (6, 6, 4)
        assert u["head/kernel"].shape == (2,)
    assert max(seen) > 2 * C  # the steps did push the layer far out of the ball
    # Gram certifies every step; power is a lower bound that lags big jumps (measured: 4.7x at
    # step 4 of this run) and has caught up once the weights settle (1.00001 by step 13)
    tol = 1.0 + (1e-5 if estimator == "gram" else 1e-3)
    for conv, spec in [(model.conv1, rules[r"conv1/kernel"]), (model.conv2, rules[r"conv2/kernel"])]:
        assert ref_norm(np.asarray(conv.kernel[...]), spec) <= C * tol


# --------------------------------------------------------------------------------------------
# kernel_layout="torch": Equinox's and PyTorch's (out, in // groups, *kernel_size) kernels.
# Reference: the float64 Jacobian of torch.nn.functional.conv2d itself (channels first).
# --------------------------------------------------------------------------------------------

TORCH_CASES = {
    # name: (torch weight shape, input (h, w), stride, padding as torch and as normjax, groups)
    "same_pad1": ((4, 2, 3, 3), (6, 6), 1, (1, 1), 1),
    "stride2_groups2": ((6, 1, 3, 3), (6, 6), 2, (1, 1), 2),
    "valid_rect": ((4, 2, 3, 2), (5, 6), 1, (0, 0), 1),
    "circular": ((3, 2, 3, 3), (6, 6), 1, "circular", 1),
}


def _torch_ref(weight, input_hw, stride, padding, groups):
    torch = pytest.importorskip("torch")
    w = torch.tensor(weight, dtype=torch.float64)
    cin = w.shape[1] * groups
    if padding == "circular":
        conv = torch.nn.Conv2d(cin, w.shape[0], w.shape[2:], stride, 1, groups=groups, bias=False, padding_mode="circular")
        conv = conv.double()
        with torch.no_grad():
            conv.weight.copy_(w)
        fn = conv
    else:
        fn = lambda x: torch.nn.functional.conv2d(x, w, stride=stride, padding=padding, groups=groups)  # noqa: E731
    x0 = torch.zeros((1, cin, *input_hw), dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(fn, x0).reshape(-1, x0.numel())
    return np.linalg.svd(jac.numpy(), compute_uv=False)[0]


def _torch_spec(input_hw, stride, padding, groups):
    pad = "CIRCULAR" if padding == "circular" else tuple((p, p) for p in padding)
    return S(input_hw, strides=stride, padding=pad, feature_group_count=groups, kernel_layout="torch")


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_torch_layout_matches_torch_conv2d(name):
    shape, hw, stride, padding, groups = TORCH_CASES[name]
    w = _kernel(shape, seed=sorted(TORCH_CASES).index(name))
    exact = _torch_ref(np.asarray(w, np.float64), hw, stride, padding, groups)
    spec = _torch_spec(hw, stride, padding, groups)
    pad = spec.padding

    @quick_jit  # every method and the flax layout in one compile
    def norms(w):
        call = lambda m: nj.conv_spectral_norm(  # noqa: E731
            w, hw, strides=stride, padding=pad, feature_group_count=groups, kernel_layout="torch", method=m
        )
        flax_k = jnp.transpose(w, (2, 3, 1, 0))
        flax_svd = nj.conv_spectral_norm(flax_k, hw, strides=stride, padding=pad, feature_group_count=groups, method="svd")
        return {m: call(m) for m in ("svd", "power", "gram")} | {"flax_svd": flax_svd}

    got = {k: float(v) for k, v in norms(jnp.asarray(w)).items()}
    np.testing.assert_allclose(got["svd"], exact, rtol=EXACT)
    np.testing.assert_allclose(got["power"], exact, rtol=1e-4)
    assert got["gram"] >= exact * CERTIFIED
    # the same numbers as the flax kernel it permutes to
    np.testing.assert_allclose(got["flax_svd"], got["svd"], rtol=1e-6)


def test_torch_layout_in_the_transform_keeps_the_layout():
    # an Equinox-style tree: weight (out, in, kh, kw), bias (out, 1, 1)
    spec = S((6, 6), padding="CIRCULAR", kernel_layout="torch")
    w = _kernel((3, 2, 3, 3), seed=5, scale=2.0)
    assert ref_norm(jnp.transpose(w, (2, 3, 1, 0)), dataclasses.replace(spec, kernel_layout="flax")) > 2 * C
    params = {"conv": {"weight": w, "bias": jnp.ones((3, 1, 1))}, "inside": {"weight": w * 1e-3}}
    rules = {r"weight$": spec}
    fft = quick_jit(lambda k: nj.conv_spectral_norm(k, (6, 6), padding="CIRCULAR", kernel_layout="torch", method="fft"))
    for estimator, mode in [("gram", "rescale"), ("power", "rescale"), ("svd", "clip")]:
        tx = nj.spectral_norm(C, estimator=estimator, mode=mode, dims=rules, where=r"weight$")
        upd, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), quick_jit(tx.init)(params), params)
        new = optax.apply_updates(params, upd)
        assert new["conv"]["weight"].shape == w.shape
        got = float(fft(new["conv"]["weight"]))
        hi = 1 + (1e-5 if estimator != "power" else 0.02)
        assert got <= C * hi, (estimator, got)
        assert got >= C * (0.9 if estimator == "gram" else 1 - 1e-4), (estimator, got)
        # a kernel already inside and the bias: bit for bit
        np.testing.assert_array_equal(np.asarray(new["inside"]["weight"]), np.asarray(w * 1e-3))
        np.testing.assert_array_equal(np.asarray(new["conv"]["bias"]), np.ones((3, 1, 1)))
    # the pure projection (Fourier clip) returns the torch layout too, and is the transform's result
    out = quick_jit(lambda p: nj.project_spectral_norm(p, C, mode="clip", dims=rules, where=r"weight$"))(params)
    assert out["conv"]["weight"].shape == w.shape
    np.testing.assert_allclose(np.asarray(out["conv"]["weight"]), np.asarray(new["conv"]["weight"]), rtol=1e-6, atol=1e-7)


def test_bad_kernel_layout_names_the_leaf():
    params = {"enc": {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}}}
    for bad in ("OIHWX", "OOHW", "jax", "HWI"):
        with pytest.raises(ValueError, match=LEAF + ".*kernel_layout"):
            nj.spectral_norm(C, dims={"conv": S((6, 6), kernel_layout=bad)}).init(params)


@pytest.mark.parametrize("layout", ["HWIO", "OIHW", "IOHW", "HWOI", "WHIO"])
def test_any_kernel_layout_letters(layout):
    """A letter layout permutes the kernel's axes; the operator is the flax kernel's (spatial
    letters in the input's order: ``"WHIO"`` stores the second spatial axis first)."""
    k = _kernel((3, 2, 2, 4), 11)  # flax (H, W, I, O) with H=3, W=2
    spec = S((6, 5))
    src = "HWIO"
    perm = [src.index(ch) for ch in layout]
    kl = jnp.asarray(np.transpose(k, perm))
    got = nj.conv_sigma_svd(kl, dataclasses.replace(spec, kernel_layout=layout))
    np.testing.assert_allclose(float(got), ref_norm(k, spec), rtol=EXACT)


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
@pytest.mark.parametrize("kernel_spec", [P(None, None, None, "model"), P(None, None, "data", "model")], ids=str)
def test_hlo_conv_power_never_gathers_the_kernel(axis_type, kernel_spec):
    """Power iteration through a convolution whose kernel is split over devices moves only
    image-sized vectors (all-reduces of partial convolutions), never the kernel."""
    import re

    t = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[axis_type]
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(t,) * 2, devices=jax.devices()[:8])
    spec = S((16, 16))
    k = _kernel((3, 3, 32, 64), seed=3)  # 18,432 entries: more than any image vector here
    u0 = _init_u(jax.random.key(0), k, spec)
    with jax.set_mesh(mesh):
        ks = jax.device_put(k, NamedSharding(mesh, kernel_spec))
        txt = jax.jit(lambda kk, u: nj.conv_sigma_power(kk, u, spec, num_iters=2)).lower(ks, u0).compile().as_text()
    found = re.findall(r"=\s*\(?([a-z0-9]+\[[0-9,]*\])[^=]*?\s(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)", txt)
    assert found, "expected all-reduces of partial convolutions"  # the kernel really is split
    for shape, op in found:
        dims = [int(d) for d in shape[shape.index("[") + 1 : -1].split(",") if d]
        assert math.prod(dims) <= 16 * 16 * 64, (op, shape)  # at most one output image
        assert dims[:2] != [3, 3], (op, shape)  # no kernel (or kernel shard) moves
