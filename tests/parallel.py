#!/usr/bin/env python
"""``make test``: the whole suite in two pytest processes, the files split by their measured cost.

The suite is dominated by XLA compilation, which runs on one core, so on a 2-core machine two
processes take about half the time of one. Each file goes to the worker with the least work so
far (largest first; ``WEIGHTS`` holds seconds measured on a 2-core CPU, unknown files count
10 s). The first worker's output streams; the second's is printed when it ends. The exit
status is the worst of the two. Extra arguments go to both pytest runs (``-x``, ``-k ...``).

    .venv/bin/python tests/parallel.py            # what make test runs
    .venv/bin/python tests/parallel.py -k spectral
    .venv/bin/python -m pytest -q                 # the same tests in one process
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKERS = int(os.environ.get("NORMJAX_TEST_WORKERS", "2"))

# seconds per file, from `pytest --durations=0` inside `make test` (tests/parallel.py) on the
# 2-core CI-like machine (2026-12-03, after the suite-wide JAX_DISABLE_MOST_OPTIMIZATIONS of the
# root conftest.py): each figure includes the slowdown of sharing the machine with the other
# worker and with the examples
WEIGHTS = {
    "tests/test_conv.py": 175,
    "tests/test_certificate.py": 105,
    "tests/test_guarantees.py": 100,
    "tests/test_sharding.py": 75,
    "tests/test_spectral_sharding.py": 70,
    "normjax": 55,  # the doctests
    "tests/test_properties.py": 40,
    "tests/test_spectral.py": 40,
    "tests/test_frameworks.py": 38,
    "tests/test_matmul_modes.py": 38,
    "tests/test_multiprocess.py": 34,
    "tests/test_views.py": 26,
    "tests/test_max_norm.py": 23,
    "tests/test_transforms.py": 18,
    "tests/test_spectral_parity.py": 18,
    "tests/test_infer.py": 12,
    # the examples run in the background of their worker (tests/conftest.py): ~3 min of CPU,
    # which shows in the figures above (both workers share the machine with them); the
    # tests of this file only wait for whatever is still running at the end
    "tests/test_examples.py": 5,
    "tests/test_errors.py": 3,
    "tests/test_tpu_aot.py": 1,
}


def targets() -> list[str]:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    return files + ["normjax"]


def split(paths: list[str], n: int) -> list[list[str]]:
    groups: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n
    for path in sorted(paths, key=lambda p: -WEIGHTS.get(p, 10)):
        i = load.index(min(load))
        groups[i].append(path)
        load[i] += WEIGHTS.get(path, 10)
    return [sorted(g) for g in groups if g]


def main(argv: list[str]) -> int:
    groups = split(targets(), max(1, WORKERS))
    cmd = [sys.executable, "-m", "pytest", "-q", *argv]
    t0 = time.perf_counter()
    procs = []
    for i, group in enumerate(groups):
        out = None if i == 0 else tempfile.TemporaryFile(mode="w+")
        procs.append((subprocess.Popen([*cmd, *group], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT), out, group))
    codes = []
    for i, (proc, out, group) in enumerate(procs):
        codes.append(proc.wait())
        if out is not None:
            out.seek(0)
            print(f"\n===== worker {i + 1} of {len(procs)}: {' '.join(group)} =====", flush=True)
            sys.stdout.write(out.read())
            out.close()
    status = "passed" if all(c == 0 for c in codes) else "FAILED"
    print(f"\n===== {len(procs)} workers {status} in {time.perf_counter() - t0:.0f} s (exit codes {codes}) =====")
    # pytest's 5 means "no tests collected" in a worker (e.g. -k matched only the other's files)
    bad = [c for c in codes if c not in (0, 5)]
    return bad[0] if bad else (0 if 0 in codes else 5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
