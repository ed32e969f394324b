"""Benchmark what a sumto parametrization adds to a training step, and parametrize.cached().

Run: ``.venv/bin/python benchmarks/bench_overhead.py`` (``--quick`` for a smoke run,
``--out DIR`` to write the table there).

A training step is: gradients cleared (``grad = None``), forward, and
``backward(grad)`` with a fixed upstream gradient; no optimizer step. Each layer runs
unconstrained, with its weight constrained by the register helpers, and with the
floor of any map, ``w * 1.0`` registered with ``parametrize`` (a new weight forward,
a new gradient backward, nothing else), and with the affine map and the softmax
written as plain torch lines under ``parametrize`` (what the maps cost without
sumto's checks and exactness passes), side by side in one process:

* ``Conv2d(64, 64, 3, padding=1)`` on a (32, 64, 32, 32) batch;
* ``Linear(1024, 1024)`` on a batch of 64;
* ``RNNCell(256, 256)`` unrolled over T = 50 steps (batch 32) with a constrained
  hidden-to-hidden weight, which the unroll reads T times: once without a cache
  (the constraint is recomputed, and back-propagated, T times) and once inside
  ``torch.nn.utils.parametrize.cached()`` (computed once per step).

``parametrize.cached()``: wrap exactly one forward that reads a constrained weight
several times (an unrolled RNN cell, a weight shared by several layers); run
``backward`` and ``optimizer.step()`` after the ``with`` block. Inside it the first
read computes the weight and later reads reuse it, so autograd also sums their
gradients before one backward through the constraint. A cache must not outlive the
step: after ``optimizer.step()`` it would hand out the old weight.

Compiled against eager: the same ``Linear`` training step under ``torch.compile``
(inductor; the step function compiled, the module and its parametrization inside),
for each constrained weight, against the eager step, side by side.

Timing as in ``bench_projections.py``: interleaved rounds of
``torch.utils.benchmark.Timer.blocked_autorange``, fastest round's median per variant,
one intra-op thread and its CPU time by default (``--threads N --clock wall`` for
wall-clock time).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch
from bench_projections import (
    CLOCKS,
    format_time,
    machine_description,
    markdown_table,
    set_clock,
    time_interleaved,
    write,
)
from torch import Tensor, nn
from torch.nn.utils import parametrize

import sumto

Make = Callable[[], nn.Module]


class _Copy(nn.Module):
    """The cheapest map that makes a new weight (and, backward, a new gradient)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 1.0


def _floor(module: nn.Module, name: str) -> nn.Module:
    parametrize.register_parametrization(module, name, _Copy())
    return module


class _PlainAffine(nn.Module):
    """The affine map as one line of torch, one sum per output unit: no exactness pass."""

    def forward(self, x: Tensor) -> Tensor:
        dims = tuple(range(1, x.ndim))
        return x - x.mean(dims, keepdim=True) + 1.0 / x[0].numel()


class _PlainSoftmax(nn.Module):
    """``torch.softmax`` over each output unit's weights: the map without sumto."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(x.flatten(1), -1).view_as(x)


def _plain(map_: type[nn.Module]) -> Callable[[nn.Module, str], nn.Module]:
    def register(module: nn.Module, name: str) -> nn.Module:
        parametrize.register_parametrization(module, name, map_())
        return module

    return register


CONSTRAINTS: dict[str, Callable[[nn.Module, str], nn.Module]] = {
    "unconstrained": lambda m, name: m,
    "floor: w * 1.0 (parametrize)": _floor,
    "plain affine formula (parametrize)": _plain(_PlainAffine),
    "sum_to": lambda m, name: sumto.sum_to(m, name),
    "plain torch.softmax (parametrize)": _plain(_PlainSoftmax),
    "simplex (softmax)": lambda m, name: sumto.simplex(m, name),
    "simplex (sparsemax)": lambda m, name: sumto.simplex(m, name, method="sparsemax"),
    "box_sum [-0.5, 1]": lambda m, name: sumto.box_sum(m, name, lower=-0.5, upper=1.0),
}


def layer_step(module: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    params = list(module.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        module(x).backward(grad)

    return step


def run_layer(
    label: str, make: Make, x: Tensor, rounds: int, min_run_time: float
) -> tuple[list[list[str]], dict[str, float]]:
    grad = torch.randn_like(make()(x))
    steps = {}
    for name, constrain in CONSTRAINTS.items():
        torch.manual_seed(0)
        steps[name] = layer_step(constrain(make(), "weight"), x, grad)
    times = time_interleaved(steps, rounds, min_run_time)
    base = times["unconstrained"]
    rows = [
        [label, name, format_time(t), f"{t / base:.3f}", f"{(t / base - 1) * 100:+.1f}%"]
        for name, t in times.items()
    ]
    return rows, times


COMPILED = ["sum_to", "simplex (softmax)", "simplex (sparsemax)", "box_sum [-0.5, 1]"]


def run_compiled(
    features: int, batch: int, rounds: int, min_run_time: float, backend: str
) -> tuple[list[list[str]], dict[str, float]]:
    """Training steps of a constrained ``Linear``, compiled and eager, side by side."""
    x = torch.randn(batch, features)
    grad = torch.randn(batch, features)
    rows, results = [], {}
    for name in COMPILED:
        torch.manual_seed(0)
        eager = layer_step(CONSTRAINTS[name](nn.Linear(features, features), "weight"), x, grad)
        torch.manual_seed(0)
        layer = CONSTRAINTS[name](nn.Linear(features, features), "weight")
        compiled = torch.compile(layer_step(layer, x, grad), backend=backend)
        compiled()  # compile outside the timer
        times = time_interleaved({"eager": eager, "compiled": compiled}, rounds, min_run_time)
        ratio = times["compiled"] / times["eager"]
        rows.append(
            [
                f"Linear({features}, {features}) on ({batch}, {features})",
                name,
                format_time(times["eager"]),
                format_time(times["compiled"]),
                f"**{ratio:.2f}x**",
            ]
        )
        results[name] = ratio
    torch._dynamo.reset()
    return rows, results


def rnn_steps(
    hidden: int, batch: int, steps: int, constraint: str
) -> tuple[dict[str, Callable[[], None]], float]:
    """Training steps of an unrolled RNNCell, without and with ``parametrize.cached()``."""
    torch.manual_seed(0)
    xs = torch.randn(steps, batch, hidden)
    h0 = torch.zeros(batch, hidden)
    grad = torch.randn(batch, hidden)
    cells = {"unconstrained": nn.RNNCell(hidden, hidden)}
    torch.manual_seed(0)
    cells[constraint] = CONSTRAINTS[constraint](nn.RNNCell(hidden, hidden), "weight_hh")

    def unroll(cell: nn.Module) -> Tensor:
        h = h0
        for x in xs:
            h = cell(x, h)
        return h

    def make_step(cell: nn.Module, cached: bool) -> Callable[[], None]:
        params = list(cell.parameters())

        def step() -> None:
            for p in params:
                p.grad = None
            if cached:
                with parametrize.cached():
                    h = unroll(cell)
            else:
                h = unroll(cell)
            h.backward(grad)

        return step

    constrained = cells[constraint]
    variants = {
        "unconstrained": make_step(cells["unconstrained"], cached=False),
        f"{constraint}, no cache": make_step(constrained, cached=False),
        f"{constraint}, parametrize.cached()": make_step(constrained, cached=True),
    }
    # the cache changes the cost, not the result
    grads = []
    for key in (f"{constraint}, no cache", f"{constraint}, parametrize.cached()"):
        variants[key]()
        grads.append(constrained.parametrizations.weight_hh.original.grad.clone())
    return variants, float((grads[0] - grads[1]).abs().max())


def run_rnn(
    hidden: int, batch: int, steps: int, rounds: int, min_run_time: float
) -> tuple[list[list[str]], list[dict[str, float]]]:
    rows, results = [], []
    for constraint in ("sum_to", "simplex (softmax)"):
        variants, grad_diff = rnn_steps(hidden, batch, steps, constraint)
        times = time_interleaved(variants, rounds, min_run_time)
        base = times["unconstrained"]
        label = f"RNNCell({hidden}, {hidden}), T={steps}, batch {batch}"
        for name, t in times.items():
            if name == "unconstrained" and rows:
                continue
            rows.append(
                [label, name, format_time(t), f"{t / base:.3f}", f"{(t / base - 1) * 100:+.1f}%"]
            )
        results.append({**times, "max_grad_diff_cached_vs_not": grad_diff})
    return rows, results


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Command-line entry point; prints the table and returns the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short timing")
    parser.add_argument("--out", default=None, help="folder for the table")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=None, help="thread or wall")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args(argv)
    conv_in, conv_batch = (64, (32, 64, 32, 32))
    lin_in, lin_batch = 1024, 64
    rnn = (256, 32, 50)
    if args.quick:
        conv_in, conv_batch = 8, (4, 8, 16, 16)
        lin_in, lin_batch = 128, 8
        rnn = (32, 4, 10)
        args.rounds, args.min_run_time = 1, 0.02
    torch.set_num_threads(args.threads)
    set_clock(args.clock)
    print(f"Parametrization overhead of a training step; {machine_description().splitlines()[0]}")
    torch.manual_seed(0)
    conv_x = torch.randn(conv_batch)
    lin_x = torch.randn(lin_batch, lin_in)
    conv_rows, conv_times = run_layer(
        f"Conv2d({conv_in}, {conv_in}, 3) on {tuple(conv_batch)}",
        lambda: nn.Conv2d(conv_in, conv_in, 3, padding=1),
        conv_x,
        args.rounds,
        args.min_run_time,
    )
    lin_rows, lin_times = run_layer(
        f"Linear({lin_in}, {lin_in}) on ({lin_batch}, {lin_in})",
        lambda: nn.Linear(lin_in, lin_in),
        lin_x,
        args.rounds,
        args.min_run_time,
    )
    rnn_rows, rnn_results = run_rnn(*rnn, args.rounds, args.min_run_time)
    header = ["layer", "weight", "train step", "ratio", "overhead"]
    table = markdown_table(header, conv_rows + lin_rows + rnn_rows)
    print(table)
    backend = "aot_eager" if args.quick else "inductor"
    compiled_rows, compiled_ratios = run_compiled(
        lin_in, lin_batch, args.rounds, args.min_run_time, backend
    )
    compiled_header = ["layer", "weight", "eager step", f"compiled ({backend})", "compiled / eager"]
    compiled_table = markdown_table(compiled_header, compiled_rows)
    print(f"\nCompiled against eager training steps\n{compiled_table}")
    table += "\n\nCompiled against eager training steps\n\n" + compiled_table
    for result in rnn_results:
        print(f"max |grad(no cache) - grad(cached)| = {result['max_grad_diff_cached_vs_not']:.1e}")
    write(args.out, "overhead.md", table)
    return {
        "conv": conv_times,
        "linear": lin_times,
        "rnn": rnn_results,
        "compiled_over_eager": compiled_ratios,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
