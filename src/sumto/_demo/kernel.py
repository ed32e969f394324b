"""Kernel experiment: recover a sharpening kernel with negative entries that sums to 1.

Three parametrizations of the same ``Conv2d(1, 1, 3)`` weight, trained from the same
random initialisation on the same images:

* ``sumto.sum_to``: any sign, sum 1 (the target is in this set);
* ``sumto.simplex`` (softmax): non-negative, sum 1 (the target is not: the best it
  can do has a centre of at most 1 instead of 5);
* the naive ``w / w.sum()``, which can represent the target but has a pole where
  the raw weights sum to 0.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

import sumto
from sumto._demo.data import TARGET_KERNEL, images
from sumto._demo.optimum import simplex_least_squares

__all__ = ["run_kernel"]

LEARNING_RATE = 0.1
RESTARTS = 8  # extra random initialisations of the naive normalisation


class _DivideBySum(nn.Module):
    """The naive normalisation ``w / w.sum()`` as a parametrization (no safeguard)."""

    def forward(self, x: Tensor) -> Tensor:
        return x / x.sum()


def _conv(seed: int, approach: str) -> nn.Conv2d:
    torch.manual_seed(seed)  # the same raw initialisation for every approach
    conv = nn.Conv2d(1, 1, 3, bias=False)
    if approach == "sum_to":
        sumto.sum_to(conv)
    elif approach == "softmax":
        sumto.simplex(conv)
    else:
        parametrize.register_parametrization(conv, "weight", _DivideBySum())
    return conv


def _train(conv: nn.Conv2d, x: Tensor, y: Tensor, steps: int, bar: Any) -> dict[str, Any]:
    """Full-batch Adam on the MSE; stops at the first non-finite loss."""
    opt = torch.optim.Adam(conv.parameters(), lr=LEARNING_RATE)
    plists: Any = conv.parametrizations
    raw: Tensor = plists["weight"].original
    losses: list[float] = []
    raw_sums: list[float] = []
    first_non_finite: int | None = None
    for step in range(steps):
        raw_sums.append(float(raw.detach().sum()))
        loss = F.mse_loss(conv(x), y)
        losses.append(float(loss.detach()))  # logged every step for the loss curves
        if not math.isfinite(losses[-1]):
            first_non_finite = step
            bar.update(steps - step)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        bar.update(1)
    with torch.no_grad():
        kernel = conv.weight.detach()[0, 0].double()
    finite = bool(torch.isfinite(kernel).all())
    target = torch.tensor(TARGET_KERNEL, dtype=torch.float64)
    return {
        "kernel": kernel,
        "losses": losses,
        "raw_sums": raw_sums,
        "first_non_finite": first_non_finite,
        "max_abs_error": float((kernel - target).abs().max()) if finite else math.nan,
    }


def _naive_summary(run: dict[str, Any], restarts: list[dict[str, Any]], zero_init: str) -> str:
    """Plain-words account of what the divide-by-sum normalisation did (from the data)."""
    losses = run["losses"]
    if run["first_non_finite"] is not None:
        text = f"diverged at step {run['first_non_finite']}: non-finite loss"
    else:
        peak = max(losses)
        closest = min(abs(s) for s in run["raw_sums"])
        text = (
            f"no NaN in {len(losses)} steps; final max abs error {run['max_abs_error']:.3g} "
            f"(final loss {losses[-1]:.3g}); the loss peaked at {peak:.3g} "
            f"({peak / losses[0]:.1f}x its initial value) and sum(w) came within "
            f"{closest:.2g} of the pole at 0"
        )
    errors = [r["max_abs_error"] for r in restarts if math.isfinite(r["max_abs_error"])]
    failed = [r for r in restarts if not r["max_abs_error"] <= 1.0]
    one_sign = sum(
        1 for r in failed if bool((r["kernel"] >= 0).all()) or bool((r["kernel"] <= 0).all())
    )
    text += (
        f". {len(failed)} of {len(restarts)} other random initialisations ended with max abs "
        f"error > 1 or a non-finite kernel ({one_sign} of them with all weights of one sign)"
    )
    if errors:
        text += f", median finite error {statistics.median(errors):.3g}"
    return text + f". From a zero initialisation: {zero_init}."


def _zero_init_outcome(x: Tensor) -> str:
    """What ``w / w.sum()`` gives for zero-initialised weights (sum_to gives 1/9 each)."""
    conv = nn.Conv2d(1, 1, 3, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
    parametrize.register_parametrization(conv, "weight", _DivideBySum())
    with torch.no_grad():
        out = conv(x)
    if bool(torch.isnan(out).all()):
        return "0/0 = NaN output at step 0"
    if not bool(torch.isfinite(out).all()):
        return "non-finite output at step 0"
    return "finite output"


def _simplex_optimum(x: Tensor, y: Tensor) -> dict[str, Any]:
    """The best non-negative kernel summing to 1 (float64 least squares on the simplex)."""
    patches = F.unfold(x.double(), 3).transpose(1, 2).reshape(-1, 9)
    values = y.double().reshape(-1)
    gram = patches.T @ patches / values.numel()
    rhs = patches.T @ values / values.numel()
    return simplex_least_squares(gram, rhs)


def run_kernel(seed: int, steps: int, bar_factory: Any) -> dict[str, Any]:
    """Train the three approaches; returns the results and the curves for the figures."""
    g = torch.Generator().manual_seed(seed)
    x = images(g)
    target = torch.tensor(TARGET_KERNEL)
    y = F.conv2d(x, target.view(1, 1, 3, 3))
    bar = bar_factory((3 + RESTARTS) * steps, "2/5 kernel")
    try:
        runs = {name: _train(_conv(seed, name), x, y, steps, bar) for name in ("sum_to", "softmax")}
        runs["naive"] = _train(_conv(seed, "naive"), x, y, steps, bar)
        restarts = [_train(_conv(seed + 1 + r, "naive"), x, y, steps, bar) for r in range(RESTARTS)]
    finally:
        bar.close()
    best_simplex = _simplex_optimum(x, y)["weights"].view(3, 3)
    # the lowest training MSE any simplex kernel reaches: the floor of the softmax curve
    best_simplex_loss = float(
        F.mse_loss(F.conv2d(x.double(), best_simplex.view(1, 1, 3, 3)), y.double())
    )
    naive = runs["naive"]
    naive_kernel = naive["kernel"]
    naive_finite = bool(torch.isfinite(naive_kernel).all())
    return {
        "summary": {
            "target": [list(row) for row in TARGET_KERNEL],
            "learned": runs["sum_to"]["kernel"].tolist(),
            "max_abs_error": runs["sum_to"]["max_abs_error"],
            "final_loss": runs["sum_to"]["losses"][-1],
            "softmax_learned": runs["softmax"]["kernel"].tolist(),
            "softmax_max_abs_error": runs["softmax"]["max_abs_error"],
            "softmax_final_loss": runs["softmax"]["losses"][-1],
            "simplex_optimum": best_simplex.tolist(),
            "simplex_optimum_loss": best_simplex_loss,
            "simplex_optimum_max_abs_error": float(
                (best_simplex - torch.tensor(TARGET_KERNEL, dtype=torch.float64)).abs().max()
            ),
            "naive_normalise": _naive_summary(naive, restarts, _zero_init_outcome(x)),
            "naive_learned": naive_kernel.tolist() if naive_finite else None,
            "naive_max_abs_error": naive["max_abs_error"] if naive_finite else None,
            "naive_first_non_finite_step": naive["first_non_finite"],
            "naive_final_loss": naive["losses"][-1],
            "naive_restart_max_abs_errors": [r["max_abs_error"] for r in restarts],
            "images": int(x.shape[0]),
            "image_size": int(x.shape[-1]),
            "steps": steps,
        },
        "curves": {name: run["losses"] for name, run in runs.items()},
        "kernels": {name: run["kernel"] for name, run in runs.items()},
    }
