"""Figures of the demo, drawn with matplotlib's object API (no pyplot global state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["plot_kernel_losses", "plot_kernels", "plot_weights"]

_DPI = 100


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def plot_weights(path: Path, panels: list[dict[str, Any]]) -> Path:
    """Weight trajectories over the steps, one panel per experiment.

    Each panel dict has ``title``, ``trajectory`` (``(steps + 1, K)`` tensor),
    ``reference`` (``(K,)``, drawn dashed), ``reference_label`` and ``labels``.
    """
    fig = _figure(5.0 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        trajectory: Tensor = panel["trajectory"]
        steps = range(trajectory.shape[0])
        for k, label in enumerate(panel["labels"]):
            (line,) = ax.plot(steps, trajectory[:, k].tolist(), label=label, linewidth=1.6)
            ax.axhline(
                float(panel["reference"][k]), color=line.get_color(), linestyle="--", linewidth=0.9
            )
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("weight")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(
            fontsize=8,
            title=f"dashed: {panel['reference_label']}",
            title_fontsize=8,
            loc="upper right",
        )
    fig.savefig(path)
    return path


def plot_kernels(path: Path, kernels: dict[str, Tensor]) -> Path:
    """3x3 kernels side by side on one symmetric colour scale, values written in cells."""
    from matplotlib.colors import Normalize

    finite = [float(k.abs().max()) for k in kernels.values() if bool(k.isfinite().all())]
    limit = max(finite, default=1.0)
    norm = Normalize(vmin=-limit, vmax=limit)
    fig = _figure(2.6 * len(kernels) + 0.8, 3.0)
    axes = fig.subplots(1, len(kernels), squeeze=False)[0]
    image = None
    for ax, (title, kernel) in zip(axes, kernels.items(), strict=True):
        values = kernel.double()
        image = ax.imshow(values.numpy(), cmap="RdBu_r", norm=norm)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = float(values[i, j])
                text = f"{v:.2f}".replace("-0.00", "0.00") if math.isfinite(v) else "nan"
                shade = "white" if math.isfinite(v) and abs(v) > 0.6 * limit else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=shade)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), shrink=0.85, label="kernel weight")
    fig.savefig(path)
    return path


def plot_kernel_losses(path: Path, curves: dict[str, list[float]]) -> Path:
    """Training MSE of each kernel approach (log scale); a cross marks a non-finite loss."""
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    for label, losses in curves.items():
        finite = [v if math.isfinite(v) else math.nan for v in losses]
        (line,) = ax.plot(range(len(finite)), finite, label=label, linewidth=1.6)
        if losses and not math.isfinite(losses[-1]):
            last = max((v for v in finite if math.isfinite(v)), default=1.0)
            ax.plot([len(losses) - 1], [last], marker="x", markersize=9, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training MSE")
    ax.set_title("Learning the kernel [[-1,0,-1],[0,5,0],[-1,0,-1]]", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path
