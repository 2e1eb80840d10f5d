"""The optax transform contract: chains, wrappers, Flax NNX, state stability, tracing, selection."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import np_band, np_unit_norms

import normjax as nj


def _params(seed=0, with_int=False):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)
    return {
        "dense": {"kernel": f(16, 8), "bias": f(8)},
        "conv": {"kernel": f(3, 3, 4, 6), "bias": f(6)},
        "embed": {"embedding": f(20, 8)},
    } | ({"step": jnp.asarray(3, jnp.int32)} if with_int else {})


def _grads(params, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros_like(x),
        params,
    )


def _step(tx, params, grads, state=None):
    """One step, the update under jax.jit as a training step runs it (one compile, where an
    eager update compiles each of its primitives on its own for every new shape)."""
    state = tx.init(params) if state is None else state
    u, state = jax.jit(tx.update)(grads, state, params)
    return optax.apply_updates(params, u), u, state


TRANSFORMS = {
    "max_norm": (lambda **kw: nj.max_norm(1.0, **kw), lambda w, ax: np_band(w, ax, None, 1.0)),
    "unit_norm": (lambda **kw: nj.unit_norm(**kw), lambda w, ax: np_band(w, ax, 1.0, 1.0)),
    "min_max_norm": (
        lambda **kw: nj.min_max_norm(0.5, 1.0, rate=0.7, **kw),
        lambda w, ax: np_band(w, ax, 0.5, 1.0, 0.7),
    ),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_update_equals_projection_of_sum(name):
    make, ref = TRANSFORMS[name]
    params, grads = _params(), _grads(_params())
    tx = optax.chain(optax.sgd(0.5), make())
    new, u, _ = _step(tx, params, grads)
    w = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    for k, ax in (("dense", (0,)), ("conv", (0, 1, 2))):
        chex.assert_trees_all_close(np.asarray(new[k]["kernel"], np.float64), ref(w[k]["kernel"], ax), rtol=1e-5, atol=1e-6)
        # unselected leaves (biases) keep their update bit for bit
        np.testing.assert_array_equal(np.asarray(u[k]["bias"]), np.asarray(-0.5 * grads[k]["bias"]))


def test_inside_units_keep_their_update_bit_for_bit():
    params = _params()
    grads = _grads(params, scale=0.2)
    tx = optax.chain(optax.sgd(1.0), nj.max_norm(2.0))
    new, u, state = _step(tx, params, grads)
    plain = optax.apply_updates(params, optax.sgd(1.0).update(grads, optax.sgd(1.0).init(params))[0])
    n = np_unit_norms(plain["dense"]["kernel"], (0,))[0]
    inside = n <= 2.0
    assert 0 < inside.sum() < inside.size
    np.testing.assert_array_equal(np.asarray(new["dense"]["kernel"])[:, inside], np.asarray(plain["dense"]["kernel"])[:, inside])
    np.testing.assert_array_equal(np.asarray(u["dense"]["kernel"])[:, inside], np.asarray(-grads["dense"]["kernel"])[:, inside])


def test_params_none_raises():
    tx = nj.max_norm(1.0)
    params = _params()
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="params"):
        nj.unit_norm().update(params, nj.unit_norm().init(params), None)


def test_state_diagnostics_by_path():
    params = _params()
    grads = _grads(params)
    tx = optax.chain(optax.sgd(1.0), nj.max_norm(1.0, axis=lambda path, x: -1 if "embed" in path else None))
    _, _, state = _step(tx, params, grads)
    st = state[1]
    assert isinstance(st, nj.NormState)
    assert set(nj.by_path(st.largest_norm)) == {"dense/kernel", "conv/kernel", "embed/embedding"}
    w = jax.tree.map(lambda p, g: p - g, params, grads)
    for path, leaf, ax in (("dense/kernel", w["dense"]["kernel"], (0,)), ("conv/kernel", w["conv"]["kernel"], (0, 1, 2)), ("embed/embedding", w["embed"]["embedding"], (1,))):
        n = np_unit_norms(leaf, ax)
        np.testing.assert_allclose(float(nj.by_path(st.largest_norm)[path]), n.max(), rtol=1e-5)
        np.testing.assert_allclose(float(nj.by_path(st.smallest_norm)[path]), n.min(), rtol=1e-5)
        np.testing.assert_allclose(float(nj.by_path(st.clipped_fraction)[path]), np.mean(n > 1.0), rtol=1e-6)
    # the logging idiom documented on NormState
    assert optax.tree_utils.tree_get(state, "largest_norm") is st.largest_norm


def test_state_types_stable_and_one_trace():
    params = _params()
    tx = optax.chain(optax.sgd(1e-1, momentum=0.9), nj.min_max_norm(0.2, 1.0))
    state0 = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    p, s = params, state0
    for i in range(4):
        p, s = step(p, s, _grads(params, seed=i))
    chex.assert_trees_all_equal_shapes_and_dtypes(state0, s)
    assert jax.tree.structure(state0) == jax.tree.structure(s)


def test_masked_and_none_leaves():
    params = _params()
    params["frozen"] = None
    grads = _grads({k: v for k, v in params.items() if k != "frozen"})
    grads["frozen"] = None
    mask = {"dense": True, "conv": False, "embed": False, "frozen": False}
    tx = optax.chain(optax.sgd(1.0), optax.masked(nj.max_norm(0.1, where=lambda p, x: x.ndim >= 2), mask))
    new, u, _ = _step(tx, params, grads)
    assert new["frozen"] is None
    assert np.all(np_unit_norms(new["dense"]["kernel"], (0,)) <= 0.1 * (1 + 1e-6))
    np.testing.assert_array_equal(np.asarray(u["conv"]["kernel"]), np.asarray(-grads["conv"]["kernel"]))
    # the inner transform saw optax.MaskedNode leaves and passed them through
    inner = nj.max_norm(0.1)
    masked = {"a": optax.MaskedNode(), "w": jnp.ones((3, 2)) * 5}
    out, _ = jax.jit(inner.update)(masked, inner.init(masked), masked)
    assert isinstance(out["a"], optax.MaskedNode)


def test_inject_hyperparams_max_value():
    params = _params()
    grads = _grads(params)
    tx = optax.chain(optax.sgd(1.0), optax.inject_hyperparams(nj.max_norm)(max_value=1.0))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    new, state = step(params, state)
    assert np.max(np_unit_norms(new["dense"]["kernel"], (0,))) <= 1.0 + 1e-5
    state[1].hyperparams["max_value"] = jnp.asarray(0.25)
    new, state = step(params, state)
    n = np_unit_norms(new["dense"]["kernel"], (0,))
    np.testing.assert_allclose(n.max(), 0.25, rtol=1e-5)
    # min/max/rate of min_max_norm are injectable too
    tx2 = optax.inject_hyperparams(nj.min_max_norm)(min_value=0.5, max_value=1.0, rate=1.0)
    s2 = tx2.init(params)
    s2.hyperparams["rate"] = jnp.asarray(0.0)
    u2, _ = jax.jit(tx2.update)(grads, s2, params)
    np.testing.assert_array_equal(np.asarray(u2["dense"]["kernel"]), np.asarray(grads["dense"]["kernel"]))


def test_multisteps():
    # optax.MultiSteps mixes int32 counters with floats, which strict promotion rejects inside
    # optax itself; our transform runs under the standard rules here and strict everywhere else.
    with jax.numpy_dtype_promotion("standard"):
        _multisteps()


def _multisteps():
    params = _params()
    tx = optax.MultiSteps(optax.chain(optax.sgd(1.0), nj.max_norm(0.5)), every_k_schedule=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    p = params
    for i in range(2):
        u, state = update(_grads(params, seed=i), state, p)
        p = optax.apply_updates(p, u)
        if i == 0:
            np.testing.assert_array_equal(np.asarray(p["dense"]["kernel"]), np.asarray(params["dense"]["kernel"]))
    assert np.max(np_unit_norms(p["dense"]["kernel"], (0,))) <= 0.5 * (1 + 1e-6)
    assert np.max(np_unit_norms(p["conv"]["kernel"], (0, 1, 2))) <= 0.5 * (1 + 1e-6)


def test_flax_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(10, 8, rngs=rngs)
            self.dense = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, ids):
            return self.dense(self.embed(ids))

    model = Model(nnx.Rngs(0))
    tx = optax.chain(
        optax.sgd(5.0),
        nj.max_norm(0.5, axis=lambda path, x: -1 if path.endswith("embedding") else None),
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ids = jnp.arange(10)

    @nnx.jit
    def train_step(model, opt):
        grads = nnx.grad(lambda m: jnp.mean((m(ids) - 3.0) ** 2))(model)
        opt.update(model, grads)

    for _ in range(3):
        train_step(model, opt)
    assert np.max(np_unit_norms(model.dense.kernel[...], (0,))) <= 0.5 * (1 + 1e-6)
    assert np.max(np_unit_norms(model.embed.embedding[...], (1,))) <= 0.5 * (1 + 1e-6)
    st = nj.by_path(optax.tree_utils.tree_get(opt.opt_state, "largest_norm"))
    assert set(st) == {"dense/kernel", "embed/embedding"}
    assert float(st["dense/kernel"][...]) > 0.5


@pytest.mark.parametrize(
    "where, selected",
    [
        (None, {"dense/kernel", "conv/kernel", "embed/embedding"}),
        ("kernel$", {"dense/kernel", "conv/kernel"}),
        (re.compile(r"^conv/"), {"conv/kernel", "conv/bias"}),
        (lambda path, x: x.ndim == 4, {"conv/kernel"}),
        ({"dense": True, "conv": False, "embed": {"embedding": True}, "step": False}, {"dense/kernel", "dense/bias", "embed/embedding"}),
    ],
)
def test_where_forms(where, selected):
    params = _params(with_int=True)
    tx = nj.max_norm(1e-3, where=where, axis=lambda path, x: None if x.ndim >= 2 else 0)
    assert set(nj.by_path(tx.init(params).largest_norm)) == selected
    grads = _grads(params)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    got_by_path = {nj.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(u)}
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = nj.path_str(path)
        got = got_by_path[name]
        if name in selected:
            assert not np.array_equal(np.asarray(got), np.asarray(g))
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(g))


def test_where_pure_projection_returns_unselected_leaf_itself():
    params = _params(with_int=True)
    out = nj.project_unit_norm(params, where="dense/kernel")
    assert out["conv"]["kernel"] is params["conv"]["kernel"]
    assert out["step"] is params["step"]
