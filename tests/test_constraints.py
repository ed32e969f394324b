"""sumto.constraints: forward, right_inverse, project, violation, extra_repr of each class.

Each map is compared with an independent float64 formula written from the
definition (tests/reference.py: the projections, softmax and relu fusion).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import Tensor, nn

import sumto
from reference import (
    RELU_EPS,
    SHARPEN,
    SHARPEN_DIAGONAL,
    as_rows,
    assert_matches_reference,
    assert_sums,
    ref_project_box_sum,
    ref_project_simplex,
    ref_project_sum,
    ref_relu,
    ref_softmax,
    tolerance,
    total_rows,
)
from sumto import AffineSum, BoxSum, Constraint, Simplex

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
METHODS = ["softmax", "sparsemax", "relu"]


def default_dims(ndim: int) -> tuple[int, ...]:
    """dim=None, written out: dims 1..ndim-1 for 2+ dims, dim 0 otherwise."""
    return tuple(range(1, ndim)) if ndim >= 2 else (0,)


@st.composite
def problems(draw: st.DrawFn, positive_total: bool = False) -> tuple:
    """(x float64, dim spec or None, normalised dims, total) for shapes up to 4-D."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    if draw(st.booleans()):
        dim, dims = None, default_dims(ndim)
    else:
        order = draw(st.permutations(list(range(ndim))))
        k = draw(st.integers(1, ndim))
        picked = tuple(d - ndim if draw(st.booleans()) else d for d in order[:k])
        dim = picked[0] if k == 1 else picked
        dims = tuple(d % ndim for d in picked)
    x = torch.from_numpy(
        draw(arrays(np.float64, shape, elements=st.floats(-30, 30, allow_nan=False)))
    )
    lo, hi = (0.05, 10.0) if positive_total else (-10.0, 10.0)
    if draw(st.booleans()):
        total: float | Tensor = draw(st.floats(lo, hi))
    else:
        keep = tuple(1 if i in dims else s for i, s in enumerate(shape))
        total = torch.from_numpy(draw(arrays(np.float64, keep, elements=st.floats(lo, hi))))
    return x, dim, dims, total


# ---------------------------------------------------------------------------
# forward against references
# ---------------------------------------------------------------------------


@given(problem=problems(), dtype=st.sampled_from(DTYPES))
def test_affine_sum_forward_and_project_match_reference(problem: tuple, dtype: torch.dtype) -> None:
    x, dim, dims, total = problem
    c = AffineSum(total, dim)
    xd = x.to(dtype)
    expected = ref_project_sum(xd.double(), total, dims)
    for y in (c(xd), c.project(xd)):
        assert y.dtype == dtype and y.shape == x.shape
        assert_matches_reference(y, expected, xd, total, dims)
    assert float(c.violation(c(xd.double()))) <= tolerance(x, total, dims)


@given(problem=problems(positive_total=True), data=st.data(), dtype=st.sampled_from(DTYPES))
def test_simplex_forward_matches_reference_for_each_method(
    problem: tuple, data: st.DataObject, dtype: torch.dtype
) -> None:
    x, dim, dims, total = problem
    method = data.draw(st.sampled_from(METHODS))
    temperature = data.draw(st.sampled_from([1.0, 0.5, 3.0]))
    c = Simplex(total, dim, method=method, temperature=temperature)
    xd = x.to(dtype)
    y = c(xd)
    assert y.dtype == dtype and y.shape == x.shape
    assert bool((y >= 0).all())
    if method == "softmax":
        expected = ref_softmax(xd.double(), total, dims, temperature)
    elif method == "sparsemax":
        expected = ref_project_simplex(xd.double() / temperature, total, dims)
    else:
        expected = ref_relu(xd.double(), total, dims)
    # Sparsemax subtracts a threshold from x / T: its rounding scales with |x / T|.
    scale_of = xd.double() / temperature if method == "sparsemax" else expected
    assert_matches_reference(y, expected, scale_of, total, dims)
    assert_sums(y, total, dims)
    # project() is the Euclidean projection whatever the method.
    assert_matches_reference(
        c.project(xd), ref_project_simplex(xd.double(), total, dims), xd, total, dims
    )


@given(problem=problems(), data=st.data(), dtype=st.sampled_from(DTYPES))
def test_box_sum_forward_matches_reference(
    problem: tuple, data: st.DataObject, dtype: torch.dtype
) -> None:
    x, dim, dims, _ = problem
    n = math.prod(x.shape[d] for d in dims)
    lower = data.draw(st.sampled_from([-math.inf, -2.0, -0.5, 0.0]))
    upper = data.draw(st.sampled_from([math.inf, 0.5, 1.0, 3.0]))
    lo = n * lower if math.isfinite(lower) else -10.0
    hi = n * upper if math.isfinite(upper) else 10.0
    total = data.draw(st.floats(max(lo, -10.0), min(hi, 10.0)))
    c = BoxSum(total, dim, lower, upper)
    xd = x.to(dtype)
    y = c(xd)
    assert y.dtype == dtype and y.shape == x.shape
    assert bool((y >= lower).all() and (y <= upper).all())
    bound_mass = n * max(abs(b) for b in (lower, upper, 0.0) if math.isfinite(b))
    expected = ref_project_box_sum(xd.double(), total, dims, lower, upper)
    assert_matches_reference(y, expected, xd.abs() + bound_mass / n, total, dims)
    assert torch.equal(c.project(xd), y)


# ---------------------------------------------------------------------------
# dim=None
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [AffineSum, Simplex, lambda: BoxSum(lower=-1.0, upper=1.0)])
def test_dim_none_is_one_sum_per_output_unit(make: type[Constraint]) -> None:
    c = make()
    assert c.dims(1) == (0,) and c.dims(2) == (1,) and c.dims(4) == (1, 2, 3)
    g = torch.Generator().manual_seed(0)
    linear = torch.randn(5, 3, generator=g)  # (out, in): each row sums to 1
    assert_sums(c(linear), 1.0, (1,))
    conv = torch.randn(4, 2, 3, 3, generator=g)  # (out, in, kh, kw): each filter sums to 1
    assert_sums(c(conv), 1.0, (1, 2, 3))
    vector = torch.randn(6, generator=g)  # 1-D: the whole vector sums to 1
    assert_sums(c(vector), 1.0, (0,))
    assert float(c(torch.tensor(3.0))) == 1.0


def test_explicit_dims_override_the_default() -> None:
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    assert_sums(AffineSum(2.0, dim=0)(x), 2.0, (0,))
    assert_sums(AffineSum(2.0, dim=(-1, -2))(x), 2.0, (2, 3))
    assert_sums(Simplex(2.0, dim=(0, 1))(x), 2.0, (0, 1))
    with pytest.raises(IndexError, match="expected dim in range"):
        AffineSum(dim=4)(x)


# ---------------------------------------------------------------------------
# right_inverse
# ---------------------------------------------------------------------------


def test_affine_and_box_right_inverse_is_the_identity_on_the_set() -> None:
    k = torch.tensor(SHARPEN).reshape(1, 1, 3, 3)
    assert torch.equal(AffineSum()(AffineSum().right_inverse(k)), k)
    w = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    box = BoxSum(lower=0.0, upper=1.0)
    assert torch.equal(box.right_inverse(w), w) and torch.equal(box(w), w)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("temperature", [1.0, 0.25, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simplex_right_inverse_round_trips(
    method: str, temperature: float, dtype: torch.dtype
) -> None:
    total = torch.tensor([[1.0], [2.5], [0.5]], dtype=dtype)
    value = torch.tensor(
        [[0.2, 0.3, 0.5, 0.0], [0.5, 0.5, 0.5, 1.0], [0.0, 0.0, 0.5, 0.0]], dtype=dtype
    )
    c = Simplex(total, method=method, temperature=temperature)
    pre = c.right_inverse(value)
    assert pre.dtype == dtype and bool(torch.isfinite(pre).all())
    back = c(pre)
    eps = torch.finfo(dtype).eps
    if method == "relu":
        # Note [relu fusion eps]: entries are pulled towards c / n by at most c * eps.
        assert float((back - value).abs().max()) <= 2.5 * RELU_EPS
    elif method == "softmax":
        # Zeros cannot be reached: they become eps * c (pre-weight T log eps).
        assert float((back - value).abs().max()) <= 16 * eps * 2.5
        assert float(pre.min()) >= temperature * math.log(eps) - 1e-3
    else:
        assert float((back - value).abs().max()) <= 16 * eps * 2.5
        assert bool((back[value == 0] == 0).all()), "sparsemax keeps exact zeros"
    assert_sums(back, total, (1,))


def test_right_inverse_rejects_values_off_the_set_and_says_by_how_much() -> None:
    with pytest.raises(ValueError, match=r"got a violation of 0\.5"):
        AffineSum().right_inverse(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"got a violation of 0\.25"):
        Simplex().right_inverse(torch.tensor([1.25, -0.25]))
    with pytest.raises(ValueError, match=r"got a violation of 0\.2"):
        BoxSum(lower=0.0, upper=0.8).right_inverse(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="expected a finite value"):
        AffineSum().right_inverse(torch.tensor([math.nan, 1.0]))
    with pytest.raises(TypeError, match="floating point"):
        AffineSum().right_inverse(torch.tensor([1, 0]))


# ---------------------------------------------------------------------------
# violation
# ---------------------------------------------------------------------------


def test_violation_is_zero_on_the_set() -> None:
    w = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    for c in (AffineSum(), Simplex(), BoxSum(lower=0.0, upper=1.0)):
        v = c.violation(w)
        assert v.ndim == 0 and float(v) == 0.0
    k = torch.tensor(SHARPEN_DIAGONAL).reshape(1, 1, 3, 3)
    assert float(AffineSum().violation(k)) == 0.0
    assert (
        float(Simplex(torch.tensor([2.0, 4.0])).violation(torch.tensor([[1.0, 1.0], [4.0, 0.0]])))
        == 0
    )


def test_violation_is_the_largest_deviation_off_the_set() -> None:
    x = torch.tensor([[0.5, 0.75], [2.0, -1.5]])  # sums 1.25 and 0.5; min entry -1.5
    assert float(AffineSum().violation(x)) == 0.5
    assert float(AffineSum(total=torch.tensor([1.25, 0.5])).violation(x)) == 0.0
    assert float(Simplex().violation(x)) == 1.5
    assert float(Simplex().violation(torch.tensor([0.5, 0.75]))) == 0.25
    assert float(BoxSum(lower=-1.0, upper=1.0).violation(x)) == 1.0
    assert float(BoxSum(lower=-2.0, upper=1.5).violation(x)) == 0.5
    assert math.isnan(float(AffineSum().violation(torch.tensor([math.nan, 1.0]))))


@given(problem=problems(positive_total=True))
def test_violation_is_positive_off_the_set_and_zero_after_projection(problem: tuple) -> None:
    x, dim, dims, total = problem
    for c in (
        AffineSum(total, dim),
        Simplex(total, dim),
        BoxSum(total, dim, lower=-5.0, upper=50.0),
    ):
        rows, _ = as_rows(x, dims)
        off_sum = float((rows.sum(1, keepdim=True) - total_rows(total, x, dims)).abs().max())
        # Both sides are float64 sums in different orders: equal up to their rounding.
        assert float(c.violation(x)) >= off_sum - tolerance(x, total, dims)
        assert float(c.violation(c.project(x))) <= tolerance(x, total, dims)


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "constraint",
    [
        AffineSum(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)),
        Simplex(2.0, method="softmax", temperature=0.7),
        Simplex(1.0, method="sparsemax", temperature=2.0),
        Simplex(1.0, method="relu"),
        BoxSum(1.0, lower=-0.3, upper=0.6),
    ],
    ids=["affine", "softmax", "sparsemax", "relu", "box"],
)
def test_constraint_forward_gradcheck(constraint: Constraint) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    if isinstance(constraint, Simplex) and constraint.method == "relu":
        x = x.abs() + 0.1  # away from the kink of relu
    x.requires_grad_()
    assert torch.autograd.gradcheck(constraint, (x,))


def test_relu_all_non_positive_is_uniform_with_zero_gradient() -> None:
    c = Simplex(total=torch.tensor([[3.0], [1.0], [2.0]]), method="relu")
    x = torch.tensor(
        [[-1.0, -2.0, -0.5], [0.0, 0.0, 0.0], [-1e30, -math.inf, 0.0]], requires_grad=True
    )
    w = c(x)
    assert torch.equal(
        w.detach(), torch.tensor([[1.0, 1.0, 1.0], [1 / 3, 1 / 3, 1 / 3], [2 / 3] * 3])
    )
    (w * torch.arange(9.0).reshape(3, 3)).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros(3, 3))


def test_relu_eps_bias_is_the_documented_pull_towards_uniform() -> None:
    # w = S / (S + eps) * (c r / S) + eps / (S + eps) * (c / n): BiFPN's weights,
    # mixed with the uniform ones by a relative eps / (S + eps).
    x = torch.tensor([[2.0, 0.5, -1.0, 0.0], [1e-4, 0.0, 0.0, 0.0]], dtype=torch.float64)
    w = Simplex(total=3.0, method="relu")(x)
    r = x.clamp_min(0)
    s = r.sum(1, keepdim=True)
    expected = s / (s + RELU_EPS) * (3.0 * r / s) + RELU_EPS / (s + RELU_EPS) * (3.0 / 4)
    assert torch.allclose(w, expected, rtol=1e-14, atol=0)
    assert sumto.constraints.RELU_EPS == RELU_EPS
    assert "10^{-4}" in (Simplex.__doc__ or "") and "never NaN" in (Simplex.__doc__ or "")


def test_softmax_stays_finite_for_huge_logit_gaps() -> None:
    x = torch.tensor([[1e30, 0.0, -1e30], [0.0, 0.0, 0.0]])
    for method in METHODS:
        w = Simplex(method=method)(x)
        assert bool(torch.isfinite(w).all())
        assert_sums(w, 1.0, (1,))


# ---------------------------------------------------------------------------
# per-slice totals and repr
# ---------------------------------------------------------------------------


def test_tensor_total_is_a_buffer_that_follows_the_module() -> None:
    c = Simplex(total=torch.tensor([1.0, 2.0, 3.0]))
    assert [name for name, _ in c.named_buffers()] == ["total"]
    c = c.to(torch.float64)
    assert c.total.dtype == torch.float64
    w = c(torch.zeros(3, 4, dtype=torch.float64))
    assert torch.equal(w.sum(1), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    # Integer totals are accepted and stored as floats.
    assert AffineSum(torch.tensor([1, 2])).total.dtype == torch.get_default_dtype()


def test_extra_repr_shows_the_configuration() -> None:
    assert repr(AffineSum()) == "AffineSum(total=1, dim=None)"
    assert repr(AffineSum(2.5, dim=(0, -1))) == "AffineSum(total=2.5, dim=(0, -1))"
    assert (
        repr(Simplex(torch.ones(3)))
        == "Simplex(total=Tensor(shape=(3,)), dim=None, method='softmax')"
    )
    assert repr(Simplex(method="relu", temperature=2.0)) == (
        "Simplex(total=1, dim=None, method='relu', temperature=2)"
    )
    assert (
        repr(BoxSum(0.0, 1, lower=-1.0, upper=0.5))
        == "BoxSum(total=0, dim=(1,), lower=-1, upper=0.5)"
    )
    assert repr(BoxSum()) == "BoxSum(total=1, dim=None, lower=-inf, upper=inf)"


# ---------------------------------------------------------------------------
# bad construction arguments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: AffineSum(math.nan), ValueError, "expected a finite total"),
        (lambda: AffineSum(torch.tensor([1.0, math.inf])), ValueError, "expected a finite total"),
        (lambda: AffineSum("1"), TypeError, "expected total"),
        (lambda: AffineSum(True), TypeError, "expected total"),
        (lambda: AffineSum(torch.tensor([True])), TypeError, "expected total to be a real tensor"),
        (lambda: AffineSum(dim=(1, 1)), ValueError, "expected distinct dims"),
        (lambda: AffineSum(dim=()), ValueError, "expected dim to name at least one"),
        (lambda: AffineSum(dim=1.0), TypeError, "expected dim"),
        (lambda: AffineSum(dim=(0, "1")), TypeError, "expected dim"),
        (lambda: Simplex(0.0), ValueError, "expected total > 0"),
        (lambda: Simplex(torch.tensor([1.0, -1.0])), ValueError, "expected total > 0"),
        (lambda: Simplex(method="hardmax"), ValueError, "expected method to be one of"),
        (lambda: Simplex(temperature=0.0), ValueError, "expected a finite temperature > 0"),
        (lambda: Simplex(temperature=-1.0), ValueError, "expected a finite temperature > 0"),
        (lambda: Simplex(temperature=math.inf), ValueError, "expected a finite temperature > 0"),
        (lambda: Simplex(temperature=math.nan), ValueError, "expected a finite temperature > 0"),
        (lambda: Simplex(temperature="2"), TypeError, "expected temperature"),
        (lambda: Simplex(temperature=True), TypeError, "expected temperature"),
        (lambda: BoxSum(lower=1.0, upper=0.0), ValueError, "expected lower <= upper"),
        (lambda: BoxSum(lower=math.nan), ValueError, "expected lower to be a number"),
        (lambda: BoxSum(upper=-math.inf), ValueError, "expected lower < inf and upper > -inf"),
        (lambda: BoxSum(lower="0"), TypeError, "expected lower to be a float"),
    ],
)
def test_bad_construction_arguments_raise(
    build: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        build()  # type: ignore[operator]


def test_constraints_are_modules_usable_with_register_parametrization() -> None:
    from torch.nn.utils import parametrize

    lin = nn.Linear(4, 3)
    c = Simplex(method="sparsemax")
    # register_parametrization inverts the current weight: it must be on the set.
    with pytest.raises(ValueError, match="got a violation of"):
        parametrize.register_parametrization(lin, "weight", c)
    with torch.no_grad():
        lin.weight.copy_(c.project(lin.weight))
    parametrize.register_parametrization(lin, "weight", c)
    assert_sums(lin.weight.detach(), 1.0, (1,))
    assert bool((lin.weight >= 0).all())
