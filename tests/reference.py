"""Independent slow float64 references and the shared "constraint holds" checker.

Everything here is written from the definitions, not from sumto's code paths:
projections are computed by bisection on the threshold in float64 (or by sorting
for the simplex), so that a bug in the library cannot hide in its own reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def as_rows(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, tuple[int, ...]]:
    """(rows (-1, n) float64, moved shape) with the dims flattened last."""
    dims = tuple(sorted(d % x.ndim for d in dims))
    moved = x.double().movedim(dims, tuple(range(x.ndim - len(dims), x.ndim)))
    n = math.prod(x.shape[d] for d in dims)
    return moved.reshape(-1, n), tuple(moved.shape)


def from_rows(rows: Tensor, moved_shape: tuple[int, ...], dims: Sequence[int]) -> Tensor:
    ndim = len(moved_shape)
    dims = tuple(sorted(d % ndim for d in dims))
    return rows.reshape(moved_shape).movedim(tuple(range(ndim - len(dims), ndim)), dims)


def total_rows(total: float | Tensor, x: Tensor, dims: Sequence[int]) -> Tensor:
    """Totals as a float64 (-1, 1) column aligned with :func:`as_rows`."""
    dims = tuple(sorted(d % x.ndim for d in dims))
    keep = tuple(1 if i in dims else s for i, s in enumerate(x.shape))
    t = torch.as_tensor(total, dtype=torch.float64)
    if t.ndim > 0 and t.shape != keep:
        try:
            t = t.expand(keep)
        except RuntimeError:
            t = t.reshape(keep)
    t = t.expand(keep)
    moved = t.movedim(dims, tuple(range(x.ndim - len(dims), x.ndim)))
    return moved.reshape(-1, 1)


def ref_project_sum(x: Tensor, total: float | Tensor = 1.0, dims: Sequence[int] = (-1,)) -> Tensor:
    """x + (total - sum) / n, row by row in float64."""
    rows, shape = as_rows(x, dims)
    t = total_rows(total, x, dims)
    return from_rows(rows + (t - rows.sum(1, keepdim=True)) / rows.shape[1], shape, dims)


def ref_project_simplex(
    x: Tensor, total: float | Tensor = 1.0, dims: Sequence[int] = (-1,)
) -> Tensor:
    """Sort-based projection (Held et al. 1974 / Duchi et al. 2008), one row at a time, float64."""
    rows, shape = as_rows(x, dims)
    t = total_rows(total, x, dims)
    out = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        v = rows[i]
        c = float(t[i, 0])
        u = sorted(v.tolist(), reverse=True)
        running, tau = 0.0, 0.0
        for k, uk in enumerate(u, start=1):
            running += uk
            candidate = (running - c) / k
            if uk - candidate > 0:
                tau = candidate
        out[i] = (v - tau).clamp_min(0.0)
    return from_rows(out, shape, dims)


def ref_project_box_sum(
    x: Tensor,
    total: float | Tensor = 1.0,
    dims: Sequence[int] = (-1,),
    lower: float = -math.inf,
    upper: float = math.inf,
    iters: int = 200,
) -> Tensor:
    """clamp(x - tau, lower, upper) with tau found by float64 bisection, then refined exactly.

    The bisection finds the active set; tau is then solved in closed form on it.
    """
    rows, shape = as_rows(x, dims)
    t = total_rows(total, x, dims)
    n = rows.shape[1]
    if math.isinf(lower) and math.isinf(upper):
        return ref_project_sum(x, total, dims)
    span = (
        float(rows.abs().max())
        + float(t.abs().max())
        + abs(lower if math.isfinite(lower) else 0)
        + abs(upper if math.isfinite(upper) else 0)
        + 1.0
    )
    left = torch.full_like(t, -2 * span - 1)
    right = torch.full_like(t, 2 * span + 1)
    for _ in range(iters):
        mid = 0.5 * (left + right)
        s = (rows - mid).clamp(lower, upper).sum(1, keepdim=True)
        too_big = s > t
        left = torch.where(too_big, mid, left)
        right = torch.where(too_big, right, mid)
    tau = 0.5 * (left + right)
    y = (rows - tau).clamp(lower, upper)
    free = (rows - tau > lower) & (rows - tau < upper)
    nfree = free.sum(1, keepdim=True)
    fixed = torch.where(free, torch.zeros_like(y), y).sum(1, keepdim=True)
    exact_tau = (
        torch.where(free, rows, torch.zeros_like(rows)).sum(1, keepdim=True) - (t - fixed)
    ) / nfree.clamp_min(1)
    y = torch.where(free & (nfree > 0), rows - exact_tau, y)
    del n
    return from_rows(y, shape, dims)


def tolerance(x: Tensor, total: float | Tensor, dims: Sequence[int], k: float = 8.0) -> float:
    """k * (4 + log2 n) * eps(dtype) * max over slices of (sum|x| + |total|)."""
    rows, _ = as_rows(x, dims)
    t = total_rows(total, x, dims)
    n = rows.shape[1]
    mag = float((rows.abs().sum(1, keepdim=True) + t.abs()).max())
    return k * (4 + math.log2(max(n, 1))) * torch.finfo(x.dtype).eps * max(mag, 1e-30)


def assert_sums(x: Tensor, total: float | Tensor, dims: Sequence[int], k: float = 8.0) -> None:
    """Assert every slice of ``x`` over ``dims`` sums to ``total`` within a dtype-scaled tolerance."""
    rows, _ = as_rows(x, dims)
    t = total_rows(total, x, dims)
    err = float((rows.sum(1, keepdim=True) - t).abs().max())
    tol = tolerance(x, total, dims, k)
    assert err <= tol, f"max |sum - total| = {err:.3g} exceeds tolerance {tol:.3g} ({x.dtype})"


def assert_close_scaled(
    actual: Tensor, expected: Tensor, k: float = 8.0, dtype: torch.dtype | None = None
) -> None:
    """|actual - expected| <= k * eps(dtype) * max(1, max|expected|) elementwise-max."""
    dtype = dtype or actual.dtype
    scale = max(1.0, float(expected.double().abs().max())) if expected.numel() else 1.0
    err = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    tol = k * torch.finfo(dtype).eps * scale
    assert err <= tol, f"max abs error {err:.3g} exceeds {tol:.3g} ({dtype})"


# ---------------------------------------------------------------------------
# Jacobians and error bounds shared by the search and transform tests
# ---------------------------------------------------------------------------


def ref_free_set(x: Tensor, total: float | Tensor, lower: float, upper: float) -> Tensor:
    """Boolean free set ``{lower < y < upper}`` of the reference projection of a 1-D ``x``."""
    if math.isinf(lower) and math.isinf(upper):
        return torch.ones_like(x, dtype=torch.bool)
    y = ref_project_box_sum(x.double().reshape(1, -1), _scalar(total), (-1,), lower, upper)[0]
    return (y > lower) & (y < upper)


def ref_clamp_shift_jacobian(
    x: Tensor, total: float | Tensor, lower: float, upper: float
) -> tuple[Tensor, Tensor]:
    """Jacobians of ``clamp(x - tau, lower, upper)`` (sum ``total``) at a 1-D ``x``, float64.

    On the free set ``F`` of the reference projection the output is ``x - tau`` with
    ``tau = (sum_F x - c') / |F|``, so ``dy/dx = I_F - 1_F 1_F^T / |F|`` and
    ``dy/dc = 1_F / |F|``; entries on a bound are constant. Valid away from kinks
    (no entry of ``x - tau`` on a bound), which :func:`kink_margin` measures.
    """
    free = ref_free_set(x, total, lower, upper).double()
    count = float(free.sum())
    jac_x = torch.diag(free) - torch.outer(free, free) / max(count, 1.0)
    return jac_x, free / max(count, 1.0)


def kink_margin(x: Tensor, total: float | Tensor, lower: float, upper: float) -> float:
    """Distance of the reference ``x - tau`` (1-D ``x``) to the nearest finite bound."""
    if math.isinf(lower) and math.isinf(upper):
        return math.inf
    rows = x.double().reshape(1, -1)
    y = ref_project_box_sum(rows, _scalar(total), (-1,), lower, upper)[0]
    free = (y > lower) & (y < upper)
    # the unclamped value x - tau: on F it is y; off F it is x - tau with the same tau
    tau = float((rows[0] - y)[free].mean()) if bool(free.any()) else math.nan
    if math.isnan(tau):
        return 0.0
    shifted = rows[0] - tau
    distances = [(shifted - b).abs().min() for b in (lower, upper) if math.isfinite(b)]
    return float(min(distances))


def fd_jacobian(fn: Callable[[Tensor], Tensor], x: Tensor, step: float = 1e-6) -> Tensor:
    """Central finite-difference Jacobian of ``fn`` (float64 in, any shape out) at ``x``.

    Returns a ``(*out_shape, *x_shape)`` tensor, like ``torch.func.jacrev``.
    """
    x = x.detach().double()
    columns = []
    for i in range(x.numel()):
        e = torch.zeros_like(x).reshape(-1)
        e[i] = step
        e = e.reshape(x.shape)
        columns.append((fn(x + e).detach() - fn(x - e).detach()) / (2 * step))
    out_shape = columns[0].shape
    return torch.stack(columns, -1).reshape(*out_shape, *x.shape)


def _scalar(total: float | Tensor) -> float:
    return float(total) if isinstance(total, Tensor) else total


def compute_eps(dtype: torch.dtype) -> float:
    """eps of the dtype sumto computes in (float32 for half precision inputs)."""
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.finfo(wide).eps


def assert_projection_close(
    actual: Tensor,
    expected: Tensor,
    scale: float,
    k: float = 8.0,
    what: str = "",
    absolute: float = 0.0,
) -> None:
    """``|actual - expected| <= k (1 + log2 n) eps(compute) scale + eps(actual) |expected|``.

    ``scale`` is the magnitude the computation rounds at (``max |x|``, ``|total|``,
    the bounds); the second term is the final rounding to ``actual``'s dtype;
    ``absolute`` is added to the bound as is.
    """
    n = actual.shape[-1] if actual.ndim > 0 else 1
    exp = expected.double()
    bound = k * (1 + math.log2(max(n, 1))) * compute_eps(actual.dtype) * max(scale, 1e-30)
    bound += absolute
    err = (actual.double() - exp).abs() - torch.finfo(actual.dtype).eps * exp.abs()
    worst = float(err.max()) if err.numel() else 0.0
    assert worst <= bound, f"{what}: max error {worst:.3g} exceeds {bound:.3g} ({actual.dtype})"
