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
    ks_critical,
    ks_statistic,
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


# ---------------------------------------------------------------------------
# BoxSum with per-entry bounds
# ---------------------------------------------------------------------------

CAPS = torch.tensor([0.5, 0.3, 0.4, 0.6])


def capped_linear(upper: Tensor = CAPS, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return sumto.box_sum(nn.Linear(4, 3), lower=0.0, upper=upper)


def test_per_entry_bounds_register_and_hold() -> None:
    lin = capped_linear()
    w = lin.weight.detach()
    assert bool((w >= 0).all() and (w <= CAPS).all())
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    box = lin.parametrizations.weight[0]
    assert "upper=Tensor(shape=(4,))" in repr(box) and "lower=0" in repr(box)
    assert float(box.violation(w)) <= box.tolerance(w)
    lin.weight = w  # what it produced it accepts back
    with pytest.raises(ValueError, match="expected"):
        lin.weight = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 3)  # above the first cap


def test_per_entry_bounds_are_saved_and_checked_on_load() -> None:
    sd = capped_linear().state_dict()
    assert torch.equal(sd["parametrizations.weight.0.upper"], CAPS)
    other = capped_linear(CAPS * 0.5 + 0.3, seed=1)
    other.load_state_dict(sd)
    assert torch.equal(other.parametrizations.weight[0].upper, CAPS)
    scalar = sumto.box_sum(nn.Linear(4, 3), lower=0.0, upper=1.0)
    with pytest.raises(ValueError, match="'upper': 'tensor'"):
        scalar.load_state_dict(sd)
    bad = dict(sd)
    bad["parametrizations.weight.0.upper"] = torch.full((4,), 0.1)  # sum 0.4 < total 1
    with pytest.raises(ValueError, match="sum\\(upper\\)"):
        capped_linear().load_state_dict(bad)
    bad["parametrizations.weight.0.upper"] = torch.ones(5)
    with pytest.raises(ValueError, match="of shape \\(4,\\)"):
        capped_linear().load_state_dict(bad)


def test_per_entry_bounds_keep_their_precision_and_follow_the_device() -> None:
    lin = capped_linear()
    box = lin.parametrizations.weight[0]
    lin.half()
    assert box.upper.dtype == torch.float32  # the set is not rounded
    lin.double()
    assert box.upper.dtype == torch.float64
    w = lin.weight
    assert w.dtype == torch.float64 and bool((w <= CAPS.double()).all())


def test_per_entry_bounds_on_the_meta_device_load_later() -> None:
    sd = capped_linear().state_dict()
    with torch.device("meta"):
        lin = sumto.box_sum(nn.Linear(4, 3), lower=0.0, upper=torch.ones(4))
    lin.to_empty(device="cpu")
    lin.load_state_dict(sd)
    assert torch.equal(lin.parametrizations.weight[0].upper, CAPS)
    torch.testing.assert_close(lin.weight.sum(1), torch.ones(3))


@pytest.mark.parametrize(
    ("lower", "upper", "message"),
    [
        (0.0, torch.ones(3), "broadcastable to the constrained tensor's shape \\(3, 4\\)"),
        (0.0, torch.full((3, 4), 0.2), "in the slice at index \\(0,\\)"),
        (torch.zeros(4), torch.tensor([1.0, -1.0, 1.0, 1.0]), "at index \\(1,\\)"),
    ],
)
def test_bad_per_entry_bounds_are_refused(lower: object, upper: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sumto.box_sum(nn.Linear(4, 3), lower=lower, upper=upper)  # type: ignore[arg-type]


def test_per_entry_bounds_project_other_shapes_and_bake() -> None:
    lin = capped_linear()
    box = lin.parametrizations.weight[0]
    y = box.project(torch.randn(7, 4))  # bounds broadcast over other leading shapes
    assert bool((y <= CAPS).all() and (y >= 0).all())
    sumto.bake(lin)
    assert isinstance(lin.weight, nn.Parameter) and bool((lin.weight <= CAPS).all())


# sample: random points of the set
# ---------------------------------------------------------------------------

SAMPLE_TOTALS = [0.0, 1e-3, 1.0, 10.0]
SAMPLE_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (shape, dim spec, normalised dims)
SAMPLE_LAYOUTS = [
    ((7,), None, (0,)),
    ((3, 4), None, (1,)),
    ((2, 3, 4), (0, 2), (0, 2)),
    ((4, 2, 3), -1, (2,)),
    ((5, 1), 0, (0,)),
    ((), None, (0,)),
]


def _sample_constraints(total: float | Tensor, dim: object, n: int) -> list[Constraint]:
    """Every constraint class: each simplex method, boxes with two, one and no finite bounds."""
    t = total if isinstance(total, Tensor) else torch.tensor(total)
    low, high = float(t.min()) / n, float(t.max()) / n
    out: list[Constraint] = [
        AffineSum(total, dim),  # type: ignore[arg-type]
        BoxSum(total, dim, lower=low - 0.5, upper=high + 0.25),  # type: ignore[arg-type]
        BoxSum(total, dim, lower=low - 1.0),  # type: ignore[arg-type]
        BoxSum(total, dim, upper=high + 1.0),  # type: ignore[arg-type]
        BoxSum(total, dim),  # type: ignore[arg-type]
    ]
    if float(t.min()) > 0:
        out += [Simplex(total, dim, method=m) for m in METHODS]  # type: ignore[arg-type]
    return out


def _assert_sample_on_set(
    c: Constraint, w: Tensor, shape: tuple[int, ...], dtype: torch.dtype, total: float | Tensor
) -> None:
    """``w`` is a finite point of ``c``'s set, checked against the definition in float64."""
    assert w.shape == shape and w.dtype == dtype and w.device.type == "cpu"
    assert not w.requires_grad
    assert bool(torch.isfinite(w).all())
    assert c.contains(w), f"{c}: violation {float(c.violation(w)):.3g}"
    dims = c.dims(len(shape))
    if len(shape) > 0:
        assert_sums(w, total, dims)
    else:
        assert abs(float(w) - float(total)) <= torch.finfo(dtype).eps * abs(float(total))
    wd = w.double()
    # The bounds rounded to dtype, as the projection writes them.
    eps = torch.finfo(dtype).eps
    if isinstance(c, Simplex):
        assert float(wd.min()) >= 0.0
    if isinstance(c, BoxSum) and w.numel() > 0:
        assert float(wd.min()) >= c.lower - eps * abs(c.lower)
        assert float(wd.max()) <= c.upper + eps * abs(c.upper)


@pytest.mark.parametrize("dtype", SAMPLE_DTYPES)
@pytest.mark.parametrize("layout", SAMPLE_LAYOUTS, ids=lambda layout: str(layout[0]))
@pytest.mark.parametrize("total", SAMPLE_TOTALS)
def test_sample_lands_on_the_set(
    total: float, layout: tuple[tuple[int, ...], object, tuple[int, ...]], dtype: torch.dtype
) -> None:
    shape, dim, dims = layout
    n = math.prod(shape[d] for d in dims) if shape else 1
    generator = torch.Generator().manual_seed(0)
    for c in _sample_constraints(total, dim, n):
        w = c.sample(shape, generator=generator, dtype=dtype)
        _assert_sample_on_set(c, w, shape, dtype, total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sample_honours_tensor_totals(dtype: torch.dtype) -> None:
    shape = (3, 2, 4)
    keep = torch.tensor([0.5, 2.0, 10.0]).view(3, 1, 1)  # keepdim shape
    reduced = torch.tensor([0.0, -1.0, 3.0])  # the reduced shape
    generator = torch.Generator().manual_seed(1)
    for total in (keep, reduced, keep.double()):
        for c in _sample_constraints(total, None, 8):
            w = c.sample(shape, generator=generator, dtype=dtype)
            _assert_sample_on_set(c, w, shape, dtype, total)


def test_sample_is_reproducible_with_a_generator_and_the_global_seed() -> None:
    for c in _sample_constraints(1.0, None, 5):
        first = c.sample((4, 5), generator=torch.Generator().manual_seed(3))
        again = c.sample((4, 5), generator=torch.Generator().manual_seed(3))
        other = c.sample((4, 5), generator=torch.Generator().manual_seed(4))
        assert torch.equal(first, again) and not torch.equal(first, other)
        torch.manual_seed(5)
        first = c.sample((4, 5))
        torch.manual_seed(5)
        assert torch.equal(first, c.sample((4, 5)))
    # The simplex point depends on the seed only, not on the method (one distribution).
    points = [
        Simplex(2.0, method=m).sample((3, 4), generator=torch.Generator().manual_seed(0))
        for m in METHODS
    ]
    assert all(torch.equal(points[0], p) for p in points[1:])


def test_sample_follows_the_documented_draws() -> None:
    """Each draw rebuilt from its docstring in float64, with the same generator state."""
    shape, dims = (6, 5), (1,)

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(11)

    f64 = torch.float64
    # Simplex: normalised exponentials -log(U), U uniform on (0, 1].
    u = torch.rand(shape, generator=seeded(), dtype=f64)
    e = -torch.log(1.0 - u)
    expected = 2.0 * e / e.sum(1, keepdim=True)
    for method in METHODS:
        got = Simplex(2.0, method=method).sample(shape, generator=seeded(), dtype=f64)
        assert_matches_reference(got, expected, expected, 2.0, dims)
    # AffineSum: standard Gaussian entries, projected.
    z = torch.randn(shape, generator=seeded(), dtype=f64)
    got = AffineSum(1.5).sample(shape, generator=seeded(), dtype=f64)
    assert_matches_reference(got, ref_project_sum(z, 1.5, dims), z, 1.5, dims)
    # BoxSum: a Gaussian, then a uniform draw; each entry in its interval, projected.
    g = seeded()
    z = torch.randn(shape, generator=g, dtype=f64)
    u = torch.rand(shape, generator=g, dtype=f64)
    e = -torch.log(1.0 - u)
    inf = math.inf
    for lower, upper, x in [
        (-0.5, 1.0, -0.5 + 1.5 * u),
        (0.0, inf, e),
        (-inf, 1.0, 1.0 - e),
        (-inf, inf, z),
    ]:
        got = BoxSum(1.0, lower=lower, upper=upper).sample(shape, generator=seeded(), dtype=f64)
        want = ref_project_box_sum(x, 1.0, dims, lower, upper)
        assert_matches_reference(got, want, x, 1.0, dims, extra_scale=float(x.abs().max()))
    # Without bounds the box draw is the affine one.
    free = BoxSum(1.5).sample(shape, generator=seeded(), dtype=f64)
    assert torch.equal(free, AffineSum(1.5).sample(shape, generator=seeded(), dtype=f64))


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("total", [1.0, 10.0])
def test_simplex_sample_is_uniform_on_a_small_simplex(k: int, total: float) -> None:
    """Kolmogorov-Smirnov tests at the 1e-3 level, with a fixed seed.

    Uniform on the simplex, each coordinate / total is Beta(1, k - 1), of CDF
    1 - (1 - x)^(k-1), and the smallest coordinate / total has CDF 1 - (1 - k x)^(k-1)
    on [0, 1 / k] (a check of the joint law, not only of the marginals).
    """
    draws = 4000
    c = Simplex(total, method="sparsemax", dim=(0, 2))
    w = c.sample((1, draws, k), generator=torch.Generator().manual_seed(2024), dtype=torch.float64)
    p = w[0] / total
    critical = ks_critical(draws, 1e-3)
    for j in range(k):
        d = ks_statistic(p[:, j], lambda x: 1.0 - (1.0 - x).clamp(0.0, 1.0) ** (k - 1))
        assert d < critical, f"coordinate {j}: KS statistic {d:.4f} >= {critical:.4f}"
    smallest = p.min(1).values
    d = ks_statistic(smallest, lambda x: 1.0 - (1.0 - k * x).clamp(0.0, 1.0) ** (k - 1))
    assert d < critical, f"smallest coordinate: KS statistic {d:.4f} >= {critical:.4f}"


def test_uniformity_test_rejects_normalised_uniform_draws() -> None:
    """The KS check above has power: U / sum(U) (a common wrong recipe) fails it at k = 3."""
    draws, k = 4000, 3
    u = torch.rand(draws, k, generator=torch.Generator().manual_seed(2024), dtype=torch.float64)
    p = u / u.sum(1, keepdim=True)
    d = ks_statistic(p[:, 0], lambda x: 1.0 - (1.0 - x).clamp(0.0, 1.0) ** (k - 1))
    assert d > ks_critical(draws, 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simplex_sample_has_no_exact_zeros_and_inverts_for_every_method(
    dtype: torch.dtype,
) -> None:
    """Softmax cannot reach 0: its inverse of an exact zero is log(eps). The draw has none."""
    shape = (500, 8)
    for method in METHODS:
        c = Simplex(1.0, method=method)
        w = c.sample(shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
        assert bool((w > 0).all())
        pre = c.right_inverse(w)
        assert bool(torch.isfinite(pre).all())
        back = c(pre)
        assert c.contains(back)
        # softmax and relu invert up to the rounding of log/exp and of the eps mass
        assert_matches_reference(back, w, w, 1.0, (1,), k=64.0)


def test_simplex_point_with_exact_zeros_is_accepted_by_softmax() -> None:
    """A point of the set with zeros (e.g. a sparsemax output) is accepted by softmax.

    Its pre-weights are finite (log eps for the zeros) and map back within eps of it.
    """
    c = Simplex(1.0, method="softmax")
    value = torch.tensor([0.75, 0.25, 0.0])
    pre = c.right_inverse(value)
    assert bool(torch.isfinite(pre).all())
    back = c(pre)
    assert c.contains(back)
    assert float((back - value).abs().max()) <= 4 * torch.finfo(torch.float32).eps


def test_sample_defaults_to_the_registered_shape_dtype_and_device() -> None:
    lin = sumto.simplex(nn.Linear(4, 3).double(), method="sparsemax")
    c = lin.parametrizations.weight[0]
    w = c.sample()
    assert w.shape == (3, 4) and w.dtype == torch.float64 and w.device.type == "cpu"
    lin.float()
    assert c.sample().dtype == torch.float32  # follows the constrained tensor
    lin.to("meta")
    assert c.sample().device.type == "meta"
    # unregistered: the default dtype and device, and an explicit shape
    assert Simplex().sample(5).dtype == torch.get_default_dtype()
    assert Simplex().sample((2, 3), dtype=torch.float16).dtype == torch.float16
    # a registered constraint samples other shapes too (they fit its configuration)
    assert c.sample((2, 4), device="cpu").shape == (2, 4)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: Simplex().sample(), ValueError, "expected a shape to sample"),
        (lambda: Simplex().sample((2, 1.5)), TypeError, "expected shape to be a tuple of ints"),
        (lambda: Simplex().sample("3"), TypeError, "expected shape to be a tuple of ints"),
        (lambda: Simplex().sample((2, -1)), ValueError, "expected non-negative sizes"),
        (lambda: Simplex().sample(3, dtype=torch.int64), TypeError, "expected dtype"),
        (lambda: Simplex().sample(3, dtype="float32"), TypeError, "expected dtype"),
        (lambda: Simplex().sample(3, device=0), TypeError, "expected device"),
        (lambda: Simplex().sample(3, generator=0), TypeError, "expected generator"),
        (
            lambda: Simplex().sample(3, generator=torch.Generator(), device="meta"),
            ValueError,
            "expected a generator on device meta",
        ),
        (lambda: Simplex(dim=2).sample((3, 4)), IndexError, "expected dim in range"),
        (lambda: Simplex().sample((3, 0)), ValueError, "expected at least one element"),
        (
            lambda: BoxSum(1.0, lower=0.0, upper=0.1).sample((2, 4)),
            ValueError,
            r"n \* lower <= total <= n \* upper",
        ),
        (
            lambda: AffineSum(torch.ones(3)).sample((2, 4)),
            ValueError,
            "keepdim-reduced shape",
        ),
    ],
)
def test_sample_bad_arguments_raise(call: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()  # type: ignore[operator]


def test_sample_of_an_empty_batch() -> None:
    for c in _sample_constraints(1.0, None, 4):
        w = c.sample((0, 4))
        assert w.shape == (0, 4) and c.contains(w)


# ---------------------------------------------------------------------------
# contains: the boolean membership test
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_contains_accepts_what_the_library_produces(dtype: torch.dtype, scale: float) -> None:
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 9, generator=generator, dtype=torch.float64) * scale).to(dtype)
    for total in (1e-3, 1.0, 10.0):
        for c in _sample_constraints(total, None, 9):
            assert c.contains(c(x)), f"{c}: forward of x * {scale:g}"
            assert c.contains(c.project(x)), f"{c}: projection of x * {scale:g}"
            assert c.contains(c.sample((6, 9), generator=generator, dtype=dtype))


def test_contains_rejects_points_off_the_set() -> None:
    simplex = Simplex(1.0)
    assert simplex.contains(torch.tensor([0.25, 0.75]))
    assert not simplex.contains(torch.tensor([0.25, 0.7]))  # wrong sum
    assert not simplex.contains(torch.tensor([1.25, -0.25]))  # negative entry
    assert not simplex.contains(torch.tensor([math.nan, 1.0]))
    assert not simplex.contains(torch.tensor([math.inf, -math.inf]))
    box = BoxSum(1.0, lower=0.0, upper=0.6)
    assert box.contains(torch.tensor([0.6, 0.4]))
    assert not box.contains(torch.tensor([0.7, 0.3]))  # above the upper bound
    affine = AffineSum(torch.tensor([1.0, 2.0]))
    assert affine.contains(torch.tensor([[0.5, 0.5], [3.0, -1.0]]))
    assert not affine.contains(torch.tensor([[0.5, 0.5], [3.0, -0.5]]))
    # the same sum error at a larger magnitude is rounding, at a small one it is not
    off = torch.tensor([1e10, -1e10 + 1.0 + 1e-7], dtype=torch.float64)
    assert AffineSum(1.0).contains(off)
    assert not AffineSum(1.0).contains(torch.tensor([0.5, 0.5 + 1e-7], dtype=torch.float64))


def test_contains_with_an_explicit_atol() -> None:
    c = AffineSum(1.0)
    x = torch.tensor([0.5, 0.49])  # violation 0.01
    assert not c.contains(x)
    assert c.contains(x, atol=0.02)
    assert not c.contains(x, atol=0.005)
    assert c.contains(torch.tensor([0.5, 0.5]), atol=0)


def test_contains_is_false_for_a_shape_the_constraint_does_not_fit() -> None:
    lin = sumto.sum_to(nn.Linear(3, 2))
    c = lin.parametrizations.weight[0]
    assert c.contains(lin.weight.detach())
    assert not c.contains(torch.full((3, 3), 1 / 3))  # on the set, not the registered shape
    assert AffineSum().contains(torch.full((3, 3), 1 / 3))  # unregistered: any fitting shape
    assert not AffineSum(dim=2).contains(torch.full((3, 3), 1 / 3))  # dim out of range
    assert not AffineSum(torch.ones(2)).contains(torch.full((3, 3), 1 / 3))  # total's shape
    assert not AffineSum().contains(torch.ones(3, 0))  # empty slices
    assert not BoxSum(1.0, lower=0.0, upper=0.2).contains(torch.full((2, 3), 1 / 3))  # empty set


@pytest.mark.parametrize(
    ("x", "atol", "error", "message"),
    [
        ([0.5, 0.5], None, TypeError, "expected x to be a torch.Tensor"),
        (torch.tensor([1, 0]), None, TypeError, "expected x to be a floating point tensor"),
        (torch.tensor([0.5, 0.5]), -1.0, ValueError, "expected atol >= 0"),
        (torch.tensor([0.5, 0.5]), math.nan, ValueError, "expected atol >= 0"),
        (torch.tensor([0.5, 0.5]), "0.1", TypeError, "expected atol to be a float"),
        (torch.empty(2, device="meta"), None, ValueError, "got a meta tensor"),
    ],
)
def test_contains_bad_arguments_raise(
    x: object, atol: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Simplex().contains(x, atol=atol)  # type: ignore[arg-type]


def test_per_entry_bounds_sample_and_contains() -> None:
    box = BoxSum(lower=torch.tensor([0.0, 0.1, -1.0, 0.0]), upper=CAPS)
    g = torch.Generator().manual_seed(0)
    draws = box.sample((500, 4), generator=g)
    assert box.contains(draws)
    assert bool((draws >= box.lower).all() and (draws <= CAPS).all())
    assert not box.contains(torch.tensor([[0.9, 0.1, 0.0, 0.0]]))  # above the first cap
    one_sided = BoxSum(lower=torch.tensor([0.0, -math.inf, 0.0]), upper=1.0)
    assert one_sided.contains(one_sided.sample((50, 3), generator=g))
