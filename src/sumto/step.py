"""Projection after every optimizer step: constrained values held by plain parameters.

:func:`project_on_step` is the alternative to a parametrization: the parameter keeps
its plain ``nn.Parameter`` form and state_dict key, and it is projected in place onto
a constraint's set after each ``optimizer.step()``.
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakTensorKeyDictionary

from sumto.constraints import Constraint

__all__ = ["project_on_step"]

# Parameters managed by project_on_step: param -> {hook id: constraint}. Weak keys, so
# a parameter that is garbage collected leaves the registry; the values never refer
# back to the parameter.
_MANAGED: Any = WeakTensorKeyDictionary()


class _ProjectionHandle:
    """Handle returned by :func:`project_on_step`; ``remove()`` stops the projection.

    Also a context manager that removes the projection on exit.
    """

    def __init__(self, hook: RemovableHandle, entries: dict[int, Constraint]) -> None:
        self._hook = hook
        self._entries = entries

    def remove(self) -> None:
        """Stop projecting after each step (idempotent)."""
        self._hook.remove()
        self._entries.pop(self._hook.id, None)

    def __enter__(self) -> _ProjectionHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()


def _project_in_place(param: Tensor, constraint: Constraint) -> None:
    with torch.no_grad():
        param.copy_(constraint.project(param.detach()))


def _project_unless_member(param: Tensor, constraint: Constraint) -> None:
    """Project ``param`` unless it is on the set already (within rounding), a host sync.

    A projection is not bit-idempotent: projecting a value loaded from a checkpoint,
    already projected after its last step, would move it by an ulp and make a resumed
    run differ from an uninterrupted one.
    """
    value = param.detach()
    if not float(constraint.violation(value)) <= constraint.tolerance(value):  # NaN: projected
        _project_in_place(param, constraint)


def project_on_step(
    optimizer: torch.optim.Optimizer, param: Tensor, constraint: Constraint
) -> _ProjectionHandle:
    r"""Project ``param`` onto ``constraint``'s set now and after every ``optimizer.step()``.

    .. math::
        w \leftarrow P_{\mathcal{C}}(w) = \operatorname*{arg\,min}_{v \in \mathcal{C}}
        \lVert v - w \rVert_2 \quad \text{after each step}

    ``constraint.project`` is applied in place (under ``no_grad``), batched over the
    slices of ``constraint``, now unless ``param`` is on the set already (so attaching
    after loading a checkpoint leaves the loaded values bit-identical); it runs from a step post-hook
    (:meth:`torch.optim.Optimizer.register_step_post_hook`), so a step skipped by a
    ``GradScaler`` is not followed by a projection either. Works with every
    :class:`sumto.Constraint`, whatever its map: for :class:`sumto.Simplex` the
    projection is Euclidean, so entries become exactly zero. :func:`sumto.check`
    reports the parameter under its qualified name while the projection is active.

    Prefer it over a parametrization (:func:`sumto.constrain` and friends) for exact
    sparsity (a Euclidean projection reaches the boundary, a softmax never does),
    plain checkpoints and exports (the parameter keeps its key ``<name>``, no
    ``parametrizations.<name>.original``), or to port code written with Keras'
    ``kernel_constraint`` habit of projecting after every update. Caveat: the
    optimizer does not see the projection. Adam's moments and momentum buffers
    accumulate gradient components that point off the set (e.g. along the normal of
    a sum constraint) and keep pushing the weights there, only to be projected back;
    a parametrization differentiates through its map, so the optimizer sees only
    gradients along the set.

    Args:
        optimizer: Optimizer whose ``param_groups`` hold ``param``.
        param: The parameter to keep on the set (stays a plain ``nn.Parameter``).
        constraint: Any :class:`sumto.Constraint` (e.g. :class:`sumto.Simplex`,
            :class:`sumto.AffineSum`, :meth:`sumto.LinearEquality.bayar`). Its
            tensors are placed on ``param``'s device here, so call this after moving
            the model (otherwise they are copied over at every step).

    Returns:
        A handle whose ``remove()`` stops the projection (also a context manager).

    Raises:
        TypeError: If an argument has the wrong type, or ``param`` is not floating
            point.
        ValueError: If ``param`` is not in the optimizer's param groups, the
            constraint does not fit its shape (e.g. the wrong number of entries per
            slice, or an empty set), or it is registered on a tensor as a
            parametrization.
        IndexError: If the constraint's dims are out of range for ``param``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sumto
        >>> lin = nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> handle = sumto.project_on_step(opt, lin.weight, sumto.Simplex())
        >>> lin(torch.randn(8, 4)).square().sum().backward()
        >>> opt.step()
        >>> bool((lin.weight >= 0).all()), sorted(lin.state_dict())
        (True, ['bias', 'weight'])
        >>> bool(torch.allclose(lin.weight.sum(1), torch.ones(2)))
        True
        >>> handle.remove()
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"expected optimizer to be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not isinstance(param, Tensor):
        raise TypeError(f"expected param to be an nn.Parameter, got {type(param).__name__}")
    if not isinstance(constraint, Constraint):
        raise TypeError(
            f"expected constraint to be a sumto.Constraint, got {type(constraint).__name__}"
        )
    if not any(p is param for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(
            f"expected param to be one of the optimizer's parameters, got a tensor of shape "
            f"{tuple(param.shape)} that is in none of its {len(optimizer.param_groups)} "
            "param groups"
        )
    if isinstance(param, nn.parameter.UninitializedParameter):
        raise ValueError(
            "expected an initialised parameter, got an uninitialised one: run one forward "
            "pass of the lazy module first"
        )
    from sumto.register import _check_not_registered  # register imports this module

    _check_not_registered(constraint)
    constraint._bind(param)
    _project_unless_member(param, constraint)

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        _project_in_place(param, constraint)

    removable = optimizer.register_step_post_hook(hook)
    entries: dict[int, Constraint] = _MANAGED.setdefault(param, {})
    entries[removable.id] = constraint
    return _ProjectionHandle(removable, entries)


def _projected_report(module: nn.Module) -> dict[str, float]:
    """Max violation of every parameter of the tree managed by :func:`project_on_step`."""
    report: dict[str, float] = {}
    with torch.no_grad():
        for name, param in module.named_parameters():
            entries = _MANAGED.get(param)
            if not entries:
                continue
            value = param.detach()
            if not bool(torch.isfinite(value).all()):
                report[name] = math.nan if bool(torch.isnan(value).any()) else math.inf
                continue
            report[name] = max(float(c.violation(value)) for c in entries.values())
    return report
