"""Transport polytopes: the exact Euclidean projection and Sinkhorn normalisation.

The set is ``T(r, c) = {P >= 0, P 1 = r, P^T 1 = c}`` over the last two dims of a
``(..., m, n)`` tensor (doubly stochastic matrices for ``r = c = 1``). Everything here
takes validated arguments in the compute dtype: ``r`` of shape ``(..., m)`` and ``c``
of shape ``(..., n)``, already broadcast to the batch, with equal totals.

Note [Transport projection: dual and exact finish]
The projection ``P = argmin ||P - X||^2`` over ``T(r, c)`` has the KKT form
``P = max(X - a 1^T - 1 b^T, 0)``: ``(a, b)`` maximise the concave, piecewise
quadratic dual ``D(a, b) = -1/2 ||max(X - a - b, 0)||^2 - r.a - c.b``, whose gradient
is the marginal residual ``(P 1 - r, P^T 1 - c)``. The search, on detached float64
copies, alternates

* a block coordinate ascent sweep: with ``b`` fixed each row's ``a_i`` is a simplex
  threshold (the row of ``X - b`` projected onto the simplex of total ``r_i``), then
  each column's ``b_j`` likewise; after it every row and column with a positive sum
  has a non-empty support;
* a damped semismooth Newton step: on the support ``S = {X - a - b > 0}`` the dual's
  Hessian is ``-K_S``, ``K_S = [[diag(S 1), S], [S^T, diag(S^T 1)]]`` (the signless
  Laplacian of the bipartite graph ``S``); the direction solves
  ``(K_S + mu I) d = grad`` (``mu`` keeps it defined where ``K_S`` is singular: one
  null vector per connected component of ``S``) and the step is the best of
  ``t = 1, 1/2, ..., 2^-39`` and 0 by the dual's value, batched, so the dual never
  decreases. A component whose rows need another mass than its columns makes the
  direction large along its null vector (the dual is linear that way until a new
  entry joins the support), hence the long range of steps.

The finish is exact: on the support ``S`` of the current dual, the full Newton step
``z* = z + K_S^+ grad`` solves the reduced linear system (a regularised solve refined
to convergence; ``K_S^+ K_S`` is the projector off the null space, so each
component's free shift keeps the iterate's value, and isolated rows and columns,
which carry no mass, keep their thresholds). ``(a*, b*)`` is accepted when it
satisfies the KKT conditions to rounding: ``X - a* - b* >= -tol`` on ``S``,
``<= tol`` off ``S``, and the marginals of ``P = X - a* - b*`` on ``S`` within ``tol``
of ``(r, c)`` (the reduced system is consistent). Entries that may carry no mass
(``-inf``, or in a zero-sum row or column) never join ``S``.

Note [Transport projection: gradients]
The projection is piecewise linear. The accepted ``P`` is computed with autograd as
``where(S, X - a - b, 0)`` with ``(a, b) = z + K_S^+ (grad(X, r, c))`` and ``z``,
``K_S^+`` (a pseudo-inverse, ``eigh``) detached: its derivative is ``dP = dX_S - (da + db)`` with
``K_S (da, db) = (row sums of dX_S - dr, column sums of dX_S - dc)``, which is the
orthogonal projection of ``dX`` onto the tangent space
``{D supported on S: D 1 = 0, D^T 1 = 0}``, the Jacobian of the projection away
from kinks. Plain autograd ops give backward, double backward, forward mode and
``torch.func`` transforms; the search is not differentiated. One refinement from
the output itself, ``P <- P - K_S^+``-correction of its own marginal residual, makes
the sums exact at the scale of ``P`` rather than of ``X``; it moves ``P`` by a
rounding-sized amount and leaves the Jacobian as it is (``P`` is already on the
affine set).

Note [Transport projection: termination]
On eager CPU (where reading a tensor costs nothing) the search stops as soon as
every matrix of the batch passes the KKT check, after at most ``_EAGER_ITERS``
rounds. Elsewhere (other devices, ``torch.compile``, ``torch.func``, tracing) a fixed
schedule runs without host synchronisation: ``_FIXED_ITERS`` search rounds, then
``_FINISH_ROUNDS`` exact finishes, each failed one a primal-dual active set step
(the next support read from ``(a*, b*)``). A matrix that never passes the check (not seen in
the tests) gets the best dual's ``max(X - a - b, 0)`` rounded onto the set
(:func:`round_to_transport`): feasible to rounding, not exactly the projection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from sumto import _checks
from sumto._compat import eager

__all__ = [
    "SINKHORN_ITERS",
    "Marginal",
    "check_iters",
    "check_marginal",
    "check_marginals",
    "check_transport_input",
    "marginals",
    "project",
    "round_to_transport",
    "sinkhorn",
]

Marginal = float | int | Tensor

# Default Sinkhorn iterations: enough for logits of unit spread (each iteration
# contracts the row residual by a factor that worsens as exp(range of x) grows).
SINKHORN_ITERS = 50

# Search rounds (one sweep + one Newton step) on eager CPU at most, and on the fixed
# schedule; exact finishes at the end of the fixed schedule.
_EAGER_ITERS = 200
_FIXED_ITERS = 32
_FINISH_ROUNDS = 3
# Step sizes of the Newton line search: 1, 1/2, ..., 2^-(_STEPS - 1); a direction
# along an unbalanced component's null vector is of size 1 / mu.
_STEPS = 40
# Regularisation mu of the Newton systems (K_S has integer entries, its nonzero
# eigenvalues are at least about 1 / (m + n)^2).
_MU = 1e-6
# Refinements of the regularised solve in the exact finish.
_REFINE = 4
# Slack of the KKT check, in units of eps(dtype) * (m + n) * scale.
_KKT_SLACK = 64.0


def _wide_like(x: Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


# ---------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------


def check_transport_input(x: Tensor) -> None:
    """TypeError unless ``x`` is a floating point tensor, IndexError below 2 dims."""
    _checks.check_float_tensor(x)
    if x.ndim < 2:
        raise IndexError(
            f"expected x with at least 2 dims, (..., m, n) matrices, got {x.ndim} dims "
            f"(shape {tuple(x.shape)})"
        )


def check_iters(iters: object) -> int:
    """``iters`` as an int >= 1 (TypeError, ValueError)."""
    if isinstance(iters, bool) or not isinstance(iters, int):
        raise TypeError(f"expected iters to be an int, got {type(iters).__name__}")
    if iters < 1:
        raise ValueError(f"expected iters >= 1, got {iters}")
    return iters


def check_marginal(value: Marginal, name: str) -> None:
    """Type, finiteness and sign of a row or column sum (a sync for tensors, when readable)."""
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"expected {name} to be a real tensor, got dtype {value.dtype}")
        if value.is_meta or value.numel() == 0 or not _checks.readable(value):
            return
        v = value.detach()
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"expected finite {name}, got a tensor with non-finite values")
        if not bool((v >= 0).all()):
            raise ValueError(f"expected {name} >= 0, got a negative entry {float(v.min()):g}")
        return
    number = _checks.check_number(value, name)
    if not math.isfinite(number):
        raise ValueError(f"expected a finite {name}, got {value}")
    if number < 0:
        raise ValueError(f"expected {name} >= 0, got {value}")


def _marginal_shape(value: Marginal, batch: tuple[int, ...], size: int, name: str) -> None:
    if not isinstance(value, Tensor):
        return
    target = (*batch, size)
    try:
        fits = torch.broadcast_shapes(tuple(value.shape), target) == target  # type: ignore[no-untyped-call]
    except RuntimeError:
        fits = False
    if not fits:
        axis = "row" if name == "row_sums" else "column"
        raise ValueError(
            f"expected {name} broadcastable to {target} (the batch shape and one sum per "
            f"{axis}), got shape {tuple(value.shape)}"
        )


def check_marginals(
    row_sums: Marginal, col_sums: Marginal, shape: Sequence[int], dtype: torch.dtype
) -> None:
    """Validate the sums against a ``(..., m, n)`` shape: types, signs, shapes, equal totals.

    Raises:
        TypeError: If a sum has the wrong type.
        IndexError: If ``shape`` has fewer than 2 dims.
        ValueError: If a sum is negative or not finite, a tensor does not broadcast,
            or the row and column totals differ beyond the rounding of ``dtype``.
    """
    check_marginal(row_sums, "row_sums")
    check_marginal(col_sums, "col_sums")
    if len(shape) < 2:
        raise IndexError(
            f"expected at least 2 dims, (..., m, n) matrices, got shape {tuple(shape)}"
        )
    *batch_list, m, n = shape
    batch = tuple(batch_list)
    _marginal_shape(row_sums, batch, m, "row_sums")
    _marginal_shape(col_sums, batch, n, "col_sums")
    readable = [v for v in (row_sums, col_sums) if isinstance(v, Tensor)]
    if any(v.is_meta or not _checks.readable(v) for v in readable):
        return
    if math.prod(shape) == 0:
        return
    eps = max(
        [torch.finfo(_checks.compute_dtype(dtype)).eps]
        + [torch.finfo(v.dtype).eps for v in readable if v.dtype.is_floating_point]
    )
    if not isinstance(row_sums, Tensor) and not isinstance(col_sums, Tensor):
        # Plain Python: no tensor op, so no graph break under compile.
        tr, tc = float(row_sums) * m, float(col_sums) * n
        if not abs(tr - tc) <= 4.0 * (m + n) * eps * max(abs(tr), abs(tc)):
            raise ValueError(
                f"expected row and column sums with equal totals (a plan moves the same mass "
                f"out of the rows as into the columns), got sum(row_sums) = {tr:g} and "
                f"sum(col_sums) = {tc:g} for {m}x{n} matrices (e.g. col_sums={tr / n:g} "
                f"for row_sums={float(row_sums):g})"
            )
        return
    wide = torch.float64

    def totals(value: Marginal, size: int) -> Tensor:
        if isinstance(value, Tensor):
            t = value.detach().to(device="cpu", dtype=wide)
            return t.expand(*batch, size).sum(-1)
        return torch.full(batch, float(value) * size, dtype=wide)

    total_r, total_c = totals(row_sums, m), totals(col_sums, n)
    tol = 4.0 * (m + n) * eps * torch.maximum(total_r.abs(), total_c.abs())
    gap = (total_r - total_c).abs()
    if not bool((gap <= tol).all()):
        worst = int(torch.argmax(gap - tol))
        tr, tc = float(total_r.reshape(-1)[worst]), float(total_c.reshape(-1)[worst])
        raise ValueError(
            f"expected row and column sums with equal totals (a plan moves the same mass "
            f"out of the rows as into the columns), got sum(row_sums) = {tr:g} and "
            f"sum(col_sums) = {tc:g} for {m}x{n} matrices"
        )


def marginals(row_sums: Marginal, col_sums: Marginal, like: Tensor) -> tuple[Tensor, Tensor]:
    """The sums as tensors of ``like``'s dtype and device, of shapes ``(..., m)`` and ``(..., n)``.

    No validation and no host synchronisation (``like`` is ``(..., m, n)``).
    """
    *batch, m, n = like.shape

    def expand(value: Marginal, size: int) -> Tensor:
        if isinstance(value, Tensor):
            return value.to(device=like.device, dtype=like.dtype).expand(*batch, size)
        return like.new_full((*batch, size), float(value))

    return expand(row_sums, m), expand(col_sums, n)


# ---------------------------------------------------------------------------
# rounding onto the set
# ---------------------------------------------------------------------------


def round_to_transport(p: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """A plan with marginals ``(r, c)`` near a non-negative ``p`` (Altschuler et al., 2017).

    Rows above their target are scaled down to it, then columns; the remaining
    deficits ``e_r = r - P 1 >= 0`` and ``e_c = c - P^T 1 >= 0`` (equal totals) are
    added as ``e_r e_c^T / sum(e_r)``. The result is non-negative with the exact
    marginals (to rounding) and moves ``p`` by at most about twice its marginal
    residual. Zero rows and columns stay zero when their targets are zero.

    Args:
        p: Non-negative ``(..., m, n)``.
        r: Row targets ``(..., m)``, non-negative.
        c: Column targets ``(..., n)``, non-negative, with ``sum(r) == sum(c)``.
    """
    rows = p.sum(-1)
    scale_r = torch.where(rows > r, r / torch.where(rows > 0, rows, 1.0), 1.0)
    p = p * scale_r.unsqueeze(-1)
    cols = p.sum(-2)
    scale_c = torch.where(cols > c, c / torch.where(cols > 0, cols, 1.0), 1.0)
    p = p * scale_c.unsqueeze(-2)
    err_r = (r - p.sum(-1)).clamp_min(0.0)
    err_c = (c - p.sum(-2)).clamp_min(0.0)
    mass = err_r.sum(-1, keepdim=True)
    fill = err_r / torch.where(mass > 0, mass, 1.0)
    return p + fill.unsqueeze(-1) * err_c.unsqueeze(-2)


# ---------------------------------------------------------------------------
# the projection: search (detached)
# ---------------------------------------------------------------------------


def _thresholds(v: Tensor, total: Tensor) -> Tensor:
    """``tau`` of shape ``(..., k)`` with ``sum_j max(v[..., k, j] - tau, 0) = total``.

    A sort-based simplex threshold per row; for a zero total, the row's max.
    """
    n = v.shape[-1]
    u = v.sort(-1, descending=True).values
    ks = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    candidates = (u.cumsum(-1) - total.unsqueeze(-1)) / ks
    support = torch.where(u > candidates, ks, 1.0).amax(-1, keepdim=True)
    return candidates.gather(-1, support.long() - 1).squeeze(-1)


def _sweep(x: Tensor, r: Tensor, c: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """One block coordinate ascent sweep: every row's threshold, then every column's."""
    a = _thresholds(x - b.unsqueeze(-2), r)
    b = _thresholds((x - a.unsqueeze(-1)).mT, c)
    return a, b


def _residual(y: Tensor, r: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``P = max(y, 0)`` and the dual gradient ``(P 1 - r, P^T 1 - c)``, concatenated."""
    p = y.clamp_min(0.0)
    return p, torch.cat([p.sum(-1) - r, p.sum(-2) - c], -1)


def _laplacian_of(s: Tensor) -> Tensor:
    """``K_S = [[diag(S 1), S], [S^T, diag(S^T 1)]]`` of a 0/1 float ``(..., m, n)`` support."""
    top = torch.cat([torch.diag_embed(s.sum(-1)), s], -1)
    bottom = torch.cat([s.mT, torch.diag_embed(s.sum(-2))], -1)
    return torch.cat([top, bottom], -2)


def _split(z: Tensor, m: int) -> tuple[Tensor, Tensor]:
    return z[..., :m], z[..., m:]


def _shifted(x: Tensor, z: Tensor, m: int) -> Tensor:
    a, b = _split(z, m)
    return x - a.unsqueeze(-1) - b.unsqueeze(-2)


def _dual(y: Tensor, z: Tensor, rc: Tensor) -> Tensor:
    """The dual objective at ``z`` (``y = X - a - b``), up to a constant."""
    return -0.5 * y.clamp_min(0.0).square().sum((-2, -1)) - (rc * z).sum(-1)


def _factor(support: Tensor) -> tuple[Tensor, Tensor]:
    """``K_S`` of a boolean support and the Cholesky factor of ``K_S + mu I``."""
    k = _laplacian_of(support.to(torch.float64 if support.device.type != "mps" else torch.float32))
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    chol, _ = torch.linalg.cholesky_ex(k + _MU * eye)
    return k, chol


def _solve(k: Tensor, chol: Tensor, v: Tensor, refine: int) -> Tensor:
    """``(K_S + mu I)^-1 v`` refined ``refine`` times towards a solution of ``K_S d = v``.

    For ``v`` in the range of ``K_S`` each refinement shrinks the error by
    ``mu / (lambda + mu)`` for every eigenvalue ``lambda > 0``; the null space part of
    ``v`` (a component of ``S`` whose rows and columns need different masses) is
    amplified by ``1 / mu``, which the line search of :func:`_newton` damps.
    """
    d = torch.cholesky_solve(v.unsqueeze(-1), chol)
    for _ in range(refine):
        d = d + torch.cholesky_solve(v.unsqueeze(-1) - k @ d, chol)
    return d.squeeze(-1)


def _newton(x: Tensor, z: Tensor, rc: Tensor, m: int, allowed: Tensor) -> Tensor:
    """One damped semismooth Newton step on the dual, with a batched backtracking search."""
    y = _shifted(x, z, m)
    _, grad = _residual(y, rc[..., :m], rc[..., m:])
    k, chol = _factor((y > 0) & allowed)
    d = _solve(k, chol, grad, 0)
    steps = 0.5 ** torch.arange(_STEPS, dtype=x.dtype, device=x.device)
    steps = steps.view(-1, *([1] * z.ndim))
    trial = z + steps * d  # (steps, ..., m + n)
    values = _dual(_shifted(x, trial, m), trial, rc)
    current = _dual(y, z, rc)
    best = values.argmax(0)
    chosen = trial.gather(0, best.unsqueeze(0).unsqueeze(-1).expand(1, *z.shape)).squeeze(0)
    better = values.amax(0) > current
    # NaN directions (a failed factorisation) are never chosen: NaN > current is False.
    return torch.where(better.unsqueeze(-1), chosen, z)


def _finish(
    x: Tensor, z: Tensor, rc: Tensor, m: int, allowed: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The exact step on the support of ``z`` and its check: ``(z*, support, kkt_ok)``."""
    y = _shifted(x, z, m)
    # A zero-sum row's threshold is its max: rounding can leave that entry a hair above 0.
    support = (y > 0) & allowed
    _, grad = _residual(y, rc[..., :m], rc[..., m:])
    k, chol = _factor(support)
    exact = z + _solve(k, chol, grad, _REFINE)
    y_exact = _shifted(x, exact, m)
    scale = x.abs().amax((-2, -1)) + rc.abs().amax(-1)
    tol = _KKT_SLACK * (x.shape[-2] + x.shape[-1]) * torch.finfo(x.dtype).eps * scale
    tol = tol.unsqueeze(-1).unsqueeze(-1)
    primal = torch.where(support, y_exact >= -tol, True).all(-1).all(-1)
    dual = torch.where(support, True, y_exact <= tol).all(-1).all(-1)
    # An unbalanced component of S (its rows' targets differ from its columns') makes
    # the reduced system inconsistent: no exact step exists on S.
    _, marginals = _residual(torch.where(support, y_exact, 0.0), rc[..., :m], rc[..., m:])
    balanced = (marginals.abs() <= tol.squeeze(-1)).all(-1)
    return exact, support, primal & dual & balanced


def _keep(ok: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where the batch flag ``ok`` is set, ``old`` elsewhere."""
    return torch.where(ok.view(*ok.shape, *([1] * (new.ndim - ok.ndim))), new, old)


def _forbidden_free(x: Tensor, total: Tensor, allowed: Tensor) -> Tensor:
    """``x`` with entries not ``allowed`` replaced by a finite value low enough to get no mass.

    Not allowed: ``-inf`` entries (forbidden pairs) and the entries of zero-sum rows
    and columns.

    Any dual solution on the finite entries has ``a_i + b_j`` within
    ``(m + n) * (range(x) + total)`` of the finite entries (a support path has at most
    ``m + n`` edges), so an entry that far below the smallest finite one stays at 0.
    """
    finite = torch.isfinite(x)
    low = torch.where(finite, x, torch.inf).amin((-2, -1), keepdim=True)
    high = torch.where(finite, x, -torch.inf).amax((-2, -1), keepdim=True)
    low = torch.where(torch.isfinite(low), low, 0.0)
    high = torch.where(torch.isfinite(high), high, 0.0)
    span = (x.shape[-2] + x.shape[-1] + 1) * (high - low + total.view(*total.shape, 1, 1)) + 1.0
    return torch.where(allowed, x, low - span)


def _search(x: Tensor, r: Tensor, c: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Detached search: ``(z, support, ok)`` of the accepted exact step per matrix.

    Where ``ok`` is False, ``z`` is the best dual found and ``support`` its support
    (Note [Transport projection: termination]).
    """
    m = x.shape[-2]
    rc = torch.cat([r, c], -1)
    a, b = _sweep(x, r, c, torch.zeros_like(c))
    z = torch.cat([a, b], -1)
    ok = torch.zeros(x.shape[:-2], dtype=torch.bool, device=x.device)
    found_z, found_support = z, torch.zeros_like(x, dtype=torch.bool)

    def accept(exact: Tensor, support: Tensor, passed: Tensor) -> None:
        nonlocal ok, found_z, found_support
        new = passed & ~ok
        found_z = _keep(new, exact, found_z)
        found_support = _keep(new, support, found_support)
        ok = ok | passed

    if eager(x):
        for _ in range(_EAGER_ITERS):
            z = _newton(x, z, rc, m, allowed)
            accept(*_finish(x, z, rc, m, allowed))
            if bool(ok.all()):
                return found_z, found_support, ok
            a, b = _sweep(x, r, c, z[..., m:])
            z = torch.cat([a, b], -1)
    else:
        for _ in range(_FIXED_ITERS):
            z = _newton(x, z, rc, m, allowed)
            a, b = _sweep(x, r, c, z[..., m:])
            z = torch.cat([a, b], -1)
        z = _newton(x, z, rc, m, allowed)
        for _ in range(_FINISH_ROUNDS):
            exact, support, passed = _finish(x, z, rc, m, allowed)
            accept(exact, support, passed)
            z = torch.where(torch.isfinite(exact).all(-1, keepdim=True), exact, z)
    fallback_support = (_shifted(x, z, m) > 0) & allowed
    return _keep(ok, found_z, z), _keep(ok, found_support, fallback_support), ok


# ---------------------------------------------------------------------------
# the projection: assembly (differentiable)
# ---------------------------------------------------------------------------


def project(x: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """Euclidean projection of ``(..., m, n)`` matrices onto ``T(r, c)``.

    ``x`` is finite or ``-inf``; ``r`` and ``c`` have the batch shape of ``x`` and
    equal totals. Computed in float64 (float32 on MPS) and returned in ``x``'s dtype.
    See Note [Transport projection: dual and exact finish].
    """
    wide = _wide_like(x)
    xw, rw, cw = x.to(wide), r.to(wide), c.to(wide)
    m = x.shape[-2]
    total = rw.detach().sum(-1)
    allowed = (xw.detach() > -torch.inf) & (rw.detach() > 0).unsqueeze(-1)
    allowed = allowed & (cw.detach() > 0).unsqueeze(-2)
    xs = _forbidden_free(xw.detach(), total, allowed)
    z, support, ok = _search(xs, rw.detach(), cw.detach(), allowed)
    pinv = torch.linalg.pinv(_laplacian_of(support.to(wide)), hermitian=True)
    # Note [Transport projection: gradients]: the exact step again, differentiably.
    xg = torch.where(allowed, xw, xs)
    y = _shifted(xg, z, m)
    inside = torch.where(support, y, 0.0)
    grad = torch.cat([inside.sum(-1) - rw, inside.sum(-2) - cw], -1)
    exact = z + (pinv @ grad.unsqueeze(-1)).squeeze(-1)
    p = torch.where(support, _shifted(xg, exact, m), 0.0)
    # One refinement from the output itself: sums exact at the output's scale.
    residual = torch.cat([p.sum(-1) - rw, p.sum(-2) - cw], -1)
    da, db = _split((pinv @ residual.unsqueeze(-1)).squeeze(-1), m)
    p = torch.where(support, p - da.unsqueeze(-1) - db.unsqueeze(-2), 0.0)
    p = p.clamp_min(0.0)
    fallback = round_to_transport(
        torch.where(allowed, _shifted(xg, z, m), 0.0).clamp_min(0.0), rw, cw
    )
    return _keep(ok, p, fallback).to(x.dtype)


# ---------------------------------------------------------------------------
# Sinkhorn
# ---------------------------------------------------------------------------


def sinkhorn(x: Tensor, r: Tensor, c: Tensor, iters: int, tol: float | None) -> Tensor:
    """Log-domain Sinkhorn scaling of ``exp(x)`` to row sums ``r`` and column sums ``c``.

    ``f = log r - logsumexp(x + g)`` over columns, then ``g = log c - logsumexp(x + f)``
    over rows, ``iters`` times (a column update last, so column sums are exact to
    rounding); with ``tol``, it stops once the row sums are within ``tol`` (a host
    sync per iteration).

    Entries that can carry no mass (``-inf``, or in a row or column whose sum is 0)
    are set to ``-inf`` once, before the loop; a row or column left without any
    such entry is "dead": its input is replaced by zeros and its target by 1, so every
    logsumexp has a finite argument and a finite gradient (an all ``-inf`` logsumexp
    has a NaN gradient), while its entries of the result stay exactly 0.
    """
    alive = (x > -torch.inf) & (r > 0).unsqueeze(-1) & (c > 0).unsqueeze(-2)
    live_rows = alive.any(-1, keepdim=True)
    live_cols = alive.any(-2, keepdim=True)
    masked = torch.where(alive, x, -torch.inf)
    for_rows = torch.where(live_rows, masked, 0.0)
    for_cols = torch.where(live_cols, masked, 0.0)
    log_r = torch.where(live_rows.squeeze(-1), r, 1.0).log()
    log_c = torch.where(live_cols.squeeze(-2), c, 1.0).log()
    f = torch.zeros_like(r)
    g = torch.zeros_like(c)
    for _ in range(iters):
        f = log_r - torch.logsumexp(for_rows + g.unsqueeze(-2), -1)
        g = log_c - torch.logsumexp(for_cols + f.unsqueeze(-1), -2)
        if tol is not None:
            rows = (masked + f.unsqueeze(-1) + g.unsqueeze(-2)).exp().sum(-1)
            if not bool(((rows - r).abs() > tol).any()):
                break
    return (masked + f.unsqueeze(-1) + g.unsqueeze(-2)).exp()
