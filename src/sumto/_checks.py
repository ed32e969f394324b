"""Argument validation shared by the functions, the constraints and ``WeightedSum``.

Each check raises the exception a user can act on, worded "expected ..., got ...":
``TypeError`` for a wrong type, ``ValueError`` for a bad value, ``IndexError`` for a
dim out of range. They may synchronise with the device (tensor totals): they run at
registration and at the public functional entry points, never in a constraint's
forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from sumto._compat import transforming

__all__: list[str] = []

Dim = int | Sequence[int]
Total = float | int | Tensor

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def readable(total: Tensor) -> bool:
    """Whether a tensor's values can be checked on the host now.

    Not while compile, tracing or a ``torch.func`` transform records: there the
    checks of values are skipped (the shapes are still checked), as torch's own
    functions do.
    """
    return not transforming(total)


def check_dim_spec(dim: Dim) -> tuple[int, ...]:
    """Validate the *form* of ``dim`` (ints, no repeats) without knowing ndim."""
    if isinstance(dim, bool) or not isinstance(dim, (int, Sequence)):
        raise TypeError(f"expected dim to be an int or a tuple of ints, got {dim!r}")
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if len(dims) == 0:
        raise ValueError("expected dim to name at least one dimension, got an empty tuple")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"expected dim to be an int or a tuple of ints, got {dim!r}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"expected distinct dims, got repeated dims in {dim!r}")
    return dims


def normalize_dims(dim: Dim, ndim: int) -> tuple[int, ...]:
    """Sorted non-negative dims; IndexError when out of range, ValueError on repeats."""
    rank = max(ndim, 1)
    if type(dim) is int and -rank <= dim < rank:  # the common case, without the general checks
        return (dim % rank,)
    dims = check_dim_spec(dim)
    out = []
    for d in dims:
        if not -rank <= d < rank:
            raise IndexError(
                f"expected dim in range [{-rank}, {rank - 1}] for a tensor with {ndim} dims, got {d}"
            )
        out.append(d % rank)
    if len(set(out)) != len(out):
        raise ValueError(f"expected distinct dims, got repeated dims in {dim!r}")
    return tuple(sorted(out))


def check_float_tensor(x: object, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected {name} to be a floating point tensor, got dtype {x.dtype}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: half precision inputs are computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def reduced_size(shape: Sequence[int], dims: tuple[int, ...]) -> int:
    return math.prod([shape[d] for d in dims]) if len(shape) > 0 else 1


def keep_shape(shape: Sequence[int], dims: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if i in dims else s for i, s in enumerate(shape))


def check_number(value: object, name: str) -> float:
    """``value`` as a float; TypeError for a non-number, ValueError beyond float range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected {name} to be a float, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(
            f"expected a finite {name}, got an int of {len(str(abs(int(value))))} digits, "
            "beyond the float range"
        ) from None


def check_total(total: Total, shape: Sequence[int], dims: tuple[int, ...]) -> None:
    """Validate a total's type, finiteness and shape against a tensor's shape."""
    if isinstance(total, Tensor):
        if not total.dtype.is_floating_point and total.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"expected total to be a real tensor, got dtype {total.dtype}")
        broadcast_total_shape(tuple(total.shape), shape, dims)
        if total.numel() > 0 and readable(total) and not bool(torch.isfinite(total).all()):
            raise ValueError(
                f"expected a finite total, got a tensor with non-finite values {total}"
            )
        return
    value = check_number(total, "total")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite total, got {total}")


def broadcast_total_shape(
    total_shape: tuple[int, ...], shape: Sequence[int], dims: tuple[int, ...]
) -> tuple[int, ...]:
    """The keepdim shape a tensor total is viewed as, or ValueError."""
    keep = keep_shape(shape, dims)
    try:
        if torch.broadcast_shapes(total_shape, keep) == keep:  # type: ignore[no-untyped-call]
            return total_shape
    except RuntimeError:
        pass
    reduced = tuple(s for i, s in enumerate(shape) if i not in dims)
    if total_shape == reduced:
        return keep
    raise ValueError(
        f"expected total to be broadcastable to the keepdim-reduced shape {keep} "
        f"(or to have the reduced shape {reduced}), got shape {total_shape}"
    )


def check_total_range(total: Total, dtype: torch.dtype) -> None:
    """ValueError when ``|total|`` overflows ``dtype`` (a device sync for tensor totals)."""
    big = torch.finfo(dtype).max
    if isinstance(total, Tensor):
        if total.numel() == 0 or not readable(total):
            return
        largest = float(total.detach().abs().max())
    else:
        largest = abs(float(total))
    if largest > big:
        raise ValueError(
            f"expected |total| <= {big:.4g}, the largest {dtype} (the dtype the tensor is "
            f"computed in), got |total| = {largest:.4g}"
        )


def check_positive(total: Total, name: str) -> None:
    if isinstance(total, Tensor):
        if total.numel() > 0 and readable(total) and not bool((total > 0).all()):
            raise ValueError(f"expected {name} > 0 for the simplex, got {total}")
    elif not total > 0:
        raise ValueError(f"expected {name} > 0 for the simplex, got {total}")


def check_bounds(lower: float, upper: float) -> None:
    for name, value in (("lower", lower), ("upper", upper)):
        if math.isnan(check_number(value, name)):
            raise ValueError(f"expected {name} to be a number, got nan")
    if lower > upper:
        raise ValueError(f"expected lower <= upper, got lower={lower} > upper={upper}")
    if lower == math.inf or upper == -math.inf:
        raise ValueError(f"expected lower < inf and upper > -inf, got lower={lower}, upper={upper}")


def check_box(total: Total, n: int, lower: float, upper: float) -> None:
    """ValueError when {sum = total, lower <= y <= upper} over ``n`` entries is empty."""
    check_bounds(lower, upper)
    lo_sum, hi_sum = n * float(lower), n * float(upper)
    if isinstance(total, Tensor):
        if total.numel() == 0 or not readable(total):
            return
        t = total.detach().double()
        low, high = float(t.min()), float(t.max())
    else:
        low = high = float(total)
    if low < lo_sum or high > hi_sum:
        raise ValueError(
            f"expected n * lower <= total <= n * upper (n={n}, lower={lower}, upper={upper}, "
            f"so total in [{lo_sum}, {hi_sum}]), got total={low if low < lo_sum else high}"
        )


Bound = float | int | Tensor


def check_bound_tensors(lower: Bound, upper: Bound) -> None:
    """Validate per-entry bounds without a shape: types, NaN, ``lower <= upper``, infinities.

    At least one of ``lower``/``upper`` is a tensor; a float one is checked as a
    number. Infinite entries are allowed on one side only: the set must then be
    bounded on the other, which is what keeps the projection's search finite.
    """
    values = {}
    for name, bound in (("lower", lower), ("upper", upper)):
        if isinstance(bound, Tensor):
            if not bound.dtype.is_floating_point and bound.dtype not in _INTEGER_DTYPES:
                raise TypeError(f"expected {name} to be a real tensor, got dtype {bound.dtype}")
            values[name] = bound.detach()
        elif math.isnan(check_number(bound, name)):
            raise ValueError(f"expected {name} to be a number, got nan")
        else:
            values[name] = torch.tensor(float(bound), dtype=torch.float64)
    lo, hi = values["lower"], values["upper"]
    try:
        torch.broadcast_shapes(lo.shape, hi.shape)  # type: ignore[no-untyped-call]
    except RuntimeError:
        raise ValueError(
            f"expected lower and upper broadcastable to each other, got shapes "
            f"{tuple(lo.shape)} and {tuple(hi.shape)}"
        ) from None
    if not all(readable(v) and not v.is_meta for v in (lo, hi)):
        return
    lo, hi = lo.double().cpu(), hi.double().cpu()
    for name, v in (("lower", lo), ("upper", hi)):
        if bool(v.isnan().any()):
            raise ValueError(f"expected {name} without NaN entries, got {v}")
    if bool((lo == math.inf).any()) or bool((hi == -math.inf).any()):
        raise ValueError("expected every lower < inf and every upper > -inf, got an infinite one")
    if bool((lo == -math.inf).any()) and bool((hi == math.inf).any()):
        raise ValueError(
            "expected infinite bounds on one side only (every lower finite, or every upper "
            "finite), got -inf in lower and inf in upper"
        )
    bad = (lo > hi).nonzero()
    if bad.shape[0] > 0:
        index = tuple(bad[0].tolist())
        shape = torch.broadcast_shapes(lo.shape, hi.shape)  # type: ignore[no-untyped-call]
        lo_b, hi_b = lo.expand(shape), hi.expand(shape)
        raise ValueError(
            f"expected lower <= upper for every entry, got lower={float(lo_b[index]):g} > "
            f"upper={float(hi_b[index]):g} at index {index}"
        )


def check_box_entries(
    total: Total, shape: Sequence[int], dims: tuple[int, ...], lower: Bound, upper: Bound
) -> None:
    """ValueError when a slice's set ``{sum = total, lower <= y <= upper}`` is empty.

    Per-entry bounds (tensors broadcastable to ``shape``); the message names the
    first infeasible slice by its index over the dims not summed.
    """
    check_bound_tensors(lower, upper)
    shape = tuple(shape)
    for name, bound in (("lower", lower), ("upper", upper)):
        if isinstance(bound, Tensor):
            try:
                ok = torch.broadcast_shapes(bound.shape, shape) == shape  # type: ignore[no-untyped-call]
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"expected {name} broadcastable to the constrained tensor's shape {shape}, "
                    f"got shape {tuple(bound.shape)}"
                )
    tensors = [b for b in (lower, upper, total) if isinstance(b, Tensor)]
    if not all(readable(t) and not t.is_meta for t in tensors):
        return

    def slice_sums(bound: Bound) -> Tensor:
        full = torch.as_tensor(bound, dtype=torch.float64).detach().cpu().expand(shape)
        return full.sum(dims, keepdim=True) if len(shape) > 0 else full

    low, high = slice_sums(lower), slice_sums(upper)
    keep = keep_shape(shape, dims)
    t = torch.as_tensor(total, dtype=torch.float64).detach().cpu()
    t = t.reshape(broadcast_total_shape(tuple(t.shape), shape, dims)).expand(keep)
    # a relative slack: the sums of the bounds round at their own scale
    eps = 8 * torch.finfo(torch.float64).eps
    too_low, too_high = t < low - eps * low.abs(), t > high + eps * high.abs()
    for bad, what, side in ((too_low, "sum(lower)", low), (too_high, "sum(upper)", high)):
        where = bad.nonzero()
        if where.shape[0] > 0:
            index = tuple(where[0].tolist())
            other = tuple(i for k, i in enumerate(index) if k not in dims)
            raise ValueError(
                f"expected sum(lower) <= total <= sum(upper) in every slice, got total="
                f"{float(t[index]):g} and {what}={float(side[index]):g} in the slice at "
                f"index {other} (over the dims not summed)"
            )


# Temperatures outside this range make ``x / T`` or ``T * log(p)`` overflow or
# underflow to 0 in float32, the narrowest dtype the maps compute in.
TEMPERATURE_RANGE = (1e-30, 1e30)


def check_temperature(temperature: object) -> float:
    value = check_number(temperature, "temperature")
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:
        raise ValueError(
            f"expected a finite temperature > 0 within [{low:g}, {high:g}], got {temperature!r}"
        )
    return value
