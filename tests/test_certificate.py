"""``lipschitz_certificate`` against references that do not use the library.

The references:

- **the truth from below**: :func:`jacobian_lower_bound` takes the per-example function
  ``g: R^d -> R^k`` (one example, no batch), computes its full Jacobian with ``jax.jacfwd`` at
  many points and takes the largest singular value in float64 (``np.linalg.svd``). The points
  are random (three scales, so that activations sit in every regime) and the end points of an
  adversarial search: Adam ascent on ``||J(x) v||`` with ``v`` the power-iteration estimate of
  the top right singular vector (``jax.jvp``/``jax.vjp``). Every value it returns is the norm
  of an actual Jacobian, so it is a lower bound on the Lipschitz constant; a certificate below
  it is wrong.
- **exact operator norms**: numpy float64 SVD of each kernel (of the conv's materialised
  Jacobian for convolutions), products of them, closed forms for linear toy blocks.
- **activation slopes**: the formula written in numpy/scipy (not jax), differentiated by
  finite differences on a dense float64 grid.
- **certified radii**: a numpy loop over the logits.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import normjax as nj

REL = 1e-5  # allowance for float32 rounding of the Jacobian entries in the lower bound


# ------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------


def _sigmas(g, xs):
    """Largest singular value of the Jacobian of ``g`` at each row of ``xs`` (float64 SVD)."""
    xs = jnp.asarray(xs, jnp.float32)
    jac = np.asarray(jax.jit(jax.vmap(jax.jacfwd(g)))(xs), np.float64)
    n_in = int(np.prod(xs.shape[1:]))
    jac = jac.reshape(xs.shape[0], -1, n_in)
    return np.linalg.svd(jac, compute_uv=False)[:, 0]


def _adversarial_points(g, starts, steps=30, lr=0.05, seed=0):
    """Adam ascent of ``||J(x) v||`` (``v``: power iteration, renewed each step) from each start;
    every iterate is returned (``(steps + 1) * starts`` points)."""
    v0 = jax.random.normal(jax.random.key(seed), starts.shape, jnp.float32)

    def one(x0, v):
        def est(x, v):
            _, jv = jax.jvp(g, (x,), (v,))
            return jnp.sqrt(jnp.sum(jv * jv) + 1e-30)

        def step(carry, _):
            x, v, (m, s, t) = carry
            _, jv = jax.jvp(g, (x,), (v,))
            _, back = jax.vjp(g, x)
            (jtjv,) = back(jv)
            nrm = jnp.sqrt(jnp.sum(jtjv * jtjv))
            v = jnp.where(nrm > 0, jtjv / jnp.where(nrm > 0, nrm, 1.0), v)
            grad = jax.grad(lambda xx: -est(xx, jax.lax.stop_gradient(v)))(x)
            # Adam (hand-written: optax's bias correction trips strict dtype promotion)
            t = t + 1.0
            m = 0.9 * m + 0.1 * grad
            s = 0.999 * s + 0.001 * grad * grad
            mh, sh = m / (1.0 - 0.9**t), s / (1.0 - 0.999**t)
            x = x - lr * mh / (jnp.sqrt(sh) + 1e-8)
            return (x, v, (m, s, t)), x

        zero = jnp.zeros_like(x0)
        _, traj = jax.lax.scan(step, (x0, v, (zero, zero, jnp.zeros((), jnp.float32))), None, length=steps)
        return traj

    traj = jax.jit(jax.vmap(one))(starts, v0)  # (starts, steps, ...)
    return jnp.concatenate([starts, traj.reshape(-1, *starts.shape[1:])], 0)


def jacobian_lower_bound(g, x, *, n_random=32, n_starts=4, steps=30, seed=0, scales=(0.3, 1.0, 3.0)):
    """A lower bound on the Lipschitz constant of the one-example function ``g`` near ``x``'s
    shape: the largest float64 singular value of ``jax.jacfwd(g)`` over random points and an
    adversarial search."""
    rng = np.random.default_rng(seed)
    shape = np.shape(x)
    sc = np.asarray([scales[i % len(scales)] for i in range(n_random)]).reshape((-1,) + (1,) * len(shape))
    pts = jnp.asarray(rng.normal(size=(n_random, *shape)) * sc, jnp.float32)
    if n_starts:  # starts at every scale; the iterates include them
        pts = jnp.concatenate([pts[n_starts:], _adversarial_points(g, pts[:n_starts], steps=steps, seed=seed)], 0)
    return float(np.max(_sigmas(g, pts)))


def _search(name):
    """ReLU networks have a piecewise-constant Jacobian (no gradient to climb): more random
    points instead of the ascent. The ascent (a compile of second derivatives each) is kept
    for the two smooth models of the soundness sweep; the framework tests, whose point is the
    framework's plumbing, use random points only (the budget of this file is ~90 s on 2 CPUs)."""
    smooth = name in ("mlp_smooth", "transformer_no_ln", "smooth")
    return {"n_random": 32, "n_starts": 4} if smooth else {"n_random": 64, "n_starts": 0}


def per_example(fn, params, rest=()):
    """``x_i -> fn(params, x[None])[0]`` for a batched model."""
    return lambda xi: fn(params, xi[None], *rest)[0]


def np_sigma(w):
    """Exact spectral norm (float64 SVD) of a kernel used as ``x @ w``."""
    w = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
    return float(np.linalg.svd(w.reshape(-1, w.shape[-1]), compute_uv=False)[0])


def _f32(a):
    return jnp.asarray(a, jnp.float32)


def _assert_sound(cert, lower):
    b = float(cert)
    assert np.isfinite(b)
    assert lower <= b * (1 + REL), f"certificate {b} is below a Jacobian norm {lower}"


def test_jacobian_lower_bound_is_exact_on_a_linear_map():
    w = _f32(np.random.default_rng(19).normal(size=(6, 5)))
    got = jacobian_lower_bound(lambda xi: xi @ w, jnp.zeros((6,), jnp.float32), n_starts=1, steps=3)
    assert got == pytest.approx(np_sigma(w), rel=1e-6)
    # and the adversarial search climbs: atan(5 (x.u - 2)) is steepest (slope 5 |u| = 5) on
    # x.u = 2, and has slope < 0.06 near the random points (|x.u| <~ 1)
    u = _f32(np.ones((4,)) / 2.0)
    g = lambda xi: jnp.arctan(5.0 * (xi @ u - 2.0))[None]
    random_only = jacobian_lower_bound(g, jnp.zeros((4,), jnp.float32), n_starts=0, scales=(0.3,))
    searched = jacobian_lower_bound(g, jnp.zeros((4,), jnp.float32), n_starts=2, scales=(0.3,), steps=60)
    assert random_only < 1.0 and searched > 4.5


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


def _dense(rng, n_in, n_out, scale=1.0):
    return _f32(rng.normal(size=(n_in, n_out)) * scale / math.sqrt(n_in))


def mlp_params(seed, sizes, scale=1.5):
    rng = np.random.default_rng(seed)
    return {
        f"l{i}": {"w": _dense(rng, a, b, scale), "b": _f32(rng.normal(size=(b,)) * 0.3)}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    }


def mlp(acts):
    def fn(p, x):
        for i, act in enumerate(acts):
            x = act(x @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"])
        n = len(acts)
        return x @ p[f"l{n}"]["w"] + p[f"l{n}"]["b"]

    return fn


def residual_mlp(p, x):
    h = x
    for blk in p["blocks"]:
        h = h + jax.nn.relu(h @ blk["w1"] + blk["b1"]) @ blk["w2"]
    return h @ p["out"]


def residual_mlp_params(seed, d=6, width=12, n=2, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "blocks": [
            {"w1": _dense(rng, d, width, scale), "b1": _f32(rng.normal(size=(width,)) * 0.3), "w2": _dense(rng, width, d, scale)}
            for _ in range(n)
        ],
        "out": _dense(rng, d, 4),
    }


def _conv_nchw(x, k, stride=1):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


def residual_cnn(p, x):  # x: (B, 3, 8, 8), plain lax, NCHW
    h = x
    for blk in p["blocks"]:
        h = h + _conv_nchw(jax.nn.relu(_conv_nchw(h, blk["k1"])), blk["k2"])
    h = jax.nn.relu(h)
    return h.reshape(h.shape[0], -1) @ p["head"]


def residual_cnn_params(seed):
    rng = np.random.default_rng(seed)
    k = lambda o, i: _f32(rng.normal(size=(o, i, 3, 3)) / math.sqrt(9 * i))
    return {
        "blocks": [{"k1": k(4, 3), "k2": k(3, 4)}],
        "head": _dense(rng, 192, 5),
    }


def transformer_no_ln(p, x):
    """Residual blocks on (B, T, d) without LayerNorm; token mixing by a fixed (input-independent)
    attention pattern ``softmax(S)``; residual branches scaled by 1/len(blocks)."""
    n = len(p["blocks"])
    for blk in p["blocks"]:
        a = jax.nn.softmax(blk["scores"], axis=-1)  # (T, T): no input in it
        v = x @ blk["wv"]
        x = x + (jnp.einsum("ts,bsd->btd", a, v) @ blk["wo"]) / n
        x = x + (jax.nn.gelu(x @ blk["w1"] + blk["b1"]) @ blk["w2"]) / n
    return x


def transformer_params(seed, T=4, d=8, n=1):
    rng = np.random.default_rng(seed)
    return {
        "blocks": [
            {
                "scores": _f32(rng.normal(size=(T, T)) * 2.0),
                "wv": _dense(rng, d, d, 1.5),
                "wo": _dense(rng, d, d, 1.5),
                "w1": _dense(rng, d, 2 * d, 1.5),
                "b1": _f32(rng.normal(size=(2 * d,)) * 0.3),
                "w2": _dense(rng, 2 * d, d, 1.5),
            }
            for _ in range(n)
        ],
    }


def _linen_cnn():
    import flax.linen as nn

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):  # (B, 8, 8, 3)
            x = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME")(x))  # 4x4
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # 2x2
            x = nn.max_pool(x, (2, 2), strides=(1, 1), padding="SAME")  # overlapping windows
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(5)(x)

    model = CNN()
    with jax.numpy_dtype_promotion("standard"):  # flax's avg_pool divides by an int
        params = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3), jnp.float32))
    return model.apply, params


# ------------------------------------------------------------------------------------------
# 1. Never below the truth
# ------------------------------------------------------------------------------------------


def _case(name):
    """(fn, params, a batch of x) of each model."""
    if name == "mlp_relu":
        p = mlp_params(0, [8, 16, 16, 4])
        fn = mlp([jax.nn.relu, jax.nn.relu])
        return fn, p, jnp.zeros((3, 8), jnp.float32)
    if name == "mlp_smooth":
        acts = [lambda z: jax.nn.elu(jax.nn.gelu(z)), lambda z: jax.nn.leaky_relu(jax.nn.silu(jnp.tanh(z)), 0.2)]
        p = mlp_params(1, [6, 10, 10, 3])
        return mlp(acts), p, jnp.zeros((3, 6), jnp.float32)
    if name == "residual_mlp":
        return residual_mlp, residual_mlp_params(2), jnp.zeros((3, 6), jnp.float32)
    if name == "residual_cnn":
        return residual_cnn, residual_cnn_params(3), jnp.zeros((2, 3, 8, 8), jnp.float32)
    if name == "transformer_no_ln":
        return transformer_no_ln, transformer_params(4), jnp.zeros((2, 4, 8), jnp.float32)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["mlp_relu", "mlp_smooth", "residual_mlp", "residual_cnn", "transformer_no_ln"])
def test_never_below_jacobian_plain_jax(name):
    fn, p, x = _case(name)
    cert = nj.lipschitz_certificate(fn, p, x)
    lower = jacobian_lower_bound(per_example(fn, p), x[0], **_search(name))
    _assert_sound(cert, lower)


def test_never_below_jacobian_linen_cnn_with_pooling():
    apply, params = _linen_cnn()
    x = jnp.zeros((2, 8, 8, 3), jnp.float32)
    with jax.numpy_dtype_promotion("standard"):  # flax's avg_pool divides by an int
        cert = nj.lipschitz_certificate(apply, params, x)
        lower = jacobian_lower_bound(per_example(apply, params), x[0], **_search("relu"))
    rules = " ".join(op.rule for op in cert.ops)
    assert "convolution" in rules and "sum pooling" in rules and "max pooling" in rules
    _assert_sound(cert, lower)


def test_residual_transformer_pattern_uses_fixed_attention_norm():
    """The fixed attention pattern enters through its exact spectral norm (not refused)."""
    fn, p, x = _case("transformer_no_ln")
    cert = nj.lipschitz_certificate(fn, p, x)
    n = len(p["blocks"])
    expected = 1.0
    for blk in p["blocks"]:
        a = np.asarray(jax.nn.softmax(blk["scores"], axis=-1), np.float64)
        attn = np.linalg.norm(a, 2) * np_sigma(blk["wv"]) * np_sigma(blk["wo"]) / n
        ffn = 1.13 * np_sigma(blk["w1"]) * np_sigma(blk["w2"]) / n
        expected *= (1 + attn) * (1 + ffn)
    assert float(cert) >= expected * (1 - 1e-6)
    assert float(cert) <= expected * (1 + 1e-3)


def test_equinox_mlp_and_conv_per_example():
    eqx = pytest.importorskip("equinox")
    k1, k2 = jax.random.split(jax.random.key(5))
    mlp_m = eqx.nn.MLP(8, 4, 16, depth=1, activation=jax.nn.silu, key=k1)
    fn = lambda m, x: m(x)
    x = jnp.zeros((8,), jnp.float32)
    c_none = nj.lipschitz_certificate(fn, mlp_m, x, batch_axis=None)
    c_auto = nj.lipschitz_certificate(fn, mlp_m, x)
    assert float(c_none) == float(c_auto)
    lower = jacobian_lower_bound(lambda xi: mlp_m(xi), x, **_search("random"))
    _assert_sound(c_none, lower)
    # equinox stores weights (out, in): the product of float64 SVDs times silu's constant
    ws = [l.weight for l in mlp_m.layers]
    prod = np.prod([np_sigma(w) for w in ws]) * 1.1
    assert float(c_none) >= prod * (1 - 1e-6) and float(c_none) <= prod * (1 + 1e-3)

    conv = eqx.nn.Conv2d(3, 4, 3, stride=2, padding=1, key=k2)
    cfn = lambda m, x: jax.nn.relu(m(x))
    xc = jnp.zeros((3, 8, 8), jnp.float32)
    cc = nj.lipschitz_certificate(cfn, conv, xc, batch_axis=None)
    lower_c = jacobian_lower_bound(lambda xi: cfn(conv, xi), xc, **_search("relu"))
    _assert_sound(cc, lower_c)
    # the conv is linear: its Jacobian's norm is its operator norm; relu is 1-Lipschitz
    exact = float(_sigmas(lambda xi: conv(xi), xc[None])[0])
    assert exact <= float(cc) * (1 + REL) and float(cc) <= exact * 1.01


def test_flax_nnx_model_split_merge():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(8, 16, rngs=rngs)  # elu, then a residual leaky ReLU
            self.l2 = nnx.Linear(16, 16, rngs=rngs)

        def __call__(self, x):
            x = jax.nn.elu(self.l1(x))
            return x + jax.nn.leaky_relu(self.l2(x), 0.2)

    graphdef, state = nnx.split(Net(nnx.Rngs(6)))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)
    x = jnp.zeros((3, 8), jnp.float32)
    cert = nj.lipschitz_certificate(fn, state, x)
    lower = jacobian_lower_bound(per_example(fn, state), x[0], **_search("random"))
    _assert_sound(cert, lower)
    m = nnx.merge(graphdef, state)
    s1, s2 = (np_sigma(l.kernel[...]) for l in (m.l1, m.l2))
    expected = s1 * (1 + s2)  # elu(alpha=1) and leaky_relu(0.2) are 1-Lipschitz
    assert float(cert) >= expected * (1 - 1e-6) and float(cert) <= expected * (1 + 1e-3)


def test_flax_linen_mlp_and_param_names():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(16)(x))
            return nn.Dense(4)(x)

    model = Net()
    params = model.init(jax.random.key(7), jnp.zeros((1, 8), jnp.float32))
    x = jnp.zeros((3, 8), jnp.float32)
    cert = nj.lipschitz_certificate(model.apply, params, x)
    lower = jacobian_lower_bound(per_example(model.apply, params), x[0], **_search("relu"))
    _assert_sound(cert, lower)
    # breakdown: the parameter path of each linear op, and one table row per op
    named = [op.param for op in cert.ops if op.param]
    for i in range(2):
        assert any(f"Dense_{i}/kernel" in s for s in named), named
    table = cert.table()
    assert isinstance(table, str)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(cert.ops) + 1  # header, separator, ops, output
    for op in cert.ops:
        assert any(op.site in line for line in lines)
    assert f"{float(cert):.6g}" in lines[-1]
    # a chain: the last op's bound is the certificate
    assert float(cert.ops[-1].bound) == float(cert.bound)
    # and each linear factor is that kernel's norm, the bounds their running product
    run = 1.0
    for op in cert.ops:
        k = params["params"][op.param.split("/")[-2]]["kernel"]
        assert float(op.factor) == pytest.approx(np_sigma(k), rel=1e-3)
        run *= float(op.factor)
        assert float(op.bound) == pytest.approx(run, rel=1e-5)


def _bf16_case():
    rng = np.random.default_rng(8)
    p32 = {"w1": _dense(rng, 8, 16, 1.5), "w2": _dense(rng, 16, 4, 1.5)}
    p16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), p32)

    def fn(p, x):  # computes in the weights' dtype
        h = x.astype(p["w1"].dtype)
        h = jax.nn.silu(h @ p["w1"])
        return (h @ p["w2"]).astype(jnp.float32)

    return fn, p16, jnp.zeros((3, 8), jnp.float32)


def test_bfloat16_weights_bound_the_float32_function():
    fn, p16, x = _bf16_case()
    with jax.numpy_dtype_promotion("standard"):
        cert = nj.lipschitz_certificate(fn, p16, x)
    up = jax.tree.map(lambda w: w.astype(jnp.float32), p16)  # the same numbers, in float32
    lower = jacobian_lower_bound(per_example(fn, up), x[0], **_search("random"))
    _assert_sound(cert, lower)
    expected = np_sigma(up["w1"]) * np_sigma(up["w2"]) * 1.1
    assert float(cert) >= expected * (1 - 1e-6)
    assert float(cert) <= expected * (1 + 1e-3)


def _scale_a(p, x):
    return x * p


def _scale_b(p, x):
    return x * p


def test_sites_name_the_certified_function_not_an_earlier_one():
    """Two functions with the same jaxpr (so the compiled walk is reused): each certificate's
    sites point at its own source line."""
    x = jnp.zeros((2, 3), jnp.float32)
    ca = nj.lipschitz_certificate(_scale_a, jnp.float32(2.0), x)
    cb = nj.lipschitz_certificate(_scale_b, jnp.float32(2.0), x)
    assert float(ca) == float(cb) == pytest.approx(2.0, rel=1e-5)
    assert "_scale_a" in ca.ops[0].site
    assert "_scale_b" in cb.ops[0].site, cb.ops[0].site


def _exp_a(p, x):
    return jnp.exp(x)


def _exp_b(p, x):
    return jnp.exp(x)


def test_refusal_names_the_refused_function_not_an_earlier_one():
    x = jnp.zeros((2, 3), jnp.float32)
    with pytest.raises(nj.NotCertifiable, match="_exp_a"):
        nj.lipschitz_certificate(_exp_a, {}, x)
    with pytest.raises(nj.NotCertifiable, match="_exp_b"):
        nj.lipschitz_certificate(_exp_b, {}, x)


def test_bfloat16_weights_under_strict_dtype_promotion():
    """This repository runs with ``jax_numpy_dtype_promotion="strict"`` (conftest.py): a
    bfloat16 model must certify there too, to the same bound."""
    assert jax.config.jax_numpy_dtype_promotion == "strict"
    fn, p16, x = _bf16_case()
    with jax.numpy_dtype_promotion("standard"):
        ref = float(nj.lipschitz_certificate(fn, p16, x))
    assert float(nj.lipschitz_certificate(fn, p16, x)) == pytest.approx(ref, rel=1e-6)


def test_batchnorm_inference_certified_train_refused():
    import flax.linen as nn

    class Net(nn.Module):
        train: bool

        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8)(x)
            x = nn.BatchNorm(use_running_average=not self.train)(x)
            return nn.Dense(3)(nn.relu(x))

    x = jnp.zeros((3, 6), jnp.float32)
    v = Net(train=False).init(jax.random.key(9), x)
    rng = np.random.default_rng(9)
    # running variance below 1: the normalisation scales up, and the bound must see it
    v = {
        "params": v["params"],
        "batch_stats": {"BatchNorm_0": {"mean": _f32(rng.normal(size=(8,))), "var": _f32(rng.uniform(0.05, 0.5, size=(8,)))}},
    }
    apply = Net(train=False).apply
    cert = nj.lipschitz_certificate(apply, v, x)
    lower = jacobian_lower_bound(per_example(apply, v), x[0], **_search("relu"))
    _assert_sound(cert, lower)
    var = np.asarray(v["batch_stats"]["BatchNorm_0"]["var"], np.float64)
    scale = np.max(np.asarray(v["params"]["BatchNorm_0"]["scale"], np.float64) / np.sqrt(var + 1e-5))
    assert scale > 1.3
    d0, d1 = (np_sigma(v["params"][f"Dense_{i}"]["kernel"]) for i in (0, 1))
    # the normalisation is a diagonal scaling: the bound is the product with its largest entry
    assert d0 * d1 * scale * (1 - 1e-5) <= float(cert) <= d0 * d1 * scale * (1 + 1e-3)

    train = Net(train=True)
    with pytest.raises(nj.NotCertifiable, match="example axis"):
        nj.lipschitz_certificate(lambda p, x: train.apply(p, x, mutable=["batch_stats"])[0], v, x)


# ------------------------------------------------------------------------------------------
# 2. Tightness and closed forms
# ------------------------------------------------------------------------------------------


def test_chain_equals_product_of_layer_norms():
    p = mlp_params(10, [8, 16, 16, 4], scale=2.0)  # mlp_relu's shapes: its compiled walk is reused
    fn = mlp([jax.nn.relu, jax.nn.relu])
    cert = nj.lipschitz_certificate(fn, p, jnp.zeros((3, 8), jnp.float32))
    prod = np.prod([np_sigma(p[f"l{i}"]["w"]) for i in range(3)])
    assert float(cert) >= prod
    assert float(cert) <= prod * (1 + 1e-3)


def _projection_residual(p, x):
    # y = W3 x + W2 relu(W1 x): a residual block with a projection shortcut
    return x @ p["w3"] + jax.nn.relu(x @ p["w1"]) @ p["w2"]


def _scaled_orthogonal(rng, n, top):
    """An (n, n) matrix with singular values in [0.5, top], the largest exactly ``top``."""
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.concatenate([rng.uniform(0.5, top, size=n - 1), [top]])
    return _f32(q * s[None, :])


def test_residual_bound_beats_product_of_layer_norms():
    """Every layer's norm is >= 2: the sum-of-branches bound s1 s2 + s3 is the certificate, and
    it is strictly below the product s1 s2 s3 of all layer norms. (With an identity shortcut,
    1 + s1 s2 is never below s1 s2: the comparison needs a learned shortcut.)"""
    rng = np.random.default_rng(11)
    d = 6
    p = {k: _scaled_orthogonal(rng, d, top) for k, top in (("w1", 2.0), ("w2", 2.5), ("w3", 3.0))}
    s1, s2, s3 = (np_sigma(p[k]) for k in ("w1", "w2", "w3"))
    assert min(s1, s2, s3) >= 2.0 - 1e-6
    cert = nj.lipschitz_certificate(_projection_residual, p, jnp.zeros((3, d), jnp.float32))
    closed = s1 * s2 + s3
    assert closed <= float(cert) <= closed * (1 + 1e-3)
    assert float(cert) < s1 * s2 * s3
    lower = jacobian_lower_bound(per_example(_projection_residual, p), jnp.zeros((d,), jnp.float32), **_search("relu"))
    _assert_sound(cert, lower)


def test_naive_product_is_not_a_bound_for_identity_residuals():
    p = residual_mlp_params(12, scale=0.4)  # branch norms < 1
    cert = nj.lipschitz_certificate(residual_mlp, p, jnp.zeros((3, 6), jnp.float32))
    layers = [*[w for b in p["blocks"] for w in (b["w1"], b["w2"])], p["out"]]
    naive = np.prod([np_sigma(w) for w in layers])
    assert max(np_sigma(w) for b in p["blocks"] for w in (b["w1"], b["w2"])) < 1
    lower = jacobian_lower_bound(per_example(residual_mlp, p), jnp.zeros((6,), jnp.float32), **_search("relu"))
    assert naive < lower  # the product of layer norms undercounts the skip connections
    _assert_sound(cert, lower)
    closed = np_sigma(p["out"]) * np.prod(
        [1 + np_sigma(b["w1"]) * np_sigma(b["w2"]) for b in p["blocks"]]
    )
    assert float(cert) >= closed and float(cert) <= closed * (1 + 1e-3)


def _cert(f, x, **kw):
    return float(nj.lipschitz_certificate(lambda p, x: f(x), {}, x, **kw))


def test_linear_residual_closed_forms():
    x = jnp.zeros((3, 4), jnp.float32)
    assert _cert(lambda x: x + 0.5 * x, x) == pytest.approx(1.5, rel=1e-5)
    assert _cert(lambda x: x + 0.5 * x, x) >= 1.5
    p = {"w1": 2.0 * jnp.eye(4, dtype=jnp.float32), "w2": 3.0 * jnp.eye(4, dtype=jnp.float32)}
    c = float(nj.lipschitz_certificate(lambda p, x: x + jax.nn.relu(x @ p["w1"]) @ p["w2"], p, x))
    assert 7.0 <= c <= 7.0 * (1 + 1e-3)


def test_pooling_closed_forms():
    import flax.linen as nn

    x = jnp.zeros((2, 8, 8, 3), jnp.float32)
    with jax.numpy_dtype_promotion("standard"):
        avg = _cert(lambda x: nn.avg_pool(x, (2, 2), strides=(2, 2)), x)
    assert 0.5 <= avg <= 0.5 * (1 + 1e-5)
    mp2 = _cert(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)
    assert 1.0 <= mp2 <= 1.0 + 1e-5
    f3 = lambda x: nn.max_pool(x, (3, 3), strides=(1, 1))
    mp3 = _cert(f3, x)
    assert 3.0 <= mp3 <= 3.0 * (1 + 1e-5)
    # and 3 is attained: a spike in the interior is the max of the 9 windows that cover it
    spike = jnp.zeros((1, 8, 8, 1), jnp.float32).at[0, 4, 4, 0].set(5.0)
    truth = float(_sigmas(lambda xi: f3(xi[None])[0], spike[0][None])[0])
    assert truth == pytest.approx(3.0, rel=1e-6)


def test_concatenation_and_sorting_layers():
    x = jnp.zeros((3, 6), jnp.float32)
    two = _cert(lambda x: jnp.concatenate([x, x], axis=-1), x)
    assert math.sqrt(2) <= two <= math.sqrt(2) * (1 + 1e-5)

    def maxmin(x):
        a, b = jnp.split(x, 2, axis=-1)
        return jnp.concatenate([jnp.maximum(a, b), jnp.minimum(a, b)], axis=-1)

    def groupsort(x):
        return jnp.sort(x.reshape(x.shape[0], -1, 2), axis=-1).reshape(x.shape)

    def maxmin_reduce(x):
        g = x.reshape(x.shape[0], -1, 2)
        return jnp.concatenate([g.max(-1), g.min(-1)], axis=-1)

    for f in (maxmin, groupsort, maxmin_reduce):
        c = _cert(f, x)
        assert 1.0 <= c <= 1.0 + 1e-5, f.__name__
        # the truth: a permutation of the input, Jacobian norm 1 everywhere
        truth = jacobian_lower_bound(lambda xi: f(xi[None])[0], x[0], n_random=4, n_starts=0)
        assert truth == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize(
    "f",
    [
        lambda x: (lambda g: jnp.concatenate([g.max(-1), g.min(-1)], -1))(x.reshape(x.shape[0], -1, 1)),
        lambda x: jnp.concatenate([jnp.max(x, axis=()), jnp.min(x, axis=())], axis=-1),
    ],
    ids=["groups_of_one", "empty_axes"],
)
def test_max_min_of_one_element_groups_is_not_a_permutation(f):
    """[max over a group, min over the same group] is 1-Lipschitz only for groups of >= 2.
    With groups of one element (or an empty reduction) both are the element itself: the map is
    x -> [x, x], whose Lipschitz constant is sqrt(2)."""
    x = jnp.zeros((3, 6), jnp.float32)
    truth = float(_sigmas(lambda xi: f(xi[None])[0], x[:1] + 1.0)[0])
    assert truth == pytest.approx(math.sqrt(2), rel=1e-6)
    _assert_sound(nj.lipschitz_certificate(lambda p, x: f(x), {}, x), truth)


def test_scalar_times_vector_per_example():
    freqs = jnp.asarray([3.0, 4.0], jnp.float32)
    single = float(nj.lipschitz_certificate(lambda p, t: t * p, freqs, jnp.zeros((), jnp.float32), batch_axis=None))
    assert 5.0 <= single <= 5.0 * (1 + 1e-5)  # ||freqs||_2


@pytest.mark.parametrize(
    "f",
    [lambda p, t: t[:, None] * p[None, :], lambda p, t: t[:, None] / (1.0 / p)[None, :]],
    ids=["mul", "div"],
)
def test_broadcast_scalar_times_vector_batched(f):
    """A per-example scalar times a constant vector (a sinusoidal time embedding's
    ``t[:, None] * freqs``) is the linear map ``t -> t freqs``: Lipschitz ``||freqs||_2`` (5 here),
    not ``max |freqs|`` (4). jax multiplies (B, 1) by (1, 2) with implicit size-1 broadcasting."""
    freqs = jnp.asarray([3.0, 4.0], jnp.float32)
    t = jnp.zeros((4,), jnp.float32)
    truth = float(_sigmas(lambda ti: f(freqs, ti[None])[0], t[:1])[0])
    assert truth == pytest.approx(5.0, rel=1e-6)
    _assert_sound(nj.lipschitz_certificate(f, freqs, t), truth)


@pytest.mark.parametrize(
    "f, want",
    [
        (lambda x: jnp.maximum(x[:, :1], x), math.sqrt(5)),
        (lambda x: jnp.maximum(x[:, :1], x[:, 1:]), 2.0),
        (lambda x: jnp.minimum(-x[:, :1], x), math.sqrt(5)),
    ],
    ids=["max_slice_full", "max_disjoint_slices", "min_neg_slice_full"],
)
def test_max_with_a_broadcast_operand(f, want):
    """``max(x[:, :1], x)``: where ``x_0`` is the largest entry every output is ``x_0``, so the
    Jacobian has a column of ones: norm sqrt(5) (jax broadcasts the (B, 1) operand implicitly).
    ``max(x[:, :1], x[:, 1:])``: likewise 2."""
    x = jnp.zeros((3, 5), jnp.float32)
    at = jnp.asarray([[10.0, 0.0, 0.0, 0.0, 0.0]], jnp.float32)
    truth = float(_sigmas(lambda xi: f(xi[None])[0], at)[0])
    assert truth == pytest.approx(want, rel=1e-6)
    _assert_sound(nj.lipschitz_certificate(lambda p, x: f(x), {}, x), truth)


# ------------------------------------------------------------------------------------------
# 3. Activation constants
# ------------------------------------------------------------------------------------------

_GRID = np.linspace(-20.0, 20.0, 400_001)


def _np_softplus(x):
    return np.logaddexp(0.0, x)


def _np_elu(a):
    return lambda x: np.where(x > 0, x, a * np.expm1(np.minimum(x, 0)))


_SELU_A, _SELU_S = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
_ACTS = {
    "gelu_tanh": (lambda x: jax.nn.gelu(x, approximate=True),
                  lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    "gelu_erf": (lambda x: jax.nn.gelu(x, approximate=False), lambda x: 0.5 * x * (1 + scipy.special.erf(x / math.sqrt(2)))),
    "silu": (jax.nn.silu, lambda x: x / (1 + np.exp(-x))),
    "mish": (jax.nn.mish, lambda x: x * np.tanh(_np_softplus(x))),
    "softplus": (jax.nn.softplus, _np_softplus),
    "elu_1": (jax.nn.elu, _np_elu(1.0)),
    "elu_2": (lambda x: jax.nn.elu(x, 2.0), _np_elu(2.0)),
    "leaky_relu_0.2": (lambda x: jax.nn.leaky_relu(x, 0.2), lambda x: np.where(x > 0, x, 0.2 * x)),
    "leaky_relu_3": (lambda x: jax.nn.leaky_relu(x, 3.0), lambda x: np.where(x > 0, x, 3.0 * x)),
    "selu": (jax.nn.selu, lambda x: _SELU_S * np.where(x > 0, x, _SELU_A * np.expm1(np.minimum(x, 0)))),
    "celu_1": (jax.nn.celu, lambda x: np.maximum(x, 0) + np.minimum(0, np.expm1(x))),
    "celu_2": (lambda x: jax.nn.celu(x, 2.0), lambda x: np.maximum(x, 0) + np.minimum(0, 2.0 * np.expm1(x / 2.0))),
    "hard_silu": (jax.nn.hard_silu, lambda x: x * np.clip(x + 3, 0, 6) / 6),
    "sigmoid": (jax.nn.sigmoid, lambda x: 1 / (1 + np.exp(-x))),
    "tanh": (jnp.tanh, np.tanh),
    "relu": (jax.nn.relu, lambda x: np.maximum(x, 0)),
    "relu6": (jax.nn.relu6, lambda x: np.clip(x, 0, 6)),
    "soft_sign": (jax.nn.soft_sign, lambda x: x / (1 + np.abs(x))),
    "log_sigmoid": (jax.nn.log_sigmoid, lambda x: -_np_softplus(-x)),
    "hand_leaky": (lambda x: jnp.where(x > 0, x, 0.1 * x), lambda x: np.where(x > 0, x, 0.1 * x)),
}


@pytest.mark.parametrize("name", list(_ACTS))
def test_activation_constant_is_tight_sup_of_slope(name):
    act, ref = _ACTS[name]
    with np.errstate(over="ignore"):
        y = ref(_GRID)
    slope = float(np.max(np.abs(np.diff(y)) / np.diff(_GRID)))
    c = _cert(act, jnp.zeros((2, 5), jnp.float32))
    assert c >= slope
    assert c <= 1.01 * slope


def test_prelu_with_per_channel_slopes_gives_a_scalar_bound():
    """PReLU: ``jax.nn.leaky_relu(x, slope)`` with a learned slope per channel. The map is
    diagonal with entries in {1, slope_c}: Lipschitz max(1, max |slope|) = 4 here, and the
    certificate, like every certificate, is one number."""
    slope = _f32([0.1, 2.5, 0.3, 4.0])
    x = jnp.zeros((3, 4), jnp.float32)
    f = lambda p, x: jax.nn.leaky_relu(x, p)
    truth = float(_sigmas(lambda xi: f(slope, xi[None])[0], -jnp.ones((1, 4), jnp.float32))[0])
    assert truth == pytest.approx(4.0, rel=1e-6)
    cert = nj.lipschitz_certificate(f, slope, x)
    assert np.shape(cert.bound) == ()
    assert 4.0 <= float(cert) <= 4.0 * (1 + 1e-5)


# ------------------------------------------------------------------------------------------
# 4. Refusals
# ------------------------------------------------------------------------------------------


def test_not_certifiable_is_a_value_error():
    assert issubclass(nj.NotCertifiable, ValueError)


def _softmax_attention(p, x):
    q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
    s = jnp.einsum("btd,bsd->bts", q, k) / 2.0
    return jax.nn.softmax(s, axis=-1) @ v


def _while_over_x(p, x):
    return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, 0.5 * c[1] + 1.0), (0, x))[1]


def _layernorm_model():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.LayerNorm()(nn.Dense(8)(x)))

    v = Net().init(jax.random.key(0), jnp.zeros((1, 6), jnp.float32))
    return Net().apply, v


_REFUSED = {
    "softmax_attention": (
        _softmax_attention,
        {k: _f32(np.random.default_rng(14).normal(size=(8, 8)) / 3) for k in "qkv"},
        jnp.zeros((2, 4, 8), jnp.float32),
        ("dot_general",),
    ),
    "layernorm": (None, None, jnp.zeros((2, 6), jnp.float32), ("rsqrt", "integer_pow", "square", "pow")),
    "normalise": (lambda p, x: x / jnp.linalg.norm(x, axis=-1, keepdims=True), {}, jnp.zeros((2, 6), jnp.float32),
                  ("div", "mul", "square", "integer_pow", "sqrt")),
    "divide_by_input": (lambda p, x: x / jnp.maximum(jnp.abs(x), 1e-3), {}, jnp.zeros((2, 6), jnp.float32), ("div",)),
    "exp": (lambda p, x: jnp.exp(x), {}, jnp.zeros((2, 6), jnp.float32), ("exp",)),
    "while_loop": (_while_over_x, {}, jnp.zeros((2, 6), jnp.float32), ("while",)),
    "sign": (lambda p, x: jnp.sign(x), {}, jnp.zeros((2, 6), jnp.float32), ("sign",)),
}


@pytest.mark.parametrize("name", list(_REFUSED))
def test_refusals_name_the_primitive(name):
    fn, p, x, prims = _REFUSED[name]
    if name == "layernorm":
        fn, p = _layernorm_model()
    with pytest.raises(nj.NotCertifiable) as e:
        nj.lipschitz_certificate(fn, p, x)
    msg = str(e.value)
    assert any(pr in msg for pr in prims), msg


def test_integer_token_input_is_refused():
    emb = _f32(np.random.default_rng(15).normal(size=(10, 4)))
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(nj.NotCertifiable):
        nj.lipschitz_certificate(lambda p, t: jnp.take(p, t, axis=0), emb, ids)
    with pytest.raises(ValueError):  # also a ValueError
        nj.lipschitz_certificate(lambda p, t: jnp.take(p, t, axis=0), emb, ids)


def test_mixing_examples_is_refused():
    x = jnp.zeros((3, 6), jnp.float32)
    for f in (lambda p, x: x - x.mean(axis=0), lambda p, x: jnp.roll(x, 1, axis=0), lambda p, x: x.reshape(-1)):
        with pytest.raises(nj.NotCertifiable, match="example axis|examples"):
            nj.lipschitz_certificate(f, {}, x, batch_axis=0)


@pytest.mark.parametrize(
    "f",
    [
        lambda x: (x > 0).astype(jnp.float32),  # a step: no Lipschitz constant at all
        lambda x: x + 3.0 * (x > 0).astype(jnp.float32),  # 1-Lipschitz off 0, jumps by 3 at 0
    ],
    ids=["step", "identity_plus_step"],
)
def test_comparison_cast_to_float_is_not_lipschitz(f):
    """A comparison turned into a float is a step function: it must be refused (or given no
    finite bound). Checked directly: two inputs 2e-6 apart straddling 0 whose outputs differ
    by >= 1, so any finite certificate L must satisfy 1 <= L * 2e-6 * sqrt(6)."""
    x = jnp.zeros((2, 6), jnp.float32)
    try:
        cert = float(nj.lipschitz_certificate(lambda p, x: f(x), {}, x))
    except nj.NotCertifiable:
        return
    a = jnp.full((1, 6), 1e-6, jnp.float32)
    b = -a
    lhs = float(jnp.linalg.norm(f(a) - f(b)))
    rhs = cert * float(jnp.linalg.norm(a - b))
    assert lhs <= rhs, f"certificate {cert} but |f(a) - f(b)| = {lhs} > L |a - b| = {rhs}"


# ------------------------------------------------------------------------------------------
# 5. Stacked layers in a scan
# ------------------------------------------------------------------------------------------


def _stack(seed, L=4, n=6):
    rng = np.random.default_rng(seed)
    return _f32(rng.normal(size=(L, n, n)) * rng.uniform(0.5, 2.0, size=(L, 1, 1)) / math.sqrt(n))


def _scan_ops(cert, L):
    ops = [op for op in cert.ops if np.shape(op.factor) == (L,)]
    assert ops, [(op.rule, np.shape(op.factor)) for op in cert.ops]
    return ops


def test_scan_stacked_layers_product_of_norms():
    ws = _stack(16)
    L = ws.shape[0]

    def fn(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x, p)
        return h

    x = jnp.zeros((3, 6), jnp.float32)
    cert = nj.lipschitz_certificate(fn, ws, x)
    sig = np.asarray([np_sigma(w) for w in ws])
    assert float(cert) >= np.prod(sig) and float(cert) <= np.prod(sig) * (1 + 1e-3)
    ops = _scan_ops(cert, L)
    lin = [op for op in ops if "linear" in op.rule]
    assert len(lin) == 1
    np.testing.assert_allclose(np.asarray(lin[0].factor, np.float64), sig, rtol=1e-3)
    assert np.all(np.asarray(lin[0].factor, np.float64) >= sig)
    np.testing.assert_allclose(np.asarray(lin[0].bound, np.float64), np.cumprod(sig), rtol=1e-3)
    _assert_sound(cert, jacobian_lower_bound(per_example(fn, ws), x[0], **_search("relu")))


def test_scan_residual_layers():
    ws = _stack(17)
    L = ws.shape[0]

    def fn(p, x):
        h, _ = jax.lax.scan(lambda h, w: (h + jax.nn.relu(h @ w), None), x, p)
        return h

    x = jnp.zeros((3, 6), jnp.float32)
    cert = nj.lipschitz_certificate(fn, ws, x)
    sig = np.asarray([np_sigma(w) for w in ws])
    closed = np.prod(1 + sig)
    assert float(cert) >= closed and float(cert) <= closed * (1 + 1e-3)
    factors = [np.asarray(op.factor, np.float64) for op in _scan_ops(cert, L) if "linear" in op.rule]
    assert len(factors) == 1 and factors[0].shape == (L,)
    np.testing.assert_allclose(factors[0], sig, rtol=1e-3)
    _assert_sound(cert, jacobian_lower_bound(per_example(fn, ws), x[0], **_search("relu")))


# ------------------------------------------------------------------------------------------
# 7. Certified radius and accuracy
# ------------------------------------------------------------------------------------------


def _np_radius(logits, labels, L):
    out = []
    for z, y in zip(np.asarray(logits, np.float64), np.asarray(labels)):
        others = np.delete(z, y)
        m = z[y] - others.max()
        out.append(m / (math.sqrt(2) * L) if m > 0 else 0.0)
    return np.asarray(out)


def test_certified_radius_and_accuracy_against_numpy():
    rng = np.random.default_rng(18)
    logits = rng.normal(size=(40, 5)).astype(np.float32)
    labels = logits.argmax(1).astype(np.int32)
    labels[:10] = rng.integers(0, 5, size=10)  # some misclassified
    labels[3] = (int(logits[3].argmax()) + 1) % 5  # surely misclassified
    logits[7, :] = 0.0
    logits[7, 2] = logits[7, 4] = 1.0  # a tie for the top
    labels[7] = 2
    L = 1.7
    ref = _np_radius(logits, labels, L)
    got = np.asarray(nj.certified_radius(jnp.asarray(logits), jnp.asarray(labels), L), np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)
    assert got[3] == 0.0 and got[7] == 0.0
    assert (got > 0).sum() >= 25

    cert = nj.Certificate(jnp.asarray(L, jnp.float32))
    got_c = np.asarray(nj.certified_radius(jnp.asarray(logits), jnp.asarray(labels), cert), np.float64)
    np.testing.assert_allclose(got_c, got, rtol=1e-6)

    radii = [0.0, 0.1, 0.3, 0.6, 1.0]
    acc = np.asarray(nj.certified_accuracy(jnp.asarray(logits), jnp.asarray(labels), cert, radii), np.float64)
    np.testing.assert_allclose(acc, [(ref > r).mean() for r in radii], atol=1e-7)
    top = logits.max(1)
    clean = np.mean([(logits[i, labels[i]] == top[i]) and (logits[i] == top[i]).sum() == 1 for i in range(40)])
    assert acc[0] == pytest.approx(clean)
    assert np.all(np.diff(acc) <= 0)


def test_certified_radius_bfloat16_logits_under_strict_promotion():
    """bfloat16 logits (a bfloat16 model's output) under this repository's strict promotion."""
    logits = np.asarray([[3.0, 1.0, 0.5], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]], np.float32)
    labels = np.asarray([0, 1, 1], np.int32)
    ref = _np_radius(logits, labels, 2.0)
    got = nj.certified_radius(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), 2.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-2)


# ------------------------------------------------------------------------------------------
# 8. jit
# ------------------------------------------------------------------------------------------


def test_deterministic_and_inside_jit():
    fn, p, x = _case("mlp_relu")
    c1 = nj.lipschitz_certificate(fn, p, x)
    c2 = nj.lipschitz_certificate(fn, p, x)
    assert float(c1) == float(c2)
    jitted = jax.jit(lambda q: nj.lipschitz_certificate(fn, q, x))
    cj = jitted(p)
    assert isinstance(cj, nj.Certificate)
    assert float(cj) == pytest.approx(float(c1), rel=1e-6)
    assert len(cj.ops) == len(c1.ops)
    for a, b in zip(cj.ops, c1.ops):
        assert a.site == b.site and a.rule == b.rule and a.param == b.param
        np.testing.assert_allclose(np.asarray(a.bound), np.asarray(b.bound), rtol=1e-6)
    # new parameter values through the same compiled walk: a new bound
    p2 = jax.tree.map(lambda w: 2.0 * w, p)
    c3 = jitted(p2)
    assert float(c3) > float(c1)
    assert float(c3) == pytest.approx(float(nj.lipschitz_certificate(fn, p2, x)), rel=1e-6)


def test_readme_residual_example():
    """The README's worked example: three blocks x + W2 relu(W1 x), every ||W|| = 1 (16 features).

    The per-layer product (nj.lipschitz_bound) is 1 and below the largest Jacobian norm found
    (so not a bound); one (1 + ||W||) factor per layer gives 64; the certificate gives
    (1 + ||W1|| ||W2||)^3 = 8 and is above every Jacobian norm found."""

    def resnet(p, x):
        for blk in p:
            x = x + jax.nn.relu(x @ blk["w1"]) @ blk["w2"]
        return x

    key = jax.random.key(0)
    ps = []
    for _ in range(3):
        k1, k2, key = jax.random.split(key, 3)
        blk = {}
        for name, k in (("w1", k1), ("w2", k2)):
            w = np.asarray(jax.random.normal(k, (16, 16)), np.float64)
            blk[name] = jnp.asarray(w / np.linalg.svd(w, compute_uv=False)[0], jnp.float32)
        ps.append(blk)
    sig = [np.linalg.svd(np.asarray(b[k], np.float64), compute_uv=False)[0] for b in ps for k in b]
    product = float(np.prod(sig))
    per_layer = float(np.prod([1 + s for s in sig]))
    cert = float(nj.lipschitz_certificate(resnet, ps, jnp.zeros((1, 16))))
    g = lambda x: resnet(ps, x[None])[0]
    # the Jacobians at 64 points, in one compiled call (not 64 eager ones)
    points = jnp.stack([3 * jax.random.normal(jax.random.key(s), (16,)) for s in range(64)])
    jacobians = np.asarray(jax.jit(jax.vmap(jax.jacfwd(g)))(points), np.float64)
    lower = max(np.linalg.svd(j, compute_uv=False)[0] for j in jacobians)
    assert abs(product - 1.0) < 1e-5 and abs(float(nj.lipschitz_bound(ps)) - 1.0) < 1e-3
    assert lower > 1.5 > product  # the per-layer product is not a bound here
    assert abs(per_layer - 64.0) < 1e-3
    exact = float(np.prod([1 + sig[2 * i] * sig[2 * i + 1] for i in range(3)]))
    assert exact <= cert <= exact * (1 + 1e-3) and abs(cert - 8.0) < 1e-2
    assert lower <= cert
