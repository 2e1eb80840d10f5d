"""Argument checks, one place for all: every error names the function, the argument and the value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def is_concrete(x: Any) -> bool:
    """True when ``x`` has a value now (not a tracer inside jit or inject_hyperparams)."""
    return not isinstance(x, jax.core.Tracer)


def check_scalar(
    value: Any,
    argname: str,
    name: str,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    unit_interval: bool = False,
) -> None:
    """Validates a real hyperparameter when its value is known (tracers are checked at run time,
    see ``_norms.safe_bound``). ``True``/``False`` are refused: a bound is a number, not a flag.

    >>> check_scalar(True, "max_value", "max_norm", positive=True)
    Traceback (most recent call last):
    ...
    TypeError: max_norm: max_value must be a real number, got True
    """
    if not is_concrete(value):
        return
    if isinstance(value, (bool, np.bool_, str, bytes)) or np.ndim(value) != 0:
        raise TypeError(f"{name}: {argname} must be a real number, got {value!r}")
    if hasattr(value, "dtype") and not np.issubdtype(np.asarray(value).dtype, np.number):
        raise TypeError(f"{name}: {argname} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: {argname} must be a real number, got {value!r}") from e
    if not math.isfinite(v):
        raise ValueError(f"{name}: {argname} must be finite, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{name}: {argname} must be > 0, got {v}")
    if nonnegative and not v >= 0:
        raise ValueError(f"{name}: {argname} must be >= 0, got {v}")
    if unit_interval and not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: {argname} must lie in [0, 1], got {v}")


def positive_int(value: Any, argname: str, name: str) -> int:
    """``value`` as a Python int ``>= 1``; ``True``, ``2.5`` and ``"3"`` are refused.

    >>> positive_int(3, "num_iters", "sigma_power")
    3
    >>> positive_int(True, "num_iters", "sigma_power")
    Traceback (most recent call last):
    ...
    ValueError: sigma_power: num_iters must be an int >= 1, got True
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: {argname} must be an int >= 1, got {value!r}")
    return int(value)


def choice(value: Any, choices: Sequence[str], argname: str, name: str) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: unknown {argname} {value!r}; expected one of {tuple(choices)}")
    return value


def check_min_max(min_value: Any, max_value: Any, rate: Any, name: str) -> None:
    """The arguments of the min-max-norm family: ``0 <= min_value <= max_value``, ``rate`` in [0, 1]."""
    check_scalar(min_value, "min_value", name, nonnegative=True)
    check_scalar(max_value, "max_value", name, positive=True)
    check_scalar(rate, "rate", name, unit_interval=True)
    if is_concrete(min_value) and is_concrete(max_value):
        if float(min_value) > float(max_value):
            raise ValueError(f"{name}: min_value ({float(min_value)}) > max_value ({float(max_value)})")


SPECTRAL_MODES = ("rescale", "normalize", "clip", "orthogonalize", "soft_cap", "hammer")
SPECTRAL_ESTIMATORS = ("power", "gram", "svd", "matmul")


def runtime_valid(min_value: Any = None, max_value: Any = None, rate: Any = None) -> Any:
    """Whether bounds known only at run time (under ``jit``, from ``optax.inject_hyperparams`` or
    a schedule) describe a non-empty set: ``True`` (a Python bool) when every bound is concrete,
    since those were validated at construction; else a traced bool.

    The rule for traced bounds: ``max_value >= 0`` (``0`` is the set ``{0}`` and ``+inf`` no
    constraint), ``0 <= min_value <= max_value``, ``0 <= rate <= 1``. A NaN bound, a negative
    one or ``min_value > max_value`` has no projection: the constrained leaves then become NaN
    (as does every logged norm), so the failure shows at once instead of a silent sign flip or
    a step that does nothing. Concrete bounds are stricter (``max_value > 0`` and finite) and
    raise at construction, where a zero or infinite bound is a mistake rather than the end
    of a schedule.
    """
    bounds = [b for b in (min_value, max_value, rate) if b is not None]
    if all(is_concrete(b) for b in bounds):
        return True
    import jax.numpy as jnp

    ok = jnp.asarray(True)
    if max_value is not None:
        ok &= jnp.asarray(max_value) >= 0
    if min_value is not None:
        ok &= (jnp.asarray(min_value) >= 0) & (jnp.asarray(min_value) <= jnp.asarray(max_value))
    if rate is not None:
        ok &= (jnp.asarray(rate) >= 0) & (jnp.asarray(rate) <= 1)
    return ok


def poison(x: Any, ok: Any) -> Any:
    """``x`` where ``ok``, NaN elsewhere (``x`` itself when ``ok`` is the Python ``True``)."""
    if ok is True:
        return x
    import jax.numpy as jnp

    return jnp.where(ok, x, jnp.asarray(jnp.nan, x.dtype))
