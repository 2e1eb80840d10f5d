"""Set once for every test and doctest: 8 faked CPU devices, strict dtype promotion, and cheap
(unoptimised) XLA code generation."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's time is almost all XLA compilation. JAX_DISABLE_MOST_OPTIMIZATIONS compiles with
# LLVM at -O0 and without its expensive passes (xla_backend_optimization_level=0, what
# test_conv.py's quick_jit asked for): 5-20% less time per file. It does not change XLA's HLO
# passes (fusion, SPMD partitioning, collectives: the compiled HLO text the HLO-inspecting tests
# read is identical, checked on a sharded spectral step) nor turn on fast-math; only how fast
# the generated code runs (no test here times anything). Set in os.environ, so that
# test_multiprocess.py's workers inherit it; tests/test_examples.py turns it off for the
# examples, which train and so run slower unoptimised than they save compiling, and the
# guarantee tests (test_guarantees.py, test_max_norm.py), test_conv.py's training-step tests
# and the TPU compile checks (test_tpu_aot.py) run with full optimisation (the
# full_optimization fixture, tests/conftest.py): their checks are about the code users run.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
collect_ignore_glob = ["examples/*", "benchmarks/*"]
