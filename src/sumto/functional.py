"""Pure tensor maps and Euclidean projections onto sum-constrained sets.

Every function here is a pure, differentiable map on tensors, and the one place
where the simplex ``method`` (softmax, sparsemax, entmax, relu) is dispatched. The constraint
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
from typing import Literal, cast

import torch
from torch import Tensor

from sumto import _autograd, _checks, _entmax, _transport
from sumto._autograd import clamp_shift
from sumto._checks import Dim as Dim
from sumto._checks import Total as Total
from sumto._transport import Marginal as Marginal

__all__ = [
    "entmax",
    "project_box_sum",
    "project_simplex",
    "project_sum",
    "project_transport",
    "sinkhorn",
    "sum_violation",
]

SimplexMethod = Literal["softmax", "sparsemax", "relu", "entmax"]
SIMPLEX_METHODS: tuple[SimplexMethod, ...] = ("softmax", "sparsemax", "relu", "entmax")
# The alpha of method="entmax" when none is given (entmax15, Peters et al. 2019).
DEFAULT_ALPHA = 1.5
# A float alpha, or a tensor with one alpha per slice (or per row, in row layout).
Alpha = float | Tensor
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
_check_box_entries = _checks.check_box_entries
_check_bound_tensors = _checks.check_bound_tensors

Bound = _checks.Bound


def _validate_dims(x: Tensor, dim: Dim) -> tuple[int, ...]:
    """``x`` a float tensor with non-empty slices over ``dim``; the normalised dims."""
    _check_float_tensor(x)
    dims = _normalize_dims(dim, x.ndim)
    if x.ndim > 0 and _reduced_size(x.shape, dims) == 0:
        raise ValueError(
            f"expected at least one element along dim {dim!r} to distribute a total over, "
            f"got a tensor of shape {tuple(x.shape)}"
        )
    return dims


def _validate(x: Tensor, total: Total, dim: Dim) -> tuple[int, ...]:
    dims = _validate_dims(x, dim)
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
    xc = _as_dtype(x, _compute_dtype(x.dtype))
    t = _total_like(total, xc, dims)
    out = row_map(_to_rows(xc, dims), _total_rows(t, xc, dims), *args)
    return _as_dtype(_from_rows(out, x.shape, dims), x.dtype)


def _as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, without the dispatch that even a no-op ``to()`` costs."""
    return x if x.dtype == dtype else x.to(dtype)


def _project_box(
    x: Tensor, total: Total, dims: tuple[int, ...], lower: Bound, upper: Bound
) -> Tensor:
    """:func:`_project_box_rows` over ``dims``, with per-entry (tensor) bounds laid out as rows."""

    def rows_of(bound: Bound) -> Tensor | float:
        if not isinstance(bound, Tensor):
            return float(bound)
        full = bound.detach().to(device=x.device, dtype=_compute_dtype(x.dtype))
        return _to_rows(full.expand(x.shape), dims)

    return _apply_rows(x, total, dims, _project_box_rows, rows_of(lower), rows_of(upper))


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


def _project_box_rows(
    rows: Tensor, total: Tensor | float, lower: float | Tensor, upper: float | Tensor
) -> Tensor:
    """Euclidean projection of each row onto ``{sum = total, lower <= y <= upper}``.

    Both bounds infinite is the affine projection, which the same node computes.
    Tensor bounds are per entry, laid out like ``rows`` (or broadcastable to them).
    """
    if rows.shape[-1] == 1:
        # A single entry is the total, exactly (x - (x - total) rounds).
        return torch.zeros_like(rows) + total
    if isinstance(lower, Tensor) or isinstance(upper, Tensor):
        low, high = _finite_bounds(rows, total, lower, upper)
        return clamp_shift(rows, total, low, high)
    # A bound beyond the dtype's range bounds no value of it: it is an infinite one.
    big = torch.finfo(rows.dtype).max
    lower = -math.inf if lower < -big else lower
    upper = math.inf if upper > big else upper
    return clamp_shift(rows, total, lower, upper)


def _finite_bounds(
    rows: Tensor, total: Tensor | float, lower: float | Tensor, upper: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Per-entry bounds as finite tensors of ``rows``' dtype that define the same set.

    With every lower bound finite, no entry of the set exceeds ``total - sum(lower) +
    lower_i`` (the rest at their lower bounds): that value replaces an infinite upper
    bound, and symmetrically for an infinite lower bound. The validated entry points
    allow infinite entries on one side only; values beyond the dtype's range count as
    infinite, as for float bounds.
    """
    # (the conversion to rows' dtype turns values beyond its range into infinities)
    low, high = (
        torch.as_tensor(b, dtype=rows.dtype, device=rows.device).expand_as(rows)
        for b in (lower, upper)
    )
    # the given bounds stay as they are; a derived one never crosses the other bound
    # (rounding, or an infeasible unvalidated input)
    derived = torch.maximum(total - (low.sum(-1, keepdim=True) - low), low)
    high = torch.where(high.isinf(), derived, high)
    derived = torch.minimum(total - (high.sum(-1, keepdim=True) - high), high)
    low = torch.where(low.isinf(), derived, low)
    return low, high


def _scaled_rows(rows: Tensor, temperature: float | Tensor) -> Tensor:
    """``rows / T``, shifted by the row max first so that a small ``T`` cannot overflow.

    ``T`` is a float, or a 0-d tensor (a learned temperature).
    """
    if not isinstance(temperature, Tensor) and temperature == 1.0:
        return rows
    return (rows - rows.detach().amax(-1, keepdim=True)) / temperature


def _entmax_rows(rows: Tensor, alpha: Alpha) -> Tensor:
    """alpha-entmax of each row; ``alpha`` a float or a tensor broadcastable to ``rows[..., :1]``.

    A float alpha picks its algorithm: 2 is the simplex projection (sparsemax), 1.5
    the sort-based exact map, any other value (1 included, softmax) the autograd node
    of :mod:`sumto._entmax`. A tensor alpha may differ per row, so it always takes the
    root search, which is exact to rounding for every alpha.
    """
    if isinstance(alpha, Tensor):
        return _entmax.entmax_rows(rows, alpha)
    if alpha == 2.0:
        return _project_simplex_rows(rows, 1.0)
    return _entmax.entmax_rows(rows, alpha, exact_sort=alpha == 1.5)


def _scaled_to_total(weights: Tensor, total: Tensor | float) -> Tensor:
    # x * 1.0 == x: skipping it saves a pass forward and backward
    return weights if isinstance(total, float) and total == 1.0 else weights * total


def _simplex_rows(
    rows: Tensor,
    total: Tensor | float,
    method: SimplexMethod,
    temperature: float | Tensor,
    alpha: Alpha = DEFAULT_ALPHA,
) -> Tensor:
    """The simplex map ``method`` of each row (last dim), scaled to ``total``.

    ``alpha`` (entmax only) is a float or a tensor in row layout, ``(..., 1)`` or 0-d.
    """
    if method == "sparsemax":
        return _project_simplex_rows(_scaled_rows(rows, temperature), total)
    if method == "softmax":
        return _scaled_to_total(torch.softmax(_scaled_rows(rows, temperature), dim=-1), total)
    if method == "entmax":
        # total * entmax: at alpha = 2 that is total * sparsemax, not the projection onto
        # the scaled simplex (method="sparsemax"), so that alpha acts continuously
        return _scaled_to_total(_entmax_rows(_scaled_rows(rows, temperature), alpha), total)
    n = rows.shape[-1]
    r = torch.relu(rows)
    return (r + RELU_EPS / n) * (total / (r.sum(-1, keepdim=True) + RELU_EPS))


def _simplex_inverse(
    value: Tensor,
    total: Tensor | float,
    method: SimplexMethod,
    temperature: float | Tensor,
    alpha: Alpha = DEFAULT_ALPHA,
) -> Tensor:
    """Pre-weight rows whose :func:`_simplex_rows` is ``value`` (rows on the simplex)."""
    v = value.clamp_min(0.0)
    if method == "sparsemax":
        return v * temperature
    p = v / total
    if method == "entmax":
        return temperature * _entmax.entmax_inverse_rows(p, alpha)
    if method == "softmax":
        return temperature * p.clamp_min(torch.finfo(value.dtype).eps).log()
    # relu: pre-weights with sum relu(x) = 1 + O(eps): x = p (1 + eps) - eps / n
    n = value.shape[-1]
    return (p * (1.0 + RELU_EPS) - RELU_EPS / n).clamp_min(0.0)


def _check_alpha(alpha: Alpha, shape: Sequence[int], dims: tuple[int, ...]) -> None:
    """Validate entmax's ``alpha``: a float or real tensor, finite and >= 1, of a fitting shape.

    The values of a tensor are read only where they can be (``_checks.readable``), as
    for totals: under compile, ``torch.func`` and tracing only its shape is checked.
    """
    if isinstance(alpha, Tensor):
        if not (alpha.dtype.is_floating_point or alpha.dtype in _checks._INTEGER_DTYPES):
            raise TypeError(f"expected alpha to be a real tensor, got dtype {alpha.dtype}")
        _alpha_view_shape(tuple(alpha.shape), shape, dims)
        if alpha.numel() > 0 and _checks.readable(alpha):
            ok = torch.isfinite(alpha) & (alpha >= 1)
            if not bool(ok.all()):
                raise ValueError(f"expected a finite alpha >= 1, got a tensor with {alpha}")
        return
    value = _checks.check_number(alpha, "alpha")
    # comparisons, not math.isfinite: compile may trace a float argument symbolically
    if not 1.0 <= value < math.inf:
        raise ValueError(f"expected a finite alpha >= 1, got {alpha!r}")


def _alpha_view_shape(
    alpha_shape: tuple[int, ...], shape: Sequence[int], dims: tuple[int, ...]
) -> tuple[int, ...]:
    """The keepdim shape a tensor alpha is viewed as (like a total's), or ValueError."""
    try:
        return _broadcast_total_shape(alpha_shape, shape, dims)
    except ValueError:
        keep = _keep_shape(shape, dims)
        reduced = tuple(s for i, s in enumerate(shape) if i not in dims)
        raise ValueError(
            f"expected alpha to be broadcastable to the keepdim-reduced shape {keep} "
            f"(or to have the reduced shape {reduced}), got shape {alpha_shape}"
        ) from None


def _alpha_rows(alpha: Alpha, x: Tensor, dims: tuple[int, ...]) -> Alpha:
    """``alpha`` as a float, or a tensor of ``x``'s device and dtype in row layout ``(..., 1)``."""
    if not isinstance(alpha, Tensor):
        return float(alpha)
    view = _alpha_view_shape(tuple(alpha.shape), x.shape, dims)
    viewed = alpha.to(device=x.device, dtype=x.dtype).reshape(view)
    return cast(Tensor, _total_rows(viewed, x, dims))


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
    xc = _as_dtype(x, _compute_dtype(x.dtype))
    return _as_dtype(_project_sum(xc, _total_like(total, xc, dims), dims), x.dtype)


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
    lower: Bound = -math.inf,
    upper: Bound = math.inf,
) -> Tensor:
    r"""Euclidean projection onto a box intersected with a fixed-sum hyperplane.

    .. math::
        P(x) = \operatorname*{arg\,min}_{\substack{\sum_i y_i = c \\ l \le y_i \le u}}
               \lVert y - x \rVert_2 = \operatorname{clamp}(x - \tau, l, u)

    with :math:`\tau` chosen so that the sum over ``dim`` is ``c``. With both
    bounds infinite this is :func:`project_sum`; with ``lower=0`` and no upper
    bound it is :func:`project_simplex`. The bounds may be given per entry
    (:math:`l_i \le y_i \le u_i`, e.g. a cap per asset), as tensors broadcastable to
    ``x``; they are constants, not differentiated. Batched over the dims not in ``dim``.

    Args:
        x: Floating point tensor.
        total: Target sum ``c``: a float, or a tensor broadcastable to
            ``x.sum(dim, keepdim=True).shape``.
        dim: Dim or tuple of dims summed over.
        lower: Lower bound ``l`` of every entry (may be ``-inf``), or a tensor of
            per-entry lower bounds broadcastable to ``x``.
        upper: Upper bound ``u`` of every entry (may be ``inf``), or per-entry
            upper bounds likewise. Tensor bounds may hold infinite entries on one
            side only (all lower bounds finite, or all upper bounds finite).

    Returns:
        Tensor of ``x``'s shape and dtype within the bounds, summing to ``total``.

    Raises:
        TypeError: If ``x`` is not a floating point tensor, or a bound is neither a
            number nor a real tensor.
        IndexError: If a dim is out of range.
        ValueError: If dims repeat, ``total`` is not finite, a bound is NaN or does
            not broadcast to ``x``, some ``lower > upper``, infinite bounds appear on
            both sides of tensor bounds, or a slice's set is empty
            (``sum(lower) > total`` or ``sum(upper) < total``; the message names the slice).

    Example:
        >>> import torch
        >>> from sumto.functional import project_box_sum
        >>> project_box_sum(torch.tensor([3.0, 0.0, 0.0]), total=1.0, lower=-0.5, upper=0.8)
        tensor([0.8000, 0.1000, 0.1000])
        >>> caps = torch.tensor([0.5, 0.3, 0.4])  # a capped simplex, one cap per entry
        >>> project_box_sum(torch.tensor([3.0, 2.0, 0.0]), total=1.0, lower=0.0, upper=caps)
        tensor([0.5000, 0.3000, 0.2000])
    """
    dims = _validate(x, total, dim)
    if isinstance(lower, Tensor) or isinstance(upper, Tensor):
        _check_box_entries(total, x.shape, dims, lower, upper)
    else:
        _check_box(total, _reduced_size(x.shape, dims), lower, upper)
    return _project_box(x, total, dims, lower, upper)


def entmax(x: Tensor, alpha: Alpha = DEFAULT_ALPHA, dim: Dim = -1) -> Tensor:
    r"""alpha-entmax probabilities: a sparse softmax whose sparsity ``alpha`` sets.

    .. math::
        \operatorname{entmax}_\alpha(z)
            = \operatorname*{arg\,max}_{p \in \Delta} \; p^\top z + H^{\mathsf{T}}_\alpha(p),
        \qquad p_i = \big[(\alpha - 1) z_i - \tau\big]_+^{1/(\alpha - 1)}

    with :math:`H^{\mathsf{T}}_\alpha` the Tsallis entropy and the threshold
    :math:`\tau` chosen so that each slice over ``dim`` sums to 1 (Peters, Niculae and
    Martins 2019). :math:`\alpha = 1` is softmax, :math:`\alpha = 2` sparsemax (the
    Euclidean projection, :func:`project_simplex`); in between, and above, the output
    has exact zeros for low scores, more of them as :math:`\alpha` grows. A float
    ``alpha`` of 1.5 uses the exact sort-based algorithm; other values (and every
    tensor ``alpha``) a bisection on :math:`\tau` with a fixed number of steps (the
    mantissa bits of the compute dtype plus 3), exact to rounding, then a division by
    the sum, so that the output sums to 1 within rounding. Near :math:`\alpha = 1`
    the map is ill conditioned: outputs are accurate to a relative
    :math:`\epsilon / (\alpha - 1)`. ``-inf`` entries (masked scores) get 0, and a
    slice of ``-inf`` only the uniform weights, its limit. Batched over the dims not
    in ``dim``.

    Gradients: in ``x``, the Jacobian :math:`\operatorname{diag}(s) - s s^\top / \sum_i s_i`
    with :math:`s_i = p_i^{2 - \alpha}` on the support (0 off it), computed in O(n);
    in a tensor ``alpha``, the closed form of Peters et al. (at :math:`\alpha = 1`
    exactly, and within :math:`\epsilon^{1/4}` of it, where the closed form cancels,
    its limit :math:`p_i (\sum_j p_j \log^2 p_j - \log^2 p_i) / 2`). Forward mode
    (``jvp``, ``jacfwd``), ``vmap`` and ``torch.jit.trace`` are supported; double
    backward (``hessian``) is what autograd derives from the closed-form backward,
    exact wherever the support does not change. Works under ``torch.compile`` with
    ``fullgraph=True`` (the step count is fixed: no host sync).

    Args:
        x: Floating point tensor of scores.
        alpha: :math:`\alpha \ge 1`: a float, or a tensor broadcastable to
            ``x.sum(dim, keepdim=True).shape`` (or of the reduced shape), one
            :math:`\alpha` per slice, differentiable.
        dim: Dim or tuple of dims each distribution spans.

    Returns:
        Tensor of ``x``'s shape and dtype, non-negative, each slice summing to 1.

    Raises:
        TypeError: If ``x`` is not a floating point tensor or ``alpha`` is not a
            number or a real tensor.
        IndexError: If a dim is out of range.
        ValueError: If dims repeat, ``dim`` has no element, ``alpha`` is below 1 or
            not finite, or a tensor ``alpha`` has an incompatible shape.

    Example:
        >>> import torch
        >>> from sumto.functional import entmax
        >>> x = torch.tensor([2.0, 1.0, -1.0])
        >>> entmax(x)
        tensor([0.8307, 0.1693, 0.0000])
        >>> entmax(x, alpha=1.0)  # softmax
        tensor([0.7054, 0.2595, 0.0351])
        >>> entmax(x, alpha=torch.tensor(2.0))  # sparsemax
        tensor([1., 0., 0.])
    """
    dims = _validate_dims(x, dim)
    _check_alpha(alpha, x.shape, dims)
    xc = x.to(_compute_dtype(x.dtype))
    out = _entmax_rows(_to_rows(xc, dims), _alpha_rows(alpha, xc, dims))
    return _from_rows(out, x.shape, dims).to(x.dtype)


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
