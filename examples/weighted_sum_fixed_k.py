"""Fixed K: learn which layers of a frozen backbone to use (SUPERB-style weighted layer sum).

A frozen 13-layer "backbone" produces 13 hidden states per utterance; the task only
needs layer 4. ``sumto.WeightedSum(13)`` learns simplex weights over the layers with
a linear head on top. The weights stay on the simplex by construction and the
optimizer is created once, after the module exists.

Run: ``.venv/bin/python examples/weighted_sum_fixed_k.py [--steps N]``
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import sumto

NUM_LAYERS = 13
USEFUL_LAYER = 4


def hidden_states(
    batch: int, frames: int, features: int, generator: torch.Generator
) -> list[Tensor]:
    """Stand-in for a frozen backbone: layer 4 carries the signal, the others are noise."""
    signal = torch.randn(batch, 1, features, generator=generator)
    states = [torch.randn(batch, frames, features, generator=generator) for _ in range(NUM_LAYERS)]
    states[USEFUL_LAYER] = states[USEFUL_LAYER] * 0.1 + signal
    return states


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train the layer weights and a linear head; returns the final loss and top weight."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    features = 32
    mix = sumto.WeightedSum(NUM_LAYERS)  # simplex weights, uniform 1/13 at start
    head = nn.Linear(features, features)
    optimizer = torch.optim.Adam([*mix.parameters(), *head.parameters()], lr=0.05)

    loss = torch.tensor(float("nan"))
    for _ in range(args.steps):
        states = hidden_states(8, 10, features, generator)  # 13 x (batch, frames, features)
        # Frame-level regression of what the task needs (the useful layer).
        loss = nn.functional.mse_loss(head(mix(states)), states[USEFUL_LAYER])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    weights = mix.weights.detach()
    print(f"final loss {loss.item():.4f}")
    print(
        "layer weights", [round(w, 3) for w in weights.tolist()], f"sum={weights.sum().item():.6f}"
    )
    return {
        "loss": loss.item(),
        "top_layer": float(weights.argmax()),
        "top_weight": float(weights.max()),
    }


if __name__ == "__main__":
    main()
