"""Max-norm + dropout keeps a high-learning-rate MLP from blowing up (scikit-learn's 8x8 digits).

Srivastava et al. (2014, "Dropout: a simple way to prevent neural networks from overfitting",
JMLR 15, section 5.1) train dropout networks with large learning rates and high momentum, and
bound every hidden unit's incoming weight vector, ``||w||_2 <= c``, after each step (max-norm).
The bound is what lets them take steps that would otherwise make the weights blow up.

This script repeats that at laptop scale: an MLP (64 -> 512 -> 512 -> 10, ReLU, dropout 0.5)
on the 1,797 8x8 digit images bundled with scikit-learn (no download), trained with one data
order, one initialization and one stream of dropout masks under five optimizers, all SGD with
Nesterov momentum at the same deliberately large learning rate:

- ``unconstrained``;
- ``weight decay 0.001`` and ``weight decay 0.01``: L2 weight decay on the kernels;
- ``max-norm c=1`` and ``max-norm c=4``: ``optax.chain(sgd, nj.max_norm(c))``.

What to expect: the unconstrained run's weights grow until the loss turns NaN, and so do
those of the weaker weight decay, later; the stronger decay trains. Both max-norm runs train,
c=1 smoothly and c=4 with loss spikes (its bound is loose). The script prints a table (test
accuracy, final and worst-spike training loss, the largest unit norm at the end, and what the
max-norm transform logged in its state, ``nj.NormState``) and plots each layer's largest unit
norm over training to ``examples/out/maxnorm_digits.png``.

Run ``python examples/maxnorm_digits.py`` (about half a minute on a 2-core CPU), or add
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

# The data and the model, shared with spectral_digits.py (examples/_digits.py, next to this file).
from _digits import MLP, batches, load_data, new_mlp, parse_args  # noqa: E402

# Chosen by a sweep (learning rates 0.03-0.5, seeds 0-2; every number below is deterministic):
# this SGD trains the unconstrained MLP at lr <= 0.1 and diverges to NaN at lr >= 0.12, for every
# seed tried. At 0.15, past that edge, every max-norm bound from c=1 to c=4 still trains;
# weight decay does only when it is strong (1e-3 diverges, 3e-3 and 1e-2 train).
SIZES = (64, 512, 512, 10)
DROPOUT = 0.5
BATCH = 128
STEPS = 400  # about 38 epochs of the 1,347 training images
QUICK_STEPS = 20
LEARNING_RATE = 0.15
MOMENTUM = 0.9
WEIGHT_DECAYS = (1e-3, 1e-2)
MAX_NORMS = (1.0, 4.0)
EVAL_EVERY = 20  # steps between evaluations of the full training loss (about two epochs)
SEED = 0

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "maxnorm_digits.png"


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def largest_unit_norms(model: MLP) -> dict[str, jax.Array]:
    """Per kernel path, the largest L2 norm of a unit's fan-in vector (a column of the kernel).

    The quantity ``nj.max_norm`` bounds. ``jnp.linalg.norm`` lets a NaN show as NaN, so a
    diverged run is visible in the plot and the table.
    """
    params = nnx.state(model, nnx.Param)
    return {
        nj.path_str(path): jnp.max(jnp.linalg.norm(w, axis=0))
        for path, w in jax.tree_util.tree_leaves_with_path(params)
        if w.ndim == 2
    }


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    """One optimizer step. Returns the batch loss, the largest unit norm of every kernel after
    the step, and, for max-norm runs, the largest unit norm the step proposed before the
    projection, as logged in the transform's state (an empty dict for the other runs)."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    # The chain's state holds an nj.NormState; tree_get finds its field by name. Each field is
    # shaped like the params (an empty placeholder for the biases); nj.by_path turns it into
    # {"layers/0/kernel": value} and unwraps the nnx variables an nnx.Optimizer keeps it in.
    proposed = optax.tree_utils.tree_get(optimizer.opt_state, "largest_norm", default={})
    return loss, largest_unit_norms(model), nj.by_path(proposed)


@nnx.jit
def evaluate(model: MLP, x_train, y_train, x_test, y_test) -> tuple[jax.Array, jax.Array]:
    """Training-set loss and test accuracy of ``model`` (pass it a dropout-free view)."""
    train_loss = loss_fn(model, x_train, y_train)
    return train_loss, jnp.mean(jnp.argmax(model(x_test), axis=-1) == y_test)


def make_runs() -> dict[str, optax.GradientTransformation]:
    """The optimizers compared: the same SGD at the same (too large) learning rate."""
    sgd = optax.sgd(LEARNING_RATE, momentum=MOMENTUM, nesterov=True)
    kernels = lambda params: jax.tree.map(lambda w: w.ndim >= 2, params)  # noqa: E731
    runs = {"unconstrained": sgd}
    for wd in WEIGHT_DECAYS:
        runs[f"weight decay {wd:g}"] = optax.chain(optax.add_decayed_weights(wd, mask=kernels), sgd)
    for c in MAX_NORMS:
        # nj.max_norm goes last: it projects params + updates back into the ball. Its defaults
        # select every kernel (never a bias) and make each column (a unit's fan-in) one unit.
        runs[f"max-norm c={c:g}"] = optax.chain(sgd, nj.max_norm(c))
    return runs


def worst_spike(losses: np.ndarray) -> float:
    """``max_t (L_t - min_{s<t} L_s)``: how far the loss ever rose above its best so far."""
    if not np.all(np.isfinite(losses)):
        return math.inf
    return float(np.max(losses[1:] - np.minimum.accumulate(losses)[:-1], initial=0.0))


def train(name: str, tx: optax.GradientTransformation, data, steps: int) -> dict:
    """Trains a fresh model (same seed every run) and returns what the table and plot need."""
    (x_train, y_train), test = data
    model = new_mlp(SIZES, DROPOUT, SEED)
    eval_model = nnx.view(model, deterministic=True)  # shares the weights; dropout off
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    # cached_partial skips re-flattening model and optimizer on every call (less Python per step).
    step_fn = nnx.cached_partial(train_step, model, optimizer)
    history, eval_steps, train_losses = [], [], []
    bar = tqdm(batches(len(x_train), BATCH, steps, SEED), total=steps, desc=f"{name:>18}", ncols=100)
    for step, idx in enumerate(bar, start=1):
        history.append(step_fn(x_train[idx], y_train[idx]))
        if step % EVAL_EVERY == 0 or step == steps:
            loss, test_acc = evaluate(eval_model, x_train, y_train, *test)
            eval_steps.append(step)
            train_losses.append(float(loss))
            bar.set_postfix_str(f"train loss {float(loss):.3g}", refresh=False)

    batch_losses, norms, proposed = jax.device_get(list(zip(*history)))
    bad = np.flatnonzero(~np.isfinite(batch_losses))
    clipped = nj.by_path(optax.tree_utils.tree_get(optimizer.opt_state, "clipped_fraction", default={}))
    return {
        "test_acc": float(test_acc),
        "nan_step": int(bad[0]) + 1 if bad.size else None,
        "eval_steps": np.array(eval_steps),
        "train_loss": np.array(train_losses),
        "norms": {path: np.array([n[path] for n in norms]) for path in norms[0]},
        "proposed": {path: np.array([n[path] for n in proposed]) for path in proposed[0]},
        "clipped": {path: float(v) for path, v in clipped.items()},
    }


def print_table(results: dict[str, dict]) -> None:
    rows = [("run", "test acc", "train loss", "worst spike", "max unit norm", "max proposed", "clipped %")]
    for name, r in results.items():
        spike = worst_spike(r["train_loss"])
        rows.append((
            name,
            f"{r['test_acc']:.1%}",
            f"{r['train_loss'][-1]:.4f}",
            f"NaN at step {r['nan_step']}" if r["nan_step"] else f"{spike:.3f}",
            f"{max(v[-1] for v in r['norms'].values()):.3g}",
            f"{max(v.max() for v in r['proposed'].values()):.3g}" if r["proposed"] else "-",
            " ".join(f"{v:.0%}".rstrip("%") for v in r["clipped"].values()) or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    print(f"""
test acc       accuracy on the held-out 25% (450 images), dropout off
train loss     cross-entropy on the whole training set, dropout off, after the last step
worst spike    max over t of L_t - min(L_s, s < t), in nats, with L that training loss
               evaluated every {EVAL_EVERY} steps: how far the loss ever rose above its best
               so far (0 = never); a run whose batch loss turned NaN shows that step instead
max unit norm  the largest L2 norm of a unit's fan-in weight vector, over all kernels, at the end
max proposed   max-norm runs: the largest unit norm any step proposed before the projection
               pulled it back to c (nj.NormState.largest_norm, over all kernels and steps)
clipped %      max-norm runs: % of each kernel's units the last step projected, in layer order
               (nj.NormState.clipped_fraction)""")


def plot(results: dict[str, dict], path: Path) -> None:
    """One panel per kernel (largest unit norm against step) and one of the training loss."""
    layers = list(next(iter(results.values()))["norms"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True, constrained_layout=True)
    axes = axes.ravel()
    norm_axes, loss_ax = axes[: len(layers)], axes[len(layers)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, r), color in zip(results.items(), colors):
        steps = np.arange(1, len(next(iter(r["norms"].values()))) + 1)
        for ax, layer in zip(norm_axes, layers):
            ax.plot(steps, r["norms"][layer], color=color, lw=1.6, label=name)
            if layer in r["proposed"]:
                ax.plot(steps, r["proposed"][layer], color=color, lw=0.8, ls=":")
        loss_ax.plot(r["eval_steps"], r["train_loss"], color=color, lw=1.6, label=name)
        if r["nan_step"]:
            for ax in (*norm_axes, loss_ax):
                ax.axvline(r["nan_step"], color=color, lw=1, ls="--")
    for ax, layer in zip(norm_axes, layers):
        # Diverging runs leave the top of the plot (on their way to inf and NaN).
        ax.set(title=f"{layer}: largest unit norm", yscale="log", ylim=(0.3, 100))
    loss_ax.set(title="training-set loss (dropout off)", yscale="log", ylim=(1e-4, 100))
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[-2:]:
        ax.set_xlabel("step")
    for ax in axes[len(layers) + 1 :]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside right center", fontsize=9, alignment="left", title_fontsize=8,
        title="solid: weights after the step\ndotted: proposed, before the\n  projection (nj.NormState)\n"
        "dashed: the loss became NaN",
    )
    fig.suptitle(
        f"MLP {'-'.join(map(str, SIZES))} on 8x8 digits, dropout {DROPOUT:g}, "
        f"SGD lr {LEARNING_RATE:g}, Nesterov momentum {MOMENTUM:g}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    steps, out = parse_args(__doc__, STEPS, QUICK_STEPS, DEFAULT_OUT, argv)

    data = load_data(SEED)
    results = {name: train(name, tx, data, steps) for name, tx in make_runs().items()}
    print()
    print_table(results)
    plot(results, out)
    print(f"\nplot written to {out}")


if __name__ == "__main__":
    main()
