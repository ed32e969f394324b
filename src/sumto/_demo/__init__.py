"""The ``sumto demo`` command: the library's main use cases on generated and real data.

Private and separate from the core: it is only imported by ``sumto demo``, and its
optional dependencies (matplotlib, tqdm, scikit-image, scikit-learn: the ``demo``
extra) are imported inside the functions that need them, so ``import sumto`` never
requires them. The real data ships inside those packages: nothing is downloaded.
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


def run_demo(
    out: Path, steps: int = 400, seed: int = 0, real: bool = True
) -> tuple[dict[str, Any], list[Path]]:
    """Run the experiments, write ``out/summary.json`` and the figures.

    The experiments use small tensors, for which one intra-op thread is fastest (and
    immune to oversubscription); the previous thread count is restored afterwards.

    Args:
        out: Output folder (created if needed).
        steps: Optimiser steps of every training run.
        seed: Seed of the generated data, of the crops and splits of the real data,
            and of the initialisations.
        real: Also run the real-data section (photos and classifiers).

    Returns:
        ``(summary, written files)``.

    Raises:
        MissingExtraError: If a module of the ``demo`` extra is not installed.
        OSError: If ``out`` cannot be written.
    """
    require_extra(real)
    from sumto._demo.fusion import run_fusion, run_missing
    from sumto._demo.kernel import run_kernel

    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fusion = run_fusion(seed, steps, progress)
        kernel = run_kernel(seed, steps, progress)
        missing = run_missing(seed, steps, progress)
        if real:
            from sumto._demo.ensemble import run_ensemble
            from sumto._demo.photos import run_photos

            photos = run_photos(seed, steps, progress)
            ensemble = run_ensemble(seed, steps, progress)
    finally:
        torch.set_num_threads(threads)
    sections = {"fusion": fusion["summary"], "kernel": kernel["summary"]}
    sections["missing"] = missing["summary"]
    if real:
        sections["real"] = {"kernel": photos["summary"], "ensemble": ensemble["summary"]}
    config = {"seed": seed, "steps": steps, "real": real, "torch": torch.__version__}
    summary = _plain({"config": config, **sections})
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    files = [summary_path, *_generated_figures(out, summary, fusion, kernel, missing)]
    if real:
        files += _real_figures(out, summary["real"], photos, ensemble)
    return summary, files


def _generated_figures(
    out: Path,
    summary: dict[str, Any],
    fusion: dict[str, Any],
    kernel: dict[str, Any],
    missing: dict[str, Any],
) -> list[Path]:
    from sumto._demo.plots import plot_kernel_losses, plot_kernels, plot_weights

    n_sources = len(fusion["optimal"])
    return [
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
            reference=summary["kernel"]["simplex_optimum_loss"],
            reference_label="best loss on the simplex (float64 optimum)",
        ),
    ]


_APPROACH_LABELS = {
    "sum_to": "sumto.sum_to",
    "unconstrained": "unconstrained",
    "softmax": "sumto.simplex (softmax)",
    "naive": "naive w / w.sum()",
}


def _real_figures(
    out: Path, real: dict[str, Any], photos: dict[str, Any], ensemble: dict[str, Any]
) -> list[Path]:
    from sumto._demo.plots import plot_ensemble, plot_photo_kernels

    kernels = photos["kernels"]
    rows: list[tuple[str, dict[str, Tensor]]] = []
    for name, grey in kernels["grey"].items():
        target = torch.tensor(real["kernel"]["grey"][name]["target"][0])
        row = {"target": target} | {_APPROACH_LABELS[a]: k[0] for a, k in grey.items()}
        rows.append((f"grey, {name}", row))
    colour_target = torch.tensor(real["kernel"]["colour"]["target"])
    for c, channel in enumerate(("red", "green", "blue")):
        row = {"target": colour_target[c]}
        row |= {_APPROACH_LABELS[a]: k[c] for a, k in kernels["colour"].items()}
        rows.append((f"colour, {channel}", row))
    photo = photos["photo"]
    held_out = real["kernel"]["held_out_photo"]["colour"]
    colour = real["kernel"]["colour"]["approaches"]
    shown = [(f"held-out photo ({held_out})", photo["input"]), ("target", photo["target"])]
    shown += [
        (f"{_APPROACH_LABELS[a]}: {_number(colour[a]['psnr_db'], '.1f')} dB", image)
        for a, image in photo["outputs"].items()
    ]
    return [
        plot_photo_kernels(
            out / "real_kernels.png",
            shown,
            rows,
            "Sharpening kernels learned from skimage.data photos; PSNR of each "
            "learned filter on the held-out photo",
        ),
        plot_ensemble(out / "real_ensemble.png", real["ensemble"], ensemble["names"]),
    ]


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
    if "real" in summary:
        lines += ["", *_photo_lines(summary["real"]["kernel"])]
        lines += ["", *_ensemble_lines(summary["real"]["ensemble"])]
    return "\n".join(lines)


def _kernel_text(kernel: list[list[float]]) -> str:
    return "  ".join(
        "[" + " ".join(f"{v:6.3f}".replace("-0.000", " 0.000") for v in row) + "]" for row in kernel
    )


def _photo_lines(photos: dict[str, Any]) -> list[str]:
    """Table of the real-photo kernel experiment."""
    train, held_out = photos["train_photos"], photos["held_out_photo"]
    size = photos["crop_size"]
    lines = [
        "4. Real photos from skimage.data (shipped in its wheel): sharpening kernels learned "
        f"from {photos['crops_per_photo']} random {size}x{size} crops per photo,",
        "   PSNR (dB, peak 1) of the learned filter on a held-out photo "
        f"(grey: {', '.join(train['grey'])} -> {held_out['grey']}; "
        f"colour: {', '.join(train['colour'])} -> {held_out['colour']})",
        f"   {'approach':<28}{'max |k - target|':>17}{'PSNR':>8}   sum of each filter",
    ]
    cases = [
        ("grey, Conv2d(1, 1, 3), cross [[0,-1,0],[-1,5,-1],[0,-1,0]]", photos["grey"]["cross"]),
        (
            "grey, Conv2d(1, 1, 3), diagonal [[-1,0,-1],[0,5,0],[-1,0,-1]]",
            photos["grey"]["diagonal"],
        ),
        (
            "colour, Conv2d(3, 3, 3, groups=3): R and B cross, G diagonal; one sum per channel",
            photos["colour"],
        ),
    ]
    for title, result in cases:
        lines.append(f"   {title}")
        identity = _number(result["identity_psnr_db"], ".1f")
        lines.append(f"     {'(the input itself)':<26}{'':>17}{identity:>8}")
        for approach, r in result["approaches"].items():
            sums = " ".join(f"{v:.4f}" for v in r["sums"])
            lines.append(
                f"     {_APPROACH_LABELS[approach]:<26}"
                f"{_number(r['max_abs_error'], '.1e'):>17}{_number(r['psnr_db'], '.1f'):>8}"
                f"   {sums}"
            )
    grey = photos["grey"]["cross"]
    lines.append(
        "   learned with sum_to (grey cross): "
        + _kernel_text(grey["approaches"]["sum_to"]["learned"][0])
    )
    lines += textwrap.wrap(
        "Unconstrained, the same Adam steps fall short: photos are smooth, so 3x3 patches are "
        "nearly constant and their Gram matrix has condition number "
        f"{grey['gram_condition']['all']:.3g}; over the kernels that sum to 1, all that sum_to "
        f"searches, it is {grey['gram_condition']['sum_zero']:.3g}.",
        width=100,
        initial_indent="   ",
        subsequent_indent="   ",
    )
    return lines


def _ensemble_lines(ensemble: dict[str, Any]) -> list[str]:
    """Table of the real-classifier ensemble experiment."""
    samples = ensemble["samples"]
    names = ensemble["models"]
    lines = [
        f"5. Real classifiers: {len(names)} scikit-learn models on {ensemble['dataset']}, "
        f"{samples['train']} train / {samples['validation']} validation / {samples['test']} test",
        "   WeightedSum(weights='simplex') learns the mix of their class probabilities "
        "on the validation NLL",
        f"   {'model':<28}{'weight':>9}{'optimum':>9}{'val acc':>9}{'test acc':>10}{'test NLL':>10}",
    ]
    for name in names:
        lines.append(
            f"   {name:<28}{_number(ensemble['learned_weights'][name]):>9}"
            f"{_number(ensemble['optimal_weights'][name]):>9}"
            f"{_number(ensemble['validation_accuracy'][name]):>9}"
            f"{_number(ensemble['model_test_accuracy'][name]):>10}"
            f"{_number(ensemble['model_test_nll'][name]):>10}"
        )
    rows = (
        ("uniform average", "uniform"),
        (f"best single on validation: {ensemble['best_single_model']}", "best_single"),
        ("learned mix", "learned"),
    )
    for label, key in rows:
        lines.append(
            f"   {label:<55}{_number(ensemble['test_accuracy'][key]):>10}"
            f"{_number(ensemble['test_nll'][key]):>10}"
        )
    lines.append(
        f"   max |learned - optimum| = {_number(ensemble['max_abs_error'], '.1e')}   "
        f"(optimum: EM on the mixture weights in float64, {ensemble['optimum_iterations']} "
        "iterations)"
    )
    return lines
