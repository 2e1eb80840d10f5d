"""How far sigma overshoots the bound under spectral_norm(estimator="power", num_iters=1).

Random Gaussian matrices scaled to sigma ~ 1 (the worst case for power iteration: no
spectral gap), plain SGD steps in a random direction of a given size per element, c = 1.
After every step the exact sigma of the new weights is measured with float64 SVD.
Prints a markdown table: relative Frobenius step size, overshoot of the first step, median and
max overshoot over steps 20-60.

    python benchmarks/power_tracking.py
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import normjax as nj


def track(shape, elem_step, steps, num_iters=1, seed=0):
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=shape) / np.sqrt(shape[0])
    params = {"w": jnp.asarray(w0, jnp.float32)}
    tx = optax.chain(optax.sgd(1.0), nj.spectral_norm(1.0, num_iters=num_iters))
    state = tx.init(params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    sig, p = [], params
    for _ in range(steps):
        g = {"w": jnp.asarray(rng.normal(size=shape) * elem_step, jnp.float32)}
        p, state = step(p, state, g)
        sig.append(np.linalg.svd(np.asarray(p["w"], np.float64), compute_uv=False)[0])
    rel = elem_step * np.sqrt(np.prod(shape)) / np.linalg.norm(w0)
    return rel, np.array(sig) - 1.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    shapes = [(48, 32), (256, 256)] if args.quick else [(48, 32), (256, 256), (768, 768)]
    steps = 25 if args.quick else args.steps
    print("| matrix | step per element | relative Frobenius step | first step | median, steps 20+ | max, steps 20+ |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        for elem in (1e-2, 1e-3, 1e-4):
            rel, over = track(shape, elem, steps)
            tail = over[20:]
            print(
                f"| {shape[0]}x{shape[1]} | {elem:g} | {rel:.2%} | {over[0]:+.2%} | "
                f"{np.median(tail):+.2%} | {tail.max():+.2%} |"
            )


if __name__ == "__main__":
    main()
