"""Every parameter's view, read from the model's own computation (a jaxpr; nothing runs).

:func:`infer_views` traces ``fn(params, *args, **kwargs)`` with :func:`jax.make_jaxpr` and
walks the equations with an abstract value per variable:

- an *activation* (:class:`_Act`): depends on the input. It also remembers, while it can,
  which elements of an earlier activation it holds (``maps``), so that the pads Flax writes
  with ``jnp.pad`` before a ``VALID`` convolution are recognised;
- a *parameter value* (:class:`_Par`): depends on parameters only (or on nothing: a
  constant). Per axis it lists the leaf axes ``(leaf, axis)`` it carries (its *atoms*), and
  ``lost`` names the leaves it depends on through an op that lost the axis map.

When a parameter value meets an activation in an op the op says what the leaf is (a *read*);
every read of a leaf must agree.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from normjax._conv import ConvSpec
from normjax._select import path_str
from normjax._viewtypes import Embedding, MatrixDims, NotMatrix

__all__ = ["infer_views"]

Atom = tuple[int, int]  # (leaf index, leaf axis)
_NAME = "infer_views"
_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}

# Ops through which a value is passed on unchanged (same elements, same axes).
_IDENTITY = {
    "convert_element_type", "copy", "copy_p", "reduce_precision", "stop_gradient", "optimization_barrier",
    "sharding_constraint", "mesh_cast", "reshard", "device_put",
}
# Ops that only look at values (printing): they read nothing.
_OBSERVERS = {"debug_print", "debug_callback"}
# Call-like higher-order primitives: their operands are the body's invars, one to one.
_CALLS = {
    "jit", "pjit", "closed_call", "core_call", "call", "remat", "remat2", "checkpoint",
    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin",
}
# Element-wise ops of several operands: the role a parameter operand plays next to an activation.
_ELEMENTWISE_ROLE = {"add": "bias", "sub": "bias", "add_any": "bias", "mul": "scale", "div": "scale"}
_ELEMENTWISE = set(_ELEMENTWISE_ROLE) | {
    "max", "min", "pow", "atan2", "rem", "nextafter", "select_n", "clamp", "and", "or", "xor",
    "eq", "ne", "lt", "le", "gt", "ge", "complex",
}
_UNARY = {
    "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "abs", "sign", "sqrt", "rsqrt",
    "cbrt", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh",
    "integer_pow", "square", "erf", "erfc", "erf_inv", "floor", "ceil", "round", "is_finite", "not",
    "lgamma", "digamma", "real", "imag", "conj",
}
# Ops whose output no longer holds the operand's elements at their places (a padded input is used up).
_CONSUMING = {
    "dot_general", "conv_general_dilated", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
    "reduce_and", "reduce_or", "argmax", "argmin",
}


def _loc(eqn: Any) -> str:
    """The user's source line of an equation, ``""`` where jax does not know it."""
    try:
        from jax._src import source_info_util

        loc = source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover - private API moved
        return ""
    return "" if not loc or loc == "unknown" else loc


def _site(eqn: Any, ctx: str = "") -> str:
    """``"dot_general at file.py:12 (fn)"``: the op and, where jax knows it, the user's line
    (else ``ctx``, the line of the call it is inside)."""
    loc = _loc(eqn) or ctx
    return f"{eqn.primitive.name} at {loc}" if loc else eqn.primitive.name


# ------------------------------------------------------------------------------------------
# Abstract values
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Par:
    """A value of parameters (or constants) only.

    ``axes[i]`` holds the leaf axes value axis ``i`` runs over, outer to inner (a merge of
    several; a piece of one after a split or a slice; none for a broadcast or new axis).
    ``lost`` maps leaves this value depends on without an axis map to the op that lost it.
    ``flips`` are the atoms reversed by ``rev``; ``val`` a known scalar constant.
    """

    shape: tuple[int, ...]
    axes: tuple[tuple[Atom, ...], ...]
    lost: tuple[tuple[int, str], ...] = ()
    flips: frozenset = frozenset()
    val: Any = None
    links: frozenset = frozenset()  # leaves carried linearly, with or without atoms (a 0-d leaf)
    pieces: frozenset = frozenset()  # atoms split by a reshape (their element order is not tracked)

    def __post_init__(self):
        object.__setattr__(self, "links", frozenset(self.links) | {a[0] for ax in self.axes for a in ax})

    @property
    def leaves(self) -> set[int]:
        return set(self.links) | {k for k, _ in self.lost}

    @property
    def has_atoms(self) -> bool:
        return any(self.axes)

    @property
    def is_const(self) -> bool:
        return not self.lost and not self.links


def _const(shape: Sequence[int], val: Any = None) -> _Par:
    shape = tuple(int(s) for s in shape)
    return _Par(shape, ((),) * len(shape), val=val)


def _like(p: _Par, shape: Sequence[int], axes: Sequence[tuple[Atom, ...]], **changes: Any) -> _Par:
    """``p`` with a new shape and axis map (same leaves, lost ops, flips and pieces)."""
    return dataclasses.replace(p, shape=tuple(shape), axes=tuple(axes), val=changes.pop("val", None), **changes)


def _union(pars: Sequence[_Par], shape: Sequence[int], axes: Sequence[tuple[Atom, ...]]) -> _Par:
    """A linear combination of several parameter values (a sum, a concatenation, a join)."""
    return _Par(
        tuple(shape),
        tuple(axes),
        _merge_lost(*(p.lost for p in pars)),
        frozenset().union(*(p.flips for p in pars)),
        links=frozenset().union(*(p.links for p in pars)),
        pieces=frozenset().union(*(p.pieces for p in pars)),
    )


def _merge_lost(*losts: tuple[tuple[int, str], ...]) -> tuple[tuple[int, str], ...]:
    out: dict[int, str] = {}
    for lost in losts:
        for k, d in lost:
            out.setdefault(k, d)
    return tuple(sorted(out.items()))


def _lose(p: _Par, shape: Sequence[int], site: str) -> _Par:
    """Every leaf of ``p`` without its axis map: ``site`` is the op that lost it."""
    return _Par(tuple(shape), ((),) * len(shape), _merge_lost(p.lost, tuple((k, site) for k in sorted(p.leaves))))


_TOKENS = itertools.count()


@dataclasses.dataclass(frozen=True, eq=False)
class _Act:
    """An activation. ``maps`` (``None``: the identity) says, per value axis, which axis of
    the base value (``token``) it runs along and the base index of each element (``-1``: a
    zero of a pad; base axis ``None``: a new size-1 axis); ``fixed`` holds base axes dropped
    at a fixed index. ``dup``: it may hold duplicated elements no longer tracked (a wrap or
    reflect pad followed by an op that loses the maps)."""

    shape: tuple[int, ...]
    token: int
    base_shape: tuple[int, ...]
    maps: tuple[tuple[int | None, tuple[int, ...] | None], ...] | None = None
    fixed: frozenset = frozenset()
    dup: bool = False


def _fresh(shape: Sequence[int], dup: bool = False) -> _Act:
    shape = tuple(int(s) for s in shape)
    return _Act(shape, next(_TOKENS), shape, None, frozenset(), dup)


def _full_maps(a: _Act) -> list[tuple[int | None, tuple[int, ...]]]:
    if a.maps is None:
        return [(i, tuple(range(n))) for i, n in enumerate(a.base_shape)]
    return [(b, tuple(range(a.base_shape[b])) if idx is None and b is not None else (idx if idx is not None else (0,)))
            for b, idx in a.maps]


def _has_dup(idx: Sequence[int]) -> bool:
    seen = [i for i in idx if i >= 0]
    return len(seen) != len(set(seen))


def _act_with(a: _Act, shape: Sequence[int], maps: list, fixed: frozenset | None = None, token: int | None = None) -> _Act:
    """A new activation holding elements of ``a``'s base at ``maps``."""
    shape = tuple(int(s) for s in shape)
    fixed = a.fixed if fixed is None else fixed
    token = a.token if token is None else token
    identity = (
        not fixed
        and len(maps) == len(a.base_shape)
        and all(b == i and tuple(idx) == tuple(range(a.base_shape[i])) for i, (b, idx) in enumerate(maps))
    )
    return _Act(shape, token, a.base_shape, None if identity else tuple((b, tuple(idx)) for b, idx in maps), fixed, a.dup)


def _act_dup(a: _Act) -> bool:
    return a.dup or (a.maps is not None and any(_has_dup(idx) for _, idx in _full_maps(a)))


Abstract = _Par | _Act


# ------------------------------------------------------------------------------------------
# What the walk records
# ------------------------------------------------------------------------------------------


class _Record:
    """Reads and errors per leaf. A muted record (fixpoint passes of loops) keeps nothing."""

    def __init__(self, n: int, muted: bool = False):
        self.muted = muted
        self.reads: list[list[tuple[Any, str]]] = [[] for _ in range(n)]
        self.errors: list[list[str]] = [[] for _ in range(n)]
        self.touched: set[int] = set()

    def read(self, leaf: int, view: Any, site: str) -> None:
        if not self.muted and (view, site) not in self.reads[leaf]:
            self.reads[leaf].append((view, site))

    def error(self, leaf: int, msg: str) -> None:
        if not self.muted and msg not in self.errors[leaf]:
            self.errors[leaf].append(msg)

    def touch(self, leaves: set[int]) -> None:
        self.touched |= leaves


# ------------------------------------------------------------------------------------------
# The walk
# ------------------------------------------------------------------------------------------


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in getattr(v.aval, "shape", ()))


class _Walker:
    def __init__(self, paths: list[str], shapes: list[tuple[int, ...]], record: _Record):
        self.paths = paths
        self.shapes = shapes
        self.rec = record
        self.ctx = [""]  # locations of the calls being walked, for equations without their own

    def site(self, eqn: Any) -> str:
        return _site(eqn, self.ctx[-1])

    # -- helpers -------------------------------------------------------------------------

    def _override_hint(self, leaf: int) -> str:
        return f"pass overrides={{{self.paths[leaf]!r}: view}} to say what it is"

    def _cannot(self, leaf: int, site: str, detail: str = "") -> None:
        detail = f": {detail}" if detail else ""
        self.rec.error(leaf, f"cannot follow {site} on leaf {self.paths[leaf]!r}{detail}; {self._override_hint(leaf)}")

    def _lost_errors(self, p: _Par, site: str) -> None:
        for k, desc in p.lost:
            self.rec.error(
                k,
                f"cannot follow {desc} on leaf {self.paths[k]!r} (its result reaches {site}); "
                f"{self._override_hint(k)}",
            )

    def _role(self, p: _Par, role: str, site: str) -> None:
        for k in sorted(p.leaves):
            self.rec.read(k, NotMatrix(role), site)

    def _roles(self, p: _Par, roles: Sequence[str | None], site: str) -> dict[int, dict[int, set[str]]]:
        """``{leaf: {axis: {roles}}}`` from the value axes' roles (``None``: ignore the axis)."""
        out: dict[int, dict[int, set[str]]] = {}
        for ax, role in zip(p.axes, roles):
            if role is None:
                continue
            for k, a in ax:
                out.setdefault(k, {}).setdefault(a, set()).add(role)
        return out

    def _split_error(self, k: int, by_axis: dict[int, set[str]], site: str) -> bool:
        bad = {a: r for a, r in by_axis.items() if len(r) > 1}
        if bad:
            desc = ", ".join(f"axis {a} as {' and '.join(sorted(r))}" for a, r in sorted(bad.items()))
            self._cannot(k, site, f"pieces of one leaf axis play different roles ({desc})")
        return bool(bad)

    # -- the interpreter -----------------------------------------------------------------

    def run(self, jaxpr: Any, consts: Sequence[Abstract], args: Sequence[Abstract]) -> list[Abstract]:
        env: dict[Any, Abstract] = {}

        def read(v: Any) -> Abstract:
            if isinstance(v, jcore.Literal):
                val = v.val
                return _const(np.shape(val), val if np.ndim(val) == 0 else None)
            return env[v]

        for v, a in zip(jaxpr.constvars, consts):
            env[v] = a
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, a in zip(eqn.outvars, outs):
                env[v] = a
        return [read(v) for v in jaxpr.outvars]

    def run_closed(self, closed: Any, args: Sequence[Abstract]) -> list[Abstract]:
        if hasattr(closed, "jaxpr") and hasattr(closed, "consts"):
            jaxpr = closed.jaxpr
            consts = [_const(np.shape(c)) for c in closed.consts]
        else:
            jaxpr, consts = closed, [_const(_shape(v)) for v in closed.constvars]
        return self.run(jaxpr, consts, args)

    def muted(self) -> _Walker:
        w = _Walker(self.paths, self.shapes, _Record(len(self.paths), muted=True))
        w.ctx = self.ctx
        return w

    def eqn(self, eqn: Any, ins: list[Abstract]) -> list[Abstract]:
        name = eqn.primitive.name
        if name in _CALLS or name in ("scan", "while", "cond"):
            self.ctx.append(_loc(eqn) or self.ctx[-1])
            try:
                return self._eqn(eqn, ins, name)
            finally:
                self.ctx.pop()
        return self._eqn(eqn, ins, name)

    def _eqn(self, eqn: Any, ins: list[Abstract], name: str) -> list[Abstract]:
        out_shapes = [_shape(v) for v in eqn.outvars]
        leafy = set().union(*(a.leaves for a in ins if isinstance(a, _Par))) if ins else set()
        if name in _CALLS:
            return self.call(eqn, ins, out_shapes)
        if name == "scan":
            return self.scan(eqn, ins, out_shapes)
        if name == "while":
            return self.while_(eqn, ins, out_shapes)
        if name == "cond":
            return self.cond(eqn, ins, out_shapes)
        self.rec.touch(leafy)
        if all(isinstance(a, _Par) and a.is_const for a in ins):
            val = None
            if name == "convert_element_type" and ins and ins[0].val is not None:
                val = ins[0].val
            return [_const(s, val if s == () else None) for s in out_shapes]
        if name in _OBSERVERS:
            return [_const(s) for s in out_shapes]
        rule = _RULES.get(name)
        if rule is None:
            if name in _ELEMENTWISE:
                return [self.elementwise(eqn, ins, out_shapes[0])]
            if name in _UNARY:
                return [self.unary(eqn, ins[0], out_shapes[0])]
            return self.generic(eqn, ins, out_shapes)
        return rule(self, eqn, ins, out_shapes)

    def generic(self, eqn: Any, ins: list[Abstract], out_shapes: list[tuple[int, ...]]) -> list[Abstract]:
        """Any op we cannot follow: with an activation, a parameter operand is an error; without
        one, the result depends on the parameters with no axis map."""
        name = eqn.primitive.name
        acts = [a for a in ins if isinstance(a, _Act)]
        pars = [a for a in ins if isinstance(a, _Par) and not a.is_const]
        if acts:
            site = self.site(eqn)
            for p in pars:
                self._lost_errors(p, site)
                for k in sorted(p.links):
                    self._cannot(k, site)
            dup = name not in _CONSUMING and any(_act_dup(a) for a in acts)
            return [_fresh(s, dup) for s in out_shapes]
        if not pars:
            return [_const(s) for s in out_shapes]
        site = self.site(eqn)
        lost = _merge_lost(*(_lose(p, (), site).lost for p in pars))
        return [_Par(s, ((),) * len(s), lost) for s in out_shapes]

    # -- element-wise --------------------------------------------------------------------

    @staticmethod
    def _aligned(p: _Par, shape: tuple[int, ...]) -> tuple[tuple[Atom, ...], ...]:
        """``p``'s atoms on the output axes of an element-wise op (size-1 broadcasts drop them)."""
        if len(p.shape) != len(shape):
            return ((),) * len(shape)
        return tuple(ax if n == m else () for ax, n, m in zip(p.axes, p.shape, shape))

    def elementwise(self, eqn: Any, ins: list[Abstract], shape: tuple[int, ...]) -> Abstract:
        name = eqn.primitive.name
        acts = [a for a in ins if isinstance(a, _Act)]
        pars = [a for a in ins if isinstance(a, _Par)]
        if acts:
            site = self.site(eqn)
            role = _ELEMENTWISE_ROLE.get(name, "elementwise")
            for p in pars:
                self._role(p, role, site)
            # one activation scaled or shifted by constant scalars keeps its pad structure
            if len(acts) == 1 and acts[0].shape == shape and all(p.is_const and math.prod(p.shape) == 1 for p in pars):
                a = acts[0]
                return _act_with(a, shape, _full_maps(a), token=next(_TOKENS)) if a.maps is not None else _fresh(shape, a.dup)
            return _fresh(shape, any(_act_dup(a) for a in acts))
        site = self.site(eqn)
        if name in ("add", "sub", "add_any"):  # a sum of parameter values: the same axes, both leaves
            axes = [tuple(dict.fromkeys(itertools.chain(*(self._aligned(p, shape)[i] for p in pars)))) for i in range(len(shape))]
            return _union(pars, shape, axes)
        if name in ("mul", "div") and len(pars) == 2:
            follow = self._scaled(pars, shape, name)
            if follow is not None:
                main, other = follow
                for k in sorted(other.leaves - main.leaves):
                    self.rec.read(k, NotMatrix("scale"), site)
                return _like(main, shape, self._aligned(main, shape))
        return _Par(shape, ((),) * len(shape), _merge_lost(*(_lose(p, (), site).lost for p in pars)))

    def _scaled(self, pars: list[_Par], shape: tuple[int, ...], name: str) -> tuple[_Par, _Par] | None:
        """Which operand of a product of parameter values keeps its axis map (the other scales it)."""

        def full(p: _Par) -> bool:
            al = self._aligned(p, shape)
            return all(ax or n == 1 for ax, n in zip(al, shape))

        a, b = pars
        if not b.links:
            return (a, b) if a.links else None
        if not a.links:
            return (b, a) if name == "mul" else None
        if full(a) and not full(b):
            return a, b
        if name == "mul" and full(b) and not full(a):
            return b, a
        return None

    def unary(self, eqn: Any, a: Abstract, shape: tuple[int, ...]) -> Abstract:
        name = eqn.primitive.name
        if isinstance(a, _Act):
            if a.maps is not None and a.shape == shape:
                return _act_with(a, shape, _full_maps(a), token=next(_TOKENS))
            return _fresh(shape, a.dup)
        if name == "neg":
            return a
        return _lose(a, shape, self.site(eqn))

    # -- higher-order primitives ---------------------------------------------------------

    def call(self, eqn: Any, ins: list[Abstract], out_shapes: list) -> list[Abstract]:
        params = eqn.params
        body = params.get("jaxpr", params.get("call_jaxpr", params.get("fun_jaxpr")))
        inner = getattr(body, "jaxpr", body)
        if body is None or len(inner.invars) != len(ins):
            return self.generic(eqn, ins, out_shapes)
        return self.run_closed(body, ins)

    def cond(self, eqn: Any, ins: list[Abstract], out_shapes: list) -> list[Abstract]:
        ops = ins[1:]
        outs = None
        for branch in eqn.params["branches"]:
            res = self.run_closed(branch, ops)
            outs = res if outs is None else [_join(x, y) for x, y in zip(outs, res)]
        return outs

    def _fixpoint(self, step: Callable[[_Walker, list[Abstract]], list[Abstract]], init: list[Abstract]) -> list[Abstract]:
        carry = list(init)
        muted = self.muted()
        for _ in range(64):
            new = [_join(c, o) for c, o in zip(carry, step(muted, carry))]
            if [_sig(c) for c in new] == [_sig(c) for c in carry]:
                return new
            carry = new
        raise RuntimeError(f"{_NAME}: no fixpoint for a loop carry")  # pragma: no cover

    def scan(self, eqn: Any, ins: list[Abstract], out_shapes: list) -> list[Abstract]:
        p = eqn.params
        nc, ncar = p["num_consts"], p["num_carry"]
        body = p["jaxpr"]
        consts, init, xs = ins[:nc], ins[nc : nc + ncar], ins[nc + ncar :]
        xs_in = [_drop_lead(x) for x in xs]

        def step(w: _Walker, carry: list[Abstract]) -> list[Abstract]:
            return w.run_closed(body, consts + carry + xs_in)[:ncar]

        carry = self._fixpoint(step, init)
        res = self.run_closed(body, consts + carry + xs_in)
        carry_out = [_join(c, o) for c, o in zip(carry, res[:ncar])]
        ys = [_add_lead(y, s) for y, s in zip(res[ncar:], out_shapes[ncar:])]
        return carry_out + ys

    def while_(self, eqn: Any, ins: list[Abstract], out_shapes: list) -> list[Abstract]:
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, init = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]

        def step(w: _Walker, carry: list[Abstract]) -> list[Abstract]:
            return w.run_closed(p["body_jaxpr"], bconsts + carry)

        carry = self._fixpoint(step, init)
        res = self.run_closed(p["body_jaxpr"], bconsts + carry)
        self.run_closed(p["cond_jaxpr"], cconsts + carry)
        return [_join(c, o) for c, o in zip(carry, res)]

    # -- reads: dot_general, conv, gather --------------------------------------------------

    def dot_general(self, eqn: Any, ins: list[Abstract], out_shapes: list) -> list[Abstract]:
        lhs, rhs = ins
        (lc, rc), (lb, rbatch) = eqn.params["dimension_numbers"]
        out = out_shapes[0]
        acts = [a for a in ins if isinstance(a, _Act)]
        if not acts:
            return self.generic(eqn, ins, out_shapes)
        site = self.site(eqn)
        for p, c, b in ((lhs, lc, lb), (rhs, rc, rbatch)):
            if not isinstance(p, _Par) or p.is_const:
                continue
            self._lost_errors(p, site)
            roles = ["in" if i in c else "batch" if i in b else "out" for i in range(len(p.shape))]
            found = self._roles(p, roles, site)
            for k in sorted(p.links):
                by_axis = found.get(k, {})
                if self._split_error(k, by_axis, site):
                    continue
                ins_ = tuple(sorted(a for a, r in by_axis.items() if "in" in r))
                outs_ = tuple(sorted(a for a, r in by_axis.items() if "out" in r))
                if not ins_ and not outs_:
                    self.rec.read(k, NotMatrix("scale"), site)
                elif not ins_:
                    self._cannot(k, site, "the leaf is broadcast along the contracted axes (no fan-in axis)")
                else:
                    self.rec.read(k, MatrixDims(in_axes=ins_, out_axes=outs_), site)
        return [_fresh(out)]

    def conv(self, eqn: Any, ins: list[Abstract], out_shapes: list) -> list[Abstract]:
        lhs, rhs = ins
        if not isinstance(lhs, _Act) or not isinstance(rhs, _Par) or rhs.is_const:
            return self.generic(eqn, ins, out_shapes)
        site = self.site(eqn)
        self._lost_errors(rhs, site)
        prm = eqn.params
        dn = prm["dimension_numbers"]
        lhs_spec, rhs_spec = tuple(dn.lhs_spec), tuple(dn.rhs_spec)
        leaves = sorted(rhs.links)
        if prm.get("batch_group_count", 1) != 1:
            for k in leaves:
                self._cannot(k, site, f"batch_group_count={prm['batch_group_count']} is not supported")
            return [_fresh(out_shapes[0])]
        pads = tuple((int(lo), int(hi)) for lo, hi in prm["padding"])
        lhs_dil = tuple(int(d) for d in prm["lhs_dilation"])
        rhs_dil = tuple(int(d) for d in prm["rhs_dilation"])
        strides = tuple(int(s) for s in prm["window_strides"])
        groups = int(prm["feature_group_count"])
        spatial_lhs = lhs_spec[2:]
        try:
            input_shape, padding = _conv_input(lhs, spatial_lhs, (lhs_spec[0], lhs_spec[1]), pads, lhs_dil, rhs, rhs_spec, rhs_dil)
        except ValueError as e:
            for k in leaves:
                self._cannot(k, site, str(e))
            return [_fresh(out_shapes[0])]
        for k in leaves:
            self._conv_read(k, rhs, rhs_spec, site, input_shape, padding, strides, rhs_dil, lhs_dil, groups)
        return [_fresh(out_shapes[0])]

    def _conv_read(self, k, rhs, rhs_spec, site, input_shape, padding, strides, rhs_dil, lhs_dil, groups):
        """The ConvSpec of leaf ``k`` as the kernel (``rhs``) of one convolution."""
        shape = self.shapes[k]
        nd = len(rhs_spec) - 2
        letters: dict[int, str] = {}
        extra: list[int] = []
        for pos, j in enumerate(rhs_spec):
            atoms = [a for l, a in rhs.axes[j] if l == k]
            sizes = [shape[a] for a in atoms]
            size = rhs.shape[j]
            if pos == 0 and len(atoms) > 1 and math.prod(sizes) == size:
                extra, atoms = atoms[:-1], atoms[-1:]  # vmapped kernels: batch merged into out features
                size = sizes[-1]
            if any((k, a) in rhs.pieces for a in atoms + extra):
                self._cannot(k, site, "the kernel was split by a reshape (its element order is not followed)")
                return
            if len(atoms) != 1 or shape[atoms[0]] != size:
                self._cannot(k, site, f"kernel axis {j} is not one whole axis of the leaf (reshaped, sliced or broadcast)")
                return
            a = atoms[0]
            if a in letters:
                self._cannot(k, site, f"leaf axis {a} is used twice")
                return
            letters[a] = "O" if pos == 0 else "I" if pos == 1 else _SPATIAL.get(nd, "")[pos - 2 : pos - 1] or "?"
            if pos >= 2 and (k, a) in rhs.flips:
                self._cannot(k, site, f"the kernel is reversed along axis {a}")
                return
        if nd not in _SPATIAL:
            self._cannot(k, site, f"{nd} spatial axes (ConvSpec names at most 3)")
            return
        batch = sorted(set(range(len(shape))) - set(letters))
        if sorted(extra) != extra or not set(extra) <= set(batch):
            self._cannot(k, site, f"vmapped kernel axes {extra} in an unexpected order")
            return
        if batch != list(range(len(batch))):
            self._cannot(k, site, f"the kernel's batch axes {tuple(batch)} (scanned or vmapped) are not its leading axes")
            return
        if extra:
            nb = math.prod(shape[a] for a in extra)
            if groups % nb == 0:
                groups //= nb  # vmapped input and kernel: one group per batch index
            elif groups != 1:
                self._cannot(k, site, f"a vmapped kernel with feature_group_count={groups}")
                return
        layout = "".join(letters[a] for a in sorted(letters))
        fields = {
            "input_shape": input_shape,
            "strides": strides,
            "padding": padding,
            "kernel_dilation": rhs_dil,
            "feature_group_count": groups,
            "kernel_layout": layout,
            "input_dilation": lhs_dil,
            "batch_dims": len(batch),
        }
        try:
            spec = _make_conv_spec(fields)
        except ValueError as e:
            self._cannot(k, site, str(e))
            return
        self.rec.read(k, spec, site)

    def gather(self, eqn: Any, ins: list[Abstract], out_shapes: list) -> list[Abstract]:
        op, idx = ins
        if not isinstance(op, _Par) or op.is_const or not isinstance(idx, _Act):
            return self.generic(eqn, ins, out_shapes)
        site = self.site(eqn)
        self._lost_errors(op, site)
        dn = eqn.params["dimension_numbers"]
        sizes = tuple(int(s) for s in eqn.params["slice_sizes"])
        start = tuple(dn.start_index_map)
        rows = [d for d in start if sizes[d] < op.shape[d]] or list(start)
        batching = set(getattr(dn, "operand_batching_dims", ()))
        collapsed = set(dn.collapsed_slice_dims)
        roles = ["row" if d in rows else "batch" if d in batching or d in collapsed else "feature" for d in range(len(op.shape))]
        self._embedding_reads(op, roles, site)
        return [_fresh(out_shapes[0])]

    def _embedding_reads(self, op: _Par, roles: list[str], site: str) -> None:
        found = self._roles(op, roles, site)
        for k in sorted(op.links):
            by_axis = found.get(k, {})
            if self._split_error(k, by_axis, site):
                continue
            rows_ = tuple(sorted(a for a, r in by_axis.items() if "row" in r))
            feats = {a for a, r in by_axis.items() if "feature" in r}
            batch_ = tuple(sorted(set(range(len(self.shapes[k]))) - set(rows_) - feats))
            if rows_:
                self.rec.read(k, Embedding(row_axes=rows_, batch_axes=batch_), site)
            else:
                self._cannot(k, site, "no leaf axis is indexed")

    def dynamic_slice(self, eqn: Any, ins: list[Abstract], out_shapes: list) -> list[Abstract]:
        op, idx = ins[0], ins[1:]
        sizes = tuple(int(s) for s in eqn.params["slice_sizes"])
        if isinstance(op, _Act):
            return self.generic(eqn, ins, out_shapes)
        if any(isinstance(i, _Act) for i in idx):
            if op.is_const:
                return [_fresh(out_shapes[0])]
            site = self.site(eqn)
            self._lost_errors(op, site)
            # indexed by the input: rows; by a constant or loop counter: batch; taken whole: features
            roles = [
                ("row" if isinstance(i, _Act) else "batch") if s < n else "feature"
                for i, s, n in zip(idx, sizes, op.shape)
            ]
            if "row" not in roles:
                roles = ["row" if isinstance(i, _Act) else r for i, r in zip(idx, roles)]
            self._embedding_reads(op, roles, site)
            return [_fresh(out_shapes[0])]
        lost = _merge_lost(op.lost, *(_lose(i, (), self.site(eqn)).lost for i in idx if isinstance(i, _Par) and not i.is_const))
        return [_like(op, out_shapes[0], op.axes, lost=lost)]


def _sig(a: Abstract) -> Any:
    if isinstance(a, _Act):
        return "act"
    return (a.axes, tuple(k for k, _ in a.lost), a.flips, a.links, a.pieces)


def _join(a: Abstract, b: Abstract) -> Abstract:
    """The value of a loop carry or a cond output that may be either."""
    if a is b:
        return a
    if isinstance(a, _Act) or isinstance(b, _Act):
        dup = any(_act_dup(x) for x in (a, b) if isinstance(x, _Act))
        shape = a.shape
        return _fresh(shape, dup)
    axes = tuple(tuple(dict.fromkeys(x + y)) for x, y in zip(a.axes, b.axes))
    val = a.val if a.val is not None and a.val == b.val else None
    return dataclasses.replace(_union([a, b], a.shape, axes), val=val)


def _drop_lead(x: Abstract) -> Abstract:
    """The per-iteration slice of a scanned operand: its leading axis becomes a batch axis."""
    if isinstance(x, _Act):
        return _fresh(x.shape[1:], x.dup)
    return _like(x, x.shape[1:], x.axes[1:])


def _add_lead(y: Abstract, shape: tuple[int, ...]) -> Abstract:
    if isinstance(y, _Act):
        return _fresh(shape, y.dup)
    return _like(y, shape, ((),) + y.axes)


# ------------------------------------------------------------------------------------------
# Structural rules (shape ops): axis maps for parameter values, element maps for activations
# ------------------------------------------------------------------------------------------


def _rule_identity(w: _Walker, eqn, ins, out_shapes):
    if len(ins) == len(out_shapes):
        return list(ins)
    return w.generic(eqn, ins, out_shapes)  # pragma: no cover


def _rule_transpose(w: _Walker, eqn, ins, out_shapes):
    (a,), perm = ins, tuple(eqn.params["permutation"])
    if isinstance(a, _Act):
        return [_act_with(a, out_shapes[0], [_full_maps(a)[p] for p in perm])]
    return [_like(a, out_shapes[0], [a.axes[p] for p in perm])]


def _reshape_axes(p: _Par, new: tuple[int, ...]) -> tuple[tuple[tuple[Atom, ...], ...], frozenset]:
    """Leaf axes of each new axis of a reshape. Axes of size > 1 form blocks of equal size
    products (a merge, a split, or a mix); each new axis gets the leaf axes of its block.
    Size-1 axes pair up in order (they hold no data to mix)."""
    old = p.shape
    out: list[tuple[Atom, ...]] = [()] * len(new)
    pieces: set[Atom] = set()
    ob = [d for d, n in enumerate(old) if n != 1]
    nb = [d for d, n in enumerate(new) if n != 1]
    i = j = 0
    while i < len(ob) and j < len(nb):
        bi, bj = [ob[i]], [nb[j]]
        pi, pj = old[ob[i]], new[nb[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(ob):
                pi *= old[ob[i]]
                bi.append(ob[i])
                i += 1
            elif j < len(nb):
                pj *= new[nb[j]]
                bj.append(nb[j])
                j += 1
            else:  # pragma: no cover - sizes always match in a valid reshape
                break
        atoms = tuple(dict.fromkeys(a for d in bi for a in p.axes[d]))
        for d in bj:
            out[d] = atoms
        if len(bj) > 1:
            pieces.update(atoms)
    old_ones = [d for d, n in enumerate(old) if n == 1]
    new_ones = [d for d, n in enumerate(new) if n == 1]
    for d_old, d_new in zip(old_ones, new_ones):
        out[d_new] = p.axes[d_old]
    return tuple(out), frozenset(pieces)


def _rule_reshape(w: _Walker, eqn, ins, out_shapes):
    a = ins[0]
    new = out_shapes[0]
    dims = eqn.params.get("dimensions")
    if isinstance(a, _Act):
        if dims is None and [n for n in a.shape if n != 1] == [n for n in new if n != 1]:
            return [_act_reshape_ones(a, new)]
        return [_fresh(new, _act_dup(a))]
    if dims is not None:
        a = _like(a, [a.shape[d] for d in dims], [a.axes[d] for d in dims])
    if a.shape == new:
        return [a]
    axes, pieces = _reshape_axes(a, new)
    return [_like(a, new, axes, pieces=a.pieces | pieces)]


def _act_reshape_ones(a: _Act, new: tuple[int, ...]) -> _Act:
    """An activation reshaped by only adding or removing size-1 axes: between two axes of size
    > 1, the size-1 axes pair up in order; extra old ones are dropped at their index."""

    def groups(shape):
        out, cur = [], []
        for d, n in enumerate(shape):
            if n == 1:
                cur.append(d)
            else:
                out.append((cur, d))
                cur = []
        out.append((cur, None))
        return out

    maps, fixed = _full_maps(a), set(a.fixed)
    new_maps: list = [None] * len(new)
    for (old_ones, old_d), (new_ones, new_d) in zip(groups(a.shape), groups(new)):
        for i, j in itertools.zip_longest(old_ones, new_ones):
            if j is None:
                if maps[i][0] is not None:
                    fixed.add((maps[i][0], maps[i][1][0]))
            else:
                new_maps[j] = maps[i] if i is not None else (None, (0,))
        if new_d is not None:
            new_maps[new_d] = maps[old_d]
    return _act_with(a, new, new_maps, frozenset(fixed))


def _rule_broadcast_in_dim(w: _Walker, eqn, ins, out_shapes):
    a = ins[0]
    out = out_shapes[0]
    bdims = tuple(int(d) for d in eqn.params["broadcast_dimensions"])
    if isinstance(a, _Act):
        if all(a.shape[i] == out[d] for i, d in enumerate(bdims)) and all(
            out[d] == 1 for d in range(len(out)) if d not in bdims
        ):
            maps = _full_maps(a)
            new_maps = [(None, (0,))] * len(out)
            for i, d in enumerate(bdims):
                new_maps[d] = maps[i]
            return [_act_with(a, out, new_maps)]
        return [_fresh(out, _act_dup(a))]
    axes: list[tuple[Atom, ...]] = [()] * len(out)
    for i, d in enumerate(bdims):
        if a.shape[i] == out[d]:
            axes[d] = a.axes[i]
    return [_like(a, out, axes, val=a.val)]


def _rule_squeeze(w: _Walker, eqn, ins, out_shapes):
    a = ins[0]
    dims = {d % len(a.shape) for d in eqn.params["dimensions"]}
    if isinstance(a, _Act):
        maps, fixed = _full_maps(a), set(a.fixed)
        for d in dims:
            if maps[d][0] is not None:
                fixed.add((maps[d][0], maps[d][1][0]))
        return [_act_with(a, out_shapes[0], [m for i, m in enumerate(maps) if i not in dims], frozenset(fixed))]
    return [_like(a, out_shapes[0], [ax for i, ax in enumerate(a.axes) if i not in dims])]


def _rule_slice(w: _Walker, eqn, ins, out_shapes):
    a = ins[0]
    if isinstance(a, _Par):
        return [_like(a, out_shapes[0], a.axes)]
    p = eqn.params
    strides = p.get("strides") or (1,) * len(a.shape)
    maps = [(b, idx[s:e:st]) for (b, idx), s, e, st in zip(_full_maps(a), p["start_indices"], p["limit_indices"], strides)]
    return [_act_with(a, out_shapes[0], maps)]


def _rule_split(w: _Walker, eqn, ins, out_shapes):
    a = ins[0]
    axis = int(eqn.params["axis"]) % len(a.shape)
    if isinstance(a, _Par):
        return [_like(a, s, a.axes) for s in out_shapes]
    outs, start = [], 0
    for s in out_shapes:
        maps = _full_maps(a)
        b, idx = maps[axis]
        maps[axis] = (b, idx[start : start + s[axis]])
        start += s[axis]
        outs.append(_act_with(a, s, maps))
    return outs


def _rule_rev(w: _Walker, eqn, ins, out_shapes):
    a = ins[0]
    dims = set(eqn.params["dimensions"])
    if isinstance(a, _Act):
        maps = [(b, idx[::-1]) if i in dims else (b, idx) for i, (b, idx) in enumerate(_full_maps(a))]
        return [_act_with(a, out_shapes[0], maps)]
    flips = set(a.flips)
    for d in dims:
        flips ^= set(a.axes[d])
    return [_like(a, out_shapes[0], a.axes, flips=frozenset(flips))]


def _rule_concatenate(w: _Walker, eqn, ins, out_shapes):
    dim = int(eqn.params["dimension"])
    out = out_shapes[0]
    ins = [a for a in ins if a.shape[dim] != 0] or ins[:1]
    if len(ins) == 1 and isinstance(ins[0], _Act):
        return [ins[0]]
    acts = [a for a in ins if isinstance(a, _Act)]
    if not acts:
        axes = [tuple(dict.fromkeys(itertools.chain(*(p.axes[i] for p in ins)))) for i in range(len(out))]
        return [_union(ins, out, axes)]
    if len(acts) < len(ins):  # a parameter (a learned token) concatenated to the activations
        site = w.site(eqn)
        for p in ins:
            if isinstance(p, _Par):
                w._role(p, "elementwise", site)
        return [_fresh(out, any(_act_dup(a) for a in acts))]
    first = acts[0]
    maps0 = _full_maps(first)
    same = all(
        a.token == first.token
        and a.fixed == first.fixed
        and all(m == m0 for i, (m, m0) in enumerate(zip(_full_maps(a), maps0)) if i != dim)
        and _full_maps(a)[dim][0] == maps0[dim][0]
        for a in acts
    )
    if not same:  # pieces of one value put together in a way we do not follow may repeat elements
        shared = len({a.token for a in acts}) < len(acts)
        return [_fresh(out, shared or any(_act_dup(a) for a in acts))]
    maps = list(maps0)
    maps[dim] = (maps0[dim][0], tuple(itertools.chain(*(_full_maps(a)[dim][1] for a in acts))))
    return [_act_with(first, out, maps)]


def _rule_pad(w: _Walker, eqn, ins, out_shapes):
    a, v = ins
    out = out_shapes[0]
    zero = isinstance(v, _Par) and v.is_const and v.val is not None and float(np.asarray(v.val)) == 0.0
    config = [(int(lo), int(hi), int(it)) for lo, hi, it in eqn.params["padding_config"]]
    if isinstance(a, _Par):
        if isinstance(v, _Act):
            return w.generic(eqn, ins, out_shapes)
        if zero:  # a zero-padded kernel: the same axes
            return [_like(a, out, a.axes)]
        return w.generic(eqn, ins, out_shapes)
    if not zero:
        return [_fresh(out, _act_dup(a))]
    maps = []
    for (b, idx), (lo, hi, it) in zip(_full_maps(a), config):
        seq: list[int] = []
        for n, i in enumerate(idx):
            if n:
                seq.extend([-1] * it)
            seq.append(i)
        seq = [-1] * max(lo, 0) + seq[max(-lo, 0) :]
        seq = seq + [-1] * max(hi, 0) if hi >= 0 else seq[:hi]
        maps.append((b, tuple(seq)))
    return [_act_with(a, out, maps)]


def _rule_stack(w: _Walker, eqn, ins, out_shapes):
    axis = int(eqn.params["axis"])
    out = out_shapes[0]
    if any(isinstance(a, _Act) for a in ins):
        return w.generic(eqn, ins, out_shapes) if any(isinstance(a, _Par) and not a.is_const for a in ins) else [
            _fresh(out, any(_act_dup(a) for a in ins if isinstance(a, _Act)))
        ]
    rank = len(out) - 1
    axes = [tuple(dict.fromkeys(itertools.chain(*(p.axes[i] for p in ins)))) for i in range(rank)]
    axes.insert(axis, ())
    return [_union(ins, out, axes)]


def _rule_linear_unary(w: _Walker, eqn, ins, out_shapes):
    return [w.unary(eqn, ins[0], out_shapes[0])]


_RULES: dict[str, Callable] = {
    **{n: _rule_identity for n in _IDENTITY},
    "transpose": _rule_transpose,
    "reshape": _rule_reshape,
    "broadcast_in_dim": _rule_broadcast_in_dim,
    "squeeze": _rule_squeeze,
    "expand_dims": _rule_reshape,
    "slice": _rule_slice,
    "split": _rule_split,
    "rev": _rule_rev,
    "concatenate": _rule_concatenate,
    "pad": _rule_pad,
    "stack": _rule_stack,
    "neg": _rule_linear_unary,
    "dot_general": _Walker.dot_general,
    "conv_general_dilated": _Walker.conv,
    "gather": _Walker.gather,
    "dynamic_slice": _Walker.dynamic_slice,
}



# ------------------------------------------------------------------------------------------
# Convolution inputs: Flax's CIRCULAR / REFLECT pads, zero pads folded into the conv's
# ------------------------------------------------------------------------------------------


def _wrap_index(j: int, n: int) -> int:
    return j % n


def _reflect_index(j: int, n: int) -> int:
    if n == 1:
        return 0
    m = j % (2 * n - 2)
    return m if m < n else 2 * n - 2 - m


def _match_pad(idx: tuple[int, ...], n: int, fn: Callable[[int, int], int]) -> tuple[int, int] | None:
    extra = len(idx) - n
    for lo in range(max(extra, 0) + 1):
        if all(i == fn(j - lo, n) for j, i in enumerate(idx)):
            return lo, extra - lo
    return None


def _conv_input(lhs: _Act, spatial: Sequence[int], other: Sequence[int], pads, lhs_dil, rhs: _Par, rhs_spec, rhs_dil):
    """``(input_shape, padding)`` of a convolution's activation input (the pads Flax adds with
    ``jnp.pad`` before a VALID convolution are read back). Raises ``ValueError`` on a wrap or
    reflect pad it cannot match exactly."""
    shape = lhs.shape
    plain = (tuple(shape[d] for d in spatial), pads)
    if lhs.maps is None:
        if lhs.dup:
            raise ValueError("its input holds padded elements (a wrap, reflect or edge pad) it cannot match exactly")
        return plain
    maps = _full_maps(lhs)
    ksize = [rhs.shape[j] for j in rhs_spec[2:]]
    k_eff = [(k - 1) * d + 1 for k, d in zip(ksize, rhs_dil)]
    flax_pads = [((k - 1) // 2, k // 2) for k in k_eff]
    dup = any(_has_dup(maps[d][1]) for d in range(len(shape)))
    if not dup and not lhs.dup:
        # zero pads (and crops) on the spatial axes fold into the convolution's own pads
        sizes, folded = [], []
        for d, (lo, hi) in zip(spatial, pads):
            idx = maps[d][1]
            nz = [j for j, i in enumerate(idx) if i >= 0]
            if not nz:
                return plain
            a, b = nz[0], nz[-1]
            run = idx[a : b + 1]
            if any(i < 0 for i in run) or any(y != x + 1 for x, y in zip(run, run[1:])):
                return plain
            if any(i >= 0 for i in idx[:a]) or any(i >= 0 for i in idx[b + 1 :]):  # pragma: no cover
                return plain
            sizes.append(len(run))
            folded.append((lo + a, hi + len(idx) - 1 - b))
        if any(l != 1 for l in lhs_dil) and folded != list(pads):
            return plain  # zero pads around a dilated input: the conv on the value as given
        return tuple(sizes), tuple(folded)
    if any(_has_dup(maps[d][1]) for d in other) or lhs.dup:
        raise ValueError("its input holds duplicated elements (a pad along a non-spatial axis, or lost) it cannot match")
    if any(lo or hi for lo, hi in pads) or any(l != 1 for l in lhs_dil):
        raise ValueError("its input is wrap/reflect padded and the convolution pads or dilates it again")
    for mode, fn in (("CIRCULAR", _wrap_index), ("REFLECT", _reflect_index)):
        sizes, ok = [], True
        for d, fp in zip(spatial, flax_pads):
            b, idx = maps[d]
            n = lhs.base_shape[b] if b is not None else 1
            got = _match_pad(idx, n, fn)
            if got != fp:
                ok = False
                break
            sizes.append(n)
        if ok:
            return tuple(sizes), mode
    got = []
    for d in spatial:
        b, idx = maps[d]
        n = lhs.base_shape[b] if b is not None else 1
        w, r = _match_pad(idx, n, _wrap_index), _match_pad(idx, n, _reflect_index)
        got.append(f"wrap {w}" if w else f"reflect {r}" if r else "a pad repeating elements (edge?)")
    raise ValueError(
        f"its input is padded along the spatial axes by {', '.join(got)}, not by Flax's CIRCULAR or REFLECT "
        f"pads {tuple(flax_pads)} for this kernel, so no ConvSpec describes the layer"
    )


def _spec_fields() -> tuple[str, ...]:
    if dataclasses.is_dataclass(ConvSpec):
        return tuple(f.name for f in dataclasses.fields(ConvSpec))
    return tuple(getattr(ConvSpec, "_fields", ()))  # pragma: no cover - older NamedTuple ConvSpec


def _make_conv_spec(fields: dict[str, Any]) -> ConvSpec:
    """A :class:`ConvSpec` from the fields this version of it has; a non-default field it lacks
    raises (so that nothing is silently dropped)."""
    have = _spec_fields()
    defaults = {"input_dilation": None, "batch_dims": 0}
    kwargs = {}
    for key, value in fields.items():
        if key in have:
            kwargs[key] = value
        elif key in defaults and (value == defaults[key] or (key == "input_dilation" and all(v == 1 for v in value))):
            continue
        else:
            raise ValueError(f"this normjax's ConvSpec has no field {key!r} (needed: {key}={value!r})")
    return ConvSpec(**kwargs)


# ------------------------------------------------------------------------------------------
# Agreement between reads, overrides, the public function
# ------------------------------------------------------------------------------------------


def _canonical(view: Any, ndim: int) -> Any:
    if isinstance(view, MatrixDims):
        return ("linear", frozenset(view.in_axes), frozenset(view.out_axes))
    if isinstance(view, Embedding):
        rows, batch = set(view.row_axes), set(view.batch_axes)
        return ("linear", frozenset(set(range(ndim)) - rows - batch), frozenset(rows))
    if isinstance(view, NotMatrix):
        return ("not",)
    return ("conv", view)


def _decide(path: str, reads: list[tuple[Any, str]], ndim: int) -> Any:
    keys = [_canonical(v, ndim) for v, _ in reads]
    if len(set(keys)) > 1:
        groups: dict[Any, list[tuple[Any, str]]] = {}
        for key, read in zip(keys, reads):
            groups.setdefault(key, []).append(read)
        lines = []
        for group in groups.values():
            sites = "; ".join(dict.fromkeys(s for _, s in group))
            lines.append(f"  as {group[0][0]!r} by {sites}")
        raise ValueError(
            f"{_NAME}: leaf {path!r} is read in ways that disagree:\n" + "\n".join(lines)
            + f"\npass overrides={{{path!r}: view}} to say what it is"
        )
    views = [v for v, _ in reads]
    for kind in (Embedding, MatrixDims, ConvSpec):
        for v in views:
            if isinstance(v, kind):
                return v
    roles = {v.role for v in views}
    return NotMatrix(roles.pop() if len(roles) == 1 else "elementwise")


_VIEW_TYPES = (MatrixDims, ConvSpec, Embedding, NotMatrix)


def _component_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(r"(?:^|(?<=/)|(?=/))(?:" + pattern + r")(?:(?=/|$)|(?<=/))")


def _overrides(overrides: Any, paths: list[str], leaves: list[Any]) -> dict[int, Any]:
    if overrides is None:
        return {}
    chosen: dict[int, Any] = {}
    if isinstance(overrides, Mapping):
        owner: dict[int, str] = {}
        for key, view in overrides.items():
            if not isinstance(key, str):
                raise TypeError(f"{_NAME}: override keys are regular expressions (strings), got {key!r}")
            rx = _component_regex(key)
            hits = [i for i, p in enumerate(paths) if rx.search(p)]
            if not hits:
                some = ", ".join(repr(p) for p in paths[:8]) + (", ..." if len(paths) > 8 else "")
                raise ValueError(
                    f"{_NAME}: override {key!r} matches no leaf (a pattern matches whole path components, "
                    f"e.g. 'Dense_0/kernel' or 'kernel'); the paths are {some}"
                )
            for i in hits:
                if i in owner:
                    raise ValueError(
                        f"{_NAME}: leaf {paths[i]!r} is matched by two overrides, {owner[i]!r} and {key!r}; "
                        f"make the patterns exclusive"
                    )
                owner[i] = key
                chosen[i] = view
    elif callable(overrides):
        for i, (p, leaf) in enumerate(zip(paths, leaves)):
            view = overrides(p, leaf)
            if view is not None:
                chosen[i] = view
    else:
        raise TypeError(f"{_NAME}: overrides must be None, a mapping {{regex: view}} or a callable, got {overrides!r}")
    for i, view in chosen.items():
        if not isinstance(view, _VIEW_TYPES):
            raise TypeError(
                f"{_NAME}: the override for leaf {paths[i]!r} is {view!r}; expected a MatrixDims, ConvSpec, "
                f"Embedding or NotMatrix"
            )
    return chosen


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def infer_views(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    overrides: Mapping[str, Any] | Callable[[str, Any], Any] | None = None,
    **kwargs: Any,
) -> Any:
    r"""What every parameter leaf is, read from the computation ``fn(params, *args, **kwargs)``.

    Nothing runs: ``fn`` is traced once with :func:`jax.make_jaxpr` (``params`` and ``args`` may
    be arrays or :class:`jax.ShapeDtypeStruct`\ s; array leaves of ``args`` and ``kwargs`` are
    traced, other Python values such as ``deterministic=True`` are passed as they are) and the
    jaxpr is read. Returns a pytree shaped like ``params`` (built from its treedef, so a
    ``flax.nnx.State`` comes back as a ``State``) with one view per array leaf (``None`` for a
    leaf that is not an array).

    The *activation* is every value that depends on ``args``/``kwargs`` (the input, an RNG key);
    literals and constants are not. Each op that combines a value of one leaf (followed axis by
    axis through casts, copies, ``transpose``, ``reshape`` (merges and splits), ``broadcast_in_dim``,
    ``squeeze``, ``slice``, ``rev``, ``concatenate``, zero ``pad``, ``neg``, sums of parameter
    values and products with values that are not activations) with an activation *reads* it:

    - ``dot_general`` against an activation: :class:`MatrixDims`. The leaf's contracted axes are
      ``in_axes`` (fan-in), its free axes ``out_axes`` (fan-out; ``()`` for a vector); the
      ``dot_general`` batch axes, axes scanned over (the leaf passed to ``lax.scan`` as ``xs``),
      axes indexed by a value that is not an activation (``w[i]`` in a loop) and squeezed size-1
      axes are batch axes. A leaf ``vmap``-ped against an input that is *not* mapped reads as
      one wider matrix (jax folds the mapped axis into the fan-out).
    - ``conv_general_dilated`` with the leaf as kernel: a ``ConvSpec``: ``input_shape`` the
      input's spatial shape, ``strides``, explicit ``padding`` pairs (zero pads written with
      ``jnp.pad``/``lax.pad`` just before are folded in), ``kernel_dilation``,
      ``input_dilation`` (transposed convolutions), ``feature_group_count`` and
      ``kernel_layout``, one letter per non-batch leaf axis in the leaf's order (``"O"``
      output features, ``"I"`` input features, ``"W"``/``"HW"``/``"DHW"`` spatial, in the
      input's spatial order: Flax ``"HWIO"``, Equinox/PyTorch ``"OIHW"``). Batch axes
      (scanned, or ``vmap``-ped: jax merges them into the output features) must lead; their
      number is ``batch_dims``. The wrap and reflect pads of Flax's ``padding="CIRCULAR"`` and
      ``"REFLECT"`` give that padding with the unpadded ``input_shape``; any other wrap,
      reflect or edge pad raises, as does ``batch_group_count != 1``.
    - ``gather``/``dynamic_slice`` (``w[ids]``, ``jnp.take``) with indices from the
      activation: :class:`Embedding`, the indexed axes ``row_axes``; axes scanned over or
      indexed by a constant are ``batch_axes``, the rest features.
    - element-wise ops with an activation: :class:`NotMatrix` ``"bias"`` (``add``, ``sub``),
      ``"scale"`` (``mul``, ``div``) or ``"elementwise"`` (anything else); a leaf that scales
      another (weight normalisation) is a ``"scale"``; ``NotMatrix("unused")`` for a leaf no
      op reads, ``NotMatrix("parameter-only")`` for one read only in computations that never
      meet the input. ``jax.debug.print`` reads nothing.

    Bodies of ``jit``, ``closed_call``/``core_call``, ``remat``/``checkpoint``,
    ``custom_jvp_call``, ``custom_vjp_call``, every branch of ``cond``/``switch``, ``while``
    (cond and body) and ``scan`` (consts, carry and ``xs``; a fixpoint decides which carries
    are activations) are followed. Every read of a leaf must agree (a layer applied twice; an
    :class:`Embedding` of a ``(V, d)`` table agrees with the ``MatrixDims((1,), (0,))`` of
    ``x @ E.T`` in weight tying, and is reported); reads that disagree, any other op on a leaf
    next to an activation, a value of parameters computed by an op that loses its axes (a
    ``reduce_sum``, a ``sort``) reaching a ``dot_general``/conv, and pieces of one leaf axis
    in different roles raise ``ValueError`` naming the leaf, the ops and their source lines.

    Args:
      fn: called as ``fn(params, *args, **kwargs)``.
      params: the parameter pytree.
      *args, **kwargs: an example input (only shapes and dtypes matter).
      overrides: ``None``, a mapping ``{regex: view}`` or a callable ``(path, leaf) -> view | None``.
        A leaf whose path (written ``"a/b/kernel"``) matches gets that view and its inferred
        role, errors included, is ignored (it is a constant for the walk). A regex matches whole
        path components (``"Conv_1"`` matches ``"Conv_1/kernel"``, not ``"Conv_10/kernel"``); a
        key that matches no leaf, or a leaf matched by two keys, raises ``ValueError``.

    >>> import jax, jax.numpy as jnp
    >>> def mlp(p, x):                                   # PyTorch-style (out, in) weights
    ...     h = jax.nn.relu(x @ p["w1"].T + p["b1"])
    ...     return h @ p["w2"].T + p["b2"]
    >>> params = {"w1": jnp.zeros((16, 4)), "b1": jnp.zeros(16), "w2": jnp.zeros((3, 16)), "b2": jnp.zeros(3)}
    >>> views = infer_views(mlp, params, jax.ShapeDtypeStruct((8, 4), jnp.float32))
    >>> views["w1"], views["b1"]
    (MatrixDims(in_axes=(1,), out_axes=(0,)), NotMatrix(role='bias'))
    >>> infer_views(mlp, params, jnp.zeros((8, 4)), overrides={"w2": MatrixDims(1, 0)})["w2"]
    MatrixDims(in_axes=1, out_axes=0)
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    leaves = [v for _, v in flat]
    traced = [_is_array(v) for v in leaves]
    chosen = _overrides(overrides, paths, leaves)

    in_flat, in_def = jax.tree_util.tree_flatten((args, kwargs))
    in_traced = [_is_array(v) for v in in_flat]
    dyn_params = [v for v, t in zip(leaves, traced) if t]
    dyn_inputs = [v for v, t in zip(in_flat, in_traced) if t]

    def call(dp, di):
        it_p, it_i = iter(dp), iter(di)
        p = treedef.unflatten([next(it_p) if t else v for v, t in zip(leaves, traced)])
        a, kw = in_def.unflatten([next(it_i) if t else v for v, t in zip(in_flat, in_traced)])
        return fn(p, *a, **kw)

    closed = jax.make_jaxpr(call)(dyn_params, dyn_inputs)
    jaxpr = closed.jaxpr
    n_par = len(dyn_params)
    if len(jaxpr.invars) != n_par + len(dyn_inputs):  # pragma: no cover - one invar per array leaf
        raise RuntimeError(f"{_NAME}: unexpected jaxpr signature")
    index = [i for i, t in enumerate(traced) if t]  # jaxpr param invar -> leaf index
    shapes = [tuple(int(s) for s in np.shape(v)) if t else () for v, t in zip(leaves, traced)]
    record = _Record(len(leaves))
    walker = _Walker(paths, shapes, record)
    args_abs: list[Abstract] = []
    for j, v in enumerate(jaxpr.invars[:n_par]):
        i, shape = index[j], _shape(v)
        if i in chosen:
            args_abs.append(_const(shape))
        else:
            args_abs.append(_Par(shape, tuple(((i, a),) for a in range(len(shape))), links=frozenset({i})))
    args_abs += [_fresh(_shape(v)) for v in jaxpr.invars[n_par:]]
    walker.run(jaxpr, [_const(np.shape(c)) for c in closed.consts], args_abs)

    views: list[Any] = []
    problems: list[str] = []
    for i, (path, t) in enumerate(zip(paths, traced)):
        if i in chosen:
            views.append(chosen[i])
        elif not t:
            views.append(None)
        elif record.errors[i]:
            problems.extend(f"{_NAME}: {e}" for e in record.errors[i])
            views.append(None)
        elif record.reads[i]:
            try:
                views.append(_decide(path, record.reads[i], len(shapes[i])))
            except ValueError as e:
                problems.append(str(e))
                views.append(None)
        else:
            views.append(NotMatrix("parameter-only" if i in record.touched else "unused"))
    if problems:
        raise ValueError("\n".join(problems))
    return treedef.unflatten(views)
