"""Transport polytopes: project_transport, sinkhorn, the Transport constraint and doubly_stochastic.

The projection is compared with a long float64 Dykstra run (the value) and certified
by scipy's LP solver (the variational inequality of a projection), independently of
the library's own optimality check; Sinkhorn with a plain-domain float64 Sinkhorn.
"""

from __future__ import annotations

import importlib.util
import math
import runpy
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sumto
from reference import (
    CountingBackend,
    assert_on_set,
    assert_transport,
    ref_project_transport,
    ref_sinkhorn,
    save_and_load,
    transport_optimality_gap,
)
from sumto import _transport
from sumto.functional import project_transport, sinkhorn

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
needs_scipy = pytest.mark.skipif(not HAS_SCIPY, reason="scipy is not installed")
ROOT = Path(__file__).resolve().parents[1]


def _sums(r: Any, c: Any, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    *batch, m, n = shape
    rr = torch.as_tensor(r, dtype=torch.float64).expand(*batch, m)
    cc = torch.as_tensor(c, dtype=torch.float64).expand(*batch, n)
    return rr, cc


def _check_projection(x: torch.Tensor, r: Any = 1.0, c: Any = 1.0, gap_k: float = 64.0) -> None:
    """On the set, equal to Dykstra, and certified optimal by the LP, matrix by matrix."""
    p = project_transport(x, r, c)
    assert p.shape == x.shape and p.dtype == x.dtype
    assert_transport(p, r, c)
    rr, cc = _sums(r, c, tuple(x.shape))
    reference = ref_project_transport(x, rr, cc)
    scale = float(x.abs().max()) + float(rr.max()) + 1.0
    assert float((p.double() - reference).abs().max()) <= 1e-7 * scale
    flat_x = x.double().reshape(-1, *x.shape[-2:])
    flat_p = p.double().reshape(-1, *x.shape[-2:])
    for xi, pi, ri, ci in zip(
        flat_x, flat_p, rr.reshape(-1, x.shape[-2]), cc.reshape(-1, x.shape[-1]), strict=True
    ):
        gap = transport_optimality_gap(xi, pi, ri, ci)
        tol = gap_k * (xi.shape[0] + xi.shape[1]) * 2.2e-16 * scale * float(ri.sum() + 1)
        assert gap <= tol, f"optimality gap {gap:.3g} > {tol:.3g}"


# ---------------------------------------------------------------------------
# project_transport against independent references
# ---------------------------------------------------------------------------


@needs_scipy
@pytest.mark.parametrize(
    ("shape", "scale"),
    [
        ((3, 3), 1.0),
        ((5, 5), 1.0),
        ((4, 7), 1.0),
        ((6, 6), 10.0),
        ((3, 4, 4), 0.1),
        ((2, 3, 5), 3.0),
    ],
)
def test_project_random_matches_dykstra_and_is_certified(
    shape: tuple[int, ...], scale: float
) -> None:
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, dtype=torch.float64) * scale
    m, n = shape[-2:]
    _check_projection(x, 1.0 * n / math.gcd(m, n), 1.0 * m / math.gcd(m, n))


@needs_scipy
def test_project_tensor_sums_batched_non_square() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    r = torch.rand(3, 4, dtype=torch.float64) + 0.2
    c = torch.rand(3, 6, dtype=torch.float64) + 0.2
    c = c * r.sum(-1, keepdim=True) / c.sum(-1, keepdim=True)
    _check_projection(x, r, c)
    # a row vector of sums broadcast over the batch
    r1 = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    _check_projection(x, r1, 1.0)


@needs_scipy
@pytest.mark.parametrize(
    "case", ["all_equal", "ties", "zero_sums", "integer_grid", "permutation_noise"]
)
def test_project_degenerate_cases(case: str) -> None:
    torch.manual_seed(2)
    r: Any = 1.0
    c: Any = 1.0
    if case == "all_equal":
        x = torch.full((4, 4), 3.0, dtype=torch.float64)
    elif case == "ties":
        x = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    elif case == "zero_sums":
        x = torch.randn(4, 5, dtype=torch.float64)
        r = torch.tensor([0.0, 2.0, 0.0, 3.0], dtype=torch.float64)
        c = torch.tensor([1.0, 0.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    elif case == "integer_grid":
        x = torch.randint(-2, 3, (5, 5)).double()
    else:
        perm = torch.eye(5, dtype=torch.float64)[torch.randperm(5)]
        x = perm + 0.05 * torch.randn(5, 5, dtype=torch.float64)
    _check_projection(x, r, c)
    p = project_transport(x, r, c)
    if case == "all_equal":
        assert torch.allclose(p, torch.full_like(x, 0.25), rtol=0, atol=1e-15)
    if case == "zero_sums":
        assert bool((p[[0, 2]] == 0).all()) and bool((p[:, [1, 4]] == 0).all())


@pytest.mark.parametrize("scale", [5.0, 100.0, 1e4])
def test_project_vertex_is_the_permutation(scale: float) -> None:
    torch.manual_seed(3)
    perm = torch.eye(6, dtype=torch.float64)[torch.randperm(6)]
    x = scale * perm + torch.rand(6, 6, dtype=torch.float64)
    p = project_transport(x)
    assert torch.equal(p, perm)
    assert torch.equal(project_transport(x.float()), perm.float())


def test_project_float32_is_exact_in_its_dtype() -> None:
    torch.manual_seed(4)
    x = torch.randn(8, 16, 16) * 4
    p = project_transport(x)
    assert p.dtype == torch.float32
    assert_transport(p, 1.0, 1.0)
    p64 = project_transport(x.double())
    assert float((p.double() - p64).abs().max()) <= 64 * 1.2e-7 * 4 * 4
    # idempotent: a projection of a point on the set stays there (to rounding)
    assert float((project_transport(p) - p).abs().max()) <= 1e-6


def test_project_forbidden_entries() -> None:
    torch.manual_seed(5)
    x = torch.randn(4, 4, dtype=torch.float64)
    mask = torch.eye(4, dtype=torch.bool)
    p = project_transport(x.masked_fill(mask, -math.inf))
    assert bool((p[mask] == 0).all())
    assert_transport(p, 1.0, 1.0)
    # the same as forbidding by a value far below every other entry
    far = project_transport(x.masked_fill(mask, -1e3))
    assert torch.allclose(p, far, rtol=0, atol=1e-12)


def test_project_fixed_schedule_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The schedule run on GPUs and under transforms (no host sync) finds the same plans."""
    torch.manual_seed(6)
    cases = [
        torch.randn(5, 6, 6, dtype=torch.float64),
        10 * torch.randn(4, 8, 8, dtype=torch.float64),
        torch.full((2, 3, 3), 1.0, dtype=torch.float64),
        50 * torch.eye(7, dtype=torch.float64)[torch.randperm(7)].expand(2, 7, 7),
    ]
    eager = [project_transport(x) for x in cases]
    monkeypatch.setattr(_transport, "eager", lambda x: False)
    for x, want in zip(cases, eager, strict=True):
        r, c = _transport.marginals(1.0, 1.0, x)
        _, _, ok = _transport._search(x, r, c, torch.ones_like(x, dtype=torch.bool))
        assert bool(ok.all())
        got = project_transport(x)
        assert torch.allclose(got, want, rtol=0, atol=1e-13)


def test_project_fallback_is_feasible(monkeypatch: pytest.MonkeyPatch) -> None:
    """A matrix that never passes the optimality check still gets a plan on the set."""
    monkeypatch.setattr(_transport, "eager", lambda x: False)
    monkeypatch.setattr(_transport, "_FIXED_ITERS", 0)
    monkeypatch.setattr(_transport, "_FINISH_ROUNDS", 0)
    torch.manual_seed(21)
    x = (5 * torch.randn(3, 6, 6, dtype=torch.float64)).requires_grad_()
    p = project_transport(x)
    assert_transport(p.detach(), 1.0, 1.0)
    p.square().sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_round_to_transport_is_feasible_and_close() -> None:
    torch.manual_seed(7)
    p = torch.rand(3, 5, 4, dtype=torch.float64)
    r = torch.full((3, 5), 0.8, dtype=torch.float64)
    c = torch.ones(3, 4, dtype=torch.float64)
    q = _transport.round_to_transport(p, r, c)
    assert_transport(q, r, c)
    zero_rows = _transport.round_to_transport(torch.zeros(2, 2), torch.zeros(2), torch.zeros(2))
    assert torch.equal(zero_rows, torch.zeros(2, 2))


# ---------------------------------------------------------------------------
# gradients and transforms
# ---------------------------------------------------------------------------


def test_project_gradcheck_away_from_kinks() -> None:
    torch.manual_seed(8)
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    y = project_transport(x.detach(), 1.25, 1.0)
    margin = float(torch.where(y > 0, y, torch.inf).min())
    assert margin > 1e-3  # the finite differences stay on one linear piece
    fn = lambda t: project_transport(t, 1.25, 1.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-8)

    # the sums, along changes that keep the totals equal
    u = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)

    def with_sums(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r = 1.25 + 0.1 * (u - u.mean(-1, keepdim=True))
        c = 1.0 + 0.1 * (v - v.mean(-1, keepdim=True))
        return project_transport(x, r, c)

    assert torch.autograd.gradcheck(with_sums, (x, u, v), eps=1e-6, atol=1e-8)


def test_project_jacobian_is_the_tangent_projector() -> None:
    """J = orthogonal projector onto {D on S: D 1 = 0, D^T 1 = 0}: symmetric, idempotent."""
    torch.manual_seed(9)
    x = torch.randn(4, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(project_transport, x).reshape(16, 16)
    assert torch.allclose(jac, jac.T, atol=1e-12)
    assert torch.allclose(jac @ jac, jac, atol=1e-12)
    support = (project_transport(x) > 0).reshape(16)
    assert bool((jac[~support] == 0).all())
    ones_rows = torch.kron(torch.eye(4), torch.ones(1, 4)).double()  # row sums of vec(D)
    ones_cols = torch.kron(torch.ones(1, 4), torch.eye(4)).double()
    assert float((ones_rows @ jac).abs().max()) < 1e-12
    assert float((ones_cols @ jac).abs().max()) < 1e-12
    rank = int(torch.linalg.matrix_rank(jac))
    edges = int(support.sum())
    assert rank == edges - (4 + 4 - 1)  # one spanning tree of a connected support


def test_project_torch_func() -> None:
    torch.manual_seed(10)
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    batched = torch.func.vmap(project_transport)(x)
    assert torch.allclose(batched, project_transport(x), atol=1e-13)
    jac = torch.func.jacrev(project_transport)(x[0])
    fwd = torch.func.jacfwd(project_transport)(x[0])
    assert torch.allclose(jac, fwd, atol=1e-12)


def _compiled_matches_eager(fn: Any, x: torch.Tensor) -> int:
    counting = CountingBackend("aot_eager")
    compiled = torch.compile(fn, backend=counting)
    got = compiled(x)
    want = fn(x)
    assert torch.allclose(got, want, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    (g_want,) = torch.autograd.grad(want.square().sum(), x)
    assert torch.allclose(g_got, g_want, atol=1e-10)
    return counting.graphs


@pytest.mark.usefixtures("fresh_dynamo")
def test_sinkhorn_compiles_in_one_graph() -> None:
    torch.manual_seed(11)
    x = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert _compiled_matches_eager(lambda t: sinkhorn(t, iters=5), x) == 1


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_project_compiles() -> None:
    """The fixed schedule (no host sync) traces; dynamo unrolls it, hence slow."""
    torch.manual_seed(11)
    x = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert _compiled_matches_eager(project_transport, x) >= 1


# ---------------------------------------------------------------------------
# sinkhorn
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 4), (3, 5, 5), (4, 6)])
def test_sinkhorn_matches_reference_and_tolerance(shape: tuple[int, ...]) -> None:
    torch.manual_seed(12)
    m, n = shape[-2:]
    r, c = float(n), float(m)
    x = torch.randn(shape, dtype=torch.float64)
    p = sinkhorn(x, r, c, iters=500, tol=1e-12)
    assert bool((p > 0).all())
    assert float((p.sum(-2) - c).abs().max()) <= 1e-13 * m  # the last update: exact columns
    assert float((p.sum(-1) - r).abs().max()) <= 1e-12
    want = ref_sinkhorn(x, r, c, 2000)
    assert torch.allclose(p, want, atol=1e-11)
    # float32, default iterations: within float32 rounding of the converged value
    p32 = sinkhorn(x.float(), r, c)
    assert p32.dtype == torch.float32
    assert float((p32.double() - want).abs().max()) <= 1e-5


def test_sinkhorn_tol_stops_early() -> None:
    torch.manual_seed(13)
    x = torch.randn(6, 6, dtype=torch.float64)
    p = sinkhorn(x, tol=1e-4, iters=10_000)
    row_error = float((p.sum(-1) - 1).abs().max())
    assert row_error <= 1e-4
    assert row_error > 1e-12  # it stopped before converging to rounding


def test_sinkhorn_gradcheck() -> None:
    torch.manual_seed(14)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda t: sinkhorn(t, 4.0, 3.0, iters=30)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_sinkhorn_never_nan() -> None:
    x = torch.tensor([[0.0, -math.inf, 1.0], [-math.inf, -math.inf, 2.0], [80.0, 0.0, -80.0]])
    x.requires_grad_(True)
    p = sinkhorn(x)
    assert bool(torch.isfinite(p).all())
    assert p[0, 1] == 0 and p[1, 0] == 0 and p[1, 1] == 0
    assert torch.allclose(p.sum(0), torch.ones(3), atol=1e-5)
    p.square().sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    # zero sums and a column without a finite entry: zeros, no NaN
    y = torch.zeros(3, 3).index_fill(1, torch.tensor([2]), -math.inf)
    q = sinkhorn(y, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert bool(torch.isfinite(q).all()) and bool((q[2] == 0).all()) and bool((q[:, 2] == 0).all())
    big = sinkhorn(torch.tensor([[1e4, -1e4], [-1e4, 1e4]]))
    assert bool(torch.isfinite(big).all())


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [project_transport, sinkhorn])
def test_errors(fn: Any) -> None:
    with pytest.raises(ValueError, match="equal totals"):
        fn(torch.zeros(3, 4))  # 3 rows of 1 vs 4 columns of 1
    with pytest.raises(ValueError, match="equal totals"):
        fn(torch.zeros(2, 2), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=">= 0"):
        fn(torch.zeros(2, 2), -1.0, -1.0)
    with pytest.raises(ValueError, match=">= 0"):
        fn(torch.zeros(2, 2), torch.tensor([2.0, -1.0]), 0.5)
    with pytest.raises(ValueError, match="finite"):
        fn(torch.zeros(2, 2), math.nan, math.nan)
    with pytest.raises(IndexError, match="at least 2 dims"):
        fn(torch.zeros(4))
    with pytest.raises(TypeError, match="floating point"):
        fn(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="row_sums"):
        fn(torch.zeros(2, 2), "1", 1.0)
    with pytest.raises(ValueError, match="broadcastable"):
        fn(torch.zeros(2, 3, 3), torch.ones(3, 3), 1.0)
    with pytest.raises(ValueError, match="one row and one column"):
        fn(torch.zeros(2, 0, 0))


def test_sinkhorn_argument_errors() -> None:
    with pytest.raises(ValueError, match="iters >= 1"):
        sinkhorn(torch.zeros(2, 2), iters=0)
    with pytest.raises(TypeError, match="iters"):
        sinkhorn(torch.zeros(2, 2), iters=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tol > 0"):
        sinkhorn(torch.zeros(2, 2), tol=0.0)
    with pytest.raises(ValueError, match="method"):
        sumto.Transport(method="hungarian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        sumto.Transport(row_sums=-1.0)


# ---------------------------------------------------------------------------
# property
# ---------------------------------------------------------------------------


@given(
    m=st.integers(1, 6),
    n=st.integers(1, 6),
    scale=st.sampled_from([0.01, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_property_on_the_set_and_idempotent(m: int, n: int, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g, dtype=torch.float64) * scale
    x = torch.where(torch.rand(m, n, generator=g) < 0.2, x.round(), x)  # some ties
    p = project_transport(x, float(n), float(m))
    assert_transport(p, float(n), float(m))
    again = project_transport(p, float(n), float(m))
    assert float((again - p).abs().max()) <= 64 * 2.2e-16 * max(m, n) * (1 + scale)


# ---------------------------------------------------------------------------
# the Transport constraint and doubly_stochastic
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sinkhorn", "project"])
def test_register_square_and_non_square(method: str) -> None:
    torch.manual_seed(15)
    lin = sumto.doubly_stochastic(nn.Linear(5, 5), method=method)  # type: ignore[arg-type]
    constraint = lin.parametrizations.weight[0]
    assert isinstance(constraint, sumto.Transport)
    assert_on_set(constraint, lin.weight)
    assert_transport(lin.weight.detach(), 1.0, 1.0)
    assert sumto.check(lin)["weight"] <= constraint.tolerance(lin.weight)
    # non-square: a (5, 3) weight, rows summing to 0.6 and columns to 1
    wide = sumto.doubly_stochastic(nn.Linear(3, 5), method=method, row_sums=0.6)  # type: ignore[arg-type]
    assert_transport(wide.weight.detach(), 0.6, 1.0)
    with pytest.raises(ValueError, match="equal totals"):
        sumto.doubly_stochastic(nn.Linear(3, 5), method=method)  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        sumto.doubly_stochastic(nn.Linear(3, 5), "bias")
    tied = nn.Linear(4, 4)
    other = nn.Linear(4, 4)
    other.weight = tied.weight
    with pytest.raises(ValueError, match="tied"):
        sumto.doubly_stochastic(tied)


def test_tensor_sums_and_batched_weight() -> None:
    torch.manual_seed(16)
    r = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    c = torch.tensor([2.0, 4.0])
    holder = nn.Module()
    holder.register_parameter("weight", nn.Parameter(torch.randn(2, 3, 2)))
    sumto.doubly_stochastic(holder, row_sums=r, col_sums=c.expand(2, 2))
    assert_transport(holder.weight.detach(), r, c.expand(2, 2))
    sd = save_and_load(holder.state_dict())
    fresh = nn.Module()
    fresh.register_parameter("weight", nn.Parameter(torch.randn(2, 3, 2)))
    sumto.doubly_stochastic(fresh, row_sums=r, col_sums=c.expand(2, 2))
    fresh.load_state_dict(sd)
    assert torch.allclose(fresh.weight, holder.weight)
    bad = dict(sd)
    bad["parametrizations.weight.0.row_sums"] = -r
    with pytest.raises(ValueError, match=">= 0"):
        fresh.load_state_dict(bad)


@pytest.mark.parametrize("method", ["sinkhorn", "project"])
def test_assignment_state_dict_and_bake(method: str) -> None:
    torch.manual_seed(17)
    lin = sumto.doubly_stochastic(nn.Linear(4, 4, bias=False), method=method)  # type: ignore[arg-type]
    target = sumto.Transport().sample((4, 4), dtype=torch.float32)
    lin.weight = target
    assert float((lin.weight.detach() - target).abs().max()) <= 1e-6
    lin.weight = torch.eye(4)[[2, 0, 3, 1]]  # a vertex, with exact zeros
    assert float((lin.weight.detach() - torch.eye(4)[[2, 0, 3, 1]]).abs().max()) <= 1e-6
    with pytest.raises(ValueError, match="satisfy Transport"):
        lin.weight = torch.full((4, 4), 0.3)
    state = save_and_load(lin.state_dict())
    again = sumto.doubly_stochastic(nn.Linear(4, 4, bias=False), method=method)  # type: ignore[arg-type]
    again.load_state_dict(state)
    assert torch.equal(again.weight, lin.weight)
    other = "project" if method == "sinkhorn" else "sinkhorn"
    refused = sumto.doubly_stochastic(nn.Linear(4, 4, bias=False), method=other)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pre-weights would change meaning"):
        refused.load_state_dict(state)
    value = lin.weight.detach().clone()
    sumto.bake(lin)
    assert sorted(lin.state_dict()) == ["weight"]
    assert torch.equal(lin.weight.detach(), value)
    plain = lin.state_dict()
    into = sumto.doubly_stochastic(nn.Linear(4, 4, bias=False), method=method)  # type: ignore[arg-type]
    into.load_state_dict(plain)  # a plain checkpoint of a baked weight loads back
    assert float((into.weight.detach() - value).abs().max()) <= 1e-6


def test_sample_and_contains() -> None:
    c = sumto.Transport(row_sums=1.0, col_sums=2.0)
    g = torch.Generator().manual_seed(0)
    p = c.sample((3, 4, 2), generator=g)
    assert p.shape == (3, 4, 2) and p.dtype == torch.get_default_dtype()
    assert c.contains(p) and bool((p > 0).all())
    again = c.sample((3, 4, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(p, again)
    assert c.contains(c.sample((4, 2), dtype=torch.float64))
    assert c.contains(c.sample((4, 2), dtype=torch.bfloat16))
    assert not c.contains(torch.ones(4, 2))
    assert not c.contains(torch.full((3, 3), 1.0))  # the sums do not fit this shape
    assert not c.contains(torch.tensor([[1.5, 0.5], [-0.5, 1.5]]))
    assert c.contains(torch.tensor([[0.5, 0.5]] * 4) + torch.tensor([[0.0, 1e-3]]), atol=1e-2)
    with pytest.raises(ValueError, match="shape"):
        c.sample()
    with pytest.raises(IndexError):
        c.sample(4)
    lin = sumto.doubly_stochastic(
        nn.Linear(3, 3, bias=False), init=sumto.Transport().sample((3, 3))
    )
    registered = lin.parametrizations.weight[0]
    assert registered.sample().shape == (3, 3)
    assert registered.contains(lin.weight) and not registered.contains(torch.eye(4))


@pytest.mark.usefixtures("fresh_dynamo")
def test_sinkhorn_constraint_compiles_in_one_graph() -> None:
    torch.manual_seed(18)
    lin = sumto.doubly_stochastic(nn.Linear(4, 4, bias=False), iters=5)
    counting = CountingBackend("aot_eager")
    compiled = torch.compile(lin, backend=counting, fullgraph=True)
    x = torch.randn(3, 4)
    assert torch.allclose(compiled(x), lin(x), atol=1e-6)
    compiled(x).sum().backward()
    assert counting.graphs == 1


def test_project_on_step_keeps_a_plain_parameter_on_the_set() -> None:
    torch.manual_seed(19)
    lin = nn.Linear(5, 5, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    constraint = sumto.Transport()
    handle = sumto.project_on_step(opt, lin.weight, constraint)
    assert_transport(lin.weight.detach(), 1.0, 1.0)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(8, 5)).square().sum().backward()
        opt.step()
        assert_transport(lin.weight.detach(), 1.0, 1.0)
    assert sumto.check(lin)["weight"] <= constraint.tolerance(lin.weight.detach())
    assert sorted(lin.state_dict()) == ["weight"]
    handle.remove()


@pytest.mark.parametrize("method", ["sinkhorn", "project"])
def test_training_recovers_a_permutation(method: str) -> None:
    """Learn P with P x = x[perm] from examples; P converges to the permutation matrix."""
    torch.manual_seed(20)
    n = 6
    perm = torch.randperm(n)
    lin = sumto.doubly_stochastic(
        nn.Linear(n, n, bias=False),
        method=method,  # type: ignore[arg-type]
        init=torch.full((n, n), 1.0 / n),
    )
    opt = torch.optim.Adam(lin.parameters(), lr=0.1 if method == "sinkhorn" else 0.02)
    for _ in range(200):
        x = torch.randn(32, n)
        loss = (lin(x) - x[:, perm]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = lin.weight.detach()
    assert_transport(w, 1.0, 1.0)
    assert torch.equal(w.argmax(1), perm)
    assert float((w - torch.eye(n)[perm]).abs().max()) < 0.05


@needs_scipy
def test_learn_permutation_recipe() -> None:
    namespace = runpy.run_path(str(ROOT / "examples" / "learn_permutation.py"))
    result = namespace["main"](steps=200, seed=0)
    assert result["recovered"] == result["true"]
    assert result["violation"] <= 1e-5


@pytest.mark.parametrize("method", ["sinkhorn", "project"])
def test_meta_device_model_loads_a_checkpoint(method: str) -> None:
    """Built on the meta device (no values), then to_empty and a checkpoint load."""
    torch.manual_seed(22)
    r = torch.tensor([[1.0, 2.0, 3.0]])
    source = nn.Module()
    source.register_parameter("weight", nn.Parameter(torch.randn(1, 3, 2)))
    sumto.doubly_stochastic(source, method=method, row_sums=r, col_sums=3.0)  # type: ignore[arg-type]
    with torch.device("meta"):
        target = nn.Module()
        target.register_parameter("weight", nn.Parameter(torch.empty(1, 3, 2)))
        sumto.doubly_stochastic(target, method=method, row_sums=r, col_sums=3.0)  # type: ignore[arg-type]
    target.to_empty(device="cpu")
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.weight, source.weight)
    assert_transport(target.weight.detach(), r, 3.0)


@pytest.mark.parametrize("method", ["sinkhorn", "project"])
def test_init_sample_registers_a_point_of_the_set(method: str) -> None:
    torch.manual_seed(0)
    layer = sumto.doubly_stochastic(nn.Linear(4, 4, bias=False), method=method, init="sample")
    constraint = layer.parametrizations.weight[0]
    assert constraint.contains(layer.weight)
    layer.weight = layer.weight.detach()  # what it produced it accepts back
