"""Generated data of the demo: images for the kernel experiment and signals for fusion.

Everything is drawn from a ``torch.Generator`` seeded by the caller, so a seed fixes
the data exactly; nothing is downloaded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TARGET_KERNEL", "fusion_sources", "images", "modalities"]

# The sharpening kernel of the kernel experiment: negative entries, a centre above 1,
# and a sum of exactly 1 (-4 + 5), so that flat regions keep their brightness.
TARGET_KERNEL = ((-1.0, 0.0, -1.0), (0.0, 5.0, 0.0), (-1.0, 0.0, -1.0))


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _texture(g: torch.Generator, yy: Tensor, xx: Tensor) -> Tensor:
    """Three random sinusoidal gratings plus fine-grained noise."""
    img = torch.zeros_like(xx)
    for _ in range(3):
        freq = _uniform(g, 0.1, 0.6)
        angle = _uniform(g, 0.0, math.pi)
        phase = _uniform(g, 0.0, 2.0 * math.pi)
        img += torch.cos(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    return img / 3.0 + 0.1 * torch.randn(xx.shape, generator=g)


def _edges(g: torch.Generator, size: int) -> Tensor:
    """Overlapping axis-aligned rectangles of random signed brightness (step edges)."""
    img = torch.zeros(size, size)
    for _ in range(4):
        top, left = (int(v) for v in torch.randint(0, size, (2,), generator=g))
        height, width = (int(v) for v in torch.randint(4, size // 2, (2,), generator=g))
        img[top : top + height, left : left + width] += _uniform(g, -1.0, 1.0)
    return img


def _blobs(g: torch.Generator, yy: Tensor, xx: Tensor) -> Tensor:
    """A sum of isotropic Gaussian bumps of random centre, width and sign."""
    size = xx.shape[0]
    img = torch.zeros_like(xx)
    for _ in range(5):
        cy, cx = _uniform(g, 0.0, size), _uniform(g, 0.0, size)
        width = _uniform(g, 1.5, 5.5)
        amplitude = _uniform(g, -1.0, 1.0)
        img += amplitude * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2.0 * width**2))
    return img


def images(g: torch.Generator, per_kind: int = 8, size: int = 40) -> Tensor:
    """``3 * per_kind`` single-channel images (textures, edges, blobs), shape ``(N, 1, size, size)``."""
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = [_texture(g, yy, xx) for _ in range(per_kind)]
    out += [_edges(g, size) for _ in range(per_kind)]
    out += [_blobs(g, yy, xx) for _ in range(per_kind)]
    return torch.stack(out).unsqueeze(1)


def _smooth_signal(g: torch.Generator, length: int) -> Tensor:
    """A random mixture of a few sinusoids (unit-scale, zero-mean)."""
    t = torch.arange(length, dtype=torch.float64) / length
    signal = torch.zeros(length, dtype=torch.float64)
    for _ in range(4):
        freq = _uniform(g, 1.0, 40.0)
        phase = _uniform(g, 0.0, 2.0 * math.pi)
        signal += _uniform(g, 0.3, 1.0) * torch.sin(2.0 * math.pi * freq * t + phase)
    return signal / signal.std()


def fusion_sources(
    g: torch.Generator, mixture: tuple[float, ...], length: int = 4096, noise: float = 0.05
) -> tuple[Tensor, Tensor]:
    """K noisy sources and a target that is the convex ``mixture`` of them plus noise.

    Returns:
        ``(sources, target)``: float64 tensors of shapes ``(K, length)`` and ``(length,)``.
    """
    k = len(mixture)
    clean = torch.stack([_smooth_signal(g, length) for _ in range(k)])
    sources = clean + 0.3 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    weights = torch.tensor(mixture, dtype=torch.float64)
    target = weights @ sources + noise * torch.randn(length, generator=g, dtype=torch.float64)
    return sources, target


def modalities(
    g: torch.Generator,
    noise_std: tuple[float, ...],
    samples: int,
    features: int = 16,
    level: float = 3.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Noisy views of a latent signal with one view dropped per sample.

    The latent signal is ``level + N(0, 1)`` (a quantity measured around a non-zero
    level, as sensors do); view ``k`` is ``latent + noise_std[k] * N(0, 1)``. For
    each sample one view, chosen uniformly, is marked absent in the mask.

    Returns:
        ``(views, latent, mask)``: float32 shapes ``(K, samples, features)`` and
        ``(samples, features)``, and a bool mask ``(samples, K)`` (True = present).
    """
    k = len(noise_std)
    latent = level + torch.randn(samples, features, generator=g)
    std = torch.tensor(noise_std).view(k, 1, 1)
    views = latent + std * torch.randn(k, samples, features, generator=g)
    dropped = torch.randint(0, k, (samples,), generator=g)
    mask = torch.ones(samples, k, dtype=torch.bool)
    mask[torch.arange(samples), dropped] = False
    return views, latent, mask
