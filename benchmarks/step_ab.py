"""Step time of Adam + a constraint for one normjax checkout: run it for two checkouts in turn
(interleaved, several rounds) to compare commits on the same machine.

    git worktree add /tmp/old <commit>
    for r in 1 2 3; do for w in /tmp/old .; do python benchmarks/step_ab.py $w max; done; done

Prints the median of 15 jitted steps (after one warm-up) on six 768x3072 float32 kernels with
biases; ``kind`` is ``max`` (max_norm(0.5)), ``power`` (spectral_norm(1.0)) or ``adam`` alone.
"""

import json
import sys
import time

which, kind = sys.argv[1], sys.argv[2]
sys.path.insert(0, which)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import normjax as nj  # noqa: E402

rng = np.random.default_rng(0)
params = {
    f"layer{i}": {"kernel": jnp.asarray(rng.normal(size=(768, 3072)) * 0.05, jnp.float32), "bias": jnp.zeros(3072)}
    for i in range(6)
}
grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.01, jnp.float32), params)
constraint = {"max": lambda: nj.max_norm(0.5), "power": lambda: nj.spectral_norm(1.0), "adam": optax.identity}[kind]()
tx = optax.chain(optax.adam(1e-3), constraint)


@jax.jit
def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s


p, s = step(params, tx.init(params), grads)
jax.block_until_ready(p)
times = []
for _ in range(15):
    t = time.perf_counter()
    p, s = step(p, s, grads)
    jax.block_until_ready(p)
    times.append(time.perf_counter() - t)
print(json.dumps({"checkout": which, "kind": kind, "median_ms": round(1e3 * float(np.median(times)), 2)}))
