"""Compile the update steps for a TPU v5e chip on a CPU-only machine (marker ``tpu_aot``).

With libtpu installed, ``jax.experimental.topologies.get_topology_desc`` describes a TPU
topology without a TPU: ``jax.jit(step).lower(*abstract).compile()`` then runs the whole TPU
compiler on abstract inputs whose sharding names one of its compile-only devices. Each step
(Adam + one constraint, or a projection alone) compiles for one v5e chip, and:

- its optimized HLO has no ``f64`` (a float64 constant or upcast would be slow or refused);
- the matmul-only modes (and the power/Gram estimators) call no SVD, eigh or QR: no custom
  call whose target names one, neither in the lowered StableHLO (``@Qr``, ``@Eigh``, LAPACK
  targets) nor in the optimized HLO; the SVD reference is the positive control;
- in those steps every ``dot_general`` of the lowered StableHLO asks for
  ``precision = [HIGHEST, HIGHEST]`` (Adam and max-norm have none, so every dot of a spectral
  step is the constraint's) and the optimized HLO keeps ``operand_precision={highest,highest}``
  on each matrix product (a ``convolution`` for XLA:TPU); a plain ``x @ x.T`` is the negative
  control.

``make tpu-check`` installs libtpu (the version ``jax[tpu]`` pins) into ``.venv/libtpu-aot``,
outside site-packages, and runs this module (about 3 minutes on 2 shared cores) and
``benchmarks/tpu_aot.py`` (the same steps at GPT-2 size, with compile time and memory).
libtpu is found as jax finds it: ``TPU_LIBRARY_PATH``, else an importable ``libtpu``
(``pip install 'jax[tpu]'``); without either the module skips, as in ``make test`` and
``.ci/run``. Only one process can load libtpu at a time (``/tmp/libtpu_lockfile``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import pytest

# full XLA optimisation, as users compile: the root conftest.py turns most of it off for the
# rest of the session (tests/conftest.py: full_optimization)
pytestmark = [pytest.mark.tpu_aot, pytest.mark.usefixtures("full_optimization")]


def libtpu_path() -> str | None:
    """Where jax will load libtpu from (``jax._src.cloud_tpu_init.get_tpu_library_path``)."""
    env = os.environ.get("TPU_LIBRARY_PATH")
    if env and os.path.isfile(env):
        return env
    spec = importlib.util.find_spec("libtpu")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "libtpu.so")
        if os.path.isfile(path):
            return path
    return None


if libtpu_path() is None:
    pytest.skip(
        "libtpu is not installed (`make tpu-check` installs it, or pip install 'jax[tpu]')",
        allow_module_level=True,
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import normjax as nj  # noqa: E402

TOPOLOGY = "v5e:2x2"
# A decomposition in a custom call's target: LAPACK (lapack_sgesdd_ffi, ...), cuSOLVER, and what
# the SVD step lowers to for TPU (the positive control below): StableHLO custom calls @Qr,
# @ProductOfElementaryHouseholderReflectors and @Eigh (libtpu 0.0.42), optimized HLO custom
# calls EighTpu, QrDecompositionBlock, CompactWyHelper, Cholesky, InvertDiagBlocksLowerTriangular.
DECOMPOSITION = re.compile(r"svd|gesdd|gesvd|eig|qr|geqrf|householder|lapack|solver|jacobi|cholesky|potrf", re.I)
STABLEHLO_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call\s+@([\w.$-]+)")
HLO_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
# The decompositions XLA also has as ops (not custom calls).
DECOMPOSITION_OPS = re.compile(r"stablehlo\.(cholesky|triangular_solve)\b|\s(cholesky|triangular-solve)\(")
F64 = re.compile(r"\bf64\b")


def small_params():
    """Fewer, smaller leaves than the benchmark's GPT-2 tree: two kernels, a bias, a stack."""
    return {
        "fc": {"kernel": jnp.zeros((128, 512), jnp.float32), "bias": jnp.zeros((512,), jnp.float32)},
        "proj": {"kernel": jnp.zeros((512, 128), jnp.float32)},
        "stacked": jnp.zeros((3, 128, 128), jnp.float32),  # (L, in, out): one sigma per layer
    }


DIMS = {"stacked": nj.MatrixDims(1, 2)}

# name -> (constraint or None, matmul-only: no decomposition allowed, has estimator dots)
STEPS = {
    "adam": (lambda: None, True, False),
    "max_norm": (lambda: nj.max_norm(3.0), True, False),
    "power rescale": (lambda: nj.spectral_norm(1.0, dims=DIMS), True, True),
    "gram rescale": (lambda: nj.spectral_norm(1.0, estimator="gram", dims=DIMS), True, True),
    "matmul clip": (lambda: nj.spectral_norm(1.0, estimator="matmul", mode="clip", dims=DIMS), True, True),
    "matmul orthogonalize": (
        lambda: nj.spectral_norm(1.0, estimator="matmul", mode="orthogonalize", dims=DIMS), True, True),
    "gram soft_cap": (lambda: nj.spectral_norm(1.0, estimator="gram", mode="soft_cap", dims=DIMS), True, True),
    "power hammer": (lambda: nj.spectral_norm(1.0, estimator="power", mode="hammer", dims=DIMS), True, True),
    "matmul clip certify": (
        lambda: nj.spectral_norm(1.0, estimator="matmul", mode="clip", certify=True, dims=DIMS), True, True),
    "project matmul clip": (None, True, True),
    "svd clip (reference)": (lambda: nj.spectral_norm(1.0, estimator="svd", mode="clip", dims=DIMS), False, True),
}


@functools.cache
def chip_sharding() -> NamedSharding:
    """Replicated on one chip of a compile-only v5e topology (cached: libtpu loads once)."""
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY)
    except Exception as e:  # e.g. another process holds /tmp/libtpu_lockfile
        pytest.skip(f"libtpu at {libtpu_path()} cannot describe a {TOPOLOGY} topology: {e}")
    return NamedSharding(Mesh(np.array(topo.devices[:1]), ("chip",)), PartitionSpec())


def abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=sharding), tree)


@functools.cache
def lowered_and_compiled(name: str):
    """(StableHLO text, optimized TPU HLO text) of one step, compiled once per session."""
    sharding = chip_sharding()
    params = small_params()
    make, _, _ = STEPS[name]
    if make is None:  # the projection alone
        fn = jax.jit(lambda p: nj.project_spectral_norm(p, 1.0, estimator="matmul", dims=DIMS))
        args = (abstract(params, sharding),)
    else:
        constraint = make()
        tx = optax.adam(1e-3) if constraint is None else optax.chain(optax.adam(1e-3), constraint)
        state = jax.eval_shape(tx.init, params)

        def step(p, g, s):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        fn = jax.jit(step)
        args = (abstract(params, sharding), abstract(params, sharding), abstract(state, sharding))
    with jax.numpy_dtype_promotion("standard"):  # optax.adam's int32 step count
        lowered = fn.lower(*args)
    compiled = lowered.compile()
    return lowered.as_text(), compiled.as_text()


def test_topology_is_v5e():
    device = chip_sharding().mesh.devices.flat[0]
    assert device.platform == "tpu"
    assert "v5" in device.device_kind.lower() and "lite" in device.device_kind.lower(), device.device_kind


@pytest.mark.parametrize("name", list(STEPS))
def test_compiles_without_float64(name):
    stablehlo, hlo = lowered_and_compiled(name)
    assert "ENTRY" in hlo
    assert not F64.search(hlo), [line for line in hlo.splitlines() if F64.search(line)][:5]
    assert "xf64>" not in stablehlo and "tensor<f64>" not in stablehlo


@pytest.mark.parametrize("name", [n for n, (_, matmul_only, _) in STEPS.items() if matmul_only])
def test_no_svd_eigh_qr(name):
    stablehlo, hlo = lowered_and_compiled(name)
    targets = STABLEHLO_CUSTOM_CALL.findall(stablehlo) + HLO_CUSTOM_CALL.findall(hlo)
    assert not [t for t in targets if DECOMPOSITION.search(t)], sorted(set(targets))
    assert not DECOMPOSITION_OPS.search(stablehlo) and not DECOMPOSITION_OPS.search(hlo)


def test_svd_reference_is_seen_as_a_decomposition():
    """The positive control: the SVD step lowers to decomposition custom calls, which the
    check above would catch."""
    stablehlo, hlo = lowered_and_compiled("svd clip (reference)")
    targets = STABLEHLO_CUSTOM_CALL.findall(stablehlo) + HLO_CUSTOM_CALL.findall(hlo)
    assert [t for t in targets if DECOMPOSITION.search(t)], sorted(set(targets))


def dot_lines(stablehlo: str, hlo: str) -> tuple[list[str], list[str]]:
    """The StableHLO ``dot_general``s; the TPU HLO's dots and convolutions (fused ones included:
    XLA:TPU emits a matrix product as a ``convolution``)."""
    return ([line for line in stablehlo.splitlines() if "stablehlo.dot_general" in line],
            [line for line in hlo.splitlines() if re.search(r"\s(dot|convolution)\(", line)])


def test_precision_check_sees_a_default_precision_matmul():
    """The negative control: a plain ``x @ x.T`` neither asks for nor gets HIGHEST."""
    sharding = chip_sharding()
    x = jax.ShapeDtypeStruct((128, 512), jnp.float32, sharding=sharding)
    lowered = jax.jit(lambda x: x @ x.T).lower(x)
    dots, ops = dot_lines(lowered.as_text(), lowered.compile().as_text())
    assert dots and not any("HIGHEST" in line for line in dots)
    assert ops and not any("operand_precision={highest,highest}" in line for line in ops)


@pytest.mark.parametrize("name", [n for n, (_, matmul_only, _) in STEPS.items() if matmul_only])
def test_dots_at_highest_precision(name):
    stablehlo, hlo = lowered_and_compiled(name)
    _, _, has_dots = STEPS[name]
    dots, ops = dot_lines(stablehlo, hlo)
    if not has_dots:
        assert not dots  # Adam and max-norm alone: no matmul
        return
    assert dots
    low = [line.strip() for line in dots if "precision = [HIGHEST, HIGHEST]" not in line]
    assert not low, low[:3]
    # The TPU compiler keeps the request on every matrix product it emits (a default-precision
    # f32 matmul is one bf16 pass). Matrix-vector products (the power iteration's) may become
    # an f32 multiply + reduce instead, which has no precision to lose.
    assert ops
    low = [line.strip() for line in ops if "operand_precision={highest,highest}" not in line]
    assert not low, low[:3]
