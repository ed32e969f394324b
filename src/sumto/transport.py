"""Transport plans and doubly stochastic matrices: ``P >= 0`` with given row and column sums.

:class:`Transport` constrains the last two dims of a tensor to the transport polytope
``{P >= 0, P 1 = r, P^T 1 = c}`` (the Birkhoff polytope of doubly stochastic matrices
for ``r = c = 1``), through Sinkhorn normalisation or the exact Euclidean projection
of :mod:`sumto.functional`; :func:`doubly_stochastic` registers it on a module's tensor.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from sumto import _transport
from sumto import functional as F
from sumto._compat import wide_dtype
from sumto._transport import Marginal
from sumto.constraints import Constraint, _accumulate_dtype
from sumto.register import Init, constrain

__all__ = ["Transport", "doubly_stochastic"]

TransportMethod = Literal["sinkhorn", "project"]
_METHODS: tuple[TransportMethod, ...] = ("sinkhorn", "project")
# Sinkhorn iterations of a sample: a standard Gaussian's exp has a spread Sinkhorn
# balances to float64 rounding well within this count.
_SAMPLE_ITERS = 200


def _marginal_attr(value: Marginal, name: str) -> Tensor | float:
    """A sum as a float, or a detached floating point copy of a tensor (checked)."""
    if isinstance(value, Tensor):
        checked = value.new_zeros(value.shape, device="cpu") if value.is_meta else value
        _transport.check_marginal(checked, name)
        t = value.detach().clone()
        return t if t.dtype.is_floating_point else t.to(torch.get_default_dtype())
    _transport.check_marginal(value, name)
    return float(value)


class Transport(Constraint):
    r"""Transport plans: non-negative matrices with row sums ``r`` and column sums ``c``.

    .. math::
        \mathcal{C} = \{ P \in \mathbb{R}^{m \times n} : P \ge 0,\
        P \mathbf{1} = r,\ P^\top \mathbf{1} = c \}

    over the last two dims (batched over the others). With ``r = c = 1`` and square
    matrices it is the Birkhoff polytope of doubly stochastic matrices, whose vertices
    are the permutation matrices. Two maps from unconstrained pre-weights ``x``:

    * ``"sinkhorn"``: :func:`sumto.functional.sinkhorn` of ``x`` (``iters``
      iterations), a smooth map onto the interior (every entry positive). Its
      last row sums are off by Sinkhorn's residual, so the value is then rounded onto
      the set (rows above their sum scaled down, then columns, the deficits added as a
      rank-one term; Altschuler et al., 2017), a change of the size of that
      residual that gradients do not see: the gradient is Sinkhorn's. The output is
      on the set to rounding. ``right_inverse`` is ``log(P)``, with entries below
      ``eps(dtype)`` times the largest sum read as that value (finite pre-weights;
      their gradient is then tiny, as for a saturated softmax).
    * ``"project"``: :func:`sumto.functional.project_transport` of ``x``, the exact
      Euclidean projection: sparse, reaches the vertices, the identity on the set
      (so ``right_inverse`` is the identity); zero gradients off the support.

    :meth:`project` is the exact projection whatever the method (what
    :func:`sumto.project_on_step` applies after each step).

    Args:
        row_sums: Row sums ``r >= 0``: a float, or a tensor broadcastable to the
            constrained tensor's ``shape[:-1]`` (one sum per row, per batch entry).
        col_sums: Column sums ``c >= 0``: a float or a tensor broadcastable to
            ``shape[:-2] + shape[-1:]``. Each matrix's row and column totals must
            agree: ``m * r == n * c`` for floats (checked at registration).
        method: ``"sinkhorn"`` or ``"project"``.
        iters: Sinkhorn iterations per forward (``method="sinkhorn"``).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If a sum is negative or not finite, ``method`` is unknown or
            ``iters < 1``; at registration, if the sums do not fit the shape or
            their totals differ.

    Example:
        >>> import torch
        >>> from sumto import Transport
        >>> c = Transport()
        >>> p = c(torch.randn(3, 3))
        >>> bool(torch.allclose(p.sum(0), torch.ones(3))), bool(torch.allclose(p.sum(1), torch.ones(3)))
        (True, True)
        >>> Transport(method="project")(torch.tensor([[5.0, 0.0], [0.0, 5.0]]))
        tensor([[1., 0.],
                [0., 1.]])
    """

    row_sums: Tensor | float
    col_sums: Tensor | float

    def __init__(
        self,
        row_sums: Marginal = 1.0,
        col_sums: Marginal = 1.0,
        method: TransportMethod = "sinkhorn",
        *,
        iters: int = _transport.SINKHORN_ITERS,
    ) -> None:
        super().__init__(dim=(-2, -1))
        for name, value in (("row_sums", row_sums), ("col_sums", col_sums)):
            attr = _marginal_attr(value, name)
            if isinstance(attr, Tensor):
                self.register_buffer(name, attr)
            else:
                setattr(self, name, attr)
        if method not in _METHODS:
            raise ValueError(f"expected method to be one of {_METHODS}, got {method!r}")
        self.method: TransportMethod = method
        self.iters = _transport.check_iters(iters)

    # -- configuration -----------------------------------------------------------
    def _has_values(self) -> bool:
        return not any(isinstance(v, Tensor) and v.is_meta for v in self._sums())

    def _sums(self) -> tuple[Tensor | float, Tensor | float]:
        return self.row_sums, self.col_sums

    def _bind_shape(self, shape: tuple[int, ...]) -> None:
        self.dims(len(shape))  # IndexError below 2 dims
        if not self._has_values():
            # Shapes only: the values are checked when a checkpoint is loaded.
            meta = [torch.zeros(v.shape) if isinstance(v, Tensor) else v for v in self._sums()]
            _transport.check_marginals(meta[0], meta[1], shape, torch.float64)
            return
        _transport.check_marginals(self.row_sums, self.col_sums, shape, torch.float64)

    def _marginals(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return _transport.marginals(self.row_sums, self.col_sums, like)

    def _config(self) -> dict[str, Any]:
        # A tensor sum is saved as its buffer; the configuration records only its kind.
        sums = {
            name: "tensor" if isinstance(value, Tensor) else value
            for name, value in (("row_sums", self.row_sums), ("col_sums", self.col_sums))
        }
        return {**sums, "method": self.method, "iters": self.iters}

    def extra_repr(self) -> str:
        def show(name: str, value: Tensor | float) -> str:
            if isinstance(value, Tensor):
                return f"{name}=Tensor(shape={tuple(value.shape)})"
            return f"{name}={value:g}"

        s = f"{show('row_sums', self.row_sums)}, {show('col_sums', self.col_sums)}"
        s += f", method={self.method!r}"
        return s + (f", iters={self.iters}" if self.method == "sinkhorn" else "")

    # -- maps ----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        xc = x.to(F._compute_dtype(x.dtype))
        r, c = self._marginals(xc)
        if self.method == "project":
            return _transport.project(xc, r, c).to(x.dtype)
        p = _transport.sinkhorn(xc, r, c, self.iters, None)
        held = p.detach()
        rounded = _transport.round_to_transport(held, r, c)
        return (p + (rounded - held)).to(x.dtype)

    def project(self, x: Tensor) -> Tensor:
        """Exact Euclidean projection onto the set (:func:`sumto.functional.project_transport`)."""
        self._check_input(x, registered_shape=False)
        xc = x.to(F._compute_dtype(x.dtype))
        r, c = self._marginals(xc)
        return _transport.project(xc, r, c).to(x.dtype)

    def violation(self, x: Tensor) -> Tensor:
        """Largest of ``max |P 1 - r|``, ``max |P^T 1 - c|`` and ``max(-P)`` (0 on the set)."""
        self._check_input(x, registered_shape=False)
        xa = x.detach().to(_accumulate_dtype(x))
        r, c = self._marginals(xa)
        rows = F._max_or_zero((xa.sum(-1) - r).abs())
        cols = F._max_or_zero((xa.sum(-2) - c).abs())
        negative = F._max_or_zero(-xa).clamp_min(0.0)
        return torch.maximum(torch.maximum(rows, cols), negative)

    def _magnitude(self, x: Tensor) -> Tensor:
        """Largest ``sum |row| + r`` or ``sum |column| + c``, the scale of rounding errors."""
        xa = x.detach().to(_accumulate_dtype(x)).abs()
        r, c = self._marginals(xa)
        rows = F._max_or_zero(xa.sum(-1) + r.abs())
        cols = F._max_or_zero(xa.sum(-2) + c.abs())
        return torch.maximum(rows, cols)

    def _inverse(self, value: Tensor) -> Tensor:
        if self.method == "project":
            return value
        r, c = self._marginals(value.detach())
        largest = torch.maximum(F._max_or_zero(r), F._max_or_zero(c))
        floor = torch.finfo(value.dtype).eps * torch.where(largest > 0, largest, 1.0)
        return value.clamp_min(floor).log()

    # -- random points ------------------------------------------------------------
    def _sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        r"""Sinkhorn scaling of ``exp(Z)`` per matrix, ``Z`` standard normal.

        Each matrix is :math:`\operatorname{diag}(u)\, e^{Z} \operatorname{diag}(v)`,
        balanced by Sinkhorn in float64 (float32 on MPS) and rounded onto the set in
        ``dtype``: an interior point (every entry positive where its row and column
        sums are), a spread-out draw around the centre of the polytope, not a uniform one.
        """
        wide = wide_dtype(device)
        z = torch.randn(shape, generator=generator, dtype=wide, device=device)
        r, c = self._marginals(z)
        p = _transport.sinkhorn(z, r, c, _SAMPLE_ITERS, None)
        p = _transport.round_to_transport(p, r, c)
        # rounded to the output dtype, then onto the set in that dtype
        pc = p.to(dtype).to(F._compute_dtype(dtype))
        r, c = self._marginals(pc)
        return _transport.round_to_transport(pc, r, c).to(dtype)


def doubly_stochastic(
    module: nn.Module,
    name: str = "weight",
    method: TransportMethod = "sinkhorn",
    init: Init = "project",
    row_sums: Marginal = 1.0,
    col_sums: Marginal = 1.0,
    *,
    iters: int = _transport.SINKHORN_ITERS,
) -> nn.Module:
    r"""Constrain ``module.<name>`` to doubly stochastic matrices (or any transport plans).

    .. math::
        \{ P : P \ge 0,\ P \mathbf{1} = r,\ P^\top \mathbf{1} = c \}
        \quad \text{over the last two dims}

    Registers :class:`sumto.Transport`; with the default sums ``r = c = 1`` the tensor
    must be square in its last two dims (e.g. the weight of ``nn.Linear(n, n)``: every
    row and column sums to 1). A non-square weight needs sums with equal totals,
    e.g. ``row_sums=1.0, col_sums=m / n`` for an ``(m, n)`` weight. With
    ``init="project"`` the current weight is projected exactly onto the set, which
    has many exact zeros: with ``method="sinkhorn"`` their pre-weights are large
    negative numbers that learn slowly; pass
    ``init=sumto.Transport(...).sample(shape)`` (or the uniform matrix) to start in
    the interior.

    Args:
        module: Module owning the tensor.
        name: Parameter or buffer name.
        method: ``"sinkhorn"`` (smooth, interior) or ``"project"`` (exact projection).
        init: ``"project"`` or an exact constrained value (see :func:`sumto.constrain`).
        row_sums: Row sums: a float or a tensor broadcastable to ``shape[:-1]``.
        col_sums: Column sums: a float or a tensor broadcastable to
            ``shape[:-2] + shape[-1:]``.
        iters: Sinkhorn iterations per forward (``method="sinkhorn"``).

    Returns:
        ``module``.

    Raises:
        KeyError, TypeError: As :func:`sumto.constrain`.
        IndexError: If the tensor has fewer than 2 dims.
        ValueError: As :func:`sumto.constrain` and :class:`sumto.Transport` (negative
            sums, unequal totals, e.g. default sums on a non-square weight).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sumto
        >>> lin = sumto.doubly_stochastic(nn.Linear(4, 4, bias=False))
        >>> w = lin.weight
        >>> bool(torch.allclose(w.sum(0), torch.ones(4))), bool(torch.allclose(w.sum(1), torch.ones(4)))
        (True, True)
    """
    constraint = Transport(row_sums=row_sums, col_sums=col_sums, method=method, iters=iters)
    return constrain(module, name, constraint, init)
