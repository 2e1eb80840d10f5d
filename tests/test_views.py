"""Constraints driven by views (hand-written here; inferred ones in test_infer.py), the state
shaped like params, and the manual path's refusals.

References are independent of the library: NumPy float64 norms of the slices a layout's
definition says form one unit, float64 SVDs, and Jacobians of the layer as its framework runs it.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normjax as nj

RNG = np.random.default_rng(7)


def f32(*shape, scale=1.0):
    return jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32)


def np_norms(w, axes):
    x = np.asarray(w, np.float64)
    return np.sqrt(np.sum(x * x, axis=tuple(axes)))


def np_sigmas(w, batch, rows, cols):
    x = np.transpose(np.asarray(w, np.float64), batch + rows + cols)
    b = int(np.prod([w.shape[a] for a in batch]))
    r = int(np.prod([w.shape[a] for a in rows]))
    m = x.reshape(b, r, -1)
    return np.linalg.svd(m, compute_uv=False)[:, 0].reshape([w.shape[a] for a in batch])


# One pytree with every layout the issue names, and its hand-written views.
def _zoo():
    params = {
        "eqx_linear": {"weight": f32(6, 5, scale=2.0), "bias": f32(6)},  # (out, in)
        "flax_dense": {"kernel": f32(5, 6, scale=2.0), "bias": f32(6)},  # (in, out)
        "attn_q": {"kernel": f32(8, 2, 3, scale=2.0), "bias": f32(2, 3)},  # (d, heads, head_dim)
        "attn_out": {"kernel": f32(2, 3, 8, scale=2.0), "bias": f32(8)},  # (heads, head_dim, d)
        "stack": {"kernel": f32(4, 5, 6, scale=2.0), "bias": f32(4, 6)},  # (L, in, out) for scan
        "eqx_conv": {"weight": f32(4, 2, 3, 3, scale=2.0), "bias": f32(4, 1, 1)},  # (out, in, kh, kw)
        "embed": {"embedding": f32(10, 4, scale=2.0)},  # rows are units
        "norm": {"scale": f32(6)},
    }
    views = {
        "eqx_linear": {"weight": nj.MatrixDims(1, 0), "bias": nj.NotMatrix("bias")},
        "flax_dense": {"kernel": nj.MatrixDims(0, 1), "bias": nj.NotMatrix("bias")},
        "attn_q": {"kernel": nj.MatrixDims(0, (1, 2)), "bias": nj.NotMatrix("bias")},
        "attn_out": {"kernel": nj.MatrixDims((0, 1), 2), "bias": nj.NotMatrix("bias")},
        "stack": {"kernel": nj.MatrixDims(1, 2), "bias": nj.NotMatrix("bias")},
        "eqx_conv": {"weight": nj.ConvSpec((6, 6), kernel_layout="OIHW"), "bias": nj.NotMatrix("bias")},
        "embed": {"embedding": nj.Embedding(0)},
        "norm": {"scale": nj.NotMatrix("scale")},
    }
    return params, views


# For each constrained leaf: the axes of one unit's fan-in, and (batch, rows, cols) of its matrix.
UNITS = {
    "eqx_linear/weight": (1,),
    "flax_dense/kernel": (0,),
    "attn_q/kernel": (0,),
    "attn_out/kernel": (0, 1),
    "stack/kernel": (1,),
    "eqx_conv/weight": (1, 2, 3),
    "embed/embedding": (1,),
}
MATRICES = {
    "eqx_linear/weight": ((), (1,), (0,)),
    "flax_dense/kernel": ((), (0,), (1,)),
    "attn_q/kernel": ((), (0,), (1, 2)),
    "attn_out/kernel": ((), (0, 1), (2,)),
    "stack/kernel": ((0,), (1,), (2,)),
    "embed/embedding": ((), (1,), (0,)),
}


@jax.jit
def _torch_conv_svd(weight):
    """The exact operator norm of an (out, in, kh, kw) kernel on 6x6 inputs: one compile."""
    return nj.conv_spectral_norm(weight, (6, 6), kernel_layout="torch", method="svd")


def test_max_norm_with_views_bounds_every_layouts_fan_in():
    params, views = _zoo()
    c = 1.0
    out = jax.jit(lambda p: nj.project_max_norm(p, c, views=views))(params)
    tx = optax.chain(optax.sgd(1.0), nj.max_norm(c, views=views))
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, state = jax.jit(tx.update)(zeros, tx.init(params), params)
    stepped = optax.apply_updates(params, u)
    got, got_t = nj.by_path(out), nj.by_path(stepped)
    for path, axes in UNITS.items():
        before, after = np_norms(nj.by_path(params)[path], axes), np_norms(got[path], axes)
        np.testing.assert_allclose(after, np.minimum(before, c), rtol=2e-6)
        np.testing.assert_allclose(np_norms(got_t[path], axes), np.minimum(before, c), rtol=2e-6)
        # the logs: largest before and after, fraction clipped
        st = state[1]
        np.testing.assert_allclose(float(nj.by_path(st.largest_norm)[path]), before.max(), rtol=1e-5)
        np.testing.assert_allclose(float(nj.by_path(st.largest_norm_after)[path]), min(before.max(), c), rtol=1e-5)
        np.testing.assert_allclose(float(nj.by_path(st.clipped_fraction)[path]), np.mean(before > c), rtol=1e-6)
    # biases and scales: never touched, not even logged
    for path in ("eqx_linear/bias", "attn_q/bias", "stack/bias", "eqx_conv/bias", "norm/scale"):
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(nj.by_path(params)[path]))
        np.testing.assert_array_equal(np.asarray(nj.by_path(u)[path]), 0.0)
        assert path not in nj.by_path(state[1].largest_norm)


def test_shape_default_gets_these_layouts_wrong():
    """The reason views exist: without them, the default axis (all but the last) bounds the wrong
    slices of an (out, in) weight, an (out, in, kh, kw) kernel and a stacked (L, in, out) kernel."""
    params, _ = _zoo()
    out = jax.jit(lambda p: nj.project_max_norm(p, 1.0, where="(eqx_linear|eqx_conv)/weight|stack/kernel"))(params)
    w = nj.by_path(out)
    assert np_norms(w["eqx_linear/weight"], (1,)).max() > 1.01  # fan-in norms left above c
    assert np_norms(w["eqx_conv/weight"], (1, 2, 3)).max() > 1.01
    per_layer = np_norms(w["stack/kernel"], (1,))
    np.testing.assert_allclose(np_norms(w["stack/kernel"], (0, 1)).max(), 1.0, rtol=1e-5)  # one ball for all layers
    assert per_layer.max() < 0.9  # ... so every layer's units are shrunk far below c


@pytest.mark.parametrize("estimator", ["svd", "gram", "power"])
def test_spectral_norm_with_views_one_sigma_per_true_matrix(estimator):
    params, views = _zoo()
    c = 1.0
    tx = optax.chain(optax.sgd(1.0), nj.spectral_norm(c, estimator=estimator, num_iters=None if estimator != "power" else 4, views=views))
    state = jax.jit(tx.init)(params)  # power: 30 iterations from random vectors, one compile
    zeros = jax.tree.map(jnp.zeros_like, params)
    step = jax.jit(tx.update)
    p = params
    for _ in range(3 if estimator == "power" else 1):
        u, state = step(zeros, state, p)
        p = optax.apply_updates(p, u)
    got = nj.by_path(p)
    tol = {"svd": 1e-5, "gram": 1e-5, "power": 2e-2}[estimator]
    for path, (b, r, cc) in MATRICES.items():
        s = np_sigmas(got[path], b, r, cc)
        assert np.all(s <= c * (1 + tol)), (path, s)
        assert np.all(s >= 0.5 * c), path  # each matrix scaled once, by its own sigma
    # the Equinox conv: the operator norm of the convolution (exact reference from its Jacobian)
    conv = _torch_conv_svd(got["eqx_conv/weight"])
    assert float(conv) <= c * (1 + tol)
    logged = nj.by_path(state[1].sigma)
    assert logged["stack/kernel"].shape == (4,) and logged["attn_q/kernel"].shape == ()
    assert set(logged) == set(MATRICES) | {"eqx_conv/weight"}
    after = nj.by_path(state[1].sigma_after)
    assert all(np.all(np.asarray(after[k]) <= c * (1 + 1e-6)) for k in after)


def test_lipschitz_bound_with_views_skips_biases_and_embeddings():
    params, views = _zoo()
    del params["embed"], views["embed"]
    bound = float(jax.jit(lambda p: nj.lipschitz_bound(p, estimator="svd", views=views))(params))
    expect = 1.0
    for path, (b, r, cc) in MATRICES.items():
        if path.startswith("embed"):
            continue
        expect *= np.prod(np_sigmas(nj.by_path(params)[path], b, r, cc))
    expect *= float(_torch_conv_svd(params["eqx_conv"]["weight"]))
    np.testing.assert_allclose(bound, expect, rtol=1e-5)
    assert bound >= expect * (1 - 1e-7)


def test_equinox_linear_units_are_the_jacobian_rows():
    """max-norm with MatrixDims(1, 0) on an eqx.nn.Linear bounds exactly the rows of the Jacobian
    of the layer's pre-activation with respect to its input (one row per output unit)."""
    eqx = pytest.importorskip("equinox")
    layer = eqx.nn.Linear(5, 7, key=jax.random.key(0))
    params, static = eqx.partition(layer, eqx.is_array)
    params = eqx.tree_at(lambda m: m.weight, params, params.weight * 3)
    views = jax.tree.map(lambda _: nj.NotMatrix("bias"), params)
    views = eqx.tree_at(lambda m: m.weight, views, nj.MatrixDims(1, 0))
    new = jax.jit(lambda p: nj.project_max_norm(p, 1.0, views=views))(params)
    with jax.enable_x64(True):
        layer64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)) if eqx.is_array(x) else x, eqx.combine(new, static))
        jac = np.asarray(eqx.filter_jit(lambda m, z: jax.jacobian(m)(z))(layer64, jnp.zeros(5, jnp.float64)))  # (7, 5): row i = unit i's fan-in
    np.testing.assert_allclose(np.linalg.norm(jac, axis=1), np.minimum(np_norms(params.weight, (1,)), 1.0), rtol=2e-6)
    np.testing.assert_array_equal(np.asarray(new.bias), np.asarray(params.bias))


def test_views_narrowed_by_where_and_exclusive_with_manual_axes():
    params, views = _zoo()
    out = nj.by_path(nj.project_max_norm(params, 1.0, views=views, where="attn_q|attn_out"))
    for path in UNITS:
        if path.startswith("attn"):
            assert np_norms(out[path], UNITS[path]).max() <= 1 + 1e-6
        else:
            assert out[path] is nj.by_path(params)[path]
    with pytest.raises(TypeError, match="either views= or axis="):
        nj.max_norm(1.0, views=views, axis=0).init(params)
    with pytest.raises(TypeError, match="either views= or dims="):
        nj.project_spectral_norm(params, 1.0, views=views, dims=nj.MatrixDims(0, 1))
    with pytest.raises(ValueError, match="views= must be shaped like params"):
        nj.project_max_norm(params, 1.0, views={"eqx_linear": views["eqx_linear"]})
    with pytest.raises(ValueError, match="where='attn_k' matches no leaf"):
        nj.project_max_norm(params, 1.0, views=views, where="attn_k")
    # where selects only leaves whose view is not a matrix: nothing to constrain is an error
    with pytest.raises(ValueError, match="select.*no leaf to constrain"):
        nj.max_norm(1.0, views=views, where="norm").init(params)


def test_state_shaped_like_params_no_collisions():
    """Two leaves whose paths print the same ("a/w") keep separate state entries, and
    lipschitz_bound counts both (it used to drop one: 7.35 instead of 98.59)."""
    w1 = 3.0 * jnp.eye(3)
    w2 = jnp.diag(jnp.array([5.0, 1.0, 1.0]))
    params = {"a/w": w1, "a": {"w": w2}}
    assert float(jax.jit(lambda p: nj.lipschitz_bound(p, estimator="svd"))(params)) == pytest.approx(15.0, rel=1e-5)
    tx = nj.spectral_norm(1.0, estimator="power")
    state = jax.jit(tx.init)(params)
    chex.assert_trees_all_equal_structs(state.sigma, jax.tree.map(lambda x: jnp.zeros(()), params))
    u, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    assert float(state.sigma["a/w"]) == pytest.approx(3.0, rel=1e-4)
    assert float(state.sigma["a"]["w"]) == pytest.approx(5.0, rel=1e-4)
    with pytest.raises(ValueError, match="two leaves are both written 'a/w'"):
        nj.by_path(state.sigma)


def test_state_keeps_structure_with_none_updates_in_a_scan():
    """A frozen leaf (update None) keeps its old state entry, so the state is a valid lax.scan carry."""
    params = {"frozen": f32(4, 4, scale=3.0), "live": f32(4, 4, scale=3.0), "bias": f32(4)}
    for tx in (nj.max_norm(1.0), nj.spectral_norm(1.0), nj.spectral_norm(1.0, estimator="gram")):
        state0 = jax.jit(tx.init)(params)

        def body(carry, g):
            p, s = carry
            upd = {"frozen": None, "live": g, "bias": jnp.zeros(4)}
            u, s = tx.update(upd, s, p)
            p = {"frozen": p["frozen"], "live": p["live"] + u["live"], "bias": p["bias"] + u["bias"]}
            return (p, s), None

        (p, s), _ = jax.lax.scan(body, (params, state0), jnp.stack([f32(4, 4) for _ in range(3)]))
        chex.assert_trees_all_equal_structs(s, state0)
        chex.assert_trees_all_equal_shapes_and_dtypes(s, state0)
        first = jax.tree.leaves(state0)
        # the frozen leaf's entries never changed (still the init values)
        for field0, field in zip(state0, s):
            if isinstance(field0, dict) and isinstance(field0.get("frozen"), jax.Array):
                np.testing.assert_array_equal(np.asarray(field["frozen"]), np.asarray(field0["frozen"]))
        assert first  # the state has leaves
        assert isinstance(s[0]["bias"], optax.MaskedNode)  # unselected: an empty placeholder


def test_default_selection_skips_bias_b_scale_names():
    params = {
        "scan": {"kernel": f32(3, 4, 4, scale=3.0), "bias": f32(3, 4, scale=9.0)},  # stacked bias: 2-D
        "mha": {"b": f32(2, 3, scale=9.0), "w": f32(4, 6, scale=3.0)},
        "ln": {"scale": f32(3, 4, scale=9.0)},
    }
    out = jax.jit(nj.project_max_norm, static_argnums=1)(params, 1.0)
    for path in ("scan/bias", "mha/b", "ln/scale"):
        np.testing.assert_array_equal(np.asarray(nj.by_path(out)[path]), np.asarray(nj.by_path(params)[path]))
    assert np_norms(out["mha"]["w"], (0,)).max() <= 1 + 1e-6
    # explicitly selecting one by where= still works (the user asked for it)
    out = jax.jit(lambda p: nj.project_max_norm(p, 1.0, where="ln/scale"))(params)
    assert np_norms(out["ln"]["scale"], (0,)).max() <= 1 + 1e-6
    # lipschitz_bound: a 3-D kernel left to the default view is refused, naming it
    with pytest.raises(ValueError, match="'scan/kernel' of shape \\(3, 4, 4\\) has no convolution or explicit matrix view"):
        nj.lipschitz_bound(params)
    with pytest.raises(ValueError, match="no matrix or convolution selected"):
        nj.lipschitz_bound({"e": f32(5, 3)}, views={"e": nj.Embedding(0)})


# The bound is a traced argument, so both bad values below run the same compiled programs.
TRACED_BOUND_TXS = {
    "max_norm": optax.inject_hyperparams(nj.max_norm)(max_value=1.0),
    "min_max_norm": optax.inject_hyperparams(nj.min_max_norm)(min_value=0.5, max_value=1.0),
    "spectral_rescale": optax.inject_hyperparams(nj.spectral_norm)(max_value=1.0, estimator="svd"),
    "spectral_clip": optax.inject_hyperparams(nj.spectral_norm)(max_value=1.0, estimator="svd", mode="clip"),
}
TRACED_BOUND_UPDATES = {name: jax.jit(tx.update) for name, tx in TRACED_BOUND_TXS.items()}
TRACED_BOUND_PROJECTIONS = [
    jax.jit(lambda p, c: nj.project_max_norm(p, c)),
    jax.jit(lambda p, c: nj.project_spectral_norm(p, c, mode="rescale")),
    jax.jit(lambda p, c: nj.project_spectral_norm(p, c, mode="clip")),
]


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_traced_bound_without_a_projection_poisons_instead_of_flipping_signs(bad):
    """Under jit or inject_hyperparams a bound is only known at run time: a negative or NaN one
    has no projection, so the constrained leaves turn NaN (never a sign flip, never a no-op)."""
    params = {"w": f32(4, 3, scale=2.0), "bias": f32(3)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for name, tx in TRACED_BOUND_TXS.items():
        state = tx.init(params)
        state.hyperparams["max_value"] = jnp.asarray(bad)
        u, state = TRACED_BOUND_UPDATES[name](zeros, state, params)
        new = optax.apply_updates(params, u)
        assert np.all(np.isnan(np.asarray(new["w"]))), name
        np.testing.assert_array_equal(np.asarray(new["bias"]), np.asarray(params["bias"]))
    for proj in TRACED_BOUND_PROJECTIONS:
        out = proj(params, jnp.asarray(bad))
        assert np.all(np.isnan(np.asarray(out["w"])))


def test_traced_zero_and_infinite_bounds_are_their_sets():
    """A schedule that reaches 0 projects onto {0}; +inf constrains nothing (bit for bit)."""
    params = {"w": f32(4, 3, scale=2.0)}
    zero = jax.jit(lambda c: nj.project_max_norm(params, c))(jnp.asarray(0.0))
    np.testing.assert_array_equal(np.asarray(zero["w"]), 0.0)
    zero = jax.jit(lambda c: nj.project_spectral_norm(params, c, mode="rescale"))(jnp.asarray(0.0))
    np.testing.assert_array_equal(np.asarray(zero["w"]), 0.0)
    same = jax.jit(lambda c: nj.project_max_norm(params, c))(jnp.asarray(np.inf))
    np.testing.assert_array_equal(np.asarray(same["w"]), np.asarray(params["w"]))
    with pytest.raises(ValueError, match="max_value must be > 0"):
        nj.max_norm(0.0)  # a concrete 0 is a mistake, refused at construction
    with pytest.raises(TypeError, match="max_value must be a real number, got True"):
        nj.max_norm(True)
    with pytest.raises(TypeError, match="axis= must be an int or a sequence of ints, got 1.0 for leaf 'w'"):
        nj.project_max_norm(params, 1.0, axis=1.0)


def test_lipschitz_bound_product_rounds_up():
    """The product of many float32 factors, rounded to nearest at every multiplication, can fall
    below the exact product of those factors; the bound is rounded up so it never does."""
    rng = np.random.default_rng(3)
    below = 0
    bound_of = jax.jit(lambda p: nj.lipschitz_bound(p, estimator="svd"))  # one compile for all trials
    for trial in range(20):
        sig = rng.uniform(0.5, 2.0, size=40).astype(np.float32)
        params = {f"l{i}": {"kernel": jnp.asarray(np.diag([s, s / 2]).astype(np.float32))} for i, s in enumerate(sig)}
        exact = float(np.prod(sig.astype(np.float64)))  # the factors are exact: sigma of diag(s, s/2) is s
        bound = float(bound_of(params))
        assert bound >= exact, (trial, bound, exact)
        assert bound <= exact * (1 + 45 * 2.0**-23)
        below += float(np.prod(sig)) < exact  # what a plain float32 product gives
    assert below > 0  # the cases above really do round down without the margin
