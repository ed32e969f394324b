"""Benchmark doubly stochastic maps: the exact projection against Sinkhorn and a Dykstra loop.

Run: ``.venv/bin/python benchmarks/bench_transport.py`` (``--quick`` for a smoke run,
``--out DIR`` to write the table there as ``transport.md``).

For standard normal ``(..., n, n)`` inputs (float32), side by side in one process:

* ``project_transport``: sumto's exact Euclidean projection onto the doubly
  stochastic matrices (float64 inside, eager CPU: it stops once the optimality
  check passes);
* ``sinkhorn``: sumto's log-domain Sinkhorn with its default iteration count, and
  with the iterations it needs to bring every row sum within ``1e-6`` (a different
  map: the entropic one, never sparse);
* a plain Dykstra loop in float64 (alternating projections onto the affine marginal
  set, in closed form, and onto ``P >= 0``, with Dykstra's correction), run for the number
  of iterations it needs to come within ``1e-6`` of the exact projection, found in
  a calibration run before timing (capped at ``--dykstra-cap``).

Timing as in ``bench_projections.py``: interleaved rounds of
``torch.utils.benchmark.Timer.blocked_autorange``, fastest round's median per variant,
one intra-op thread and its CPU time by default.
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
from torch import Tensor

from sumto.functional import project_transport, sinkhorn

ACCURACY = 1e-6


def dykstra_step(p: Tensor, inc: Tensor) -> tuple[Tensor, Tensor]:
    """One round of Dykstra's projections onto {P 1 = 1, P^T 1 = 1}, then {P >= 0}."""
    m, n = p.shape[-2:]
    e_r = p.sum(-1) - 1.0
    e_c = p.sum(-2) - 1.0
    total = e_r.sum(-1, keepdim=True)
    y = p - (e_r / n).unsqueeze(-1) - ((e_c - total / n) / m).unsqueeze(-2)
    z = y + inc
    p = z.clamp_min(0.0)
    return p, z - p


def dykstra(x: Tensor, iters: int) -> Tensor:
    """Dykstra's alternating projections, ``iters`` rounds."""
    p, inc = x, torch.zeros_like(x)
    for _ in range(iters):
        p, inc = dykstra_step(p, inc)
    return p


def dykstra_iterations(x: Tensor, exact: Tensor, cap: int) -> int:
    """Iterations Dykstra needs to come within ``ACCURACY`` of ``exact`` (checked every 10)."""
    p = x.double()
    inc = torch.zeros_like(p)
    for it in range(1, cap + 1):
        p, inc = dykstra_step(p, inc)
        if it % 10 == 0 and float((p - exact).abs().max()) <= ACCURACY:
            return it
    return cap


def sinkhorn_iterations(x: Tensor, cap: int) -> int:
    """Iterations Sinkhorn needs to bring every row sum within ``ACCURACY`` of 1."""
    for it in range(1, cap + 1):
        p = sinkhorn(x, iters=it)
        if float((p.sum(-1) - 1).abs().max()) <= ACCURACY:
            return it
    return cap


def run_shape(shape: tuple[int, ...], rounds: int, min_run_time: float, cap: int) -> list[str]:
    torch.manual_seed(0)
    x = torch.randn(shape)
    x64 = x.double()  # Dykstra in float64, as the projection computes (float32 stalls near 1e-5)
    exact = project_transport(x64)
    dyk_iters = dykstra_iterations(x, exact, cap)
    sk_iters = sinkhorn_iterations(x, 2000)
    variants: dict[str, Callable[[], object]] = {
        "project": lambda: project_transport(x),
        "sinkhorn": lambda: sinkhorn(x),
        "sinkhorn_acc": lambda: sinkhorn(x, iters=sk_iters),
        "dykstra": lambda: dykstra(x64, dyk_iters),
    }
    times = time_interleaved(variants, rounds, min_run_time)
    err_project = float((project_transport(x).double() - exact).abs().max())
    err_dykstra = float((dykstra(x64, dyk_iters) - exact).abs().max())
    capped = " (cap)" if dyk_iters >= cap else ""
    return [
        str(shape),
        format_time(times["project"]),
        format_time(times["sinkhorn"]),
        f"{format_time(times['sinkhorn_acc'])} ({sk_iters} it)",
        f"{format_time(times['dykstra'])} ({dyk_iters} it{capped})",
        f"**{times['dykstra'] / times['project']:.2f}x**",
        f"{err_project:.1e} / {err_dykstra:.1e}",
    ]


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for transport.md")
    parser.add_argument("--quick", action="store_true", help="small shapes, short timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--dykstra-cap", type=int, default=20000)
    args = parser.parse_args(argv)
    shapes: list[tuple[int, ...]] = [(8, 8), (64, 64), (16, 32, 32)]
    if args.quick:
        shapes = [(4, 4), (2, 8, 8)]
        args.rounds, args.min_run_time, args.dykstra_cap = 1, 0.02, 2000
    torch.set_num_threads(args.threads)
    set_clock(args.clock)
    print(f"Doubly stochastic maps; {machine_description().splitlines()[0]}")
    header = [
        "shape (float32)",
        "project_transport",
        "sinkhorn (default 50 it)",
        f"sinkhorn, rows within {ACCURACY:g}",
        f"Dykstra (float64), within {ACCURACY:g} of the projection",
        "Dykstra / project",
        "max abs diff vs f64 projection: project / Dykstra",
    ]
    rows = [run_shape(s, args.rounds, args.min_run_time, args.dykstra_cap) for s in shapes]
    table = markdown_table(header, rows)
    print(table)
    write(args.out, "transport.md", table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
