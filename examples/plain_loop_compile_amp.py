"""A plain training loop with torch.compile, bfloat16 autocast, gradient clipping and a scheduler.

A ``Conv2d(1, 1, 3)`` whose filter sums to 1 (``sumto.sum_to``) learns the sharpening
kernel ``[[0,-1,0],[-1,5,-1],[0,-1,0]]`` from (image, sharpened image) pairs, with the
parts of a modern loop around it:

* the constraint is registered first, then the model is compiled
  (``torch.compile(fullgraph=True)``: the constraint traces into the same graph) and
  then the optimizer is created, on the model's parameters (the pre-weights);
* the forward runs under ``torch.autocast`` in bfloat16 (CPU here; ``"cuda"`` on a
  GPU): the convolution runs in bfloat16, the constraint's map in float32, so the
  filter sums to 1 to float32 rounding while the loss carries bfloat16's error;
* ``clip_grad_norm_`` clips the pre-weights' gradients, and a ``OneCycleLR`` scheduler
  sets the learning rate: neither can move the weights off the set, which a
  parametrization defines whatever the update is.

Run: ``.venv/bin/python examples/plain_loop_compile_amp.py [--steps N] [--backend B]``
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import sumto

TARGET = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 5.0, -1.0], [0.0, -1.0, 0.0]])


def images(batch: int, generator: torch.Generator) -> Tensor:
    """Smooth random images (blurred noise at unit contrast): edges for the kernel to sharpen."""
    noise = torch.randn(batch, 1, 36, 36, generator=generator)
    smooth = nn.functional.avg_pool2d(noise, 3, stride=1)
    return smooth / smooth.std(dim=(2, 3), keepdim=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the kernel; returns the kernel error, its sums and the learning-rate trace."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument(
        "--backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)"
    )
    args = parser.parse_args(argv)
    if args.steps < 10:  # OneCycleLR needs a few steps in each of its two phases
        parser.error(f"expected --steps of at least 10, got {args.steps}")
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    model = sumto.sum_to(nn.Conv2d(1, 1, 3, bias=False))  # 1. constrain
    compiled = torch.compile(model, fullgraph=True, backend=args.backend)  # 2. compile
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)  # 3. optimize
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.2, total_steps=args.steps, pct_start=0.2
    )
    target_conv = TARGET.view(1, 1, 3, 3)

    lrs: list[float] = []
    clipped = 0
    loss = torch.tensor(float("nan"))
    for _ in range(args.steps):
        x = images(16, generator)
        y = nn.functional.conv2d(x, target_conv)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = compiled(x)
        loss = nn.functional.mse_loss(out.float(), y)
        optimizer.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        clipped += int(norm > 1.0)
        optimizer.step()
        scheduler.step()
        lrs.append(float(scheduler.get_last_lr()[0]))

    kernel = model.weight.detach()[0, 0]
    error = float((kernel - TARGET).abs().max())
    total = float(kernel.sum())
    print(f"final loss {loss.item():.2e} (bfloat16 forward)")
    print("learned kernel:", [[round(v, 3) for v in row] for row in kernel.tolist()])
    print(f"max |kernel - target| = {error:.3f}; kernel sum = {total:.7f}")
    print(f"constraint violation: {sumto.check(model)}")
    print(f"gradients clipped on {clipped} of {args.steps} steps; peak lr {max(lrs):.3f}")
    return {
        "loss": loss.item(),
        "kernel_error": error,
        "kernel_sum": total,
        "violation": sumto.check(model),
        "clipped": clipped,
        "lrs": lrs,
        "out_dtype": str(out.dtype),
    }


if __name__ == "__main__":
    main()
