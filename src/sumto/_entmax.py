r"""The alpha-entmax map of rows, as one autograd node, and its inverse on the simplex.

alpha-entmax (Peters, Niculae and Martins 2019) maps a row ``z`` to

.. math::
    p_i = \big[(\alpha - 1) z_i - \tau\big]_+^{1/(\alpha - 1)}, \qquad \sum_i p_i = 1,

with the threshold :math:`\tau` set by the sum. ``alpha = 1`` is the limit softmax,
``alpha = 2`` sparsemax; the dispatch on a float ``alpha`` (softmax, the simplex
projection, the sort below, bisection) is in :mod:`sumto.functional`.

Note [Entmax threshold bracket]
Rows are shifted by their (detached) max and scaled by ``alpha - 1``: ``X = (alpha - 1)
(z - max z) <= 0`` with max 0. The largest output is ``(-tau)^(1/(alpha-1)) <= 1``, so
``tau >= -1``; each output is at most ``(-tau)^(1/(alpha-1))``, so ``sum p <= 1`` once
``tau >= -(1/n)^(alpha-1)``. ``[-1, -(1/n)^(alpha-1)]`` brackets ``tau``, of width below
1, and entries with ``X < -1`` are never in the support: clamping them at -2 changes
no output and keeps ``-inf`` entries (masked logits) out of the arithmetic. A row of
``-inf`` only is read as a zero row, whose output (uniform) is its limit.

Note [Entmax bisection]
The sum of outputs decreases in ``tau``. Halving the bracket ``mantissa bits + 3``
times in the compute dtype puts ``tau`` within rounding of the root; the count is
fixed, so the loop needs no host sync and compiles to a static graph on any
device. ``tau`` is the lower end of the last bracket (sum >= 1, so the max entry is
in the support), and a final division by the sum makes the sum 1 within rounding.
Near ``alpha = 1`` the map itself is ill conditioned (the output has exponent
``1 / (alpha - 1)``): an error of ``tau`` at rounding level moves an output by a
relative ``eps / (alpha - 1)``.

Note [Entmax 1.5 by sorting]
For ``alpha = 1.5`` the support is the top ``k`` entries of the sorted row and
``sum_{j <= k} (x_j - tau)^2 = 1`` (``x = X``) is a quadratic in ``tau``, whose smaller
root is ``tau_k = m_k - sqrt((1 - k (q_k - m_k^2)) / k)`` with ``m_k`` and ``q_k`` the
means of the top ``k`` entries and of their squares. The support size is the number
of ``k`` with ``tau_k <= x_k``, as for the sort-based simplex projection.

Note [Entmax Jacobian]
On the support ``p_i^(alpha-1) = (alpha - 1) z_i - tau``. Differentiating,
``dp_i = s_i (dz_i - dtau / (alpha - 1))`` with ``s_i = p_i^(2 - alpha)`` (0 off the
support), and ``sum dp = 0`` gives ``dp = s * (dz - sum(s dz) / sum(s))``: the Jacobian is
``diag(s) - s s^T / sum(s)``, symmetric, so the gradient has the same form. At
``alpha = 1`` it is softmax's, ``s = p``. For ``alpha``, with ``beta = 1 / (alpha - 1)``,
``d log p_i / d alpha = -beta log p_i + beta (z_i - dtau/dalpha) / p_i^(alpha-1)``;
the sum constraint fixes ``dtau/dalpha`` and, with ``z`` written through ``p``,

``dp/dalpha = (p - s / sum(s)) / (alpha - 1)^2 - (p log p - (s / sum(s)) sum(p log p)) / (alpha - 1)``.

Both terms cancel as ``alpha -> 1``; the expansion ``tau = -1 + (alpha - 1) a + (alpha - 1)^2 b``
gives the limit ``dp_i/dalpha = p_i (sum_j p_j (log p_j)^2 - (log p_i)^2) / 2``, used
at ``alpha = 1`` and within ``eps^(1/4)`` of it, where the closed form loses its digits
to cancellation (:func:`_limit_below`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sumto._compat import is_compiling

__all__ = ["entmax_inverse_rows", "entmax_rows"]

# Note [Entmax threshold bracket]: entries below -1 are never in the support.
_FLOOR = -2.0


def entmax_rows(rows: Tensor, alpha: float | Tensor, exact_sort: bool = False) -> Tensor:
    """alpha-entmax of each row (last dim) with the closed-form backward.

    Args:
        rows: ``(..., n)`` float32 or float64 rows.
        alpha: A float >= 1, or a tensor of rows' dtype broadcastable to ``rows[..., :1]``
            (``alpha = 1`` entries give softmax).
        exact_sort: Use the sort-based algorithm (``alpha`` must be the float 1.5).

    Returns:
        Tensor of ``rows``' shape and dtype; each row is non-negative and sums to 1.
    """
    node: type[_Entmax] = _EntmaxCompiled if is_compiling() else _Entmax
    out: Tensor = node.apply(rows, alpha, exact_sort)  # type: ignore[no-untyped-call]
    return out


def entmax_inverse_rows(p: Tensor, alpha: float | Tensor) -> Tensor:
    """Rows ``z`` with ``entmax(z) = p`` for rows ``p`` on the probability simplex.

    On the support ``z = p^(alpha-1) / (alpha - 1)`` (threshold 0); zeros get
    ``-1 / (alpha - 1)``, a full bracket width below the threshold (Note [Entmax
    threshold bracket]), so that rounding of ``tau`` cannot revive them. At
    ``alpha = 1`` the inverse is the softmax one, ``log p`` with ``p`` at least eps.
    """
    log_p = p.clamp_min(torch.finfo(p.dtype).eps).log()
    if not isinstance(alpha, Tensor):
        if alpha == 1.0:
            return log_p
        return torch.where(p > 0, p.pow(alpha - 1.0), -1.0) / (alpha - 1.0)
    am1 = alpha - 1.0
    safe = torch.where(am1 > 0, am1, 1.0)
    z = torch.where(p > 0, p.pow(safe), -1.0) / safe
    return torch.where(am1 > 0, z, log_p)


def _iterations(dtype: torch.dtype) -> int:
    """Bisection steps: the mantissa bits of ``dtype`` plus 3 (Note [Entmax bisection])."""
    return round(-math.log2(torch.finfo(dtype).eps)) + 3


def _shifted(rows: Tensor) -> Tensor:
    """``z - max z``; a row of ``-inf`` only becomes a zero row (its limit)."""
    top = rows.amax(-1, keepdim=True)
    dead = top == -math.inf
    return torch.sub(rows, torch.where(dead, 0.0, top)).masked_fill_(dead, 0.0)


def _scaled(rows: Tensor, am1: float | Tensor) -> Tensor:
    """``(alpha - 1) (z - max z)``, floored at -2 (Note [Entmax threshold bracket])."""
    return (_shifted(rows) * am1).clamp_min_(_FLOOR)


def _sorted_15(rows: Tensor) -> Tensor:
    """alpha = 1.5 by sorting (Note [Entmax 1.5 by sorting])."""
    x = _scaled(rows, 0.5)
    xs = x.sort(-1, descending=True).values
    k = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    mean = xs.cumsum(-1) / k
    mean_sq = (xs * xs).cumsum(-1) / k
    delta = (1.0 - k * (mean_sq - mean * mean)) / k
    tau = mean - delta.clamp_min(0.0).sqrt()
    support = (tau <= xs).sum(-1, keepdim=True).clamp_min(1)
    tau_star = tau.gather(-1, support - 1)
    p = (x - tau_star).clamp_min_(0.0).square_()
    return p.div_(p.sum(-1, keepdim=True))


def _bisect(rows: Tensor, alpha: float | Tensor) -> Tensor:
    """alpha-entmax by bisection on the threshold (Note [Entmax bisection])."""
    am1 = alpha - 1.0
    if isinstance(am1, Tensor):
        # alpha = 1 rows take softmax below; any exponent keeps their arithmetic finite
        am1 = torch.where(am1 > 0, am1, 1.0)
    x = _scaled(rows, am1)
    power = 1.0 / am1
    n = x.shape[-1]
    lo = torch.full_like(x[..., :1], -1.0)
    width = (1.0 - (1.0 / n) ** am1) + torch.zeros_like(lo)
    for _ in range(_iterations(x.dtype)):
        width = width * 0.5  # exact: the bracket is [lo, lo + width] throughout
        mid = lo + width
        mass = (x - mid).clamp_min(0.0).pow(power).sum(-1, keepdim=True)
        lo = torch.where(mass >= 1.0, mid, lo)
    p = (x - lo).clamp_min(0.0).pow(power)
    p = p / p.sum(-1, keepdim=True)
    if isinstance(alpha, Tensor):
        p = torch.where(alpha == 1.0, torch.softmax(_shifted(rows), -1), p)
    return p


def _forward(rows: Tensor, alpha: float | Tensor, exact_sort: bool) -> Tensor:
    if exact_sort:
        return _sorted_15(rows)
    if not isinstance(alpha, Tensor) and alpha == 1.0:
        return torch.softmax(_shifted(rows), -1)
    return _bisect(rows, alpha)


def _support_weights(p: Tensor, alpha: float | Tensor) -> Tensor:
    """``s = p^(2 - alpha)`` on the support, 0 off it (Note [Entmax Jacobian])."""
    on = p > 0
    # where(on, ...) twice: the pow of a zero would give inf gradients in double backward
    return torch.where(on, torch.where(on, p, 1.0).pow(2.0 - alpha), 0.0)


def _alpha_derivative(p: Tensor, s: Tensor, alpha: Tensor) -> Tensor:
    """``dp/dalpha`` per entry (Note [Entmax Jacobian]), with its limit at ``alpha = 1``."""
    on = p > 0
    log_p = torch.where(on, torch.where(on, p, 1.0).log(), 0.0)
    p_log_p = p * log_p
    skewed = s / s.sum(-1, keepdim=True)
    am1 = alpha - 1.0
    safe = torch.where(am1 > 0, am1, 1.0)
    general = (p - skewed) / (safe * safe) - (
        p_log_p - skewed * p_log_p.sum(-1, keepdim=True)
    ) / safe
    squares = p * log_p * log_p
    limit = 0.5 * (p * squares.sum(-1, keepdim=True) - squares)
    return torch.where(am1 >= _limit_below(p.dtype), general, limit)


def _limit_below(dtype: torch.dtype) -> float:
    """``alpha - 1`` below which ``dp/dalpha`` is its limit at 1 (Note [Entmax Jacobian]).

    The closed form divides a difference of rounded outputs (error about
    ``eps / (alpha - 1)``) by ``(alpha - 1)^2``; the limit is off by O(alpha - 1).
    The two errors balance at ``eps^(1/4)``: 1.2e-4 in float64, 0.019 in float32.
    """
    return math.pow(torch.finfo(dtype).eps, 0.25)


class _Entmax(torch.autograd.Function):
    """alpha-entmax of rows; gradients for the rows and for a tensor ``alpha``.

    ``backward`` is written in differentiable ops of the saved output and the incoming
    gradient, so autograd differentiates it again; ``jvp`` gives forward mode, and the
    vmap rule is generated (the forward is batched over rows already).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(rows: Tensor, alpha: float | Tensor, exact_sort: bool) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            return _forward(rows, alpha, exact_sort)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, alpha, _ = inputs
        ctx.alpha_is_tensor = isinstance(alpha, Tensor)
        if ctx.alpha_is_tensor:
            ctx.save_for_backward(output, alpha)
            ctx.save_for_forward(output, alpha)
        else:
            ctx.alpha = alpha
            ctx.save_for_backward(output)
            ctx.save_for_forward(output)

    @staticmethod
    def _saved(ctx: Any) -> tuple[Tensor, float | Tensor]:
        if ctx.alpha_is_tensor:
            p, alpha = ctx.saved_tensors
            return p, alpha
        (p,) = ctx.saved_tensors
        return p, ctx.alpha

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        p, alpha = _Entmax._saved(ctx)
        s = _support_weights(p, alpha)
        grad_rows = None
        if ctx.needs_input_grad[0]:
            sg = s * grad
            grad_rows = sg - s * (sg.sum(-1, keepdim=True) / s.sum(-1, keepdim=True))
        grad_alpha = None
        if isinstance(alpha, Tensor) and ctx.needs_input_grad[1]:
            per_row = (grad * _alpha_derivative(p, s, alpha)).sum(-1, keepdim=True)
            grad_alpha = per_row.sum_to_size(alpha.shape)
        return grad_rows, grad_alpha, None

    @staticmethod
    def jvp(ctx: Any, drows: Tensor | None, dalpha: Tensor | None, _: Any) -> Tensor:
        p, alpha = _Entmax._saved(ctx)
        s = _support_weights(p, alpha)
        out = torch.zeros_like(p)
        if drows is not None:
            out = out + s * (drows - (s * drows).sum(-1, keepdim=True) / s.sum(-1, keepdim=True))
        if isinstance(alpha, Tensor) and dalpha is not None:
            out = out + _alpha_derivative(p, s, alpha) * dalpha
        return out


class _EntmaxCompiled(_Entmax):
    """:class:`_Entmax` as ``torch.compile`` traces it: dynamo refuses a Function with
    ``jvp``, and a compiled region differentiates in reverse mode only."""

    jvp = torch.autograd.Function.jvp  # type: ignore[assignment]
