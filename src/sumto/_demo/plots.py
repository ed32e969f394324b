"""Figures of the demo, drawn with matplotlib's object API (no pyplot global state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = [
    "plot_ensemble",
    "plot_kernel_losses",
    "plot_kernels",
    "plot_photo_kernels",
    "plot_weights",
]

_DPI = 100
# Symmetric-log colour scale of the kernels: linear within +-_LINTHRESH, logarithmic
# beyond, so that entries of 0.05 are as visible as entries of 5.
_LINTHRESH = 0.1


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


def _kernel_norm(kernels: list[Tensor]) -> Any:
    """A diverging norm centred at 0, symmetric, logarithmic beyond ``_LINTHRESH``."""
    from matplotlib.colors import SymLogNorm

    finite = [float(k.abs().max()) for k in kernels if bool(k.isfinite().all())]
    limit = max([*finite, 1.0])
    return SymLogNorm(linthresh=_LINTHRESH, linscale=0.5, vmin=-limit, vmax=limit, base=10)


def _error_text(kernel: Tensor, target: Tensor) -> str:
    if not bool(kernel.isfinite().all()):
        return "non-finite"
    return f"max |k - target| {float((kernel.double() - target.double()).abs().max()):.1e}"


def _draw_kernel(ax: Any, kernel: Tensor, norm: Any, title: str) -> Any:
    """One 3x3 kernel with its values written in the cells."""
    values = kernel.double()
    image = ax.imshow(values.numpy(), cmap="RdBu_r", norm=norm)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = float(values[i, j])
            text = f"{v:.2f}".replace("-0.00", "0.00") if math.isfinite(v) else "nan"
            dark = math.isfinite(v) and abs(v) > 2.0
            ax.text(
                j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black"
            )
    ax.set_title(title, fontsize=8.5)
    ax.set_xticks([])
    ax.set_yticks([])
    return image


def _kernel_rows(fig: Any, rows: list[tuple[str, dict[str, Tensor]]], columns: int) -> None:
    """Rows of kernels; the first of each row is the target, the others show their error."""
    norm = _kernel_norm([k for _, row in rows for k in row.values()])
    axes = fig.subplots(len(rows), columns, squeeze=False)
    image = None
    for r, (row_title, row) in enumerate(rows):
        items = list(row.items())
        target = items[0][1]
        for c in range(columns):
            ax = axes[r][c]
            if c >= len(items):
                ax.set_axis_off()
                continue
            label, kernel = items[c]
            title = label if c == 0 else f"{label}\n{_error_text(kernel, target)}"
            image = _draw_kernel(ax, kernel, norm, title)
        axes[r][0].set_ylabel(row_title, fontsize=9)
    limit = norm.vmax
    ticks = [t for t in (-5.0, -1.0, -_LINTHRESH, 0.0, _LINTHRESH, 1.0, 5.0) if abs(t) <= limit]
    bar = fig.colorbar(image, ax=[ax for row in axes for ax in row], shrink=0.9, ticks=ticks)
    bar.ax.set_yticklabels([f"{t:g}" for t in ticks])
    bar.set_label(f"kernel weight (log scale beyond ±{_LINTHRESH:g})", fontsize=8)


def plot_kernels(path: Path, kernels: dict[str, Tensor]) -> Path:
    """3x3 kernels side by side, the first being the target; each titled with its error.

    One diverging colour scale centred at 0, logarithmic beyond ``±0.1`` so that
    small weights stay visible next to a centre of 5; the values are written in
    the cells.
    """
    fig = _figure(2.6 * len(kernels) + 1.0, 3.2)
    _kernel_rows(fig, [("", kernels)], len(kernels))
    fig.savefig(path)
    return path


def plot_kernel_losses(
    path: Path,
    curves: dict[str, list[float]],
    reference: float | None = None,
    reference_label: str = "",
) -> Path:
    """Training MSE of each kernel approach (log scale); a cross marks a non-finite loss.

    ``reference``, when given, is drawn as a horizontal dashed line (the best loss a
    constrained set can reach).
    """
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    for label, losses in curves.items():
        finite = [v if math.isfinite(v) else math.nan for v in losses]
        (line,) = ax.plot(range(len(finite)), finite, label=label, linewidth=1.6)
        if losses and not math.isfinite(losses[-1]):
            last = max((v for v in finite if math.isfinite(v)), default=1.0)
            ax.plot([len(losses) - 1], [last], marker="x", markersize=9, color=line.get_color())
    if reference is not None and math.isfinite(reference) and reference > 0:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1.0, label=reference_label)
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training MSE")
    ax.set_title("Learning the kernel [[-1,0,-1],[0,5,0],[-1,0,-1]]", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def _photo(ax: Any, image: Tensor, title: str) -> None:
    ax.imshow(image.clamp(0.0, 1.0).permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=8.5)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_photo_kernels(
    path: Path,
    photos: list[tuple[str, Tensor]],
    rows: list[tuple[str, dict[str, Tensor]]],
    title: str,
) -> Path:
    """Held-out photos on top (input, target, filter outputs); kernel rows below.

    Each kernel row starts with its target; every other panel is titled with its
    largest absolute error against that target.
    """
    columns = max(len(row) for _, row in rows)
    fig = _figure(2.1 * columns + 1.2, 2.1 * len(rows) + 2.3)
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.0, 2.1 * len(rows)])
    axes = top.subplots(1, len(photos), squeeze=False)[0]
    for ax, (label, image) in zip(axes, photos, strict=True):
        _photo(ax, image, label)
    top.suptitle(title, fontsize=10)
    _kernel_rows(bottom, rows, columns)
    fig.savefig(path)
    return path


def plot_ensemble(path: Path, ensemble: dict[str, Any], names: list[str]) -> Path:
    """Learned simplex weights (with the exact optimum) and held-out accuracy and NLL."""
    fig = _figure(14.0, 4.2)
    ax_w, ax_acc, ax_nll = fig.subplots(1, 3)
    positions = list(range(len(names)))
    learned = [ensemble["learned_weights"][n] for n in names]
    optimal = [ensemble["optimal_weights"][n] for n in names]
    ax_w.bar(positions, learned, color="tab:blue", label="learned (WeightedSum, simplex)")
    ax_w.scatter(
        positions, optimal, marker="_", s=400, color="black", zorder=3, label="exact optimum"
    )
    for x, w in zip(positions, learned, strict=True):
        ax_w.text(x, w + 0.02, f"{w:.3f}", ha="center", fontsize=8)
    ax_w.set_xticks(positions, names, rotation=25, ha="right", fontsize=8)
    ax_w.set_ylim(0.0, 1.1)
    ax_w.set_ylabel("ensemble weight")
    ax_w.set_title("Simplex weights learned on the validation split (NLL)", fontsize=10)
    ax_w.legend(fontsize=8, loc="upper right")
    best = ensemble["best_single_model"]
    labels = [*names, "uniform average", f"best single\n(on validation: {best})", "learned mix"]
    accuracy = [ensemble["model_test_accuracy"][n] for n in names]
    accuracy += [ensemble["test_accuracy"][k] for k in ("uniform", "best_single", "learned")]
    nll = [ensemble["model_test_nll"][n] for n in names]
    nll += [ensemble["test_nll"][k] for k in ("uniform", "best_single", "learned")]
    colours = ["tab:gray"] * len(names) + ["tab:orange", "tab:green", "tab:blue"]
    bars = list(range(len(labels)))
    for ax, values, ylabel, fmt in (
        (ax_acc, accuracy, "held-out accuracy", ".3f"),
        (ax_nll, nll, "held-out NLL (lower is better)", ".3f"),
    ):
        ax.bar(bars, values, color=colours)
        for x, v in zip(bars, values, strict=True):
            ax.text(x, v, format(v, fmt), ha="center", va="bottom", fontsize=7.5)
        ax.set_xticks(bars, labels, rotation=35, ha="right", fontsize=7.5)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    low = min(accuracy)
    ax_acc.set_ylim(max(0.0, low - 0.05), 1.0 + 0.02 * (1.0 - low + 0.05))
    ax_acc.set_title(f"Test split ({ensemble['samples']['test']} digits)", fontsize=10)
    ax_nll.set_yscale("log")
    ax_nll.set_title("Test split: negative log-likelihood", fontsize=10)
    fig.savefig(path)
    return path
