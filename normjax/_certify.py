r"""Certified Lipschitz bounds of whole networks, read from the model's jaxpr.

:func:`lipschitz_certificate` traces ``fn(params, x, ...)`` with :func:`jax.make_jaxpr` and
walks the equations with one abstract value per variable:

- a *constant*: the value does not depend on the input ``x`` (parameters, literals, values
  computed from them). It is computed (inside the certificate's own ``jit``), so a weight
  normalised inside the model, a BatchNorm in inference mode or a fixed attention pattern is
  seen as the number it is;
- a *dependent* value (:class:`_Dep`): a function of ``x``. It carries ``L``, an upper bound on
  the L2 -> L2 Lipschitz constant of ``x -> value`` (for one example), the position of the
  example (batch) axis, and a tag that lets two patterns be recognised (the pair ``max``/``min``
  of GroupSort/MaxMin and the pieces of a ``slice``/``split``).

Each op maps the ``L`` of its dependent operands to the ``L`` of its result by a rule whose
soundness is stated next to it (triangle inequality for sums, Pythagoras for concatenations,
certified operator norms for ``dot_general`` and convolutions, window overlap for pooling,
global derivative bounds for activations). Anything else raises :class:`NotCertifiable` naming
the op and its source line: an unbounded or unknown op never passes silently.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from normjax._conv import ConvSpec, conv_sigma_gram
from normjax._infer import _loc
from normjax._norms import acc_dtype, gram_stack
from normjax._select import path_str

__all__ = [
    "Certificate",
    "NotCertifiable",
    "OpBound",
    "certified_accuracy",
    "certified_radius",
    "lipschitz_certificate",
]

_NAME = "lipschitz_certificate"
_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


class NotCertifiable(ValueError):
    """The network has an op through which no global Lipschitz bound is known (or exists)."""


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class OpBound:
    """One op of the walk that changed the bound.

    Attributes:
      site: the op and its source line, ``"dot_general at model.py:12 (__call__)"``.
      rule: what was applied, e.g. ``"linear (Gram)"``, ``"sum of branches"``, ``"gelu"``.
      factor: the op's own Lipschitz constant (for a sum of branches: ``nan``; a scanned op:
        one factor per iteration).
      bound: the bound on ``x -> (this op's output)`` after the op (per iteration in a scan).
      param: the parameter the op's constant operand comes from (``"Dense_0/kernel"``), if any.
    """

    site: str
    rule: str
    factor: Any
    bound: Any
    param: str | None = None

    def tree_flatten(self):
        return (self.factor, self.bound), (self.site, self.rule, self.param)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], aux[1], children[0], children[1], aux[2])


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Certificate:
    """An upper bound on the L2 Lipschitz constant of ``x -> fn(params, x)``, per example.

    ``float(cert)`` is the bound; ``cert.ops`` the per-op breakdown; ``cert.table()`` a
    Markdown table of it. A pytree (the arrays are its leaves), so it can leave a ``jit``.
    """

    bound: Any
    ops: tuple[OpBound, ...] = ()

    def __float__(self) -> float:
        return float(self.bound)

    def tree_flatten(self):
        return (self.bound, self.ops), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], tuple(children[1]))

    def table(self) -> str:
        """The breakdown as a Markdown table: site, rule, parameter, factor, bound after."""
        rows = ["| op | rule | parameter | factor | bound after |", "|---|---|---|---:|---:|"]
        for op in self.ops:
            f, b = np.asarray(op.factor, np.float64), np.asarray(op.bound, np.float64)
            fs = _fmt(f)
            rows.append(f"| {op.site} | {op.rule} | {op.param or ''} | {fs} | {_fmt(b)} |")
        rows.append(f"| **output** | | | | **{float(self.bound):.6g}** |")
        return "\n".join(rows)


def _fmt(a: np.ndarray) -> str:
    if np.isnan(a).all():
        return "—"
    if a.size == 1:
        return f"{float(a.reshape(())):.6g}"
    return f"{a.min():.4g} … {a.max():.4g} ({a.size} iterations)"


# ------------------------------------------------------------------------------------------
# Abstract values
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Dep:
    """A value that depends on the input: ``L`` bounds the Lipschitz constant of ``x -> value``."""

    L: Any  # float32/64 scalar array (traced inside the certificate's jit)
    shape: tuple[int, ...]
    batch: int | None  # the example axis, None when there is none
    tag: tuple | None = None  # ("slice", src, region) | ("max"|"min", a, b) | ("rmax"|"rmin", src, axes)


def _is_dep(v: Any) -> bool:
    return isinstance(v, _Dep)


def _dtype() -> Any:
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


# One ulp-ish allowance per arithmetic step on a bound (the steps round to nearest).
def _up(x: Any) -> Any:
    u = float(jnp.finfo(_dtype()).eps)
    return jnp.asarray(x, _dtype()) * (1.0 + 4.0 * u)


def _const_up(c: float) -> Any:
    """``c`` as an array of the bound's dtype, rounded up."""
    dt = np.dtype(_dtype())
    v = dt.type(c)
    if float(v) < c:
        v = np.nextafter(v, dt.type(np.inf))
    return jnp.asarray(v, dt)


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in v.aval.shape)


def _is_float(v: Any) -> bool:
    return jnp.issubdtype(v.aval.dtype, jnp.inexact)


# Global Lipschitz constants of jax.nn activations (sup |f'| over R, rounded up: the sup of
# |f'| on a 1e-5 grid over [-20, 20] in float64 is gelu 1.128904 (erf) / 1.128993 (tanh),
# silu 1.099839, mish 1.088498; the grid error is below 1e-4 since |f''| <= 1).
def _fixed(c: float) -> Callable[..., Any]:
    return lambda *extra: _const_up(c)


def _max_abs_one(*extra: Any) -> Any:
    """``max(1, max |alpha|)`` (one slope per channel, as in PReLU, included)."""
    return jnp.maximum(_const_up(1.0), jnp.max(jnp.abs(jnp.asarray(extra[0], _dtype())))) if extra else _const_up(1.0)


def _celu(*extra: Any) -> Any:
    if not extra:
        return _const_up(1.0)
    a = jnp.asarray(extra[0], _dtype())
    return jnp.where(jnp.all(a > 0), _const_up(1.0), jnp.inf)


_NAMED_ACTIVATIONS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    # name -> (reference jax.nn function, Lipschitz constant from its extra arguments)
    "silu": (jax.nn.silu, _fixed(1.1)),
    "swish": (jax.nn.silu, _fixed(1.1)),
    "softplus": (jax.nn.softplus, _fixed(1.0)),  # derivative sigmoid(x) in (0, 1)
    "log_sigmoid": (jax.nn.log_sigmoid, _fixed(1.0)),  # derivative sigmoid(-x)
    "elu": (jax.nn.elu, _max_abs_one),  # alpha e^x on x < 0
    "celu": (jax.nn.celu, _celu),  # e^(x/alpha) <= 1 on x < 0 for alpha > 0
    "selu": (jax.nn.selu, _fixed(1.0507009873554805 * 1.6732632423543772 * (1 + 1e-7))),
    "leaky_relu": (jax.nn.leaky_relu, _max_abs_one),
    "mish": (jax.nn.mish, _fixed(1.089)),
    "hard_tanh": (jax.nn.hard_tanh, _fixed(1.0)),
    "hard_silu": (jax.nn.hard_silu, _fixed(1.5)),  # (2x + 3) / 6 on (-3, 3)
    "hard_swish": (jax.nn.hard_silu, _fixed(1.5)),
    "soft_sign": (jax.nn.soft_sign, _fixed(1.0)),  # 1 / (1 + |x|)^2
}
# jax.nn.gelu is not jitted: its ops are inlined into the caller and matched as a sequence.
_INLINE_ACTIVATIONS: dict[str, tuple[Callable[..., Any], float]] = {
    "gelu (tanh)": (functools.partial(jax.nn.gelu, approximate=True), 1.13),
    "gelu (erf)": (functools.partial(jax.nn.gelu, approximate=False), 1.13),
}
# Element-wise primitives and sup |f'|.
_ELEMENTWISE_LIP = {
    "neg": 1.0, "abs": 1.0, "tanh": 1.0, "sin": 1.0, "cos": 1.0, "atan": 1.0, "logistic": 0.25,
    "erf": 2.0 / math.sqrt(math.pi), "erfc": 2.0 / math.sqrt(math.pi), "asinh": 1.0,
}
_IDENTITY = {
    "convert_element_type", "copy", "copy_p", "reduce_precision", "stop_gradient", "optimization_barrier",
    "sharding_constraint", "mesh_cast", "reshard", "device_put",
}
_CALLS = {
    "jit", "pjit", "closed_call", "core_call", "call", "remat", "remat2", "checkpoint",
    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
}
_WHY = {
    "mul": "a product of two input-dependent values (e.g. attention's q·kᵀ, a gate) is not globally Lipschitz",
    "dot_general": "a product of two input-dependent values (e.g. attention's q·kᵀ, or scores·v) is not globally Lipschitz",
    "conv_general_dilated": "a convolution whose kernel depends on the input is not globally Lipschitz",
    "div": "dividing by an input-dependent value (a normalisation) is not globally Lipschitz",
    "rsqrt": "rsqrt of an input-dependent value (LayerNorm/RMSNorm's 1/std) is not globally Lipschitz",
    "sqrt": "sqrt is not Lipschitz at 0",
    "exp": "exp is not globally Lipschitz (softmax scores, exp-activations)",
    "expm1": "expm1 is not globally Lipschitz",
    "log": "log is not Lipschitz near 0",
    "log1p": "log1p is not Lipschitz near -1",
    "integer_pow": "a power of an input-dependent value (a variance, x**2) is not globally Lipschitz",
    "square": "a square of an input-dependent value (a variance) is not globally Lipschitz",
    "pow": "a power of an input-dependent value is not globally Lipschitz",
    "sign": "sign is not continuous",
    "floor": "floor is not continuous",
    "ceil": "ceil is not continuous",
    "round": "round is not continuous",
    "argmax": "argmax is not continuous",
    "argmin": "argmin is not continuous",
    "while": "a while loop over input-dependent values has no bound on its trip count",
    "gather": "a gather from an input-dependent array (or with input-dependent indices) is not certified",
    "scatter-add": "a scatter into an input-dependent array is not certified",
    "reduce_prod": "a product of input-dependent values is not globally Lipschitz",
}


# ------------------------------------------------------------------------------------------
# Helpers for the rules
# ------------------------------------------------------------------------------------------


def _reshape_batch(old: tuple[int, ...], new: tuple[int, ...], b: int | None) -> int | None | str:
    """The example axis after a row-major reshape; ``"mixed"`` when the reshape mixes it."""
    if b is None:
        return None
    before = math.prod(old[:b])
    acc = 1
    for k, n in enumerate(new):
        if acc == before and n == old[b]:
            return k
        acc *= n
        if acc > before:
            break
    return "mixed"


def _region(shape: tuple[int, ...], starts: Sequence[int], limits: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple((int(s), int(l)) for s, l in zip(starts, limits))


def _disjoint(r1: tuple, r2: tuple) -> bool:
    return any(hi1 <= lo2 or hi2 <= lo1 for (lo1, hi1), (lo2, hi2) in zip(r1, r2))


def _window_overlap(window: Sequence[int], strides: Sequence[int], dil: Sequence[int]) -> int:
    """How many windows at most cover one input element: per axis min(w, ceil(((w-1) d + 1) / s))."""
    m = 1
    for w, s, d in zip(window, strides, dil):
        m *= min(int(w), -(-((int(w) - 1) * int(d) + 1) // int(s)))
    return m


def _max_abs(c: Any) -> Any:
    c = jnp.asarray(c)
    if c.size == 0:
        return jnp.zeros((), _dtype())
    return jnp.max(jnp.abs(c)).astype(_dtype())


@functools.lru_cache(maxsize=None)
def _reference_body(name: str, avals: tuple) -> str | None:
    """The body of jax.nn.<name> traced at these operand avals (as text), or None."""
    fn = _NAMED_ACTIVATIONS[name][0]
    try:
        closed = jax.make_jaxpr(fn)(*[jax.ShapeDtypeStruct(s, d, weak_type=w) for s, d, w in avals])
    except Exception:
        return None
    eqns = closed.jaxpr.eqns
    if len(eqns) != 1 or "jaxpr" not in eqns[0].params:
        return None
    return str(eqns[0].params["jaxpr"])


@functools.lru_cache(maxsize=None)
def _inline_reference(name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    return jax.make_jaxpr(_INLINE_ACTIVATIONS[name][0])(jax.ShapeDtypeStruct(shape, dtype)).jaxpr


def _same_literal(a: Any, b: Any) -> bool:
    try:
        return a.aval.dtype == b.aval.dtype and np.array_equal(np.asarray(a.val), np.asarray(b.val))
    except Exception:
        return False


def _match_inline(ref: Any, eqns: Sequence[Any], i: int, y: Any) -> Any:
    """If ``eqns[i:i+k]`` computes ``ref`` (one input, one output) from ``y``: its output var."""
    k = len(ref.eqns)
    if i + k > len(eqns) or len(ref.invars) != 1 or len(ref.outvars) != 1:
        return None
    vmap = {ref.invars[0]: y}
    for re_, e in zip(ref.eqns, eqns[i : i + k]):
        if re_.primitive is not e.primitive or len(re_.invars) != len(e.invars) or len(re_.outvars) != len(e.outvars):
            return None
        if str(re_.params) != str(e.params):
            return None
        for ra, a in zip(re_.invars, e.invars):
            if isinstance(ra, jcore.Literal):
                if not isinstance(a, jcore.Literal) or not _same_literal(ra, a):
                    return None
            elif vmap.get(ra) is not a:
                return None
        for ra, a in zip(re_.outvars, e.outvars):
            vmap[ra] = a
    out = ref.outvars[0]
    return None if isinstance(out, jcore.Literal) else vmap.get(out)


def _short(loc: str) -> str:
    """A source location with an installed package's path cut to the package (``flax/linen/...``)."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in loc:
            return loc[loc.index(marker) + len(marker) :]
    return loc


# ------------------------------------------------------------------------------------------
# The walk
# ------------------------------------------------------------------------------------------


class _Walker:
    def __init__(self, origins: dict[Any, str], num_iters: int, errors: list[str] | None = None):
        self.records: list[tuple[str, str, Any, Any, str | None]] = []
        self.errors: list[str] = [] if errors is None else errors  # shared with sub-walks
        self.origins = origins  # var -> parameter path, for values that are a parameter
        self.zeros: set[Any] = set()  # vars known to hold 0 (broadcast literals)
        self.num_iters = num_iters
        self.ctx: list[str] = [""]

    # -- reporting -------------------------------------------------------------------------
    def site(self, eqn: Any) -> str:
        loc = _short(_loc(eqn) or self.ctx[-1])
        stack = str(eqn.source_info.name_stack) if getattr(eqn.source_info, "name_stack", None) else ""
        where = f" at {loc}" if loc else ""
        return f"{eqn.primitive.name}{where}" + (f" [{stack}]" if stack else "")

    def refuse(self, eqn: Any, why: str | None = None) -> None:
        name = eqn.primitive.name
        why = why or _WHY.get(name) or f"no Lipschitz rule for {name!r} on an input-dependent value"
        raise NotCertifiable(f"{_NAME}: cannot certify {self.site(eqn)}: {why}")

    def record(self, eqn: Any, rule: str, factor: Any, out: _Dep, param: str | None = None) -> None:
        self.records.append((self.site(eqn), rule, factor, out.L, param))

    # -- running ---------------------------------------------------------------------------
    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], origins: Sequence[str | None] = ()) -> list[Any]:
        env: dict[Any, Any] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, a in zip(jaxpr.constvars, consts):
            env[v] = a
        for j, (v, a) in enumerate(zip(jaxpr.invars, args)):
            env[v] = a
            if j < len(origins) and origins[j]:
                self.origins[v] = origins[j]
        eqns = jaxpr.eqns
        skip_to = 0
        for i, eqn in enumerate(eqns):
            if i < skip_to:
                continue
            ins = [read(v) for v in eqn.invars]
            if any(_is_dep(a) for a in ins):
                hit = self.inline(eqns, i, eqn, ins)
                if hit is not None:
                    out_var, k, dep = hit
                    env[out_var] = dep
                    skip_to = i + k
                    continue
                outs = self.guarded(eqn, ins)
            else:
                outs = self.const_eqn(eqn, ins)
            for v, a in zip(eqn.outvars, outs):
                env[v] = a
        return [read(v) for v in jaxpr.outvars]

    def run_closed(self, closed: Any, args: Sequence[Any], origins: Sequence[str | None] = ()) -> list[Any]:
        if hasattr(closed, "jaxpr") and hasattr(closed, "consts"):
            return self.run(closed.jaxpr, closed.consts, args, origins)
        return self.run(closed, [], args, origins)

    def const_eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
        params = eqn.primitive.get_bind_params(eqn.params)
        if isinstance(params, tuple):  # older jax: (subfuns, params)
            subfuns, params = params
            ans = eqn.primitive.bind(*subfuns, *ins, **params)
        else:
            ans = eqn.primitive.bind(*ins, **params)
        outs = list(ans) if eqn.primitive.multiple_results else [ans]
        # structurally known zeros (``jnp.where(x > 0, x, 0)``'s broadcast 0): for _piecewise
        if eqn.primitive.name in ("broadcast_in_dim", "convert_element_type", "reshape") and eqn.invars:
            a = eqn.invars[0]
            zero = (isinstance(a, jcore.Literal) and np.all(np.asarray(a.val) == 0)) or (not isinstance(a, jcore.Literal) and a in self.zeros)
            if zero:
                self.zeros.add(eqn.outvars[0])
        # a parameter passed through a cast, transpose or reshape is still that parameter
        if eqn.primitive.name in _IDENTITY | {"transpose", "reshape", "squeeze", "broadcast_in_dim"} | _CALLS:
            src = [self.origins.get(v) for v in eqn.invars if not isinstance(v, jcore.Literal)]
            src = [s for s in src if s]
            if len(src) == 1 and len(eqn.outvars) == 1:
                self.origins[eqn.outvars[0]] = src[0]
        return outs

    def origin(self, atom: Any) -> str | None:
        return None if isinstance(atom, jcore.Literal) else self.origins.get(atom)

    # -- inline activations (jax.nn.gelu is not jitted) ------------------------------------
    def inline(self, eqns: Sequence[Any], i: int, eqn: Any, ins: list[Any]):
        first = eqn.primitive.name
        if first not in ("integer_pow", "mul"):
            return None
        deps = [(v, a) for v, a in zip(eqn.invars, ins) if _is_dep(a)]
        if len(deps) != 1:
            return None
        y, dep = deps[0]
        for name, (_, lip) in _INLINE_ACTIVATIONS.items():
            ref = _inline_reference(name, dep.shape, y.aval.dtype)
            out = _match_inline(ref, eqns, i, y)
            if out is not None:
                res = _Dep(_up(dep.L * _const_up(lip)), dep.shape, dep.batch)
                self.record(eqn, name, _const_up(lip), res)
                return out, len(ref.eqns), res
        return None

    # -- dependent ops ---------------------------------------------------------------------
    def guarded(self, eqn: Any, ins: list[Any]) -> list[Any]:
        """The rule's result; on a refusal, the reason is kept and the walk goes on with a
        poisoned value (``L = inf``) so that every problem is reported at once."""
        if any(_is_dep(a) and a.tag == ("poison",) for a in ins):
            return self.poisoned(eqn, ins)
        try:
            return self.dep_eqn(eqn, ins)
        except NotCertifiable as e:
            self.errors.append(str(e))
            return self.poisoned(eqn, ins)

    def poisoned(self, eqn: Any, ins: list[Any]) -> list[Any]:
        first = next(a for a in ins if _is_dep(a))
        outs = []
        for v in eqn.outvars:
            shape = _shape(v)
            b = first.batch if first.batch is not None and len(shape) == len(first.shape) else None
            outs.append(_Dep(jnp.asarray(jnp.inf, _dtype()), shape, b, ("poison",)))
        return outs

    def dep_eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        for v in eqn.outvars:
            if not _is_float(v) and name not in ("eq", "ne", "lt", "le", "gt", "ge"):
                self.refuse(eqn, f"its result ({v.aval.dtype}) is not a real float: no Lipschitz bound")
        if name in _CALLS:
            return self.call(eqn, ins)
        rule = getattr(self, "rule_" + name.replace("-", "_"), None)
        if rule is None:
            if name in _IDENTITY:
                return [self.passthrough(eqn, ins)]
            if name in _ELEMENTWISE_LIP:
                return [self.scaled(eqn, ins[0], _ELEMENTWISE_LIP[name], name)]
            self.refuse(eqn)
        return rule(eqn, ins)

    def passthrough(self, eqn: Any, ins: list[Any]) -> _Dep:
        a = ins[0]
        if eqn.primitive.name == "convert_element_type" and not jnp.issubdtype(eqn.params["new_dtype"], jnp.inexact):
            self.refuse(eqn, "a cast of an input-dependent value to an integer type is not continuous")
        if not _is_float(eqn.invars[0]):
            self.refuse(eqn, f"a cast of an input-dependent {eqn.invars[0].aval.dtype} (a comparison: a step function) is not continuous")
        return _Dep(a.L, _shape(eqn.outvars[0]), a.batch, a.tag)

    def scaled(self, eqn: Any, a: _Dep, lip: float, rule: str) -> _Dep:
        out = _Dep(_up(a.L * _const_up(lip)) if lip != 1.0 else a.L, _shape(eqn.outvars[0]), a.batch)
        if lip != 1.0:
            self.record(eqn, rule, _const_up(lip), out)
        return out

    # calls, including named jax.nn activations
    def call(self, eqn: Any, ins: list[Any]) -> list[Any]:
        p = eqn.params
        act = p.get("name") if eqn.primitive.name in ("jit", "pjit") else None
        if act in _NAMED_ACTIVATIONS and _is_dep(ins[0]) and not any(_is_dep(a) for a in ins[1:]):
            avals = tuple((tuple(v.aval.shape), v.aval.dtype, bool(getattr(v.aval, "weak_type", False))) for v in eqn.invars)
            if _reference_body(act, avals) == str(p["jaxpr"]):
                lip = _NAMED_ACTIVATIONS[act][1](*ins[1:])
                a = ins[0]
                out = _Dep(_up(a.L * lip), _shape(eqn.outvars[0]), a.batch)
                self.record(eqn, act, lip, out)
                return [out]
        body = p.get("jaxpr") or p.get("call_jaxpr") or p.get("fun_jaxpr")
        if body is None:
            self.refuse(eqn, "a call without a body to read")
        inner = body.jaxpr.invars if hasattr(body, "jaxpr") else body.invars
        for outer, v in zip(eqn.invars, inner):
            if (isinstance(outer, jcore.Literal) and np.all(np.asarray(outer.val) == 0)) or (
                not isinstance(outer, jcore.Literal) and outer in self.zeros
            ):
                self.zeros.add(v)
        self.ctx.append(_loc(eqn) or self.ctx[-1])
        try:
            return self.run_closed(body, ins, [self.origin(v) for v in eqn.invars])
        finally:
            self.ctx.pop()

    # structural ops
    def rule_transpose(self, eqn, ins):
        a = ins[0]
        perm = tuple(eqn.params["permutation"])
        return [_Dep(a.L, _shape(eqn.outvars[0]), None if a.batch is None else perm.index(a.batch), None)]

    def rule_reshape(self, eqn, ins):
        a = ins[0]
        if eqn.params.get("dimensions") is not None:
            self.refuse(eqn, "a reshape with dimensions= is not supported")
        new = _shape(eqn.outvars[0])
        b = _reshape_batch(a.shape, new, a.batch)
        if b == "mixed":
            self.refuse(eqn, f"the reshape {a.shape} -> {new} merges or splits the example axis {a.batch} (mixes examples)")
        tag = a.tag if a.tag and a.tag[0] in ("max", "min", "rmax", "rmin") else None
        return [_Dep(a.L, new, b, tag)]

    def rule_squeeze(self, eqn, ins):
        a = ins[0]
        dims = tuple(d % len(a.shape) for d in eqn.params["dimensions"])
        if a.batch is not None and a.batch in dims:
            self.refuse(eqn, "the example axis is squeezed away")
        b = None if a.batch is None else a.batch - sum(d < a.batch for d in dims)
        tag = a.tag if a.tag and a.tag[0] in ("max", "min", "rmax", "rmin") else None
        return [_Dep(a.L, _shape(eqn.outvars[0]), b, tag)]

    def rule_broadcast_in_dim(self, eqn, ins):
        a = ins[0]
        out = _shape(eqn.outvars[0])
        bd = tuple(eqn.params["broadcast_dimensions"])
        copies = math.prod(out) // max(1, math.prod(a.shape))
        b = None if a.batch is None else bd[a.batch]
        if b is not None and out[b] != a.shape[a.batch]:
            self.refuse(eqn, "the example axis is broadcast")
        if copies == 1:
            tag = a.tag if a.tag and a.tag[0] in ("max", "min", "rmax", "rmin") else None
            return [_Dep(a.L, out, b, tag)]
        f = _const_up(math.sqrt(copies))
        res = _Dep(_up(a.L * f), out, b)
        self.record(eqn, f"broadcast ({copies} copies of each element)", f, res)
        return [res]

    def rule_rev(self, eqn, ins):
        a = ins[0]
        if a.batch is not None and a.batch in eqn.params["dimensions"]:
            self.refuse(eqn, "reversing the example axis reorders examples")
        return [_Dep(a.L, a.shape, a.batch)]

    def rule_slice(self, eqn, ins):
        a = ins[0]
        p = eqn.params
        starts, limits = p["start_indices"], p["limit_indices"]
        strides = p.get("strides") or (1,) * len(starts)
        if a.batch is not None and (starts[a.batch] != 0 or limits[a.batch] != a.shape[a.batch] or strides[a.batch] != 1):
            self.refuse(eqn, "slicing the example axis selects examples")
        tag = ("slice", a, _region(a.shape, starts, limits)) if all(s == 1 for s in strides) else None
        return [_Dep(a.L, _shape(eqn.outvars[0]), a.batch, tag)]

    def rule_split(self, eqn, ins):
        a = ins[0]
        axis = eqn.params["axis"]
        if a.batch == axis:
            self.refuse(eqn, "splitting the example axis separates examples")
        outs, lo = [], 0
        for v, n in zip(eqn.outvars, eqn.params["sizes"]):
            reg = tuple((lo, lo + n) if k == axis else (0, s) for k, s in enumerate(a.shape))
            outs.append(_Dep(a.L, _shape(v), a.batch, ("slice", a, reg)))
            lo += n
        return outs

    def rule_dynamic_slice(self, eqn, ins):
        a, *idx = ins
        if any(_is_dep(i) for i in idx):
            self.refuse(eqn, "input-dependent slice indices")
        if a.batch is not None and eqn.params["slice_sizes"][a.batch] != a.shape[a.batch]:
            self.refuse(eqn, "slicing the example axis selects examples")
        return [_Dep(a.L, _shape(eqn.outvars[0]), a.batch)]

    def rule_dynamic_update_slice(self, eqn, ins):
        op, upd, *idx = ins
        if any(_is_dep(i) for i in idx):
            self.refuse(eqn, "input-dependent update indices")
        # the result holds the operand outside the window and the update inside: Pythagoras
        ls = [d.L for d in (op, upd) if _is_dep(d)]
        b = op.batch if _is_dep(op) else None
        if _is_dep(upd) and upd.batch is not None:
            if b is not None and b != upd.batch:
                self.refuse(eqn, "operand and update have different example axes")
            if upd.shape[upd.batch] != _shape(eqn.outvars[0])[upd.batch]:
                self.refuse(eqn, "the update covers only some examples")
            b = upd.batch
        L = ls[0] if len(ls) == 1 else _up(jnp.sqrt(sum(l * l for l in ls)))
        return [_Dep(L, _shape(eqn.outvars[0]), b)]

    def rule_pad(self, eqn, ins):
        a, val = ins
        if _is_dep(val):
            self.refuse(eqn, "an input-dependent padding value")
        cfg = eqn.params["padding_config"]
        if a.batch is not None and tuple(cfg[a.batch]) != (0, 0, 0):
            self.refuse(eqn, "padding the example axis adds examples")
        b = a.batch
        return [_Dep(a.L, _shape(eqn.outvars[0]), b)]

    def rule_concatenate(self, eqn, ins):
        dim = eqn.params["dimension"]
        deps = [a for a in ins if _is_dep(a)]
        b = self._common_batch(eqn, deps)
        if b == dim:
            self.refuse(eqn, "concatenating along the example axis")
        wrapped = self._wrap(ins, dim) if len(deps) == len(ins) else None
        if wrapped is not None:
            return [wrapped]
        L = deps[0].L if len(deps) == 1 else _up(jnp.sqrt(sum(self._pair_squares(deps))))
        out = _Dep(L, _shape(eqn.outvars[0]), b)
        if len(deps) > 1:
            self.record(eqn, "concatenation (sqrt of the sum of squares)", jnp.asarray(jnp.nan, _dtype()), out)
        return [out]

    def rule_stack(self, eqn, ins):
        axis = eqn.params["axis"]
        deps = [a for a in ins if _is_dep(a)]
        b = self._common_batch(eqn, deps)
        if b is not None and axis <= b:
            b += 1
        L = deps[0].L if len(deps) == 1 else _up(jnp.sqrt(sum(d.L**2 for d in deps)))
        out = _Dep(L, _shape(eqn.outvars[0]), b)
        if len(deps) > 1:
            self.record(eqn, "stack (sqrt of the sum of squares)", jnp.asarray(jnp.nan, _dtype()), out)
        return [out]

    @staticmethod
    def _wrap(ins: list[_Dep], dim: int) -> _Dep | None:
        """``[s[n-p:], s, s[:q]]`` along ``dim`` (``jnp.pad(mode="wrap")``, Flax's CIRCULAR
        padding): tagged ``("wrap", base, pads)`` for the convolution rule. Its own ``L`` counts
        how often an element of ``base`` appears (at most 2 per axis when ``p + q <= n``)."""
        for k, s in enumerate(ins):
            left, right = ins[:k], ins[k + 1 :]
            if len(left) > 1 or len(right) > 1:
                continue
            n = s.shape[dim]

            def piece(o, lo, hi):
                if not (o.tag and o.tag[0] == "slice" and o.tag[1] is s):
                    return False
                return all(r == ((lo, hi) if a == dim else (0, s.shape[a])) for a, r in enumerate(o.tag[2]))

            p = left[0].shape[dim] if left else 0
            q = right[0].shape[dim] if right else 0
            if (left and not piece(left[0], n - p, n)) or (right and not piece(right[0], 0, q)) or p + q == 0:
                continue
            base, pads = (s.tag[1], dict(s.tag[2])) if s.tag and s.tag[0] == "wrap" else (s, {})
            if dim in pads or p + q > n:
                return None
            pads[dim] = (p, q)
            mult = 1
            for a, (lo, hi) in pads.items():
                m = base.shape[a]
                mult *= max(1 + (i >= m - lo) + (i < hi) for i in range(m))
            L = base.L if mult == 1 else _up(base.L * _const_up(math.sqrt(mult)))
            shape = tuple(x + sum(pads.get(a, (0, 0))) for a, x in enumerate(base.shape))
            return _Dep(L, shape, base.batch, ("wrap", base, tuple(sorted(pads.items()))))
        return None

    def _pair_squares(self, deps: list[_Dep]) -> list[Any]:
        """``L**2`` per part of a concatenation, pairing ``max(a, b)`` with ``min(a, b)`` (MaxMin):
        the pair is a permutation of ``(a, b)`` element-wise, so it counts ``La**2 + Lb**2``, and
        only ``Ls**2`` when ``a`` and ``b`` are disjoint slices of one ``s``; ``(max, min)`` of the
        same groups (a reduce over the same axes) is 1-Lipschitz (it is part of a sort)."""
        used: set[int] = set()
        out: list[Any] = []
        for i, p in enumerate(deps):
            if i in used or not p.tag or p.tag[0] not in ("max", "rmax"):
                continue
            want = "min" if p.tag[0] == "max" else "rmin"
            for j, q in enumerate(deps):
                if j in used or j == i or not q.tag or q.tag[0] != want:
                    continue
                group = math.prod(p.tag[1].shape[a] for a in p.tag[2]) if p.tag[0] == "rmax" else 0
                if p.tag[0] == "rmax" and q.tag[1] is p.tag[1] and q.tag[2] == p.tag[2] and group >= 2:
                    used |= {i, j}
                    out.append(p.tag[1].L ** 2)
                    break
                if p.tag[0] == "max" and {id(q.tag[1]), id(q.tag[2])} == {id(p.tag[1]), id(p.tag[2])}:
                    a, c = p.tag[1], p.tag[2]
                    used |= {i, j}
                    if (a.tag and c.tag and a.tag[0] == c.tag[0] == "slice" and a.tag[1] is c.tag[1]
                            and _disjoint(a.tag[2], c.tag[2])):
                        out.append(a.tag[1].L ** 2)
                    else:
                        out.append(a.L ** 2 + c.L ** 2)
                    break
        out += [d.L ** 2 for k, d in enumerate(deps) if k not in used]
        return out

    def _common_batch(self, eqn: Any, deps: list[_Dep]) -> int | None:
        bs = {d.batch for d in deps if d.batch is not None}
        if len(bs) > 1:
            self.refuse(eqn, f"operands with the example axis at different positions {sorted(bs)}")
        return bs.pop() if bs else None

    def rule_select_n(self, eqn, ins):
        pred, *cases = ins
        out_shape = _shape(eqn.outvars[0])
        if _is_dep(pred):
            zero = [isinstance(v, jcore.Literal) and np.all(np.asarray(v.val) == 0) or (not isinstance(v, jcore.Literal) and v in self.zeros)
                    for v in eqn.invars[1:]]
            return [self._piecewise(eqn, pred, cases, zero)]
        deps = [c for c in cases if _is_dep(c)]
        b = self._common_batch(eqn, deps)
        # each element comes from one case: |d out_i| <= max_k |d case_k,i|, summed over i
        L = deps[0].L if len(deps) == 1 else _up(jnp.sqrt(sum(d.L**2 for d in deps)))
        return [_Dep(L, out_shape, b)]

    def _piecewise(self, eqn, pred: _Dep, cases: list[Any], zero: list[bool]) -> _Dep:
        """``where(y >= 0, c1 * y, c2 * y)`` (leaky ReLU, and ReLU as ``where(y > 0, y, 0)``):
        every case a scalar multiple of the ``y`` compared with 0 (or 0) is continuous and
        ``max |c_k|``-Lipschitz."""
        if not (pred.tag and pred.tag[0] == "cmp0"):
            self.refuse(eqn, "a selection whose condition depends on the input (not continuous in general)")
        y = pred.tag[1]
        factors = []
        for c, z in zip(cases, zero):
            if z:
                factors.append(jnp.zeros((), _dtype()))
            elif c is y:
                factors.append(_const_up(1.0))
            elif _is_dep(c) and c.tag and c.tag[0] == "scaled" and c.tag[1] is y:
                factors.append(c.tag[2])
            else:
                self.refuse(eqn, "a selection whose condition depends on the input (not continuous in general)")
        f = functools.reduce(jnp.maximum, factors)
        out = _Dep(_up(y.L * f), _shape(eqn.outvars[0]), y.batch)
        self.record(eqn, "piecewise linear through 0 (leaky ReLU)", f, out)
        return out

    def _compare(self, eqn, ins):
        a, c = ins
        if _is_dep(c) or not _is_dep(a):
            a, c = c, a
        if _is_dep(c) or np.ndim(c) != 0:
            self.refuse(eqn, "a comparison of input-dependent values (not continuous)")
        zero = isinstance(c, (int, float, np.generic, np.ndarray)) and float(c) == 0.0
        return [_Dep(jnp.zeros((), _dtype()), _shape(eqn.outvars[0]), a.batch, ("cmp0", a) if zero else ("cmp", a))]

    rule_ge = rule_gt = rule_le = rule_lt = _compare

    # arithmetic
    def rule_add(self, eqn, ins):
        out_shape = _shape(eqn.outvars[0])
        deps = [a for a in ins if _is_dep(a)]
        b = self._common_batch(eqn, deps)
        parts = [self._dup(eqn, d, out_shape) for d in deps]
        if len(parts) == 1:
            return [_Dep(parts[0], out_shape, b)]
        out = _Dep(_up(parts[0] + parts[1]), out_shape, b)
        self.record(eqn, "sum of branches (L_a + L_b)", jnp.asarray(jnp.nan, _dtype()), out)
        return [out]

    rule_sub = rule_add_any = rule_add

    def _dup(self, eqn, d: _Dep, out_shape) -> Any:
        """``L`` of ``d`` implicitly broadcast to ``out_shape`` (rank-0 operands)."""
        n = math.prod(out_shape) // max(1, math.prod(d.shape))
        return d.L if n == 1 else _up(d.L * _const_up(math.sqrt(n)))

    @staticmethod
    def _copies_norm(a_shape, out_shape, c2: Any) -> Any:
        """``sqrt(max_j sum_{i -> j} c_i^2)``: the norm of ``a -> a (broadcast) * c`` where each
        element of ``a`` is copied along its size-1 (or missing) axes; its columns are orthogonal."""
        a_shape = (1,) * (len(out_shape) - len(a_shape)) + tuple(a_shape)
        c2 = jnp.broadcast_to(c2, out_shape)
        axes = tuple(k for k, (n, m) in enumerate(zip(a_shape, out_shape)) if n == 1 and m != 1)
        return jnp.sqrt(jnp.max(jnp.sum(c2, axis=axes))) if axes else jnp.sqrt(jnp.max(c2))

    def rule_mul(self, eqn, ins):
        a, c = ins
        if _is_dep(c):
            a, c = c, a
        if _is_dep(c):
            self.refuse(eqn)
        out_shape = _shape(eqn.outvars[0])
        c = jnp.asarray(c, _dtype())
        f = self._copies_norm(a.shape, out_shape, jnp.square(c))  # max|c| without broadcasting
        tag = ("scaled", a, f) if np.ndim(c) == 0 else None
        out = _Dep(_up(a.L * f), out_shape, a.batch, tag)
        self.record(eqn, "scale by a constant", f, out, self.origin(eqn.invars[1] if _is_dep(ins[0]) else eqn.invars[0]))
        return [out]

    def rule_div(self, eqn, ins):
        a, c = ins
        if _is_dep(c) or not _is_dep(a):
            self.refuse(eqn)
        out_shape = _shape(eqn.outvars[0])
        c = jnp.asarray(c, _dtype())
        f = self._copies_norm(a.shape, out_shape, 1.0 / jnp.square(c))
        out = _Dep(_up(a.L * f), out_shape, a.batch, ("scaled", a, f) if np.ndim(c) == 0 else None)
        self.record(eqn, "divide by a constant", f, out, self.origin(eqn.invars[1]))
        return [out]

    def rule_integer_pow(self, eqn, ins):
        if eqn.params["y"] == 1:
            return [ins[0]]
        self.refuse(eqn)

    def _minmax(self, eqn, ins, kind: str):
        a, c = ins
        out_shape = _shape(eqn.outvars[0])
        if _is_dep(a) and _is_dep(c):
            b = self._common_batch(eqn, [a, c])
            # |max(a,b) - max(a',b')| <= max(|da|, |db|): squares add up (each operand counted
            # with its copies when it is broadcast)
            same = a.shape == c.shape == out_shape
            if same and a.tag and c.tag and a.tag[0] == c.tag[0] == "slice" and a.tag[1] is c.tag[1] and _disjoint(a.tag[2], c.tag[2]):
                L = a.tag[1].L
            else:
                la, lc = self._dup(eqn, a, out_shape), self._dup(eqn, c, out_shape)
                L = _up(jnp.sqrt(la**2 + lc**2))
            return [_Dep(L, out_shape, b, (kind, a, c) if same else None)]
        d = a if _is_dep(a) else c
        return [_Dep(self._dup(eqn, d, out_shape), out_shape, d.batch)]  # a clamp: 1-Lipschitz

    def rule_max(self, eqn, ins):
        return self._minmax(eqn, ins, "max")

    def rule_min(self, eqn, ins):
        return self._minmax(eqn, ins, "min")

    def rule_clamp(self, eqn, ins):
        lo, a, hi = ins
        if _is_dep(lo) or _is_dep(hi):
            self.refuse(eqn, "clamp bounds that depend on the input")
        return [_Dep(a.L, a.shape, a.batch)]

    def rule_sort(self, eqn, ins):
        if len(ins) != 1:
            self.refuse(eqn, "a sort with several operands (keys and values) is not certified")
        a = ins[0]
        if a.batch == eqn.params["dimension"]:
            self.refuse(eqn, "sorting along the example axis mixes examples")
        return [_Dep(a.L, a.shape, a.batch)]  # sorting is 1-Lipschitz in L2 (GroupSort)

    # reductions and pooling
    def _reduce(self, eqn, ins, kind: str):
        a = ins[0]
        axes = tuple(eqn.params["axes"])
        if a.batch is not None and a.batch in axes:
            self.refuse(eqn, f"a {eqn.primitive.name} over the example axis mixes examples (batch statistics)")
        b = None if a.batch is None else a.batch - sum(x < a.batch for x in axes)
        out_shape = _shape(eqn.outvars[0])
        if kind == "sum":
            n = math.prod(a.shape[x] for x in axes)
            f = _const_up(math.sqrt(n))  # Cauchy-Schwarz: |sum of n| <= sqrt(n) ||.||
            out = _Dep(_up(a.L * f), out_shape, b)
            if n > 1:
                self.record(eqn, f"sum of {n} (sqrt n)", f, out)
            return [out]
        return [_Dep(a.L, out_shape, b, ("r" + kind, a, axes))]  # max over a group: 1-Lipschitz

    def rule_reduce_sum(self, eqn, ins):
        return self._reduce(eqn, ins, "sum")

    def rule_reduce_max(self, eqn, ins):
        return self._reduce(eqn, ins, "max")

    def rule_reduce_min(self, eqn, ins):
        return self._reduce(eqn, ins, "min")

    def _window(self, eqn, ins, kind: str):
        a = ins[0]
        p = eqn.params
        win, strides = tuple(p["window_dimensions"]), tuple(p["window_strides"])
        wdil = tuple(p.get("window_dilation") or (1,) * len(win))
        if any(d != 1 for d in p.get("base_dilation") or ()):
            self.refuse(eqn, "pooling with base dilation")
        if a.batch is not None and (win[a.batch] != 1 or strides[a.batch] != 1):
            self.refuse(eqn, "a pooling window over the example axis mixes examples")
        m = _window_overlap(win, strides, wdil)
        size = math.prod(win)
        out_shape = _shape(eqn.outvars[0])
        if kind == "sum":
            # ||out||^2 = sum_o (sum_{W_o} v)^2 <= |W| sum_o sum_{W_o} v^2 <= |W| m ||v||^2
            f = _const_up(math.sqrt(size * m))
            rule = f"sum pooling (window {size}, overlap {m}: sqrt(|W| m))"
        else:
            # |max_{W_o} v - max_{W_o} v'| <= ||dv on W_o||: each element in at most m windows
            f = _const_up(math.sqrt(m))
            rule = f"{kind} pooling (overlap {m}: sqrt(m))"
        out = _Dep(_up(a.L * f) if m * (size if kind == "sum" else 1) > 1 else a.L, out_shape, a.batch)
        self.record(eqn, rule, f, out)
        return [out]

    def rule_reduce_window_sum(self, eqn, ins):
        return self._window(eqn, ins, "sum")

    def rule_reduce_window_max(self, eqn, ins):
        return self._window(eqn, ins, "max")

    def rule_reduce_window_min(self, eqn, ins):
        return self._window(eqn, ins, "min")

    def rule_cumsum(self, eqn, ins):
        a = ins[0]
        ax = eqn.params["axis"]
        if a.batch == ax:
            self.refuse(eqn, "a cumulative sum over the example axis mixes examples")
        n = a.shape[ax]
        f = _const_up(math.sqrt(n * (n + 1) / 2))  # Frobenius norm of the triangle of ones
        out = _Dep(_up(a.L * f), a.shape, a.batch)
        self.record(eqn, "cumulative sum (Frobenius)", f, out)
        return [out]

    # linear layers
    def rule_dot_general(self, eqn, ins):
        lhs, rhs = ins
        if _is_dep(lhs) and _is_dep(rhs):
            self.refuse(eqn)
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        dep_left = _is_dep(lhs)
        x, w = (lhs, rhs) if dep_left else (rhs, lhs)
        xc, xb, wc, wb = (lc, lb, rc, rb) if dep_left else (rc, rb, lc, lb)
        w_atom = eqn.invars[1] if dep_left else eqn.invars[0]
        if x.batch is not None and x.batch in tuple(xc):
            self.refuse(eqn, "the contraction runs over the example axis (mixes examples)")
        w = jnp.asarray(w)
        w_free = [k for k in range(w.ndim) if k not in wc and k not in wb]
        # the map is block-diagonal over the dot batch axes and acts on each free index of x
        # alike: its norm is the largest norm of the (fan-out, fan-in) blocks of w.
        perm = list(wb) + w_free + list(wc)
        nb = math.prod(w.shape[k] for k in wb)
        m = jnp.transpose(w, perm).reshape(nb, math.prod(w.shape[k] for k in w_free), math.prod(w.shape[k] for k in wc))
        sigma = jnp.max(gram_stack(m.astype(acc_dtype(m.dtype)), self.num_iters)).astype(_dtype())
        # the example axis in the output: (dot batch, lhs free, rhs free)
        b = None
        if x.batch is not None:
            x_free = [k for k in range(len(x.shape)) if k not in xc and k not in xb]
            if x.batch in xb:
                b = list(xb).index(x.batch)
            elif dep_left:
                b = len(xb) + x_free.index(x.batch)
            else:
                lhs_free = len(w.shape) - len(wc) - len(wb)
                b = len(xb) + lhs_free + x_free.index(x.batch)
        out = _Dep(_up(x.L * sigma), _shape(eqn.outvars[0]), b)
        self.record(eqn, "linear (Gram bound of the matrix)", sigma, out, self.origin(w_atom))
        return [out]

    def rule_conv_general_dilated(self, eqn, ins):
        x, k = ins
        if _is_dep(k):
            self.refuse(eqn)
        p = eqn.params
        dn = p["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)
        if p.get("batch_group_count", 1) != 1:
            self.refuse(eqn, f"batch_group_count={p['batch_group_count']} is not certified")
        if x.batch is not None and x.batch != lhs_spec[0]:
            self.refuse(eqn, "the convolution slides over or sums the example axis (mixes examples)")
        nd = len(lhs_spec) - 2
        if nd not in _SPATIAL:
            self.refuse(eqn, f"{nd} spatial axes")
        letters = {rhs_spec[0]: "O", rhs_spec[1]: "I"}
        for i, j in enumerate(rhs_spec[2:]):
            letters[j] = _SPATIAL[nd][i]
        spec = ConvSpec(
            input_shape=tuple(x.shape[d] for d in lhs_spec[2:]),
            strides=tuple(int(s) for s in p["window_strides"]),
            padding=tuple((int(lo), int(hi)) for lo, hi in p["padding"]),
            kernel_dilation=tuple(int(d) for d in p["rhs_dilation"]),
            feature_group_count=int(p["feature_group_count"]),
            kernel_layout="".join(letters[a] for a in range(len(rhs_spec))),
            input_dilation=tuple(int(d) for d in p["lhs_dilation"]),
        )
        kern = jnp.asarray(k)
        circ = self._circular(x, p, lhs_spec, rhs_spec, kern, letters, nd)
        if circ is not None:
            base, sigma = circ
            out = _Dep(_up(base.L * sigma), _shape(eqn.outvars[0]), None if base.batch is None else out_spec[0])
            self.record(eqn, "circular convolution (Gram bound on the unpadded grid)", sigma, out, self.origin(eqn.invars[1]))
            return [out]
        try:
            sigma = conv_sigma_gram(kern.astype(acc_dtype(kern.dtype)), spec, num_iters=self.num_iters)
        except ValueError as e:
            self.refuse(eqn, f"no certified norm for this convolution: {e}")
        sigma = jnp.asarray(sigma, _dtype())
        out = _Dep(_up(x.L * sigma), _shape(eqn.outvars[0]), None if x.batch is None else out_spec[0])
        self.record(eqn, "convolution (Gram bound of the operator)", sigma, out, self.origin(eqn.invars[1]))
        return [out]

    def _circular(self, x: _Dep, p, lhs_spec, rhs_spec, kern, letters, nd):
        """A VALID convolution of a wrap-padded input is a row selection of the circular
        convolution of the unpadded input when no output row repeats (``p + q <= k_eff - 1`` on
        every spatial axis): its norm is at most the circular norm (stride 1, the same grid)."""
        if not (x.tag and x.tag[0] == "wrap"):
            return None
        base, pads = x.tag[1], dict(x.tag[2])
        spatial = lhs_spec[2:]
        if set(pads) != set(spatial) or any(tuple(pp) != (0, 0) for pp in p["padding"]):
            return None
        if any(int(d) != 1 for d in p["lhs_dilation"]):
            return None
        if base.batch is not None and base.batch != lhs_spec[0]:
            return None
        k_eff = []
        for i, a in enumerate(spatial):
            k_eff.append((kern.shape[rhs_spec[2 + i]] - 1) * int(p["rhs_dilation"][i]) + 1)
            if sum(pads[a]) > k_eff[-1] - 1:
                return None
        grid = tuple(base.shape[a] for a in spatial)
        strides = tuple(int(st) for st in p["window_strides"])
        # Flax's CIRCULAR pads ((k-1)//2, k//2): then the operator is exactly ConvSpec's CIRCULAR
        # one, strides included; otherwise bound it by the stride-1 circular operator (more rows)
        flax = tuple(((k - 1) // 2, k // 2) for k in k_eff)
        exact = flax == tuple(tuple(pads[a]) for a in spatial)
        spec = ConvSpec(
            input_shape=grid,
            strides=strides if exact else 1,
            padding="CIRCULAR",
            kernel_dilation=tuple(int(d) for d in p["rhs_dilation"]),
            feature_group_count=int(p["feature_group_count"]),
            kernel_layout="".join(letters[a] for a in range(len(rhs_spec))),
        )
        try:
            sigma = conv_sigma_gram(kern.astype(acc_dtype(kern.dtype)), spec, num_iters=self.num_iters)
        except ValueError:
            return None
        return base, jnp.asarray(sigma, _dtype())

    # control flow
    def rule_cond(self, eqn, ins):
        idx, *ops = ins
        if _is_dep(idx):
            self.refuse(eqn, "a branch chosen by an input-dependent value (not continuous)")
        branches = eqn.params["branches"]
        results = []
        for br in branches:
            sub = _Walker(self.origins, self.num_iters, self.errors)
            sub.ctx = self.ctx + [_loc(eqn) or self.ctx[-1]]
            results.append(sub.run_closed(br, ops, [self.origin(v) for v in eqn.invars[1:]]))
            self.records += [(s, f"{r} (in a branch)", f, L, pa) for s, r, f, L, pa in sub.records]
        outs = []
        for j, v in enumerate(eqn.outvars):
            vals = [r[j] for r in results]
            deps = [d for d in vals if _is_dep(d)]
            if not deps:
                outs.append(None)
                continue
            b = self._common_batch(eqn, deps)
            outs.append(_Dep(functools.reduce(jnp.maximum, [d.L for d in deps]), _shape(v), b))
        if any(o is None for o in outs):
            # outputs that depend on no input: compute them with the real cond (dependent operands zeroed)
            zeros = [jnp.zeros(v.aval.shape, v.aval.dtype) if _is_dep(a) else a for v, a in zip(eqn.invars[1:], ops)]
            consts = self.const_eqn(eqn, [idx, *zeros])
            outs = [c if o is None else o for o, c in zip(outs, consts)]
        return outs

    def rule_while(self, eqn, ins):
        self.refuse(eqn)

    def rule_scan(self, eqn, ins):
        p = eqn.params
        nc, ncarry = p["num_consts"], p["num_carry"]
        body = p["jaxpr"]
        length = p["length"]
        consts, carry, xs = ins[:nc], ins[nc : nc + ncarry], ins[nc + ncarry :]
        for a in xs:
            if _is_dep(a) and a.batch == 0:
                self.refuse(eqn, "a scan over the example axis mixes examples")
        origins = [self.origin(v) for v in eqn.invars]
        x_slices = [_Dep(a.L, a.shape[1:], None if a.batch is None else a.batch - 1) if _is_dep(a) else a for a in xs]
        # which carries are dependent: a fixpoint (a constant carry that meets the input becomes
        # dependent, with the constant's own L = 0)
        dep_flags = [_is_dep(c) for c in carry]
        carry_batch = [c.batch if _is_dep(c) else None for c in carry]
        for _ in range(ncarry + 2):
            trial = [
                _Dep(jnp.zeros((), _dtype()), tuple(v.aval.shape), carry_batch[j]) if dep_flags[j] else c
                for j, (v, c) in enumerate(zip(body.jaxpr.invars[nc : nc + ncarry], carry))
            ]
            xs_abs = [a if _is_dep(a) else jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in x_slices]
            outs = self._scan_structure(body, consts, trial, xs_abs, origins)
            new_flags = [f or _is_dep(o) for f, o in zip(dep_flags, outs[:ncarry])]
            for j, o in enumerate(outs[:ncarry]):
                if _is_dep(o):
                    if dep_flags[j] and carry_batch[j] != o.batch:
                        self.refuse(eqn, "a carry whose example axis moves between iterations")
                    carry_batch[j] = o.batch
            if new_flags == dep_flags:
                break
            dep_flags = new_flags
        ys_shapes = [_shape(v) for v in eqn.outvars[ncarry:]]
        n_records = len(self.records)

        def step(c_vals, x_vals):
            sub = _Walker(self.origins, self.num_iters, self.errors)
            sub.ctx = self.ctx + [_loc(eqn) or self.ctx[-1]]
            cin = [
                _Dep(c, tuple(v.aval.shape), carry_batch[j]) if dep_flags[j] else c
                for j, (v, c) in enumerate(zip(body.jaxpr.invars[nc : nc + ncarry], c_vals))
            ]
            xin = [
                _Dep(sl.L, sl.shape, sl.batch) if _is_dep(sl) else xv for sl, xv in zip(x_slices, x_vals)
            ]
            outs = sub.run_closed(body, [*consts, *cin, *xin], origins)
            cout = []
            for j, o in enumerate(outs[:ncarry]):
                if dep_flags[j]:
                    cout.append(o.L if _is_dep(o) else jnp.zeros((), _dtype()))
                else:
                    cout.append(o)
            ys = [o.L if _is_dep(o) else o for o in outs[ncarry:]]
            step.meta = [(s, r, pa) for s, r, f, L, pa in sub.records]
            step.ydep = [_is_dep(o) for o in outs[ncarry:]]
            step.ybatch = [o.batch if _is_dep(o) else None for o in outs[ncarry:]]
            return cout, (ys, [(f, L) for s, r, f, L, pa in sub.records])

        c0 = [c.L if dep_flags[j] and _is_dep(c) else jnp.zeros((), _dtype()) if dep_flags[j] else c for j, c in enumerate(carry)]
        x0 = [jnp.zeros((length,), _dtype()) if _is_dep(a) else a for a in xs]
        cfin, (ys, recs) = jax.lax.scan(step, c0, x0, length=length, reverse=p.get("reverse", False), unroll=1)
        del self.records[n_records:]
        for (s, r, pa), (f, L) in zip(step.meta, recs):
            self.records.append((s, f"{r} (scanned)", f, L, pa))
        outs = [
            _Dep(c, _shape(v), carry_batch[j]) if dep_flags[j] else c for j, (v, c) in enumerate(zip(eqn.outvars[:ncarry], cfin))
        ]
        for y, isdep, yb, shp in zip(ys, step.ydep, step.ybatch, ys_shapes):
            if isdep:
                # stacked outputs: ||d ys||^2 = sum_t ||d y_t||^2
                outs.append(_Dep(_up(jnp.sqrt(jnp.sum(y * y))), shp, None if yb is None else yb + 1))
            else:
                outs.append(y)
        return outs

    def _scan_structure(self, body, consts, carry, xs_abs, origins):
        """Which body outputs are dependent, by an abstract run of the walk."""
        result: list[Any] = []

        def probe(*args):
            n = len(carry)
            cvals = list(args[:n])
            xvals = list(args[n:])
            sub = _Walker(dict(self.origins), self.num_iters, [])
            cin = [c if _is_dep(c) else v for c, v in zip(carry, cvals)]
            xin = [x if _is_dep(x) else v for x, v in zip(xs_abs, xvals)]
            outs = sub.run_closed(body, [*consts, *cin, *xin], origins)
            result[:] = [o if _is_dep(o) else None for o in outs]
            return [jnp.zeros(()) for _ in outs]

        cargs = [jnp.zeros((), _dtype()) if _is_dep(c) else c for c in carry]
        xargs = [jnp.zeros((), _dtype()) if _is_dep(x) else x for x in xs_abs]
        jax.eval_shape(probe, *cargs, *xargs)
        return [o if o is not None else 0 for o in result]


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------


def _probe_batch(call: Callable[[Any], Any], x: Any) -> int | None:
    """0 when ``fn`` maps a leading axis of ``x`` example by example (the output's leading axis
    follows it when it changes size), else None."""
    if np.ndim(x) == 0:
        return None
    n = int(np.shape(x)[0])

    def out_lead(m: int):
        try:
            out = jax.eval_shape(call, jax.ShapeDtypeStruct((m, *np.shape(x)[1:]), x.dtype))
        except Exception:
            return None
        leads = {np.shape(o)[0] if np.ndim(o) else None for o in jax.tree_util.tree_leaves(out)}
        return leads.pop() if len(leads) == 1 else None

    a, b = out_lead(n + 1), out_lead(n + 2)
    return 0 if a == n + 1 and b == n + 2 else None


_CACHE: dict[Any, tuple[Callable[..., Any], list]] = {}


def _sources(jaxpr: Any) -> tuple:
    """Every equation's source line and module path, nested bodies included: part of the cache
    key, so that two models with the same jaxpr text keep their own sites in reports."""
    out = []

    def visit(j):
        j = getattr(j, "jaxpr", j)
        for eqn in j.eqns:
            ns = getattr(eqn.source_info, "name_stack", None)
            out.append((_loc(eqn), str(ns) if ns else ""))
            for v in eqn.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        visit(sub)

    visit(jaxpr)
    return tuple(out)


def lipschitz_certificate(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    batch_axis: int | None | str = "auto",
    num_iters: int = 12,
    **kwargs: Any,
) -> Certificate:
    r"""A certified upper bound on the L2 Lipschitz constant of ``x -> fn(params, x, ...)``.

    ``x`` is the first of ``args`` (a float array); the other ``args`` and ``kwargs`` are
    passed to ``fn`` as they are and held fixed. The bound is per example: for every example
    ``i`` and inputs ``x, x'`` that differ only in example ``i``,

    .. math:: \lVert f(x)_i - f(x')_i \rVert_2 \le L \, \lVert x_i - x'_i \rVert_2,

    for the mathematical function the jaxpr describes (exact arithmetic: the forward pass's
    own rounding is not covered). The whole output (every array ``fn`` returns) is the vector.

    **How.** ``fn`` is traced once (:func:`jax.make_jaxpr`; nothing of the model runs) and its
    equations are walked in order. Values that do not depend on ``x`` are computed; for every
    value that does, a bound ``L`` on the Lipschitz constant of ``x ->`` value is propagated:

    ====================================  ===================================================
    op                                    bound on the result
    ====================================  ===================================================
    ``x @ W``, ``dot_general`` with a     ``sigma_max`` of ``W`` as a (fan-out, fan-in)
    constant (any layout, batched dims)   matrix, max over dot batch blocks: Gram iteration,
                                          certified (:func:`sigma_gram`) — times ``L``
    convolution with a constant kernel    operator norm (:func:`conv_sigma_gram`: strides,
                                          padding, dilations, groups) times ``L``
    ``a + b``, ``a - b`` (both depend)    ``L_a + L_b`` (so ``x + f(x)`` gives ``1 + L_f``)
    ``a + c``, bias, ``neg``, casts       ``L``
    ``a * c``, ``a / c`` (``c`` const)    ``max|c| L`` / ``max|1/c| L``
    concatenate, ``dynamic_update_slice`` ``sqrt(sum L_i^2)``
    slice, split, reshape, transpose,     ``L`` (a reshape that mixes the example axis is
    pad, rev, squeeze, ``select_n``       refused)
    broadcast (``n`` copies)              ``sqrt(n) L``
    ``reduce_sum`` of ``n``; mean         ``sqrt(n) L``; ``L / sqrt(n)``
    ``reduce_max``/``min``, ``sort``      ``L`` (GroupSort, and ``max``/``min`` pairs of
                                          MaxMin are recognised: ``L``, not ``sqrt 2 L``)
    ``max(a, b)``/``min(a, b)``           ``sqrt(L_a^2 + L_b^2)`` (``L`` for disjoint slices)
    sum pooling (window ``|W|``, each     ``sqrt(|W| m) L``; average pooling divides by
    element in ``<= m`` windows)          ``|W|``: ``sqrt(m / |W|) L``
    max pooling                           ``sqrt(m) L``
    activations                           relu, relu6, hard_tanh, abs, tanh, softplus,
                                          log_sigmoid, soft_sign, sin, cos, celu: 1; sigmoid
                                          1/4; gelu 1.13; silu 1.1; mish 1.089; elu, leaky
                                          relu ``max(1, |alpha|)``; selu 1.7581; hard_silu 1.5
    ``jit``, ``remat``, custom jvp/vjp    the body, followed
    ``scan``                              iterated in a ``lax.scan`` (stacked layers: each
                                          layer with its own weights); stacked outputs
                                          ``sqrt(sum_t L_t^2)``
    ``cond``/``switch``                   the largest over branches
    ====================================  ===================================================

    Every step is rounded up (``1 + 4 eps`` per step; constants rounded up). Refused, with a
    :class:`NotCertifiable` error naming the op and its source line: products of two
    input-dependent values (attention's ``q kᵀ``, gating), division by one, ``exp``, ``log``,
    powers, ``sqrt``/``rsqrt`` (LayerNorm, RMSNorm: not globally Lipschitz), ``while`` loops,
    selections or branches chosen by the input (except a leaky-ReLU pattern), integer casts,
    gathers from input-dependent arrays, reductions, contractions, pooling or reshapes over the
    example axis (batch statistics, mixing examples), and any op without a rule.

    Args:
      fn: called as ``fn(params, x, *rest, **kwargs)``.
      params: the parameter pytree (arrays; ``flax.nnx.State``, Equinox modules, dicts).
      *args: ``x`` (a float array: its values do not matter, only its shape) and the rest.
      batch_axis: the example axis of ``x``: ``0``; ``None`` when ``fn`` takes one example;
        ``"auto"`` (default): 0 when the output's leading axis follows a change of ``x``'s
        (``fn`` is traced at two more batch sizes), else None.
      num_iters: Gram iterations for every operator norm (more is tighter and costs more).
      **kwargs: passed to ``fn`` (``train=False``, ``deterministic=True``).

    Returns:
      a :class:`Certificate`: ``bound`` (a scalar array; ``float(cert)``) and ``ops``, one
      :class:`OpBound` per op that changed the bound (``cert.table()`` prints them). The walk
      runs compiled and is cached by the jaxpr: a second call with the same model and shapes
      only runs the norms.

    >>> import jax, jax.numpy as jnp
    >>> def block(p, x):                                  # a residual block: x + W2 relu(W1 x)
    ...     return x + jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> p = {"w1": 2.0 * jnp.eye(4), "w2": 3.0 * jnp.eye(4)}
    >>> round(float(lipschitz_certificate(block, p, jnp.zeros((8, 4)))), 2)   # 1 + 2 * 3, rounded up
    7.0

    References: Gram iteration: Delattre, Barthélemy, Araujo & Allauzen, "Efficient bound of
    Lipschitz constant for convolutional layers by Gram iteration", ICML 2023; the graph view
    and residual bounds: Fazlyab et al., "Efficient and accurate estimation of Lipschitz
    constants for deep neural networks", NeurIPS 2019 (the naive product bound it improves
    on); GroupSort: Anil, Lucas & Grosse, "Sorting out Lipschitz function approximation",
    ICML 2019; certified radii: Tsuzuku, Sato & Sugiyama, "Lipschitz-margin training", 2018.
    """
    if not args:
        raise TypeError(f"{_NAME}: pass the input: lipschitz_certificate(fn, params, x, ...)")
    x, rest = args[0], args[1:]
    if not hasattr(x, "shape") or not jnp.issubdtype(jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype, jnp.floating):
        raise NotCertifiable(
            f"{_NAME}: the input (first argument after params) must be a float array, got "
            f"{getattr(x, 'dtype', type(x).__name__)}: the certificate is with respect to it"
        )
    num_iters = int(num_iters)
    if num_iters < 1:
        raise ValueError(f"{_NAME}: num_iters must be >= 1, got {num_iters}")

    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    leaves = [v for _, v in flat]
    arr = [isinstance(v, (jax.Array, np.ndarray)) or hasattr(v, "shape") and hasattr(v, "dtype") for v in leaves]
    dyn = [v for v, t in zip(leaves, arr) if t]

    def call_with(dparams, xx):
        it = iter(dparams)
        p = treedef.unflatten([next(it) if t else v for v, t in zip(leaves, arr)])
        return fn(p, xx, *rest, **kwargs)

    if batch_axis == "auto":
        batch_axis = _probe_batch(lambda xx: call_with(dyn, xx), x)
    elif batch_axis is not None:
        if not isinstance(batch_axis, int) or not -x.ndim <= batch_axis < x.ndim:
            raise ValueError(f"{_NAME}: batch_axis must be an axis of x {tuple(x.shape)}, None or 'auto'; got {batch_axis!r}")
        batch_axis %= x.ndim
    shape = list(x.shape)
    if batch_axis is not None:
        shape[batch_axis] = max(2, shape[batch_axis])  # two examples at least: mixing is visible
    x_abs = jax.ShapeDtypeStruct(tuple(shape), x.dtype)
    closed = jax.make_jaxpr(call_with)(dyn, x_abs)
    jaxpr = closed.jaxpr
    n_par = len(dyn)
    dyn_paths = [p for p, t in zip(paths, arr) if t]

    key = (str(jaxpr), _sources(jaxpr), tuple(dyn_paths), batch_axis, num_iters, jax.config.jax_enable_x64,
           tuple((np.shape(c), str(getattr(c, "dtype", type(c)))) for c in closed.consts))
    hit = _CACHE.get(key)
    if hit is None:
        meta: list = []

        def walk(dparams, consts):
            w = _Walker({}, num_iters)
            x_dep = _Dep(jnp.ones((), _dtype()), tuple(shape), batch_axis)
            outs = w.run(jaxpr, consts, [*dparams, x_dep], [*dyn_paths, None])
            if w.errors:
                seen = list(dict.fromkeys(w.errors))
                more = f"\n  ... and {len(seen) - 8} more" if len(seen) > 8 else ""
                head = f"{_NAME}: no certified bound: {len(seen)} op(s) have none\n  " if len(seen) > 1 else ""
                raise NotCertifiable(head + "\n  ".join(seen[:8]) + more)
            deps = [o for o in outs if _is_dep(o)]
            if not deps:
                L = jnp.zeros((), _dtype())
            elif len(deps) == 1:
                L = deps[0].L
            else:
                L = _up(jnp.sqrt(sum(d.L**2 for d in deps)))
            meta[:] = [(s, r, pa) for s, r, f, LL, pa in w.records]
            return L, [(jnp.asarray(f, _dtype()), jnp.asarray(LL, _dtype())) for s, r, f, LL, pa in w.records]

        hit = (jax.jit(walk), meta)
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = hit
    compiled, meta = hit
    L, recs = compiled(dyn, list(closed.consts))
    ops = tuple(OpBound(s, r, f, b, pa) for (s, r, pa), (f, b) in zip(meta, recs))
    return Certificate(L, ops)


def _bound_value(bound: Any) -> Any:
    return bound.bound if isinstance(bound, Certificate) else bound


def certified_radius(logits: Any, labels: Any, bound: Any) -> jax.Array:
    r"""Each example's certified L2 radius: ``max(margin, 0) / (sqrt(2) L)``.

    With ``L`` the Lipschitz constant of ``x -> logits`` (L2 -> L2), each difference
    ``f_y - f_j`` is ``sqrt(2) L``-Lipschitz (``||e_y - e_j|| = sqrt 2``), so an example
    classified correctly with margin ``m = f_y - max_{j != y} f_j`` keeps its label for every
    perturbation of L2 norm below ``m / (sqrt(2) L)`` (Tsuzuku, Sato & Sugiyama 2018). A
    misclassified example (or a tie) gets 0.

    Args:
      logits: ``(N, classes)``.
      labels: ``(N,)`` integer labels.
      bound: ``L`` (a number, an array or a :class:`Certificate`).

    >>> import jax.numpy as jnp
    >>> certified_radius(jnp.array([[3.0, 1.0], [0.0, 2.0]]), jnp.array([0, 0]), 1.0)
    Array([1.4142135, 0.       ], dtype=float32)
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"certified_radius: logits must be (N, classes) and labels (N,); got {logits.shape} and {labels.shape}")
    L = jnp.asarray(_bound_value(bound), acc_dtype(logits.dtype))
    logits = logits.astype(L.dtype)
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    other = jnp.max(jnp.where(jax.nn.one_hot(labels, logits.shape[1], dtype=bool), -jnp.inf, logits), axis=1)
    margin = jnp.maximum(true - other, 0.0)
    return jnp.where(margin > 0, margin / (jnp.sqrt(jnp.asarray(2.0, L.dtype)) * L), 0.0)


def certified_accuracy(logits: Any, labels: Any, bound: Any, radii: Any) -> jax.Array:
    """The fraction of examples certified correct at each radius: ``mean(radius > eps)``.

    At ``eps = 0`` it is the clean accuracy (ties count as wrong).

    >>> import jax.numpy as jnp
    >>> certified_accuracy(jnp.array([[3.0, 1.0], [0.0, 1.0]]), jnp.array([0, 1]), 1.0, [0.0, 1.0, 2.0])
    Array([1. , 0.5, 0. ], dtype=float32)
    """
    r = certified_radius(logits, labels, bound)
    radii = jnp.asarray(radii, r.dtype)
    return jnp.mean(r[None, :] > jnp.reshape(radii, (-1, 1)), axis=1)
