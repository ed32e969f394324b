"""Exact simplex-constrained least squares in float64, with sumto's own projection.

Solves ``min_w 0.5 w^T G w - b^T w`` subject to ``w >= 0, sum(w) = 1`` (``G`` positive
semi-definite): projected gradient descent with
:func:`sumto.functional.project_simplex` identifies the support, a linear solve of the
KKT system on that support removes the last rounding error, and the KKT conditions
are checked on the result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sumto.functional import project_simplex

__all__ = ["simplex_least_squares"]


def _kkt_residual(gram: Tensor, rhs: Tensor, w: Tensor) -> float:
    """Largest violation of the KKT conditions of the simplex least-squares problem.

    With gradient ``g = G w - b`` and multiplier ``lam`` (mean of ``g`` on the support):
    ``g_i = lam`` on the support, ``g_i >= lam`` off it, ``w >= 0`` and ``sum(w) = 1``.
    """
    grad = gram @ w - rhs
    support = w > 0
    lam = grad[support].mean()
    on = (grad[support] - lam).abs().max()
    off = (lam - grad[~support]).clamp_min(0.0).max() if bool((~support).any()) else on * 0
    feasibility = torch.maximum((-w).clamp_min(0.0).max(), (w.sum() - 1.0).abs())
    return float(torch.stack([on, off, feasibility]).max()) + 0.0  # no -0.0


def _polish(gram: Tensor, rhs: Tensor, w: Tensor) -> Tensor:
    """Solve the equality-constrained problem on the support of ``w`` exactly."""
    support = torch.nonzero(w > 0).flatten()
    n = support.numel()
    system = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    system[:n, :n] = gram[support][:, support]
    system[:n, n] = 1.0
    system[n, :n] = 1.0
    right = torch.cat([rhs[support], torch.ones(1, dtype=torch.float64)])
    solution = torch.linalg.lstsq(system, right.unsqueeze(1)).solution.flatten()
    polished = torch.zeros_like(w)
    polished[support] = solution[:n]
    return polished


def simplex_least_squares(
    gram: Tensor, rhs: Tensor, tol: float = 1e-13, max_iter: int = 200_000
) -> dict[str, Any]:
    """Minimise ``0.5 w^T G w - b^T w`` over the probability simplex, in float64.

    Every 100 projected gradient steps (and at the end) the current support is
    polished by an exact KKT solve; the loop stops once the polished point satisfies
    the KKT conditions to ``tol`` (relative to the scale of ``b``) or the steps stall.

    Args:
        gram: ``(K, K)`` positive semi-definite matrix ``G``.
        rhs: ``(K,)`` vector ``b``.
        tol: Relative KKT tolerance, and the step size below which descent stops.
        max_iter: Iteration cap of the projected gradient descent.

    Returns:
        ``{"weights": (K,) float64, "iterations": int, "kkt_residual": float}``.
    """
    gram = gram.double()
    rhs = rhs.double()
    k = rhs.numel()
    scale = float(rhs.abs().max()) + float(gram.abs().max())
    step = 1.0 / float(torch.linalg.eigvalsh(gram).max())
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    best, best_residual, iterations = w, _kkt_residual(gram, rhs, w), 0
    for it in range(1, max_iter + 1):
        new = project_simplex(w - step * (gram @ w - rhs))
        stalled = float((new - w).abs().max()) <= tol
        w = new
        if it % 100 == 0 or stalled or it == max_iter:
            iterations = it
            for candidate in (w, _polish(gram, rhs, w)):
                residual = _kkt_residual(gram, rhs, candidate)
                if bool((candidate >= 0).all()) and residual < best_residual:
                    best, best_residual = candidate, residual
            if best_residual <= tol * scale or stalled:
                break
    return {"weights": best, "iterations": iterations, "kkt_residual": best_residual}
