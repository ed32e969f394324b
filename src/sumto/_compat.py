"""Shims for the range of torch versions sumto supports (torch>=2.2)."""

from __future__ import annotations

try:
    from torch.compiler import is_compiling
except ImportError:  # torch 2.2: only the dynamo spelling exists
    from torch._dynamo import is_compiling  # type: ignore[attr-defined,no-redef]

__all__ = ["is_compiling"]
