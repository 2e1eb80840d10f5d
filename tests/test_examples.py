"""Smoke-runs every script in ``examples/`` the way a user would, with its quick flag.

Convention for examples: each accepts ``--quick`` (a smoke run that still makes every check, also
switched on by ``NORMJAX_QUICK=1``). A quick run's training steps take about a second of its
12-37 CPU seconds (9-27 s wall, 2 cores, quiet machine); the rest is imports (3-4 s) and XLA
compilation, one program per jitted function and input shape: jit a function once and reuse it
across runs of the same shapes, rather than cutting steps. New scripts are picked up by the glob
below; give them extra arguments and checks in ``EXTRA_ARGS`` and ``CHECKS``. Files whose name
starts with ``_`` (``_digits.py``) are modules the examples share, not examples.

Each script runs in a process of its own, as a user runs it. The runs start in the background
when the session's tests start (tests/conftest.py), beside the other tests, and this module
runs last: see ``ExampleRuns``.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 300


def _env() -> dict[str, str]:
    env = dict(os.environ, NORMJAX_QUICK="1", JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    env["JAX_NUMPY_DTYPE_PROMOTION"] = "strict"  # examples must pass under strict promotion too
    # The test session fakes 8 CPU devices (root conftest.py); an example runs as a user runs it.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
    # The root conftest.py compiles the tests' programs unoptimised (they run once or twice); the
    # examples train, and their -O0 code runs slower than its compile saves (measured: 1.1-2.3x
    # longer runs), so they get XLA's full optimisation, as a user's run does.
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
    return env


def _png(tmp_path: Path, script: str = "maxnorm_digits.py") -> Path:
    return tmp_path / Path(script).with_suffix(".png").name


def _check_png(stdout: str, png: Path) -> None:
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no PNG at {png}"
    assert f"plot written to {png}" in stdout


def _import_example(script: str):
    """Imports ``examples/<script>`` as a module (its folder on ``sys.path``, as when run)."""
    folder = str(ROOT / "examples")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / "examples" / script)
        example = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = example  # flax.linen modules (dataclasses) look themselves up there
        spec.loader.exec_module(example)
    finally:
        sys.path.remove(folder)
    return example


def _table(stdout: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the printed table whose header line starts with ``first_header``.

    Cells are separated by two or more spaces (headers and run names hold single spaces only);
    the header is followed by a dashed rule and the rows end at the first blank line.
    """
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    header = re.split(r"\s{2,}", lines[start].strip())
    assert set(lines[start + 1]) == {"-"}, lines[start + 1]
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), f"{line!r} does not match {header}"
        rows.append(dict(zip(header, cells)))
    return rows


def _check_maxnorm_digits(stdout: str, tmp_path: Path) -> None:
    _check_png(stdout, _png(tmp_path))
    rows = {line.split("  ")[0]: line for line in stdout.splitlines()}
    example = _import_example("maxnorm_digits.py")
    names = list(example.make_runs())
    assert any(n.startswith("max-norm") for n in names) and len(names) >= 3, names
    for name in names:
        assert name in rows, f"no {name!r} row in the table:\n{stdout}"
    for name, row in rows.items():
        if m := re.fullmatch(r"max-norm c=(\S+)", name):
            largest_norm = float(re.split(r"\s{2,}", row.strip())[4])  # the "max unit norm" column
            assert largest_norm <= float(m.group(1)) * (1 + 1e-5), row


def _check_spectral_digits(stdout: str, tmp_path: Path) -> None:
    _check_png(stdout, _png(tmp_path, "spectral_digits.py"))
    example = _import_example("spectral_digits.py")
    names = list(example.make_runs())
    constrained = [n for n in names if n.startswith("spectral")]
    assert "unconstrained" in names and len(constrained) == 1, names
    n_layers = len(example.SIZES) - 1
    certified_bound = example.SPECTRAL_BOUND**n_layers

    rows = {row["run"]: row for row in _table(stdout, "run ")}
    assert list(rows) == names, f"runs {list(rows)} in the table, expected {names}:\n{stdout}"
    eps_columns = [f"cert {e:g}" for e in example.EPSILONS]
    for name, row in rows.items():
        bound, bound_svd = float(row["L (Gram)"]), float(row["L (SVD)"])
        # Gram is certified: never below the exact product (float32 rounding of both aside).
        assert bound >= bound_svd * (1 - 1e-5), row
        # The empirical check the script asserts, read back from the table.
        assert float(row["max |grad m|"]) <= float(row["sqrt2*L"]) * (1 + 1e-3), row
        assert math.isclose(float(row["sqrt2*L"]), math.sqrt(2) * bound, rel_tol=1e-3), row
        # The graph certificate (nj.lipschitz_certificate): the same product for this plain chain,
        # and above the same lower bound (|grad m| <= sqrt(2) L for every certified L).
        graph = float(row["L (graph)"])
        assert math.isclose(graph, bound, rel_tol=1e-2), row
        assert float(row["max |grad m|"]) <= math.sqrt(2) * graph * (1 + 1e-3), row
        cert = [float(row[c].rstrip("%")) for c in eps_columns]
        assert all(a >= b for a, b in zip(cert, cert[1:])), f"certified accuracy grows with eps: {row}"
        assert cert[0] <= float(row["test acc"].rstrip("%")), row
    row = rows[constrained[0]]
    # nj.spectral_norm(1.0, estimator="gram") after every step: L <= 1 up to float32 rounding.
    assert float(row["L (Gram)"]) <= certified_bound * (1 + 1e-5), row
    assert float(row["L (SVD)"]) <= certified_bound * (1 + 1e-6), row

    # What the transform logged (SpectralNormState.sigma) and each kernel's sigma at the end.
    layers = _table(stdout, "kernel ")
    assert len(layers) == n_layers, layers
    for layer in layers:
        assert layer["kernel"].startswith(f"{constrained[0]}: "), layer
        assert float(layer["last step"]) > 0 and float(layer["max, all steps"]) >= float(layer["last step"]), layer
        assert float(layer["final (Gram)"]) <= example.SPECTRAL_BOUND * (1 + 1e-5), layer
        assert float(layer["final (SVD)"]) <= example.SPECTRAL_BOUND * (1 + 1e-6), layer


def _check_conv_digits(stdout: str, tmp_path: Path) -> None:
    example = _import_example("conv_digits.py")
    out = tmp_path / "conv_digits.md"
    assert out.is_file() and out.read_text().startswith("# conv_digits"), f"no markdown at {out}"
    names = list(example.make_runs())
    rows = {row["run"]: row for row in _table(stdout, "run ")}
    assert list(rows) == names and len(names) == 2, f"runs {list(rows)}, expected {names}:\n{stdout}"
    op, mat = (rows[n] for n in names)
    assert op["constraint view"] == "inferred ConvSpec" and mat["constraint view"] == "reshaped kernel", rows
    f = lambda row, col: float(row[col].rstrip("%"))  # noqa: E731
    n_layers = 3
    for row in rows.values():
        # Both claim the bound they were trained to (Gram, certified, in their own view).
        assert f(row, "claimed L") <= example.SPECTRAL_BOUND**n_layers * (1 + 1e-5), row
        # Certified (Gram, true operator norms) >= exact >= every lower bound found.
        assert f(row, "certified L") >= f(row, "exact L") * (1 - 1e-5), row
        assert f(row, "exact L") >= max(f(row, "max |J| test"), f(row, "max |J| search")) * (1 - 1e-4), row
        # The graph certificate (nj.lipschitz_certificate): the same product for this plain chain.
        assert math.isclose(f(row, "graph L"), f(row, "certified L"), rel_tol=1e-2), row
        assert f(row, "graph L") >= max(f(row, "max |J| test"), f(row, "max |J| search")) * (1 - 1e-4), row
        cert = [f(row, f"cert {e:g}") for e in example.EPSILONS]
        assert all(a >= b for a, b in zip(cert, cert[1:])) and cert[0] <= f(row, "test acc"), row
        assert f(row, "test acc") > 50.0, row  # both learn something, even in the quick run
    # (a) is 1-Lipschitz for sure; (b)'s matrix-view claim is false: the network stretches more.
    assert f(op, "certified L") <= example.SPECTRAL_BOUND**n_layers * (1 + 1e-5), op
    assert f(mat, "max |J| search") > f(mat, "claimed L") * 1.05, mat
    assert f(mat, "certified L") > 1.5 * f(mat, "claimed L"), mat

    kernels = _table(stdout, "kernel ")
    assert len(kernels) == 2 * n_layers, kernels
    for k in kernels:
        op_norm, gram = f(k, "operator norm"), f(k, "Gram bound")
        assert gram >= op_norm * (1 - 1e-5), k  # the certified bound is never below the exact norm
        if k["|conv(u)| / |u|"] != "n/a":  # flax's Conv never stretches more than the exact norm
            assert f(k, "|conv(u)| / |u|") <= op_norm * (1 + 1e-4), k
        if k["kernel"].startswith(names[0]):  # (a): every kernel inside its ball in its own view
            assert gram <= example.SPECTRAL_BOUND * (1 + 1e-5), k
        elif "Conv" in k["kernel"]:  # (b): matrix view held at 1, operator norm well above it
            assert f(k, "matrix-view sigma") <= example.SPECTRAL_BOUND * (1 + 1e-5), k
            assert op_norm > 1.1 * example.SPECTRAL_BOUND, k


def _check_equinox_cnn(stdout: str, tmp_path: Path) -> None:
    example = _import_example("equinox_cnn.py")
    out = tmp_path / "equinox_cnn.md"
    assert out.is_file() and out.read_text().startswith("# equinox_cnn"), f"no markdown at {out}"
    f = lambda row, col: float(row[col].rstrip("%"))  # noqa: E731
    bound = example.SPECTRAL_BOUND

    # The views infer_views read from the Equinox model: (out, in, kh, kw) convs, (out, in) head.
    views = {row["leaf"]: row for row in _table(stdout, "leaf ")}
    assert set(views) == {f"{m}/{p}" for m in ("conv1", "conv2", "head") for p in ("weight", "bias")}, views
    for name in ("conv1/weight", "conv2/weight"):
        assert views[name]["inferred view"].startswith("ConvSpec((8, 8)") and "'OIHW'" in views[name]["inferred view"]
        assert views[name]["shape default (no views)"].endswith(" x 3"), views[name]  # the width taps as columns
    assert views["head/weight"]["inferred view"] == "MatrixDims(in_axes=(1,), out_axes=(0,))", views["head/weight"]
    for name in ("conv1/bias", "conv2/bias", "head/bias"):
        assert views[name]["inferred view"] == "NotMatrix(role='bias')", views[name]
    assert views["conv1/bias"]["shape"] == "(16, 1, 1)" and views["conv2/bias"]["shape"] == "(32, 1, 1)", views

    rows = {row["run"]: row for row in _table(stdout, "run ")}
    assert list(rows) == ["(a) inferred views", "(b) shape default"], rows
    a, b = rows.values()
    for row in rows.values():
        assert f(row, "certified L") >= f(row, "exact L") * (1 - 1e-5), row  # Gram is certified
        assert f(row, "exact L") >= f(row, "max |J| test") * (1 - 1e-4), row  # a lower bound stays below
        assert f(row, "test acc") > 50.0, row
    assert f(a, "certified L") <= bound**3 * (1 + 1e-5), a  # (a) is 1-Lipschitz for sure
    assert f(b, "default-view claim") <= bound**3 * (1 + 1e-5), b  # (b) holds its own view at 1 ...
    assert f(b, "certified L") > 1.2 * f(b, "default-view claim"), b  # ... which certifies nothing

    layers = _table(stdout, "weight ")
    assert len(layers) == 6, layers
    for k in layers:
        assert f(k, "Gram bound") >= f(k, "operator norm") * (1 - 1e-5), k
        if k["weight"].startswith("(a)"):
            assert f(k, "Gram bound") <= bound * (1 + 1e-5), k
        else:
            assert f(k, "default sigma") <= bound * (1 + 1e-5), k
    assert any(f(k, "operator norm") > 1.1 * bound for k in layers if k["weight"].startswith("(b)")), layers

    # Biases: no state entry, and an update through the constraint came back bit for bit.
    for run in rows:
        line = next(line for line in stdout.splitlines() if line.startswith(f"{run}: biases "))
        assert line.endswith("no state entry: yes; a +1 update came back bit for bit: yes; "
                             "every weight's update rescaled: yes"), line


def _check_nnx_attention(stdout: str, tmp_path: Path) -> None:
    example = _import_example("nnx_attention.py")
    out = tmp_path / "nnx_attention.md"
    assert out.is_file() and out.read_text().startswith("# nnx_attention"), f"no markdown at {out}"
    f = lambda row, col: float(row[col].rstrip("%"))  # noqa: E731
    c = example.MAX_NORM
    qkv = [f"attn/{n}/kernel" for n in ("query", "key", "value")]

    views = {row["leaf"]: row for row in _table(stdout, "leaf ")}
    d, h = example.D, example.HEADS
    for name in qkv:  # (d, heads, head_dim): one matrix d x (heads * head_dim)
        assert views[name]["shape"] == f"({d}, {h}, {d // h})", views[name]
        assert views[name]["inferred view"] == "MatrixDims(in_axes=(0,), out_axes=(1, 2))", views[name]
        assert views[name]["units (views)"] == f"{d} of axes (0,)", views[name]
        assert views[name]["units (axis=None)"] == f"{d // h} of axes (0, 1)", views[name]
    assert views["attn/out/kernel"]["inferred view"] == "MatrixDims(in_axes=(0, 1), out_axes=(2,))", views
    assert views["embed/embedding"]["inferred view"] == "Embedding(row_axes=(0,), batch_axes=())", views
    assert all(row["inferred view"] == "NotMatrix(role='bias')" for k, row in views.items() if k.endswith("/bias"))

    rows = {row["run"]: row for row in _table(stdout, "run ")}
    assert list(rows) == ["(a) inferred views", "(b) default axis"], rows
    a, b = rows.values()
    assert f(a, "max fan-in norm") <= c * (1 + 1e-5), a  # every unit the model uses is in the ball
    assert f(b, "max default-slice norm") <= c * (1 + 1e-5), b  # the default bounds its own slices
    assert all(f(row, "test acc") > 50.0 for row in rows.values()), rows

    params = _table(stdout, "parameter ")
    assert len(params) == 12, params
    for p in params:
        run, name = p["parameter"].split(": ")
        if name in qkv:  # a fan-in is a piece of a default slice, so never longer than it
            assert f(p, "max fan-in norm") <= f(p, "max default-slice norm") * (1 + 1e-5), p
        if run == "(a) inferred views":
            assert f(p, "max fan-in norm") <= c * (1 + 1e-5), p
        else:
            assert f(p, "max default-slice norm") <= c * (1 + 1e-5), p
        assert 0 <= f(p, "clipped % last step") <= 100, p


def _check_lipschitz_vit(stdout: str, tmp_path: Path) -> None:
    _check_png(stdout, _png(tmp_path, "lipschitz_vit.py"))
    example = _import_example("lipschitz_vit.py")
    f = lambda row, col: float(row[col].rstrip("%"))  # noqa: E731
    names = list(example.make_runs())
    rows = {row["run"]: row for row in _table(stdout, "run ")}
    assert list(rows) == names and len(names) == 3, f"runs {list(rows)}, expected {names}:\n{stdout}"
    eps_columns = [f"cert {e:g}" for e in example.EPSILONS]
    for row in rows.values():
        # The graph certificate (Gram bounds) >= the same composition with exact sigmas, and
        # >= every Jacobian norm met on the test set (a lower bound on the Lipschitz constant).
        assert f(row, "L (graph)") >= f(row, "L (exact sigma)") * (1 - 1e-4), row
        assert f(row, "L (graph)") >= f(row, "max |J|") * (1 - 1e-4), row
        cert = [f(row, c) for c in eps_columns]
        assert all(a >= b for a, b in zip(cert, cert[1:])) and cert[0] <= f(row, "test acc"), row
    a, b, c = rows.values()
    assert f(a, "L (graph)") > 2.0, a  # unconstrained: every part stretches
    assert f(c, "L (graph)") <= example.SPECTRAL_BOUND * (1 + 1e-4), c  # certified 1-Lipschitz (graph certificate)
    assert f(c, "test acc") > 50.0 and f(c, eps_columns[0]) > f(a, eps_columns[0]), (a, c)

    # The certificate's factors (cert.ops): their product is the bound; every block of (c) <= 1.
    factors = {row["certified factors"]: row for row in _table(stdout, "certified factors")}
    assert list(factors) == names, factors
    blocks = [f"block {i}" for i in range(example.DEPTH)]
    for name, row in factors.items():
        product = f(row, "embed") * math.prod(f(row, k) for k in blocks) * f(row, "head")
        assert math.isclose(product, f(row, "product"), rel_tol=1e-3), row
        assert math.isclose(f(row, "product"), f(rows[name], "L (graph)"), rel_tol=1e-3), (row, rows[name])
    assert all(f(factors[names[2]], k) <= example.SPECTRAL_BOUND * (1 + 1e-4) for k in blocks), factors[names[2]]

    # Input-dependent attention (q k^T): refused, naming the op and the function.
    assert "nj.NotCertifiable: lipschitz_certificate: cannot certify dot_general" in stdout, stdout
    assert "(qk_attention)" in stdout, stdout


# Examples that need a package beyond normjax's [examples] extra: skipped (with the reason) if absent.
NEEDS = {"equinox_cnn.py": "equinox"}

EXTRA_ARGS = {
    "maxnorm_digits.py": lambda tmp_path: ["--out", str(_png(tmp_path))],
    "spectral_digits.py": lambda tmp_path: ["--out", str(_png(tmp_path, "spectral_digits.py"))],
    "conv_digits.py": lambda tmp_path: ["--out", str(tmp_path / "conv_digits.md")],
    "equinox_cnn.py": lambda tmp_path: ["--out", str(tmp_path / "equinox_cnn.md")],
    "nnx_attention.py": lambda tmp_path: ["--out", str(tmp_path / "nnx_attention.md")],
    "lipschitz_vit.py": lambda tmp_path: ["--out", str(_png(tmp_path, "lipschitz_vit.py"))],
}
CHECKS = {
    "maxnorm_digits.py": _check_maxnorm_digits,
    "spectral_digits.py": _check_spectral_digits,
    "conv_digits.py": _check_conv_digits,
    "equinox_cnn.py": _check_equinox_cnn,
    "nnx_attention.py": _check_nnx_attention,
    "lipschitz_vit.py": _check_lipschitz_vit,
}


def _missing(script: Path) -> str | None:
    """The package ``script`` needs and that is not installed, if any."""
    module = NEEDS.get(script.name)
    return module if module and importlib.util.find_spec(module) is None else None


class ExampleRuns:
    """Runs examples, each in its own process as a user runs it, on worker threads.

    An example is mostly single-threaded XLA compilation, so its run can share the machine with
    the rest of the session: tests/conftest.py starts the selected examples in the background
    when the session's tests start (``os.cpu_count() - 1`` workers, at least one) and runs this
    module last; its tests then add workers up to ``os.cpu_count()`` (at least 2) and wait for
    each run's result. Each run keeps its own ``TIMEOUT_S``, counted from its own start.
    """

    def __init__(self, scripts: list[Path], out_root: Path):
        self.pending = [s for s in scripts if _missing(s) is None]
        self.results = {s.name: concurrent.futures.Future() for s in self.pending}
        self.out_dirs = {s.name: out_root / s.stem for s in self.pending}
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.workers = 0

    def add_workers(self, n: int) -> None:
        """Runs up to ``n`` examples at a time from now on."""
        with self.lock:
            extra, self.workers = max(0, n - self.workers), max(n, self.workers)
        for _ in range(extra):
            threading.Thread(target=self._work, daemon=True).start()

    def stop(self) -> None:
        """The session is over: nothing more starts, and a run still going is killed."""
        with self.lock:
            for script in self.pending:
                self.results[script.name].cancel()
            self.pending = []
            for proc in self.running:
                proc.kill()

    def _run(self, script: Path) -> subprocess.CompletedProcess:
        """``subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)``, killable by stop()."""
        out_dir = self.out_dirs[script.name]
        out_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, str(script), "--quick", *EXTRA_ARGS.get(script.name, lambda _: [])(out_dir)]
        with subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            with self.lock:
                self.running.add(proc)
            try:
                stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
            finally:
                with self.lock:
                    self.running.discard(proc)
        return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)

    def _work(self) -> None:
        while True:
            with self.lock:
                if not self.pending:
                    return
                script = self.pending.pop(0)
            result = self.results[script.name]
            if not result.set_running_or_notify_cancel():
                continue
            try:
                result.set_result(self._run(script))
            except BaseException as exc:  # noqa: BLE001 - handed to the test that waits for it
                result.set_exception(exc)


_RUNS: ExampleRuns | None = None


def selected_scripts(items) -> list[Path]:
    """The scripts whose test_example_runs is among the session's ``items``."""
    names = {item.callspec.params["script"].name for item in items if getattr(item, "originalname", "") == "test_example_runs"}
    return [s for s in SCRIPTS if s.name in names]


def start_in_background(scripts: list[Path], out_root: Path) -> ExampleRuns:
    """Starts ``scripts`` now, beside the session's other tests (tests/conftest.py calls this)."""
    global _RUNS
    if _RUNS is None:
        _RUNS = ExampleRuns(scripts, out_root)
        _RUNS.add_workers(max(1, (os.cpu_count() or 2) - 1))
    return _RUNS


@pytest.fixture(scope="module")
def example_runs(request, tmp_path_factory) -> ExampleRuns:
    """The runs tests/conftest.py started (started here if it did not), at full width now."""
    runs = _RUNS or start_in_background(selected_scripts(request.session.items), tmp_path_factory.mktemp("examples"))
    runs.add_workers(max(2, os.cpu_count() or 1))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_example_runs(script: Path, example_runs: ExampleRuns) -> None:
    if module := _missing(script):
        pytest.skip(f"{script.name} needs {module}, which is not installed")
    proc = example_runs.results[script.name].result()
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    if check := CHECKS.get(script.name):
        check(proc.stdout, example_runs.out_dirs[script.name])


def test_examples_found() -> None:
    names = {s.name for s in SCRIPTS}
    assert {"maxnorm_digits.py", "spectral_digits.py", "conv_digits.py", "equinox_cnn.py", "nnx_attention.py",
            "lipschitz_vit.py"} <= names
    assert not any(name.startswith("_") for name in names), names  # _digits.py is shared code
    assert set(CHECKS) <= names and set(EXTRA_ARGS) <= names and set(NEEDS) <= names
