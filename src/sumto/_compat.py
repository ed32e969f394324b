"""Every private or version-specific torch call of sumto, behind a named function.

sumto declares ``torch>=2.5``. Each shim says what it falls back to when the private
name is missing, and the fallback is the safe choice: code that cannot tell whether
a transform is active takes the path that is valid under every transform.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize

__all__ = [
    "along_first_dim",
    "compiling_opaque",
    "eager",
    "forward_ad_active",
    "functorch_active",
    "inject_property",
    "is_compiling",
    "is_tracing",
    "own_parameter",
    "registering_by_torch",
    "transforming",
    "transforms_active",
    "wide_dtype",
]

is_compiling = torch.compiler.is_compiling


def is_tracing() -> bool:
    """Whether ``torch.jit.trace`` is recording."""
    return bool(torch.jit.is_tracing())  # type: ignore[attr-defined,no-untyped-call]


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform is active (``True`` when torch cannot say)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if active is None else bool(active())


def forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (``True`` when torch cannot say)."""
    level = getattr(forward_ad, "_current_level", None)
    return True if not isinstance(level, int) else level >= 0


def own_parameter(module: nn.Module, name: str) -> Any:
    """``module``'s own parameter ``name`` (an uninitialised one too), or ``None``."""
    return module._parameters.get(name)


def functorch_active(x: Tensor) -> bool:
    """Whether a ``torch.func`` transform is active or ``x`` is one of its wrapped tensors.

    Without the private probes, answer ``True``: the caller then takes the path that
    is valid under every transform.
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    if active is None or wrapped is None:
        return True
    return bool(active()) or bool(wrapped(x))


def transforming(x: Tensor) -> bool:
    """Whether compile, export, ``torch.jit.trace`` or a ``torch.func`` transform records ``x``.

    Under these, reading a tensor's value on the host is impossible or would be baked
    into the recorded program.
    """
    return is_compiling() or is_tracing() or functorch_active(x)


def eager(x: Tensor) -> bool:
    """Whether data-dependent Python control flow on ``x`` is free and safe.

    True on CPU in plain eager mode only: not while compiling or exporting, not while
    ``torch.jit.trace`` records (loop counts would be baked into the trace), not under
    ``torch.func`` transforms, and not on other devices (each decision would wait for
    the device).
    """
    return x.device.type == "cpu" and not transforming(x)


def is_exporting() -> bool:
    """Whether ``torch.export`` records (``False`` when torch cannot say)."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(exporting()) if exporting is not None else False


def compiling_opaque(x: Tensor) -> bool:
    """Whether ``torch.compile`` records ``x`` outside export and ``torch.func``.

    There an opaque operator can stand for eager code. Without the private probe
    (:func:`transforms_active` then answers ``True``), answer ``False``: the caller
    then traces the code itself, valid everywhere. Only the global probe is asked:
    dynamo cannot trace the wrapped-tensor probe on ``x``.
    """
    return is_compiling() and not is_exporting() and not transforms_active()


def along_first_dim(t: Tensor) -> list[Tensor]:
    """``t[0], t[1], ...``: the slices along dim 0, each a ``select`` of ``t``.

    Not ``t.unbind(0)``, whose gradient inductor (torch 2.13) computes wrong when a
    slice multiplies the output of a ``Linear``: eager and ``aot_eager`` agree,
    inductor returns other input gradients. Code that compiles takes this form.
    """
    return [t[i] for i in range(t.shape[0])]


def wide_dtype(device: torch.device) -> torch.dtype:
    """The widest float dtype of ``device``: float64, or float32 on MPS, which lacks it."""
    return torch.float32 if device.type == "mps" else torch.float64


_PLIST_INIT_CODE = getattr(parametrize.ParametrizationList.__init__, "__code__", None)


def registering_by_torch() -> bool:
    """Whether the caller's caller is torch's ``ParametrizationList`` constructor.

    torch calls ``right_inverse`` from there when it (re-)registers a parametrization,
    e.g. in ``transfer_parametrizations_and_params``. Without the code object to
    compare with, answer ``False``: the value is then checked like any assignment.
    """
    frame = sys._getframe(2)
    return _PLIST_INIT_CODE is not None and frame.f_code is _PLIST_INIT_CODE


def inject_property(module: nn.Module, name: str) -> None:
    """Give ``module``'s (parametrized) class the property that computes ``name``."""
    inject: Any = getattr(parametrize, "_inject_property", None)
    if inject is None:
        raise RuntimeError(
            f"expected torch.nn.utils.parametrize._inject_property in torch {torch.__version__}, "
            "got none: this torch is not supported by sumto"
        )
    inject(module, name)
