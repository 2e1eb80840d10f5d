r"""Operator norms of convolutions, as Flax's ``Conv`` applies them.

A kernel ``K`` of shape ``(*kernel_size, in // groups, out)`` defines the linear map
:math:`A_K : x \mapsto \mathrm{conv}(x, K)` on channels-last inputs of spatial shape
``input_shape``. Its operator norm :math:`\lVert A_K \rVert_2` (largest singular value) is what
a Lipschitz certificate needs; the reshaped-kernel sigma of Miyato et al. (2018) is not a bound
on it. Four ways to get it:

- ``"power"``: power iteration through the convolution and its transpose (a lower bound,
  warm-startable; any padding, stride, dilation and group count);
- ``"fft"``: exact for circular padding from the singular values of the kernel's per-frequency
  matrices (Sedghi, Gupta & Long 2019), strides handled by a polyphase split;
- ``"gram"``: a certified upper bound by Gram iteration on those matrices (Delattre et al. 2023);
  for zero padding the convolution is a restriction of a circular one on a grid grown by the
  padding, so the same bound covers it (Delattre et al. 2024);
- ``"svd"``: exact, from the SVD of the materialised operator (small inputs only).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from normjax._norms import (
    HIGHEST,
    acc_dtype,
    _count_subnormal,
    _fro_up,
    clip_stack,
    exponent_of_max,
    gram_stack,
    ldexp,
    power_loop,
)
from normjax._shard import auto_where_explicit, batch_spec, like

Padding = str | int | Sequence[int | tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """The convolution a kernel leaf takes part in, with Flax ``nn.Conv`` semantics.

    Attributes:
      input_shape: the spatial shape of the layer's input, without batch and channels
        (``(8, 8)`` for ``(N, 8, 8, C)`` images). Its length is the number of spatial axes.
      strides: an int or one per spatial axis.
      padding: ``"SAME"``, ``"VALID"``, ``"SAME_LOWER"``, ``"CIRCULAR"``, ``"REFLECT"``,
        ``"CAUSAL"`` (1-D), an int, or one int or ``(low, high)`` pair per spatial axis.
      kernel_dilation: an int or one per spatial axis (``rhs_dilation``).
      feature_group_count: Flax's ``feature_group_count``.
      kernel_layout: the order of the kernel's axes. ``"flax"`` (default):
        ``(*kernel_size, in // groups, out)``, the layout of ``flax.linen.Conv`` and
        ``flax.nnx.Conv``; ``"torch"``: ``(out, in // groups, *kernel_size)``, the layout of
        ``equinox.nn.Conv`` and ``torch.nn.Conv2d``; or an arrangement of ``"O"`` (output
        features), ``"I"`` (input features) and the spatial letters ``"W"`` (1-D), ``"HW"``
        (2-D) or ``"DHW"`` (3-D), named in the input's spatial order (``"HWIO"`` is flax,
        ``"OIHW"`` torch, ``"WIO"`` a 1-D flax kernel, ``"WHIO"`` a flax kernel stored with its
        spatial axes swapped). The operator (hence its norm) is the same
        cross-correlation whatever the layout; channels first or last permutes coordinates
        and changes no norm.
      input_dilation: an int or one per spatial axis (``lhs_dilation``: a transposed
        convolution, as ``flax.linen.ConvTranspose`` computes it).
      batch_dims: how many leading kernel axes are batch axes (convolutions stacked for
        ``scan`` or ``vmap``), each batch index with its own norm. The kernel must have
        exactly ``batch_dims + len(input_shape) + 2`` axes.

    >>> ConvSpec((32, 32), strides=2)
    ConvSpec(input_shape=(32, 32), strides=2, padding='SAME', kernel_dilation=1, feature_group_count=1, kernel_layout='flax', input_dilation=1, batch_dims=0)
    """

    input_shape: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    kernel_layout: str = "flax"
    input_dilation: int | Sequence[int] = 1
    batch_dims: int = 0


class ResolvedConv(NamedTuple):
    """A validated :class:`ConvSpec` for one kernel, every field explicit."""

    batch: tuple[int, ...]  # leading batch axes of the kernel
    input_shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    in_channels: int  # of the operator's input: kernel.shape[-2] * groups
    out_channels: int
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_mode: str  # "constant" (lax padding), "wrap" (CIRCULAR) or "reflect"
    pads: tuple[tuple[int, int], ...]
    groups: int
    output_shape: tuple[int, ...]
    # the kernel's axes in flax order (*batch, *spatial, in, out); None: already in it
    kernel_perm: tuple[int, ...] | None = None
    input_dilation: tuple[int, ...] | None = None  # None: no lhs dilation

    @property
    def nd(self) -> int:
        return len(self.input_shape)

    @property
    def effective_kernel(self) -> tuple[int, ...]:
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation))

    @property
    def dilated_input(self) -> tuple[int, ...]:
        """The spatial shape after input (lhs) dilation: ``(n - 1) * d + 1``."""
        d = self.input_dilation or (1,) * self.nd
        return tuple((n - 1) * di + 1 for n, di in zip(self.input_shape, d))


CONV_METHODS = ("power", "fft", "gram", "svd")
_SPATIAL_LETTERS = {1: "W", 2: "HW", 3: "DHW"}
_PAD_STRINGS = ("SAME", "VALID", "SAME_LOWER", "CIRCULAR", "REFLECT", "CAUSAL")
DENSE_LIMIT = 1 << 26  # entries of a materialised operator ("svd" on non-circular padding)
# "gram" on a zero-padded convolution also runs Gram iteration on the materialised operator
# when that is cheap: min(inputs, outputs)**3 * num_iters at most this (a few ms on a CPU core).
DENSE_GRAM_BUDGET = 1 << 28


def kernel_letters(kernel_layout: str, nd: int, where: str) -> str:
    """The layout of a conv kernel as a letter string: ``"flax"`` -> ``"HWIO"``, ``"torch"`` -> ``"OIHW"``.

    >>> kernel_letters("torch", 1, "demo"), kernel_letters("DHWIO", 3, "demo")
    ('OIW', 'DHWIO')
    """
    spatial = _SPATIAL_LETTERS.get(nd)
    if spatial is None:
        raise ValueError(f"{where}: convolutions with {nd} spatial axes are not supported (1 to 3)")
    if kernel_layout == "flax":
        return spatial + "IO"
    if kernel_layout == "torch":
        return "OI" + spatial
    s = kernel_layout
    if not isinstance(s, str) or len(s) != nd + 2 or sorted(s) != sorted(spatial + "IO"):
        raise ValueError(
            f"{where}: unknown kernel_layout {kernel_layout!r}; expected 'flax', 'torch' or an arrangement of "
            f"the letters {spatial + 'IO'!r} (spatial axes {', '.join(spatial)} in the input's order, 'I' input "
            f"and 'O' output features; e.g. {spatial + 'IO'!r}, {'OI' + spatial!r})"
        )
    return s


def _per_axis(value: Any, nd: int, label: str, where: str) -> tuple[int, ...]:
    vals = (value,) * nd if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        vals = tuple(vals)
    except TypeError:
        raise TypeError(f"{where}: {label} must be an int or {nd} ints, got {value!r}") from None
    if len(vals) != nd or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in vals):
        raise ValueError(f"{where}: {label} must be a positive int or {nd} positive ints, got {value!r}")
    return tuple(int(v) for v in vals)


def resolve_conv(spec: ConvSpec, path: str, kernel: Any, name: str) -> ResolvedConv:
    """Validates a :class:`ConvSpec` against one kernel leaf; errors name the leaf's path.

    >>> import numpy as np
    >>> rc = resolve_conv(ConvSpec((8, 8), strides=2), "conv/kernel", np.zeros((3, 3, 4, 16)), "demo")
    >>> rc.pads, rc.output_shape
    (((0, 1), (0, 1)), (4, 4))
    """
    where = f"{name}: leaf {path!r}"
    if not isinstance(spec, ConvSpec):
        raise TypeError(f"{where}: expected a ConvSpec, got {spec!r}")
    try:
        input_shape = tuple(spec.input_shape)
    except TypeError:
        raise TypeError(f"{where}: ConvSpec.input_shape must be a sequence of ints, got {spec.input_shape!r}") from None
    nd = len(input_shape)
    if nd < 1 or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in input_shape):
        raise ValueError(
            f"{where}: ConvSpec.input_shape must hold >= 1 positive ints (the spatial shape, without "
            f"batch and channels), got {spec.input_shape!r}"
        )
    input_shape = tuple(int(n) for n in input_shape)
    letters = kernel_letters(spec.kernel_layout, nd, where)
    shape = tuple(np.shape(kernel))
    nb = spec.batch_dims
    if isinstance(nb, bool) or not isinstance(nb, (int, np.integer)) or nb < 0:
        raise ValueError(f"{where}: ConvSpec.batch_dims must be an int >= 0, got {nb!r}")
    nb = int(nb)
    if len(shape) != nb + nd + 2:
        raise ValueError(
            f"{where}: kernel of shape {shape} has {len(shape)} axes, but ConvSpec with input_shape "
            f"{input_shape} ({nd} spatial axes), kernel_layout {letters!r} and batch_dims={nb} needs "
            f"{nb + nd + 2}; input_shape is the spatial shape only (no batch or channel axis), and "
            f"stacked kernels declare their leading axes with batch_dims="
        )
    pos = {ch: nb + i for i, ch in enumerate(letters)}
    spatial_pos = [pos[ch] for ch in _SPATIAL_LETTERS[nd]]  # in the input's spatial order
    perm = tuple(range(nb)) + tuple(spatial_pos) + (pos["I"], pos["O"])
    kernel_size = tuple(shape[a] for a in spatial_pos)
    cin_g, cout = shape[pos["I"]], shape[pos["O"]]
    g = spec.feature_group_count
    if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
        raise ValueError(f"{where}: feature_group_count must be a positive int, got {g!r}")
    g = int(g)
    if cout % g:
        raise ValueError(f"{where}: {cout} output features are not divisible by feature_group_count={g}")
    if min(kernel_size + (cin_g, cout)) < 1:
        raise ValueError(f"{where}: kernel of shape {shape} is empty")
    strides = _per_axis(spec.strides, nd, "strides", where)
    dilation = _per_axis(spec.kernel_dilation, nd, "kernel_dilation", where)
    k_eff = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))
    in_dil = _per_axis(spec.input_dilation, nd, "input_dilation", where)
    n_dil = tuple((n - 1) * d + 1 for n, d in zip(input_shape, in_dil))
    padding = spec.padding
    if isinstance(padding, str):
        p = padding.upper()
        if p not in _PAD_STRINGS:
            raise ValueError(f"{where}: unknown padding {padding!r}; expected one of {_PAD_STRINGS} or explicit pads")
        if p in ("CIRCULAR", "REFLECT"):  # Flax pads the input, then runs a VALID convolution
            mode, pads = ("wrap" if p == "CIRCULAR" else "reflect"), tuple(((k - 1) // 2, k // 2) for k in k_eff)
            if p == "REFLECT" and any(max(pr) >= n for pr, n in zip(pads, input_shape)):
                raise ValueError(f"{where}: REFLECT padding {pads} needs an input larger than the pad, got {input_shape}")
        elif p == "CAUSAL":
            if nd != 1:
                raise ValueError(f"{where}: CAUSAL padding is for 1-D convolutions only (input_shape {input_shape})")
            mode, pads = "constant", ((k_eff[0] - 1, 0),)
        else:
            mode = "constant"
            pads = tuple(tuple(int(x) for x in q) for q in jax.lax.padtype_to_pads(n_dil, k_eff, strides, p))
    else:
        mode = "constant"
        items = [padding] * nd if isinstance(padding, (int, np.integer)) else padding
        try:
            items = list(items)
        except TypeError:
            raise TypeError(f"{where}: padding must be a string, an int or {nd} pads, got {padding!r}") from None
        pads = []
        for q in items:
            if isinstance(q, (int, np.integer)) and not isinstance(q, bool):
                pads.append((int(q), int(q)))
            elif isinstance(q, Sequence) and len(q) == 2 and all(isinstance(x, (int, np.integer)) for x in q):
                pads.append((int(q[0]), int(q[1])))
            else:
                raise ValueError(f"{where}: invalid padding {padding!r}: each entry is an int or a (low, high) pair")
        if len(pads) != nd:
            raise ValueError(f"{where}: padding {padding!r} has {len(pads)} entries for {nd} spatial axes")
        pads = tuple(pads)
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(n_dil, pads))
    out_shape = tuple((L - k) // s + 1 if L >= k else 0 for L, k, s in zip(padded, k_eff, strides))
    if min(out_shape) < 1:
        raise ValueError(
            f"{where}: the convolution has an empty output: input {input_shape} padded to {padded} is smaller "
            f"than the dilated kernel {k_eff}"
        )
    if mode != "constant" and in_dil != (1,) * nd:
        raise ValueError(f"{where}: {mode} padding with input_dilation {in_dil} is not a Flax convolution")
    return ResolvedConv(
        tuple(range(nb)), input_shape, kernel_size, cin_g * g, cout, strides, dilation, mode, pads, g, out_shape,
        None if perm == tuple(range(len(shape))) else perm,
        None if in_dil == (1,) * nd else in_dil,
    )


def _spec(kernel: Any, spec: Any, name: str) -> ResolvedConv:
    return spec if isinstance(spec, ResolvedConv) else resolve_conv(spec, "<kernel>", kernel, name)


def _flax_kernel(kernel: jax.Array, c: ResolvedConv) -> tuple[jax.Array, ResolvedConv]:
    """The kernel in flax layout and the spec that describes it (a no-op for flax kernels)."""
    if c.kernel_perm is None:
        return kernel, c
    return jnp.transpose(kernel, c.kernel_perm), c._replace(kernel_perm=None)


def _native_kernel(kernel: jax.Array, c: ResolvedConv) -> jax.Array:
    """A flax-layout kernel back in the layout ``c`` was given in."""
    return kernel if c.kernel_perm is None else jnp.transpose(kernel, np.argsort(c.kernel_perm))


# ----------------------------------------------------------------------------------------
# The operator and its transpose (one sample; kernels with batch axes are vmapped)
# ----------------------------------------------------------------------------------------


def _dimension_numbers(nd: int) -> jax.lax.ConvDimensionNumbers:
    lhs = (0, nd + 1) + tuple(range(1, nd + 1))  # N, C, spatial... of (N, *spatial, C)
    rhs = (nd + 1, nd) + tuple(range(nd))  # O, I, spatial... of (*spatial, I, O)
    return jax.lax.ConvDimensionNumbers(lhs, rhs, lhs)


def _apply_one(kernel: jax.Array, x: jax.Array, c: ResolvedConv) -> jax.Array:
    """``conv(x, kernel)`` for one sample ``x`` of shape ``(*input_shape, in)``, as Flax computes it."""
    x = x[None]
    if c.pad_mode == "constant":
        padding = c.pads
    else:
        x = jnp.pad(x, ((0, 0),) + c.pads + ((0, 0),), mode=c.pad_mode)
        padding = ((0, 0),) * c.nd
    y = jax.lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        c.strides,
        padding,
        lhs_dilation=c.input_dilation,
        rhs_dilation=c.dilation,
        dimension_numbers=_dimension_numbers(c.nd),
        feature_group_count=c.groups,
        precision=HIGHEST,
        preferred_element_type=x.dtype,
    )
    return y[0]


def _batched(fn, nb: int):
    for _ in range(nb):
        fn = jax.vmap(fn)
    return fn


def conv_operator(kernel: jax.Array, spec: ConvSpec | ResolvedConv):
    """``(apply, apply_t)``: the map :math:`x \\mapsto \\mathrm{conv}(x, K)` and its transpose.

    ``apply`` takes ``batch_shape + input_shape + (in,)`` and returns
    ``batch_shape + output_shape + (out,)``; ``apply_t`` goes back (``jax.linear_transpose``).
    Both run at ``Precision.HIGHEST`` in float32 (float64 for a float64 kernel).

    >>> import jax.numpy as jnp
    >>> apply, apply_t = conv_operator(jnp.ones((3, 1, 1)), ConvSpec((4,), padding="CIRCULAR"))
    >>> apply(jnp.arange(4.0)[:, None])[:, 0]
    Array([4., 3., 6., 5.], dtype=float32)
    """
    kernel = jnp.asarray(kernel)
    kernel, c = _flax_kernel(kernel, _spec(kernel, spec, "conv_operator"))
    acc = acc_dtype(kernel.dtype)
    k = kernel.astype(acc)
    nb = len(c.batch)
    x_struct = jax.ShapeDtypeStruct(c.input_shape + (c.in_channels,), acc)

    def one_t(kk, y):
        return jax.linear_transpose(lambda x: _apply_one(kk, x, c), x_struct)(y)[0]

    apply = _batched(lambda kk, x: _apply_one(kk, x, c), nb)
    apply_t = _batched(one_t, nb)
    return (lambda x: apply(k, x.astype(acc))), (lambda y: apply_t(k, y.astype(acc)))


def init_conv_power_vector(key: jax.Array, kernel: Any, spec: ConvSpec | ResolvedConv) -> jax.Array:
    """A random unit input, shape ``batch_shape + input_shape + (in,)``: the first power vector.

    >>> import jax, jax.numpy as jnp
    >>> init_conv_power_vector(jax.random.key(0), jnp.ones((3, 3, 2, 4)), ConvSpec((8, 8))).shape
    (8, 8, 2)
    """
    c = _spec(kernel, spec, "init_conv_power_vector")
    shape = tuple(np.shape(kernel)[: len(c.batch)]) + c.input_shape + (c.in_channels,)
    u = jax.random.normal(key, shape, acc_dtype(jnp.result_type(kernel)))
    axes = tuple(range(len(c.batch), len(shape)))
    return u / jnp.sqrt(jnp.sum(u * u, axis=axes, keepdims=True))


def conv_sigma_power(
    kernel: jax.Array, u: jax.Array, spec: ConvSpec | ResolvedConv, *, num_iters: int = 1
) -> tuple[jax.Array, jax.Array]:
    r"""Operator norm of the convolution by power iteration, warm-started from ``u``.

    Each iteration runs the convolution once and its transpose once:
    :math:`v = A u / \lVert A u \rVert`, :math:`u' = A^\top v / \lVert A^\top v\rVert`,
    :math:`\hat\sigma = \lVert A^\top v \rVert \le \lVert A \rVert_2` (a lower bound that
    tightens as ``u`` converges; Gouk et al. 2021 use it the same way). A zero kernel gives 0.
    Each kernel is divided by the power of two of its largest tap first (exact; nothing
    overflows when squared) and the estimate multiplied back, as :func:`sigma_power` does.

    Args:
      kernel: ``(*batch, *kernel_size, in // groups, out)``.
      u: the previous input-space vector, ``batch_shape + input_shape + (in,)``
        (:func:`init_conv_power_vector` makes the first).
      spec: the :class:`ConvSpec`.
      num_iters: iterations, ``>= 1``.

    Returns:
      ``(sigma, u)``: the estimate (shape ``batch_shape``) and the new unit vector.

    >>> import jax, jax.numpy as jnp
    >>> k = jnp.zeros((3, 1, 1)).at[:, 0, 0].set(jnp.array([1.0, 2.0, 1.0]))
    >>> spec = ConvSpec((8,), padding="CIRCULAR")           # symbol 2 + 2cos(w): norm 4
    >>> u0 = init_conv_power_vector(jax.random.key(0), k, spec)
    >>> round(float(conv_sigma_power(k, u0, spec, num_iters=50)[0]), 4)
    4.0

    References:
      Gouk, Frank, Pfahringer & Cree, "Regularisation of neural networks by enforcing
      Lipschitz continuity", Machine Learning 2021.
    """
    if isinstance(num_iters, bool) or int(num_iters) < 1:
        raise ValueError(f"conv_sigma_power: num_iters must be >= 1, got {num_iters}")
    kernel = jnp.asarray(kernel)
    c = _spec(kernel, spec, "conv_sigma_power")
    expected = tuple(kernel.shape[: len(c.batch)]) + c.input_shape + (c.in_channels,)
    if tuple(np.shape(u)) != expected:
        raise ValueError(f"conv_sigma_power: u has shape {np.shape(u)}, expected {expected} (batch + input_shape + (in,))")
    u = jnp.asarray(u)

    def body(kernel, u):
        acc = acc_dtype(kernel.dtype)
        nb = len(c.batch)
        e = exponent_of_max(kernel.astype(acc), axes=tuple(range(nb, kernel.ndim)))  # batch_shape
        scaled = ldexp(kernel.astype(acc), e.reshape(e.shape + (1,) * (kernel.ndim - nb)) * -1)
        apply, apply_t = conv_operator(scaled, c)
        sigma, u = power_loop(apply, apply_t, u, nb, int(num_iters), acc)
        return ldexp(sigma, e), u

    return auto_where_explicit(body, (kernel, u), lambda: (batch_spec(kernel, c.batch), like(u)))


# ----------------------------------------------------------------------------------------
# Fourier view: the per-frequency matrices of a (strided) circular convolution
# ----------------------------------------------------------------------------------------


def _fourier_layout(c: ResolvedConv, circular_exact: bool):
    """Grid, effective strides and tap offsets of the circular convolution that holds ``c``.

    Circular padding: the operator *is* a circular convolution on ``input_shape`` (strided
    when every stride divides its axis). Zero padding: the input, zero-padded, embeds
    isometrically in a grid of ``n + low + high`` rounded up to a stride multiple, on which the
    strided circular convolution never wraps for the outputs kept; the operator is a row and
    column selection of it, so its norm is at most that convolution's.
    """
    if c.pad_mode == "reflect" or c.input_dilation is not None:
        return None  # REFLECT duplicates border pixels; an input-dilated (transposed) conv is no circulant
    if c.pad_mode == "wrap":
        divisible = all(n % s == 0 for n, s in zip(c.input_shape, c.strides))
        if not divisible and circular_exact:
            return None
        strides = c.strides if divisible else (1,) * c.nd
        grid = c.input_shape
        offsets = tuple(lo for lo, _ in c.pads)
    else:
        strides = c.strides
        grid = tuple(s * -(-(n + lo + hi) // s) for n, (lo, hi), s in zip(c.input_shape, c.pads, c.strides))
        offsets = (0,) * c.nd
    # tap t of axis j sits at t*d - offset; polyphase: phase r = pos mod s, shift (pos - r)/s mod m
    phase, shift = [], []
    for j in range(c.nd):
        pos = np.arange(c.kernel_size[j]) * c.dilation[j] - offsets[j]
        r = np.mod(pos, strides[j])
        phase.append(r)
        shift.append(np.mod((pos - r) // strides[j], grid[j] // strides[j]))
    return grid, strides, phase, shift


def _embed_index(c: ResolvedConv, layout):
    grid, strides, phase, shift = layout
    nd = c.nd
    sh = np.meshgrid(*shift, indexing="ij")
    ph = np.meshgrid(*phase, indexing="ij")
    m = tuple(n // s for n, s in zip(grid, strides))
    return tuple(sh) + tuple(ph), m + tuple(strides), nd


def _fourier_matrices(kernel: jax.Array, c: ResolvedConv, layout) -> tuple[jax.Array, tuple]:
    """Per-frequency matrices ``(F * groups, phases * in_g, out_g)`` of one kernel (no batch axes).

    Uses ``rfftn``: the matrices of frequencies ``w`` and ``-w`` are complex conjugates, with
    the same singular values, so half the frequencies suffice.
    """
    index, grid_shape, nd = _embed_index(c, layout)
    cin_g, cout = kernel.shape[-2:]
    g = c.groups
    e = jnp.zeros(grid_shape + (cin_g, cout), kernel.dtype).at[index].add(kernel)
    f = jnp.fft.rfftn(e, axes=tuple(range(nd)))
    spectrum = f.shape[:nd]
    phases = int(np.prod(grid_shape[nd:]))
    f = f.reshape((-1, phases, cin_g, g, cout // g))
    f = jnp.transpose(f, (0, 3, 1, 2, 4)).reshape((-1, phases * cin_g, cout // g))
    return f, spectrum


def _stack_over_batch(kernel: jax.Array, c: ResolvedConv, fn, allowance=None) -> jax.Array:
    """Applies ``fn`` to every kernel of the batch axes; returns ``batch_shape`` results.

    ``fn`` sees each kernel divided by the power of two of its largest tap (exact: the taps
    lie in ``[1, 2)``, so nothing overflows in an FFT, a square or a Gram product) and returns
    a norm of that kernel, multiplied back here by the same power of two (a norm is
    homogeneous). A zero kernel reaches ``fn`` as it is. ``allowance(kk)``, if given, is
    added to each result, computed from the kernel as it is (the subnormal taps' share).
    """
    nb = len(c.batch)

    def scaled(kk):
        e = exponent_of_max(kk)
        out = ldexp(fn(ldexp(kk, -e)), e)
        return out if allowance is None else out + allowance(kk)

    def body(kernel):
        flat = kernel.reshape((-1,) + kernel.shape[nb:])
        if flat.shape[0] == 0:
            return jnp.zeros(kernel.shape[:nb], acc_dtype(kernel.dtype))
        out = jax.vmap(scaled)(flat) if nb else scaled(flat[0])[None]
        return out.reshape(kernel.shape[:nb])

    return auto_where_explicit(body, (kernel,), lambda: batch_spec(kernel, c.batch))


def _fft_error(layout, dtype) -> float:
    r"""Componentwise error of the float FFT on the grid: :math:`\varepsilon_N` with
    :math:`|\widehat{fl}(\omega) - \hat y(\omega)| \le \varepsilon_N \sum_x |y(x)|` for every
    output of an ``N``-point transform.

    A radix-``r`` FFT computes every output along a tree of :math:`\log_r N` butterfly levels;
    each level adds, to what it passes on, an error of at most :math:`\eta = \mu + \gamma_4
    (\sqrt 2 + \mu) \le 8 u` (:math:`\mu \le 2u`: the error of a stored twiddle factor)
    times the magnitudes it combines, and no output combines more than :math:`\sum_x |y(x)|`.
    So :math:`\varepsilon_N \le (1 + \eta)^{L} - 1 \approx L \eta` with :math:`L \le
    \log_2 N` levels over all axes; this allows :math:`16 u` (8 eps, twice that) per level
    plus one, for mixed radices and the real-to-complex split. :func:`conv_sigma_gram`
    multiplies it by the taps' :math:`\sqrt{K} \lVert K \rVert_F`, a bound on
    :math:`\lVert \Delta \hat K(\omega) \rVert_F` (Cauchy-Schwarz over the :math:`K` taps of
    each channel pair).
    """
    grid = layout[0]
    return 8.0 * float(np.finfo(dtype).eps) * (1 + math.log2(max(2, int(np.prod(grid)))))


def conv_sigma_fft(kernel: jax.Array, spec: ConvSpec | ResolvedConv) -> jax.Array:
    r"""Exact operator norm of a circular convolution from its Fourier matrices.

    For circular padding the convolution is diagonalised by the DFT: with :math:`\hat K(\omega)`
    the ``in x out`` matrix of the kernel's DFT at frequency :math:`\omega`, the singular
    values of the operator are those of all the :math:`\hat K(\omega)` (Sedghi, Gupta & Long
    2019), so :math:`\lVert A \rVert_2 = \max_\omega \sigma_{\max}(\hat K(\omega))`. A stride
    ``s`` dividing the input splits the input into :math:`s^d` phases (polyphase), giving
    ``s^d * in x out`` matrices on the ``n / s`` grid; groups give one matrix per group.

    Raises ``ValueError`` for non-circular padding (use ``"gram"`` or ``"power"``) or a
    stride that does not divide the input.

    >>> import jax.numpy as jnp
    >>> k = jnp.zeros((3, 1, 1)).at[:, 0, 0].set(jnp.array([1.0, 2.0, 1.0]))
    >>> float(conv_sigma_fft(k, ConvSpec((8,), padding="CIRCULAR")))
    4.0

    References:
      Sedghi, Gupta & Long, "The singular values of convolutional layers", ICLR 2019.
    """
    kernel = jnp.asarray(kernel)
    kernel, c = _flax_kernel(kernel, _spec(kernel, spec, "conv_sigma_fft"))
    layout = _fourier_layout(c, circular_exact=True) if c.pad_mode == "wrap" else None
    if layout is None:
        raise ValueError(_fft_unsupported(c, "conv_sigma_fft"))
    k = kernel.astype(acc_dtype(kernel.dtype))

    def one(kk):
        f, _ = _fourier_matrices(kk, c, layout)
        return jnp.max(jnp.linalg.svd(f, compute_uv=False)[:, 0])

    return _stack_over_batch(k, c, one)


def _fft_unsupported(c: ResolvedConv, name: str) -> str:
    if c.pad_mode != "wrap":
        mode = "REFLECT" if c.pad_mode == "reflect" else f"zero padding {c.pads}"
        return (
            f"{name}: the FFT method is exact for CIRCULAR padding only, not {mode}; use method='gram' "
            f"(a certified upper bound), 'power' (a lower bound) or 'svd' (exact, small inputs)"
        )
    return f"{name}: strides {c.strides} must divide the input shape {c.input_shape} for the exact FFT method"


def conv_sigma_gram(kernel: jax.Array, spec: ConvSpec | ResolvedConv, *, num_iters: int = 8) -> jax.Array:
    r"""Certified upper bound on the operator norm by Gram iteration on the Fourier matrices.

    The operator is (a row and column selection of) a circular convolution whose norm is
    :math:`\max_\omega \sigma_{\max}(\hat K(\omega))` (see :func:`conv_sigma_fft`): for
    circular padding on the input grid itself, for zero padding (``SAME``, ``VALID``, explicit,
    ``CAUSAL``) on the grid of the padded input, where it never wraps (Delattre et al. 2024).
    Each :math:`\hat K(\omega)` is bounded by Gram iteration (:func:`sigma_gram`, Delattre et
    al. 2023) and the maximum is taken, so the result is never below the true norm; the
    rounding is covered twice over: each Gram bound carries its own certified margin (see
    :func:`sigma_gram`: products, Frobenius norms, root), and the FFT's error is added as
    :math:`\varepsilon_N \sqrt{K} \lVert K \rVert_F` (:func:`_fft_error`; :math:`K` taps).
    Kernels are scaled by the power of two of their largest tap first (exact), so huge and
    tiny kernels do not overflow; subnormal taps add :math:`\sqrt{K \cdot \#}\,\text{tiny}`.
    For zero padding it is the circular norm of the grown grid, a few percent above the true
    norm on small inputs, tight on large ones; when the operator is small enough that Gram
    iteration on its materialised matrix is cheap (``min(inputs, outputs)**3 * num_iters <=
    DENSE_GRAM_BUDGET``, 2**28), that bound is computed as well and the smaller of the two
    returned (every entry of that matrix is a kernel tap or 0, copied exactly), which is tight
    to about 0.1% there. REFLECT padding has no such bound (ValueError).

    >>> import jax.numpy as jnp
    >>> k = jnp.zeros((3, 1, 1)).at[:, 0, 0].set(jnp.array([1.0, 2.0, 1.0]))
    >>> 4.0 <= float(conv_sigma_gram(k, ConvSpec((8,), padding="CIRCULAR"))) < 4.001
    True

    References:
      Delattre, Barthélemy, Araujo & Allauzen, "Efficient bound of Lipschitz constant for
      convolutional layers by Gram iteration", ICML 2023.
      Delattre, Barthélemy & Allauzen, "Spectral norm of convolutional layers with circular
      and zero paddings", 2024.
    """
    if isinstance(num_iters, bool) or int(num_iters) < 1:
        raise ValueError(f"conv_sigma_gram: num_iters must be >= 1, got {num_iters}")
    kernel = jnp.asarray(kernel)
    kernel, c = _flax_kernel(kernel, _spec(kernel, spec, "conv_sigma_gram"))
    layout = _fourier_layout(c, circular_exact=False)
    refusal = conv_refusal(c, estimator="gram")
    if refusal is not None:
        raise ValueError(f"conv_sigma_gram: {refusal}")
    k = kernel.astype(acc_dtype(kernel.dtype))
    n_in, n_out = _dense_size(c)
    dense = c.pad_mode != "wrap" and n_in * n_out <= DENSE_LIMIT and (
        layout is None or min(n_in, n_out) ** 3 * int(num_iters) <= DENSE_GRAM_BUDGET
    )

    taps = int(np.prod(c.kernel_size))
    tiny = float(jnp.finfo(k.dtype).tiny)

    def one(kk):  # kk: taps scaled into [1, 2) by _stack_over_batch
        if layout is None:  # an input-dilated convolution: only the materialised operator
            return gram_stack(_dense_matrix(kk, c)[None], int(num_iters))[0]
        f, _ = _fourier_matrices(kk, c, layout)
        # sigma(K(w)) <= sigma(K^(w)) + ||K^(w) - K(w)||_F <= bound + eps_N sqrt(taps) ||kk||_F
        fft = _fft_error(layout, k.dtype) * math.sqrt(taps) * _fro_up(kk.reshape(1, -1, 1))[0]
        bound = jnp.max(gram_stack(f, int(num_iters))) + fft  # the sum's rounding: in gram_stack's budget
        if dense:  # both are certified: keep the smaller
            bound = jnp.minimum(bound, gram_stack(_dense_matrix(kk, c)[None], int(num_iters))[0])
        return bound

    def flushed(kk):  # subnormal taps read as 0 in XLA on CPU: they move the operator by at
        # most sqrt(taps) * ||flushed taps||_F <= sqrt(taps * count) * tiny
        return jnp.sqrt(_count_subnormal(kk, None).astype(kk.dtype) * taps) * (2 * tiny)

    return _stack_over_batch(k, c, one, flushed)


def _fft_exact(c: ResolvedConv) -> bool:
    """Whether the FFT gives this convolution's norm exactly: circular, strides dividing the input."""
    return c.pad_mode == "wrap" and all(n % s == 0 for n, s in zip(c.input_shape, c.strides))


def _dense_size(c: ResolvedConv) -> tuple[int, int]:
    """``(inputs, outputs)``: the shape of the materialised operator of one kernel."""
    return int(np.prod(c.input_shape)) * c.in_channels, int(np.prod(c.output_shape)) * c.out_channels


def conv_sigma_svd(kernel: jax.Array, spec: ConvSpec | ResolvedConv) -> jax.Array:
    """Exact operator norm: the FFT for circular padding, else the SVD of the materialised operator.

    The dense path builds the ``(prod(input_shape) * in) x (prod(output_shape) * out)``
    matrix and raises ``ValueError`` above 2**26 entries (use ``"gram"`` or ``"power"``).
    """
    kernel = jnp.asarray(kernel)
    kernel, c = _flax_kernel(kernel, _spec(kernel, spec, "conv_sigma_svd"))
    if _fft_exact(c):
        return conv_sigma_fft(kernel, c)
    n_in, n_out = _dense_size(c)
    if n_in * n_out > DENSE_LIMIT:
        raise ValueError(
            f"conv_sigma_svd: the operator is {n_in} x {n_out}, too large to materialise "
            f"(limit {DENSE_LIMIT} entries); use method='gram' (certified bound) or 'power'"
        )
    k = kernel.astype(acc_dtype(kernel.dtype))  # scaled by a power of two in _stack_over_batch
    return _stack_over_batch(k, c, lambda kk: jnp.linalg.svd(_dense_matrix(kk, c), compute_uv=False)[0])


def _dense_matrix(kernel: jax.Array, c: ResolvedConv) -> jax.Array:
    """The ``(inputs, outputs)`` matrix of one flax-layout kernel's operator (the transpose of
    its Jacobian: the same singular values). With zero padding every entry is one kernel tap
    or 0, copied exactly; no rounding enters."""
    n_in, n_out = _dense_size(c)
    basis = jnp.eye(n_in, dtype=kernel.dtype).reshape((n_in,) + c.input_shape + (c.in_channels,))
    return jax.vmap(lambda e: _apply_one(kernel, e, c))(basis).reshape(n_in, n_out)


def conv_clip(kernel: jax.Array, max_value: Any, spec: ConvSpec | ResolvedConv) -> tuple[jax.Array, jax.Array]:
    r"""Pulls a circular convolution into the operator-norm ball by clipping in the Fourier domain.

    Sedghi, Gupta & Long (2019): clip the singular values of every :math:`\hat K(\omega)` at
    :math:`c` (the exact Euclidean projection among circular convolutions of full support),
    go back to the spatial domain and keep the kernel's own taps (the Euclidean projection
    onto kernels of this size). The two projections do not commute, so the result is then
    rescaled by :math:`\min(1, c / \lVert A \rVert)` with its exact FFT norm, and compared
    with plain rescaling :math:`K c / \lVert A \rVert`: the closer of the two (in Frobenius
    norm) is returned. It is inside the ball for sure and never farther than rescaling; it
    is much closer when only a few frequencies exceed the bound. Kernels already inside come
    back bit for bit. Circular padding only. Each kernel (and the bound with it) is scaled by
    the power of two of its largest tap first (exact), so huge and tiny kernels work, and
    the per-frequency clip is :func:`clip_stack`'s (accurate from any sigma).

    Returns ``(kernel_new, sigma)`` with ``sigma`` the exact norm before (``batch_shape``).

    >>> import jax.numpy as jnp
    >>> k = jnp.zeros((3, 1, 1)).at[:, 0, 0].set(jnp.array([1.0, 2.0, 1.0]))
    >>> spec = ConvSpec((8,), padding="CIRCULAR")
    >>> k_new, sigma = conv_clip(k, 2.0, spec)
    >>> float(sigma), float(conv_sigma_fft(k_new, spec)) <= 2.0
    (4.0, True)
    """
    kernel = jnp.asarray(kernel)
    native = _spec(kernel, spec, "conv_clip")
    c = native._replace(kernel_perm=None)  # what the Fourier maths sees; body() transposes to it and back
    layout = _fourier_layout(c, circular_exact=True) if c.pad_mode == "wrap" else None
    if layout is None:
        raise ValueError(_fft_unsupported(c, "conv_clip").replace("FFT method", "Fourier clip"))
    acc = acc_dtype(kernel.dtype)
    cval = jnp.asarray(max_value, acc)
    index, grid_shape, nd = _embed_index(c, layout)
    counts = np.zeros(grid_shape, np.int64)
    np.add.at(counts, index, 1)
    tap_counts = counts[index].astype(acc)  # taps sharing a slot split its value evenly
    cin_g, cout = c.in_channels // c.groups, c.out_channels
    g = c.groups
    m = grid_shape[:nd]
    phases = int(np.prod(grid_shape[nd:]))

    def one(k0):
        # the kernel scaled by the power of two of its largest tap (exact), the bound with it
        e = exponent_of_max(k0)
        kk, cs = ldexp(k0, -e), ldexp(cval, -e)
        f, spectrum = _fourier_matrices(kk, c, layout)
        y, s = clip_stack(f, cs)

        def unstack(z):  # (F * g, phases * in_g, out_g) back to the rfftn layout of the embedding
            z = z.reshape((-1, g, phases, cin_g, cout // g))
            return jnp.transpose(z, (0, 2, 3, 1, 4)).reshape(spectrum + grid_shape[nd:] + (cin_g, cout))

        y, f_full = unstack(y), unstack(f)
        delta = jnp.fft.irfftn(y - f_full, s=m, axes=tuple(range(nd))).astype(acc)
        # the nearest kernel whose embedding moved by delta: taps sharing a slot split its change
        k_new = kk + delta[index] / tap_counts.reshape(tap_counts.shape + (1, 1))
        f_new, _ = _fourier_matrices(k_new, c, layout)
        s_new = jnp.max(jnp.linalg.svd(f_new, compute_uv=False)[:, 0])
        k_new = k_new * jnp.where(s_new > cs, cs / jnp.where(s_new > cs, s_new, 1), 1)
        sigma = jnp.max(s)
        k_rescaled = kk * (cs / jnp.where(sigma > cs, sigma, 1))
        closer = jnp.sum((k_new - kk) ** 2) <= jnp.sum((k_rescaled - kk) ** 2)
        out = ldexp(jnp.where(closer, k_new, k_rescaled), e)
        return jnp.where(sigma > cs, out, k0), ldexp(sigma, e)

    nb = len(c.batch)

    def body(kernel):
        kf = _flax_kernel(kernel, native)[0]
        k_new, sigma = jax.vmap(one)(kf.astype(acc).reshape((-1,) + kf.shape[nb:]))
        k_new = _native_kernel(k_new.reshape(kf.shape).astype(kernel.dtype), native)
        return k_new, sigma.reshape(kernel.shape[:nb])

    return auto_where_explicit(body, (kernel,), lambda: (like(kernel), batch_spec(kernel, c.batch)))


def conv_spectral_norm(
    kernel: jax.Array,
    input_shape: Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    kernel_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    kernel_layout: str = "flax",
    input_dilation: int | Sequence[int] = 1,
    batch_dims: int = 0,
    method: str = "power",
    num_iters: int | None = None,
    u: jax.Array | None = None,
    seed: int = 0,
) -> jax.Array:
    r"""Operator norm :math:`\lVert x \mapsto \mathrm{conv}(x, K) \rVert_2` as Flax's ``nn.Conv`` applies it.

    ``kernel`` has Flax's layout ``(*kernel_size, in // feature_group_count, out)``, behind
    ``batch_dims`` leading batch axes (one norm each), or with ``kernel_layout="torch"`` the
    layout of ``equinox.nn.Conv`` and ``torch.nn.Conv2d``, ``(out, in // feature_group_count,
    *kernel_size)`` (or any letter string, see :class:`ConvSpec`); the input has spatial shape
    ``input_shape``; ``strides``, ``padding``, ``kernel_dilation``, ``feature_group_count``
    and ``input_dilation`` mean what they mean for ``nn.Conv`` / ``lax.conv_general_dilated``
    (see :class:`ConvSpec`). The norm depends on the input
    size and the padding, and is *not* the largest singular value of the kernel reshaped to
    ``(prod(kernel_size) * in, out)``: that number can be well below it (it is exact only for
    1x1 kernels), and a network constrained by it is not 1-Lipschitz.

    Methods:

    - ``"power"`` (default): power iteration through the convolution and its transpose, a
      lower bound; ``num_iters`` (default 100) from ``u`` or a random start seeded by ``seed``.
    - ``"fft"``: exact, circular padding only (:func:`conv_sigma_fft`).
    - ``"gram"``: certified upper bound, any padding but REFLECT (:func:`conv_sigma_gram`,
      ``num_iters`` default 8).
    - ``"svd"``: exact (FFT for circular padding, else the dense operator; small inputs).

    Returns the norm in float32 (float64 for a float64 kernel), shape ``batch_shape``.

    >>> import jax, jax.numpy as jnp, normjax as nj
    >>> k = jax.random.normal(jax.random.key(0), (3, 3, 2, 4)) / 3
    >>> exact = nj.conv_spectral_norm(k, (6, 6), method="svd")
    >>> bound = jax.jit(lambda k: nj.conv_spectral_norm(k, (6, 6), method="gram"))(k)  # one compile
    >>> low = nj.conv_spectral_norm(k, (6, 6), method="power")
    >>> bool(low <= exact * (1 + 1e-5)) and bool(exact <= bound)
    True
    >>> reshaped = nj.sigma_svd(k)                          # the matrix view: not a bound
    >>> bool(reshaped < exact)
    True

    References:
      Sedghi, Gupta & Long, "The singular values of convolutional layers", ICLR 2019.
      Delattre et al., "Efficient bound of Lipschitz constant for convolutional layers by
      Gram iteration", ICML 2023. Gouk et al., "Regularisation of neural networks by
      enforcing Lipschitz continuity", Machine Learning 2021.
    """
    name = "conv_spectral_norm"
    if method not in CONV_METHODS:
        raise ValueError(f"{name}: unknown method {method!r}; expected one of {CONV_METHODS}")
    kernel = jnp.asarray(kernel)
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(f"{name}: kernel must be floating point, got {kernel.dtype}")
    spec = ConvSpec(input_shape, strides, padding, kernel_dilation, feature_group_count, kernel_layout, input_dilation, batch_dims)
    c = resolve_conv(spec, "kernel", kernel, name)
    if method == "power":
        iters = 100 if num_iters is None else num_iters
        u0 = init_conv_power_vector(jax.random.key(seed), kernel, c) if u is None else u
        return conv_sigma_power(kernel, u0, c, num_iters=iters)[0]
    if method == "fft":
        return conv_sigma_fft(kernel, c)
    if method == "gram":
        return conv_sigma_gram(kernel, c, num_iters=8 if num_iters is None else num_iters)
    return conv_sigma_svd(kernel, c)



# ----------------------------------------------------------------------------------------
# What each estimator and mode can do with a given convolution (checked at init/trace time)
# ----------------------------------------------------------------------------------------


def conv_refusal(c: ResolvedConv, *, estimator: str, mode: str | None = None) -> str | None:
    """Why ``estimator``/``mode`` cannot handle the convolution ``c`` (``None``: it can).

    ``mode="clip"`` needs the Fourier clip (circular padding, strides dividing the input);
    ``"gram"`` has no certified Fourier bound for REFLECT padding or an input-dilated
    (transposed) convolution unless its operator is small enough to materialise; ``"svd"`` on
    a non-circular convolution materialises the operator, refused above :data:`DENSE_LIMIT`.
    """
    n_in, n_out = _dense_size(c)
    if estimator == "matmul" or mode in ("orthogonalize", "soft_cap", "hammer"):
        what = "estimator='matmul'" if estimator == "matmul" else f"mode={mode!r}"
        return (
            f"{what} is a map on matrices (a polynomial in W W^T, or a rank-one update); a convolution's "
            "operator is not its kernel's matrix. Use mode='rescale' (estimator 'gram' certifies it) or "
            "mode='clip' with estimator='svd' on CIRCULAR padding"
        )
    if mode == "clip":
        if c.pad_mode != "wrap" or _fourier_layout(c, circular_exact=True) is None:
            return (
                f"mode='clip' needs CIRCULAR padding with strides dividing the input (the Fourier clip); "
                f"this convolution has padding {c.pads} ({c.pad_mode}), strides {c.strides}"
                + (f", input dilation {c.input_dilation}" if c.input_dilation else "")
                + ". Use mode='rescale'"
            )
        return None
    if estimator == "gram" and c.pad_mode == "reflect":
        return (
            "estimator='gram': REFLECT padding duplicates border pixels and has no certified Fourier bound; "
            "use estimator='power' or 'svd', or another padding"
        )
    if estimator == "gram" and c.input_dilation is not None and n_in * n_out > DENSE_LIMIT:
        return (
            f"estimator='gram' on an input-dilated (transposed) convolution needs its {n_in} x {n_out} operator "
            f"materialised (limit {DENSE_LIMIT} entries); use estimator='power'"
        )
    if estimator == "svd" and not _fft_exact(c) and n_in * n_out > DENSE_LIMIT:
        return (
            f"estimator='svd' would materialise a {n_in} x {n_out} operator (limit {DENSE_LIMIT} entries); "
            f"use estimator='gram' (certified bound) or 'power'"
        )
    return None
