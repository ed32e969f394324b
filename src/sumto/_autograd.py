"""The differentiable clamp-shift map ``y = clamp(x - tau(x, c), l, u)`` as one autograd node.

The simplex projection (``l = 0``), one-sided and two-sided box projections are this
map with ``tau`` from :func:`sumto._search.threshold`. One ``torch.autograd.Function``
serves every torch transform: ``backward`` (with double backward, since it is written
in differentiable ops of the incoming gradient), ``jvp`` (forward mode, ``jacfwd``),
and ``vmap`` (a rule that moves the batch dim in front, where the map is batched
anyway). The free set ``F = {l < y < u}`` is read from the saved output, never from
masks carried beside it.

Note [Jacobian from the free set]
On ``F`` the output is ``x - tau`` with ``tau = (sum_F x - c') / |F|`` (``c'`` the
total less the bound entries' mass); off ``F`` it is a constant bound. So
``dy = 1_F * (dx - (sum_F dx - dc) / |F|)`` and, transposed,
``grad_x = 1_F * (g - sum_F g / |F|)``, ``grad_c = sum_F g / |F|``. The map is piecewise
linear: its second derivative is zero wherever it is differentiable.

Note [Sum refinement]
``x - tau`` rounds at the scale of ``x`` and ``tau``, which can be far larger than the
output (pre-weights of magnitude 1 projected onto a total of 0.01): the sum of the
output would then be off by many of its own ulps, and a value the library produced
would fail its own membership check. One correction from the output itself,
``y <- y - (sum(y) - c) / |F|`` on ``F``, leaves only the rounding of the output's
entries. It does not change the classification beyond rounding, so the Jacobian is
that of Note [Jacobian from the free set]. A row without a free entry (every entry
on a bound) whose sum still misses the total (an all ``-inf`` row of the simplex)
spreads the difference over all its entries: the uniform row, its limit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sumto import _search
from sumto._compat import is_compiling, wide_dtype

__all__ = ["clamp_shift"]


def clamp_shift(x: Tensor, total: Tensor | float, lower: float, upper: float) -> Tensor:
    """``clamp(x - tau, lower, upper)`` per row (last dim) summing to ``total``.

    Args:
        x: Rows ``(..., n)``, float32 or float64.
        total: Float, or tensor of shape ``(..., 1)`` (expanded views are fine).
        lower: Lower bound, ``-inf`` allowed.
        upper: Upper bound, ``inf`` allowed; not both infinite.

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    node = _ClampShiftCompiled if is_compiling() else _ClampShift
    out: Tensor = node.apply(x, total, lower, upper)  # type: ignore[no-untyped-call]
    return out


def _free(y: Tensor, lower: float, upper: float) -> Tensor:
    """0/1 indicator of the free set ``lower < y < upper`` in ``y``'s dtype."""
    return ((y > lower) & (y < upper)).to(y.dtype)


def _assemble(x: Tensor, total: Tensor | float, lower: float, upper: float) -> Tensor:
    """The output, with Note [Sum refinement] applied (no autograd)."""
    tau = _search.threshold(x, total, lower, upper)
    y = (x - tau).clamp_(lower, upper)
    free = _free(y, lower, upper)
    count = free.sum(-1, keepdim=True)
    # rows without a free entry spread their error over every entry
    free = torch.where(count > 0, free, 1.0)
    count = torch.where(count > 0, count, float(x.shape[-1]))
    excess = ((y.sum(-1, keepdim=True, dtype=wide_dtype(y.device)) - total) / count).to(y.dtype)
    return y.sub_(free * excess).clamp_(lower, upper)


class _ClampShift(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, total: Tensor | float, lower: float, upper: float) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            return _assemble(x, total, lower, upper)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, _, lower, upper = inputs
        ctx.bounds = (lower, upper)
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        free = _free(y, *ctx.bounds)
        kept = grad * free
        mean = kept.sum(-1, keepdim=True) / free.sum(-1, keepdim=True).clamp_min(1.0)
        grad_total = mean if ctx.needs_input_grad[1] else None
        return kept - free * mean, grad_total, None, None

    @staticmethod
    def jvp(ctx: Any, dx: Tensor, dtotal: Tensor | None, *_: Any) -> Tensor:
        (y,) = ctx.saved_tensors
        free = _free(y, *ctx.bounds)
        moved = (dx * free).sum(-1, keepdim=True)
        if dtotal is not None:
            moved = moved - dtotal
        return free * (dx - moved / free.sum(-1, keepdim=True).clamp_min(1.0))

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[Any, ...],
        x: Tensor,
        total: Tensor | float,
        lower: float,
        upper: float,
    ) -> tuple[Tensor, int]:
        x_dim, total_dim = in_dims[0], in_dims[1]
        x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(info.batch_size, *x.shape)
        if isinstance(total, Tensor):
            if total_dim is not None:
                total = total.movedim(total_dim, 0)
            else:
                total = total.expand(info.batch_size, *total.shape)
            total = total.expand(*x.shape[:-1], 1)
        return clamp_shift(x, total, lower, upper), 0


class _ClampShiftCompiled(_ClampShift):
    """:class:`_ClampShift` as ``torch.compile`` traces it.

    Dynamo refuses a Function that defines ``jvp``; a compiled region differentiates
    in reverse mode only, so this subclass restores the base class's ``jvp``.
    """

    jvp = torch.autograd.Function.jvp  # type: ignore[assignment]
