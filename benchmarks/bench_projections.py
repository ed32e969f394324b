"""Benchmark the sort-free exact projections of sumto against sorting, bisection and softmax.

Run: ``.venv/bin/python benchmarks/bench_projections.py`` (``--quick`` for a smoke
run, ``--out DIR`` to write the tables and the scaling plot there).

All variants of a case run side by side in one process on the same float32 CPU
tensor (``torch.randn``, total 1, constraint over the last dim, no autograd):

* ``sumto.project_simplex``: the pruned Newton search of ``sumto._kernels``;
* ``sort-based``: the previous implementation, a sort per row (Duchi et al. 2008)
  followed by the same masked formula (``functional._simplex_threshold_sort``);
* ``torch.softmax``: the cost of the smooth map onto the simplex;
* ``sumto.project_box_sum``: the safeguarded secant search with a subsample start;
* ``60-step bisection``: bisection on the shift, 60 steps, written with one reused
  work buffer (a strong baseline), then ``clamp``;
* ``blocked bisection`` (box table only): the same, with each step's passes run
  block of rows by block in a cache-sized buffer as sumto's search does;
* ``sort-based box``: the previous implementation, breakpoints sorted with cumulative
  sums (``functional._box_support_sort``), then the masked formula.

Timing: each variant is timed in ``--rounds`` interleaved rounds of
``torch.utils.benchmark.Timer.blocked_autorange``; a variant keeps its fastest
round's median, the least disturbed by other processes on the machine. Ratios are
formed from times measured in the same run. By default torch runs one intra-op
thread and the clock is the CPU time of that thread (``time.thread_time``): on a
machine shared with other jobs, wall-clock times of two threads mostly measure the
scheduler. ``--threads N --clock wall`` measures wall-clock time instead. The
scaling table holds the number of entries fixed (``--scaling-entries``) and varies
the row length n from 16 to 2**20.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.utils.benchmark as benchmark
from torch import Tensor

from sumto import functional as F

Step = Callable[[], object]
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
    variants: dict[str, Step], rounds: int, min_run_time: float
) -> dict[str, float]:
    """Seconds per call of each variant: the fastest of ``rounds`` interleaved medians."""
    for fn in variants.values():  # warm-up: lazy initialisation, allocator, caches
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
            best[name] = min(best[name], timer.blocked_autorange(min_run_time=min_run_time).median)
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
# the baselines: the previous (sort-based) implementations and bisection
# ---------------------------------------------------------------------------


def sort_based_simplex(x: Tensor, total: float = 1.0) -> Tensor:
    """project_simplex before issue 7: sort-based support, then the masked formula."""
    shifted = (x - x.amax(-1, keepdim=True)).clamp_min(-torch.finfo(x.dtype).max)
    support = F._simplex_threshold_sort(shifted, total)
    mask = support.to(x.dtype)
    count = mask.sum(-1, keepdim=True).clamp_min(1.0)
    tau = ((shifted * mask).sum(-1, keepdim=True) - total) / count
    return torch.where(support, shifted - tau, torch.zeros_like(shifted))


def sort_based_box(x: Tensor, total: float, lower: float, upper: float) -> Tensor:
    """project_box_sum before issue 7: sorted breakpoints, then the masked formula."""
    free, at_upper = F._box_support_sort(x, total, lower, upper)
    free_f, upper_f = free.to(x.dtype), at_upper.to(x.dtype)
    lower_f = 1.0 - free_f - upper_f
    count = free_f.sum(-1, keepdim=True)
    fixed = upper * upper_f.sum(-1, keepdim=True) + lower * lower_f.sum(-1, keepdim=True)
    tau = ((x * free_f).sum(-1, keepdim=True) - (total - fixed)) / count.clamp_min(1.0)
    bound = torch.where(at_upper, x.new_full((), upper), x.new_full((), lower))
    return torch.where(free, (x - tau).clamp(lower, upper), bound)


def bisection_box(
    x: Tensor,
    total: float,
    lower: float,
    upper: float,
    steps: int = 60,
    block_bytes: int | None = None,
) -> Tensor:
    """``clamp(x - tau, lower, upper)`` with tau from ``steps`` bisection steps (one buffer).

    With ``block_bytes``, each step's passes run block of rows by block, the cache
    blocking of sumto's box search (``_kernels._BLOCK_BYTES``), so that the speed-up
    of the search is not credited to blocking alone.
    """
    rows, n = x.shape
    block = rows if block_bytes is None else max(1, block_bytes // (n * x.element_size()))
    work = x.new_empty(min(block, rows), n)
    lo = x.amin(-1, keepdim=True) - upper
    hi = x.amax(-1, keepdim=True) - lower
    value = torch.empty_like(lo)  # filled block by block
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if block >= rows:  # one block: no slicing, the same few operations as ever
            value = torch.sub(x, mid, out=work).clamp_(lower, upper).sum(-1, keepdim=True)
        else:
            for start in range(0, rows, block):
                stop = min(start + block, rows)
                part = torch.sub(x[start:stop], mid[start:stop], out=work[: stop - start])
                torch.sum(part.clamp_(lower, upper), -1, keepdim=True, out=value[start:stop])
        above = value > total
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    out = work if work.shape[0] == rows else torch.empty_like(x)
    return torch.sub(x, 0.5 * (lo + hi), out=out).clamp_(lower, upper)


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


def simplex_variants(x: Tensor) -> dict[str, Step]:
    return {
        "sumto.project_simplex": lambda: F.project_simplex(x),
        "sort-based": lambda: sort_based_simplex(x),
        "torch.softmax": lambda: torch.softmax(x, -1),
    }


def box_variants(
    x: Tensor, total: float, lower: float, upper: float, blocked: bool = False
) -> dict[str, Step]:
    variants: dict[str, Step] = {
        "sumto.project_box_sum": lambda: F.project_box_sum(x, total, lower=lower, upper=upper),
        "60-step bisection": lambda: bisection_box(x, total, lower, upper),
        "sort-based box": lambda: sort_based_box(x, total, lower, upper),
    }
    if blocked:
        variants["blocked bisection"] = lambda: bisection_box(
            x, total, lower, upper, block_bytes=1 << 21
        )
    return variants


def max_error(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def run_simplex(
    shapes: Sequence[tuple[int, int]], rounds: int, min_run_time: float
) -> tuple[str, list[dict[str, object]]]:
    rows, results = [], []
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        times = time_interleaved(simplex_variants(x), rounds, min_run_time)
        fast, sort, soft = (
            times["sumto.project_simplex"],
            times["sort-based"],
            times["torch.softmax"],
        )
        error = max_error(F.project_simplex(x), sort_based_simplex(x))
        rows.append(
            [
                f"({shape[0]}, {shape[1]})",
                format_time(fast),
                format_time(sort),
                format_time(soft),
                f"**{sort / fast:.1f}x**",
                f"**{fast / soft:.1f}x**",
                f"{error:.1e}",
            ]
        )
        results.append({"shape": shape, **times, "max_abs_diff": error})
    header = [
        "shape",
        "project_simplex",
        "sort-based",
        "torch.softmax",
        "speed-up vs sort",
        "time / softmax",
        "max abs diff",
    ]
    return markdown_table(header, rows), results


def run_box(
    shape: tuple[int, int],
    boxes: Sequence[tuple[str, float, float, float]],
    rounds: int,
    min_run_time: float,
) -> tuple[str, list[dict[str, object]]]:
    rows, results = [], []
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for label, total, lower, upper in boxes:
        variants = box_variants(x, total, lower, upper, blocked=True)
        times = time_interleaved(variants, rounds, min_run_time)
        fast = times["sumto.project_box_sum"]
        bisect, sort = times["60-step bisection"], times["sort-based box"]
        blocked = times["blocked bisection"]
        error = max_error(
            F.project_box_sum(x, total, lower=lower, upper=upper),
            bisection_box(x, total, lower, upper),
        )
        rows.append(
            [
                f"({shape[0]}, {shape[1]}), {label}",
                format_time(fast),
                format_time(bisect),
                format_time(blocked),
                format_time(sort),
                f"**{bisect / fast:.1f}x**",
                f"{blocked / fast:.1f}x",
                f"{sort / fast:.1f}x",
                f"{error:.1e}",
            ]
        )
        results.append({"shape": shape, "box": label, **times, "max_abs_diff": error})
    header = [
        "case",
        "project_box_sum",
        "60-step bisection",
        "blocked bisection",
        "sort-based",
        "speed-up vs bisection",
        "vs blocked bisection",
        "speed-up vs sort",
        "max abs diff vs bisection",
    ]
    return markdown_table(header, rows), results


SCALING_VARIANTS = [
    "sumto.project_simplex",
    "sort-based",
    "torch.softmax",
    "sumto.project_box_sum",
    "60-step bisection",
    "sort-based box",
]


def run_scaling(
    lengths: Sequence[int], entries: int, rounds: int, min_run_time: float
) -> tuple[str, list[dict[str, float]]]:
    """Time per call against the row length n, ``entries`` entries in all."""
    rows, results = [], []
    for n in lengths:
        batch = max(1, entries // n)
        x = torch.randn(batch, n, generator=torch.Generator().manual_seed(2))
        # a box 4x wider than the mean 1/n on each side, holding total 1
        lower, upper = -4.0 / n, 5.0 / n
        variants = {**simplex_variants(x), **box_variants(x, 1.0, lower, upper)}
        times = time_interleaved(variants, rounds, min_run_time)
        results.append({"n": n, "rows": batch, **times})
        cells = [format_time(times[name]) for name in SCALING_VARIANTS]
        rows.append(
            [
                str(n),
                str(batch),
                *cells,
                f"{times['sort-based'] / times['sumto.project_simplex']:.1f}x",
                f"{times['60-step bisection'] / times['sumto.project_box_sum']:.1f}x",
            ]
        )
    header = [
        "n",
        "rows",
        "project_simplex",
        "sort-based",
        "softmax",
        "project_box_sum",
        "60-step bisection",
        "sort-based box",
        "simplex vs sort",
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
        "sumto.project_simplex": ("C0", "-", "o"),
        "sort-based": ("C0", "--", "o"),
        "torch.softmax": ("0.4", ":", "s"),
        "sumto.project_box_sum": ("C1", "-", "^"),
        "60-step bisection": ("C1", ":", "^"),
        "sort-based box": ("C1", "--", "^"),
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
    simplex_shapes = [(4096, 1024), (64, 100_000), (4096, 16)]
    box_shape = (4096, 1024)
    lengths = [2**k for k in range(4, 21, 2)]
    if args.quick:
        simplex_shapes = [(64, 1024), (4, 20_000), (256, 16)]
        box_shape = (64, 1024)
        lengths = [16, 256, 4096, 65_536]
        args.rounds, args.min_run_time, args.scaling_entries = 1, 0.02, 2**16
    torch.set_num_threads(args.threads)
    set_clock(args.clock)
    n = box_shape[1]
    boxes = [
        ("box [-0.5, 1]", 1.0, -0.5, 1.0),
        ("box [-4/n, 5/n]", 1.0, -4.0 / n, 5.0 / n),
        ("tight box [0, 10/n]", 1.0, 0.0, 10.0 / n),
    ]
    machine = machine_description()
    print(f"Projection benchmark, float32 randn, total 1, dim -1; {machine.splitlines()[0]}")
    with torch.no_grad():
        simplex_table, simplex_results = run_simplex(simplex_shapes, args.rounds, args.min_run_time)
        print("\nSimplex projection\n" + simplex_table)
        box_table, box_results = run_box(box_shape, boxes, args.rounds, args.min_run_time)
        print("\nBox-sum projection\n" + box_table)
        scaling_table, scaling_results = run_scaling(
            lengths, args.scaling_entries, args.rounds, args.min_run_time
        )
        print(f"\nScaling: {args.scaling_entries:,} entries, time per call\n" + scaling_table)
    write(args.out, "projections.md", f"{simplex_table}\n\n{box_table}\n")
    write(args.out, "scaling.md", scaling_table)
    write(args.out, "machine.txt", machine)
    if args.out is not None:
        path = os.path.join(args.out, "scaling.png")
        plot_scaling(scaling_results, path, args.scaling_entries)
        print(f"\nwrote {args.out}/projections.md, scaling.md, scaling.png")
    return {"simplex": simplex_results, "box": box_results, "scaling": scaling_results}


if __name__ == "__main__":
    main(sys.argv[1:])
