"""A varying number of inputs per call: names and masks instead of re-created parameters.

A popular recipe re-creates the weight parameter inside ``forward`` whenever the
number of inputs changes. That silently detaches it from the optimizer (often built
when the module had no parameters at all) and throws away what was learned.

Here the set of possible inputs is fixed up front with ``names``; each call passes
the inputs it has: a dict with a subset of the names, or all of them with a per-row
``mask`` of availability. Absent inputs get weight 0 and the present weights are
renormalised, so one parameter, created once, is trained by every batch.

Run: ``.venv/bin/python examples/weighted_sum_varying_inputs.py [--steps N]``
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

import sumto

SENSORS = ("camera", "lidar", "radar")
TRUE_WEIGHTS = torch.tensor([0.6, 0.3, 0.1])


def target_for(readings: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
    """Ground truth: the true weights renormalised over the sensors present in each row."""
    weights = TRUE_WEIGHTS * present  # (batch, K)
    weights = weights / weights.sum(1, keepdim=True)
    stacked = torch.stack([readings[name] for name in SENSORS], 1)  # (batch, K, features)
    return (weights.unsqueeze(-1) * stacked).sum(1)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train with a different set of inputs per call; returns the final weight error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    fusion = sumto.WeightedSum(names=SENSORS)  # K = 3, fixed before training
    optimizer = torch.optim.Adam(fusion.parameters(), lr=0.05)  # sees the real parameter
    pre_weights = fusion.parametrizations.weights.original

    batch, features = 16, 8
    for step in range(args.steps):
        readings = {name: torch.randn(batch, features) for name in SENSORS}
        if step % 2 == 0:
            # Some calls simply lack a sensor: pass a dict with a subset of the names.
            missing = SENSORS[step // 2 % len(SENSORS)]
            subset = {name: x for name, x in readings.items() if name != missing}
            present = torch.tensor([name != missing for name in SENSORS]).expand(batch, -1)
            output = fusion(subset)
        else:
            # Others have per-sample dropouts: pass every input and a (batch, K) mask.
            present = torch.rand(batch, len(SENSORS)) < 0.7
            present[:, 0] |= ~present.any(1)  # every row keeps at least one sensor
            output = fusion(readings, mask=present)
        loss = torch.nn.functional.mse_loss(output, target_for(readings, present))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # The same parameter object was trained throughout.
    assert fusion.parametrizations.weights.original is pre_weights
    weights = fusion.weights.detach()
    error = (weights - TRUE_WEIGHTS).abs().max().item()
    print(
        "learned weights", dict(zip(SENSORS, [round(w, 3) for w in weights.tolist()], strict=True))
    )
    print(f"max error vs {TRUE_WEIGHTS.tolist()}: {error:.4f}")
    return {"loss": loss.item(), "weight_error": error}


if __name__ == "__main__":
    main()
