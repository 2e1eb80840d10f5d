"""The public kinds of view: what one parameter leaf means to the model.

A *view* is a small immutable value (not a pytree node, so a pytree of views is shaped like
the params, one view per leaf) saying how a leaf is read:

- :class:`MatrixDims` -- a linear map: fan-in (``in_axes``), fan-out (``out_axes``), every other
  axis a batch axis (one matrix per batch index: layers stacked for ``scan``, ``vmap``-ed layers);
- ``ConvSpec`` (in ``_conv.py``) -- the kernel of a convolution on inputs of a given shape;
- :class:`Embedding` -- a lookup table whose rows are read by index (one unit per row);
- :class:`NotMatrix` -- a bias, a scale, or anything else only added or multiplied
  element-wise: never constrained, never part of a certificate.

:func:`normjax.infer_views` reads them from a model's jaxpr; users may also write them by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class MatrixDims:
    """Which axes of an N-d leaf form the rows (fan-in) and the columns (fan-out) of its matrix.

    Every axis in neither is a batch axis: each batch index is its own matrix with its own
    sigma (layers stacked for ``scan``, ``vmap``-ed layers). Negative axes count from the end;
    the order of axes within ``in_axes`` or ``out_axes`` does not change any singular value.
    ``out_axes=()`` is a single output unit (a vector read by a dot product).

    Max-norm bounds each output unit's fan-in: the norm over ``in_axes`` of every
    (batch index, out index). Spectral norm bounds the largest singular value of each
    ``(prod(in), prod(out))`` matrix.

    >>> MatrixDims(in_axes=-2, out_axes=-1)                 # (L, in, out): one sigma per layer
    MatrixDims(in_axes=-2, out_axes=-1)
    >>> MatrixDims(in_axes=0, out_axes=(1, 2))              # (d_model, heads, head_dim) as one matrix
    MatrixDims(in_axes=0, out_axes=(1, 2))
    >>> MatrixDims(in_axes=1, out_axes=0)                   # Equinox / PyTorch (out, in) weight
    MatrixDims(in_axes=1, out_axes=0)
    """

    in_axes: int | Sequence[int]
    out_axes: int | Sequence[int]


@dataclasses.dataclass(frozen=True)
class Embedding:
    """A lookup table: the axes in ``row_axes`` are indexed by the input (token ids), each row a unit.

    Max-norm bounds the norm of every row (over the feature axes: all axes in neither
    ``row_axes`` nor ``batch_axes``), as ``torch.nn.Embedding(max_norm=...)`` does. Spectral
    norm sees the ``(rows, features)`` matrix. A lookup is not a map of a continuous input, so
    an embedding is not a factor of :func:`normjax.lipschitz_bound`.

    >>> Embedding(row_axes=(0,))
    Embedding(row_axes=(0,), batch_axes=())
    """

    row_axes: int | Sequence[int] = 0
    batch_axes: int | Sequence[int] = ()


@dataclasses.dataclass(frozen=True)
class NotMatrix:
    """A leaf that is not a linear map of the input: a bias, a scale, an unused leaf.

    ``role`` says why (``"bias"``, ``"scale"``, ``"unused"``, ...). Constraints never touch it
    and certificates never count it.

    >>> NotMatrix("bias")
    NotMatrix(role='bias')
    """

    role: str = "not a matrix"
