"""Shared helpers for normjax benchmarks: machine description, interleaved timing, HLO
traffic estimates, markdown tables and the auto-generated blocks of ``RESULTS.md``.

Nothing here imports normjax; jax, torch and optax are imported lazily so a benchmark can
set ``XLA_FLAGS`` before jax initialises its backend.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_MD = Path(__file__).with_name("RESULTS.md")


# ---------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------


def _cpu_model() -> str:
    """``model name`` from /proc/cpuinfo, with its cache size and widest SIMD extension."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (x.strip() for x in line.split(":", 1))
                fields.setdefault(k, v)
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    simd = next((f for f in ("avx512f", "avx2", "avx", "sse4_2", "neon", "asimd") if f in flags), None)
    caches = []
    for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (idx / "level").read_text().strip(), (idx / "type").read_text().strip()
            if kind != "Instruction":
                caches.append(f"L{level} {(idx / 'size').read_text().strip()}")
        except OSError:
            pass
    cache = ", ".join(caches) or (fields.get("cache size") and f"cache {fields['cache size']}")
    extra = [x for x in (cache, simd) if x]
    return f"{model} ({', '.join(extra)})" if extra else model


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    """CPU model, core count, RAM, library versions and the JAX backend, as strings."""
    import jax

    ram = _ram_gib()
    info = {
        "CPU": _cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "RAM": f"{ram:.1f} GiB" if ram else "unknown",
        "OS / Python": f"{platform.platform()} / Python {platform.python_version()}",
        "jax / jaxlib": f"{jax.__version__} / {_version('jaxlib')}",
        "optax": _version("optax"),
        "torch": _version("torch"),
        "JAX backend": f"{jax.default_backend()} ({', '.join(str(d) for d in jax.devices())})",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") or "(unset)",
    }
    return info


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Per-round wall times (seconds) and minor page faults of one benchmarked callable."""

    times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    progress: Callable[[int, int], None] | None = None,
    max_seconds: float | None = None,
    min_rounds: int = 3,
) -> dict[str, Samples]:
    """Runs ``fn_1, fn_2, ..., fn_k`` round after round (``warmup + repeats`` rounds).

    Each callable must block until its work is done (``jax.block_until_ready``). The
    first ``warmup`` rounds are dropped. Garbage collection is off while timing, so a
    collection does not land in one variant's sample. With ``max_seconds``, rounds stop
    once that much time has passed and at least ``min_rounds`` timed rounds are in (the
    number of samples then says how many rounds ran).
    """
    out = {k: Samples() for k in fns}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    start = time.perf_counter()
    try:
        for r in range(warmup + repeats):
            if (
                max_seconds is not None
                and r - warmup >= min_rounds
                and time.perf_counter() - start > max_seconds
            ):
                break
            for name, fn in fns.items():
                f0 = minor_faults()
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                f1 = minor_faults()
                if r >= warmup:
                    out[name].times.append(t1 - t0)
                    out[name].faults.append(f1 - f0)
            if progress is not None:
                progress(r + 1, warmup + repeats)
    finally:
        if was_enabled:
            gc.enable()
    return out


def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def ratio_stats(s: Samples, base: Samples) -> dict[str, float]:
    """Ratio of medians, and median / quartiles of the per-round ratios ``s_i / base_i``."""
    per_round = [a / b for a, b in zip(s.times, base.times)]
    return {
        "ratio_of_medians": statistics.median(s.times) / statistics.median(base.times),
        "median_of_ratios": statistics.median(per_round),
        "ratio_q25": quantile(per_round, 0.25),
        "ratio_q75": quantile(per_round, 0.75),
    }


# ---------------------------------------------------------------------------------------
# HLO inspection
# ---------------------------------------------------------------------------------------

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([\w-]+)\((.*)$")
_FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def _shape_bytes(shape: str) -> int:
    total = 0
    for dt, dims in re.findall(r"\b(\w+)\[([\d,]*)\]", shape):
        if dt not in _DTYPE_BYTES:
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES[dt]
    return total


@dataclass
class HloSummary:
    """What the entry computation of a compiled XLA module does, instruction by instruction.

    ``bytes_read`` / ``bytes_written`` add up, over every top-level instruction (fusions,
    custom calls, ...), the sizes of its operands and of its result: a lower bound of the
    memory traffic when no operand stays in cache, which holds for arrays of megabytes.
    """

    instructions: int
    fusions: int
    fusion_kinds: dict[str, int]
    reductions: int  # fusions (or bare reduces) that contain a reduce
    big_reductions: int  # ... whose operands add up to at least big_bytes
    bytes_read: int
    bytes_written: int


def _computations(hlo_text: str) -> dict[str, str]:
    comps: dict[str, str] = {}
    name, body = None, []
    for line in hlo_text.splitlines():
        if name is None:
            m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
            if m:
                name, body = m.group(1), []
        elif line.strip() == "}":
            comps[name] = "\n".join(body)
            name = None
        else:
            body.append(line)
    return comps


def hlo_summary(hlo_text: str, big_bytes: int = 1 << 20) -> HloSummary:
    comps = _computations(hlo_text)
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    sizes: dict[str, int] = {}
    n_instr = n_fusion = n_reduce = n_big = 0
    kinds: dict[str, int] = {}
    rd = wr = 0
    for line in entry.splitlines()[1:]:
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        sizes[name] = _shape_bytes(shape)
        if op in _FREE_OPS:
            continue
        n_instr += 1
        operands = re.findall(r"%([\w.\-]+)", rest.split("calls=")[0])
        this_rd = sum(sizes.get(o, 0) for o in operands)
        rd += this_rd
        wr += sizes[name]
        is_reduce = op == "reduce"
        if op == "fusion":
            n_fusion += 1
            k = re.search(r"kind=(\w+)", rest)
            kind = k.group(1) if k else "?"
            kc = re.search(r'"kind":"(\w+)"', rest)
            if kc:
                kind += f"/{kc.group(1).strip('_')}"
            kinds[kind] = kinds.get(kind, 0) + 1
            called = re.search(r"calls=%([\w.\-]+)", rest)
            is_reduce = bool(called and re.search(r"\sreduce\(", comps.get(called.group(1), "")))
        if is_reduce:
            n_reduce += 1
            n_big += this_rd >= big_bytes
    return HloSummary(n_instr, n_fusion, kinds, n_reduce, n_big, rd, wr)


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------


class SectionTimer:
    """Runs benchmark sections, logs each one's wall time and keeps them in ``walls``."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.walls: dict[str, float] = {}

    def __call__(self, label: str, fn: Callable, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.walls[label] = time.perf_counter() - t0
        self.log(f"[{label}] done in {self.walls[label]:.0f} s")
        return out


def report_header(script: str, title: str, git_state: str, info: dict[str, str]) -> list[str]:
    """The opening lines of a RESULTS.md section: title, the command and when, and the machine."""
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", f"benchmarks/{script}", *sys.argv[1:]])
    how = "what `make bench` runs" if len(sys.argv) == 1 else "`make bench` runs it without flags"
    return [
        f"## {title} (`benchmarks/{script}`)\n",
        f"Command: `{cmd}` ({how}), {time.strftime('%Y-%m-%d %H:%M %Z')}; normjax {git_state}.\n",
        "### Machine\n",
        md_kv(info) + "\n",
    ]


def publish(section: str, text: str, no_write: bool, out: Path) -> None:
    """Prints a benchmark's report and, unless ``no_write``, puts it in its RESULTS.md block."""
    print(text, flush=True)
    if not no_write:
        update_results(section, text, out)
        print(f"updated {out}")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(x: object) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(map(fmt, headers)) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines += ["| " + " | ".join(map(fmt, r)) + " |" for r in rows]
    return "\n".join(lines)


def md_kv(info: dict[str, str]) -> str:
    return md_table(["", ""], [(k, v) for k, v in info.items()])


def update_results(section: str, body: str, path: Path = RESULTS_MD, title: str = "# normjax benchmark results") -> None:
    """Replaces the auto-generated block ``section`` of ``RESULTS.md`` with ``body``.

    The block sits between ``<!-- BEGIN AUTO: section -->`` and ``<!-- END AUTO: section -->``;
    text outside it (the hand-written analysis) is kept. A missing file or block is created.
    """
    begin, end = f"<!-- BEGIN AUTO: {section} -->", f"<!-- END AUTO: {section} -->"
    block = f"{begin}\n<!-- generated by the benchmark script; edits inside this block are overwritten -->\n\n{body.strip()}\n\n{end}"
    text = path.read_text() if path.exists() else f"{title}\n"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def leaf_pipeline(
    hlo_text: str, param_regex: str, min_bytes: int = 1 << 16, keep_small_ops: Sequence[str] = ()
) -> list[str]:
    """The chain of top-level instructions that produce one output leaf, in execution order.

    Finds the operand of the ``ROOT`` tuple computed from the entry parameter whose name
    matches ``param_regex``, walks its producers back (skipping parameters, constants and
    instructions smaller than ``min_bytes``), and writes each as
    ``name [kind]: reads a, b -> writes shape (output|intermediate)``, so one can see what
    XLA materialises in between and whether a reduction got fused with its producers. (An
    intermediate may share a buffer with an output; ``memory_analysis()`` says how many
    temporary bytes the executable really allocates.) Instructions whose op is in
    ``keep_small_ops`` (e.g. ``("dot",)`` for matrix-vector products) are listed even when
    their result is small.
    """
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    comps = _computations(hlo_text)
    instr: dict[str, tuple[str, str, list[str], str]] = {}
    order: list[str] = []
    root_operands: list[str] = []
    for line in entry.splitlines()[1:]:
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        operands = re.findall(r"%([\w.\-]+)", rest.split("calls=")[0].split("metadata=")[0])
        kind = ""
        if op == "fusion":
            k = re.search(r"kind=(\w+)", rest)
            kind = k.group(1) if k else "?"
            kc = re.search(r'"kind":"(\w+)"', rest)
            if kc:
                kind += "/" + kc.group(1).strip("_")
            called = re.search(r"calls=%([\w.\-]+)", rest)
            if called and re.search(r"\sreduce\(", comps.get(called.group(1), "")):
                kind += "+reduce"
        instr[name] = (shape.split("{")[0], op, operands, kind)
        order.append(name)
        if line.lstrip().startswith("ROOT") and op == "tuple":
            root_operands = operands
    params = [n for n, v in instr.items() if v[1] == "parameter" and re.search(param_regex, n)]
    if not params:
        return [f"(no parameter matches {param_regex!r})"]
    target = next((o for o in root_operands if params[0] in _cone(o, instr)), None)
    if target is None:
        return ["(could not find the output computed from that parameter)"]
    cone = _cone(target, instr)
    out = []
    for n in order:
        if n not in cone:
            continue
        shape, op, operands, kind = instr[n]
        if op in _FREE_OPS or _shape_bytes(shape) < min_bytes and "reduce" not in kind and op not in keep_small_ops:
            continue
        big_in = [o for o in operands if o in instr and _shape_bytes(instr[o][0]) >= min_bytes]
        reads = ", ".join(
            (re.sub(r"_+", "/", re.sub(r"\.\d+$", "", o)).strip("/") if instr[o][1] == "parameter" else o) for o in big_in
        )
        role = "output" if n in root_operands else "intermediate" if _shape_bytes(shape) >= min_bytes else "small"
        out.append(f"{n} [{kind or op}]: reads {reads or '-'} -> writes {shape} ({role})")
    return out


def _cone(start: str, instr: dict[str, tuple[str, str, list[str], str]]) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        if n in seen or n not in instr:
            continue
        seen.add(n)
        stack.extend(instr[n][2])
    return seen
