"""Pure tensor maps and Euclidean projections onto sum-constrained sets.

Every function here is a pure, differentiable map on tensors, and the one place
where the simplex ``method`` (softmax, sparsemax, relu) is dispatched. The constraint
classes in :mod:`sumto.constraints` and :class:`sumto.WeightedSum` only hold
configuration and call these.

Conventions shared by all functions:

* ``dim`` is an ``int`` or a tuple of ints; the constraint holds for every slice
  obtained by fixing the other dims ("batched over the other dims").
* ``total`` is a float, or a tensor broadcastable to the keepdim-reduced shape
  (``x.sum(dim, keepdim=True).shape``) or equal to the reduced shape, giving one
  target per slice.
* The output has the dtype of ``x``; float16 and bfloat16 inputs are computed in
  float32 internally.
* Every map supports autograd (double backward included), ``torch.func`` transforms
  (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``jvp``, ``hessian``), ``torch.compile``
  and ``torch.jit.trace``, on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from sumto import _autograd, _checks, _transport
from sumto._autograd import clamp_shift
from sumto._checks import Dim as Dim
from sumto._checks import Total as Total
from sumto._transport import Marginal as Marginal

__all__ = [
    "project_box_sum",
    "project_simplex",
    "project_sum",
    "project_transport",
    "sinkhorn",
    "sum_violation",
]

SimplexMethod = Literal["softmax", "sparsemax", "relu"]
SIMPLEX_METHODS: tuple[SimplexMethod, ...] = ("softmax", "sparsemax", "relu")
# Note [relu fusion eps]: the additive constant of the BiFPN fast normalised fusion.
RELU_EPS = 1e-4

# Names used across the package (and by tests through this module).
_check_dim_spec = _checks.check_dim_spec
_normalize_dims = _checks.normalize_dims
_check_float_tensor = _checks.check_float_tensor
_compute_dtype = _checks.compute_dtype
_reduced_size = _checks.reduced_size
_keep_shape = _checks.keep_shape
_check_total = _checks.check_total
_broadcast_total_shape = _checks.broadcast_total_shape
_check_total_range = _checks.check_total_range
_check_positive = _checks.check_positive
_check_bounds = _checks.check_bounds
_check_box = _checks.check_box


def _validate(x: Tensor, total: Total, dim: Dim) -> tuple[int, ...]:
    _check_float_tensor(x)
    dims = _normalize_dims(dim, x.ndim)
    if x.ndim > 0 and _reduced_size(x.shape, dims) == 0:
        raise ValueError(
            f"expected at least one element along dim {dim!r} to distribute a total over, "
            f"got a tensor of shape {tuple(x.shape)}"
        )
    _check_total(total, x.shape, dims)
    _check_total_range(total, _compute_dtype(x.dtype))
    return dims


# ---------------------------------------------------------------------------
# layout: the constrained dims flattened last, as rows
# ---------------------------------------------------------------------------


def _to_rows(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """View/copy ``x`` as ``(*other_dims, n)`` with the constrained dims flattened last."""
    if x.ndim == 0:
        return x.reshape(1)
    k = len(dims)
    if dims == (x.ndim - 1,):  # already rows
        return x
    moved = x.movedim(dims, tuple(range(x.ndim - k, x.ndim)))
    return moved.flatten(x.ndim - k) if k > 1 else moved


def _from_rows(y: Tensor, x_shape: Sequence[int], dims: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`_to_rows`."""
    if len(x_shape) == 0:
        return y.reshape(())
    k = len(dims)
    ndim = len(x_shape)
    if dims == (ndim - 1,):
        return y
    other = [s for i, s in enumerate(x_shape) if i not in dims]
    moved_shape = [*other, *(x_shape[d] for d in dims)]
    return y.reshape(moved_shape).movedim(tuple(range(ndim - k, ndim)), dims)


def _total_like(total: Total, x: Tensor, dims: tuple[int, ...]) -> Tensor | float:
    """The total on x's device and dtype, viewed as the keepdim shape.

    A total beyond the dtype's range saturates at its largest finite value: the
    validating entry points reject it (:func:`_check_total_range`), and unvalidated
    paths (a constraint's forward) stay free of inf - inf = nan.
    """
    big = torch.finfo(x.dtype).max
    if not isinstance(total, Tensor):
        return min(max(float(total), -big), big)
    view_shape = _broadcast_total_shape(tuple(total.shape), x.shape, dims)
    return total.to(device=x.device, dtype=x.dtype).reshape(view_shape).clamp(-big, big)


def _total_rows(total: Tensor | float, x: Tensor, dims: tuple[int, ...]) -> Tensor | float:
    """Total (keepdim shape) laid out like :func:`_to_rows` output, last dim of size 1."""
    if not isinstance(total, Tensor):
        return total
    if x.ndim == 0:
        return total.reshape(1)
    return _to_rows(total.expand(_keep_shape(x.shape, dims)), dims)


def _apply_rows(
    x: Tensor,
    total: Total,
    dims: tuple[int, ...],
    row_map: Callable[..., Tensor],
    *args: object,
) -> Tensor:
    """Cast to the compute dtype, lay out as rows, apply ``row_map``, restore."""
    xc = x.to(_compute_dtype(x.dtype))
    t = _total_like(total, xc, dims)
    out = row_map(_to_rows(xc, dims), _total_rows(t, xc, dims), *args)
    return _from_rows(out, x.shape, dims).to(x.dtype)


# ---------------------------------------------------------------------------
# the maps (no validation, no host synchronisation)
# ---------------------------------------------------------------------------


_sum_scale = _autograd._sum_scale


def _project_sum(x: Tensor, total: Tensor | float, dims: tuple[int, ...]) -> Tensor:
    """``x + (total - sum(x)) / n`` over ``dims``, exact to the rounding of the output."""
    if x.ndim == 0:
        return torch.zeros_like(x) + total
    out = _project_box_rows(_to_rows(x, dims), _total_rows(total, x, dims), -math.inf, math.inf)
    return _from_rows(out, x.shape, dims)


def _project_simplex_rows(rows: Tensor, total: Tensor | float) -> Tensor:
    """Euclidean projection of each row (last dim) onto the simplex scaled by ``total``."""
    return _project_box_rows(rows, total, 0.0, math.inf)


def _project_box_rows(rows: Tensor, total: Tensor | float, lower: float, upper: float) -> Tensor:
    """Euclidean projection of each row onto ``{sum = total, lower <= y <= upper}``.

    Both bounds infinite is the affine projection, which the same node computes.
    """
    if rows.shape[-1] == 1:
        # A single entry is the total, exactly (x - (x - total) rounds).
        return torch.zeros_like(rows) + total
    # A bound beyond the dtype's range bounds no value of it: it is an infinite one.
    big = torch.finfo(rows.dtype).max
    lower = -math.inf if lower < -big else lower
    upper = math.inf if upper > big else upper
    return clamp_shift(rows, total, lower, upper)


def _scaled_rows(rows: Tensor, temperature: float) -> Tensor:
    """``rows / T``, shifted by the row max first so that a small ``T`` cannot overflow."""
    if temperature == 1.0:
        return rows
    return (rows - rows.detach().amax(-1, keepdim=True)) / temperature


def _simplex_rows(
    rows: Tensor, total: Tensor | float, method: SimplexMethod, temperature: float
) -> Tensor:
    """The simplex map ``method`` of each row (last dim), scaled to ``total``."""
    if method == "sparsemax":
        return _project_simplex_rows(_scaled_rows(rows, temperature), total)
    if method == "softmax":
        weights = torch.softmax(_scaled_rows(rows, temperature), dim=-1)
        # x * 1.0 == x: skipping it saves a pass forward and backward
        return weights if isinstance(total, float) and total == 1.0 else weights * total
    n = rows.shape[-1]
    r = torch.relu(rows)
    return (r + RELU_EPS / n) * (total / (r.sum(-1, keepdim=True) + RELU_EPS))


def _simplex_inverse(
    value: Tensor, total: Tensor | float, method: SimplexMethod, temperature: float
) -> Tensor:
    """Pre-weight rows whose :func:`_simplex_rows` is ``value`` (rows on the simplex)."""
    v = value.clamp_min(0.0)
    if method == "sparsemax":
        return v * temperature
    p = v / total
    if method == "softmax":
        return temperature * p.clamp_min(torch.finfo(value.dtype).eps).log()
    # relu: pre-weights with sum relu(x) = 1 + O(eps): x = p (1 + eps) - eps / n
    n = value.shape[-1]
    return (p * (1.0 + RELU_EPS) - RELU_EPS / n).clamp_min(0.0)


def _max_or_zero(t: Tensor) -> Tensor:
    """Largest entry of ``t`` as a 0-d tensor, 0 for an empty ``t`` (a zero-size batch)."""
    return t.amax() if t.numel() > 0 else t.new_zeros(())


def _sum_violation(x: Tensor, total: Tensor | float, dims: tuple[int, ...]) -> Tensor:
    """max over slices of |sum(x) - total|, as a 0-d tensor (computed in >= float32)."""
    xc = x.to(_compute_dtype(x.dtype))
    if x.ndim == 0:
        return (xc - total).abs()
    # scaled (Note [Overflow-free sums]): a check, not a hot path
    scale = _sum_scale(_reduced_size(x.shape, dims))
    return _max_or_zero(((xc / scale).sum(dims, keepdim=True) - total / scale).abs()) * scale


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def project_sum(x: Tensor, total: Total = 1.0, dim: Dim = -1) -> Tensor:
    r"""Euclidean projection onto the affine hyperplane of a fixed sum.

    .. math::
        P(x) = \operatorname*{arg\,min}_{y:\ \sum_{i} y_i = c} \lVert y - x \rVert_2
             = x + \frac{c - \sum_i x_i}{n}

    where the sum runs over ``dim`` (``n`` entries) and ``c`` is ``total``. Entries
    keep any sign and magnitude; unlike dividing by the sum, the map is defined
    everywhere and never flips signs. Batched over the dims not in ``dim``.

    Args:
        x: Floating point tensor.
        total: Target sum ``c``: a float, or a tensor broadcastable to
            ``x.sum(dim, keepdim=True).shape`` (one target per slice).
        dim: Dim or tuple of dims summed over.

    Returns:
        Tensor of ``x``'s shape and dtype whose sums over ``dim`` equal ``total``.

    Raises:
        TypeError: If ``x`` is not a floating point tensor.
        IndexError: If a dim is out of range.
        ValueError: If dims repeat, ``dim`` has no element, or ``total`` is not
            finite or has an incompatible shape.

    Example:
        >>> import torch
        >>> from sumto.functional import project_sum
        >>> project_sum(torch.tensor([0.0, -1.0, 5.0]), total=1.0)
        tensor([-1., -2.,  4.])
        >>> project_sum(torch.ones(2, 3, 3), total=1.0, dim=(1, 2)).sum((1, 2))
        tensor([1., 1.])
    """
    dims = _validate(x, total, dim)
    compute = _compute_dtype(x.dtype)
    xc = x.to(compute)
    return _project_sum(xc, _total_like(total, xc, dims), dims).to(x.dtype)


def project_simplex(x: Tensor, total: Total = 1.0, dim: Dim = -1) -> Tensor:
    r"""Euclidean projection onto the scaled probability simplex.

    .. math::
        P(x) = \operatorname*{arg\,min}_{y \ge 0,\ \sum_i y_i = c} \lVert y - x \rVert_2
             = \max(x - \tau, 0)

    with the threshold :math:`\tau` chosen so that the sum over ``dim`` is ``c``.
    The result is sparse (exact zeros) and shift invariant,
    :math:`P(x + a) = P(x)`. The gradient is the Jacobian on the support
    :math:`I_S - \mathbf{1}_S \mathbf{1}_S^\top / |S|`, computed in O(n).
    ``-inf`` entries (masked logits) get weight 0, and a slice of ``-inf`` only gets
    the uniform weights, its limit. Batched over the dims not in ``dim``.

    Args:
        x: Floating point tensor.
        total: Target sum ``c > 0``: a float, or a tensor broadcastable to
            ``x.sum(dim, keepdim=True).shape``.
        dim: Dim or tuple of dims summed over.

    Returns:
        Tensor of ``x``'s shape and dtype, non-negative, summing to ``total``.

    Raises:
        TypeError: If ``x`` is not a floating point tensor.
        IndexError: If a dim is out of range.
        ValueError: If dims repeat, ``total`` is not finite and positive, or has
            an incompatible shape.

    Example:
        >>> import torch
        >>> from sumto.functional import project_simplex
        >>> project_simplex(torch.tensor([1e6, 0.0, 0.0]))
        tensor([1., 0., 0.])
        >>> project_simplex(torch.tensor([0.5, 0.3, -0.2]))
        tensor([0.6000, 0.4000, 0.0000])
    """
    dims = _validate(x, total, dim)
    _check_positive(total, "total")
    return _apply_rows(x, total, dims, _project_simplex_rows)


def project_box_sum(
    x: Tensor,
    total: Total = 1.0,
    dim: Dim = -1,
    lower: float = -math.inf,
    upper: float = math.inf,
) -> Tensor:
    r"""Euclidean projection onto a box intersected with a fixed-sum hyperplane.

    .. math::
        P(x) = \operatorname*{arg\,min}_{\substack{\sum_i y_i = c \\ l \le y_i \le u}}
               \lVert y - x \rVert_2 = \operatorname{clamp}(x - \tau, l, u)

    with :math:`\tau` chosen so that the sum over ``dim`` is ``c``. With both
    bounds infinite this is :func:`project_sum`; with ``lower=0`` and no upper
    bound it is :func:`project_simplex`. Batched over the dims not in ``dim``.

    Args:
        x: Floating point tensor.
        total: Target sum ``c``: a float, or a tensor broadcastable to
            ``x.sum(dim, keepdim=True).shape``.
        dim: Dim or tuple of dims summed over.
        lower: Lower bound ``l`` of every entry (may be ``-inf``).
        upper: Upper bound ``u`` of every entry (may be ``inf``).

    Returns:
        Tensor of ``x``'s shape and dtype within the bounds, summing to ``total``.

    Raises:
        TypeError: If ``x`` is not a floating point tensor.
        IndexError: If a dim is out of range.
        ValueError: If dims repeat, ``total`` is not finite, a bound is NaN,
            ``lower > upper``, or the set is empty (``n * lower > total`` or
            ``n * upper < total``).

    Example:
        >>> import torch
        >>> from sumto.functional import project_box_sum
        >>> project_box_sum(torch.tensor([3.0, 0.0, 0.0]), total=1.0, lower=-0.5, upper=0.8)
        tensor([0.8000, 0.1000, 0.1000])
    """
    dims = _validate(x, total, dim)
    n = _reduced_size(x.shape, dims)
    _check_box(total, n, lower, upper)
    return _apply_rows(x, total, dims, _project_box_rows, float(lower), float(upper))


def sum_violation(x: Tensor, total: Total = 1.0, dim: Dim = -1) -> Tensor:
    r"""Largest deviation of a slice sum from its target, :math:`\max |\sum_i x_i - c|`.

    Batched over the dims not in ``dim``; the maximum is taken over all slices.

    Args:
        x: Floating point tensor.
        total: Target sum: a float or a tensor broadcastable to the keepdim-reduced shape.
        dim: Dim or tuple of dims summed over.

    Returns:
        0-d tensor (float32 or wider), 0 when every slice sums exactly to ``total``.

    Raises:
        TypeError: If ``x`` is not a floating point tensor.
        IndexError: If a dim is out of range.
        ValueError: If dims repeat or ``total`` is invalid.

    Example:
        >>> import torch
        >>> from sumto.functional import sum_violation
        >>> sum_violation(torch.tensor([[0.5, 0.5], [1.0, 0.5]]), total=1.0)
        tensor(0.5000)
    """
    dims = _validate(x, total, dim)
    xc = x.to(_compute_dtype(x.dtype))
    return _sum_violation(xc, _total_like(total, xc, dims), dims)


# ---------------------------------------------------------------------------
# transport plans and doubly stochastic matrices
# ---------------------------------------------------------------------------


def _transport_args(x: Tensor, row_sums: Marginal, col_sums: Marginal) -> None:
    _transport.check_transport_input(x)
    _transport.check_marginals(row_sums, col_sums, tuple(x.shape), x.dtype)
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(
            f"expected at least one row and one column, got matrices of shape {tuple(x.shape[-2:])}"
        )


def project_transport(x: Tensor, row_sums: Marginal = 1.0, col_sums: Marginal = 1.0) -> Tensor:
    r"""Euclidean projection of matrices onto a transport polytope (doubly stochastic for sums 1).

    .. math::
        P(X) = \operatorname*{arg\,min}_{P \ge 0,\ P \mathbf{1} = r,\ P^\top \mathbf{1} = c}
               \lVert P - X \rVert_F = \max(X - a \mathbf{1}^\top - \mathbf{1} b^\top, 0)

    over the last two dims of ``x`` (``m`` rows, ``n`` columns): row ``i`` sums to
    ``r_i``, column ``j`` to ``c_j``. With ``r = c = 1`` and square matrices the set is
    the Birkhoff polytope of doubly stochastic matrices. The result is exact to the
    rounding of its dtype, sparse (exact zeros) and, unlike Sinkhorn, reaches the
    vertices: a large multiple of a permutation matrix projects to that permutation.
    Batched over the leading dims.

    The duals ``(a, b)`` are found by a damped semismooth Newton method with block
    coordinate sweeps (simplex thresholds per row and column) in float64; the result
    is then computed exactly from its support ``S`` by one linear solve and checked
    against the optimality conditions. On eager CPU the search stops as soon as every
    matrix passes that check; on other devices and under ``torch.compile``,
    ``torch.func`` and tracing it runs a fixed schedule without host synchronisation,
    and a matrix that has not passed the check by then (not seen in the tests) gets a
    feasible plan near the projection instead. The projection is piecewise linear;
    its gradient is the orthogonal projection onto
    :math:`\{D : \operatorname{supp} D \subseteq S,\ D\mathbf{1} = 0,\ D^\top \mathbf{1} = 0\}`
    (through plain autograd ops: double backward, forward mode and ``torch.func``
    work), and ``row_sums``/``col_sums`` tensors get gradients too (meaningful along
    changes that keep the totals equal). Each call solves a few ``(m + n)``-sized
    linear systems: it suits matrices up to a few hundred rows and columns.
    ``-inf`` entries (forbidden pairs) get weight 0 as long as a plan exists on the
    other entries; ``nan`` and ``+inf`` entries are not supported.

    Args:
        x: Floating point tensor of shape ``(..., m, n)``.
        row_sums: Row sums ``r >= 0``: a float (every row), or a tensor broadcastable
            to ``x.shape[:-1]``, i.e. ``(..., m)``.
        col_sums: Column sums ``c >= 0``: a float (every column), or a tensor
            broadcastable to ``x.shape[:-2] + x.shape[-1:]``, i.e. ``(..., n)``.
            Each matrix's row and column totals must be equal
            (``m * r == n * c`` for floats).

    Returns:
        Tensor of ``x``'s shape and dtype: non-negative, rows summing to ``r`` and
        columns to ``c``.

    Raises:
        TypeError: If ``x`` is not a floating point tensor or a sum has the wrong type.
        IndexError: If ``x`` has fewer than 2 dims.
        ValueError: If a sum is negative or not finite, a sum tensor does not
            broadcast, the totals of ``r`` and ``c`` differ, or ``x`` has no row or column.

    Example:
        >>> import torch
        >>> from sumto.functional import project_transport
        >>> project_transport(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
        tensor([[1., 0.],
                [0., 1.]])
        >>> p = project_transport(torch.randn(4, 3, 5), row_sums=5.0, col_sums=3.0)
        >>> bool(torch.allclose(p.sum(-1), torch.full((4, 3), 5.0)))
        True
        >>> bool(torch.allclose(p.sum(-2), torch.full((4, 5), 3.0))), bool((p >= 0).all())
        (True, True)
    """
    _transport_args(x, row_sums, col_sums)
    xc = x.to(_compute_dtype(x.dtype))
    r, c = _transport.marginals(row_sums, col_sums, xc)
    return _transport.project(xc, r, c).to(x.dtype)


def sinkhorn(
    x: Tensor,
    row_sums: Marginal = 1.0,
    col_sums: Marginal = 1.0,
    *,
    iters: int = _transport.SINKHORN_ITERS,
    tol: float | None = None,
) -> Tensor:
    r"""Sinkhorn normalisation: ``exp(x)`` scaled to given row and column sums.

    .. math::
        S(X) = \operatorname{diag}(e^{f}) \, e^{X} \operatorname{diag}(e^{g}),
        \qquad S(X) \mathbf{1} = r,\ S(X)^\top \mathbf{1} = c

    computed in the log domain: ``f = log r - logsumexp(X + g)`` over each row, then
    ``g = log c - logsumexp(X + f)`` over each column, ``iters`` times (each update a
    logsumexp, so no entry of ``x`` overflows). It is the entropic counterpart of
    :func:`project_transport`: a smooth map onto the interior of the transport
    polytope (every entry of a finite ``x`` stays positive), differentiable by
    autograd through the iterations. After the last (column) update the column sums
    are exact to rounding and the row sums converge linearly, more slowly the larger
    the spread of ``x``; with the default count no host synchronisation happens, so
    it works under ``torch.compile`` and ``torch.func``. ``tol`` stops early once every
    row sum is within ``tol`` of its target, which reads the residual on the host
    after every iteration (a device sync, and a graph break under compile).
    ``-inf`` entries of ``x`` (forbidden pairs) get weight 0; rows and columns with
    a zero sum get zeros. Never NaN for finite or ``-inf`` entries: a row or column
    left without a finite entry gets zeros (its sum then cannot be met). Batched
    over the leading dims.

    Args:
        x: Floating point tensor of shape ``(..., m, n)``, finite or ``-inf``.
        row_sums: Row sums ``r >= 0``: a float or a tensor broadcastable to ``(..., m)``.
        col_sums: Column sums ``c >= 0``: a float or a tensor broadcastable to
            ``(..., n)``, with the same total as ``r`` per matrix.
        iters: Number of row-and-column updates, ``>= 1``.
        tol: Optional early stop on the largest row-sum error (a host sync per
            iteration); ``None`` runs all ``iters``.

    Returns:
        Tensor of ``x``'s shape and dtype, positive where ``x`` is finite, columns
        summing to ``c`` and rows to ``r`` within Sinkhorn's residual.

    Raises:
        TypeError: If ``x`` is not a floating point tensor or an argument has the wrong
            type.
        IndexError: If ``x`` has fewer than 2 dims.
        ValueError: If a sum is negative or not finite, the totals differ, ``iters < 1``,
            ``tol <= 0``, or ``x`` has no row or column.

    Example:
        >>> import torch
        >>> from sumto.functional import sinkhorn
        >>> p = sinkhorn(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), tol=1e-6)
        >>> bool((p.sum(0) - 1).abs().max() < 1e-6), bool((p.sum(1) - 1).abs().max() < 1e-6)
        (True, True)
        >>> p
        tensor([[0.8808, 0.1192],
                [0.1192, 0.8808]])
    """
    _transport_args(x, row_sums, col_sums)
    iters = _transport.check_iters(iters)
    if tol is not None:
        tol = _checks.check_number(tol, "tol")
        if not tol > 0:
            raise ValueError(f"expected tol > 0 (or None), got {tol}")
    xc = x.to(_compute_dtype(x.dtype))
    r, c = _transport.marginals(row_sums, col_sums, xc)
    return _transport.sinkhorn(xc, r, c, iters, tol).to(x.dtype)
