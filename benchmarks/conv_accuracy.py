"""How far the reshaped-kernel sigma (Miyato et al. 2018) falls under a convolution's operator norm.

For each kernel: the matrix view's sigma (``nj.sigma_svd`` of the (h*w*in, out) reshape), the
operator norm of x -> conv(x, K) as ``flax.linen.Conv`` applies it (exact: the dense operator
or the FFT; for large inputs power iteration run to convergence, a lower bound), and the
certified Gram bound. Writes a markdown table to stdout (and, with --write, into
benchmarks/RESULTS.md between the conv-accuracy markers).

    .venv/bin/python benchmarks/conv_accuracy.py [--write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import normjax as nj

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, update_results  # noqa: E402


def he(key, shape):
    fan_in = int(np.prod(shape[:-1]))
    return jax.random.normal(key, shape) * np.sqrt(2.0 / fan_in)


CASES = [
    # (label, kernel, input_shape, conv kwargs)
    ("random 3x3, 2->4", (3, 3, 2, 4), (6, 6), {}),
    ("random 3x3, 16->16", (3, 3, 16, 16), (8, 8), {}),
    ("random 3x3, 16->32, stride 2", (3, 3, 16, 32), (8, 8), {"strides": 2}),
    ("random 3x3, 64->64", (3, 3, 64, 64), (32, 32), {}),
    ("random 3x3, 128->128", (3, 3, 128, 128), (16, 16), {}),
    ("random 5x5, 3->16", (5, 5, 3, 16), (32, 32), {}),
    ("random 3x3, 64->64", (3, 3, 64, 64), (32, 32), {"padding": "CIRCULAR"}),
    ("all-ones 3x3, 1->1", "ones", (32, 32), {}),
    ("random 1x1, 64->64", (1, 1, 64, 64), (32, 32), {}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rows = []
    for i, (label, shape, n, kw) in enumerate(CASES):
        k = jnp.ones((3, 3, 1, 1)) if shape == "ones" else he(jax.random.key(i), shape)
        mat = float(nj.sigma_svd(k))
        size = int(np.prod(n)) * k.shape[-2] * int(np.prod(n)) * k.shape[-1]
        if kw.get("padding") == "CIRCULAR":
            op, how = float(nj.conv_spectral_norm(k, n, method="fft", **kw)), "FFT (exact)"
        elif size <= 1 << 24:
            op, how = float(nj.conv_spectral_norm(k, n, method="svd", **kw)), "dense SVD (exact)"
        else:
            op, how = float(nj.conv_spectral_norm(k, n, method="power", num_iters=500, **kw)), "power x500 (lower bound)"
        gram = float(nj.conv_spectral_norm(k, n, method="gram", **kw))
        pad = kw.get("padding", "SAME")
        rows.append(
            f"| {label} | {'x'.join(map(str, n))}{'' if pad == 'SAME' else ' ' + pad} | {mat:.4f} | {op:.4f} | {how} | "
            f"{mat / op:.3f} | {gram:.4f} | {gram / op - 1:+.2%} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"Machine: {machine_info()['CPU']}, jax {jax.__version__}. Command: `.venv/bin/python benchmarks/conv_accuracy.py --write`.",
            "",
            "| kernel | input | matrix-view σ | operator norm | how | matrix / operator | Gram bound | Gram over |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.write:
        update_results("conv-accuracy", "## Matrix view vs operator norm\n\n" + table)


if __name__ == "__main__":
    main()
