"""Integration, mixed precision: CPU autocast(bfloat16) and bfloat16/float16 parameters.

What is shown, for every constraint:

* under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with float32 parameters the
  constrained weights are float32 and bit-identical to those computed without
  autocast (no map silently runs in bfloat16), and training under autocast keeps
  the constraints within the float32 tolerance;
* with bfloat16 or float16 parameters the map runs in float32 and is rounded once:
  the weight is bit-identical to ``constraint(pre_weights.float()).to(dtype)``, and
  every slice holds within the documented tolerance (:func:`half_tolerance`);
* ``model.to(half dtype)`` does not round the buffers that define the set (tensor
  totals, projection bases), so a round trip ``.half().float()`` restores float32
  accuracy, and assignments keep working after the conversion.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import sumto
from reference import as_rows

N = 192  # entries per slice: large enough for rounding to accumulate
A = torch.linspace(-1.0, 1.0, 2 * N).reshape(2, N)
B = torch.tensor([1.0, 0.25])

# name -> (factory, attribute holding the constrained tensor)
MODULES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "sum_to": (
        lambda: sumto.sum_to(nn.Linear(N, 4), total=torch.tensor([1.1, -2.3, 0.7, 5.0])),
        "weight",
    ),
    "softmax": (lambda: sumto.simplex(nn.Linear(N, 4), temperature=0.5), "weight"),
    "sparsemax": (lambda: sumto.simplex(nn.Linear(N, 4), method="sparsemax", total=3.0), "weight"),
    "relu": (lambda: sumto.simplex(nn.Linear(N, 4), method="relu"), "weight"),
    "box_sum": (
        lambda: sumto.box_sum(nn.Linear(N, 4), dim=(0, 1), lower=-0.25, upper=0.75),
        "weight",
    ),
    "linear_equality": (lambda: sumto.linear_equality(nn.Linear(N, 4), A=A, b=B), "weight"),
    "bayar": (lambda: sumto.bayar(nn.Conv2d(3, 4, 5)), "weight"),
    "weighted_sum": (lambda: sumto.WeightedSum(16, channels=N, channel_dim=-1), "weights"),
}
HALF = [torch.bfloat16, torch.float16]


def make(kind: str, seed: int = 0) -> tuple[nn.Module, str]:
    torch.manual_seed(seed)
    factory, name = MODULES[kind]
    module = factory()
    with torch.no_grad():  # spread the pre-weights so that every map does some work
        original = module.parametrizations[name].original
        original.add_(0.3 * torch.randn(original.shape))
    return module, name


def constraint_of(module: nn.Module, name: str) -> sumto.Constraint:
    constraint = module.parametrizations[name][0]
    assert isinstance(constraint, sumto.Constraint)
    return constraint


def half_tolerance(constraint: sumto.Constraint, w: Tensor) -> float:
    """The documented bound for half-precision weights, measured in float64.

    The map runs in float32 (error within ``constraint.tolerance`` of the float32
    result) and each entry is then rounded once to ``w.dtype`` (relative error at most
    eps/2 per entry), so every slice holds within
    ``eps(w.dtype) * max sum|w| + constraint.tolerance(w.float())``.
    """
    dims = constraint.dims(w.ndim)
    rows, _ = as_rows(w, dims)
    magnitude = float(rows.abs().sum(1).max())
    return torch.finfo(w.dtype).eps * magnitude + constraint.tolerance(w.float())


def violation64(constraint: sumto.Constraint, w: Tensor) -> float:
    """The constraint's violation of ``w`` computed in float64."""
    return float(constraint.violation(w.detach().double()))


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_autocast_bf16_leaves_float32_weights_bit_identical(kind: str) -> None:
    module, name = make(kind)
    plain = getattr(module, name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = getattr(module, name)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, plain)


@pytest.mark.parametrize("kind", sorted(MODULES))
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_parameters_are_mapped_in_float32_and_rounded_once(
    kind: str, dtype: torch.dtype
) -> None:
    module, name = make(kind)
    module.to(dtype)
    constraint = constraint_of(module, name)
    original = module.parametrizations[name].original
    assert original.dtype == dtype
    w = getattr(module, name)
    assert w.dtype == dtype
    with torch.no_grad():
        expected = constraint(original.float()).to(dtype)
    assert torch.equal(w, expected)
    assert bool(torch.isfinite(w).all())
    assert violation64(constraint, w) <= half_tolerance(constraint, w)
    # The same holds under autocast.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(getattr(module, name), expected)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_training_under_autocast_keeps_float32_accuracy(kind: str) -> None:
    module, name = make(kind)
    constraint = constraint_of(module, name)
    opt = torch.optim.Adam(module.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w = getattr(module, name)
            loss = (w * torch.randn(w.shape, generator=g)).sum().square()
        loss.backward()
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert len(grads) > 0 and all(bool(torch.isfinite(gr).all()) for gr in grads)
        opt.step()
    w = getattr(module, name)
    assert w.dtype == torch.float32
    assert violation64(constraint, w) <= constraint.tolerance(w)


@pytest.mark.parametrize("kind", sorted(MODULES))
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_training_half_parameters_stays_within_the_half_tolerance(
    kind: str, dtype: torch.dtype
) -> None:
    module, name = make(kind)
    module.to(dtype)
    constraint = constraint_of(module, name)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        opt.zero_grad()
        w = getattr(module, name)
        (w.float() * torch.randn(w.shape, generator=g)).sum().square().backward()
        opt.step()
    w = getattr(module, name)
    assert w.dtype == dtype and bool(torch.isfinite(w).all())
    assert violation64(constraint, w) <= half_tolerance(constraint, w)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_half_round_trip_does_not_change_the_set(kind: str) -> None:
    module, name = make(kind)
    constraint = constraint_of(module, name)
    buffers = {key: b.clone() for key, b in constraint.named_buffers()}
    module.half()
    module.bfloat16()
    module.float()
    for key, b in constraint.named_buffers():
        assert b.dtype == buffers[key].dtype and torch.equal(b, buffers[key]), key
    w = getattr(module, name)
    assert w.dtype == torch.float32
    assert violation64(constraint, w) <= constraint.tolerance(w)


def test_assignment_after_conversion_to_half() -> None:
    module = sumto.simplex(nn.Linear(4, 3)).to(torch.bfloat16)
    value = torch.full((3, 4), 0.25, dtype=torch.bfloat16)
    module.weight = value
    assert module.parametrizations.weight.original.dtype == torch.bfloat16
    assert torch.equal(module.weight, value)
    module.double()
    value64 = torch.full((3, 4), 0.25, dtype=torch.float64)
    module.weight = value64
    assert torch.allclose(module.weight, value64, rtol=0, atol=4 * torch.finfo(torch.float64).eps)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(
    "fn",
    [
        lambda x: sumto.functional.project_sum(x, 1.5, dim=-1),
        lambda x: sumto.functional.project_simplex(x, 1.5, dim=(0, 1)),
        lambda x: sumto.functional.project_box_sum(x, 1.0, dim=-1, lower=-0.25, upper=0.5),
    ],
    ids=["project_sum", "project_simplex", "project_box_sum"],
)
def test_functional_maps_compute_half_inputs_in_float32(
    fn: Callable[[Tensor], Tensor], dtype: torch.dtype
) -> None:
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = fn(x)
    assert got.dtype == dtype
    assert torch.equal(got, fn(x.float()).to(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fn(x), got)
    assert math.isfinite(float(got.float().abs().sum()))
