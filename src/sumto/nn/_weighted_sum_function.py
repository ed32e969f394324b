"""The sum of :class:`sumto.WeightedSum`: ``bias + sum_k c_k * x_k``, two paths.

* Eager autograd: a fused autograd function whose forward reads every input once and
  allocates only the output, and whose backward allocates only the gradients it
  returns (the weights' gradient is one dot product per input, not an input-sized
  product then a sum). Its backward is itself differentiable (double backward,
  ``gradgradcheck``) when the graph of the gradient is recorded (``create_graph=True``).
* Plain ops, the same formula as out-of-place ``addcmul``: used under
  ``torch.compile`` (the compiler fuses it) and under ``torch.func`` transforms or
  forward-mode AD, which an autograd function without ``setup_context``, ``vmap`` and
  ``jvp`` rules cannot enter.

Neither path synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sumto._compat import along_first_dim, forward_ad_active, is_compiling, transforms_active
from sumto.functional import _compute_dtype

__all__: list[str] = []


def _sum_dims(like: Tensor, target_shape: Sequence[int]) -> list[int]:
    """Dims of ``like`` along which a tensor of ``target_shape`` was broadcast.

    ``target_shape`` is ``()`` (a scalar) or has ``like.ndim`` dims.
    """
    if len(target_shape) == 0:
        return list(range(like.ndim))
    return [d for d in range(like.ndim) if target_shape[d] == 1 and like.shape[d] != 1]


def _reduce_to(product: Tensor, target_shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Sum ``product`` over its broadcast dims into ``target_shape`` (a new tensor)."""
    dims = _sum_dims(product, target_shape)
    if len(dims) == 0:
        return product.to(dtype=dtype, copy=True).reshape(target_shape)
    return product.sum(dims, keepdim=len(target_shape) > 0, dtype=dtype).reshape(target_shape)


def _accumulate(
    coefficients: Tensor, xs: Sequence[Tensor], bias: Tensor | None, in_place: bool
) -> Tensor:
    """``bias + sum_k coefficients[k] * xs[k]`` in the inputs' dtype.

    Half inputs accumulate in float32 (one float32 buffer of the output's size).
    ``in_place`` accumulates into the first product (the fused forward, which autograd
    does not record); otherwise every step is out of place, as transforms need.
    """
    x0 = xs[0]
    acc_dtype = _compute_dtype(x0.dtype)
    coeff = coefficients if coefficients.dtype == acc_dtype else coefficients.to(acc_dtype)
    if acc_dtype != x0.dtype and coeff.ndim == 1:
        # A 0-d float32 factor would not promote a bfloat16 product to float32.
        coeff = coeff.reshape(coeff.shape[0], *([1] * x0.ndim))
    # the recorded (out-of-place) form is the one compile traces
    cs = coeff.unbind(0) if in_place else along_first_dim(coeff)
    first = cs[0]
    if bias is None:
        acc = torch.mul(x0, first)
    else:
        acc = torch.addcmul(bias if bias.dtype == acc_dtype else bias.to(acc_dtype), x0, first)
    for x, c in zip(xs[1:], cs[1:], strict=True):
        acc = acc.addcmul_(x, c) if in_place else torch.addcmul(acc, x, c)
    return acc if acc.dtype == x0.dtype else acc.to(x0.dtype)


class _WeightedSumFunction(torch.autograd.Function):
    """``out = bias + sum_k coefficients[k] * inputs[k]`` with a hand-written backward.

    ``coefficients`` has shape ``(K, *w)`` with ``w == ()`` (one scalar per input) or
    ``len(w) == inputs[k].ndim`` (broadcast along the dims where ``w`` is 1).
    ``bias`` is ``None``, 0-d, or broadcastable with ``inputs[k].ndim`` dims.
    With ``stacked=True``, ``inputs`` is one tensor of shape ``(K, *shape)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        coefficients: Tensor,
        bias: Tensor | None,
        stacked: bool,
        *inputs: Tensor,
    ) -> Tensor:
        xs: Sequence[Tensor] = inputs[0].unbind(0) if stacked else inputs
        out = _accumulate(coefficients, xs, bias, in_place=True)

        ctx.stacked = stacked
        ctx.coefficient_shape = tuple(coefficients.shape)
        ctx.coefficient_dtype = coefficients.dtype
        ctx.bias_shape = None if bias is None else tuple(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        need_coefficients = ctx.needs_input_grad[0]
        need_inputs = any(ctx.needs_input_grad[3:])
        # Save only what the backward reads: the inputs for the coefficients' gradient,
        # the coefficients for the inputs' gradient (references, never copies).
        ctx.save_for_backward(
            coefficients if need_inputs else None,
            *(inputs if need_coefficients else (None,) * len(inputs)),
        )
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # Grad mode is on here only under create_graph=True: every op below is then
        # recorded (no out= buffer), so the gradient is differentiable again.
        coefficients, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        acc_dtype = _compute_dtype(grad.dtype)
        w_shape = ctx.coefficient_shape[1:]
        k = ctx.coefficient_shape[0]

        grad_coefficients = None
        if need[0]:
            grad_coefficients = _coefficient_grad(grad, saved, ctx.stacked, w_shape, k, acc_dtype)
            grad_coefficients = grad_coefficients.to(ctx.coefficient_dtype)

        grad_bias = None
        if need[1]:
            grad_bias = _reduce_to(grad, ctx.bias_shape, acc_dtype).to(ctx.bias_dtype)

        grad_inputs: list[Tensor | None] = [None] * (len(need) - 3)
        if any(need[3:]):
            coeff = coefficients.to(grad.dtype)
            if ctx.stacked:
                view = coeff.reshape(k, *([1] * grad.ndim)) if len(w_shape) == 0 else coeff
                grad_inputs[0] = torch.mul(view, grad.unsqueeze(0))
            else:
                for i, c in enumerate(coeff.unbind(0)):
                    if need[3 + i]:
                        grad_inputs[i] = torch.mul(grad, c)
        return (grad_coefficients, grad_bias, None, *grad_inputs)


def _coefficient_grad(
    grad: Tensor,
    saved: Sequence[Tensor],
    stacked: bool,
    w_shape: tuple[int, ...],
    k: int,
    acc_dtype: torch.dtype,
) -> Tensor:
    """``sum over broadcast dims of grad * x_k`` for every k, shape ``(K, *w_shape)``."""
    scalar = len(w_shape) == 0 or all(s == 1 for s in w_shape)
    plain = grad.dtype == acc_dtype and grad.is_contiguous()
    if stacked:
        stack = saved[0]
        if scalar and plain and stack.is_contiguous():
            # One matrix-vector product reads the stack once.
            return torch.mv(stack.reshape(k, -1), grad.reshape(-1)).reshape(k, *w_shape)
        xs: Sequence[Tensor] = stack.unbind(0)
    else:
        xs = saved
    if scalar and plain and all(x.is_contiguous() for x in xs):
        flat = grad.reshape(-1)
        dots = [torch.dot(flat, x.reshape(-1)) for x in xs]
        return torch.stack(dots).reshape(k, *w_shape)
    if torch.is_grad_enabled():  # create_graph=True: out-of-place, recorded products
        return torch.stack([_reduce_to(grad * x.to(acc_dtype), w_shape, acc_dtype) for x in xs])
    # General case: one scratch product reused for every input, then reduced.
    scratch = torch.empty(grad.shape, dtype=acc_dtype, device=grad.device)
    parts = []
    for x in xs:
        if scratch.dtype == grad.dtype:
            torch.mul(grad, x, out=scratch)
        else:  # half inputs: multiply in float32, where their products are exact
            scratch.copy_(x).mul_(grad)
        parts.append(_reduce_to(scratch, w_shape, acc_dtype))
    return torch.stack(parts)


def _plain_ops_needed() -> bool:
    """Whether the sum must be plain ops: compiling, a ``torch.func`` transform or forward AD."""
    return is_compiling() or transforms_active() or forward_ad_active()


def weighted_sum(
    coefficients: Tensor, inputs: Sequence[Tensor] | Tensor, bias: Tensor | None = None
) -> Tensor:
    """``bias + sum_k coefficients[k] * inputs[k]``: fused in eager autograd, else plain ops.

    No validation: callers (``WeightedSum.forward``) check shapes and dtypes.
    """
    if _plain_ops_needed():
        xs: Sequence[Tensor] = along_first_dim(inputs) if isinstance(inputs, Tensor) else inputs
        return _accumulate(coefficients, xs, bias, in_place=False)
    if not torch.is_grad_enabled():
        # Nothing is recorded: the fused forward without the autograd function's cost.
        xs = inputs.unbind(0) if isinstance(inputs, Tensor) else inputs
        return _accumulate(coefficients, xs, bias, in_place=True)
    if isinstance(inputs, Tensor):
        result: Tensor = _WeightedSumFunction.apply(coefficients, bias, True, inputs)  # type: ignore[no-untyped-call]
    else:
        result = _WeightedSumFunction.apply(coefficients, bias, False, *inputs)  # type: ignore[no-untyped-call]
    return result
