"""Learn an unknown permutation with a doubly stochastic matrix, then round it with the Hungarian algorithm.

Shuffled sequences: every example ``x`` of ``n`` numbers (say patches of an image) is
seen together with ``x[perm]`` for one fixed, unknown permutation ``perm``. A
``nn.Linear(n, n, bias=False)`` whose weight is constrained by
``sumto.doubly_stochastic`` (Sinkhorn, every row and column summing to 1) learns
``P`` with ``P @ x = x[perm]``. A doubly stochastic matrix is a mixture of
permutations (Birkhoff-von Neumann), so gradient descent on this relaxation is
smooth; at the end ``scipy.optimize.linear_sum_assignment`` (the Hungarian
algorithm) rounds ``P`` to the permutation matrix nearest to it in the sense of the
largest total weight, which is the answer.

Run: ``.venv/bin/python examples/learn_permutation.py [--n 8] [--steps 300] [--seed 0]``
(needs scipy, an optional dependency of this recipe).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import sumto


def hungarian(p: torch.Tensor) -> list[int]:
    """The permutation ``sigma`` maximising ``sum_i p[i, sigma[i]]`` (row ``i`` reads ``sigma[i]``)."""
    rows, cols = linear_sum_assignment(p.detach().double().cpu().numpy(), maximize=True)
    return [int(c) for _, c in sorted(zip(rows, cols, strict=True))]


def main(
    argv: Sequence[str] | None = None, *, n: int = 8, steps: int = 300, seed: int = 0
) -> dict[str, Any]:
    """Train, round, and return the true and recovered permutations and the final violation."""
    if argv is not None:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--n", type=int, default=n)
        parser.add_argument("--steps", type=int, default=steps)
        parser.add_argument("--seed", type=int, default=seed)
        args = parser.parse_args(argv)
        n, steps, seed = args.n, args.steps, args.seed
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)

    torch.manual_seed(seed)
    model = nn.Linear(n, n, bias=False)
    # Start at the centre of the Birkhoff polytope (every entry 1/n): the projected
    # random weight would have exact zeros, which Sinkhorn's log pre-weights learn slowly.
    sumto.doubly_stochastic(model, init=torch.full((n, n), 1.0 / n))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(64, n, generator=generator)
        loss = (model(x) - x[:, perm]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    p = model.weight.detach()
    recovered = hungarian(p)
    violation = sumto.check(model)["weight"]
    result = {
        "true": perm.tolist(),
        "recovered": recovered,
        "loss": float(loss.detach()),
        "violation": violation,
        "max_entry_gap": float((p - torch.eye(n)[recovered]).abs().max()),
    }
    print(f"true permutation      {result['true']}")
    print(
        f"Hungarian of learned  {recovered}  ({'match' if recovered == result['true'] else 'MISMATCH'})"
    )
    print(
        f"final loss {result['loss']:.2e}, max |P - permutation matrix| = {result['max_entry_gap']:.3f}"
    )
    print(f"row/column sums: max violation {violation:.1e}")
    return result


if __name__ == "__main__":
    main([])
