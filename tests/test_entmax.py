"""alpha-entmax: ``sumto.functional.entmax`` and ``Simplex(method="entmax")``, learned alpha and temperature.

The map is compared with the ``entmax`` package (forward, gradients in x and alpha)
and with an independent float64 bisection (``reference.ref_entmax``); gradients are
checked by finite differences in float64. The constraint is checked for its round
trip (pre-weights of a value give that value back), its learnable parameters
(training, range, checkpoints, bake, compile, inspect) and its errors.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import entmax as entmax_package  # type: ignore[import-untyped]
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import sumto
from reference import (
    CountingBackend,
    assert_constraints_hold,
    assert_params_match,
    assert_sums,
    compute_eps,
    entmax_tolerance,
    ref_entmax,
    ref_softmax,
    run_inspect,
    save_and_load,
)
from sumto.functional import SimplexMethod, entmax

DTYPES = [torch.float32, torch.float64]
ALPHAS = [1.25, 1.5, 2.0, 3.0]


def scores(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, scale: float = 2.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def spread(x: Tensor) -> float:
    return float(x.double().max() - x.double().min())


def assert_entmax_close(actual: Tensor, expected: Tensor, alpha: float, x: Tensor) -> None:
    tol = entmax_tolerance(alpha, actual.dtype, spread(x))
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= tol, f"alpha={alpha}: max error {err:.3g} > {tol:.3g} ({actual.dtype})"


# ---------------------------------------------------------------------------
# the map against the entmax package and the float64 reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_entmax_matches_the_entmax_package(dtype: torch.dtype, alpha: float, dim: int) -> None:
    x = scores((4, 5, 6), dtype)
    got = entmax(x, alpha, dim=dim)
    want = entmax_package.entmax_bisect(x, alpha, dim=dim, n_iter=200)
    assert got.dtype == dtype and got.shape == x.shape
    assert_entmax_close(got, want, alpha, x)
    if alpha == 1.5:
        assert_entmax_close(got, entmax_package.entmax15(x, dim=dim), alpha, x)
    if alpha == 2.0:
        assert_entmax_close(got, entmax_package.sparsemax(x, dim=dim), alpha, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 1.1, *ALPHAS, 4.0])
@pytest.mark.parametrize("dims", [(-1,), (0,), (1, 2), (0, 2)])
def test_entmax_matches_the_float64_reference(
    dtype: torch.dtype, alpha: float, dims: tuple[int, ...]
) -> None:
    x = scores((3, 4, 5), dtype, seed=1)
    got = entmax(x, alpha, dim=dims)
    assert_entmax_close(got, ref_entmax(x, alpha, dims), alpha, x)
    assert_sums(got, 1.0, dims)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_slice_alpha_matches_the_package_and_the_reference(dtype: torch.dtype) -> None:
    x = scores((5, 7), dtype, seed=2)
    alpha = torch.tensor([1.0, 1.2, 1.5, 2.0, 3.0], dtype=dtype).unsqueeze(1)
    got = entmax(x, alpha)
    want = ref_entmax(x, alpha, (-1,))
    for i, a in enumerate(alpha.flatten().tolist()):
        assert_entmax_close(got[i], want[i], a, x[i])
    package = entmax_package.entmax_bisect(x[1:], alpha[1:], n_iter=200)
    for i, a in enumerate(alpha[1:].flatten().tolist()):
        assert_entmax_close(got[i + 1], package[i], a, x[i + 1])
    # the reduced shape (5,) and a 0-d alpha are accepted too
    assert torch.equal(entmax(x, alpha.flatten()), got)
    assert torch.equal(entmax(x, torch.tensor(1.5, dtype=dtype)), entmax(x, alpha[2:3]))


def test_alpha_one_is_softmax_and_two_is_the_simplex_projection() -> None:
    x = scores((4, 6), torch.float64, seed=3)
    torch.testing.assert_close(entmax(x, 1.0), ref_softmax(x, 1.0, (-1,)), rtol=0, atol=1e-15)
    ones = torch.ones(4, 1, dtype=torch.float64)
    torch.testing.assert_close(entmax(x, ones), ref_softmax(x, 1.0, (-1,)), rtol=0, atol=1e-15)
    assert torch.equal(entmax(x, 2.0), sumto.functional.project_simplex(x))
    torch.testing.assert_close(entmax(x, 2 * ones), entmax(x, 2.0), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


def grads(
    fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, alpha: Tensor, g: Tensor
) -> tuple[Tensor, Tensor]:
    x = x.detach().clone().requires_grad_()
    alpha = alpha.detach().clone().requires_grad_()
    (fn(x, alpha) * g).sum().backward()
    assert x.grad is not None and alpha.grad is not None
    return x.grad, alpha.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0, 3.0, None])
def test_gradients_in_x_and_alpha_match_the_entmax_package(
    dtype: torch.dtype, alpha: float | None
) -> None:
    x = scores((6, 5), dtype, seed=4)
    g = scores((6, 5), dtype, seed=5)
    if alpha is None:  # one alpha per row
        a = torch.tensor([1.1, 1.3, 1.5, 1.8, 2.2, 3.0], dtype=dtype).unsqueeze(1)
    else:
        a = torch.full((6, 1), alpha, dtype=dtype)
    gx, ga = grads(lambda x, a: entmax(x, a), x, a, g)
    px, pa = grads(lambda x, a: entmax_package.entmax_bisect(x, a, n_iter=200), x, a, g)
    # gradients scale like 1 / (alpha - 1) times the outputs' error
    tol = 64 * compute_eps(dtype) * (1.0 + spread(x)) * float(g.abs().max()) / 0.1
    assert float((gx - px).abs().max()) <= tol
    assert float((ga - pa).abs().max()) <= tol
    if alpha is not None:  # a float alpha takes its own algorithm; the same gradient in x
        xf = x.detach().clone().requires_grad_()
        (entmax(xf, alpha) * g).sum().backward()
        assert xf.grad is not None
        assert float((xf.grad - px).abs().max()) <= tol


def alpha_derivative_fd(x: Tensor, alpha: float, g: Tensor, h: float = 1e-5) -> Tensor:
    """d/dalpha of sum(g * entmax(x, alpha)) per row, central differences of the reference."""
    up = (ref_entmax(x, alpha + h) * g).sum(-1)
    down = (ref_entmax(x, alpha - h) * g).sum(-1) if alpha - h >= 1 else None
    if down is None:
        return (up - (ref_entmax(x, alpha) * g).sum(-1)) / h
    return (up - down) / (2 * h)


@pytest.mark.parametrize(
    ("alpha", "atol"),
    [(1.0, 1e-4), (1.0001, 1e-4), (1.01, 1e-8), (1.3, 1e-8), (2.0, 1e-8), (2.5, 1e-8)],
)
def test_alpha_gradient_against_finite_differences_of_the_reference(
    alpha: float, atol: float
) -> None:
    x = scores((4, 6), torch.float64, seed=6)
    g = scores((4, 6), torch.float64, seed=7)
    _, ga = grads(lambda x, a: entmax(x, a), x, torch.full((4, 1), alpha, dtype=torch.float64), g)
    want = alpha_derivative_fd(x, alpha, g)
    # at and next to 1 the one-sided difference and the limit formula are O(h), O(alpha - 1)
    torch.testing.assert_close(ga.flatten(), want, rtol=0, atol=atol)


@pytest.mark.parametrize("alpha", [1.01, 1.05, 1.5])
def test_float32_alpha_gradient_near_one_is_accurate(alpha: float) -> None:
    x = scores((4, 6), torch.float64, seed=8)
    g = scores((4, 6), torch.float64, seed=9)
    a = torch.full((4, 1), alpha, dtype=torch.float64)
    _, want = grads(lambda x, a: entmax(x, a), x, a, g)
    _, got = grads(lambda x, a: entmax(x, a), x.float(), a.float(), g.float())
    # documented: within about eps^(1/4) relative of 1, the limit at 1 stands in
    assert float((got.double() - want).abs().max()) <= 0.02 * float(want.abs().max())


def test_gradcheck_in_float64() -> None:
    x = scores((3, 5), torch.float64, seed=10).requires_grad_()
    a = torch.tensor([[1.2], [1.6], [2.4]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: entmax(x, a), (x, a), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(lambda x, a: entmax(x, a), (x, a))
    for alpha in (1.0, 1.5, 2.0, 2.5):
        assert torch.autograd.gradcheck(lambda x, a=alpha: entmax(x, a, dim=0), (x,))
    one = torch.ones(3, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: entmax(x, one), (x,))


def test_torch_func_transforms() -> None:
    x = scores((4, 5), torch.float64, seed=11)
    alpha = torch.tensor([1.2, 1.5, 2.0, 3.0], dtype=torch.float64)
    batched = torch.func.vmap(lambda xi, ai: entmax(xi, ai))(x, alpha)
    torch.testing.assert_close(batched, entmax(x, alpha.unsqueeze(1)), rtol=0, atol=1e-15)
    reverse = torch.func.jacrev(lambda xi: entmax(xi, 1.3))(x[0])
    forward = torch.func.jacfwd(lambda xi: entmax(xi, 1.3))(x[0])
    torch.testing.assert_close(forward, reverse, rtol=0, atol=1e-12)
    weights = torch.arange(5.0, dtype=torch.float64)
    hessian = torch.func.hessian(lambda xi: (entmax(xi, 1.3) * weights).sum())(x[0])
    gradient = torch.func.grad(lambda xi: (entmax(xi, 1.3) * weights).sum())
    steps = 1e-6 * torch.eye(5, dtype=torch.float64)
    fd = torch.stack([(gradient(x[0] + e) - gradient(x[0] - e)) / 2e-6 for e in steps])
    torch.testing.assert_close(hessian, fd, rtol=0, atol=1e-8)
    traced = torch.jit.trace(lambda xi: entmax(xi, 1.3), (x[0],))
    torch.testing.assert_close(traced(x[2]), entmax(x[2], 1.3), rtol=0, atol=0)
    d_alpha = torch.func.grad(lambda a: (entmax(x[0], a) * x[1]).sum())(alpha[0])
    _, want = grads(lambda x, a: entmax(x, a), x[:1], alpha[:1].view(1, 1), x[1:2])
    torch.testing.assert_close(d_alpha, want.reshape(()), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------
# properties and edge cases
# ---------------------------------------------------------------------------


@given(
    rows=st.integers(1, 4),
    n=st.integers(1, 9),
    alpha=st.one_of(st.sampled_from([1.0, 1.5, 2.0]), st.floats(1.0, 5.0)),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_outputs_lie_on_the_simplex(
    rows: int, n: int, alpha: float, scale: float, double: bool, seed: int
) -> None:
    dtype = torch.float64 if double else torch.float32
    x = scores((rows, n), dtype, seed=seed, scale=scale)
    for a in (alpha, torch.full((rows, 1), alpha, dtype=dtype)):
        p = entmax(x, a)
        assert bool(torch.isfinite(p).all()) and float(p.min()) >= 0.0
        assert_sums(p, 1.0, (-1,), k=2.0)


@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0, 3.0])
def test_ties_masked_entries_and_single_entries(alpha: float) -> None:
    inf = math.inf
    # ties: uniform
    torch.testing.assert_close(entmax(torch.full((2, 4), 3.0), alpha), torch.full((2, 4), 0.25))
    # -inf entries get 0, and the others equal entmax of the finite entries alone
    x = torch.tensor([[0.5, -inf, 1.0, -inf], [-inf, -inf, -inf, -inf]], requires_grad=True)
    p = entmax(x, alpha)
    assert torch.equal(p[0, [1, 3]], torch.zeros(2))
    torch.testing.assert_close(p[0, [0, 2]], entmax(torch.tensor([0.5, 1.0]), alpha))
    torch.testing.assert_close(p[1], torch.full((4,), 0.25))  # all masked: the limit
    (p * torch.arange(4.0)).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    # one entry per slice, and a 0-d tensor: 1
    assert torch.equal(entmax(torch.randn(3, 1), alpha), torch.ones(3, 1))
    assert torch.equal(entmax(torch.tensor(-7.0), alpha), torch.tensor(1.0))


def test_half_precision_is_computed_in_float32() -> None:
    x = scores((3, 8), torch.float32, seed=12)
    for dtype in (torch.float16, torch.bfloat16):
        got = entmax(x.to(dtype), 1.5)
        assert got.dtype == dtype
        want = entmax(x.to(dtype).float(), 1.5).to(dtype)
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: entmax(torch.randn(3), 0.99),
            ValueError,
            "expected a finite alpha >= 1, got 0.99",
        ),
        (lambda: entmax(torch.randn(3), math.nan), ValueError, "expected a finite alpha >= 1"),
        (lambda: entmax(torch.randn(3), math.inf), ValueError, "expected a finite alpha >= 1"),
        (
            lambda: entmax(torch.randn(2, 3), torch.tensor([[1.5], [0.5]])),
            ValueError,
            "expected a finite alpha >= 1",
        ),
        (
            lambda: entmax(torch.randn(2, 3), torch.ones(3)),
            ValueError,
            "expected alpha to be broadcastable",
        ),
        (
            lambda: entmax(torch.randn(3), "1.5"),  # type: ignore[arg-type]
            TypeError,
            "expected alpha to be a float",
        ),
        (lambda: entmax(torch.randn(3), torch.tensor([True])), TypeError, "real tensor"),
        (lambda: entmax(torch.arange(3), 1.5), TypeError, "floating point"),
        (lambda: entmax(torch.randn(3), 1.5, dim=1), IndexError, "expected dim in range"),
        (lambda: entmax(torch.randn(2, 0), 1.5), ValueError, "at least one element"),
    ],
)
def test_bad_arguments_raise(
    call: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------

pytestmark_compile = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.slow
@pytestmark_compile
def test_entmax_compiles_to_one_graph() -> None:
    x = scores((4, 6), torch.float32, seed=13)
    alpha = torch.tensor([[1.2], [1.5], [2.0], [2.5]])
    backend = CountingBackend("aot_eager")
    for a in (1.5, 1.3):  # the sort, and the bisection with a float alpha
        compiled = torch.compile(lambda x, a=a: entmax(x, a), backend=backend, fullgraph=True)
        torch.testing.assert_close(compiled(x), entmax(x, a), rtol=0, atol=1e-6)
    assert backend.graphs == 2
    xg = x.clone().requires_grad_()
    ag = alpha.clone().requires_grad_()
    fn = torch.compile(lambda x, a: entmax(x, a), backend="aot_eager", fullgraph=True)
    (fn(xg, ag) * x).sum().backward()
    gx, ga = grads(lambda x, a: entmax(x, a), x, alpha, x)
    assert xg.grad is not None and ag.grad is not None
    torch.testing.assert_close(xg.grad, gx, rtol=0, atol=1e-6)
    torch.testing.assert_close(ag.grad, ga, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# Simplex(method="entmax")
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 1.5, 1.25, 2.0, 3.0])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_simplex_entmax_is_total_times_entmax_of_scaled_pre_weights(
    alpha: float, temperature: float
) -> None:
    x = scores((3, 7), torch.float64, seed=14)
    c = sumto.Simplex(total=2.0, method="entmax", alpha=alpha, temperature=temperature)
    got = c(x)
    assert_entmax_close(got / 2.0, ref_entmax(x / temperature, alpha), alpha, x / temperature)
    assert_sums(got, 2.0, (1,))


@pytest.mark.parametrize(
    "alpha", [1.0, 1.5, 1.25, 2.0, 3.0, torch.tensor([[1.2], [1.5], [2.0], [2.8]])]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_simplex_entmax_round_trip(alpha: float | Tensor, dtype: torch.dtype) -> None:
    """The pre-weights right_inverse gives map back to the value, zeros included."""
    totals = torch.tensor([[1.0], [2.0], [0.5], [3.0]], dtype=dtype)
    value = torch.tensor(
        [
            [0.5, 0.25, 0.25, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0, 0.0],
            [0.1, 0.1, 0.1, 0.1, 0.6],
            [0.3, 0.0, 0.3, 0.4, 0.0],
        ],
        dtype=dtype,
    )
    value = value * totals
    lin = nn.Linear(5, 4, bias=False).to(dtype)
    sumto.simplex(lin, method="entmax", alpha=alpha, total=totals, temperature=0.7, init=value)
    softmax = not isinstance(alpha, Tensor) and alpha == 1.0
    # softmax never gives exact zeros: its zeros come back at eps * total
    err = float((lin.weight - value).abs().max())
    assert err <= 64 * torch.finfo(dtype).eps * 3.0, err
    if not softmax:
        assert torch.equal(lin.weight == 0, value == 0)
    lin.weight = lin.weight.detach().clone()  # assignment accepts its own output
    assert_constraints_hold(lin, k=1.0)


def test_simplex_entmax_registers_and_trains_with_init_project() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    sumto.simplex(lin, method="entmax", alpha=1.5, temperature=0.5)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    for _ in range(20):
        loss = (lin(torch.randn(8, 6)) - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_constraints_hold(lin)
    assert bool(torch.eq(lin.weight, 0).any())  # entmax gives exact zeros


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (
            lambda: sumto.Simplex(method="softmax", learn_alpha=True),
            ValueError,
            "only with method='entmax'",
        ),
        (
            lambda: sumto.Simplex(method="sparsemax", alpha=1.5),
            ValueError,
            "only with method='entmax'",
        ),
        (
            lambda: sumto.Simplex(method="relu", learn_temperature=True),
            ValueError,
            "no temperature",
        ),
        (
            lambda: sumto.Simplex(method="entmax", alpha=0.5),
            ValueError,
            "expected a finite alpha >= 1",
        ),
        (
            lambda: sumto.Simplex(method="entmax", alpha=torch.tensor([1.5, 0.9])),
            ValueError,
            "expected a finite alpha >= 1",
        ),
        (
            lambda: sumto.Simplex(method="entmax", alpha=2.0, learn_alpha=True),
            ValueError,
            r"strictly inside \(1, 2\)",
        ),
        (
            lambda: sumto.Simplex(learn_temperature=True, temperature=1e30),
            ValueError,
            "temperature strictly inside",
        ),
        (
            lambda: sumto.Simplex(method="entmax", learn_alpha=1),  # type: ignore[arg-type]
            TypeError,
            "learn_alpha to be a bool",
        ),
        (
            lambda: sumto.simplex(nn.Linear(3, 2), method="entmax", alpha=torch.ones(3)),
            ValueError,
            "expected alpha to be broadcastable",
        ),
    ],
)
def test_bad_simplex_entmax_arguments_raise(
    build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        build()


# ---------------------------------------------------------------------------
# learned alpha and temperature
# ---------------------------------------------------------------------------


def learned_model(alpha: float | Tensor = 1.5, learn_temperature: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False)
    sumto.simplex(
        lin,
        method="entmax",
        alpha=alpha,
        learn_alpha=True,
        learn_temperature=learn_temperature,
    )
    return lin


def pre_weights(lin: nn.Module) -> Tensor:
    original = lin.get_parameter("parametrizations.weight.original")
    return original


def constraint_of(module: nn.Module, name: str = "weight") -> sumto.Simplex:
    c = module.get_submodule(f"parametrizations.{name}.0")
    assert isinstance(c, sumto.Simplex)
    return c


def test_learned_parameters_are_seen_by_parameters_and_the_state_dict() -> None:
    lin = learned_model(alpha=torch.tensor([[1.2], [1.4], [1.6], [1.8]]))
    names = dict(lin.named_parameters())
    assert set(names) == {
        "parametrizations.weight.original",
        "parametrizations.weight.0.alpha_raw",
        "parametrizations.weight.0.temperature_raw",
    }
    assert {k for k in lin.state_dict() if k.endswith("_raw")} == {
        "parametrizations.weight.0.alpha_raw",
        "parametrizations.weight.0.temperature_raw",
    }
    c = constraint_of(lin)
    alpha = c.alpha
    assert isinstance(alpha, Tensor) and alpha.shape == (4, 1)
    torch.testing.assert_close(alpha.detach(), torch.tensor([[1.2], [1.4], [1.6], [1.8]]))
    temperature = c.temperature
    assert isinstance(temperature, Tensor)
    torch.testing.assert_close(temperature.detach(), torch.tensor(1.0))
    # the weight is entmax with those values, one alpha per row
    with torch.no_grad():
        want = ref_entmax(pre_weights(lin), alpha.detach(), (1,))
    assert_entmax_close(lin.weight.detach(), want, 1.8, pre_weights(lin))


def fixed_pre_weights(lin: nn.Module, value: Tensor) -> None:
    """Set the pre-weights and freeze them: only the constraint's parameters learn."""
    original = pre_weights(lin)
    with torch.no_grad():
        original.copy_(value)
    original.requires_grad_(False)


@pytest.mark.parametrize("goal", [1.9, 1.1])
def test_learned_alpha_moves_and_stays_in_range_under_adamw_at_lr_1(goal: float) -> None:
    """Targets made with alpha = goal pull alpha there; it stays in (1, 2) at every step.

    At lr=1.0 AdamW moves the raw parameter by about 1 per step and overshoots the
    goal: alpha = 1 + sigmoid(raw) keeps it inside (1, 2) all the same. At a small
    learning rate alpha converges to the goal.
    """
    z = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0]] * 4)
    target = entmax(z, goal)
    for lr, steps in ((1.0, 30), (0.05, 150)):
        lin = learned_model(learn_temperature=False)
        fixed_pre_weights(lin, z)
        c = constraint_of(lin)
        opt = torch.optim.AdamW([p for p in lin.parameters() if p.requires_grad], lr=lr)
        seen = []
        for _ in range(steps):
            loss = (lin.weight - target).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            alpha = c.alpha
            assert isinstance(alpha, Tensor) and bool(torch.isfinite(alpha))
            seen.append(float(alpha.detach()))
            assert 1.0 < seen[-1] < 2.0
        assert_constraints_hold(lin)
        assert (seen[-1] - 1.5) * (goal - 1.5) > 0.3 * (goal - 1.5) ** 2, seen
        if lr < 1.0:
            assert abs(seen[-1] - goal) < 0.02, seen


def test_learned_alpha_per_slice_learns_each_slice() -> None:
    z = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0]] * 4)
    goals = torch.tensor([[1.1], [1.4], [1.6], [1.9]])
    target = entmax(z, goals)
    lin = learned_model(alpha=torch.full((4, 1), 1.5), learn_temperature=False)
    fixed_pre_weights(lin, z)
    opt = torch.optim.AdamW([p for p in lin.parameters() if p.requires_grad], lr=0.05)
    for _ in range(150):
        loss = (lin.weight - target).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    alpha = constraint_of(lin).alpha
    assert isinstance(alpha, Tensor)
    torch.testing.assert_close(alpha.detach(), goals, rtol=0, atol=0.02)


@pytest.mark.parametrize("method", ["softmax", "sparsemax", "entmax"])
def test_learned_temperature_trains_and_stays_in_range(method: SimplexMethod) -> None:
    """A one-hot target needs a low temperature: T falls, the loss falls, T stays in range."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=False)
    sumto.simplex(lin, method=method, learn_temperature=True, temperature=2.0)
    c = constraint_of(lin)
    fixed_pre_weights(lin, torch.arange(5.0).repeat(3, 1) / 5)
    target = torch.zeros(3, 5)
    target[:, -1] = 1.0
    opt = torch.optim.AdamW([p for p in lin.parameters() if p.requires_grad], lr=1.0)
    first = float((lin.weight - target).pow(2).sum())
    for _ in range(40):
        loss = (lin.weight - target).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        temperature = float(c.temperature)
        low, high = sumto._checks.TEMPERATURE_RANGE
        assert low < temperature < high
    assert float(c.temperature) < 0.5
    assert float((lin.weight - target).pow(2).sum()) < 0.1 * first


def test_learned_values_survive_a_checkpoint_round_trip_and_bake() -> None:
    lin = learned_model(alpha=torch.tensor([1.3, 1.5, 1.7, 1.9]))
    opt = torch.optim.AdamW(lin.parameters(), lr=0.5)
    for _ in range(3):
        loss = (lin.weight[:, 0] - 1.0).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = save_and_load(lin.state_dict())
    fresh = learned_model(alpha=torch.tensor([1.5, 1.5, 1.5, 1.5]))  # another initial alpha
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight, lin.weight)
    fresh_alpha, alpha = constraint_of(fresh).alpha, constraint_of(lin).alpha
    assert isinstance(fresh_alpha, Tensor) and isinstance(alpha, Tensor)
    assert torch.equal(fresh_alpha, alpha)
    # fixed alpha, or no learned temperature: refused, naming both configurations
    for other in (
        cast(nn.Linear, sumto.simplex(nn.Linear(6, 4, bias=False), method="entmax", alpha=1.5)),
        learned_model(alpha=torch.tensor([1.5] * 4), learn_temperature=False),
    ):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match=re.escape("'learn_alpha': True")):
            other.load_state_dict(state)
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    # a raw parameter that is not finite is refused before anything is copied
    broken = dict(state)
    broken["parametrizations.weight.0.temperature_raw"] = torch.tensor(math.nan)
    broken_sd = type(state)(broken)
    broken_sd._metadata = state._metadata  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="expected valid checkpoint entries"):
        fresh.load_state_dict(broken_sd)
    # bake: the constrained value, as a plain parameter; a plain checkpoint loads back
    value = lin.weight.detach().clone()
    sumto.bake(lin)
    assert torch.equal(lin.weight, value)
    again = learned_model(alpha=torch.tensor([1.3, 1.5, 1.7, 1.9]))
    again.load_state_dict(lin.state_dict(), strict=False)
    assert_entmax_close(again.weight.detach(), value, 1.9, pre_weights(again))


def test_fixed_alpha_checkpoints_check_the_alpha() -> None:
    def model(alpha: float | Tensor) -> nn.Linear:
        lin = nn.Linear(5, 3, bias=False)
        sumto.simplex(lin, method="entmax", alpha=alpha)
        return lin

    per_row = model(torch.tensor([1.2, 1.5, 2.5]))
    state = save_and_load(per_row.state_dict())
    assert "parametrizations.weight.0.alpha" in state
    fresh = model(torch.tensor([1.5, 1.5, 1.5]))
    fresh.load_state_dict(state)  # the per-slice alpha is a saved tensor, like a total
    assert torch.equal(fresh.weight, per_row.weight)
    bad = type(state)({**state, "parametrizations.weight.0.alpha": torch.tensor([1.5, 0.5, 2.0])})
    bad._metadata = state._metadata  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="expected a finite alpha >= 1"):
        fresh.load_state_dict(bad)
    with pytest.raises(ValueError, match=re.escape("'alpha': 1.5")):
        model(1.3).load_state_dict(model(1.5).state_dict())
    with pytest.raises(ValueError, match=re.escape("'alpha': 'tensor'")):
        model(1.5).load_state_dict(state)


def test_older_configurations_still_load() -> None:
    """Keys are added to the saved configuration only where they differ from the defaults."""
    c = sumto.Simplex(method="sparsemax", temperature=0.5)
    assert c._config() == {"dim": None, "total": 1.0, "method": "sparsemax", "temperature": 0.5}
    assert sumto.Simplex(method="entmax")._config()["alpha"] == 1.5


def test_inspect_rebuilds_a_learned_entmax_constraint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.pt"
    torch.save(learned_model(alpha=torch.tensor([1.3, 1.5, 1.7, 1.9])).state_dict(), path)
    status, out, err = run_inspect(path, capsys)
    assert status == 0, err
    assert "method='entmax', learn_temperature=True, learn_alpha=True" in out
    assert "within the rounding tolerance" in out


@pytest.mark.slow
@pytestmark_compile
def test_learned_constraint_compiles_to_one_graph_with_equal_gradients() -> None:
    eager = learned_model(alpha=torch.tensor([1.3, 1.5, 1.7, 1.9]))
    compiled_model = learned_model(alpha=torch.tensor([1.3, 1.5, 1.7, 1.9]))
    backend = CountingBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    x = torch.randn(5, 6)
    for model in (eager, compiled):
        (model(x) ** 2).sum().backward()
    assert backend.graphs == 1
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------
# DDP: learned alpha and temperature, 2 processes with gloo on loopback
# ---------------------------------------------------------------------------

WORLD, STEPS, BATCH = 2, 4, 8


def ddp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        learned_model(alpha=torch.tensor([1.3, 1.5, 1.7, 1.9])), nn.Tanh(), nn.Linear(4, 2)
    )


def ddp_batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 2, generator=g)


def ddp_train(model: nn.Module, forward: nn.Module, rows: slice) -> dict[str, Tensor]:
    # SGD keeps the rounding difference of a distributed gradient at rounding size
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(STEPS):
        x, y = ddp_batch(step)
        opt.zero_grad()
        (forward(x[rows]) - y[rows]).square().mean().backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _ddp_worker(rank: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD
    )
    try:
        model = ddp_model()
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        result: dict[str, Any] = {"params": ddp_train(model, DistributedDataParallel(model), rows)}
    except Exception as err:
        result = {"error": f"{type(err).__name__}: {err}"}
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.distributed
def test_ddp_trains_learned_alpha_and_temperature_like_one_process(tmp_path: Path) -> None:
    context = mp.start_processes(
        _ddp_worker, args=(str(tmp_path),), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240.0
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed workers did not finish within 240 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank in ranks:
        assert "error" not in rank, rank["error"]
    single = ddp_model()
    want = ddp_train(single, single, slice(None))
    for rank in ranks:
        assert_params_match(rank["params"], want, 1e-5)
    start = dict(ddp_model().named_parameters())
    for key in (
        "0.parametrizations.weight.0.alpha_raw",
        "0.parametrizations.weight.0.temperature_raw",
    ):
        assert not torch.allclose(want[key], start[key]), key  # they trained
