#!/usr/bin/env python
"""Spectral-norm benchmark: what do ``nj.spectral_norm`` and its estimators cost?

1. **Optimizer step** on the GPT-2-small-shaped tree of ``bench_maxnorm.py`` (12 blocks of
   qkv / attention projection / MLP kernels with biases, 85M float32 parameters): a jitted
   step ``tx.update`` + ``optax.apply_updates`` with params and state donated, interleaved
   round by round:
     - ``optax.adam`` alone;
     - ``optax.chain(optax.adam, nj.spectral_norm(c, estimator="power", num_iters=1))``;
     - Adam, then the same maths written with the public array functions on the new params
       (``nj.sigma_power`` + ``w * min(1, c / sigma)``; the pure-function form).
   Plus the compiled HLO of each (passes over the weights, temporaries, the fusion chain of
   one kernel, where XLA schedules the output fusions), and a rerun in a subprocess under
   ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false``.
2. **Per-matrix cost** of each estimator (``nj.sigma_power`` 1 iteration, ``nj.sigma_gram``
   8 and 6 iterations, ``nj.sigma_svd``, ``nj.clip_singular_values``) on Gaussian float32
   matrices of GPT-2 and 4096x4096 shapes, jitted, medians; Gram's over-estimate against a
   float64 reference; the SVD rows again with ``OPENBLAS_NUM_THREADS=1`` (subprocess).
3. **Training step of a model**: 12 GPT-2-shaped blocks of linear layers, forward on 16
   tokens + backward + Adam, in PyTorch with and without
   ``torch.nn.utils.parametrizations.spectral_norm`` (torch at 1 thread), and the same model
   in JAX with and without ``nj.spectral_norm``, interleaved in the same rounds.

Usage::

    .venv/bin/python benchmarks/bench_spectral.py            # full run (~5 min), updates RESULTS.md
    .venv/bin/python benchmarks/bench_spectral.py --quick    # smoke run: tiny shapes, no write
    .venv/bin/python benchmarks/bench_spectral.py --no-torch --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (imports no jax at module level)
import bench_maxnorm as M  # noqa: E402  (the GPT-2 tree, JaxRunner and table helpers; no jax at import)

SCHEDULER_FLAG = M.SCHEDULER_FLAG
TARGET = 1.50
LR = M.LR
SEED = 0
MAX_VALUE = 5.0  # step benchmark: every kernel of the tree ends above it within a few steps
MODEL_MAX_VALUE = 1.0  # model benchmark: the Lipschitz bound torch's spectral_norm imposes
GRAM_ITERS = (8, 6)
log = M.log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, few repeats, RESULTS.md untouched")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch (the model section then times JAX only)")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--no-scheduler-variant", action="store_true", help=f"skip the rerun under {SCHEDULER_FLAG}")
    ap.add_argument("--no-openblas-variant", action="store_true", help="skip the SVD rerun with OPENBLAS_NUM_THREADS=1")
    ap.add_argument("--no-model", action="store_true", help="skip the model (forward + backward) section")
    ap.add_argument("--clip-4096", action="store_true", help="also time clip_singular_values on 4096x4096 (~40-120 s here)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds of the step benchmark (default 20; 4 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3; 1 with --quick)")
    ap.add_argument("--model-repeats", type=int, default=None, help="timed rounds of the model section (default 10)")
    ap.add_argument("--out", type=Path, default=C.RESULTS_MD, help="results file (default benchmarks/RESULTS.md)")
    # internal: subprocess modes
    ap.add_argument("--jax-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--matrices-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--svd-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.d = 64 if q else 768
    args.blocks = 2 if q else 12
    args.repeats = args.repeats if args.repeats is not None else (4 if q else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    args.model_repeats = args.model_repeats if args.model_repeats is not None else (2 if q else 8)
    args.sched_repeats, args.sched_warmup = (3, 1) if q else (max(5, (2 * args.repeats) // 3), min(args.warmup, 2))
    args.model_blocks = 2 if q else 12
    args.tokens = 16
    # (rows, cols) of the per-matrix section; 768x2304 (GPT-2's qkv) is there so the tree's
    # per-step cost of each estimator can be added up from the rows.
    args.shapes = [(64, 64), (64, 192), (64, 256), (256, 256)] if q else [(768, 768), (768, 2304), (768, 3072), (4096, 4096)]
    args.big = 256 * 256 if q else 4096 * 4096  # matrices this large get one run of the slow estimators
    args.mat_seconds = 3.0 if q else 8.0  # time cap of the interleaved rounds of one small shape
    if q:
        args.no_write = True
    return args


def _progress(tag: str):
    return lambda r, n: log(f"  [{tag}] round {r}/{n}") if r % 5 == 0 or r == n else None


# ---------------------------------------------------------------------------------------
# 1. Optimizer step on the GPT-2 tree
# ---------------------------------------------------------------------------------------


def step_variants(c: float):
    """name -> (step(params, state, grads) -> (params, state), init(params) -> state)."""
    import jax
    import jax.numpy as jnp
    import optax

    import normjax as nj

    def chain_step(tx):
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step, tx.init

    def pure():
        """Adam, then per kernel ``w * min(1, c / sigma)`` with sigma from one warm-started power
        iteration on the new weights: the transform's maths, with the public array functions.
        The power vectors start from the transform's own init, so both run the same numbers."""
        adam = optax.adam(LR)
        sn = nj.spectral_norm(c, estimator="power", num_iters=1)

        def init(params):  # the state's u is shaped like params; by_path keys it "a/b/kernel"
            return adam.init(params), nj.by_path(sn.init(params).u)

        def step(params, state, grads):
            st, us = state
            updates, st = adam.update(grads, st, params)
            params = optax.apply_updates(params, updates)
            new_us = {}

            def one(path, w):
                key = nj.path_str(path)
                if key not in us:
                    return w
                sigma, new_us[key] = nj.sigma_power(w, us[key], num_iters=1)
                return w * jnp.where(sigma > c, c / sigma, 1.0).astype(w.dtype)

            params = jax.tree_util.tree_map_with_path(one, params)
            return params, (st, new_us)

        return step, init

    return {
        "jax adam": chain_step(optax.adam(LR)),
        f"jax adam + nj.spectral_norm({c:g}) (power, 1 iter)": chain_step(
            optax.chain(optax.adam(LR), nj.spectral_norm(c, estimator="power", num_iters=1))
        ),
        f"jax adam; then nj.sigma_power rescale of the new params ({c:g})": pure(),
    }


class StepRunner(M.JaxRunner):
    """bench_maxnorm's runner (compile, HLO, temp bytes); keeps the sigmas of the first step."""

    def __call__(self) -> None:
        import jax

        self.params, self.state = self.compiled(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))
        if self.first_state is None:
            self.first_state = sigmas_of(self.state)


def sigmas_of(state) -> dict[str, float] | None:
    import numpy as np

    import normjax as nj

    if isinstance(state, tuple) and len(state) > 1 and hasattr(state[1], "sigma"):
        return {k: float(np.asarray(v)) for k, v in nj.by_path(state[1].sigma).items()}
    return None


def sigma_summary(sig: dict[str, float] | None, c: float) -> str | None:
    if not sig:
        return None
    v = list(sig.values())
    return f"{sum(x > c for x in v)} of {len(v)} kernels above c = {c:g} (estimates {min(v):.3f}–{max(v):.3f})"


def schedule_note(hlo_text: str, min_bytes: int, n_param_leaves: int) -> dict:
    """Where XLA put the big output fusions of the entry computation relative to the dots.

    The entry computation of a compiled module lists its instructions in execution order. A
    kernel's temporaries (Adam's update u, w = p + u) stay alive until the fusion writing that
    kernel's new params runs; if every such fusion comes after the last matrix-vector product,
    the temporaries of all kernels are alive at once. The first ``n_param_leaves`` operands of
    the ``ROOT`` tuple are the new params (the step returns ``(params, state)``).
    """
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    order, root_ops = [], []
    for line in entry.splitlines()[1:]:
        m = C._INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        order.append((name, op, C._shape_bytes(shape)))
        if line.lstrip().startswith("ROOT") and op == "tuple":
            root_ops = re.findall(r"%([\w.\-]+)", rest.split("metadata=")[0])
    roots = set(root_ops[:n_param_leaves])
    dots = [i for i, (_, op, _) in enumerate(order) if op == "dot"]
    outs = [i for i, (n, op, b) in enumerate(order) if n in roots and op == "fusion" and b >= min_bytes]
    if not dots or not outs:
        return {"dots": len(dots), "outputs": len(outs), "after_last_dot": None}
    return {"dots": len(dots), "outputs": len(outs), "after_last_dot": sum(i > dots[-1] for i in outs),
            "before_first_dot": sum(i < dots[0] for i in outs)}


def run_step_section(args) -> dict:
    import jax
    import numpy as np

    log(f"[step] building the tree: {args.blocks} blocks, d={args.d} ...")
    params_np, grads_np = M.make_numpy_tree(args.blocks, args.d)
    n_params = M.count_params(params_np)
    kernels = [x for x in jax.tree.leaves(params_np) if x.ndim == 2]
    grads = jax.tree.map(lambda x: jax.numpy.array(x, copy=True), grads_np)

    runners = {}
    for name, (step, init) in step_variants(MAX_VALUE).items():
        log(f"[step] compiling {name} ...")
        runners[name] = StepRunner(step, init, params_np, grads)
    names = list(runners)
    adam_name, sn_name, pure_name = names
    load0 = C.loadavg()
    log(f"[step] {len(names)} variants, {args.warmup} warmup + {args.repeats} rounds (load avg {load0}) ...")
    t0 = time.perf_counter()
    s = C.interleaved(runners, args.repeats, args.warmup, progress=_progress("step"))
    res = {
        "n_params": n_params, "n_kernel": sum(int(k.size) for k in kernels), "n_kernels": len(kernels),
        "names": names, "sn_name": sn_name, "pure_name": pure_name, "adam_name": adam_name,
        "rows": M.summarize(s, {"vs_jax_adam": adam_name}), "wall_s": time.perf_counter() - t0,
        "load_before": load0, "load_after": C.loadavg(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "warmup": args.warmup, "repeats": args.repeats,
        "sigma_first": sigma_summary(runners[sn_name].first_state, MAX_VALUE),
        "sigma_last": sigma_summary(sigmas_of(runners[sn_name].state), MAX_VALUE),
    }
    # Same maths, same power vectors: the transform and the pure form should agree to rounding.
    a = [np.asarray(x) for x in jax.tree.leaves(runners[sn_name].params) if x.ndim == 2]
    b = [np.asarray(x) for x in jax.tree.leaves(runners[pure_name].params) if x.ndim == 2]
    res["agree"] = max(float(np.max(np.abs(x - y)) / np.max(np.abs(x))) for x, y in zip(a, b))
    smallest = min(int(k.size) * 4 for k in kernels)
    res["hlo"] = {}
    for name in names:
        r = runners[name]
        h = C.hlo_summary(r.hlo, big_bytes=smallest // 2)
        res["hlo"][name] = {
            "instructions": h.instructions, "fusions": h.fusions, "kinds": h.fusion_kinds,
            "reductions": h.reductions, "big_reductions": h.big_reductions,
            "read_passes": h.bytes_read / (4 * n_params), "write_passes": h.bytes_written / (4 * n_params),
            "temp_MB": r.temp_bytes / 1e6, "compile_s": r.compile_s,
            "pipeline": C.leaf_pipeline(r.hlo, r"^params_+h0_+qkv_+kernel", min_bytes=smallest // 2, keep_small_ops=("dot",)),
            "schedule": schedule_note(r.hlo, smallest // 2, len(jax.tree.leaves(params_np))),
        }
    del runners
    return res


def subprocess_json(args, extra: list[str], env_update: dict[str, str], tag: str, repeats: int, warmup: int) -> dict:
    env = dict(os.environ)
    env.update(env_update)
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "out.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *extra, "--json", str(out),
               "--repeats", str(repeats), "--warmup", str(warmup)]
        if args.quick:
            cmd.append("--quick")
        if args.clip_4096:
            cmd.append("--clip-4096")
        log(f"[{tag}] subprocess with {' '.join(f'{k}={v}' for k, v in env_update.items())} ...")
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------
# 2. Per-matrix cost of the estimators
# ---------------------------------------------------------------------------------------


def gram_flops(r: int, c: int, iters: int) -> float:
    big, small = max(r, c), min(r, c)
    return 2.0 * big * small * small + (iters - 1) * 2.0 * small**3


def matrix_estimators(svd_only: bool) -> dict:
    """name -> f(w, u) for one matrix; every output is what the estimator returns."""
    import normjax as nj

    fns = {}
    if not svd_only:
        fns["sigma_power (1 iter)"] = lambda w, u: nj.sigma_power(w, u, num_iters=1)[0]
        for t in GRAM_ITERS:
            fns[f"sigma_gram ({t} iters)"] = (lambda t: lambda w, u: nj.sigma_gram(w, num_iters=t))(t)
    fns["sigma_svd"] = lambda w, u: nj.sigma_svd(w)
    fns["clip_singular_values"] = lambda w, u: nj.clip_singular_values(w, 1.0)
    return fns


def reference_sigma(w64):
    """Largest singular value in float64: ARPACK's partial SVD (scipy.sparse.linalg.svds, k=1,
    tol=0), which converges to float64 rounding; much cheaper than a full LAPACK SVD here."""
    from scipy.sparse.linalg import svds

    return float(svds(w64, k=1, tol=0, return_singular_vectors=False, random_state=0)[0])


def powerlaw_matrix(rng, r: int, c: int):
    """U diag(s) V^T with s_i = i^(-1/2): a decaying spectrum with a gap, as trained weights have."""
    import numpy as np

    k = min(r, c)
    u, _ = np.linalg.qr(rng.standard_normal((r, k)))
    v, _ = np.linalg.qr(rng.standard_normal((c, k)))
    s = np.arange(1, k + 1, dtype=np.float64) ** -0.5
    return ((u * s) @ v.T).astype(np.float32)


def run_matrix_section(args, svd_only: bool = False) -> dict:
    import jax
    import numpy as np

    import normjax as nj
    from normjax._norms import gram_margin

    rng = np.random.default_rng(SEED)
    out = {"shapes": [], "openblas": os.environ.get("OPENBLAS_NUM_THREADS", "(unset)")}
    for r, c in args.shapes:
        big = r * c >= args.big
        if big and svd_only:
            continue
        w_np = (rng.standard_normal((r, c), dtype=np.float32) / np.sqrt(r)).astype(np.float32)
        w = jax.numpy.asarray(w_np)
        u = nj.init_power_vector(jax.random.key(SEED), w)
        fns = matrix_estimators(svd_only)
        if big and not args.clip_4096:
            fns.pop("clip_singular_values", None)
        compiled, compile_s = {}, {}
        for name, f in fns.items():
            t0 = time.perf_counter()
            compiled[name] = jax.jit(f).lower(w, u).compile()
            compile_s[name] = time.perf_counter() - t0
        results = {}

        def runner(name):
            def call():
                results[name] = jax.block_until_ready(compiled[name](w, u))

            return call

        cheap = [n for n in fns if n.startswith("sigma_power")]
        slow = [n for n in fns if n not in cheap]
        load0 = C.loadavg()
        log(f"[matrix {r}x{c}] {', '.join(fns)} (load avg {load0}) ...")
        samples = {}
        if cheap:
            samples.update(C.interleaved({n: runner(n) for n in cheap}, 30, 3, max_seconds=2.0))
        if big:  # one run each: these take tens of seconds on a 2-core CPU
            samples.update(C.interleaved({n: runner(n) for n in slow}, 1, 0))
        else:
            samples.update(C.interleaved({n: runner(n) for n in slow}, 9, 1, max_seconds=args.mat_seconds))
        row = {"shape": [r, c], "load_before": load0, "load_after": C.loadavg(), "est": {}}
        for name in fns:
            ts = samples[name].times
            row["est"][name] = {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "runs": len(ts),
                                "compile_s": compile_s[name]}
        if not svd_only:
            t0 = time.perf_counter()
            ref = reference_sigma(w_np.astype(np.float64))
            row["ref"] = ref
            row["ref_s"] = time.perf_counter() - t0
            row["gram_over"] = {t: float(results[f"sigma_gram ({t} iters)"]) / ref - 1 for t in GRAM_ITERS}
            row["margin"] = gram_margin(min(r, c), np.float32)
            row["svd_err"] = float(results["sigma_svd"]) / ref - 1
            if r == c and not big:  # the ARPACK reference against a full float64 LAPACK SVD, once
                row["ref_vs_lapack"] = ref / float(np.linalg.svd(w_np.astype(np.float64), compute_uv=False)[0]) - 1
            if not big:  # a matrix with a spectral gap: Gram converges much faster there
                wp = powerlaw_matrix(rng, r, c)
                refp = reference_sigma(wp.astype(np.float64))
                wpj = jax.numpy.asarray(wp)
                row["gram_over_powerlaw"] = {
                    t: float(compiled[f"sigma_gram ({t} iters)"](wpj, u)) / refp - 1 for t in GRAM_ITERS
                }
        out["shapes"].append(row)
        del compiled, w
    return out


# ---------------------------------------------------------------------------------------
# 3. Training step of a model: PyTorch parametrization vs normjax
# ---------------------------------------------------------------------------------------


def torch_model(torch, nblocks: int, d: int, sn: bool, fused: bool, x_np):
    """12 GPT-2-shaped blocks of nn.Linear: x += attn_proj(q + k + v), x += mlp_proj(gelu(mlp_fc(x)))
    (parameter-free layer norms before each half; no attention mixing across tokens)."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            q, k, v = self.qkv(F.layer_norm(x, (d,))).split(d, -1)
            x = x + self.attn_proj(q + k + v)
            return x + self.mlp_proj(F.gelu(self.mlp_fc(F.layer_norm(x, (d,)))))

    torch.manual_seed(SEED)
    model = nn.Sequential(*[Block() for _ in range(nblocks)])
    if sn:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                torch.nn.utils.parametrizations.spectral_norm(m)  # n_power_iterations=1
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=fused or None)
    x = torch.from_numpy(x_np)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        return loss

    return model, step


def torch_weights_flax(torch, nblocks: int, d: int, x_np):
    """The initial weights of torch_model as a Flax-layout tree (kernel = weight.T)."""
    model, _ = torch_model(torch, nblocks, d, False, False, x_np)
    params = {}
    for b, blk in enumerate(model):
        params[f"h{b}"] = {
            n: {"kernel": getattr(blk, n).weight.detach().numpy().T.copy(), "bias": getattr(blk, n).bias.detach().numpy().copy()}
            for n in ("qkv", "attn_proj", "mlp_fc", "mlp_proj")
        }
    with torch.no_grad():
        loss0 = float(model(torch.from_numpy(x_np)).pow(2).mean())
    return params, loss0


def jax_model_loss(params, x):
    import jax
    import jax.numpy as jnp

    def ln(h):
        mu = jnp.mean(h, -1, keepdims=True)
        var = jnp.mean((h - mu) ** 2, -1, keepdims=True)
        return (h - mu) / jnp.sqrt(var + 1e-5)

    def dense(p, h):
        return h @ p["kernel"] + p["bias"]

    d = x.shape[-1]
    for b in range(len(params)):
        p = params[f"h{b}"]
        qkv = dense(p["qkv"], ln(x))
        x = x + dense(p["attn_proj"], qkv[:, :d] + qkv[:, d : 2 * d] + qkv[:, 2 * d :])
        x = x + dense(p["mlp_proj"], jax.nn.gelu(dense(p["mlp_fc"], ln(x)), approximate=False))
    return jnp.mean(x**2)


class JaxModelRunner:
    def __init__(self, tx, params_np, x_np, pure_c: float | None = None):
        import jax
        import jax.numpy as jnp
        import optax

        import normjax as nj

        self.params = jax.tree.map(lambda a: jnp.array(a, copy=True), params_np)
        self.x = jnp.asarray(x_np)
        if pure_c is None:
            self.state = tx.init(self.params)

            def step(params, state, x):
                loss, g = jax.value_and_grad(jax_model_loss)(params, x)
                updates, state = tx.update(g, state, params)
                return optax.apply_updates(params, updates), state
        else:  # adam, then sigma_power rescale of the new params
            adam, c = tx, pure_c
            sn = nj.spectral_norm(c, estimator="power", num_iters=1)
            self.state = (adam.init(self.params), nj.by_path(sn.init(self.params).u))

            def step(params, state, x):
                st, us = state
                loss, g = jax.value_and_grad(jax_model_loss)(params, x)
                updates, st = adam.update(g, st, params)
                params = optax.apply_updates(params, updates)
                new_us = {}

                def one(path, w):
                    key = nj.path_str(path)
                    if key not in us:
                        return w
                    sigma, new_us[key] = nj.sigma_power(w, us[key], num_iters=1)
                    return w * jnp.where(sigma > c, c / sigma, 1.0).astype(w.dtype)

                return jax.tree_util.tree_map_with_path(one, params), (st, new_us)

        t0 = time.perf_counter()
        self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.state, self.x).compile()
        self.compile_s = time.perf_counter() - t0

    def __call__(self):
        import jax

        self.params, self.state = self.compiled(self.params, self.state, self.x)
        jax.block_until_ready((self.params, self.state))


def run_model_section(args, torch) -> dict:
    import jax
    import numpy as np
    import optax

    import normjax as nj

    d, nb, c = args.d, args.model_blocks, MODEL_MAX_VALUE
    x_np = np.random.default_rng(SEED + 2).standard_normal((args.tokens, d), dtype=np.float32)
    res = {"blocks": nb, "tokens": args.tokens, "c": c}
    fns = {}
    if torch is not None:
        threads_default = torch.get_num_threads()
        torch.set_num_threads(1)
        res["torch_threads_default"] = threads_default
        params_np, loss_torch = torch_weights_flax(torch, nb, d, x_np)
        res["loss0_torch"] = loss_torch
        for fused in (False, True):
            tag = "fused=True" if fused else "default"
            for sn in (False, True):
                name = f"torch Adam ({tag})" + (" + parametrizations.spectral_norm" if sn else "")
                log(f"[model] setting up {name} ...")
                _, fns[name] = torch_model(torch, nb, d, sn, fused, x_np)
    else:
        params_np, _ = M.make_numpy_tree(nb, d)
        params_np = jax.tree.map(lambda a: a / np.float32(3.0), params_np)
    res["loss0_jax"] = float(jax.jit(jax_model_loss)(params_np, x_np))
    res["n_params"] = M.count_params(params_np)
    jv = {
        "jax adam": (optax.adam(LR), None),
        f"jax adam + nj.spectral_norm({c:g})": (optax.chain(optax.adam(LR), nj.spectral_norm(c)), None),
        f"jax adam; then nj.sigma_power rescale ({c:g})": (optax.adam(LR), c),
    }
    jax_fns = {}
    for name, (tx, pure_c) in jv.items():
        log(f"[model] compiling {name} ...")
        jax_fns[name] = JaxModelRunner(tx, params_np, x_np, pure_c)
    fns = {**jax_fns, **fns}
    res["compile_s"] = {n: r.compile_s for n, r in jax_fns.items()}
    load0 = C.loadavg()
    log(f"[model] {len(fns)} variants, 1 warmup + {args.model_repeats} rounds (load avg {load0}) ...")
    t0 = time.perf_counter()
    s = C.interleaved(fns, args.model_repeats, 1, progress=_progress("model"), max_seconds=150.0)
    baselines = {"vs_jax_adam": "jax adam"}
    if torch is not None:
        baselines["vs_torch_default"] = "torch Adam (default)"
        baselines["vs_torch_fused"] = "torch Adam (fused=True)"
        baselines["vs_torch_fused_sn"] = "torch Adam (fused=True) + parametrizations.spectral_norm"
    rows = M.summarize(s, baselines)
    # the ratio each variant's constraint adds over its own optimizer alone
    own = {n: ("jax adam" if n.startswith("jax") else "torch Adam (fused=True)" if "fused" in n else "torch Adam (default)")
           for n in fns}
    for n in fns:
        rows[n]["vs_own"] = C.ratio_stats(s[n], s[own[n]])
    res.update(rows=rows, wall_s=time.perf_counter() - t0, load_before=load0, load_after=C.loadavg())
    if torch is not None:
        torch.set_num_threads(res["torch_threads_default"])
        res["torch_version"] = torch.__version__
        res["torch_default_impl"] = M.torch_default_impl(torch)
    return res


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _r(r: dict | None) -> str:
    return M._ratio(r)


def _fmt_ms(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1e3 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def matrix_table(mat: dict) -> str:
    names = []
    for row in mat["shapes"]:
        names += [n for n in row["est"] if n not in names]
    head = ["matrix", *[f"{n} ms" for n in names]]
    rows = []
    for row in mat["shapes"]:
        r, c = row["shape"]
        cells = [f"{r}x{c}"]
        for n in names:
            e = row["est"].get(n)
            if e is None:
                cells.append("not run")
                continue
            txt = _fmt_ms(e["median_ms"]) + (f" ({e['runs']} runs)" if e["runs"] > 1 else " (1 run)")
            if n.startswith("sigma_gram"):
                t = int(re.search(r"\((\d+)", n).group(1))
                txt += f", {gram_flops(r, c, t) / (e['median_ms'] * 1e6):.0f} GFLOP/s"
            cells.append(txt)
        rows.append(cells)
    return C.md_table(head, rows)


def tree_cost_estimate(mat: dict, d: int, blocks: int) -> dict[str, float] | None:
    """Seconds per step of each estimator on the GPT-2 tree, from the per-matrix medians."""
    by_shape = {tuple(row["shape"]): row["est"] for row in mat["shapes"]}
    need = {(d, d): blocks, (d, 3 * d): blocks, (d, 4 * d): 2 * blocks}  # 3072x768 costs as 768x3072
    if not all(k in by_shape for k in need):
        return None
    out = {}
    for n in by_shape[(d, d)]:
        if all(n in by_shape[k] for k in need):
            out[n] = sum(cnt * by_shape[k][n]["median_ms"] for k, cnt in need.items()) / 1e3
    return out


def report(args, info, step, sched, mat, mat_ob, model, skipped_torch, total_note: str = "") -> str:
    L = C.report_header("bench_spectral.py", "Spectral norm: step time and estimator cost", M._git_state(), info)
    L.append(f"Ratios: {M.RATIO_HELP}. Every table comes from interleaved rounds (each round runs every "
             "variant of that table once, in the order listed; warmup rounds dropped); the machine is shared, "
             "so only ratios taken in the same rounds mean anything.\n")

    # 1. step
    jr = step["rows"]
    sn = jr[step["sn_name"]]["vs_jax_adam"]
    pj = jr[step["pure_name"]]["vs_jax_adam"]
    verdict = "MET" if max(sn["median_of_ratios"], sn["ratio_of_medians"]) <= TARGET else "NOT MET"
    d = args.d
    shapes = ", ".join(f"{k} {i}x{o}" for k, (i, o) in M.block_shapes(d).items())
    L.append(f"### 1. Optimizer step on the GPT-2-small tree ({step['warmup']} warmup + {step['repeats']} rounds, "
             f"load average {step['load_before']} → {step['load_after']})\n")
    L.append(
        f"- Tree (`bench_maxnorm.make_numpy_tree`): {args.blocks} blocks x ({shapes}) with biases: "
        f"**{step['n_params']:,} float32 parameters**, {step['n_kernels']} kernels. Fixed standard-normal "
        f"gradients, Adam lr {LR:g}, c = {MAX_VALUE:g}. `nj.spectral_norm(c)`: estimator `\"power\"`, 1 iteration a step "
        "(two matrix-vector products on `w = params + updates`, warm-started from the state), mode `\"rescale\"`.\n"
        f"- Sigma estimates in the transform's state: after the first step {step['sigma_first']}; after the last "
        f"{step['sigma_last']}; a kernel above c is rescaled to c (by its estimate) each step.\n"
        "- JAX steps: jitted with `donate_argnums=(0, 1)`, run through the compiled executable, "
        "`block_until_ready` on params and state. XLA:CPU uses all cores.\n"
        f"- The pure-function row computes the same maths with the public array functions after "
        f"`optax.apply_updates` (`sigma, u = nj.sigma_power(w, u, num_iters=1)`; `w * min(1, c / sigma)`), from "
        f"the transform's initial power vectors; after the timed steps its kernels match the transform's to "
        f"{step['agree']:.1e} (max abs difference / max abs weight).\n"
    )
    L.append(M.timing_table(jr, {"vs_jax_adam": "÷ jax adam"}) + "\n")
    L.append(f"**adam + nj.spectral_norm (power, 1 iteration) / adam = {sn['ratio_of_medians']:.2f} (ratio of medians), "
             f"{sn['median_of_ratios']:.2f} (median of per-round ratios); target ≤ {TARGET:.2f}: {verdict}.** "
             f"Pure-function form: {pj['ratio_of_medians']:.2f} / {pj['median_of_ratios']:.2f}.\n")
    L.append("Compiled HLO (bytes read / written: operand and result sizes of every top-level instruction of the "
             "entry computation, divided by one copy of the parameters; Temp MB: "
             "`compiled.memory_analysis().temp_size_in_bytes`):\n")
    L.append(M.hlo_table(step["hlo"]) + "\n")
    L.append("Where XLA scheduled the fusions that write each kernel's new params, relative to the matrix-vector "
             "products (`dot`) of the power iterations:\n")
    rows = []
    for name, h in step["hlo"].items():
        sc = h["schedule"]
        if sc.get("after_last_dot") is None:
            continue
        rows.append([name, sc["dots"], sc["outputs"], sc["after_last_dot"], sc["before_first_dot"]])
    L.append(C.md_table(["variant", "dots", "fusions writing new kernels", "… after the last dot", "… before the first dot"], rows) + "\n")
    i, o = M.block_shapes(d)["qkv"]
    L.append(f"Fusion chain producing `h0/qkv/kernel` ({i}x{o}), in execution order (dots included):\n")
    for name in step["names"]:
        L.append(f"`{name}`:\n\n```\n" + "\n".join(step["hlo"][name]["pipeline"]) + "\n```\n")
    if sched is not None:
        ssn = sched["rows"][sched["sn_name"]]["vs_jax_adam"]
        spj = sched["rows"][sched["pure_name"]]["vs_jax_adam"]
        L.append(f"#### Again with `XLA_FLAGS={SCHEDULER_FLAG}`\n")
        L.append(f"Separate process, same tree, {sched['warmup']} warmup + {sched['repeats']} rounds; load average "
                 f"{sched['load_before']} → {sched['load_after']}. adam + nj.spectral_norm / adam = "
                 f"{ssn['ratio_of_medians']:.2f} / {ssn['median_of_ratios']:.2f}; pure form {spj['ratio_of_medians']:.2f} / "
                 f"{spj['median_of_ratios']:.2f}.\n")
        L.append(M.timing_table(sched["rows"], {"vs_jax_adam": "÷ jax adam"}) + "\n")
        L.append(M.hlo_table(sched["hlo"]) + "\n")
        rows = [[n, h["schedule"]["dots"], h["schedule"]["outputs"], h["schedule"]["after_last_dot"],
                 h["schedule"]["before_first_dot"]] for n, h in sched["hlo"].items() if h["schedule"].get("after_last_dot") is not None]
        L.append(C.md_table(["variant", "dots", "fusions writing new kernels", "… after the last dot", "… before the first dot"], rows) + "\n")

    # 2. per matrix
    L.append("### 2. Per-matrix cost of the estimators\n")
    L.append(
        "Gaussian float32 matrices (entries N(0, 1/rows)), each estimator jitted on its own "
        "(`jax.jit(f).lower(w, u).compile()`, then the executable), median wall time; the estimators of one "
        "shape run in interleaved rounds. `sigma_power` is one iteration from a given vector (two "
        "matrix-vector products); `sigma_gram` forms the smaller Gram matrix then squares it `iters - 1` more "
        "times (GFLOP/s = the nominal 2mnk flops of those products / time); `sigma_svd` is a values-only LAPACK "
        "SVD (`gesdd` via jaxlib, float32); `clip_singular_values` (c = 1, below every sigma here) runs a "
        "values-only SVD, a full SVD and `U diag(s - c) V^T`. 4096x4096: one run of each slow estimator"
        + ("" if args.clip_4096 else ", clip not run (pass `--clip-4096`)") +
        f". OPENBLAS_NUM_THREADS: {mat['openblas']}.\n"
    )
    L.append(matrix_table(mat) + "\n")
    if mat_ob is not None:
        L.append("SVD rows again in a subprocess with **`OPENBLAS_NUM_THREADS=1`**, the smaller shapes only (jaxlib's CPU SVD "
                 "calls LAPACK from scipy's bundled OpenBLAS, which by default runs one thread per core; when other "
                 "processes hold the cores, those threads wait on each other):\n")
        L.append(matrix_table(mat_ob) + "\n")
    est = tree_cost_estimate(mat, d, args.blocks)
    if est:
        adam_ms = jr[step["adam_name"]]["median_ms"]
        L.append(f"Per-step cost of each estimator alone over the {args.blocks}-block tree "
                 f"({args.blocks}x {d}x{d}, {args.blocks}x {d}x{3 * d}, {2 * args.blocks}x {d}x{4 * d} or {4 * d}x{d}), "
                 f"summed from the medians above, against `jax adam`'s median step ({adam_ms:.1f} ms in section 1):\n")
        L.append(C.md_table(["estimator", "s per step (sum)", "÷ jax adam step"],
                            [[n, f"{v:.3f}", f"{1e3 * v / adam_ms:.1f}"] for n, v in est.items()]) + "\n")
    L.append("Accuracy: estimate / σ_max − 1, with σ_max the float64 largest singular value of the same float32 "
             "matrix (ARPACK `scipy.sparse.linalg.svds(k=1, tol=0)` on the float64 copy"
             + "".join(f"; it matches a full float64 LAPACK SVD to {row['ref_vs_lapack']:.1e} on {row['shape'][0]}x{row['shape'][1]}"
                       for row in mat["shapes"] if "ref_vs_lapack" in row) +
             "). Gram's bound includes its rounding margin `1 + 4 sqrt(n) eps` (shown). Gaussian matrices have no gap at "
             "the top of the spectrum (the hard case for Gram: many singular values within a few percent of σ_max); "
             "the power-law matrices (`U diag(i^-1/2) V^T`, random orthogonal U, V) have the gap trained weights "
             "usually have. The theoretical worst case of Gram after t iterations is rank^(2^-(t+1)) − 1.\n")
    rows = []
    for row in mat["shapes"]:
        if "gram_over" not in row:
            continue
        r, c = row["shape"]
        n = min(r, c)
        go, gp = row["gram_over"], row.get("gram_over_powerlaw")
        cells = [f"{r}x{c}", f"{row['ref']:.6f}"]
        for t in GRAM_ITERS:
            key = t if t in go else str(t)
            cells.append(f"{100 * go[key]:+.3f}%")
        for t in GRAM_ITERS:
            key = t if gp and t in gp else str(t)
            cells.append(f"{100 * gp[key]:+.4f}%" if gp else "–")
        cells += [f"{100 * (n ** 2.0 ** -(GRAM_ITERS[0] + 1) - 1):.2f}% / {100 * (n ** 2.0 ** -(GRAM_ITERS[1] + 1) - 1):.2f}%",
                  f"{100 * row['margin']:.4f}%", f"{row['svd_err']:+.1e}"]
        rows.append(cells)
    g8, g6 = GRAM_ITERS
    L.append(C.md_table(["matrix", "σ_max (float64)", f"gram {g8}, Gaussian", f"gram {g6}, Gaussian", f"gram {g8}, power-law",
                         f"gram {g6}, power-law", f"worst case t={g8} / t={g6}", "margin", "sigma_svd (float32) rel. error"], rows) + "\n")

    # 3. model
    L.append("### 3. Training step of a model: PyTorch `parametrizations.spectral_norm` vs normjax\n")
    if model is None:
        L.append("Skipped (`--no-model`).\n")
    else:
        mr = model["rows"]
        L.append(
            f"Model: {model['blocks']} GPT-2-shaped blocks of linear layers ({shapes}, with biases; "
            f"{model['n_params']:,} parameters), `x += attn_proj(q + k + v)` and `x += mlp_proj(gelu(mlp_fc(x)))` "
            f"after parameter-free layer norms (no attention mixing across tokens), loss `mean(out**2)`, "
            f"forward on {model['tokens']} tokens (a small batch: the optimizer and the constraint weigh the "
            "most) + backward + Adam lr 1e-3. "
        )
        if skipped_torch:
            L.append(f"PyTorch skipped: {skipped_torch}; JAX rows only.\n")
        else:
            L.append(
                f"Torch {model['torch_version']} at **1 thread** (`torch.set_num_threads(1)`; its default here is "
                f"{model['torch_threads_default']}, which the max-norm section found erratic on this loaded 2-core "
                "machine: every op ends in an OpenMP barrier); JAX (XLA:CPU) uses both cores. Torch's "
                f"`torch.optim.Adam` default on CPU is {model['torch_default_impl']}; `fused=True` shown too. "
                "`parametrizations.spectral_norm` (n_power_iterations=1) reparametrizes every `nn.Linear` weight as "
                "`W / sigma(W)` and, in training mode, runs one power iteration in every forward (three "
                "matrix-vector products: `u = Wv`, `v = W^T u`, `sigma = u^T W v`), then backpropagates through "
                "`W / sigma`: spectral *normalization* of the weight used, the stored weight unconstrained. "
                f"normjax (`nj.spectral_norm({model['c']:g})`, power, 1 iteration, rescale) instead keeps the stored "
                f"weight's sigma ≤ {model['c']:g} after each step (two matrix-vector products on `params + updates`). "
                f"Both frameworks start from the same weights and input: initial loss torch {model['loss0_torch']:.6f}, "
                f"JAX {model['loss0_jax']:.6f}.\n"
            )
        n = next(iter(mr.values()))["rounds"]
        L.append(f"1 warmup + {n} rounds, load average {model['load_before']} → {model['load_after']}. "
                 "\"÷ own optimizer\": against the same framework's step without the constraint (same Adam).\n")
        cols = {"vs_own": "÷ own optimizer", "vs_jax_adam": "÷ jax adam"}
        if not skipped_torch:
            cols.update(vs_torch_default="÷ torch Adam (default)", vs_torch_fused="÷ torch Adam (fused)",
                        vs_torch_fused_sn="÷ torch Adam (fused) + spectral_norm")
        L.append(M.timing_table(mr, cols) + "\n")
        L.append("JAX compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in model["compile_s"].items()) + ".\n")
    if total_note:
        L.append(total_note)
    return "\n".join(L)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import jax  # first, so XLA_FLAGS from the environment apply

    if args.jax_only:
        args.json.write_text(json.dumps(run_step_section(args)))
        return
    if args.matrices_only:
        args.json.write_text(json.dumps(run_matrix_section(args, svd_only=args.svd_only)))
        return

    torch, skipped_torch = None, None
    if args.no_torch:
        skipped_torch = "--no-torch given"
    else:
        try:
            import torch
        except Exception as e:
            skipped_torch = f"`import torch` failed ({type(e).__name__}: {e})"
            torch = None
    if skipped_torch:
        print(f"PyTorch skipped: {skipped_torch}", flush=True)

    timed = C.SectionTimer(log)
    walls = timed.walls

    step = timed("1. step", run_step_section, args)
    sched = None
    if not args.no_scheduler_variant:
        flags = (os.environ.get("XLA_FLAGS", "") + " " + SCHEDULER_FLAG).strip()
        sched = timed("1. step, scheduler flag (subprocess)", subprocess_json, args, ["--jax-only"], {"XLA_FLAGS": flags}, "step",
                      args.sched_repeats, args.sched_warmup)
    mat = timed("2. per matrix", run_matrix_section, args)
    mat_ob = None
    if not args.no_openblas_variant:
        mat_ob = timed("2. SVD with OPENBLAS_NUM_THREADS=1 (subprocess)", subprocess_json, args,
                       ["--matrices-only", "--svd-only"], {"OPENBLAS_NUM_THREADS": "1"}, "matrix", args.repeats, args.warmup)
    model = None if args.no_model else timed("3. model", run_model_section, args, torch)
    info = C.machine_info()
    info["JAX backend"] = f"{jax.default_backend()} ({jax.device_count()} device)"
    total = time.perf_counter() - t_start
    note = ("Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items())
            + f"; **total {total:.0f} s** (imports included).\n")
    text = report(args, info, step, sched, mat, mat_ob, model, skipped_torch, total_note=note)
    C.publish("bench_spectral", text, args.no_write, args.out)


if __name__ == "__main__":
    main()
