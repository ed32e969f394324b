"""Linear equality constraints ``A @ v = b`` on every slice, and the Bayar constrained conv.

:class:`LinearEquality` generalises :class:`sumto.AffineSum` (one equation, ``A`` a row
of ones) to any consistent system of ``m`` equations on the ``n`` entries of each
slice. Its map is the exact orthogonal projection onto the affine subspace,
precomputed once in float64 at construction.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sumto import functional as F
from sumto.constraints import Constraint, _accumulate_dtype
from sumto.functional import Dim
from sumto.register import Init, _plain_tensor, constrain

__all__ = ["LinearEquality", "bayar", "linear_equality"]

Matrix = Tensor | Sequence[Sequence[float]]
Vector = Tensor | Sequence[float]


def _as_float64(value: Any, name: str, ndim: int) -> tuple[Tensor, float]:
    """``value`` as a CPU float64 tensor, and the relative precision it was given in."""
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"expected {name} to be a real tensor, got dtype {value.dtype}")
        if value.is_meta:
            raise ValueError(
                f"expected {name} with values, got a meta tensor: create A and b on a real "
                "device (the constrained weights may be on the meta device)"
            )
        dtype = value.dtype
        t = value.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        try:
            t = torch.tensor(value, dtype=torch.float64, device="cpu")
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"expected {name} to be a tensor or a nested sequence of numbers, got {value!r}"
            ) from err
        dtype = torch.float64
    else:
        raise TypeError(
            f"expected {name} to be a tensor or a nested sequence of numbers, "
            f"got {type(value).__name__}"
        )
    if t.ndim != ndim:
        shape = "(m, n)" if ndim == 2 else "(m,)"
        raise ValueError(f"expected {name} of shape {shape}, got shape {tuple(t.shape)}")
    if t.numel() > 0 and not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"expected {name} with finite entries, got non-finite entries in shape {tuple(t.shape)}"
        )
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    return t, eps


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Disable autocast for ``device`` (a matmul under CPU autocast would run in bf16)."""
    if device.type != "meta" and torch.is_autocast_enabled(device.type):  # meta: no autocast
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _project_rows(rows: Tensor, basis: Tensor, offset: Tensor) -> Tensor:
    r"""Orthogonal projection of each row onto :math:`\{v : Q v = d\}` (``Q`` orthonormal rows).

    :math:`v = x - Q^\top (Q x - d)`: the correction is the residual mapped back by
    :math:`Q^+ = Q^\top`, so a row already on the set moves only by rounding.
    """
    # Note [one refinement step]: one pass leaves a residual of order eps * |x|, far
    # above eps * |v| when x lies far from the set (e.g. pre-weights drifted under
    # Adam); a second pass corrects that residual, computed from v, down to eps * |v|,
    # so the output passes right_inverse's membership check. P(P(x)) = P(x), so the
    # Jacobian is unchanged; it also makes fixed coordinates (a Bayar centre) exact.
    once = rows - (rows @ basis.mT - offset) @ basis
    return once - (once @ basis.mT - offset) @ basis


class LinearEquality(Constraint):
    r"""Linear equality constraint: every slice over ``dim``, flattened, satisfies ``A v = b``.

    .. math::
        \mathcal{C} = \{ w : A\,\operatorname{vec}(w_s) = b \text{ for every slice } s \},
        \qquad A \in \mathbb{R}^{m \times n},\ b \in \mathbb{R}^m

    A slice is flattened in row-major order of its dims (in increasing order), like
    ``w[o].reshape(-1)`` for the default dims of a Conv weight. ``forward`` is the exact
    orthogonal projection onto the affine subspace,
    :math:`P(x) = x - Q^\top (Q x - d)`, where the rows of :math:`Q` are an orthonormal
    basis of the row space of ``A`` and :math:`Q^\top d = A^+ b` is the minimum-norm
    solution; both are computed once in float64 (SVD) at construction. The projection
    is the identity on the set (so ``right_inverse`` is the identity too), is
    differentiable (its Jacobian is :math:`I - Q^\top Q`) and never divides by a sum.
    Batched over the dims not in ``dim`` (one system per slice). It runs with autocast
    disabled and in at least float32.

    ``A`` and ``b`` are known only to the precision of their dtype: singular values
    below ``max(m, n) * eps(A.dtype) * sigma_max`` count as zero, so a rank-deficient
    but consistent system (repeated or dependent equations) is accepted, and the
    system actually enforced is that rank-``r`` one. :meth:`violation` measures
    ``max |A v - b|`` with it.

    Args:
        A: Coefficients, shape ``(m, n)`` with ``n`` the number of entries per slice
            (a tensor or nested sequence of numbers).
        b: Right-hand side, shape ``(m,)``.
        dim: Dims of each slice; ``None`` means one slice per output unit (dims
            ``1..ndim-1``, or dim 0 for 1-D tensors).

    Raises:
        TypeError: If ``A``, ``b`` or ``dim`` has the wrong type.
        ValueError: If ``A`` is not 2-D with at least one row and column, ``b`` is not
            of shape ``(m,)``, an entry is not finite, the system is inconsistent
            (no ``v`` with ``A v = b`` beyond rounding), or ``dim`` repeats; at
            registration, if the slices do not have ``n`` entries.

    Example:
        >>> import torch
        >>> from sumto import LinearEquality
        >>> c = LinearEquality(A=[[1.0, 1.0, 1.0], [1.0, -1.0, 0.0]], b=[1.0, 0.0])
        >>> w = c(torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        >>> w
        tensor([[ 0.8333,  0.8333, -0.6667],
                [ 0.3333,  0.3333,  0.3333]])
        >>> float(c.violation(w)) < 1e-6
        True
    """

    basis: Tensor
    offset: Tensor
    coefficients: Tensor
    rhs: Tensor

    def __init__(self, A: Matrix, b: Vector, dim: Dim | None = None) -> None:
        super().__init__(dim)
        a64, eps_a = _as_float64(A, "A", 2)
        b64, eps_b = _as_float64(b, "b", 1)
        m, n = a64.shape
        if m == 0 or n == 0:
            raise ValueError(
                f"expected A of shape (m, n) with m >= 1 and n >= 1, got shape {(m, n)}"
            )
        if b64.shape != (m,):
            raise ValueError(
                f"expected b of shape ({m},) to match A of shape {(m, n)}, "
                f"got shape {tuple(b64.shape)}"
            )
        # Note [rank and consistency]: A's singular values below its own precision are
        # noise (float32 coefficients written as decimals make dependent rows look
        # independent in float64); the system is solved in the least-squares sense on
        # the remaining rank and accepted only if that leaves a rounding-size residual.
        u, s, vh = torch.linalg.svd(a64, full_matrices=False)
        cutoff = max(m, n) * eps_a * float(s.max())
        rank = int((s > cutoff).sum())
        u, s, basis = u[:, :rank], s[:rank], vh[:rank]
        offset = (u.mT @ b64) / s  # Q A^+ b: coordinates of the min-norm solution
        solution = basis.mT @ offset
        a_eff = (u * s) @ basis
        b_eff = a_eff @ solution
        residual = float((b_eff - b64).abs().max())
        scale = float((a64.abs() @ solution.abs() + b64.abs()).max())
        tol = (16 + 4 * max(m, n)) * max(eps_a, eps_b) * scale
        if not residual <= tol:
            raise ValueError(
                f"expected a consistent system A v = b, got an inconsistent one: the "
                f"least-squares residual max |A v - b| is {residual:.3g} (rank {rank} "
                f"of A of shape {(m, n)}, tolerance {tol:.3g})"
            )
        self.rank = rank
        self.num_equations = m
        self.size = n
        # Derived tensors are not saved: the configuration (A, b, dim) is, in the state_dict
        # metadata (Note [Constraint configuration in state_dict metadata]).
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("coefficients", a_eff, persistent=False)
        self.register_buffer("rhs", b_eff, persistent=False)
        self._a_config = a64.tolist()
        self._b_config = b64.tolist()

    @classmethod
    def bayar(cls, kernel_size: int | Sequence[int]) -> LinearEquality:
        r"""The Bayar & Stamm constraint on every kernel of a conv weight.

        .. math::
            \{ w : w_{o,i}[\text{centre}] = -1,\ \textstyle\sum_{p \ne \text{centre}}
            w_{o,i}[p] = 1 \text{ for every } (o, i) \}

        The slices are the kernel's spatial dims (the last ``len(kernel_size)`` dims),
        so one system holds per (out, in) pair. Pass the result to
        :func:`sumto.project_on_step` for the projection-after-step recipe, or to
        :func:`sumto.constrain` (what :func:`sumto.bayar` does).

        Args:
            kernel_size: Odd size ``k >= 3`` of a square kernel (an int means
                ``(k, k)``), or a tuple of equal odd sizes, e.g. ``conv.kernel_size``.

        Returns:
            A :class:`LinearEquality` with ``A`` of shape ``(2, k ** len(kernel_size))``.

        Raises:
            TypeError: If ``kernel_size`` is not an int or a tuple of ints.
            ValueError: If the sizes differ, are even or are below 3.

        Example:
            >>> import torch
            >>> from sumto import LinearEquality
            >>> c = LinearEquality.bayar(3)
            >>> c(torch.zeros(1, 1, 3, 3))
            tensor([[[[ 0.1250,  0.1250,  0.1250],
                      [ 0.1250, -1.0000,  0.1250],
                      [ 0.1250,  0.1250,  0.1250]]]])
        """
        sizes = _check_kernel_size(kernel_size)
        n = math.prod(sizes)
        centre = n // 2  # row-major flat index of the centre of an odd cube
        a = torch.ones(2, n, dtype=torch.float64, device="cpu")  # even under a meta device
        a[0] = 0.0
        a[0, centre] = 1.0
        a[1, centre] = 0.0
        b = torch.tensor([-1.0, 1.0], dtype=torch.float64, device="cpu")
        return cls(a, b, dim=tuple(range(-len(sizes), 0)))

    # -- constraint interface ---------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.project(x)

    def project(self, x: Tensor) -> Tensor:
        """Orthogonal projection onto the affine subspace (computed in >= float32)."""
        self._check_input(x, registered_shape=False)
        dims = self.dims(x.ndim)
        compute = F._compute_dtype(x.dtype)
        with _autocast_off(x.device):
            basis = self.basis.to(device=x.device, dtype=compute)
            offset = self.offset.to(device=x.device, dtype=compute)
            rows = F._to_rows(x.to(compute), dims)
            # Note [Overflow-free sums]: scaled by a power of two >= n, Q x cannot overflow
            # for finite x (inf - inf = nan); the scaling is exact.
            scale = F._sum_scale(rows.shape[-1])
            out = _project_rows(rows / scale, basis, offset / scale) * scale
        return F._from_rows(out, x.shape, dims).to(x.dtype)

    def violation(self, x: Tensor) -> Tensor:
        """``max |A v - b|`` over slices and equations, a 0-d tensor (0 on the set)."""
        self._check_input(x, registered_shape=False)
        rows, a, b = self._rows_and_system(x)
        return F._max_or_zero((rows @ a.mT - b).abs())  # 0 for a zero-size batch

    def _inverse(self, value: Tensor) -> Tensor:
        return value

    # -- tolerance, binding and configuration -----------------------------------
    def _rows_and_system(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        acc = _accumulate_dtype(x)
        rows = F._to_rows(x.to(acc), self.dims(x.ndim))
        a = self.coefficients.to(device=x.device, dtype=acc)
        return rows, a, self.rhs.to(device=x.device, dtype=acc)

    def _magnitude(self, x: Tensor) -> Tensor:
        """Largest ``|A| |v| + |b|`` over slices and equations, the scale of rounding errors."""
        rows, a, b = self._rows_and_system(x.detach())
        return F._max_or_zero(rows.abs() @ a.abs().mT + b.abs())

    def _bind_shape(self, shape: tuple[int, ...]) -> None:
        dims = self.dims(len(shape))
        n = F._reduced_size(shape, dims)
        if n != self.size:
            raise ValueError(
                f"expected slices over dims {dims} with {self.size} entries (the columns of "
                f"A), got {n} entries for a tensor of shape {shape}"
            )

    def _bind(self, tensor: Tensor) -> None:
        super()._bind(tensor)
        if tensor.is_meta:
            return  # keep the values: to_empty(device=...) moves them (Constraint._apply)
        # Keep the float64 precomputation, on the tensor's device (float32 on MPS).
        acc = _accumulate_dtype(tensor)
        for name in ("basis", "offset", "coefficients", "rhs"):
            setattr(self, name, getattr(self, name).to(device=tensor.device, dtype=acc))

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "A": self._a_config, "b": self._b_config}

    def extra_repr(self) -> str:
        return (
            f"A=Tensor(shape=({self.num_equations}, {self.size})), rank={self.rank}, dim={self.dim}"
        )


def _check_kernel_size(kernel_size: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, (int, Sequence)):
        raise TypeError(
            f"expected kernel_size to be an int or a tuple of ints, got {kernel_size!r}"
        )
    sizes = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if any(isinstance(k, bool) or not isinstance(k, int) for k in sizes):
        raise TypeError(
            f"expected kernel_size to be an int or a tuple of ints, got {kernel_size!r}"
        )
    if len(sizes) == 0 or len(set(sizes)) != 1 or sizes[0] < 3 or sizes[0] % 2 == 0:
        raise ValueError(
            "expected an odd square kernel of size >= 3 (equal odd sizes in every spatial "
            f"dim, e.g. (3, 3) or (5, 5)), got kernel size {sizes}"
        )
    return sizes


def linear_equality(
    module: nn.Module,
    name: str = "weight",
    *,
    A: Matrix,
    b: Vector,
    dim: Dim | None = None,
    init: Init = "project",
) -> nn.Module:
    r"""Constrain every slice of ``module.<name>`` to satisfy ``A @ v = b``.

    .. math::
        \{ w : A\,\operatorname{vec}(w_s) = b \text{ for every slice } s \}

    Registers :class:`sumto.LinearEquality`: one system per slice over ``dim``
    (default: per output unit, e.g. each row of a Linear weight), flattened in
    row-major order to ``n`` entries, with ``A`` of shape ``(m, n)``.

    Args:
        module: Module owning the tensor.
        name: Parameter or buffer name.
        A: Coefficients, shape ``(m, n)``.
        b: Right-hand side, shape ``(m,)``.
        dim: Dims of each slice; ``None`` means one slice per output unit.
        init: ``"project"``, ``"sample"`` or an exact constrained value (see
            :func:`sumto.constrain`).

    Returns:
        ``module``.

    Raises:
        KeyError, IndexError, TypeError: As :func:`sumto.constrain`.
        ValueError: As :func:`sumto.constrain` and :class:`sumto.LinearEquality`
            (inconsistent system, bad shapes, slices without ``n`` entries).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sumto
        >>> A = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 0.0, 0.0]])
        >>> lin = sumto.linear_equality(nn.Linear(4, 2), A=A, b=torch.tensor([1.0, 0.0]))
        >>> residual = lin.weight @ A.T - torch.tensor([1.0, 0.0])
        >>> bool(residual.abs().max() < 1e-6)
        True
    """
    return constrain(module, name, LinearEquality(A, b, dim=dim), init)


def bayar(conv: nn.Module, name: str = "weight", init: Init = "project") -> nn.Module:
    r"""Bayar & Stamm constrained convolution: every kernel's centre is -1, the rest sum to 1.

    .. math::
        \{ w : w_{o,i}[\text{centre}] = -1,\ \textstyle\sum_{p \ne \text{centre}}
        w_{o,i}[p] = 1 \text{ for every } (o, i) \}

    Registers :meth:`LinearEquality.bayar` on ``conv.<name>``, batched over every
    (out, in) kernel. The published recipe (Bayar & Stamm, 2016) sets the centre to
    0, divides the kernel by its sum and sets the centre to -1 after each step; that
    division blows up when the off-centre sum is near 0, as it is from a zero-mean
    init (entries above 100 are common). Here the weights are the orthogonal
    projection: the centre is set to -1 and the same shift ``(1 - s) / (k^2 - 1)`` is
    added to the other entries, whose sum is ``s``. No sum is ever divided by, and
    every projected entry is bounded, by ``max(1, 2 max|x| + 1 / (k^2 - 1))`` for an
    input ``x``.

    For plain parameters and the projection-after-step recipe instead, use
    ``sumto.project_on_step(optimizer, conv.weight,
    sumto.LinearEquality.bayar(conv.kernel_size))``.

    Args:
        conv: A convolution (or any module whose ``name`` tensor is shaped
            ``(out, in, k, k)``, or ``(out, in, k)`` / ``(out, in, k, k, k)``).
        name: Name of the kernel tensor.
        init: ``"project"``, ``"sample"`` or an exact constrained value (see
            :func:`sumto.constrain`).

    Returns:
        ``conv``.

    Raises:
        KeyError, TypeError: As :func:`sumto.constrain`.
        ValueError: If the kernel is not odd and square (sizes differ, are even or
            below 3), or as :func:`sumto.constrain`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sumto
        >>> conv = sumto.bayar(nn.Conv2d(3, 4, 5, bias=False))
        >>> w = conv.weight
        >>> bool(((w[:, :, 2, 2] + 1).abs() < 1e-6).all())
        True
        >>> bool((w.sum((2, 3)).abs() < 1e-5).all())  # -1 + 1 per kernel
        True
    """
    shape = tuple(_plain_tensor(conv, name).shape)  # no reference kept: see constrain
    if len(shape) < 3:
        raise ValueError(
            f"expected {name} of a convolution, shaped (out, in, k, k), got shape {shape}"
        )
    return constrain(conv, name, LinearEquality.bayar(shape[2:]), init)
