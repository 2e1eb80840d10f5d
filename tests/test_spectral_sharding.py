"""Sharding: the spectral-norm constraints keep every input's sharding and match one device.

A (2, 4) mesh ("data", "model") of the 8 CPU devices the root conftest.py fakes, with both
auto (GSPMD) and explicit axis types, as in tests/test_sharding.py. Every function runs under
``jax.jit``, as a user's training step does. The compiled HLO shows the two regimes the
design promises: power iteration runs on the sharded matrix (its contractions over sharded
axes become all-reduces of vectors and scalars, the matrix never moves), while the SVD paths
gather the whole matrix on purpose and shard the result back.
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import normjax as nj

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason=f"needs 8 devices for a (2, 4) mesh, found {jax.device_count()} "
    "(the root conftest.py fakes 8 CPU devices unless JAX_PLATFORMS selects another backend)",
)

# Sharded vs one device: the same float32 maths with partial sums added in another order
# (all-reduces), so only rounding differs. Measured on these data (jax 0.10.2, CPU): power
# iteration and Gram at most 7.2e-7 absolute (sigma ~1.7, u entries ~0.2); the SVD paths bit
# for bit, since LAPACK runs on the gathered, identical matrix. Not asserted exactly: another
# backend may gather into another layout.
TOL = dict(rtol=1e-5, atol=1e-6)
C = 1.0  # max_value everywhere
AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
STACK = nj.MatrixDims(-2, -1)  # (layers, in, out): one sigma per layer


@functools.cache
def _mesh(axis_type: str) -> jax.sharding.Mesh:
    t = AXIS_TYPES[axis_type]
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(t, t), devices=jax.devices()[:8])


@pytest.fixture(params=["auto", "explicit"])
def mesh(request):
    return _mesh(request.param)


def _dense(shape, seed):
    """Gaussian (rows, cols) kernel with sigma_max ~1.7 and sigma_min ~0.3: c = 1 cuts through it."""
    return (np.random.default_rng(seed).normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)


def _stacked(shape, seed):
    """(4, in, out): layers 0 and 3 inside the unit ball (sigma ~0.5, ~0.85), 1 and 2 outside."""
    w = np.random.default_rng(seed).normal(size=shape) / np.sqrt(shape[-1])
    return (w * np.array([0.3, 1.0, 2.0, 0.5])[:, None, None]).astype(np.float32)


# name: (shape, dims, data, partition specs). Each spec splits the matrix view differently:
# rows only, columns only, both, batch only, batch and rows, batch and columns.
CASES = {
    # two layouts each (2-D split; one axis split), times auto and explicit meshes: what a third
    # layout added was compile time (the single-axis splits of both kinds are covered here and
    # by test_explicit_mesh_entry_point_traces_and_keeps_sharding)
    "dense": ((64, 32), None, _dense, [P("data", "model"), P(None, "model")]),
    "stacked": (
        (4, 16, 32),
        STACK,
        _stacked,
        [P("data", None, "model"), P("model", None, None)],
    ),
}
CASE_IDS = [(name, spec) for name, (_, _, _, specs) in CASES.items() for spec in specs]


def _id(case):
    name, spec = case
    return f"{name}-{','.join(str(s) for s in spec)}"


def _put(x, mesh, spec):
    return jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))


def _single(x):
    return jax.device_put(jnp.asarray(x), jax.devices()[0])


def _np(tree):
    return jax.tree.map(np.asarray, tree)


# --------------------------------------------------------------------------------------------
# Pure functions: projections and the three estimators.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="dims")
def _pure_all(w, u0, dims):
    """Every spectral pure function on one kernel (one compile per case, spec and mesh)."""
    params = {"layer": {"kernel": w}}
    out = {
        f"project_{m}": nj.project_spectral_norm(params, C, mode=m, dims=dims)["layer"]["kernel"]
        for m in ("clip", "rescale", "normalize")
    }
    out["power_unrolled"] = nj.sigma_power(w, u0, num_iters=2, dims=dims)  # (sigma, u), Python loop
    out["power_fori"] = nj.sigma_power(w, u0, num_iters=8, dims=dims)  # (sigma, u), lax.fori_loop
    out["gram"] = nj.sigma_gram(w, num_iters=6, dims=dims)
    out["svd"] = nj.sigma_svd(w, dims=dims)
    return out


def _u0(name):
    shape, dims, make, _ = CASES[name]
    return nj.init_power_vector(jax.random.key(7), make(shape, 0), dims)


@functools.cache
def _pure_reference(name):
    shape, dims, make, _ = CASES[name]
    return _np(_pure_all(_single(make(shape, 0)), _single(_u0(name)), dims=dims))


@pytest.mark.parametrize("case", CASE_IDS, ids=_id)
def test_pure_functions_keep_sharding_and_match_one_device(mesh, case):
    name, spec = case
    shape, dims, make, _ = CASES[name]
    x = _put(make(shape, 0), mesh, spec)
    assert x.addressable_shards[0].data.shape != shape  # really split
    with jax.set_mesh(mesh):
        out = _pure_all(x, _u0(name), dims=dims)
    for mode in ("clip", "rescale", "normalize"):
        o = out[f"project_{mode}"]
        assert o.dtype == x.dtype and o.shape == x.shape
        assert o.sharding.is_equivalent_to(x.sharding, x.ndim), f"{mode}: {o.sharding} != {x.sharding}"
    reference = _pure_reference(name)
    chex.assert_trees_all_close(_np(out), reference, **TOL, custom_message=f"{name} {spec}")
    # not vacuous: every mode moved some matrix, and the stack also holds matrices left alone
    sigma = reference["svd"]
    assert np.any(sigma > C)
    if name == "stacked":
        assert np.any(sigma < C)
        inside = sigma < C
        np.testing.assert_array_equal(np.asarray(out["project_clip"])[inside], make(shape, 0)[inside])
        np.testing.assert_array_equal(np.asarray(out["project_rescale"])[inside], make(shape, 0)[inside])


# --------------------------------------------------------------------------------------------
# The transform inside optax.chain, one training step under jax.jit.
# --------------------------------------------------------------------------------------------

# (estimator, mode, num_iters): every estimator, every mode, both power-iteration code paths
CHAIN_SPECS = {
    "power_rescale": ("power", "rescale", None),
    "power_normalize_x2": ("power", "normalize", 2),
    "gram_rescale": ("gram", "rescale", None),
    "svd_clip": ("svd", "clip", None),
    "svd_rescale": ("svd", "rescale", None),
}


@functools.cache
def _chains(name):
    dims = CASES[name][1]
    return {
        key: optax.chain(optax.sgd(0.1), nj.spectral_norm(C, estimator=e, mode=m, num_iters=n, dims=dims))
        for key, (e, m, n) in CHAIN_SPECS.items()
    }


@functools.partial(jax.jit, static_argnames="name")
def _step_all(params, grads, states, name):
    out = {}
    for key, tx in _chains(name).items():
        updates, state = tx.update(grads, states[key], params)
        out[key] = (optax.apply_updates(params, updates), state)
    return out


def _inputs(name, put):
    shape, _, make, _ = CASES[name]
    params = {"layer": {"kernel": put(make(shape, 0)), "bias": put(np.linspace(-1, 1, shape[-1], dtype=np.float32))}}
    grads = {"layer": {"kernel": put(make(shape, 1)), "bias": put(np.ones(shape[-1], np.float32))}}
    states = {key: tx.init(params) for key, tx in _chains(name).items()}  # eager, as a user does
    return params, grads, states


@functools.cache
def _transform_reference(name):
    return _np(_step_all(*_inputs(name, _single), name=name))


@pytest.mark.parametrize("case", CASE_IDS, ids=_id)
def test_transform_step_keeps_sharding_and_matches_one_device(mesh, case):
    name, spec = case
    bias_spec = P(spec[-1])  # the bias follows the kernel's output axis
    put = lambda v: _put(v, mesh, spec if v.ndim > 1 else bias_spec)
    with jax.set_mesh(mesh):  # explicit axis types need a mesh context to create arrays
        params, grads, states = _inputs(name, put)
        out = _step_all(params, grads, states, name=name)
    reference = _transform_reference(name)
    kernel = params["layer"]["kernel"]
    for key, (new_params, state) in out.items():
        for new, old in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
            assert new.sharding.is_equivalent_to(old.sharding, old.ndim), f"{key}: {new.sharding} != {old.sharding}"
        _, sn = state
        assert isinstance(sn, nj.SpectralNormState)
        assert set(nj.by_path(sn.sigma)) == {"layer/kernel"}
        assert set(nj.by_path(sn.u)) == ({"layer/kernel"} if key.startswith("power") else set())
        for path, u in nj.by_path(sn.u).items():
            u_in = nj.by_path(states[key][1].u)[path]
            assert u.shape == u_in.shape and u.dtype == u_in.dtype == jnp.float32
            assert u.sharding.is_equivalent_to(u_in.sharding, u.ndim), f"{key}: u {u.sharding} != {u_in.sharding}"
        s = nj.by_path(sn.sigma)["layer/kernel"]
        assert s.dtype == jnp.float32 and s.shape == kernel.shape[:-2]  # one sigma per layer
        # the step moved some matrix (not vacuous)
        assert np.any(np.asarray(s) > C), (key, s)
    # values: params and both SpectralNormState fields (u and sigma) equal the one-device run
    chex.assert_trees_all_close(_np(out), reference, **TOL, custom_message=f"{name} {spec}")


# --------------------------------------------------------------------------------------------
# Explicit axis types (jax.make_mesh's default): each entry point on its own, traced only, so
# one failing path does not hide another (the tests above run them all in one program).
# --------------------------------------------------------------------------------------------


def _power(num_iters, dims):
    return lambda w: nj.sigma_power(w, nj.init_power_vector(jax.random.key(0), w, dims), num_iters=num_iters, dims=dims)


def _tx_step(estimator, mode="rescale", dims=None):
    tx = nj.spectral_norm(C, estimator=estimator, mode=mode, dims=dims)
    return lambda w: tx.update({"k": w}, tx.init({"k": w}), {"k": w})


ENTRY_POINTS = {
    "project_clip": lambda dims: lambda w: nj.project_spectral_norm({"k": w}, C, mode="clip", dims=dims),
    "project_rescale": lambda dims: lambda w: nj.project_spectral_norm({"k": w}, C, mode="rescale", dims=dims),
    "project_normalize": lambda dims: lambda w: nj.project_spectral_norm({"k": w}, C, mode="normalize", dims=dims),
    "sigma_svd": lambda dims: lambda w: nj.sigma_svd(w, dims=dims),
    "sigma_gram": lambda dims: lambda w: nj.sigma_gram(w, dims=dims),
    "sigma_power_unrolled": lambda dims: _power(2, dims),  # Python loop
    "sigma_power_fori": lambda dims: _power(8, dims),  # lax.fori_loop
    "spectral_norm_power": lambda dims: _tx_step("power", dims=dims),  # init runs 30 power iterations
    "spectral_norm_gram": lambda dims: _tx_step("gram", dims=dims),
    "spectral_norm_svd_clip": lambda dims: _tx_step("svd", "clip", dims=dims),
}
# both axes of a matrix sharded; and the batch axis only, where no contraction is sharded
EXPLICIT_CASES = [("dense", P("data", "model")), ("stacked", P("model", None, None))]


@pytest.mark.parametrize("case", EXPLICIT_CASES, ids=_id)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_explicit_mesh_entry_point_traces_and_keeps_sharding(entry, case):
    mesh = _mesh("explicit")
    name, spec = case
    shape, dims, make, _ = CASES[name]
    x = _put(make(shape, 0), mesh, spec)
    with jax.set_mesh(mesh):
        out = jax.eval_shape(ENTRY_POINTS[entry](dims), x)  # traces; under explicit axes avals carry shardings
    full = lambda spec, n: tuple(spec) + (None,) * (n - len(spec))
    for leaf in jax.tree.leaves(out):  # abstract-mesh shardings: compare the specs
        if leaf.shape == x.shape:
            assert full(leaf.sharding.spec, x.ndim) == full(spec, x.ndim), f"{entry}: {leaf.sharding.spec} != {spec}"


@pytest.mark.parametrize("case", [("dense", P("data", "model")), ("stacked", P("model", "data", None))], ids=_id)
def test_explicit_arrays_without_a_mesh_context(case):
    """Arrays put on an explicit mesh, then passed to a jitted step with no ``jax.set_mesh``:
    the estimators take the mesh from the arrays' types, and values match one device."""
    name, spec = case
    mesh = _mesh("explicit")
    shape, dims, make, _ = CASES[name]
    w = make(shape, 0)
    sharded = _np(_pure_all(_put(w, mesh, spec), _u0(name), dims=dims))
    chex.assert_trees_all_close(sharded, _pure_reference(name), **TOL)
    tx = nj.spectral_norm(C, estimator="power", dims=dims)
    params = {"k": _put(w, mesh, spec)}
    state = tx.init(params)
    new, state = jax.jit(lambda p, s: tx.update(jax.tree.map(lambda x: x * 0.5, p), s, p))(params, state)
    assert new["k"].sharding.is_equivalent_to(params["k"].sharding, len(shape))
    assert np.all(np.isfinite(np.asarray(nj.by_path(state.sigma)["k"])))


# --------------------------------------------------------------------------------------------
# Compiled HLO: what moves between devices, and how big it is.
# --------------------------------------------------------------------------------------------

_COLLECTIVE = re.compile(
    r"=\s*(?P<type>.+?)\s+(?P<op>all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)(?:-start)?\("
)
_SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")
_SVD_CALL = re.compile(r"custom-call\(.*custom_call_target=\"[^\"]*(?:gesdd|gesvd|gesvdj|svd)[^\"]*\"", re.I)


def _numel(type_text):
    """Elements of the largest array in an HLO result type (``f32[1,256,128]{2,0,1}`` or a tuple)."""
    sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(type_text)]
    return max(sizes, default=0)


def _collectives(txt):
    """``[(op, result type, elements)]`` for every collective instruction in compiled HLO text."""
    out = []
    for line in txt.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            out.append((m["op"], m["type"].strip(), _numel(m["type"])))
    return out


def _compiled(f, mesh, *args):
    with jax.set_mesh(mesh):
        return jax.jit(f).lower(*args).compile()


def _assert_matrix_stays_put(txt, shape):
    """All-reduces happen, and no collective carries more than a vector of the matrix."""
    found = _collectives(txt)
    vector = max(shape)
    big = [c for c in found if c[2] > vector]
    assert not big, f"the sharded {shape} matrix was gathered (collectives over {vector} elements): {big}"
    assert any(op == "all-reduce" for op, _, _ in found), f"expected an all-reduce, collectives: {found}"


HLO_SHAPE = (256, 128)
HLO_SPECS = [P("model", None), P("data", "model")]


def _hlo_input(mesh, spec):
    return _put(_dense(HLO_SHAPE, 3), mesh, spec)


def _power_step():
    tx = optax.chain(optax.sgd(0.1), nj.spectral_norm(C, estimator="power", mode="rescale"))

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return tx, step


@pytest.mark.parametrize("spec", HLO_SPECS, ids=str)
def test_hlo_power_iteration_never_gathers_the_matrix(mesh, spec):
    x = _hlo_input(mesh, spec)
    u0 = nj.init_power_vector(jax.random.key(0), x)
    compiled = _compiled(lambda w, u: nj.sigma_power(w, u, num_iters=2), mesh, x, u0)
    _assert_matrix_stays_put(compiled.as_text(), HLO_SHAPE)


@pytest.mark.parametrize("spec", HLO_SPECS, ids=str)
def test_hlo_power_transform_step_never_gathers_the_matrix(mesh, spec):
    x = _hlo_input(mesh, spec)
    params, grads = {"w": x}, {"w": _put(_dense(HLO_SHAPE, 4), mesh, spec)}
    tx, step = _power_step()
    with jax.set_mesh(mesh):
        state = tx.init(params)
    compiled = _compiled(step, mesh, params, grads, state)
    _assert_matrix_stays_put(compiled.as_text(), HLO_SHAPE)
    with jax.set_mesh(mesh):
        new_params, _ = compiled(params, grads, state)
    assert new_params["w"].sharding.is_equivalent_to(x.sharding, x.ndim)


def _assert_gathers_whole_matrix(compiled, x):
    txt = compiled.as_text()
    found = _collectives(txt)
    whole = [c for c in found if c[0] == "all-gather" and c[2] == x.size]
    assert whole, f"expected an all-gather of the whole {x.shape} matrix, collectives: {found}"
    svd_calls = [line for line in txt.splitlines() if _SVD_CALL.search(line)]
    assert svd_calls, "no SVD custom call in the compiled HLO"
    for line in svd_calls:  # the SVD's operand is the full matrix on every device
        operand = re.search(r"operand_layout_constraints=\{(.+?\})\}", line)
        assert operand and _numel(operand[1]) == x.size, line[:300]
    for s in jax.tree.leaves(compiled.output_shardings)[:1]:  # the projected matrix: sharded back
        assert s.is_equivalent_to(x.sharding, x.ndim), f"{s} != {x.sharding}"


@pytest.mark.parametrize("spec", HLO_SPECS, ids=str)
def test_hlo_svd_paths_gather_and_shard_back(mesh, spec):
    # Compiled, not run: jaxlib 0.10.2's CPU SVD kernel (lapack_sgesdd_ffi -> ParallelBatchMap)
    # blocks intra-op pool threads waiting for work queued on the same pool, so eight faked
    # devices running a (256, 128) SVD at once can deadlock. The values and the run-time
    # sharding of the SVD paths are checked on smaller kernels above.
    x = _hlo_input(mesh, spec)
    clip = lambda w: nj.project_spectral_norm({"w": w}, C)["w"]
    _assert_gathers_whole_matrix(_compiled(clip, mesh, x), x)

    tx = optax.chain(optax.sgd(0.1), nj.spectral_norm(C, estimator="svd", mode="clip"))
    params, grads = {"w": x}, {"w": _put(_dense(HLO_SHAPE, 4), mesh, spec)}
    with jax.set_mesh(mesh):
        state = tx.init(params)

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    _assert_gathers_whole_matrix(_compiled(step, mesh, params, grads, state), x)


def test_hlo_checks_are_meaningful():
    """Positive controls: each HLO assertion above can fail, and the shape parsing is right."""
    mesh = _mesh("auto")  # about the string matching, not the library: one mesh is enough
    x = _hlo_input(mesh, P("model", None))
    # 1. the SVD path's text fails the no-gather check, which names the gathered matrix
    txt = _compiled(lambda w: nj.project_spectral_norm({"w": w}, C)["w"], mesh, x).as_text()
    with pytest.raises(AssertionError, match=r"was gathered.*all-gather.*f32\[1,256,128\]"):
        _assert_matrix_stays_put(txt, HLO_SHAPE)
    # 2. a gather of a small vector is parsed with its own size, and allowed
    v = _put(np.arange(128, dtype=np.float32), mesh, P("model"))
    vtxt = jax.jit(lambda v: v * 2, out_shardings=NamedSharding(mesh, P())).lower(v).compile().as_text()
    assert [(op, n) for op, _, n in _collectives(vtxt)] == [("all-gather", 128)], _collectives(vtxt)
    # 3. a matrix-sized all-gather (the output wanted whole on every device) is caught
    wtxt = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(mesh, P())).lower(x).compile().as_text()
    assert [(op, n) for op, _, n in _collectives(wtxt)] == [("all-gather", x.size)], _collectives(wtxt)
    with pytest.raises(AssertionError, match="was gathered"):
        _assert_matrix_stays_put(wtxt, HLO_SHAPE)
    # 4. "all-reduce" is not always there: a replicated matrix needs no collective at all
    xr = _put(np.asarray(x), mesh, P())
    u0 = nj.init_power_vector(jax.random.key(0), xr)
    with pytest.raises(AssertionError, match="expected an all-reduce"):
        _assert_matrix_stays_put(_compiled(lambda w, u: nj.sigma_power(w, u), mesh, xr, u0).as_text(), HLO_SHAPE)
    # 5. the SVD-path check fails on the power path, which gathers nothing
    xs = _hlo_input(mesh, P("data", "model"))
    with pytest.raises(AssertionError, match="expected an all-gather of the whole"):
        _assert_gathers_whole_matrix(_compiled(lambda w, u: nj.sigma_power(w, u), mesh, xs, u0), xs)
