"""The matmul-only spectral maps (``normjax._polar``: ``msign``, ``spectral_clip``,
``orthogonalize``, ``spectral_soft_cap``, ``spectral_hammer``) and the modes of
``project_spectral_norm`` / ``spectral_norm`` built on them, against
references that do not use the library: numpy float64 SVDs (``U diag(min(s, c)) V^T``,
``c U V^T``, the soft-cap formula on singular values), float64 numpy evaluation of the polar
schedule's polynomials, and the compiled programs' text.

Compilation dominates the cost here (a matmul clip is ~75 unrolled products, ~2 s of CPU to
compile per shape), so the float32 programs are jitted once per shape with ``c`` traced and
shared between tests (``_project_fn`` / ``_clip_fn`` are cached).

Accuracy seen when this file was written (float32, default 12 steps, CPU, c in 0.5/1/3), for
the record (the asserted limits are 1e-3 relative, 1e-6 max(s) absolute, 1e-5 c for zeros):

- clip, singular values above c: <= 4e-5 relative of c (Gaussian, tall, wide, repeated,
  rank 5), <= 2.6e-4 (ill-conditioned); below c: <= 2.2e-4 relative (<= 3.4e-4
  ill-conditioned); below 1e-3 c: <= 5e-7 max(s); the rank-5 matrix's zero singular values
  <= 1.2e-6 c; distance to the exact clip <= 4.7e-4 relative (Frobenius);
- orthogonalize: non-zero singular values within 9e-7 of c (but see the low-rank test);
- the composed polar polynomial: within 6.1e-7 of 1 on [1e-5, 1], at most 0.9999994 on [0, 1].
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normjax as nj
from normjax import msign, orthogonalize, spectral_clip, spectral_hammer, spectral_soft_cap
from normjax._polar import polar_schedule

# (rows, batch, cols): the batch axis in the middle, so the view really transposes
STACK = nj.MatrixDims(in_axes=0, out_axes=2)
CS = (0.5, 1.0, 3.0)
ALL_DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["f32", "bf16", "f16"])


# ------------------------------------------------------------------------------------------
# References and shared programs
# ------------------------------------------------------------------------------------------


def with_spectrum(rng, m, n, s):
    """float64 ``U diag(s) V^T`` with Haar-random orthonormal ``U`` (m x k), ``V`` (n x k)."""
    s = np.asarray(s, np.float64)
    u, _ = np.linalg.qr(rng.standard_normal((m, s.size)))
    v, _ = np.linalg.qr(rng.standard_normal((n, s.size)))
    return (u * s) @ v.T


def f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def svals(x):
    return np.linalg.svd(f64(x), compute_uv=False)


class Exact:
    """The float64 SVD of a (float32) matrix, computed once: the reference for every c."""

    def __init__(self, w):
        self.u, self.s, self.vt = np.linalg.svd(f64(w), full_matrices=False)

    def clip(self, c):
        return (self.u * np.minimum(self.s, c)) @ self.vt


def np_clip(w, c):
    return Exact(w).clip(c)


def clip_errors(w, out, c):
    """Deviations of ``out`` from the exact clip of ``w`` (an :class:`Exact` or a matrix; both
    read as float64): singular values of the output against ``min(s, c)`` (both sorted), split
    by the rules of the brief: above c relative to c; in [1e-3 c, c] relative to s; below
    1e-3 c absolute over ``max(s)``; and the relative Frobenius distance to
    ``U diag(min(s, c)) V^T``."""
    ex = w if isinstance(w, Exact) else Exact(w)
    s = ex.s
    so = svals(out)
    above, mid, tiny = s > c, (s <= c) & (s >= 1e-3 * c), s < 1e-3 * c
    # sorting: min(s, c) is sorted like s, and so is the output's spectrum
    err = {
        "above": float(np.max(np.abs(so[above] - c)) / c) if above.any() else 0.0,
        "below": float(np.max(np.abs(so[mid] - s[mid]) / s[mid])) if mid.any() else 0.0,
        "tiny": float(np.max(np.abs(so[tiny] - s[tiny])) / s[0]) if tiny.any() else 0.0,
        "tail": so,
    }
    ref = ex.clip(c)
    err["fro"] = float(np.linalg.norm(f64(out) - ref) / np.linalg.norm(ref))
    return err


# The float32 iterations round differently with the host's SIMD width (the order of a dot's
# partial sums): on an avx512 host the worst cases here were 1e-6 (tiny) and 1e-3 (fro); on an
# avx2 host the same code gives 2.9e-6 (rank 5, c=3) and 1.37e-3 (ill-conditioned, c=0.5, whose
# singular values near c sit where the sign polynomial is steepest). The bounds allow 2x that.
TINY, FRO = 6e-6, 3e-3


def assert_clip(w, out, c, label):
    err = clip_errors(w, out, c)
    assert err["above"] <= 1e-3, f"{label}, c={c}: singular values above c land {err['above']:.3g} (relative) from c"
    assert err["below"] < 1e-3, f"{label}, c={c}: singular values below c moved by {err['below']:.3g} (relative)"
    assert err["tiny"] < TINY, f"{label}, c={c}: tiny singular values moved by {err['tiny']:.3g} max(s)"
    assert err["fro"] <= FRO, f"{label}, c={c}: ||out - exact clip||_F / ||exact clip||_F = {err['fro']:.3g}"
    return err


@functools.cache
def _project_fn(mode="clip", estimator="matmul", dims=None, certify=False):
    """``w, c -> project_spectral_norm({"w": w}, c, ...)["w"]``, jitted once (``c`` traced)."""
    return jax.jit(
        lambda w, c: nj.project_spectral_norm({"w": w}, c, mode=mode, estimator=estimator, dims=dims, certify=certify)["w"]
    )


@functools.cache
def _clip_fn():
    return jax.jit(lambda w, c: spectral_clip(w, c))


@functools.cache
def _tx(c, estimator, mode, certify=False, dims=None):
    tx = nj.spectral_norm(c, estimator=estimator, mode=mode, certify=certify, dims=dims)
    return tx, jax.jit(tx.update)


N = 300  # every square matrix: the rank-5 one is 300 x 300, the Gaussian one shares its program (300, not 256)


@functools.cache
def square_stack():
    """Five 300 x 300 matrices with their own spectra, as one ``(rows, batch, cols)`` leaf."""
    rng = np.random.default_rng(1)
    mats = {
        "gaussian": rng.standard_normal((N, N)) * (2.0 / np.sqrt(N)),  # s in (0, ~4]
        "ill_conditioned": with_spectrum(rng, N, N, np.geomspace(1e-3, 100.0, N)),  # c lies between
        "repeated": with_spectrum(rng, N, N, np.r_[np.full(N // 2, 5.0), np.full(N // 2, 0.5)]),
        "low_rank": with_spectrum(rng, N, N, [8.0, 4.0, 2.0, 0.7, 0.2]),  # rank 5
        "inside": with_spectrum(rng, N, N, np.geomspace(0.001, 0.1, N)),
    }
    # ||W W^T||_F^(1/2) <= c for every c tested: "surely inside", returned bit for bit
    ins = mats["inside"]
    mats["inside"] = ins * (0.45 / np.linalg.norm(ins @ ins.T) ** 0.5)
    names = list(mats)
    leaf = np.stack([mats[k] for k in names], axis=1).astype(np.float32)  # (300, 5, 300)
    return names, leaf


@functools.cache
def square_exact():
    names, leaf = square_stack()
    return [Exact(leaf[:, b, :]) for b in range(len(names))]


@functools.cache
def clipped_stack(c):
    _, leaf = square_stack()
    return np.asarray(_project_fn(dims=STACK)(jnp.asarray(leaf), c))


@functools.cache
def _tall():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((384, 128)) * (2.0 / np.sqrt(384))).astype(np.float32)
    return w, Exact(w)


@functools.cache
def _wide():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((128, 384)) * (2.0 / np.sqrt(384))).astype(np.float32)
    return w, Exact(w)


# ------------------------------------------------------------------------------------------
# 1. spectral clip by matmuls against the float64 SVD clip
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", CS)
def test_clip_stack_each_matrix_its_own_spectrum(c):
    """project_spectral_norm(estimator="matmul") on a stacked leaf (batch axis in the middle):
    Gaussian, ill-conditioned (s in [1e-3, 100]), repeated (5.0 and 0.5), rank 5 and a matrix
    surely inside the ball, each against its own float64 SVD clip."""
    names, leaf = square_stack()
    out = clipped_stack(c)
    assert out.dtype == np.float32 and out.shape == leaf.shape
    for b, name in enumerate(names):
        w, o = leaf[:, b, :], out[:, b, :]
        if name == "inside":
            np.testing.assert_array_equal(o, w, err_msg=f"c={c}: a matrix with ||WW^T||_F^1/2 <= c must come back bit for bit")
            continue
        err = assert_clip(square_exact()[b], o, c, name)
        if name == "low_rank":
            # the 295 zero singular values (float32 rounding of the input is ~1e-7) stay zero
            tail = err["tail"][5:]
            assert np.max(tail) < 1e-5 * c, f"c={c}: zero singular values of the rank-5 matrix became {np.max(tail):.3g}"


@pytest.mark.parametrize("c", CS)
def test_clip_tall_and_wide(c):
    """A single tall (384 x 128) matrix through spectral_clip and a wide one (128 x 384)
    through project_spectral_norm; both leaves, no batch axis."""
    w, ex = _tall()
    assert_clip(ex, _clip_fn()(jnp.asarray(w), c), c, "tall 384x128 (spectral_clip)")
    w, ex = _wide()
    assert_clip(ex, _project_fn()(jnp.asarray(w), c), c, "wide 128x384 (project_spectral_norm)")


@pytest.mark.parametrize("ratio", [1e3, 1e5])
def test_clip_far_outside_the_ball(ratio):
    """sigma_max = ratio * c (a 384 x 128 Gaussian matrix scaled up): the singular values above
    c must still land within 1e-3 of c, as the SVD clip's do; spectral_clip's docstring
    promises "about 1e-4 relative" with no limit on how far outside the matrix is. Reuses the
    tall program."""
    w, ex = _tall()
    w = (w.astype(np.float64) * (ratio / ex.s[0])).astype(np.float32)
    out = _clip_fn()(jnp.asarray(w), 1.0)
    # the documented limit (spectral_clip's docstring): the largest lands within 1e-3 of c
    # (second pass), the other clipped values in [c (1 - 2e-6 ratio), c (1 + 1e-3)]
    s_out = svals(out)
    s_in = svals(w)
    assert abs(s_out[0] - 1.0) <= 1e-3, (ratio, s_out[0])
    clipped = s_out[s_in > 1.0]
    assert np.all(clipped <= 1.0 + 1e-3) and np.all(clipped >= 1.0 - 2e-6 * ratio), (ratio, clipped.min(), clipped.max())


def test_clip_inside_the_ball_bit_for_bit():
    """Single matrices with ||W W^T||_F^1/2 <= c through spectral_clip and the projection (the
    transform's pass-through is checked on the attention block below)."""
    w = _tall()[0].astype(np.float64)
    w = (w * (0.99 / np.linalg.norm(w.T @ w) ** 0.5)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_clip_fn()(jnp.asarray(w), 1.0)), w)
    np.testing.assert_array_equal(np.asarray(_project_fn()(jnp.asarray(w.T), 1.0)), w.T)


# ------------------------------------------------------------------------------------------
# 2. orthogonalize
# ------------------------------------------------------------------------------------------


def _nonzero_rank(name):
    return 5 if name == "low_rank" else N


@functools.cache
def orthogonalized_stack():
    _, leaf = square_stack()
    return np.asarray(_project_fn(mode="orthogonalize", dims=STACK)(jnp.asarray(leaf), 2.0))


def test_orthogonalize_matmul_sets_every_nonzero_singular_value_to_c():
    """mode="orthogonalize" by matmuls (c = 2) on the five 300 x 300 matrices: every non-zero
    singular value within 1e-4 of c (down to the ill-conditioned one's 1e-5 sigma_max)."""
    c = 2.0
    names, _ = square_stack()
    out = orthogonalized_stack()
    for b, name in enumerate(names):
        k = _nonzero_rank(name)
        so = svals(out[:, b, :])
        dev = np.max(np.abs(so[:k] - c)) / c
        assert dev <= 1e-4, f"{name}: non-zero singular values {dev:.3g} (relative) from c after orthogonalize"
    # and it is c U V^T itself, not only its spectrum (well-conditioned matrices)
    for b, name in enumerate(names):
        if name in ("gaussian", "repeated", "inside"):
            ex = square_exact()[b]
            err = np.max(np.abs(out[:, b, :] - c * ex.u @ ex.vt))
            assert err <= 1e-4 * c, f"{name}: max |orthogonalize(W) - c U V^T| = {err:.3g}"


def test_orthogonalize_matmul_keeps_zero_singular_values_of_low_rank_matrices():
    """A rank-5 300 x 300 matrix: its 295 zero singular values stay (about) zero, as with the
    SVD path (which drops singular values below 300 eps sigma_max)."""
    names, _ = square_stack()
    out = orthogonalized_stack()[:, names.index("low_rank"), :]
    tail = svals(out)[5:]
    assert np.max(tail) <= 1e-3 * 2.0, (
        f"orthogonalize(rank-5 W, c=2) by matmuls: the zero singular values became up to {np.max(tail):.3g} "
        f"({np.sum(tail > 1e-3):d} of 295 above 1e-3); the SVD path gives ~3e-8 there (rank tolerance 300 eps sigma_max)"
    )


def test_orthogonalize_svd_matches_numpy_c_u_vt():
    """estimator="svd": c U V^T (numpy float64) on the 128 x 128 rank-5 and repeated-value
    matrices of the certified tests (the rank-5 one over its 5 non-zero singular values) and the
    tall Gaussian one. The ill-conditioned matrix is left out: float32 cannot resolve the
    singular vectors of its 1e-5-relative tail, and the SVD path's rank tolerance (n eps
    sigma_max) drops part of it by design."""
    c = 2.0
    hard = hard_stack()[:, 1:, :].astype(np.float32)  # rank 5, repeated
    tall = _tall()[0]
    fn = jax.jit(lambda p: nj.project_spectral_norm(p, c, mode="orthogonalize", estimator="svd", dims={"hard": STACK}))
    out = fn({"hard": jnp.asarray(hard), "tall": jnp.asarray(tall)})
    cases = [("rank 5", hard[:, 0, :], np.asarray(out["hard"])[:, 0, :], 5),
             ("repeated", hard[:, 1, :], np.asarray(out["hard"])[:, 1, :], 128),
             ("tall gaussian", tall, np.asarray(out["tall"]), 128)]
    for name, w, o, k in cases:
        ex = Exact(w)
        err = np.max(np.abs(o - c * ex.u[:, :k] @ ex.vt[:k]))
        assert err <= 1e-5 * c, f"{name}: max |orthogonalize_svd(W) - c U V^T| = {err:.3g}"


# ------------------------------------------------------------------------------------------
# 3. certify=True: inside the ball for sure, rounding included
# ------------------------------------------------------------------------------------------


@functools.cache
def hard_stack():
    """Ill-conditioned, rank-5 and repeated-singular-value 128 x 128 matrices, (rows, 3, cols)."""
    rng = np.random.default_rng(4)
    n = 128
    mats = [
        with_spectrum(rng, n, n, np.geomspace(1e-3, 100.0, n)),
        with_spectrum(rng, n, n, [8.0, 4.0, 2.0, 0.7, 0.2]),
        with_spectrum(rng, n, n, np.r_[np.full(n // 2, 5.0), np.full(n // 2, 0.5)]),
    ]
    return np.stack(mats, axis=1)  # float64


def _check_certified(out, dtype, c, label):
    assert out.dtype == dtype, f"{label}: dtype {out.dtype}, expected {dtype}"
    x = f64(out)
    for b in range(x.shape[1]):
        top = svals(x[:, b, :])[0]
        assert top <= c, f"{label}, matrix {b}: sigma_max {top!r} > c = {c} (no tolerance: certified)"
        if dtype == jnp.float32:
            assert top >= c * (1 - 1e-3), f"{label}, matrix {b}: sigma_max {top!r}: over-shrunk (c = {c})"


@ALL_DTYPES
def test_project_certify_matmul_inside_for_sure(dtype):
    c = 1.0
    w = jnp.asarray(hard_stack(), dtype)
    out = _project_fn(dims=STACK, certify=True)(w, c)
    _check_certified(out, dtype, c, f"project_spectral_norm(matmul, certify) {jnp.dtype(dtype).name}")
    if dtype == jnp.float32:  # and it is still the clip (the landing only trims rounding)
        for b in range(3):
            assert clip_errors(np.asarray(w)[:, b, :], np.asarray(out)[:, b, :], c)["fro"] <= 1e-3


@ALL_DTYPES
def test_transform_certify_matmul_clip_inside_for_sure(dtype):
    """A step from inside the ball (params: the hard matrices scaled to sigma 0.5 c) to the hard
    matrices themselves (sigma up to 100 c): after apply_updates, sigma_max <= c exactly."""
    c = 1.0
    hard = hard_stack()
    inside = hard * (0.5 * c / np.linalg.svd(np.moveaxis(hard, 1, 0), compute_uv=False)[:, 0])[None, :, None]
    params = {"w": jnp.asarray(inside, dtype)}
    updates = {"w": jnp.asarray(hard - inside, dtype)}
    tx, step = _tx(c, "matmul", "clip", True, STACK)
    u, state = step(updates, tx.init(params), params)
    out = optax.apply_updates(params, u)["w"]
    _check_certified(out, dtype, c, f"spectral_norm(matmul, clip, certify) {jnp.dtype(dtype).name}")
    assert np.all(np.asarray(state.sigma["w"]) > c)  # the step did leave the ball


# ------------------------------------------------------------------------------------------
# 4. no SVD / eigh / QR in the compiled matmul paths
# ------------------------------------------------------------------------------------------

# "qr" only where no letter precedes it: "sqrt"/"rsqrt" contain it
FORBIDDEN = re.compile(r"svd|gesdd|gesvd|eig|syev|heev|(?<![a-z])qr|geqrf|orgqr|householder|lapack|cusolver", re.IGNORECASE)


def custom_calls(text):
    """Custom-call targets of a lowered StableHLO module (``stablehlo.custom_call @name``,
    ``call_target_name = "name"``) or a compiled HLO module (``custom_call_target="name"``)."""
    names = re.findall(r"custom_call\s+@([\w.$-]+)", text)
    names += re.findall(r'call_target_name\s*=\s*"([^"]+)"', text)
    names += re.findall(r'custom_call_target\s*=\s*"([^"]+)"', text)
    return names


def decomposition_calls(text):
    # op names too, on word boundaries ("sqrt" contains "qr": substrings of the whole text lie)
    ops = re.findall(r"\b(?:stablehlo|chlo|mhlo)\.(\w+)", text) + re.findall(r"=\s*\S+\s+([a-z][\w-]*)\(", text)
    return sorted({n for n in custom_calls(text) + ops if FORBIDDEN.search(n)})


def _texts(lowered):
    return lowered.as_text(), lowered.compile().as_text()


def test_project_matmul_compiles_without_decompositions():
    w = jnp.asarray(_tall()[0])
    for text in _texts(_project_fn().lower(w, 1.0)):
        assert decomposition_calls(text) == []
    # control: the SVD path has its LAPACK custom call, so the check can fail
    small = jnp.ones((24, 16), jnp.float32)
    lowered = jax.jit(lambda w: nj.project_spectral_norm({"w": w}, 1.0, estimator="svd")["w"]).lower(small)
    for text in _texts(lowered):
        assert decomposition_calls(text), "control: the SVD path should show an SVD custom call"


@pytest.mark.parametrize(
    "estimator,mode", [("matmul", "clip"), ("matmul", "orthogonalize"), ("gram", "soft_cap"), ("power", "soft_cap"), ("power", "hammer")]
)
def test_transform_update_compiles_without_decompositions(estimator, mode):
    params = {"w": jnp.asarray(np.random.default_rng(5).standard_normal((64, 40)), jnp.float32)}
    tx, step = _tx(1.0, estimator, mode)
    lowered = step.lower(params, tx.init(params), params)
    for text in _texts(lowered):
        assert decomposition_calls(text) == [], f"{estimator}/{mode}"


# ------------------------------------------------------------------------------------------
# 5. precision: the library asks for HIGHEST itself
# ------------------------------------------------------------------------------------------


def _dot_precisions(text):
    return [re.search(r"precision = \[([^\]]*)\]", d).group(1) if "precision" in d else "none" for d in re.findall(r"stablehlo\.dot_general[^\n]*", text)]


def test_matmul_paths_are_highest_precision_under_bfloat16_default():
    w = jnp.asarray(_tall()[0])
    params = {"w": jnp.asarray(np.random.default_rng(5).standard_normal((64, 40)), jnp.float32)}
    with jax.default_matmul_precision("bfloat16"):
        # control: a product without explicit precision does lower with the default
        assert _dot_precisions(jax.jit(lambda x: x @ x.T).lower(w).as_text()) == ["DEFAULT, DEFAULT"]
        texts = {"project clip": _project_fn().lower(w, 1.0).as_text()}
        for est, mode in [("matmul", "clip"), ("gram", "soft_cap"), ("power", "hammer")]:
            tx, step = _tx(1.0, est, mode)
            texts[f"{est}/{mode}"] = step.lower(params, tx.init(params), params).as_text()
        for label, text in texts.items():
            precisions = _dot_precisions(text)
            assert precisions and set(precisions) == {"HIGHEST, HIGHEST"}, f"{label}: {sorted(set(precisions))}"
        # and the accuracy (on CPU both precisions are float32; on an accelerator this is the test)
        out = jax.jit(lambda w, c: spectral_clip(w, c))(w, 1.0)
    assert_clip(_tall()[1], out, 1.0, "tall under default_matmul_precision('bfloat16')")


# ------------------------------------------------------------------------------------------
# 6. dtypes
# ------------------------------------------------------------------------------------------


@ALL_DTYPES
def test_every_mode_keeps_the_leaf_dtype(dtype):
    """Every public entry point and every mode of the projection and the transform returns the
    leaf's dtype (bfloat16 and float16 stay narrow; float32 in, float32 out). Two polynomial
    steps (``num_iters=2``): the dtype does not depend on them and it keeps the programs small."""
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.standard_normal((24, 16)), dtype)
    p = {"w": w}
    v = jnp.asarray(rng.standard_normal(16) / 4, jnp.float32)
    it = 2
    calls = {
        "spectral_clip": lambda: spectral_clip(w, 1.0, num_iters=it),
        "orthogonalize": lambda: orthogonalize(w, 1.0, num_iters=it),
        "msign": lambda: msign(w, num_iters=it),
        "spectral_soft_cap": lambda: spectral_soft_cap(w, 1.0, 20.0),
        "spectral_hammer": lambda: spectral_hammer(w, 1.0, v),
    }
    # (certify=True: its dtype is checked by the certified tests above)
    for est, mode in [("matmul", "clip"), ("matmul", "orthogonalize"), ("svd", "orthogonalize"), ("svd", "soft_cap")]:
        calls[f"project {est}/{mode}"] = functools.partial(
            lambda e, m: nj.project_spectral_norm(p, 1.0, estimator=e, mode=m, num_iters=it)["w"], est, mode)
    # (soft_cap with "power" differs from "gram" only in the estimate: same landing path)
    for est, mode in [("matmul", "clip"), ("matmul", "orthogonalize"), ("svd", "orthogonalize"), ("gram", "soft_cap"),
                      ("power", "hammer")]:
        def step(e=est, m=mode):
            tx = nj.spectral_norm(1.0, estimator=e, mode=m, num_iters=it)
            u, _ = tx.update(p, tx.init(p), p)
            assert u["w"].dtype == dtype, f"update dtype {u['w'].dtype}"
            return optax.apply_updates(p, u)["w"]
        calls[f"spectral_norm {est}/{mode}"] = step
    failures = []
    for label, call in calls.items():
        try:
            out = jax.jit(call)()  # one small program per entry (cheaper than op-by-op)
        except Exception as e:  # collect them all: the report names every entry point
            failures.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        if out.dtype != dtype or not bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))):
            failures.append(f"{label}: dtype {out.dtype} (want {jnp.dtype(dtype).name}) or non-finite")
    assert not failures, f"{len(failures)} of {len(calls)} entry points fail on {jnp.dtype(dtype).name}:\n" + "\n".join(failures)


# ------------------------------------------------------------------------------------------
# 7. soft cap
# ------------------------------------------------------------------------------------------


@functools.cache
def _soft_cap_fn():
    return jax.jit(lambda w, c, m: spectral_soft_cap(w, c, m))


@pytest.mark.parametrize("top", [1.2, 1.45, 4.0])
def test_soft_cap_with_exact_bound_lands_on_c(top):
    c = 1.0
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 40))
    w = (w * (top * c / svals(w)[0])).astype(np.float32)
    m = svals(w)[0]  # the exact sigma_max of the float32 matrix
    so = svals(_soft_cap_fn()(jnp.asarray(w), c, m))
    assert so[0] <= c * (1 + 1e-5)
    assert abs(so[0] - c) <= 1e-4 * c


def _soft_cap_formula(s, c, m):
    k = min(1.0, 1.5 * c / m)  # the pre-scaling for m > 1.5 c
    x, mm = s * k, min(m, 1.5 * c)
    beta = max(0.0, 1 - c / mm)
    return x * (1 - beta * (x / mm) ** 2)


@pytest.mark.parametrize("m", [1.2, 1.5, 3.0])
def test_soft_cap_singular_values_follow_the_formula(m):
    """On a diagonal matrix the map is the scalar formula s (1 - beta (s/m)^2), beta = 1 - c/m
    (after scaling by 1.5c/m when m > 1.5c); off-diagonal entries stay exactly zero."""
    c = 1.0
    s = np.array([1.0, 0.9, 0.7, 0.3, 0.1, 1e-3]) * m
    out = np.asarray(spectral_soft_cap(jnp.asarray(np.diag(s), jnp.float32), c, m), np.float64)
    d = np.diag(out)
    want = _soft_cap_formula(np.asarray(np.float32(s), np.float64), c, m)
    np.testing.assert_allclose(d, want, rtol=1e-6)
    np.testing.assert_array_equal(out - np.diag(d), 0.0)
    assert d[0] == pytest.approx(c, rel=1e-6)


def test_soft_cap_bound_at_most_c_is_the_identity():
    w = jnp.asarray(np.random.default_rng(8).standard_normal((64, 40)) * 0.05, jnp.float32)
    for m in (1.0, 0.5):
        out = spectral_soft_cap(w, 1.0, m)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(w))


@pytest.mark.parametrize("certify", [False, True], ids=["plain", "certify"])
def test_soft_cap_transform_with_gram_stays_inside(certify):
    """20 SGD steps on random gradients, the constraint applied to each: after every step
    sigma_max <= c (1 + 1e-5) (float64 SVD), <= c with certify=True. Steps alternate between
    large (the m > 1.5c pre-scaling path) and small (m <= 1.5c)."""
    c = 1.0
    rng = np.random.default_rng(9)
    params = {"w": jnp.asarray(rng.standard_normal((64, 40)) * 0.05, jnp.float32)}
    tx, step = _tx(c, "gram", "soft_cap", certify)  # the plain program is the one test 4 compiles
    state = tx.init(params)
    tol = 0.0 if certify else 1e-5
    logged = []
    for i in range(20):
        lr = 0.1 if i % 2 else 0.01
        sgd = {"w": jnp.asarray(-lr * rng.standard_normal((64, 40)), jnp.float32)}  # an SGD step's update
        u, state = step(sgd, state, params)
        params = optax.apply_updates(params, u)
        top = svals(params["w"])[0]
        assert top <= c * (1 + tol), f"step {i}: sigma_max {top!r}"
        before = float(state.sigma["w"])
        logged.append(before)
        if before > c:  # the top lands near c when the step left the ball (gram's bound is tight here)
            assert top >= 0.98 * c, f"step {i}: sigma_max {top:.4f} after soft cap from {before:.4f}"
    assert max(logged) > 1.5 * c and any(c < b <= 1.5 * c for b in logged), logged  # both paths ran


# ------------------------------------------------------------------------------------------
# 8. hammer
# ------------------------------------------------------------------------------------------


def test_hammer_on_a_diagonal_matrix_is_exact():
    out = spectral_hammer(jnp.diag(jnp.array([3.0, 0.5])), 1.0, jnp.array([1.0, 0.0]))
    np.testing.assert_array_equal(np.asarray(out), np.array([[1.0, 0.0], [0.0, 0.5]], np.float32))


def test_hammer_transform_moves_only_the_isolated_top_singular_value():
    c = 1.0
    rng = np.random.default_rng(10)
    s = np.r_[3 * c, np.linspace(0.5 * c, 0.01 * c, 39)]
    params = {"w": jnp.asarray(with_spectrum(rng, 64, 40, s), jnp.float32)}
    s_in = svals(params["w"])
    tx, step = _tx(c, "power", "hammer")
    state = tx.init(params)
    zero = {"w": jnp.zeros((64, 40), jnp.float32)}
    logged = []
    for _ in range(3):
        u, state = step(zero, state, params)
        params = optax.apply_updates(params, u)
        logged.append(float(state.sigma["w"]))
        so = svals(params["w"])
        assert abs(so[0] - c) <= 1e-3 * c
        np.testing.assert_allclose(so[1:], s_in[1:], rtol=1e-5, atol=1e-6)
    assert logged[0] == pytest.approx(3 * c, rel=1e-4)  # the estimate before the first hammer
    assert logged[-1] == pytest.approx(c, rel=1e-3)


# ------------------------------------------------------------------------------------------
# 9. errors
# ------------------------------------------------------------------------------------------


def test_invalid_combinations_raise():
    p = {"w": jnp.ones((4, 4), jnp.float32)}
    with pytest.raises(ValueError, match="mode='rescale'"):
        nj.spectral_norm(1.0, estimator="matmul", mode="rescale")
    with pytest.raises(ValueError, match="mode='rescale'"):
        nj.project_spectral_norm(p, 1.0, estimator="matmul", mode="rescale")
    with pytest.raises(ValueError, match="estimator"):
        nj.spectral_norm(1.0, estimator="power", mode="clip")
    with pytest.raises(ValueError, match="hammer"):
        nj.spectral_norm(1.0, estimator="gram", mode="hammer")
    with pytest.raises(ValueError, match="hammer"):
        nj.project_spectral_norm(p, 1.0, mode="hammer")
    with pytest.raises(TypeError, match="certify"):
        nj.project_spectral_norm(p, 1.0, estimator="matmul", certify=1)
    with pytest.raises(TypeError, match="certify"):
        nj.spectral_norm(1.0, estimator="matmul", mode="clip", certify="yes")


def test_conv_leaf_with_matmul_estimator_names_the_leaf():
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4), jnp.float32)}}
    with pytest.raises(ValueError, match="conv/kernel"):
        nj.project_spectral_norm(params, 1.0, estimator="matmul", dims=nj.ConvSpec((8, 8)))
    tx = nj.spectral_norm(1.0, estimator="matmul", mode="clip", dims=nj.ConvSpec((8, 8)))
    with pytest.raises(ValueError, match="conv/kernel"):
        tx.init(params)


# ------------------------------------------------------------------------------------------
# 10. the polar schedule, evaluated in float64 numpy
# ------------------------------------------------------------------------------------------


def _compose(x):
    x = np.asarray(x, np.float64)
    for a, b, c in polar_schedule():
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("n", [2, 16, 256])
def test_polar_schedule_reaches_one(n):
    """msign_stack divides by ||X X^T||_F^(1/2) (once, before the steps); the composition of
    the 12 default quintics then takes every singular value to 1 within 1e-5 for spectra
    reaching 1e-5 sigma_max (geometric), and for a flat spectrum whose smallest value is
    1e-5 of the normaliser (the docstring's statement)."""
    assert len(polar_schedule()) == 12
    for s in (np.geomspace(1e-5, 1.0, n), np.r_[np.ones(n - 1), 1e-5 * n**0.25]):
        x = s / np.sum(s**4) ** 0.25
        assert np.max(np.abs(_compose(x) - 1)) <= 1e-5
    x = np.geomspace(1e-5, 1.0, 100001)
    assert np.max(np.abs(_compose(x) - 1)) <= 1e-6  # the module docstring's claim


def test_polar_composition_never_overshoots():
    x = np.unique(np.r_[np.linspace(0.0, 1.02, 200001), np.geomspace(1e-12, 1.02, 100001)])
    y = _compose(x)
    assert np.max(y) <= 1.03  # the safety margin covers rounding past 1 too (up to 1.02)
    assert np.min(y) >= 0.0  # no sign flip anywhere


def test_msign_float32_on_a_diagonal_matrix():
    s = np.geomspace(1e-5, 1.0, 64) * 3.0
    q = np.asarray(msign(jnp.asarray(np.diag(s), jnp.float32)), np.float64)
    np.testing.assert_allclose(np.diag(q), 1.0, atol=1e-5)
    np.testing.assert_array_equal(q - np.diag(np.diag(q)), 0.0)


# ------------------------------------------------------------------------------------------
# 11. views of an attention block
# ------------------------------------------------------------------------------------------


def _matrix(w, view):
    x = np.transpose(f64(w), tuple(view.in_axes) + tuple(view.out_axes))
    return x.reshape(int(np.prod([w.shape[a] for a in view.in_axes])), -1)


def test_nnx_attention_kernels_clipped_as_whole_matrices():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=32, decode=False, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(11).standard_normal((2, 6, 32)), jnp.float32)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    views = nj.infer_views(lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x), state, x)
    got = nj.by_path(views)
    assert got["query/kernel"] == nj.MatrixDims((0,), (1, 2))  # (d, heads, head_dim) as d x (heads*head_dim)
    assert got["out/kernel"] == nj.MatrixDims((0, 1), (2,))
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(12)
    # every kernel pushed far outside the ball, except value: surely inside (||WW^T||_F^1/2 < 1)
    target = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.5, jnp.float32), params)
    vk = target["value"]["kernel"]
    target["value"]["kernel"] = vk * (0.9 / float(np.linalg.norm(_matrix(vk, got["value/kernel"]) @ _matrix(vk, got["value/kernel"]).T) ** 0.5))
    updates = jax.tree.map(lambda t, p: t - p, target, params)
    tx = nj.spectral_norm(1.0, estimator="matmul", mode="clip", views=views)
    u, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    new = nj.by_path(optax.apply_updates(params, u))
    plain = nj.by_path(optax.apply_updates(params, updates))
    uu, upd = nj.by_path(u), nj.by_path(updates)
    for path, view in got.items():
        if isinstance(view, nj.NotMatrix):  # biases: their update passes through bit for bit
            np.testing.assert_array_equal(np.asarray(uu[path]), np.asarray(upd[path]), err_msg=path)
            continue
        m_in, m_out = _matrix(plain[path], view), _matrix(new[path], view)
        top = np.linalg.svd(m_out, compute_uv=False)[0]
        assert top <= 1 + 1e-3, f"{path}: sigma of the {m_out.shape} matrix = {top}"
        ref = np_clip(m_in, 1.0)
        assert np.linalg.norm(m_out - ref) <= 1e-3 * np.linalg.norm(ref), path
        if path == "value/kernel":
            np.testing.assert_array_equal(np.asarray(uu[path]), np.asarray(upd[path]), err_msg="inside: update unchanged")
        else:
            assert np.linalg.svd(m_in, compute_uv=False)[0] > 2.0  # it was really clipped
