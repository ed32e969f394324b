"""Optional-extra imports of the demo (tqdm, matplotlib), loaded lazily."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MissingExtraError", "progress", "require_extra"]

_EXTRA_MODULES = ("matplotlib", "tqdm")


class MissingExtraError(ImportError):
    """The optional ``demo`` extra (matplotlib, tqdm) is not installed."""


def require_extra() -> None:
    """Import the demo extra's modules, or raise a one-line :class:`MissingExtraError`."""
    for name in _EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise MissingExtraError(
                f"expected the optional 'demo' extra (matplotlib, tqdm) to be installed, "
                f"got {type(exc).__name__}: {exc}; install it with: pip install 'sumto[demo]'"
            ) from exc


def progress(total: int, desc: str) -> Any:
    """A tqdm progress bar on stderr counting optimisation steps."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True)
