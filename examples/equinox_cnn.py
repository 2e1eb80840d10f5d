"""An Equinox CNN held 1-Lipschitz with views read from the model itself (``nj.infer_views``).

Equinox (like PyTorch) stores a convolution kernel as ``(out, in, kh, kw)`` and a conv bias as
``(out, 1, 1)``; its ``Linear`` weight is ``(out, in)``. None of that matches the shape-based
default of ``nj.spectral_norm`` (rows = all axes but the last, the reshaped kernel of Miyato et
al. 2018 in Flax's ``(kh, kw, in, out)`` layout): on an ``(out, in, kh, kw)`` kernel the default
matrix is ``(out * in * kh) x kw``, with the kernel's *width taps* as columns, a number that has
nothing to do with what the layer does to an image. ``nj.infer_views`` instead traces the model
(``jax.make_jaxpr``; nothing runs) and reads every parameter's role from the ops that consume it:

    params, static = eqx.partition(model, eqx.is_array)
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    views = nj.infer_views(fn, params, x)

giving each conv weight a ``ConvSpec`` (8x8 input, its strides and pads, ``kernel_layout="OIHW"``),
the head a ``MatrixDims((1,), (0,))`` and every bias ``NotMatrix("bias")``.

The model, on the 1,797 8x8 digit images bundled with scikit-learn (no download; pixels in
[0, 1], channels first as Equinox expects)::

    Conv2d(1 -> 16, 3x3, pad 1) -> ReLU -> Conv2d(16 -> 32, 3x3, stride 2, pad 1) -> ReLU
    -> flatten (32*4*4) -> Linear(512 -> 10)

is trained twice (same seed, data order, Adam and steps), the loss a cross-entropy of the
logits times ``TEMPERATURE`` (a 1-Lipschitz network's logits are small), each run with
``nj.spectral_norm(1.0, estimator="gram", ...)`` last in ``optax.chain`` (Gram iteration,
Delattre et al. 2023: a certified upper bound, so the constraint holds for sure after every
step):

- ``(a) inferred views``: ``views=views``: each conv weight bounded by the operator norm of its
  convolution on 8x8 inputs, the head by its sigma; the network is then 1-Lipschitz, certified
  by ``nj.lipschitz_bound(params, views=views)``;
- ``(b) shape default``: no views: each conv weight held at sigma 1 of its ``(out*in*kh) x kw``
  matrix, which certifies nothing (``nj.lipschitz_bound(params)`` refuses it, and the script
  prints its message).

It prints the inferred views, then per run the test accuracy, the product of the default view's
sigmas (what (b) would claim), the certified bound ``nj.lipschitz_bound(params, views=views)``,
the exact bound (``estimator="svd"``: exact operator norms) and the largest spectral norm of the
input-to-logits Jacobian over the test set (a lower bound on the Lipschitz constant); then every
weight's exact operator norm (``nj.spectral_norms(params, estimator="svd", views=views)``), its
Gram bound and the default view's matrix and sigma. Last, the biases: the views call them
``NotMatrix("bias")``, the transform's state keeps no entry for them (``optax.MaskedNode()``),
and an update of +1 on every entry of every leaf, passed through the trained run's
``nj.spectral_norm`` once more, comes back bit for bit on every bias while every weight's is
rescaled. The script asserts all of that and that (a)'s lower bounds stay under its certified
bound, and exits nonzero if a check fails (in ``--quick`` mode too). It writes the tables to
``examples/out/equinox_cnn.md`` (``--out`` to change).

What to expect (300 steps, deterministic up to float rounding; measured 2026-12-03 on the
2-core CPU): (a) is certified 1-Lipschitz (exact product 0.95) at 96.9% test accuracy; the
default matrix of its conv1 has sigma 0.51 for a layer whose operator norm is 0.9990, so the
default would under-report it by half. (b) holds every default sigma at 1 and reaches 96.0%,
but its conv layers' operator norms are 1.84 (conv1) and 0.96 (conv2) (Gram bounds 1.84 and
1.006), so its true certified bound is 1.85, not the 1 its own view claims; both runs leave
the biases alone.

Run ``python examples/equinox_cnn.py`` (about 25 seconds on a 2-core CPU, most of it
compilation: each run's training step, and its constraint once more for the bias check, compile
per run; the norms and Jacobians once for both), or add ``--quick`` (or set ``NORMJAX_QUICK=1``)
for a smoke run of 60 steps (about 20 seconds, almost all of it the same compilation; the checks
still run).
"""

from __future__ import annotations

import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import normjax as nj

from normjax import infer_views

# The data, batches and command line, shared with the digits examples (examples/_digits.py).
from _digits import batches, load_images, markdown, parse_args, print_rows, standard_promotion

CHANNELS = (16, 32)
CLASSES = 10
BATCH = 128
STEPS = 300
QUICK_STEPS = 60
LEARNING_RATE = 1e-2
SPECTRAL_BOUND = 1.0
TEMPERATURE = 50.0  # softmax temperature inside the loss only
SEED = 0
RTOL = 1e-5  # float32 rounding allowance in the checks
PROBE = 1.0  # the update added to every entry in the bias check

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "equinox_cnn.md"


class CNN(eqx.Module):
    """``Conv2d 3x3 -> ReLU -> Conv2d 3x3 stride 2 -> ReLU -> flatten -> Linear`` on one ``(1, 8, 8)`` image."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, CHANNELS[0], 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(CHANNELS[0], CHANNELS[1], 3, stride=2, padding=1, key=k2)
        self.head = eqx.nn.Linear(CHANNELS[1] * 4 * 4, CLASSES, key=k3)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        return self.head(x.reshape(-1))


@eqx.filter_jit
def build():
    """The model split into its arrays (``params``: what optax and normjax see) and the rest.

    Jitted: one compiled program draws every initial weight (the same values as eager
    construction, which compiles one random-number program per weight shape instead)."""
    return eqx.partition(CNN(jax.random.key(SEED)), eqx.is_array)


def make_apply(static):
    """``fn(params, x)``: the model on a batch of ``(N, 1, 8, 8)`` images."""
    return lambda params, x: jax.vmap(eqx.combine(params, static))(x)


def make_runs(views) -> dict[str, tuple[optax.GradientTransformation, optax.GradientTransformation]]:
    """``name -> (optimizer, its constraint)``: the same Adam and certified spectral bound, with the
    inferred views and without. The constraint goes last in the chain."""
    adam = standard_promotion(optax.adam(LEARNING_RATE))
    constraints = {
        "(a) inferred views": nj.spectral_norm(SPECTRAL_BOUND, estimator="gram", views=views),
        "(b) shape default": nj.spectral_norm(SPECTRAL_BOUND, estimator="gram"),
    }
    return {name: (optax.chain(adam, c), c) for name, c in constraints.items()}


def describe(view) -> str:
    if isinstance(view, nj.ConvSpec):
        return (f"ConvSpec({view.input_shape}, strides={view.strides}, padding={view.padding}, "
                f"{view.kernel_layout!r})")
    return repr(view)


def default_matrix(shape: tuple[int, ...]) -> str:
    """The shape-based default matrix of a leaf: rows = all axes but the last."""
    return f"{math.prod(shape[:-1])} x {shape[-1]}"


def train(name: str, tx, constraint, apply, params, measurements, data, steps: int) -> dict:
    (x_train, y_train), (x_test, y_test) = data

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(TEMPERATURE * apply(p, x), y).mean()

    @jax.jit
    def step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    opt_state = tx.init(params)
    bar = tqdm(batches(len(x_train), BATCH, steps, SEED), total=steps, desc=f"{name:>18}", ncols=100)
    for i, idx in enumerate(bar, start=1):
        params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
        if i % 50 == 0 or i == steps:
            bar.set_postfix_str(f"loss {float(loss):.3f}", refresh=False)
    return measure(params, opt_state[1], constraint, measurements, x_test, y_test)


def make_measurements(apply, views):
    """``(norms, logits_and_jacobian_norms)``, jitted once for both runs (same model, same
    shapes: each compiles once, not once per run)."""

    @jax.jit
    def norms(p):
        return {
            "certified": nj.lipschitz_bound(p, views=views),  # Gram: a certified upper bound
            "exact": nj.lipschitz_bound(p, views=views, estimator="svd"),
            "operator": nj.by_path(nj.spectral_norms(p, estimator="svd", views=views)),
            "operator_gram": nj.by_path(nj.spectral_norms(p, estimator="gram", views=views)),
            "default": nj.by_path(nj.spectral_norms(p, estimator="gram")),  # no views: shape default
        }

    @jax.jit
    def logits_and_jacobian_norms(p, x):
        f = lambda xi: apply(p, xi[None])[0]  # noqa: E731
        jac = jax.vmap(jax.jacobian(f))(x).reshape(x.shape[0], CLASSES, -1)
        return jax.vmap(f)(x), jnp.linalg.svd(jac, compute_uv=False)[:, 0]

    return norms, logits_and_jacobian_norms


def measure(params, state, constraint, measurements, x_test, y_test) -> dict:
    """What the tables need; ``state``: the constraint's part of the chain's state;
    ``measurements``: what :func:`make_measurements` returns."""
    norms, logits_and_jacobian_norms = measurements
    n = jax.device_get(norms(params))
    logits, jac = jax.device_get(logits_and_jacobian_norms(params, x_test))

    # The biases: a +PROBE update on every entry of every leaf, through the run's constraint.
    probe = jax.tree.map(lambda p: jnp.full_like(p, PROBE), params)
    out, _ = jax.jit(constraint.update)(probe, state, params)
    same = {k: bool(np.array_equal(np.asarray(a), np.asarray(b)))
            for (k, a), b in zip(nj.by_path(probe).items(), nj.by_path(out).values())}
    return {
        "test_acc": float(np.mean(np.argmax(logits, axis=1) == y_test)),
        "certified": float(n["certified"]),
        "exact": float(n["exact"]),
        "claimed_default": float(np.prod([float(v) for v in n["default"].values()])),
        "jac": float(jac.max()),
        "layers": {k: (float(n["operator"][k]), float(n["operator_gram"][k]), float(n["default"][k]))
                   for k in n["operator"]},
        "state_keys": list(nj.by_path(state.sigma)),
        "passed_through": same,
    }


def checks(results: dict[str, dict], views_by_path: dict, shapes: dict) -> list[str]:
    """The properties the example shows; raises SystemExit if one fails."""
    failed, lines = [], []
    a = results["(a) inferred views"]
    weights = [k for k in shapes if not k.endswith("/bias")]
    biases = [k for k in shapes if k.endswith("/bias")]
    ok_views = (all(isinstance(views_by_path[k], nj.ConvSpec) and views_by_path[k].kernel_layout == "OIHW"
                    for k in weights if len(shapes[k]) == 4)
                and views_by_path["head/weight"] == nj.MatrixDims((1,), (0,))
                and all(views_by_path[k] == nj.NotMatrix("bias") for k in biases))
    lines.append("views: conv weights ConvSpec 'OIHW', head MatrixDims((1,), (0,)), biases NotMatrix('bias'): "
                 + ("yes" if ok_views else "NO"))
    failed += [] if ok_views else ["views"]
    ok_a = (a["certified"] <= SPECTRAL_BOUND ** len(weights) * (1 + RTOL) and a["exact"] <= a["certified"] * (1 + RTOL)
            and a["jac"] <= a["exact"] * (1 + 1e-4))
    lines.append(f"(a) certified L = {a['certified']:.4f} <= 1, exact L = {a['exact']:.4f}, largest Jacobian norm "
                 f"{a['jac']:.4f} <= exact: " + ("consistent." if ok_a else "VIOLATED."))
    failed += [] if ok_a else ["(a)"]
    for name, r in results.items():
        untouched = all(r["passed_through"][k] for k in biases)
        moved = not any(r["passed_through"][k] for k in weights)
        no_state = not any(k in r["state_keys"] for k in biases)
        lines.append(
            f"{name}: biases {', '.join(f'{k} {shapes[k]}' for k in biases)}: no state entry: "
            f"{'yes' if no_state else 'NO'}; a +{PROBE:g} update came back bit for bit: "
            f"{'yes' if untouched else 'NO'}; "
            f"every weight's update rescaled: {'yes' if moved else 'NO'}"
        )
        failed += [] if untouched and moved and no_state else [f"{name} biases"]
    if failed:
        for line in lines:
            print(line)
        raise SystemExit(f"equinox_cnn: check failed for {', '.join(failed)}")
    return lines


def main(argv: list[str] | None = None) -> None:
    steps, out = parse_args(__doc__, STEPS, QUICK_STEPS, DEFAULT_OUT, argv, out_help="the markdown file to write")
    (x_train, y_train), (x_test, y_test) = load_images(SEED)
    chw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # noqa: E731  (N, 8, 8, 1) -> (N, 1, 8, 8)
    data = (chw(x_train), y_train), (chw(x_test), y_test)

    params, static = build()
    apply = make_apply(static)
    views = infer_views(apply, params, data[0][0][:1])
    shapes = {k: tuple(v.shape) for k, v in nj.by_path(params).items()}
    views_by_path = nj.by_path(views)

    view_rows = [("leaf", "shape", "inferred view", "shape default (no views)")]
    for k, shape in shapes.items():
        default = "skipped (named bias)" if k.endswith("/bias") else f"matrix {default_matrix(shape)}"
        view_rows.append((k, str(shape), describe(views_by_path[k]), default))
    print("What nj.infer_views read from the Equinox model (and what the shape-based default would use):\n")
    print_rows(view_rows, left=4)
    try:
        nj.lipschitz_bound(params)
        refusal = "nj.lipschitz_bound(params) without views: (no error)"
    except ValueError as e:
        refusal = f"nj.lipschitz_bound(params) without views refuses: {e}"
    print("\n" + refusal + "\n")

    runs = make_runs(views)
    measurements = make_measurements(apply, views)
    results = {name: train(name, tx, c, apply, params, measurements, data, steps) for name, (tx, c) in runs.items()}
    lines = checks(results, views_by_path, shapes)

    summary = [("run", "test acc", "default-view claim", "certified L", "exact L", "max |J| test")]
    for name, r in results.items():
        summary.append((name, f"{r['test_acc']:.1%}", f"{r['claimed_default']:.4f}", f"{r['certified']:.4f}",
                        f"{r['exact']:.4f}", f"{r['jac']:.4f}"))
    layers = [("weight", "shape", "operator norm", "Gram bound", "default matrix", "default sigma")]
    for name, r in results.items():
        for k, (op, gram, default) in r["layers"].items():
            layers.append((f"{name}: {k}", str(shapes[k]), f"{op:.4f}", f"{gram:.4f}", default_matrix(shapes[k]),
                           f"{default:.4f}"))
    legend = """\
default-view claim  product of the Gram sigmas of the shape-based default matrices (what (b) holds at 1)
certified L         nj.lipschitz_bound(params, views=views): conv operator norms x head sigma, Gram bounds
exact L             the same product with exact operator norms (estimator="svd")
max |J| test        largest spectral norm of the input-to-logits Jacobian over the 450 test images
                    (a lower bound on the Lipschitz constant)
operator norm       exact norm of x -> conv(x, W) on the layer's input (nj.spectral_norms(..., estimator="svd",
                    views=views)); for the head its sigma
default matrix      rows = all axes but the last: for (out, in, kh, kw) the kernel's width taps are the columns"""
    print()
    print_rows(summary)
    print()
    print_rows(layers, left=2)
    print()
    print(legend)
    print()
    for line in lines:
        print(line)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# equinox_cnn: inferred views vs the shape default ({steps} steps)\n\n" + markdown(view_rows) + "\n\n"
        + refusal + "\n\n" + markdown(summary) + "\n\n" + markdown(layers) + "\n\n```\n" + legend + "\n```\n\n"
        + "\n\n".join(lines) + "\n"
    )
    print(f"\ntables written to {out}")


if __name__ == "__main__":
    main()
