"""Time sumto's projections against another commit's, side by side in one process.

Run: ``.venv/bin/python benchmarks/compare_commits.py --base REV`` from a checkout.

The package at ``REV`` is exported with ``git archive`` into a temporary folder and
imported under the name ``sumto_base`` (its absolute imports rewritten), so that
both versions run in the same process on the same tensors, in interleaved rounds
(``time_interleaved`` of ``bench_projections.py``: one thread, CPU time of the
thread, fastest round's median). It prints one ratio per call, ``this / base``.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from bench_projections import format_time, markdown_table, set_clock, time_interleaved
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def import_base(rev: str, folder: Path) -> object:
    """The package ``src/sumto`` of ``rev`` as module ``sumto_base``."""
    archive = folder / "base.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", rev, "src/sumto"], cwd=ROOT, stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "sumto_base"
    (folder / "src" / "sumto").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\b(from|import) sumto\b", r"\1 sumto_base", text))
    sys.path.insert(0, str(folder))
    return importlib.import_module("sumto_base")


def training_step(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def step() -> object:
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
        return None

    return step


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    set_clock("thread")
    import sumto
    import sumto.functional as this_f

    with tempfile.TemporaryDirectory() as tmp:
        base = import_base(args.base, Path(tmp))
        base_f = importlib.import_module("sumto_base.functional")
        rows = []
        calls: list[tuple[str, str, Callable[[object, torch.Tensor], object]]] = [
            ("project_sum", "", lambda f, x: f.project_sum(x)),  # type: ignore[attr-defined]
            ("project_simplex", "", lambda f, x: f.project_simplex(x)),  # type: ignore[attr-defined]
            (
                "project_box_sum",
                "[-0.5, 1]",
                lambda f, x: f.project_box_sum(x, 1.0, lower=-0.5, upper=1.0),
            ),  # type: ignore[attr-defined]
            (
                "project_box_sum",
                "[0, 10/n]",
                lambda f, x: f.project_box_sum(x, 1.0, lower=0.0, upper=10.0 / x.shape[-1]),
            ),  # type: ignore[attr-defined]
        ]
        shapes = [(13,), (64, 27), (8, 576), (64, 1024), (4096, 1024), (64, 100000)]
        for name, box, call in calls:
            for shape in shapes:
                x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
                times = time_interleaved(
                    {
                        "this": lambda c=call, v=x: c(this_f, v),
                        "base": lambda c=call, v=x: c(base_f, v),
                    },
                    args.rounds,
                    args.min_run_time,
                )
                rows.append(
                    [
                        f"{name} {box}".strip(),
                        str(shape),
                        format_time(times["base"]),
                        format_time(times["this"]),
                        f"**{times['this'] / times['base']:.2f}**",
                    ]
                )
        x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
        layers: list[tuple[str, Callable[[object], nn.Module]]] = [
            ("sum_to", lambda s: s.sum_to(nn.Linear(1024, 1024))),  # type: ignore[attr-defined]
            ("simplex (softmax)", lambda s: s.simplex(nn.Linear(1024, 1024))),  # type: ignore[attr-defined]
            ("simplex (sparsemax)", lambda s: s.simplex(nn.Linear(1024, 1024), method="sparsemax")),  # type: ignore[attr-defined]
            (
                "box_sum [-0.5, 1]",
                lambda s: s.box_sum(nn.Linear(1024, 1024), lower=-0.5, upper=1.0),
            ),  # type: ignore[attr-defined]
        ]
        for name, make in layers:
            torch.manual_seed(0)
            this_layer = make(sumto)
            torch.manual_seed(0)
            base_layer = make(base)
            times = time_interleaved(
                {"this": training_step(this_layer, x), "base": training_step(base_layer, x)},
                args.rounds,
                args.min_run_time,
            )
            rows.append(
                [
                    f"train step, Linear(1024, 1024), {name}",
                    "(64, 1024)",
                    format_time(times["base"]),
                    format_time(times["this"]),
                    f"**{times['this'] / times['base']:.2f}**",
                ]
            )
        print(f"this checkout against {args.base}, float32 randn, total 1, one thread")
        print(markdown_table(["call", "shape", f"base ({args.base})", "this", "this / base"], rows))


if __name__ == "__main__":
    main()
