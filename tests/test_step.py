"""sumto.step: project_on_step keeps plain parameters on their set after every optimizer step."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sumto
from reference import (
    as_rows,
    assert_on_set,
    assert_sums,
    ref_project_box_sum,
    ref_project_simplex,
)


def _constraints() -> list[tuple[str, sumto.Constraint]]:
    return [
        ("simplex", sumto.Simplex()),
        ("simplex_total_2_dim0", sumto.Simplex(total=2.0, dim=0)),
        ("affine", sumto.AffineSum(total=1.0)),
        ("box", sumto.BoxSum(total=1.0, lower=-0.2, upper=0.6)),
        ("linear", sumto.LinearEquality([[1.0] * 6, [1.0, -1.0, 0, 0, 0, 0]], [1.0, 0.0])),
    ]


CONSTRAINT_IDS = [name for name, _ in _constraints()]


def _constraint(name: str) -> sumto.Constraint:
    return dict(_constraints())[name]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=g)
    target = torch.randn(32, 4, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - target).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("name", CONSTRAINT_IDS)
def test_projects_immediately_and_after_every_step(name: str) -> None:
    torch.manual_seed(0)
    constraint = _constraint(name)
    lin = nn.Linear(6, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    sumto.project_on_step(opt, lin.weight, constraint)
    assert_on_set(constraint, lin.weight.detach())
    for seed in range(5):
        _train(lin, opt, steps=1, seed=seed)
        assert_on_set(constraint, lin.weight.detach())


@pytest.mark.parametrize("name", CONSTRAINT_IDS)
def test_constraint_holds_after_hundreds_of_adam_steps(name: str) -> None:
    torch.manual_seed(0)
    constraint = _constraint(name)
    lin = nn.Linear(6, 4)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    sumto.project_on_step(opt, lin.weight, constraint)
    _train(lin, opt, steps=300)
    assert_on_set(constraint, lin.weight.detach())
    assert type(lin.weight) is nn.Parameter
    assert sorted(lin.state_dict()) == ["bias", "weight"]


def test_step_equals_the_reference_projection_of_the_updated_value() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    sumto.project_on_step(opt, lin.weight, sumto.Simplex())
    x = torch.randn(16, 6)
    lin(x).square().sum().backward()
    expected = ref_project_simplex(lin.weight.detach() - lin.weight.grad, 1.0, (1,))
    opt.step()
    torch.testing.assert_close(lin.weight.detach().double(), expected, rtol=0, atol=1e-6)


def test_simplex_projection_after_a_step_produces_exact_zeros() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1 / 6)  # interior of the simplex: no zeros before the step
    opt = torch.optim.SGD(lin.parameters(), lr=5.0)
    sumto.project_on_step(opt, lin.weight, sumto.Simplex(method="softmax"))
    assert int((lin.weight == 0).sum()) == 0
    _train(lin, opt, steps=1)
    w = lin.weight.detach()
    assert int((w == 0).sum()) > 0
    assert bool((w >= 0).all())
    assert_sums(w, 1.0, (1,))


def test_remove_stops_projecting_and_is_idempotent() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    handle = sumto.project_on_step(opt, lin.weight, sumto.AffineSum(total=1.0))
    _train(lin, opt, steps=1)
    assert_sums(lin.weight.detach(), 1.0, (1,))
    handle.remove()
    handle.remove()
    _train(lin, opt, steps=1, seed=1)
    sums = lin.weight.detach().sum(1)
    assert float((sums - 1).abs().max()) > 1e-3
    assert "weight" not in sumto.check(lin)


def test_handle_is_a_context_manager() -> None:
    lin = nn.Linear(6, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    with sumto.project_on_step(opt, lin.weight, sumto.AffineSum()):
        _train(lin, opt, steps=1)
        assert_sums(lin.weight.detach(), 1.0, (1,))
    _train(lin, opt, steps=1, seed=1)
    assert float((lin.weight.detach().sum(1) - 1).abs().max()) > 1e-3


def test_parameter_stays_plain_and_checkpoints_are_plain() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4))
    weight = model[0].weight
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sumto.project_on_step(opt, weight, sumto.Simplex())
    _train(model, opt, steps=3)
    assert model[0].weight is weight and type(weight) is nn.Parameter
    state = model.state_dict()
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    fresh = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4))
    fresh.load_state_dict(state)
    assert torch.equal(fresh[0].weight, weight.detach())
    # Adam's state stays keyed on the same parameter object.
    assert weight in opt.state


@pytest.mark.parametrize("name", CONSTRAINT_IDS)
def test_attaching_after_loading_a_checkpoint_resumes_bit_identically(name: str) -> None:
    def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4))
        return model, torch.optim.Adam(model.parameters(), lr=0.05)

    reference, opt_ref = build(0)
    sumto.project_on_step(opt_ref, reference[0].weight, _constraint(name))
    _train(reference, opt_ref, steps=6)

    first, opt_first = build(0)
    sumto.project_on_step(opt_first, first[0].weight, _constraint(name))
    _train(first, opt_first, steps=3)
    model_state, opt_state = first.state_dict(), opt_first.state_dict()

    # resume in this order: load the model, then attach the projection, then the optimizer
    resumed, opt_resumed = build(1)
    resumed.load_state_dict(model_state)
    loaded = resumed[0].weight.detach().clone()
    sumto.project_on_step(opt_resumed, resumed[0].weight, _constraint(name))
    assert torch.equal(resumed[0].weight, loaded), "attaching moved the loaded weights"
    opt_resumed.load_state_dict(opt_state)
    _train(resumed, opt_resumed, steps=3)
    for (key, got), want in zip(
        resumed.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), key


def test_check_reports_managed_parameters_by_qualified_name() -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = sumto.project_on_step(opt, model[1].weight, sumto.AffineSum(total=2.0))
    report = sumto.check(model)
    assert list(report) == ["1.weight"]
    assert report["1.weight"] <= 1e-6
    with torch.no_grad():
        model[1].weight.add_(1.0)
    assert sumto.check(model)["1.weight"] == pytest.approx(4.0, rel=1e-5)
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
    assert math.isnan(sumto.check(model)["1.weight"])
    handle.remove()
    assert sumto.check(model) == {}


def test_several_constraints_and_param_groups() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    opt = torch.optim.SGD([{"params": [lin.bias]}, {"params": [lin.weight], "lr": 0.1}], lr=0.5)
    h1 = sumto.project_on_step(opt, lin.weight, sumto.Simplex())
    h2 = sumto.project_on_step(opt, lin.bias, sumto.AffineSum(total=3.0))
    _train(lin, opt, steps=5)
    assert_on_set(sumto.Simplex(), lin.weight.detach())
    assert_sums(lin.bias.detach(), 3.0, (0,))
    assert set(sumto.check(lin)) == {"weight", "bias"}
    h1.remove()
    h2.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_box_projection_matches_reference_in_every_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 3, 4, dtype=dtype))
    opt = torch.optim.SGD([p], lr=0.1)
    constraint = sumto.BoxSum(total=1.0, dim=(0, 2), lower=-0.3, upper=0.5)
    expected = ref_project_box_sum(p.detach(), 1.0, (0, 2), -0.3, 0.5)
    sumto.project_on_step(opt, p, constraint)
    err = float((p.detach().double() - expected).abs().max())
    assert err <= 8 * torch.finfo(dtype).eps * 4
    assert_on_set(constraint, p.detach())


@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    total=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_simplex_on_step_property(
    shape: list[int], total: float, seed: int, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(seed)
    p = nn.Parameter((torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype))
    opt = torch.optim.SGD([p], lr=1.0)
    constraint = sumto.Simplex(total=total)
    dims = constraint.dims(p.ndim)
    expected = ref_project_simplex(p.detach(), total, dims)
    sumto.project_on_step(opt, p, constraint)
    rows, _ = as_rows(p.detach(), dims)
    assert bool((rows >= 0).all())
    scale = max(1.0, total)
    assert (
        float((p.detach().double() - expected).abs().max()) <= 16 * torch.finfo(dtype).eps * scale
    )
    assert_sums(p.detach(), total, dims)


def test_bayar_through_project_on_step_stays_bounded() -> None:
    torch.manual_seed(0)
    k, lr, steps = 5, 1e-3, 200
    conv = nn.Conv2d(3, 8, k, bias=False)
    with torch.no_grad():
        conv.weight.normal_(0.0, 0.02)
    w_init = conv.weight.detach().clone()
    opt = torch.optim.Adam(conv.parameters(), lr=lr)
    constraint = sumto.LinearEquality.bayar(conv.kernel_size)
    sumto.project_on_step(opt, conv.weight, constraint)
    w0 = conv.weight.detach().clone()
    assert float(w0.abs().max()) <= max(1.0, 2 * float(w_init.abs().max()) + 1 / (k * k - 1))
    x = torch.randn(2, 3, 9, 9)
    target = torch.randn(2, 8, 5, 5)
    for _ in range(steps):
        opt.zero_grad()
        (conv(x) - target).square().mean().backward()
        opt.step()
    w = conv.weight.detach()
    assert torch.equal(w[:, :, k // 2, k // 2], torch.full((8, 3), -1.0))
    assert_on_set(constraint, w)
    # Each step moves an entry by at most ~3.2 lr (Adam) plus the same shift again.
    assert float((w - w0).abs().max()) <= 2 * 3.2 * lr * steps
    assert sorted(conv.state_dict()) == ["weight"]


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_param_not_in_optimizer_raises_value_error() -> None:
    a, b = nn.Linear(6, 4), nn.Linear(6, 4)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="expected param to be one of the optimizer's parameters"):
        sumto.project_on_step(opt, b.weight, sumto.Simplex())
    with pytest.raises(ValueError, match="expected param to be one of"):
        # Equal values are not enough: membership is by identity.
        sumto.project_on_step(opt, nn.Parameter(a.weight.detach().clone()), sumto.Simplex())


def test_wrong_types_raise_type_error() -> None:
    lin = nn.Linear(6, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="expected optimizer"):
        sumto.project_on_step(object(), lin.weight, sumto.Simplex())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected param"):
        sumto.project_on_step(opt, "weight", sumto.Simplex())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected constraint"):
        sumto.project_on_step(opt, lin.weight, torch.softmax)  # type: ignore[arg-type]


def test_constraint_that_does_not_fit_the_shape_raises() -> None:
    lin = nn.Linear(6, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="with 3 entries"):
        sumto.project_on_step(opt, lin.weight, sumto.LinearEquality([[1.0, 1.0, 1.0]], [1.0]))
    with pytest.raises(IndexError, match="expected dim in range"):
        sumto.project_on_step(opt, lin.weight, sumto.Simplex(dim=2))
    with pytest.raises(ValueError, match=r"expected n \* lower <= total <= n \* upper"):
        sumto.project_on_step(opt, lin.weight, sumto.BoxSum(total=10.0, upper=1.0))
    with pytest.raises(ValueError, match="odd square kernel"):
        sumto.LinearEquality.bayar((3, 5))
    # Nothing was registered by the failed calls.
    assert sumto.check(lin) == {}
    before = lin.weight.detach().clone()
    _train(lin, opt, steps=1)
    assert not torch.equal(lin.weight.detach(), before)


def test_uninitialised_parameter_raises() -> None:
    lazy = nn.LazyLinear(4)
    opt = torch.optim.SGD(lazy.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="expected an initialised parameter"):
        sumto.project_on_step(opt, lazy.weight, sumto.Simplex())
