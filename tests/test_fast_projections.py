"""The sort-free threshold searches of sumto._kernels (issue 7).

Every fast path is checked against two independent algorithms: the float64
references of tests/reference.py (sorting, one row at a time, for the simplex;
200-step bisection for the box) and the sort-based searches kept in
sumto.functional. Inputs are long enough to exercise the pruning, the subsample
start and the dropping of finished rows, and include adversarial ones (ties,
geometric sequences, a few huge entries, n = 1, all equal, per-row totals).
Tolerances scale with eps(dtype) and the magnitude of the data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from reference import ref_project_box_sum, ref_project_simplex
from sumto import BoxSum, Simplex, _kernels
from sumto import functional as F
from sumto.functional import project_box_sum, project_simplex

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.fixture(params=["small", "secant"])
def box_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test under each CPU box search: bisection then Newton's (small inputs),
    and the secant one.

    The dispatch is by size (``_kernels._SMALL_ENTRIES``); the inputs here are small,
    so the threshold is moved to force each search in turn.
    """
    limit = 1 << 62 if request.param == "small" else -1
    monkeypatch.setattr(_kernels, "_SMALL_ENTRIES", limit)
    return str(request.param)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def compute_eps(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).eps


def scale_of(x: Tensor, *values: float | Tensor) -> float:
    """max(max|x|, |values|): the magnitude rounding errors are relative to."""
    mags = [float(x.detach().double().abs().max())]
    mags += [float(v.double().abs().max()) if isinstance(v, Tensor) else abs(v) for v in values]
    return max(max(mags), 1e-30)


def assert_simplex_exact(y: Tensor, x: Tensor, total: float | Tensor, dim: int = -1) -> None:
    """Issue 7's bar: within 4 eps max(|x|, |total|) of the float64 sort reference.

    The reference sees ``x - max(x)`` (the projection is shift invariant): on raw
    entries near 1e30 its float64 running sums lose the total entirely.
    """
    shifted = x.double() - x.double().amax(dim, keepdim=True)
    expected = ref_project_simplex(shifted, _double(total), (dim,))
    err = (y.double() - expected).abs()
    bound = 4 * compute_eps(y.dtype) * scale_of(x, total)
    bound = bound + torch.finfo(y.dtype).eps * expected.abs()  # final rounding to y's dtype
    assert float((err - bound).max()) <= 0, f"max error {float(err.max()):.3g} ({y.dtype})"
    assert bool((y >= 0).all())


def assert_box_exact(
    y: Tensor, x: Tensor, total: float | Tensor, lower: float, upper: float, dim: int = -1
) -> None:
    """Within 4 (1 + log2 n) eps max(|x|, |total|, |bounds|) of the float64 reference."""
    n = x.shape[dim]
    expected = ref_project_box_sum(x.double(), _double(total), (dim,), lower, upper)
    err = (y.double() - expected).abs()
    bound = 4 * (1 + math.log2(n)) * compute_eps(y.dtype) * scale_of(x, total, lower, upper)
    bound = bound + torch.finfo(y.dtype).eps * expected.abs()
    assert float((err - bound).max()) <= 0, f"max error {float(err.max()):.3g} ({y.dtype})"
    assert bool((y >= lower).all() and (y <= upper).all())


def _double(total: float | Tensor) -> float | Tensor:
    return total.double() if isinstance(total, Tensor) else total


def sort_based_simplex(x: Tensor, total: float | Tensor) -> Tensor:
    """The projection before issue 7: sort-based support, then the masked formula."""
    shifted = x - x.amax(-1, keepdim=True)
    support = F._simplex_threshold_sort(shifted, total)
    mask = support.to(x.dtype)
    count = mask.sum(-1, keepdim=True).clamp_min(1.0)
    tau = ((shifted * mask).sum(-1, keepdim=True) - total) / count
    return torch.where(support, shifted - tau, torch.zeros_like(shifted))


def sort_based_box(x: Tensor, total: float | Tensor, lower: float, upper: float) -> Tensor:
    free, at_upper = F._box_support_sort(x, total, lower, upper)
    free_f, upper_f = free.to(x.dtype), at_upper.to(x.dtype)
    count = free_f.sum(-1, keepdim=True).clamp_min(1.0)
    fixed = upper * upper_f.sum(-1, keepdim=True) + lower * (1 - free_f - upper_f).sum(
        -1, keepdim=True
    )
    tau = ((x * free_f).sum(-1, keepdim=True) - (total - fixed)) / count
    bound = torch.where(at_upper, torch.full_like(x, upper), torch.full_like(x, lower))
    return torch.where(free, x - tau, bound)


# ---------------------------------------------------------------------------
# adversarial inputs: long rows reach the pruned and subsampled paths
# ---------------------------------------------------------------------------


def simplex_cases(dtype: torch.dtype) -> list[tuple[str, Tensor, float | Tensor]]:
    g = generator(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    ties = randn(8, 1024)
    ties[:, ::3] = ties[:, :1]  # a third of each row ties with its first entry
    return [
        ("randn sparse support", randn(64, 1024), 1.0),
        ("randn dense support", randn(64, 1024) * 1e-3, 1.0),
        ("randn medium support", randn(64, 1024), 30.0),
        ("randn long rows", randn(3, 40_000), 1.0),
        ("huge scale", randn(16, 600) * 1e4, 1.0),
        ("offset 1e4", randn(16, 300) + 1e4, 1.0),
        ("integer ties", torch.randint(0, 3, (64, 700), generator=g).to(dtype), 1.0),
        ("ties with the max", ties, 1.0),
        ("all equal", torch.full((4, 1000), 3.0, dtype=dtype), 2.0),
        ("all zero", torch.zeros(4, 513, dtype=dtype), 1.0),
        ("geometric 2^-i", (2.0 ** -torch.arange(60.0)).to(dtype).repeat(3, 1), 1.0),
        ("geometric 0.5^i long", (7 * 0.5 ** torch.arange(400.0)).to(dtype).repeat(3, 1), 1.0),
        ("geometric 1.01^i", (1.01 ** torch.arange(2000.0)).to(dtype).repeat(2, 1), 5.0),
        ("sorted ramp", torch.linspace(0, 1, 4097).to(dtype).repeat(2, 1), 1.0),
        ("one huge entry", torch.cat([torch.full((8, 1), 1e30), randn(8, 999)], 1).to(dtype), 1.0),
        (
            "three huge entries",
            torch.cat([torch.full((8, 3), 1e20), randn(8, 997)], 1).to(dtype),
            1.0,
        ),
        ("n = 1", randn(16, 1), 1.0),
        ("n = 2", randn(16, 2), 1.0),
        ("per-row totals", randn(32, 900), torch.rand(32, 1, generator=g, dtype=dtype) * 10 + 0.01),
        ("tiny total", randn(32, 700), 1e-20),
        ("huge total", randn(32, 700), 1e6),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simplex_matches_sort_reference_on_adversarial_inputs(dtype: torch.dtype) -> None:
    for name, x, total in simplex_cases(dtype):
        y = project_simplex(x, total)
        try:
            assert_simplex_exact(y, x, total)
            # and the sort-based search of sumto.functional, in the same dtype
            old = sort_based_simplex(x, total)
            assert float((y - old).abs().max()) <= 8 * compute_eps(dtype) * scale_of(x, total)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


def test_simplex_threshold_reports_the_support() -> None:
    for name, x, total in simplex_cases(torch.float64):
        shifted = x - x.amax(-1, keepdim=True)
        tau, count = _kernels.simplex_threshold(shifted, total)
        support = (shifted > tau).sum(-1, keepdim=True).to(x.dtype)
        assert torch.equal(count, support), name
        assert torch.equal(shifted > tau, F._simplex_support(shifted, total)), name


def box_cases(dtype: torch.dtype) -> list[tuple[str, Tensor, float | Tensor, float, float]]:
    g = generator(1)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    n = 1024
    return [
        ("wide box", randn(64, n), 1.0, -0.5, 1.0),
        ("wide box, zero total", randn(64, n), 0.0, -1.0, 1.0),
        ("tight box [0, 10/n]", randn(64, n), 1.0, 0.0, 10.0 / n),
        ("tight box [-1/n, 3/n]", randn(64, n), 1.0, -1.0 / n, 3.0 / n),
        ("total = n * upper", randn(16, n), n * 0.8, -0.5, 0.8),
        ("total = n * lower", randn(16, n), n * -0.5, -0.5, 0.8),
        ("lower == upper", randn(16, 700), 0.0, 0.0, 0.0),
        ("all free", randn(16, 700) * 1e-3, 1.0, 0.0, 1.0),
        ("integer ties", torch.randint(0, 3, (32, n), generator=g).to(dtype), 1.0, 0.0, 0.01),
        ("sorted ramp", torch.linspace(0, 1, 4097).to(dtype).repeat(2, 1), 1.0, 0.0, 1e-3),
        ("geometric", (1.01 ** torch.arange(2000.0)).to(dtype).repeat(2, 1), 5.0, 0.0, 1.0),
        (
            "three huge entries",
            torch.cat([torch.full((8, 3), 1e20), randn(8, 997)], 1).to(dtype),
            1.0,
            -1.0,
            1.0,
        ),
        ("n = 1", randn(16, 1), 0.3, -1.0, 1.0),
        ("n = 2", randn(16, 2), 0.3, -1.0, 1.0),
        (
            "per-row totals",
            randn(32, 900),
            torch.rand(32, 1, generator=g, dtype=dtype) * 2 - 1,
            -0.01,
            0.02,
        ),
        ("long tight rows", randn(2, 30_000), 1.0, 0.0, 1e-4),
    ]


@pytest.mark.usefixtures("box_kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_matches_bisection_reference_on_adversarial_inputs(dtype: torch.dtype) -> None:
    for name, x, total, lower, upper in box_cases(dtype):
        y = project_box_sum(x, total, lower=lower, upper=upper)
        try:
            assert_box_exact(y, x, total, lower, upper)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


@pytest.mark.usefixtures("box_kernel")
def test_box_classification_matches_the_sort_based_search() -> None:
    # float64 and moderate rows: the sort-based search is exact there too
    for name, x, total, lower, upper in box_cases(torch.float64):
        if x.shape[-1] > 5000:
            continue
        y = project_box_sum(x, total, lower=lower, upper=upper)
        old = sort_based_box(x, total, lower, upper)
        bound = (
            8
            * (1 + math.log2(x.shape[-1]))
            * compute_eps(x.dtype)
            * scale_of(x, total, lower, upper)
        )
        assert float((y - old).abs().max()) <= bound, name


# ---------------------------------------------------------------------------
# hypothesis: shapes, dims (tuples too), totals, dtypes
# ---------------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], int | tuple[int, ...], int]:
    """A shape whose constrained slices have 200 to 1200 entries (the pruned paths)."""
    n = draw(st.integers(200, 1200))
    batch = draw(st.integers(1, 5))
    if draw(st.booleans()):
        # two constrained dims, not last: (a, batch, b) with dim (0, 2)
        a = draw(st.sampled_from([4, 8, 16]))
        return (a, batch, n // a), (0, -1), a * (n // a)
    return (n, batch), 0, n


@st.composite
def problems(draw: st.DrawFn) -> tuple[Tensor, int | tuple[int, ...], float | Tensor, torch.dtype]:
    shape, dim, _ = draw(layouts())
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    x = (torch.randn(shape, generator=generator(seed), dtype=torch.float64) * scale).to(dtype)
    if draw(st.booleans()):
        total: float | Tensor = draw(st.floats(0.01, 100.0))
    else:
        dims = (dim,) if isinstance(dim, int) else dim
        keep = [1 if (i in dims or i - len(shape) in dims) else s for i, s in enumerate(shape)]
        total = torch.rand(keep, generator=generator(seed + 1), dtype=torch.float64) * 10 + 0.1
    return x, dim, total, dtype


def rows_of(t: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    dims = (dim,) if isinstance(dim, int) else dim
    dims = tuple(sorted(d % t.ndim for d in dims))
    moved = t.movedim(dims, tuple(range(t.ndim - len(dims), t.ndim)))
    return moved.reshape(-1, math.prod(t.shape[d] for d in dims))


@given(problem=problems())
def test_simplex_property_matches_reference(problem: tuple) -> None:
    x, dim, total, dtype = problem
    y = project_simplex(x, total, dim=dim)
    assert y.dtype == dtype and y.shape == x.shape
    rows_y, rows_x = rows_of(y, dim), rows_of(x, dim)
    rows_t = rows_of(total.expand_as(x), dim)[:, :1] if isinstance(total, Tensor) else total
    expected = ref_project_simplex(rows_x.double(), _double(rows_t), (-1,))
    # bfloat16 output: its own rounding plus the float32 computation's
    bound = (
        4 * compute_eps(dtype) * scale_of(rows_x, rows_t) + torch.finfo(dtype).eps * expected.abs()
    )
    assert float(((rows_y.double() - expected).abs() - bound).max()) <= 0
    assert bool((y >= 0).all())


@pytest.mark.usefixtures("box_kernel")
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(), width=st.sampled_from([0.5, 4.0, 50.0]))
def test_box_property_matches_reference(problem: tuple, width: float) -> None:
    x, dim, total, dtype = problem
    rows_x = rows_of(x, dim)
    n = rows_x.shape[-1]
    # a box around the mean total/n, `width` times wider than it, that holds the total
    t_max = float(total.max()) if isinstance(total, Tensor) else total
    t_min = float(total.min()) if isinstance(total, Tensor) else total
    lower, upper = t_min / n - width * t_max / n, t_max / n + width * t_max / n
    y = project_box_sum(x, total, dim=dim, lower=lower, upper=upper)
    assert y.dtype == dtype and y.shape == x.shape
    rows_t = rows_of(total.expand_as(x), dim)[:, :1] if isinstance(total, Tensor) else total
    expected = ref_project_box_sum(rows_x.double(), _double(rows_t), (-1,), lower, upper)
    bound = 4 * (1 + math.log2(n)) * compute_eps(dtype) * scale_of(rows_x, rows_t, lower, upper)
    bound = bound + torch.finfo(dtype).eps * expected.abs()
    assert float(((rows_of(y, dim).double() - expected).abs() - bound).max()) <= 0


# ---------------------------------------------------------------------------
# gradients: unchanged (the Jacobian on the support / the free set), O(n), no sort
# ---------------------------------------------------------------------------


def test_simplex_gradient_equals_the_sort_based_formula() -> None:
    x = torch.randn(6, 700, dtype=torch.float64, generator=generator(2))
    total = torch.rand(6, 1, dtype=torch.float64, generator=generator(3)) + 0.5
    weight = torch.randn(6, 700, dtype=torch.float64, generator=generator(4))
    grads = []
    for fn in (project_simplex, sort_based_simplex):
        xr, tr = x.clone().requires_grad_(), total.clone().requires_grad_()
        (fn(xr, tr) * weight).sum().backward()
        grads.append((xr.grad, tr.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-12)


@pytest.mark.usefixtures("box_kernel")
def test_box_gradient_equals_the_sort_based_formula() -> None:
    x = torch.randn(6, 700, dtype=torch.float64, generator=generator(5))
    weight = torch.randn(6, 700, dtype=torch.float64, generator=generator(6))
    grads = []
    for fn in (
        lambda v: project_box_sum(v, 1.0, lower=-0.5, upper=0.6),
        lambda v: sort_based_box(v, 1.0, -0.5, 0.6),
    ):
        xr = x.clone().requires_grad_()
        (fn(xr) * weight).sum().backward()
        grads.append(xr.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


@pytest.mark.usefixtures("box_kernel")
def test_gradcheck_on_long_rows() -> None:
    x = torch.randn(2, 300, dtype=torch.float64, generator=generator(7), requires_grad=True)
    total = torch.tensor([[1.0], [3.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, t: project_simplex(v, t), (x, total))
    assert torch.autograd.gradcheck(
        lambda v: project_box_sum(v, 1.0, lower=-0.05, upper=0.05), (x,)
    )


def test_box_autograd_node_gradients_match_the_plain_formula() -> None:
    # Eager mode records one node (functional._BoxProjection); compile, torch.func and
    # tracing record the plain active-set formula. Both must give the same Jacobian,
    # also for a per-row total, and none where every entry sits on a bound.
    x = torch.randn(5, 300, dtype=torch.float64, generator=generator(16))
    total = torch.tensor([[1.0], [0.5], [-2.0], [3.0], [15.0]], dtype=torch.float64)
    weight = torch.randn(5, 300, dtype=torch.float64, generator=generator(17))
    grads = []
    for fn in (
        lambda v, c: project_box_sum(v, c, lower=-0.05, upper=0.05),
        lambda v, c: sort_based_box(v, c, -0.05, 0.05),
    ):
        xr, tr = x.clone().requires_grad_(), total.clone().requires_grad_()
        (fn(xr, tr) * weight).sum().backward()
        grads.append((xr.grad, tr.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-12)
    # row 4: total = n * upper, every entry at the upper bound
    assert float(grads[0][0][4].abs().max()) == 0.0


@pytest.mark.parametrize("which", ["box", "simplex"])
def test_gradcheck_with_a_total_and_double_backward(which: str) -> None:
    # the one-node projections of eager mode (Note [One autograd node for an
    # active-set projection]); their backward is differentiable in the gradient
    x = torch.randn(3, 40, dtype=torch.float64, generator=generator(18), requires_grad=True)
    total = torch.tensor([[0.5], [1.0], [2.5]], dtype=torch.float64, requires_grad=True)

    def fn(v: Tensor, c: Tensor) -> Tensor:
        if which == "box":
            return project_box_sum(v, c - 1.0, lower=-0.1, upper=0.1)
        return project_simplex(v, c)

    assert torch.autograd.gradcheck(fn, (x, total))
    assert torch.autograd.gradgradcheck(fn, (x, total))


@pytest.mark.usefixtures("box_kernel")
def test_forward_without_grad_equals_forward_with_grad() -> None:
    x = torch.randn(32, 800, generator=generator(8))
    for fn in (
        lambda v: project_simplex(v, 2.0),
        lambda v: project_box_sum(v, 1.0, lower=0.0, upper=0.01),
    ):
        with torch.no_grad():
            plain = fn(x)
        tracked = fn(x.clone().requires_grad_()).detach()
        assert float((plain - tracked).abs().max()) <= 8 * compute_eps(x.dtype)


# ---------------------------------------------------------------------------
# exact fallback, dispatch off eager CPU, termination on non-finite input
# ---------------------------------------------------------------------------


@pytest.mark.usefixtures("box_kernel")
def test_rows_past_the_step_limit_finish_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kernels, "_MAX_STEPS", 1)
    x = torch.randn(64, 1024, generator=generator(9))
    assert_simplex_exact(project_simplex(x, 1.0), x, 1.0)
    assert_simplex_exact(project_simplex(x[:, :50], 1.0), x[:, :50], 1.0)
    assert_box_exact(project_box_sum(x, 1.0, lower=0.0, upper=0.01), x, 1.0, 0.0, 0.01)


def test_box_search_is_chosen_by_size() -> None:
    small = torch.randn(64, 1024, generator=generator(13))
    large = torch.randn(320, 1024, generator=generator(14))  # above _SMALL_ENTRIES
    assert small.numel() <= _kernels._SMALL_ENTRIES < large.numel()
    calls: list[str] = []
    original = _kernels._box_small

    def spy(*args: object, **kwargs: object) -> Tensor:
        calls.append("small")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_kernels, "_box_small", spy)
        for x in (small, large):
            calls.clear()
            y = project_box_sum(x, 1.0, lower=-4 / 1024, upper=5 / 1024)
            assert_box_exact(y, x, 1.0, -4 / 1024, 5 / 1024)
            # the small-input search on the small input, never on the large one
            assert bool(calls) == (x is small)


@pytest.mark.usefixtures("box_kernel")
def test_box_search_never_returns_nan_on_extreme_finite_entries() -> None:
    big = torch.finfo(torch.float32).max
    x = torch.randn(4, 700, generator=generator(15))
    x[0, :3] = big
    x[1, :3] = -big
    x[2] = big
    x[3, ::2] = -big
    y = project_box_sum(x, 1.0, lower=-1.0, upper=1.0)
    assert not bool(y.isnan().any())
    assert bool((y >= -1.0).all() and (y <= 1.0).all())


def test_sort_based_searches_used_off_eager_cpu_are_exact() -> None:
    for name, x, total in simplex_cases(torch.float64):
        shifted = x - x.amax(-1, keepdim=True)
        tau, _ = _kernels._simplex_sorted(shifted, total)
        assert_simplex_exact((shifted - tau).clamp_min(0.0), x, total), name
    for name, x, total, lower, upper in box_cases(torch.float64):
        tau = _kernels._box_sorted(x, total, lower, upper)
        assert_box_exact((x - tau).clamp(lower, upper), x, total, lower, upper), name


def test_sort_based_box_search_keeps_long_float32_rows_exact() -> None:
    # The compile/GPU path on n = 1e5 float32 rows in a box of width 1e-4: its prefix
    # sums once lost the active set (errors of 4e-4 on entries of at most 1e-4).
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 100_000, generator=gen)
    for lower, upper in ((0.0, 1e-4), (-4e-5, 5e-5)):
        tau = _kernels._box_sorted(x, 1.0, lower, upper)
        y = (x - tau).clamp(lower, upper)
        expected = ref_project_box_sum(x.double(), 1.0, (-1,), lower, upper)
        error = float((y.double() - expected).abs().max())
        assert error <= 4 * torch.finfo(torch.float32).eps * float(x.abs().max())


def test_adaptive_search_only_in_eager_cpu() -> None:
    assert _kernels.use_adaptive(torch.zeros(3))
    seen: list[bool] = []

    def probe(x: Tensor) -> Tensor:
        seen.append(_kernels.use_adaptive(x))
        return x

    torch.compile(probe, fullgraph=True, backend="eager")(torch.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(probe, torch.zeros(3), check_trace=False)
    torch.func.grad(lambda v: probe(v).sum())(torch.zeros(3))
    assert seen == [False, False, False]


@pytest.mark.usefixtures("box_kernel")
def test_non_finite_rows_terminate_and_leave_other_rows_exact() -> None:
    x = torch.randn(8, 600, generator=generator(10))
    x[0, 5] = math.nan
    x[1, 7] = math.inf
    for y, check in (
        (project_simplex(x, 1.0), lambda y: assert_simplex_exact(y, x[2:], 1.0)),
        (
            project_box_sum(x, 1.0, lower=-0.5, upper=0.8),
            lambda y: assert_box_exact(y, x[2:], 1.0, -0.5, 0.8),
        ),
    ):
        check(y[2:])
        assert bool(y[0].isnan().any())


# ---------------------------------------------------------------------------
# compile and trace
# ---------------------------------------------------------------------------


class _GraphCounter:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable:
        self.graphs += 1
        backend = torch._dynamo.lookup_backend("aot_eager")
        return backend(gm, example_inputs)


def test_compiled_projections_trace_in_one_graph_with_the_same_values_and_gradients() -> None:
    simplex = Simplex(total=2.0, dim=-1, method="sparsemax")
    box = BoxSum(total=1.0, dim=-1, lower=-0.05, upper=0.05)

    def both(v: Tensor) -> Tensor:
        return simplex(v) + box(v)

    counter = _GraphCounter()
    compiled = torch.compile(both, fullgraph=True, backend=counter)
    x = torch.randn(4, 300, generator=generator(11), requires_grad=True)
    weight = torch.randn(4, 300, generator=generator(12))
    got = compiled(x)
    (grad_got,) = torch.autograd.grad((got * weight).sum(), x)
    expected = both(x)
    (grad_expected,) = torch.autograd.grad((expected * weight).sum(), x)
    assert counter.graphs == 1
    bound = 8 * compute_eps(x.dtype) * scale_of(x, 2.0)
    assert float((got - expected).abs().max()) <= bound
    assert float((grad_got - grad_expected).abs().max()) <= bound


def test_jit_trace_generalises_to_new_inputs() -> None:
    def both(v: Tensor) -> Tensor:
        return project_simplex(v, 1.0) + project_box_sum(v, 1.0, lower=-0.5, upper=0.8)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(both, torch.randn(3, 300, generator=generator(13)))
    x = torch.randn(5, 300, generator=generator(14)) * 3
    assert float((traced(x) - both(x)).abs().max()) <= 16 * compute_eps(x.dtype) * scale_of(x)
