"""Property tests of the max-norm family against an independent float64 NumPy reference.

Hypothesis draws shapes (ndim 1..4, dims 1..6), unit axes (non-empty subsets, negative
indices, ints, lists or tuples, and ``None`` for ndim >= 2), bounds and float32 data whose
units lie on both sides of the bounds, some of them exactly zero. Each example runs one
jitted function whose bounds are traced arguments: a new shape costs one compile, which is
several times cheaper than running the ~25 primitives of a projection eagerly (each of which
compiles on its own for every new shape).

The references below are written from the closed forms, not from the library:
max-norm ``w min(1, c/n)``, unit-norm ``w/n``, min-max-norm ``w (r clip(n, a, b) + (1-r) n)/n``
(Keras's meaning of ``rate``), zero units staying zero; and Keras's own formulas, which divide
by ``n + epsilon``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import normjax as nj

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MARGIN = 1e-4  # a unit this far (relatively) from a bound is clearly inside or outside in float32
KERAS_EPSILON = 1e-7  # keras.backend.epsilon()
F32_EPS = float(np.finfo(np.float32).eps)
KINDS = ("max", "unit", "min_max")


# --------------------------------------------------------------------------------------------
# Independent float64 references.
# --------------------------------------------------------------------------------------------


def norms64(w, axes):
    x = np.asarray(w, np.float64)
    return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))


def ref_project(kind, w, axes, c=None, a=None, b=None, rate=1.0):
    """Float64 closed form of the projection of ``w`` (units over ``axes``)."""
    x = np.asarray(w, np.float64)
    n = norms64(x, axes)
    safe = np.where(n > 0, n, 1.0)
    if kind == "max":
        factor = np.minimum(1.0, c / safe)
    elif kind == "unit":
        factor = 1.0 / safe
    else:
        factor = (rate * np.clip(n, a, b) + (1 - rate) * n) / safe
    return np.where(n > 0, x * factor, 0.0)


def keras(kind, w, axes, c=None, a=None, b=None, rate=1.0, dtype=np.float64):
    """Keras 3's ``MaxNorm`` / ``UnitNorm`` / ``MinMaxNorm.__call__``, in NumPy, in ``dtype``."""
    x = np.asarray(w, dtype)
    eps = dtype(KERAS_EPSILON)
    norms = np.sqrt(np.sum(np.square(x), axis=axes, keepdims=True))
    if kind == "max":
        return x * (np.clip(norms, dtype(0), dtype(c)) / (eps + norms))
    if kind == "unit":
        return x / (eps + norms)
    desired = dtype(rate) * np.clip(norms, dtype(a), dtype(b)) + (dtype(1) - dtype(rate)) * norms
    return x * (desired / (eps + norms))


def inside_mask(kind, n, c=None, a=None, b=None, rate=1.0):
    """Units (keepdims) clearly inside the set, or that the constraint leaves alone anyway."""
    if kind == "max":
        return n < c * (1 - MARGIN)
    if kind == "unit":
        return n == 0
    return (n == 0) | (rate == 0) | ((n > a * (1 + MARGIN)) & (n < b * (1 - MARGIN)))


def outside_mask(kind, n, c=None, a=None, b=None, rate=1.0):
    """Units (keepdims) clearly moved by the constraint."""
    if kind == "max":
        return n > c * (1 + MARGIN)
    if kind == "unit":
        return (n > 0) & (np.abs(n - 1) > MARGIN)
    return (n > 0) & (rate > 0) & ((n < a * (1 - MARGIN)) | (n > b * (1 + MARGIN)))


# --------------------------------------------------------------------------------------------
# The library, jitted once per (kind, shape, axis); bounds are traced.
# --------------------------------------------------------------------------------------------


def _project(kind, tree, c, a, b, rate, axis, where):
    if kind == "max":
        return nj.project_max_norm(tree, c, axis=axis, where=where)
    if kind == "unit":
        return nj.project_unit_norm(tree, axis=axis, where=where)
    return nj.project_min_max_norm(tree, a, b, rate=rate, axis=axis, where=where)


def _transform(kind, c, a, b, rate, axis, where):
    if kind == "max":
        return nj.max_norm(c, axis=axis, where=where)
    if kind == "unit":
        return nj.unit_norm(axis=axis, where=where)
    return nj.min_max_norm(a, b, rate=rate, axis=axis, where=where)


class StaticAxis:
    """Hashable wrapper so that ``axis`` (possibly a list) can be a static jit argument."""

    def __init__(self, axis):
        self.axis = axis

    def __hash__(self):
        return hash(repr(self.axis))

    def __eq__(self, other):
        return isinstance(other, StaticAxis) and repr(self.axis) == repr(other.axis)


def _static(fn):
    jitted = jax.jit(lambda *args, kind, axis: fn(*args, kind=kind, axis=axis.axis), static_argnames=("kind", "axis"))
    wrapped = functools.wraps(fn)(lambda *args, kind, axis: jitted(*args, kind=kind, axis=StaticAxis(axis)))
    wrapped.raw = fn
    return wrapped


@_static
def project_twice(w, c, a, b, rate, *, kind, axis):
    """``P(w)`` and ``P(P(w))`` for the leaf ``"k"`` of ``{"k": w}``."""
    p1 = _project(kind, {"k": w}, c, a, b, rate, axis, "k")
    p2 = _project(kind, p1, c, a, b, rate, axis, "k")
    return p1["k"], p2["k"]


@_static
def transform_step(params, updates, c, a, b, rate, *, kind, axis):
    """``tx.update`` on ``{"k": kernel, "bias": vector}`` (only "k" selected) and ``P(params + updates)``."""
    tx = _transform(kind, c, a, b, rate, axis, "k")
    new_updates, state = tx.update(updates, tx.init(params), params)
    w = {"k": params["k"] + updates["k"]}
    return new_updates, state, _project(kind, w, c, a, b, rate, axis, "k")["k"]


def _hyper(c, a, b, rate):
    return tuple(jnp.float32(v) for v in (c, a, b, rate))


# --------------------------------------------------------------------------------------------
# Strategies.
# --------------------------------------------------------------------------------------------


@st.composite
def shapes_and_axes(draw):
    """``(shape, axis as the library gets it, the same axes as a sorted tuple of ints >= 0)``."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    if ndim >= 2 and draw(st.integers(0, 3)) == 0:
        return shape, None, tuple(range(ndim - 1))
    chosen = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    axis = [a - ndim if draw(st.booleans()) else a for a in chosen]  # negative indices too
    form = draw(st.sampled_from(["tuple", "list", "int"] if len(axis) == 1 else ["tuple", "list"]))
    axis = axis[0] if form == "int" else tuple(axis) if form == "tuple" else axis
    return shape, axis, tuple(sorted(chosen))


@st.composite
def bounds(draw, kind):
    """``(c, a, b, rate)``: 0 < c; 0 <= a <= b (a == b and a == 0 included); rate in [0, 1]."""
    c = draw(st.floats(0.05, 20.0))
    b = draw(st.floats(0.05, 20.0))
    a_frac = draw(st.sampled_from(["zero", "equal", "float", "float", "float"]))
    a = {"zero": 0.0, "equal": b}.get(a_frac)
    a = b * draw(st.floats(0.0, 1.0)) if a is None else a
    r = draw(st.sampled_from(["one", "one", "zero", "float", "float"]))
    rate = {"one": 1.0, "zero": 0.0}.get(r)
    rate = draw(st.floats(1e-30, 1.0)) if rate is None else rate  # no subnormals: XLA flushes them
    # bounds the library will see exactly (it casts them to float32)
    c, a, b, rate = (float(np.float32(v)) for v in (c, a, b, rate))
    if kind == "unit":
        return None, 1.0, 1.0, 1.0
    if kind == "max":
        return c, None, None, 1.0
    return None, a, b, rate


def make_data(shape, axes, seed, center, zero_frac, spread=2.0):
    """Float32 units with norms ``center * exp(U(-spread, spread))``; some units exactly zero."""
    rng = np.random.default_rng(seed)
    unit_shape = tuple(1 if i in axes else d for i, d in enumerate(shape))
    x = rng.normal(size=shape)
    n = norms64(x, axes)
    x = x / np.where(n > 0, n, 1.0) * center * np.exp(rng.uniform(-spread, spread, size=unit_shape))
    if zero_frac:
        alive = rng.uniform(size=unit_shape) >= zero_frac
        alive.reshape(-1)[0] = False  # at least one zero unit
        x = x * alive
    return x.astype(np.float32)


def _center(kind, c, a, b):
    return {"max": c, "unit": 1.0}.get(kind) or (a + b) / 2


@st.composite
def projection_cases(draw, kind):
    shape, axis, axes = draw(shapes_and_axes())
    c, a, b, rate = draw(bounds(kind))
    seed = draw(st.integers(0, 2**32 - 1))
    zero_frac = draw(st.sampled_from([0.0, 0.3]))
    w = make_data(shape, axes, seed, _center(kind, c, a, b), zero_frac)
    return w, axis, axes, (c, a, b, rate)


def _bcast(mask, shape):
    return np.broadcast_to(mask, shape)


# --------------------------------------------------------------------------------------------
# Projections.
# --------------------------------------------------------------------------------------------


def check_projection(kind, w, axis, axes, bnds, scale_exp):
    c, a, b, rate = bnds
    hyper = (c or 1.0, a or 0.0, b or 1.0, rate)
    p1, p2 = project_twice(jnp.asarray(w), *_hyper(*hyper), kind=kind, axis=axis)
    out, twice = np.asarray(p1), np.asarray(p2)
    assert out.dtype == np.float32 and out.shape == w.shape

    # 1. the float64 closed form
    np.testing.assert_allclose(out, ref_project(kind, w, axes, c, a, b, rate), rtol=1e-5, atol=1e-6)

    n_in, n_out = norms64(w, axes), norms64(out, axes)
    zero = n_in == 0
    # 2. feasible
    if kind == "max":
        assert np.all(n_out <= c * (1 + 1e-5)), (n_out.max(), c)
    elif kind == "unit":
        np.testing.assert_allclose(n_out[~zero], 1.0, rtol=1e-5)
    elif rate == 1.0:
        assert np.all(n_out[~zero] >= a * (1 - 1e-5)) and np.all(n_out[~zero] <= b * (1 + 1e-5)), (a, b)

    # 3. units inside (or left alone: rate 0) come back bit for bit
    keep = _bcast(inside_mask(kind, n_in, c, a, b, rate), w.shape)
    moved = outside_mask(kind, n_in, c, a, b, rate)
    event(f"units: inside={keep.any()} moved={moved.any()} zero={zero.any()}")
    event(f"axis: {type(axis).__name__}, ndim {w.ndim}")
    np.testing.assert_array_equal(out[keep], w[keep])
    if kind == "min_max" and rate == 0.0:
        np.testing.assert_array_equal(out, w)

    # 4. idempotent (min-max only with rate 1: a smaller rate moves a little more every time)
    if kind != "min_max" or rate == 1.0:
        np.testing.assert_allclose(twice, out, rtol=1e-6, atol=0)

    # 5. direction kept: each non-zero unit is a positive multiple of the input unit
    dot = np.sum(np.asarray(w, np.float64) * out, axis=axes, keepdims=True)
    assert np.all(dot[~zero] > 0)
    cos = dot[~zero] / (n_in[~zero] * n_out[~zero])
    np.testing.assert_allclose(cos, 1.0, atol=1e-6)

    # 6. zero units stay exactly zero
    np.testing.assert_array_equal(out[_bcast(zero, w.shape)], 0.0)

    # 7. Keras parity: the same up to Keras's epsilon (units not tiny; zero units are 0 in both)
    k = keras(kind, w, axes, c, a, b, rate)
    big = _bcast((n_in > 1e-2) | zero, w.shape)
    np.testing.assert_allclose(out[big], k[big], rtol=1e-5, atol=1e-7)

    # 8. scale equivariance, bit for bit: P with bounds s*c of s*w is s*P(w) for s = 2**k
    # (exact in binary floating point while nothing overflows or underflows; same compile)
    s = np.float32(2.0**scale_exp)
    scaled_hyper = (s * hyper[0], s * hyper[1], s * hyper[2], hyper[3])
    scaled = np.asarray(project_twice(jnp.asarray(w * s), *_hyper(*scaled_hyper), kind=kind, axis=axis)[0])
    np.testing.assert_array_equal(scaled, out if kind == "unit" else out * s)
    return out


@SETTINGS
@given(projection_cases("max"), st.integers(-20, 20))
def test_project_max_norm_properties(case, scale_exp):
    check_projection("max", *case, scale_exp)


@SETTINGS
@given(projection_cases("unit"), st.integers(-20, 20))
def test_project_unit_norm_properties(case, scale_exp):
    check_projection("unit", *case, scale_exp)


@SETTINGS
@given(projection_cases("min_max"), st.integers(-20, 20))
def test_project_min_max_norm_properties(case, scale_exp):
    check_projection("min_max", *case, scale_exp)


# --------------------------------------------------------------------------------------------
# Transforms: params + update' == P(params + updates).
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(st.sampled_from(KINDS), st.data())
def test_transform_contract(kind, data):
    w, axis, axes, bnds = data.draw(projection_cases(kind))
    c, a, b, rate = bnds
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    step = data.draw(st.sampled_from([0.01, 0.3, 1.0]))
    params = {"k": w, "bias": rng.normal(size=(3,)).astype(np.float32)}
    updates = {
        "k": (rng.normal(size=w.shape) * step * (np.abs(w).max() + 1e-3)).astype(np.float32),
        "bias": rng.normal(size=(3,)).astype(np.float32),
    }
    jparams, jupdates = jax.tree.map(jnp.asarray, (params, updates))
    new_u, state, projected = transform_step(
        jparams, jupdates, *_hyper(c or 1.0, a or 0.0, b or 1.0, rate), kind=kind, axis=axis
    )
    u, projected = np.asarray(new_u["k"]), np.asarray(projected)
    assert u.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(new_u["bias"]), updates["bias"])  # not selected

    p64 = np.asarray(w, np.float64)
    s = w + updates["k"]  # params + updates in float32, rounded as the library rounds it
    # params + u' == P(params + updates) up to rounding: u' = u*s + p*(s - 1) rounds a product
    # twice and a sum once, so allow a few ulps of the magnitudes involved
    err = np.abs(p64 + u - projected)
    scale = np.abs(p64) + np.abs(projected) + np.abs(updates["k"])
    assert np.all(err <= 4 * F32_EPS * scale), (err / scale).max()
    np.testing.assert_allclose(p64 + u, ref_project(kind, s, axes, c, a, b, rate), rtol=1e-5, atol=1e-6)

    # units inside after the step keep their update bit for bit
    n = norms64(s, axes)
    keep = _bcast(inside_mask(kind, n, c, a, b, rate), w.shape)
    np.testing.assert_array_equal(u[keep], updates["k"][keep])

    # the logged diagnostics describe params + updates before the projection
    assert isinstance(state, nj.NormState) and set(nj.by_path(state.largest_norm)) == {"k"}
    np.testing.assert_allclose(float(nj.by_path(state.largest_norm)["k"]), n.max(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(nj.by_path(state.smallest_norm)["k"]), n.min(), rtol=1e-5, atol=1e-6)
    frac = float(nj.by_path(state.clipped_fraction)["k"])
    lo = np.mean(outside_mask(kind, n, c, a, b, rate))
    hi = 1 - np.mean(inside_mask(kind, n, c, a, b, rate))
    assert lo - 1e-6 <= frac <= hi + 1e-6, (frac, lo, hi)


# --------------------------------------------------------------------------------------------
# Extreme magnitudes: finite float32 units whose sum of squares over- or underflows float32.
# --------------------------------------------------------------------------------------------



@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_huge_finite_units_are_projected(kind, dtype_name):
    # A diverging step can produce such weights; the projection is still well defined.
    w = jnp.asarray(np.array([[3e19, 0.3], [4e19, 0.4]], np.float32)).astype(dtype_name)
    c, a, b = 1.0, 0.5, 1.0
    out = np.asarray(project_twice(w, *_hyper(c, a, b, 1.0), kind=kind, axis=None)[0], np.float64)
    expected = ref_project(kind, np.asarray(w, np.float64), (0,), c, a, b)
    assert np.all(np.isfinite(out)), out
    np.testing.assert_allclose(out, expected, rtol=1e-2 if dtype_name == "bfloat16" else 1e-6)


@pytest.mark.parametrize("kind", ["unit", "min_max"])
def test_tiny_nonzero_units_are_normalised(kind):
    w = jnp.asarray(np.array([[3e-23, 0.3], [4e-23, 0.4]], np.float32))  # normal float32 numbers
    out = np.asarray(project_twice(w, *_hyper(1.0, 0.5, 1.0, 1.0), kind=kind, axis=None)[0], np.float64)
    np.testing.assert_allclose(norms64(out, (0,)).ravel()[0], 1.0 if kind == "unit" else 0.5, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# The one deliberate difference from Keras: units inside are not touched at all.
# --------------------------------------------------------------------------------------------


def test_keras_shrinks_units_inside_we_do_not():
    w = np.array([[0.3], [0.4]], np.float32)  # norm 0.5, inside the ball of radius 1
    k = keras("max", w, (0,), c=1.0, dtype=np.float32)  # w * 0.5 / (0.5 + 1e-7)
    assert not np.array_equal(k, w)
    np.testing.assert_array_equal(np.asarray(nj.project_max_norm({"k": jnp.asarray(w)}, 1.0)["k"]), w)

    # a unit of norm exactly 1: Keras's UnitNorm returns 1 / (1 + 1e-7) = 0.9999999
    e = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    assert keras("unit", e, (0,), dtype=np.float32)[0, 0] < 1.0
    np.testing.assert_array_equal(np.asarray(nj.project_unit_norm({"k": jnp.asarray(e)})["k"]), e)

    # over a whole kernel with every unit inside, Keras (in float32) moves many weights; we move none
    x = make_data((64, 32), (0,), 0, center=0.3, zero_frac=0.0, spread=0.5)
    assert np.all(norms64(x, (0,)) < 0.9)
    for kind, kw in (("max", dict(c=1.0)), ("min_max", dict(a=0.05, b=1.0, rate=0.5))):
        changed = np.mean(keras(kind, x, (0,), dtype=np.float32, **kw) != x)
        assert changed > 0.2, (kind, changed)
        hyper = _hyper(kw.get("c", 1.0), kw.get("a", 0.0), kw.get("b", 1.0), kw.get("rate", 1.0))
        ours = project_twice(jnp.asarray(x), *hyper, kind=kind, axis=0)[0]
        np.testing.assert_array_equal(np.asarray(ours), x)


# --------------------------------------------------------------------------------------------
# Dtypes: float32, bfloat16, float16, float64 (under jax.enable_x64).
# --------------------------------------------------------------------------------------------

DTYPE_TOL = {"float32": 1e-6, "bfloat16": 1e-2, "float16": 1e-2, "float64": 1e-12}
DTYPE_CASES = {  # name -> (kind, c, a, b, rate)
    "max": ("max", 1.0, None, None, 1.0),
    "unit": ("unit", None, 1.0, 1.0, 1.0),
    "min_max": ("min_max", None, 0.5, 1.0, 1.0),
    "min_max_rate": ("min_max", None, 0.5, 1.0, 0.4),
}
SHAPE, AXES = (3, 3, 4, 6), (0, 1, 2)  # a conv kernel, axis=None


def _enable_x64():
    ctx = getattr(jax, "enable_x64", None)
    if ctx is None:
        try:
            from jax.experimental import enable_x64 as ctx
        except ImportError:  # pragma: no cover - depends on the jax version
            pytest.skip("this jax has neither jax.enable_x64 nor jax.experimental.enable_x64")
    return ctx(True)


@jax.jit
def _every_case(w, params, updates, hypers):
    """Every DTYPE_CASES projection and transform step on one leaf: one compile per dtype."""
    out = {}
    for case, (kind, *_) in DTYPE_CASES.items():
        out[case] = (
            project_twice.raw(w, *hypers[case], kind=kind, axis=None)[0],
            *transform_step.raw(params, updates, *hypers[case], kind=kind, axis=None),
        )
    return out


def _check_dtype(dtype_name):
    dtype = jnp.dtype(dtype_name)
    tol = DTYPE_TOL[dtype_name]
    x32 = make_data(SHAPE, AXES, seed=7, center=0.8, zero_frac=0.0, spread=1.5)
    x32[..., 1] = 0.0  # one zero unit
    w = jnp.asarray(x32.astype(np.float64) if dtype_name == "float64" else x32).astype(dtype)
    assert w.dtype == dtype
    hdtype = jnp.float64 if dtype_name == "float64" else jnp.float32
    hypers = {
        case: tuple(jnp.asarray(v, hdtype) for v in (c or 1.0, a or 0.0, b or 1.0, rate))
        for case, (_, c, a, b, rate) in DTYPE_CASES.items()
    }
    updates = {"k": (w * 0.5).astype(dtype), "bias": jnp.ones((3,), dtype)}
    params = {"k": w, "bias": jnp.zeros((3,), dtype)}
    results = _every_case(w, params, updates, hypers)
    w64 = np.asarray(w, np.float64)
    n = norms64(w64, AXES)
    for case, (kind, c, a, b, rate) in DTYPE_CASES.items():
        out, new_u, state, projected = results[case]
        assert out.dtype == dtype, case
        out64 = np.asarray(out, np.float64)
        np.testing.assert_allclose(
            out64, ref_project(kind, w64, AXES, c, a, b, rate), rtol=tol, atol=tol, err_msg=case
        )
        keep = _bcast(inside_mask(kind, n, c, a, b, rate) & (n > 0), SHAPE)
        assert keep.any() or kind == "unit", case  # units strictly inside exist
        np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(w)[keep], err_msg=case)
        np.testing.assert_array_equal(out64[..., 1], 0.0, err_msg=case)
        if kind == "max":
            assert np.all(norms64(out64, AXES) <= c * (1 + 4 * tol)), case
        elif kind == "unit" or rate == 1.0:
            lo, hi = (1.0, 1.0) if kind == "unit" else (a, b)
            nz = norms64(out64, AXES)[n > 0]
            assert np.all(nz >= lo * (1 - 4 * tol)) and np.all(nz <= hi * (1 + 4 * tol)), case

        # the transform keeps the dtype of the updates and the contract, at this dtype's precision
        assert new_u["k"].dtype == dtype and new_u["bias"].dtype == dtype and projected.dtype == dtype, case
        np.testing.assert_array_equal(np.asarray(new_u["bias"]), np.asarray(updates["bias"]))
        chex.assert_trees_all_close(
            np.asarray(optax.apply_updates(params, new_u)["k"], np.float64),
            np.asarray(projected, np.float64),
            rtol=tol,
            atol=tol,
            custom_message=case,
        )
        for leaf in jax.tree.leaves(state):
            assert leaf.dtype == jnp.float32, case


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_dtypes(dtype_name):
    _check_dtype(dtype_name)


def test_float64():
    with _enable_x64():
        assert jax.config.jax_enable_x64
        _check_dtype("float64")
    assert not jax.config.jax_enable_x64  # the context manager restored the flag
