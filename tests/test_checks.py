"""sumto._checks: every argument check, its "expected ..., got ..." error and exception type.

TypeError for a wrong type, ValueError for a bad value, IndexError for a dim out of
range. Checks of a tensor total's *values* are skipped while ``torch.func.vmap``,
``torch.compile`` or ``torch.jit.trace`` records it (its values cannot be read on
the host there); checks of its *shape* still run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import sumto
from sumto import _checks
from sumto.functional import project_box_sum, project_sum

HUGE_INT = 10**400  # beyond the float range: float(HUGE_INT) raises OverflowError
NAN = math.nan
INF = math.inf
F32_MAX = torch.finfo(torch.float32).max

# (id, call, exception type, the message, or its start when it ends with "...")
ERRORS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # dims
    (
        "dim-bool",
        lambda: _checks.check_dim_spec(True),
        TypeError,
        "expected dim to be an int or a tuple of ints, got True",
    ),
    (
        "dim-float",
        lambda: _checks.check_dim_spec(1.0),  # type: ignore[arg-type]
        TypeError,
        "expected dim to be an int or a tuple of ints, got 1.0",
    ),
    (
        "dim-str",
        lambda: _checks.check_dim_spec("0"),
        TypeError,
        "expected dim to be an int or a tuple of ints, got '0'",
    ),
    (
        "dim-tuple-with-bool",
        lambda: _checks.check_dim_spec((0, True)),
        TypeError,
        "expected dim to be an int or a tuple of ints, got (0, True)",
    ),
    (
        "dim-empty",
        lambda: _checks.check_dim_spec(()),
        ValueError,
        "expected dim to name at least one dimension, got an empty tuple",
    ),
    (
        "dim-repeated",
        lambda: _checks.check_dim_spec((1, 1)),
        ValueError,
        "expected distinct dims, got repeated dims in (1, 1)",
    ),
    (
        "dim-out-of-range",
        lambda: _checks.normalize_dims(3, 3),
        IndexError,
        "expected dim in range [-3, 2] for a tensor with 3 dims, got 3",
    ),
    (
        "dim-out-of-range-negative",
        lambda: _checks.normalize_dims((0, -4), 3),
        IndexError,
        "expected dim in range [-3, 2] for a tensor with 3 dims, got -4",
    ),
    (
        "dim-of-a-0-d-tensor",
        lambda: _checks.normalize_dims(1, 0),
        IndexError,
        "expected dim in range [-1, 0] for a tensor with 0 dims, got 1",
    ),
    (
        "dim-repeated-once-normalised",
        lambda: _checks.normalize_dims((0, -3), 3),
        ValueError,
        "expected distinct dims, got repeated dims in (0, -3)",
    ),
    # tensors
    (
        "x-not-a-tensor",
        lambda: _checks.check_float_tensor([1.0]),
        TypeError,
        "expected x to be a torch.Tensor, got list",
    ),
    (
        "named-not-a-tensor",
        lambda: _checks.check_float_tensor(3, "weight"),
        TypeError,
        "expected weight to be a torch.Tensor, got int",
    ),
    (
        "x-integer-dtype",
        lambda: _checks.check_float_tensor(torch.tensor([1])),
        TypeError,
        "expected x to be a floating point tensor, got dtype torch.int64",
    ),
    # numbers
    (
        "number-bool",
        lambda: _checks.check_number(True, "total"),
        TypeError,
        "expected total to be a float, got bool",
    ),
    (
        "number-str",
        lambda: _checks.check_number("1.0", "total"),
        TypeError,
        "expected total to be a float, got str",
    ),
    (
        "number-none",
        lambda: _checks.check_number(None, "lower"),
        TypeError,
        "expected lower to be a float, got NoneType",
    ),
    (
        "number-huge-int",
        lambda: _checks.check_number(HUGE_INT, "total"),
        ValueError,
        "expected a finite total, got an int of 401 digits, beyond the float range",
    ),
    (
        "number-huge-negative-int",
        lambda: _checks.check_number(-HUGE_INT, "upper"),
        ValueError,
        "expected a finite upper, got an int of 401 digits, beyond the float range",
    ),
    # totals
    (
        "total-nan",
        lambda: _checks.check_total(NAN, (2, 3), (1,)),
        ValueError,
        "expected a finite total, got nan",
    ),
    (
        "total-inf",
        lambda: _checks.check_total(-INF, (2, 3), (1,)),
        ValueError,
        "expected a finite total, got -inf",
    ),
    (
        "total-huge-int",
        lambda: _checks.check_total(HUGE_INT, (2, 3), (1,)),
        ValueError,
        "expected a finite total, got an int of 401 digits, beyond the float range",
    ),
    (
        "total-str",
        lambda: _checks.check_total("1", (2, 3), (1,)),  # type: ignore[arg-type]
        TypeError,
        "expected total to be a float, got str",
    ),
    (
        "total-complex-tensor",
        lambda: _checks.check_total(torch.tensor([1 + 1j]), (2, 3), (1,)),
        TypeError,
        "expected total to be a real tensor, got dtype torch.complex64",
    ),
    (
        "total-bool-tensor",
        lambda: _checks.check_total(torch.tensor([True]), (2, 3), (1,)),
        TypeError,
        "expected total to be a real tensor, got dtype torch.bool",
    ),
    (
        "total-tensor-nan",
        lambda: _checks.check_total(torch.tensor([1.0, NAN]), (2, 3), (1,)),
        ValueError,
        "expected a finite total, got a tensor with non-finite values ...",
    ),
    (
        "total-tensor-shape",
        lambda: _checks.check_total(torch.zeros(3), (2, 3), (1,)),
        ValueError,
        "expected total to be broadcastable to the keepdim-reduced shape (2, 1) "
        "(or to have the reduced shape (2,)), got shape (3,)",
    ),
    (
        "total-beyond-float32",
        lambda: _checks.check_total_range(-3.5e38, torch.float32),
        ValueError,
        f"expected |total| <= {F32_MAX:.4g}, the largest torch.float32 (the dtype the tensor "
        "is computed in), got |total| = 3.5e+38",
    ),
    (
        "total-tensor-beyond-float32",
        lambda: _checks.check_total_range(
            torch.tensor([1.0, 1e39], dtype=torch.float64), torch.float32
        ),
        ValueError,
        f"expected |total| <= {F32_MAX:.4g}, the largest torch.float32 (the dtype the tensor "
        "is computed in), got |total| = 1e+39",
    ),
    (
        "simplex-total-zero",
        lambda: _checks.check_positive(0.0, "total"),
        ValueError,
        "expected total > 0 for the simplex, got 0.0",
    ),
    (
        "simplex-total-nan",
        lambda: _checks.check_positive(NAN, "total"),
        ValueError,
        "expected total > 0 for the simplex, got nan",
    ),
    (
        "simplex-tensor-total-with-a-zero",
        lambda: _checks.check_positive(torch.tensor([1.0, 0.0]), "total"),
        ValueError,
        "expected total > 0 for the simplex, got tensor([1., 0.])",
    ),
    # bounds
    (
        "lower-nan",
        lambda: _checks.check_bounds(NAN, 1.0),
        ValueError,
        "expected lower to be a number, got nan",
    ),
    (
        "upper-nan",
        lambda: _checks.check_bounds(0.0, NAN),
        ValueError,
        "expected upper to be a number, got nan",
    ),
    (
        "lower-str",
        lambda: _checks.check_bounds("0", 1.0),  # type: ignore[arg-type]
        TypeError,
        "expected lower to be a float, got str",
    ),
    (
        "lower-huge-int",
        lambda: _checks.check_bounds(-HUGE_INT, 1.0),
        ValueError,
        "expected a finite lower, got an int of 401 digits, beyond the float range",
    ),
    (
        "lower-above-upper",
        lambda: _checks.check_bounds(1.0, 0.0),
        ValueError,
        "expected lower <= upper, got lower=1.0 > upper=0.0",
    ),
    (
        "lower-inf",
        lambda: _checks.check_bounds(INF, INF),
        ValueError,
        "expected lower < inf and upper > -inf, got lower=inf, upper=inf",
    ),
    (
        "upper-minus-inf",
        lambda: _checks.check_bounds(-INF, -INF),
        ValueError,
        "expected lower < inf and upper > -inf, got lower=-inf, upper=-inf",
    ),
    # box feasibility
    (
        "box-total-above",
        lambda: _checks.check_box(3.0, 4, 0.0, 0.5),
        ValueError,
        "expected n * lower <= total <= n * upper (n=4, lower=0.0, upper=0.5, "
        "so total in [0.0, 2.0]), got total=3.0",
    ),
    (
        "box-total-below",
        lambda: _checks.check_box(-0.75, 2, -0.25, INF),
        ValueError,
        "expected n * lower <= total <= n * upper (n=2, lower=-0.25, upper=inf, "
        "so total in [-0.5, inf]), got total=-0.75",
    ),
    (
        "box-tensor-total-above",
        lambda: _checks.check_box(torch.tensor([1.0, 3.0]), 4, 0.0, 0.5),
        ValueError,
        "expected n * lower <= total <= n * upper (n=4, lower=0.0, upper=0.5, "
        "so total in [0.0, 2.0]), got total=3.0",
    ),
    (
        "box-tensor-total-below",
        lambda: _checks.check_box(torch.tensor([-1.0, 1.0]), 4, 0.0, 0.5),
        ValueError,
        "expected n * lower <= total <= n * upper (n=4, lower=0.0, upper=0.5, "
        "so total in [0.0, 2.0]), got total=-1.0",
    ),
    (
        "box-bounds-first",
        lambda: _checks.check_box(1.0, 4, 1.0, 0.0),
        ValueError,
        "expected lower <= upper, got lower=1.0 > upper=0.0",
    ),
    # temperature
    *[
        (
            f"temperature-{value}",
            (lambda v: lambda: _checks.check_temperature(v))(value),
            ValueError,
            f"expected a finite temperature > 0 within [1e-30, 1e+30], got {value!r}",
        )
        for value in (0.0, -1.0, 1e-31, 1e31, NAN, INF)
    ],
    (
        "temperature-huge-int",
        lambda: _checks.check_temperature(HUGE_INT),
        ValueError,
        "expected a finite temperature, got an int of 401 digits, beyond the float range",
    ),
    (
        "temperature-str",
        lambda: _checks.check_temperature("1"),
        TypeError,
        "expected temperature to be a float, got str",
    ),
    (
        "temperature-bool",
        lambda: _checks.check_temperature(True),
        TypeError,
        "expected temperature to be a float, got bool",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [pytest.param(call, error, message, id=name) for name, call, error, message in ERRORS],
)
def test_each_check_raises_its_type_with_an_expected_got_message(
    call: Callable[[], object], error: type[Exception], message: str
) -> None:
    # Exception, not ``error``: pytest.raises accepts subclasses, the type must be exact.
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is error, f"expected {error.__name__}, got {info.type.__name__}"
    text = str(info.value)
    assert re.match(r"expected .*, got ", text), text
    if message.endswith("..."):
        assert text.startswith(message[:-3]), text
    else:
        assert text == message


# ---------------------------------------------------------------------------
# what passes, and what the checks return
# ---------------------------------------------------------------------------


def test_dims_are_returned_as_given_then_normalised_sorted() -> None:
    assert _checks.check_dim_spec(-1) == (-1,)
    assert _checks.check_dim_spec([2, -3]) == (2, -3)
    assert _checks.normalize_dims(-1, 3) == (2,)
    assert _checks.normalize_dims((2, -3), 3) == (0, 2)
    # a 0-d tensor has one "dim" to sum over: itself
    assert _checks.normalize_dims(0, 0) == (0,) and _checks.normalize_dims(-1, 0) == (0,)


def test_float_tensors_of_every_float_dtype_pass() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        _checks.check_float_tensor(torch.zeros(2, dtype=dtype))


def test_compute_dtype_is_at_least_float32() -> None:
    assert _checks.compute_dtype(torch.float16) == torch.float32
    assert _checks.compute_dtype(torch.bfloat16) == torch.float32
    assert _checks.compute_dtype(torch.float32) == torch.float32
    assert _checks.compute_dtype(torch.float64) == torch.float64


def test_shapes_of_slices() -> None:
    assert _checks.reduced_size((2, 3, 4), (0, 2)) == 8
    assert _checks.reduced_size((), (0,)) == 1
    assert _checks.keep_shape((2, 3, 4), (1,)) == (2, 1, 4)
    assert _checks.broadcast_total_shape((2, 1), (2, 3), (1,)) == (2, 1)
    assert _checks.broadcast_total_shape((1, 1), (2, 3), (1,)) == (1, 1)
    assert _checks.broadcast_total_shape((), (2, 3), (1,)) == ()
    # the reduced shape (keepdim=False) is viewed as the keepdim one
    assert _checks.broadcast_total_shape((2,), (2, 3), (1,)) == (2, 1)


def test_numbers_are_returned_as_floats() -> None:
    assert _checks.check_number(3, "total") == 3.0
    assert isinstance(_checks.check_number(3, "total"), float)
    assert _checks.check_number(-2.5, "total") == -2.5
    # non-finite floats are numbers: the callers decide whether they are allowed
    assert math.isinf(_checks.check_number(-INF, "lower"))
    assert math.isnan(_checks.check_number(NAN, "lower"))
    assert _checks.check_temperature(2) == 2.0
    low, high = _checks.TEMPERATURE_RANGE
    assert _checks.check_temperature(low) == low and _checks.check_temperature(high) == high


@pytest.mark.parametrize(
    "total",
    [1.0, -2.0, 0, 3, torch.tensor(0.5), torch.tensor([[1.0], [2.0]]), torch.tensor([1, 2])],
    ids=["float", "negative", "int-zero", "int", "0-d", "keepdim", "integer-tensor"],
)
def test_valid_totals_pass(total: float | Tensor) -> None:
    _checks.check_total(total, (2, 3), (1,))
    _checks.check_total_range(total, torch.float32)


def test_empty_tensor_totals_have_no_values_to_check() -> None:
    empty = torch.zeros(0, 1)
    _checks.check_total(empty, (0, 3), (1,))
    _checks.check_total_range(empty, torch.float32)
    _checks.check_positive(empty, "total")
    _checks.check_box(empty, 3, 0.0, 0.5)


def test_box_feasibility_includes_its_edges_and_open_sides() -> None:
    _checks.check_box(2.0, 4, 0.0, 0.5)  # total = n * upper: the single point y = upper
    _checks.check_box(0.0, 4, 0.0, 0.5)  # total = n * lower
    _checks.check_box(torch.tensor([0.0, 2.0]), 4, 0.0, 0.5)
    _checks.check_box(-1e30, 4, -INF, 0.0)
    _checks.check_box(1e30, 4, 0.0, INF)
    _checks.check_box(5.0, 4, -INF, INF)
    _checks.check_bounds(0.25, 0.25)  # lower == upper: a single point per entry


def test_float32_range_is_checked_in_the_compute_dtype() -> None:
    _checks.check_total_range(3.5e38, torch.float64)
    _checks.check_total_range(F32_MAX, torch.float32)


def test_huge_ints_are_value_errors_through_the_public_entry_points() -> None:
    x = torch.zeros(2, 3)
    for call in (
        lambda: project_sum(x, HUGE_INT),
        lambda: project_box_sum(x, HUGE_INT),
        lambda: project_box_sum(x, 1.0, lower=-HUGE_INT),
        lambda: sumto.BoxSum(total=HUGE_INT),
        lambda: sumto.Simplex(temperature=HUGE_INT),
    ):
        with pytest.raises(ValueError, match="an int of 401 digits, beyond the float range"):
            call()


# ---------------------------------------------------------------------------
# value checks skipped while a transform records; shape checks kept
# ---------------------------------------------------------------------------


def _check_every_value(total: Tensor) -> Tensor:
    """Every check of a tensor total's values, for a (2, 3) tensor summed over dim 1."""
    _checks.check_total(total, (2, 3), (1,))
    _checks.check_total_range(total, torch.float32)
    _checks.check_positive(total, "total")
    _checks.check_box(total, 3, 0.0, 1.0)
    return total * 2


# Each fails every value check it reaches in eager mode: non-finite, beyond float32,
# not positive, not in [n * lower, n * upper].
BAD_VALUES = [NAN, -1e39, -5.0, 5.0]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_total_values_are_refused_in_eager_mode(value: float) -> None:
    with pytest.raises(ValueError, match=r"^expected "):
        _check_every_value(torch.tensor([value]))


def test_value_checks_are_skipped_under_vmap() -> None:
    totals = torch.tensor(BAD_VALUES)
    out = torch.func.vmap(_check_every_value)(totals)
    torch.testing.assert_close(out, totals * 2, equal_nan=True)


def test_shape_checks_still_run_under_vmap() -> None:
    def check(total: Tensor) -> Tensor:
        _checks.check_total(total, (2, 3), (1,))
        return total

    with pytest.raises(ValueError, match=r"expected total to be broadcastable .* got shape \(3,\)"):
        torch.func.vmap(check)(torch.zeros(4, 3))


@pytest.mark.usefixtures("fresh_dynamo")
def test_value_checks_are_skipped_in_one_compiled_graph() -> None:
    # fullgraph=True: reading a value on the host would be a graph break, and raise
    compiled = torch.compile(_check_every_value, backend="eager", fullgraph=True)
    for value in BAD_VALUES:
        total = torch.tensor([value])
        torch.testing.assert_close(compiled(total), total * 2, equal_nan=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_readable_only_in_eager_mode() -> None:
    def probe(total: Tensor) -> Tensor:
        return total + float(_checks.readable(total))

    x = torch.zeros(2)
    assert _checks.readable(x)
    assert torch.equal(probe(x), torch.ones(2))
    assert torch.equal(torch.func.vmap(probe)(x), torch.zeros(2))
    assert torch.equal(torch.jit.trace(probe, x, check_trace=False)(x), torch.zeros(2))  # type: ignore[no-untyped-call]
