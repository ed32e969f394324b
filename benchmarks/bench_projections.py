"""Benchmark sumto's projections: search paths, small inputs, baselines and scaling.

Run: ``.venv/bin/python benchmarks/bench_projections.py`` (``--quick`` for a smoke
run, ``--out DIR`` to write the tables and the scaling plot there).

Every variant of a case runs side by side in one process on the same CPU tensor
(``torch.randn``, total 1, constraint over the last dim, no autograd). Tables:

1. **Path choice.** ``project_simplex`` and ``project_box_sum`` (a wide box
   [-0.5, 1] and a narrow box [0, 10/n]) with each threshold search forced by
   ``sumto._search.forced("sort" | "newton")``, and with the automatic choice, whose
   path is observed (whether the Newton entry point of ``sumto._search`` ran), not
   predicted. The project's rule: a search path earns its place only with a measured
   speed-up of at least 1.5x on shapes users run.
2. **Small inputs.** ``project_simplex`` on a few small shapes, and
   ``project_box_sum`` on one, against the textbook sort formula (Held et al. 1974,
   Duchi et al. 2008) in plain torch ops: sort descending, cumulative sums, support
   count, threshold, clamp.
3. **Aten calls** per projection, counted with ``torch.profiler`` (operators called
   from Python, and all operators including those nested inside others).
4. **Simplex** (automatic choice, forced sort, ``torch.softmax``), **box** (automatic
   choice, forced sort, 60-step bisection on the shift written with one reused work
   buffer, then ``clamp``) and **affine sum** (``project_sum`` against the one-line
   formula ``x + (1 - x.sum(-1, keepdim=True)) / n``), each with its largest absolute
   difference from a float64 reference: the sort formula for the simplex, 100 steps
   of bisection for the box, the formula for the sum.
5. **Long rows against Condat's serial C** (``condat.c``, an O(n)-expected algorithm
   compiled at run time with the system's C compiler; skipped with the reason when
   none is present), float32 and float64, with each one's largest absolute
   difference from the float64 sort formula.
6. **Scaling**: the number of entries fixed (``--scaling-entries``), the row length n
   from 16 to 2**20 (plot ``scaling.png``).

Timing: each variant is timed in ``--rounds`` interleaved rounds of
``torch.utils.benchmark.Timer.blocked_autorange``; a variant keeps its fastest
round's median, the least disturbed by other processes on the machine. Ratios are
formed from times measured in the same run. A forced search is set around the timer,
not inside the timed call. By default torch runs one intra-op thread and the clock is
the CPU time of that thread (``time.thread_time``): on a machine shared with other
jobs, wall-clock times of two threads mostly measure the scheduler.
``--threads N --clock wall`` measures wall-clock time instead.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from unittest import mock

import torch
import torch.utils.benchmark as benchmark
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from sumto import _search
from sumto import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import condat  # the C anchor beside this file

Step = Callable[[], object]
Setting = Callable[[], AbstractContextManager[object]]
CLOCKS: dict[str, Callable[[], float]] = {"thread": time.thread_time, "wall": time.perf_counter}


# ---------------------------------------------------------------------------
# timing and reporting helpers (bench_overhead.py imports them too)
# ---------------------------------------------------------------------------

_clock = "thread"


def set_clock(name: str | None) -> str:
    """Choose the clock: ``thread`` (default with one thread) or ``wall``."""
    global _clock
    if name is None:
        name = "thread" if torch.get_num_threads() == 1 else "wall"
    if name == "thread" and torch.get_num_threads() != 1:
        raise ValueError(
            f"expected --clock wall with {torch.get_num_threads()} threads: the thread "
            "clock only sees the calling thread"
        )
    _clock = name
    return name


def time_interleaved(
    variants: dict[str, Step],
    rounds: int,
    min_run_time: float,
    settings: Mapping[str, Setting] | None = None,
) -> dict[str, float]:
    """Seconds per call of each variant: the fastest of ``rounds`` interleaved medians.

    ``settings[name]()``, when given, is a context entered around the warm-up and the
    timer of variant ``name`` (a forced search), so that it costs the timed calls nothing.
    """
    settings = settings or {}

    def setting(name: str) -> AbstractContextManager[object]:
        return settings[name]() if name in settings else contextlib.nullcontext()

    for name, fn in variants.items():  # warm-up: lazy initialisation, allocator, caches
        with setting(name):
            fn()
    best = dict.fromkeys(variants, math.inf)
    for _ in range(rounds):
        for name, fn in variants.items():
            timer = benchmark.Timer(
                "fn()",
                globals={"fn": fn},
                num_threads=torch.get_num_threads(),
                timer=CLOCKS[_clock],
            )
            with setting(name):
                median = timer.blocked_autorange(min_run_time=min_run_time).median
            best[name] = min(best[name], median)
    return best


def format_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description() -> str:
    """First lines of ``lscpu``, torch version and intra-op threads."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = "\n".join(lscpu.splitlines()[:10])
    except (OSError, subprocess.CalledProcessError):
        cpu = platform.processor() or platform.machine()
    clock = {"thread": "CPU time of the timing thread", "wall": "wall-clock time"}[_clock]
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), {clock}, "
        f"{os.cpu_count()} logical CPUs, CPU only (no GPU)\n{cpu}"
    )


def write(out: str | None, name: str, text: str) -> None:
    """Write ``text`` to ``out/name`` when an output folder was given."""
    if out is None:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as handle:
        handle.write(text if text.endswith("\n") else text + "\n")


# ---------------------------------------------------------------------------
# baselines and references, in plain torch ops
# ---------------------------------------------------------------------------


def sort_formula_simplex(x: Tensor, total: float = 1.0) -> Tensor:
    """The textbook simplex projection (Held et al. 1974, Duchi et al. 2008) per row."""
    n = x.shape[-1]
    u, _ = torch.sort(x, dim=-1, descending=True)
    css = u.cumsum(-1) - total
    k = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    support = (u * k > css).sum(-1, keepdim=True)  # at least 1 for total > 0
    tau = css.gather(-1, support - 1) / support
    return (x - tau).clamp_min(0.0)


def sum_formula(x: Tensor, total: float = 1.0) -> Tensor:
    """The affine projection in one line."""
    return x + (total - x.sum(-1, keepdim=True)) / x.shape[-1]


def bisection_box(x: Tensor, total: float, lower: float, upper: float, steps: int = 60) -> Tensor:
    """``clamp(x - tau, lower, upper)`` with tau from ``steps`` bisection steps (one buffer)."""
    work = torch.empty_like(x)
    lo = x.amin(-1, keepdim=True) - upper  # the sum is n * upper there
    hi = x.amax(-1, keepdim=True) - lower  # and n * lower there
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        above = torch.sub(x, mid, out=work).clamp_(lower, upper).sum(-1, keepdim=True) > total
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return torch.sub(x, 0.5 * (lo + hi), out=work).clamp_(lower, upper)


def max_error(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------------------
# the maps: a label, the projection, its float64 reference
# ---------------------------------------------------------------------------

BOXES: dict[str, Callable[[int], tuple[float, float]]] = {
    "box [-0.5, 1]": lambda n: (-0.5, 1.0),
    "box [-4/n, 5/n]": lambda n: (-4.0 / n, 5.0 / n),
    "box [0, 10/n]": lambda n: (0.0, 10.0 / n),
    "box [0, 0.1]": lambda n: (0.0, 0.1),
}


def projection(label: str, x: Tensor) -> Callable[[], Tensor]:
    """``project_simplex`` (``label == "simplex"``) or ``project_box_sum`` on box ``label``."""
    if label == "simplex":
        return lambda: F.project_simplex(x)
    lower, upper = BOXES[label](x.shape[-1])
    return lambda: F.project_box_sum(x, 1.0, lower=lower, upper=upper)


def reference(label: str, x: Tensor) -> Tensor:
    """The projection of ``x`` in float64, computed without sumto."""
    if label == "simplex":
        return sort_formula_simplex(x.double())
    lower, upper = BOXES[label](x.shape[-1])
    return bisection_box(x.double(), 1.0, lower, upper, steps=100)


SEARCHES: dict[str, Setting] = {
    "sort": lambda: _search.forced("sort"),
    "newton": lambda: _search.forced("newton"),
}


def path_taken(fn: Step) -> str:
    """The search the automatic choice runs in ``fn()``: whether a Newton entry point ran."""
    names = [
        name for name in ("_simplex_newton_rows", "_box_newton_rows") if hasattr(_search, name)
    ]
    with contextlib.ExitStack() as stack:
        spies = [
            stack.enter_context(mock.patch.object(_search, name, wraps=getattr(_search, name)))
            for name in names
        ]
        fn()
    return "newton" if any(spy.called for spy in spies) else "sort"


def aten_calls(fn: Step) -> tuple[int, int]:
    """``(operators called from Python, all operators)`` of the ``aten`` namespace in ``fn()``."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [event for event in prof.events() if event.name.startswith("aten::")]

    def outermost(event: object) -> bool:
        parent = getattr(event, "cpu_parent", None)
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    return sum(outermost(event) for event in events), len(events)


def randn(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------

PathCase = tuple[str, tuple[int, ...], torch.dtype]


def run_paths(
    cases: Sequence[PathCase], rounds: int, min_run_time: float
) -> tuple[str, list[dict[str, object]]]:
    """Forced sort against forced Newton against the automatic choice."""
    rows, results = [], []
    for label, shape, dtype in cases:
        x = randn(shape, 3, dtype)
        fn = projection(label, x)
        times = time_interleaved(
            {"sort": fn, "newton": fn, "auto": fn}, rounds, min_run_time, settings=SEARCHES
        )
        auto = path_taken(fn)
        exact = reference(label, x)
        errors = {}
        for search in SEARCHES:
            with SEARCHES[search]():
                errors[search] = max_error(fn(), exact)
        sort, newton = times["sort"], times["newton"]
        rows.append(
            [
                label,
                str(shape),
                str(dtype).removeprefix("torch."),
                format_time(sort),
                format_time(newton),
                format_time(times["auto"]),
                f"**{sort / newton:.2f}x**",
                auto,
                f"{times['auto'] / min(sort, newton):.2f}",
                f"{errors['sort']:.1e} / {errors['newton']:.1e}",
            ]
        )
        results.append(
            {"map": label, "shape": shape, "dtype": str(dtype), **times, "auto_path": auto}
        )
    header = [
        "map",
        "shape",
        "dtype",
        "sort (forced)",
        "Newton (forced)",
        "auto",
        "sort / Newton",
        "auto takes",
        "auto / faster forced",
        "max abs diff vs f64: sort / Newton",
    ]
    return markdown_table(header, rows), results


def run_small(
    cases: Sequence[tuple[str, tuple[int, ...]]], rounds: int, min_run_time: float
) -> tuple[str, list[dict[str, object]]]:
    """sumto's projections on small inputs against the plain sort formula of the simplex."""
    rows, results = [], []
    for label, shape in cases:
        x = randn(shape, 4)
        variants = {
            "sumto": projection(label, x),
            "sort formula": lambda x=x: sort_formula_simplex(x),
        }
        times = time_interleaved(variants, rounds, min_run_time)
        ratio = times["sumto"] / times["sort formula"]
        call = "project_simplex" if label == "simplex" else f"project_box_sum, {label}"
        rows.append(
            [
                call,
                str(shape),
                format_time(times["sumto"]),
                format_time(times["sort formula"]),
                f"**{ratio:.2f}x**",
            ]
        )
        results.append({"map": label, "shape": shape, **times})
    header = ["sumto call", "shape", "sumto", "simplex sort formula", "sumto / sort formula"]
    return markdown_table(header, rows), results


def run_aten(cases: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[str, list[dict[str, object]]]:
    """Aten operators per call, automatic search, and those of the sort formula."""
    rows, results = [], []
    for label, shape in cases:
        x = randn(shape, 5)
        fn = projection(label, x)
        call = "project_simplex" if label == "simplex" else f"project_box_sum, {label}"
        calls = [(call, path_taken(fn), fn)]
        if label == "simplex":
            calls.append(("simplex sort formula", "sort", lambda x=x: sort_formula_simplex(x)))
        for name, path, step in calls:
            outer, total = aten_calls(step)
            rows.append([name, str(shape), path, str(outer), str(total)])
            results.append({"call": name, "shape": shape, "outer": outer, "all": total})
    header = ["call", "shape", "search", "aten ops called from Python", "aten ops incl. nested"]
    return markdown_table(header, rows), results


def run_simplex(
    shapes: Sequence[tuple[int, int]], rounds: int, min_run_time: float
) -> tuple[str, list[dict[str, object]]]:
    rows, results = [], []
    for shape in shapes:
        x = randn(shape, 0)
        fn = projection("simplex", x)
        variants = {"auto": fn, "sort": fn, "torch.softmax": lambda x=x: torch.softmax(x, -1)}
        times = time_interleaved(variants, rounds, min_run_time, settings=SEARCHES)
        exact = reference("simplex", x)
        error = max_error(fn(), exact)
        with SEARCHES["sort"]():
            sort_error = max_error(fn(), exact)
        auto, sort, soft = times["auto"], times["sort"], times["torch.softmax"]
        rows.append(
            [
                str(shape),
                format_time(auto),
                path_taken(fn),
                format_time(sort),
                format_time(soft),
                f"**{sort / auto:.1f}x**",
                f"**{auto / soft:.1f}x**",
                f"{error:.1e} / {sort_error:.1e}",
            ]
        )
        results.append({"shape": shape, **times, "max_abs_diff": error})
    header = [
        "shape",
        "project_simplex",
        "search",
        "sort (forced)",
        "torch.softmax",
        "speed-up vs sort",
        "time / softmax",
        "max abs diff vs f64: auto / sort",
    ]
    return markdown_table(header, rows), results


def run_condat(
    cases: Sequence[tuple[tuple[int, ...], torch.dtype]], rounds: int, min_run_time: float
) -> tuple[str, list[dict[str, object]]]:
    """``project_simplex`` against Condat's serial C (``condat.c``, compiled now)."""
    project_c, description = condat.load()
    if project_c is None:
        return f"Skipped: {description}.", []
    rows, results = [], []
    for shape, dtype in cases:
        x = randn(shape, 0, dtype)
        fn = projection("simplex", x)
        times = time_interleaved(
            {"sumto": fn, "condat": lambda x=x: project_c(x, 1.0)}, rounds, min_run_time
        )
        exact = reference("simplex", x)
        errors = (max_error(fn(), exact), max_error(project_c(x, 1.0), exact))
        ratio = times["sumto"] / times["condat"]
        rows.append(
            [
                str(shape),
                str(dtype).removeprefix("torch."),
                format_time(times["sumto"]),
                format_time(times["condat"]),
                f"**{ratio:.2f}x**",
                f"{errors[0]:.1e} / {errors[1]:.1e}",
            ]
        )
        results.append({"shape": shape, "dtype": str(dtype), **times, "ratio": ratio})
    header = ["shape", "dtype", "project_simplex", "Condat (C)", "time / Condat"]
    header.append("max abs diff vs f64: sumto / Condat")
    return f"Compiler: {description}.\n\n" + markdown_table(header, rows), results


def run_box(
    shape: tuple[int, int], boxes: Sequence[str], rounds: int, min_run_time: float
) -> tuple[str, list[dict[str, object]]]:
    rows, results = [], []
    x = randn(shape, 1)
    for label in boxes:
        lower, upper = BOXES[label](shape[-1])
        fn = projection(label, x)
        variants = {
            "auto": fn,
            "sort": fn,
            "60-step bisection": lambda lower=lower, upper=upper: bisection_box(
                x, 1.0, lower, upper
            ),
        }
        times = time_interleaved(variants, rounds, min_run_time, settings=SEARCHES)
        exact = reference(label, x)
        error = max_error(fn(), exact)
        with SEARCHES["sort"]():
            sort_error = max_error(fn(), exact)
        bisect_error = max_error(bisection_box(x, 1.0, lower, upper), exact)
        auto, sort, bisect = times["auto"], times["sort"], times["60-step bisection"]
        rows.append(
            [
                f"{shape}, {label}",
                format_time(auto),
                path_taken(fn),
                format_time(sort),
                format_time(bisect),
                f"**{bisect / auto:.1f}x**",
                f"{sort / auto:.1f}x",
                f"{error:.1e} / {sort_error:.1e} / {bisect_error:.1e}",
            ]
        )
        results.append({"shape": shape, "box": label, **times, "max_abs_diff": error})
    header = [
        "case",
        "project_box_sum",
        "search",
        "sort (forced)",
        "60-step bisection",
        "speed-up vs bisection",
        "speed-up vs sort",
        "max abs diff vs f64: auto / sort / bisection",
    ]
    return markdown_table(header, rows), results


def run_sum(
    shape: tuple[int, int], rounds: int, min_run_time: float
) -> tuple[str, list[dict[str, object]]]:
    x = randn(shape, 6)
    variants = {"project_sum": lambda: F.project_sum(x), "formula": lambda: sum_formula(x)}
    times = time_interleaved(variants, rounds, min_run_time)
    exact = sum_formula(x.double())
    errors = [max_error(F.project_sum(x), exact), max_error(sum_formula(x), exact)]
    row = [
        str(shape),
        format_time(times["project_sum"]),
        format_time(times["formula"]),
        f"**{times['project_sum'] / times['formula']:.2f}x**",
        f"{errors[0]:.1e} / {errors[1]:.1e}",
    ]
    header = [
        "shape",
        "project_sum",
        "one-line formula",
        "project_sum / formula",
        "max abs diff vs f64: project_sum / formula",
    ]
    return markdown_table(header, [row]), [{"shape": shape, **times}]


SCALING_VARIANTS = [
    "project_simplex",
    "simplex sort",
    "torch.softmax",
    "project_box_sum",
    "box sort",
    "60-step bisection",
]


def run_scaling(
    lengths: Sequence[int], entries: int, rounds: int, min_run_time: float
) -> tuple[str, list[dict[str, float]]]:
    """Time per call against the row length n, ``entries`` entries in all."""
    rows, results = [], []
    for n in lengths:
        batch = max(1, entries // n)
        x = randn((batch, n), 2)
        # a box 4x wider than the mean 1/n on each side, holding total 1
        lower, upper = BOXES["box [-4/n, 5/n]"](n)
        simplex, box = projection("simplex", x), projection("box [-4/n, 5/n]", x)
        variants: dict[str, Step] = {
            "project_simplex": simplex,
            "simplex sort": simplex,
            "torch.softmax": lambda x=x: torch.softmax(x, -1),
            "project_box_sum": box,
            "box sort": box,
            "60-step bisection": lambda x=x, lower=lower, upper=upper: bisection_box(
                x, 1.0, lower, upper
            ),
        }
        settings = {"simplex sort": SEARCHES["sort"], "box sort": SEARCHES["sort"]}
        times = time_interleaved(variants, rounds, min_run_time, settings=settings)
        results.append({"n": n, "rows": batch, **times})
        cells = [format_time(times[name]) for name in SCALING_VARIANTS]
        rows.append(
            [
                str(n),
                str(batch),
                path_taken(simplex),
                *cells,
                f"{times['simplex sort'] / times['project_simplex']:.1f}x",
                f"{times['box sort'] / times['project_box_sum']:.1f}x",
                f"{times['60-step bisection'] / times['project_box_sum']:.1f}x",
            ]
        )
    header = [
        "n",
        "rows",
        "search",
        "project_simplex",
        "simplex sort",
        "softmax",
        "project_box_sum",
        "box sort",
        "60-step bisection",
        "simplex vs sort",
        "box vs sort",
        "box vs bisection",
    ]
    return markdown_table(header, rows), results


def plot_scaling(results: list[dict[str, float]], path: str, entries: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    lengths = [r["n"] for r in results]
    styles = {
        "project_simplex": ("C0", "-", "o"),
        "simplex sort": ("C0", "--", "o"),
        "torch.softmax": ("0.4", ":", "s"),
        "project_box_sum": ("C1", "-", "^"),
        "box sort": ("C1", "--", "^"),
        "60-step bisection": ("C1", ":", "^"),
    }
    for name, (color, line, marker) in styles.items():
        ax.plot(
            lengths,
            [r[name] * 1e3 for r in results],
            color=color,
            linestyle=line,
            marker=marker,
            label=name,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("row length n (rows = entries / n)")
    ax.set_ylabel("time per call (ms)")
    ax.set_title(f"Projections of {entries:,} float32 entries, {torch.get_num_threads()} thread(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def path_cases(
    shapes: Sequence[tuple[int, ...]], wide: Sequence[tuple[int, ...]]
) -> list[PathCase]:
    """Every map on float32 ``shapes``, then the simplex and the wide box on float64 ``wide``."""
    f32, f64 = torch.float32, torch.float64
    cases = [
        (label, shape, f32)
        for label in ("simplex", "box [-0.5, 1]", "box [0, 10/n]")
        for shape in shapes
    ]
    return cases + [(label, shape, f64) for label in ("simplex", "box [-0.5, 1]") for shape in wide]


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Command-line entry point; prints the tables and returns the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short timing")
    parser.add_argument("--out", default=None, help="folder for the tables and the plot")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=None, help="see above")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--scaling-entries", type=int, default=2**20)
    args = parser.parse_args(argv)
    small: list[tuple[str, tuple[int, ...]]] = [
        ("simplex", (13,)),
        ("simplex", (64, 27)),
        ("simplex", (8, 576)),
        ("box [0, 0.1]", (64, 27)),
    ]
    aten = [
        ("simplex", (13,)),
        ("simplex", (64, 27)),
        ("box [-0.5, 1]", (13,)),
        ("box [-0.5, 1]", (64, 27)),
    ]
    paths = path_cases(
        [
            (13,),
            (64, 27),
            (8, 576),
            (256, 64),
            (1, 1024),
            (64, 1024),
            (4096, 1024),
            (64, 100_000),
            (1, 1_000_000),
            (16384, 256),
        ],
        [(64, 1024), (4096, 1024)],
    )
    simplex_shapes = [(4096, 1024), (64, 100_000), (4096, 16)]
    f32, f64 = torch.float32, torch.float64
    condat_cases = [((4096, 1024), f32), ((64, 100_000), f32), ((1, 1_000_000), f32)]
    condat_cases += [((16384, 256), f32), ((4096, 1024), f64)]
    box_shape = (4096, 1024)
    sum_shape = (4096, 1024)
    lengths = [2**k for k in range(4, 21, 2)]
    if args.quick:
        paths = path_cases([(13,), (64, 27), (8, 576), (256, 64), (64, 1024), (4, 20_000)], [])
        paths += [("simplex", (64, 1024), torch.float64)]
        simplex_shapes = [(64, 1024), (4, 20_000), (256, 16)]
        condat_cases = [((64, 1024), f32), ((4, 20_000), f64)]
        box_shape = sum_shape = (64, 1024)
        lengths = [16, 256, 4096, 65_536]
        args.rounds, args.min_run_time, args.scaling_entries = 1, 0.02, 2**16
    torch.set_num_threads(args.threads)
    set_clock(args.clock)
    boxes = ["box [-0.5, 1]", "box [-4/n, 5/n]", "box [0, 10/n]"]
    machine = machine_description()
    print(f"Projection benchmark, randn, total 1, dim -1; {machine.splitlines()[0]}")
    sections, results = [], {}
    with torch.no_grad():
        timed = [
            (
                "paths",
                f"Path choice: forced searches and the automatic choice (Newton on eager CPU "
                f"from {_search._LARGE:,} entries, boxes from {_search._LARGE_BOX:,})",
                lambda: run_paths(paths, args.rounds, args.min_run_time),
            ),
            (
                "small",
                "Small inputs: sumto against the simplex sort formula in plain torch ops (float32)",
                lambda: run_small(small, args.rounds, args.min_run_time),
            ),
            ("aten", "Aten calls per projection (forward, no autograd)", lambda: run_aten(aten)),
            (
                "simplex",
                "Simplex projection (float32)",
                lambda: run_simplex(simplex_shapes, args.rounds, args.min_run_time),
            ),
            (
                "condat",
                "Long rows: project_simplex against Condat's serial C",
                lambda: run_condat(condat_cases, args.rounds, args.min_run_time),
            ),
            (
                "box",
                "Box-sum projection (float32)",
                lambda: run_box(box_shape, boxes, args.rounds, args.min_run_time),
            ),
            (
                "sum",
                "Affine sum projection (float32)",
                lambda: run_sum(sum_shape, args.rounds, args.min_run_time),
            ),
        ]
        for key, title, run in timed:
            table, result = run()
            print(f"\n{title}\n{table}")
            sections.append(f"### {title}\n\n{table}")
            results[key] = result
        scaling_table, scaling_results = run_scaling(
            lengths, args.scaling_entries, args.rounds, args.min_run_time
        )
        print(
            f"\nScaling: {args.scaling_entries:,} float32 entries, time per call\n" + scaling_table
        )
    results["scaling"] = scaling_results
    write(args.out, "projections.md", "\n\n".join(sections))
    write(args.out, "scaling.md", scaling_table)
    write(args.out, "machine.txt", machine)
    if args.out is not None:
        path = os.path.join(args.out, "scaling.png")
        plot_scaling(scaling_results, path, args.scaling_entries)
        print(f"\nwrote {args.out}/projections.md, scaling.md, scaling.png")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
