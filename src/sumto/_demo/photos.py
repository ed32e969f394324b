"""Real-photo kernel experiment: learn sharpening kernels from photographs.

The photographs ship inside scikit-image's wheel (``skimage.data``: nothing is
downloaded). Each target is the photo filtered by a known kernel that sums to 1;
Conv2d layers learn it back from random crops, and a held-out photo measures how
well the learned filter reproduces the target (PSNR).

* grey: ``Conv2d(1, 1, 3)`` learns the cross ``[[0,-1,0],[-1,5,-1],[0,-1,0]]``
  and the diagonal ``[[-1,0,-1],[0,5,0],[-1,0,-1]]`` kernels with
  ``sumto.sum_to``, without a constraint, with a softmax simplex and with the naive
  ``w / w.sum()``;
* colour: a per-channel ``Conv2d(3, 3, 3, groups=3)`` learns a kernel per channel
  (red and blue: cross, green: diagonal), with one sum per output channel.

A full ``Conv2d(3, 3, 3)`` would also have to learn that no channel leaks into
another, and R, G and B are so alike in photos that this takes Adam thousands of
steps; the per-channel version keeps the demo short.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

import sumto

__all__ = ["CROSS", "DIAGONAL", "load_photo", "run_photos"]

CROSS = ((0.0, -1.0, 0.0), (-1.0, 5.0, -1.0), (0.0, -1.0, 0.0))
DIAGONAL = ((-1.0, 0.0, -1.0), (0.0, 5.0, 0.0), (-1.0, 0.0, -1.0))
GREY_TRAIN = ("camera", "coins", "astronaut")
GREY_TEST = "coffee"
COLOUR_TRAIN = ("astronaut", "rocket")
COLOUR_TEST = "chelsea"
LEARNING_RATE = 0.1
# Rec. 709 luma weights: a grey value is itself a convex combination of R, G and B.
_LUMA = (0.2125, 0.7154, 0.0721)
GREY_APPROACHES = ("sum_to", "unconstrained", "softmax", "naive")
COLOUR_APPROACHES = ("sum_to", "unconstrained", "softmax")


COLOUR_KERNELS = (CROSS, DIAGONAL, CROSS)


class _DivideBySum(nn.Module):
    """The naive normalisation ``w / w.sum()`` per output channel (no safeguard)."""

    def forward(self, x: Tensor) -> Tensor:
        return x / x.sum(dim=(1, 2, 3), keepdim=True)


def load_photo(name: str, colour: bool) -> Tensor:
    """A ``skimage.data`` photograph as float32 in [0, 1], shape ``(C, H, W)``.

    Only images bundled in scikit-image's wheel are used, so this reads a local file.
    """
    import numpy as np
    from skimage import data

    array = np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0
    image = torch.from_numpy(array)
    if image.ndim == 2:
        image = image.unsqueeze(-1).expand(-1, -1, 3)
    image = image[..., :3].permute(2, 0, 1).contiguous()
    if colour:
        return image
    return torch.einsum("chw,c->hw", image, torch.tensor(_LUMA)).unsqueeze(0)


def _crops(g: torch.Generator, image: Tensor, count: int, size: int) -> Tensor:
    """``count`` random ``size x size`` crops of a ``(C, H, W)`` image."""
    height, width = image.shape[-2:]
    tops = torch.randint(0, height - size + 1, (count,), generator=g).tolist()
    lefts = torch.randint(0, width - size + 1, (count,), generator=g).tolist()
    return torch.stack(
        [image[:, t : t + size, s : s + size] for t, s in zip(tops, lefts, strict=True)]
    )


def _channel_kernels(*kernels: tuple[tuple[float, ...], ...]) -> Tensor:
    """Per-channel conv weight ``(C, 1, 3, 3)``: channel ``c`` filtered by ``kernels[c]``."""
    return torch.tensor(kernels, dtype=torch.float64).unsqueeze(1)


def _conv(seed: int, approach: str, channels: int) -> nn.Conv2d:
    torch.manual_seed(seed)  # the same raw initialisation for every approach
    conv = nn.Conv2d(channels, channels, 3, bias=False, groups=channels)
    if approach == "sum_to":
        sumto.sum_to(conv)  # one sum per output channel
    elif approach == "softmax":
        sumto.simplex(conv)
    elif approach == "naive":
        parametrize.register_parametrization(conv, "weight", _DivideBySum())
    return conv


def _psnr(output: Tensor, target: Tensor) -> float:
    """PSNR in dB for a peak of 1 (the photos' range); ``inf`` for an exact match."""
    mse = float(((output.double() - target.double()) ** 2).mean())
    if not math.isfinite(mse):
        return math.nan
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def _train(
    conv: nn.Conv2d, patches: Tensor, y: Tensor, steps: int, bar: Any
) -> tuple[list[float], int | None]:
    """Full-batch Adam on the MSE; stops at the first non-finite loss.

    The conv is applied as a product of its (constrained) weight with the crops'
    3x3 patches, unfolded once: the same numbers as ``conv(x)``, without re-reading
    every crop at every step (a per-step conv is several times slower on a CPU).
    """
    opt = torch.optim.Adam(conv.parameters(), lr=LEARNING_RATE)
    losses: list[float] = []
    for step in range(steps):
        out = torch.bmm(patches, conv.weight.view(-1, 9, 1)).squeeze(-1)
        loss = F.mse_loss(out, y)
        losses.append(float(loss.detach()))  # logged every step for the report
        if not math.isfinite(losses[-1]):
            bar.update(steps - step)
            return losses, step
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        bar.update(1)
    return losses, None


def _patches(x: Tensor) -> Tensor:
    """``(C, N * H' * W', 9)`` 3x3 patches of ``(N, C, H, W)`` crops, in weight order."""
    n, c = x.shape[:2]
    return F.unfold(x, 3).view(n, c, 9, -1).permute(1, 0, 3, 2).reshape(c, -1, 9).contiguous()


def _filter(x: Tensor, weight: Tensor) -> Tensor:
    """``x`` filtered per channel by the ``(C, 1, 3, 3)`` weight, in float64."""
    return F.conv2d(x.double(), weight, groups=weight.shape[0])


def _targets(x: Tensor, weight: Tensor) -> Tensor:
    """Filtered crops laid out as :func:`_patches`: ``(C, N * H' * W')``."""
    return _filter(x, weight).transpose(0, 1).reshape(weight.shape[0], -1).float()


def _gram_conditions(patches: Tensor) -> dict[str, float]:
    """Condition number of the first channel's patch Gram matrix, whole and on the
    sum-zero subspace.

    Photos are smooth, so neighbouring pixels are nearly equal and the all-ones
    direction (the kernel's sum) dominates the Gram matrix; fixing the sum, as
    ``sum_to`` does, removes that direction from the problem.
    """
    p = patches[0].double()
    gram = p.T @ p / p.shape[0]
    n = gram.shape[0]
    eig = torch.linalg.eigvalsh(gram)
    # an orthonormal basis of the sum-zero subspace: the last n - 1 columns of a QR
    # of a matrix whose first column is all ones
    basis = torch.linalg.qr(torch.cat([torch.ones(n, 1), torch.eye(n)[:, 1:]], 1).double())[0]
    basis = basis[:, 1:]
    eig0 = torch.linalg.eigvalsh(basis.T @ gram @ basis)
    return {
        "all": float(eig[-1] / eig[0]),
        "sum_zero": float(eig0[-1] / eig0[0]),
    }


def _fit(
    train: Tensor,
    test: Tensor,
    weight: Tensor,
    approaches: tuple[str, ...],
    seed: int,
    steps: int,
    bar: Any,
) -> dict[str, Any]:
    """Train each approach on ``train`` crops; evaluate on the held-out ``test`` photo."""
    channels = train.shape[1]
    patches = _patches(train)
    y = _targets(train, weight)
    test_target = _filter(test.unsqueeze(0), weight)
    result: dict[str, Any] = {
        "target": weight[:, 0].tolist(),
        "identity_psnr_db": _psnr(test[:, 1:-1, 1:-1].unsqueeze(0), test_target),
        "gram_condition": _gram_conditions(patches),
        "approaches": {},
    }
    kernels: dict[str, Tensor] = {}
    convs: dict[str, nn.Conv2d] = {}
    for approach in approaches:
        conv = _conv(seed, approach, channels)
        losses, first_non_finite = _train(conv, patches, y, steps, bar)
        with torch.no_grad():
            learned = conv.weight.detach().double()
            # the module's own forward on the whole held-out photo
            psnr = _psnr(conv(test.unsqueeze(0)), test_target)
        finite = bool(torch.isfinite(learned).all())
        kernels[approach] = learned[:, 0]
        convs[approach] = conv
        result["approaches"][approach] = {
            "learned": learned[:, 0].tolist() if finite else None,
            "max_abs_error": float((learned - weight).abs().max()) if finite else math.nan,
            "psnr_db": psnr,
            "sums": learned.sum(dim=(1, 2, 3)).tolist(),
            "final_loss": losses[-1],
            "first_non_finite_step": first_non_finite,
        }
    return {"summary": result, "kernels": kernels, "convs": convs}


def run_photos(
    seed: int, steps: int, bar_factory: Any, crops: int = 8, size: int = 40
) -> dict[str, Any]:
    """Learn the grey and colour sharpening kernels from crops of bundled photographs.

    Args:
        seed: Seed of the crops and of the initialisations.
        steps: Adam steps of every training run.
        bar_factory: ``(total, desc) -> progress bar``.
        crops: Random crops per training photo.
        size: Side of each crop, in pixels.

    Returns:
        ``{"summary": JSON-ready numbers, "kernels": learned kernels for the figure,
        "photo": held-out colour photo crops for the figure}``.
    """
    g = torch.Generator().manual_seed(seed)
    grey_train = torch.cat([_crops(g, load_photo(n, False), crops, size) for n in GREY_TRAIN])
    colour_train = torch.cat([_crops(g, load_photo(n, True), crops, size) for n in COLOUR_TRAIN])
    grey_test = load_photo(GREY_TEST, False)
    colour_test = load_photo(COLOUR_TEST, True)
    runs = 2 * len(GREY_APPROACHES) + len(COLOUR_APPROACHES)
    bar = bar_factory(runs * steps, "4/5 real photos")
    try:
        grey = {
            name: _fit(
                grey_train,
                grey_test,
                _channel_kernels(kernel),
                GREY_APPROACHES,
                seed,
                steps,
                bar,
            )
            for name, kernel in (("cross", CROSS), ("diagonal", DIAGONAL))
        }
        colour_weight = _channel_kernels(*COLOUR_KERNELS)
        colour = _fit(colour_train, colour_test, colour_weight, COLOUR_APPROACHES, seed, steps, bar)
    finally:
        bar.close()
    sum_to_errors = [grey[n]["summary"]["approaches"]["sum_to"]["max_abs_error"] for n in grey]
    sum_to_errors.append(colour["summary"]["approaches"]["sum_to"]["max_abs_error"])
    sum_to_psnr = [grey[n]["summary"]["approaches"]["sum_to"]["psnr_db"] for n in grey]
    sum_to_psnr.append(colour["summary"]["approaches"]["sum_to"]["psnr_db"])
    with torch.no_grad():
        sharpened = _filter(colour_test.unsqueeze(0), colour_weight)[0].float()
        outputs = {
            name: conv(colour_test.unsqueeze(0))[0] for name, conv in colour["convs"].items()
        }
    return {
        "summary": {
            "train_photos": {"grey": list(GREY_TRAIN), "colour": list(COLOUR_TRAIN)},
            "held_out_photo": {"grey": GREY_TEST, "colour": COLOUR_TEST},
            "crops_per_photo": crops,
            "crop_size": size,
            "steps": steps,
            "sum_to_max_abs_error": max(sum_to_errors),
            "sum_to_min_psnr_db": min(sum_to_psnr),
            "grey": {name: run["summary"] for name, run in grey.items()},
            "colour": colour["summary"],
        },
        "kernels": {
            "grey": {name: run["kernels"] for name, run in grey.items()},
            "colour": colour["kernels"],
        },
        "photo": {"input": colour_test[:, 1:-1, 1:-1], "target": sharpened, "outputs": outputs},
    }
