#!/usr/bin/env python
"""Matmul-only spectral maps: accuracy against float64 SVD, and what they cost.

1. **Accuracy** of ``nj.spectral_clip`` (``mode="clip", estimator="matmul"``) and
   ``nj.orthogonalize`` in float32 against float64 SVD, per number of polynomial steps, on
   768x768 matrices of four kinds (Gaussian with sigma_max = 3c; ill-conditioned, singular
   values log-spaced over 1e-3 c .. 1e2 c; rank 5 with sigma = 4c; repeated values, half 5c and
   half c/2), and at the default on 4096x4096 (Gaussian and ill-conditioned). Columns: the
   largest relative error of the singular values above c (they should land on c), of those
   in [1e-3 c, c) (they should not move), the largest singular value left where the input had
   0 or below 1e-3 c, relative to c, and the largest relative error of orthogonalize's
   non-zero singular values (they should all be c). Beside the [1e-3 c, c) column: the same
   error of the exact SVD clip computed in float32 (the float32 floor: every float32 method
   moves a singular value by about eps * sigma_max, which is 1e-2 relative at 1e-3 c when
   sigma_max = 1e2 c), and the matmul clip's change in units of c.
2. **Per-matrix time** (jitted, interleaved, medians) of matmul clip, orthogonalize, SVD clip,
   Gram rescale (8 iterations) and the soft cap at 768x768, 768x3072 and 4096x4096.
3. **Optimizer step** on the GPT-2-small tree of ``bench_maxnorm.py`` (85M parameters):
   ratio to ``optax.adam`` alone of ``chain(adam, spectral_norm(...))`` in modes matmul clip,
   matmul orthogonalize, SVD clip, soft cap (Gram) and the power rescale, interleaved.

Usage::

    .venv/bin/python benchmarks/bench_matmul.py            # full run (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_matmul.py --quick    # tiny shapes, no write
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import bench_maxnorm as M  # noqa: E402

log = M.log
C_VALUE = 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, no RESULTS.md update")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--skip-step", action="store_true", help="skip the GPT-2 tree step section")
    p.add_argument("--big", type=int, default=4096, help="size of the large accuracy/timing matrices")
    p.add_argument("--step-blocks", type=int, default=2, help="GPT-2 blocks in the step section (per-leaf work: the ratio to adam does not depend on it; 12 = the full 85M tree, hours on 2 cores with the SVD clip)")
    p.add_argument("--out", type=Path, default=C.RESULTS_MD)
    a = p.parse_args(argv)
    if a.quick:
        a.no_write = True
    return a


def matrix(kind: str, n: int, rng):
    import numpy as np

    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    if kind == "gaussian":
        s = np.linalg.svd(rng.standard_normal((n, n)), compute_uv=False)
        s = 3.0 * C_VALUE * s / s[0]
    elif kind == "ill-conditioned":
        s = np.geomspace(1e2, 1e-3, n) * C_VALUE
    elif kind == "rank 5":
        s = np.r_[np.full(5, 4.0), np.zeros(n - 5)] * C_VALUE
    else:  # repeated
        s = np.r_[np.full(n // 2, 5.0), np.full(n - n // 2, 0.5)] * C_VALUE
    return (u * s) @ v.T, s


def accuracy_row(kind: str, n: int, steps: int, rng) -> list:
    import jax.numpy as jnp
    import numpy as np

    import normjax as nj

    x, s = matrix(kind, n, rng)
    xf = jnp.asarray(x, jnp.float32)
    t0 = time.perf_counter()
    out = np.asarray(nj.spectral_clip(xf, C_VALUE, num_iters=steps), np.float64)
    orth = np.asarray(nj.orthogonalize(xf, C_VALUE, num_iters=steps), np.float64)
    secs = time.perf_counter() - t0
    so = np.linalg.svd(out, compute_uv=False)
    si = np.sort(s)[::-1]
    target = np.minimum(si, C_VALUE)
    above = si > C_VALUE
    mid = (si >= 1e-3 * C_VALUE) & ~above
    low = si < 1e-3 * C_VALUE
    rel = np.abs(so - target) / np.where(target > 0, target, 1.0)
    oo = np.linalg.svd(orth, compute_uv=False)
    # the float32 floor: the exact (SVD) clip in float32 moves the values below c as much
    ref = np.linalg.svd(np.asarray(nj.clip_singular_values(xf, C_VALUE)[0], np.float64), compute_uv=False)
    rel_svd = np.abs(ref - target) / np.where(target > 0, target, 1.0)
    nz = si > 1e-3 * C_VALUE
    fmt = lambda v: f"{v:.1e}"
    return [
        kind, f"{n}x{n}", steps,
        fmt(rel[above].max()) if above.any() else "—",
        fmt(rel[mid].max()) if mid.any() else "—",
        fmt(rel_svd[mid].max()) if mid.any() else "—",
        fmt(np.abs(so - target)[mid].max() / C_VALUE) if mid.any() else "—",
        fmt(so[low].max() / C_VALUE) if low.any() else "—",
        fmt(np.abs(oo[nz] - C_VALUE).max() / C_VALUE),
        f"{secs:.1f}",
    ]


def run_accuracy(args) -> str:
    import numpy as np

    rng = np.random.default_rng(0)
    n = 64 if args.quick else 768
    big = 96 if args.quick else args.big
    rows = []
    for kind in ("gaussian", "ill-conditioned", "rank 5", "repeated"):
        for steps in ((10, 12) if args.quick else (8, 12, 16)):
            log(f"[accuracy] {kind} {n} steps={steps}")
            rows.append(accuracy_row(kind, n, steps, rng))
    for kind in ("gaussian", "ill-conditioned"):
        log(f"[accuracy] {kind} {big} default steps")
        rows.append(accuracy_row(kind, big, 12, rng))
    head = ["matrix", "size", "steps", "above c: max rel. error", "[1e-3c, c): max rel. change", "same, SVD clip in float32",
            "[1e-3c, c): max change / c",
            "0 or < 1e-3c: max left / c", "orthogonalize: max rel. error", "s (clip + orth.)"]
    return C.md_table(head, rows)


def run_times(args) -> str:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import normjax as nj

    shapes = [(64, 64), (64, 192)] if args.quick else [(768, 768), (768, 3072), (args.big, args.big)]
    rng = np.random.default_rng(1)
    rows = []
    for r, c in shapes:
        w = jnp.asarray(rng.standard_normal((r, c)) * (3.0 / (np.sqrt(r) + np.sqrt(c))), jnp.float32)
        fns = {
            "matmul clip (12 steps)": jax.jit(lambda w: nj.spectral_clip(w, C_VALUE)),
            "matmul orthogonalize (12)": jax.jit(lambda w: nj.orthogonalize(w, C_VALUE)),
            "SVD clip": jax.jit(lambda w: nj.clip_singular_values(w, C_VALUE)[0]),
            "Gram rescale (8)": jax.jit(lambda w: w * jnp.minimum(1.0, C_VALUE / nj.sigma_gram(w))),
            "soft cap (Gram bound)": jax.jit(lambda w: nj.spectral_soft_cap(w, C_VALUE, nj.sigma_gram(w))),
        }
        compile_s = {}
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(w))
            compile_s[name] = time.perf_counter() - t0
        log(f"[times] {r}x{c} ...")
        big = r * c >= 4096 * 4096
        reps, warm = (2, 0) if big else (7, 1)  # the first call above already ran each once
        s = C.interleaved({k: (lambda f=f: jax.block_until_ready(f(w))) for k, f in fns.items()}, reps, warm)
        base = statistics.median(s["SVD clip"].times)
        for name in fns:
            med = statistics.median(s[name].times)
            rows.append([f"{r}x{c}", name, f"{1e3 * med:.1f}", f"{med / base:.2f}", f"{compile_s[name]:.1f}"])
    return C.md_table(["matrix", "map", "median ms", "vs SVD clip", "first call s (compile + run)"], rows)


def run_step(args) -> str:
    import jax
    import optax

    import normjax as nj

    blocks, d = (1, 64) if args.quick else (args.step_blocks, 768)
    params_np, grads_np = M.make_numpy_tree(blocks, d)
    grads = jax.tree.map(lambda x: jax.numpy.array(x, copy=True), grads_np)
    c = 5.0

    def chain(tx):
        def step(params, state, g):
            updates, state = tx.update(g, state, params)
            return optax.apply_updates(params, updates), state

        return step, tx.init

    variants = {
        "adam": chain(optax.adam(M.LR)),
        "+ spectral_norm power rescale": chain(optax.chain(optax.adam(M.LR), nj.spectral_norm(c))),
        "+ soft_cap (gram bound)": chain(optax.chain(optax.adam(M.LR), nj.spectral_norm(c, estimator="gram", mode="soft_cap"))),
        "+ clip (matmul, 12 steps)": chain(optax.chain(optax.adam(M.LR), nj.spectral_norm(c, estimator="matmul", mode="clip"))),
        "+ orthogonalize (matmul)": chain(optax.chain(optax.adam(M.LR), nj.spectral_norm(c, estimator="matmul", mode="orthogonalize"))),
        "+ clip (SVD)": chain(optax.chain(optax.adam(M.LR), nj.spectral_norm(c, estimator="svd", mode="clip"))),
    }
    runners = {}
    for name, (step, init) in variants.items():
        log(f"[step] compiling {name} ...")
        runners[name] = M.JaxRunner(step, init, params_np, grads)
    reps = 2 if args.quick else 3
    s = C.interleaved(runners, reps, 1, progress=lambda r, n: log(f"  [step] round {r}/{n}"))
    base = s["adam"]
    rows = []
    for name in variants:
        st = C.ratio_stats(s[name], base)
        rows.append([name, f"{1e3 * statistics.median(s[name].times):.0f}", f"{st['median_of_ratios']:.2f}",
                     f"{runners[name].compile_s:.1f}", f"{runners[name].temp_bytes / 1e6:.0f}"])
    n_params = M.count_params(params_np)
    return (f"{blocks} blocks, d={d}, {n_params / 1e6:.0f}M float32 parameters, c = {c:g} (every kernel starts above), "
            f"donated params and state, {reps} timed rounds after 1 warmup, interleaved.\n\n"
            + C.md_table(["step", "median ms", "ratio to adam (median of rounds)", "compile s", "temp MB"], rows))


def main(argv=None) -> None:
    args = parse_args(argv)
    info = C.machine_info()
    log(f"machine: {info['CPU']}, load {C.loadavg()}")
    parts = C.report_header("bench_matmul.py", "Matmul-only spectral maps (issue 12)", M._git_state(), info)
    parts += ["### Accuracy against float64 SVD (float32)\n", run_accuracy(args) + "\n"]
    parts += ["### Per-matrix time (jitted, interleaved medians)\n", run_times(args) + "\n"]
    if not args.skip_step:
        parts += ["### Optimizer step on the GPT-2-small tree\n", run_step(args) + "\n"]
    parts.append(f"Load average at the end: {C.loadavg()}.\n")
    C.publish("bench_matmul", "\n".join(parts), args.no_write, args.out)


if __name__ == "__main__":
    main()
