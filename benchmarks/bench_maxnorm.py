#!/usr/bin/env python
"""Max-norm step-time benchmark: what does ``nj.max_norm`` add to an Adam step?

On a GPT-2-small-shaped parameter tree (12 blocks of qkv / attention projection / MLP
kernels with biases, ~85M float32 parameters) it times, interleaved round by round:

* JAX, each a jitted step ``tx.update(grads, state, params)`` + ``optax.apply_updates``
  with params and optimizer state donated:
    - ``optax.adam`` alone;
    - ``optax.chain(optax.adam, nj.max_norm(c))``, the transform;
    - ``optax.adam`` then ``nj.project_max_norm(params, c)`` on the new params (the pure
      function, same maths, for comparison);
* PyTorch (when importable): ``torch.optim.Adam`` alone (the CPU default implementation,
  ``foreach=True`` and ``fused=True``), and the default Adam followed by the per-weight renorm
  loop users write by hand or by ``Tensor.renorm_``.

It also reads the compiled HLO of each JAX step (fusions, reductions, bytes moved per
parameter byte, temporary bytes, the fusion chain of one kernel), reruns the JAX steps
under ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` (a subprocess),
and times ``jax.jit(step).lower(...).compile()`` for 12 and 96 blocks from abstract shapes.

Usage::

    .venv/bin/python benchmarks/bench_maxnorm.py            # full run, updates RESULTS.md
    .venv/bin/python benchmarks/bench_maxnorm.py --quick    # smoke run: tiny tree, no write
    .venv/bin/python benchmarks/bench_maxnorm.py --blocks 6 --repeats 30
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (after the path tweak; imports no jax at module level)

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
TARGET = 1.30
LR = 1e-3
SEED = 0
# Column (unit) norms at init: log-normal with this median and log-std, so that a
# realistic minority of units starts above max_value (about a fifth for c = 3).
NORM_MEDIAN, NORM_LOG_STD = 2.5, 0.25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 small blocks (d=64), few repeats, RESULTS.md untouched")
    ap.add_argument("--blocks", type=int, default=None, help="transformer blocks in the timed tree (default 12; 2 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20; 4 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3; 1 with --quick)")
    ap.add_argument("--max-value", type=float, default=3.0, help="max-norm radius c (default 3.0)")
    ap.add_argument("--compile-blocks", default=None, help="comma-separated block counts for compile times (default 12,96)")
    ap.add_argument("--torch-repeats", type=int, default=None, help="rounds of the JAX-vs-torch tables (default 10; 2 with --quick)")
    ap.add_argument("--torch-seconds", type=float, default=None, help="time cap of the JAX-vs-torch rounds at all threads (default 120 s)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch section")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-time section")
    ap.add_argument("--no-scheduler-variant", action="store_true", help=f"skip the rerun under {SCHEDULER_FLAG}")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--out", type=Path, default=C.RESULTS_MD, help="results file (default benchmarks/RESULTS.md)")
    ap.add_argument("--jax-only", action="store_true", help=argparse.SUPPRESS)  # internal: subprocess mode
    ap.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.d = 64 if q else 768
    args.blocks = args.blocks if args.blocks is not None else (2 if q else 12)
    args.repeats = args.repeats if args.repeats is not None else (4 if q else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    args.torch_repeats = args.torch_repeats if args.torch_repeats is not None else (2 if q else 10)
    args.torch_seconds = args.torch_seconds if args.torch_seconds is not None else (30.0 if q else 120.0)
    cb = args.compile_blocks or ("2,8" if q else "12,96")
    args.compile_blocks = [int(x) for x in cb.split(",") if x.strip()]
    if q:
        args.no_write = True
    return args


# ---------------------------------------------------------------------------------------
# The parameter tree
# ---------------------------------------------------------------------------------------


def block_shapes(d: int) -> dict[str, tuple[int, int]]:
    """Flax ``(in, out)`` kernel shapes of one GPT-2 block of width ``d``."""
    return {"qkv": (d, 3 * d), "attn_proj": (d, d), "mlp_fc": (d, 4 * d), "mlp_proj": (4 * d, d)}


def make_numpy_tree(nblocks: int, d: int, seed: int = SEED):
    """Params and grads as nested dicts of float32 numpy arrays, ``h{b}/{layer}/{kernel,bias}``.

    Each kernel column (the fan-in vector of one output unit) gets a log-normal norm with
    median ``NORM_MEDIAN``; grads are standard normal (their scale does not matter to Adam).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    params, grads = {}, {}
    for b in range(nblocks):
        pb, gb = {}, {}
        for name, (i, o) in block_shapes(d).items():
            col = np.exp(rng.normal(np.log(NORM_MEDIAN), NORM_LOG_STD, size=(1, o))).astype(np.float32)
            k = rng.standard_normal((i, o), dtype=np.float32)
            k *= col / np.sqrt(i, dtype=np.float32)
            pb[name] = {"kernel": k, "bias": (0.02 * rng.standard_normal(o, dtype=np.float32))}
            gb[name] = {
                "kernel": rng.standard_normal((i, o), dtype=np.float32),
                "bias": rng.standard_normal(o, dtype=np.float32),
            }
        params[f"h{b}"], grads[f"h{b}"] = pb, gb
    return params, grads


def count_params(tree) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree.leaves(tree))


def abstract_tree(nblocks: int, d: int):
    import jax
    import jax.numpy as jnp

    s = jax.ShapeDtypeStruct
    return {
        f"h{b}": {n: {"kernel": s(sh, jnp.float32), "bias": s((sh[1],), jnp.float32)} for n, sh in block_shapes(d).items()}
        for b in range(nblocks)
    }


# ---------------------------------------------------------------------------------------
# JAX steps
# ---------------------------------------------------------------------------------------


def jax_variants(c: float):
    """name -> (step(params, state, grads) -> (params, state), init(params) -> state)."""
    import optax

    import normjax as nj

    def chain_step(tx):
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step, tx.init

    def project_after():
        adam = optax.adam(LR)

        def step(params, state, grads):
            updates, state = adam.update(grads, state, params)
            return nj.project_max_norm(optax.apply_updates(params, updates), c), state

        return step, adam.init

    return {
        "jax adam": chain_step(optax.adam(LR)),
        f"jax adam + nj.max_norm({c:g})": chain_step(optax.chain(optax.adam(LR), nj.max_norm(c))),
        f"jax adam; nj.project_max_norm(params, {c:g})": project_after(),
    }


class JaxRunner:
    """One jitted, donating step with its own params / optimizer state."""

    def __init__(self, step, init, params_np, grads):
        import jax
        import jax.numpy as jnp

        self.params = jax.tree.map(lambda x: jnp.array(x, copy=True), params_np)
        self.state = init(self.params)
        self.grads = grads
        self.jitted = jax.jit(step, donate_argnums=(0, 1))
        t0 = time.perf_counter()
        self.compiled = self.jitted.lower(self.params, self.state, grads).compile()
        self.compile_s = time.perf_counter() - t0
        self.hlo = self.compiled.as_text()
        self.temp_bytes = self.compiled.memory_analysis().temp_size_in_bytes
        self.first_state = None

    def __call__(self) -> None:
        import jax

        self.params, self.state = self.compiled(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))
        if self.first_state is None:  # keep a host copy: the state's buffers get donated
            st = self.state
            has_norm = isinstance(st, tuple) and len(st) > 1 and hasattr(st[1], "clipped_fraction")
            self.first_state = (None, jax.device_get(st[1])) if has_norm else ()


def clipped_summary(state, params) -> str | None:
    """Unit-weighted fraction clipped over all kernels (and its range over leaves), from NormState."""
    import numpy as np

    if not (isinstance(state, tuple) and len(state) > 1 and hasattr(state[1], "clipped_fraction")):
        return None
    import jax

    from normjax import by_path, path_str

    frac = by_path(state[1].clipped_fraction)  # shaped like params; by_path keys it "a/b/kernel"

    units = {path_str(p): int(x.shape[-1]) for p, x in jax.tree_util.tree_leaves_with_path(params) if x.ndim >= 2}
    f = {k: float(np.asarray(v)) for k, v in frac.items()}
    tot = sum(units[k] for k in f)
    mean = sum(f[k] * units[k] for k in f) / tot
    return f"{100 * mean:.1f}% of {tot} units (per leaf {100 * min(f.values()):.1f}%–{100 * max(f.values()):.1f}%)"


# ---------------------------------------------------------------------------------------
# PyTorch steps
# ---------------------------------------------------------------------------------------


class TorchRunner:
    """``torch.optim.Adam`` over torch-layout ``(out, in)`` weights, then an optional renorm loop.

    The constrained unit is the same as normjax's default: the fan-in vector of each output
    unit, a column of the Flax ``(in, out)`` kernel = a row of the torch weight, so the norm
    is over ``dim=1`` (hand-written loop) and ``renorm_`` slices along ``dim=0``.
    """

    def __init__(self, torch, params_np, grads_np, c: float, adam_kwargs: dict, renorm: str | None):
        import jax

        self.torch, self.c, self.renorm = torch, c, renorm
        self.weights, self.all = [], []
        for p, g in zip(jax.tree.leaves(params_np), jax.tree.leaves(grads_np)):
            if p.ndim == 2:  # Flax (in, out) -> torch (out, in)
                t, tg = torch.from_numpy(p.T.copy()), torch.from_numpy(g.T.copy())
            else:
                t, tg = torch.from_numpy(p.copy()), torch.from_numpy(g.copy())
            t.requires_grad_(True)
            t.grad = tg
            self.all.append(t)
            if p.ndim == 2:
                self.weights.append(t)
        self.opt = torch.optim.Adam(self.all, lr=LR, **adam_kwargs)

    def __call__(self) -> None:
        torch = self.torch
        self.opt.step()
        if self.renorm == "manual":
            with torch.no_grad():
                for w in self.weights:
                    norm = w.norm(dim=1, keepdim=True)
                    w.mul_(torch.clamp(self.c / norm, max=1.0))
        elif self.renorm == "renorm_":
            with torch.no_grad():
                for w in self.weights:
                    w.renorm_(2, 0, self.c)

    def kernels_flax_layout(self):
        return [w.detach().numpy().T for w in self.weights]


def torch_default_impl(torch) -> str:
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        fused, foreach = _default_to_fused_or_foreach([torch.zeros(1)], differentiable=False, use_fused=False)
        return "fused" if fused else "foreach" if foreach else "for-loop (single-tensor)"
    except Exception as e:  # private helper; report rather than fail
        return f"unknown ({type(e).__name__})"


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def agreement_check(args, torch) -> str:
    """Three steps from one init on one block: JAX transform vs JAX project vs torch loops."""
    import jax
    import numpy as np

    params_np, grads_np = make_numpy_tree(1, args.d, seed=SEED + 1)
    out = {}
    for name, (step, init) in jax_variants(args.max_value).items():
        if name == "jax adam":
            continue
        r = JaxRunner(step, init, params_np, grads_np)
        for _ in range(3):
            r()
        out[name] = [np.asarray(x) for x in jax.tree.leaves(r.params) if x.ndim == 2]
    names = list(out)
    lines = [f"max |Δ| over kernels after 3 steps (1 block, d={args.d}): "]
    ref = out[names[0]]

    def maxdiff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))

    parts = [f"`{names[1]}` vs transform {maxdiff(ref, out[names[1]]):.2e}"]
    if torch is not None:
        for renorm in ("manual", "renorm_"):
            t = TorchRunner(torch, params_np, grads_np, args.max_value, {}, renorm)
            for _ in range(3):
                t()
            parts.append(f"torch Adam + {renorm} vs transform {maxdiff(ref, t.kernels_flax_layout()):.2e}")
    norms = max(float(np.max(np.linalg.norm(k, axis=0))) for k in ref)
    return lines[0] + "; ".join(parts) + f"; largest unit norm after the transform: {norms:.6f} (c = {args.max_value:g})."


def summarize(samples: dict, baselines: dict[str, str]) -> dict:
    """Per variant: median / min ms, median minor faults, ratios against each named baseline."""
    rows = {}
    for name, s in samples.items():
        row = {
            "median_ms": 1e3 * statistics.median(s.times),
            "min_ms": 1e3 * min(s.times),
            "faults": statistics.median(s.faults),
            "rounds": len(s.times),
        }
        for label, base in baselines.items():
            if base in samples:
                row[label] = C.ratio_stats(s, samples[base])
        rows[name] = row
    return rows


def _progress(tag: str):
    return lambda r, n: log(f"  [{tag}] round {r}/{n}") if r % 5 == 0 or r == n else None


def run_timing(args, torch):
    """Builds every runner and times them in interleaved rounds; returns plain data."""
    import jax
    import numpy as np

    log(f"building the tree: {args.blocks} blocks, d={args.d} ...")
    params_np, grads_np = make_numpy_tree(args.blocks, args.d)
    n_params = count_params(params_np)
    n_kernel = sum(int(x.size) for x in jax.tree.leaves(params_np) if x.ndim == 2)
    grads = jax.tree.map(lambda x: jax.numpy.array(x, copy=True), grads_np)
    init_norms = np.concatenate([np.linalg.norm(x, axis=0) for x in jax.tree.leaves(params_np) if x.ndim == 2])

    jax_fns = {}
    for name, (step, init) in jax_variants(args.max_value).items():
        log(f"compiling {name} ...")
        jax_fns[name] = JaxRunner(step, init, params_np, grads)
    jax_names = list(jax_fns)
    adam_name, mn_name, proj_name = jax_names

    res = {
        "n_params": n_params, "n_kernel": n_kernel, "n_units": int(init_norms.size),
        "init_above": float(np.mean(init_norms > args.max_value)),
        "jax_names": jax_names, "mn_name": mn_name, "proj_name": proj_name,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "torch": None,
    }

    # 1. JAX only: the headline ratio.
    load0 = C.loadavg()
    log(f"[jax] {len(jax_fns)} variants, {args.warmup} warmup + {args.repeats} rounds (load avg {load0}) ...")
    t0 = time.perf_counter()
    s = C.interleaved(jax_fns, args.repeats, args.warmup, progress=_progress("jax"))
    res["jax"] = {
        "rows": summarize(s, {"vs_jax_adam": adam_name}), "wall_s": time.perf_counter() - t0,
        "load_before": load0, "load_after": C.loadavg(),
    }
    mn = jax_fns[mn_name]
    res["clipped_first"] = clipped_summary(mn.first_state, mn.params)
    res["clipped_last"] = clipped_summary(mn.state, mn.params)

    res["hlo"] = {}
    smallest = min(int(x.size) * 4 for x in jax.tree.leaves(params_np) if x.ndim == 2)
    for name in jax_names:
        r = jax_fns[name]
        h = C.hlo_summary(r.hlo, big_bytes=smallest // 2)
        res["hlo"][name] = {
            "instructions": h.instructions, "fusions": h.fusions, "kinds": h.fusion_kinds,
            "reductions": h.reductions, "big_reductions": h.big_reductions,
            "read_passes": h.bytes_read / (4 * n_params), "write_passes": h.bytes_written / (4 * n_params),
            "temp_MB": r.temp_bytes / 1e6, "compile_s": r.compile_s,
            "pipeline": C.leaf_pipeline(r.hlo, r"^params_+h0_+qkv_+kernel", min_bytes=smallest // 2),
        }

    # 2./3. JAX against PyTorch, interleaved, at torch's default thread count and at 1 thread.
    if torch is not None and not args.jax_only:
        default_impl = torch_default_impl(torch)
        c = args.max_value
        tv = {
            f"torch Adam (default = {default_impl})": ({}, None),
            "torch Adam foreach=True": ({"foreach": True}, None),
            "torch Adam fused=True": ({"fused": True}, None),
            f"torch Adam (default) + renorm loop `w.mul_(clamp({c:g} / w.norm(dim=1), max=1))`": ({}, "manual"),
            f"torch Adam (default) + `w.renorm_(2, 0, {c:g})` loop": ({}, "renorm_"),
        }
        torch_fns, skipped = {}, {}
        for name, (kw, renorm) in tv.items():
            log(f"setting up {name} ...")
            try:
                torch_fns[name] = TorchRunner(torch, params_np, grads_np, c, kw, renorm)
            except Exception as e:  # e.g. fused=True unsupported on this build
                skipped[name] = f"{type(e).__name__}: {e}"
                log(f"  skipped: {skipped[name]}")
        t_adam = next(iter(torch_fns))
        threads_default = torch.get_num_threads()
        runs = []
        settings = [(threads_default, args.torch_repeats, args.torch_seconds)]
        if threads_default > 1:
            settings.append((1, max(3, args.torch_repeats // 2), args.torch_seconds / 3))
        for nthreads, repeats, cap in settings:
            torch.set_num_threads(nthreads)
            fns = {adam_name: jax_fns[adam_name], mn_name: jax_fns[mn_name], **torch_fns}
            load0 = C.loadavg()
            log(f"[torch x{nthreads}] {len(fns)} variants, 1 warmup + up to {repeats} rounds, cap {cap:.0f} s (load avg {load0}) ...")
            t0 = time.perf_counter()
            s = C.interleaved(fns, repeats, 1, progress=_progress(f"torch x{nthreads}"), max_seconds=cap)
            runs.append({
                "threads": nthreads,
                "rows": summarize(s, {"vs_jax_adam": adam_name, "vs_torch_adam": t_adam, "vs_jax_mn": mn_name}),
                "wall_s": time.perf_counter() - t0, "load_before": load0, "load_after": C.loadavg(),
            })
        torch.set_num_threads(threads_default)
        res["torch"] = {
            "version": torch.__version__, "default_impl": default_impl, "threads_default": threads_default,
            "skipped": skipped, "runs": runs, "adam_name": t_adam,
        }
    return res


def compile_times(args):
    import jax

    out = []
    for nb in args.compile_blocks:
        p_abs = abstract_tree(nb, args.d)
        n = count_params(p_abs)
        for name, (step, init) in jax_variants(args.max_value).items():
            s_abs = jax.eval_shape(init, p_abs)
            # A fresh function object so nothing comes from jit's caches.
            fresh = (lambda f: lambda p, s, g: f(p, s, g))(step)
            t0 = time.perf_counter()
            lowered = jax.jit(fresh, donate_argnums=(0, 1)).lower(p_abs, s_abs, p_abs)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            fus = C.hlo_summary(compiled.as_text()).fusions
            out.append({"blocks": nb, "params": n, "variant": name, "lower_s": t1 - t0, "compile_s": t2 - t1, "fusions": fus})
            log(f"  {nb} blocks, {name}: lower {t1 - t0:.2f}s, compile {t2 - t1:.2f}s")
            del lowered, compiled
    return out


def scheduler_variant(args):
    """Reruns the JAX timing in a subprocess with the concurrency-optimised scheduler off."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SCHEDULER_FLAG).strip()
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "sched.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--jax-only", "--json", str(out),
               "--blocks", str(args.blocks), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--max-value", str(args.max_value)]
        if args.quick:
            cmd.append("--quick")
        log(f"subprocess with XLA_FLAGS={env['XLA_FLAGS']!r} ...")
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------



# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _ratio(r: dict | None) -> str:
    if r is None:
        return "–"
    return f"{r['ratio_of_medians']:.2f} / {r['median_of_ratios']:.2f} [{r['ratio_q25']:.2f}–{r['ratio_q75']:.2f}]"


def timing_table(rows: dict, columns: dict[str, str]) -> str:
    head = ["variant", "median ms", *columns.values(), "minor page faults / step"]
    out = []
    for name, r in rows.items():
        out.append([name, f"{r['median_ms']:.1f}", *(_ratio(r.get(k)) for k in columns), f"{r['faults']:.0f}"])
    return C.md_table(head, out)


def hlo_table(hlo: dict) -> str:
    head = ["variant", "entry fusions (kinds)", "reductions (full-size)", "bytes read / param bytes",
            "bytes written / param bytes", "passes", "temp MB (memory_analysis)", "compile s"]
    rows = []
    for name, h in hlo.items():
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(h["kinds"].items()))
        rows.append([name, f"{h['fusions']} ({kinds})", f"{h['reductions']} ({h['big_reductions']})",
                     f"{h['read_passes']:.2f}", f"{h['write_passes']:.2f}",
                     f"{h['read_passes'] + h['write_passes']:.2f}", f"{h['temp_MB']:.1f}", f"{h['compile_s']:.1f}"])
    return C.md_table(head, rows)


def _git_state() -> str:
    """``at commit abc1234`` (plus ``, normjax/ modified`` when the working tree differs)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "normjax"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(git state unknown)"
    return f"at commit {head}" + (", normjax/ modified in the working tree" if dirty else "")


RATIO_HELP = "ratio of medians / median of per-round ratios [interquartile range of per-round ratios]"


def report(args, info, res, sched, comp, agree, skipped_torch: str | None) -> str:
    jr = res["jax"]["rows"]
    mn = jr[res["mn_name"]]["vs_jax_adam"]
    pj = jr[res["proj_name"]]["vs_jax_adam"]
    verdict = "MET" if max(mn["median_of_ratios"], mn["ratio_of_medians"]) <= TARGET else "NOT MET"
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_maxnorm.py", *sys.argv[1:]])
    d = args.d
    L = ["## Max-norm step time (`benchmarks/bench_maxnorm.py`)\n"]
    how = "what `make bench` runs" if len(sys.argv) == 1 else "`make bench` runs it without flags"
    L.append(f"Command: `{cmd}` ({how}), {time.strftime('%Y-%m-%d %H:%M %Z')}; normjax {_git_state()}.\n")
    L.append("### Machine\n")
    L.append(C.md_kv(info) + "\n")
    L.append("### Setup\n")
    shapes = ", ".join(f"{k} {i}x{o}" for k, (i, o) in block_shapes(d).items())
    L.append(
        f"- Tree: {args.blocks} blocks x ({shapes}), each kernel with a bias: **{res['n_params']:,} float32 parameters** "
        f"({res['n_kernel']:,} in kernels, {res['n_units']:,} units), {4 * res['n_params'] / 1e6:.0f} MB per copy.\n"
        f"- Init: kernel columns with log-normal norms (median {NORM_MEDIAN}, log-std {NORM_LOG_STD}), seed {SEED}; "
        f"{100 * res['init_above']:.1f}% of units start above c = {args.max_value:g}. Fixed standard-normal gradients; "
        f"Adam lr {LR:g}.\n"
        f"- Fraction clipped (`opt_state[1].clipped_fraction`, unit-weighted over kernels): after the first step "
        f"{res['clipped_first']}; after the last timed step {res['clipped_last']}.\n"
        "- JAX steps: `tx.update(grads, state, params)` + `optax.apply_updates`, jitted with `donate_argnums=(0, 1)`, "
        "run through the compiled executable, `block_until_ready` on params and state. XLA:CPU uses all cores.\n"
        "- Every table row comes from interleaved rounds: each round runs every variant of that table once, in the "
        f"order listed; warmup rounds dropped. Ratios: {RATIO_HELP}.\n"
    )
    L.append(f"### JAX: Adam vs Adam + max-norm ({args.warmup} warmup + {args.repeats} rounds, "
             f"load average {res['jax']['load_before']} → {res['jax']['load_after']})\n")
    L.append(timing_table(jr, {"vs_jax_adam": "÷ jax adam"}) + "\n")
    L.append(f"**adam + nj.max_norm / adam = {mn['ratio_of_medians']:.2f} (ratio of medians), "
             f"{mn['median_of_ratios']:.2f} (median of per-round ratios); target ≤ {TARGET:.2f}: {verdict}.** "
             f"Pure-function form (`nj.project_max_norm` on the new params): "
             f"{pj['ratio_of_medians']:.2f} / {pj['median_of_ratios']:.2f}.\n")
    L.append("### Compiled HLO of the JAX steps\n")
    L.append("Bytes read / written: operand and result sizes of every top-level instruction of the entry "
             "computation, summed and divided by the bytes of one copy of the parameters (a fused Adam would be "
             "4 reads + 3 writes = 7 passes). Temp MB: `compiled.memory_analysis().temp_size_in_bytes`.\n")
    L.append(hlo_table(res["hlo"]) + "\n")
    i, o = block_shapes(d)["qkv"]
    L.append(f"Fusion chain producing `h0/qkv/kernel` ({i}x{o}) in each step, in execution order:\n")
    for name in res["jax_names"]:
        L.append(f"`{name}`:\n\n```\n" + "\n".join(res["hlo"][name]["pipeline"]) + "\n```\n")
    if sched is not None:
        sj = sched["jax"]
        smn = sj["rows"][sched["mn_name"]]["vs_jax_adam"]
        L.append(f"### JAX again with `XLA_FLAGS={SCHEDULER_FLAG}`\n")
        L.append(f"Separate process, same tree, {args.warmup} warmup + {args.repeats} rounds; load average "
                 f"{sj['load_before']} → {sj['load_after']}. adam + nj.max_norm / adam = "
                 f"{smn['ratio_of_medians']:.2f} / {smn['median_of_ratios']:.2f}.\n")
        L.append(timing_table(sj["rows"], {"vs_jax_adam": "÷ jax adam"}) + "\n")
        L.append(hlo_table(sched["hlo"]) + "\n")
    L.append("### JAX vs PyTorch\n")
    t = res["torch"]
    if t is None:
        L.append(f"Skipped: {skipped_torch}.\n")
    else:
        L.append(
            f"torch {t['version']}; `torch.optim.Adam`'s default implementation for CPU tensors: **{t['default_impl']}** "
            f"(foreach and fused are opt-in on CPU). `torch.get_num_threads()` = {t['threads_default']} "
            f"= os.cpu_count() = {os.cpu_count()}, the default, so torch and XLA:CPU both use all cores. "
            "Torch weights in `nn.Linear` layout `(out, in)`: the unit is a row, the fan-in vector of one output "
            "unit, as normjax's default on Flax `(in, out)` kernels. Biases are optimised, never renormed. "
            "Rounds stop at a time cap when steps are slow (the rounds column says how many ran).\n"
        )
        for name, why in t["skipped"].items():
            L.append(f"- skipped `{name}`: {why}\n")
        cols = {"vs_jax_adam": "÷ jax adam", "vs_torch_adam": "÷ torch Adam (default)",
                "vs_jax_mn": "÷ jax adam + nj.max_norm"}
        for run in t["runs"]:
            n = next(iter(run["rows"].values()))["rounds"]
            L.append(f"**torch threads = {run['threads']}** (JAX unchanged), 1 warmup + {n} rounds, "
                     f"load average {run['load_before']} → {run['load_after']}:\n")
            L.append(timing_table(run["rows"], cols) + "\n")
    if agree:
        L.append(f"Agreement check: {agree}\n")
    if comp:
        L.append("### Compile time (`jax.jit(step, donate_argnums=(0, 1)).lower(*abstract).compile()`)\n")
        L.append("Inputs are `jax.ShapeDtypeStruct` trees (nothing allocated); `lower` includes tracing normjax's Python. "
                 "One measurement each.\n")
        L.append(C.md_table(["blocks", "params", "variant", "lower s", "compile s", "total s", "entry fusions"],
                            [[c["blocks"], f"{c['params']:,}", c["variant"], f"{c['lower_s']:.2f}", f"{c['compile_s']:.2f}",
                              f"{c['lower_s'] + c['compile_s']:.2f}", c["fusions"]] for c in comp]) + "\n")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import gc

    import jax  # first, so XLA_FLAGS from the environment apply

    torch, skipped_torch = None, None
    if args.no_torch:
        skipped_torch = "--no-torch given"
    elif not args.jax_only:
        try:
            import torch
        except Exception as e:
            skipped_torch = f"`import torch` failed ({type(e).__name__}: {e})"
            torch = None
    if skipped_torch and not args.jax_only:
        print(f"PyTorch section skipped: {skipped_torch}", flush=True)

    res = run_timing(args, torch)
    gc.collect()
    if args.jax_only:
        args.json.write_text(json.dumps(res))
        return
    info = C.machine_info()
    info["JAX backend"] = f"{jax.default_backend()} ({jax.device_count()} device)"
    agree = agreement_check(args, torch)
    comp = None
    if not args.no_compile:
        log("compile times ...")
        comp = compile_times(args)
    sched = None if args.no_scheduler_variant else scheduler_variant(args)
    text = report(args, info, res, sched, comp, agree, skipped_torch)
    total = time.perf_counter() - t_start
    text += f"\nTotal benchmark wall time: {total:.0f} s.\n"
    C.publish("bench_maxnorm", text, args.no_write, args.out)


if __name__ == "__main__":
    main()
