"""End to end, as each framework's users write it: infer_views on the model, then train with the
constraints and check the result against float64 references of the layers' true units/operators.

Flax NNX goes through ``nnx.Optimizer`` (which calls ``init`` on Variable-wrapped params and
``update`` on pure ones: the same views must serve both), Flax Linen through ``model.apply``,
Equinox through ``eqx.partition``/``eqx.combine``, plain JAX through a function of a dict.
Each runs in float32 and bfloat16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normjax as nj

C = 1.0


def np_fan_in(w, axes):
    x = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
    return np.sqrt(np.sum(x * x, axis=tuple(axes)))


def np_sigma(w, rows, cols, batch=()):
    x = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
    x = np.transpose(x, tuple(batch) + tuple(rows) + tuple(cols))
    b = int(np.prod([w.shape[a] for a in batch]))
    r = int(np.prod([w.shape[a] for a in rows]))
    return np.linalg.svd(x.reshape(b, r, -1), compute_uv=False)[:, 0]


# tolerance of "inside the ball" after a step, per dtype: float32 rounding, or one bfloat16
# rounding of each entry (relative 2**-8) after the projection
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2**-7}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_flax_nnx_attention_model_with_nnx_optimizer(dtype):
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(12, 16, rngs=rngs, param_dtype=dtype)
            self.attn = nnx.MultiHeadAttention(4, 16, qkv_features=16, decode=False, rngs=rngs, param_dtype=dtype, dtype=jnp.float32)
            self.norm = nnx.LayerNorm(16, rngs=rngs, param_dtype=dtype, dtype=jnp.float32)
            self.head = nnx.Linear(16, 3, rngs=rngs, param_dtype=dtype, dtype=jnp.float32)

        def __call__(self, ids):
            h = self.embed(ids).astype(jnp.float32)
            h = self.norm(h + self.attn(h))
            return self.head(h.mean(axis=-2)).astype(jnp.float32)

    model = Model(nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 12, size=(8, 6)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    views = nj.infer_views(lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x), params, ids)
    got = nj.by_path(views)
    assert got["attn/query/kernel"] == nj.MatrixDims((0,), (1, 2))
    assert got["attn/out/kernel"] == nj.MatrixDims((0, 1), (2,))
    assert got["head/kernel"] == nj.MatrixDims((0,), (1,))
    assert got["embed/embedding"] == nj.Embedding((0,))
    assert isinstance(got["attn/query/bias"], nj.NotMatrix) and isinstance(got["norm/scale"], nj.NotMatrix)

    tx = optax.chain(optax.sgd(2.0), nj.max_norm(C, views=views))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda m: jnp.mean((m(ids) - 3.0) ** 2))(model)
        opt.update(model, grads)

    for _ in range(3):
        step(model, opt)
    tol = TOL[dtype]
    units = {
        "attn/query/kernel": (model.attn.query.kernel, (0,)),
        "attn/key/kernel": (model.attn.key.kernel, (0,)),
        "attn/value/kernel": (model.attn.value.kernel, (0,)),
        "attn/out/kernel": (model.attn.out.kernel, (0, 1)),
        "head/kernel": (model.head.kernel, (0,)),
        "embed/embedding": (model.embed.embedding, (1,)),
    }
    for path, (w, axes) in units.items():
        assert w[...].dtype == dtype
        assert np.max(np_fan_in(w[...], axes)) <= C * (1 + tol), path
    # the step really pushed units out: the logs saw norms above c before the projection
    logged = nj.by_path(optax.tree_utils.tree_get(opt.opt_state, "largest_norm"))
    assert set(logged) == set(units)
    assert max(float(v[...]) for v in logged.values()) > C


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_flax_linen_cnn_scan_and_attention_certified(dtype):
    nn = pytest.importorskip("flax.linen")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.relu(nn.Dense(8, param_dtype=dtype)(h)), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="CIRCULAR", param_dtype=dtype)(x))
            h = nn.relu(nn.Conv(4, (3, 3), padding="SAME", feature_group_count=2, param_dtype=dtype)(h))
            h = h.reshape(h.shape[0], -1)
            h = nn.Dense(8, param_dtype=dtype)(h)
            h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(h, None)
            return nn.Dense(2, param_dtype=dtype)(h)

    net = Net()
    x = jnp.ones((2, 8, 8, 1), dtype)
    params = jax.jit(net.init)(jax.random.key(0), x)  # one compile, not one per initialiser
    views = nj.infer_views(net.apply, params, x)
    got = nj.by_path(views)
    assert got["params/Conv_0/kernel"] == nj.ConvSpec((8, 8), strides=(2, 2), padding="CIRCULAR", kernel_dilation=(1, 1), kernel_layout="HWIO", input_dilation=(1, 1))
    assert got["params/ScanBlock_0/Dense_0/kernel"] == nj.MatrixDims((1,), (2,))
    assert isinstance(got["params/ScanBlock_0/Dense_0/bias"], nj.NotMatrix)
    # a step that scales every weight up, then the certified constraint
    tx = optax.chain(optax.sgd(1.0), nj.spectral_norm(C, estimator="gram", views=views))
    state = tx.init(params)
    grads = jax.tree.map(lambda p: -2.0 * p, params)  # triples every weight
    u, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, u)
    tol = TOL[dtype]
    p = nj.by_path(new)
    for path, view in got.items():
        if isinstance(view, nj.ConvSpec):
            k = jnp.asarray(p[path], jnp.float32)
            fields = dict(strides=view.strides, padding=view.padding, kernel_dilation=view.kernel_dilation,
                          feature_group_count=view.feature_group_count, kernel_layout=view.kernel_layout)
            exact = float(jax.jit(lambda k: nj.conv_spectral_norm(k, view.input_shape, method="svd", **fields))(k))
            assert exact <= C * (1 + tol), path
        elif isinstance(view, nj.MatrixDims):
            batch = tuple(a for a in range(p[path].ndim) if a not in view.in_axes + view.out_axes)
            assert np.all(np_sigma(p[path], view.in_axes, view.out_axes, batch) <= C * (1 + tol)), path
        else:  # biases: the update passed through bit for bit
            np.testing.assert_array_equal(np.asarray(p[path], np.float32), np.asarray(nj.by_path(params)[path] * 3, np.float32))
    bound = float(jax.jit(lambda p: nj.lipschitz_bound(p, views=views))(new))
    assert bound <= (1 + tol) ** 7  # 2 convs, 1 dense, 3 stacked layers, 1 head
    # the certificate is a real bound on the network's Jacobian (ReLU is 1-Lipschitz)
    f = lambda xx: net.apply(new, xx.astype(dtype)[None])[0].astype(jnp.float32)
    jac = jax.jit(jax.jacobian(f))(jnp.asarray(np.random.default_rng(1).normal(size=(8, 8, 1)), jnp.float32))
    assert np.linalg.norm(np.asarray(jac, np.float64).reshape(2, -1), ord=2) <= bound * (1 + 4 * tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_equinox_cnn_max_norm_and_operator_norm(dtype):
    eqx = pytest.importorskip("equinox")
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    model = [
        eqx.nn.Conv2d(2, 4, 3, padding=1, key=k1, dtype=dtype),
        eqx.nn.Conv2d(4, 4, 3, stride=2, padding=1, key=k2, dtype=dtype),
        eqx.nn.Linear(4 * 3 * 3, 5, key=k3, dtype=dtype),
    ]

    def apply(m, x):
        h = jax.nn.relu(m[0](x))
        h = jax.nn.relu(m[1](h))
        return m[2](h.reshape(-1))

    params, static = eqx.partition(model, eqx.is_array)
    x = jnp.ones((2, 6, 6), dtype)
    views = nj.infer_views(lambda p, xx: apply(eqx.combine(p, static), xx), params, x)
    got = nj.by_path(views)
    assert got["0/weight"].kernel_layout == "OIHW" and got["0/weight"].input_shape == (6, 6)
    assert got["1/weight"].strides == (2, 2) and got["1/weight"].input_shape == (6, 6)
    assert got["2/weight"] == nj.MatrixDims((1,), (0,))
    assert all(isinstance(got[f"{i}/bias"], nj.NotMatrix) for i in range(3))
    big = jax.tree.map(lambda w: w * 5, params)
    tol = TOL[dtype]
    # max-norm: every output channel's fan-in (in, kh, kw) of an OIHW kernel, every row of (out, in)
    out = eqx.filter_jit(lambda b: nj.project_max_norm(b, C, views=views))(big)
    assert np.max(np_fan_in(out[0].weight, (1, 2, 3))) <= C * (1 + tol)
    assert np.max(np_fan_in(out[1].weight, (1, 2, 3))) <= C * (1 + tol)
    assert np.max(np_fan_in(out[2].weight, (1,))) <= C * (1 + tol)
    np.testing.assert_array_equal(np.asarray(out[0].bias, np.float32), np.asarray(big[0].bias, np.float32))
    # spectral: the convolutions' operator norms, not their reshaped kernels
    out = eqx.filter_jit(lambda b: nj.project_spectral_norm(b, C, mode="rescale", views=views))(big)
    for i in (0, 1):
        spec = got[f"{i}/weight"]
        exact = jax.jit(lambda w: nj.conv_spectral_norm(w, spec.input_shape, strides=spec.strides, padding=spec.padding,
                                                        kernel_layout="OIHW", method="svd"))(jnp.asarray(out[i].weight, jnp.float32))
        assert float(exact) <= C * (1 + tol) and float(exact) >= C * (1 - 2 * tol)
    assert float(np_sigma(out[2].weight, (1,), (0,))[0]) <= C * (1 + tol)


def test_plain_jax_vmap_and_scan_stacks_one_norm_per_layer():
    def layer(w, b, h):
        return jnp.tanh(h @ w + b)

    def net(p, x):
        h = jax.vmap(layer, in_axes=(0, 0, 0))(p["par_w"], p["par_b"], jnp.stack([x, x]))  # 2 parallel layers
        h = h.sum(0)
        h, _ = jax.lax.scan(lambda h, wb: (layer(wb[0], wb[1], h), None), h, (p["seq_w"], p["seq_b"]))
        return h

    rng = np.random.default_rng(5)
    p = {
        "par_w": jnp.asarray(rng.normal(size=(2, 4, 4)) * 2, jnp.float32),
        "par_b": jnp.zeros((2, 4)),
        "seq_w": jnp.asarray(rng.normal(size=(3, 4, 4)) * 2, jnp.float32),
        "seq_b": jnp.zeros((3, 4)),
    }
    x = jnp.ones((5, 4))
    views = nj.infer_views(net, p, x)
    assert views["par_w"] == nj.MatrixDims((1,), (2,)) and views["seq_w"] == nj.MatrixDims((1,), (2,))
    assert isinstance(views["seq_b"], nj.NotMatrix) and isinstance(views["par_b"], nj.NotMatrix)
    out, sig = jax.jit(lambda p: (nj.project_spectral_norm(p, C, views=views),  # exact clip, one per stacked layer
                                  nj.spectral_norms(p, estimator="svd", views=views)))(p)
    for k in ("par_w", "seq_w"):
        s = np_sigma(out[k], (1,), (2,), (0,))
        np.testing.assert_allclose(s, np.minimum(np_sigma(p[k], (1,), (2,), (0,)), C), rtol=1e-5)
    assert sig["seq_w"].shape == (3,) and sig["seq_b"] is None
