"""Fusion experiments: learn ``sumto.WeightedSum`` simplex weights.

* ``run_fusion``: K noisy sources and a target that is a known convex mixture of
  them; the learned weights are compared with the exact simplex-constrained
  least-squares optimum (float64, :mod:`sumto._demo.optimum`).
* ``run_missing``: noisy views of a latent signal with one view dropped per sample
  through ``mask``. With independent noise of standard deviations ``s_k`` the best
  unbiased fusion of any subset of views weights them by ``1 / s_k^2`` renormalised
  over the subset, which is what ``WeightedSum`` does with a mask, so one weight
  vector serves every subset. The learned weights are compared with the exact
  minimiser of the same training objective (float64 L-BFGS, written without
  ``WeightedSum``) and with the inverse-variance weights; a second model fed
  zero-filled inputs without a mask shows what the mask avoids.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

import sumto
from sumto._demo.data import fusion_sources, modalities
from sumto._demo.optimum import simplex_least_squares

__all__ = ["MIXTURE", "NOISE_STD", "run_fusion", "run_missing"]

MIXTURE = (0.45, 0.25, 0.15, 0.1, 0.05)
NOISE_STD = (0.4, 0.8, 1.2)
LEARNING_RATE = 0.05
SAMPLES = 4096


def _train(module: Any, loss_fn: Any, steps: int, bar: Any) -> tuple[Tensor, list[float]]:
    """Full-batch Adam; returns the weight trajectory ``(steps + 1, K)`` and the losses."""
    opt = torch.optim.Adam(module.parameters(), lr=LEARNING_RATE)
    trajectory = [module.weights.detach().clone()]
    losses: list[float] = []
    for _ in range(steps):
        loss = loss_fn()
        losses.append(float(loss.detach()))  # logged every step for the report
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        trajectory.append(module.weights.detach().clone())
        bar.update(1)
    return torch.stack(trajectory).double(), losses


def run_fusion(seed: int, steps: int, bar_factory: Any) -> dict[str, Any]:
    """Learn simplex weights of a known convex mixture and compare with the optimum."""
    g = torch.Generator().manual_seed(seed)
    sources, target = fusion_sources(g, MIXTURE, length=SAMPLES)
    gram = sources @ sources.T / target.numel()
    rhs = sources @ target / target.numel()
    optimum = simplex_least_squares(gram, rhs)
    torch.manual_seed(seed)
    module = sumto.WeightedSum(len(MIXTURE), weights="simplex")
    x, y = sources.float(), target.float()
    bar = bar_factory(steps, "1/5 fusion")
    try:
        trajectory, losses = _train(module, lambda: F.mse_loss(module(x), y), steps, bar)
    finally:
        bar.close()
    learned = trajectory[-1]
    optimal: Tensor = optimum["weights"]
    return {
        "summary": {
            "true_mixture": list(MIXTURE),
            "learned": learned.tolist(),
            "optimal": optimal.tolist(),
            "max_abs_error": float((learned - optimal).abs().max()),
            "optimum_iterations": optimum["iterations"],
            "optimum_kkt_residual": optimum["kkt_residual"],
            "final_loss": losses[-1] if losses else None,
            "sources": len(MIXTURE),
            "samples": SAMPLES,
            "steps": steps,
        },
        "trajectory": trajectory,
        "optimal": optimal,
    }


def _renormalised_fusion(weights: Tensor, views: Tensor, mask: Tensor) -> Tensor:
    """Per-row renormalised fusion in float64, written directly (no WeightedSum)."""
    w = weights.double().unsqueeze(0) * mask.double()  # (B, K)
    w = w / w.sum(1, keepdim=True)
    return torch.einsum("bk,kbd->bd", w, views.double())


def _mse(weights: Tensor, views: Tensor, latent: Tensor, mask: Tensor) -> Tensor:
    return ((_renormalised_fusion(weights, views, mask) - latent.double()) ** 2).mean()


def _masked_optimum(views: Tensor, latent: Tensor, mask: Tensor) -> Tensor:
    """The exact minimiser of the training objective, by float64 L-BFGS over logits.

    The optimum is interior (every view is informative), so logits reach it.
    """
    logits = torch.zeros(views.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [logits],
        max_iter=1000,
        tolerance_grad=1e-15,
        tolerance_change=1e-18,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _mse(torch.softmax(logits, 0), views, latent, mask)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return torch.softmax(logits.detach(), 0)


def run_missing(seed: int, steps: int, bar_factory: Any) -> dict[str, Any]:
    """Learn fusion weights with one view missing per sample, through ``mask``."""
    g = torch.Generator().manual_seed(seed + 1)
    views, latent, mask = modalities(g, NOISE_STD, SAMPLES)
    test_views, test_latent, test_mask = modalities(g, NOISE_STD, SAMPLES)
    precision = 1.0 / torch.tensor(NOISE_STD, dtype=torch.float64) ** 2
    inverse_variance = precision / precision.sum()
    optimal = _masked_optimum(views, latent, mask)
    k = len(NOISE_STD)
    torch.manual_seed(seed)
    masked = sumto.WeightedSum(k, weights="simplex")
    zero_filled = sumto.WeightedSum(k, weights="simplex")
    filled = views * mask.T.unsqueeze(-1)  # absent views replaced by zeros
    bar = bar_factory(2 * steps, "3/5 missing inputs")
    try:
        trajectory, losses = _train(
            masked, lambda: F.mse_loss(masked(views, mask=mask), latent), steps, bar
        )
        zero_trajectory, _ = _train(
            zero_filled, lambda: F.mse_loss(zero_filled(filled), latent), steps, bar
        )
    finally:
        bar.close()
    learned = trajectory[-1]
    test_filled = test_views * test_mask.T.unsqueeze(-1)
    with torch.no_grad():
        zero_fill_mse = float(F.mse_loss(zero_filled(test_filled).double(), test_latent.double()))
        masked_mse = float(
            F.mse_loss(masked(test_views, mask=test_mask).double(), test_latent.double())
        )
    return {
        "summary": {
            "noise_std": list(NOISE_STD),
            "learned": learned.tolist(),
            "optimal": optimal.tolist(),
            "max_abs_error": float((learned - optimal).abs().max()),
            "inverse_variance": inverse_variance.tolist(),
            "zero_fill_learned": zero_trajectory[-1].tolist(),
            "test_mse_masked": masked_mse,
            "test_mse_zero_fill": zero_fill_mse,
            "test_mse_inverse_variance": float(
                _mse(inverse_variance, test_views, test_latent, test_mask)
            ),
            "final_loss": losses[-1] if losses else None,
            "dropped_per_sample": 1,
            "samples": SAMPLES,
            "steps": steps,
        },
        "trajectory": trajectory,
        "optimal": optimal,
        "inverse_variance": inverse_variance,
    }
