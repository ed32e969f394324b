"""The ``sumto`` console command (also ``python -m sumto``).

``sumto demo`` trains the library's main use cases on generated and real data and
writes a summary and figures; it needs the optional ``demo`` extra (matplotlib,
tqdm, scikit-image, scikit-learn), which is imported only when the demo runs. ``sumto inspect CHECKPOINT`` lists the
sumto-constrained tensors of a saved ``state_dict`` with their sums along the
constrained dims, rebuilding each constraint from the configuration it saved.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import sumto
from sumto._safe_load import UntrustedContentError, load_checkpoint
from sumto.constraints import CONFIG_METADATA_KEY, EXTRA_STATE_FORMAT, Constraint

__all__ = ["main"]

_PROG = "sumto"
# <prefix>parametrizations.<name>.<index>._extra_state, prefix "" or "a.b." (older checkpoints)
_EXTRA_STATE_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?)parametrizations\.(?P<name>[^.]+)\.(?P<index>\d+)\._extra_state$"
)
# parametrizations.<name>.<index>, a key of the configurations in a module's metadata
_CONFIG_KEY = re.compile(r"parametrizations\.(?P<name>[^.]+)\.(?P<index>\d+)")
_MAX_NESTING = 3  # how deep ``inspect`` looks for state_dicts nested in a checkpoint dict
_SHOWN_VALUES = 8


class _InspectError(Exception):
    """A problem with one constrained tensor of a checkpoint (reported, not fatal)."""


def _error(command: str, message: str) -> None:
    """One line on stderr, no traceback."""
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"{_PROG} {command}: error: {first_line}", file=sys.stderr)


# ---------------------------------------------------------------------------
# sumto inspect
# ---------------------------------------------------------------------------


def _load_checkpoint(path: str, trusted: bool) -> Mapping[str, Any]:
    """Load a checkpoint (see ``sumto._safe_load``); ValueError with a one-line reason."""
    file = Path(path)
    if not file.exists():
        raise ValueError(f"expected an existing checkpoint file, got {path!r}: no such file")
    if not file.is_file():
        raise ValueError(f"expected a checkpoint file, got {path!r}: not a regular file")
    try:
        state = load_checkpoint(file, trusted=trusted)
    except UntrustedContentError as exc:
        raise ValueError(
            f"{exc} (file {path!r}); save model.state_dict() rather than whole objects, or "
            "pass --trusted if you trust the file (it runs code from the file)"
        ) from exc
    except ValueError as exc:
        raise ValueError(f"{exc} (file {path!r})") from exc
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ValueError(
            f"expected a state_dict (a dict of name -> tensor) in {path!r}, "
            f"got {type(state).__name__}"
        )
    return state


def _saved_configs(state: Mapping[str, Any]) -> dict[tuple[str, str], dict[int, Any]]:
    """Saved constraint configurations, by ``(prefix, tensor name)`` and index.

    Read from the state_dict's metadata, and from the ``_extra_state`` entries of older
    checkpoints (see Note [Constraint configuration in state_dict metadata]).
    """
    found: dict[tuple[str, str], dict[int, Any]] = {}
    for key, value in state.items():
        match = _EXTRA_STATE_KEY.match(key) if isinstance(key, str) else None
        if match:
            found.setdefault((match["prefix"], match["name"]), {})[int(match["index"])] = value
    metadata = getattr(state, "_metadata", None)
    if isinstance(metadata, Mapping):
        for owner, local in metadata.items():
            configs = local.get(CONFIG_METADATA_KEY) if isinstance(local, Mapping) else None
            if not isinstance(owner, str) or not isinstance(configs, Mapping):
                continue
            for rel, config in configs.items():
                match = _CONFIG_KEY.fullmatch(rel) if isinstance(rel, str) else None
                if match:
                    ident = (f"{owner}." if owner else "", match["name"])
                    found.setdefault(ident, {})[int(match["index"])] = config
    return found


def _state_dicts(state: Mapping[str, Any], label: str, depth: int) -> list[tuple[str, Any]]:
    """``(label, mapping)`` for ``state`` and, if it has no sumto constraints, nested dicts."""
    if _saved_configs(state):
        return [(label, state)]
    found: list[tuple[str, Any]] = []
    if depth < _MAX_NESTING:
        for key, value in state.items():
            if isinstance(value, Mapping):
                found += _state_dicts(value, f"{label}{key}/", depth + 1)
    return found


def _constraint_class(name: Any) -> type[Constraint]:
    cls = getattr(sumto, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, Constraint)):
        raise _InspectError(
            f"expected a constraint class of this sumto version ({sumto.__version__}), "
            f"got {name!r}; skipped"
        )
    return cls


def _rebuild(state: Mapping[str, Any], base: str, extra: Any) -> Constraint:
    """Rebuild the constraint saved under ``base`` (``...parametrizations.<name>.<i>.``)."""
    if not isinstance(extra, Mapping) or extra.get("format") != EXTRA_STATE_FORMAT:
        raise _InspectError(
            f"expected sumto constraint state ({EXTRA_STATE_FORMAT}), got {extra!r}"
        )
    cls = _constraint_class(extra.get("class"))
    config = extra.get("config")
    if not isinstance(config, Mapping):
        raise _InspectError(f"expected a config dict in the constraint state, got {config!r}")
    own = {
        key[len(base) :]: value
        for key, value in state.items()
        if key.startswith(base) and "." not in key[len(base) :]
    }
    kwargs: dict[str, Any] = {}
    for key, value in config.items():
        if value == "tensor":  # tensor-valued options are saved as buffers of that name
            if not isinstance(own.get(key), Tensor):
                raise _InspectError(f"expected a tensor entry {base + key!r}, got none")
            value = own[key]
        elif key == "dim" and isinstance(value, list):
            value = tuple(value)
        kwargs[str(key)] = value
    try:
        constraint = cls(**cls._saved_kwargs(kwargs, own))
        constraint.load_state_dict(dict(own), strict=True)
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as exc:
        raise _InspectError(
            f"expected a loadable {cls.__name__} configuration, got {dict(config)} ({exc})"
        ) from exc
    return constraint


def _format_values(values: Tensor) -> str:
    flat = values.flatten().tolist()  # printing only: not a hot path
    if len(flat) <= _SHOWN_VALUES:
        return "[" + ", ".join(f"{v:.7g}" for v in flat) + "]"
    head = ", ".join(f"{v:.7g}" for v in flat[:4])
    tail = ", ".join(f"{v:.7g}" for v in flat[-2:])
    return f"[{head}, ..., {tail}] (min {min(flat):.7g}, max {max(flat):.7g})"


def _describe(
    state: Mapping[str, Any], prefix: str, name: str, configs: Mapping[int, Any]
) -> list[str]:
    """Lines describing one constrained tensor: its shape and sums per constraint."""
    key = f"{prefix}{name}"
    plist = f"{prefix}parametrizations.{name}"
    original = state.get(f"{plist}.original")
    if not isinstance(original, Tensor):
        return [f"{key}: expected a tensor entry {plist + '.original'!r}, got none; skipped"]
    lines = [f"{key}: shape {tuple(original.shape)}, dtype {str(original.dtype).split('.')[-1]}"]
    value = original.detach()
    try:
        for index in range(max(configs) + 1):
            if index not in configs:
                raise _InspectError(
                    f"parametrization {index} of {key!r} is not a sumto constraint and "
                    "cannot be rebuilt from the checkpoint; skipped"
                )
            base = f"{plist}.{index}."
            constraint = _rebuild(state, base, configs[index])
            try:
                constraint._bind(value)
                with torch.no_grad():
                    value = constraint(value)
            except (TypeError, ValueError, IndexError, RuntimeError) as exc:
                raise _InspectError(
                    f"expected {key!r} to fit {type(constraint).__name__}, got {exc}"
                ) from exc
            dims = constraint.dims(value.ndim)
            sums = value.double().sum(dims) if value.ndim > 0 else value.double()
            violation = float(constraint.violation(value))
            tolerance = constraint.tolerance(value)
            verdict = "within" if violation <= tolerance else "OUTSIDE"
            lines.append(f"  {type(constraint).__name__}({constraint.extra_repr()})")
            lines.append(
                f"  sums over dims {dims}, shape {tuple(sums.shape)}: {_format_values(sums)}"
            )
            lines.append(
                f"  max violation {violation:.3g} ({verdict} the rounding tolerance "
                f"{tolerance:.3g})"
            )
    except _InspectError as exc:
        lines.append(f"  {exc}")
    return lines


def _inspect(args: argparse.Namespace) -> int:
    # Whatever a damaged or crafted file triggers ends in one line, without a traceback.
    try:
        state = _load_checkpoint(args.checkpoint, args.trusted)
    except ValueError as exc:
        _error("inspect", str(exc))
        return 1
    except Exception as exc:  # e.g. MemoryError, or anything a --trusted file raises
        _error("inspect", f"expected a checkpoint sumto can read, got {type(exc).__name__}: {exc}")
        return 1
    try:
        return _report(args.checkpoint, state)
    except Exception as exc:
        _error(
            "inspect", f"expected a checkpoint sumto can describe, got {type(exc).__name__}: {exc}"
        )
        return 1


def _report(checkpoint: str, state: Mapping[str, Any]) -> int:
    found = _state_dicts(state, "", 0)
    total = 0
    out: list[str] = []
    for label, sub in found:
        for (prefix, name), configs in sorted(_saved_configs(sub).items()):
            lines = _describe(sub, prefix, name, configs)
            out.append(label + lines[0])
            out += lines[1:]
            total += 1
    plural = "" if total == 1 else "s"
    if total == 0:
        print(
            f"{checkpoint}: no sumto-constrained tensors among {len(state)} entries "
            "(a baked or plain checkpoint stores plain weights)"
        )
    else:
        print(f"{checkpoint}: {total} sumto-constrained tensor{plural}")
        print("\n".join(out))
    return 0


# ---------------------------------------------------------------------------
# sumto demo
# ---------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from sumto._demo import MissingExtraError, format_table, run_demo

    start = time.perf_counter()
    try:
        summary, files = run_demo(
            Path(args.out), steps=args.steps, seed=args.seed, real=not args.no_real
        )
    except MissingExtraError as exc:
        _error("demo", str(exc))
        return 1
    except OSError as exc:
        _error("demo", f"expected a writable output folder {args.out!r}, got {exc}")
        return 1
    print(format_table(summary))
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    print(f"finished in {time.perf_counter() - start:.1f} s")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Learnable PyTorch weights that satisfy sum constraints by construction.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {sumto.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="learn fusion weights and sharpening kernels on generated and real data",
        description=(
            "Run three experiments on generated data (fusion weights, a sharpening kernel "
            "compared with softmax and divide-by-sum, missing inputs) and two on real data "
            "shipped inside scikit-image and scikit-learn, nothing downloaded (sharpening "
            "kernels learned from photos, ensemble weights over classifiers), print a table "
            "and write DIR/summary.json and PNG figures. Needs the 'demo' extra: "
            "pip install 'sumto[demo]'."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", default="demo-out", metavar="DIR", help="output folder")
    demo.add_argument(
        "--steps", type=_positive_int, default=400, metavar="N", help="optimiser steps per run"
    )
    demo.add_argument("--seed", type=int, default=0, metavar="S", help="random seed")
    demo.add_argument(
        "--no-real",
        action="store_true",
        help=(
            "skip the real-data section (sharpening kernels learned from photos shipped "
            "with scikit-image; ensemble weights over scikit-learn classifiers on digits)"
        ),
    )
    demo.set_defaults(handler=_demo)
    inspect = commands.add_parser(
        "inspect",
        help="list the sumto-constrained tensors of a saved state_dict and their sums",
        description=(
            "Load a checkpoint written by torch.save and print, for every sumto-constrained "
            "tensor of the state_dicts in it, its shape and its sums along the constrained "
            "dims. By default the file is read without running code from it "
            "(torch.load with weights_only=True and mmap=True, after a check of every tensor "
            "header against the file size): it may hold tensors, dicts, lists, tuples, sets, "
            "numbers, strings, torch.Size, torch.device, argparse.Namespace, numpy scalars, "
            "dtypes and arrays, and pathlib paths; anything else is refused, naming it."
        ),
    )
    inspect.add_argument("checkpoint", metavar="CHECKPOINT", help="file written by torch.save")
    inspect.add_argument(
        "--trusted",
        action="store_true",
        help=(
            "load with the full pickle loader (torch.load with weights_only=False), which "
            "reads any object but EXECUTES ARBITRARY CODE from the file and does not bound "
            "memory: use it only on files you trust (default: off)"
        ),
    )
    inspect.set_defaults(handler=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``sumto`` command line and return its exit status.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        0 on success, 1 when a command fails (one-line message on stderr), 2 for a
        usage error.

    Example:
        >>> from sumto.cli import main
        >>> main(["--version"])  # doctest: +ELLIPSIS
        sumto ...
        0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    status: int = args.handler(args)
    return status
