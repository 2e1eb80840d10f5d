"""Shared by the digits examples: scikit-learn's 8x8 digits (standardized vectors or [0, 1] images), the MLP.

Not an example itself (the leading underscore keeps it out of ``tests/test_examples.py``).
The scripts in this folder import it as ``from _digits import ...``: Python puts a script's
own folder first on ``sys.path``, so ``python examples/<script>.py`` finds it from anywhere.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

# scikit-learn (the data, the split, the scaler) is imported where it is used: it takes about a
# second to import, and nnx_attention.py, which makes its own data, never needs it.


class MLP(nnx.Module):
    """``Linear -> ReLU -> Dropout`` blocks and a linear read-out (``dropout=0``: no dropout)."""

    def __init__(self, sizes: tuple[int, ...], dropout: float, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = self.dropout(jax.nn.relu(layer(x)))
        return self.layers[-1](x)


@functools.partial(nnx.jit, static_argnums=(0, 1, 2))
def new_mlp(sizes: tuple[int, ...], dropout: float, seed: int) -> MLP:
    """A fresh :class:`MLP` (``params`` and ``dropout`` RNG streams from ``seed`` and ``seed + 1``).

    Built under ``nnx.jit``: the same weights as eager construction, drawn by one compiled program
    instead of one random-number program compiled per kernel shape; compiled once a process.
    """
    return MLP(sizes, dropout, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def _split(seed: int):
    """The raw digits, split 75/25 (stratified, fixed by ``seed``): x_train, x_test, y_train, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def load_data(seed: int):
    """Standardized 8x8 digits: a fixed, stratified 75/25 train/test split.

    Each pixel is shifted and scaled by its training-set mean and standard deviation, an
    affine map applied before the network: norms and Lipschitz constants of the network are
    in these standardized units.
    """
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = _split(seed)
    scaler = StandardScaler().fit(x_train)  # constant (always blank) pixels keep scale 1
    f32 = lambda a: scaler.transform(a).astype(np.float32)  # noqa: E731
    return (f32(x_train), y_train.astype(np.int32)), (f32(x_test), y_test.astype(np.int32))


def load_images(seed: int):
    """The same split as :func:`load_data`, as ``(N, 8, 8, 1)`` images with pixels in [0, 1].

    No standardization: the raw 0-16 intensities divided by 16, channels last as
    ``flax.linen.Conv`` expects. Norms and Lipschitz constants are in these pixel units.
    """
    x_train, x_test, y_train, y_test = _split(seed)
    img = lambda a: (a / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)  # noqa: E731
    return (img(x_train), y_train.astype(np.int32)), (img(x_test), y_test.astype(np.int32))


def standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` traced under JAX's standard dtype promotion, whatever the global mode.

    optax's Adam computes its bias correction as ``b1 ** count`` (a Python float to an int32
    power), which ``jax_numpy_dtype_promotion="strict"`` rejects. The smoke test runs every
    example under strict promotion; this wrapper relaxes it for ``tx`` alone, so the rest of
    the step (normjax included) is still checked. Without strict mode it changes nothing.
    """

    def init_fn(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update_fn(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)


def batches(n: int, batch: int, steps: int, seed: int):
    """``steps`` index batches; a fresh permutation every epoch, the last partial batch dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = n // batch
    for step in range(steps):
        if step % per_epoch == 0:
            perm = rng.permutation(n)
        i = step % per_epoch
        yield perm[i * batch : (i + 1) * batch]


def parse_args(
    doc: str,
    steps: int,
    quick_steps: int,
    default_out: Path,
    argv: list[str] | None = None,
    out_help: str = "the PNG to write",
):
    """The command line every digits example shares: ``--quick`` (or ``NORMJAX_QUICK=1``),
    ``--steps`` and ``--out`` (``out_help`` describes it). Returns ``(steps, out_path)``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke run, {quick_steps} steps a run (or NORMJAX_QUICK=1)")
    parser.add_argument("--steps", type=int, default=None, help=f"steps a run (default {steps})")
    parser.add_argument("--out", type=Path, default=default_out, help=f"{out_help} (default {default_out})")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("NORMJAX_QUICK", "") not in ("", "0")
    return args.steps or (quick_steps if quick else steps), args.out


def print_rows(rows: list[tuple[str, ...]], left: int = 1) -> None:
    """An aligned text table, the first ``left`` columns left-justified, then a dashed rule."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))


def markdown(rows: list[tuple[str, ...]]) -> str:
    """The same rows as a markdown table (``|`` inside a cell escaped)."""
    cells = [[c.replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells[1:]])
