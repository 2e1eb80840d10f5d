"""The max-norm family against float64 closed forms, over shapes, dtypes and jit/device variants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from conftest import np_band, np_unit_norms

import normjax as nj

# full XLA optimisation, as users compile (tests/conftest.py: full_optimization)
pytestmark = pytest.mark.usefixtures("full_optimization")

# name -> (shape, default unit axes for axis=None); embeddings are constrained per row with axis=-1.
SHAPES = {
    "dense": ((12, 7), (0,)),
    "conv1d": ((3, 5, 6), (0, 1)),
    "conv2d": ((3, 3, 4, 6), (0, 1, 2)),
    "conv3d": ((2, 3, 3, 2, 5), (0, 1, 2, 3)),
}
TOL = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}

# The projections under jax.jit, as a training step runs them (the eager path has its own test,
# VariantsTest's without_jit): one compile per shape and dtype, where an eager call compiles
# each of its ~25 primitives on its own for every new shape (several times slower).
_max_norm = jax.jit(nj.project_max_norm, static_argnames=("max_value", "axis"))
RATES = (1.0, 0.3)


@jax.jit
def _unit_and_min_max(w):
    """project_unit_norm and project_min_max_norm(0.5, 1.5) at every rate of RATES, one program."""
    return nj.project_unit_norm({"k": w})["k"], [nj.project_min_max_norm({"k": w}, 0.5, 1.5, rate=r)["k"] for r in RATES]


def _data(shape, dtype, seed=0, scale=2.0):
    """Random weights whose units straddle the bounds used below: some inside, some outside."""
    rng = np.random.default_rng(seed)
    fan_in = int(np.prod(shape[:-1]))
    x = rng.normal(size=shape) * rng.uniform(0.05, scale, size=shape[-1:]) / np.sqrt(fan_in)
    return jnp.asarray(x, dtype)


class ClosedFormTest(parameterized.TestCase):
    @parameterized.product(shape=list(SHAPES), dtype=[jnp.float32, jnp.bfloat16, jnp.float16])
    def test_project_max_norm(self, shape, dtype):
        shape, axes = SHAPES[shape]
        w = _data(shape, dtype)
        c = 1.0
        out = _max_norm({"k": w}, max_value=c)["k"]
        self.assertEqual(out.dtype, w.dtype)
        chex.assert_trees_all_close(
            np.asarray(out, np.float64), np_band(w, axes, None, c), rtol=TOL[dtype], atol=TOL[dtype]
        )
        n_in, n_out = np_unit_norms(w, axes), np_unit_norms(out, axes)
        self.assertTrue(np.all(n_out <= c * (1 + 4 * TOL[dtype])))
        inside = np.broadcast_to(n_in < c, w.shape)
        np.testing.assert_array_equal(np.asarray(out)[inside], np.asarray(w)[inside])
        self.assertTrue(inside.any() and not inside.all())

    @parameterized.product(shape=list(SHAPES), dtype=[jnp.float32, jnp.bfloat16])
    def test_project_unit_and_min_max(self, shape, dtype):
        shape, axes = SHAPES[shape]
        w = _data(shape, dtype, seed=1)
        tol = TOL[dtype]
        unit, min_max = _unit_and_min_max(w)
        chex.assert_trees_all_close(np.asarray(unit, np.float64), np_band(w, axes, 1.0, 1.0), rtol=tol, atol=tol)
        np.testing.assert_allclose(np_unit_norms(unit, axes), 1.0, rtol=4 * tol)
        for rate, mm in zip(RATES, min_max):
            self.assertEqual(mm.dtype, w.dtype)
            chex.assert_trees_all_close(
                np.asarray(mm, np.float64), np_band(w, axes, 0.5, 1.5, rate), rtol=tol, atol=tol
            )

    def test_embedding_rows_like_torch(self):
        # torch.nn.Embedding(max_norm=c) renormalises each looked-up row to norm <= c.
        table = jnp.asarray(np.random.default_rng(2).normal(size=(30, 8)) * 0.4, jnp.float32)
        out = _max_norm({"embed": {"embedding": table}}, max_value=1.0, axis=-1)["embed"]["embedding"]
        rows = np.linalg.norm(np.asarray(table, np.float64), axis=1)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out, np.float64), axis=1), np.minimum(rows, 1.0), rtol=1e-6)
        self.assertTrue(0 < np.mean(rows < 1) < 1)
        np.testing.assert_array_equal(np.asarray(out)[rows < 1], np.asarray(table)[rows < 1])

    def test_keras_conv_axis_default_is_wrong_slices(self):
        # Keras's MaxNorm(axis=0) on a (h, w, in, out) kernel bounds vectors along the kernel's
        # height; our default bounds each output filter's whole fan-in, as Keras's docs advise.
        w = _data((3, 3, 4, 6), jnp.float32, seed=3, scale=4.0)
        ours, keras_default, keras_advised = jax.jit(
            lambda p: (
                nj.project_max_norm(p, 1.0)["k"],
                nj.project_max_norm(p, 1.0, axis=0)["k"],
                nj.project_max_norm(p, 1.0, axis=[0, 1, 2])["k"],
            )
        )({"k": w})
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(keras_advised))
        self.assertGreater(np.max(np_unit_norms(keras_default, (0, 1, 2))), 1.5)

    def test_float64(self):
        with jax.enable_x64(True):
            w = jnp.asarray(np.random.default_rng(4).normal(size=(9, 5)) * 2, jnp.float64)
            out = _max_norm({"k": w}, max_value=1.0)["k"]
            self.assertEqual(out.dtype, jnp.float64)
            np.testing.assert_allclose(np.asarray(out), np_band(w, (0,), None, 1.0), rtol=1e-13)


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_device=True)
    def test_projection_variants(self):
        w = _data((10, 6), jnp.float32, seed=5)
        fn = self.variant(lambda p: nj.project_max_norm(p, 1.0))
        out = fn({"k": w, "b": jnp.ones(6)})
        chex.assert_trees_all_close(np.asarray(out["k"], np.float64), np_band(w, (0,), None, 1.0), rtol=1e-6)
        np.testing.assert_array_equal(out["b"], np.ones(6))

    @chex.variants(with_jit=True, without_jit=True, with_device=True)
    def test_transform_variants(self):
        params = {"k": _data((10, 6), jnp.float32, seed=6, scale=0.5), "b": jnp.zeros(6)}
        grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.3, params)
        tx = optax.chain(optax.sgd(1.0), nj.max_norm(1.0))
        state = tx.init(params)

        @self.variant
        def step(params, state):
            u, state = tx.update(grads, state, params)
            return optax.apply_updates(params, u), state

        new, state = step(params, state)
        want = np_band(np.asarray(params["k"]) - 0.3, (0,), None, 1.0)
        chex.assert_trees_all_close(np.asarray(new["k"], np.float64), want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(new["b"], params["b"] - 0.3)


class ZeroAndGradTest(parameterized.TestCase):
    @parameterized.parameters("max", "unit", "minmax")
    def test_zero_units_stay_zero_with_finite_grads(self, kind):
        w = jnp.zeros((4, 3)).at[:, 0].set(jnp.array([3.0, 0.0, 4.0, 0.0]))
        proj = {
            "max": lambda p: nj.project_max_norm(p, 1.0),
            "unit": nj.project_unit_norm,
            "minmax": lambda p: nj.project_min_max_norm(p, 0.5, 2.0),
        }[kind]

        @jax.jit  # one compile for the projection and both gradients
        def run(w, zeros):
            out = proj({"k": w})["k"]
            g = jax.grad(lambda x: jnp.sum(proj({"k": x})["k"] ** 2))(w)
            g0 = jax.grad(lambda x: jnp.sum(proj({"k": x})["k"]))(zeros)
            return out, g, g0

        out, g, g0 = run(w, jnp.zeros((4, 3)))
        np.testing.assert_array_equal(out[:, 1:], 0.0)
        self.assertTrue(bool(jnp.all(jnp.isfinite(g))))
        # an all-zero tensor too
        self.assertTrue(bool(jnp.all(jnp.isfinite(g0))))

    def test_grad_matches_finite_differences(self):
        w = _data((5, 3), jnp.float32, seed=7)
        f = lambda x: jnp.sum(jnp.sin(nj.project_max_norm({"k": x}, 1.0)["k"]))
        with jax.enable_x64(True):
            w64 = jnp.asarray(w, jnp.float64)
            v = jnp.asarray(np.random.default_rng(8).normal(size=w.shape))
            eps = 1e-6
            g, fd = jax.jit(lambda w, v: (jax.grad(f)(w), (f(w + eps * v) - f(w - eps * v)) / (2 * eps)))(w64, v)
            np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the cond form is CPU's; other backends keep the select")
def test_cpu_projection_of_a_leaf_inside_makes_no_copy_of_it():
    """After Adam, a projection that moves nothing must not make a full-size temporary: on CPU
    the leaf goes through a cond whose identity branch XLA can alias (only when the identity is
    the false branch); with the select alone, or the identity as the true branch, XLA writes
    one more copy of the leaf every step (benchmarks/RESULTS.md: 3.44x against 1.46x Adam)."""
    params = {"k": jnp.full((512, 256), 0.01), "b": jnp.zeros((256,))}
    tx = optax.adam(1e-3)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return nj.project_max_norm(optax.apply_updates(p, u), 3.0), s

    with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes its int32 count with floats
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    leaf_bytes = params["k"].size * 4
    assert compiled.memory_analysis().temp_size_in_bytes < leaf_bytes // 8
    # and it still projects: a unit pushed out comes back onto the ball
    out = jax.jit(nj.project_max_norm, static_argnums=1)({"k": params["k"].at[:, 0].set(1.0)}, 3.0)["k"]
    np.testing.assert_allclose(float(jnp.linalg.norm(out[:, 0])), 3.0, rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1:], params["k"][:, 1:])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("fn", ["max", "unit", "min_max"])
def test_grouped_projection_equals_leaf_by_leaf(dtype, fn):
    """Same-shaped leaves share their per-unit factors' computation (one group): each must come
    back bit for bit as projected alone, whether the group's other leaves move or not."""
    proj = {
        "max": lambda t: nj.project_max_norm(t, 1.0),
        "unit": nj.project_unit_norm,
        "min_max": lambda t: nj.project_min_max_norm(t, 0.5, 1.0, rate=0.5),
    }[fn]
    base = _data((6, 4), jnp.float32, seed=11)
    tree = {
        "k0": (base * 100).astype(dtype),   # shrunk 100x
        "k1": (base * 1.5).astype(dtype),   # mildly
        "k2": (base * 0.01).astype(dtype),  # inside (max-norm), grown (unit / min-max)
        "k3": _data((5, 4), jnp.float32, seed=12).astype(dtype),  # another shape: its own group
    }
    together = jax.jit(proj)(tree)
    for k, leaf in tree.items():
        alone = jax.jit(proj)({k: leaf})[k]
        np.testing.assert_array_equal(np.asarray(together[k], np.float32), np.asarray(alone, np.float32), err_msg=k)


if __name__ == "__main__":
    pytest.main([__file__])
