"""Parity of normjax's spectral norm with PyTorch's and Flax NNX's spectral normalization.

Reference implementations compared against:

- ``torch.nn.utils.parametrizations.spectral_norm``: views a weight as the matrix
  ``(out, everything else)`` (``dim=0``; ``dim=1`` for ``ConvTranspose``), keeps power vectors
  ``_u`` (left, length ``out``) and ``_v`` (right), runs ``n_power_iterations`` of the power
  method each time the weight is read in training mode and returns ``W / sigma`` with
  ``sigma = u^T W v``.
- ``flax.nnx.SpectralNorm``: views a kernel as ``(-1, out)``, keeps ``u`` (shape ``(1, out)``)
  and ``sigma`` as ``BatchStat``\\ s, runs ``n_steps`` power iterations on every call and writes
  ``W / sigma`` back into the wrapped layer's kernel (in place) before applying it.

Layouts: torch ``Linear`` weight ``(out, in)`` is Flax's ``(in, out)`` transposed; torch
``Conv2d`` ``(out, in, kh, kw)`` is Flax's ``(kh, kw, in, out)`` permuted; torch
``ConvTranspose2d`` ``(in, out, kh, kw)`` is Flax's ``ConvTranspose`` ``(kh, kw, in, out)``
permuted. In each case normjax's default matrix view (rows = all axes but the last, columns =
the last) is torch's matrix transposed with its columns permuted, so the singular values, and
``W / sigma`` after converting the layout back, are the same.

Documented differences (tested at the end): torch and Flax always divide by sigma, so they
also scale *up* a matrix with ``sigma < 1``; normjax's default ``mode="rescale"`` only moves
matrices with ``sigma > c`` and returns the others bit for bit. On a zero matrix torch
returns NaNs (``0 / 0``), while Flax and normjax leave it zero.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normjax as nj

torch = pytest.importorskip("torch")
P = torch.nn.utils.parametrizations

# float32 throughout: a converged power iteration and an SVD agree to a few ulps of sigma.
RTOL = 1e-5
ATOL = 1e-7  # entries of W / sigma are O(1); this only matters for entries near zero
# One iteration count for every normjax/Flax power iteration, so each (shape, function) pair
# compiles once: the slowest (linear_default_init) needs ~70 for sigma to 1e-7.
ITERS = 200
FLAX_STEPS = 60  # Flax's loop runs eagerly, op by op: fewer steps keep it fast


def np_sigma(w_flax):
    """float64 reference for normjax's default view: rows = all axes but the last."""
    m = np.asarray(w_flax, np.float64)
    return float(np.linalg.svd(m.reshape(-1, m.shape[-1]), compute_uv=False)[0])


def gapped(rows, cols, top=2.5, second=1.5, seed=0):
    """A float32 matrix with singular values top, second, ... (power iteration rate 0.36)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    k = min(rows, cols)
    s = np.concatenate([[top], np.linspace(second, 0.1, k - 1)])
    return ((u[:, :k] * s) @ v[:, :k].T).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Torch modules with fixed weights, and their layout in Flax.
# ------------------------------------------------------------------------------------------


def make_torch(kind):
    """A torch module with fixed float32 weights and the function mapping its weight to Flax."""
    torch.manual_seed(0)
    if kind == "linear_gapped":
        m = torch.nn.Linear(24, 16)  # weight (out=16, in=24)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(gapped(16, 24)))
        return m, lambda w: w.T
    if kind == "linear_default_init":
        return torch.nn.Linear(24, 16), lambda w: w.T
    if kind == "conv2d":
        m = torch.nn.Conv2d(3, 8, kernel_size=3)  # weight (out=8, in=3, 3, 3)
        with torch.no_grad():
            m.weight.mul_(4.0)  # sigma > 1, so rescale and normalize agree below
        return m, lambda w: w.transpose(2, 3, 1, 0)
    if kind == "conv_transpose2d":
        # weight (in=3, out=8, 3, 3), torch's dim=1; in Flax (3, 3, 3, 8), the conv2d shape above
        # on purpose (same shapes, same compiled kernels)
        m = torch.nn.ConvTranspose2d(3, 8, kernel_size=3)
        return m, lambda w: w.transpose(2, 3, 0, 1)
    raise AssertionError(kind)


KINDS = ["linear_gapped", "linear_default_init", "conv2d", "conv_transpose2d"]


def torch_converged(module, *, n_power_iterations, calls):
    """Registers torch's spectral_norm, reads the weight ``calls`` times in training mode.

    Returns a dict: ``w_orig`` the unnormalized weight, ``w_sn`` torch's normalized weight
    (read in eval mode, so no further iteration), ``sigma_uv`` = ``u^T W v`` from the
    parametrization's buffers, ``sigma_ratio`` = ``|W_orig| / |W_sn|`` (the sigma torch
    divided by), and its power vectors ``u`` (length out) and ``v`` (the flattened rest).
    """
    torch.manual_seed(1)  # the random _u, _v
    P.spectral_norm(module, n_power_iterations=n_power_iterations)
    module.train()
    with torch.no_grad():
        for _ in range(calls):
            module.weight  # noqa: B018 - each read runs n_power_iterations in training mode
        module.eval()
        w_sn = module.weight.detach().clone()
        sn = module.parametrizations.weight[0]
        w_orig = module.parametrizations.weight.original.detach().clone()
        sigma_uv = torch.vdot(sn._u, torch.mv(sn._reshape_weight_to_matrix(w_orig), sn._v)).item()
        sigma_ratio = (torch.linalg.vector_norm(w_orig) / torch.linalg.vector_norm(w_sn)).item()
    return dict(w_orig=w_orig.numpy(), w_sn=w_sn.numpy(), sigma_uv=sigma_uv, sigma_ratio=sigma_ratio,
                u=sn._u.numpy().astype(np.float64), v=sn._v.numpy().astype(np.float64))


# normjax under jax.jit, as users run it; module-level so each shape compiles once.
@jax.jit
def our_sigmas(w):
    """(exact SVD, converged power iteration, Gram bound, spectral_norms, power vector u)."""
    s_pow, u = nj.sigma_power(w, nj.init_power_vector(jax.random.key(0), w), num_iters=ITERS)
    return nj.sigma_svd(w), s_pow, nj.sigma_gram(w), nj.by_path(nj.spectral_norms({"k": w}))["k"], u


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def our_project(params, max_value, mode, dims=None):
    return nj.project_spectral_norm(params, max_value, mode=mode, dims=dims)


@functools.partial(jax.jit, static_argnames=("estimator", "num_iters", "mode", "dims"))
def our_transform_step(params, *, estimator, num_iters, mode="normalize", dims=None):
    """One step of chain(sgd, spectral_norm) with a zero gradient: (params', updates, state)."""
    tx = optax.chain(
        optax.sgd(0.1), nj.spectral_norm(1.0, mode=mode, estimator=estimator, num_iters=num_iters, dims=dims)
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(zeros, tx.init(params), params)
    return optax.apply_updates(params, updates), updates, state[1]


def as_params(kernel):
    """The pytree every test feeds normjax (one structure: each shape compiles once)."""
    return {"layer": {"kernel": kernel, "bias": jnp.zeros(kernel.shape[-1:], kernel.dtype)}}


# Converged two ways: one read with many iterations, or many training-mode reads of one each.
CONVERGENCE = {"one_read_500_iters": dict(n_power_iterations=500, calls=1),
               "500_reads_1_iter": dict(n_power_iterations=1, calls=500)}


@pytest.fixture(scope="module")
def torch_results():
    out = {}
    for kind in KINDS:
        for conv_name, conv in CONVERGENCE.items():
            module, to_flax = make_torch(kind)
            t = torch_converged(module, **conv)
            assert t["w_orig"].dtype == np.float32 and t["w_sn"].dtype == np.float32
            out[kind, conv_name] = dict(
                t,
                w=jnp.asarray(to_flax(t["w_orig"])),
                w_sn=to_flax(t["w_sn"]),
                bias=jnp.asarray(module.bias.detach().numpy()),
            )
    return out


@pytest.mark.parametrize("conv_name", list(CONVERGENCE))
@pytest.mark.parametrize("kind", KINDS)
def test_torch_sigma_matches_ours(torch_results, kind, conv_name):
    r = torch_results[kind, conv_name]
    w = r["w"]
    assert w.dtype == jnp.float32
    ref = np_sigma(w)
    # torch really converged (otherwise the comparison below says nothing about parity).
    np.testing.assert_allclose(r["sigma_uv"], ref, rtol=RTOL)
    np.testing.assert_allclose(r["sigma_ratio"], r["sigma_uv"], rtol=RTOL)

    s_svd, s_pow, s_gram, s_tree, _ = our_sigmas(w)
    np.testing.assert_allclose(float(s_svd), r["sigma_uv"], rtol=RTOL)
    np.testing.assert_allclose(float(s_pow), r["sigma_uv"], rtol=RTOL)
    np.testing.assert_allclose(float(s_tree), r["sigma_uv"], rtol=RTOL)  # the pytree API
    # Gram: a certified upper bound, within its documented rounding margin of the truth.
    assert float(s_gram) >= ref
    np.testing.assert_allclose(float(s_gram), r["sigma_uv"], rtol=RTOL)


@pytest.mark.parametrize("kind", ["linear_gapped", "linear_default_init"])
def test_torch_power_vectors_match_ours(torch_results, kind):
    """Converged singular vectors agree up to sign.

    torch's matrix is ``W_flax.T``: its left vector ``_u`` (length out) is our right vector
    ``u`` (the one kept in the state), and its right vector ``_v`` (length in) is our left
    vector ``W u / |W u|``.
    """
    r = torch_results[kind, "one_read_500_iters"]
    w = r["w"]
    u = np.asarray(our_sigmas(w)[-1], np.float64)
    np.testing.assert_allclose(abs(u @ r["u"]), 1.0, rtol=1e-6)
    left = np.asarray(w, np.float64) @ u
    np.testing.assert_allclose(abs(left @ r["v"]) / np.linalg.norm(left), 1.0, rtol=1e-6)
    _, _, state = our_transform_step(as_params(w), estimator="power", num_iters=ITERS)
    np.testing.assert_allclose(abs(np.asarray(nj.by_path(state.u)["layer/kernel"], np.float64) @ r["u"]), 1.0, rtol=1e-6)


@pytest.mark.parametrize("conv_name", list(CONVERGENCE))
@pytest.mark.parametrize("kind", KINDS)
def test_torch_normalized_weight_matches_project(torch_results, kind, conv_name):
    r = torch_results[kind, conv_name]
    params = {"layer": {"kernel": r["w"], "bias": r["bias"]}}  # the structure of as_params
    out = our_project(params, 1.0, "normalize")
    assert out["layer"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out["layer"]["kernel"]), r["w_sn"], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(out["layer"]["bias"]), np.asarray(r["bias"]))
    # c * W / sigma for another bound c
    out2 = our_project(params, 2.0, "normalize")
    np.testing.assert_allclose(np.asarray(out2["layer"]["kernel"]), 2 * r["w_sn"], rtol=RTOL, atol=2 * ATOL)
    # the same eagerly (no jit), once
    if conv_name == "one_read_500_iters":
        eager = nj.project_spectral_norm(params, 1.0, mode="normalize")["layer"]["kernel"]
        np.testing.assert_allclose(np.asarray(eager), r["w_sn"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("estimator,num_iters", [("power", ITERS), ("gram", 8), ("svd", None)])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_normalized_weight_matches_transform(torch_results, kind, estimator, num_iters):
    r = torch_results[kind, "one_read_500_iters"]
    params = {"layer": {"kernel": r["w"], "bias": r["bias"]}}  # the structure of as_params
    new, _, state = our_transform_step(params, estimator=estimator, num_iters=num_iters)
    assert new["layer"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(new["layer"]["kernel"]), r["w_sn"], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(new["layer"]["bias"]), np.asarray(r["bias"]))
    # the logged sigma is torch's sigma
    np.testing.assert_allclose(float(nj.by_path(state.sigma)["layer/kernel"]), r["sigma_uv"], rtol=RTOL)


# torch's own layout, no conversion: MatrixDims names torch's out axis as the columns.
TORCH_LAYOUT = {
    # nn.Linear(8, 40): weight (out=40, in=8), a wide matrix in Flax's (in, out) view
    "linear_wide": (lambda: torch.nn.Linear(8, 40), nj.MatrixDims(in_axes=1, out_axes=0)),
    "conv2d": (lambda: make_torch("conv2d")[0], nj.MatrixDims(in_axes=(1, 2, 3), out_axes=0)),
    "conv_transpose2d": (lambda: make_torch("conv_transpose2d")[0], nj.MatrixDims(in_axes=(0, 2, 3), out_axes=1)),
}


@pytest.mark.parametrize("kind", list(TORCH_LAYOUT))
def test_torch_layout_directly_with_matrix_dims(kind):
    """normjax on torch's weight as it is (``dims`` = torch's ``dim``): torch's W / sigma, its sigma
    and its left power vector ``_u``, which is our right vector (the out axis is our columns)."""
    make, dims = TORCH_LAYOUT[kind]
    torch.manual_seed(0)
    t = torch_converged(make(), n_power_iterations=500, calls=1)
    w = jnp.asarray(t["w_orig"])
    out = our_project({"weight": w}, 1.0, "normalize", dims)["weight"]
    np.testing.assert_allclose(np.asarray(out), t["w_sn"], rtol=RTOL, atol=ATOL)
    new, _, state = our_transform_step({"weight": w}, estimator="power", num_iters=ITERS, dims=dims)
    np.testing.assert_allclose(np.asarray(new["weight"]), t["w_sn"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(nj.by_path(state.sigma)["weight"]), t["sigma_uv"], rtol=RTOL)
    assert nj.by_path(state.u)["weight"].shape == t["u"].shape
    np.testing.assert_allclose(abs(np.asarray(nj.by_path(state.u)["weight"], np.float64) @ t["u"]), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Flax NNX SpectralNorm
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nnx():
    return pytest.importorskip("flax.nnx")


def flax_kernels():
    rng = np.random.default_rng(3)
    return {
        "linear_gapped": jnp.asarray(gapped(24, 16, seed=4)),  # (in, out)
        "linear_gauss": jnp.asarray(rng.normal(size=(24, 16)).astype(np.float32)),
        "conv": jnp.asarray(rng.normal(size=(3, 3, 3, 8)).astype(np.float32)),  # (kh, kw, in, out)
    }


def nnx_layer(nnx, kernel):
    """An nnx.Linear / nnx.Conv holding ``kernel`` and a zero bias (the initializer returns the
    fixed kernel: Flax's own random initializers take seconds to compile on a loaded CPU)."""
    kw = dict(kernel_init=lambda key, shape, dtype: kernel, rngs=nnx.Rngs(0))
    if kernel.ndim == 2:
        layer = nnx.Linear(kernel.shape[0], kernel.shape[1], **kw)
    else:
        layer = nnx.Conv(kernel.shape[2], kernel.shape[3], kernel_size=kernel.shape[:2], padding="VALID", **kw)
    np.testing.assert_array_equal(np.asarray(layer.kernel[...]), np.asarray(kernel))
    np.testing.assert_array_equal(np.asarray(layer.bias[...]), 0.0)
    return layer


@pytest.mark.parametrize("name", list(flax_kernels()))
def test_flax_nnx_spectral_norm_many_steps(nnx, name):
    """One call with a converged power iteration: kernel, output and stored sigma match ours."""
    w = flax_kernels()[name]
    sn = nnx.SpectralNorm(nnx_layer(nnx, w), n_steps=FLAX_STEPS, rngs=nnx.Rngs(1))
    if w.ndim == 2:
        # identity batch: x @ (W / sigma) + b with b = 0 (nnx.Linear's default bias init)
        y = sn(jnp.eye(w.shape[0], dtype=jnp.float32), update_stats=True)
    else:
        # a conv applied with VALID padding to a patch of the kernel's size is one row of x @ W
        kh, kw, cin, _ = w.shape
        x = jnp.eye(kh * kw * cin, dtype=jnp.float32).reshape(-1, kh, kw, cin)
        y = sn(x, update_stats=True).reshape(kh * kw * cin, -1)
    assert y.dtype == jnp.float32
    kernel_flax = sn.layer_instance.kernel[...]  # Flax writes W / sigma back in place
    sigma_flax = float(sn.batch_stats[("kernel", "sigma")][...])

    ref = np_sigma(w)
    np.testing.assert_allclose(sigma_flax, ref, rtol=RTOL)  # Flax converged
    s_svd, s_pow, s_gram, _, u = our_sigmas(w)
    for s in (s_svd, s_pow, s_gram):
        np.testing.assert_allclose(float(s), sigma_flax, rtol=RTOL)

    ours = our_project(as_params(w), 1.0, "normalize")["layer"]["kernel"]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(kernel_flax), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(ours).reshape(y.shape), np.asarray(y), rtol=RTOL, atol=ATOL)

    new, _, state = our_transform_step(as_params(w), estimator="power", num_iters=ITERS)
    np.testing.assert_allclose(np.asarray(new["layer"]["kernel"]), np.asarray(kernel_flax), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(nj.by_path(state.sigma)["layer/kernel"]), sigma_flax, rtol=RTOL)
    # Flax's u (1, out) is our right vector, up to sign
    u_flax = np.asarray(sn.batch_stats[("kernel", "u")][...], np.float64).ravel()
    np.testing.assert_allclose(abs(np.asarray(u, np.float64) @ u_flax), 1.0, rtol=1e-6)
    np.testing.assert_allclose(abs(np.asarray(nj.by_path(state.u)["layer/kernel"], np.float64) @ u_flax), 1.0, rtol=1e-6)


def test_flax_nnx_spectral_norm_repeated_calls(nnx):
    """n_steps=1 per call, called many times: the kernel converges to W / sigma(W).

    Because Flax overwrites the wrapped kernel with W / sigma_hat on every call, its stored
    ``sigma`` after the first call is the sigma of the already-normalized kernel (about 1),
    not sigma(W): only the first call's sigma is comparable with ours.
    """
    w = flax_kernels()["linear_gapped"]
    sn = nnx.SpectralNorm(nnx_layer(nnx, w), n_steps=1, rngs=nnx.Rngs(1))
    x = jnp.eye(w.shape[0], dtype=jnp.float32)
    for _ in range(40):
        y = sn(x, update_stats=True)
    ours = our_project(as_params(w), 1.0, "normalize")["layer"]["kernel"]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(y), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(sn.batch_stats[("kernel", "sigma")][...]), 1.0, rtol=RTOL)


def test_three_way_conv_parity(nnx):
    """One torch Conv2d weight, through torch, Flax NNX and normjax: the same W / sigma."""
    module, to_flax = make_torch("conv2d")
    t = torch_converged(module, n_power_iterations=500, calls=1)
    w = jnp.asarray(to_flax(t["w_orig"]))
    sn = nnx.SpectralNorm(nnx_layer(nnx, w), n_steps=FLAX_STEPS, rngs=nnx.Rngs(1))
    sn(jnp.zeros((1, 3, 3, 3), jnp.float32), update_stats=True)
    k_flax = np.asarray(sn.layer_instance.kernel[...])
    ours = np.asarray(our_project(as_params(w), 1.0, "normalize")["layer"]["kernel"])
    np.testing.assert_allclose(ours, to_flax(t["w_sn"]), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ours, k_flax, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(sn.batch_stats[("kernel", "sigma")][...]), t["sigma_uv"], rtol=RTOL)


# ------------------------------------------------------------------------------------------
# Documented differences
# ------------------------------------------------------------------------------------------


def test_documented_difference_rescale_vs_always_normalize(nnx):
    """sigma < c: torch and Flax scale W up to sigma = 1; normjax's rescale leaves it bit for bit.

    sigma > c: all agree (rescale is min(1, c / sigma), i.e. W / sigma there).
    """
    small = gapped(16, 24, top=0.5, second=0.3, seed=7)  # torch layout (out, in), sigma 0.5
    for w_torch, inside in [(small, True), (small * np.float32(6.0), False)]:
        module = torch.nn.Linear(24, 16)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(w_torch))
        t = torch_converged(module, n_power_iterations=200, calls=1)
        w_sn, sigma_t = t["w_sn"], t["sigma_uv"]
        w = jnp.asarray(w_torch.T)  # (in, out)
        sn = nnx.SpectralNorm(nnx_layer(nnx, w), n_steps=FLAX_STEPS, rngs=nnx.Rngs(1))
        k_flax = np.asarray(sn(jnp.eye(24, dtype=jnp.float32), update_stats=True))

        # torch and Flax: always W / sigma, spectral norm exactly 1 afterwards
        np.testing.assert_allclose(np_sigma(w_sn.T), 1.0, rtol=RTOL)
        np.testing.assert_allclose(np_sigma(k_flax), 1.0, rtol=RTOL)
        normalize = np.asarray(our_project(as_params(w), 1.0, "normalize")["layer"]["kernel"])
        np.testing.assert_allclose(normalize, w_sn.T, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(normalize, k_flax, rtol=RTOL, atol=ATOL)

        rescale = np.asarray(our_project(as_params(w), 1.0, "rescale")["layer"]["kernel"])
        rescale_eager = np.asarray(nj.project_spectral_norm(as_params(w), 1.0, mode="rescale")["layer"]["kernel"])
        np.testing.assert_array_equal(rescale_eager, rescale)
        # the transform in mode="rescale" (its default), power estimator
        new, updates, _ = our_transform_step(as_params(w), estimator="power", num_iters=ITERS, mode="rescale")
        new, updates = np.asarray(new["layer"]["kernel"]), np.asarray(updates["layer"]["kernel"])
        if inside:
            # and with every default (rescale, power, num_iters=1), eagerly
            tx = nj.spectral_norm(1.0)
            zero = {"kernel": jnp.zeros_like(w)}
            default_updates, _ = tx.update(zero, tx.init({"kernel": w}), {"kernel": w})
            np.testing.assert_array_equal(np.asarray(default_updates["kernel"]), 0.0)
            np.testing.assert_allclose(sigma_t, 0.5, rtol=RTOL)
            np.testing.assert_array_equal(rescale, np.asarray(w))  # untouched, bit for bit
            np.testing.assert_array_equal(updates, 0.0)  # the (zero) update kept
            np.testing.assert_array_equal(new, np.asarray(w))
            np.testing.assert_allclose(w_sn.T, 2 * np.asarray(w), rtol=RTOL, atol=ATOL)  # torch doubled it
            np.testing.assert_allclose(k_flax, 2 * np.asarray(w), rtol=RTOL, atol=ATOL)  # so did Flax
        else:
            np.testing.assert_allclose(rescale, w_sn.T, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(new, w_sn.T, rtol=RTOL, atol=ATOL)


def test_documented_difference_zero_matrix(nnx):
    """A zero weight: torch's W / sigma is 0 / 0 = NaN; Flax and normjax keep it zero.

    (torch's ``eps=1e-12`` only guards the power vectors: ``F.normalize`` divides by
    ``max(|x|, eps)``, so ``_u = _v = 0`` and ``sigma = u^T W v = 0``; the final division is
    unguarded. Flax divides by ``where(sigma != 0, sigma, 1)``; normjax never moves a zero matrix.)
    """
    module = torch.nn.Linear(24, 16)
    with torch.no_grad():
        module.weight.zero_()
    assert np.isnan(torch_converged(module, n_power_iterations=5, calls=1)["w_sn"]).all()

    w = jnp.zeros((24, 16), jnp.float32)  # the shape used above: reuses compiled kernels
    sn = nnx.SpectralNorm(nnx_layer(nnx, w), n_steps=5, rngs=nnx.Rngs(1))
    y = sn(jnp.eye(24, dtype=jnp.float32), update_stats=True)
    np.testing.assert_array_equal(np.asarray(y), 0.0)
    params = as_params(w)
    for mode in ("normalize", "rescale", "clip"):
        np.testing.assert_array_equal(np.asarray(our_project(params, 1.0, mode)["layer"]["kernel"]), 0.0)
    for estimator, num_iters in [("power", ITERS), ("gram", 8), ("svd", None)]:
        new, _, state = our_transform_step(params, estimator=estimator, num_iters=num_iters)
        np.testing.assert_array_equal(np.asarray(new["layer"]["kernel"]), 0.0)
        assert float(nj.by_path(state.sigma)["layer/kernel"]) == 0.0
