"""The affine projection as one autograd node (Note [One node for the affine projection]).

What is shown: the node gives bit-identical values and gradients to the plain
autograd formula ``x + (total / s - sum(x / s)) / (n / s)``, in every dtype; its
eager output reuses its scaled copy without changing values (also for
non-contiguous inputs); it stays overflow-free; per-slice tensor totals get
gradients of their own (broadcast) shape; and it works under ``torch.func``
(``grad``, ``vmap``, ``jacrev``) and for double backward.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import sumto
from sumto import functional as F


def plain_formula(x: Tensor, total: Tensor | float, dims: tuple[int, ...]) -> Tensor:
    """The same map in plain autograd ops: the reference for values and gradients."""
    n = F._reduced_size(x.shape, dims)
    scale = F._sum_scale(n)
    return x + (total / scale - (x / scale).sum(dims, keepdim=True)) / (n / scale)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("shape", "dims"),
    [((5, 7), (1,)), ((5, 7), (0,)), ((3, 4, 5), (1, 2)), ((3, 4, 5), (0, 2)), ((6,), (0,))],
)
def test_values_and_gradients_are_bit_identical_to_the_plain_formula(
    dtype: torch.dtype, shape: tuple[int, ...], dims: tuple[int, ...]
) -> None:
    x = torch.randn(shape, generator=generator(0), dtype=dtype)
    keep = tuple(1 if i in dims else s for i, s in enumerate(shape))
    total = torch.randn(keep, generator=generator(1), dtype=dtype)
    grad = torch.randn(shape, generator=generator(2), dtype=dtype)
    results = []
    for fn in (F._project_sum, plain_formula):
        xr = x.clone().requires_grad_()
        tr = total.clone().requires_grad_()
        y = fn(xr, tr, dims)
        y.backward(grad)
        assert xr.grad is not None and tr.grad is not None
        results.append((y.detach(), xr.grad, tr.grad))
    for fast, plain in zip(*results, strict=True):
        assert torch.equal(fast, plain)


def test_non_contiguous_input_keeps_values_and_layout_free_of_aliasing() -> None:
    base = torch.randn(6, 8, generator=generator(3))
    x = base.t()  # (8, 6), not contiguous
    y = F._project_sum(x, 1.0, (1,))
    assert torch.equal(y, plain_formula(x, 1.0, (1,)))
    assert y.data_ptr() != x.data_ptr() and y.data_ptr() != base.data_ptr()
    assert torch.equal(base.t(), x)  # the input is left untouched


def test_output_is_a_new_tensor_and_the_input_is_unchanged() -> None:
    x = torch.randn(4, 5, generator=generator(4))
    before = x.clone()
    y = F._project_sum(x, 2.0, (1,))
    assert y.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)
    torch.testing.assert_close(y.sum(1), torch.full((4,), 2.0))


def test_broadcast_tensor_total_gets_a_gradient_of_its_own_shape() -> None:
    x = torch.randn(3, 4, 5, generator=generator(5), requires_grad=True)
    total = torch.tensor([[[1.5]]], requires_grad=True)  # broadcast over every slice
    F._project_sum(x, total, (2,)).sum().backward()
    assert total.grad is not None and total.grad.shape == (1, 1, 1)
    # d/dtotal of sum(x + (total - sum x) / n) over 12 slices of n = 5: 12 * 5 / 5
    torch.testing.assert_close(total.grad, torch.full((1, 1, 1), 12.0))


def test_float_total_gets_no_gradient_and_input_gradient_sums_to_zero() -> None:
    x = torch.randn(4, 6, generator=generator(6), dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 6, generator=generator(7), dtype=torch.float64)
    F._project_sum(x, 1.0, (1,)).backward(g)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, g - g.mean(1, keepdim=True))
    assert float(x.grad.sum(1).abs().max()) <= 1e-14


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sums_of_huge_entries_do_not_overflow_forward_or_backward(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max / 2
    x = torch.tensor([[big, big, -big, -big], [big, big, big, -big]], dtype=dtype)
    x.requires_grad_()
    y = F._project_sum(x, 0.0, (1,))
    assert bool(torch.isfinite(y).all())
    assert torch.equal(y.detach(), plain_formula(x.detach(), 0.0, (1,)))
    y.backward(torch.ones_like(y))
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32_and_stay_finite(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max / 2
    x = torch.tensor([[big, big, -big, -big], [0.25, 0.5, -1.0, 2.0]], dtype=dtype)
    y = F.project_sum(x, 1.0)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    assert torch.equal(y, plain_formula(x.float(), 1.0, (1,)).to(dtype))


def test_double_backward_wrt_input_and_total() -> None:
    x = torch.randn(3, 4, generator=generator(8), dtype=torch.float64, requires_grad=True)
    total = torch.randn(3, 1, generator=generator(9), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t: F._project_sum(a, t, (1,)), (x, total))
    assert torch.autograd.gradgradcheck(lambda a, t: F._project_sum(a, t, (1,)), (x, total))


def test_torch_func_grad_vmap_and_jacrev() -> None:
    x = torch.randn(5, 4, generator=generator(10), dtype=torch.float64)
    w = torch.randn(4, generator=generator(11), dtype=torch.float64)

    def loss(v: Tensor) -> Tensor:
        return (F.project_sum(v, 1.0) * w).sum()

    # d/dv of <P(v), w> is P's linear part applied to w: w - mean(w), for each row
    expected = (w - w.mean()).expand(5, 4)
    torch.testing.assert_close(torch.func.grad(loss)(x), expected)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(x), expected)
    batched = torch.func.vmap(lambda v: F.project_sum(v, 2.0))(x)
    assert torch.equal(batched, F.project_sum(x, 2.0))
    jac = torch.func.jacrev(lambda v: F.project_sum(v, 0.0))(x[0])
    torch.testing.assert_close(jac, torch.eye(4, dtype=torch.float64) - 0.25)


def test_affine_sum_forward_and_project_share_the_node() -> None:
    lin = sumto.sum_to(torch.nn.Linear(6, 3), total=2.0)
    weight = lin.weight
    assert type(weight.grad_fn).__name__.startswith("_AffineProject")
    c = lin.parametrizations.weight[0]
    pre = lin.parametrizations.weight.original.detach()
    assert torch.equal(c.project(pre), weight.detach())
    torch.testing.assert_close(weight.detach().sum(1), torch.full((3,), 2.0))
