"""A Lipschitz vision transformer on 8x8 digits: the certified bound of the whole network, certified robust accuracy.

A transformer as usually built has no global Lipschitz constant: dot-product self-attention,
``softmax(q k^T / sqrt(d)) v`` with ``q``, ``k``, ``v`` linear in the input, multiplies the input by
itself (Kim, Papamakarios & Mnih 2021, "The Lipschitz constant of self-attention", ICML), and
LayerNorm divides by the input's own standard deviation. This script builds a small vision
transformer from parts that have one, trains it three ways on the 1,797 8x8 digit images bundled
with scikit-learn (no download; pixels in [0, 1], the split of the other digits examples) and
certifies the whole trained network, pixels to logits, with ``nj.lipschitz_certificate``.

The model, plain JAX functions of a params dict::

    8x8 image -> 16 patches of 2x2 (a permutation of the pixels) -> Dense(4 -> 32) + positions
      -> 3 blocks:  x <- (5/6) x + (1/6) mix(x);  x <- (5/6) x + (1/6) mlp(x)
      -> flatten (16 x 32) -> Dense(512 -> 10)

- ``mix``, bounded attention: each of the 4 heads mixes the tokens with a learned pattern that
  does not depend on the input, ``A_h = softmax(S_h) / sqrt(max column sum of softmax(S_h))``
  (``S_h`` a 16 x 16 parameter: the random synthesizer of Tay et al. 2021, "Synthesizer:
  rethinking self-attention in transformer models", ICML, normalised), applied to the head's
  values, ``mix(x)_h = A_h x W_V[:, h]``. A softmax's rows sum to 1 (``||A||_inf = 1``) and
  ``sigma(A)^2 <= ||A||_1 ||A||_inf`` (``||A||_1`` the largest column sum), so ``sigma(A_h) <= 1``
  whatever ``S``. This is honest about what it gives up: the pattern is the same for every image.
  Input-dependent softmax attention is not globally Lipschitz, and the certificate refuses it
  (the script shows the ``nj.NotCertifiable`` message for ``softmax(q k^T / sqrt(d)) v``).
- ``mlp``: ``W_2 relu(W_1 x + b_1) + b_2`` per token, hidden width 32.
- Residuals without LayerNorm, each a convex combination over the ``N = 6`` branches,
  ``x <- ((N - 1)/N) x + (1/N) f(x)``, the scaling Newhouse et al. (2025, "Training transformers
  with enforced Lipschitz constants", arXiv 2507.13338) use for their Lipschitz transformers.
- The blocks' leaves are stacked on a leading axis and applied by ``jax.lax.scan``, so the
  certificate walks, and compiles, one block and iterates it.

**The bound.** The matrices act on every token's features, the mixing on the token axis (block
diagonal over heads: its norm is ``max_h sigma(A_h)``). ReLU is 1-Lipschitz; biases and the
positions are constants and add nothing; patching and flattening only move pixels. With
``L_mix <= sigma(W_V) max_h sigma(A_h)``, ``L_mlp <= sigma(W_1) sigma(W_2)`` and the triangle
inequality for each residual,

    L_block <= ((N-1)/N + L_mix/N) ((N-1)/N + L_mlp/N),
    L <= sigma(W_embed) * prod_blocks L_block * sigma(W_head),

so a block is 1-Lipschitz as soon as its three matrices have ``sigma <= 1``, and then
``L <= sigma(W_embed) sigma(W_head)``. ``nj.lipschitz_certificate(apply, params, x_test)`` reads
exactly this composition from the jaxpr of ``apply`` (nothing of the model runs), with Gram-
iteration upper bounds (12 iterations) for the kernels and for the mixing patterns, which it
computes from ``S`` as the constants they are. The script reads the certificate's factors from
``cert.ops`` (``nj.OpBound`` records): the embedding and head kernels' bounds, and each block's
bound after it over its bound before.

**The runs** (same init, data order and 200 steps of 128 images), ``views`` from
``nj.infer_views(apply, params, x, overrides={"scores": nj.NotMatrix(...)})``: the five kernels are
``MatrixDims`` (the stacked ones ``(depth, in, out)``, one matrix per block), biases and positions
``NotMatrix("bias")``; the scores reach the model through a softmax, which infer_views does not
follow, and the override says they are no matrix to constrain (the mixing bounds itself):

- ``(a) unconstrained``: Adam (lr 3e-3);
- ``(b) spectral normalization``: Adam + ``nj.spectral_norm(1.0, estimator="power",
  mode="normalize", views=views)``: after every step each matrix is divided by a one-step
  power-iteration estimate of its sigma (Miyato et al. 2018, on the stored weight), so every
  sigma sits at 1 (a power estimate is a lower bound: at times a little above 1);
- ``(c) Muon + matmul clip``: ``optax.contrib.muon`` (lr 0.05 on the kernels, Adam 3e-3 on the
  rest; its dimension numbers built from the views, a stacked kernel one matrix per block) +
  ``nj.spectral_norm(1.0, estimator="matmul", mode="clip", views=views)``: singular values
  ``min(s, 1)`` by polynomial iterations, matrix products only, no SVD (the Polar Express of
  Amsel, Persson, Musco & Gower 2025), so a matrix may also sit below 1. Newhouse et al. 2025
  pair Muon with weight constraints of this kind. ``certify=True`` would also land every matrix
  inside the ball for sure after every step, rounding included (a 16-iteration Gram bound per
  kernel and step); it adds about 11 s of compilation here, over the one-minute budget of the
  demo, and the final certificate does not need it: it bounds the weights as they are.

All three minimise the same Lipschitz-margin cross-entropy (Tsuzuku, Sato & Sugiyama 2018,
"Lipschitz-margin training", NeurIPS), ``CE(T (f(x) + sqrt(2) eps_train (1 - onehot(y))))`` with
``T = 50`` and ``eps_train = 0.25`` (pixel units; conv_digits.py uses 0.15).

For each run the script prints test accuracy; the certified bound ``L (graph)``; the same
composition with exact singular values (float64 SVD in numpy); the largest spectral norm of the
10 x 64 input Jacobian over the test images (``jax.jacrev``), a lower bound on the true constant;
and certified robust accuracy at L2 radii 0.1, 0.25, 0.5 (pixel units; a test image has norm
about 3.9): ``nj.certified_accuracy(logits, labels, L, radii)``, an image counts if its margin
exceeds ``sqrt(2) L eps``. A second table lists the certificate's factors. The script asserts,
for every run, that the certificate is the product of its factors, at least the exact-sigma
composition and at least every Jacobian norm found, and for (c) that every block is 1-Lipschitz
and ``L <= 1``; it exits nonzero otherwise, in ``--quick`` mode too. It plots certified accuracy
against the radius and the bound part by part to ``examples/out/lipschitz_vit.png``.

What to expect (one full run, 200 steps, deterministic up to float rounding; the summary table without
its optimizer column)::

    run                         test acc  L (graph)  L (exact sigma)  max |J|  cert 0.1  cert 0.25  cert 0.5
    (a) unconstrained              97.1%    63.1660          63.1618   4.1766      0.0%       0.0%      0.0%
    (b) spectral normalization     85.6%     0.9559           0.9559   0.5591     56.7%      14.9%      0.0%
    (c) Muon + matmul clip         95.3%     0.9526           0.9516   0.6166     89.1%      64.0%      5.1%

    certified factors            embed  block 0  block 1  block 2    head  product
    (a) unconstrained           3.5792   2.1042   2.1960   1.9787  1.9302  63.1659
    (b) spectral normalization  1.0000   0.9847   0.9853   0.9852  1.0000   0.9559
    (c) Muon + matmul clip      1.0002   0.9823   0.9854   0.9837  1.0003   0.9526

(a) is the most accurate, and every part of it stretches: the embedding by 3.6, each block by
about 2, the head by 1.9, a certified bound of 63 that certifies no test image even at radius
0.1 (its largest Jacobian norm on the test set, 4.2, is far below 63: a product of per-part
bounds is a worst case over all inputs). (b) and (c) are both certified below 1: each block at
0.98-0.99 (``(5/6 + sigma_V sigma_A / 6)(5/6 + sigma_1 sigma_2 / 6)``, ``sigma_A`` the largest
mixing-pattern norm, below 1: the column-sum normalisation is not tight) and the embedding and
head at 1. (c)'s 1.0002 and 1.0003 are Gram
iteration's slack on a flat spectrum (the exact sigmas are 0.9999995: the clip leaves all 4 and
10 singular values at 1; 12 iterations over-estimate such a matrix by ``rank^(2^-13)``). (b)
pins every sigma at 1 and is 11 points less accurate than (a) here; (c), free to keep a sigma
below 1, trained with Muon's orthogonalised updates, keeps 95% and certifies 89% of the test set at radius 0.1,
64% at 0.25 (against 57% and 15% for (b)). In every run the certificate is within 0.1% of the
same composition with exact singular values (Gram bounds, 12 iterations); what separates it
from the largest Jacobian norm met (0.62 for (c)) is the composition itself: per-layer norms
multiplied, the triangle inequality at every residual, ReLU patterns ignored. The ``--quick``
run (30 steps) shows the same picture (L 20 / 0.97 / 0.94; (c) 93% accurate, 84% certified at
0.1), and (b)'s power estimate, still catching up, leaves some sigmas above 1 (block 2 at
1.004, the head at 1.003): spectral normalization by power iteration is not a certificate,
the graph certificate of the weights is.

Run ``python examples/lipschitz_vit.py`` (about 45-50 seconds on a 2-core CPU, almost all of it
XLA compilation: the graph certificate about 8 s, once for the three runs; Muon with the matmul
clip about 10 s; the power iteration's normalisation and its starting vectors about 7 s), or add
``--quick`` (or set ``NORMJAX_QUICK=1``) for a smoke run of 30 steps (almost as long: the same
compilation; the checks still run).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

import normjax as nj  # noqa: E402

# The data, batches, command line and tables, shared with the other digits examples (examples/_digits.py).
from _digits import batches, load_images, parse_args, print_rows, standard_promotion  # noqa: E402

IMAGE, PATCH = 8, 2
TOKENS = (IMAGE // PATCH) ** 2  # 16 tokens: the 2x2 patches
PATCH_DIM = PATCH * PATCH
WIDTH, HEADS, HIDDEN, DEPTH = 32, 4, 32, 3
CLASSES = 10
N_BRANCHES = 2 * DEPTH  # residual branches: a token mixer and an MLP in every block
KEEP, BRANCH = (N_BRANCHES - 1) / N_BRANCHES, 1 / N_BRANCHES  # x <- KEEP x + BRANCH f(x)

BATCH = 128
STEPS = 200  # about 19 epochs of the 1,347 training images
QUICK_STEPS = 30
LEARNING_RATE = 3e-3  # Adam (all of (a) and (b); the leaves that are not matrices in (c))
MUON_LEARNING_RATE = 0.05  # Muon, the matrices of (c)
SPECTRAL_BOUND = 1.0
TEMPERATURE = 50.0  # softmax temperature inside the loss only
EPS_TRAIN = 0.25  # Lipschitz-margin training radius (pixel units)
EPSILONS = (0.1, 0.25, 0.5)  # certified radii reported, L2 in pixel units (pixels in [0, 1])
PLOT_RADII = np.linspace(0.0, 0.8, 161)
LOG_EVERY = 20
CERT_ITERS = 12  # Gram iterations of the graph certificate (its default)
SEED = 0
RTOL = 1e-4  # float32 allowance in the checks

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "lipschitz_vit.png"


# ------------------------------------------------------------------------------------------
# The model: plain JAX functions of a params dict; the blocks' leaves stacked, applied by lax.scan
# ------------------------------------------------------------------------------------------


def init_params(seed: int = SEED) -> dict:
    """Kernels ``(fan_in, fan_out)`` with variance 1/fan_in, every block leaf stacked on axis 0
    (numpy's generator: nothing for XLA to compile)."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    def dense(*shape):
        return normal(*shape, scale=1.0 / math.sqrt(shape[-2]))

    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    return {
        "embed": {"kernel": dense(PATCH_DIM, WIDTH), "bias": zeros(WIDTH)},
        "pos": normal(TOKENS, WIDTH, scale=0.1),
        "blocks": {
            "scores": normal(DEPTH, HEADS, TOKENS, TOKENS),
            "value": dense(DEPTH, WIDTH, WIDTH),
            "fc1": {"kernel": dense(DEPTH, WIDTH, HIDDEN), "bias": zeros(DEPTH, HIDDEN)},
            "fc2": {"kernel": dense(DEPTH, HIDDEN, WIDTH), "bias": zeros(DEPTH, WIDTH)},
        },
        "head": {"kernel": dense(TOKENS * WIDTH, CLASSES), "bias": zeros(CLASSES)},
    }


def mixing(scores: jax.Array) -> jax.Array:
    """Per head, ``softmax(S) / sqrt(max column sum)``: an attention pattern that does not depend
    on the input, with spectral norm at most 1 whatever ``S``: ``sigma(A)^2 <= ||A||_1 ||A||_inf``
    and a softmax's rows sum to 1 (``||A||_inf = 1``); ``||A||_1`` is the largest column sum."""
    a = jax.nn.softmax(scores, axis=-1)
    return a / jnp.sqrt(jnp.max(jnp.sum(a, axis=-2), axis=-1))[..., None, None]


def block(p: dict, x: jax.Array) -> jax.Array:
    """One transformer block on ``(batch, tokens, width)``; each residual a convex combination."""
    b = x.shape[0]
    v = (x @ p["value"]).reshape(b, TOKENS, HEADS, WIDTH // HEADS)
    mixed = jnp.einsum("hts,bshd->bthd", mixing(p["scores"]), v).reshape(b, TOKENS, WIDTH)
    x = KEEP * x + BRANCH * mixed
    h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    return KEEP * x + BRANCH * h


def patches(images: jax.Array) -> jax.Array:
    """``(batch, 8, 8, 1)`` -> ``(batch, 16, 4)``: the 2x2 patches row by row (a permutation)."""
    b, n = images.shape[0], IMAGE // PATCH
    return images.reshape(b, n, PATCH, n, PATCH).transpose(0, 1, 3, 2, 4).reshape(b, TOKENS, PATCH_DIM)


def apply(params: dict, images: jax.Array) -> jax.Array:
    """Logits ``(batch, 10)``: patch embedding + positions, ``DEPTH`` blocks (one ``lax.scan``),
    a linear read-out of all tokens."""
    x = patches(images) @ params["embed"]["kernel"] + params["embed"]["bias"] + params["pos"]
    x, _ = jax.lax.scan(lambda x, p: (block(p, x), None), x, params["blocks"])
    return x.reshape(x.shape[0], TOKENS * WIDTH) @ params["head"]["kernel"] + params["head"]["bias"]


def qk_attention(p: dict, x: jax.Array) -> jax.Array:
    """What the token mixer is not: softmax attention whose scores ``q k^T`` depend on the input."""
    q, k, v = x @ p["query"], x @ p["key"], x @ p["value"]
    return jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / math.sqrt(WIDTH), axis=-1) @ v


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Lipschitz-margin cross-entropy: ``CE(T * (f(x) + sqrt(2) eps_train * (1 - onehot(y))))``."""
    margin = math.sqrt(2.0) * EPS_TRAIN * (1.0 - jax.nn.one_hot(y, CLASSES, dtype=jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(TEMPERATURE * (apply(params, x) + margin), y).mean()


# The model's gradient is compiled once for every run; each run compiles only its optimizer.
loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))


def make_update(tx: optax.GradientTransformation):
    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return update


def model_views(x: jax.Array | None = None):
    """``nj.infer_views`` of the ViT: ``MatrixDims`` for the kernels (``(depth, in, out)`` for the
    stacked ones: one matrix per block), ``NotMatrix("bias")`` for the biases and positions. The
    attention scores reach the model through a softmax, which infer_views does not follow: the
    override says they are no linear map (no constraint; the mixing has its own bound)."""
    x = jax.ShapeDtypeStruct((2, IMAGE, IMAGE, 1), jnp.float32) if x is None else x
    return nj.infer_views(apply, init_params(), x, overrides={"scores": nj.NotMatrix("attention scores")})


def muon_dims(views):
    """``optax.contrib.muon``'s dimension numbers from the views: Muon for every matrix (one per
    block of a stacked kernel, the other axes are Muon's batch axes), Adam for the rest."""
    return jax.tree.map(
        lambda v: optax.contrib.MuonDimensionNumbers(v.in_axes, v.out_axes) if isinstance(v, nj.MatrixDims) else None,
        views,
        is_leaf=lambda v: isinstance(v, (nj.MatrixDims, nj.NotMatrix)),
    )


def make_runs(views=None) -> dict[str, optax.GradientTransformation]:
    """The three optimizers compared (same init, data order and steps)."""
    views = model_views() if views is None else views
    adam = standard_promotion(optax.adam(LEARNING_RATE))
    muon = standard_promotion(optax.contrib.muon(
        MUON_LEARNING_RATE, adam_learning_rate=LEARNING_RATE, muon_weight_dimension_numbers=muon_dims(views)))
    return {
        "(a) unconstrained": adam,
        "(b) spectral normalization": optax.chain(
            adam, nj.spectral_norm(SPECTRAL_BOUND, estimator="power", mode="normalize", views=views)),
        "(c) Muon + matmul clip": optax.chain(
            muon, nj.spectral_norm(SPECTRAL_BOUND, estimator="matmul", mode="clip", views=views)),
    }


OPTIMIZERS = {
    "(a) unconstrained": "Adam",
    "(b) spectral normalization": "Adam + power normalize",
    "(c) Muon + matmul clip": "Muon + matmul clip",
}


@jax.jit
def logits_and_jacobians(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The logits and, per image, the ``(10, 64)`` Jacobian of the logits with respect to the pixels."""
    jac = jax.vmap(jax.jacrev(lambda xi: apply(params, xi[None])[0]))(x)
    return apply(params, x), jac.reshape(x.shape[0], CLASSES, -1)


def exact_factors(params: dict) -> dict[str, np.ndarray]:
    """The same composition as the certificate with exact singular values (float64 SVD, numpy):
    ``sigma(embed)``, per block ``(KEEP + BRANCH sigma(V) max_h sigma(A_h)) (KEEP + BRANCH
    sigma(W1) sigma(W2))``, ``sigma(head)``."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(params))
    sigma = lambda m: np.linalg.svd(m, compute_uv=False)[..., 0]  # noqa: E731
    b = p["blocks"]
    a = np.exp(b["scores"] - b["scores"].max(axis=-1, keepdims=True))
    a /= a.sum(axis=-1, keepdims=True)  # the softmax, then the mixing's normalization, in float64
    mix = a / np.sqrt(a.sum(axis=-2).max(axis=-1))[..., None, None]
    blocks = (KEEP + BRANCH * sigma(b["value"]) * sigma(mix).max(axis=-1)) * (
        KEEP + BRANCH * sigma(b["fc1"]["kernel"]) * sigma(b["fc2"]["kernel"]))
    return {"embed": sigma(p["embed"]["kernel"]), "blocks": blocks, "head": sigma(p["head"]["kernel"])}


def certified_factors(cert: nj.Certificate) -> dict[str, np.ndarray]:
    """The certificate's own factors, read from ``cert.ops`` (one ``nj.OpBound`` per op that
    changed the bound): the Gram bounds of the embedding and head kernels (``op.param``), and per
    block its bound after over its bound before: the last op of the scanned body (the second
    residual sum) records one bound per iteration; the first block starts from the embedding's."""
    by_param = {op.param: op for op in cert.ops if op.param in ("embed/kernel", "head/kernel")}
    embed = float(by_param["embed/kernel"].bound)  # the bias and positions add nothing
    after = np.asarray([op for op in cert.ops if op.rule.endswith("(scanned)")][-1].bound, np.float64)
    return {
        "embed": np.float64(embed),
        "blocks": after / np.concatenate([[embed], after[:-1]]),
        "head": np.float64(float(by_param["head/kernel"].factor)),
    }


def train(name: str, tx: optax.GradientTransformation, data, steps: int) -> dict:
    """Trains a fresh ViT (same seed and data order every run) and measures what the tables need."""
    (x_train, y_train), (x_test, y_test) = data
    params = init_params()
    opt_state = jax.jit(tx.init)(params)  # (b) starts from converged power vectors: 30 iterations, compiled
    update = make_update(tx)
    bar = tqdm(batches(len(x_train), BATCH, steps, SEED), total=steps, desc=f"{name:>28}", ncols=100)
    for i, idx in enumerate(bar, start=1):
        loss, grads = loss_and_grad(params, x_train[idx], y_train[idx])
        params, opt_state = update(params, opt_state, grads)
        if i % LOG_EVERY == 0 or i == steps:
            bar.set_postfix_str(f"loss {float(loss):.3f}", refresh=False)

    # The graph certificate: read from the jaxpr of apply (nothing of the model runs); compiled
    # once for the three runs (same jaxpr), then only the norms run.
    cert = nj.lipschitz_certificate(apply, params, x_test, num_iters=CERT_ITERS)
    bound = float(cert)
    logits, jac = jax.device_get(logits_and_jacobians(params, x_test))
    # every Jacobian's spectral norm is a lower bound on the Lipschitz constant
    jac_norms = np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False)[:, 0]
    exact = exact_factors(params)
    factors = certified_factors(cert)
    # certified robust accuracy: the fraction of test images whose certified radius
    # max(margin, 0) / (sqrt(2) L) exceeds eps; the reported radii and the plot's in one call
    cert_acc = np.asarray(nj.certified_accuracy(logits, y_test, cert, np.concatenate([EPSILONS, PLOT_RADII])))
    return {
        "test_acc": float(np.mean(np.argmax(logits, axis=1) == y_test)),
        "bound": bound,
        "exact": float(exact["embed"] * np.prod(exact["blocks"]) * exact["head"]),
        "exact_blocks": exact["blocks"],
        "factors": factors,
        "max_jac": float(jac_norms.max()),
        "cert_acc": {e: float(a) for e, a in zip(EPSILONS, cert_acc)},
        "cert_curve": cert_acc[len(EPSILONS):],
    }


# ------------------------------------------------------------------------------------------
# Checks, tables, plot
# ------------------------------------------------------------------------------------------


def check(results: dict[str, dict]) -> None:
    """What the example rests on; an AssertionError (a nonzero exit) if anything fails."""
    for name, r in results.items():
        f = r["factors"]
        product = float(f["embed"] * np.prod(f["blocks"]) * f["head"])
        # the certificate is the product of its factors (biases, positions, reshapes: factor 1)
        assert abs(product / r["bound"] - 1) <= RTOL, (name, product, r["bound"])
        # Gram bounds are >= exact singular values: never below the same composition with SVDs
        assert r["bound"] >= r["exact"] * (1 - RTOL), (name, r["bound"], r["exact"])
        assert np.all(f["blocks"] >= r["exact_blocks"] * (1 - RTOL)), (name, f["blocks"], r["exact_blocks"])
        # an upper bound: above every Jacobian norm met on the test set
        assert r["max_jac"] <= r["bound"] * (1 + RTOL), (name, r["max_jac"], r["bound"])
    c = results["(c) Muon + matmul clip"]
    # (c): every kernel clipped to sigma <= 1 (by matmuls, to about 1e-4), every mixing pattern
    # normalised to sigma <= 1: the certificate finds every block 1-Lipschitz, and L <= 1
    assert np.all(c["factors"]["blocks"] <= SPECTRAL_BOUND * (1 + RTOL)), c["factors"]
    assert c["bound"] <= SPECTRAL_BOUND * (1 + RTOL), c["bound"]


def refusal() -> str:
    """The certificate on the input-dependent attention ``qk_attention``: refused."""
    rng = np.random.default_rng(SEED)
    p = {n: jnp.asarray(rng.standard_normal((WIDTH, WIDTH)), jnp.float32) for n in ("query", "key", "value")}
    try:
        nj.lipschitz_certificate(qk_attention, p, jnp.zeros((2, TOKENS, WIDTH)), batch_axis=0)
    except nj.NotCertifiable as e:
        return str(e)
    raise AssertionError("lipschitz_certificate certified softmax(q k^T) v")


def print_tables(results: dict[str, dict]) -> None:
    rows = [("run", "optimizer", "test acc", "L (graph)", "L (exact sigma)", "max |J|",
             *(f"cert {e:g}" for e in EPSILONS))]
    for name, r in results.items():
        rows.append((name, OPTIMIZERS[name], f"{r['test_acc']:.1%}", f"{r['bound']:.4f}", f"{r['exact']:.4f}",
                     f"{r['max_jac']:.4f}", *(f"{r['cert_acc'][e]:.1%}" for e in EPSILONS)))
    print_rows(rows, left=2)
    print(f"""
test acc         accuracy on the held-out 25% (450 images)
L (graph)        nj.lipschitz_certificate(apply, params, x_test): a certified bound on the L2
                 Lipschitz constant of pixels -> logits, read from the model's jaxpr op by op
L (exact sigma)  the same composition with exact singular values (numpy SVD): the certificate's
                 Gram bounds are never below it
max |J|          the largest spectral norm of the 10 x 64 input Jacobian over the test images:
                 a lower bound on the true Lipschitz constant
cert eps         certified robust accuracy at L2 radius eps (pixel units): % of test images
                 classified correctly with margin > sqrt(2) * L (graph) * eps (nj.certified_accuracy)
""")
    rows = [("certified factors", "embed", *(f"block {i}" for i in range(DEPTH)), "head", "product")]
    for name, r in results.items():
        f = r["factors"]
        rows.append((name, f"{f['embed']:.4f}", *(f"{b:.4f}" for b in f["blocks"]), f"{f['head']:.4f}",
                     f"{f['embed'] * np.prod(f['blocks']) * f['head']:.4f}"))
    print_rows(rows)
    print(f"""
embed, head      sigma of the patch-embedding and read-out kernels (Gram bounds, from cert.ops)
block i          the certificate's bound after block i over its bound before it: at most
                 (KEEP + BRANCH sigma(V) max_h sigma(A_h)) (KEEP + BRANCH sigma(W1) sigma(W2)),
                 KEEP = {KEEP:.4f}, BRANCH = {BRANCH:.4f}; <= 1 whenever every sigma is""")


def plot(results: dict[str, dict], path: Path) -> None:
    """Certified robust accuracy against the radius; the certified bound part by part."""
    fig, (acc_ax, bound_ax) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    parts = ["input", "embed", *(f"block {i}" for i in range(DEPTH)), "head"]
    for (name, r), color in zip(results.items(), colors):
        acc_ax.plot(PLOT_RADII, r["cert_curve"], color=color, lw=1.8, label=f"{name} (L = {r['bound']:.3g})")
        acc_ax.plot(EPSILONS, [r["cert_acc"][e] for e in EPSILONS], "o", color=color, ms=4)
        f = r["factors"]
        bound_ax.plot(parts, np.cumprod([1.0, f["embed"], *f["blocks"], f["head"]]), "o-", color=color, label=name)
    acc_ax.set(title="certified robust accuracy (test set)", xlabel="L2 radius eps (pixels in [0, 1])",
               ylabel="fraction of test images", ylim=(0, 1.02))
    bound_ax.axhline(1.0, color="k", lw=0.8, ls="--")
    bound_ax.set(title="certified bound up to each part (cert.ops)",
                 yscale="log", ylabel="bound (L2, pixels -> activations)")
    for ax in (acc_ax, bound_ax):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ViT on 8x8 digits: {TOKENS} patches of {PATCH}x{PATCH}, width {WIDTH}, {DEPTH} blocks, "
                 f"fixed attention patterns, residuals x <- {KEEP:.3g} x + {BRANCH:.3g} f(x)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    steps, out = parse_args(__doc__, STEPS, QUICK_STEPS, DEFAULT_OUT, argv)
    data = load_images(SEED)
    views = model_views(data[1][0][:2])
    matrices = [k for k, v in nj.by_path(views).items() if isinstance(v, nj.MatrixDims)]
    print(f"infer_views: {len(matrices)} matrix leaves ({', '.join(matrices)}); the rest biases, positions, scores\n")
    results = {name: train(name, tx, data, steps) for name, tx in make_runs(views).items()}
    check(results)
    print()
    print_tables(results)
    print("\nInput-dependent attention instead of the fixed patterns (softmax(q k^T / sqrt(d)) v):")
    print("  nj.NotCertifiable: " + refusal().replace("\n", "\n  "))
    plot(results, out)
    print(f"\nplot written to {out}")


if __name__ == "__main__":
    main()
