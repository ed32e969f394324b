"""Shared test helpers: float64 references, tolerance-scaled asserts, checkpoint and compile aids.

Every reference is written from the definitions, not from sumto's code paths:
projections are computed by bisection on the threshold in float64 (or by sorting
for the simplex), softmax, relu fusion and the least-squares linear projection from
their formulas, so that a bug in the library cannot hide in its own reference.
The asserts bound errors by ``eps(dtype)`` times the magnitude the computation
rounds at; each takes its constant ``k`` so that a test states how strict it is.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import sumto
from sumto.cli import main as cli_main

# The documented constant of ``Simplex(method="relu")`` (BiFPN fast normalised fusion):
# ``c (relu(x) + eps / n) / (sum relu(x) + eps)``.
RELU_EPS = 1e-4

# 3x3 kernels that sum to 1 (sharpening filters), the targets of the kernel-recovery tests.
SHARPEN = [[0.0, -1.0, 0.0], [-1.0, 5.0, -1.0], [0.0, -1.0, 0.0]]
SHARPEN_DIAGONAL = [[-1.0, 0.0, -1.0], [0.0, 5.0, 0.0], [-1.0, 0.0, -1.0]]


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


def ref_softmax(
    x: Tensor, total: float | Tensor, dims: Sequence[int], temperature: float = 1.0
) -> Tensor:
    """total * softmax(x / temperature) over each slice, float64."""
    rows, shape = as_rows(x, dims)
    z = rows / temperature
    e = (z - z.max(1, keepdim=True).values).exp()
    return from_rows(total_rows(total, x, dims) * e / e.sum(1, keepdim=True), shape, dims)


def ref_relu(x: Tensor, total: float | Tensor, dims: Sequence[int]) -> Tensor:
    """The documented map c (relu(x) + eps / n) / (sum relu(x) + eps), float64."""
    rows, shape = as_rows(x, dims)
    r = rows.clamp_min(0.0)
    n = rows.shape[1]
    w = total_rows(total, x, dims) * (r + RELU_EPS / n) / (r.sum(1, keepdim=True) + RELU_EPS)
    return from_rows(w, shape, dims)


def ref_project_linear(x: Tensor, A: Tensor, b: Tensor, dims: Sequence[int]) -> Tensor:
    """x - delta per slice, delta the minimum-norm least-squares solution of A delta = A x - b."""
    rows, shape = as_rows(x, dims)
    a = A.double()
    residual = a @ rows.T - b.double()[:, None]
    delta = torch.linalg.lstsq(a, residual, rcond=1e-10, driver="gelsd").solution
    return from_rows(rows - delta.T, shape, dims)


def bayar_divide_by_sum(w: Tensor) -> Tensor:
    """The published Bayar & Stamm step: centre 0, divide by the kernel sum, centre -1."""
    c = w.shape[-1] // 2
    w = w.clone()
    w[..., c, c] = 0.0
    w = w / w.sum((-2, -1), keepdim=True)
    w[..., c, c] = -1.0
    return w


# ---------------------------------------------------------------------------
# tolerance-scaled asserts
# ---------------------------------------------------------------------------


def tolerance(x: Tensor, total: float | Tensor, dims: Sequence[int], k: float = 8.0) -> float:
    """k * (4 + log2 n) * eps(dtype) * max over slices of (sum|x| + |total|)."""
    rows, _ = as_rows(x, dims)
    t = total_rows(total, x, dims)
    n = rows.shape[1]
    mag = float((rows.abs().sum(1, keepdim=True) + t.abs()).max())
    return k * (4 + math.log2(max(n, 1))) * torch.finfo(x.dtype).eps * max(mag, 1e-30)


def assert_sums(
    x: Tensor,
    total: float | Tensor,
    dims: Sequence[int],
    k: float = 8.0,
    source: Tensor | None = None,
) -> None:
    """Assert every slice of ``x`` over ``dims`` sums to ``total`` within a dtype-scaled tolerance.

    With ``source`` (the input ``x`` was projected from) the tolerance of ``source`` in
    ``x``'s dtype is added: a projection cancels ``sum(source)``, so its rounding error
    scales with the input too, not only with the output.
    """
    rows, _ = as_rows(x, dims)
    t = total_rows(total, x, dims)
    err = float((rows.sum(1, keepdim=True) - t).abs().max())
    tol = tolerance(x, total, dims, k)
    if source is not None:
        tol += tolerance(source.to(x.dtype), total, dims, k)
    assert err <= tol, f"max |sum - total| = {err:.3g} exceeds tolerance {tol:.3g} ({x.dtype})"


def assert_matches_reference(
    actual: Tensor,
    expected: Tensor,
    x: Tensor,
    total: float | Tensor,
    dims: Sequence[int],
    extra_scale: float = 0.0,
    k: float = 16.0,
) -> None:
    """|actual - expected| <= eps(dtype) |expected| + k (4 + log2 n) eps(compute) * scale.

    The first term is the final rounding to ``actual``'s dtype; the second the error
    of computing in float32/float64 (:func:`compute_eps`) on slices of ``x`` (taken in
    that compute dtype) of magnitude ``sum|x| + |total|``, plus ``extra_scale`` (e.g.
    the mass of entries sitting on a box bound).
    """
    assert actual.shape == expected.shape
    if actual.numel() == 0:
        return
    wide = torch.float32 if actual.dtype in (torch.float16, torch.bfloat16) else actual.dtype
    rows, _ = as_rows(x.to(wide), dims)
    t = total_rows(total, x, dims)
    n = rows.shape[1]
    scale = float((rows.abs().sum(1, keepdim=True) + t.abs()).max()) + extra_scale
    err = (actual.double() - expected.double()).abs()
    bound = torch.finfo(actual.dtype).eps * expected.double().abs()
    bound = bound + k * (4 + math.log2(max(n, 1))) * compute_eps(actual.dtype) * max(scale, 1e-30)
    worst = float((err - bound).max())
    assert worst <= 0, (
        f"max abs error {float(err.max()):.3g} exceeds its bound by {worst:.3g} ({actual.dtype})"
    )


def assert_close_at_magnitude(
    actual: Tensor,
    expected: Tensor,
    magnitude: Tensor | float,
    dtype: torch.dtype,
    n: int,
    k: float = 8.0,
) -> None:
    """|actual - expected| <= k * (4 + log2 n) * eps(dtype) * magnitude, elementwise max."""
    mag = float(magnitude.detach().max()) if isinstance(magnitude, Tensor) else float(magnitude)
    tol = k * (4 + math.log2(max(n, 1))) * torch.finfo(dtype).eps * max(mag, 1e-30)
    diff = (actual.detach().double() - expected.detach().double()).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    assert err <= tol, f"max abs error {err:.3g} exceeds {tol:.3g} ({dtype})"


def residual_and_scale(v: Tensor, A: Tensor, b: Tensor, dims: Sequence[int]) -> tuple[float, float]:
    """max |A v - b| over slices and equations, and max (|A| |v| + |b|), in float64."""
    rows, _ = as_rows(v, dims)
    a, bb = A.double(), b.double()
    residual = float((rows @ a.T - bb).abs().max())
    scale = float((rows.abs() @ a.abs().T + bb.abs()).max())
    return residual, scale


def assert_satisfies(v: Tensor, A: Tensor, b: Tensor, dims: Sequence[int], k: float = 8.0) -> None:
    """Every slice of ``v`` solves ``A v = b`` within k (4 + log2 n) eps(dtype) (|A| |v| + |b|)."""
    n = A.shape[1]
    residual, scale = residual_and_scale(v, A, b, dims)
    tol = k * (4 + math.log2(n)) * torch.finfo(v.dtype).eps * max(scale, 1e-30)
    assert residual <= tol, f"max |A v - b| = {residual:.3g} exceeds {tol:.3g} ({v.dtype})"


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


Bound = float | Tensor


def _ref_box_1d(x: Tensor, total: float | Tensor, lower: Bound, upper: Bound) -> Tensor:
    """The reference projection of a 1-D ``x`` (float or per-entry bounds)."""
    rows = x.double().reshape(1, -1)
    if isinstance(lower, Tensor) or isinstance(upper, Tensor):
        return ref_project_box_entries(rows, _scalar(total), (-1,), lower, upper)[0]
    return ref_project_box_sum(rows, _scalar(total), (-1,), lower, upper)[0]


def _unbounded(lower: Bound, upper: Bound) -> bool:
    return (
        not isinstance(lower, Tensor)
        and not isinstance(upper, Tensor)
        and (math.isinf(lower) and math.isinf(upper))
    )


def ref_free_set(x: Tensor, total: float | Tensor, lower: Bound, upper: Bound) -> Tensor:
    """Boolean free set ``{lower < y < upper}`` of the reference projection of a 1-D ``x``."""
    if _unbounded(lower, upper):
        return torch.ones_like(x, dtype=torch.bool)
    y = _ref_box_1d(x, total, lower, upper)
    return (y > lower) & (y < upper)


def ref_clamp_shift_jacobian(
    x: Tensor, total: float | Tensor, lower: Bound, upper: Bound
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


def kink_margin(x: Tensor, total: float | Tensor, lower: Bound, upper: Bound) -> float:
    """Distance of the reference ``x - tau`` (1-D ``x``) to the nearest finite bound."""
    if _unbounded(lower, upper):
        return math.inf
    rows = x.double().reshape(1, -1)
    y = _ref_box_1d(x, total, lower, upper)
    free = (y > lower) & (y < upper)
    # the unclamped value x - tau: on F it is y; off F it is x - tau with the same tau
    tau = float((rows[0] - y)[free].mean()) if bool(free.any()) else math.nan
    if math.isnan(tau):
        return 0.0
    shifted = rows[0] - tau
    distances = [
        float((shifted - torch.as_tensor(b, dtype=torch.float64)).abs()[finite].min())
        for b in (lower, upper)
        if bool((finite := torch.isfinite(torch.as_tensor(b).expand(shifted.shape))).any())
    ]
    return min(distances)


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


# ---------------------------------------------------------------------------
# constraints holding on constrained tensors
# ---------------------------------------------------------------------------


def assert_on_set(
    constraint: sumto.Constraint, value: Tensor, k: float = 1.0, what: str = "value"
) -> None:
    """``value`` is finite and within ``k`` times ``constraint``'s own tolerance of its set."""
    assert bool(torch.isfinite(value).all()), f"{what} is not finite"
    violation = float(constraint.violation(value))
    tol = k * constraint.tolerance(value)
    assert violation <= tol, f"{what}: violation {violation:.3g} > {tol:.3g}"


def assert_constraints_hold(module: nn.Module, k: float = 8.0) -> None:
    """Every sumto-constrained tensor of ``module`` is on its set, eps-scaled by ``k``.

    Each parametrization list is evaluated map by map (as ``sumto.check`` does); after
    each sumto constraint the value must be finite, sum to the total per slice within
    :func:`tolerance` ``(k)``, be non-negative for a simplex and within the bounds of a
    box, and violate the constraint by at most ``k`` times its tolerance. The report of
    ``sumto.check`` must agree: each worst violation within ``k`` times the largest
    tolerance of the tensor's constraints (non-finite tensors are reported as nan/inf
    and fail). Parameters kept on their set by ``project_on_step`` have no
    parametrization list: their tests check them with :func:`assert_on_set`.
    """
    tolerances: dict[str, float] = {}
    with torch.no_grad():
        for owner_name, owner in module.named_modules():
            plists = getattr(owner, "parametrizations", None)
            if plists is None:
                continue
            for name, plist in plists.items():
                qualified = f"{owner_name}.{name}" if owner_name else name
                value = plist.original
                for p in plist:
                    value = p(value)
                    if not isinstance(p, sumto.Constraint):
                        continue
                    _assert_constraint_holds(p, value, k, qualified)
                    tol = p.tolerance(value)
                    tolerances[qualified] = max(tolerances.get(qualified, 0.0), tol)
    for name, worst in sumto.check(module).items():
        if name not in tolerances:
            assert math.isfinite(worst), f"{name}: violation {worst}"
            continue
        tol = k * tolerances[name]
        assert worst <= tol, f"{name}: violation {worst:.3g} > {tol:.3g}"


def _assert_constraint_holds(c: sumto.Constraint, value: Tensor, k: float, what: str) -> None:
    assert_on_set(c, value, k, what)
    if isinstance(c, (sumto.AffineSum, sumto.Simplex, sumto.BoxSum)):
        dims = c.dims(value.ndim)
        total = c.total if isinstance(c.total, float) else c.total.detach()
        rows, _ = as_rows(value, dims)
        err = float((rows.sum(1, keepdim=True) - total_rows(total, value, dims)).abs().max())
        tol = tolerance(value, total, dims, k=k)
        assert err <= tol, f"{what}: |sum - total| = {err:.3g} > {tol:.3g}"
    if isinstance(c, sumto.Simplex):
        assert float(value.min()) >= 0.0, f"{what} has negative entries"
    if isinstance(c, sumto.BoxSum):
        low, high = float(value.min()), float(value.max())
        assert c.lower <= low and high <= c.upper, f"{what} leaves [{c.lower}, {c.upper}]"


def assert_report_within(
    report: dict[str, float], atol: float = 1e-5, names: int | None = None
) -> None:
    """A ``sumto.check`` report: ``names`` entries (at least one if None), each <= ``atol``.

    For unit-scale float32 weights, where an absolute bound is meaningful.
    """
    if names is None:
        assert len(report) > 0, report
    else:
        assert len(report) == names, report
    for name, violation in report.items():
        assert violation <= atol, f"{name}: violation {violation:.3g}"


def assert_params_match(got: dict[str, Tensor], want: dict[str, Tensor], atol: float) -> None:
    """The same keys, and every tensor within ``atol`` (absolute, max over entries)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        err = float((got[key].double() - value.double()).abs().max())
        assert err <= atol, f"{key}: max |got - want| = {err:.3g} > {atol:.3g}"


# ---------------------------------------------------------------------------
# checkpoints and compile
# ---------------------------------------------------------------------------


def save_and_load(state: dict[str, Any]) -> dict[str, Any]:
    """torch.save then torch.load(weights_only=True), as a checkpoint file would."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def legacy_state_dict(model: nn.Module) -> dict[str, Any]:
    """The layout of earlier sumto versions: each configuration as an ``_extra_state`` entry."""
    state = model.state_dict()
    legacy: dict[str, Any] = dict(state)  # a plain dict: no metadata
    for owner, local in state._metadata.items():
        for rel, config in local.get("sumto.constraints", {}).items():
            legacy[f"{owner}.{rel}._extra_state" if owner else f"{rel}._extra_state"] = config
    return legacy


class CountingBackend:
    """A dynamo backend that counts the graphs it is asked to compile."""

    def __init__(self, name: str) -> None:
        self.inner = torch._dynamo.lookup_backend(name)
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Any:
        self.graphs += 1
        return self.inner(gm, example_inputs)


def inspected_model() -> nn.Module:
    """A model with four sumto-constrained tensors: simplex, tensor-total sum_to, box, sparsemax."""
    torch.manual_seed(0)
    totals = torch.arange(1.0, 5.0).view(4, 1, 1, 1)
    model = nn.Sequential(
        sumto.simplex(nn.Linear(5, 3)),
        sumto.sum_to(nn.Conv2d(2, 4, 3), total=totals),
        sumto.box_sum(nn.Linear(6, 2), total=2.0, dim=0, lower=-0.5, upper=1.0),
    )
    sumto.simplex(model[2], "bias", method="sparsemax")
    return model


def run_inspect(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``sumto inspect path`` in this process: (exit status, stdout, stderr)."""
    status = cli_main(["inspect", str(path)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------------------
# per-entry bounds
# ---------------------------------------------------------------------------


def ref_project_box_entries(
    x: Tensor,
    total: float | Tensor,
    dims: Sequence[int],
    lower: float | Tensor,
    upper: float | Tensor,
    iters: int = 300,
) -> Tensor:
    """``clamp(x - tau, l, u)`` with per-entry bounds (broadcastable to ``x``), float64.

    ``tau`` by bisection on a bracket that contains the root, then in closed form on
    the free set the bisection found (as :func:`ref_project_box_sum`).
    """
    x = x.double()
    rows, shape = as_rows(x, dims)
    low = as_rows(torch.as_tensor(lower, dtype=torch.float64).expand(x.shape), dims)[0]
    high = as_rows(torch.as_tensor(upper, dtype=torch.float64).expand(x.shape), dims)[0]
    t = total_rows(total, x, dims)
    finite = [
        v[torch.isfinite(v)].abs().max() for v in (low, high) if bool(torch.isfinite(v).any())
    ]
    span = float(rows.abs().max()) + float(t.abs().max()) + sum(float(v) for v in finite) + 1.0
    left = torch.full_like(t, -4 * span)
    right = torch.full_like(t, 4 * span)
    for _ in range(iters):
        mid = 0.5 * (left + right)
        s = torch.clamp(rows - mid, low, high).sum(1, keepdim=True)
        too_big = s > t
        left = torch.where(too_big, mid, left)
        right = torch.where(too_big, right, mid)
    tau = 0.5 * (left + right)
    y = torch.clamp(rows - tau, low, high)
    free = (rows - tau > low) & (rows - tau < high)
    nfree = free.sum(1, keepdim=True)
    fixed = torch.where(free, torch.zeros_like(y), y).sum(1, keepdim=True)
    exact_tau = (torch.where(free, rows, 0.0).sum(1, keepdim=True) - (t - fixed)) / nfree.clamp_min(
        1
    )
    y = torch.where(free & (nfree > 0), rows - exact_tau, y)
    return from_rows(y, shape, dims)


# distribution tests
# ---------------------------------------------------------------------------


def ks_statistic(samples: Tensor, cdf: Callable[[Tensor], Tensor]) -> float:
    """One-sample Kolmogorov-Smirnov statistic ``sup |F_n(x) - F(x)|`` of 1-D ``samples``.

    The supremum is reached at a sample: the larger of ``i / n - F(x_(i))`` and
    ``F(x_(i)) - (i - 1) / n`` over the sorted samples, in float64.
    """
    x = samples.detach().double().reshape(-1).sort().values
    n = x.numel()
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


def ks_critical(n: int, alpha: float) -> float:
    """Asymptotic critical value of the KS statistic: ``sqrt(-log(alpha / 2) / (2 n))``.

    The two-sided test at level ``alpha`` rejects when the statistic exceeds it
    (Kolmogorov's limit, accurate to a few percent for ``n`` in the thousands).
    """
    return math.sqrt(-math.log(alpha / 2) / (2 * n))


# ---------------------------------------------------------------------------
# entmax
# ---------------------------------------------------------------------------


def ref_entmax(
    x: Tensor, alpha: float | Tensor = 1.5, dims: Sequence[int] = (-1,), iters: int = 200
) -> Tensor:
    """alpha-entmax over each slice in float64, from its definition.

    ``p_i = ((alpha - 1) z_i - tau)_+^(1 / (alpha - 1))`` with ``tau`` found by bisection
    on the unshifted scores (bracket ``[(alpha - 1) max z - 1, (alpha - 1) max z]``),
    row by row in Python floats; ``alpha = 1`` is softmax. ``alpha`` is a float or a
    tensor broadcastable to the keepdim-reduced shape (one alpha per slice).
    """
    rows, shape = as_rows(x, dims)
    alphas = total_rows(alpha, x, dims)
    out = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        z = [float(v) for v in rows[i]]
        a = float(alphas[i, 0])
        finite = [v for v in z if v != -math.inf]
        if not finite:
            out[i] = 1.0 / len(z)
            continue
        if a == 1.0:
            top = max(finite)
            e = [math.exp(v - top) if v != -math.inf else 0.0 for v in z]
            out[i] = torch.tensor(e, dtype=torch.float64) / math.fsum(e)
            continue
        scaled = [(a - 1.0) * v if v != -math.inf else -math.inf for v in z]
        hi = max(scaled)
        lo = hi - 1.0

        def mass(tau: float, scaled: list[float] = scaled, a: float = a) -> float:
            return math.fsum(max(s - tau, 0.0) ** (1.0 / (a - 1.0)) for s in scaled)

        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if mass(mid) >= 1.0:
                lo = mid
            else:
                hi = mid
        p = [max(s - lo, 0.0) ** (1.0 / (a - 1.0)) for s in scaled]
        out[i] = torch.tensor(p, dtype=torch.float64)
    return from_rows(out, shape, dims)


def entmax_tolerance(alpha: float, dtype: torch.dtype, spread: float, k: float = 16.0) -> float:
    """Bound on |entmax(x) - exact| for scores spanning ``spread`` (max - min), in ``dtype``.

    The outputs are ``u^(1/(alpha-1))`` of ``u = (alpha - 1)(z - max z) - tau``, rounded at
    ``du = k eps ((alpha - 1) spread + 1)``. For ``alpha <= 2`` the exponent is >= 1 and
    the map is ``1/(alpha-1)``-Lipschitz on [0, 1]; above 2 it is Hölder with that
    exponent, so near the threshold ``du`` grows to ``du^(1/(alpha-1))``.
    """
    eps = compute_eps(dtype)
    du = k * eps * ((alpha - 1.0) * spread + 1.0)
    if alpha <= 1.0:
        return k * eps * (spread + 1.0)
    beta = 1.0 / (alpha - 1.0)
    return beta * du if beta >= 1.0 else du**beta


# ---------------------------------------------------------------------------
# AllenNLP ScalarMix
# ---------------------------------------------------------------------------


def ref_scalar_mix(
    tensors: Sequence[Tensor],
    scalar_parameters: Tensor,
    gamma: float | Tensor = 1.0,
    mask: Tensor | None = None,
    do_layer_norm: bool = False,
) -> Tensor:
    """AllenNLP's ``ScalarMix.forward`` in float64: ``gamma * sum_k softmax(s)_k * LN(x_k)``.

    With ``do_layer_norm``, ``LN`` is ScalarMix's masked layer norm: over the
    positions where ``mask`` (the tensors' shape without the last dim; all positions
    when ``None``) is 1, ``mean = sum(x * m) / N`` and
    ``var = sum(((x * m - mean) * m) ** 2) / N`` with ``N = sum(mask) * last dim``,
    then ``(x - mean) / sqrt(var + 1e-12)`` at every position.
    """
    xs = [t.double() for t in tensors]
    weights = torch.softmax(scalar_parameters.double(), dim=0)
    gamma64 = gamma.double() if isinstance(gamma, Tensor) else torch.tensor(float(gamma))
    if not do_layer_norm:
        return gamma64 * sum(w * x for w, x in zip(weights, xs, strict=True))  # type: ignore[return-value]
    m = torch.ones(xs[0].shape[:-1], dtype=torch.float64) if mask is None else mask.double()
    broadcast_mask = m.unsqueeze(-1)
    num_elements_not_masked = m.sum() * xs[0].shape[-1]
    pieces = []
    for w, x in zip(weights, xs, strict=True):
        x_masked = x * broadcast_mask
        mean = x_masked.sum() / num_elements_not_masked
        variance = (((x_masked - mean) * broadcast_mask) ** 2).sum() / num_elements_not_masked
        pieces.append(w * (x - mean) / torch.sqrt(variance + 1e-12))
    return gamma64 * sum(pieces)  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# transport polytopes {P >= 0, P 1 = r, P^T 1 = c}
# ---------------------------------------------------------------------------


def _affine_transport(p: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """Orthogonal projection onto {P 1 = r, P^T 1 = c}: P - u 1^T - 1 v^T in closed form.

    With e_r = P 1 - r, e_c = P^T 1 - c and E = sum(e_r): u = e_r / n and
    v = (e_c - E / n) / m solve n u_i + sum(v) = e_r_i, sum(u) + m v_j = e_c_j.
    """
    m, n = p.shape[-2:]
    e_r = p.sum(-1) - r
    e_c = p.sum(-2) - c
    total = e_r.sum(-1, keepdim=True)
    u = e_r / n
    v = (e_c - total / n) / m
    return p - u.unsqueeze(-1) - v.unsqueeze(-2)


def ref_project_transport(
    x: Tensor, r: float | Tensor = 1.0, c: float | Tensor = 1.0, iters: int = 3000
) -> Tensor:
    """Dykstra's alternating projections (affine marginals, then P >= 0) in float64.

    Batched over leading dims; ``r``/``c`` broadcast to ``(..., m)`` / ``(..., n)``.
    A reference for the value, accurate to about 1e-9 on the small unit-scale inputs
    of the tests with the default count; :func:`transport_optimality_gap` certifies exactness.
    """
    x = x.double()
    n = x.shape[-1]
    rr = torch.as_tensor(r, dtype=torch.float64).expand(*x.shape[:-1])
    cc = torch.as_tensor(c, dtype=torch.float64).expand(*x.shape[:-2], n)
    p = x.clone()
    inc = torch.zeros_like(x)
    for _ in range(iters):
        y = _affine_transport(p, rr, cc)
        z = y + inc
        p = z.clamp_min(0.0)
        inc = z - p
    return p


def transport_optimality_gap(x: Tensor, p: Tensor, r: Tensor, c: Tensor) -> float:
    """``max over Q in T(r, c) of <x - p, Q - p>`` for one matrix, by scipy's LP solver.

    ``p`` (feasible) is the Euclidean projection of ``x`` onto ``T(r, c)`` iff this is
    <= 0 (the variational inequality of a projection onto a convex set); it is
    independent of the library's own optimality check.
    """
    import numpy as np
    from scipy.optimize import linprog

    m, n = x.shape
    g = (x.double() - p.double()).numpy().ravel()
    a = np.zeros((m + n, m * n))
    for i in range(m):
        a[i, i * n : (i + 1) * n] = 1.0
    for j in range(n):
        a[m + j, j::n] = 1.0
    b = np.concatenate([r.double().numpy(), c.double().numpy()])
    res = linprog(-g, A_eq=a, b_eq=b, bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return float(-res.fun - (g * p.double().numpy().ravel()).sum())


def assert_transport(
    p: Tensor, r: float | Tensor, c: float | Tensor, k: float = 8.0, what: str = "plan"
) -> None:
    """``p >= 0`` and its row/column sums within ``k (4 + log2 mn) eps(dtype)`` of r, c."""
    m, n = p.shape[-2:]
    pd = p.double()
    rr = torch.as_tensor(r, dtype=torch.float64).expand(*p.shape[:-1])
    cc = torch.as_tensor(c, dtype=torch.float64).expand(*p.shape[:-2], n)
    scale = max(float(pd.abs().sum(-1).max()), float(pd.abs().sum(-2).max()), 1e-30)
    scale += max(float(rr.abs().max()), float(cc.abs().max()))
    tol = k * (4 + math.log2(m * n)) * torch.finfo(p.dtype).eps * scale
    assert bool(torch.isfinite(p).all()), f"{what} is not finite"
    assert float(p.min()) >= 0.0, f"{what} has a negative entry {float(p.min()):.3g}"
    rows = float((pd.sum(-1) - rr).abs().max())
    cols = float((pd.sum(-2) - cc).abs().max())
    assert rows <= tol and cols <= tol, (
        f"{what}: row error {rows:.3g}, column {cols:.3g} > {tol:.3g}"
    )


def ref_sinkhorn(x: Tensor, r: float | Tensor, c: float | Tensor, iters: int) -> Tensor:
    """Plain-domain Sinkhorn in float64: K = exp(x - max), alternate u = r / K v, v = c / K^T u."""
    x = x.double()
    n = x.shape[-1]
    rr = torch.as_tensor(r, dtype=torch.float64).expand(*x.shape[:-1])
    cc = torch.as_tensor(c, dtype=torch.float64).expand(*x.shape[:-2], n)
    k = (x - x.amax((-2, -1), keepdim=True)).exp()
    v = torch.ones_like(cc)
    u = torch.ones_like(rr)
    for _ in range(iters):
        u = rr / (k @ v.unsqueeze(-1)).squeeze(-1)
        v = cc / (k.mT @ u.unsqueeze(-1)).squeeze(-1)
    return u.unsqueeze(-1) * k * v.unsqueeze(-2)


# ---------------------------------------------------------------------------
def load_example(name: str) -> Any:
    """The module of ``examples/<name>.py``, imported from its file (examples are not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
