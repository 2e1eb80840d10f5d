#!/usr/bin/env python
"""Constraint overhead against optax's own reduce-then-scale transform, with and without donation.

On the GPT-2-small-shaped tree of ``bench_maxnorm.py`` (12 blocks of qkv / attention
projection / MLP kernels with biases, 85,017,600 float32 parameters) it times, in one
interleaved run (every variant once per round, rounds repeated), the jitted step
``tx.update(grads, state, params)`` + ``optax.apply_updates`` for

* ``optax.adam`` alone (the baseline of every ratio);
* ``optax.chain(optax.clip_by_global_norm(1), optax.adam)``: optax's reduce-then-scale;
* ``optax.chain(optax.adam, nj.max_norm(3))``;
* ``optax.adam``, then ``nj.project_max_norm`` on the new params;
* ``optax.chain(optax.adam, nj.spectral_norm(1))`` (power, 1 iteration);

each twice: without donation and with ``donate_argnums=(0, 1)`` (params and optimizer state),
as training loops run. Ratios are medians of per-round ratios to Adam in the same donation
mode; the acceptance figures are the ratios of those ratios to ``clip_by_global_norm``'s.

It also records, per step, XLA's ``memory_analysis()`` temporaries, ``cost_analysis()``
``bytes accessed`` and the number of fusions of the compiled CPU program, and the compile time
(``jax.jit(step).lower(*abstract).compile()``, fresh each time) at 12 and 96 blocks.

Usage::

    .venv/bin/python benchmarks/bench_overhead.py             # full run, updates RESULTS.md
    .venv/bin/python benchmarks/bench_overhead.py --quick     # smoke run, RESULTS.md untouched
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

SECTION = "bench_overhead"
TITLE = "Performance and scale: constraint overhead, temporaries, compile time"
LR = 1e-3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 blocks of width 128, few rounds, no write")
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile-blocks", default="12,96", help="tree sizes of the compile-time table")
    ap.add_argument("--no-write", action="store_true")
    return ap.parse_args(argv)


def transforms(stacked: bool = False):
    """name -> (tx, after) where ``after(params)`` runs after apply_updates (or None).

    ``stacked``: the same steps for a scan-stacked tree of ``(L, in, out)`` kernels (one unit
    per layer and output, one sigma per layer)."""
    import optax

    import normjax as nj

    unit = {"axis": -2} if stacked else {}
    dims = {"dims": nj.MatrixDims(in_axes=-2, out_axes=-1)} if stacked else {}
    return {
        "adam": (optax.adam(LR), None),
        "chain(clip_by_global_norm(1), adam)": (optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR)), None),
        "chain(adam, nj.max_norm(3))": (optax.chain(optax.adam(LR), nj.max_norm(3.0, **unit)), None),
        "adam, then nj.project_max_norm(3)": (optax.adam(LR), lambda p: nj.project_max_norm(p, 3.0, **unit)),
        "chain(adam, nj.spectral_norm(1)) (power, 1 it.)": (optax.chain(optax.adam(LR), nj.spectral_norm(1.0, num_iters=1, **dims)), None),
    }


def stacked_tree(nlayers: int, d: int):
    """The GPT-2 blocks' leaves stacked for ``scan``: ``{layer: {kernel: (L, in, out), bias: (L, out)}}``."""
    import jax
    import jax.numpy as jnp

    import bench_maxnorm as M

    s = jax.ShapeDtypeStruct
    return {n: {"kernel": s((nlayers, *sh), jnp.float32), "bias": s((nlayers, sh[1]), jnp.float32)} for n, sh in M.block_shapes(d).items()}


def make_step(tx, after):
    import optax

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return (after(params) if after is not None else params), state

    return step


class Runner:
    def __init__(self, tx, after, params_np, grads, donate: bool):
        import jax
        import jax.numpy as jnp

        self.donate = donate
        self.params = jax.tree.map(lambda x: jnp.array(x, copy=True), params_np)
        self.state = tx.init(self.params)
        self.grads = grads
        jitted = jax.jit(make_step(tx, after), donate_argnums=(0, 1) if donate else ())
        self.compiled = jitted.lower(self.params, self.state, grads).compile()
        hlo = self.compiled.as_text()
        self.temp = self.compiled.memory_analysis().temp_size_in_bytes
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.bytes = float(cost.get("bytes accessed", float("nan")))
        self.fusions = C.hlo_summary(hlo).fusions

    def __call__(self) -> None:
        import jax

        params, state = self.compiled(self.params, self.state, self.grads)
        jax.block_until_ready((params, state))
        if self.donate:  # the inputs are gone; the outputs are next step's inputs
            self.params, self.state = params, state


def run_timing(args):
    import jax
    import jax.numpy as jnp

    import bench_maxnorm as M

    d = 128 if args.quick else 768
    params_np, grads_np = M.make_numpy_tree(args.blocks, d)
    grads = jax.tree.map(jnp.asarray, grads_np)
    runners = {}
    for name, (tx, after) in transforms().items():
        for donate in (False, True):
            log(f"compiling {name} donate={donate}")
            runners[(name, donate)] = Runner(tx, after, params_np, grads, donate)
    fns = {k: v for k, v in runners.items()}
    samples = C.interleaved(fns, args.repeats, args.warmup, progress=lambda r, n: log(f"round {r}/{n}"))
    n_params = M.count_params(params_np)
    return runners, samples, n_params


def ratio(samples, key, base_key) -> float:
    return statistics.median(a / b for a, b in zip(samples[key].times, samples[base_key].times))


def compile_times(args):
    import jax

    import bench_maxnorm as M

    out = {}
    d = 128 if args.quick else 768
    for stacked in (False, True):
        for nb in [int(b) for b in args.compile_blocks.split(",")]:
            abstract = stacked_tree(nb, d) if stacked else M.abstract_tree(nb, d)
            for name, (tx, after) in transforms(stacked).items():
                state = jax.eval_shape(tx.init, abstract)
                t0 = time.perf_counter()
                jax.jit(make_step(tx, after), donate_argnums=(0, 1)).lower(abstract, state, abstract).compile()
                out[(stacked, nb, name)] = time.perf_counter() - t0
                log(f"compile {nb} blocks stacked={stacked} {name}: {out[(stacked, nb, name)]:.1f} s")
    return out


def report(args, info, runners, samples, n_params, comp, load0, load1) -> str:
    names = list(transforms())
    lines = C.report_header("bench_overhead.py", TITLE, M_git(), info)
    lines.append(
        f"### 1. Step time over Adam ({args.blocks} blocks, {n_params:,} float32 parameters; "
        f"{args.warmup} warmup + {args.repeats} interleaved rounds of all {len(runners)} steps; load average {load0} → {load1})\n"
    )
    lines.append("Median of per-round ratios to `adam` in the same donation mode; `adam` itself in ms.\n")
    rows = []
    for name in names:
        row = [f"`{name}`"]
        for donate in (False, True):
            if name == "adam":
                row.append(f"{1e3 * statistics.median(samples[(name, donate)].times):.0f} ms")
            else:
                row.append(f"{ratio(samples, (name, donate), ('adam', donate)):.2f}")
        rows.append(row)
    clip = names[1]
    for name in names[2:]:
        row = [f"**{name} ÷ clip_by_global_norm**"]
        for donate in (False, True):
            r = ratio(samples, (name, donate), ("adam", donate)) / ratio(samples, (clip, donate), ("adam", donate))
            row.append(f"**{r:.3f}**")
        rows.append(row)
    lines.append(C.md_table(["step", "no donation", "donate_argnums=(0, 1)"], rows) + "\n")
    lines.append("### 2. The compiled CPU programs (with donation)\n")
    base = runners[("adam", True)]
    rows = []
    for name in names:
        r = runners[(name, True)]
        rows.append([f"`{name}`", f"{r.bytes / 1e6:.0f}", f"{r.bytes / base.bytes:.2f}", f"{r.temp / 1e6:.1f}", r.fusions])
    lines.append(C.md_table(["step", "bytes accessed (MB, cost model)", "÷ adam", "temp MB (memory_analysis)", "fusions"], rows) + "\n")
    lines.append("### 3. Compile time (`jax.jit(step, donate_argnums=(0, 1)).lower(*abstract).compile()`, seconds)\n")
    lines.append(
        "One leaf per block and layer (`h{b}/{layer}/kernel`, as in 1 and 2), and the same blocks "
        "stacked for `scan` (`{layer}/kernel` of shape `(L, in, out)`; `max_norm(axis=-2)`, "
        "`spectral_norm(dims=MatrixDims(-2, -1))`).\n"
    )
    blocks = sorted({nb for _, nb, _ in comp})
    rows = []
    for name in names:
        row = [f"`{name}`"]
        for stacked in (False, True):
            for nb in blocks:
                t = comp[(stacked, nb, name)]
                row.append(f"{t:.1f}" + ("" if name == "adam" else f" ({t / comp[(stacked, nb, 'adam')]:.2f}x)"))
        rows.append(row)
    heads = [f"{nb} blocks" for nb in blocks] + [f"{nb} layers stacked" for nb in blocks]
    lines.append(C.md_table(["step", *heads], rows) + "\n")
    return "\n".join(lines)


def M_git() -> str:
    import bench_maxnorm as M

    return M._git_state()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.blocks, args.repeats, args.warmup, args.compile_blocks, args.no_write = 2, 3, 1, "2,4", True
    info = C.machine_info()
    load0 = C.loadavg()
    runners, samples, n_params = run_timing(args)
    load1 = C.loadavg()
    for r in runners.values():  # free the device buffers before compiling the big trees
        r.params = r.state = r.grads = None
    comp = compile_times(args)
    text = report(args, info, runners, samples, n_params, comp, load0, load1)
    C.publish(SECTION, text, args.no_write, C.RESULTS_MD)


if __name__ == "__main__":
    main()
