"""sumto._search: the threshold searches against the float64 references of tests/reference.py.

Each search is selected with ``_search.forced``: ``"sort"`` (every map, every device)
and ``"newton"`` (one-sided maps in eager CPU; two-sided boxes fall back to sorting).
Both are checked at two levels: the shift ``tau`` they return (``clamp(x - tau, l, u)``
must equal the reference projection up to the rounding of the entries) and the public
projections built on it (which must also sum to the total to the rounding of their
own entries). Inputs are random and adversarial: ties, duplicates, huge and tiny
magnitudes, geometric sequences, rows of up to 1e5 entries, integer-valued rows in
narrow boxes, per-row totals; float32 and float64.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from unittest import mock as unittest_mock

import pytest
import torch
from torch import Tensor

from reference import (
    assert_projection_close,
    assert_sums,
    ref_project_box_entries,
    ref_project_box_sum,
    ref_project_simplex,
)
from sumto import _search
from sumto.functional import project_box_sum, project_simplex

DTYPES = [torch.float32, torch.float64]
SEARCHES = ["sort", "newton"]
Total = float | Tensor


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(seed: int, *shape: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64).to(dtype)


def scale_of(x: Tensor, total: Total, *bounds: float) -> float:
    """The magnitude ``x - tau`` rounds at: ``max |x|``, ``|total|`` and the finite bounds."""
    finite = x[torch.isfinite(x)].double()
    mags = [float(finite.abs().max()) if finite.numel() else 0.0]
    mags.append(float(total.double().abs().max()) if isinstance(total, Tensor) else abs(total))
    mags += [abs(b) for b in bounds if math.isfinite(b)]
    return max(mags)


def as_column(total: Total, x: Tensor) -> Total:
    """A tensor total as the ``(rows, 1)`` column the searches take."""
    if isinstance(total, Tensor):
        return total.to(x.dtype).expand(*x.shape[:-1], 1)
    return total


# ---------------------------------------------------------------------------
# cases: name -> builder(dtype) -> (x, total[, lower, upper])
# ---------------------------------------------------------------------------


def _ties_with_the_max(dtype: torch.dtype) -> Tensor:
    x = randn(3, 8, 1024, dtype=dtype)
    x[:, ::3] = x[:, :1]  # a third of each row ties with its first entry
    return x


def _per_row_totals(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    x = randn(4, 16, 900, dtype=dtype)
    total = torch.rand(16, 1, generator=generator(5), dtype=torch.float64) * 10 + 0.01
    return x, total.to(dtype)


SIMPLEX_CASES: dict[str, Callable[[torch.dtype], tuple[Tensor, Total]]] = {
    "randn-sparse": lambda d: (randn(0, 64, 1024, dtype=d), 1.0),
    "randn-dense": lambda d: (randn(1, 64, 1024, dtype=d) * 1e-3, 1.0),
    "randn-medium": lambda d: (randn(2, 64, 1024, dtype=d), 30.0),
    "short-rows": lambda d: (randn(6, 32, 7, dtype=d), 1.0),
    "long-rows-1e5": lambda d: (randn(7, 2, 100_000, dtype=d), 1.0),
    "huge-scale": lambda d: (randn(8, 16, 600, dtype=d) * 1e4, 1.0),
    "tiny-scale-tiny-total": lambda d: (randn(9, 16, 600, dtype=d) * 1e-20, 1e-20),
    "offset-1e4": lambda d: (randn(10, 16, 300, dtype=d) + 1e4, 1.0),
    "integer-ties": lambda d: (torch.randint(0, 3, (64, 700), generator=generator(11)).to(d), 1.0),
    "ties-with-the-max": lambda d: (_ties_with_the_max(d), 1.0),
    "duplicates": lambda d: (randn(12, 8, 600, dtype=d).repeat_interleave(2, -1), 1.0),
    "all-equal": lambda d: (torch.full((4, 1000), 3.0, dtype=d), 2.0),
    "all-zero": lambda d: (torch.zeros(4, 513, dtype=d), 1.0),
    "geometric-2^-i": lambda d: ((2.0 ** -torch.arange(60.0)).to(d).repeat(3, 1), 1.0),
    "geometric-0.5^i-long": lambda d: ((7 * 0.5 ** torch.arange(400.0)).to(d).repeat(3, 1), 1.0),
    "geometric-1.01^i": lambda d: ((1.01 ** torch.arange(2000.0)).to(d).repeat(2, 1), 5.0),
    "sorted-ramp": lambda d: (torch.linspace(0, 1, 4097).to(d).repeat(2, 1), 1.0),
    "three-huge-entries": lambda d: (
        torch.cat([torch.full((8, 3), 1e20, dtype=d), randn(13, 8, 997, dtype=d)], 1),
        1.0,
    ),
    "n=1": lambda d: (randn(14, 16, 1, dtype=d), 1.0),
    "n=2": lambda d: (randn(15, 16, 2, dtype=d), 1.0),
    "per-row-totals": _per_row_totals,
    "tiny-total": lambda d: (randn(16, 32, 700, dtype=d), 1e-20),
    "huge-total": lambda d: (randn(17, 32, 700, dtype=d), 1e6),
}

BoxCase = tuple[Tensor, Total, float, float]


def _box_per_row_totals(dtype: torch.dtype) -> BoxCase:
    x = randn(30, 32, 900, dtype=dtype)
    total = torch.rand(32, 1, generator=generator(31), dtype=torch.float64) * 2 - 1
    return x, total.to(dtype), -0.01, 0.02


def _integers_in_narrow_box(dtype: torch.dtype) -> BoxCase:
    # integer-valued rows: every free entry ties with others, the box is 1/4 wide
    x = torch.randint(-5, 6, (64, 333), generator=generator(32)).to(dtype)
    return x, 10.0, 0.0, 0.25


N = 1024
BOX_CASES: dict[str, Callable[[torch.dtype], BoxCase]] = {
    "wide-box": lambda d: (randn(20, 64, N, dtype=d), 1.0, -0.5, 1.0),
    "wide-box-zero-total": lambda d: (randn(21, 64, N, dtype=d), 0.0, -1.0, 1.0),
    "tight-box-[0,10/n]": lambda d: (randn(22, 64, N, dtype=d), 1.0, 0.0, 10.0 / N),
    "tight-box-[-1/n,3/n]": lambda d: (randn(23, 64, N, dtype=d), 1.0, -1.0 / N, 3.0 / N),
    "total=n*upper": lambda d: (randn(24, 16, N, dtype=d), N * 0.75, -0.5, 0.75),
    "total=n*lower": lambda d: (randn(25, 16, N, dtype=d), N * -0.5, -0.5, 0.75),
    "lower==upper": lambda d: (randn(26, 16, 700, dtype=d), 0.0, 0.0, 0.0),
    "all-free": lambda d: (randn(27, 16, 700, dtype=d) * 1e-3, 1.0, 0.0, 1.0),
    "integer-ties-[0,0.01]": lambda d: (
        torch.randint(0, 3, (32, N), generator=generator(28)).to(d),
        1.0,
        0.0,
        0.01,
    ),
    "integers-in-narrow-box": _integers_in_narrow_box,
    "duplicates": lambda d: (randn(29, 8, 600, dtype=d).repeat_interleave(3, -1), 1.0, -0.1, 0.1),
    "sorted-ramp": lambda d: (torch.linspace(0, 1, 4097).to(d).repeat(2, 1), 1.0, 0.0, 1e-3),
    "geometric": lambda d: ((1.01 ** torch.arange(2000.0)).to(d).repeat(2, 1), 5.0, 0.0, 1.0),
    "three-huge-entries": lambda d: (
        torch.cat([torch.full((8, 3), 1e20, dtype=d), randn(33, 8, 997, dtype=d)], 1),
        1.0,
        -1.0,
        1.0,
    ),
    "huge-scale": lambda d: (randn(34, 16, 600, dtype=d) * 1e4, 1.0, -1.0, 1.0),
    "tiny-scale": lambda d: (randn(35, 16, 600, dtype=d) * 1e-20, 1e-20, -1e-20, 1e-20),
    "n=1": lambda d: (randn(36, 16, 1, dtype=d), 0.3, -1.0, 1.0),
    "n=2": lambda d: (randn(37, 16, 2, dtype=d), 0.3, -1.0, 1.0),
    "per-row-totals": _box_per_row_totals,
    "long-tight-rows-1e5": lambda d: (randn(38, 2, 100_000, dtype=d), 1.0, 0.0, 1e-4),
    "long-centred-rows-1e5": lambda d: (randn(39, 2, 100_000, dtype=d), 1.0, -4e-5, 5e-5),
}

ONE_SIDED_CASES: dict[str, Callable[[torch.dtype], BoxCase]] = {
    "lower-randn": lambda d: (randn(40, 64, N, dtype=d), 1.0, -0.01, math.inf),
    "lower-dense": lambda d: (randn(41, 64, N, dtype=d) * 1e-3, 1.0, -0.5, math.inf),
    "lower=-1e4": lambda d: (randn(42, 64, 512, dtype=d), 1.0, -1e4, math.inf),
    "upper=1e4": lambda d: (randn(43, 64, 512, dtype=d), 1.0, -math.inf, 1e4),
    "upper-randn": lambda d: (randn(44, 64, N, dtype=d), -3.0, -math.inf, 0.02),
    "upper-short": lambda d: (randn(45, 32, 9, dtype=d), 1.0, -math.inf, 0.5),
    "lower-integer-ties": lambda d: (
        torch.randint(0, 3, (32, 700), generator=generator(46)).to(d),
        1.0,
        -0.001,
        math.inf,
    ),
    "lower-long-rows-1e5": lambda d: (randn(47, 2, 100_000, dtype=d), 2.0, -1e-5, math.inf),
    "lower-per-row-totals": lambda d: (
        randn(48, 16, 2000, dtype=d),
        (torch.rand(16, 1, generator=generator(49), dtype=torch.float64) * 5).to(d),
        -1e-3,
        math.inf,
    ),
}


@functools.cache
def simplex_reference(name: str, dtype: torch.dtype) -> Tensor:
    """The sort reference (float64, row by row) on ``x - max(x)`` (the map is shift invariant).

    Shifting keeps the reference's running sums exact on rows with huge entries.
    """
    x, total = SIMPLEX_CASES[name](dtype)
    shifted = x.double() - x.double().amax(-1, keepdim=True)
    return ref_project_simplex(shifted, total.double() if isinstance(total, Tensor) else total)


@functools.cache
def box_reference(name: str, dtype: torch.dtype, one_sided: bool) -> Tensor:
    x, total, lower, upper = (ONE_SIDED_CASES if one_sided else BOX_CASES)[name](dtype)
    t = total.double() if isinstance(total, Tensor) else total
    return ref_project_box_sum(x.double(), t, (-1,), lower, upper)


def check_tau(x: Tensor, total: Total, lower: float, upper: float, expected: Tensor) -> Tensor:
    """``tau`` of the search in force: ``clamp(x - tau)`` equals the reference to rounding.

    Besides the rounding of the entries, ``tau`` carries the error of the sort search's
    float64 prefix sums, ``eps(float64)`` times a row's ``sum |x|``: negligible for
    float32 rows, visible on long float64 rows. The assembled output removes it
    (Note [Sum refinement]), so the output checks need no such term.
    """
    tau = _search.threshold(x, as_column(total, x), lower, upper)
    # the sort searches return float64 tau (subtracted in two parts by the assembly)
    assert tau.shape == (*x.shape[:-1], 1) and tau.dtype in (x.dtype, torch.float64)
    assert not bool(tau.isnan().any())
    y = (x.double() - tau.double()).clamp(lower, upper)
    finite = torch.where(torch.isfinite(x), x, 0).double()
    prefix_sums = 16 * torch.finfo(torch.float64).eps * float(finite.abs().sum(-1).max())
    scale = scale_of(x, total, lower, upper)
    assert_projection_close(y.to(x.dtype), expected, scale, what="tau", absolute=prefix_sums)
    return tau


# ---------------------------------------------------------------------------
# simplex (one-sided, lower = 0)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("name", list(SIMPLEX_CASES))
def test_simplex_search_matches_the_sort_reference(
    name: str, search: str, dtype: torch.dtype
) -> None:
    x, total = SIMPLEX_CASES[name](dtype)
    expected = simplex_reference(name, dtype)
    with _search.forced(search):  # type: ignore[arg-type]
        check_tau(x, total, 0.0, math.inf, expected)
        y = project_simplex(x, total)
    assert y.dtype == dtype and y.shape == x.shape
    assert_projection_close(y, expected, scale_of(x, total), what=name)
    assert bool((y >= 0).all())
    # exact to the rounding of the output's own entries (Note [Sum refinement])
    assert_sums(y, total, (-1,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SIMPLEX_CASES))
def test_pruned_newton_matches_the_sort_reference(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The test inputs are below the size from which the search prunes: prune them all.
    monkeypatch.setattr(_search, "_PRUNE_ENTRIES", 0)
    x, total = SIMPLEX_CASES[name](dtype)
    expected = simplex_reference(name, dtype)
    with _search.forced("newton"):
        check_tau(x, total, 0.0, math.inf, expected)
        y = project_simplex(x, total)
    assert_projection_close(y, expected, scale_of(x, total), what=name)
    assert_sums(y, total, (-1,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SIMPLEX_CASES))
def test_newton_and_sort_agree_on_the_simplex(name: str, dtype: torch.dtype) -> None:
    x, total = SIMPLEX_CASES[name](dtype)
    taus, outs = [], []
    for search in SEARCHES:
        with _search.forced(search):  # type: ignore[arg-type]
            taus.append(_search.threshold(x, as_column(total, x), 0.0, math.inf))
            outs.append(project_simplex(x, total))
    scale = scale_of(x, total)
    # the same classification: outputs within rounding of each other
    y_sort = (x.double() - taus[0].double()).clamp_min(0.0)
    y_newton = (x.double() - taus[1].double()).clamp_min(0.0)
    assert_projection_close(y_newton.to(dtype), y_sort, scale, what="tau")
    assert_projection_close(outs[1], outs[0].double(), scale, what="output")


# ---------------------------------------------------------------------------
# one-sided boxes (the simplex problem shifted or mirrored)
# ---------------------------------------------------------------------------


def check_box_case(name: str, dtype: torch.dtype, search: str, one_sided: bool) -> None:
    """``tau`` and the public output of a box case against the bisection reference."""
    x, total, lower, upper = (ONE_SIDED_CASES if one_sided else BOX_CASES)[name](dtype)
    expected = box_reference(name, dtype, one_sided)
    with _search.forced(search):  # type: ignore[arg-type]
        check_tau(x, total, lower, upper, expected)
        y = project_box_sum(x, total, lower=lower, upper=upper)
    assert_projection_close(y, expected, scale_of(x, total, lower, upper), what=name)
    assert bool((y >= lower).all() and (y <= upper).all())
    assert_sums(y, total, (-1,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("name", list(ONE_SIDED_CASES))
def test_one_sided_search_matches_the_bisection_reference(
    name: str, search: str, dtype: torch.dtype
) -> None:
    check_box_case(name, dtype, search, one_sided=True)


# ---------------------------------------------------------------------------
# two-sided boxes (sorted breakpoints, and Newton's method on eager CPU)
# ---------------------------------------------------------------------------


def box_params() -> list[object]:
    return [
        pytest.param(name, dtype, id=f"{name}-{dtype}") for name in BOX_CASES for dtype in DTYPES
    ]


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize(("name", "dtype"), box_params())
def test_box_search_matches_the_bisection_reference(
    name: str, dtype: torch.dtype, search: str
) -> None:
    check_box_case(name, dtype, search, one_sided=False)


@pytest.mark.parametrize("name", ["long-tight-rows-1e5", "long-centred-rows-1e5"])
def test_sort_search_keeps_long_float32_rows_in_narrow_boxes_exact(name: str) -> None:
    # Prefix sums of 1e5 float32 entries lose the classification of a box 1e-4 wide:
    # the search sums in float64. The error is bounded by the entries' own rounding.
    x, total, lower, upper = BOX_CASES[name](torch.float32)
    with _search.forced("sort"):
        tau = _search.threshold(x, total, lower, upper)
    y = (x.double() - tau.double()).clamp(lower, upper)
    error = float((y - box_reference(name, torch.float32, False)).abs().max())
    assert error <= 4 * torch.finfo(torch.float32).eps * float(x.abs().max())


@pytest.mark.parametrize("value_steps", [0, 1, 40])
@pytest.mark.parametrize(
    "name", ["wide-box", "tight-box-[0,10/n]", "integers-in-narrow-box", "per-row-totals"]
)
def test_box_newton_is_exact_whatever_its_value_steps_left(
    name: str, value_steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The value-only steps only bring the start near the root: with none, one, or
    # more than any row needs, Newton's steps still end on the exact classification.
    monkeypatch.setattr(_search, "_VALUE_STEPS", value_steps)
    check_box_case(name, torch.float32, "newton", one_sided=False)


@pytest.mark.parametrize("name", ["tight-box-[0,10/n]", "per-row-totals"])
def test_box_rows_past_the_newton_step_limit_finish_by_sorting(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two Newton steps after no value step leave rows unfinished: they are sorted,
    # with their own totals, and the result is still the exact projection.
    monkeypatch.setattr(_search, "_VALUE_STEPS", 0)
    monkeypatch.setattr(_search, "_MAX_STEPS", 2)
    sorted_rows: list[int] = []
    box_sort = _search._box_sort

    def spy(x: Tensor, *args: object) -> Tensor:
        sorted_rows.append(x.shape[0])
        return box_sort(x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_search, "_box_sort", spy)
    check_box_case(name, torch.float32, "newton", one_sided=False)
    assert sorted_rows and max(sorted_rows) > 0


@pytest.mark.parametrize("block_bytes", [1, 3 * 4 * N + 4])
def test_box_newton_row_blocks_keep_each_row_with_its_own_total(
    block_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One row per block, and blocks of three rows that leave a shorter last block:
    # per-row totals must follow their rows across block edges.
    monkeypatch.setattr(_search, "_BLOCK_BYTES", block_bytes)
    x = randn(60, 2, 5, N, dtype=torch.float32)
    total = (torch.rand(2, 5, 1, generator=generator(61), dtype=torch.float64) * 4 - 1).float()
    expected = ref_project_box_sum(x.double(), total.double(), (-1,), -0.01, 0.02)
    with _search.forced("newton"):
        check_tau(x, total, -0.01, 0.02, expected)
        y = project_box_sum(x, total, lower=-0.01, upper=0.02)
    assert_projection_close(y, expected, scale_of(x, total, -0.01, 0.02))
    assert_sums(y, total, (-1,))


def test_newton_and_sort_classify_a_two_sided_box_alike() -> None:
    x, total, lower, upper = BOX_CASES["tight-box-[0,10/n]"](torch.float32)
    outputs = []
    for search in SEARCHES:
        with _search.forced(search):  # type: ignore[arg-type]
            tau = _search.threshold(x, total, lower, upper)
        outputs.append((x.double() - tau.double()).clamp(lower, upper))
    scale = scale_of(x, total, lower, upper)
    assert_projection_close(outputs[1].float(), outputs[0], scale, what="newton vs sort")


# ---------------------------------------------------------------------------
# the Newton search: step limit, row dropping, per-row totals, non-finite rows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize(
    "name", ["randn-sparse", "geometric-1.01^i", "geometric-0.5^i-long", "per-row-totals"]
)
def test_rows_past_the_step_limit_finish_exactly(
    name: str, steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_search, "_MAX_STEPS", steps)
    x, total = SIMPLEX_CASES[name](torch.float32)
    expected = simplex_reference(name, torch.float32)
    with _search.forced("newton"):
        check_tau(x, total, 0.0, math.inf, expected)
        y = project_simplex(x, total)
    assert_projection_close(y, expected, scale_of(x, total), what=name)
    assert_sums(y, total, (-1,))


def test_rows_finishing_at_different_steps_keep_their_own_totals() -> None:
    # Rows that converge early are dropped from the loop; the totals of the rows still
    # running must follow them (a per-row total indexed with the surviving rows).
    easy = torch.zeros(1, 600, dtype=torch.float64)  # support = the whole row at once
    hard = (1.01 ** torch.arange(600.0, dtype=torch.float64)).reshape(1, -1)
    x = torch.cat([easy, hard, easy, hard], 0)
    total = torch.tensor([[1.0], [50.0], [3.0], [0.5]], dtype=torch.float64)
    shifted = x - x.amax(-1, keepdim=True)
    expected = ref_project_simplex(shifted, total)
    with _search.forced("newton"):
        check_tau(x, total, 0.0, math.inf, expected)
        y = project_simplex(x, total)
    assert_projection_close(y, expected, scale_of(x, total), what="mixed rows")


@pytest.mark.parametrize("search", SEARCHES)
def test_non_finite_rows_terminate_and_leave_other_rows_exact(search: str) -> None:
    x = randn(50, 8, 1200, dtype=torch.float32)
    x[0, 5] = math.nan
    x[1, 7] = -math.inf
    x[2] = -math.inf
    rest = x[3:]
    with _search.forced(search):  # type: ignore[arg-type]
        y = project_simplex(x, 1.0)
        y_box = project_box_sum(x, 1.0, lower=-0.5, upper=0.8)
    expected = ref_project_simplex(rest.double() - rest.double().amax(-1, keepdim=True))
    assert_projection_close(y[3:], expected, scale_of(rest, 1.0))
    expected_box = ref_project_box_sum(rest.double(), 1.0, (-1,), -0.5, 0.8)
    assert_projection_close(y_box[3:], expected_box, scale_of(rest, 1.0, -0.5, 0.8))
    assert bool(y[0].isnan().any())  # NaN in, NaN out: never silently a number
    # a -inf entry gets nothing; a row of -inf only is the uniform row, its limit
    assert float(y[1, 7]) == 0.0
    finite_row = torch.cat([x[1, :7], x[1, 8:]]).double().reshape(1, -1)
    expected_row1 = ref_project_simplex(finite_row - finite_row.max())
    got_row1 = torch.cat([y[1, :7], y[1, 8:]]).reshape(1, -1)
    assert_projection_close(got_row1, expected_row1, scale_of(finite_row, 1.0))
    assert_sums(y[1:2], 1.0, (-1,))
    torch.testing.assert_close(y[2], torch.full((1200,), 1 / 1200))
    torch.testing.assert_close(y_box[2], torch.full((1200,), 1 / 1200))


def test_forced_restores_the_automatic_choice() -> None:
    assert _search._forced is None
    with _search.forced("newton"):
        assert _search._use_newton(torch.zeros(1, 3))
        with _search.forced("sort"):
            assert not _search._use_newton(torch.zeros(1, 5000))
        assert _search._forced == "newton"
    assert _search._forced is None
    assert _search._use_newton(torch.zeros(1, _search._LARGE))
    assert _search._use_newton(torch.zeros(_search._LARGE // 4, 4))
    assert not _search._use_newton(torch.zeros(1, _search._LARGE - 1))
    box = _search._LARGE_BOX
    assert _search._use_newton(torch.zeros(1, box), box)
    assert not _search._use_newton(torch.zeros(1, box - 1), box)


def test_newton_never_runs_under_transforms_compile_or_tracing() -> None:
    seen: list[bool] = []

    def probe(x: Tensor) -> Tensor:
        seen.append(_search._use_newton(x))
        return x + 1.0

    x = torch.zeros(2, 5000)
    with _search.forced("newton"):
        torch.func.grad(lambda v: probe(v).sum())(x)
        torch.func.vmap(probe)(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(probe, x, check_trace=False)
        torch._dynamo.reset()
        try:
            torch.compile(probe, fullgraph=True, backend="eager")(x)
        finally:
            torch._dynamo.reset()
    assert seen == [False, False, False, False]


def test_jit_trace_records_the_sort_search_and_generalises_to_new_inputs() -> None:
    # Rows long enough for the Newton search in eager mode: a trace must not bake its
    # data-dependent loop into the graph.
    def both(v: Tensor) -> Tensor:
        return project_simplex(v, 1.0) + project_box_sum(v, 1.0, lower=-0.5, upper=0.8)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(both, randn(60, 3, 1500, dtype=torch.float32))
    x = randn(61, 5, 1500, dtype=torch.float32) * 3
    expected = ref_project_simplex(x.double() - x.double().amax(-1, keepdim=True))
    expected = expected + ref_project_box_sum(x.double(), 1.0, (-1,), -0.5, 0.8)
    assert_projection_close(traced(x), expected, scale_of(x, 1.0))
    assert_projection_close(traced(x), both(x).double(), scale_of(x, 1.0))


# ---------------------------------------------------------------------------
# precision of rows far from the output's scale
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "dtype"),
    [([1e10, 0.0, 0.0], torch.float32), ([1e20, 0.0, 0.0], torch.float64)],
    ids=["float32-1e10", "float64-1e20"],
)
@pytest.mark.parametrize("search", SEARCHES)
def test_a_dominant_entry_takes_the_whole_total(
    x: list[float], dtype: torch.dtype, search: str
) -> None:
    # The projection is shift invariant (documented): P(x) = P(x - max x) = [1, 0, 0].
    with _search.forced(search):  # type: ignore[arg-type]
        y = project_simplex(torch.tensor(x, dtype=dtype))
        shifted = project_simplex(torch.tensor(x, dtype=dtype) - x[0])
    assert torch.equal(shifted, torch.tensor([1.0, 0.0, 0.0], dtype=dtype))
    assert torch.equal(y, shifted)


@pytest.mark.parametrize("search", SEARCHES)
def test_top_entries_of_a_float32_geometric_row_take_the_total(search: str) -> None:
    x = (1.01 ** torch.arange(2000.0)).repeat(2, 1)  # float32, entries up to 4.3e8
    with _search.forced(search):  # type: ignore[arg-type]
        y = project_simplex(x, 5.0)
    expected = ref_project_simplex(x.double() - x.double().amax(-1, keepdim=True), 5.0)
    # within rounding of the output's own scale (the total), as for x - max(x)
    assert_projection_close(y, expected, 5.0)


def test_a_dominant_entry_in_a_box_takes_the_whole_total() -> None:
    x = torch.tensor([1e20, 0.0, 0.0], dtype=torch.float64)
    y = project_box_sum(x, 1.0, lower=0.0, upper=2.0)
    assert torch.equal(y, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_box_output_close_to_a_bound_keeps_the_total() -> None:
    x = torch.tensor([[341.0502624511719, 0.0]])
    y = project_box_sum(x, 1e-3, lower=0.0, upper=0.001005)
    expected = ref_project_box_sum(x.double(), 1e-3, (-1,), 0.0, 0.001005)  # [0.001, 0]
    assert_sums(y, 1e-3, (-1,))
    assert_projection_close(y, expected, 1e-3)


@pytest.mark.parametrize("search", SEARCHES)
def test_one_sided_output_close_to_its_bound_keeps_the_total(search: str) -> None:
    x = torch.tensor([999.99993896484375, 999.998901367187])
    with _search.forced(search):  # type: ignore[arg-type]
        y = project_box_sum(x, 1e-3, lower=-1e-5)
    expected = ref_project_box_sum(x.double(), 1e-3, (-1,), -1e-5, math.inf)  # [1.01e-3, -1e-5]
    assert_sums(y, 1e-3, (-1,))
    assert_projection_close(y, expected, 1e-3)


# ---------------------------------------------------------------------------
# per-entry bounds (sorted breakpoints of both kinds)
# ---------------------------------------------------------------------------


def entry_params() -> list[object]:
    return [
        pytest.param(name, dtype, one_sided, id=f"{name}-{dtype}")
        for one_sided, cases in ((False, BOX_CASES), (True, ONE_SIDED_CASES))
        for name in cases
        for dtype in DTYPES
    ]


@pytest.mark.parametrize(("name", "dtype", "one_sided"), entry_params())
def test_per_entry_search_on_every_box_case_matches_the_reference(
    name: str, dtype: torch.dtype, one_sided: bool
) -> None:
    """The box cases with their bounds given per entry: the same set, the same projection."""
    x, total, lower, upper = (ONE_SIDED_CASES if one_sided else BOX_CASES)[name](dtype)
    expected = box_reference(name, dtype, one_sided)
    n = x.shape[-1]
    full_lower = torch.full((n,), lower, dtype=torch.float64)
    y = project_box_sum(x, total, lower=full_lower, upper=torch.tensor(upper, dtype=torch.float64))
    assert_projection_close(y, expected, scale_of(x, total, lower, upper), what=name)
    assert bool((y >= lower).all() and (y <= upper).all())
    assert_sums(y, total, (-1,))


ENTRY_CASES: dict[str, Callable[[torch.dtype], tuple[Tensor, Total, Tensor, Tensor]]] = {
    "caps-long-rows-1e5": lambda d: (
        randn(60, 2, 100_000, dtype=d),
        1.0,
        torch.zeros(100_000),
        torch.rand(100_000, generator=generator(61)) * 1e-4,
    ),
    "integers-in-varied-narrow-boxes": lambda d: (
        torch.randint(-5, 6, (64, 333), generator=generator(62)).to(d),
        10.0,
        torch.rand(333, generator=generator(63)) * 0.01,
        0.1 + torch.rand(333, generator=generator(64)) * 0.2,
    ),
    "huge-caps-small-rows": lambda d: (
        randn(65, 64, 9, dtype=d),
        1.0,
        torch.zeros(9),
        torch.full((9,), 1e30),
    ),
    "fixed-and-free-mix": lambda d: (
        randn(66, 32, 50, dtype=d),
        0.0,
        torch.where(torch.arange(50) % 3 == 0, 0.01, -1.0),
        torch.where(torch.arange(50) % 3 == 0, 0.01, 1.0),
    ),
    "per-row-bounds": lambda d: (
        randn(67, 16, 700, dtype=d),
        torch.rand(16, 1, generator=generator(68)).to(d),
        -torch.rand(16, 700, generator=generator(69)) * 1e-3,
        torch.rand(16, 700, generator=generator(70)) * 1e-2,
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ENTRY_CASES))
def test_per_entry_search_on_varied_bounds_matches_the_reference(
    name: str, dtype: torch.dtype
) -> None:
    x, total, lower, upper = ENTRY_CASES[name](dtype)
    t = total.double() if isinstance(total, Tensor) else total
    expected = ref_project_box_entries(x.double(), t, (-1,), lower.double(), upper.double())
    y = project_box_sum(x, total, lower=lower, upper=upper)
    bound = float(torch.cat([lower.abs().reshape(-1), upper.abs().reshape(-1)]).max())
    scale = max(scale_of(x, total), min(bound, float(x.abs().max()) + 1.0))
    assert_projection_close(y, expected, scale, what=name)
    assert bool((y >= lower.to(dtype)).all() and (y <= upper.to(dtype)).all())
    assert_sums(y, total, (-1,))


# ---------------------------------------------------------------------------
# the search as an opaque operator under torch.compile
# ---------------------------------------------------------------------------


def ops_in_graph(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, list[str]]:
    """``torch.compile(fn, fullgraph=True)(x)`` and the targets of the ATen graph it ran."""
    targets: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> object:
        def record(graph: torch.fx.GraphModule, inputs: list[Tensor]) -> object:
            targets.extend(str(node.target) for node in graph.graph.nodes)
            return graph.forward

        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=record)(gm, example_inputs)

    torch._dynamo.reset()
    try:
        return torch.compile(fn, fullgraph=True, backend=backend)(x), targets
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(
    ("lower", "upper"), [(0.0, math.inf), (-0.5, 1.0), (0.0, 10.0 / 1024), (-math.inf, 0.01)]
)
def test_compiled_maps_call_the_search_operator_and_pick_newton_at_run_time(
    lower: float, upper: float
) -> None:
    x = randn(80, 64, 1024, dtype=torch.float32)  # 2**16 entries: Newton's size in eager mode
    calls: list[str] = []
    newton = (_search._simplex_newton_rows, _search._box_newton_rows)

    def spy(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def wrapped(*args: object) -> Tensor:
            calls.append(fn.__name__)
            return fn(*args)

        return wrapped

    def project(v: Tensor) -> Tensor:
        return project_box_sum(v, 1.0, lower=lower, upper=upper)

    with (
        unittest_mock.patch.object(_search, "_simplex_newton_rows", spy(newton[0])),
        unittest_mock.patch.object(_search, "_box_newton_rows", spy(newton[1])),
    ):
        compiled, targets = ops_in_graph(project, x)
    assert "sumto.threshold.default" in targets
    assert calls, "the operator did not run a Newton search on a large eager CPU input"
    expected = project(x)
    assert_projection_close(compiled, expected, scale_of(x, 1.0, lower, upper), what="compiled")
    assert_sums(compiled, 1.0, (-1,))


def test_export_and_vmap_under_compile_trace_the_sort_search() -> None:
    x = randn(81, 4, 9, dtype=torch.float64)
    program = torch.export.export(_ProjectSimplex(), (x,))
    targets = [  # the no-grad search sits in a submodule of the exported graph
        str(node.target)
        for module in program.graph_module.modules()
        if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
    ]
    assert not any("sumto" in t for t in targets) and "aten.sort.default" in targets
    torch.testing.assert_close(program.module()(x), project_simplex(x))
    vmapped = torch.func.vmap(project_simplex)
    torch._dynamo.reset()
    try:
        got = torch.compile(vmapped, fullgraph=True, backend="aot_eager")(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, project_simplex(x))


class _ProjectSimplex(torch.nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return project_simplex(x)
