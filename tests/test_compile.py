"""Integration, torch.compile(fullgraph=True) of models using every sumto constraint.

What is shown: one graph (``fullgraph=True`` raises on any graph break), compiled
once and reused for every training step (a counting backend), outputs, gradients and
updated parameters equal to eager within a dtype-scaled tolerance, and the
constraints holding after compiled training. aot_eager traces the same graphs with the
same autograd as inductor, without code generation, so it runs every model here.
Inductor also generates and compiles C++ for each new graph, the slowest step of the
suite, so it gets one small model: a mean shift (``sum_to``), a sort and cumulative sum
(sparsemax) and a plain layer projected after each optimizer step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import sumto
from reference import CountingBackend, assert_close_scaled, assert_report_within
from sumto import functional as F

# Eager and compiled runs differ by reassociated reductions and fused kernels. The
# largest difference measured after three training steps is 5.3 * eps(float32) *
# max(1, |value|) (inductor; 4.4 with aot_eager): k = 64 leaves a 12x margin.
COMPILE_K = 64.0


# Dynamo's caches are cleared around each test: compiled code objects count against its
# per-code recompile limit for the whole process otherwise.
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Zoo(nn.Module):
    """Every sumto constraint in one small model (tuple dims, per-slice totals, a Conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.affine = sumto.sum_to(nn.Linear(6, 5), total=torch.linspace(0.5, 2.0, 5))
        self.softmax = sumto.simplex(nn.Linear(5, 5), temperature=0.5)
        self.sparsemax = sumto.simplex(nn.Linear(5, 5), method="sparsemax", dim=0, total=2.0)
        self.relu = sumto.simplex(nn.Linear(5, 4), method="relu")
        self.box = sumto.box_sum(nn.Conv2d(2, 4, 3, padding=1), dim=(2, 3), lower=-0.2, upper=0.5)
        self.bayar = sumto.bayar(nn.Conv2d(2, 2, 3, padding=1))
        A = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 0.0, 2.0]])
        self.linear_eq = sumto.linear_equality(nn.Linear(4, 4), A=A, b=torch.tensor([1.0, 0.5]))
        self.mix = sumto.WeightedSum(3, method="sparsemax", channels=4, channel_dim=1)
        self.mix_affine = sumto.WeightedSum(2, weights="affine", scale=True, bias=True)
        # A plain parameter kept on the simplex by project_on_step (see make_optimizer).
        self.projected = nn.Linear(4, 4)

    def forward(self, x: Tensor, img: Tensor) -> Tensor:
        h = torch.tanh(self.affine(x))
        h = torch.tanh(self.softmax(h))
        h = torch.tanh(self.sparsemax(h))
        h = self.relu(h)
        f = self.box(self.bayar(img)).mean((2, 3))
        g = torch.tanh(self.linear_eq(h))
        mixed = self.mix([h, f, g])
        return self.mix_affine([mixed, self.projected(h * f)]) + h


class Small(nn.Module):
    """Inductor's model: an affine sum, a sparsemax simplex and a projected plain layer."""

    def __init__(self) -> None:
        super().__init__()
        self.affine = sumto.sum_to(nn.Linear(6, 5), total=torch.linspace(0.5, 2.0, 5))
        self.sparsemax = sumto.simplex(nn.Linear(5, 4), method="sparsemax", dim=0, total=2.0)
        self.projected = nn.Linear(4, 4)

    def forward(self, x: Tensor, img: Tensor) -> Tensor:
        h = torch.tanh(self.sparsemax(torch.tanh(self.affine(x))))
        return self.projected(h) + h


def make_small(seed: int = 0) -> Small:
    torch.manual_seed(seed)
    return Small()


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sumto.project_on_step(opt, model.projected.weight, sumto.Simplex())
    return opt


def make_zoo(seed: int = 0) -> Zoo:
    torch.manual_seed(seed)
    return Zoo()


def batch(step: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 6, generator=g)
    img = torch.randn(8, 2, 5, 5, generator=g)
    target = torch.randn(8, 4, generator=g)
    return x, img, target


def train_and_compare(backend: str, make: Callable[[], nn.Module], steps: int) -> nn.Module:
    """Train an eager and a compiled copy side by side; compare after every step."""
    torch._dynamo.reset()
    eager = make()
    model = copy.deepcopy(eager)
    counting = CountingBackend(backend)
    compiled = torch.compile(model, fullgraph=True, backend=counting)
    opt_e = make_optimizer(eager)
    opt_c = make_optimizer(model)
    for step in range(steps):
        x, img, target = batch(step)
        out_e = eager(x, img)
        out_c = compiled(x, img)
        assert_close_scaled(out_c.detach(), out_e.detach(), k=COMPILE_K)
        for out, opt in ((out_e, opt_e), (out_c, opt_c)):
            opt.zero_grad()
            (out - target).square().mean().backward()
        named_c = dict(model.named_parameters())
        for name, p in eager.named_parameters():
            assert p.grad is not None and named_c[name].grad is not None, name
            assert_close_scaled(named_c[name].grad, p.grad, k=COMPILE_K)
        opt_e.step()
        opt_c.step()
        for name, p in eager.named_parameters():
            assert_close_scaled(named_c[name].detach(), p.detach(), k=COMPILE_K)
    assert counting.graphs == 1, f"expected one compiled graph, got {counting.graphs}"
    return model


def test_compiled_training_matches_eager_in_one_graph() -> None:
    model = train_and_compare("aot_eager", make_zoo, steps=3)
    assert_report_within(sumto.check(model))  # unit-scale float32 weights


@pytest.mark.slow
def test_inductor_training_matches_eager_in_one_graph() -> None:
    """Inductor's generated code for a forward and a backward graph, reused every step."""
    model = train_and_compare("inductor", make_small, steps=3)
    assert_report_within(sumto.check(model))


def test_compiled_weights_match_eager_on_every_constraint() -> None:
    """The constrained weights themselves, read through a compiled function, equal eager."""
    torch._dynamo.reset()
    model = make_zoo()
    counting = CountingBackend("aot_eager")

    def weights(m: Zoo) -> list[Tensor]:
        constrained = [m.affine, m.softmax, m.sparsemax, m.relu, m.box, m.bayar, m.linear_eq]
        return [c.weight for c in constrained] + [m.mix.weights, m.mix_affine.weights]

    compiled = torch.compile(weights, fullgraph=True, backend=counting)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        for got, want in zip(compiled(model), weights(model), strict=True):
            assert got.shape == want.shape
            assert_close_scaled(got.detach(), want.detach(), k=COMPILE_K)
    assert counting.graphs == 1


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: F.project_sum(x, 2.0, dim=(0, 2)),
        lambda x: F.project_simplex(x, 1.5, dim=-1),
        lambda x: F.project_box_sum(x, 1.0, dim=1, lower=-0.5, upper=0.8),
        lambda x: F.sum_violation(x, 1.0, dim=(1, 2)),
    ],
    ids=["project_sum", "project_simplex", "project_box_sum", "sum_violation"],
)
def test_functional_maps_compile_fullgraph(fn: Callable[[Tensor], Tensor]) -> None:
    torch._dynamo.reset()
    counting = CountingBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counting)
    for seed in range(3):
        x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(seed))
        assert_close_scaled(compiled(x).detach(), fn(x).detach(), k=COMPILE_K)
    assert counting.graphs == 1


def test_weighted_sum_of_a_repeated_input_compiles() -> None:
    """The same tensor twice in WeightedSum's inputs (dynamo refuses duplicate inputs to an
    autograd.Function) compiles in one graph, with eager's output and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = sumto.WeightedSum(3, method="softmax", init=[0.2, 0.3, 0.5])
    model = copy.deepcopy(eager)
    counting = CountingBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counting)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        h = torch.randn(4, 3, generator=g, requires_grad=True)
        f = torch.randn(4, 3, generator=g)
        out_e = eager([h, f, h])
        (grad_h_e,) = torch.autograd.grad(out_e.square().sum(), h)
        out_c = compiled([h, f, h])
        (grad_h_c,) = torch.autograd.grad(out_c.square().sum(), h)
        assert_close_scaled(out_c.detach(), out_e.detach(), k=COMPILE_K)
        assert_close_scaled(grad_h_c, grad_h_e, k=COMPILE_K)
    assert counting.graphs == 1
