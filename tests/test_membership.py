"""Integration, membership: values the library produces are accepted by the library.

A constraint's ``forward`` and ``project`` outputs must pass its ``check_member`` with
its own ``tolerance`` (the check behind assignment, ``init`` and checkpoint loading),
whatever the pre-weights' magnitude, the total, the shape and the dtype; they must
be accepted as ``init`` at registration, and a baked checkpoint of the registered
module must load into a fresh module built with the same constraint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import sumto
from sumto import AffineSum, BoxSum, Constraint, LinearEquality, Simplex

TOTALS = [0.0, 1e-3, 0.01, 1.0, 10.0]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _linear_equality(total: float, n: int) -> LinearEquality:
    """The sum, and an alternating sum for n >= 2 (two independent equations)."""
    a = torch.ones(min(n, 2), n, dtype=torch.float64)
    a[1:, ::2] = -1.0
    b = torch.tensor([total, 0.5 * total][: min(n, 2)], dtype=torch.float64)
    return LinearEquality(a, b, dim=-1)


def _box(total: float, n: int, width: float) -> BoxSum:
    """A two-sided box around ``total / n`` that holds the total."""
    mean = total / n
    half = width * max(abs(mean), 1e-3)
    return BoxSum(total=total, dim=-1, lower=mean - half, upper=mean + 2 * half)


# name -> (total, n) -> constraint, or None where the class does not take this total/size
FAMILIES: dict[str, Callable[[float, int], Constraint | None]] = {
    "AffineSum": lambda c, n: AffineSum(total=c, dim=-1),
    "Simplex-softmax": lambda c, n: Simplex(total=c, dim=-1) if c > 0 else None,
    "Simplex-softmax-T0.1": lambda c, n: (
        Simplex(total=c, dim=-1, temperature=0.1) if c > 0 else None
    ),
    "Simplex-sparsemax": lambda c, n: (
        Simplex(total=c, dim=-1, method="sparsemax") if c > 0 else None
    ),
    "Simplex-sparsemax-T5": lambda c, n: (
        Simplex(total=c, dim=-1, method="sparsemax", temperature=5.0) if c > 0 else None
    ),
    "Simplex-relu": lambda c, n: Simplex(total=c, dim=-1, method="relu") if c > 0 else None,
    "BoxSum-lower": lambda c, n: BoxSum(total=c, dim=-1, lower=min(0.0, c / n) - 0.5),
    "BoxSum-upper": lambda c, n: BoxSum(total=c, dim=-1, upper=max(0.0, c / n) + 0.5),
    "BoxSum-nonnegative": lambda c, n: BoxSum(total=c, dim=-1, lower=0.0),
    "BoxSum-wide": lambda c, n: _box(c, n, 50.0),
    "BoxSum-mid": lambda c, n: _box(c, n, 0.5),
    "LinearEquality": lambda c, n: _linear_equality(c, n),
}
# A box [0, c (1 + 2 / n)]: the largest pre-weight takes nearly all of the total, a
# free entry a little below the upper bound, a slack far below the pre-weights' scale
# (see test_produced_values_are_members_in_narrow_boxes).
NARROW_BOX = "BoxSum-narrow"
FAMILIES[NARROW_BOX] = lambda c, n: (
    BoxSum(total=c, dim=-1, lower=0.0, upper=c * (1 + 2 / n)) if c > 0 else None
)


def pre_weights(seed: int, rows: int, n: int, magnitude: float, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, n, generator=g, dtype=torch.float64) * magnitude).to(dtype)


def check_round_trip(family: str, total: float, pre: Tensor) -> None:
    """forward/project outputs are members, registrable as init, and their checkpoint loads."""
    rows, n = pre.shape
    constraint = FAMILIES[family](total, n)
    if constraint is None:
        return
    values = [constraint(pre), constraint.project(pre)]
    for value in values:
        assert value.dtype == pre.dtype and value.shape == pre.shape
        constraint.check_member(value)  # the check behind assignment, init and loading
    # registration with init equal to the produced value
    module = nn.Linear(n, rows, dtype=pre.dtype)
    sumto.constrain(module, "weight", FAMILIES[family](total, n), init=values[0])  # type: ignore[arg-type]
    plist: Any = module.parametrizations.weight
    plist[0].check_member(module.weight.detach(), "the registered weight")
    module.weight = values[1]  # assignment of the projected value
    # the baked checkpoint of the registered module loads into a fresh one
    state = sumto.bake(copy.deepcopy(module)).state_dict()
    fresh = nn.Linear(n, rows, dtype=pre.dtype)
    sumto.constrain(fresh, "weight", FAMILIES[family](total, n), init=values[0])  # type: ignore[arg-type]
    fresh.load_state_dict(state)
    fresh_plist: Any = fresh.parametrizations.weight
    fresh_plist[0].check_member(fresh.weight.detach(), "the loaded weight")


@st.composite
def problems(draw: st.DrawFn, families: list[str]) -> tuple[str, float, Tensor]:
    family = draw(st.sampled_from(families))
    total = draw(st.sampled_from(TOTALS))
    if (family.startswith("Simplex") or family == NARROW_BOX) and total == 0.0:
        total = draw(st.sampled_from(TOTALS[1:]))
    rows = draw(st.integers(1, 4))
    n = draw(st.sampled_from([1, 2, 3, 7, 16, 65, 300]))
    dtype = draw(st.sampled_from(DTYPES))
    magnitude = 10.0 ** draw(st.integers(-3, 3))
    seed = draw(st.integers(0, 2**16))
    return family, total, pre_weights(seed, rows, n, magnitude, dtype)


@settings(max_examples=120, deadline=None)
@given(problem=problems([f for f in FAMILIES if f != NARROW_BOX]))
def test_produced_values_are_members(problem: tuple[str, float, Tensor]) -> None:
    check_round_trip(*problem)


@settings(max_examples=60, deadline=None)
@given(problem=problems([NARROW_BOX]))
@example(problem=(NARROW_BOX, 1e-3, pre_weights(0, 1, 289, 100.0, torch.float32)))
def test_produced_values_are_members_in_narrow_boxes(problem: tuple[str, float, Tensor]) -> None:
    check_round_trip(*problem)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != NARROW_BOX])
def test_large_values_are_members(family: str, dtype: torch.dtype) -> None:
    # long rows take the Newton search in eager CPU; large pre-weights, small total
    pre = pre_weights(1, 8, 4096, 1e3, dtype)
    check_round_trip(family, 0.01, pre)


# ---------------------------------------------------------------------------
# regressions: values the library produced and then refused
# ---------------------------------------------------------------------------


def test_affine_sum_registers_with_total_zero_on_an_unlucky_seed() -> None:
    # The projection rounded at the pre-weights' scale: |sum| exceeded the tolerance
    # of the (small) output, and init='project' refused its own projection.
    torch.manual_seed(881)
    lin = sumto.sum_to(nn.Linear(2, 3), total=0.0)
    assert sumto.check(lin)["weight"] <= 1e-6


@pytest.mark.parametrize("seed", range(20))
def test_box_sum_with_one_finite_bound_registers(seed: int) -> None:
    torch.manual_seed(seed)
    lin = sumto.box_sum(nn.Linear(10, 4), lower=-5.0)
    constraint: Any = lin.parametrizations.weight[0]
    constraint.check_member(lin.weight.detach())
    assert bool((lin.weight >= -5.0).all())
    torch.manual_seed(seed)
    lin = sumto.box_sum(nn.Linear(10, 4), upper=5.0)
    assert bool((lin.weight <= 5.0).all())


def test_trained_sparsemax_conv_reassigns_its_weight_and_reloads_its_baked_checkpoint() -> None:
    torch.manual_seed(0)
    model = sumto.simplex(nn.Conv2d(5, 4, 3), method="sparsemax", total=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        out = model(torch.randn(8, 5, 8, 8, generator=g))
        # a loss with large gradients: pre-weights grow to ~1e3, far above the total
        loss = (out * torch.randn(out.shape, generator=g)).sum() * 100
        opt.zero_grad()
        loss.backward()
        opt.step()
    pre = model.parametrizations.weight.original.detach()
    assert float(pre.abs().max()) > 100.0
    model.weight = model.weight.detach()
    state = sumto.bake(copy.deepcopy(model)).state_dict()
    fresh = sumto.simplex(nn.Conv2d(5, 4, 3), method="sparsemax", total=0.01)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.weight, model.weight, rtol=0, atol=1e-9)
    assert sumto.check(fresh)["weight"] <= 1e-8


def test_simplex_temperature_below_the_documented_range_raises() -> None:
    for temperature in (5e-324, 1e-31, 1e31, math.inf, math.nan, 0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            Simplex(temperature=temperature)
    for temperature in (1e-30, 1e30):
        Simplex(temperature=temperature)  # the ends of the range are accepted
