"""One process of the 2-process x 4-CPU-device run of ``test_multiprocess.py``.

Usage: ``python tests/_multiprocess_worker.py PROCESS_ID PORT REFS_DIR``. Every constraint
runs on arrays sharded over a mesh spanning both processes (8 devices) and is compared, shard by
shard, with the same computation on one process's unsharded copy of the same arrays: each
process computes half of these references (compiling them is most of a run) and writes them to
``REFS_DIR``, where the other reads them. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, refs_dir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import normjax as nj  # noqa: E402


def shards_err(out: jax.Array, ref: np.ndarray) -> float:
    """Largest relative difference between this process's shards of ``out`` and ``ref``."""
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    return max(float(np.max(np.abs(np.asarray(s.data) - ref[s.index]))) / scale for s in out.addressable_shards)


def main() -> None:
    rng = np.random.default_rng(0)
    params_np = {
        "dense": {"kernel": (3 * rng.standard_normal((64, 32))).astype(np.float32), "bias": rng.standard_normal(32).astype(np.float32)},
        "stack": {"kernel": (2 * rng.standard_normal((8, 16, 24))).astype(np.float32)},
    }
    grads_np = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params_np)
    dims = {"stack/kernel": nj.MatrixDims(1, 2)}
    results: dict[str, object] = {"pid": pid, "devices": jax.device_count(), "processes": jax.process_count()}
    transforms = {
        "max_norm": nj.max_norm(1.0),
        "unit_norm": nj.unit_norm(),
        "min_max_norm": nj.min_max_norm(0.5, 1.0),
        "spectral_norm power": nj.spectral_norm(1.0, dims=dims),
        "spectral_norm gram": nj.spectral_norm(1.0, estimator="gram", dims=dims),
        "spectral_norm matmul clip": nj.spectral_norm(1.0, estimator="matmul", mode="clip", dims=dims),
    }

    def stepper(tx):
        def step(p, g):
            u, _ = tx.update(g, tx.init(p), p)
            return optax.apply_updates(p, u)

        return jax.jit(step)

    steps = {name: stepper(optax.chain(optax.sgd(0.1), t)) for name, t in transforms.items()}
    local = jax.tree.map(jax.numpy.asarray, params_np)
    local_g = jax.tree.map(jax.numpy.asarray, grads_np)
    unsharded = {name: (lambda f=f: f(local, local_g)) for name, f in steps.items()}
    unsharded["project_max_norm"] = lambda: nj.project_max_norm(local, 1.0)
    refs = exchange({name: jax.tree.map(np.asarray, unsharded[name]()) for name in list(unsharded)[pid::2]}, jax.tree.structure(params_np))
    assert sorted(refs) == sorted(unsharded), sorted(refs)
    specs = {"dense": {"kernel": P("d", None), "bias": P(None)}, "stack": {"kernel": P("d", None, None)}}
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
        shard = lambda tree: jax.tree.map(
            lambda x, s: jax.make_array_from_callback(x.shape, NamedSharding(mesh, s), lambda i, x=x: x[i]), tree, specs
        )
        params, grads = shard(params_np), shard(grads_np)
        outs = {}
        # auto (GSPMD) axes: every constraint; explicit axes (jax.make_mesh's default): one
        # of each kind of computation (unit norms, power iteration, the matmul polynomials),
        # the rest of the explicit paths being covered on one process by test_sharding.py
        names = list(steps) if axis_type == AxisType.Auto else EXPLICIT
        with jax.set_mesh(mesh) if axis_type == AxisType.Explicit else _null():
            for name in names:
                outs[name] = steps[name](params, grads)
            if axis_type == AxisType.Auto:
                outs["project_max_norm"] = jax.jit(lambda p: nj.project_max_norm(p, 1.0))(params)
        for name, out in outs.items():
            errs = jax.tree.map(shards_err, out, refs[name])
            kept = jax.tree.map(lambda o, s: o.sharding.is_equivalent_to(NamedSharding(mesh, s), o.ndim), out, specs)
            results[f"{axis_type.name} {name}"] = {"err": max(jax.tree.leaves(errs)), "sharding_kept": all(jax.tree.leaves(kept))}
    print(json.dumps(results), flush=True)
    jax.distributed.shutdown()


def exchange(mine: dict, treedef) -> dict:
    """``mine`` (name -> pytree of arrays, all of structure ``treedef``) and the other process's,
    through files in REFS_DIR."""
    leaves = {f"{name}|{i}": x for name, tree in mine.items() for i, x in enumerate(jax.tree.leaves(tree))}
    tmp = refs_dir / f"refs{pid}.tmp.npz"
    np.savez(tmp, **leaves)
    tmp.rename(refs_dir / f"refs{pid}.npz")  # atomic: the other process never reads half a file
    theirs = refs_dir / f"refs{1 - pid}.npz"
    deadline = time.monotonic() + 600
    while not theirs.exists():
        assert time.monotonic() < deadline, f"no {theirs} from the other process"
        time.sleep(0.05)
    with np.load(theirs) as z:
        other = {}
        for key in z.files:
            name, i = key.rsplit("|", 1)
            other.setdefault(name, {})[int(i)] = z[key]
    out = dict(mine)
    for name, by_index in other.items():
        out[name] = jax.tree.unflatten(treedef, [by_index[i] for i in range(len(by_index))])
    return out


EXPLICIT = ("max_norm", "spectral_norm power", "spectral_norm matmul clip")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    main()
