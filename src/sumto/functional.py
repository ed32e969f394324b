"""Pure tensor maps and Euclidean projections onto sum-constrained sets.

Every function here is a pure, differentiable map on tensors. The constraint
classes in :mod:`sumto.constraints` only hold configuration and call these.

Conventions shared by all functions:

* ``dim`` is an ``int`` or a tuple of ints; the constraint holds for every slice
  obtained by fixing the other dims ("batched over the other dims").
* ``total`` is a float, or a tensor broadcastable to the keepdim-reduced shape
  (``x.sum(dim, keepdim=True).shape``) or equal to the reduced shape, giving one
  target per slice.
* The output has the dtype of ``x``; float16 and bfloat16 inputs are computed in
  float32 internally.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from sumto import _kernels
from sumto._compat import is_compiling

__all__ = [
    "project_box_sum",
    "project_simplex",
    "project_sum",
    "sum_violation",
]

Dim = int | Sequence[int]
Total = float | int | Tensor


# ---------------------------------------------------------------------------
# validation helpers (run once per public call, or once at registration)
# ---------------------------------------------------------------------------


def _check_dim_spec(dim: Dim) -> tuple[int, ...]:
    """Validate the *form* of ``dim`` (ints, no repeats) without knowing ndim."""
    if isinstance(dim, bool) or not isinstance(dim, (int, Sequence)):
        raise TypeError(f"expected dim to be an int or a tuple of ints, got {dim!r}")
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if len(dims) == 0:
        raise ValueError("expected dim to name at least one dimension, got an empty tuple")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"expected dim to be an int or a tuple of ints, got {dim!r}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"expected distinct dims, got repeated dims in {dim!r}")
    return dims


def _normalize_dims(dim: Dim, ndim: int) -> tuple[int, ...]:
    """Return sorted non-negative dims; IndexError when out of range, ValueError on repeats."""
    dims = _check_dim_spec(dim)
    rank = max(ndim, 1)
    out = []
    for d in dims:
        if not -rank <= d < rank:
            raise IndexError(
                f"expected dim in range [{-rank}, {rank - 1}] for a tensor with {ndim} dims, got {d}"
            )
        out.append(d % rank)
    if len(set(out)) != len(out):
        raise ValueError(f"expected distinct dims, got repeated dims in {dim!r}")
    return tuple(sorted(out))


def _check_float_tensor(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected {name} to be a floating point tensor, got dtype {x.dtype}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: half precision inputs are computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reduced_size(shape: Sequence[int], dims: tuple[int, ...]) -> int:
    return math.prod([shape[d] for d in dims]) if len(shape) > 0 else 1


def _keep_shape(shape: Sequence[int], dims: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if i in dims else s for i, s in enumerate(shape))


def _check_total(total: Total, shape: Sequence[int], dims: tuple[int, ...]) -> None:
    """Validate a total against the tensor's shape (ValueError/TypeError).

    This may synchronise with the device for tensor totals: it is meant for
    registration and for the public functional API, not for a constraint's forward.
    """
    if isinstance(total, Tensor):
        if not total.dtype.is_floating_point and total.dtype not in (
            torch.int8,
            torch.int16,
            torch.int32,
            torch.int64,
            torch.uint8,
        ):
            raise TypeError(f"expected total to be a real tensor, got dtype {total.dtype}")
        _broadcast_total_shape(tuple(total.shape), shape, dims)
        if total.numel() > 0 and not bool(torch.isfinite(total).all()):
            raise ValueError(
                f"expected a finite total, got a tensor with non-finite values {total}"
            )
    else:
        if isinstance(total, bool) or not isinstance(total, (int, float)):
            raise TypeError(f"expected total to be a float or a tensor, got {type(total).__name__}")
        if not math.isfinite(total):
            raise ValueError(f"expected a finite total, got {total}")


def _broadcast_total_shape(
    total_shape: tuple[int, ...], shape: Sequence[int], dims: tuple[int, ...]
) -> tuple[int, ...]:
    """Return the keepdim shape a tensor total is viewed as, or raise ValueError."""
    keep = _keep_shape(shape, dims)
    try:
        if torch.broadcast_shapes(total_shape, keep) == keep:  # type: ignore[no-untyped-call]
            return total_shape
    except RuntimeError:
        pass
    reduced = tuple(s for i, s in enumerate(shape) if i not in dims)
    if total_shape == reduced:
        return keep
    raise ValueError(
        f"expected total to be broadcastable to the keepdim-reduced shape {keep} "
        f"(or to have the reduced shape {reduced}), got shape {total_shape}"
    )


def _total_like(total: Total, x: Tensor, dims: tuple[int, ...]) -> Tensor | float:
    """Bring a total to x's device and compute dtype, viewed as the keepdim shape.

    A total beyond the dtype's range saturates at its largest finite value: the
    validating entry points reject it (:func:`_check_total_range`), and unvalidated
    paths (a constraint's forward) stay free of inf - inf = nan.
    """
    big = torch.finfo(x.dtype).max
    if not isinstance(total, Tensor):
        return min(max(float(total), -big), big)
    view_shape = _broadcast_total_shape(tuple(total.shape), x.shape, dims)
    return total.to(device=x.device, dtype=x.dtype).reshape(view_shape).clamp(-big, big)


def _check_total_range(total: Total, dtype: torch.dtype) -> None:
    """ValueError when ``|total|`` overflows ``dtype`` (a device sync for tensor totals)."""
    big = torch.finfo(dtype).max
    if isinstance(total, Tensor):
        if total.numel() == 0:
            return
        largest = float(total.detach().abs().max())
    else:
        largest = abs(float(total))
    if largest > big:
        raise ValueError(
            f"expected |total| <= {big:.4g}, the largest {dtype} (the dtype the tensor is "
            f"computed in), got |total| = {largest:.4g}"
        )


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
# layout helpers: bring the constrained dims to the end as one flat dim
# ---------------------------------------------------------------------------


def _to_rows(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """View/copy ``x`` as ``(*other_dims, n)`` with the constrained dims flattened last."""
    if x.ndim == 0:
        return x.reshape(1)
    k = len(dims)
    moved = x.movedim(dims, tuple(range(x.ndim - k, x.ndim)))
    return moved.flatten(x.ndim - k) if k > 1 else moved


def _from_rows(y: Tensor, x_shape: Sequence[int], dims: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`_to_rows`."""
    if len(x_shape) == 0:
        return y.reshape(())
    k = len(dims)
    ndim = len(x_shape)
    other = [s for i, s in enumerate(x_shape) if i not in dims]
    moved_shape = [*other, *(x_shape[d] for d in dims)]
    return y.reshape(moved_shape).movedim(tuple(range(ndim - k, ndim)), dims)


def _total_rows(total: Tensor | float, x: Tensor, dims: tuple[int, ...]) -> Tensor | float:
    """Total (keepdim shape) laid out like :func:`_to_rows` output, last dim of size 1."""
    if not isinstance(total, Tensor):
        return total
    if x.ndim == 0:
        return total.reshape(1)
    keep = _keep_shape(x.shape, dims)
    return _to_rows(total.expand(keep), dims)


# ---------------------------------------------------------------------------
# core maps (no validation, no host synchronisation)
# ---------------------------------------------------------------------------


def _sum_scale(n: int) -> float:
    """The power of two ``s >= n`` that sums of ``n`` entries are scaled by.

    # Note [Overflow-free sums]
    A sum of finite entries near the dtype's max overflows, and then inf - inf gives
    nan. Summing x / s instead, with s >= n, keeps every partial sum within the range;
    as s is a power of two, the scaling is exact (barring subnormals) and the result
    is bit-identical to the unscaled formula whenever that one does not overflow.
    """
    return float(1 << (n - 1).bit_length()) if n > 1 else 1.0


def _project_sum(x: Tensor, total: Tensor | float, dims: tuple[int, ...]) -> Tensor:
    n = _reduced_size(x.shape, dims)
    if x.ndim == 0 or n == 1:
        # A single entry is the total, exactly (x + (total - x) rounds).
        return torch.zeros_like(x) + total
    fn = _AffineProject if _transforming() else _AffineProjectEager
    out: Tensor = fn.apply(x, total, dims, n)  # type: ignore[no-untyped-call]
    return out


def _transforming() -> bool:
    """Whether ``torch.compile`` or a ``torch.func`` transform is running."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return is_compiling() or active is None or bool(active())


def _reuse_buffers(x: Tensor) -> bool:
    """Whether a map may write its output into its own temporary (``out=``).

    Only in plain eager mode: not while compiling or tracing, and not on the
    wrapped tensors of ``torch.func`` transforms.
    """
    return not (is_compiling() or _kernels._jit_tracing() or _kernels._is_functorch_wrapped(x))


class _AffineProject(torch.autograd.Function):
    """``x + (total - sum(x)) / n`` over ``dims``, as one autograd node.

    # Note [One node for the affine projection]
    The sum is overflow-free (Note [Overflow-free sums]): with ``s`` the scale,
    ``shift = (total / s - sum(x / s)) / (n / s)``, bit-identical to the formula in
    plain autograd ops. As one node, the forward is one scaled copy, one reduction
    and one pass that writes the output into that copy (no second full-size
    buffer), and the backward is ``g + shift'`` with ``shift' = -sum(g) / n`` (the
    map is affine and its linear part self-adjoint): one reduction and one pass.
    The autograd ops of the plain formula cost a node per small op, and the graph
    cannot add the broadcast gradient into ``g`` in place when ``g`` is a view (as
    ``nn.Linear`` hands its weight's gradient over), so it allocated the same
    full-size buffer there. The backward is written in differentiable ops, so
    double backward works, and it reads no saved tensors.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, total: Tensor | float, dims: tuple[int, ...], n: int) -> Tensor:  # type: ignore[override]
        scale = _sum_scale(n)
        scaled = x / scale
        shift = (total / scale - scaled.sum(dims, keepdim=True)) / (n / scale)
        if shift.dtype == scaled.dtype and _reuse_buffers(x):
            return torch.add(x, shift, out=scaled)
        return x + shift

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, _, ctx.dims, ctx.n = inputs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None]:  # type: ignore[override]
        scale = _sum_scale(ctx.n)
        # The grad of total is kept in the keepdim shape: autograd sums it down to
        # the shape of a broadcast total.
        grad_shift = grad.sum(ctx.dims, keepdim=True) / (ctx.n / scale) / scale
        grad_total = grad_shift if ctx.needs_input_grad[1] else None
        return grad - grad_shift, grad_total, None, None


class _AffineProjectEager(torch.autograd.Function):
    """:class:`_AffineProject` for plain eager mode.

    The same forward and backward; with ``ctx`` in ``forward`` instead of a
    ``setup_context``, ``apply`` skips binding the arguments to the signature of
    ``forward`` (``inspect.signature``): about half of the map's Python time, some
    20 us a call. ``torch.func`` transforms require ``setup_context``, and
    ``torch.compile`` gets the variant it has always traced: both use
    :class:`_AffineProject`.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, total: Tensor | float, dims: tuple[int, ...], n: int
    ) -> Tensor:  # type: ignore[override]
        ctx.dims, ctx.n = dims, n
        return _AffineProject.forward(x, total, dims, n)

    backward = staticmethod(_AffineProject.backward)


def _simplex_threshold_sort(rows: Tensor, total: Tensor | float) -> Tensor:
    """Support mask of the simplex projection of each row, by sorting (Duchi et al. 2008).

    ``rows`` has shape ``(..., n)`` and is already shifted so that its max is 0.
    Returns a boolean mask of the support (entries strictly above the threshold).
    """
    n = rows.shape[-1]
    u, _ = torch.sort(rows, dim=-1, descending=True)
    css = u.cumsum(-1) - total
    ks = torch.arange(1, n + 1, device=rows.device, dtype=rows.dtype)
    # rho = number of entries in the support: the largest k with u_k > (css_k) / k.
    cond = u * ks > css
    rho = cond.to(torch.int64).sum(-1, keepdim=True).clamp_min(1)
    tau = css.gather(-1, rho - 1) / rho.to(rows.dtype)
    return rows > tau


def _simplex_support(rows: Tensor, total: Tensor | float) -> Tensor:
    """Support mask like :func:`_simplex_threshold_sort`, by the sort-free exact search."""
    with torch.no_grad():
        tau, _ = _kernels.simplex_threshold(rows, total)
        return rows > tau


def _needs_grad(rows: Tensor, total: Tensor | float) -> bool:
    """Whether autograd records the projection (else in-place shortcuts are safe)."""
    if not torch.is_grad_enabled():
        return False
    return rows.requires_grad or (isinstance(total, Tensor) and total.requires_grad)


def _project_simplex_rows(rows: Tensor, total: Tensor | float) -> Tensor:
    """Euclidean projection of each row of ``rows`` (last dim) onto the scaled simplex.

    # Note [Differentiable projection from a fixed support]
    The support S (entries with positive output) is found without autograd; then
    tau = (sum_{i in S} x_i - total) / |S| and y = (x - tau) on S, 0 elsewhere, are
    computed with differentiable elementwise ops. Autograd then yields the exact
    Jacobian on the support, I_S - 1_S 1_S^T / |S|, in O(n) and without a sort, and
    the derivative 1_S / |S| with respect to ``total``.
    """
    # Clamped so that a spread beyond the dtype's range gives -max, never -inf
    # (-inf * 0 = nan in the sums below); those entries are far outside the support.
    floor = -torch.finfo(rows.dtype).max
    shift = rows.detach().amax(-1, keepdim=True)
    if not _needs_grad(rows, total):
        # The search's tau is already (sum_S x - total) / |S| on the exact support.
        shifted = (rows - shift).clamp_min_(floor)
        tau, _ = _kernels.simplex_threshold(shifted, total)
        return shifted.sub_(tau).clamp_min_(0.0)
    if _one_node():
        projected: Tensor = _SimplexProjection.apply(rows, total)  # type: ignore[no-untyped-call]
        return projected
    # compile, torch.func and tracing record the Jacobian from plain ops
    shifted = (rows - shift).clamp_min(floor)
    tau, _ = _kernels.simplex_threshold(shifted, total)
    above = torch.relu(shifted - tau)  # its gradient is 1 exactly on S
    mask = above.detach().sign()
    count = mask.sum(-1, keepdim=True).clamp_min(1.0)
    # (sum_S x - total) / |S| = tau + correction, with the gradient of the left side.
    correction = (above.sum(-1, keepdim=True) - total) / count
    return above - correction * mask


def _box_support(
    rows: Tensor, total: Tensor | float, lower: float, upper: float
) -> tuple[Tensor, Tensor]:
    """Masks (free, at_upper) of the box-sum projection, by the sort-free exact search."""
    with torch.no_grad():
        diff = rows - _kernels.box_threshold(rows, total, lower, upper)
        return (diff > lower) & (diff < upper), diff >= upper


def _box_support_sort(
    rows: Tensor, total: Tensor | float, lower: float, upper: float
) -> tuple[Tensor, Tensor]:
    """Masks (free, at_upper) of the box-sum projection, found exactly by sorting breakpoints.

    With a = x - lower, width d = upper - lower and s = total - n * lower, the map
    h(t) = sum_i clamp(a_i - t, 0, d) = G(t) - G(t + d), G(t) = sum_i max(a_i - t, 0),
    is piecewise linear and non-increasing with breakpoints {a_i} and {a_i - d}.
    We evaluate h at every breakpoint with sorted cumulative sums, bracket the root
    of h(t) = s between two consecutive breakpoints, and classify each entry at the
    bracket's midpoint: there the active set is that of the solution.

    The search runs in float64 (float32 on MPS, which lacks it): its prefix sums and
    breakpoints a_i - d lose the active set of long float32 rows in narrow boxes.
    """
    with torch.no_grad():
        n = rows.shape[-1]
        width = upper - lower
        wide = torch.float32 if rows.device.type == "mps" else torch.float64
        a = rows.to(wide) - lower
        s = (total.to(wide) if isinstance(total, Tensor) else total) - n * lower
        a_sorted, _ = torch.sort(a, dim=-1)  # ascending
        # suffix sums: sum of the entries strictly greater than a_sorted[j]
        total_a = a_sorted.sum(-1, keepdim=True)
        prefix = torch.cat([torch.zeros_like(a_sorted[..., :1]), a_sorted.cumsum(-1)], dim=-1)

        def big_g(t: Tensor) -> Tensor:
            # G(t) = sum_{a_i > t} (a_i - t)
            idx = torch.searchsorted(a_sorted.contiguous(), t.contiguous(), right=True)
            count = (n - idx).to(a.dtype)
            above = total_a - prefix.gather(-1, idx)
            return above - count * t

        breaks, _ = torch.sort(torch.cat([a, a - width], dim=-1), dim=-1)
        h = big_g(breaks) - big_g(breaks + width)
        # h is non-increasing along breaks; the root lies after the last break with h >= s.
        ge = (h >= s).to(torch.int64)
        j = (ge.sum(-1, keepdim=True) - 1).clamp(0, 2 * n - 1)
        left = breaks.gather(-1, j)
        right = breaks.gather(-1, (j + 1).clamp(max=2 * n - 1))
        right = torch.where(j + 1 >= 2 * n, left + 1.0, right)
        mid = 0.5 * (left + right)
        diff = a - mid
        free = (diff > 0) & (diff < width)
        at_upper = diff >= width
        return free, at_upper


def _project_box_rows(rows: Tensor, total: Tensor | float, lower: float, upper: float) -> Tensor:
    """Euclidean projection of each row onto {sum = total, lower <= y <= upper}.

    Uses the active-set construction of Note [Differentiable projection from a fixed
    support]: free entries move by a common shift, the others sit on a bound.
    """
    n = rows.shape[-1]
    if n == 1:
        # A single entry is the total, exactly (x - (x - total) rounds).
        return torch.zeros_like(rows) + total
    # A bound beyond the dtype's range bounds no value of it: it is an infinite one.
    big = torch.finfo(rows.dtype).max
    lower = -math.inf if lower < -big else lower
    upper = math.inf if upper > big else upper
    if math.isinf(lower) and math.isinf(upper):
        return _project_sum(rows, total, (rows.ndim - 1,))
    if math.isinf(upper):
        return lower + _project_simplex_rows(rows - lower, total - n * lower)
    if math.isinf(lower):
        return upper - _project_simplex_rows(upper - rows, n * upper - total)
    if not _needs_grad(rows, total):
        # The search's tau is exact on its classification; clamp keeps the bounds. The
        # output's storage doubles as the search's work buffer.
        out = torch.empty_like(rows, memory_format=torch.contiguous_format)
        tau = _kernels.box_threshold(rows, total, lower, upper, scratch=out)
        return torch.sub(rows, tau, out=out).clamp_(lower, upper)
    if _one_node():
        projected: Tensor = _BoxProjection.apply(rows, total, lower, upper)  # type: ignore[no-untyped-call]
        return projected
    # compile, torch.func and tracing record the same Jacobian from plain ops
    free, at_upper = _box_support(rows, total, lower, upper)
    free_f = free.to(rows.dtype)
    upper_f = at_upper.to(rows.dtype)
    lower_f = 1.0 - free_f - upper_f
    count = free_f.sum(-1, keepdim=True)
    fixed_mass = upper * upper_f.sum(-1, keepdim=True) + lower * lower_f.sum(-1, keepdim=True)
    tau = ((rows * free_f).sum(-1, keepdim=True) - (total - fixed_mass)) / count.clamp_min(1.0)
    bound = torch.where(at_upper, rows.new_full((), upper), rows.new_full((), lower))
    # Clamped: near a bound (e.g. total = n * upper), x - tau can overshoot it by rounding.
    return torch.where(free, (rows - tau).clamp(lower, upper), bound)


def _one_node() -> bool:
    """Whether the active-set projections may record one autograd node.

    Plain eager mode only (Note [One autograd node for an active-set projection]):
    compile, ``torch.func`` and ``torch.jit.trace`` record the plain-op formula.
    """
    return not (_transforming() or _kernels._jit_tracing())


class _BoxProjection(torch.autograd.Function):
    """``clamp(x - tau, l, u)`` per row, ``tau`` from the search, as one autograd node.

    # Note [One autograd node for an active-set projection]
    The Jacobian is that of Note [Differentiable projection from a fixed support] on
    the free set ``F`` (here ``{l < y < u}``; the support ``{y > 0}`` for the
    simplex): ``d y_F = (I - 1 1^T / |F|) d x_F`` and ``d y_F / d total = 1 / |F|``,
    zero off ``F``. As one node the forward is the search and a pass or two, and the
    backward four passes over the gradient, where the same formula in autograd ops
    (kept for compile, ``torch.func`` and tracing) cost two to three times as much in
    a training step, mostly in full-size temporaries (fresh buffers cost page faults
    on CPU). Plain eager mode only (``ctx`` in ``forward``, no ``setup_context`` for
    ``torch.func``); the backward is written in differentiable ops of the gradient,
    so double backward works.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, rows: Tensor, total: Tensor | float, lower: float, upper: float
    ) -> Tensor:
        tau = _kernels.box_threshold(rows, total, lower, upper)
        y = (rows - tau).clamp_(lower, upper)
        ctx.save_for_backward(y)
        ctx.bounds = (lower, upper)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        lower, upper = ctx.bounds
        # 1 on the free set, 0 on a bound (y is clamped: neither factor is negative).
        # Float arithmetic: comparisons and bool-to-float copies are slow on CPU.
        room = torch.rsub(y, upper)
        free = torch.sub(y, lower).mul_(room).sign_()
        grad_rows, grad_total = _fixed_set_backward(ctx, grad, free, room)
        return grad_rows, grad_total, None, None


class _SimplexProjection(torch.autograd.Function):
    """``max(x - max(x) - tau, 0)`` per row, ``tau`` from the search, as one node.

    See Note [One autograd node for an active-set projection]; the free set is the
    support ``{y > 0}``. The shift by ``max(x)`` carries no gradient: the projection
    is shift invariant.
    """

    @staticmethod
    def forward(ctx: Any, rows: Tensor, total: Tensor | float) -> Tensor:  # type: ignore[override]
        floor = -torch.finfo(rows.dtype).max
        shifted = (rows - rows.amax(-1, keepdim=True)).clamp_min_(floor)
        tau, _ = _kernels.simplex_threshold(shifted, total)
        y = shifted.sub_(tau).clamp_min_(0.0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        free = torch.sign(y)
        return _fixed_set_backward(ctx, grad, free, None)


def _fixed_set_backward(
    ctx: Any, grad: Tensor, free: Tensor, room: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Gradients of rows and total for the 0/1 free-set indicator ``free``.

    ``room`` (optional) is a spare buffer of the gradient's shape for the result,
    one fresh full-size buffer fewer; not in a double backward, where ``out=``
    cannot be recorded.
    """
    double = torch.is_grad_enabled()
    kept = grad * free if double or room is None else torch.mul(grad, free, out=room)
    # with no free entry the output does not move: no gradient at all
    mean = kept.sum(-1, keepdim=True) / free.sum(-1, keepdim=True).clamp_min(1.0)
    grad_total = mean if ctx.needs_input_grad[1] else None
    # in place: no node saved `kept` (a product and a sum), so autograd allows it
    return kept.addcmul_(free, mean, value=-1.0), grad_total


def _apply_rows(
    x: Tensor,
    total: Total,
    dims: tuple[int, ...],
    row_map: Callable[..., Tensor],
    *args: float,
) -> Tensor:
    """Cast to the compute dtype, lay out as rows, apply ``row_map``, restore."""
    compute = _compute_dtype(x.dtype)
    xc = x.to(compute)
    t = _total_like(total, xc, dims)
    rows = _to_rows(xc, dims)
    t_rows = _total_rows(t, xc, dims)
    out = row_map(rows, t_rows, *args)
    return _from_rows(out, x.shape, dims).to(x.dtype)


def _max_or_zero(t: Tensor) -> Tensor:
    """Largest entry of ``t`` as a 0-d tensor, 0 for an empty ``t`` (a zero-size batch)."""
    return t.amax() if t.numel() > 0 else t.new_zeros(())


def _sum_violation(x: Tensor, total: Tensor | float, dims: tuple[int, ...]) -> Tensor:
    """max over slices of |sum(x) - total|, as a 0-d tensor (computed in >= float32)."""
    xc = x.to(_compute_dtype(x.dtype))
    if x.ndim == 0:
        return (xc - total).abs()
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
        tensor([1.0000, 1.0000])
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
    Batched over the dims not in ``dim``.

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
# checks shared with the constraint classes
# ---------------------------------------------------------------------------


def _check_positive(total: Total, name: str) -> None:
    if isinstance(total, Tensor):
        if total.numel() > 0 and not bool((total > 0).all()):
            raise ValueError(f"expected {name} > 0 for the simplex, got {total}")
    elif not total > 0:
        raise ValueError(f"expected {name} > 0 for the simplex, got {total}")


def _check_bounds(lower: float, upper: float) -> None:
    for name, value in (("lower", lower), ("upper", upper)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected {name} to be a float, got {type(value).__name__}")
        if math.isnan(value):
            raise ValueError(f"expected {name} to be a number, got nan")
    if lower > upper:
        raise ValueError(f"expected lower <= upper, got lower={lower} > upper={upper}")
    if lower == math.inf or upper == -math.inf:
        raise ValueError(f"expected lower < inf and upper > -inf, got lower={lower}, upper={upper}")


def _check_box(total: Total, n: int, lower: float, upper: float) -> None:
    """ValueError when {sum = total, lower <= y <= upper} over n entries is empty."""
    _check_bounds(lower, upper)
    t = total.detach().double() if isinstance(total, Tensor) else torch.tensor(float(total))
    if t.numel() == 0:
        return
    lo_sum, hi_sum = n * float(lower), n * float(upper)
    if bool((t < lo_sum).any()) or bool((t > hi_sum).any()):
        bad = float(t.min()) if bool((t < lo_sum).any()) else float(t.max())
        raise ValueError(
            f"expected n * lower <= total <= n * upper (n={n}, lower={lower}, upper={upper}, "
            f"so total in [{lo_sum}, {hi_sum}]), got total={bad}"
        )
