"""sumto._autograd: every autograd and torch.func transform on every projection and constraint.

The maps are compared with float64 reference Jacobians built from the reference
projections of tests/reference.py (on the free set ``F`` of ``clamp(x - tau, l, u)``,
``J = I_F - 1_F 1_F^T / |F|``), with closed forms for softmax, relu and linear
equality, and with central finite differences of reference gradients for Hessians.
Points are generic: every entry of ``x - tau`` lies at least ``MARGIN`` from a bound
(checked), so the maps are differentiable there.

Transforms: ``torch.func.grad``, ``vmap`` (with and without grad, with a batched
tensor total), ``jacrev``, ``jacfwd``, ``jvp``, ``hessian``, ``gradcheck`` and
``gradgradcheck`` (with a tensor total requiring grad) and ``torch.compile``
(``fullgraph=True``; aot_eager, and one inductor case marked slow). Constraint
classes are differentiated with respect to their pre-weights through
``torch.func.functional_call`` on a registered module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import sumto
from reference import (
    CountingBackend,
    fd_jacobian,
    kink_margin,
    ref_clamp_shift_jacobian,
    ref_project_box_entries,
    ref_project_box_sum,
    ref_project_simplex,
    ref_project_sum,
)
from sumto import _search
from sumto.functional import project_box_sum, project_simplex, project_sum

F64 = torch.float64
MARGIN = 1e-2
ATOL = 1e-12
X = torch.tensor([0.9, -0.4, 0.35, 1.7, -1.2, 0.05, 0.6], dtype=F64)
N = X.numel()


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def close(actual: Tensor, expected: Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=0, atol=atol)


def batch_of_points(seed: int, batch: int = 4) -> Tensor:
    """Rows near ``X`` (small generic perturbations: the same kinks are avoided)."""
    g = torch.Generator().manual_seed(seed)
    return X + 0.01 * torch.rand(batch, N, generator=g, dtype=F64)


# ---------------------------------------------------------------------------
# the functional maps
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Map:
    name: str
    lower: float | Tensor
    upper: float | Tensor
    total: float

    def __call__(self, x: Tensor, total: Tensor | float | None = None) -> Tensor:
        c = self.total if total is None else total
        if self.name == "project_sum":
            return project_sum(x, c)
        if self.name == "project_simplex":
            return project_simplex(x, c)
        return project_box_sum(x, c, lower=self.lower, upper=self.upper)

    def reference(self, x: Tensor, total: Tensor | float | None = None) -> Tensor:
        """Reference projection of rows ``x`` (float64)."""
        c = self.total if total is None else total
        rows = x.double().reshape(-1, x.shape[-1])
        if isinstance(c, Tensor):
            c = float(c) if c.numel() == 1 else c.double().reshape(-1, 1)
        if self.name == "project_sum":
            out = ref_project_sum(rows, c)
        elif self.name == "project_simplex":
            out = ref_project_simplex(rows, c)
        elif isinstance(self.lower, Tensor) or isinstance(self.upper, Tensor):
            out = ref_project_box_entries(rows, c, (-1,), self.lower, self.upper)
        else:
            out = ref_project_box_sum(rows, c, (-1,), self.lower, self.upper)
        return out.reshape(x.shape)

    def jacobian(self, x: Tensor, total: float | None = None) -> tuple[Tensor, Tensor]:
        """``(dy/dx, dy/dtotal)`` at a 1-D ``x`` from the reference free set."""
        c = self.total if total is None else total
        return ref_clamp_shift_jacobian(x, c, self.lower, self.upper)


MAPS = [
    Map("project_sum", -math.inf, math.inf, 0.7),
    Map("project_simplex", 0.0, math.inf, 1.0),
    Map("box-two-sided", -0.3, 0.45, 0.5),
    Map("box-lower-only", -0.2, math.inf, 0.4),
    Map("box-upper-only", -math.inf, 0.3, 0.1),
    Map(
        "box-per-entry",
        torch.tensor([-0.3, -0.2, -0.5, -0.3, -0.1, -0.4, -0.3], dtype=F64),
        torch.tensor([0.45, 0.6, 0.3, 0.45, 0.5, 0.35, 0.45], dtype=F64),
        0.5,
    ),
]
MAP_IDS = [m.name for m in MAPS]
maps = pytest.mark.parametrize("fn", MAPS, ids=MAP_IDS)


@maps
def test_points_are_generic(fn: Map) -> None:
    """The fixtures' guard: kinks are far, and both free and bound entries occur."""
    for x in [X, *batch_of_points(0)]:
        assert kink_margin(x, fn.total, fn.lower, fn.upper) >= MARGIN
        free = ref_clamp_shift_jacobian(x, fn.total, fn.lower, fn.upper)[1] > 0
        assert int(free.sum()) >= 2
        if fn.name != "project_sum":
            assert not bool(free.all())
        close(fn(x), fn.reference(x))


@maps
def test_grad(fn: Map) -> None:
    w = torch.linspace(-1.0, 2.0, N, dtype=F64)
    jac, _ = fn.jacobian(X)
    close(grad(lambda v: (fn(v) * w).sum())(X), jac.T @ w)


@maps
def test_jacrev_and_jacfwd_wrt_input_and_total(fn: Map) -> None:
    jac_x, jac_c = fn.jacobian(X)
    c = torch.tensor(fn.total, dtype=F64)
    for transform in (jacrev, jacfwd):
        close(transform(fn)(X), jac_x)
        close(transform(fn, argnums=1)(X, c), jac_c)


@maps
def test_jvp_wrt_input_and_total(fn: Map) -> None:
    jac_x, jac_c = fn.jacobian(X)
    dx = torch.linspace(0.3, -0.9, N, dtype=F64)
    y, dy = jvp(fn, (X,), (dx,))
    close(y, fn.reference(X))
    close(dy, jac_x @ dx)
    c = torch.tensor(fn.total, dtype=F64)
    _, dy = jvp(fn, (X, c), (dx, torch.tensor(0.25, dtype=F64)))
    close(dy, jac_x @ dx + 0.25 * jac_c)


@maps
def test_vmap_without_grad(fn: Map) -> None:
    xs = batch_of_points(1)
    assert not xs.requires_grad
    close(vmap(fn)(xs), fn.reference(xs))
    # a batch dim that is not the first one
    close(vmap(fn, in_dims=1)(xs.T.contiguous()), fn.reference(xs))


@maps
def test_vmap_over_a_batched_tensor_total(fn: Map) -> None:
    xs = batch_of_points(2)
    totals = fn.total + torch.tensor([0.0, 0.01, -0.01, 0.02], dtype=F64)
    # one 0-d total per sample, and one total shared by every sample
    close(vmap(fn)(xs, totals), fn.reference(xs, totals))
    close(vmap(fn, in_dims=(0, None))(xs, totals[1]), fn.reference(xs, totals[1]))
    close(vmap(fn, in_dims=(None, 0))(X, totals), fn.reference(X.expand(4, N), totals))


@maps
def test_vmap_of_grad_and_of_jacrev(fn: Map) -> None:
    xs = batch_of_points(3)
    w = torch.linspace(-1.0, 2.0, N, dtype=F64)
    grads = vmap(grad(lambda v: (fn(v) * w).sum()))(xs)
    jacs = vmap(jacrev(fn))(xs)
    for x, g, j in zip(xs, grads, jacs, strict=True):
        jac, _ = fn.jacobian(x)
        close(g, jac.T @ w)
        close(j, jac)
    totals = torch.tensor([0.9, 1.0, 1.1, 1.2], dtype=F64) * fn.total
    grads_c = vmap(grad(lambda v, c: (fn(v, c) * w).sum(), argnums=1))(xs, totals)
    for x, c, g in zip(xs, totals, grads_c, strict=True):
        close(g, fn.jacobian(x, float(c))[1] @ w)


@maps
def test_hessian(fn: Map) -> None:
    jac, _ = fn.jacobian(X)
    # piecewise linear: a linear loss has zero curvature, a quadratic one J^T J
    close(hessian(lambda v: (fn(v) * torch.arange(N, dtype=F64)).sum())(X), torch.zeros(N, N))
    close(hessian(lambda v: 0.5 * fn(v).square().sum())(X), jac.T @ jac)


@maps
def test_gradcheck_and_gradgradcheck_with_a_total_requiring_grad(fn: Map) -> None:
    x = batch_of_points(4, batch=2).requires_grad_()
    total = torch.tensor([[fn.total], [fn.total * 1.1]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, total))
    assert torch.autograd.gradgradcheck(fn, (x, total))


@maps
def test_backward_of_the_total_matches_the_reference(fn: Map) -> None:
    x = X.clone().requires_grad_()
    total = torch.tensor(fn.total, dtype=F64, requires_grad=True)
    w = torch.linspace(-1.0, 2.0, N, dtype=F64)
    (fn(x, total) * w).sum().backward()
    jac_x, jac_c = fn.jacobian(X)
    assert x.grad is not None and total.grad is not None
    close(x.grad, jac_x.T @ w)
    close(total.grad, jac_c @ w)


@pytest.mark.parametrize("search", ["sort", "newton"])
@pytest.mark.parametrize(
    ("lower", "upper"),
    [(0.0, math.inf), (-0.05, 0.05), (-1e-3, math.inf), (-math.inf, 2e-3)],
    ids=["simplex", "box", "lower", "upper"],
)
def test_gradients_on_long_rows_follow_the_free_set_formula(
    lower: float, upper: float, search: str
) -> None:
    # Rows long enough for the pruned Newton search in eager mode, per-row totals:
    # grad_x = 1_F (g - mean_F g) and grad_c = mean_F g with F from the reference.
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 1500, generator=g, dtype=F64)
    total = torch.tensor([[1.0], [0.5], [3.0], [2.0]], dtype=F64)
    weight = torch.randn(4, 1500, generator=g, dtype=F64)
    xr, tr = x.clone().requires_grad_(), total.clone().requires_grad_()
    with _search.forced(search):  # type: ignore[arg-type]
        y = project_box_sum(xr, tr, lower=lower, upper=upper)
        with torch.no_grad():
            plain = project_box_sum(x, total, lower=lower, upper=upper)
    close(y.detach(), plain, atol=1e-15)  # no_grad and autograd compute the same values
    (y * weight).sum().backward()
    expected = ref_project_box_sum(x, total, (-1,), lower, upper)
    free = ((expected > lower) & (expected < upper)).double()
    mean = (weight * free).sum(-1, keepdim=True) / free.sum(-1, keepdim=True)
    assert xr.grad is not None and tr.grad is not None
    close(xr.grad, free * (weight - mean))
    close(tr.grad, mean)


def compiled_values_and_grads(
    fn: Callable[[Tensor, Tensor], Tensor], backend: str, xs: Tensor, total: Tensor
) -> None:
    """Compiled values and gradients (input and total) equal eager; one graph."""
    counting = CountingBackend(backend)
    compiled = torch.compile(fn, fullgraph=True, backend=counting)
    w = torch.linspace(-1.0, 2.0, xs.shape[-1], dtype=xs.dtype)
    results = []
    for f in (fn, compiled):
        x = xs.clone().requires_grad_()
        c = total.clone().requires_grad_()
        y = f(x, c)
        gx, gc = torch.autograd.grad((y * w).sum(), (x, c))
        results.append((y.detach(), gx, gc))
    for eager, comp in zip(*results, strict=True):
        close(comp, eager, atol=1e-12)
    assert counting.graphs == 1


@maps
def test_compile_fullgraph_aot_eager(fn: Map) -> None:
    xs = batch_of_points(5)
    compiled_values_and_grads(fn, "aot_eager", xs, torch.full((4, 1), fn.total, dtype=F64))


@pytest.mark.slow
def test_compile_fullgraph_inductor() -> None:
    fn = MAPS[2]  # the two-sided box: the sorted-breakpoint search in generated code
    xs = batch_of_points(6)
    compiled_values_and_grads(fn, "inductor", xs, torch.full((4, 1), fn.total, dtype=F64))


@maps
def test_forward_mode_dual_tensors_get_the_jvp(fn: Map) -> None:
    # A dual tensor does not require grad: the node must still run for its tangent.
    jac_x, _ = fn.jacobian(X)
    dx = torch.linspace(0.3, -0.9, N, dtype=F64)
    with torch.autograd.forward_ad.dual_level():
        y = fn(torch.autograd.forward_ad.make_dual(X, dx))
        primal, tangent = torch.autograd.forward_ad.unpack_dual(y)
    close(primal, fn.reference(X))
    assert tangent is not None
    close(tangent, jac_x @ dx)


@maps
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_values_without_a_node_equal_those_of_the_node(fn: Map, dtype: torch.dtype) -> None:
    # Nothing requires grad (or grad mode is off): no node is recorded, same values.
    x = (batch_of_points(7) * 10.0).to(dtype)
    if fn.name != "project_sum":  # an all -inf row: its limit, the uniform row
        x[1] = -math.inf
    recorded = fn(x.clone().requires_grad_())
    plain = fn(x)
    with torch.no_grad():
        no_grad = fn(x.clone().requires_grad_())
    assert recorded.grad_fn is not None
    assert plain.grad_fn is None and no_grad.grad_fn is None
    assert torch.equal(plain, recorded.detach()) and torch.equal(no_grad, plain)
    if fn.name != "project_sum":
        torch.testing.assert_close(plain[1], torch.full((N,), fn.total / N, dtype=dtype))


# ---------------------------------------------------------------------------
# constraint classes, through functional_call on a registered module
# ---------------------------------------------------------------------------

KEY = "m.parametrizations.weight.original"
OUT = 3
A = torch.tensor([[1.0] * N, [1.0, -1.0, 0.0, 0.0, 2.0, 0.0, 0.0]], dtype=F64)
B = torch.tensor([1.0, 0.5], dtype=F64)


class _Weight(nn.Module):
    """Returns the constrained weight of ``m``: functional_call differentiates it."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self) -> Tensor:
        weight: Tensor = self.m.weight
        return weight


@dataclass(frozen=True)
class Case:
    """A constrained ``nn.Linear(N, OUT)`` and float64 references of its weight map."""

    name: str
    register: Callable[[nn.Module], nn.Module]
    row: Callable[[Tensor], Tensor]  # reference map of one pre-weight row
    row_jacobian: Callable[[Tensor], Tensor]
    piecewise_linear: bool = True

    def module(self) -> nn.Module:
        torch.manual_seed(0)
        return _Weight(self.register(nn.Linear(N, OUT, dtype=F64)))

    def reference(self, pre: Tensor) -> Tensor:
        rows = pre.reshape(-1, N)
        return torch.stack([self.row(r) for r in rows]).reshape(pre.shape)

    def jacobian(self, pre: Tensor) -> Tensor:
        """``(OUT, N, OUT, N)``: rows are independent (block diagonal)."""
        jac = torch.zeros(OUT, N, OUT, N, dtype=F64)
        for i in range(OUT):
            jac[i, :, i, :] = self.row_jacobian(pre[i])
        return jac

    def reference_grad(self, pre: Tensor, weight: Tensor) -> Tensor:
        """Gradient of ``<W(pre), weight>``."""
        return torch.einsum("ij,ijkl->kl", weight, self.jacobian(pre))


def _clamp_shift_row(total: float, lower: float, upper: float, temperature: float = 1.0) -> Any:
    def row(r: Tensor) -> Tensor:
        v = r.reshape(1, -1) / temperature
        return ref_project_box_sum(v, total, (-1,), lower, upper)[0]

    def jac(r: Tensor) -> Tensor:
        return ref_clamp_shift_jacobian(r / temperature, total, lower, upper)[0] / temperature

    return row, jac


def _softmax_row(total: float, temperature: float) -> Any:
    def row(r: Tensor) -> Tensor:
        e = (r / temperature - (r / temperature).max()).exp()
        return total * e / e.sum()

    def jac(r: Tensor) -> Tensor:
        p = row(r) / total
        return total / temperature * (torch.diag(p) - torch.outer(p, p))

    return row, jac


def _relu_row(total: float, eps: float = 1e-4) -> Any:
    def row(r: Tensor) -> Tensor:
        k = r.clamp_min(0.0)
        return total * (k + eps / N) / (k.sum() + eps)

    def jac(r: Tensor) -> Tensor:
        active = (r > 0).double()
        s = r.clamp_min(0.0).sum() + eps
        return total * (torch.diag(active) / s - torch.outer(row(r) / total, active) / s)

    return row, jac


def _linear_equality_row() -> Any:
    projector = torch.eye(N, dtype=F64) - A.T @ torch.linalg.solve(A @ A.T, A)
    particular = A.T @ torch.linalg.solve(A @ A.T, B)

    def row(r: Tensor) -> Tensor:
        return projector @ r + particular

    return row, lambda r: projector


def _case(name: str, register: Callable[[nn.Module], nn.Module], fns: Any) -> Case:
    smooth = name in ("Simplex-softmax", "Simplex-relu")  # relu: smooth away from 0
    return Case(name, register, fns[0], fns[1], piecewise_linear=not smooth)


CASES = [
    _case(
        "AffineSum",
        lambda m: sumto.sum_to(m, total=0.7),
        _clamp_shift_row(0.7, -math.inf, math.inf),
    ),
    _case(
        "Simplex-softmax",
        lambda m: sumto.simplex(m, total=2.0, temperature=0.7),
        _softmax_row(2.0, 0.7),
    ),
    _case(
        "Simplex-sparsemax",
        lambda m: sumto.simplex(m, method="sparsemax", temperature=2.0),
        _clamp_shift_row(1.0, 0.0, math.inf, temperature=2.0),
    ),
    _case("Simplex-relu", lambda m: sumto.simplex(m, total=1.5, method="relu"), _relu_row(1.5)),
    _case(
        "BoxSum",
        lambda m: sumto.box_sum(m, total=0.5, lower=-0.3, upper=0.45),
        _clamp_shift_row(0.5, -0.3, 0.45),
    ),
    _case(
        "BoxSum-lower",
        lambda m: sumto.box_sum(m, total=0.4, lower=-0.2),
        _clamp_shift_row(0.4, -0.2, math.inf),
    ),
    _case(
        "BoxSum-upper",
        lambda m: sumto.box_sum(m, total=0.1, upper=0.3),
        _clamp_shift_row(0.1, -math.inf, 0.3),
    ),
    _case(
        "LinearEquality",
        lambda m: sumto.linear_equality(m, A=A, b=B),
        _linear_equality_row(),
    ),
]
cases = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])

# Pre-weights: rows near X; sparsemax sees them at temperature 2 (so twice as spread);
# relu rows have positive and negative entries away from 0.
PRE = torch.stack([X, X.flip(0), X + 0.3])
PRE_SPARSEMAX = 2.0 * PRE


def pre_weights(case: Case) -> Tensor:
    return PRE_SPARSEMAX if case.name == "Simplex-sparsemax" else PRE


def weight_map(case: Case) -> Callable[[Tensor], Tensor]:
    module = case.module()

    def fn(pre: Tensor) -> Tensor:
        out: Tensor = functional_call(module, {KEY: pre}, ())
        return out

    return fn


def test_constraint_points_are_generic() -> None:
    for row in PRE:
        for total, lower, upper in ((0.7, -math.inf, math.inf), (0.5, -0.3, 0.45)):
            assert kink_margin(row, total, lower, upper) >= MARGIN
        assert kink_margin(row, 0.4, -0.2, math.inf) >= MARGIN
        assert kink_margin(row, 0.1, -math.inf, 0.3) >= MARGIN
        assert kink_margin(row, 1.0, 0.0, math.inf) >= MARGIN
        assert float(row.abs().min()) >= MARGIN  # relu away from its kink


@cases
def test_constraint_forward_matches_reference(case: Case) -> None:
    pre = pre_weights(case)
    close(weight_map(case)(pre), case.reference(pre))


@cases
def test_constraint_grad_jacrev_jacfwd(case: Case) -> None:
    fn = weight_map(case)
    pre = pre_weights(case)
    jac = case.jacobian(pre)
    g = torch.linspace(-1.0, 1.0, OUT * N, dtype=F64).reshape(OUT, N)
    close(grad(lambda p: (fn(p) * g).sum())(pre), case.reference_grad(pre, g))
    close(jacrev(fn)(pre), jac)
    close(jacfwd(fn)(pre), jac)


@cases
def test_constraint_jvp(case: Case) -> None:
    fn = weight_map(case)
    pre = pre_weights(case)
    tangent = torch.linspace(0.5, -0.5, OUT * N, dtype=F64).reshape(OUT, N)
    y, dy = jvp(fn, (pre,), (tangent,))
    close(y, case.reference(pre))
    close(dy, torch.einsum("ijkl,kl->ij", case.jacobian(pre), tangent))


@cases
def test_constraint_vmap_with_and_without_grad(case: Case) -> None:
    fn = weight_map(case)
    pres = pre_weights(case) + 0.01 * torch.rand(
        2, OUT, N, generator=torch.Generator().manual_seed(7), dtype=F64
    )
    out = vmap(fn)(pres)
    g = torch.linspace(-1.0, 1.0, OUT * N, dtype=F64).reshape(OUT, N)
    grads = vmap(grad(lambda p: (fn(p) * g).sum()))(pres)
    for p, o, gr in zip(pres, out, grads, strict=True):
        close(o, case.reference(p))
        close(gr, case.reference_grad(p, g))


@cases
def test_constraint_hessian(case: Case) -> None:
    fn = weight_map(case)
    pre = pre_weights(case)

    got = hessian(lambda p: 0.5 * fn(p).square().sum())(pre)
    if case.piecewise_linear:
        # J is constant near a generic point: the Hessian of 0.5 |W|^2 is J^T J
        jac = case.jacobian(pre)
        close(got, torch.einsum("ijkl,ijmn->klmn", jac, jac))
        return

    def ref_grad(p: Tensor) -> Tensor:
        # the gradient of 0.5 |W(p)|^2, from the references
        return case.reference_grad(p, case.reference(p))

    close(got, fd_jacobian(ref_grad, pre), atol=1e-6)


@cases
def test_constraint_gradgradcheck(case: Case) -> None:
    fn = weight_map(case)
    pre = pre_weights(case).clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (pre,))
    assert torch.autograd.gradgradcheck(fn, (pre,))


def compile_constraints(selected: list[Case]) -> None:
    """Weights and pre-weight gradients of ``selected`` compiled in one graph equal eager.

    Each case compiles its own graph in the tests (a failure names its class); the
    helper takes a list so that several classes can share one graph.
    """
    maps_ = [weight_map(case) for case in selected]

    def weights(*pres: Tensor) -> list[Tensor]:
        return [fn(p) for fn, p in zip(maps_, pres, strict=True)]

    counting = CountingBackend("aot_eager")
    compiled = torch.compile(weights, fullgraph=True, backend=counting)
    g = torch.linspace(-1.0, 1.0, OUT * N, dtype=F64).reshape(OUT, N)
    results = []
    for f in (weights, compiled):
        pres = [pre_weights(case).clone().requires_grad_() for case in selected]
        ys = f(*pres)
        grads = torch.autograd.grad(sum((y * g).sum() for y in ys), pres)
        results.append(([y.detach() for y in ys], grads))
    (eager_y, eager_g), (comp_y, comp_g) = results
    for case, ye, yc, ge, gc in zip(selected, eager_y, comp_y, eager_g, comp_g, strict=True):
        close(yc, ye)
        close(gc, ge)
        close(ge, case.reference_grad(pre_weights(case), g))
    assert counting.graphs == 1


@cases
def test_constraint_compile_fullgraph(case: Case) -> None:
    compile_constraints([case])


def test_functional_call_through_the_module_forward_matches_eager_autograd() -> None:
    # The Linear's own forward under functional_call: grad equals plain autograd.
    module = sumto.box_sum(nn.Linear(N, OUT, dtype=F64), total=0.5, lower=-0.3, upper=0.45)
    key = "parametrizations.weight.original"
    inp = torch.randn(5, N, generator=torch.Generator().manual_seed(8), dtype=F64)

    def loss(pre: Tensor) -> Tensor:
        return functional_call(module, {key: pre}, (inp,)).square().sum()

    via_func = grad(loss)(PRE)
    with torch.no_grad():
        module.parametrizations.weight.original.copy_(PRE)
    module.zero_grad()
    module(inp).square().sum().backward()
    close(via_func, module.parametrizations.weight.original.grad)
