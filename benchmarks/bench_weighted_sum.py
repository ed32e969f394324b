"""Benchmark sumto.WeightedSum against the naive ``sum(w * t ...)`` and stack + einsum.

Run: ``.venv/bin/python benchmarks/bench_weighted_sum.py`` (``--quick`` for a smoke run).

All variants run side by side in one process with ``torch.utils.benchmark``, on K
inputs of one shape with softmax weights over K learnable pre-weights:

* forward: one call with autograd recording (as in a training step), graph dropped;
* train step: forward + ``backward(grad)`` with a fixed upstream gradient, once with
  frozen inputs (no input gradient, e.g. SUPERB over a frozen backbone) and once with
  inputs that require gradients (end-to-end);
* "read inputs once": ``sum(x.sum() for x in inputs)``, the floor a forward that
  reads every input once can reach.

Then the targets of the performance issue, each as a ratio of two callables timed
side by side on one thread by its CPU time (interleaved rounds, medians): ``torch.compile`` (inductor)
of the module against ``torch.compile`` of the naive mix, forward + backward with
frozen inputs (K = 13 of (16, 128, 768)); the eager train step, naive / module (same
shapes); and a tiny mix (K = 3 of (8, 16)) forward under ``torch.no_grad()``, module
/ naive, where per-call overhead dominates.

Timing: every (variant, measurement) pair gets a ``torch.utils.benchmark.Timer``;
``--rounds`` rounds each take one sample of every pair in turn (``Timer.timeit`` of
enough calls for about ``--sample-time`` seconds), so that all variants see the same
machine load. The table shows the fastest sample (the estimate least disturbed by
other processes sharing the machine); the ratios are printed for the fastest and the
median sample.

Peak memory: the largest number of bytes held by torch's CPU allocator during one
call, above what was held when it started, read from the allocation events of
``torch.profiler`` (``profile_memory=True``). It counts every tensor the call
allocates (outputs, temporaries, saved activations, gradients), not the inputs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.utils.benchmark as benchmark
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

import sumto

Step = Callable[[], object]


METRICS = ("forward", "train_frozen", "train_inputs")


@dataclass
class Row:
    """Block times (seconds) per metric and peak memory (bytes) of one variant."""

    name: str
    times: dict[str, list[float]] = field(default_factory=dict)
    peaks: dict[str, int] = field(default_factory=dict)

    def best(self, metric: str) -> float | None:
        """Fastest sample: the estimate least disturbed by other load."""
        return min(self.times[metric]) if self.times.get(metric) else None

    def median(self, metric: str) -> float | None:
        """Median sample: a typical call under the run's load."""
        return statistics.median(self.times[metric]) if self.times.get(metric) else None


def _peak_bytes(fn: Step) -> int:
    """Peak bytes held by torch's CPU allocator during ``fn()``, above the start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == torch._C._profiler._EventType.Allocation:
            events.append(
                (
                    node.start_time_ns,
                    node.extra_fields.total_allocated,
                    node.extra_fields.alloc_size,
                )
            )
    if not events:
        return 0
    events.sort()
    start = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - start


class _Sampler:
    """Samples of one callable: ``Timer.timeit`` of a calibrated number of calls."""

    def __init__(
        self, fn: Step, sample_time: float, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.timer = benchmark.Timer(
            "fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), timer=clock
        )
        fn()  # warm-up
        once = self.timer.timeit(1).mean
        self.number = max(1, round(sample_time / max(once, 1e-9)))

    def sample(self) -> float:
        """Seconds per call, averaged over one sample."""
        return self.timer.timeit(self.number).mean


def _variants(
    inputs: list[Tensor], stacked: Tensor
) -> tuple[dict[str, Callable[[], Tensor]], Callable[[], None]]:
    """Forward callables of every variant, and a function clearing all gradients."""
    k = len(inputs)
    module = sumto.WeightedSum(k)
    pre = torch.nn.Parameter(torch.zeros(k))

    def naive() -> Tensor:
        weights = torch.softmax(pre, 0)
        return sum(w * t for w, t in zip(weights, inputs, strict=True))  # type: ignore[return-value]

    def stack_einsum() -> Tensor:
        weights = torch.softmax(pre, 0)
        return torch.einsum("k,k...->...", weights, torch.stack(inputs))

    def sumto_list() -> Tensor:
        return module(inputs)

    def sumto_stacked() -> Tensor:
        return module(stacked)

    variants = {
        "naive sum(w * t)": naive,
        "stack + einsum": stack_einsum,
        "sumto.WeightedSum": sumto_list,
        "sumto.WeightedSum (stacked input)": sumto_stacked,
    }
    leaves = [pre, *module.parameters(), *inputs, stacked]

    def clear() -> None:
        for leaf in leaves:
            leaf.grad = None

    return variants, clear


def _read_once(inputs: list[Tensor]) -> Tensor:
    return sum(x.sum() for x in inputs)  # type: ignore[return-value]


def run(
    num_inputs: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    rounds: int,
    sample_time: float,
) -> list[Row]:
    """Measure every variant; returns one row per variant plus the read-once floor."""
    torch.manual_seed(0)
    inputs = [torch.randn(*shape, dtype=dtype) for _ in range(num_inputs)]
    stacked = torch.stack(inputs)
    grad = torch.randn(*shape, dtype=dtype)
    variants, clear = _variants(inputs, stacked)
    rows = {name: Row(name) for name in variants}
    floor = Row("read inputs once: sum(x.sum())")

    def train(fn: Callable[[], Tensor]) -> Step:
        def step() -> None:
            fn().backward(grad)
            clear()

        return step

    def set_inputs_grad(flag: bool) -> None:
        for x in [*inputs, stacked]:
            x.requires_grad_(flag)

    # One sampler per (row, metric, inputs need grad); requires_grad is set per sample.
    samplers: list[tuple[Row, str, bool, _Sampler]] = []

    def add(row: Row, metric: str, needs_grad: bool, fn: Step) -> None:
        set_inputs_grad(needs_grad)
        samplers.append((row, metric, needs_grad, _Sampler(fn, sample_time)))

    add(floor, "forward", False, lambda: _read_once(inputs))
    for name, fn in variants.items():
        add(rows[name], "forward", False, fn)
        add(rows[name], "train_frozen", False, train(fn))
        add(rows[name], "train_inputs", True, train(fn))
    for _ in range(rounds):
        for row, metric, needs_grad, sampler in samplers:
            set_inputs_grad(needs_grad)
            row.times.setdefault(metric, []).append(sampler.sample())
    set_inputs_grad(False)
    floor.peaks["forward"] = _peak_bytes(lambda: _read_once(inputs))
    for name, fn in variants.items():
        row = rows[name]
        row.peaks["forward"] = _peak_bytes(fn)
        row.peaks["train_frozen"] = _peak_bytes(train(fn))
        set_inputs_grad(True)
        row.peaks["train_inputs"] = _peak_bytes(train(fn))
        set_inputs_grad(False)
    return [*rows.values(), floor]


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.2f}"


def _mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def format_table(rows: list[Row]) -> str:
    """Markdown table (fastest block, ms; peak MiB) and the target ratios, best and median."""
    head = (
        "| variant | forward ms | train ms (frozen inputs) | train ms (inputs need grad) "
        "| peak MiB fwd | peak MiB train (frozen) | peak MiB train (inputs need grad) |"
    )
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        times = " | ".join(_ms(r.best(m)) for m in METRICS)
        peaks = " | ".join(_mb(r.peaks.get(m)) for m in METRICS)
        lines.append(f"| {r.name} | {times} | {peaks} |")
    naive = rows[0]
    ours = next(r for r in rows if r.name == "sumto.WeightedSum")
    floor = rows[-1]
    lines.append("")
    lines.append("ratio (target): fastest sample / median sample")
    checks = [
        ("forward: naive / sumto (>= 2.5x)", naive, ours, "forward"),
        ("forward: sumto / read-once (<= 1.5x)", ours, floor, "forward"),
        ("train step, frozen inputs: naive / sumto (>= 2x)", naive, ours, "train_frozen"),
        ("train step, inputs need grad: naive / sumto (>= 2x)", naive, ours, "train_inputs"),
    ]
    for label, num, den, metric in checks:
        best = _ratio(num.best(metric), den.best(metric))
        typical = _ratio(num.median(metric), den.median(metric))
        lines.append(f"{label}: {best} / {typical}")
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


@dataclass
class Target:
    """One target ratio: ``numerator / denominator`` of two callables, median seconds."""

    label: str
    numerator: Step
    denominator: Step
    target: str
    times: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))

    def ratio(self) -> float:
        return statistics.median(self.times[0]) / statistics.median(self.times[1])


def _naive_mix(pre: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    weights = torch.softmax(pre, 0)
    return sum(weights[k] * x for k, x in enumerate(inputs))  # type: ignore[return-value]


def _target_cases(quick: bool) -> list[Target]:
    """The three target ratios, with their callables (compiling takes a while)."""
    torch.manual_seed(0)
    k, shape = (4, (2, 8, 32)) if quick else (13, (16, 128, 768))
    inputs = [torch.randn(*shape) for _ in range(k)]
    grad = torch.randn(*shape)
    module = sumto.WeightedSum(k)
    pre = torch.nn.Parameter(torch.zeros(k))
    compiled_module = torch.compile(module)
    compiled_naive = torch.compile(_naive_mix)

    def step(forward: Callable[[], Tensor]) -> Step:
        def run() -> None:
            forward().backward(grad)
            module.zero_grad(set_to_none=True)
            pre.grad = None

        return run

    tiny = [torch.randn(8, 16) for _ in range(3)]
    tiny_module = sumto.WeightedSum(3)
    tiny_pre = torch.nn.Parameter(torch.zeros(3))

    def no_grad(forward: Callable[[], Tensor]) -> Step:
        def run() -> None:
            with torch.no_grad():
                forward()

        return run

    cases = [
        Target(
            f"compiled fwd+bwd, K={k} {tuple(shape)}: sumto / naive",
            step(lambda: compiled_module(inputs)),
            step(lambda: compiled_naive(pre, inputs)),
            "<= 1.0x",
        ),
        Target(
            f"eager train step, K={k} {tuple(shape)}: naive / sumto",
            step(lambda: _naive_mix(pre, inputs)),
            step(lambda: module(inputs)),
            ">= 2x",
        ),
        Target(
            "no-grad forward, K=3 (8, 16): sumto / naive",
            no_grad(lambda: tiny_module(tiny)),
            no_grad(lambda: _naive_mix(tiny_pre, tiny)),
            "<= 1.2x",
        ),
    ]
    return cases


def run_targets(quick: bool, rounds: int, sample_time: float) -> list[Target]:
    """Time every target pair on one thread, both sides sampled in every round."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = _target_cases(quick)
        # CPU time of the one timing thread: other jobs on a shared machine barely
        # disturb it, unlike wall-clock time.
        samplers = [
            [_Sampler(fn, sample_time, time.thread_time) for fn in (c.numerator, c.denominator)]
            for c in cases
        ]
        for index in range(rounds):
            # Odd rounds sample the two sides in the other order, so that neither
            # always runs first after the previous case (cold caches).
            order = (0, 1) if index % 2 == 0 else (1, 0)
            for case, pair in zip(cases, samplers, strict=True):
                for side in order:
                    case.times[side].append(pair[side].sample())
    finally:
        torch.set_num_threads(threads)
    return cases


def format_targets(cases: list[Target]) -> str:
    """Markdown rows: the two medians and their ratio against the target."""
    lines = [
        "| target (1 thread, CPU time, median of interleaved samples) | numerator ms "
        "| denominator ms "
        "| ratio | target |",
        "|---|---|---|---|---|",
    ]
    for case in cases:
        num, den = (statistics.median(t) for t in case.times)
        lines.append(
            f"| {case.label} | {num * 1e3:.4f} | {den * 1e3:.4f} | {case.ratio():.2f}x "
            f"| {case.target} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Command-line entry point; prints the table and returns the measured rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short timing")
    parser.add_argument("--num-inputs", type=int, default=13)
    parser.add_argument("--shape", type=int, nargs="+", default=[16, 128, 768])
    parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--sample-time", type=float, default=0.05)
    parser.add_argument(
        "--targets-only", action="store_true", help="only the target ratios (one thread)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_inputs, args.shape, args.rounds, args.sample_time = 4, [2, 8, 32], 3, 0.005
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(
        f"WeightedSum benchmark: K={args.num_inputs} inputs of shape {tuple(args.shape)} "
        f"{args.dtype}, CPU ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{args.rounds} interleaved rounds of ~{args.sample_time}s samples"
    )
    rows: list[Row] = []
    if not args.targets_only:
        rows = run(args.num_inputs, args.shape, dtype, args.rounds, args.sample_time)
        print(format_table(rows))
        print()
    print(format_targets(run_targets(args.quick, args.rounds, args.sample_time)))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
