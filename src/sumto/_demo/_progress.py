"""Optional-extra imports of the demo (tqdm, matplotlib, scikit-image, scikit-learn), loaded lazily."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MissingExtraError", "progress", "require_extra"]

_EXTRA_MODULES = ("matplotlib", "tqdm")
# the real-data section's modules: the ones the demo extra adds for it
_REAL_MODULES = ("skimage", "sklearn")


class MissingExtraError(ImportError):
    """The optional ``demo`` extra (matplotlib, tqdm, scikit-image, scikit-learn) is missing."""


def require_extra(real: bool = True) -> None:
    """Import the demo extra's modules, or raise a one-line :class:`MissingExtraError`.

    Args:
        real: Also require the real-data section's modules (scikit-image, scikit-learn).
    """
    for name in _EXTRA_MODULES + (_REAL_MODULES if real else ()):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            hint = (
                " (or skip the real-data section with --no-real)" if name in _REAL_MODULES else ""
            )
            raise MissingExtraError(
                "expected the optional 'demo' extra (matplotlib, tqdm, scikit-image, "
                f"scikit-learn) to be installed, got {type(exc).__name__}: {exc}; install it "
                f"with: pip install 'sumto[demo]'{hint}"
            ) from exc


def progress(total: int, desc: str) -> Any:
    """A tqdm progress bar on stderr counting optimisation steps."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True)
