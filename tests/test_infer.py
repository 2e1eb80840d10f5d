"""``infer_views`` on real Flax (Linen, NNX), Equinox and plain-JAX models.

Every expected view is written by hand. Independent checks, in float64 (``jax.enable_x64``)
with NumPy:

- a dense view (``MatrixDims``) is checked against the Jacobian of the layer's pre-activation
  with respect to the layer's input (one sample), the layer rebuilt on its own from the same
  parameter subtree: with the leaf transposed to ``(batch..., in..., out...)`` and reshaped
  ``(B, R, C)``, batch index ``b``'s matrix transposed *is* that Jacobian (the row of output
  unit ``j`` is exactly its fan-in vector);
- a convolution view (``ConvSpec``) is checked twice: ``normjax.conv_spectral_norm(kernel,
  **fields, method="svd")`` equals the largest singular value of the layer's Jacobian to 1e-5
  relative, and the operator rebuilt from the spec alone with ``lax.conv_general_dilated``
  (the kernel permuted by its letter layout; wrap/reflect pads for CIRCULAR/REFLECT) has the
  same singular values as the layer, all of them.
"""

import dataclasses
import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from normjax._conv import ConvSpec, conv_spectral_norm
from normjax._infer import infer_views
from normjax._select import path_str
from normjax._viewtypes import Embedding, MatrixDims, NotMatrix

KEY = jax.random.key(0)
RNG = np.random.default_rng(0)


VIEWS = (MatrixDims, Embedding, NotMatrix, ConvSpec)
BIAS, SCALE = NotMatrix("bias"), NotMatrix("scale")
SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def flat(views):
    """``{path: view}`` of a views pytree (paths as the library writes them)."""
    leaves = jax.tree_util.tree_leaves_with_path(views, is_leaf=lambda v: isinstance(v, VIEWS))
    return {path_str(p): v for p, v in leaves}


def normal(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def MD(i, o):
    return MatrixDims(in_axes=i, out_axes=o)


def CS(input_shape, padding, *, strides=None, dilation=None, groups=1, layout=None, input_dilation=None, batch_dims=0):
    nd = len(input_shape)
    one = (1,) * nd
    return ConvSpec(
        input_shape=tuple(input_shape),
        strides=strides or one,
        padding=padding,
        kernel_dilation=dilation or one,
        feature_group_count=groups,
        kernel_layout=layout or SPATIAL[nd] + "IO",
        input_dilation=input_dilation or one,
        batch_dims=batch_dims,
    )


def linen_init(module, *args):
    """Random parameters for a Linen module, without running its initialisers (no compiling)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(module.init, KEY, *args)
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def f64(tree):
    """The floating-point leaves as float64 jax arrays (used inside ``jax.enable_x64``)."""

    def cast(a):
        return jnp.asarray(a, jnp.float64) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) else a

    with jax.enable_x64(True):
        return jax.tree.map(cast, tree)


def jacobians(fs, shape):
    """The float64 Jacobians of affine maps (pre-activations) of inputs of ``shape``, each as an
    ``(outputs, inputs)`` matrix: column ``i`` is ``f(e_i) - f(0)``. One compiled call for all."""
    n = math.prod(shape)

    def all_columns(basis):
        outs = []
        for f in fs:
            y = jax.vmap(f)(basis)
            outs.append((y[1:] - y[:1]).reshape(n, -1).T)
        return outs

    with jax.enable_x64(True):
        basis = jnp.concatenate([jnp.zeros((1, n)), jnp.eye(n)]).reshape((n + 1,) + tuple(shape))
        return [np.asarray(j, np.float64) for j in jax.jit(all_columns)(basis)]


def check_matrix(view, w, layers, in_shape):
    """``layers[b]`` is batch index ``b``'s layer (a function of one sample of shape ``in_shape``)."""
    w = np.asarray(w, np.float64)
    ins, outs = tuple(view.in_axes), tuple(view.out_axes)
    batch = [a for a in range(w.ndim) if a not in ins + outs]
    rows = math.prod(w.shape[a] for a in ins)
    cols = math.prod(w.shape[a] for a in outs)
    m = np.transpose(w, batch + list(ins) + list(outs)).reshape(-1, rows, cols)
    assert len(layers) == m.shape[0]
    for b, j in enumerate(jacobians(layers, in_shape)):
        np.testing.assert_allclose(j, m[b].T, rtol=0, atol=1e-12)


def conv_fields(spec):
    if hasattr(spec, "_asdict"):
        return spec._asdict()
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def spec_operator(spec, kernel):
    """The convolution a spec describes, on one channels-last sample: ``(f, input shape)``."""
    nd = len(spec.input_shape)
    sp = SPATIAL[nd]
    k = jnp.transpose(kernel, [spec.kernel_layout.index(c) for c in sp + "IO"])
    cin = k.shape[-2] * spec.feature_group_count
    dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C")

    def f(x):
        z, pads = x[None], spec.padding
        if pads in ("CIRCULAR", "REFLECT"):
            keff = [(n - 1) * d + 1 for n, d in zip(k.shape[:nd], spec.kernel_dilation)]
            mode = "wrap" if pads == "CIRCULAR" else "reflect"
            z = jnp.pad(z, [(0, 0)] + [((e - 1) // 2, e // 2) for e in keff] + [(0, 0)], mode=mode)
            pads = [(0, 0)] * nd
        return lax.conv_general_dilated(
            z, k, spec.strides, pads, lhs_dilation=spec.input_dilation, rhs_dilation=spec.kernel_dilation,
            dimension_numbers=dn, feature_group_count=spec.feature_group_count,
        )

    return f, tuple(spec.input_shape) + (cin,)


def library_norm(kernel, spec):
    """The library's exact norm, under jax.jit (one compile instead of one per primitive)."""
    fields = conv_fields(spec)
    return np.asarray(jax.jit(lambda k: conv_spectral_norm(k, **fields, method="svd"))(kernel))


def check_conv(spec, kernel, layers, in_shape):
    """``layers[b]``: batch index ``b``'s layer on one sample of shape ``in_shape`` (its own layout)."""
    kernel = np.asarray(kernel, np.float64)
    kernels = kernel.reshape((-1,) + kernel.shape[spec.batch_dims :])
    assert len(layers) == kernels.shape[0]
    with jax.enable_x64(True):
        norms = library_norm(jnp.asarray(kernel), spec).reshape(-1)
        rebuilt = [spec_operator(spec, jnp.asarray(kb)) for kb in kernels]
    assert all(shape == tuple(in_shape) for _, shape in rebuilt)
    js = jacobians(list(layers) + [f for f, _ in rebuilt], in_shape)
    for b in range(len(layers)):
        s_model = np.linalg.svd(js[b], compute_uv=False)
        s_spec = np.linalg.svd(js[len(layers) + b], compute_uv=False)
        np.testing.assert_allclose(norms[b], s_model[0], rtol=1e-5)
        assert s_spec.shape == s_model.shape
        np.testing.assert_allclose(s_spec, s_model, rtol=0, atol=1e-9 * s_model[0])


# ------------------------------------------------------------------------------------------
# Flax Linen
# ------------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic=True):
        x = nn.relu(nn.Dense(8)(x))
        x = nn.Dropout(0.5)(x, deterministic=deterministic)
        x = nn.LayerNorm()(x)
        return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def linen_mlp():
    m = LinenMLP()
    x = jnp.ones((2, 5))
    return m, linen_init(m, x), x


def test_linen_mlp(linen_mlp):
    m, p, x = linen_mlp
    want = {
        "params/Dense_0/kernel": MD((0,), (1,)),
        "params/Dense_0/bias": BIAS,
        "params/Dense_1/kernel": MD((0,), (1,)),
        "params/Dense_1/bias": BIAS,
        "params/LayerNorm_0/scale": SCALE,
        "params/LayerNorm_0/bias": BIAS,
    }
    assert flat(infer_views(m.apply, p, x)) == want
    # shapes only, a static flag, and an RNG key that is part of the input
    sds = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (p, x))
    assert flat(infer_views(m.apply, *sds, deterministic=True)) == want
    assert flat(infer_views(m.apply, p, x, deterministic=False, rngs={"dropout": KEY})) == want
    for name, feats in (("Dense_0", 8), ("Dense_1", 3)):
        sub = f64({"params": p["params"][name]})
        layer = lambda z, sub=sub, feats=feats: nn.Dense(feats).apply(sub, z)
        check_matrix(want[f"params/{name}/kernel"], sub["params"]["kernel"], [layer], (sub["params"]["kernel"].shape[0],))


LINEN_CONVS = [  # (name, module factory, expected view), applied one after the other to (1, 8, 8, 2)
    ("Conv_0", lambda **kw: nn.Conv(4, (3, 3), padding="SAME", **kw), CS((8, 8), ((1, 1), (1, 1)))),
    ("Conv_1", lambda **kw: nn.Conv(4, (3, 3), padding="VALID", **kw), CS((8, 8), ((0, 0), (0, 0)))),
    ("Conv_2", lambda **kw: nn.Conv(4, (3, 3), padding="CIRCULAR", **kw), CS((6, 6), "CIRCULAR")),
    ("Conv_3", lambda **kw: nn.Conv(4, (3, 3), strides=2, **kw), CS((6, 6), ((0, 1), (0, 1)), strides=(2, 2))),
    ("Conv_4", lambda **kw: nn.Conv(4, (3, 3), kernel_dilation=2, **kw), CS((3, 3), ((2, 2), (2, 2)), dilation=(2, 2))),
    ("Conv_5", lambda **kw: nn.Conv(4, (3, 3), feature_group_count=2, **kw), CS((3, 3), ((1, 1), (1, 1)), groups=2)),
    ("Conv_6", lambda **kw: nn.Conv(4, (2, 3), padding="REFLECT", **kw), CS((3, 3), "REFLECT")),
    ("Conv_7", lambda **kw: nn.Conv(4, (2, 2), padding="CIRCULAR", kernel_dilation=2, **kw),
     CS((3, 3), "CIRCULAR", dilation=(2, 2))),
    ("ConvTranspose_0", lambda **kw: nn.ConvTranspose(3, (3, 3), strides=(2, 2), **kw),
     CS((3, 3), ((2, 1), (2, 1)), input_dilation=(2, 2))),
]


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for name, make, _ in LINEN_CONVS:
            x = make(name=name)(x)
        return x


@pytest.fixture(scope="module")
def linen_cnn():
    m = LinenCNN()
    x = jnp.ones((1, 8, 8, 2))
    p = linen_init(m, x)
    return p, flat(infer_views(m.apply, p, x))


def test_linen_cnn_views(linen_cnn):
    p, got = linen_cnn
    want = {}
    for name, _, spec in LINEN_CONVS:
        want[f"params/{name}/kernel"] = spec
        want[f"params/{name}/bias"] = BIAS
    assert got == want


@pytest.mark.parametrize("i", range(len(LINEN_CONVS)), ids=[c[0] for c in LINEN_CONVS])
def test_linen_conv_jacobian(linen_cnn, i):
    p, got = linen_cnn
    name, make, spec = LINEN_CONVS[i]
    sub = f64({"params": p["params"][name]})
    kernel = sub["params"]["kernel"]
    cin = kernel.shape[-2] * spec.feature_group_count if name.startswith("Conv_") else kernel.shape[-2]
    layer = lambda z: make().apply(sub, z[None])
    check_conv(got[f"params/{name}/kernel"], kernel, [layer], tuple(spec.input_shape) + (cin,))


class LinenAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
        return nn.LayerNorm()(x)


def test_linen_attention():
    m = LinenAttention()
    x = jnp.ones((2, 5, 8))
    p = linen_init(m, x)
    got = flat(infer_views(m.apply, p, x))
    att = "params/MultiHeadDotProductAttention_0"
    want = {f"{att}/{n}/kernel": MD((0,), (1, 2)) for n in ("query", "key", "value")}
    want.update({f"{att}/{n}/bias": BIAS for n in ("query", "key", "value", "out")})
    want[f"{att}/out/kernel"] = MD((0, 1), (2,))
    want.update({"params/LayerNorm_0/scale": SCALE, "params/LayerNorm_0/bias": BIAS})
    assert got == want
    sub = f64(p["params"]["MultiHeadDotProductAttention_0"])
    for n in ("query", "key", "value"):
        proj = lambda z, n=n: nn.DenseGeneral((2, 4)).apply({"params": sub[n]}, z)
        check_matrix(want[f"{att}/{n}/kernel"], sub[n]["kernel"], [proj], (8,))
    o = lambda z: nn.DenseGeneral(8, axis=(-2, -1)).apply({"params": sub["out"]}, z)
    check_matrix(want[f"{att}/out/kernel"], sub["out"]["kernel"], [o], (2, 4))


class Block(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return nn.tanh(nn.Dense(4)(c)), None


class LinenScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return stack()(x, None)[0]


def test_linen_scan_stacked():
    m = LinenScan()
    x = jnp.ones((2, 4))
    p = linen_init(m, x)
    got = flat(infer_views(m.apply, p, x))
    assert got == {"params/ScanBlock_0/Dense_0/kernel": MD((1,), (2,)), "params/ScanBlock_0/Dense_0/bias": BIAS}
    sub = f64(p["params"]["ScanBlock_0"]["Dense_0"])
    layers = [
        (lambda z, l=l: nn.Dense(4).apply({"params": jax.tree.map(lambda a: a[l], sub)}, z)) for l in range(3)
    ]
    check_matrix(got["params/ScanBlock_0/Dense_0/kernel"], sub["kernel"], layers, (4,))


class LinenTied(nn.Module):
    attend: bool

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(10, 4)
        h = nn.Dense(4)(embed(ids))
        return embed.attend(h) if self.attend else h


@pytest.mark.parametrize("attend", [False, True])
def test_linen_embed(attend):
    m = LinenTied(attend)
    ids = jnp.zeros((2, 3), jnp.int32)
    p = linen_init(m, ids)
    got = flat(infer_views(m.apply, p, ids))
    assert got == {
        "params/Embed_0/embedding": Embedding(row_axes=(0,), batch_axes=()),
        "params/Dense_0/kernel": MD((0,), (1,)),
        "params/Dense_0/bias": BIAS,
    }


# ------------------------------------------------------------------------------------------
# Flax NNX
# ------------------------------------------------------------------------------------------


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.linear = nnx.Linear(8, 8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.conv = nnx.Conv(8, 4, (3, 3), padding="CIRCULAR", rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, ids):
        x = self.norm(self.attn(self.linear(self.embed(ids))))
        x = nnx.relu(self.conv(x.reshape(x.shape[0], 4, 4, 8)))
        return self.head(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def nnx_model():
    model = nnx.eval_shape(lambda: NNXModel(nnx.Rngs(0)))  # shapes only: no initialiser runs
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), state)
    fn = lambda s, ids: nnx.merge(graphdef, s, rest)(ids)
    ids = jnp.zeros((2, 16), jnp.int32)
    return graphdef, state, rest, infer_views(fn, state, ids)


def test_nnx_views(nnx_model):
    _, state, _, views = nnx_model
    assert isinstance(views, nnx.State)
    want = {
        "embed/embedding": Embedding(row_axes=(0,), batch_axes=()),
        "linear/kernel": MD((0,), (1,)),
        "linear/bias": BIAS,
        "norm/scale": SCALE,
        "norm/bias": BIAS,
        "conv/kernel": CS((4, 4), "CIRCULAR"),
        "conv/bias": BIAS,
        "head/kernel": MD((0,), (1,)),
        "head/bias": BIAS,
        "attn/out/kernel": MD((0, 1), (2,)),
        "attn/out/bias": BIAS,
    }
    for n in ("query", "key", "value"):
        want[f"attn/{n}/kernel"] = MD((0,), (1, 2))
        want[f"attn/{n}/bias"] = BIAS
    assert flat(views) == want
    assert set(flat(views)) == {path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)}


def test_nnx_jacobians(nnx_model):
    graphdef, state, rest, views = nnx_model
    model = nnx.merge(graphdef, f64(state), rest)
    got = flat(views)
    check_matrix(got["linear/kernel"], model.linear.kernel[...], [model.linear], (8,))
    check_matrix(got["head/kernel"], model.head.kernel[...], [model.head], (4,))
    for n in ("query", "key", "value"):
        proj = getattr(model.attn, n)
        check_matrix(got[f"attn/{n}/kernel"], proj.kernel[...], [proj], (8,))
    check_matrix(got["attn/out/kernel"], model.attn.out.kernel[...], [model.attn.out], (2, 4))
    check_conv(got["conv/kernel"], model.conv.kernel[...], [lambda z: model.conv(z[None])], (4, 4, 8))


# ------------------------------------------------------------------------------------------
# Equinox
# ------------------------------------------------------------------------------------------


def eqx_views(model, x, vmap=True):
    params, static = eqx.partition(model, eqx.is_array)
    call = (lambda p, z: jax.vmap(eqx.combine(p, static))(z)) if vmap else (lambda p, z: eqx.combine(p, static)(z))
    return params, flat(infer_views(call, params, x))


def test_eqx_mlp():
    mlp = eqx.nn.MLP(4, 3, 8, 2, key=KEY)
    params, got = eqx_views(mlp, jnp.ones((5, 4)))
    want = {}
    for i in range(3):
        want[f"layers/{i}/weight"] = MD((1,), (0,))
        want[f"layers/{i}/bias"] = BIAS
    assert got == want
    m64 = f64(mlp)
    for i, layer in enumerate(m64.layers):
        check_matrix(got[f"layers/{i}/weight"], layer.weight, [layer], (layer.in_features,))


@pytest.mark.parametrize("mode", ["ZEROS", "CIRCULAR"])
def test_eqx_conv(mode):
    conv = eqx.nn.Conv2d(2, 4, 3, padding=1, padding_mode=mode, key=KEY)
    padding = "CIRCULAR" if mode == "CIRCULAR" else ((1, 1), (1, 1))
    want = {"weight": CS((6, 6), padding, layout="OIHW"), "bias": BIAS}
    _, got = eqx_views(conv, jnp.ones((3, 2, 6, 6)))
    assert got == want
    _, got1 = eqx_views(conv, jnp.ones((2, 6, 6)), vmap=False)
    assert got1 == want
    c64 = f64(conv)
    layer = lambda z: c64(jnp.moveaxis(z, -1, 0))  # the check feeds channels-last samples
    check_conv(got["weight"], c64.weight, [layer], (6, 6, 2))


def test_eqx_attention_and_embedding():
    att = eqx.nn.MultiheadAttention(2, 8, key=KEY)
    params, static = eqx.partition(att, eqx.is_array)
    got = flat(infer_views(lambda p, x: eqx.combine(p, static)(x, x, x), params, jnp.ones((5, 8))))
    assert got == {f"{n}_proj/weight": MD((1,), (0,)) for n in ("query", "key", "value", "output")}
    a64 = f64(att)
    for n in ("query", "key", "value", "output"):
        proj = getattr(a64, f"{n}_proj")
        check_matrix(got[f"{n}_proj/weight"], proj.weight, [proj], (8,))
    emb = eqx.nn.Embedding(10, 4, key=KEY)
    assert eqx_views(emb, jnp.zeros((5,), jnp.int32))[1] == {"weight": Embedding((0,), ())}
    assert eqx_views(emb, jnp.zeros((), jnp.int32), vmap=False)[1] == {"weight": Embedding((0,), ())}


# ------------------------------------------------------------------------------------------
# Plain JAX
# ------------------------------------------------------------------------------------------


def test_vmapped_layers():
    w = normal(3, 4, 5)
    per_layer = lambda p, x: jax.vmap(lambda wl, xl: xl @ wl)(p["w"], x)
    got = infer_views(per_layer, {"w": w}, jnp.ones((3, 2, 4)))
    assert got == {"w": MD((1,), (2,))}
    check_matrix(got["w"], w, [(lambda z, l=l: z @ f64(w)[l]) for l in range(3)], (4,))
    # mapped against an input that is not mapped, jax folds the mapped axis into the fan-out
    shared = lambda p, x: jax.vmap(lambda wl: x @ wl)(p["w"])
    got = infer_views(shared, {"w": w}, jnp.ones((2, 4)))
    assert got == {"w": MD((1,), (0, 2))}
    check_matrix(got["w"], w, [lambda z: jax.vmap(lambda wl: z @ wl)(f64(w))], (4,))


def scan_mlp(p, x):
    def body(h, layer):
        return jnp.tanh(h @ layer["w"] + layer["b"]), None

    return lax.scan(body, x, p)[0]


def test_scan_stacked_mlp():
    p = {"w": normal(3, 4, 4), "b": jnp.zeros((3, 4))}
    got = infer_views(scan_mlp, p, jnp.ones((2, 4)))
    assert got == {"w": MD((1,), (2,)), "b": BIAS}
    w64 = f64(p["w"])
    check_matrix(got["w"], p["w"], [(lambda z, l=l: z @ w64[l]) for l in range(3)], (4,))
    # the same stack indexed by the loop counter
    loop = lambda p, x, n: lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ p["w"][i] + p["b"][i]), x)
    assert infer_views(loop, p, jnp.ones((2, 4)), 3) == {"w": MD((1,), (2,)), "b": BIAS}
    assert infer_views(loop, p, jnp.ones((2, 4)), jnp.int32(3)) == {"w": MD((1,), (2,)), "b": BIAS}


@jax.custom_jvp
def soft(x):
    return jnp.log1p(jnp.exp(x))


soft.defjvp(lambda primals, tangents: (soft(primals[0]), tangents[0] * jax.nn.sigmoid(primals[0])))


@jax.custom_vjp
def clip_grad(x):
    return x


clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1, 1),))


def test_control_flow_and_calls():
    p = {"w1": jnp.ones((6, 4)), "w2": jnp.ones((4, 6)), "v": jnp.ones((6,)), "s": jnp.ones(())}

    def fn(p, x):
        h = jax.checkpoint(lambda z: soft(z @ p["w1"].T))(x)  # (out, in) weight inside remat
        h = jax.jit(lambda a, w: clip_grad(a @ w.T))(h, p["w2"])  # jit with the leaf as an argument
        h = lax.cond(h.sum() > 0, lambda z: z @ p["w1"].T, lambda z: -(z @ p["w1"].T), h)
        h = lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] * p["s"]), (0, h))[1]
        return h @ p["v"]

    got = infer_views(fn, p, jnp.ones((3, 4)))
    assert got == {"w1": MD((1,), (0,)), "w2": MD((1,), (0,)), "v": MD((0,), ()), "s": SCALE}
    w1, w2, v = f64((p["w1"], p["w2"], p["v"]))
    check_matrix(got["w1"], w1, [lambda z: z @ w1.T], (4,))
    check_matrix(got["w2"], w2, [lambda z: z @ w2.T], (6,))
    check_matrix(got["v"], v, [lambda z: z @ v], (6,))


def test_weight_norm_and_unused():
    def fn(p, x):
        v = p["v"]
        return x @ (v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True)) * p["g"])

    p = {"v": jnp.ones((4, 3)), "g": jnp.ones((3,)), "spare": jnp.ones((2, 2))}
    got = infer_views(fn, p, jnp.ones((2, 4)))
    assert got == {"v": MD((0,), (1,)), "g": SCALE, "spare": NotMatrix("unused")}


CONV_DN = ("NCWH", "IWOH", "NHWC")  # lhs channels-first and rhs in an unusual order


def test_lax_conv_any_dimension_numbers():
    k = normal(2, 3, 4, 5)  # I=2, W=3, O=4, H=5
    fn = lambda p, x: lax.conv_general_dilated(x, p["k"], (1, 2), "SAME", dimension_numbers=CONV_DN)
    got = infer_views(fn, {"k": k}, jnp.ones((1, 2, 7, 9)))
    want = CS((7, 9), ((1, 1), (2, 2)), strides=(1, 2), layout="IHOW")  # spatial order: W, H of the lhs
    assert got == {"k": want}
    k64 = f64(k)
    layer = lambda z: lax.conv_general_dilated(
        jnp.transpose(z, (2, 0, 1))[None], k64, (1, 2), "SAME", dimension_numbers=CONV_DN
    )
    check_conv(want, k, [layer], (7, 9, 2))


def test_stacked_convs():
    k = normal(2, 3, 3, 1, 4) / 3  # two convolutions with two groups each
    conv = lambda kk, z: lax.conv_general_dilated(
        z, kk, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    want = CS((5, 5), ((1, 1), (1, 1)), groups=2, batch_dims=1)
    vmapped = lambda p, x: jax.vmap(conv)(p["k"], x)
    assert infer_views(vmapped, {"k": k}, jnp.ones((2, 1, 5, 5, 2))) == {"k": want}
    scanned = lambda p, x: lax.scan(lambda z, kk: (conv(kk, z), None), x, p["k"][:, :, :, :, :2])[0]
    assert infer_views(scanned, {"k": k[..., :2]}, jnp.ones((1, 5, 5, 2))) == {"k": want}
    k64 = f64(k)
    check_conv(want, k, [(lambda z, b=b: conv(k64[b], z[None])) for b in range(2)], (5, 5, 2))


# ------------------------------------------------------------------------------------------
# Overrides and errors
# ------------------------------------------------------------------------------------------


def dense(p, x):
    return x @ p["Conv_1"]["kernel"] + x @ p["Conv_10"]["kernel"]


DENSE_P = {"Conv_1": {"kernel": jnp.ones((4, 4))}, "Conv_10": {"kernel": jnp.ones((4, 4))}}


def test_overrides_match_whole_components():
    got = infer_views(dense, DENSE_P, jnp.ones((2, 4)), overrides={"Conv_1": NotMatrix("frozen")})
    assert got == {"Conv_1": {"kernel": NotMatrix("frozen")}, "Conv_10": {"kernel": MD((0,), (1,))}}
    got = infer_views(dense, DENSE_P, jnp.ones((2, 4)), overrides={"Conv_1/kernel": MD(1, 0)})
    assert got["Conv_1"]["kernel"] == MD(1, 0) and got["Conv_10"]["kernel"] == MD((0,), (1,))
    got = infer_views(dense, DENSE_P, jnp.ones((2, 4)), overrides=lambda path, leaf: MD(1, 0) if "10" in path else None)
    assert got["Conv_10"]["kernel"] == MD(1, 0) and got["Conv_1"]["kernel"] == MD((0,), (1,))


def test_override_errors():
    with pytest.raises(ValueError, match=r"override 'Conv_2' matches no leaf"):
        infer_views(dense, DENSE_P, jnp.ones((2, 4)), overrides={"Conv_2": MD(0, 1)})
    with pytest.raises(ValueError, match=r"'Conv_10/kernel' is matched by two overrides, 'Conv_10' and 'kernel'"):
        infer_views(dense, DENSE_P, jnp.ones((2, 4)), overrides={"Conv_10": MD(0, 1), "kernel": MD(0, 1)})
    with pytest.raises(TypeError, match="expected a MatrixDims"):
        infer_views(dense, DENSE_P, jnp.ones((2, 4)), overrides={"Conv_1": (0, 1)})


def test_conflicting_reads():
    both = lambda p, x: x @ p["w"] + p["w"]
    p, x = {"w": jnp.ones((4, 4))}, jnp.ones((4, 4))
    with pytest.raises(ValueError, match=r"(?s)leaf 'w' is read in ways that disagree.*dot_general at .*test_infer.py.*add at .*overrides=\{'w': view\}"):
        infer_views(both, p, x)
    assert infer_views(both, p, x, overrides={"w": MD(0, 1)}) == {"w": MD(0, 1)}

    def two_sizes(p, x, y):
        conv = lambda z: lax.conv_general_dilated(z, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return conv(x).sum() + conv(y).sum()

    with pytest.raises(ValueError, match=r"(?s)leaf 'k'.*input_shape=\(6, 6\).*conv_general_dilated at .*input_shape=\(8, 8\)"):
        infer_views(two_sizes, {"k": jnp.ones((3, 3, 2, 2))}, jnp.ones((1, 6, 6, 2)), jnp.ones((1, 8, 8, 2)))
    branches = lambda p, x: lax.cond(x.sum() > 0, lambda z: z @ p["w"], lambda z: z @ p["w"].T, x)
    with pytest.raises(ValueError, match=r"leaf 'w' is read in ways that disagree") as err:
        infer_views(branches, p, x)
    assert "MatrixDims(in_axes=(0,), out_axes=(1,))" in str(err.value)
    assert "MatrixDims(in_axes=(1,), out_axes=(0,))" in str(err.value)
    tied_wrong = lambda p, ids: jnp.take(p["E"], ids, axis=0) @ p["E"]
    with pytest.raises(ValueError, match=r"(?s)leaf 'E'.*Embedding.*gather at .*MatrixDims.*dot_general"):
        infer_views(tied_wrong, {"E": jnp.ones((4, 4))}, jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize(
    "op, fn",
    [
        ("sort", lambda w, x: x @ jnp.sort(w)),
        ("qr", lambda w, x: x @ jnp.linalg.qr(w)[0]),
        ("reduce_sum", lambda w, x: x @ jnp.broadcast_to(w.sum(0), (4, 4))),
        ("dynamic_update_slice", lambda w, x: lax.dynamic_update_slice(x, w, (0, 0))),
        ("cumsum", lambda w, x: x @ jnp.cumsum(w, axis=0)),
        ("exp", lambda w, x: x @ jnp.exp(w)),
    ],
)
def test_unsupported_primitive_names_op_and_leaf(op, fn):
    params = {"layer": {"w": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match=rf"cannot follow {op}\b.* on leaf 'layer/w'.*overrides=\{{'layer/w': view\}}"):
        infer_views(lambda p, x: fn(p["layer"]["w"], x), params, jnp.ones((4, 4)))
    got = infer_views(lambda p, x: fn(p["layer"]["w"], x), params, jnp.ones((4, 4)), overrides={"w": MD(0, 1)})
    assert got == {"layer": {"w": MD(0, 1)}}


def test_pads_that_are_not_flax_pads_raise():
    conv = lambda p, x: lax.conv_general_dilated(x, p["k"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    k = {"k": jnp.ones((3, 2, 2))}
    x = jnp.ones((1, 6, 2))
    wrap = infer_views(lambda p, x: conv(p, jnp.pad(x, ((0, 0), (1, 1), (0, 0)), mode="wrap")), k, x)
    assert wrap == {"k": CS((6,), "CIRCULAR")}
    zero = infer_views(lambda p, x: conv(p, jnp.pad(x, ((0, 0), (2, 0), (0, 0)))), k, x)
    assert zero == {"k": CS((6,), ((2, 0),))}  # a causal zero pad folds into the convolution's pads
    for mode, pads in (("reflect", (2, 2)), ("wrap", (0, 2)), ("edge", (1, 1))):
        padded = lambda p, x, mode=mode, pads=pads: conv(p, jnp.pad(x, ((0, 0), pads, (0, 0)), mode=mode))
        with pytest.raises(ValueError, match=r"cannot follow conv_general_dilated.* on leaf 'k': its input is padded"):
            infer_views(padded, k, x)


def test_conv_refusals():
    x = jnp.ones((2, 6, 2))
    grouped = lambda p, x: lax.conv_general_dilated(
        x, p["k"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"), batch_group_count=2
    )
    with pytest.raises(ValueError, match=r"conv_general_dilated.* on leaf 'k': batch_group_count=2 is not supported"):
        infer_views(grouped, {"k": jnp.ones((3, 2, 4))}, x)
    # layers stacked along the last kernel axis: the batch axis is not leading
    last = lambda p, x: lax.scan(
        lambda z, kk: (lax.conv_general_dilated(z, kk, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")), None),
        x, jnp.moveaxis(p["k"], -1, 0),
    )[0]
    with pytest.raises(ValueError, match=r"on leaf 'k': the kernel's batch axes \(3,\) .* are not its leading axes"):
        infer_views(last, {"k": jnp.ones((3, 2, 2, 4))}, x)


def test_more_reads():
    x = jnp.ones((2, 4))
    # one leaf axis split by a reshape, its pieces contracted and kept
    split = lambda p, x: x @ p["w"].reshape(2, 2, 4).transpose(1, 0, 2).reshape(2, 8)
    with pytest.raises(ValueError, match=r"on leaf 'w': pieces of one leaf axis play different roles \(axis 0 as in and out\)"):
        infer_views(split, {"w": jnp.ones((4, 4))}, jnp.ones((2, 2)))
    # a layer applied twice, a 0-d scale, a debug print, heads split by a reshape
    def fn(p, x):
        jax.debug.print("{} {}", x, p["w"])
        h = (x @ p["w"]) @ p["w"] * p["t"]
        return jnp.einsum("bhd,hdo->bo", h.reshape(2, 2, 2), p["o"].reshape(2, 2, 3))
    got = infer_views(fn, {"w": jnp.ones((4, 4)), "t": jnp.ones(()), "o": jnp.ones((4, 3))}, x)
    assert got == {"w": MD((0,), (1,)), "t": SCALE, "o": MD((0,), (1,))}
    # a stack of tables scanned over, and one indexed by a loop counter and the input
    table = {"E": jnp.ones((2, 10, 4))}
    ids = jnp.zeros((3,), jnp.int32)
    scanned = lambda p, ids: lax.scan(lambda h, e: (h + e[ids], None), jnp.zeros((3, 4)), p["E"])[0]
    assert infer_views(scanned, table, ids) == {"E": Embedding((1,), (0,))}
    picked = lambda p, i, t: lax.dynamic_slice(p["E"], (i, t, 0), (1, 1, 4))
    assert infer_views(picked, table, 1, jnp.int32(3)) == {"E": Embedding((1,), (0,))}
