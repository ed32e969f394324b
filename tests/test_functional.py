"""sumto.functional: the projections against the float64 references of tests/reference.py.

Property tests draw shapes up to 4-D, dims (ints and tuples, negative too), totals
(floats and per-slice tensors of keepdim or reduced shape) and dtypes; tolerances
are scaled by ``finfo(dtype).eps`` and the magnitude of the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import Tensor

from reference import (
    as_rows,
    assert_matches_reference,
    assert_sums,
    ref_project_box_entries,
    ref_project_box_sum,
    ref_project_simplex,
    ref_project_sum,
    tolerance,
    total_rows,
)
from sumto import AffineSum, BoxSum, Simplex, _autograd
from sumto.functional import project_box_sum, project_simplex, project_sum, sum_violation

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
PROJECTIONS = [project_sum, project_simplex, project_box_sum]


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------


@st.composite
def shape_and_dim(draw: st.DrawFn, max_ndim: int = 4, max_side: int = 4) -> tuple:
    """A shape (1-D to max_ndim-D) and a dim spec: an int or a tuple, possibly negative."""
    ndim = draw(st.integers(1, max_ndim))
    shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=ndim, max_size=ndim)))
    order = draw(st.permutations(list(range(ndim))))
    k = draw(st.integers(1, ndim))
    dims = tuple(d - ndim if draw(st.booleans()) else d for d in order[:k])
    dim: int | tuple[int, ...] = dims[0] if k == 1 and draw(st.booleans()) else dims
    return shape, dim, dims


def finite_floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def tensors(shape: tuple[int, ...], lo: float = -1e3, hi: float = 1e3) -> st.SearchStrategy:
    return arrays(np.float64, shape, elements=finite_floats(lo, hi)).map(torch.from_numpy)


def keep_shape(shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[int, ...]:
    norm = {d % len(shape) for d in dims}
    return tuple(1 if i in norm else s for i, s in enumerate(shape))


def reduced_shape(shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[int, ...]:
    norm = {d % len(shape) for d in dims}
    return tuple(s for i, s in enumerate(shape) if i not in norm)


@st.composite
def totals(
    draw: st.DrawFn, shape: tuple[int, ...], dims: tuple[int, ...], lo: float, hi: float
) -> float | Tensor:
    """A float total, or a per-slice tensor of the keepdim-reduced or the reduced shape."""
    kind = draw(st.sampled_from(["float", "keepdim", "reduced"]))
    if kind == "float":
        return draw(finite_floats(lo, hi))
    target = keep_shape(shape, dims) if kind == "keepdim" else reduced_shape(shape, dims)
    return draw(tensors(target, lo, hi))


def slice_size(shape: tuple[int, ...], dims: tuple[int, ...]) -> int:
    return math.prod(shape[d] for d in dims)


# ---------------------------------------------------------------------------
# property tests against the references
# ---------------------------------------------------------------------------


@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_project_sum_matches_reference(data: st.DataObject, dtype: torch.dtype) -> None:
    shape, dim, dims = data.draw(shape_and_dim())
    x = data.draw(tensors(shape)).to(dtype)
    total = data.draw(totals(shape, dims, -100.0, 100.0))
    y = project_sum(x, total, dim)
    assert y.dtype == dtype and y.shape == x.shape
    assert_matches_reference(y, ref_project_sum(x.double(), total, dims), x, total, dims)
    assert_sums(y, total, dims, source=x)


@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_project_simplex_matches_sort_reference(data: st.DataObject, dtype: torch.dtype) -> None:
    shape, dim, dims = data.draw(shape_and_dim())
    x = data.draw(tensors(shape)).to(dtype)
    total = data.draw(totals(shape, dims, 1e-3, 100.0))
    y = project_simplex(x, total, dim)
    assert y.dtype == dtype and y.shape == x.shape
    assert bool((y >= 0).all()), f"negative entries {y[y < 0]}"
    assert_matches_reference(y, ref_project_simplex(x.double(), total, dims), x, total, dims)
    assert_sums(y, total, dims, source=x)


@st.composite
def box_problems(draw: st.DrawFn) -> tuple:
    """A shape, dims, bounds (possibly infinite) and a feasible total (boundary included)."""
    shape, dim, dims = draw(shape_and_dim())
    n = slice_size(shape, dims)
    lower = draw(st.one_of(st.just(-math.inf), finite_floats(-10.0, 10.0)))
    upper = draw(st.one_of(st.just(math.inf), finite_floats(-10.0, 10.0)))
    if lower > upper:
        lower, upper = upper, lower
    lo = n * lower if math.isfinite(lower) else (n * upper if math.isfinite(upper) else 0.0) - 50.0
    hi = n * upper if math.isfinite(upper) else lo + 100.0
    frac = draw(st.one_of(st.sampled_from([0.0, 1.0]), finite_floats(0.0, 1.0)))
    kind = draw(st.sampled_from(["float", "keepdim", "reduced"]))
    if kind == "float":
        total: float | Tensor = min(max(lo + frac * (hi - lo), lo), hi)
    else:
        target = keep_shape(shape, dims) if kind == "keepdim" else reduced_shape(shape, dims)
        fracs = draw(arrays(np.float64, target, elements=st.sampled_from([0.0, 0.3, 0.5, 1.0])))
        total = (lo + torch.from_numpy(fracs) * (hi - lo)).clamp(lo, hi)
    return shape, dim, dims, lower, upper, total


@given(problem=box_problems(), data=st.data(), dtype=st.sampled_from(DTYPES))
def test_project_box_sum_matches_bisection_reference(
    problem: tuple, data: st.DataObject, dtype: torch.dtype
) -> None:
    shape, dim, dims, lower, upper, total = problem
    x = data.draw(tensors(shape, -20.0, 20.0)).to(dtype)
    y = project_box_sum(x, total, dim, lower=lower, upper=upper)
    assert y.dtype == dtype and y.shape == x.shape
    expected = ref_project_box_sum(x.double(), total, dims, lower, upper)
    # Entries on a bound are exact; the shift tau of the free ones subtracts the
    # mass of up to n entries sitting on a bound.
    bound_mass = slice_size(shape, dims) * max(
        abs(b) for b in (lower, upper, 0.0) if math.isfinite(b)
    )
    assert_matches_reference(y, expected, x, total, dims, bound_mass)
    assert bool((y >= lower).all()) and bool((y <= upper).all()), "entries outside the bounds"
    assert_sums(y, total, dims, source=x)


@given(
    x=arrays(
        np.float64,
        st.tuples(st.integers(1, 6), st.integers(1, 16)),
        elements=st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 3.0]),
    ).map(torch.from_numpy),
    total=st.sampled_from([0.25, 1.0, 2.0, 7.0]),
    bounds=st.sampled_from([(-1.0, 1.0), (0.0, 0.5), (-0.5, math.inf), (-math.inf, 2.0)]),
    dtype=st.sampled_from(DTYPES),
)
def test_projections_on_tie_heavy_inputs_match_references(
    x: Tensor, total: float, bounds: tuple[float, float], dtype: torch.dtype
) -> None:
    # Few distinct values: many ties, and thresholds that land exactly on entries.
    xd = x.to(dtype)
    y = project_simplex(xd, total)
    assert bool((y >= 0).all())
    assert_matches_reference(y, ref_project_simplex(xd.double(), total, (-1,)), xd, total, (-1,))
    lower, upper = bounds
    n = x.shape[-1]
    total = min(max(total, n * lower), n * upper)
    y = project_box_sum(xd, total, lower=lower, upper=upper)
    assert bool((y >= lower).all()) and bool((y <= upper).all())
    expected = ref_project_box_sum(xd.double(), total, (-1,), lower, upper)
    bound_mass = n * max(abs(b) for b in bounds if math.isfinite(b))
    assert_matches_reference(y, expected, xd, total, (-1,), bound_mass)


@given(data=st.data())
def test_box_sum_reduces_to_sum_and_simplex(data: st.DataObject) -> None:
    shape, dim, dims = data.draw(shape_and_dim(max_ndim=3))
    x = data.draw(tensors(shape, -50.0, 50.0))
    total = data.draw(finite_floats(0.01, 10.0))
    unbounded = project_box_sum(x, total, dim)
    assert_matches_reference(unbounded, project_sum(x, total, dim).double(), x, total, dims)
    box = project_box_sum(x, total, dim, lower=0.0)
    assert_matches_reference(box, project_simplex(x, total, dim).double(), x, total, dims)


# ---------------------------------------------------------------------------
# dtypes and precision
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("fn", PROJECTIONS)
def test_output_dtype_equals_input_dtype(fn: Callable[..., Tensor], dtype: torch.dtype) -> None:
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert fn(x).dtype == dtype
    assert sum_violation(x).dtype == (torch.float32 if dtype.itemsize == 2 else dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", PROJECTIONS)
def test_half_precision_is_computed_in_float32(
    fn: Callable[..., Tensor], dtype: torch.dtype
) -> None:
    # n = 4096: a hyperplane projection computed in bfloat16 misses the sum by ~0.1.
    x = torch.rand(4, 4096, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = fn(x)
    assert torch.equal(y, fn(x.float()).to(dtype))
    assert_sums(y, 1.0, (-1,))


def test_half_precision_tensor_total_is_computed_in_float32() -> None:
    x = torch.rand(3, 4096, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    total = torch.tensor([[1.0], [2.5], [1e-2]], dtype=torch.bfloat16)
    expected = project_simplex(x.float(), total.float()).to(torch.bfloat16)
    assert torch.equal(project_simplex(x, total), expected)


# ---------------------------------------------------------------------------
# exact cases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_simplex_huge_magnitude_is_exact(dtype: torch.dtype) -> None:
    x = torch.tensor([1e6, 0.0, 0.0], dtype=dtype)
    assert torch.equal(project_simplex(x), torch.tensor([1.0, 0.0, 0.0], dtype=dtype))
    assert torch.equal(project_simplex(-x), torch.tensor([0.0, 0.5, 0.5], dtype=dtype))
    assert torch.equal(
        project_box_sum(x, lower=0.0, upper=1.0), torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_simplex_ties_are_split_evenly(dtype: torch.dtype) -> None:
    x = torch.tensor([[2.0, 2.0, 2.0, 2.0], [3.0, 3.0, -1.0, -1.0], [0.0, 0.0, 0.0, 1.0]])
    y = project_simplex(x.to(dtype), total=2.0)
    expected = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 1.25]])
    assert torch.equal(y, expected.to(dtype))


def test_box_sum_ties_and_boundary_totals_are_exact() -> None:
    x = torch.tensor([[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, -5.0, -5.0]])
    y = project_box_sum(x, total=1.0, lower=-1.0, upper=1.0)
    assert torch.equal(y, torch.tensor([[0.25] * 4, [1.0, 1.0, -0.5, -0.5]]))
    # Totals on the boundary of feasibility leave exactly one point: every entry on a bound.
    assert torch.equal(project_box_sum(x, total=4.0, lower=-1.0, upper=1.0), torch.ones(2, 4))
    assert torch.equal(project_box_sum(x, total=-4.0, lower=-1.0, upper=1.0), -torch.ones(2, 4))
    assert torch.equal(project_box_sum(x, total=4.0, upper=1.0), torch.ones(2, 4))
    assert torch.equal(project_box_sum(x, total=-4.0, lower=-1.0), -torch.ones(2, 4))
    assert torch.equal(project_box_sum(x, total=2.0, lower=0.5, upper=0.5), torch.full((2, 4), 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_negative_input_projects_onto_the_simplex(dtype: torch.dtype) -> None:
    x = torch.tensor([[-5.0, -3.0, -10.0], [-1.0, -1.0, -4.0]], dtype=dtype)
    y = project_simplex(x)
    assert torch.equal(y, torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], dtype=dtype))


@pytest.mark.parametrize(
    ("fn", "bounds"),
    [
        (project_sum, {}),
        (project_simplex, {}),
        (project_box_sum, {}),
        (project_box_sum, {"lower": -1.0}),
        (project_box_sum, {"upper": 2.0}),
        (project_box_sum, {"lower": -1.0, "upper": 2.0}),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_entry_slices_equal_the_total_exactly(
    fn: Callable[..., Tensor], bounds: dict[str, float], dtype: torch.dtype
) -> None:
    # x + (total - x) rounds: 3 + (1.2e-7 - 3) is 0 in float32, not 1.2e-7.
    x = torch.tensor([[3.0], [-1e6], [0.1], [7.5]], dtype=dtype)
    total = torch.tensor([1.2e-7, 1e-3, 0.7, 1.5], dtype=dtype)
    assert torch.equal(fn(x, total, **bounds), total.reshape(4, 1))
    assert torch.equal(fn(x, 1e-3, **bounds), torch.full((4, 1), 1e-3, dtype=dtype))
    assert torch.equal(
        fn(x.reshape(4, 1, 1), 0.3, (1, 2), **bounds), torch.full((4, 1, 1), 0.3, dtype=dtype)
    )


def test_box_sum_on_the_feasibility_boundary_stays_within_the_bounds() -> None:
    # With total = n * upper the set is one point; free entries computed as x - tau
    # used to overshoot the bound by rounding.
    x = 50.0 * torch.randn(200, 46, generator=torch.Generator().manual_seed(0))
    for lower, upper in ((-0.5, 0.3), (-0.25, 0.4657)):
        for total in (46 * upper, 46 * lower):
            y = project_box_sum(x, total, lower=lower, upper=upper)
            assert bool((y >= lower).all()) and bool((y <= upper).all())
            assert_sums(y, total, (-1,))


@pytest.mark.parametrize("fn", PROJECTIONS)
def test_zero_dim_tensor_equals_the_total(fn: Callable[..., Tensor]) -> None:
    assert torch.equal(fn(torch.tensor(-4.0), 2.0, 0), torch.tensor(2.0))
    assert torch.equal(fn(torch.tensor(9.0), torch.tensor(0.5), -1), torch.tensor(0.5))


def test_project_sum_exact_values() -> None:
    x = torch.tensor([[0.0, -1.0, 5.0], [1.0, 1.0, 1.0]])
    expected = torch.tensor([[-1.0, -2.0, 4.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    total = torch.tensor([[1.0], [0.0]])
    assert_matches_reference(project_sum(x, total), expected, x, total, (-1,))
    # Entries keep their sign and magnitude when the sum is already right, even 0:
    # no division by the sum, no sign flip.
    k = torch.tensor([[1.0, -1.0], [-3.0, 3.0], [0.0, 0.0]])
    assert torch.equal(project_sum(k, 0.0), k)
    k = torch.tensor([[0.0, -1.0, 5.0, -3.0], [-2.0, -2.0, 0.5, 4.5]])
    assert torch.equal(project_sum(k, 1.0), k)


@pytest.mark.parametrize("fn", PROJECTIONS)
def test_dyadic_shift_is_exactly_invariant(fn: Callable[..., Tensor]) -> None:
    x = torch.tensor([[0.5, -0.25, 1.75, 0.0], [3.0, -1.0, 0.125, 2.0]])
    kwargs = {} if fn is not project_box_sum else {"lower": -0.5, "upper": 0.75}
    base = fn(x, 1.0, **kwargs)
    for c in (-64.0, 1024.0):
        shifted = fn(x + c, 1.0, **kwargs)
        if fn is project_box_sum:
            # The box search stops within the rounding of its sums (Note [Box
            # threshold by safeguarded secant]): invariant up to that, not bit for bit.
            bound = 4 * (1 + math.log2(x.shape[-1])) * torch.finfo(x.dtype).eps * (1024 + 4)
            assert float((shifted - base).abs().max()) <= bound
        else:
            assert torch.equal(shifted, base)


@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_projections_are_shift_invariant(data: st.DataObject, dtype: torch.dtype) -> None:
    shape, dim, dims = data.draw(shape_and_dim(max_ndim=3))
    x = data.draw(tensors(shape, -10.0, 10.0)).to(dtype)
    c = data.draw(finite_floats(-100.0, 100.0))
    for fn, kwargs in (
        (project_sum, {}),
        (project_simplex, {}),
        (project_box_sum, {"lower": -1.0, "upper": 2.0}),
    ):
        total = 1.0
        shifted = fn(x + c, total, dim, **kwargs)
        # The shift itself rounds x + c by up to eps * |c| per entry.
        bound = (
            16
            * (4 + math.log2(x.numel()))
            * torch.finfo(dtype).eps
            * (slice_size(shape, dims) * (float(x.abs().max()) + abs(c)) + total)
        )
        assert float((shifted - fn(x, total, dim, **kwargs)).abs().max()) <= bound


def test_zero_size_batch_keeps_its_shape() -> None:
    for fn in PROJECTIONS:
        y = fn(torch.zeros(0, 3))
        assert y.shape == (0, 3)
        y = fn(torch.zeros(2, 0, 3), torch.ones(2, 0, 1), dim=-1)
        assert y.shape == (2, 0, 3)
    assert float(sum_violation(torch.zeros(0, 3))) == 0.0


# ---------------------------------------------------------------------------
# sum_violation
# ---------------------------------------------------------------------------


@given(data=st.data())
def test_sum_violation_is_the_largest_slice_deviation(data: st.DataObject) -> None:
    shape, dim, dims = data.draw(shape_and_dim())
    x = data.draw(tensors(shape, -10.0, 10.0))
    total = data.draw(totals(shape, dims, -10.0, 10.0))
    rows, _ = as_rows(x, dims)
    expected = float((rows.sum(1, keepdim=True) - total_rows(total, x, dims)).abs().max())
    assert math.isclose(float(sum_violation(x, total, dim)), expected, rel_tol=1e-12, abs_tol=1e-12)
    assert float(sum_violation(project_sum(x, total, dim), total, dim)) <= tolerance(x, total, dims)


# ---------------------------------------------------------------------------
# gradients (float64 gradcheck)
# ---------------------------------------------------------------------------


def _generic_point(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kink_margin(x: Tensor, y: Tensor, total: float | Tensor, lower: float, upper: float) -> float:
    """Distance of x - tau from the bounds: gradcheck needs it above its step."""
    tau_candidates = torch.where((y > lower) & (y < upper), x - y, torch.nan)
    tau = tau_candidates.nanmean(-1, keepdim=True)
    z = x - tau
    distance = torch.minimum((z - lower).abs(), (z - upper).abs())
    return float(distance.min())


@pytest.mark.parametrize("dim", [-1, 0, (0, 2), (-1, 1)])
def test_project_sum_gradcheck_wrt_input_and_total(dim: int | tuple[int, ...]) -> None:
    x = _generic_point((2, 3, 4), 0).requires_grad_()
    keep = project_sum(x.detach(), 0.0, dim).sum(dim, keepdim=True).shape
    total = _generic_point(tuple(keep), 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, t: project_sum(a, t, dim), (x, total))
    assert torch.autograd.gradgradcheck(lambda a, t: project_sum(a, t, dim), (x, total))


@pytest.mark.parametrize("dim", [-1, 0, (1, 2)])
def test_project_simplex_gradcheck_at_generic_points(dim: int | tuple[int, ...]) -> None:
    x = (2.0 * _generic_point((3, 4, 5), 2)).requires_grad_()
    keep = project_sum(x.detach(), 0.0, dim).sum(dim, keepdim=True).shape
    total = (1.0 + torch.rand(keep, dtype=torch.float64)).requires_grad_()
    y = project_simplex(x.detach(), total.detach(), dim)
    dims = (dim,) if isinstance(dim, int) else dim
    rows, _ = as_rows(x.detach(), dims)
    yrows, _ = as_rows(y, dims)
    assert _kink_margin(rows, yrows, total, 0.0, math.inf) > 1e-4, "not a generic point"
    assert torch.autograd.gradcheck(lambda a, t: project_simplex(a, t, dim), (x, total))


def test_project_simplex_jacobian_is_the_support_projector() -> None:
    x = torch.tensor([0.9, -2.0, 0.4, 0.7, -0.1], dtype=torch.float64)
    y = project_simplex(x, 1.0)
    support = y > 0
    s = support.double()
    expected = torch.diag(s) - torch.outer(s, s) / s.sum()
    jac_x, jac_total = torch.autograd.functional.jacobian(
        lambda a, t: project_simplex(a, t), (x, torch.tensor(1.0, dtype=torch.float64))
    )
    assert int(support.sum()) == 3
    assert torch.allclose(jac_x, expected, atol=1e-12, rtol=0)
    assert torch.allclose(jac_total, s / s.sum(), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("lower", "upper"), [(-0.4, 0.6), (0.0, math.inf), (-math.inf, 0.5)])
def test_project_box_sum_gradcheck_at_generic_points(lower: float, upper: float) -> None:
    x = (1.5 * _generic_point((4, 6), 3)).requires_grad_()
    total = torch.linspace(0.5, 1.5, 4, dtype=torch.float64).reshape(4, 1).requires_grad_()
    y = project_box_sum(x.detach(), total.detach(), -1, lower, upper)
    assert bool(((y > lower) & (y < upper)).any(-1).all()), "every row needs a free entry"
    assert _kink_margin(x.detach(), y, total, lower, upper) > 1e-4, "not a generic point"
    assert torch.autograd.gradcheck(
        lambda a, t: project_box_sum(a, t, -1, lower, upper), (x, total)
    )


def test_box_sum_gradient_is_zero_on_the_bounds() -> None:
    x = torch.tensor([3.0, 0.0, 0.0, -4.0], dtype=torch.float64, requires_grad=True)
    y = project_box_sum(x, 1.0, lower=-0.5, upper=0.8)
    assert torch.equal(y.detach(), torch.tensor([0.8, 0.35, 0.35, -0.5], dtype=torch.float64))
    (jac,) = torch.autograd.functional.jacobian(
        lambda a: project_box_sum(a, 1.0, lower=-0.5, upper=0.8), (x.detach(),)
    )
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[1:3, 1:3] = torch.tensor([[0.5, -0.5], [-0.5, 0.5]], dtype=torch.float64)
    assert torch.allclose(jac, expected, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [*PROJECTIONS, sum_violation])
@pytest.mark.parametrize("dim", [2, -3, (0, 5)])
def test_out_of_range_dim_raises_index_error(fn: Callable[..., Tensor], dim: object) -> None:
    with pytest.raises(IndexError, match=r"expected dim in range \[-2, 1\]"):
        fn(torch.zeros(2, 3), 1.0, dim)


@pytest.mark.parametrize("fn", [*PROJECTIONS, sum_violation])
@pytest.mark.parametrize(
    ("dim", "message"), [((0, 0), "distinct"), ((1, -1), "distinct"), ((), "at least one")]
)
def test_repeated_or_empty_dims_raise_value_error(
    fn: Callable[..., Tensor], dim: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        fn(torch.zeros(2, 3), 1.0, dim)


@pytest.mark.parametrize("fn", PROJECTIONS)
@pytest.mark.parametrize("dim", [1.0, "0", None, True, (0, 1.5)])
def test_non_integer_dim_raises_type_error(fn: Callable[..., Tensor], dim: object) -> None:
    with pytest.raises(TypeError, match="expected dim"):
        fn(torch.zeros(2, 3), 1.0, dim)


@pytest.mark.parametrize("fn", [*PROJECTIONS, sum_violation])
@pytest.mark.parametrize(
    "total",
    [
        math.nan,
        math.inf,
        -math.inf,
        torch.tensor([1.0, math.nan]),
        torch.tensor([[math.inf], [1.0]]),
    ],
)
def test_non_finite_total_raises_value_error(fn: Callable[..., Tensor], total: object) -> None:
    with pytest.raises(ValueError, match="expected a finite total"):
        fn(torch.zeros(2, 2), total)


@pytest.mark.parametrize("fn", PROJECTIONS)
def test_total_of_wrong_shape_or_type_raises(fn: Callable[..., Tensor]) -> None:
    with pytest.raises(ValueError, match=r"keepdim-reduced shape \(2, 1\)"):
        fn(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="keepdim-reduced shape"):
        fn(torch.zeros(2, 3), torch.ones(2, 1, 1))
    with pytest.raises(TypeError, match="expected total"):
        fn(torch.zeros(2, 3), "1")
    with pytest.raises(TypeError, match="expected total"):
        fn(torch.zeros(2, 3), True)
    with pytest.raises(TypeError, match="expected total to be a real tensor"):
        fn(torch.zeros(2, 3), torch.ones(2, 1, dtype=torch.bool))


@pytest.mark.parametrize(
    "total", [0.0, -1.0, torch.tensor([[1.0], [0.0]]), torch.tensor([-2.0, 1.0])]
)
def test_simplex_total_must_be_positive(total: object) -> None:
    with pytest.raises(ValueError, match="expected total > 0"):
        project_simplex(torch.zeros(2, 3), total)


@pytest.mark.parametrize(
    ("total", "lower", "upper", "message"),
    [
        (4.0, 1.5, math.inf, "n \\* lower <= total"),
        (1.0, -math.inf, 0.2, "n \\* lower <= total"),
        (torch.tensor([[1.0], [9.0]]), 0.0, 2.0, "got total=9"),
        (1.0, 0.6, 0.4, "expected lower <= upper"),
        (1.0, math.nan, 1.0, "expected lower to be a number"),
        (1.0, 0.0, math.nan, "expected upper to be a number"),
        (1.0, math.inf, math.inf, "expected lower < inf"),
    ],
)
def test_infeasible_box_raises_value_error(
    total: object, lower: float, upper: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        project_box_sum(torch.zeros(2, 3), total, lower=lower, upper=upper)


@pytest.mark.parametrize("fn", [*PROJECTIONS, sum_violation])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_tensors_raise_type_error(
    fn: Callable[..., Tensor], dtype: torch.dtype
) -> None:
    with pytest.raises(TypeError, match="expected x to be a floating point tensor"):
        fn(torch.ones(2, 3, dtype=dtype))


@pytest.mark.parametrize("fn", PROJECTIONS)
def test_non_tensor_input_raises_type_error(fn: Callable[..., Tensor]) -> None:
    with pytest.raises(TypeError, match=r"expected x to be a torch\.Tensor, got list"):
        fn([0.5, 0.5])


@pytest.mark.parametrize("fn", PROJECTIONS)
def test_empty_slices_raise_value_error(fn: Callable[..., Tensor]) -> None:
    with pytest.raises(ValueError, match="expected at least one element"):
        fn(torch.zeros(3, 0))


@pytest.mark.parametrize("fn", PROJECTIONS)
def test_projections_never_return_nan_on_finite_input(fn: Callable[..., Tensor]) -> None:
    big = torch.finfo(torch.float32).max / 4
    x = torch.tensor([[big, -big, 0.0], [1e-30, -1e-30, 0.0], [0.0, 0.0, 0.0]])
    y = fn(x)
    assert bool(torch.isfinite(y).all())
    assert_sums(y[1:], 1.0, (-1,))


# ---------------------------------------------------------------------------
# wide and one-sided boxes, forward mode, vmap, non-finite rows, identities
# ---------------------------------------------------------------------------


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("upper", [100.0, 1e4, 1e6])
def test_box_sum_with_a_wide_upper_bound_keeps_the_total(upper: float) -> None:
    # The upper bound far from the data must not enter the rounding of the sums.
    x = _randn(0, 1024, 512)
    y = project_box_sum(x, 1.0, lower=0.0, upper=upper)
    assert_sums(y, 1.0, (-1,))
    assert bool((y >= 0).all())
    expected = ref_project_box_sum(x.double(), 1.0, (-1,), 0.0, upper)
    assert float((y.double() - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize(("lower", "upper"), [(-1e4, math.inf), (-math.inf, 1e4)])
def test_box_sum_with_one_far_finite_bound_keeps_the_total(lower: float, upper: float) -> None:
    x = _randn(1, 1024, 512)
    y = project_box_sum(x, 1.0, lower=lower, upper=upper)
    assert_sums(y, 1.0, (-1,))
    # the bound is inactive: the projection is the affine one
    expected = ref_project_sum(x.double(), 1.0)
    assert float((y.double() - expected).abs().max()) <= 1e-5


def test_box_sum_with_an_upper_bound_beyond_float32_is_one_sided() -> None:
    x = torch.tensor([[-1.9954, -0.3385]])
    expected = torch.tensor([[0.0, 1.0]])

    def fn(v: Tensor) -> Tensor:
        return project_box_sum(v, 1.0, lower=0.0, upper=1e30)

    assert torch.equal(fn(x), expected)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), expected)
    finally:
        torch._dynamo.reset()


def test_jacfwd_of_the_simplex_projection_is_the_support_projector() -> None:
    x = torch.tensor([0.5, 0.3, -0.2, 0.1], dtype=torch.float64)
    support = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)  # tau = -0.0333
    expected = torch.diag(support) - torch.outer(support, support) / 3
    torch.testing.assert_close(torch.func.jacfwd(project_simplex)(x), expected)
    torch.testing.assert_close(torch.func.jacrev(project_simplex)(x), expected)


@pytest.mark.parametrize(
    "fn",
    [
        lambda v: project_sum(v, 1.0),
        lambda v: AffineSum(total=1.0)(v),
        lambda v: project_box_sum(v, 1.0, lower=-1.0, upper=1.0),
        lambda v: BoxSum(total=1.0, lower=-1.0, upper=1.0)(v),
        lambda v: project_box_sum(v, 1.0, lower=-1.0),
        lambda v: BoxSum(total=1.0, upper=1.0)(v),
    ],
    ids=["project_sum", "AffineSum", "project_box_sum", "BoxSum", "box-lower", "BoxSum-upper"],
)
def test_forward_mode_ad_equals_reverse_mode(fn: Callable[[Tensor], Tensor]) -> None:
    x = torch.tensor([0.4, -0.3, 0.9, 0.05], dtype=torch.float64)
    jac = torch.func.jacrev(fn)(x)
    assert float((jac - torch.eye(4, dtype=torch.float64)).abs().max()) > 0.1  # not identity
    torch.testing.assert_close(torch.func.jacfwd(fn)(x), jac)
    tangent = torch.tensor([1.0, -2.0, 0.5, 0.25], dtype=torch.float64)
    _, dy = torch.func.jvp(fn, (x,), (tangent,))
    torch.testing.assert_close(dy, jac @ tangent)


def test_vmap_of_the_box_projection_without_grad() -> None:
    x = _randn(2, 6, 5)
    assert not x.requires_grad
    got = torch.vmap(lambda v: project_box_sum(v, 1.0, lower=-1.0, upper=1.0))(x)
    torch.testing.assert_close(got, project_box_sum(x, 1.0, lower=-1.0, upper=1.0))
    expected = ref_project_box_sum(x.double(), 1.0, (-1,), -1.0, 1.0)
    assert float((got.double() - expected).abs().max()) <= 1e-6


@pytest.mark.parametrize(
    "fn",
    [
        lambda v, c: project_sum(v, c),
        lambda v, c: project_simplex(v, c),
        lambda v, c: project_box_sum(v, c, lower=-1.0, upper=1.0),
        lambda v, c: project_box_sum(v, c, lower=-1.0),
    ],
    ids=["project_sum", "project_simplex", "project_box_sum", "box-lower"],
)
def test_vmap_over_a_tensor_total(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    x = _randn(3, 3, 5)
    totals = torch.tensor([0.5, 1.0, 2.0])
    got = torch.func.vmap(fn)(x, totals)
    torch.testing.assert_close(got, fn(x, totals.reshape(3, 1)))
    assert_sums(got, totals.reshape(3, 1), (-1,))


def test_box_sum_is_the_identity_on_a_point_with_every_entry_on_a_bound() -> None:
    assert torch.equal(BoxSum(total=8, lower=0, upper=1)(torch.ones(8)), torch.ones(8))
    assert torch.equal(project_box_sum(torch.ones(8), 8.0, lower=0.0, upper=1.0), torch.ones(8))
    assert torch.equal(
        project_box_sum(-torch.ones(2, 8), -16.0, lower=-2.0, upper=1.0), -torch.ones(2, 8) * 2.0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("total", [0.01, 1.0, 10.0])
def test_sparsemax_is_the_identity_on_the_simplex(total: float, dtype: torch.dtype) -> None:
    constraint = Simplex(total=total, dim=-1, method="sparsemax")
    eps = torch.finfo(dtype).eps
    for seed in range(20):
        v = torch.rand(6, 9, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        v[:, ::3] = 0.0  # sparse points, the vertex too
        v[0] = 0.0
        v[0, 4] = 1.0
        v = (v / v.sum(-1, keepdim=True) * total).to(dtype)
        y = constraint(v)
        # within the rounding of the row's largest entry: two roundings (the shift by
        # the row max and the threshold), each at most half an ulp
        err = (y - v).abs().amax(-1) / (eps * v.abs().amax(-1))
        assert float(err.max()) <= 2.0, f"seed {seed}: {float(err.max()):.3g} ulp"
        if float(torch.tensor(total, dtype=dtype)) == total:
            # a vertex whose sum is exact in the dtype stays a vertex (else its
            # projection spreads the rounding of the total, as it should)
            assert torch.equal(y[0], v[0])


@pytest.mark.parametrize(("lower", "upper"), [(-0.5, 1.0), (0.0, math.inf), (-math.inf, math.inf)])
def test_the_sum_refinement_in_row_blocks_equals_the_whole_one(
    lower: float, upper: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many rows (several blocks), a total per row, and a non-contiguous layout (one block).
    x = _randn(11, 300, 1200) * 3.0
    total = torch.linspace(0.5, 2.0, 300).reshape(300, 1)
    views = [x, x.T.contiguous().T]
    blocked = [project_box_sum(v, total, lower=lower, upper=upper) for v in views]
    monkeypatch.setattr(_autograd, "_BLOCK", 1 << 40)
    whole = [project_box_sum(v, total, lower=lower, upper=upper) for v in views]
    for b, w in zip(blocked, whole, strict=True):
        assert torch.equal(b, w)
        assert_sums(b, total, (-1,), source=x)
    expected = ref_project_box_sum(x.double(), total.double(), (-1,), lower, upper)
    assert float((blocked[0].double() - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize(("lower", "upper"), [(-0.5, 1.0), (0.0, math.inf), (-math.inf, math.inf)])
def test_a_nan_row_stays_nan_and_the_other_rows_are_projected(lower: float, upper: float) -> None:
    # The look at the sums sees the NaN and computes again: NaN is never hidden.
    x = _randn(12, 6, 40)
    x[2, 5] = math.nan
    y = project_box_sum(x, 1.0, lower=lower, upper=upper)
    assert bool(y[2].isnan().any())
    rest = torch.cat([x[:2], x[3:]])
    expected = ref_project_box_sum(rest.double(), 1.0, (-1,), lower, upper)
    got = torch.cat([y[:2], y[3:]])
    assert float((got.double() - expected).abs().max()) <= 1e-6
    assert_sums(got, 1.0, (-1,), source=rest)


def test_an_all_negative_infinite_row_projects_to_the_uniform_row() -> None:
    x = torch.full((2, 4), -math.inf)
    x[1] = _randn(4, 4)
    y = project_simplex(x, 2.0)
    assert torch.equal(y[0], torch.full((4,), 0.5))
    torch.testing.assert_close(y[1], ref_project_simplex(x[1:].double(), 2.0)[0].float())
    sparsemax = Simplex(method="sparsemax", dim=-1)
    assert torch.equal(sparsemax(torch.full((3, 4), -math.inf)), torch.full((3, 4), 0.25))
    # one -inf entry gets nothing; the rest of the row is projected as without it
    z = project_simplex(torch.tensor([-math.inf, 0.5, 0.25, -1.0]), 1.0)
    assert torch.equal(z, torch.tensor([0.0, 0.625, 0.375, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["eager", "vmap"])
def test_project_sum_of_entries_near_the_dtype_max_stays_finite(
    dtype: torch.dtype, mode: str
) -> None:
    """The plain sum overflows; the scaled mean (Note [Overflow-free sums]) does not."""
    big = torch.finfo(dtype).max
    x = torch.tensor([[0.9 * big, 0.8 * big, -0.1 * big, 0.5 * big]], dtype=dtype)
    if mode == "eager":
        y = project_sum(x, 1.0)
    else:  # no host look at the sums: both sums computed, chosen per slice
        y = torch.func.vmap(lambda row: project_sum(row, 1.0))(x)
    assert bool(torch.isfinite(y).all())
    xd = x.double()
    expected = xd + (0.25 - (xd / 4).sum(-1, keepdim=True))  # the mean, without overflow
    assert float((y.double() - expected).abs().max()) <= 4 * torch.finfo(dtype).eps * big


# ---------------------------------------------------------------------------
# per-entry bounds
# ---------------------------------------------------------------------------


@st.composite
def entry_box_problems(draw: st.DrawFn) -> tuple:
    """x's shape and dims, per-entry bounds (a broadcastable shape, some entries fixed,
    infinite entries on at most one side) and a feasible total per slice."""
    shape, dim, dims = draw(shape_and_dim(max_ndim=3))
    # bounds of x's shape, or of a shape broadcasting to it (leading 1s)
    bshape = tuple(1 if draw(st.booleans()) else s for s in shape)
    a = draw(tensors(bshape, -5.0, 5.0))
    width = draw(tensors(bshape, 0.0, 4.0))
    width = torch.where(width < 0.5, torch.zeros_like(width), width)  # fixed entries
    lower, upper = a, a + width
    side = draw(st.sampled_from(["both", "no upper", "no lower", "scalar lower"]))
    if side == "no upper":
        upper = torch.where(width > 3.0, math.inf, upper)
    elif side == "no lower":
        lower = torch.where(width > 3.0, -math.inf, lower)
    low_sum = lower.expand(shape).sum(dims, keepdim=True)
    high_sum = upper.expand(shape).sum(dims, keepdim=True)
    finite_low = torch.where(low_sum.isinf(), high_sum - 50.0, low_sum)
    finite_high = torch.where(high_sum.isinf(), finite_low + 100.0, high_sum)
    frac = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    total = (finite_low + frac * (finite_high - finite_low)).clamp(finite_low, finite_high)
    if side == "scalar lower":
        return shape, dim, dims, float(a.min()), upper.clamp_min(float(a.min())), None
    return shape, dim, dims, lower, upper, total


@given(problem=entry_box_problems(), data=st.data(), dtype=st.sampled_from(DTYPES[:2]))
def test_per_entry_bounds_match_the_bisection_reference(
    problem: tuple, data: st.DataObject, dtype: torch.dtype
) -> None:
    shape, dim, dims, lower, upper, total = problem
    if total is None:  # a scalar lower bound: pick a total between the slice sums
        low = lower * slice_size(shape, dims)
        high = upper.expand(shape).sum(dims, keepdim=True)
        total = low + 0.5 * (high - low)
    x = data.draw(tensors(shape, -20.0, 20.0)).to(dtype)
    y = project_box_sum(x, total, dim, lower=lower, upper=upper)
    assert y.dtype == dtype and y.shape == x.shape
    expected = ref_project_box_entries(x, total, dims, lower, upper)
    finite = [b[b.isfinite()].abs() for b in (torch.as_tensor(lower), upper)]
    mass = slice_size(shape, dims) * max([float(b.max()) for b in finite if b.numel()] + [0.0])
    assert_matches_reference(y, expected, x, total, dims, mass)
    low = torch.as_tensor(lower, dtype=dtype)
    assert bool((y >= low).all()) and bool((y <= upper.to(dtype)).all()), "outside the bounds"
    assert_sums(y, total, dims, source=x)


def test_capped_simplex_exact_values_and_fixed_entries() -> None:
    caps = torch.tensor([0.5, 0.3, 0.4])
    y = project_box_sum(torch.tensor([3.0, 2.0, 0.0]), 1.0, lower=0.0, upper=caps)
    assert torch.equal(y[:2], caps[:2])  # entries on their caps are the caps, exactly
    torch.testing.assert_close(y, torch.tensor([0.5, 0.3, 0.2]), rtol=0, atol=2e-7)
    # an entry with lower == upper keeps that value whatever the input
    lower = torch.tensor([0.0, 0.25, 0.0, 0.0])
    upper = torch.tensor([1.0, 0.25, 1.0, 1.0])
    y = project_box_sum(torch.tensor([[5.0, -3.0, 0.0, 1.0]]), 1.0, lower=lower, upper=upper)
    assert float(y[0, 1]) == 0.25 and abs(float(y.sum()) - 1.0) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("lower", "upper"), [(-0.3, 0.4), (0.0, math.inf), (-math.inf, 0.5)])
def test_uniform_tensor_bounds_equal_float_bounds(
    dtype: torch.dtype, lower: float, upper: float
) -> None:
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(3), dtype=dtype)
    want = project_box_sum(x, 1.0, lower=lower, upper=upper)
    full_lower = torch.full((9,), lower, dtype=torch.float64)
    got = project_box_sum(x, 1.0, lower=full_lower, upper=torch.tensor(upper, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=0, atol=8 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_and_one_sided_tensor_bounds_keep_the_total(dtype: torch.dtype) -> None:
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for lower, upper in [
        (torch.zeros(12), torch.full((12,), 1e30)),
        (torch.full((12,), -1e4), torch.full((12,), math.inf)),
        (torch.full((12,), -math.inf), torch.linspace(0.0, 1e4, 12)),
    ]:
        y = project_box_sum(x, 1.0, lower=lower, upper=upper)
        expected = ref_project_box_entries(x, 1.0, (-1,), lower, upper)
        assert_matches_reference(y, expected, x, 1.0, (-1,))
        assert_sums(y, 1.0, (-1,), source=x)


def test_per_entry_bounds_over_several_dims_with_a_tensor_total() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    upper = torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.2
    total = torch.rand(4, generator=g, dtype=torch.float64)  # reduced shape
    y = project_box_sum(x, total, (1, 2), lower=0.0, upper=upper)
    expected = ref_project_box_entries(x, total, (1, 2), 0.0, upper)
    assert_matches_reference(y, expected, x, total, (1, 2))


def test_per_entry_bounds_gradcheck_and_jacobian() -> None:
    g = torch.Generator().manual_seed(2)
    lower = -torch.rand(7, generator=g, dtype=torch.float64) * 0.3
    upper = torch.rand(7, generator=g, dtype=torch.float64) * 0.5 + 0.1
    x = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    total = torch.tensor([[0.5], [1.0], [0.2]], dtype=torch.float64, requires_grad=True)

    def fn(x: Tensor, total: Tensor) -> Tensor:
        return project_box_sum(x, total, lower=lower, upper=upper)

    assert torch.autograd.gradcheck(fn, (x, total))
    y = fn(x, total).detach()
    free = ((y > lower) & (y < upper)).double()[0]
    jac = torch.func.jacrev(lambda r: fn(r, total.detach()[:1]))(x.detach()[:1])[0, :, 0]
    want = torch.diag(free) - torch.outer(free, free) / free.sum().clamp_min(1.0)
    torch.testing.assert_close(jac, want)


@pytest.mark.parametrize(
    ("lower", "upper", "error", "message"),
    [
        (
            0.0,
            torch.full((3,), 0.2),
            ValueError,
            "sum\\(upper\\)=0.6 in the slice at index \\(0,\\)",
        ),
        (torch.tensor([0.5, 0.5, 0.5]), 1.0, ValueError, "sum\\(lower\\)=1.5"),
        (torch.zeros(4), 1.0, ValueError, "broadcastable to the constrained tensor's shape"),
        (
            torch.tensor([0.0, 0.9, 0.0]),
            torch.tensor([1.0, 0.8, 1.0]),
            ValueError,
            "at index \\(1,\\)",
        ),
        (torch.tensor([0.0, math.nan, 0.0]), 1.0, ValueError, "without NaN"),
        (
            torch.tensor([0.0, -math.inf, 0.0]),
            torch.tensor([1.0, math.inf, 1.0]),
            ValueError,
            "one side only",
        ),
        (torch.tensor([0.0, math.inf, 0.0]), math.inf, ValueError, "every lower < inf"),
        (torch.zeros(3, dtype=torch.complex64), 1.0, TypeError, "real tensor"),
        (torch.zeros(2), torch.ones(3), ValueError, "broadcastable to each other"),
    ],
)
def test_bad_per_entry_bounds_raise(
    lower: object, upper: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        project_box_sum(torch.zeros(2, 3), 1.0, lower=lower, upper=upper)  # type: ignore[arg-type]


def test_integer_per_entry_bounds_are_accepted() -> None:
    y = project_box_sum(torch.tensor([4.0, 1.0, 0.0]), 2.0, lower=0, upper=torch.tensor([1, 1, 1]))
    assert torch.equal(y, torch.tensor([1.0, 1.0, 0.0]))
