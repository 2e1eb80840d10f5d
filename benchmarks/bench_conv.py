#!/usr/bin/env python
"""Convolution operator-norm benchmark: what does bounding conv kernels by their true
operator norm cost, next to the matrix (reshaped-kernel) view and to Adam alone?

Four ResNet-like cases: 3x3 kernels with 64 -> 64 and 128 -> 128 channels, each on 32x32
and 16x16 inputs (``SAME`` padding, stride 1). Each case is a *stage* of ``--layers``
(default 4) such kernels, ``conv{i}/kernel`` of shape ``(3, 3, C, C)``, He-initialised, no
biases (a ResNet conv is followed by batch norm).

1. **Step time**, every variant of every case in ONE interleaved run (``common.interleaved``:
   each round runs every variant once, in the order listed; warmup rounds dropped):
     - optimizer steps on fixed standard-normal gradients, jitted ``tx.update`` +
       ``optax.apply_updates`` with params and state donated, run back to back, as many steps
       per timed call as take ~20 ms (``--inner`` fixes it; per-step time = call time / steps):
       ``optax.adam`` alone; ``+ nj.spectral_norm(c, estimator="power", num_iters=1)`` with
       ``dims=None`` (the matrix view: the kernel reshaped to ``(9C, C)``); the same with
       ``dims={r"^conv\d+/kernel$": nj.ConvSpec((n, n))}`` (the operator norm of ``x -> conv(x, K)``: one
       convolution and one transposed convolution per kernel and step);
     - model steps for context: forward + backward of the stage (``relu`` between the
       convolutions, loss ``mean(out**2)``) on a batch of ``--batch`` images (default 32),
       then Adam, without and with the conv-spec constraint.
   Plus the compiled HLO of the constrained step: what the convolution and its
   ``jax.linear_transpose`` compile to.
2. **Estimator cost** on one kernel of each case, jitted, medians of interleaved rounds:
   ``nj.conv_sigma_power`` (1 iteration; its forward and transposed convolutions timed
   alone too), ``nj.conv_sigma_gram`` (8 iterations, the default; its Fourier matrices and
   its Gram iterations timed alone), ``nj.conv_sigma_fft`` with ``CIRCULAR`` padding (exact;
   its batched SVD timed alone), and the matrix view's ``nj.sigma_svd`` / ``nj.sigma_power``.
   The split timings call normjax internals (``normjax._conv._fourier_matrices``,
   ``normjax._norms.gram_stack``) and are skipped if those change.
3. **Accuracy** on the same kernel: the matrix-view sigma / the operator norm (power
   iteration run to convergence), Gram's bound / that estimate, the exact circular norm
   (FFT), and what one power iteration gives after the transform's initial iterations.

Timings are wall-clock on whatever else the machine runs; only ratios taken in the same
rounds mean much. Nothing here needs ``jax.numpy_dtype_promotion("standard")`` unless
``JAX_NUMPY_DTYPE_PROMOTION=strict`` is set in the environment (optax's Adam then fails
on its int32 step count; the benchmarks run under the default standard promotion).

Usage::

    .venv/bin/python benchmarks/bench_conv.py            # full run (~3-4 min on 2 cores), updates RESULTS.md
    .venv/bin/python benchmarks/bench_conv.py --quick    # smoke run: small channels / inputs, no write
    .venv/bin/python benchmarks/bench_conv.py --repeats 20 --batch 16 --no-write
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_maxnorm as M
import common as C

LR = 1e-3
MAX_VALUE = 1.0  # c: a 1-Lipschitz stage; He-initialised kernels start above it in both views
SEED = 0
GRAM_ITERS = 8
CASES = [(64, 32), (64, 16), (128, 32), (128, 16)]  # (channels in = out, input side)
QUICK_CASES = [(16, 16), (32, 8)]
log = M.log

OPT_ADAM = "adam"
OPT_MAT = "adam + spectral_norm (matrix view)"
OPT_CONV = "adam + spectral_norm (ConvSpec)"
MODEL = "model step (fwd + bwd + adam)"
MODEL_CONV = "model step + spectral_norm (ConvSpec)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small channels and inputs, few repeats, RESULTS.md untouched")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds of the step section (default 8; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1)")
    ap.add_argument("--layers", type=int, default=4, help="kernels per stage (default 4)")
    ap.add_argument("--batch", type=int, default=None, help="images per model step (default 32; 4 with --quick)")
    ap.add_argument("--inner", type=int, default=None,
                    help="optimizer steps per timed call (default: as many as take ~20 ms, 1 to 100, per variant)")
    ap.add_argument("--step-seconds", type=float, default=None,
                    help="time cap of the step rounds, at least 3 rounds run (default 150 s)")
    ap.add_argument("--est-seconds", type=float, default=None,
                    help="time cap of the estimator rounds of one case, at least 3 rounds run (default 10 s)")
    ap.add_argument("--ref-iters", type=int, default=None,
                    help="power iterations of the reference operator norm (default 200, then 100 more to check)")
    ap.add_argument("--no-model", action="store_true", help="skip the model-step variants")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--out", type=Path, default=C.RESULTS_MD, help="results file (default benchmarks/RESULTS.md)")
    args = ap.parse_args(argv)
    q = args.quick
    args.cases = QUICK_CASES if q else CASES
    args.repeats = args.repeats if args.repeats is not None else (2 if q else 8)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.batch = args.batch if args.batch is not None else (4 if q else 32)
    args.step_seconds = args.step_seconds if args.step_seconds is not None else (20.0 if q else 150.0)
    args.est_seconds = args.est_seconds if args.est_seconds is not None else (1.0 if q else 10.0)
    args.est_repeats = 3 if q else 15
    args.ref_iters = args.ref_iters if args.ref_iters is not None else (30 if q else 200)
    if q:
        args.no_write = True
    return args


def case_label(ch: int, n: int) -> str:
    return f"3x3x{ch}x{ch} @ {n}x{n}"


def _fmt_ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


# ---------------------------------------------------------------------------------------
# Trees and steps
# ---------------------------------------------------------------------------------------


def make_stage(ch: int, layers: int, seed: int):
    """He-initialised ``(3, 3, ch, ch)`` kernels and standard-normal gradients, float32 numpy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    params, grads = {}, {}
    for i in range(layers):
        k = rng.standard_normal((3, 3, ch, ch), dtype=np.float32) * np.float32(np.sqrt(2.0 / (9 * ch)))
        params[f"conv{i}"] = {"kernel": k}
        grads[f"conv{i}"] = {"kernel": rng.standard_normal((3, 3, ch, ch), dtype=np.float32)}
    return params, grads


def conv_rules(n: int) -> dict:
    import normjax as nj

    return {r"^conv\d+/kernel$": nj.ConvSpec((n, n), strides=1, padding="SAME")}


def transforms(n: int) -> dict:
    import optax

    import normjax as nj

    return {
        OPT_ADAM: optax.adam(LR),
        OPT_MAT: optax.chain(optax.adam(LR), nj.spectral_norm(MAX_VALUE, estimator="power", num_iters=1)),
        OPT_CONV: optax.chain(
            optax.adam(LR), nj.spectral_norm(MAX_VALUE, estimator="power", num_iters=1, dims=conv_rules(n))
        ),
    }


def opt_step(tx):
    import optax

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def stage_forward(params, x):
    """The stage as a ResNet applies it (without batch norm): conv, relu, conv, ... conv."""
    import jax

    names = sorted(params, key=lambda s: int(s[4:]))
    for j, name in enumerate(names):
        x = jax.lax.conv_general_dilated(x, params[name]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if j < len(names) - 1:
            x = jax.nn.relu(x)
    return x


def model_step(tx):
    import jax
    import jax.numpy as jnp
    import optax

    def loss(params, x):
        return jnp.mean(stage_forward(params, x) ** 2)

    def step(params, state, x):
        grads = jax.grad(loss)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


class Runner:
    """A jitted step with params and state donated; one call runs ``inner`` steps."""

    def __init__(self, step, init, params_np, extra, inner: int | None):
        import jax
        import jax.numpy as jnp

        self.params = jax.tree.map(lambda x: jnp.array(x, copy=True), params_np)
        self.state = init(self.params)
        self.extra = extra
        t0 = time.perf_counter()
        self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.state, extra).compile()
        self.compile_s = time.perf_counter() - t0
        self.inner = 1
        if inner is None:  # calibrate: as many steps per call as take ~20 ms
            one = []
            for _ in range(3):
                t0 = time.perf_counter()
                self()
                one.append(time.perf_counter() - t0)
            inner = max(1, min(100, round(0.02 / max(min(one), 1e-6))))
        self.inner = inner
        self.hlo = self.compiled.as_text()
        try:
            self.temp_bytes = self.compiled.memory_analysis().temp_size_in_bytes
        except Exception:  # not every backend reports it
            self.temp_bytes = None

    def __call__(self) -> None:
        import jax

        for _ in range(self.inner):
            self.params, self.state = self.compiled(self.params, self.state, self.extra)
        jax.block_until_ready((self.params, self.state))


def per_call(samples: C.Samples, calls: int) -> C.Samples:
    return C.Samples([t / calls for t in samples.times], [f / calls for f in samples.faults])


# ---------------------------------------------------------------------------------------
# HLO census: what the heavy instructions of a compiled module are
# ---------------------------------------------------------------------------------------


def hlo_census(hlo_text: str) -> list[str]:
    """Counts the entry computation's heavy instructions: convolutions, dots, FFTs, custom calls
    (LAPACK), and the fusions that contain one (XLA:CPU wraps convolutions in YNNPACK / oneDNN
    fusions), plus copies of kernel-shaped arrays. One line per kind, shape and op_name."""
    comps = C._computations(hlo_text)
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    counts: dict[str, int] = {}
    for line in entry.splitlines()[1:]:
        m = C._INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = comps.get(called.group(1), "") if called else ""
        kind = None
        if op in ("convolution", "dot", "fft"):
            kind = op
        elif op == "custom-call":
            tgt = re.search(r'custom_call_target="([^"]+)"', rest)
            kind = f"custom-call {tgt.group(1) if tgt else '?'}"
        elif op == "fusion":
            inner = next((o for o in ("convolution", "dot", "fft") if re.search(rf"\s{o}\(", body)), None)
            fk = re.search(r'"kind":"(\w+)"', rest)
            if inner:
                kind = f"{inner} in {fk.group(1).strip('_') if fk else 'fusion'}"
            elif "transpose" in name or "copy" in name:
                kind = "layout copy"
        if kind is None:
            continue
        opname = re.search(r'op_name="([^"]+)"', rest)
        opn = "/".join(opname.group(1).split("/")[-2:]) if opname else ""
        opn = re.sub(r"^jit\([^)]*\)/", "", opn)
        shape = re.sub(r"\{[^}]*\}", "", shape)
        key = f"{kind}: {shape}" + (f" ({opn})" if opn else "")
        counts[key] = counts.get(key, 0) + 1
    return [f"{v} x {k}" for k, v in counts.items()]


# ---------------------------------------------------------------------------------------
# 1. Step time
# ---------------------------------------------------------------------------------------


def run_step_section(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import normjax as nj

    runners: dict[str, Runner] = {}
    keys: dict[tuple[int, int], dict[str, str]] = {}
    t_build = time.perf_counter()
    for ci, (ch, n) in enumerate(args.cases):
        params_np, grads_np = make_stage(ch, args.layers, SEED + ci)
        grads = jax.tree.map(lambda x: jnp.array(x, copy=True), grads_np)
        x = jnp.asarray(np.random.default_rng(100 + ci).standard_normal((args.batch, n, n, ch), dtype=np.float32))
        txs = transforms(n)
        keys[(ch, n)] = {}
        for vname, tx in txs.items():
            key = f"{case_label(ch, n)} | {vname}"
            log(f"[step] compiling {key} ...")
            runners[key] = Runner(opt_step(tx), tx.init, params_np, grads, args.inner)
            log(f"         {runners[key].compile_s:.1f} s, {runners[key].inner} steps per timed call")
            keys[(ch, n)][vname] = key
        if not args.no_model:
            for vname, tx in ((MODEL, txs[OPT_ADAM]), (MODEL_CONV, txs[OPT_CONV])):
                key = f"{case_label(ch, n)} | {vname}"
                log(f"[step] compiling {key} ...")
                runners[key] = Runner(model_step(tx), tx.init, params_np, x, 1)
                keys[(ch, n)][vname] = key
    build_s = time.perf_counter() - t_build
    load0 = C.loadavg()
    log(f"[step] built and compiled in {build_s:.0f} s; {len(runners)} variants, {args.warmup} warmup + up to {args.repeats} rounds (load avg {load0}) ...")
    t0 = time.perf_counter()
    raw = C.interleaved(runners, args.repeats, args.warmup, max_seconds=args.step_seconds,
                        progress=lambda r, k: log(f"  [step] round {r}/{k} ({time.perf_counter() - t0:.0f} s)"))
    wall = time.perf_counter() - t0
    s = {k: per_call(v, runners[k].inner) for k, v in raw.items()}
    res = {"cases": {}, "wall_s": wall, "build_s": build_s, "load_before": load0, "load_after": C.loadavg(),
           "rounds": len(next(iter(s.values())).times), "warmup": args.warmup}
    for (ch, n), kk in keys.items():
        med = {v: 1e3 * statistics.median(s[k].times) for v, k in kk.items()}
        ratios = {v: C.ratio_stats(s[k], s[kk[OPT_ADAM]]) for v, k in kk.items() if v in (OPT_MAT, OPT_CONV)}
        if MODEL in kk:
            ratios[MODEL_CONV] = C.ratio_stats(s[kk[MODEL_CONV]], s[kk[MODEL]])
        # the constraint's own cost, per round: (adam + conv) - adam, against the model step
        if MODEL in kk:
            extra = [a - b for a, b in zip(s[kk[OPT_CONV]].times, s[kk[OPT_ADAM]].times)]
            ratios["overhead_vs_model"] = 1e3 * statistics.median(extra) / med[MODEL]
        # the bound after the timed steps: operator norm of conv0 for both constrained variants, by
        # power iteration warm-started from the ConvSpec variant's own power vector
        after = {}
        spec = nj.ConvSpec((n, n))
        power = jax.jit(lambda w, u: nj.conv_sigma_power(w, u, spec, num_iters=args.ref_iters)[0])
        # the transform's state is shaped like the params: state[1].u["conv0"]["kernel"]
        u_conv = runners[kk[OPT_CONV]].state[1].u["conv0"]["kernel"]
        for v in (OPT_MAT, OPT_CONV):
            w = runners[kk[v]].params["conv0"]["kernel"]
            after[v] = {"operator": float(power(w, u_conv)), "matrix": float(nj.sigma_svd(w)),
                        "state_sigma": float(np.max(np.asarray(runners[kk[v]].state[1].sigma["conv0"]["kernel"])))}
        comp = {v: runners[k].compile_s for v, k in kk.items()}
        temp = {v: runners[k].temp_bytes for v, k in kk.items()}
        inner = {v: runners[k].inner for v, k in kk.items()}
        res["cases"][case_label(ch, n)] = {"ch": ch, "n": n, "median_ms": med, "ratios": ratios, "after": after,
                                           "compile_s": comp, "temp_bytes": temp, "inner": inner}
    ch, n = args.cases[0]
    res["census_case"] = case_label(ch, n)
    res["census"] = {v: hlo_census(runners[keys[(ch, n)][v]].hlo) for v in (OPT_CONV,)}
    del runners
    return res


# ---------------------------------------------------------------------------------------
# 2. Estimator cost and 3. accuracy, on one kernel per case
# ---------------------------------------------------------------------------------------


class Call:
    """A compiled function and its arguments; one call runs it ``inner`` times."""

    def __init__(self, fn, *a):
        import jax

        t0 = time.perf_counter()
        self.compiled = jax.jit(fn).lower(*a).compile()
        self.compile_s = time.perf_counter() - t0
        self.hlo = self.compiled.as_text()
        self.a = a
        self.inner = 1
        t0 = time.perf_counter()
        self.out = jax.block_until_ready(self.compiled(*a))  # first run (untimed): page in, then calibrate
        one = time.perf_counter() - t0
        if one < 0.05:
            t0 = time.perf_counter()
            jax.block_until_ready(self.compiled(*a))
            one = min(one, time.perf_counter() - t0)
        self.inner = max(1, min(50, int(5e-3 / max(one, 1e-6))))  # ~5 ms per timed call

    def __call__(self) -> None:
        import jax

        out = None
        for _ in range(self.inner):
            out = self.compiled(*self.a)
        self.out = jax.block_until_ready(out)


def estimator_fns(k, n: int) -> dict:
    """name -> (fn, args): the estimators on one kernel, and their parts."""
    import jax
    import jax.numpy as jnp

    import normjax as nj

    same = nj.ConvSpec((n, n), padding="SAME")
    circ = nj.ConvSpec((n, n), padding="CIRCULAR")
    u = nj.init_conv_power_vector(jax.random.key(1), k, same)
    um = nj.init_power_vector(jax.random.key(1), k)
    fns = {
        "conv_sigma_power, 1 iter (SAME)": (lambda k, u: nj.conv_sigma_power(k, u, same, num_iters=1), (k, u)),
    }
    apply_fwd = lambda k, x: nj.conv_operator(k, same)[0](x)
    y = jax.jit(apply_fwd)(k, u)
    fns["  its forward conv alone"] = (apply_fwd, (k, u))
    fns["  its transposed conv alone (linear_transpose)"] = (lambda k, y: nj.conv_operator(k, same)[1](y), (k, y))
    fns[f"conv_sigma_gram, {GRAM_ITERS} iters (SAME)"] = (lambda k: nj.conv_sigma_gram(k, same, num_iters=GRAM_ITERS), (k,))
    split = True
    try:
        from normjax import _conv as CV
        from normjax._norms import gram_stack

        rs = CV.resolve_conv(same, "kernel", k, "bench")
        rc = CV.resolve_conv(circ, "kernel", k, "bench")
        lay_s = CV._fourier_layout(rs, circular_exact=False)
        lay_c = CV._fourier_layout(rc, circular_exact=True)
        four_s = lambda k: CV._fourier_matrices(k, rs, lay_s)[0]
        four_c = lambda k: CV._fourier_matrices(k, rc, lay_c)[0]
        fs, fc = jax.jit(four_s)(k), jax.jit(four_c)(k)
        extra = CV._fft_error(lay_s, jnp.float32)
    except Exception as e:  # internals moved: time the public estimators only
        log(f"[estimators] split timings skipped ({type(e).__name__}: {e})")
        split = False
    if split:
        fns["  its Fourier matrices alone (embed + rfftn)"] = (four_s, (k,))
        fns["  its Gram iterations alone (batched complex matmuls)"] = (lambda f: jnp.max(gram_stack(f, GRAM_ITERS, extra)), (fs,))
    fns["conv_sigma_fft, exact (CIRCULAR)"] = (lambda k: nj.conv_sigma_fft(k, circ), (k,))
    if split:
        fns["  its batched SVD alone (LAPACK, values only)"] = (lambda f: jnp.max(jnp.linalg.svd(f, compute_uv=False)[:, 0]), (fc,))
    fns["matrix view: sigma_power, 1 iter"] = (lambda k, u: nj.sigma_power(k, u, num_iters=1)[0], (k, um))
    fns["matrix view: sigma_svd"] = (lambda k: nj.sigma_svd(k), (k,))
    shapes = {"fourier_same": tuple(fs.shape) if split else None, "fourier_circ": tuple(fc.shape) if split else None}
    return fns, shapes


def accuracy(k, n: int, ref_iters: int, outs: dict) -> dict:
    """Reference norms of ``k``; Gram's bound and the FFT norm are the timed estimators' outputs."""
    import jax

    import normjax as nj

    try:
        from normjax._transforms import INIT_POWER_ITERS
    except ImportError:
        INIT_POWER_ITERS = 30
    same = nj.ConvSpec((n, n), padding="SAME")
    check = max(1, ref_iters // 2)
    u0 = nj.init_conv_power_vector(jax.random.key(7), k, same)
    s1, u1 = jax.jit(lambda k, u: nj.conv_sigma_power(k, u, same, num_iters=ref_iters))(k, u0)
    s2, _ = jax.jit(lambda k, u: nj.conv_sigma_power(k, u, same, num_iters=check))(k, u1)
    ui = nj.conv_sigma_power(k, u0, same, num_iters=INIT_POWER_ITERS)[1]
    first = float(nj.conv_sigma_power(k, ui, same, num_iters=1)[0])
    op = float(s2)
    return {
        "matrix": float(nj.sigma_svd(k)),
        "power_ref": op,
        "power_ref_change": float(s2) / float(s1) - 1,
        "gram": float(outs[f"conv_sigma_gram, {GRAM_ITERS} iters (SAME)"]),
        "fft_circ": float(outs["conv_sigma_fft, exact (CIRCULAR)"]),
        "check_iters": check,
        "first_step": first,
        "init_iters": INIT_POWER_ITERS,
    }


def run_estimator_section(args) -> dict:
    import jax.numpy as jnp

    out = {"cases": {}}
    t_all = time.perf_counter()
    for ci, (ch, n) in enumerate(args.cases):
        label = case_label(ch, n)
        params_np, _ = make_stage(ch, 1, SEED + ci)
        k = jnp.asarray(params_np["conv0"]["kernel"])
        log(f"[estimators] {label}: compiling ...")
        fns, shapes = estimator_fns(k, n)
        calls = {name: Call(fn, *a) for name, (fn, a) in fns.items()}
        log(f"[estimators] {label}: timing ...")
        t0 = time.perf_counter()
        raw = C.interleaved(calls, args.est_repeats, 0, max_seconds=args.est_seconds)  # each ran once already
        wall = time.perf_counter() - t0
        rows = {}
        for name, smp in raw.items():
            st = per_call(smp, calls[name].inner)
            rows[name] = {"median_ms": 1e3 * statistics.median(st.times), "runs": len(st.times) * calls[name].inner,
                          "compile_s": calls[name].compile_s}
        census = {name: hlo_census(calls[name].hlo) for name in calls if not name.startswith(" ")}
        log(f"[accuracy] {label} ...")
        acc = accuracy(k, n, args.ref_iters, {name: calls[name].out for name in calls})
        out["cases"][label] = {"ch": ch, "n": n, "rows": rows, "wall_s": wall, "shapes": shapes, "census": census,
                               "accuracy": acc}
    out["wall_s"] = time.perf_counter() - t_all
    return out


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def est_flops(name: str, ch: int, n: int, shapes: dict) -> float | None:
    conv = 2.0 * 9 * ch * ch * n * n
    if name.startswith("conv_sigma_power"):
        return 2 * conv
    if "forward conv" in name or "transposed conv" in name:
        return conv
    if "Gram iterations" in name and shapes.get("fourier_same"):
        return GRAM_ITERS * shapes["fourier_same"][0] * 8.0 * ch**3
    return None


def report(args, info, step, est, walls: dict, total: float) -> str:
    L = C.report_header("bench_conv.py", "Convolution operator norm: step time and estimator cost", M._git_state(), info)

    # 1. step
    L.append(f"### 1. Step time ({step['warmup']} warmup + {step['rounds']} rounds, one interleaved run over every case "
             f"and variant; load average {step['load_before']} → {step['load_after']})\n")
    L.append(
        f"- Params: a ResNet-like stage of **{args.layers} kernels** `conv{{i}}/kernel`, each `(3, 3, C, C)`, He init "
        f"(N(0, 2 / 9C)), no biases; c = {MAX_VALUE:g} (every kernel starts above it in both views). Adam lr {LR:g}.\n"
        "- Optimizer steps: fixed standard-normal gradients; `jax.jit(step, donate_argnums=(0, 1))` of `tx.update` + "
        "`optax.apply_updates`, run back to back "
        + (f"{args.inner} steps per timed call" if args.inner else "as many steps per timed call as took ~20 ms at "
           "calibration (per case: " + "; ".join(f"{lab} " + "/".join(str(c['inner'][v]) for v in (OPT_ADAM, OPT_MAT, OPT_CONV))
                                                   for lab, c in step["cases"].items()) + ")")
        + "; per-step time = call time / steps. "
        "`spectral_norm(c, estimator=\"power\", num_iters=1)`, mode `\"rescale\"`; **matrix view**: `dims=None` (kernel "
        "reshaped to `(9C, C)`, two matrix-vector products per kernel); **ConvSpec**: "
        "`dims={r\"^conv\\d+/kernel$\": nj.ConvSpec((n, n))}` (SAME, stride 1; one convolution and one transposed "
        "convolution of one `(n, n, C)` image per kernel, the power vector kept in the state).\n"
        + ("" if args.no_model else
           f"- Model step: forward of the stage (conv, relu, ..., conv; `lax.conv_general_dilated`, NHWC/HWIO, SAME) on "
           f"**{args.batch} images** of `(n, n, C)`, loss `mean(out**2)`, `jax.grad`, Adam (same donation), without and "
           "with the ConvSpec constraint. \"constraint / model step\": the per-round difference "
           "(adam + ConvSpec) − adam of the optimizer rows, median, over the model step's median.\n")
        + f"- Ratios: {M.RATIO_HELP}.\n"
    )
    head = ["case", f"{OPT_ADAM} ms", f"{OPT_MAT} ms", "÷ adam", f"{OPT_CONV} ms", "÷ adam"]
    if not args.no_model:
        head += [f"{MODEL} ms", f"{MODEL_CONV} ms", "÷ model step", "constraint / model step"]
    rows = []
    for label, c in step["cases"].items():
        m, r = c["median_ms"], c["ratios"]
        row = [label, _fmt_ms(m[OPT_ADAM]), _fmt_ms(m[OPT_MAT]), M._ratio(r[OPT_MAT]), _fmt_ms(m[OPT_CONV]), M._ratio(r[OPT_CONV])]
        if not args.no_model:
            row += [_fmt_ms(m[MODEL]), _fmt_ms(m[MODEL_CONV]), M._ratio(r[MODEL_CONV]), f"{100 * r['overhead_vs_model']:.1f}%"]
        rows.append(row)
    L.append(C.md_table(head, rows) + "\n")
    L.append(f"After the timed steps (c = {MAX_VALUE:g}), `conv0/kernel` of the two constrained optimizer variants "
             f"(operator norm: {args.ref_iters} power iterations warm-started from the ConvSpec variant's power vector, "
             "a lower bound; matrix view: `nj.sigma_svd`; state sigma: the transform's estimate at the last step, before "
             "its rescale):\n")
    rows = []
    for label, c in step["cases"].items():
        for v, a in c["after"].items():
            rows.append([label, v, f"{a['state_sigma']:.4f}", f"{a['matrix']:.4f}", f"{a['operator']:.4f}"])
    L.append(C.md_table(["case", "variant", "state sigma", "matrix-view σ", "operator norm"], rows) + "\n")
    comp = "; ".join(f"{label}: " + ", ".join(f"{v} {s:.1f}" for v, s in c["compile_s"].items())
                     for label, c in step["cases"].items())
    L.append(f"Compile seconds: {comp}.\n")
    L.append(f"Heavy instructions of the compiled `{OPT_CONV}` step, {step['census_case']} (XLA:CPU, entry computation; "
             "`transpose()/conv_general_dilated` is the transposed convolution `jax.linear_transpose` produced):\n")
    L.append("```\n" + "\n".join(step["census"][OPT_CONV]) + "\n```\n")

    # 2. estimators
    L.append("### 2. Estimator cost on one kernel (jitted, median ms; the estimators of one case in interleaved rounds)\n")
    L.append(
        "One He-initialised kernel per case. `conv_sigma_power`: one iteration from a given unit input (the "
        "transform's per-step cost per kernel); `conv_sigma_gram`: the certified upper bound on the padded grid "
        f"(SAME: `(n + 2)^2`), {GRAM_ITERS} iterations on every rfft frequency's `C x C` complex matrix; "
        "`conv_sigma_fft`: exact for CIRCULAR padding (`n x n` grid), a values-only SVD of every frequency's matrix. "
        "Indented rows time a part alone (normjax internals). Cheap functions run several times per timed call; "
        "\"runs\" counts the executions timed. GFLOP/s: nominal flops / median time (a convolution of one image: "
        "2·9·C²·n²; a Gram iteration: one complex `C x C x C` product, 8·C³ real flops, per frequency).\n"
    )
    names = list(next(iter(est["cases"].values()))["rows"])
    head = ["estimator"] + list(est["cases"])
    rows = []
    for name in names:
        row = [name.replace("  ", "↳ ", 1) if name.startswith("  ") else name]
        for label, c in est["cases"].items():
            r = c["rows"].get(name)
            cell = "–" if r is None else f"{_fmt_ms(r['median_ms'])} ({r['runs']})"
            fl = est_flops(name, c["ch"], c["n"], c["shapes"])
            if r is not None and fl:
                cell += f", {fl / (1e6 * r['median_ms']):.0f} GFLOP/s"
            row.append(cell)
        rows.append(row)
    L.append(C.md_table(head, rows) + "\n")
    shp = ", ".join(f"{label}: SAME {c['shapes']['fourier_same']}, CIRCULAR {c['shapes']['fourier_circ']}"
                    for label, c in est["cases"].items() if c["shapes"]["fourier_same"])
    if shp:
        L.append(f"Fourier matrix stacks (frequencies, C, C), complex64: {shp}.\n")
    first = next(iter(est["cases"].values()))
    L.append(f"Heavy instructions of the compiled estimators, {next(iter(est['cases']))}:\n")
    for name, lines in first["census"].items():
        L.append(f"`{name}`:\n\n```\n" + ("\n".join(lines) or "(none)") + "\n```\n")

    # 3. accuracy
    L.append("### 3. Accuracy: matrix view vs operator norm, Gram's bound, one power iteration\n")
    L.append(
        f"Same kernels. Operator norm (SAME): power iteration, {args.ref_iters} iterations from a random start, then "
        f"{first['accuracy']['check_iters']} more (a lower bound; \"last change\": the relative change over those "
        f"{first['accuracy']['check_iters']}). Gram: the certified upper bound ({GRAM_ITERS} iterations; it bounds the circular "
        "convolution on the padded grid, so it sits a little above the SAME norm on small inputs). \"1 iteration after "
        "init\": what `spectral_norm(estimator=\"power\")` sees at its first step (its init runs "
        f"{first['accuracy']['init_iters']} iterations from a random start). CIRCULAR: the exact FFT norm.\n"
    )
    rows = []
    for label, c in est["cases"].items():
        a = c["accuracy"]
        rows.append([label, f"{a['matrix']:.4f}", f"{a['power_ref']:.4f}", f"{a['power_ref_change']:+.1e}",
                     f"**{a['matrix'] / a['power_ref']:.3f}**", f"{a['gram']:.4f}", f"{a['gram'] / a['power_ref'] - 1:+.2%}",
                     f"{a['first_step'] / a['power_ref'] - 1:+.2%}", f"{a['fft_circ']:.4f}", f"{a['matrix'] / a['fft_circ']:.3f}"])
    L.append(C.md_table(["case", "matrix-view σ", "operator norm (SAME, power)", "last change", "matrix / operator",
                         "Gram bound", "Gram / operator − 1", "1 iteration after init / operator − 1",
                         "operator norm (CIRCULAR, FFT)", "matrix / circular"], rows) + "\n")
    L.append("Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) + f"; **total {total:.0f} s** (imports "
             "and compiles included).\n")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import jax  # first, so XLA_FLAGS from the environment apply

    timed = C.SectionTimer(log)
    walls = timed.walls

    step = timed("1. step", run_step_section, args)
    est = timed("2.+3. estimators and accuracy", run_estimator_section, args)
    info = C.machine_info()
    info["JAX backend"] = f"{jax.default_backend()} ({jax.device_count()} device)"
    text = report(args, info, step, est, walls, time.perf_counter() - t_start)
    C.publish("bench_conv", text, args.no_write, args.out)


if __name__ == "__main__":
    main()
