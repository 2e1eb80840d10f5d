#!/usr/bin/env python
"""TPU v5e ahead-of-time compilation without a TPU: what does each update step compile to?

libtpu describes a TPU topology on a CPU-only machine
(``jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")``);
``jax.jit(step).lower(*abstract).compile()`` with abstract inputs replicated on one of its
chips runs the whole TPU compiler. For every step below this records the compile time,
``compiled.memory_analysis()`` (temporary, argument, output and generated-code bytes) and
``compiled.cost_analysis()`` (``bytes accessed``, ``flops``): the TPU compiler's own estimates,
nothing runs. It also lists what ``tests/test_tpu_aot.py`` asserts on smaller matrices: the
``dot_general``s and their precision, decomposition custom calls (SVD/eigh/QR), ``f64``.

The tree: four GPT-2 MLP kernels 768x3072 float32, one bias (3072,) and a scan-stacked
(12, 768, 768) kernel with ``MatrixDims(1, 2)`` (one sigma per layer), 12.5M parameters. The
step is ``tx.update(grads, state, params)`` + ``optax.apply_updates`` under ``jax.jit`` for
``tx = optax.adam(1e-3)`` or ``optax.chain(optax.adam(1e-3), constraint)``; the last row is
``nj.project_spectral_norm(params, 1.0, estimator="matmul")`` alone.

It then compiles Adam, ``clip_by_global_norm``, ``max_norm`` and ``spectral_norm`` (power) on the
performance issue's tree (the four kernels and the bias) without and with donation and
reports their bytes accessed against Adam's.

Each step compiles in its own child process (one at a time: only one process may load libtpu)
under ``--timeout`` seconds, so a compile that does not finish is recorded as such.

Usage::

    make tpu-bench                                   # installs libtpu (make tpu-check: the tests)
    TPU_LIBRARY_PATH=.venv/libtpu-aot/libtpu/libtpu.so .venv/bin/python benchmarks/tpu_aot.py
        [--timeout 1200] [--only "spectral_norm matmul clip" ...] [--no-write]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common as C  # noqa: E402  (imports no jax at module level)
from bench_maxnorm import _git_state as M_git_state  # noqa: E402  (imports no jax either)

SECTION = "tpu_aot"
TITLE = "TPU v5e ahead-of-time compilation (deviceless)"
TOPOLOGY = "v5e:2x2"
RESULT = "TPU_AOT_RESULT "

# name -> the constraint chained after Adam, as code (evaluated in the child, with nj and DIMS)
STEPS = {
    "adam": None,
    "clip_by_global_norm(1), then adam (optax)": "CLIP",
    "max_norm(3.0)": "nj.max_norm(3.0)",
    "spectral_norm power rescale": "nj.spectral_norm(1.0, dims=DIMS)",
    "spectral_norm gram rescale": 'nj.spectral_norm(1.0, estimator="gram", dims=DIMS)',
    "spectral_norm svd clip (reference)": 'nj.spectral_norm(1.0, estimator="svd", mode="clip", dims=DIMS)',
    "spectral_norm matmul clip": 'nj.spectral_norm(1.0, estimator="matmul", mode="clip", dims=DIMS)',
    "spectral_norm matmul orthogonalize": 'nj.spectral_norm(1.0, estimator="matmul", mode="orthogonalize", dims=DIMS)',
    "spectral_norm gram soft_cap": 'nj.spectral_norm(1.0, estimator="gram", mode="soft_cap", dims=DIMS)',
    "spectral_norm power hammer": 'nj.spectral_norm(1.0, estimator="power", mode="hammer", dims=DIMS)',
    "spectral_norm matmul clip, certify=True": 'nj.spectral_norm(1.0, estimator="matmul", mode="clip", certify=True, dims=DIMS)',
    "project_spectral_norm matmul (alone)": "PROJECT",
}
# The issue's tree (four 768x3072 kernels and a bias, no stacked kernel): bytes accessed of these
# steps without and with donation, the figures the performance issue states its target in
ISSUE_TREE_STEPS = ["adam", "clip_by_global_norm(1), then adam (optax)", "max_norm(3.0)", "spectral_norm power rescale"]
DECOMPOSITION = re.compile(r"svd|gesdd|gesvd|eig|qr|geqrf|householder|lapack|solver|jacobi", re.I)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def libtpu_path() -> str | None:
    """Where jax loads libtpu from: ``TPU_LIBRARY_PATH``, else the importable ``libtpu``."""
    env = os.environ.get("TPU_LIBRARY_PATH")
    if env and os.path.isfile(env):
        return env
    spec = importlib.util.find_spec("libtpu")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(folder, "libtpu.so")):
            return os.path.join(folder, "libtpu.so")
    return None


def libtpu_version(path: str) -> str:
    folder = Path(path).resolve().parent.parent  # .../libtpu/libtpu.so -> the folder holding the dist-info
    for dist in importlib.metadata.distributions(path=[str(folder)]):
        if dist.metadata["Name"] == "libtpu":
            return dist.version
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------
# Child: compile one step, print one JSON line
# ---------------------------------------------------------------------------------------


def compile_one(name: str, tree: str = "bench", donate: bool = False) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host backend; TPU only as a compile target
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import normjax as nj

    t0 = time.perf_counter()
    topo = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY)
    t_topo = time.perf_counter() - t0
    chip = topo.devices[0]
    sharding = NamedSharding(Mesh(np.array([chip]), ("chip",)), PartitionSpec())

    f32 = jnp.float32
    params = {f"fc{i}": {"kernel": jax.ShapeDtypeStruct((768, 3072), f32)} for i in range(4)}
    params["fc0"]["bias"] = jax.ShapeDtypeStruct((3072,), f32)
    if tree == "bench":
        params["stacked"] = jax.ShapeDtypeStruct((12, 768, 768), f32)
    DIMS = {"stacked": nj.MatrixDims(1, 2)} if tree == "bench" else None  # noqa: N806  (named in STEPS' code)

    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

    code = STEPS[name]
    if code == "PROJECT":
        fn = jax.jit(lambda p: nj.project_spectral_norm(p, 1.0, estimator="matmul", dims=DIMS))
        args = (abstract(params),)
    else:
        tx = optax.adam(1e-3)
        if code == "CLIP":
            tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
        elif code is not None:
            tx = optax.chain(tx, eval(code, {"nj": nj, "DIMS": DIMS}))
        state = jax.eval_shape(tx.init, params)

        def step(p, g, s):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        fn = jax.jit(step, donate_argnums=(0, 2) if donate else ())
        args = (abstract(params), abstract(params), abstract(state))

    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t_lower = time.perf_counter() - t0
    stablehlo = lowered.as_text()
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    hlo = compiled.as_text()

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    dots = [line for line in stablehlo.splitlines() if "stablehlo.dot_general" in line]
    hlo_dots = [line for line in hlo.splitlines() if re.search(r"\s(dot|convolution)\(", line)]
    targets = re.findall(r"stablehlo\.custom_call\s+@([\w.$-]+)", stablehlo) + re.findall(
        r'custom_call_target="([^"]+)"', hlo)
    return {
        "name": name,
        "device_kind": chip.device_kind,
        "topology_s": t_topo,
        "lower_s": t_lower,
        "compile_s": t_compile,
        "memory": {k: getattr(mem, k) for k in dir(mem) if k.endswith("_in_bytes")},
        "bytes_accessed": cost.get("bytes accessed"),
        "flops": cost.get("flops"),
        "transcendentals": cost.get("transcendentals"),
        "dots": len(dots),
        "dots_highest": sum("precision = [HIGHEST, HIGHEST]" in line for line in dots),
        "hlo_dots": len(hlo_dots),
        "hlo_dots_highest": sum("operand_precision={highest,highest}" in line for line in hlo_dots),
        "custom_calls": sorted(set(targets)),
        "decompositions": sorted({t for t in targets if DECOMPOSITION.search(t)}),
        "f64": bool(re.search(r"\bf64\b", hlo)),
    }


# ---------------------------------------------------------------------------------------
# Parent: one child per step, then the report
# ---------------------------------------------------------------------------------------


def run_child(name: str, timeout: float, extra: tuple = ()) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", name, *extra], env=env, timeout=timeout,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"not compiled within {timeout:.0f} s (stopped)", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            out = json.loads(line[len(RESULT):])
            out["wall_s"] = wall
            return out
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-3:]
    return {"name": name, "error": f"exit {proc.returncode}: " + " / ".join(tail)[-600:], "wall_s": wall}


def mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def issue_table(issue: dict) -> str:
    """Bytes accessed on the issue's tree, without and with donation, and each ÷ Adam's."""
    rows = []
    for name in ISSUE_TREE_STEPS:
        cells = [f"`{name}`"]
        for donate in (False, True):
            r, base = issue.get((name, donate), {}), issue.get(("adam", donate), {})
            if "bytes_accessed" not in r or not base.get("bytes_accessed"):
                cells += [r.get("error", "n/a"), "—"]
                continue
            cells += [mib(r["bytes_accessed"]), f"{r['bytes_accessed'] / base['bytes_accessed']:.3f}"]
        rows.append(cells)
    head = ["step", "bytes accessed (MiB), no donation", "÷ Adam's", "bytes accessed (MiB), donate_argnums=(0, 2)", "÷ Adam's"]
    return C.md_table(head, rows)


def report(results: list[dict], info: dict[str, str], args, load0: str, load1: str, wall: float, issue: dict | None = None) -> str:
    base = next((r for r in results if r["name"] == "adam" and "error" not in r), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append([f"`{r['name']}`", r["error"], *["—"] * 10])
            continue
        m = r["memory"]
        ratio = (f"{r['bytes_accessed'] / base['bytes_accessed']:.2f}"
                 if base and r["bytes_accessed"] and base["bytes_accessed"] else "n/a")
        dots = f"{r['dots']} ({r['dots_highest']}) / {r['hlo_dots']} ({r['hlo_dots_highest']})"
        calls = ", ".join(r["decompositions"]) or "none"
        rows.append([
            f"`{r['name']}`", f"{r['compile_s']:.1f}", mib(m.get("peak_memory_in_bytes")), mib(m.get("temp_size_in_bytes")),
            mib(m.get("argument_size_in_bytes")), mib(m.get("output_size_in_bytes")),
            mib(m.get("generated_code_size_in_bytes")), mib(r["bytes_accessed"]), ratio,
            f"{r['flops'] / 1e9:.2f}" if r["flops"] is not None else "n/a", dots,
            calls + (", **f64**" if r["f64"] else ""),
        ])
    head = ["step", "compile (s)", "peak (MiB)", "temp (MiB)", "arguments (MiB)", "outputs (MiB)", "code (MiB)",
            "bytes accessed (MiB)", "bytes / Adam's", "GFLOP", "dots HIGHEST: StableHLO / TPU HLO",
            "decomposition custom calls"]
    cmd = ".venv/bin/python benchmarks/tpu_aot.py" + "".join(f" {a}" for a in sys.argv[1:])
    L = [
        f"## {TITLE}\n",
        f"Command: `{cmd}` (what `make tpu-bench` runs), "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; normjax {M_git_state()}.\n",
        "### Machine\n",
        C.md_kv(info) + "\n",
        f"### Steps compiled for one {results[0].get('device_kind', 'TPU v5e')} chip "
        f"(load average {load0} → {load1})\n",
        "- Tree: four kernels 768x3072 float32 (GPT-2 MLP size), one bias (3072,), a stacked "
        "(12, 768, 768) kernel with `MatrixDims(1, 2)`: 12,585,984 parameters (50.3 MB). Abstract "
        f"inputs replicated on chip 0 of the compile-only `{TOPOLOGY}` topology; the step is "
        "`tx.update(grads, state, params)` + `optax.apply_updates` under `jax.jit`, "
        "`tx = optax.chain(optax.adam(1e-3), constraint)`, c = 1 (3 for max-norm), every other "
        "argument the default. Nothing runs: every figure is the TPU compiler's.",
        "- compile: `lowered.compile()` wall time in a fresh process (libtpu loaded, jax warm); "
        f"each step in its own process with a {args.timeout:.0f} s limit.",
        "- peak / temp / arguments / outputs / code: `compiled.memory_analysis()` "
        "(`peak_memory_in_bytes`, `temp_size_in_bytes`, `argument_size_in_bytes`, "
        "`output_size_in_bytes`, `generated_code_size_in_bytes`); arguments are params + grads + "
        "state (Adam's two moments, the power vectors), outputs the new params and state (no "
        "donation).",
        "- bytes accessed, GFLOP: `compiled.cost_analysis()[\"bytes accessed\"]` and `[\"flops\"]`; "
        "bytes / Adam's: that ratio against the Adam step alone.",
        "- dots HIGHEST: `dot_general`s in the lowered StableHLO (how many carry "
        "`precision = [HIGHEST, HIGHEST]`) / dots and convolutions in the optimized TPU HLO (how "
        "many carry `operand_precision={highest,highest}`).",
        "- decomposition custom calls: custom-call targets in the StableHLO or the optimized HLO "
        "naming an SVD, eigh, QR or LAPACK routine; **f64** if the optimized HLO has a float64.\n",
        C.md_table(head, rows) + "\n",
        *([
            "### The performance issue's tree: four 768x3072 float32 kernels and a bias (no stacked kernel)\n",
            "The same compile, without and with donation of params and optimizer state "
            "(`jax.jit(step, donate_argnums=(0, 2))`, as training loops run); the cost model counts the "
            "memory-space prefetch copies XLA schedules, which donation changes.\n",
            issue_table(issue) + "\n",
        ] if issue else []),
        f"Wall time of the whole benchmark: {wall:.0f} s (per step, with process start and "
        "libtpu load: " + ", ".join(f"{r['name']} {r['wall_s']:.0f} s" for r in results) + ").",
    ]
    return "\n".join(L)


def machine_info(path: str) -> dict[str, str]:
    import platform

    info = {
        "CPU": C._cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "RAM": f"{C._ram_gib():.1f} GiB" if C._ram_gib() else "unknown",
        "OS / Python": f"{platform.platform()} / Python {platform.python_version()}",
        "jax / jaxlib": f"{C._version('jax')} / {C._version('jaxlib')}",
        "optax": C._version("optax"),
        "libtpu": f"{libtpu_version(path)} (`{os.path.relpath(path, HERE.parent)}`)",
        "compile target": f"one chip of `{TOPOLOGY}` (no TPU attached; `get_topology_desc`)",
    }
    return info


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per step's compile process (default 1200)")
    ap.add_argument("--only", nargs="+", choices=list(STEPS), help="these steps only (adam is always added)")
    ap.add_argument("--skip", nargs="+", default=[], choices=list(STEPS), help="record these as skipped (the report is still written)")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--out", type=Path, default=C.RESULTS_MD, help="results file (default benchmarks/RESULTS.md)")
    ap.add_argument("--child", choices=list(STEPS), help=argparse.SUPPRESS)
    ap.add_argument("--tree", choices=["bench", "issue"], default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--donate", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(RESULT + json.dumps(compile_one(args.child, args.tree, args.donate)), flush=True)
        return
    path = libtpu_path()
    if path is None:
        sys.exit("libtpu is not installed: run `make tpu-check`, or set TPU_LIBRARY_PATH to a libtpu.so")
    names = list(STEPS) if not args.only else ["adam", *[n for n in args.only if n != "adam"]]
    info = machine_info(path)
    load0, t0 = C.loadavg(), time.perf_counter()
    results = []
    for name in names:
        if name in args.skip:
            results.append({"name": name, "error": "skipped (--skip)", "wall_s": 0.0})
            continue
        log(f"[{name}] compiling ...")
        r = run_child(name, args.timeout)
        results.append(r)
        log(f"[{name}] " + (r["error"] if "error" in r else
                            f"compile {r['compile_s']:.1f} s, bytes accessed {mib(r['bytes_accessed'])} MiB, "
                            f"temp {mib(r['memory'].get('temp_size_in_bytes'))} MiB, "
                            f"decompositions {r['decompositions'] or 'none'}"))
    issue = {}
    if not args.only:
        for name in ISSUE_TREE_STEPS:
            for donate in (False, True):
                r = run_child(name, args.timeout, ("--tree", "issue") + (("--donate",) if donate else ()))
                issue[(name, donate)] = r
                log(f"[issue tree, donate={donate}] {name}: " + (r["error"] if "error" in r else f"bytes accessed {mib(r['bytes_accessed'])} MiB"))
    text = report(results, info, args, load0, C.loadavg(), time.perf_counter() - t0, issue)
    C.publish(SECTION, text, args.no_write or bool(args.only), args.out)


if __name__ == "__main__":
    main()
