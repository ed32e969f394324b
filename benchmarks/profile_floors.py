"""Where the time of a projection goes, stage by stage: the floors behind the targets.

Run: ``.venv/bin/python benchmarks/profile_floors.py`` (``--quick`` for a smoke run,
``--out DIR`` to write ``floors.md`` there).

* Long rows (float32): ``project_simplex`` split into the stages its eager-CPU
  assembly runs (row max, shifted copy, threshold search, shift by ``tau`` and clamp,
  the look at the row sums, and the sum refinement, which runs when the sums are not
  already exact), each timed on its own, beside the whole call, Condat's
  serial C (``condat.c``, compiled now) and one read-and-write pass
  (``torch.clamp(x, min=0)``), the floor of any map that returns a new tensor.
* Small inputs: the aten operators ``project_simplex`` and the sort formula call,
  in order, with the time of the threshold search alone beside the whole formula.
* ``project_sum`` against the one-line formula: the operators each calls.

Stages call private functions of sumto (``_search.threshold``, ``_autograd._shift_``,
``_autograd._refine_in_blocks``):
this is a profile of the implementation, not an API example. Timing as in
``bench_projections.py`` (interleaved rounds, one thread, its CPU time).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

import condat
import torch
from bench_projections import (
    format_time,
    machine_description,
    markdown_table,
    randn,
    set_clock,
    sort_formula_simplex,
    sum_formula,
    time_interleaved,
    write,
)
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from sumto import _autograd, _search
from sumto.functional import project_simplex, project_sum

Step = Callable[[], object]


def stages(x: Tensor) -> dict[str, Step]:
    """The stages of the eager-CPU simplex assembly on ``x``, each a call of its own.

    The in-place stages run on a buffer of their own, again and again: elementwise
    passes cost the same whatever the values they leave behind.
    """
    top = x.amax(-1, keepdim=True)
    shifted = x - top
    tau = _search.threshold(shifted, 1.0, 0.0, math.inf)
    buffer = shifted.clone()
    y = _autograd._shift_(shifted.clone(), tau).clamp_min_(0.0)
    sums = y.sum(-1, keepdim=True)
    return {
        "row max": lambda: x.amax(-1, keepdim=True),
        "shifted copy (the output's buffer)": lambda: x - top,
        "threshold search": lambda: _search.threshold(shifted, 1.0, 0.0, math.inf),
        "shift by tau, clamp (in place)": lambda: _autograd._shift_(buffer, tau).clamp_min_(0.0),
        "look: row sums": lambda: torch.aminmax(y.sum(-1, keepdim=True)),
        "sum refinement, when the sums are off (in place)": lambda: _autograd._refine_in_blocks(
            y, 1.0, 0.0, math.inf, sums
        ),
    }


def run_long(
    shapes: Sequence[tuple[int, ...]], rounds: int, min_run_time: float
) -> tuple[str, list[dict[str, object]]]:
    project_c, description = condat.load()
    rows, results = [], []
    for shape in shapes:
        x = randn(shape, 0)
        variants = {
            "project_simplex": lambda x=x: project_simplex(x),
            **stages(x),
            "one read and write: clamp(x, 0)": lambda x=x: torch.clamp(x, min=0.0),
        }
        if project_c is not None:
            variants["Condat (C)"] = lambda x=x: project_c(x, 1.0)
        times = time_interleaved(variants, rounds, min_run_time)
        whole = times["project_simplex"]
        staged = sum(times[name] for name in stages(x))
        for name, seconds in times.items():
            rows.append([str(shape), name, format_time(seconds), f"{seconds / whole:.2f}"])
        rows.append([str(shape), "sum of the stages", format_time(staged), f"{staged / whole:.2f}"])
        results.append({"shape": shape, **times})
    table = markdown_table(["shape", "stage", "time", "/ project_simplex"], rows)
    return f"Condat: {description}.\n\n" + table, results


def aten_ops(fn: Step) -> list[str]:
    """The aten operators ``fn()`` calls from Python, in order (nested ones left out)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = []
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            names.append(event.name.removeprefix("aten::"))
    return names


def run_small(
    shapes: Sequence[tuple[int, ...]], rounds: int, min_run_time: float
) -> tuple[str, list[dict[str, object]]]:
    rows, results = [], []
    for shape in shapes:
        x = randn(shape, 0)
        shifted = x - x.amax(-1, keepdim=True)
        calls: dict[str, Step] = {
            "project_simplex": lambda x=x: project_simplex(x),
            "its threshold search": lambda s=shifted: _search.threshold(s, 1.0, 0.0, math.inf),
            "simplex sort formula": lambda x=x: sort_formula_simplex(x),
        }
        times = time_interleaved(calls, rounds, min_run_time)
        formula = times["simplex sort formula"]
        for name, fn in calls.items():
            ops = aten_ops(fn)
            rows.append(
                [
                    str(shape),
                    name,
                    format_time(times[name]),
                    f"{times[name] / formula:.2f}",
                    str(len(ops)),
                    " ".join(ops),
                ]
            )
        results.append({"shape": shape, **times})
    header = ["shape", "call", "time", "/ sort formula", "aten ops", "operators, in order"]
    return markdown_table(header, rows), results


def run_sum(shape: tuple[int, ...], rounds: int, min_run_time: float) -> str:
    x = randn(shape, 0)
    calls: dict[str, Step] = {
        "project_sum": lambda: project_sum(x),
        "one-line formula": lambda: sum_formula(x),
    }
    times = time_interleaved(calls, rounds, min_run_time)
    rows = [
        [str(shape), name, format_time(times[name]), " ".join(aten_ops(fn))]
        for name, fn in calls.items()
    ]
    return markdown_table(["shape", "call", "time", "operators, in order"], rows)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short timing")
    parser.add_argument("--out", default=None, help="folder for floors.md")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--clock", choices=["thread", "wall"], default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    set_clock(args.clock)
    rounds, min_time = (1, 0.02) if args.quick else (args.rounds, args.min_run_time)
    long_shapes = [(64, 1024)] if args.quick else [(4096, 1024), (64, 100_000)]
    sum_shape = (64, 1024) if args.quick else (4096, 1024)
    with torch.no_grad():
        long_table, long_results = run_long(long_shapes, rounds, min_time)
        small_table, small_results = run_small([(13,), (64, 27)], rounds, min_time)
        sum_table = run_sum(sum_shape, rounds, min_time)
    text = "\n\n".join(
        [
            f"Floors: {machine_description().splitlines()[0]}",
            "### Long rows: project_simplex stage by stage (float32)",
            long_table,
            "### Small inputs: operators called (float32)",
            small_table,
            "### project_sum against the one-line formula (float32)",
            sum_table,
        ]
    )
    print(text)
    write(args.out, "floors.md", text)
    return {"long": long_results, "small": small_results}


if __name__ == "__main__":
    main()
