"""sumto.linear: LinearEquality, linear_equality and bayar against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import sumto
from reference import (
    assert_satisfies,
    bayar_divide_by_sum,
    ref_project_linear,
    residual_and_scale,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


# ---------------------------------------------------------------------------
# projection against the least-squares reference
# ---------------------------------------------------------------------------


@st.composite
def systems(draw: st.DrawFn) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...] | int | None]:
    """(x, A, b, dim): integer A of random rank (often deficient), consistent b."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    dim_kind = draw(st.sampled_from(["default", "int", "tuple"]))
    if dim_kind == "default":
        dim: tuple[int, ...] | int | None = None
        dims = tuple(range(1, ndim)) if ndim >= 2 else (0,)
    elif dim_kind == "int":
        dim = draw(st.integers(-ndim, ndim - 1))
        dims = (dim % ndim,)
    else:
        chosen = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
        dim = tuple(d - ndim if draw(st.booleans()) else d for d in chosen)
        dims = tuple(sorted(chosen))
    n = math.prod(shape[d] for d in dims)
    m = draw(st.integers(1, n + 2))
    rank = draw(st.integers(0, min(m, n)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.integers(-3, 3))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(seed)
    left = torch.randint(-3, 4, (m, rank), generator=g).double()
    right = torch.randint(-3, 4, (rank, n), generator=g).double()
    A = left @ right  # exact integers, rank <= `rank`
    b = A @ torch.randn(n, generator=g, dtype=torch.float64)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return x, A, b, dim


def _dims_of(x: Tensor, dim: tuple[int, ...] | int | None) -> tuple[int, ...]:
    return sumto.LinearEquality([[1.0]], [0.0], dim=dim).dims(x.ndim)


@given(systems())
def test_projection_matches_lstsq_min_norm_reference(case: tuple) -> None:
    x, A, b, dim = case
    c = sumto.LinearEquality(A, b, dim=dim)
    dims = _dims_of(x, dim)
    v = c(x)
    assert v.dtype == x.dtype and v.shape == x.shape
    expected = ref_project_linear(x, A, b, dims)
    n = A.shape[1]
    eps = torch.finfo(x.dtype).eps
    magnitude = max(1.0, float(x.double().abs().max()), float(expected.abs().max()))
    # Both the projector and the reference are accurate to eps * cond(A) on A's row space.
    s = torch.linalg.svdvals(A)
    s = s[s > 1e-10 * s.max()]
    cond = float(s.max() / s.min()) if s.numel() else 1.0
    err = float((v.double() - expected).abs().max())
    assert err <= 16 * (4 + math.log2(n)) * eps * magnitude * cond, (err, x.dtype, cond)
    assert_satisfies(v, A, b, dims)
    # The constraint's own membership check accepts its own output.
    assert float(c.violation(v)) <= c.tolerance(v)


@given(systems())
def test_projection_is_idempotent_and_identity_on_the_set(case: tuple) -> None:
    x, A, b, dim = case
    c = sumto.LinearEquality(A, b, dim=dim)
    v = c(x)
    again = c(v)
    n = A.shape[1]
    scale = max(1.0, float(v.double().abs().max()))
    err = float((again.double() - v.double()).abs().max())
    assert err <= 16 * (4 + math.log2(n)) * torch.finfo(x.dtype).eps * scale


def test_jacobian_is_the_reference_orthogonal_projector() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 7, generator=g, dtype=torch.float64)
    A[2] = A[0] + 2 * A[1]  # rank 2
    b = A @ torch.randn(7, generator=g, dtype=torch.float64)
    c = sumto.LinearEquality(A, b)
    assert c.rank == 2
    x = torch.randn(7, generator=g, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(c, x)
    projector = torch.eye(7, dtype=torch.float64) - torch.linalg.pinv(A) @ A
    torch.testing.assert_close(jac, projector, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim", [None, 0, (0, 2), (-1, -2)])
def test_gradcheck_float64(dim: int | tuple[int, ...] | None) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    n = math.prod(x.shape[d] for d in _dims_of(x, dim))
    A = torch.randn(2, n, generator=g, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64)
    c = sumto.LinearEquality(A, b, dim=dim)
    assert torch.autograd.gradcheck(c, (x,))
    assert torch.autograd.gradgradcheck(c, (x,))


def test_matches_affine_sum_for_a_row_of_ones() -> None:
    x = torch.randn(5, 6, dtype=torch.float64)
    ours = sumto.LinearEquality(torch.ones(1, 6), torch.tensor([2.0]))(x)
    torch.testing.assert_close(ours, sumto.AffineSum(total=2.0)(x), rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------
# construction: rank, consistency, shapes, types
# ---------------------------------------------------------------------------


def test_rank_deficient_consistent_system_is_accepted() -> None:
    A = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([1.0, 2.0, 3.0, 4.0])
    c = sumto.LinearEquality(A, b, dim=-1)
    assert c.rank == 2
    x = torch.randn(4, 3, dtype=torch.float64)
    v = c(x)
    assert_satisfies(v, A, b, (1,))
    torch.testing.assert_close(v, ref_project_linear(x, A, b, (1,)), rtol=0, atol=1e-12)


def test_dependent_rows_written_in_float32_decimals_are_one_equation() -> None:
    # 0.3 = 3 * 0.1 only up to float32 rounding: the rows are dependent within A's precision.
    A = torch.tensor([[0.1, 0.2], [0.3, 0.6]], dtype=torch.float32)
    b = torch.tensor([0.1, 0.3], dtype=torch.float32)
    c = sumto.LinearEquality(A, b)
    assert c.rank == 1
    v = c(torch.zeros(1, 2))
    assert_satisfies(v, A, b, (1,))


def test_zero_matrix_with_zero_rhs_is_the_identity() -> None:
    c = sumto.LinearEquality(torch.zeros(2, 3), torch.zeros(2))
    x = torch.randn(4, 3)
    assert c.rank == 0
    assert torch.equal(c(x), x)
    assert float(c.violation(x)) == 0.0


@pytest.mark.parametrize(
    ("A", "b"),
    [
        ([[1.0, 1.0], [1.0, 1.0]], [1.0, 2.0]),
        ([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [1.0, 1.0, 3.0]),
        ([[0.0, 0.0]], [1.0]),
        ([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]], [1.0, 2.001]),
    ],
)
def test_inconsistent_system_raises_value_error(A: list, b: list) -> None:
    with pytest.raises(ValueError, match="expected a consistent system"):
        sumto.LinearEquality(A, b)


@pytest.mark.parametrize(
    ("A", "b", "match"),
    [
        (torch.ones(3), torch.ones(1), r"expected A of shape \(m, n\)"),
        (torch.ones(1, 2, 3), torch.ones(1), r"expected A of shape \(m, n\)"),
        (torch.ones(0, 3), torch.ones(0), r"m >= 1 and n >= 1"),
        (torch.ones(2, 0), torch.ones(2), r"m >= 1 and n >= 1"),
        (torch.ones(2, 3), torch.ones(3), r"expected b of shape \(2,\)"),
        (torch.ones(2, 3), torch.ones(2, 1), r"expected b of shape \(m,\)"),
        (torch.ones(2, 3), torch.tensor(1.0), r"expected b of shape \(m,\)"),
        (torch.tensor([[1.0, math.nan]]), torch.ones(1), "finite"),
        (torch.ones(1, 2), torch.tensor([math.inf]), "finite"),
    ],
)
def test_bad_shapes_and_values_raise_value_error(A: Tensor, b: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sumto.LinearEquality(A, b)


@pytest.mark.parametrize(
    ("A", "b", "dim"),
    [
        ("ab", [1.0], None),
        (1.0, [1.0], None),
        (torch.ones(1, 2, dtype=torch.complex64), torch.ones(1), None),
        (torch.ones(1, 2, dtype=torch.bool), torch.ones(1), None),
        ([[1.0, "x"]], [1.0], None),
        (torch.ones(1, 2), None, None),
        (torch.ones(1, 2), torch.ones(1), 1.5),
    ],
)
def test_wrong_types_raise_type_error(A: object, b: object, dim: object) -> None:
    with pytest.raises(TypeError, match="expected"):
        sumto.LinearEquality(A, b, dim=dim)  # type: ignore[arg-type]


def test_integer_and_nested_sequence_inputs_are_accepted() -> None:
    c = sumto.LinearEquality(torch.tensor([[1, 1, 1]]), [3])
    v = c(torch.zeros(2, 3))
    assert torch.equal(v, torch.ones(2, 3))


def test_slice_size_mismatch_raises_at_registration() -> None:
    with pytest.raises(ValueError, match="with 3 entries"):
        sumto.linear_equality(nn.Linear(4, 2), A=torch.ones(1, 3), b=torch.ones(1))
    with pytest.raises(IndexError, match="expected dim in range"):
        sumto.linear_equality(nn.Linear(4, 2), A=torch.ones(1, 4), b=torch.ones(1), dim=2)


def test_repr_and_saved_configuration() -> None:
    c = sumto.LinearEquality([[1.0, 1.0], [2.0, 2.0]], [1.0, 2.0], dim=-1)
    assert repr(c) == "LinearEquality(A=Tensor(shape=(2, 2)), rank=1, dim=(-1,))"
    # The configuration a checkpoint records, in the state_dict metadata of the owner.
    metadata = sumto.constrain(nn.Linear(2, 2), "weight", c).state_dict()._metadata[""]
    state = metadata[sumto.constraints.CONFIG_METADATA_KEY]["parametrizations.weight.0"]
    assert state["class"] == "LinearEquality"
    assert state["config"] == {"dim": [-1], "A": [[1.0, 1.0], [2.0, 2.0]], "b": [1.0, 2.0]}


# ---------------------------------------------------------------------------
# as a parametrization
# ---------------------------------------------------------------------------


def _system(n: int, m: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g)
    return A, torch.randn(m, generator=g)


def test_right_inverse_is_identity_on_the_set_and_raises_off_it() -> None:
    A, b = _system(4)
    lin = sumto.linear_equality(nn.Linear(4, 3), A=A, b=b)
    on_set = lin.parametrizations.weight[0].project(torch.randn(3, 4))
    lin.weight = on_set
    assert torch.equal(lin.parametrizations.weight.original, on_set)
    torch.testing.assert_close(lin.weight, on_set, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="got a violation of"):
        lin.weight = on_set + 0.1
    with pytest.raises(ValueError, match=r"expected value of shape \(3, 4\)"):
        lin.weight = torch.zeros(4, 3)


def test_init_tensor_is_checked_and_set_exactly() -> None:
    A, b = _system(4)
    value = sumto.LinearEquality(A, b).project(torch.randn(2, 4))
    lin = sumto.linear_equality(nn.Linear(4, 2), A=A, b=b, init=value)
    # The pre-weights are the value itself; the weight is its projection (rounding apart).
    assert torch.equal(lin.parametrizations.weight.original, value)
    torch.testing.assert_close(lin.weight, value, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="expected init to satisfy"):
        sumto.linear_equality(nn.Linear(4, 2), A=A, b=b, init=value + 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constraint_holds_after_hundreds_of_adam_steps(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    A, b = _system(8, m=3)
    lin = sumto.linear_equality(nn.Linear(8, 4).to(dtype), A=A, b=b)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    x, target = torch.randn(64, 8, dtype=dtype), torch.randn(64, 4, dtype=dtype)
    for _ in range(300):
        opt.zero_grad()
        (lin(x) - target).square().mean().backward()
        opt.step()
    w = lin.weight.detach()
    assert torch.isfinite(w).all()
    assert_satisfies(w, A, b, (1,))
    assert sumto.check(lin)["weight"] <= lin.parametrizations.weight[0].tolerance(w)
    # Adam's elementwise steps drift the pre-weights off the set; the output stays exact.
    original = lin.parametrizations.weight.original.detach()
    assert residual_and_scale(original, A, b, (1,))[0] > 1e-2


def test_plain_checkpoint_loads_and_mismatched_system_fails() -> None:
    A, b = _system(4)
    lin = sumto.linear_equality(nn.Linear(4, 2), A=A, b=b)
    plain = {"weight": lin.weight.detach().clone(), "bias": lin.bias.detach().clone()}
    other = sumto.linear_equality(nn.Linear(4, 2), A=A, b=b)
    other.load_state_dict(plain)
    assert torch.equal(other.weight, plain["weight"])
    mismatched = sumto.linear_equality(nn.Linear(4, 2), A=A, b=b + 1)
    with pytest.raises(ValueError, match="expected a checkpoint saved with LinearEquality"):
        mismatched.load_state_dict(lin.state_dict())


def test_autocast_bf16_keeps_float32_exactness() -> None:
    A, b = _system(256, m=4)
    lin = sumto.linear_equality(nn.Linear(256, 8), A=A, b=b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = lin.weight.detach()
    assert w.dtype == torch.float32
    assert_satisfies(w, A, b, (1,))


def test_compiles_fullgraph_and_matches_eager() -> None:
    A, b = _system(6)
    lin = sumto.linear_equality(nn.Linear(6, 3), A=A, b=b)
    x = torch.randn(5, 6)
    compiled = torch.compile(lin, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), lin(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# bayar
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [3, 5, 7])
def test_bayar_centre_is_minus_one_and_the_rest_sum_to_one(k: int, dtype: torch.dtype) -> None:
    torch.manual_seed(k)
    conv = sumto.bayar(nn.Conv2d(3, 4, k).to(dtype))
    w = conv.weight.detach()
    c = k // 2
    assert torch.equal(w[:, :, c, c], torch.full((4, 3), -1.0, dtype=dtype))
    off = w.clone()
    off[:, :, c, c] = 0.0
    eps = torch.finfo(dtype).eps
    err = float((off.double().sum((2, 3)) - 1).abs().max())
    assert err <= 8 * (4 + math.log2(k * k)) * eps * max(
        1.0, float(off.double().abs().sum((2, 3)).max())
    )


@pytest.mark.parametrize(
    "conv", [nn.Conv1d(2, 3, 5), nn.Conv3d(2, 3, 3), nn.ConvTranspose2d(2, 3, 3)], ids=str
)
def test_bayar_works_for_odd_cube_kernels_of_any_conv(conv: nn.Module) -> None:
    w = sumto.bayar(conv).weight.detach()
    flat = w.flatten(2)
    centre = flat.shape[-1] // 2
    assert torch.equal(flat[..., centre], torch.full(flat.shape[:2], -1.0))
    torch.testing.assert_close(flat.sum(-1) + 1, torch.ones(flat.shape[:2]))


@pytest.mark.parametrize(
    ("conv", "match"),
    [
        (nn.Conv2d(1, 1, (3, 5)), "odd square kernel"),
        (nn.Conv2d(1, 1, 4), "odd square kernel"),
        (nn.Conv2d(1, 1, 1), "odd square kernel"),
        (nn.Conv3d(1, 1, (3, 3, 5)), "odd square kernel"),
        (nn.Linear(3, 3), r"shaped \(out, in, k, k\)"),
    ],
    ids=str,
)
def test_bayar_rejects_non_odd_or_non_square_kernels(conv: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sumto.bayar(conv)


@pytest.mark.parametrize(
    ("kernel_size", "error"),
    [
        (2, ValueError),
        ((3, 3, 5), ValueError),
        ((), ValueError),
        ("3", TypeError),
        (3.0, TypeError),
        (True, TypeError),
    ],
)
def test_bayar_constraint_validates_kernel_size(kernel_size: object, error: type) -> None:
    with pytest.raises(error, match="expected"):
        sumto.LinearEquality.bayar(kernel_size)  # type: ignore[arg-type]


def test_bayar_bad_arguments() -> None:
    with pytest.raises(KeyError, match="expected name"):
        sumto.bayar(nn.Conv2d(1, 1, 3), name="kernel")
    with pytest.raises(TypeError, match="expected module"):
        sumto.bayar(torch.zeros(1, 1, 3, 3))  # type: ignore[arg-type]


def test_bayar_from_zero_mean_init_stays_bounded_where_divide_by_sum_blows_up() -> None:
    torch.manual_seed(0)
    k, lr, steps = 5, 1e-3, 200
    init = torch.randn(16, 3, k, k) * 0.02
    # Zero-mean init: off-centre entries of each kernel sum to (nearly) 0.
    off = torch.ones(k, k, dtype=torch.bool)
    off[k // 2, k // 2] = False
    init[..., off] -= init[..., off].mean(-1, keepdim=True)

    recipe = bayar_divide_by_sum(init)
    assert not bool(torch.isfinite(recipe).all()) or float(recipe.abs().max()) > 100.0

    conv = nn.Conv2d(3, 16, k, bias=False)
    with torch.no_grad():
        conv.weight.copy_(init)
    sumto.bayar(conv)
    w0 = conv.weight.detach().clone()
    bound = max(1.0, 2 * float(init.abs().max()) + 1 / (k * k - 1))
    assert float(w0.abs().max()) <= bound

    opt = torch.optim.Adam(conv.parameters(), lr=lr)
    x = torch.randn(2, 3, 9, 9)
    target = torch.randn(2, 16, 5, 5)
    for _ in range(steps):
        opt.zero_grad()
        (conv(x) - target).square().mean().backward()
        opt.step()
    w = conv.weight.detach()
    assert torch.isfinite(w).all()
    # The projection is non-expansive: per kernel, ||w_t - w_0|| <= ||x_t - x_0||, and
    # Adam moves each pre-weight by at most ~3.2 lr per step (beta1 = 0.9, beta2 = 0.999).
    assert float((w - w0).abs().max()) <= math.sqrt(k * k) * 3.2 * lr * steps
    assert float(w.abs().max()) < 10.0
    assert sumto.check(conv)["weight"] <= conv.parametrizations.weight[0].tolerance(w)


def test_linear_equality_bad_module_arguments() -> None:
    with pytest.raises(KeyError, match="expected name"):
        sumto.linear_equality(nn.Linear(2, 2), "kernel", A=[[1.0, 1.0]], b=[1.0])
    with pytest.raises(TypeError, match="expected the constrained tensor"):
        sumto.linear_equality(_IntBuffer(), "counts", A=[[1.0, 1.0]], b=[1.0])


class _IntBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("counts", torch.ones(2, 2, dtype=torch.int64))


# ---------------------------------------------------------------------------
# sample, contains and init="sample"
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
@pytest.mark.parametrize(
    ("shape", "dim", "dims"),
    [
        ((3, 4), None, (1,)),
        ((12,), None, (0,)),
        ((4, 2, 3), (0, 2), (0, 2)),
        ((2, 3, 5), -1, (2,)),
    ],
)
def test_sample_is_the_projected_gaussian_on_the_set(
    shape: tuple[int, ...],
    dim: int | tuple[int, ...] | None,
    dims: tuple[int, ...],
    dtype: torch.dtype,
) -> None:
    n = math.prod(shape[d] for d in dims)
    A, b = _system(n, m=3)
    c = sumto.LinearEquality(A, b, dim=dim)
    w = c.sample(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert w.shape == shape and w.dtype == dtype and not w.requires_grad
    assert c.contains(w)
    assert_satisfies(w, A, b, dims)
    # The documented draw: standard Gaussian entries (float64), projected.
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = ref_project_linear(z, A, b, dims)
    eps = torch.finfo(dtype).eps if dtype != torch.float64 else 1e-13
    torch.testing.assert_close(w.double(), expected, rtol=2 * eps, atol=16 * eps)
    again = c.sample(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert torch.equal(w, again)


def test_bayar_sample_has_centre_minus_one_and_the_rest_summing_to_one() -> None:
    c = sumto.LinearEquality.bayar(5)
    w = c.sample((4, 3, 5, 5), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert c.contains(w)
    torch.testing.assert_close(w[:, :, 2, 2], torch.full((4, 3), -1.0, dtype=torch.float64))
    torch.testing.assert_close(w.sum((2, 3)), torch.zeros(4, 3, dtype=torch.float64))


def test_contains_accepts_projections_and_rejects_points_off_the_set() -> None:
    A, b = _system(4)
    c = sumto.LinearEquality(A, b)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for scale in (1e-3, 1.0, 1e4):
        assert c.contains(c(x * scale)) and c.contains(c.project(x * scale))
    on_set = c.project(x)
    off = on_set.clone()
    off[1, 2] += 0.01
    assert not c.contains(off)
    assert c.contains(off, atol=1.0)
    assert not c.contains(torch.zeros(3, 5))  # slices without the 4 entries of A
    lin = sumto.linear_equality(nn.Linear(4, 3), A=A, b=b)
    registered = lin.parametrizations.weight[0]
    assert registered.contains(lin.weight.detach())
    assert not registered.contains(on_set[:2])  # on the set, not the registered shape


def test_init_sample_for_linear_equality_and_bayar() -> None:
    A, b = _system(4, m=3)
    lin = nn.Linear(4, 3)
    torch.manual_seed(3)
    sumto.linear_equality(lin, A=A, b=b, init="sample")
    c = lin.parametrizations.weight[0]
    torch.manual_seed(3)
    expected = c.sample()
    assert torch.equal(lin.parametrizations.weight.original, expected)
    assert_satisfies(lin.weight.detach(), A, b, (1,))
    conv = sumto.bayar(nn.Conv2d(2, 3, 3, bias=False).double(), init="sample")
    w = conv.weight.detach()
    assert w.dtype == torch.float64
    torch.testing.assert_close(w[:, :, 1, 1], torch.full((3, 2), -1.0, dtype=torch.float64))
    torch.testing.assert_close(w.sum((2, 3)), torch.zeros(3, 2, dtype=torch.float64))
    # a sampled value round trips through a plain checkpoint (the projection, re-applied,
    # moves it by rounding only) and through the constrained one exactly
    other = sumto.bayar(nn.Conv2d(2, 3, 3, bias=False).double())
    other.load_state_dict({"weight": w})
    torch.testing.assert_close(other.weight, conv.weight, rtol=0, atol=1e-14)
    other.load_state_dict(conv.state_dict())
    assert torch.equal(other.weight, conv.weight)
