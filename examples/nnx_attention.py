"""Max-norm on a Flax NNX attention model, every unit the fan-in the model really uses (``nj.infer_views``).

Max-norm (Srebro & Shraibman 2005; with dropout, Srivastava et al. 2014) bounds the L2 norm of
every unit's incoming weight vector. Which slice of a leaf is "one unit" depends on how the
model reads it, and the default ``axis=None`` (all axes but the last: the fan-in of a Flax
``(in, out)`` kernel) is wrong for most leaves of an attention layer:

- ``nnx.MultiHeadAttention``'s query, key and value kernels are ``(d, heads, head_dim)``: each
  output unit ``(h, j)`` reads the ``d`` inputs, so its fan-in is ``W[:, h, j]``. The default
  reduces axes ``(0, 1)``: ``head_dim`` "units" each mixing every head, so every head is
  squeezed by the others' norms;
- an embedding table ``(vocab, d)`` is read one row per token (``torch.nn.Embedding(max_norm=...)``
  bounds rows); the default bounds its columns, one feature across the whole vocabulary.

``nj.infer_views`` traces the model once (``jax.make_jaxpr``; nothing runs) and reads each leaf's
role from the ops that consume it. With NNX the parameters are split off the module and merged
back inside the traced function; the rest of the state (here the RNG streams of the attention
dropout) is merged too, copied so that the dropout may advance its RNG count inside the trace::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    views = nj.infer_views(lambda p, ids: nnx.merge(graphdef, p, rest, copy=True)(ids), params, ids)
    tx = optax.chain(optax.adam(lr), nj.max_norm(c, views=views))

giving ``MatrixDims((0,), (1, 2))`` for the query/key/value kernels, ``MatrixDims((0, 1), (2,))``
for the output kernel ``(heads, head_dim, d)``, ``Embedding(row_axes=(0,))`` for the table,
``MatrixDims((0,), (1,))`` for the head and ``NotMatrix("bias")`` for every bias.

The task, generated in the script (no download): sequences of ``SEQ`` tokens drawn uniformly
from ``VOCAB``; the label says whether token 1 occurs more often than token 2. The model::

    Embed(VOCAB, D) -> x + MultiHeadAttention(HEADS heads, attention dropout 0.1) -> mean over
    positions -> Linear(D, 2)

(the attention is not essential to this task; the point is its parameters). It is trained twice,
same seed, data and Adam, with ``nj.max_norm(C, ...)`` last in the chain, in a jitted step over
the split state (``nnx.split``, ``jax.value_and_grad``, ``tx.update``; the model merged back
inside the loss):

- ``(a) inferred views``: ``views=views``;
- ``(b) default axis``: no views (``axis=None``).

It prints the inferred views with the units each choice bounds, then per run the test accuracy,
the fraction of units the last step clipped (from the transform's state, ``nj.NormState``, read
with ``optax.tree_utils.tree_get`` and ``nj.by_path``) and, per leaf, the largest fan-in norm
*measured through the model's own layers* (the Jacobian of ``attn.query`` etc. at its input, the
rows ``embed(ids)`` returns) next to the largest norm over the default's slices. The script
asserts that every fan-in of (a) is within ``C`` and that (b) bounds its own (default) slices,
and exits nonzero otherwise (in ``--quick`` mode too); it writes the tables to
``examples/out/nnx_attention.md`` (``--out`` to change).

What to expect (400 steps, deterministic up to float rounding): the task is easy and both runs
reach 100% test accuracy; the difference is in what they bound. (a) holds every fan-in, measured
through the layers, at most ``C = 1`` (the query/key/value default slices, each four head units,
then sit at 2 = sqrt(4)). (b) holds its own slices at ``C`` too, but that is another set: its
query/key/value units end inside the ball (largest fan-in 0.73-0.86: the four heads sharing a
default slice split its norm), and its embedding rows, never bounded, reach 2.82.

Run ``python examples/nnx_attention.py`` (about 20-30 seconds on a 2-core CPU), or add
``--quick`` (or set ``NORMJAX_QUICK=1``) for a smoke run of 80 steps.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import normjax as nj

from normjax import infer_views

# Batches and the command line, shared with the digits examples (examples/_digits.py).
from _digits import batches, markdown, parse_args, print_rows, standard_promotion

VOCAB = 16
SEQ = 16
D = 32
HEADS = 4
CLASSES = 2
N_TRAIN, N_TEST = 4096, 1024
BATCH = 128
STEPS = 400
QUICK_STEPS = 80
LEARNING_RATE = 3e-3
MAX_NORM = 1.0  # C
DROPOUT = 0.1
SEED = 0
RTOL = 1e-5

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "nnx_attention.md"


class Model(nnx.Module):
    """``Embed -> x + MultiHeadAttention(x) -> mean over positions -> Linear``."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=HEADS, in_features=D, qkv_features=D, dropout_rate=DROPOUT, deterministic=False,
            decode=False, rngs=rngs,
        )
        self.head = nnx.Linear(D, CLASSES, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        h = self.embed(ids)
        h = h + self.attn(h)
        return self.head(jnp.mean(h, axis=-2))


def make_data(seed: int):
    """``(ids, labels)`` train and test sets: label 1 iff token 1 occurs more often than token 2."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(N_TRAIN + N_TEST, SEQ), dtype=np.int32)
    labels = (np.sum(ids == 1, axis=1) > np.sum(ids == 2, axis=1)).astype(np.int32)
    return (ids[:N_TRAIN], labels[:N_TRAIN]), (ids[N_TRAIN:], labels[N_TRAIN:])


def new_model() -> Model:
    return Model(rngs=nnx.Rngs(params=SEED, dropout=SEED + 1))


def model_views(model: Model, ids: jax.Array):
    """Every parameter's view, read from the model applied to ``ids`` (a jaxpr; nothing runs).

    Shaped like ``nnx.split(model, nnx.Param, ...)[1]`` (each view inside an ``nnx.Param``),
    the params the training step below hands the optimizer.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # rest: the dropout RNG streams
    # copy=True: fresh Variables inside the trace. Without it the dropout's RngCount, created
    # outside, cannot be advanced inside jax.make_jaxpr (flax raises TraceContextError).
    return infer_views(lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x), params, ids)


def make_runs(views) -> dict[str, optax.GradientTransformation]:
    adam = standard_promotion(optax.adam(LEARNING_RATE))
    return {
        "(a) inferred views": optax.chain(adam, nj.max_norm(MAX_NORM, views=views)),
        "(b) default axis": optax.chain(adam, nj.max_norm(MAX_NORM)),
    }


def make_step(graphdef, tx: optax.GradientTransformation):
    """A jitted step over the split state: ``(params, rest, opt_state, x, y) -> (..., loss)``.

    Functional NNX (``nnx.split``/``nnx.merge``), which keeps the dropout RNG counts explicit.
    The same views work with ``nnx.Optimizer`` too (it hands ``tx.init`` wrapped params and
    ``tx.update`` pure ones; views are matched by path): ``tests/test_frameworks.py`` runs that.
    """

    @jax.jit
    def step(params, rest, opt_state, x, y):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
            return loss, nnx.split(model, nnx.Param, ...)[2]  # the advanced dropout RNG counts

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    return step


@nnx.jit
def accuracy(model: Model, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


@nnx.jit
def fan_in_norms(model: Model) -> dict[str, jax.Array]:
    """Every unit's fan-in norm as the model's own layers use it (no normjax, no axis choice).

    For a linear layer, the norm of the gradient of output unit ``i`` with respect to the
    layer's input is the norm of that unit's fan-in: the Jacobian of each projection at its
    input (biases drop out). For the embedding, each row ``embed(token)``.
    """
    attn = model.attn
    zeros_d = jnp.zeros((D,), jnp.float32)
    out = {}
    for name in ("query", "key", "value"):
        jac = jax.jacobian(lambda x, m=getattr(attn, name): m(x))(zeros_d)  # (heads, head_dim, D)
        out[f"attn/{name}/kernel"] = jnp.linalg.norm(jac, axis=-1)
    jac = jax.jacobian(attn.out)(jnp.zeros((HEADS, D // HEADS), jnp.float32))  # (D, heads, head_dim)
    out["attn/out/kernel"] = jnp.linalg.norm(jac.reshape(D, -1), axis=-1)
    out["embed/embedding"] = jnp.linalg.norm(model.embed(jnp.arange(VOCAB)), axis=-1)
    out["head/kernel"] = jnp.linalg.norm(jax.jacobian(model.head)(zeros_d), axis=-1)
    return out


def default_units(w: np.ndarray) -> np.ndarray:
    """The unit norms ``axis=None`` takes: reduce all axes but the last."""
    return np.sqrt(np.sum(np.square(np.asarray(w, np.float64)), axis=tuple(range(w.ndim - 1))))


def unit_description(view, shape: tuple[int, ...]) -> str:
    """``N units over axes ...`` for the fan-in a view says, in words."""
    if isinstance(view, nj.MatrixDims):
        ins = tuple(view.in_axes) if not isinstance(view.in_axes, int) else (view.in_axes,)
    elif isinstance(view, nj.Embedding):
        rows = (view.row_axes,) if isinstance(view.row_axes, int) else tuple(view.row_axes)
        ins = tuple(a for a in range(len(shape)) if a not in rows)
    else:
        return "-"
    n_units = int(np.prod([s for a, s in enumerate(shape) if a not in ins]))
    return f"{n_units} of axes {ins}"


def train(name: str, tx: optax.GradientTransformation, data, steps: int) -> dict:
    (x_train, y_train), (x_test, y_test) = data
    graphdef, params, rest = nnx.split(new_model(), nnx.Param, ...)
    opt_state = tx.init(params)
    step = make_step(graphdef, tx)
    bar = tqdm(batches(len(x_train), BATCH, steps, SEED), total=steps, desc=f"{name:>18}", ncols=100)
    for i, idx in enumerate(bar, start=1):
        params, rest, opt_state, loss = step(params, rest, opt_state, x_train[idx], y_train[idx])
        if i % 50 == 0 or i == steps:
            bar.set_postfix_str(f"loss {float(loss):.3f}", refresh=False)
    model = nnx.merge(graphdef, params, rest)
    eval_model = nnx.view(model, deterministic=True)  # dropout off, same weights
    # The transform's state is shaped like the params; nj.by_path keys it "attn/query/kernel".
    clipped = nj.by_path(optax.tree_utils.tree_get(opt_state, "clipped_fraction"))
    params = nj.by_path(params)
    fan_in = jax.device_get(fan_in_norms(model))
    return {
        "test_acc": float(accuracy(eval_model, x_test, y_test)),
        "fan_in": {k: float(np.max(v)) for k, v in fan_in.items()},
        "default": {k: float(np.max(default_units(np.asarray(params[k])))) for k in fan_in},
        "clipped": {k: float(v) for k, v in clipped.items()},
    }


EXPECTED = {
    "attn/query/kernel": nj.MatrixDims((0,), (1, 2)),
    "attn/key/kernel": nj.MatrixDims((0,), (1, 2)),
    "attn/value/kernel": nj.MatrixDims((0,), (1, 2)),
    "attn/out/kernel": nj.MatrixDims((0, 1), (2,)),
    "embed/embedding": nj.Embedding((0,)),
    "head/kernel": nj.MatrixDims((0,), (1,)),
}


def checks(views: dict, results: dict[str, dict]) -> list[str]:
    lines, failed = [], []
    wrong = {k: views[k] for k, v in EXPECTED.items() if views[k] != v}
    wrong |= {k: v for k, v in views.items() if k.endswith("/bias") and v != nj.NotMatrix("bias")}
    lines.append("inferred views as expected (q/k/v MatrixDims((0,), (1, 2)), out MatrixDims((0, 1), (2,)), "
                 "Embedding((0,)), head MatrixDims((0,), (1,)), biases NotMatrix): "
                 + ("yes" if not wrong else f"NO: {wrong}"))
    failed += ["views"] if wrong else []
    a, b = results["(a) inferred views"], results["(b) default axis"]
    worst_a = max(a["fan_in"].values())
    ok_a = worst_a <= MAX_NORM * (1 + RTOL)
    lines.append(f"(a) inferred views: largest fan-in norm measured through the layers {worst_a:.4f} "
                 f"<= C = {MAX_NORM:g}: "
                 + ("yes" if ok_a else "NO"))
    failed += [] if ok_a else ["(a)"]
    worst_b = max(b["default"].values())
    ok_b = worst_b <= MAX_NORM * (1 + RTOL)
    lines.append(f"(b) default axis: largest norm over its own slices {worst_b:.4f} <= C: " + ("yes" if ok_b else "NO")
                 + f"; largest true fan-in {max(b['fan_in'].values()):.4f} (embedding rows "
                 f"{b['fan_in']['embed/embedding']:.4f}, query units {b['fan_in']['attn/query/kernel']:.4f})")
    failed += [] if ok_b else ["(b)"]
    if failed:
        for line in lines:
            print(line)
        raise SystemExit(f"nnx_attention: check failed for {', '.join(failed)}")
    return lines


def main(argv: list[str] | None = None) -> None:
    steps, out = parse_args(__doc__, STEPS, QUICK_STEPS, DEFAULT_OUT, argv, out_help="the markdown file to write")
    data = make_data(SEED)
    model = new_model()
    view_tree = model_views(model, data[0][0][:BATCH])  # shaped like nnx.state(model, nnx.Param)
    views = nj.by_path(view_tree)
    shapes = {k: tuple(v.shape) for k, v in nj.by_path(nnx.state(model, nnx.Param)).items()}

    view_rows = [("leaf", "shape", "inferred view", "units (views)", "units (axis=None)")]
    for k, shape in shapes.items():
        if k.endswith("/bias"):
            view_rows.append((k, str(shape), repr(views[k]), "-", "- (named bias)"))
            continue
        view_rows.append((k, str(shape), repr(views[k]), unit_description(views[k], shape),
                          f"{shape[-1]} of axes {tuple(range(len(shape) - 1))}"))
    print("What nj.infer_views read from the NNX model, and the units max-norm bounds with and without it:\n")
    print_rows(view_rows, left=5)
    print()

    results = {name: train(name, tx, data, steps) for name, tx in make_runs(view_tree).items()}
    lines = checks(views, results)

    summary = [("run", "test acc", "max fan-in norm", "max default-slice norm", "C")]
    for name, r in results.items():
        summary.append((name, f"{r['test_acc']:.1%}", f"{max(r['fan_in'].values()):.4f}",
                        f"{max(r['default'].values()):.4f}", f"{MAX_NORM:g}"))
    per_leaf = [("parameter", "max fan-in norm", "max default-slice norm", "clipped % last step")]
    for name, r in results.items():
        for k in EXPECTED:
            per_leaf.append((f"{name}: {k}", f"{r['fan_in'][k]:.4f}", f"{r['default'][k]:.4f}",
                             f"{r['clipped'][k]:.0%}".rstrip("%") if k in r["clipped"] else "-"))
    legend = f"""\
max fan-in norm         largest L2 norm of one unit's incoming weights, measured through the model's own layer
                        (Jacobian of attn.query/key/value/out and head at their input; rows of embed(ids))
max default-slice norm  largest L2 norm over the slices axis=None reduces (all axes but the last)
clipped % last step     % of the leaf's units (in that run's own sense) the last step's max-norm projection
                        moved: nj.by_path(optax.tree_utils.tree_get(opt_state, "clipped_fraction"))
C                       the max-norm radius, {MAX_NORM:g}"""
    print()
    print_rows(summary)
    print()
    print_rows(per_leaf)
    print()
    print(legend)
    print()
    for line in lines:
        print(line)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# nnx_attention: max-norm with inferred views vs the default axis ({steps} steps)\n\n"
        + markdown(view_rows) + "\n\n" + markdown(summary) + "\n\n" + markdown(per_leaf) + "\n\n```\n" + legend
        + "\n```\n\n" + "\n\n".join(lines) + "\n"
    )
    print(f"\ntables written to {out}")


if __name__ == "__main__":
    main()
