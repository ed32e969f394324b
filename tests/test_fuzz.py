"""Integration, hostile input: every public function and constructor, fuzzed with hypothesis.

The contract checked for each call: it either works, or raises ValueError,
IndexError, TypeError or KeyError whose message names one of the call's
arguments; never another exception type; and a call that works on finite input
returns no NaN (an overflowing projection may return +-inf, never NaN).

Inputs: random shapes (including 0-d and empty), dims (out of range, repeated,
empty, wrong types), totals (0, negative, inf, NaN, huge, tensors of wrong shapes
or dtypes), bounds (infeasible, lower > upper, NaN), integer, bool and half tensors,
NaN/Inf values, huge finite values, and plain junk (None, strings, lists).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from torch import Tensor, nn

import sumto
from sumto import functional as F

ALLOWED = (ValueError, IndexError, TypeError, KeyError)
INF, NAN = math.inf, math.nan
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPES = [*FLOAT_DTYPES, torch.int64, torch.int32, torch.uint8, torch.bool]
JUNK = [None, "1.0", "weight", [1.0, 2.0], (), b"x", {"a": 1}, 1j, object()]
SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 3.0, -2.5, 1e-45, 1e-300, 1e30, -1e30]
SPECIAL_FLOATS += [3e38, -3e38, 1.7e308, INF, -INF, NAN]


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------


def mostly(
    valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Valid values three times as often as hostile ones, so that calls with several
    arguments often work and reach the output checks."""
    # (one_of(valid, valid, valid, hostile) would not do: it drops repeated branches.)
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else hostile)


@st.composite
def tensors(draw: st.DrawFn, max_ndim: int = 3, dtypes: list[torch.dtype] = DTYPES) -> Tensor:
    """A tensor of random shape (0-d and empty included), dtype and values."""
    ndim = draw(mostly(st.integers(1, max(max_ndim, 1)), st.just(0)))
    sizes = mostly(st.integers(1, 4), st.just(0))
    shape = tuple(draw(st.lists(sizes, min_size=ndim, max_size=ndim)))
    dtype = draw(
        mostly(
            st.sampled_from([d for d in dtypes if d.is_floating_point] or dtypes),
            st.sampled_from(dtypes),
        )
    )
    values = draw(mostly(st.just("normal"), st.sampled_from(["huge", "tiny", "special", "zeros"])))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    if values == "huge":
        base = base * draw(st.sampled_from([1e4, 1e30, 1e38, 1e300]))
    elif values == "tiny":
        base = base * 1e-40
    elif values == "zeros":
        base = torch.zeros(shape, dtype=torch.float64)
    elif values == "special" and base.numel() > 0:
        flat = base.reshape(-1)
        flat[torch.randint(0, flat.numel(), (2,), generator=g)] = draw(
            st.sampled_from([INF, -INF, NAN])
        )
    if dtype == torch.bool:
        return base > 0
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return base.nan_to_num(0.0).clamp(info.min, info.max).round().to(dtype)
    big = torch.finfo(dtype).max
    finite = base.isfinite()
    return torch.where(finite, base.clamp(-big, big), base).to(dtype)


def float_tensors(max_ndim: int = 3) -> st.SearchStrategy[Tensor]:
    return tensors(max_ndim=max_ndim, dtypes=FLOAT_DTYPES)


junk = st.sampled_from(JUNK)
scalars = st.one_of(
    st.sampled_from(SPECIAL_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.booleans(),
)
totals = mostly(
    st.sampled_from([1.0, 2.0, 0.5, 3, -1.0]),
    st.one_of(scalars, tensors(max_ndim=2), junk),
)
dims = mostly(
    st.one_of(st.integers(-2, 1), st.just((0, 1)), st.just((-1,))),
    st.one_of(
        st.integers(-5, 5),
        st.lists(st.integers(-5, 5), min_size=0, max_size=3),
        st.sampled_from([(), (0, 0), (-1, 1), ((0,),), 1.0, "0", True, None]),
    ),
)
lowers = mostly(
    st.sampled_from([-1.0, -0.5, 0.0, -INF, -3]),
    st.one_of(st.sampled_from(SPECIAL_FLOATS), st.booleans(), junk),
)
uppers = mostly(
    st.sampled_from([1.0, 2.0, 0.75, INF, 4]),
    st.one_of(st.sampled_from(SPECIAL_FLOATS), st.booleans(), junk),
)
methods = mostly(
    st.sampled_from(["softmax", "sparsemax", "relu"]), st.sampled_from(["", "SoftMax", None, 1])
)
temperatures = mostly(
    st.sampled_from([1.0, 0.5, 2.0, 3]),
    st.one_of(st.sampled_from([1e-30, 1e30, 0.0, -1.0, INF, NAN, True]), junk),
)


# ---------------------------------------------------------------------------
# the contract
# ---------------------------------------------------------------------------


def is_finite(value: Any) -> bool:
    """Whether an argument is free of NaN/Inf (tensors, floats, nested sequences)."""
    if isinstance(value, Tensor):
        return not value.dtype.is_floating_point or bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(is_finite(v) for v in value)
    if isinstance(value, Mapping):
        return all(is_finite(v) for v in value.values())
    return True


def names_an_argument(message: str, names: set[str]) -> bool:
    """Whether ``message`` contains one of ``names``, its plural or singular ("dims" for
    dim, "input" for inputs), as a word of its own."""
    forms = {form for n in names for form in (n, n.removesuffix("s"))}
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(f)}s?(?![A-Za-z_])", message) for f in forms)


def note_outcome(label: str) -> None:
    """Count outcomes per function (shown by ``pytest --hypothesis-show-statistics``)."""
    if currently_in_test_context():
        event(label)


def attempt(fn: Callable[..., Any], /, *args: Any, expect: set[str], **kwargs: Any) -> Any:
    """Call ``fn``: return its result, or None after an allowed, well-worded exception."""
    label = getattr(fn, "__qualname__", type(fn).__name__)
    try:
        result = fn(*args, **kwargs)
    except ALLOWED as err:
        note_outcome(f"{label}: {type(err).__name__}")
        message = str(err)
        assert names_an_argument(message, expect), (
            f"{type(err).__name__} from {getattr(fn, '__qualname__', fn)} names none of "
            f"{sorted(expect)}: {message}"
        )
        return None
    except Exception as err:
        raise AssertionError(
            f"{getattr(fn, '__qualname__', fn)} raised {type(err).__name__} "
            f"(expected one of {[e.__name__ for e in ALLOWED]}): {err}"
        ) from err
    note_outcome(f"{label}: works")
    return result


def assert_no_nan(result: Any, inputs_finite: bool, what: str) -> None:
    if not inputs_finite or not isinstance(result, Tensor) or not result.dtype.is_floating_point:
        return
    assert not bool(torch.isnan(result).any()), f"{what} returned NaN from finite input"


# ---------------------------------------------------------------------------
# functional maps
# ---------------------------------------------------------------------------

FUNCTIONAL = ["project_sum", "project_simplex", "project_box_sum", "sum_violation"]


@st.composite
def fitting_dims(draw: st.DrawFn, ndim: int) -> Any:
    """Mostly dims that are valid for ``ndim`` dims (an int or a tuple), else hostile ones."""
    rank = max(ndim, 1)
    valid = st.one_of(
        st.integers(-rank, rank - 1),
        st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True).map(tuple),
    )
    return draw(mostly(valid, dims))


@st.composite
def fitting_totals(draw: st.DrawFn, x: Any, dim: Any) -> Any:
    """Mostly totals that fit ``x`` and ``dim`` (floats, or one tensor entry per slice)."""
    valid: st.SearchStrategy[Any] = st.sampled_from([1.0, 2.0, 0.5, 3])
    try:
        slice_dims = sumto.Constraint(dim).dims(x.ndim)  # the public normalisation of dim
        keep = tuple(1 if i in slice_dims else s for i, s in enumerate(x.shape))
        per_slice = st.integers(0, 2**31 - 1).map(
            lambda seed: torch.rand(keep, generator=torch.Generator().manual_seed(seed)) + 0.5
        )
        valid = st.one_of(valid, per_slice)
    except Exception:  # x or dim is hostile: any total will do
        pass
    return draw(mostly(valid, totals))


@pytest.mark.parametrize("name", FUNCTIONAL)
@given(x=mostly(tensors(), junk), lower=lowers, upper=uppers, data=st.data())
def test_functional_maps_work_or_fail_cleanly(
    name: str, x: Any, lower: Any, upper: Any, data: st.DataObject
) -> None:
    dim = data.draw(fitting_dims(x.ndim if isinstance(x, Tensor) else 1), label="dim")
    total = data.draw(fitting_totals(x, dim), label="total")
    fn = getattr(F, name)
    kwargs: dict[str, Any] = {"total": total, "dim": dim}
    if name == "project_box_sum":
        kwargs.update(lower=lower, upper=upper)
    result = attempt(fn, x, expect=set(kwargs) | {"x"}, **kwargs)
    if result is None:
        return
    assert isinstance(result, Tensor)
    if name != "sum_violation":
        assert result.shape == x.shape and result.dtype == x.dtype
    assert_no_nan(result, is_finite(x) and is_finite(total), name)


@pytest.mark.parametrize("name", FUNCTIONAL)
@given(x=float_tensors(), total=st.sampled_from([1.0, 0.5, 3.0, -2.0]), data=st.data())
def test_functional_maps_never_return_nan_from_finite_input(
    name: str, x: Tensor, total: float, data: st.DataObject
) -> None:
    """Valid calls on finite (possibly huge) input: no NaN, and bounds are respected."""
    if x.ndim == 0:
        big = torch.finfo(x.dtype).max
        x = (torch.randn(3, 4, dtype=torch.float64) * 1e30).clamp(-big, big).to(x.dtype)
    x = x.nan_to_num(0.0)  # +-inf become the dtype's +-max: finite, and huge
    dim = data.draw(st.sampled_from([-1, 0, tuple(range(x.ndim))]))
    kwargs: dict[str, Any] = {"total": total, "dim": dim}
    if name == "project_box_sum":
        kwargs.update(lower=-2.0, upper=2.0)
    result = attempt(getattr(F, name), x, expect={"x", "total", "dim", "lower", "upper"}, **kwargs)
    if result is None:
        return
    assert_no_nan(result, True, name)
    if name == "project_simplex":
        assert bool((result >= 0).all())
    if name == "project_box_sum":
        assert bool((result >= -2.0).all()) and bool((result <= 2.0).all())


# ---------------------------------------------------------------------------
# constraint classes: constructors, then their methods on hostile tensors
# ---------------------------------------------------------------------------


@st.composite
def linear_systems(draw: st.DrawFn, n: int | None = None) -> tuple[Any, Any]:
    """Mostly a consistent ``(A, b)`` (full row rank, ``m <= n``), else hostile ones."""
    if draw(mostly(st.just(True), st.just(False))):
        n = n if n is not None else draw(st.integers(1, 5))
        m = draw(st.integers(1, max(1, min(n, 2))))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        return torch.randn(m, n, generator=g), torch.randn(m, generator=g)
    return draw(st.one_of(tensors(max_ndim=3), junk)), draw(st.one_of(tensors(max_ndim=2), junk))


@st.composite
def constraints(draw: st.DrawFn, x: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
    """A constraint class and its arguments, which mostly fit the tensor ``x``."""
    kind = draw(st.sampled_from(["AffineSum", "Simplex", "BoxSum", "Constraint", "LinearEquality"]))
    ndim = x.ndim if isinstance(x, Tensor) else 1
    kwargs: dict[str, Any] = {"dim": draw(mostly(st.none(), fitting_dims(ndim)))}
    if kind in ("AffineSum", "Simplex", "BoxSum"):
        kwargs["total"] = draw(totals)
    if kind == "Simplex":
        kwargs.update(method=draw(methods), temperature=draw(temperatures))
    if kind == "BoxSum":
        kwargs.update(lower=draw(lowers), upper=draw(uppers))
    if kind == "LinearEquality":
        n = None
        if isinstance(x, Tensor):
            try:
                slice_dims = sumto.Constraint(kwargs["dim"]).dims(x.ndim)
                n = math.prod(x.shape[d] for d in slice_dims) if x.ndim > 0 else 1
            except Exception:  # a hostile dim: any system will do
                pass
        kwargs["A"], kwargs["b"] = draw(linear_systems(n if n else None))
    return getattr(sumto, kind), kwargs


@given(x=mostly(float_tensors(), st.one_of(tensors(), junk)), data=st.data())
def test_constraint_constructors_and_methods_work_or_fail_cleanly(
    x: Any, data: st.DataObject
) -> None:
    cls, kwargs = data.draw(constraints(x), label="constraint")
    constraint = attempt(cls, expect=set(kwargs), **kwargs)
    if constraint is None or type(constraint) is sumto.Constraint:
        return
    assert isinstance(constraint, sumto.Constraint)
    repr(constraint)
    state = constraint._saved_config()
    attempt(constraint._check_checkpoint, state, {}, "c", expect={"state"})
    names = {"x", "value", "dim", "total", "shape", "A", "b", "constrained tensor"}
    finite = is_finite(x) and all(is_finite(v) for v in kwargs.values())
    for method in ("forward", "project", "violation"):
        result = attempt(getattr(constraint, method), x, expect=names)
        assert_no_nan(result, finite, f"{cls.__name__}.{method}")
    result = attempt(constraint.check_member, x, "value", expect=names)
    assert result is None


@given(
    kernel_size=st.one_of(st.integers(-2, 8), st.tuples(st.integers(0, 6), st.integers(0, 6)), junk)
)
def test_bayar_constraint_constructor_works_or_fails_cleanly(kernel_size: Any) -> None:
    constraint = attempt(
        sumto.LinearEquality.bayar, kernel_size, expect={"kernel_size", "kernel size"}
    )
    if constraint is not None:
        assert isinstance(constraint, sumto.LinearEquality)


# ---------------------------------------------------------------------------
# register helpers, bake, check, project_on_step
# ---------------------------------------------------------------------------

MODULE_FACTORIES: dict[str, Callable[[], Any]] = {
    "linear": lambda: nn.Linear(3, 2),
    "linear_1x1": lambda: nn.Linear(1, 1),
    "linear_empty": lambda: nn.Linear(0, 2),
    "conv": lambda: nn.Conv2d(1, 2, 3),
    "conv_1x1": lambda: nn.Conv2d(2, 2, 1),
    "bf16_linear": lambda: nn.Linear(3, 2).to(torch.bfloat16),
    "huge_linear": lambda: _with_weight(nn.Linear(4, 2), 3e38),
    "nan_linear": lambda: _with_weight(nn.Linear(4, 2), NAN),
    "int_buffer": lambda: _with_int_buffer(),
    "plain_module": lambda: nn.ReLU(),
    "not_a_module": lambda: torch.zeros(3),
}


def _with_weight(module: nn.Linear, value: float) -> nn.Linear:
    with torch.no_grad():
        module.weight.fill_(value)
        module.weight[:, 0] = -value
    return module


def _with_int_buffer() -> nn.Module:
    module = nn.Linear(3, 2)
    module.register_buffer("counts", torch.arange(6).reshape(2, 3))
    return module


module_names = mostly(
    st.just("weight"), st.one_of(st.sampled_from(["bias", "counts", "missing", ""]), junk)
)
inits = mostly(
    st.just("project"), st.one_of(st.sampled_from(["bogus", None, 1.0]), tensors(max_ndim=4))
)


@st.composite
def registrations(draw: st.DrawFn) -> tuple[str, Callable[..., Any], dict[str, Any]]:
    helper = draw(
        st.sampled_from(["sum_to", "simplex", "box_sum", "constrain", "linear_equality", "bayar"])
    )
    module_kind = draw(
        mostly(
            st.sampled_from(["linear", "conv", "bf16_linear"]),
            st.sampled_from(sorted(MODULE_FACTORIES)),
        )
    )
    kwargs: dict[str, Any] = {"name": draw(module_names), "init": draw(inits)}
    if helper in ("sum_to", "simplex", "box_sum", "linear_equality"):
        kwargs["dim"] = draw(mostly(st.none(), dims))
    if helper in ("sum_to", "simplex", "box_sum"):
        kwargs["total"] = draw(totals)
    if helper == "simplex":
        kwargs.update(method=draw(methods), temperature=draw(temperatures))
    if helper == "box_sum":
        kwargs.update(lower=draw(lowers), upper=draw(uppers))
    if helper == "linear_equality":
        kwargs.update(
            A=draw(st.one_of(tensors(max_ndim=2), junk)),
            b=draw(st.one_of(tensors(max_ndim=1), junk)),
        )
    if helper == "constrain":
        kwargs["constraint"] = draw(
            st.sampled_from(
                [
                    sumto.AffineSum(),
                    sumto.Simplex(method="sparsemax"),
                    sumto.BoxSum(lower=-1.0, upper=1.0),
                    None,
                    "simplex",
                ]
            )
        )
    return module_kind, getattr(sumto, helper), kwargs


@given(spec=registrations())
def test_register_helpers_work_or_fail_cleanly(
    spec: tuple[str, Callable[..., Any], dict[str, Any]],
) -> None:
    module_kind, helper, kwargs = spec
    module = MODULE_FACTORIES[module_kind]()
    finite = is_finite(kwargs) and module_kind != "nan_linear"
    names = set(kwargs) | {"module", "conv", "constrained tensor", "kernel", "shape"}
    if helper is sumto.constrain:
        kwargs = {**kwargs, "constraint": _fresh(kwargs["constraint"])}
    result = attempt(helper, module, expect=names, **kwargs)
    if result is None:
        return
    assert result is module
    name = kwargs["name"]
    assert_no_nan(getattr(module, name), finite, f"{helper.__name__} weight")
    report = sumto.check(module)
    assert list(report) == [name]
    if finite:
        assert not math.isnan(report[name])
    sumto.bake(module)
    assert isinstance(getattr(module, name), Tensor)


def _fresh(constraint: Any) -> Any:
    """A new instance of a drawn constraint (a constraint binds to one tensor)."""
    if isinstance(constraint, sumto.Constraint):
        return type(constraint)(**_ctor_args(constraint))
    return constraint


def _ctor_args(constraint: sumto.Constraint) -> dict[str, Any]:
    if isinstance(constraint, sumto.Simplex):
        return {"method": constraint.method}
    if isinstance(constraint, sumto.BoxSum):
        return {"lower": constraint.lower, "upper": constraint.upper}
    return {}


@given(
    module_kind=st.sampled_from(sorted(MODULE_FACTORIES)),
    param_choice=st.sampled_from(["weight", "foreign", "junk"]),
    constraint=st.sampled_from(["affine", "simplex", "box", "bayar", "none"]),
    optimizer_choice=st.sampled_from(["sgd", "junk"]),
)
def test_project_on_step_works_or_fails_cleanly(
    module_kind: str, param_choice: str, constraint: str, optimizer_choice: str
) -> None:
    module = MODULE_FACTORIES[module_kind]()
    if not isinstance(module, nn.Module) or not any(True for _ in module.parameters()):
        module = nn.Linear(3, 2)
    params = list(module.parameters())
    optimizer: Any = torch.optim.SGD(params, lr=0.1) if optimizer_choice == "sgd" else "sgd"
    param: Any = {"weight": params[0], "foreign": nn.Parameter(torch.ones(2, 3)), "junk": [1.0]}[
        param_choice
    ]
    made: Any = {
        "affine": sumto.AffineSum(),
        "simplex": sumto.Simplex(),
        "box": sumto.BoxSum(lower=-1.0, upper=1.0),
        "bayar": sumto.LinearEquality.bayar(3),
        "none": None,
    }[constraint]
    handle = attempt(
        sumto.project_on_step,
        optimizer,
        param,
        made,
        expect={"optimizer", "param", "constraint", "shape", "kernel"},
    )
    if handle is None:
        return
    finite = module_kind != "nan_linear"
    assert_no_nan(param, finite, "project_on_step")
    handle.remove()


@st.composite
def mixer_inputs(draw: st.DrawFn, k: Any) -> Any:
    """Mostly K float tensors of one shape (a list), else hostile inputs."""
    if isinstance(k, int) and 1 <= k <= 6 and draw(mostly(st.just(True), st.just(False))):
        x = draw(float_tensors(max_ndim=3))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        return [x, *(torch.randn(x.shape, generator=g).to(x.dtype) for _ in range(k - 1))]
    return draw(
        st.one_of(st.lists(tensors(max_ndim=3), min_size=0, max_size=4), tensors(max_ndim=4), junk)
    )


@given(
    num_inputs=mostly(st.integers(1, 4), st.one_of(st.integers(-1, 0), st.none(), junk)),
    names=mostly(
        st.none(), st.one_of(st.lists(st.sampled_from(["a", "b", "c", ""]), max_size=4), junk)
    ),
    weights=mostly(st.sampled_from(["simplex", "affine"]), junk),
    method=methods,
    init=mostly(
        st.none(),
        st.one_of(
            tensors(max_ndim=2),
            st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, NAN]), max_size=4),
            junk,
        ),
    ),
    channels=mostly(st.none(), st.one_of(st.integers(-1, 3), junk)),
    channel_dim=mostly(st.sampled_from([1, -1, 0]), st.one_of(st.integers(-5, 5), junk)),
    mask=mostly(st.none(), st.one_of(tensors(max_ndim=2), junk)),
    data=st.data(),
)
def test_weighted_sum_works_or_fails_cleanly(
    num_inputs: Any,
    names: Any,
    weights: Any,
    method: Any,
    init: Any,
    channels: Any,
    channel_dim: Any,
    mask: Any,
    data: st.DataObject,
) -> None:
    kwargs = {
        "names": names,
        "weights": weights,
        "method": method,
        "init": init,
        "channels": channels,
        "channel_dim": channel_dim,
    }
    mix = attempt(sumto.WeightedSum, num_inputs, expect=set(kwargs) | {"num_inputs", "K"}, **kwargs)
    if mix is None:
        return
    inputs = data.draw(mixer_inputs(mix.num_inputs if mix.num_inputs is not None else num_inputs))
    if isinstance(names, list) and isinstance(inputs, list) and len(names) == len(inputs):
        inputs = dict(zip(names, inputs, strict=True))
    finite = is_finite(inputs) and is_finite(init)
    expect = {"inputs", "stacked tensor", "mask", "channel_dim", "K", "names"}
    out = attempt(mix, inputs, mask, expect=expect)
    assert_no_nan(out, finite, "WeightedSum")


@pytest.mark.parametrize("fn", [sumto.bake, sumto.check], ids=["bake", "check"])
@pytest.mark.parametrize(
    "module", [*JUNK, torch.zeros(3), nn.Linear], ids=lambda v: type(v).__name__
)
def test_bake_and_check_refuse_non_modules(fn: Callable[[Any], Any], module: Any) -> None:
    assert attempt(fn, module, expect={"module"}) is None


# ---------------------------------------------------------------------------
# check() flags non-finite constrained tensors
# ---------------------------------------------------------------------------

CHECKED: dict[str, Callable[[], nn.Module]] = {
    "sum_to": lambda: sumto.sum_to(nn.Linear(4, 3)),
    "softmax": lambda: sumto.simplex(nn.Linear(4, 3)),
    "sparsemax": lambda: sumto.simplex(nn.Linear(4, 3), method="sparsemax"),
    "relu": lambda: sumto.simplex(nn.Linear(4, 3), method="relu"),
    "box_sum": lambda: sumto.box_sum(nn.Linear(4, 3), lower=-1.0, upper=1.0),
    "linear_equality": lambda: sumto.linear_equality(nn.Linear(4, 3), A=[[1.0] * 4], b=[1.0]),
}


@pytest.mark.parametrize("kind", sorted(CHECKED))
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_check_flags_non_finite_constrained_tensors(kind: str, value: float) -> None:
    module = CHECKED[kind]()
    assert sumto.check(module)["weight"] <= 1e-5
    with torch.no_grad():
        module.parametrizations.weight.original[1, 2] = value
        weight = module.weight
    reported = sumto.check(module)["weight"]
    if not bool(torch.isfinite(weight).all()):
        assert math.isnan(reported) if bool(weight.isnan().any()) else math.isinf(reported)
    else:
        # A map may absorb an infinite pre-weight (softmax of -inf is 0): check then
        # reports the weight's own violation, which flags a weight off the set.
        constraint = module.parametrizations.weight[0]
        assert reported == pytest.approx(float(constraint.violation(weight)))
    if kind in ("sum_to", "linear_equality") or math.isnan(value):
        assert not math.isfinite(reported)  # NaN pre-weights, or linear maps of inf


def test_check_flags_non_finite_project_on_step_parameters() -> None:
    module = nn.Linear(4, 3)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    handle = sumto.project_on_step(opt, module.weight, sumto.Simplex())
    with torch.no_grad():
        module.weight[0, 0] = NAN
    assert math.isnan(sumto.check(module)["weight"])
    handle.remove()
