"""Bias with batched inputs: fuse three feature maps per channel, BiFPN-style.

Three feature maps of shape (batch, channels, height, width) are fused with one
weight vector per channel (``channels=C``, broadcast along ``channel_dim=1``), the
BiFPN "fast normalised fusion" map (``method="relu"``) and a per-channel bias. The
inputs are passed as one stacked tensor of shape (3, batch, C, H, W), which the
module reads in place (no copy).

Run: ``.venv/bin/python examples/weighted_sum_bias_batched.py [--steps N]``
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

import sumto


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Fit a known per-channel mixture plus bias; returns the largest parameter errors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    channels = 4
    # Channel c mixes the three maps with weights true_weights[:, c].
    true_weights = torch.tensor([[0.6, 0.0, 0.2, 0.3], [0.3, 1.0, 0.2, 0.3], [0.1, 0.0, 0.6, 0.4]])
    true_bias = torch.tensor([0.5, -1.0, 0.0, 2.0])

    fuse = sumto.WeightedSum(3, method="relu", channels=channels, bias=True)
    optimizer = torch.optim.Adam(fuse.parameters(), lr=0.05)

    loss = torch.tensor(float("nan"))
    for _ in range(args.steps):
        maps = torch.randn(3, 16, channels, 5, 5)  # stacked: (K, batch, C, H, W)
        target = torch.einsum("kc,kbchw->bchw", true_weights, maps) + true_bias.view(1, -1, 1, 1)
        loss = torch.nn.functional.mse_loss(fuse(maps), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert fuse.bias is not None
    weight_error = (fuse.weights.detach() - true_weights).abs().max().item()
    bias_error = (fuse.bias.detach() - true_bias).abs().max().item()
    print(f"final loss {loss.item():.2e}")
    print("per-channel weights (columns sum to 1):")
    print(fuse.weights.detach())
    print(f"max weight error {weight_error:.3f}, max bias error {bias_error:.3f}")
    return {"loss": loss.item(), "weight_error": weight_error, "bias_error": bias_error}


if __name__ == "__main__":
    main()
