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

Timing: each variant is timed in ``--rounds`` interleaved rounds
(``Timer.blocked_autorange``); the table shows the fastest round's median, the
least disturbed by other processes on the machine.

Peak memory: the largest number of bytes held by torch's CPU allocator during one
call, above what was held when it started, read from the allocation events of
``torch.profiler`` (``profile_memory=True``). It counts every tensor the call
allocates (outputs, temporaries, saved activations, gradients), not the inputs.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.utils.benchmark as benchmark
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

import sumto

Step = Callable[[], object]


@dataclass
class Row:
    """Measured times (seconds) and peak memory (bytes) of one variant."""

    name: str
    forward: float | None = None
    train_frozen: float | None = None
    train_inputs: float | None = None
    peak_forward: int | None = None
    peak_train_frozen: int | None = None
    peak_train_inputs: int | None = None


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


def _time(fn: Step, min_run_time: float) -> float:
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


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
    min_run_time: float,
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

    for _ in range(rounds):
        floor.forward = _min(floor.forward, _time(lambda: _read_once(inputs), min_run_time))
        for name, fn in variants.items():
            row = rows[name]
            set_inputs_grad(False)
            row.forward = _min(row.forward, _time(fn, min_run_time))
            row.train_frozen = _min(row.train_frozen, _time(train(fn), min_run_time))
            set_inputs_grad(True)
            row.train_inputs = _min(row.train_inputs, _time(train(fn), min_run_time))
    set_inputs_grad(False)
    floor.peak_forward = _peak_bytes(lambda: _read_once(inputs))
    for name, fn in variants.items():
        row = rows[name]
        row.peak_forward = _peak_bytes(fn)
        row.peak_train_frozen = _peak_bytes(train(fn))
        set_inputs_grad(True)
        row.peak_train_inputs = _peak_bytes(train(fn))
        set_inputs_grad(False)
    return [*rows.values(), floor]


def _min(old: float | None, new: float) -> float:
    return new if old is None else min(old, new)


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.2f}"


def _mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def format_table(rows: list[Row]) -> str:
    """Markdown table of times (ms), peak memory (MiB) and the ratios to the naive forward."""
    naive = rows[0]
    head = (
        "| variant | forward ms | train ms (frozen inputs) | train ms (inputs need grad) "
        "| peak MiB fwd | peak MiB train (frozen) | peak MiB train (inputs need grad) |"
    )
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {r.name} | {_ms(r.forward)} | {_ms(r.train_frozen)} | {_ms(r.train_inputs)} "
            f"| {_mb(r.peak_forward)} | {_mb(r.peak_train_frozen)} | {_mb(r.peak_train_inputs)} |"
        )
    ours = next(r for r in rows if r.name == "sumto.WeightedSum")
    floor = rows[-1]
    ratios = [
        "",
        f"forward: naive / sumto = {_ratio(naive.forward, ours.forward)} (target >= 2.5x)",
        f"forward: sumto / read-once = {_ratio(ours.forward, floor.forward)} (target <= 1.5x)",
        "train step, frozen inputs: naive / sumto = "
        f"{_ratio(naive.train_frozen, ours.train_frozen)} (target >= 2x)",
        "train step, inputs need grad: naive / sumto = "
        f"{_ratio(naive.train_inputs, ours.train_inputs)} (target >= 2x)",
    ]
    return "\n".join(lines + ratios)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Command-line entry point; prints the table and returns the measured rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short timing")
    parser.add_argument("--num-inputs", type=int, default=13)
    parser.add_argument("--shape", type=int, nargs="+", default=[16, 128, 768])
    parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_inputs, args.shape, args.rounds, args.min_run_time = 4, [2, 8, 32], 1, 0.05
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(
        f"WeightedSum benchmark: K={args.num_inputs} inputs of shape {tuple(args.shape)} "
        f"{args.dtype}, CPU ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{args.rounds} rounds of min_run_time={args.min_run_time}s"
    )
    rows = run(args.num_inputs, args.shape, dtype, args.rounds, args.min_run_time)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
