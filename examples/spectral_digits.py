"""A certified Lipschitz bound and certified robust accuracy from spectral-norm training (8x8 digits).

If every kernel of an MLP with 1-Lipschitz activations (ReLU) has largest singular value
``sigma_k``, the network ``f`` is ``L``-Lipschitz in the L2 norm with ``L = prod_k sigma_k``
(biases do not matter). For two logits, ``x -> f_y(x) - f_j(x)`` is then ``sqrt(2) L``-Lipschitz
(``||e_y - e_j|| = sqrt(2)``), so a point classified correctly with margin
``m(x) = f_y(x) - max_{j != y} f_j(x)`` keeps its label under every perturbation ``delta`` with
``||delta||_2 <= eps`` whenever ``m(x) > sqrt(2) L eps``: a certificate that needs no attack
(Tsuzuku, Sato & Sugiyama 2018, "Lipschitz-margin training", NeurIPS).

This script trains the same MLP (64 -> 256 -> 256 -> 10, ReLU, no dropout) on the 1,797 8x8
digit images bundled with scikit-learn (no download), with one data order and initialization,
twice with Adam:

- ``unconstrained``: ``optax.adam(lr)``;
- ``spectral <= 1``: ``optax.chain(optax.adam(lr), nj.spectral_norm(1.0, estimator="gram"))``.
  After every step each kernel is rescaled, ``W * min(1, 1 / sigma_hat)``, with ``sigma_hat``
  the Gram-iteration bound of Delattre et al. (2023, "Efficient bound of Lipschitz constant for
  convolutional layers by Gram iteration", ICML): an upper bound on ``sigma_max``, so after every
  step ``sigma_max <= 1`` holds for sure and the network is 1-Lipschitz (a certified version of
  the spectral normalization of Miyato et al. 2018, "Spectral normalization for generative
  adversarial networks", ICLR, applied to the stored weights).

The loss (the same for both runs, so that only the constraint differs) is Lipschitz-margin
training with the bound fixed at 1 (Tsuzuku et al. 2018) and a softmax temperature:
cross-entropy on ``T * (f(x) + sqrt(2) eps_train (1 - onehot(y)))``, ``T = 10``,
``eps_train = 0.5``. Both terms live only inside the loss: the classifier, its margins and the
certificates use ``f`` itself. Why: a 1-Lipschitz network cannot scale its logits up, so plain
cross-entropy (``T = 1``) leaves the margins small and the training set under-fitted; the
temperature lets the loss saturate at margins a 1-Lipschitz net can reach, and the added
``sqrt(2) eps_train`` asks for margins that certify radius ``eps_train``. For the unconstrained
net the same constant margin certifies nothing, because its ``L`` is not 1.

Inputs are standardized (each pixel shifted and scaled by its training-set mean and standard
deviation). That affine map is applied before the network, so every Lipschitz bound, gradient
norm and radius ``eps`` below is in standardized-input units (a typical test image has norm
about 6.8 in these units, and its nearest training image of another class is about 6 away).

For each run the script prints test accuracy; the certified bound ``L = nj.lipschitz_bound(params)``
(the product of per-layer Gram bounds); next to it the graph certificate
``nj.lipschitz_certificate(apply, params, x_test)``, the certified bound read from the model's
own jaxpr op by op (nothing of the model runs; Gram bounds with 12 iterations), which for this
plain chain is the same product (the script asserts the two agree within 1%; Gram's tolerance is
about 1e-3); the exact product of the largest singular values (SVD) for comparison; an empirical
check, the largest input-gradient norm of any logit margin ``f_y - f_j`` (``j != y``) over the
test set, computed with ``jax.jacrev``, which the script asserts is at most ``sqrt(2) L`` for both
certified bounds (it is at most ``sqrt(2)`` times the Lipschitz constant); and certified robust
accuracy at a few radii, ``nj.certified_accuracy(logits, labels, L, EPSILONS)``. It also prints
what the transform logged in its state (``nj.SpectralNormState.sigma``), and plots certified
accuracy against the radius and each test image's largest margin-gradient norm against
``sqrt(2) L`` to ``examples/out/spectral_digits.png``.

What to expect: the constrained net has ``L = 1`` (the Gram bound recomputed on the rescaled
kernels is 1 up to float32 rounding, about 1e-7 above; the exact product is just below 1), the
better test accuracy here, and certified accuracy that lasts to radius 0.5 (about 75%). The
unconstrained net's bound is about 7.5 and exact (the Gram bound equals the SVD product to
four digits): not huge, since 400 Adam steps on this small problem do not grow the weights
much, but enough that its certificates vanish by radius 0.5. In both, the largest gradient
norm actually met on the test set stays well below ``sqrt(2) L``: the product of per-layer
norms is a worst case over the whole input space, so the certified radii are conservative.
The graph certificate matches the product to about 1e-5 (7.50938 against 7.50981 and 0.999985
against 0.999996 in a full run: its 12 Gram iterations are a little tighter than the 8 of
``nj.lipschitz_bound``), as it must for a plain chain of linear layers and ReLUs.

Run ``python examples/spectral_digits.py`` (about 25 seconds on a 2-core CPU, a few of them the
graph certificate's compilation, once for both runs), or add
``--quick`` (or set ``NORMJAX_QUICK=1``) for a smoke run of a few steps.
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
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

import normjax as nj  # noqa: E402

# The data and the model, shared with maxnorm_digits.py (examples/_digits.py, next to this file).
from _digits import MLP, batches, load_data, new_mlp, parse_args, standard_promotion  # noqa: E402

# Every number below is deterministic. Hidden width 256 rather than the max-norm demo's 512:
# Gram iteration costs 8 n x n matrix products per kernel and step (n = the smaller side), and
# at 512 the constrained run alone takes about 20 s on 2 cores; the results are much the same.
SIZES = (64, 256, 256, 10)
BATCH = 128
STEPS = 400  # about 38 epochs of the 1,347 training images
QUICK_STEPS = 20
LEARNING_RATE = 1e-3
SPECTRAL_BOUND = 1.0  # every kernel's sigma_max <= 1, so L <= 1 ** 3
TEMPERATURE = 10.0  # softmax temperature inside the loss only
EPS_TRAIN = 0.5  # Lipschitz-margin training radius: margin sqrt(2) * EPS_TRAIN added to the loss
EPSILONS = (0.05, 0.1, 0.25, 0.5, 1.0)  # certified radii reported, standardized-input units
EVAL_EVERY = 20  # steps between evaluations of the test accuracy (for the progress bar)
SEED = 0
SQRT2 = math.sqrt(2.0)
RTOL = 1e-5  # float32 rounding allowance in the gradient-vs-bound assertion
GRAPH_RTOL = 0.01  # graph certificate vs nj.lipschitz_bound: the same product for a plain chain (Gram, ~1e-3)
PLOT_RADII = np.linspace(0.0, 1.5, 301)  # the certified-accuracy curve of the plot

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "spectral_digits.png"


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    """Lipschitz-margin cross-entropy: ``CE(T * (f(x) + sqrt(2) eps_train * (1 - onehot(y))))``."""
    margin = SQRT2 * EPS_TRAIN * (1.0 - jax.nn.one_hot(y, SIZES[-1], dtype=jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(TEMPERATURE * (model(x) + margin), y).mean()


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    """One optimizer step. Returns the batch loss and, for the spectral run, the sigma of every
    kernel the step proposed before the projection, as logged in the transform's state (an
    empty dict for the unconstrained run)."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    # The chain's state holds an nj.SpectralNormState; tree_get finds its field by name. Each
    # field is shaped like the params (an empty placeholder for the biases); nj.by_path turns it
    # into {"layers/0/kernel": value} and unwraps the nnx variables an nnx.Optimizer keeps it in.
    sigma = optax.tree_utils.tree_get(optimizer.opt_state, "sigma", default={})
    return loss, nj.by_path(sigma)


@nnx.jit
def evaluate(model: MLP, x_test: jax.Array, y_test: jax.Array) -> jax.Array:
    """Test accuracy."""
    return jnp.mean(jnp.argmax(model(x_test), axis=-1) == y_test)


@nnx.jit
def logits_and_gradients(model: MLP, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per test point: the logits, and the largest L2 norm over ``j != y`` of the input gradient
    of the logit margin ``f_y - f_j``."""
    logits = model(x)
    is_y = jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.bool_)
    jac = jax.vmap(jax.jacrev(lambda xi: model(xi[None])[0]))(x)  # (n, classes, inputs)
    jac_y = jnp.sum(jnp.where(is_y[:, :, None], jac, 0.0), axis=1, keepdims=True)
    grad_norms = jnp.linalg.norm(jac_y - jac, axis=-1)  # (n, classes); 0 at j = y
    return logits, jnp.max(grad_norms, axis=-1)


def graph_certificate(model: MLP, x: jax.Array) -> nj.Certificate:
    """``nj.lipschitz_certificate`` of ``x -> model(x)`` with respect to its parameters (the
    ``nnx.Param`` state; the rest of the model, e.g. the dropout's RNG state, held fixed)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nj.lipschitz_certificate(lambda p, xx: nnx.merge(graphdef, p, rest)(xx), params, x)


@jax.jit
def certify(params) -> dict:
    """The certified bound L (Gram), the exact product (SVD) and every kernel's sigma by both."""
    return {
        "bound": nj.lipschitz_bound(params),
        "bound_svd": nj.lipschitz_bound(params, estimator="svd"),
        "sigma": nj.spectral_norms(params, estimator="gram"),
        "sigma_svd": nj.spectral_norms(params, estimator="svd"),
    }


def make_runs() -> dict[str, optax.GradientTransformation]:
    """The optimizers compared: the same Adam, with and without the certified spectral bound."""
    adam = standard_promotion(optax.adam(LEARNING_RATE))
    # nj.spectral_norm goes last: it rescales params + updates back into the ball. Its defaults
    # select every kernel (never a bias); "gram" makes sigma <= 1 certain after every step.
    return {
        "unconstrained": adam,
        f"spectral <= {SPECTRAL_BOUND:g}": optax.chain(adam, nj.spectral_norm(SPECTRAL_BOUND, estimator="gram")),
    }


def train(name: str, tx: optax.GradientTransformation, data, steps: int) -> dict:
    """Trains a fresh model (same seed every run) and returns what the tables and plot need."""
    (x_train, y_train), (x_test, y_test) = data
    model = new_mlp(SIZES, 0.0, SEED)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    step_fn = nnx.cached_partial(train_step, model, optimizer)
    history = []
    bar = tqdm(batches(len(x_train), BATCH, steps, SEED), total=steps, desc=f"{name:>18}", ncols=100)
    for step, idx in enumerate(bar, start=1):
        history.append(step_fn(x_train[idx], y_train[idx]))
        if step % EVAL_EVERY == 0 or step == steps:
            test_acc = evaluate(model, x_test, y_test)
            bar.set_postfix_str(f"test acc {float(test_acc):.3f}", refresh=False)

    _, logged = jax.device_get(list(zip(*history)))
    cert = jax.device_get(certify(nnx.state(model, nnx.Param)))
    logits, grad_norm = jax.device_get(logits_and_gradients(model, x_test, y_test))
    bound = float(cert["bound"])  # Gram: certified
    graph = float(graph_certificate(model, x_test))  # read from the model's jaxpr: certified too
    max_grad = float(grad_norm.max())
    # The check the certificate rests on: no margin changes faster than sqrt(2) L.
    assert max_grad <= SQRT2 * bound * (1 + RTOL), f"{name}: |grad margin| {max_grad} > sqrt(2) L = {SQRT2 * bound}"
    # The graph certificate: above the same lower bound, and the same product for this plain chain.
    assert max_grad <= SQRT2 * graph * (1 + RTOL), f"{name}: |grad margin| {max_grad} > sqrt(2) L_graph = {SQRT2 * graph}"
    assert abs(graph / bound - 1) <= GRAPH_RTOL, f"{name}: graph certificate {graph} vs lipschitz_bound {bound}"
    return {
        "test_acc": float(test_acc),
        "bound": bound,
        "graph": graph,
        "bound_svd": float(cert["bound_svd"]),
        "max_grad": max_grad,
        "grad_norm": grad_norm,
        # certified robust accuracy: the fraction of test points whose certified L2 radius
        # max(margin, 0) / (sqrt(2) L) exceeds eps, at the reported radii and along the plot's radii
        "cert_acc": {e: float(a) for e, a in zip(EPSILONS, nj.certified_accuracy(logits, y_test, bound, EPSILONS))},
        "cert_curve": np.asarray(nj.certified_accuracy(logits, y_test, bound, PLOT_RADII)),
        "logged": {path: np.array([s[path] for s in logged]) for path in logged[0]},
        # nj.spectral_norms returns a tree shaped like params (None for biases); by_path keys it.
        "final_sigma": {k: float(v) for k, v in nj.by_path(cert["sigma"]).items()},
        "final_sigma_svd": {k: float(v) for k, v in nj.by_path(cert["sigma_svd"]).items()},
    }


def print_rows(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))


def print_tables(results: dict[str, dict]) -> None:
    rows = [("run", "test acc", "L (Gram)", "L (graph)", "L (SVD)", "max |grad m|", "sqrt2*L",
             *(f"cert {e:g}" for e in EPSILONS))]
    for name, r in results.items():
        rows.append((
            name,
            f"{r['test_acc']:.1%}",
            f"{r['bound']:.6g}",
            f"{r['graph']:.6g}",
            f"{r['bound_svd']:.6g}",
            f"{r['max_grad']:.3g}",
            f"{SQRT2 * r['bound']:.4g}",
            *(f"{r['cert_acc'][e]:.1%}" for e in EPSILONS),
        ))
    print_rows(rows)
    print("""
test acc      accuracy on the held-out 25% (450 images)
L (Gram)      nj.lipschitz_bound(params): product over the 3 kernels of the Gram-iteration
              upper bound on sigma_max; a certified Lipschitz bound (L2 -> L2) of the network,
              with respect to standardized inputs
L (graph)     nj.lipschitz_certificate(apply, params, x_test): the certified bound read from
              the model's jaxpr, op by op (no views needed); for this plain chain the same
              product, to Gram's tolerance (checked within 1% of L (Gram))
L (SVD)       the same product with the exact sigma_max of each kernel (estimator="svd")
max |grad m|  the largest L2 norm, over test images x and classes j != y, of the input
              gradient of the logit margin f_y(x) - f_j(x) (jax.jacrev); checked <= sqrt2*L
sqrt2*L       the Lipschitz bound of every logit margin, since ||e_y - e_j|| = sqrt(2)
cert eps      certified robust accuracy at L2 radius eps (standardized-input units): % of test
              images classified correctly with margin f_y - max_{j!=y} f_j > sqrt(2) L eps,
              hence correctly by f at every point within distance eps (nj.certified_accuracy)""")

    print("\nWhat nj.spectral_norm logged: optax.tree_utils.tree_get(opt_state, 'sigma'), the Gram bound")
    print("on sigma_max of params + updates, before the projection, one per kernel:\n")
    for name, r in results.items():
        if not r["logged"]:
            continue
        rows = [("kernel", "last step", "max, all steps", "steps rescaled", "final (Gram)", "final (SVD)")]
        for path, s in r["logged"].items():
            rows.append((
                f"{name}: {path}",
                f"{s[-1]:.6g}",
                f"{s.max():.4g}",
                f"{np.mean(s > SPECTRAL_BOUND):.0%}",
                f"{r['final_sigma'][path]:.6g}",
                f"{r['final_sigma_svd'][path]:.6g}",
            ))
        print_rows(rows)
    print(f"""
last step       the sigma bound the last step proposed, before nj.spectral_norm rescaled it
max, all steps  the largest such sigma over all steps (the first step starts from the random init)
steps rescaled  % of steps whose proposal exceeded {SPECTRAL_BOUND:g}, so the kernel was rescaled to it
final           sigma_max of the trained kernel: the Gram bound (<= {SPECTRAL_BOUND:g} up to float32 rounding
                of the rescaling) and the exact value""")


def plot(results: dict[str, dict], path: Path) -> None:
    """Certified robust accuracy against the radius; how close the gradients come to the bound."""
    fig, (acc_ax, grad_ax) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    grad_bins = np.geomspace(0.2, 20, 61)
    for (name, r), color in zip(results.items(), colors):
        acc_ax.plot(PLOT_RADII, r["cert_curve"], color=color, lw=1.8, label=name)
        acc_ax.plot(EPSILONS, [r["cert_acc"][e] for e in EPSILONS], "o", color=color, ms=4)
        grad_ax.hist(r["grad_norm"], bins=grad_bins, color=color, alpha=0.6, label=f"{name}: max |grad m|")
        grad_ax.axvline(SQRT2 * r["bound"], color=color, lw=1.5, ls="--", label=f"{name}: sqrt(2) L")
    acc_ax.set(title="certified robust accuracy (test set)", xlabel="L2 radius eps (standardized inputs)",
               ylabel="fraction of test images", ylim=(0, 1.02))
    grad_ax.set(title="per test image: largest input-gradient norm of f_y - f_j",
                xlabel="L2 norm (standardized inputs)", ylabel="test images", xscale="log")
    for ax in (acc_ax, grad_ax):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"MLP {'-'.join(map(str, SIZES))} on 8x8 digits, Adam lr {LEARNING_RATE:g}, "
        f"Lipschitz-margin loss (T={TEMPERATURE:g}, eps_train={EPS_TRAIN:g})"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    steps, out = parse_args(__doc__, STEPS, QUICK_STEPS, DEFAULT_OUT, argv)

    data = load_data(SEED)
    results = {name: train(name, tx, data, steps) for name, tx in make_runs().items()}
    print()
    print_tables(results)
    plot(results, out)
    print(f"\nplot written to {out}")


if __name__ == "__main__":
    main()
