"""sumto.register: the helpers sum_to / simplex / box_sum / constrain, assignment, bake, check."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import sumto
from reference import (
    SHARPEN,
    SHARPEN_DIAGONAL,
    assert_constraints_hold,
    assert_matches_reference,
    assert_sums,
    ref_project_box_sum,
    ref_project_simplex,
    ref_project_sum,
    save_and_load,
    tolerance,
)
from sumto import AffineSum, BoxSum, Simplex

METHODS = ["softmax", "sparsemax", "relu"]

Helper = Callable[..., nn.Module]
HELPERS: list[tuple[str, Helper]] = [
    ("sum_to", sumto.sum_to),
    ("softmax", lambda m, **kw: sumto.simplex(m, method="softmax", **kw)),
    ("sparsemax", lambda m, **kw: sumto.simplex(m, method="sparsemax", **kw)),
    ("relu", lambda m, **kw: sumto.simplex(m, method="relu", **kw)),
    ("box_sum", lambda m, **kw: sumto.box_sum(m, lower=-0.5, upper=0.75, **kw)),
]
HELPER_IDS = [name for name, _ in HELPERS]
HELPER_FNS = [fn for _, fn in HELPERS]


def seeded_linear(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def kernel(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows).reshape(1, 1, 3, 3)


# ---------------------------------------------------------------------------
# init="project"
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("helper", HELPER_FNS, ids=HELPER_IDS)
def test_helpers_return_the_module_and_constrain_its_weight(helper: Helper) -> None:
    lin = seeded_linear(5, 3)
    assert helper(lin) is lin
    assert parametrize.is_parametrized(lin, "weight")
    assert not parametrize.is_parametrized(lin, "bias")
    assert_sums(lin.weight.detach(), 1.0, (1,))
    assert_constraints_hold(lin)


@pytest.mark.parametrize(
    ("helper", "reference"),
    [
        (sumto.sum_to, lambda w: ref_project_sum(w, 1.0, (1,))),
        (
            lambda m: sumto.simplex(m, method="sparsemax"),
            lambda w: ref_project_simplex(w, 1.0, (1,)),
        ),
        (
            lambda m: sumto.box_sum(m, lower=-0.1, upper=0.4),
            lambda w: ref_project_box_sum(w, 1.0, (1,), -0.1, 0.4),
        ),
    ],
    ids=["sum_to", "sparsemax", "box_sum"],
)
def test_init_project_projects_a_value_off_the_set(helper: Helper, reference: Callable) -> None:
    lin = seeded_linear(6, 4, seed=1)
    before = lin.weight.detach().clone()
    helper(lin)
    expected = reference(before.double())
    tol = tolerance(before, 1.0, (1,), k=16)
    assert float((lin.weight.detach().double() - expected).abs().max()) <= tol


@pytest.mark.parametrize("method", METHODS)
def test_simplex_init_project_matches_the_euclidean_projection(method: str) -> None:
    lin = seeded_linear(6, 4, seed=2)
    expected = ref_project_simplex(lin.weight.detach().double(), 1.0, (1,))
    sumto.simplex(lin, method=method)
    # softmax cannot reach 0: zeros become eps; relu pulls entries by at most eps * c.
    allowed = {"softmax": 1e-5, "sparsemax": 1e-6, "relu": 2 * sumto.constraints.RELU_EPS}
    assert float((lin.weight.detach().double() - expected).abs().max()) <= allowed[method]


@pytest.mark.parametrize("helper", HELPER_FNS, ids=HELPER_IDS)
def test_init_project_keeps_a_value_already_on_the_set(helper: Helper) -> None:
    lin = nn.Linear(4, 3)
    value = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.5, 0.0], [0.125, 0.375, 0.0, 0.5]])
    with torch.no_grad():
        lin.weight.copy_(value)
    helper(lin)
    if isinstance(lin.parametrizations.weight[0], (AffineSum, BoxSum)):
        assert torch.equal(lin.weight, value)
    else:
        # Simplex maps re-create the value from pre-weights: equal up to rounding,
        # except softmax zeros (eps) and relu's documented eps pull.
        assert float((lin.weight.detach() - value).abs().max()) <= 2 * sumto.constraints.RELU_EPS


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "make", [lambda: nn.Linear(16, 8), lambda: nn.Linear(300, 2), lambda: nn.Conv2d(3, 4, 3)]
)
def test_softmax_pre_weights_are_finite_and_alive_on_default_init(
    make: Callable[[], nn.Module], seed: int
) -> None:
    torch.manual_seed(seed)
    module = sumto.simplex(make())
    pre = module.parametrizations.weight.original.detach()
    assert bool(torch.isfinite(pre).all())
    assert float(pre.min()) > -20.0
    assert_constraints_hold(module)


# ---------------------------------------------------------------------------
# init=<tensor> and assignment
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [SHARPEN, SHARPEN_DIAGONAL], ids=["sharpen", "diagonal"])
def test_both_kernels_are_assignable_and_read_back_exactly(rows: list[list[float]]) -> None:
    k = kernel(rows)
    conv = sumto.sum_to(nn.Conv2d(1, 1, 3, bias=False), init=k)
    assert torch.equal(conv.weight, k)
    assert float(sumto.check(conv)["weight"]) == 0.0
    other = kernel(SHARPEN_DIAGONAL if rows is SHARPEN else SHARPEN)
    conv.weight = other
    assert torch.equal(conv.weight, other)
    conv.weight = k.double()  # another dtype: stored in the weight's dtype, exactly
    assert torch.equal(conv.weight, k) and conv.weight.dtype == torch.float32
    # Both kernels at once, one sum per filter.
    both = torch.cat([kernel(SHARPEN), kernel(SHARPEN_DIAGONAL)])
    conv2 = sumto.sum_to(nn.Conv2d(1, 2, 3), init=both)
    assert torch.equal(conv2.weight, both)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(conv2(x), nn.functional.conv2d(x, both, conv2.bias))


@pytest.mark.parametrize("helper", HELPER_FNS, ids=HELPER_IDS)
def test_init_tensor_sets_that_value(helper: Helper) -> None:
    value = torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.75, 0.25]])
    lin = helper(nn.Linear(3, 2), init=value)
    assert float((lin.weight.detach() - value).abs().max()) <= 2 * sumto.constraints.RELU_EPS
    lin.weight = value.flip(1)
    assert (
        float((lin.weight.detach() - value.flip(1)).abs().max()) <= 2 * sumto.constraints.RELU_EPS
    )


@pytest.mark.parametrize(
    ("helper", "bad", "amount"),
    [
        (sumto.sum_to, [[1.0, 1.0, 1.0]], "2"),
        (sumto.simplex, [[1.5, -0.5, 0.0]], "0.5"),
        (lambda m, **kw: sumto.box_sum(m, lower=0.0, upper=0.6, **kw), [[0.7, 0.3, 0.0]], "0.1"),
    ],
    ids=["sum_to", "simplex", "box_sum"],
)
def test_values_off_the_set_raise_and_say_by_how_much(
    helper: Helper, bad: list, amount: str
) -> None:
    with pytest.raises(
        ValueError, match=rf"expected init to satisfy .*got a violation of {amount}\b"
    ):
        helper(nn.Linear(3, 1), init=torch.tensor(bad))
    lin = helper(nn.Linear(3, 1))
    before = lin.weight.detach().clone()
    with pytest.raises(
        ValueError, match=rf"expected value to satisfy .*got a violation of {amount}\b"
    ):
        lin.weight = torch.tensor(bad)
    assert torch.equal(lin.weight, before), "a rejected assignment leaves the weight unchanged"


@pytest.mark.parametrize("helper", HELPER_FNS, ids=HELPER_IDS)
def test_wrong_shape_raises_value_error(helper: Helper) -> None:
    with pytest.raises(ValueError, match=r"expected init of shape \(2, 3\), got shape \(3, 2\)"):
        helper(nn.Linear(3, 2), init=torch.full((3, 2), 0.5))
    lin = helper(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"expected value of shape \(2, 3\), got shape \(2, 2\)"):
        lin.weight = torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="expected a finite value"):
        lin.weight = torch.full((2, 3), math.inf)


def test_assignment_within_rounding_is_accepted_and_read_back_within_rounding() -> None:
    lin = sumto.sum_to(nn.Linear(10, 1))
    value = torch.full((1, 10), 0.1)  # the float32 sum of ten 0.1 is 1 + 1.2e-7
    lin.weight = value
    # Accepted (a rounding error, not a violation); the map then makes the sum exact
    # as far as float32 allows, moving each entry by about eps.
    assert float((lin.weight.detach() - value).abs().max()) <= 2 * torch.finfo(torch.float32).eps
    assert_constraints_hold(lin)


# ---------------------------------------------------------------------------
# registration errors
# ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_registration_errors() -> None:
    with pytest.raises(KeyError, match="expected name to be a parameter or buffer of Linear"):
        sumto.sum_to(nn.Linear(3, 2), "wieght")
    with pytest.raises(KeyError, match="got 'training'"):
        sumto.simplex(nn.Linear(3, 2), "training")
    with pytest.raises(TypeError, match=r"expected module to be an nn\.Module, got Tensor"):
        sumto.sum_to(torch.zeros(3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected name to be a str, got int"):
        sumto.sum_to(nn.Linear(3, 2), 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected constraint to be a sumto\.Constraint"):
        sumto.constrain(nn.Linear(3, 2), "weight", nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(IndexError, match="expected dim in range"):
        sumto.sum_to(nn.Linear(3, 2), dim=2)
    with pytest.raises(ValueError, match="expected distinct dims"):
        sumto.sum_to(nn.Conv2d(1, 1, 3), dim=(1, -3))
    with pytest.raises(ValueError, match="expected init to be 'project', 'sample' or a tensor"):
        sumto.sum_to(nn.Linear(3, 2), init="zeros")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keepdim-reduced shape"):
        sumto.sum_to(nn.Linear(3, 2), total=torch.ones(3))
    with pytest.raises(ValueError, match=r"n \* lower <= total <= n \* upper"):
        sumto.box_sum(nn.Linear(3, 2), lower=0.5)  # 3 * 0.5 > 1
    with pytest.raises(ValueError, match=r"n \* lower <= total <= n \* upper"):
        sumto.box_sum(nn.Linear(3, 2), upper=0.3)  # 3 * 0.3 < 1
    with pytest.raises(ValueError, match="expected at least one element"):
        sumto.sum_to(nn.Linear(0, 2))
    module = nn.Module()
    module.register_buffer("counts", torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating point"):
        sumto.sum_to(module, "counts")
    lazy = nn.LazyLinear(2)
    with pytest.raises(ValueError, match="expected an initialised tensor"):
        sumto.sum_to(lazy)


@pytest.mark.parametrize("helper", HELPER_FNS, ids=HELPER_IDS)
def test_registering_twice_raises_value_error(helper: Helper) -> None:
    lin = helper(nn.Linear(3, 2))
    with pytest.raises(
        ValueError, match=r"expected ParametrizedLinear\.weight to have no parametrization yet"
    ):
        sumto.sum_to(lin)
    with pytest.raises(ValueError, match="no parametrization yet"):
        sumto.simplex(lin)


def test_buffers_and_other_names_can_be_constrained() -> None:
    module = nn.Module()
    module.register_buffer("mix", torch.tensor([3.0, -1.0, 0.0]))
    sumto.simplex(module, "mix", method="sparsemax", total=2.0)
    assert torch.equal(module.mix, torch.tensor([2.0, 0.0, 0.0]))
    lin = sumto.sum_to(nn.Linear(3, 4), "bias", total=0.0)
    assert_sums(lin.bias.detach(), 0.0, (0,))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_zero_size_batch_registers() -> None:
    lin = sumto.sum_to(nn.Linear(3, 0))
    assert lin.weight.shape == (0, 3)
    assert sumto.check(lin) == {"weight": 0.0}


# ---------------------------------------------------------------------------
# optimizer identity
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("helper", HELPER_FNS, ids=HELPER_IDS)
def test_parameter_identity_is_kept_for_an_existing_optimizer(helper: Helper) -> None:
    lin = seeded_linear(4, 3)
    weight = lin.weight
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    helper(lin)
    assert lin.parametrizations.weight.original is weight
    before = lin.weight.detach().clone()
    target = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(lin(x), target).backward()
        opt.step()
    assert not torch.equal(lin.weight, before), "the optimizer no longer updates the weight"
    assert_constraints_hold(lin)


# ---------------------------------------------------------------------------
# bake and check
# ---------------------------------------------------------------------------


class _Double(nn.Module):
    """A non-sumto parametrization, which bake must leave alone."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * x


def test_bake_leaves_plain_parameters_with_the_constrained_values() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        sumto.simplex(nn.Linear(4, 3), method="sparsemax"),
        nn.ReLU(),
        sumto.sum_to(nn.Conv1d(3, 2, 3), total=torch.tensor([1.0, -2.0])),
        sumto.box_sum(nn.Linear(2, 2), lower=0.0, upper=1.0),
    )
    parametrize.register_parametrization(model[3], "bias", _Double())
    # bake evaluates the maps under no_grad, as does any read for export or inference.
    with torch.no_grad():
        values = {n: model.get_submodule(n).weight.clone() for n in ("0", "2", "3")}
    with_grad = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2", "3")}
    originals = {
        n: model.get_submodule(n).parametrizations.weight.original for n in ("0", "2", "3")
    }
    bias = model[3].bias.detach().clone()
    assert sumto.bake(model) is model
    for n in ("0", "2", "3"):
        sub = model.get_submodule(n)
        assert not parametrize.is_parametrized(sub, "weight")
        assert type(sub.weight) is nn.Parameter and sub.weight is originals[n]
        assert torch.equal(sub.weight, values[n])
        assert float((sub.weight.detach() - with_grad[n]).abs().max()) <= 4 * torch.finfo().eps
    assert parametrize.is_parametrized(model[3], "bias")
    assert torch.equal(model[3].bias, bias)
    assert set(model.state_dict()) == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "3.weight",
        "3.parametrizations.bias.original",
    }
    assert sumto.check(model) == {}
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Conv1d(3, 2, 3), nn.Linear(2, 2))
    state = model.state_dict()
    state["3.bias"] = state.pop("3.parametrizations.bias.original") * 2
    plain.load_state_dict(state)
    assert torch.equal(plain[2].weight, values["2"])


def test_check_reports_every_constrained_tensor_by_qualified_name() -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(sumto.sum_to(nn.Linear(3, 2)), nn.Tanh())
    model = nn.Sequential(inner, sumto.simplex(nn.Linear(2, 2), method="relu"), nn.Linear(2, 1))
    sumto.box_sum(model[1], "bias", total=0.0, lower=-1.0, upper=1.0)
    report = sumto.check(model)
    assert sorted(report) == ["0.0.weight", "1.bias", "1.weight"]
    assert all(type(v) is float and 0.0 <= v <= 1e-6 for v in report.values())
    assert sumto.check(nn.Linear(2, 2)) == {}
    assert sumto.check(model[1]) == {"bias": report["1.bias"], "weight": report["1.weight"]}


def test_check_reports_non_finite_tensors_as_nan_or_inf() -> None:
    lin = sumto.sum_to(nn.Linear(3, 2))
    with torch.no_grad():
        lin.parametrizations.weight.original[0, 0] = math.nan
    assert math.isnan(sumto.check(lin)["weight"])
    with torch.no_grad():
        lin.parametrizations.weight.original[0, 0] = math.inf  # inf - inf inside the map
    assert math.isnan(sumto.check(lin)["weight"])
    scaled = sumto.constrain(nn.Linear(3, 1), "weight", _Diverging(), init=torch.ones(1, 3) / 4)
    with torch.no_grad():
        scaled.parametrizations.weight.original.fill_(torch.finfo(torch.float32).max)
    assert sumto.check(scaled) == {"weight": math.inf}


class _Diverging(AffineSum):
    """A constraint whose map overflows to inf (no nan): stands in for a diverged run."""

    def __init__(self) -> None:
        super().__init__(total=0.75)

    def forward(self, x: Tensor) -> Tensor:
        return 4.0 * x


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("helper", HELPER_FNS, ids=HELPER_IDS)
def test_state_dict_round_trip(helper: Helper) -> None:
    src = helper(seeded_linear(4, 3, seed=3), total=torch.tensor([1.0, 2.0, 0.5]))
    dst = helper(seeded_linear(4, 3, seed=4), total=torch.tensor([1.0, 2.0, 0.5]))
    keys = set(src.state_dict())
    assert "parametrizations.weight.original" in keys and "weight" not in keys
    dst.load_state_dict(save_and_load(src.state_dict()))
    assert torch.equal(dst.weight, src.weight)
    assert torch.equal(dst.bias, src.bias)


@pytest.mark.parametrize("helper", HELPER_FNS, ids=HELPER_IDS)
def test_plain_checkpoint_loads_into_a_constrained_model(helper: Helper) -> None:
    plain = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    value = torch.tensor([[0.25, 0.5, 0.25], [0.75, 0.0, 0.25]])
    with torch.no_grad():
        plain[1].weight.copy_(value)
    model = nn.Sequential(nn.Linear(3, 3), helper(nn.Linear(3, 2)))
    model.load_state_dict(save_and_load(plain.state_dict()))  # strict: no missing/unexpected keys
    assert float((model[1].weight.detach() - value).abs().max()) <= 2 * sumto.constraints.RELU_EPS
    assert torch.equal(model[0].weight, plain[0].weight)
    # A top-level constrained module reads a plain checkpoint too.
    lin = helper(nn.Linear(3, 2))
    lin.load_state_dict(plain[1].state_dict())
    assert float((lin.weight.detach() - value).abs().max()) <= 2 * sumto.constraints.RELU_EPS
    assert_constraints_hold(model)


def test_plain_checkpoint_off_the_set_raises_value_error() -> None:
    plain = nn.Linear(3, 2)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]]))
    model = sumto.sum_to(nn.Linear(3, 2))
    before = model.weight.detach().clone()
    with pytest.raises(
        ValueError, match=r"expected checkpoint entry 'weight' to satisfy .*violation of 0\.5"
    ):
        model.load_state_dict(plain.state_dict())
    assert torch.equal(model.weight, before)
    with pytest.raises(ValueError, match=r"expected checkpoint entry '1\.weight'"):
        nn.Sequential(nn.Identity(), sumto.simplex(nn.Linear(3, 2))).load_state_dict(
            {"1.weight": torch.full((2, 3), 0.5), "1.bias": torch.zeros(2)}
        )


def test_plain_checkpoint_uses_the_model_tensor_total() -> None:
    plain = nn.Linear(2, 2)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([[1.0, 2.0], [0.5, -0.5]]))
    model = sumto.sum_to(nn.Linear(2, 2), total=torch.tensor([3.0, 0.0]))
    model.load_state_dict(plain.state_dict())
    assert torch.equal(model.weight, plain.weight)


@pytest.mark.parametrize(
    ("make_saved", "make_loaded"),
    [
        (lambda m: sumto.simplex(m), lambda m: sumto.simplex(m, method="sparsemax")),
        (lambda m: sumto.simplex(m), lambda m: sumto.simplex(m, temperature=2.0)),
        (lambda m: sumto.sum_to(m, total=1.0), lambda m: sumto.sum_to(m, total=2.0)),
        (lambda m: sumto.sum_to(m), lambda m: sumto.box_sum(m)),
        (lambda m: sumto.box_sum(m, lower=0.0), lambda m: sumto.box_sum(m, lower=-1.0)),
        (lambda m: sumto.sum_to(m, dim=1), lambda m: sumto.sum_to(m, dim=0)),
        (lambda m: sumto.sum_to(m, total=torch.ones(3)), lambda m: sumto.sum_to(m)),
    ],
)
def test_loading_a_checkpoint_of_another_constraint_raises_value_error(
    make_saved: Helper, make_loaded: Helper
) -> None:
    saved = make_saved(nn.Linear(3, 3)).state_dict()
    model = make_loaded(nn.Linear(3, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(ValueError, match="expected a checkpoint saved with"):
            model.load_state_dict(saved, strict=strict)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "a refused load copied"


def test_configuration_is_saved_in_the_state_dict_metadata_readable_with_weights_only() -> None:
    lin = sumto.simplex(nn.Linear(3, 2), method="relu", total=2.0)
    state = save_and_load(lin.state_dict())
    assert all(isinstance(v, Tensor) for v in state.values())  # no entry but tensors
    assert state._metadata[""]["sumto.constraints"] == {
        "parametrizations.weight.0": {
            "format": "sumto.constraint/1",
            "class": "Simplex",
            "config": {"dim": None, "total": 2.0, "method": "relu", "temperature": 1.0},
        }
    }
    nested = nn.Sequential(nn.Identity(), nn.Sequential(lin)).state_dict()
    assert "parametrizations.weight.0" in nested._metadata["1.0"]["sumto.constraints"]
    state._metadata[""]["sumto.constraints"]["parametrizations.weight.0"] = {"format": "other"}
    with pytest.raises(ValueError, match="expected sumto constraint state"):
        lin.load_state_dict(state)


def test_constrained_values_are_exact_after_register_and_readback_for_simplex_exact_values() -> (
    None
):
    value = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    lin = sumto.simplex(nn.Linear(3, 2), method="sparsemax", init=value)
    assert torch.equal(lin.weight, value)
    lin = sumto.simplex(nn.Linear(3, 2), init=value)
    assert bool((lin.weight > 0).all())  # softmax: zeros are eps, never exactly 0
    assert float((lin.weight.detach() - value).abs().max()) <= 4 * torch.finfo(torch.float32).eps
    assert_constraints_hold(lin)
    assert isinstance(lin.parametrizations.weight[0], Simplex)


# ---------------------------------------------------------------------------
# argument checks, shared constraints and tied weights
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AffineSum(total=10**400), "expected a finite total, got an int of 401 digits"),
        (lambda: Simplex(total=-(10**400)), "expected a finite total, got an int of 401 digits"),
        (lambda: Simplex(temperature=10**400), "expected a finite temperature, got an int"),
        (lambda: BoxSum(lower=-(10**400)), "expected a finite lower, got an int"),
        (lambda: BoxSum(upper=10**309), "expected a finite upper, got an int of 310 digits"),
        (lambda: sumto.sum_to(nn.Linear(3, 2), total=10**400), "expected a finite total"),
    ],
)
def test_ints_beyond_the_float_range_raise_value_error(
    build: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_tolerance_of_a_non_float_tensor_raises_type_error_naming_the_argument() -> None:
    for constraint in (AffineSum(), Simplex(), BoxSum(), sumto.LinearEquality([[1.0]], [1.0])):
        with pytest.raises(TypeError, match="expected x to be a floating point tensor, got dtype"):
            constraint.tolerance(torch.ones(3, 1, dtype=torch.int64))


def test_a_constraint_object_registered_twice_is_refused() -> None:
    constraint = AffineSum(total=2.0)
    first = sumto.constrain(nn.Linear(4, 3), "weight", constraint)
    message = r"expected a constraint object that constrains no other tensor, got one already"
    with pytest.raises(ValueError, match=message + r" registered on ParametrizedLinear\.weight"):
        sumto.constrain(nn.Linear(4, 3), "weight", constraint)
    with pytest.raises(ValueError, match=message):
        sumto.constrain(first, "bias", constraint)
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=message):
        sumto.project_on_step(torch.optim.SGD(lin.parameters(), lr=0.1), lin.weight, constraint)
    assert torch.allclose(first.weight.sum(1), torch.full((3,), 2.0))  # left as it was
    # what the message suggests works, and so does reuse once the first owner is baked
    sumto.constrain(nn.Linear(4, 3), "weight", copy.deepcopy(constraint))
    sumto.bake(first)
    sumto.constrain(nn.Linear(4, 3), "weight", constraint)


def test_a_deep_copy_of_a_constrained_module_owns_its_constraints() -> None:
    source = sumto.simplex(nn.Linear(4, 3))
    clone = copy.deepcopy(source)
    with pytest.raises(ValueError, match=r"already registered on ParametrizedLinear\.weight"):
        sumto.constrain(nn.Linear(4, 3), "weight", clone.parametrizations.weight[0])


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight  # tied

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(x)))


@pytest.mark.parametrize("helper", HELPER_FNS, ids=HELPER_IDS)
def test_constraining_one_of_two_tied_weights_is_refused(helper: Helper) -> None:
    torch.manual_seed(0)
    model = _Tied()
    before = model.enc.weight.detach().clone()
    with pytest.raises(
        ValueError,
        match=r"expected Linear\.weight to be held by this module alone, got a tensor also "
        r"held as 'weight' of another Linear \(tied weights.*transfer_parametrizations_and_params",
    ):
        helper(model.enc)
    assert not parametrize.is_parametrized(model.enc)
    assert model.dec.weight is model.enc.weight and torch.equal(model.enc.weight, before)
    module = nn.Module()
    module.a = nn.Parameter(torch.ones(2, 3))
    module.b = module.a
    with pytest.raises(ValueError, match="also held as 'b' of the same module"):
        helper(module, name="a")


def test_tying_a_constrained_weight_with_the_suggested_recipe_keeps_both_constrained() -> None:
    torch.manual_seed(0)
    model = _Tied()
    model.dec.weight = nn.Parameter(model.enc.weight.detach().clone())  # untie
    sumto.simplex(model.enc)
    parametrize.transfer_parametrizations_and_params(model.enc, model.dec, "weight")
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert torch.equal(model.dec.weight, model.enc.weight)
    assert model.dec.parametrizations.weight.original is model.enc.parametrizations.weight.original
    assert_constraints_hold(model)


# ---------------------------------------------------------------------------
# init="sample" and sampled values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("helper", HELPER_FNS, ids=HELPER_IDS)
def test_init_sample_registers_a_random_point_drawn_from_the_global_generator(
    helper: Helper,
) -> None:
    projected = helper(seeded_linear(5, 3))
    lin = seeded_linear(5, 3)
    torch.manual_seed(1)
    assert helper(lin, init="sample") is lin
    c = lin.parametrizations.weight[0]
    torch.manual_seed(1)
    expected = c.sample()  # the same draw: shape, dtype and device of the weight
    assert torch.equal(lin.parametrizations.weight.original, c.right_inverse(expected))
    assert_matches_reference(lin.weight.detach(), expected, expected, 1.0, (1,), k=64.0)
    assert_constraints_hold(lin)
    assert c.contains(lin.weight.detach())
    assert not torch.equal(lin.weight, projected.weight)  # the old value is not used
    # another seed, another point
    torch.manual_seed(2)
    assert not torch.equal(helper(seeded_linear(5, 3), init="sample").weight, lin.weight)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("helper", HELPER_FNS, ids=HELPER_IDS)
def test_init_sample_with_tensor_totals_dims_and_dtypes(helper: Helper, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    totals = torch.tensor([1.0, 2.0, 0.5, 3.0]).view(4, 1, 1, 1)
    conv = helper(nn.Conv2d(2, 4, 3).to(dtype), total=totals, init="sample")
    original = conv.parametrizations.weight.original
    assert original.dtype == dtype and original.shape == (4, 2, 3, 3)
    assert_constraints_hold(conv)
    lin = helper(nn.Linear(3, 6).to(dtype), dim=0, total=2.0, init="sample")
    assert_sums(lin.weight.detach(), 2.0, (0,))
    assert_constraints_hold(lin)


def test_init_sample_also_for_constrain_and_buffers() -> None:
    module = nn.Module()
    module.register_buffer("mix", torch.zeros(2, 3, 4))
    torch.manual_seed(0)
    sumto.constrain(module, "mix", sumto.Simplex(dim=(0, 2)), init="sample")
    mix = module.mix
    assert_sums(mix, 1.0, (0, 2))
    assert bool((mix > 0).all())


def test_init_sample_on_the_meta_device_sets_nothing() -> None:
    with torch.device("meta"):
        lin = sumto.simplex(nn.Linear(4, 3), init="sample")
    assert lin.weight.is_meta
    lin.to_empty(device="cpu")
    assert lin.parametrizations.weight[0].sample().device.type == "cpu"  # follows the weight
    plain = {"weight": torch.full((3, 4), 0.25), "bias": torch.zeros(3)}
    lin.load_state_dict(plain)
    assert_constraints_hold(lin)


@pytest.mark.parametrize("helper", HELPER_FNS, ids=HELPER_IDS)
def test_sampled_values_round_trip_through_assignment_and_state_dict_loads(
    helper: Helper,
) -> None:
    lin = helper(nn.Linear(5, 3))
    c = lin.parametrizations.weight[0]
    for seed in range(3):
        value = c.sample(generator=torch.Generator().manual_seed(seed))
        lin.weight = value  # accepted: checked like any assignment
        assert c.contains(lin.weight.detach())
        assert_matches_reference(lin.weight.detach(), value, value, 1.0, (1,), k=64.0)
        # a plain checkpoint holding a sampled value loads into a constrained model
        fresh = helper(nn.Linear(5, 3))
        fresh.load_state_dict(save_and_load({"weight": value, "bias": torch.zeros(3)}))
        assert_matches_reference(fresh.weight.detach(), value, value, 1.0, (1,), k=64.0)
        # and the constrained checkpoint of a sampled init loads exactly
        other = helper(nn.Linear(5, 3))
        other.load_state_dict(save_and_load(lin.state_dict()))
        assert torch.equal(other.weight, lin.weight)
        assert_constraints_hold(other)
