"""Condat's simplex projection in C, compiled at run time: a benchmark anchor only.

``load()`` compiles ``condat.c`` with the system's C compiler (``$CC``, else ``cc``)
into a temporary folder and returns a function ``project(x, total) -> Tensor`` for
contiguous float32/float64 CPU tensors (rows along the last dim), or ``None`` with
the reason when no compiler is present or the build fails. sumto itself stays pure
Python on torch; nothing here is imported by the library.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("condat.c")
Projection = Callable[[Tensor, float], Tensor]


def load() -> tuple[Projection | None, str]:
    """``(project, description)``, or ``(None, reason)`` when it cannot be built."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler found (set CC)"
    folder = tempfile.mkdtemp(prefix="sumto-condat-")
    library = os.path.join(folder, "condat.so")
    command = [compiler, "-O3", "-march=native", "-shared", "-fPIC", str(SOURCE), "-o", library]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return None, f"building condat.c failed: {detail.strip()[:200]}"
    lib = ctypes.CDLL(library)
    kinds = {torch.float32: (lib.condat_float_rows, ctypes.c_float)}
    kinds[torch.float64] = (lib.condat_double_rows, ctypes.c_double)
    for fn, scalar in kinds.values():
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        fn.argtypes += [scalar, ctypes.c_void_p]

    def project(x: Tensor, total: float = 1.0) -> Tensor:
        if x.device.type != "cpu" or x.dtype not in kinds or not x.is_contiguous():
            raise ValueError(f"expected a contiguous float32/float64 CPU tensor, got {x.dtype}")
        fn, _ = kinds[x.dtype]
        n = x.shape[-1]
        y = torch.empty_like(x)
        work = torch.empty(2 * n, dtype=x.dtype)
        fn(x.data_ptr(), y.data_ptr(), x.numel() // n, n, total, work.data_ptr())
        return y

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True)
    first_line = (version.stdout or compiler).splitlines()[0]
    return project, f"{first_line}, -O3 -march=native"
