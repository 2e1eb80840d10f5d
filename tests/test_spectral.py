"""Spectral norm: estimators against float64 SVD, projections, the transform's guarantees."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normjax as nj

RNG = np.random.default_rng(0)


def np_sigma(w, batch_axes=(), rows=None):
    """float64 reference: largest singular value of every batch index of a (batch, rows, cols) view."""
    w = np.asarray(w, np.float64)
    if rows is None:
        m = w.reshape(-1, w.shape[-1])[None]
        return np.linalg.svd(m, compute_uv=False)[:, 0].reshape(())
    return np.linalg.svd(w, compute_uv=False)[..., 0]


def ill_conditioned(n, m, cond=1e6, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(n, n)))
    v, _ = np.linalg.qr(rng.normal(size=(m, m)))
    k = min(n, m)
    return (u[:, :k] * np.logspace(0, -np.log10(cond), k)) @ v[:, :k].T * 3.0


MATRICES = {
    "gauss_64x32": RNG.normal(size=(64, 32)),
    "gauss_32x96": RNG.normal(size=(32, 96)) / 4,
    "ill_conditioned_48x48": ill_conditioned(48, 48),
    "rank_one": np.outer(RNG.normal(size=20), RNG.normal(size=30)),
}


@pytest.mark.parametrize("name", list(MATRICES))
def test_estimators_against_float64_svd(name):
    m = MATRICES[name]
    ref = np_sigma(m)
    w = jnp.asarray(m, jnp.float32)
    np.testing.assert_allclose(float(nj.sigma_svd(w)), ref, rtol=2e-6)
    u0 = nj.init_power_vector(jax.random.key(1), w)
    s, u = nj.sigma_power(w, u0, num_iters=200)
    assert float(s) <= ref * (1 + 1e-6)  # power iteration is a lower bound
    np.testing.assert_allclose(float(s), ref, rtol=1e-5)
    np.testing.assert_allclose(float(jnp.linalg.norm(u)), 1.0, rtol=1e-6)
    for t in range(1, 13):
        assert float(nj.sigma_gram(w, num_iters=t)) >= ref, f"Gram bound below sigma at t={t}"
    assert float(nj.sigma_gram(w, num_iters=8)) <= ref * 1.01


def test_gram_iterations_needed_for_one_percent():
    """A handful of iterations: on these matrices 1% is reached by t = 6 (8 is the default)."""
    cases = [RNG.normal(size=(256, 256)), RNG.normal(size=(128, 512)), ill_conditioned(200, 200, 1e8, 3)]
    for m in cases:
        ref = np_sigma(m)
        first = next(t for t in range(1, 20) if float(nj.sigma_gram(jnp.asarray(m, jnp.float32), num_iters=t)) <= 1.01 * ref)
        assert first <= 6, first


def test_highest_precision_survives_bf16_matmul_default():
    w = jnp.asarray(MATRICES["gauss_64x32"], jnp.float32)
    ref = np_sigma(w)
    u0 = nj.init_power_vector(jax.random.key(0), w)
    with jax.default_matmul_precision("bfloat16"):
        s, _ = jax.jit(lambda w, u: nj.sigma_power(w, u, num_iters=300))(w, u0)  # fori_loop
        g = jax.jit(lambda w: nj.sigma_gram(w, num_iters=14))(w)
    np.testing.assert_allclose(float(s), ref, rtol=1e-5)
    assert ref <= float(g) <= ref * (1 + 1e-4)


def test_batch_axes_stacked_and_heads():
    stacked = RNG.normal(size=(5, 16, 24))
    d = nj.MatrixDims(in_axes=-2, out_axes=-1)
    ref = np.linalg.svd(stacked, compute_uv=False)[:, 0]
    np.testing.assert_allclose(np.asarray(jax.jit(lambda w: nj.sigma_svd(w, dims=d))(jnp.asarray(stacked, jnp.float32))), ref, rtol=2e-6)
    # attention kernel (d_model, heads, head_dim): one (d_model, head_dim) matrix per head
    attn = RNG.normal(size=(32, 4, 8))
    dh = nj.MatrixDims(in_axes=0, out_axes=2)
    ref_h = np.array([np.linalg.svd(attn[:, h, :], compute_uv=False)[0] for h in range(4)])
    u0 = nj.init_power_vector(jax.random.key(0), attn, dh)
    assert u0.shape == (4, 8)

    @jax.jit  # one compile for Gram, power iteration and the projection
    def heads(w, u0):
        return (
            nj.sigma_gram(w, num_iters=10, dims=dh),
            nj.sigma_power(w, u0, num_iters=300, dims=dh)[0],
            nj.project_spectral_norm({"attn": w}, 1.0, dims=dh)["attn"],
        )

    got, s, out = heads(jnp.asarray(attn, jnp.float32), u0)
    assert got.shape == (4,)
    assert np.all(np.asarray(got) >= ref_h) and np.all(np.asarray(got) <= ref_h * 1.01)
    np.testing.assert_allclose(np.asarray(s), ref_h, rtol=1e-5)
    # projection per head
    s_out = np.array([np.linalg.svd(np.asarray(out[:, h, :], np.float64), compute_uv=False) for h in range(4)])
    s_in = np.array([np.linalg.svd(attn[:, h, :], compute_uv=False) for h in range(4)])
    np.testing.assert_allclose(s_out, np.minimum(s_in, 1.0), atol=1e-5)


@pytest.mark.parametrize("mode", ["clip", "rescale", "normalize"])
def test_project_modes_closed_form(mode):
    m = RNG.normal(size=(3, 3, 4, 6)) / 3  # a conv kernel as the reshaped (36, 6) matrix
    w = jnp.asarray(m, jnp.float32)
    c = 1.0
    out = np.asarray(jax.jit(lambda p: nj.project_spectral_norm(p, c, mode=mode))({"k": w})["k"], np.float64)
    mat = m.reshape(-1, 6)
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    want = {
        "clip": (u * np.minimum(s, c)) @ vt,
        "rescale": mat * min(1.0, c / s[0]),
        "normalize": mat * c / s[0],
    }[mode]
    np.testing.assert_allclose(out.reshape(-1, 6), want, atol=3e-6)
    assert np_sigma(out) <= c * (1 + 2e-6)


def test_clip_is_the_closest_feasible_point():
    m = RNG.normal(size=(8, 5))
    w = jnp.asarray(m, jnp.float32)
    c = 1.5
    p = np.asarray(jax.jit(lambda p: nj.project_spectral_norm(p, c))({"w": w})["w"], np.float64)
    d_clip = np.linalg.norm(p - m)
    # random feasible points, feasible points near the projection, and the rescaled matrix
    rng = np.random.default_rng(1)
    candidates = [m * c / np_sigma(m)]
    for _ in range(300):
        z = p + rng.normal(size=m.shape) * rng.choice([1e-3, 1e-2, 1e-1, 1.0])
        candidates.append(z * min(1.0, c / np_sigma(z)))
    for z in candidates:
        assert np_sigma(z) <= c * (1 + 1e-9)
        assert d_clip <= np.linalg.norm(z - m) + 1e-5


def test_inside_bit_for_bit_and_zero_matrix():
    w = jnp.asarray(RNG.normal(size=(6, 4)) * 0.05, jnp.float32)
    z = jnp.zeros((6, 4))
    project = lambda x, mode: nj.project_spectral_norm({"w": x}, 1.0, mode=mode)["w"]  # noqa: E731

    @jax.jit  # every projection and gradient below in one compile
    def run(w, z):
        inside = {mode: project(w, mode) for mode in ("clip", "rescale")}
        zero = {mode: (project(z, mode), jax.grad(lambda x: jnp.sum(project(x, mode) ** 2))(z)) for mode in ("clip", "rescale", "normalize")}
        return inside, zero, jax.grad(lambda x: nj.sigma_gram(x))(z)

    inside, zero, g_gram = run(w, z)
    for mode in ("clip", "rescale"):
        np.testing.assert_array_equal(np.asarray(inside[mode]), np.asarray(w))
    for mode in ("clip", "rescale", "normalize"):
        out, g = zero[mode]
        np.testing.assert_array_equal(np.asarray(out), 0.0)
        assert bool(jnp.all(jnp.isfinite(g)))
    for est in ("power", "gram", "svd"):
        tx = nj.spectral_norm(1.0, estimator=est)
        u, st = jax.jit(lambda z: tx.update({"w": z}, tx.init({"w": z}), {"w": z}))(z)
        np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
        assert float(nj.by_path(st.sigma)["w"]) == 0.0
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(st))
    assert bool(jnp.all(jnp.isfinite(g_gram)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_dtypes(dtype):
    w = jnp.asarray(RNG.normal(size=(16, 8)), dtype)
    ref = np_sigma(np.asarray(w, np.float64))
    for est in ("power", "gram", "svd"):
        tx = optax.chain(optax.sgd(0.0), nj.spectral_norm(1.0, estimator=est, num_iters=30 if est != "svd" else None))
        params = {"w": w}
        u, st = jax.jit(lambda p: tx.update({"w": jnp.zeros_like(p["w"])}, tx.init(p), p))(params)
        out = optax.apply_updates(params, u)["w"]
        assert out.dtype == dtype and u["w"].dtype == dtype
        np.testing.assert_allclose(float(nj.by_path(st[1].sigma)["w"]), ref, rtol=2e-2)
        assert np_sigma(np.asarray(out, np.float64)) <= 1.0 * (1 + 3e-2)
    out = jax.jit(lambda p: nj.project_spectral_norm(p, 1.0))({"w": w})["w"]
    assert out.dtype == dtype


def _train(tx, params, steps, lr_scale, seed=0):
    rng = np.random.default_rng(seed)
    state = jax.jit(tx.init)(params)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    sig, p = [], params
    for _ in range(steps):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * lr_scale, x.dtype), p)
        p, state = step(p, state, g)
        sig.append(np_sigma(p["w"]))
    return p, state, np.array(sig)


def test_gram_guarantees_bound_every_step():
    params = {"w": jnp.asarray(RNG.normal(size=(48, 32)), jnp.float32)}
    tx = optax.chain(optax.adam(0.05), nj.spectral_norm(1.0, estimator="gram"))
    with jax.numpy_dtype_promotion("standard"):  # optax.adam's int32 step count
        _, state, sig = _train(tx, params, 40, 1.0)
    assert np.all(sig <= 1.0), sig.max()
    assert sig.min() >= 0.98  # and it is tight: the weights sit at the bound, not far below


def test_svd_exact_and_power_tracks_bound():
    params = {"w": jnp.asarray(RNG.normal(size=(48, 32)), jnp.float32)}
    _, state, sig = _train(optax.chain(optax.sgd(1.0), nj.spectral_norm(1.0, estimator="svd")), params, 20, 1e-2)
    assert np.all(sig <= 1.0 + 2e-6) and np.isclose(sig.max(), 1.0, rtol=2e-6)
    # power, one iteration a step, warm-started: at a step that moves the weights by ~1% of
    # their norm the overshoot is small and shrinks as the vectors converge.
    # init converges the vectors on the initial weights, so even the first step is close.
    p, state, sig = _train(optax.chain(optax.sgd(1.0), nj.spectral_norm(1.0)), params, 40, 3e-3)
    assert np.all(sig <= 1.0 + 5e-3), sig.max()
    assert sig.max() > 0.999  # it does constrain: the weights reach the bound
    # the logged sigma is the estimate of the last step's params + updates, before projection
    w_before = np.asarray(p["w"], np.float64)
    assert 0.99 <= float(nj.by_path(state[1].sigma)["w"]) <= 1.1
    # a converged power estimate is a lower bound on the exact value
    s_conv, _ = nj.sigma_power(jnp.asarray(w_before, jnp.float32), nj.by_path(state[1].u)["w"], num_iters=200)
    assert float(s_conv) <= np_sigma(w_before) * (1 + 1e-6)


def test_state_types_stable_and_diagnostics():
    params = {
        "stack": {"kernel": jnp.asarray(RNG.normal(size=(3, 8, 6)), jnp.float32), "bias": jnp.zeros((3, 6))},
        "out": {"kernel": jnp.asarray(RNG.normal(size=(6, 2)), jnp.float32)},
    }
    dims = lambda path, x: nj.MatrixDims(-2, -1) if path.startswith("stack") else None
    tx = nj.spectral_norm(1.0, dims=dims, where="kernel")
    s0 = jax.jit(tx.init)(params)
    assert set(nj.by_path(s0.u)) == set(nj.by_path(s0.sigma)) == {"stack/kernel", "out/kernel"}
    assert nj.by_path(s0.sigma)["stack/kernel"].shape == (3,) and nj.by_path(s0.u)["stack/kernel"].shape == (3, 6)
    u, s1 = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), s0, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(s0, s1)
    np.testing.assert_array_equal(np.asarray(u["stack"]["bias"]), 0.0)
    for est in ("gram", "svd"):
        tx = nj.spectral_norm(1.0, estimator=est, dims=dims, where="kernel")
        s0 = tx.init(params)
        assert nj.by_path(s0.u) == {}
        chex.assert_trees_all_equal_shapes_and_dtypes(s0, jax.jit(tx.update)(params, s0, params)[1])


def test_transform_contract_wrappers():
    params = {"w": jnp.asarray(RNG.normal(size=(12, 8)), jnp.float32), "b": jnp.ones(8)}
    grads = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match="params"):
        nj.spectral_norm(1.0).update(grads, nj.spectral_norm(1.0).init(params))
    # inject_hyperparams with max_value as a hyperparameter
    tx = optax.inject_hyperparams(nj.spectral_norm)(max_value=2.0, estimator="svd")
    st = tx.init(params)
    st.hyperparams["max_value"] = jnp.asarray(0.5)
    u, st = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), st, params)
    np.testing.assert_allclose(np_sigma(optax.apply_updates(params, u)["w"]), 0.5, rtol=1e-5)
    # masked
    tx = optax.masked(nj.spectral_norm(0.5, estimator="svd"), {"w": True, "b": False})
    u, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(np_sigma(params["w"] + u["w"]), 0.5, rtol=1e-5)
    # MultiSteps
    with jax.numpy_dtype_promotion("standard"):
        tx = optax.MultiSteps(optax.chain(optax.sgd(0.1), nj.spectral_norm(0.5, estimator="gram")), 2)
        st, p = tx.init(params), params
        update = jax.jit(tx.update)
        for _ in range(2):
            u, st = update(grads, st, p)
            p = optax.apply_updates(p, u)
    assert np_sigma(p["w"]) <= 0.5


def test_flax_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    opt = nnx.Optimizer(model, optax.chain(optax.sgd(1.0), nj.spectral_norm(0.7, estimator="gram")), wrt=nnx.Param)
    x = jnp.asarray(RNG.normal(size=(32, 8)), jnp.float32)

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - 5.0) ** 2))(model)
        opt.update(model, grads)

    for _ in range(3):
        step(model, opt)
    for layer in (model.layers[0], model.layers[2]):
        assert np_sigma(layer.kernel[...]) <= 0.7
    sigmas = nj.by_path(optax.tree_utils.tree_get(opt.opt_state, "sigma"))
    assert set(sigmas) == {"layers/0/kernel", "layers/2/kernel"}


def test_lipschitz_bound_certifies_mlp():
    ks = [RNG.normal(size=(10, 20)) / 3, RNG.normal(size=(20, 20)) / 4, RNG.normal(size=(20, 3)) / 4]
    params = {f"l{i}": {"kernel": jnp.asarray(k, jnp.float32), "bias": jnp.zeros(k.shape[1])} for i, k in enumerate(ks)}
    exact = np.prod([np_sigma(k) for k in ks])
    bound, bound_svd = jax.jit(lambda p: (nj.lipschitz_bound(p), nj.lipschitz_bound(p, estimator="svd")))(params)
    bound = float(bound)
    assert exact <= bound <= exact * 1.03
    np.testing.assert_allclose(float(bound_svd), exact, rtol=1e-5)

    def f(x):
        h = x
        for i, k in enumerate(ks):
            h = h @ params[f"l{i}"]["kernel"]
            h = jax.nn.relu(h) if i < 2 else h
        return h

    xs = jnp.asarray(RNG.normal(size=(200, 10)), jnp.float32)
    jac = jax.jit(jax.vmap(jax.jacfwd(f)))(xs)  # (200, 3, 10)
    assert np.max(np.linalg.norm(np.asarray(jac, np.float64), ord=2, axis=(1, 2))) <= bound


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_value=0.0), "max_value"),
        (dict(max_value=1.0, mode="frobenius"), "unknown mode"),
        (dict(max_value=1.0, estimator="lanczos"), "unknown estimator"),
        (dict(max_value=1.0, num_iters=0), "num_iters"),
        (dict(max_value=1.0, mode="clip"), "changes every singular value"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nj.spectral_norm(**kwargs)


@pytest.mark.parametrize(
    "dims, match",
    [
        (nj.MatrixDims(in_axes=(0, 1), out_axes=1), "overlaps"),
        (nj.MatrixDims(in_axes=(), out_axes=2), "no in_axes"),
        (nj.MatrixDims(in_axes=0, out_axes=3), "out of range for leaf 'stack/kernel'"),
    ],
)
def test_bad_matrix_dims(dims, match):
    params = {"stack": {"kernel": jnp.ones((2, 3, 4))}}
    with pytest.raises(ValueError, match=match):
        nj.spectral_norm(1.0, dims=dims).init(params)
    with pytest.raises(ValueError, match=match):
        nj.project_spectral_norm(params, 1.0, dims=dims)


def test_matrix_dims_without_out_axes_is_one_vector_per_batch_index():
    """``out_axes=()``: each batch index is one vector (a single output unit): sigma is its norm."""
    w = jnp.asarray(RNG.normal(size=(2, 3, 4)), jnp.float32)
    dims = nj.MatrixDims(in_axes=(1, 2), out_axes=())
    sig, out = jax.jit(lambda p: (nj.spectral_norms(p, dims=dims), nj.project_spectral_norm(p, 1.0, mode="rescale", dims=dims)))({"w": w})
    sig, out = nj.by_path(sig)["w"], out["w"]
    np.testing.assert_allclose(np.asarray(sig), np.linalg.norm(np.asarray(w, np.float64).reshape(2, -1), axis=1), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out, np.float64).reshape(2, -1), axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
def test_power_of_a_sum_matches_power_of_the_rounded_sum(scale):
    """The transform's power estimate of ``p + u`` takes its products on ``p`` and ``u`` apart on
    CPU (the sum is never written). It must agree with :func:`sigma_power` on the rounded sum to
    within float32 rounding, one sigma per stacked layer, also where the estimate leaves
    ``[2**-60, 2**60]`` (the rescaled branch), and converge to float64 SVD."""
    from normjax._norms import sigma_power_of_sum

    rng = np.random.default_rng(5)
    p = jnp.asarray(rng.normal(size=(3, 40, 24)) * scale, jnp.float32)
    u = jnp.asarray(rng.normal(size=(3, 40, 24)) * scale * 0.1, jnp.float32)
    d = nj.MatrixDims(in_axes=-2, out_axes=-1)
    v0 = nj.init_power_vector(jax.random.key(2), p, d)
    for iters in (1, 300):
        got, vec = jax.jit(lambda p, u, v: sigma_power_of_sum(p, u, v, num_iters=iters, dims=d))(p, u, v0)
        ref, ref_vec = nj.sigma_power(p + u, v0, num_iters=iters, dims=d)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-6)
        np.testing.assert_allclose(np.asarray(vec), np.asarray(ref_vec), rtol=1e-4, atol=1e-5)
    exact = np_sigma(np.asarray(p, np.float64) + np.asarray(u, np.float64), rows=True)
    np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="other backends keep the product on the rounded sum")
@pytest.mark.usefixtures("full_optimization")
def test_cpu_power_step_does_not_write_the_sum(monkeypatch):
    """On CPU the power products of ``p + u`` are taken on ``p`` and ``u`` apart, so the compiled
    Adam + spectral_norm step holds fewer full-size temporaries than the same step with the
    products on the written sum (4 leaves: 6 against 9 leaf sizes; on the 12-block GPT-2 tree
    359 against 682 MB, and 1.5x against 2.2x the clip_by_global_norm step: RESULTS.md)."""
    import normjax._norms as norms
    import normjax._views as views

    rng = np.random.default_rng(0)
    params = {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=(256, 512)) * 0.01, jnp.float32)} for i in range(4)}
    tx = optax.chain(optax.adam(1e-3), nj.spectral_norm(10.0))

    def temp():
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes its int32 count with floats
            compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
        return compiled.memory_analysis().temp_size_in_bytes / (256 * 512 * 4)

    split = temp()
    monkeypatch.setattr(
        views, "sigma_power_of_sum",
        lambda p, u, vec, num_iters=1, dims=None: norms.sigma_power(p + u.astype(p.dtype), vec, num_iters=num_iters, dims=dims),
    )
    written = temp()
    assert split <= written - 2, (split, written)
