"""The ``sumto demo`` command: the library's main use cases on generated data.

Private and separate from the core: it is only imported by ``sumto demo``, and its
optional dependencies (matplotlib, tqdm: the ``demo`` extra) are imported inside
the functions that need them, so ``import sumto`` never requires them.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sumto._demo._progress import MissingExtraError, progress, require_extra

__all__ = ["MissingExtraError", "format_table", "run_demo"]


def _plain(value: Any) -> Any:
    """JSON-ready copy: tensors to lists, non-finite floats to ``None`` (strict JSON)."""
    if isinstance(value, Tensor):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_demo(out: Path, steps: int = 400, seed: int = 0) -> tuple[dict[str, Any], list[Path]]:
    """Run the three experiments, write ``out/summary.json`` and the figures.

    The experiments use small tensors, for which one intra-op thread is fastest (and
    immune to oversubscription); the previous thread count is restored afterwards.

    Args:
        out: Output folder (created if needed).
        steps: Optimiser steps of every training run.
        seed: Seed of the generated data and of the initialisations.

    Returns:
        ``(summary, written files)``.

    Raises:
        MissingExtraError: If matplotlib or tqdm is not installed.
        OSError: If ``out`` cannot be written.
    """
    require_extra()
    from sumto._demo.fusion import run_fusion, run_missing
    from sumto._demo.kernel import run_kernel
    from sumto._demo.plots import plot_kernel_losses, plot_kernels, plot_weights

    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fusion = run_fusion(seed, steps, progress)
        kernel = run_kernel(seed, steps, progress)
        missing = run_missing(seed, steps, progress)
    finally:
        torch.set_num_threads(threads)
    summary = _plain(
        {
            "config": {"seed": seed, "steps": steps, "torch": torch.__version__},
            "fusion": fusion["summary"],
            "kernel": kernel["summary"],
            "missing": missing["summary"],
        }
    )
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    n_sources = len(fusion["optimal"])
    files = [
        summary_path,
        plot_weights(
            out / "weights.png",
            [
                {
                    "title": "1. Fusion: WeightedSum simplex weights",
                    "trajectory": fusion["trajectory"],
                    "reference": fusion["optimal"],
                    "reference_label": "exact optimum",
                    "labels": [f"source {k}" for k in range(n_sources)],
                },
                {
                    "title": "3. Missing inputs: one view dropped per sample",
                    "trajectory": missing["trajectory"],
                    "reference": missing["optimal"],
                    "reference_label": "exact optimum",
                    "labels": [
                        f"view {k} (std {s:g})"
                        for k, s in enumerate(summary["missing"]["noise_std"])
                    ],
                },
            ],
        ),
        plot_kernels(
            out / "kernels.png",
            {
                "target": torch.tensor(summary["kernel"]["target"]),
                "sumto.sum_to": kernel["kernels"]["sum_to"],
                "sumto.simplex (softmax)": kernel["kernels"]["softmax"],
                "naive w / w.sum()": kernel["kernels"]["naive"],
            },
        ),
        plot_kernel_losses(
            out / "kernel_losses.png",
            {
                "sumto.sum_to": kernel["curves"]["sum_to"],
                "sumto.simplex (softmax)": kernel["curves"]["softmax"],
                "naive w / w.sum()": kernel["curves"]["naive"],
            },
        ),
    ]
    return summary, files


def _number(value: Any, spec: str = ".4f") -> str:
    return "nan" if value is None else format(value, spec)


def _row(label: str, values: list[Any], width: int = 24) -> str:
    return f"   {label:<{width}}" + "".join(f"{_number(v):>9}" for v in values)


def format_table(summary: dict[str, Any]) -> str:
    """The human-readable report printed by ``sumto demo``."""
    fusion, kernel, missing = summary["fusion"], summary["kernel"], summary["missing"]
    cfg = summary["config"]
    k = len(fusion["learned"])
    mixture = " + ".join(f"{w:g} s{i}" for i, w in enumerate(fusion["true_mixture"]) if w != 0.0)
    lines = [
        f"sumto demo (seed {cfg['seed']}, {cfg['steps']} steps per training run)",
        "",
        f"1. Fusion: {k} noisy sources, target = {mixture} + noise; WeightedSum(weights='simplex')",
        "   " + " " * 24 + "".join(f"{'s' + str(i):>9}" for i in range(k)),
        _row("true mixture", fusion["true_mixture"]),
        _row("learned", fusion["learned"]),
        _row("exact optimum (float64)", fusion["optimal"]),
        f"   max |learned - optimum| = {_number(fusion['max_abs_error'], '.2e')}   "
        f"(optimum: projected gradient with project_simplex, {fusion['optimum_iterations']} "
        f"steps, KKT residual {_number(fusion['optimum_kkt_residual'], '.1e')})",
        "",
        f"2. Kernel: {kernel['images']} generated {kernel['image_size']}x{kernel['image_size']} "
        "images (textures, edges, blobs), Conv2d(1, 1, 3) learns [[-1,0,-1],[0,5,0],[-1,0,-1]]",
        f"   {'approach':<26}{'final MSE':>11}{'max |kernel - target|':>24}",
    ]
    approaches = [
        ("sumto.sum_to", kernel["final_loss"], kernel["max_abs_error"]),
        ("sumto.simplex (softmax)", kernel["softmax_final_loss"], kernel["softmax_max_abs_error"]),
        ("naive w / w.sum()", kernel["naive_final_loss"], kernel["naive_max_abs_error"]),
    ]
    for name, loss, error in approaches:
        lines.append(f"   {name:<26}{_number(loss, '.2e'):>11}{_number(error, '.2e'):>24}")
    lines.append(
        "   learned with sum_to: "
        + "  ".join(
            "[" + " ".join(f"{v:6.3f}".replace("-0.000", " 0.000") for v in row) + "]"
            for row in kernel["learned"]
        )
    )
    lines.append(
        "   softmax cannot go negative: the best kernel on the simplex (float64 optimum) "
        f"has error {_number(kernel['simplex_optimum_max_abs_error'], '.3g')}"
    )
    lines += textwrap.wrap(
        "naive w / w.sum(): " + kernel["naive_normalise"],
        width=100,
        initial_indent="   ",
        subsequent_indent="     ",
    )
    n_views = len(missing["learned"])
    lines += [
        "",
        f"3. Missing inputs: {n_views} noisy views of a latent signal, one dropped per sample "
        "through mask",
        "   " + " " * 24 + "".join(f"{'view ' + str(i):>9}" for i in range(n_views)),
        _row("noise std", missing["noise_std"]),
        _row("learned (mask)", missing["learned"]),
        _row("exact optimum (float64)", missing["optimal"]),
        _row("inverse-variance", missing["inverse_variance"]),
        _row("learned (zero-filled)", missing["zero_fill_learned"]),
        f"   max |learned - optimum| = {_number(missing['max_abs_error'], '.2e')}   "
        "(inverse-variance: the population optimum of any subset, renormalised)",
        f"   held-out MSE: mask {_number(missing['test_mse_masked'], '.4f')}, "
        f"inverse-variance {_number(missing['test_mse_inverse_variance'], '.4f')}, "
        f"zero-filled inputs without mask {_number(missing['test_mse_zero_fill'], '.4f')}",
    ]
    return "\n".join(lines)
