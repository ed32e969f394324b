"""Run sumto's benchmarks and write their tables to one folder (``make bench``).

Run: ``.venv/bin/python benchmarks/run.py --out bench-out`` (``--quick`` for a small
smoke run of every benchmark; ``--threads N --clock wall`` for wall-clock times with N
intra-op threads instead of the default: one thread, timed by its CPU time, which
other jobs on a shared machine barely disturb).

It runs, in one process and in this order:

* ``bench_projections.py``: each threshold search forced against the automatic
  choice, small inputs and their aten call counts, the projections against the
  textbook formulas, bisection and softmax, and their scaling with the row length
  (``projections.md``, ``scaling.md``, ``scaling.png``);
* ``bench_overhead.py``: what a parametrization adds to a training step, and
  ``parametrize.cached()`` (``overhead.md``);
* ``bench_weighted_sum.py``, when present: its ``main(argv)``, output captured to
  ``weighted_sum.md``;
* ``bench_transport.py``: the exact doubly stochastic projection against Sinkhorn
  and a Dykstra loop (``transport.md``);
* ``profile_floors.py``: the simplex projection stage by stage on long rows, and the
  operators small inputs call (``floors.md``).

``summary.md`` collects every table with the command and the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import shlex
import sys
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))


class _Tee(io.TextIOBase):
    """Write to the console and keep a copy."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.stream.flush()
        return self.copy.write(text)


def _read(out: str, name: str) -> str:
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return "(not produced)"
    with open(path) as handle:
        return handle.read().strip()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    parser.add_argument("--quick", action="store_true", help="small shapes, short timing")
    parser.add_argument("--threads", type=int, default=None, help="default: 1 (see above)")
    parser.add_argument("--clock", choices=["thread", "wall"], default=None)
    args = parser.parse_args(argv)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    os.makedirs(args.out, exist_ok=True)
    common = ["--out", args.out] + (["--quick"] if args.quick else [])
    if args.threads is not None:
        common += ["--threads", str(args.threads)]
    if args.clock is not None:
        common += ["--clock", args.clock]
    started = time.time()

    projections = importlib.import_module("bench_projections")
    projections.main(common)
    print()
    overhead = importlib.import_module("bench_overhead")
    overhead.main(common)

    weighted_sum = None
    if os.path.exists(os.path.join(HERE, "bench_weighted_sum.py")):
        print()
        tee = _Tee(sys.stdout)  # type: ignore[arg-type]
        with contextlib.redirect_stdout(tee):
            module = importlib.import_module("bench_weighted_sum")
            threads = [] if args.threads is None else ["--threads", str(args.threads)]
            module.main((["--quick"] if args.quick else []) + threads)
        weighted_sum = tee.copy.getvalue()
        projections.write(args.out, "weighted_sum.md", weighted_sum)

    print()
    transport = importlib.import_module("bench_transport")
    transport.main(common)

    print()
    floors = importlib.import_module("profile_floors")
    floors.main(common)

    command = " ".join(["python benchmarks/run.py", *map(shlex.quote, argv or sys.argv[1:])])
    sections = [
        "# sumto benchmarks",
        f"Command: `{command}` ({time.time() - started:.0f} s)",
        "Machine:\n\n```\n" + _read(args.out, "machine.txt") + "\n```",
        "## Projections\n\n" + _read(args.out, "projections.md"),
        "## Scaling (time per call against the row length n)\n\n"
        + _read(args.out, "scaling.md")
        + "\n\n![scaling](scaling.png)",
        "## Parametrization overhead of a training step\n\n" + _read(args.out, "overhead.md"),
    ]
    if weighted_sum is not None:
        sections.append("## WeightedSum\n\n```\n" + weighted_sum.strip() + "\n```")
    sections.append("## Doubly stochastic maps\n\n" + _read(args.out, "transport.md"))
    sections.append("## Floors: where the time goes\n\n" + _read(args.out, "floors.md"))
    projections.write(args.out, "summary.md", "\n\n".join(sections))
    print(f"\nwrote {args.out}/summary.md")


if __name__ == "__main__":
    main(sys.argv[1:])
