"""Integration, training: constrained Linear and Conv layers trained with SGD and Adam.

Like geotorch's integration tests, a grid of small layers is trained for a few
hundred steps on a teacher-student regression; every few steps each constrained
tensor is re-checked against its set with a tolerance scaled by its dtype's eps.
Finally a sum-to-1 Conv2d recovers the two 3x3 kernels of issue 2 from synthetic
image pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sumto
from reference import SHARPEN, SHARPEN_DIAGONAL, assert_constraints_hold

STEPS = 200
CHECK_EVERY = 25
K = 4.0  # tolerance factor of the constraints during and after training

LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    # name: (layer factory, input shape of one batch)
    "linear-1-3": (lambda: nn.Linear(1, 3), (16, 1)),
    "linear-3-5": (lambda: nn.Linear(3, 5), (16, 3)),
    "linear-6-2": (lambda: nn.Linear(6, 2), (16, 6)),
    "linear-8-8": (lambda: nn.Linear(8, 8), (16, 8)),
    "conv1d-2-3-k3": (lambda: nn.Conv1d(2, 3, 3), (4, 2, 10)),
    "conv2d-1-2-k3": (lambda: nn.Conv2d(1, 2, 3), (4, 1, 7, 7)),
    "conv2d-3-2-k1x3": (lambda: nn.Conv2d(3, 2, (1, 3)), (4, 3, 5, 5)),
}

CONSTRAINTS: dict[str, Callable[..., nn.Module]] = {
    "sum_to": lambda m: sumto.sum_to(m, total=1.0),
    "softmax": lambda m: sumto.simplex(m, method="softmax"),
    "sparsemax": lambda m: sumto.simplex(m, method="sparsemax"),
    "relu": lambda m: sumto.simplex(m, method="relu"),
    "box_sum": lambda m: sumto.box_sum(m, lower=-0.5, upper=1.0),
}

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.02),
}


def train(
    student: nn.Module,
    teacher: nn.Module,
    input_shape: tuple[int, ...],
    make_optimizer: Callable[..., torch.optim.Optimizer],
    dtype: torch.dtype = torch.float32,
    steps: int = STEPS,
) -> tuple[float, float]:
    """Regress the teacher's outputs; re-check the constraints every CHECK_EVERY steps."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn((8, *input_shape), generator=g).to(dtype)
    with torch.no_grad():
        targets = [teacher(xb) for xb in x]
    opt = make_optimizer(student.parameters())
    losses = []
    for step in range(steps):
        xb, yb = x[step % len(x)], targets[step % len(x)]
        opt.zero_grad()
        loss = F.mse_loss(student(xb), yb)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % CHECK_EVERY == 0 or step == steps - 1:
            assert_constraints_hold(student, k=K)
    first = sum(losses[: len(x)]) / len(x)
    last = sum(losses[-len(x) :]) / len(x)
    return first, last


def make_pair(
    layer: str, constraint: str, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    factory, input_shape = LAYERS[layer]
    torch.manual_seed(0)
    teacher = CONSTRAINTS[constraint](factory().to(dtype))
    with torch.no_grad():  # a teacher away from the student's init, on the same set
        teacher.weight = teacher.parametrizations.weight[0].project(
            2.0 * torch.rand_like(teacher.weight) - 0.5
        )
    torch.manual_seed(1)
    student = CONSTRAINTS[constraint](factory().to(dtype))
    return student, teacher, input_shape


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("constraint", list(CONSTRAINTS))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_training_keeps_the_constraint_and_learns(
    layer: str, constraint: str, optimizer: str
) -> None:
    student, teacher, input_shape = make_pair(layer, constraint)
    assert_constraints_hold(student, k=K)
    first, last = train(student, teacher, input_shape, OPTIMIZERS[optimizer])
    assert last < 0.75 * first, f"loss went from {first:.3g} to {last:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("constraint", list(CONSTRAINTS))
def test_training_in_other_dtypes_keeps_the_constraint(constraint: str, dtype: torch.dtype) -> None:
    student, teacher, input_shape = make_pair("linear-6-2", constraint, dtype)
    assert student.weight.dtype == dtype
    first, last = train(student, teacher, input_shape, OPTIMIZERS["adam"], dtype, steps=100)
    assert last < first


def test_training_with_per_channel_totals_and_tuple_dims() -> None:
    torch.manual_seed(0)
    totals = torch.tensor([1.0, -2.0, 0.5])
    conv = sumto.sum_to(nn.Conv2d(2, 3, 3), total=totals.reshape(3, 1, 1, 1), dim=(1, 2, 3))
    conv = sumto.simplex(conv, "bias", total=3.0, method="sparsemax")
    teacher = nn.Conv2d(2, 3, 3)
    first, last = train(conv, teacher, (4, 2, 6, 6), OPTIMIZERS["sgd"])
    assert last < first
    assert torch.allclose(conv.weight.detach().sum((1, 2, 3)), totals, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# kernel recovery
# ---------------------------------------------------------------------------


def random_textures(count: int, size: int, generator: torch.Generator) -> Tensor:
    """Standardised images: white noise, blurred noise and oriented stripes."""
    white = torch.randn(count, 1, size, size, generator=generator)
    blur = torch.rand(count, 1, 3, 3, generator=generator)
    blur = blur / blur.sum((2, 3), keepdim=True)
    smooth = torch.cat(
        [F.conv2d(white[i : i + 1], blur[i : i + 1], padding=1) for i in range(count)]
    )
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    freq = 1.5 * torch.rand(count, 2, 1, 1, generator=generator)
    stripes = torch.sin(freq[:, :1] * xx + freq[:, 1:] * yy)
    images = white + 2.0 * smooth + stripes
    return (images - images.mean((2, 3), keepdim=True)) / images.std((2, 3), keepdim=True)


@pytest.mark.parametrize("rows", [SHARPEN, SHARPEN_DIAGONAL], ids=["sharpen", "diagonal"])
def test_sum_to_one_conv_recovers_the_kernel(rows: list[list[float]]) -> None:
    kernel = torch.tensor(rows).reshape(1, 1, 3, 3)
    images = random_textures(4, 16, torch.Generator().manual_seed(0))
    targets = F.conv2d(images, kernel)
    torch.manual_seed(0)
    conv = sumto.sum_to(nn.Conv2d(1, 1, 3, bias=False))
    opt = torch.optim.Adam(conv.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    for step in range(300):
        opt.zero_grad()
        F.mse_loss(conv(images), targets).backward()
        opt.step()
        schedule.step()
        if step % 50 == 0:
            assert_constraints_hold(conv, k=K)
    error = float((conv.weight.detach() - kernel).abs().max())
    assert error < 1e-2, f"max abs error {error:.3g}"
    assert_constraints_hold(conv, k=K)
