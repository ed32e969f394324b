"""sumto.nn.weighted_sum (and its autograd Function) against float64 references.

The references are written from the definitions of the naive formula (softmax,
sort-based simplex projection, relu fusion, affine shift from tests/reference.py;
subsets renormalised row by row in Python), not from the module's code paths.
Tolerances are k * eps(dtype) * magnitude.
"""

from __future__ import annotations

import copy
import itertools
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.nn.parameter import UninitializedParameter

import sumto
from reference import (
    assert_close_at_magnitude,
    load_example,
    ref_project_simplex,
    ref_project_sum,
    ref_relu,
    ref_scalar_mix,
    ref_softmax,
    save_and_load,
)

ROOT = Path(__file__).resolve().parents[1]
KINDS = [
    ("simplex", "softmax"),
    ("simplex", "sparsemax"),
    ("simplex", "relu"),
    ("affine", "softmax"),
]
HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------


def ref_weights(kind: str, method: str, pre: Tensor) -> Tensor:
    """Constrained weights from pre-weights ``(K,)`` or ``(K, C)``, float64, sum over dim 0."""
    pre = pre.double()
    if kind == "affine":
        return ref_project_sum(pre, 1.0, (0,))
    if method == "softmax":
        return ref_softmax(pre, 1.0, (0,))
    if method == "sparsemax":
        # Support from the sort-based reference; on it the projection is v - tau with
        # tau = (sum_S v - 1) / |S|, written out so that autograd gives its Jacobian.
        support = ref_project_simplex(pre.detach(), 1.0, (0,)) > 0
        tau = (torch.where(support, pre, 0.0).sum(0, keepdim=True) - 1.0) / support.sum(
            0, keepdim=True
        )
        return torch.where(support, pre - tau, 0.0)
    return ref_relu(pre, 1.0, (0,))


def ref_present_weights(kind: str, method: str, pre: Tensor, present: Sequence[bool]) -> Tensor:
    """Weights renormalised over the present inputs (0 for absent ones), float64."""
    idx = [i for i, p in enumerate(present) if p]
    pre = pre.double()
    out = torch.zeros_like(pre)
    full = ref_weights(kind, method, pre)
    if kind == "affine":
        sub = full[idx]
        out[idx] = sub + (1.0 - sub.sum(0, keepdim=True)) / len(idx)
    elif method in ("softmax", "sparsemax"):
        out[idx] = ref_weights(kind, method, pre[idx])  # the map over the present entries
    else:
        sub = full[idx]
        out[idx] = sub / sub.sum(0, keepdim=True)
    return out


def ref_output(
    weights: Tensor,
    xs: Sequence[Tensor],
    channel_dim: int | None,
    gamma: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """gamma * sum_k w_k x_k + b in float64; weights ``(K,)``, ``(K, C)``, ``(B, K[, C])``."""
    xs64 = [x.double() for x in xs]
    ndim = xs64[0].ndim
    out = torch.zeros_like(xs64[0])
    per_row = weights.ndim == 3 or (weights.ndim == 2 and channel_dim is None)
    for k, x in enumerate(xs64):
        w = weights[:, k] if per_row else weights[k]
        view = [1] * ndim
        if per_row:
            view[0] = x.shape[0]
        if channel_dim is not None:
            view[channel_dim] = x.shape[channel_dim]
        out = out + w.double().reshape(view) * x
    if gamma is not None:
        out = out * gamma.double()
    if bias is not None:
        view = [1] * ndim
        if bias.ndim == 1 and channel_dim is not None:
            view[channel_dim] = bias.shape[0]
        out = out + bias.double().reshape(view if bias.ndim else ())
    return out


def pre_weights(module: sumto.WeightedSum) -> Tensor:
    original: Tensor = module.parametrizations.weights.original
    return original


def make_module(kind: str, method: str, k: int, **kwargs: Any) -> sumto.WeightedSum:
    return sumto.WeightedSum(k, weights=kind, method=method, **kwargs)  # type: ignore[arg-type]


def randomise(module: sumto.WeightedSum, generator: torch.Generator | None = None) -> None:
    """Random pre-weights (and scale, bias) so that tests do not sit at the uniform init."""
    with torch.no_grad():
        pre = pre_weights(module)
        pre.copy_(torch.randn(pre.shape, generator=generator, dtype=pre.dtype))
        if module.scale is not None:
            module.scale.copy_(1.0 + 0.5 * torch.randn((), generator=generator, dtype=pre.dtype))
        if module.bias is not None:
            b = module.bias
            b.copy_(torch.randn(b.shape, generator=generator, dtype=b.dtype))


# ---------------------------------------------------------------------------
# outputs and gradients equal the naive formula (float64)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "method"), KINDS)
def test_weights_match_reference_and_init_is_exact(kind: str, method: str) -> None:
    init = [0.2, 0.3, 0.5] if kind == "simplex" else [2.0, -1.5, 0.5]
    module = make_module(kind, method, 3, init=init)
    assert_close_at_magnitude(module.weights, torch.tensor(init), 1.0, torch.float32, 3)
    module = module.double()
    randomise(module)
    expected = ref_weights(kind, method, pre_weights(module))
    assert_close_at_magnitude(module.weights, expected, 1.0, torch.float64, 3)
    assert module.weights.shape == (3,)
    assert abs(float(module.weights.detach().sum()) - 1.0) < 1e-12


def test_default_init_is_uniform() -> None:
    for kind, method in KINDS:
        w = make_module(kind, method, 4).weights
        assert torch.allclose(w, torch.full((4,), 0.25), atol=1e-6), (kind, method, w)


@pytest.mark.parametrize(("kind", "method"), KINDS)
def test_output_and_gradients_equal_naive_formula_float64(kind: str, method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    module = make_module(kind, method, 4, scale=True, bias=True).double()
    randomise(module, gen)
    xs = [
        torch.randn(3, 5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(4)
    ]
    grad = torch.randn(3, 5, 2, generator=gen, dtype=torch.float64)

    out = module(xs)
    out.backward(grad)
    assert module.scale is not None and module.bias is not None
    got = [pre_weights(module).grad, module.scale.grad, module.bias.grad, *(x.grad for x in xs)]

    # The naive formula by autograd, from independent float64 leaves.
    pre = pre_weights(module).detach().clone().requires_grad_(True)
    gamma = module.scale.detach().clone().requires_grad_(True)
    bias = module.bias.detach().clone().requires_grad_(True)
    xs_ref = [x.detach().clone().requires_grad_(True) for x in xs]
    weights = ref_weights(kind, method, pre)
    expected = gamma * sum(w * x for w, x in zip(weights, xs_ref, strict=True)) + bias
    expected.backward(grad)
    want = [pre.grad, gamma.grad, bias.grad, *(x.grad for x in xs_ref)]

    assert out.dtype == torch.float64
    assert_close_at_magnitude(out, expected, 10.0, torch.float64, 4)
    for a, b in zip(got, want, strict=True):
        assert a is not None and b is not None
        assert_close_at_magnitude(a, b, 100.0, torch.float64, 30)


def test_gradcheck_every_input_form_and_option() -> None:
    gen = torch.Generator().manual_seed(1)
    names = ["a", "b", "c"]
    module = sumto.WeightedSum(names=names, channels=4, scale=True, bias=True).double()
    randomise(module, gen)
    pre = pre_weights(module).detach().clone().requires_grad_(True)
    assert module.scale is not None and module.bias is not None
    gamma = module.scale.detach().clone().requires_grad_(True)
    bias = module.bias.detach().clone().requires_grad_(True)
    row_mask = torch.tensor([[True, False, True], [False, True, True]])

    def call(inputs: Any, **kwargs: Any) -> Callable[..., Tensor]:
        def fn(p: Tensor, g: Tensor, b: Tensor, *xs: Tensor) -> Tensor:
            params = {"parametrizations.weights.original": p, "scale": g, "bias": b}
            return functional_call(module, params, (inputs(xs),), kwargs)

        return fn

    xs = [
        torch.randn(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in names
    ]
    stacked = torch.randn(3, 2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    cases: list[tuple[Callable[..., Tensor], tuple[Tensor, ...]]] = [
        (call(list), tuple(xs)),
        (call(tuple), tuple(xs)),
        (call(lambda t: t[0]), (stacked,)),
        (call(lambda t: {"a": t[0], "c": t[1]}), tuple(xs[:2])),
        (call(list, mask=row_mask), tuple(xs)),
        (call(lambda t: t[0], mask=row_mask[0]), (stacked,)),
    ]
    for fn, tensors in cases:
        assert torch.autograd.gradcheck(fn, (pre, gamma, bias, *tensors))


@pytest.mark.parametrize(("kind", "method"), KINDS)
def test_gradcheck_masked_weights_each_kind(kind: str, method: str) -> None:
    gen = torch.Generator().manual_seed(2)
    module = make_module(kind, method, 4).double()
    randomise(module, gen)
    pre = pre_weights(module).detach().clone().requires_grad_(True)
    mask = torch.tensor([[True, False, True, True], [False, True, False, True], [True] * 4])
    xs = [
        torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(4)
    ]

    def fn(p: Tensor, *xs: Tensor) -> Tensor:
        return functional_call(
            module, {"parametrizations.weights.original": p}, (list(xs),), {"mask": mask}
        )

    assert torch.autograd.gradcheck(fn, (pre, *xs))


# ---------------------------------------------------------------------------
# torch.func transforms, forward-mode AD and double backward (float64 references)
# ---------------------------------------------------------------------------


def _transform_case(
    kind: str, method: str
) -> tuple[Callable[..., Tensor], Callable[..., Tensor], tuple[Tensor, ...]]:
    """(module as a pure function, the float64 reference formula, their arguments)."""
    gen = torch.Generator().manual_seed(13)
    module = make_module(kind, method, 3, channels=2, scale=True, bias=True).double()
    randomise(module, gen)
    assert module.scale is not None and module.bias is not None
    args = (
        pre_weights(module).detach().clone(),
        module.scale.detach().clone(),
        module.bias.detach().clone(),
        torch.randn(3, 4, 2, generator=gen, dtype=torch.float64),  # stacked (K, B, C)
    )

    def fn(pre: Tensor, gamma: Tensor, bias: Tensor, xs: Tensor | list[Tensor]) -> Tensor:
        params = {"parametrizations.weights.original": pre, "scale": gamma, "bias": bias}
        return functional_call(module, params, (xs,))

    def ref(pre: Tensor, gamma: Tensor, bias: Tensor, xs: Tensor | list[Tensor]) -> Tensor:
        return ref_output(ref_weights(kind, method, pre), list(xs), 1, gamma, bias)

    return fn, ref, args


@pytest.mark.parametrize(("kind", "method"), KINDS)
def test_torch_func_grad_and_jacrev_match_reference(kind: str, method: str) -> None:
    fn, ref, args = _transform_case(kind, method)
    argnums = (0, 1, 2, 3)
    # Reference by classic autograd on the plain formula: Jacobian d out / d arg_i.
    want = torch.autograd.functional.jacobian(ref, args)
    got = torch.func.jacrev(fn, argnums=argnums)(*args)
    for a, b in zip(got, want, strict=True):
        assert_close_at_magnitude(a, b, 10.0, torch.float64, 8)
    weight = torch.randn(4, 2, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    grads = torch.func.grad(lambda *a: (fn(*a) * weight).sum(), argnums)(*args)
    for g, jac in zip(grads, want, strict=True):
        expected = (jac * weight.reshape(4, 2, *([1] * (jac.ndim - 2)))).sum((0, 1))
        assert_close_at_magnitude(g, expected, 10.0, torch.float64, 8)


def _forward_mode_cases() -> list[Any]:
    return [(kind, method, wrt) for kind, method in KINDS for wrt in ("inputs", "all")]


@pytest.mark.parametrize(("kind", "method", "wrt"), _forward_mode_cases())
# torch's own forward-AD decompositions script functions on first use.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_jacfwd_jvp_and_forward_ad_match_reference(kind: str, method: str, wrt: str) -> None:
    """Forward mode with respect to the inputs, scale and bias ("inputs": the pre-weights
    are a constant) or also the pre-weights ("all"), by ``torch.func`` and by
    ``torch.autograd.forward_ad``."""
    fn, ref, args = _transform_case(kind, method)
    want = torch.autograd.functional.jacobian(ref, args)
    if wrt == "inputs":
        pre, args = args[0], args[1:]
        want = want[1:]

        def call(*a: Tensor) -> Tensor:
            return fn(pre, *a)

    else:
        call = fn
    argnums = tuple(range(len(args)))
    got = torch.func.jacfwd(call, argnums=argnums)(*args)
    for a, b in zip(got, want, strict=True):
        assert_close_at_magnitude(a, b, 10.0, torch.float64, 8)

    gen = torch.Generator().manual_seed(17)
    tangents = tuple(torch.randn(a.shape, generator=gen, dtype=a.dtype) for a in args)
    expected = sum(
        (jac.reshape(4, 2, -1) * t.reshape(-1)).sum(-1)
        for jac, t in zip(want, tangents, strict=True)
    )
    _, got_t = torch.func.jvp(call, args, tangents)
    assert_close_at_magnitude(got_t, expected, 10.0, torch.float64, 8)
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(a, t) for a, t in zip(args, tangents, strict=True)]
        tangent = forward_ad.unpack_dual(call(*duals)).tangent
    assert tangent is not None
    assert_close_at_magnitude(tangent, expected, 10.0, torch.float64, 8)


def test_vmap_gives_per_sample_gradients_and_batches_any_subset_of_inputs() -> None:
    fn, ref, (pre, gamma, bias, xs) = _transform_case("simplex", "softmax")
    batch = torch.randn(
        5, 3, 4, 2, generator=torch.Generator().manual_seed(15), dtype=torch.float64
    )

    def sample_loss(p: Tensor, x: Tensor) -> Tensor:
        return fn(p, gamma, bias, x).square().sum()

    got = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0))(pre, batch)
    for sample, g in zip(batch, got, strict=True):
        p = pre.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(ref(p, gamma, bias, sample).square().sum(), p)
        assert_close_at_magnitude(g, expected, 10.0, torch.float64, 8)
    # Only the second input batched, as a list.
    out = torch.func.vmap(lambda x1: fn(pre, gamma, bias, [xs[0], x1, xs[2]]))(batch[:, 1])
    for b in range(5):
        expected = ref(pre, gamma, bias, [xs[0], batch[b, 1], xs[2]])
        assert_close_at_magnitude(out[b], expected, 10.0, torch.float64, 3)


DOUBLE_BACKWARD_FORMS = [
    ("list", None),  # one dot product per input
    ("stacked", None),  # one matrix-vector product
    ("list", 2),  # per-channel weights: products reduced over the batch
    ("row_mask", 2),  # per-row renormalised weights
    ("dict_subset", None),
]


@pytest.mark.parametrize(("form", "channels"), DOUBLE_BACKWARD_FORMS)
def test_double_backward_matches_reference_and_gradgradcheck(
    form: str, channels: int | None
) -> None:
    gen = torch.Generator().manual_seed(16)
    names = ["a", "b", "c"]
    module = sumto.WeightedSum(names=names, channels=channels, scale=True, bias=True).double()
    randomise(module, gen)
    assert module.scale is not None and module.bias is not None
    shape = (3, 2) if channels else (3, 4)
    n_inputs = 2 if form == "dict_subset" else 3  # a subset {"a", "c"}: two arguments
    leaves = [
        pre_weights(module).detach().clone(),
        module.scale.detach().clone(),
        module.bias.detach().clone(),
        *(torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n_inputs)),
    ]
    leaves = [t.requires_grad_(True) for t in leaves]
    mask = torch.tensor([[True, False, True], [False, True, True], [True, True, True]])
    present = [True, False, True] if form == "dict_subset" else [True] * 3

    def fn(pre: Tensor, gamma: Tensor, bias: Tensor, *xs: Tensor) -> Tensor:
        params = {"parametrizations.weights.original": pre, "scale": gamma, "bias": bias}
        inputs: Any = {
            "list": list(xs),
            "stacked": torch.stack(xs) if form == "stacked" else None,
            "row_mask": list(xs),
            "dict_subset": {"a": xs[0], "c": xs[-1]},
        }[form]
        kwargs = {"mask": mask} if form == "row_mask" else {}
        return functional_call(module, params, (inputs,), kwargs)

    def ref(pre: Tensor, gamma: Tensor, bias: Tensor, *xs: Tensor) -> Tensor:
        if form == "dict_subset":  # the absent input has weight 0
            xs = (xs[0], torch.zeros_like(xs[0]), xs[1])
        rows = mask.tolist() if form == "row_mask" else [present]
        w = torch.stack([ref_present_weights("simplex", "softmax", pre, row) for row in rows])
        return ref_output(
            w if form == "row_mask" else w[0], xs, 1 if channels else None, gamma, bias
        )

    def second_order(f: Callable[..., Tensor]) -> list[Tensor]:
        out = f(*leaves)
        grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
        total = sum((g * torch.cos(g)).sum() for g in grads)
        return list(torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True))

    for got, want in zip(second_order(fn), second_order(ref), strict=True):
        assert_close_at_magnitude(got, want, 100.0, torch.float64, 64)
    assert torch.autograd.gradgradcheck(fn, tuple(leaves))


# ---------------------------------------------------------------------------
# property test over shapes, dtypes, input forms, channels, masks and options
# ---------------------------------------------------------------------------


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    kind, method = draw(st.sampled_from(KINDS))
    k = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    channel_dim = None
    if len(shape) >= 1 and draw(st.booleans()):
        channel_dim = draw(st.integers(-len(shape), len(shape) - 1))
    mask_kind = draw(
        st.sampled_from(["none", "vector", "rows"] if len(shape) >= 1 else ["none", "vector"])
    )
    if mask_kind == "rows" and channel_dim is not None and channel_dim % len(shape) == 0:
        mask_kind = "vector"
    rows = shape[0] if mask_kind == "rows" else 1
    mask = [[draw(st.booleans()) for _ in range(k)] for _ in range(rows)]
    for row in mask:
        row[draw(st.integers(0, k - 1))] = True
    return {
        "kind": kind,
        "method": method,
        "k": k,
        "shape": shape,
        "channel_dim": channel_dim,
        "mask_kind": mask_kind,
        "mask": mask,
        "form": draw(st.sampled_from(["list", "tuple", "stacked", "dict"])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        "scale": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@given(case=cases())
def test_matches_float64_reference_over_shapes_dtypes_forms_and_masks(case: dict[str, Any]) -> None:
    k, shape, dtype = case["k"], case["shape"], case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    cd = case["channel_dim"]
    channels = None if cd is None else shape[cd]
    names = [f"in{i}" for i in range(k)]
    module = sumto.WeightedSum(
        names=names,
        weights=case["kind"],
        method=case["method"],
        scale=case["scale"],
        bias=case["bias"],
        channels=channels,
        channel_dim=0 if cd is None else cd,
    )
    module_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    module = module.to(module_dtype)
    randomise(module, gen)
    xs = [(3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype) for _ in range(k)]
    inputs: Any = {
        "list": xs,
        "tuple": tuple(xs),
        "stacked": torch.stack(xs) if xs else None,
        "dict": dict(zip(names, xs, strict=True)),
    }[case["form"]]
    mask = None
    present_rows = [[True] * k]
    if case["mask_kind"] != "none":
        present_rows = case["mask"]
        mask = torch.tensor(present_rows[0] if case["mask_kind"] == "vector" else present_rows)

    out = module(inputs, mask=mask)

    pre = pre_weights(module).detach()
    row_weights = torch.stack(
        [ref_present_weights(case["kind"], case["method"], pre, row) for row in present_rows]
    )
    weights = row_weights if case["mask_kind"] == "rows" else row_weights[0]
    ncd = None if cd is None else cd % len(shape)
    gamma = None if module.scale is None else module.scale.detach()
    bias = None if module.bias is None else module.bias.detach()
    expected = ref_output(weights, xs, ncd, gamma, bias)
    # Magnitude of the sum's terms: |gamma| sum_k |w_k x_k| + |b|.
    abs_terms = ref_output(
        weights.abs(), [x.abs() for x in xs], ncd, None if gamma is None else gamma.abs()
    )
    magnitude = abs_terms + (0.0 if bias is None else bias.double().abs().max())
    assert out.dtype == dtype and out.shape == shape
    # The weights are computed in the module's dtype (float32 unless float64).
    eps_dtype = dtype if torch.finfo(dtype).eps > torch.finfo(module_dtype).eps else module_dtype
    assert_close_at_magnitude(out, expected, magnitude, eps_dtype, k, k=16)

    # Renormalised weights always sum to 1 per row (and column).
    sums = weights.sum(-2 if (channels is not None) else -1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


# ---------------------------------------------------------------------------
# input forms, subsets and masks
# ---------------------------------------------------------------------------


def test_every_input_form_gives_the_same_output() -> None:
    gen = torch.Generator().manual_seed(3)
    module = sumto.WeightedSum(names=["a", "b", "c"], bias=True)
    randomise(module, gen)
    xs = [torch.randn(2, 3, generator=gen) for _ in range(3)]
    outs = [
        module(xs),
        module(tuple(xs)),
        module(torch.stack(xs)),
        module({"c": xs[2], "a": xs[0], "b": xs[1]}),  # dict order does not matter
    ]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize(("kind", "method"), KINDS)
def test_dict_subset_equals_mask_and_renormalises(kind: str, method: str) -> None:
    gen = torch.Generator().manual_seed(4)
    module = sumto.WeightedSum(names=["a", "b", "c", "d"], weights=kind, method=method).double()  # type: ignore[arg-type]
    randomise(module, gen)
    xs = {n: torch.randn(5, generator=gen, dtype=torch.float64) for n in "abcd"}
    subset = module({"b": xs["b"], "d": xs["d"]})
    masked = module(xs, mask=torch.tensor([False, True, False, True]))
    w = ref_present_weights(kind, method, pre_weights(module).detach(), [False, True, False, True])
    expected = w[1] * xs["b"] + w[3] * xs["d"]
    assert_close_at_magnitude(subset, expected, 10.0, torch.float64, 4)
    assert_close_at_magnitude(masked, expected, 10.0, torch.float64, 4)


@pytest.mark.parametrize(("kind", "method"), KINDS)
def test_mask_over_a_dict_subset_combines_both(kind: str, method: str) -> None:
    gen = torch.Generator().manual_seed(10)
    names = ["a", "b", "c", "d"]
    module = sumto.WeightedSum(names=names, weights=kind, method=method).double()  # type: ignore[arg-type]
    randomise(module, gen)
    xs = {n: torch.randn(2, 3, generator=gen, dtype=torch.float64) for n in "bcd"}
    mask = torch.tensor([[True, True, False, True], [True, False, True, False]])
    out = module(xs, mask=mask)
    pre = pre_weights(module).detach()
    for row, present in enumerate([[False, True, False, True], [False, False, True, False]]):
        w = ref_present_weights(kind, method, pre, present)
        expected = sum(w[names.index(n)] * x[row] for n, x in xs.items())
        assert_close_at_magnitude(out[row], expected, 10.0, torch.float64, 4)


def test_simplex_subset_is_the_rescaled_weights_and_affine_spreads_the_deficit() -> None:
    ones = [torch.ones(1) * v for v in (1.0, 10.0, 100.0)]
    simplex = sumto.WeightedSum(names=["a", "b", "c"], init=[0.2, 0.3, 0.5])
    out = simplex({"a": ones[0], "c": ones[2]})
    assert torch.allclose(out, torch.tensor([(0.2 * 1 + 0.5 * 100) / 0.7]))
    affine = sumto.WeightedSum(names=["a", "b", "c"], weights="affine", init=[2.0, -1.5, 0.5])
    out = affine({"a": ones[0], "c": ones[2]})
    # present sum 2.5, deficit -1.5 shared by 2 inputs: [1.25, -0.25]
    assert torch.allclose(out, torch.tensor([1.25 * 1 - 0.25 * 100]))


def test_per_row_mask_renormalises_each_row() -> None:
    module = sumto.WeightedSum(3, init=[0.2, 0.3, 0.5])
    xs = [torch.full((2, 2), v) for v in (1.0, 10.0, 100.0)]
    mask = torch.tensor([[True, True, False], [False, False, True]])
    out = module(xs, mask=mask)
    assert torch.allclose(out[0], torch.full((2,), (0.2 * 1 + 0.3 * 10) / 0.5))
    assert torch.allclose(out[1], torch.full((2,), 100.0))


def test_masked_softmax_has_no_nan_when_present_weights_underflow() -> None:
    # Softmax weight of input 1 underflows to 0 in float32; masking out input 0 must
    # still give input 1 the full weight (masked softmax, not 0 / 0).
    module = sumto.WeightedSum(2)
    with torch.no_grad():
        pre_weights(module).copy_(torch.tensor([0.0, -200.0]))
    out = module([torch.ones(3), torch.full((3,), 2.0)], mask=torch.tensor([False, True]))
    assert torch.equal(out, torch.full((3,), 2.0))


def test_sparsemax_subset_projects_present_pre_weights_even_when_all_were_zero() -> None:
    module = sumto.WeightedSum(names=["a", "b", "c"], method="sparsemax", init=[1.0, 0.0, 0.0])
    out = module({"b": torch.ones(2), "c": torch.full((2,), 3.0)})
    assert torch.isfinite(out).all()
    w = ref_project_simplex(pre_weights(module).detach()[1:].double(), 1.0, (0,))
    assert torch.allclose(out, (w[0] * 1 + w[1] * 3).float().expand(2))


# ---------------------------------------------------------------------------
# per-channel weights, scale and bias
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("channel_dim", [1, -1])
def test_per_channel_weights_broadcast_along_channel_dim(channel_dim: int) -> None:
    gen = torch.Generator().manual_seed(5)
    module = sumto.WeightedSum(3, channels=4, channel_dim=channel_dim, bias=True, method="relu")
    randomise(module, gen)
    assert module.weights.shape == (3, 4)
    assert torch.allclose(module.weights.sum(0), torch.ones(4))
    shape = (2, 4, 5) if channel_dim == 1 else (2, 5, 4)
    xs = [torch.randn(shape, generator=gen) for _ in range(3)]
    out = module(xs)
    assert module.bias is not None
    expected = ref_output(module.weights.detach(), xs, channel_dim % 3, None, module.bias.detach())
    assert_close_at_magnitude(out, expected, 20.0, torch.float32, 3)


def test_per_channel_init_accepts_k_or_k_by_c() -> None:
    shared = sumto.WeightedSum(channels=2, init=[0.25, 0.75])
    assert torch.allclose(shared.weights, torch.tensor([[0.25, 0.25], [0.75, 0.75]]))
    full = sumto.WeightedSum(channels=2, init=torch.tensor([[0.1, 0.6], [0.9, 0.4]]))
    assert torch.allclose(full.weights, torch.tensor([[0.1, 0.6], [0.9, 0.4]]))


def test_scale_and_bias_start_neutral_and_learn() -> None:
    module = sumto.WeightedSum(2, scale=True, bias=True)
    assert module.scale is not None and module.bias is not None
    assert float(module.scale) == 1.0 and float(module.bias) == 0.0
    xs = [torch.ones(3), torch.full((3,), 3.0)]
    assert torch.allclose(module(xs), torch.full((3,), 2.0))
    with torch.no_grad():
        module.scale.fill_(2.0)
        module.bias.fill_(-1.0)
    assert torch.allclose(module(xs), torch.full((3,), 3.0))
    module(xs).sum().backward()
    assert module.scale.grad is not None and float(module.scale.grad) == pytest.approx(6.0)
    assert module.bias.grad is not None and float(module.bias.grad) == pytest.approx(3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_output_keeps_input_dtype_and_gradients_match_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    module = sumto.WeightedSum(5, channels=3, bias=True)
    randomise(module, gen)
    xs = [torch.randn(4, 3, 6, generator=gen).to(dtype).requires_grad_(True) for _ in range(5)]
    grad = torch.randn(4, 3, 6, generator=gen).to(dtype)
    out = module(xs)
    out.backward(grad)
    assert out.dtype == dtype
    assert all(x.grad is not None and x.grad.dtype == dtype for x in xs)
    w = module.weights.detach()
    assert module.bias is not None
    expected = ref_output(w, xs, 1, None, module.bias.detach())
    mag = ref_output(w.abs(), [x.detach().abs() for x in xs], 1) + module.bias.detach().abs().max()
    eps_dtype = dtype if dtype in HALF else torch.float32
    assert_close_at_magnitude(out, expected, mag, eps_dtype, 5)
    for k, x in enumerate(xs):
        want = w[k].double().view(1, 3, 1) * grad.double()
        assert x.grad is not None
        assert_close_at_magnitude(x.grad, want, want.abs(), eps_dtype, 1)
    # Gradient of the pre-weights: chain rule through the float64 reference weights.
    pre = pre_weights(module).detach().double().requires_grad_(True)
    ref = ref_output(ref_weights("simplex", "softmax", pre), xs, 1)
    (ref * grad.double()).sum().backward()
    terms = sum((grad.double() * x.double()).abs().sum() for x in xs)
    assert pre.grad is not None and pre_weights(module).grad is not None
    assert_close_at_magnitude(pre_weights(module).grad, pre.grad, terms, eps_dtype, 4 * 6 * 5)


# ---------------------------------------------------------------------------
# lazy sizing and checkpoints
# ---------------------------------------------------------------------------


def test_lazy_sizing_from_first_call_then_fixed() -> None:
    module = sumto.WeightedSum()
    assert isinstance(module.weights, UninitializedParameter)
    assert module.has_uninitialized_params()
    out = module(torch.randn(4, 2, 3))  # stacked: K = 4
    assert out.shape == (2, 3)
    assert not module.has_uninitialized_params()
    assert module.num_inputs == 4
    assert torch.allclose(module.weights, torch.full((4,), 0.25))
    # The optimizer is created after the first call: it sees the real parameter.
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    before = pre_weights(module).detach().clone()
    module([torch.randn(2, 3) * (i + 1) for i in range(4)]).pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(pre_weights(module).detach(), before)
    with pytest.raises(ValueError, match="expected 4 inputs, got 3"):
        module([torch.randn(2, 3)] * 3)
    with pytest.raises(ValueError, match=r"shape \(4, \.\.\.\), got shape \(5, 2\)"):
        module(torch.randn(5, 2))


def test_lazy_sizing_keeps_dtype_and_per_channel_shape() -> None:
    module = sumto.WeightedSum(channels=3, bias=True).double()
    module([torch.randn(2, 3, dtype=torch.float64)] * 2)
    assert module.weights.shape == (2, 3) and module.weights.dtype == torch.float64


def test_lazy_first_call_errors_are_clear() -> None:
    with pytest.raises(TypeError, match="a dict needs names"):
        sumto.WeightedSum()({"a": torch.ones(2)})
    with pytest.raises(ValueError, match="at least one input"):
        sumto.WeightedSum()([])


def test_state_dict_round_trip_and_loading_into_an_unsized_module() -> None:
    gen = torch.Generator().manual_seed(7)
    source = sumto.WeightedSum(3, channels=2, bias=True, method="sparsemax")
    randomise(source, gen)
    state = source.state_dict()
    assert "parametrizations.weights.original" in state
    lazy = sumto.WeightedSum(channels=2, bias=True, method="sparsemax")
    lazy.load_state_dict(state)
    assert lazy.num_inputs == 3
    assert torch.equal(lazy.weights, source.weights)
    xs = [torch.randn(4, 2, generator=gen) for _ in range(3)]
    assert torch.equal(lazy(xs), source(xs))
    # A baked (plain) checkpoint, key "weights", also sizes and loads.
    baked = sumto.bake(source).state_dict()
    assert "weights" in baked
    again = sumto.WeightedSum(channels=2, bias=True, method="sparsemax")
    again.load_state_dict(baked)
    assert torch.allclose(again.weights, baked["weights"])


def _tensors(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, Tensor)}


def test_state_dict_records_names_and_k_as_metadata_not_entries() -> None:
    module = sumto.WeightedSum(names=["a", "b", "c"], channels=2, bias=True)
    state = module.state_dict()
    # No entry of its own: only the parameters (configurations travel in the metadata).
    assert sorted(state) == [
        "bias",
        "parametrizations.weights.original",
    ]
    loaded = save_and_load(state)
    metadata = loaded._metadata[""]  # type: ignore[attr-defined]
    assert metadata["sumto_names"] == ["a", "b", "c"] and metadata["sumto_num_inputs"] == 3
    nested = torch.nn.ModuleDict({"mix": sumto.WeightedSum(2)}).state_dict()
    assert nested._metadata["mix"]["sumto_num_inputs"] == 2  # type: ignore[attr-defined]
    assert "sumto_names" not in nested._metadata["mix"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("kind", "method"), KINDS)
@pytest.mark.parametrize("baked", [False, True], ids=["constrained", "baked"])
def test_loading_names_in_another_order_realigns_the_weights(
    kind: str, method: str, baked: bool
) -> None:
    gen = torch.Generator().manual_seed(11)
    names = ["rgb", "depth", "audio"]
    source = sumto.WeightedSum(names=names, weights=kind, method=method, channels=2, bias=True)  # type: ignore[arg-type]
    randomise(source, gen)
    if baked:
        sumto.bake(source)
    state = save_and_load(source.state_dict())
    target = sumto.WeightedSum(
        names=["audio", "rgb", "depth"],
        weights=kind,  # type: ignore[arg-type]
        method=method,
        channels=2,
        bias=True,
    )
    if baked:
        sumto.bake(target)
    target.load_state_dict(state)
    for name in names:
        assert torch.equal(
            target.weights[target.names.index(name)],  # type: ignore[union-attr]
            source.weights[names.index(name)],
        )
    xs = {n: torch.randn(4, 2, generator=gen) for n in names}
    # Equal up to the order of the sum's terms.
    assert_close_at_magnitude(target(xs), source(xs), 10.0, torch.float32, 3)
    subset = {"rgb": xs["rgb"], "audio": xs["audio"]}
    assert_close_at_magnitude(target(subset), source(subset), 10.0, torch.float32, 3)
    assert torch.equal(state["bias"], target.bias)  # not indexed by input: untouched


def test_loading_other_names_or_another_k_raises_and_changes_nothing() -> None:
    source = sumto.WeightedSum(names=["a", "b", "c"], init=[0.2, 0.3, 0.5], bias=True)
    state = save_and_load(source.state_dict())
    other = sumto.WeightedSum(names=["a", "b", "d"], bias=True)
    model = torch.nn.ModuleDict({"mix": other, "head": torch.nn.Linear(2, 2)})
    before = _tensors(model)
    full = OrderedDict({f"mix.{k}": v for k, v in state.items()})
    full.update({f"head.{k}": torch.zeros_like(v) for k, v in model["head"].state_dict().items()})
    full._metadata = OrderedDict(
        {f"mix{'.' + k if k else ''}": v for k, v in state._metadata.items()}
    )  # type: ignore[attr-defined]
    with pytest.raises(
        ValueError, match=r"names \['a', 'b', 'd'\].*got input names \['a', 'b', 'c'\]"
    ):
        model.load_state_dict(full)
    after = _tensors(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())

    unnamed = sumto.WeightedSum(4, bias=True)
    before = _tensors(unnamed)
    with pytest.raises(ValueError, match=r"with K=4 inputs, got K=3 named \['a', 'b', 'c'\]"):
        unnamed.load_state_dict(state)
    after = _tensors(unnamed)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_checkpoint_without_names_metadata_loads_positionally() -> None:
    source = sumto.WeightedSum(names=["a", "b", "c"], init=[0.2, 0.3, 0.5])
    plain = dict(source.state_dict())  # a dict without _metadata, as older checkpoints
    target = sumto.WeightedSum(names=["c", "a", "b"])
    target.load_state_dict(plain)
    assert torch.allclose(target.weights, torch.tensor([0.2, 0.3, 0.5]))
    # A lazy module still takes K from a checkpoint that has the metadata.
    lazy = sumto.WeightedSum()
    lazy.load_state_dict(save_and_load(sumto.WeightedSum(3, init=[0.2, 0.3, 0.5]).state_dict()))
    assert lazy.num_inputs == 3 and torch.allclose(lazy.weights, torch.tensor([0.2, 0.3, 0.5]))


@pytest.mark.parametrize(("kind", "method"), KINDS)
def test_baked_module_keeps_dict_subsets_and_masks(kind: str, method: str) -> None:
    gen = torch.Generator().manual_seed(12)
    names = ["a", "b", "c", "d"]
    init = [0.1, 0.2, 0.3, 0.4] if kind == "simplex" else [0.7, -0.4, 0.2, 0.5]
    module = sumto.WeightedSum(names=names, weights=kind, method=method, init=init).double()  # type: ignore[arg-type]
    baked = sumto.bake(copy.deepcopy(module))
    xs = {n: torch.randn(3, 2, generator=gen, dtype=torch.float64) for n in names}
    mask = torch.tensor([[True, False, True, True], [False, True, False, False], [True] * 4])
    subset = {"b": xs["b"], "d": xs["d"]}
    # Every present weight is nonzero, where a baked sparsemax equals the constrained one.
    assert_close_at_magnitude(baked(subset), module(subset), 10.0, torch.float64, 4)
    assert_close_at_magnitude(baked(xs, mask=mask), module(xs, mask=mask), 10.0, torch.float64, 4)
    assert_close_at_magnitude(
        baked({"a": xs["a"]}, mask=mask[0]), module({"a": xs["a"]}), 10.0, torch.float64, 1
    )


def test_lazy_first_call_from_many_threads_sizes_each_module_once() -> None:
    n_threads, n_modules = 8, 20
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race shows up in most modules
    failures: list[str] = []
    try:
        with ThreadPoolExecutor(n_threads) as pool:
            for i in range(n_modules):
                k = 2 + i % 4
                module = sumto.WeightedSum(channels=2) if i % 2 else sumto.WeightedSum()
                xs = [torch.full((3, 2), float(j)) for j in range(k)]
                barrier = threading.Barrier(n_threads)

                def call(
                    _: int,
                    module: sumto.WeightedSum = module,
                    xs: list[Tensor] = xs,
                    barrier: threading.Barrier = barrier,
                ) -> Tensor:
                    barrier.wait()
                    out: Tensor = module(xs)
                    return out

                try:
                    outs = list(pool.map(call, range(n_threads)))
                except Exception as error:  # any failure is the finding
                    failures.append(f"module {i}: {type(error).__name__}: {error}")
                    continue
                expected = torch.full((3, 2), (k - 1) / 2)  # uniform weights 1/k
                ok = (
                    module.num_inputs == k
                    and len(list(module.parameters())) == 1
                    and torch.allclose(module.weights, torch.full(module.weights.shape, 1.0 / k))
                    and all(torch.allclose(out, expected) for out in outs)
                )
                if not ok:
                    failures.append(f"module {i}: wrong weights or outputs")
    finally:
        sys.setswitchinterval(switch)
    assert failures == []


def test_compile_sizes_a_lazy_module() -> None:
    module = sumto.WeightedSum()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    xs = [torch.randn(2, 3) for _ in range(3)]
    assert torch.allclose(compiled(xs), module(xs))
    assert module.num_inputs == 3


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_inputs": 0}, ValueError, "num_inputs >= 1, got 0"),
        ({"num_inputs": 2.0}, TypeError, "num_inputs to be an int"),
        ({"num_inputs": True}, TypeError, "num_inputs to be an int"),
        ({"names": ["a", "a"]}, ValueError, "distinct names, got repeated"),
        ({"names": []}, ValueError, "at least one name"),
        ({"names": "ab"}, TypeError, "sequence of str"),
        ({"names": ["a", 1]}, TypeError, "sequence of str"),
        ({"num_inputs": 3, "names": ["a", "b"]}, ValueError, "one number of inputs K"),
        ({"num_inputs": 3, "init": [0.5, 0.5]}, ValueError, "one number of inputs K"),
        ({"weights": "convex"}, ValueError, "weights to be one of"),
        ({"method": "entmax"}, ValueError, "method to be one of"),
        ({"weights": "affine", "method": "sparsemax"}, ValueError, "method='softmax'"),
        ({"init": [0.5, 0.6]}, ValueError, "violation"),
        ({"init": [0.5, -0.5, 1.0]}, ValueError, "violation"),
        ({"init": [[0.5, 0.5]]}, ValueError, r"shape \(K,\)"),
        ({"init": "ab"}, TypeError, "init to be a sequence"),
        ({"channels": 0}, ValueError, "channels >= 1"),
        ({"channels": 2, "init": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]}, ValueError, r"\(K, 2\)"),
        ({"channel_dim": 1.0}, TypeError, "channel_dim to be an int"),
        ({"scale": 1}, TypeError, "scale to be a bool"),
    ],
)
def test_construction_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        sumto.WeightedSum(**kwargs)


def test_call_errors_name_the_problem() -> None:
    module = sumto.WeightedSum(names=["a", "b", "c"], channels=2)
    x = torch.ones(3, 2)
    with pytest.raises(KeyError, match="'d'"):
        module({"a": x, "d": x})
    with pytest.raises(ValueError, match="at least one of the inputs"):
        module({})
    with pytest.raises(ValueError, match="expected 3 inputs, got 2"):
        module([x, x])
    with pytest.raises(
        ValueError, match=r"identical shape, got shapes \[\(3, 2\), \(3, 2\), \(4, 2\)\]"
    ):
        module([x, x, torch.ones(4, 2)])
    with pytest.raises(TypeError, match="one dtype"):
        module([x, x, x.double()])
    with pytest.raises(TypeError, match="floating point"):
        module([x, x, torch.ones(3, 2, dtype=torch.int64)])
    with pytest.raises(TypeError, match="list or tuple of tensors"):
        module("abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"2 channels along dim 1, got shape \(3, 5\)"):
        module([torch.ones(3, 5)] * 3)
    with pytest.raises(IndexError, match="channel_dim in range"):
        module([torch.ones(2)] * 3)
    with pytest.raises(TypeError, match="mask to be a bool tensor"):
        module([x] * 3, mask=torch.ones(3))
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) or \(3, 3\)"):
        module([x] * 3, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="every mask row"):
        module([x] * 3, mask=torch.tensor([False, False, False]))
    with pytest.raises(ValueError, match=r"every mask row, got none \(row 1\)"):
        module([x] * 3, mask=torch.tensor([[True, False, False], [False] * 3, [True] * 3]))
    # The mask row check applies to the present subset of a dict.
    with pytest.raises(ValueError, match="every mask row"):
        module({"a": x}, mask=torch.tensor([False, True, True]))
    row_mask_on_channels = sumto.WeightedSum(2, channels=3, channel_dim=0)
    with pytest.raises(ValueError, match="channel_dim != 0"):
        row_mask_on_channels([torch.ones(3, 2)] * 2, mask=torch.ones(3, 2, dtype=torch.bool))


def test_wrong_number_of_inputs_points_to_names_and_mask() -> None:
    x = torch.ones(2, 3)
    named = sumto.WeightedSum(names=["a", "b", "c"])
    with pytest.raises(
        ValueError,
        match=r"expected 3 inputs, got 2; to leave inputs out, pass a dict with a subset of "
        r"names \['a', 'b', 'c'\], or pass all 3 with mask=",
    ):
        named([x, x])
    unnamed = sumto.WeightedSum(3)
    with pytest.raises(ValueError, match=r"build WeightedSum\(names=\[\.\.\.\]\) and pass a dict"):
        unnamed([x, x])
    with pytest.raises(ValueError, match=r"shape \(3, \.\.\.\), got shape \(2, 2, 3\); .*mask="):
        unnamed(torch.stack([x, x]))


# ---------------------------------------------------------------------------
# torch.compile, memory, training
# ---------------------------------------------------------------------------


def _compiled_matches_eager(
    module: sumto.WeightedSum, call: Callable[[Any], Tensor], backend: str
) -> None:
    out = call(module)
    out.sum().backward()
    want = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    module.zero_grad()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    got_out = call(compiled)
    got_out.sum().backward()
    got = [p.grad for p in module.parameters() if p.grad is not None]
    assert_close_at_magnitude(got_out, out, out.abs().max() + 1, torch.float32, 8, k=64)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert_close_at_magnitude(a, b, b.abs().max() + 1, torch.float32, 64, k=64)


def test_compile_fullgraph_aot_eager_every_path() -> None:
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(3, 4, 5, generator=gen) for _ in range(3)]
    mask = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    cases: list[tuple[sumto.WeightedSum, Callable[[Any], Tensor]]] = [
        (sumto.WeightedSum(3, scale=True, bias=True), lambda m: m(xs)),
        (sumto.WeightedSum(3), lambda m: m(torch.stack(xs))),
        (
            sumto.WeightedSum(names=["a", "b", "c"], method="sparsemax"),
            lambda m: m({"a": xs[0], "c": xs[2]}),
        ),
        (sumto.WeightedSum(3, channels=4, bias=True), lambda m: m(xs, mask=mask)),
        (
            sumto.WeightedSum(3, weights="affine", channels=5, channel_dim=-1),
            lambda m: m(xs, mask=mask[0]),
        ),
    ]
    for module, call in cases:
        randomise(module, gen)
        _compiled_matches_eager(module, call, "aot_eager")


def test_compile_inputs_present_in_varying_sets_through_a_mask_compile_once() -> None:
    """The compile-friendly form of varying inputs (documented): all of them and a mask.

    A dict subset is a different set of keys, on which dynamo guards: each new set
    compiles again. A mask is data: 12 presence patterns run one graph.
    """
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(18)
    names = ["a", "b", "c", "d"]
    module = sumto.WeightedSum(names=names, bias=True, method="sparsemax")
    randomise(module, gen)
    xs = {n: torch.randn(3, 5, generator=gen) for n in names}
    frames = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(module, fullgraph=True, backend=backend)
    patterns = [p for p in itertools.product([False, True], repeat=4) if any(p)][:12]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for pattern in patterns:
            out = compiled(xs, mask=torch.tensor(pattern))
            subset = {n: x for n, x, keep in zip(names, xs.values(), pattern, strict=True) if keep}
            assert_close_at_magnitude(out, module(subset), 10.0, torch.float32, 4)
    assert len(frames) == 1


@pytest.mark.slow
def test_compile_fullgraph_inductor() -> None:
    gen = torch.Generator().manual_seed(9)
    module = sumto.WeightedSum(4, channels=3, scale=True, bias=True)
    randomise(module, gen)
    xs = [torch.randn(2, 3, 8, generator=gen, requires_grad=True) for _ in range(4)]
    _compiled_matches_eager(module, lambda m: m(xs), "inductor")


def test_compiled_empty_mask_row_gives_zero_weights_not_nan() -> None:
    # Documented: compiled code cannot check mask rows without a device sync, so a row
    # with no input present gets all-zero weights (the output is the bias).
    module = sumto.WeightedSum(2, bias=True)
    with torch.no_grad():
        assert module.bias is not None
        module.bias.fill_(0.5)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    mask = torch.tensor([[True, False], [False, False]])
    out = compiled([torch.ones(2, 3), torch.ones(2, 3)], mask=mask)
    assert torch.equal(out[0], torch.full((3,), 1.5)) and torch.equal(out[1], torch.full((3,), 0.5))


def _large_allocations(fn: Callable[[], object], min_bytes: int) -> list[int]:
    """Sizes of the torch CPU allocations of at least ``min_bytes`` made by ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if (
            node.tag == torch._C._profiler._EventType.Allocation
            and node.extra_fields.alloc_size >= min_bytes
        ):
            sizes.append(node.extra_fields.alloc_size)
    return sizes


@pytest.mark.parametrize("form", ["list", "stacked"])
def test_forward_allocates_only_the_output_and_backward_only_the_gradients(form: str) -> None:
    module = sumto.WeightedSum(6)
    xs = [torch.randn(64, 64) for _ in range(6)]
    inputs: Any = xs if form == "list" else torch.stack(xs)
    nbytes = xs[0].nbytes
    holder: list[Tensor] = []
    assert _large_allocations(lambda: holder.append(module(inputs)), nbytes) == [nbytes]
    grad = torch.randn(64, 64)
    # Frozen inputs: the weights' gradient needs no input-sized temporary.
    assert _large_allocations(lambda: holder[0].backward(grad), nbytes) == []
    # Inputs that need gradients: exactly one allocation per gradient returned.
    for x in xs if form == "list" else [inputs]:
        x.requires_grad_(True)
    out = module(inputs)
    sizes = _large_allocations(lambda: out.backward(grad), nbytes)
    assert sizes == ([nbytes] * 6 if form == "list" else [6 * nbytes])


@pytest.mark.parametrize(("kind", "method"), KINDS)
def test_adam_learns_a_known_mixture(kind: str, method: str) -> None:
    torch.manual_seed(0)
    module = sumto.WeightedSum(3, weights=kind, method=method)  # type: ignore[arg-type]
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    for _ in range(300):
        xs = [torch.randn(32, 8) for _ in range(3)]
        loss = (module(xs) - (0.7 * xs[0] + 0.3 * xs[2])).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Softmax only approaches an exact 0 as its pre-weight goes to -inf.
    tol = 0.03 if method == "softmax" and kind == "simplex" else 1e-3
    assert torch.allclose(module.weights.detach(), torch.tensor([0.7, 0.0, 0.3]), atol=tol)


# ---------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------


def test_example_fixed_k_finds_the_useful_layer(capsys: pytest.CaptureFixture[str]) -> None:
    result = load_example("weighted_sum_fixed_k").main(["--steps", "60"])
    assert result["top_layer"] == 4.0
    assert "layer weights" in capsys.readouterr().out


def test_example_bias_with_batched_inputs_fits_weights_and_bias() -> None:
    result = load_example("weighted_sum_bias_batched").main(["--steps", "150"])
    assert result["weight_error"] < 0.05 and result["bias_error"] < 0.05


def test_example_varying_inputs_trains_one_parameter() -> None:
    result = load_example("weighted_sum_varying_inputs").main(["--steps", "150"])
    assert result["weight_error"] < 0.05


# ---------------------------------------------------------------------------
# ScalarMix options: init_logits, trainable=False, layer_norm, dropout
# ---------------------------------------------------------------------------


def _scalar_mix_case(dtype: torch.dtype, seed: int) -> tuple[list[Tensor], Tensor, Tensor, float]:
    """(K=4 inputs (2, 5, 8), a (2, 5) positions mask with some False, logits, gamma)."""
    gen = torch.Generator().manual_seed(seed)
    xs = [3.0 * torch.randn(2, 5, 8, generator=gen, dtype=dtype) + k for k in range(4)]
    mask = torch.rand(2, 5, generator=gen) > 0.3
    mask[0, 0] = True
    logits = torch.randn(4, generator=gen, dtype=torch.float64)
    return xs, mask, logits, 1.7


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["list", "stacked"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_scalar_mix_options_reproduce_allennlp_formula(
    dtype: torch.dtype, form: str, masked: bool, layer_norm: bool
) -> None:
    xs, mask, logits, gamma = _scalar_mix_case(dtype, 20)
    module = sumto.WeightedSum(init_logits=logits, scale=True, layer_norm=layer_norm).to(dtype)
    assert module.scale is not None
    with torch.no_grad():
        module.scale.fill_(gamma)
    inputs: Any = xs if form == "list" else torch.stack(xs)
    kwargs = {"layer_norm_mask": mask} if masked and layer_norm else {}
    out = module(inputs, **kwargs)
    expected = ref_scalar_mix(xs, logits, gamma, mask if masked else None, do_layer_norm=layer_norm)
    assert out.dtype == dtype
    err = float((out.detach().double() - expected).abs().max())
    assert err <= 1e-6, err


def test_layer_norm_gradients_match_allennlp_formula_and_gradcheck() -> None:
    xs, mask, logits, gamma = _scalar_mix_case(torch.float64, 21)
    module = sumto.WeightedSum(4, scale=True, layer_norm=True, bias=True).double()
    xs = [x.requires_grad_(True) for x in xs]
    grad = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    with torch.no_grad():
        pre_weights(module).copy_(logits)
        assert module.scale is not None and module.bias is not None
        module.scale.fill_(gamma)
    module(xs, layer_norm_mask=mask).backward(grad)
    got = [pre_weights(module).grad, module.scale.grad, *(x.grad for x in xs)]

    s = logits.clone().requires_grad_(True)
    g = torch.tensor(gamma, dtype=torch.float64, requires_grad=True)
    xs_ref = [x.detach().clone().requires_grad_(True) for x in xs]
    ref_scalar_mix(xs_ref, s, g, mask, do_layer_norm=True).backward(grad)
    want = [s.grad, g.grad, *(x.grad for x in xs_ref)]
    for a, b in zip(got, want, strict=True):
        assert a is not None and b is not None
        assert_close_at_magnitude(a, b, 100.0, torch.float64, 30)
    assert module.bias.grad is not None
    assert torch.allclose(module.bias.grad, grad.sum())

    small = [torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    small_mask = torch.tensor([[True, False, True], [False, True, True]])
    per_channel = sumto.WeightedSum(3, channels=3, layer_norm=True).double()
    randomise(per_channel)

    def fn(p: Tensor, *inputs: Tensor) -> Tensor:
        params = {"parametrizations.weights.original": p}
        return functional_call(
            per_channel, params, (list(inputs),), {"layer_norm_mask": small_mask}
        )

    pre = pre_weights(per_channel).detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (pre, *small))


def test_layer_norm_with_per_channel_weights_and_row_mask_matches_normalised_inputs() -> None:
    gen = torch.Generator().manual_seed(23)
    module = sumto.WeightedSum(3, channels=4, channel_dim=-1, bias=True).double()
    normed = sumto.WeightedSum(3, channels=4, channel_dim=-1, bias=True, layer_norm=True).double()
    randomise(module, gen)
    with torch.no_grad():
        pre_weights(normed).copy_(pre_weights(module))
        assert normed.bias is not None and module.bias is not None
        normed.bias.copy_(module.bias)
    xs = [5.0 + 2.0 * torch.randn(3, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    positions = torch.rand(3, 6, generator=gen) > 0.4
    row_mask = torch.tensor([[True, False, True], [True, True, True], [False, True, False]])

    def ln(x: Tensor) -> Tensor:
        m = positions.unsqueeze(-1).double()
        n = m.sum() * x.shape[-1]
        mean = (x * m).sum() / n
        return (x - mean) / torch.sqrt((((x - mean) * m) ** 2).sum() / n + 1e-12)

    for kwargs in ({}, {"mask": row_mask}):
        got = normed(xs, layer_norm_mask=positions, **kwargs)
        want = module([ln(x) for x in xs], **kwargs)
        assert_close_at_magnitude(got, want, 10.0, torch.float64, 8)


def test_layer_norm_all_positions_masked_gives_bias_not_nan() -> None:
    module = sumto.WeightedSum(3, layer_norm=True, bias=True)
    xs = [torch.randn(2, 4, 3, requires_grad=True) for _ in range(3)]
    out = module(xs, layer_norm_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(2, 4, 3))  # the bias, 0
    out.sum().backward()
    for x in xs:
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_layer_norm_half_inputs_are_normalised_in_float32() -> None:
    xs, mask, logits, _ = _scalar_mix_case(torch.float32, 24)
    module = sumto.WeightedSum(init_logits=logits, layer_norm=True)
    out = module([x.bfloat16() for x in xs], layer_norm_mask=mask)
    assert out.dtype == torch.bfloat16
    expected = ref_scalar_mix([x.bfloat16() for x in xs], logits, 1.0, mask, True)
    err = float((out.detach().double() - expected).abs().max())
    assert err <= 2 * 2**-8 * float(expected.abs().max())


def test_init_logits_sets_the_pre_weights_of_every_map() -> None:
    logits = torch.tensor([0.5, -1.0, 2.0])
    mix = sumto.WeightedSum(init_logits=logits)
    assert mix.num_inputs == 3
    assert torch.equal(pre_weights(mix).detach(), logits)
    assert_close_at_magnitude(mix.weights, torch.softmax(logits.double(), 0), 1.0, torch.float32, 2)
    for kind, method in KINDS:
        m = make_module(kind, method, 3, init_logits=[0.5, -1.0, 2.0])
        want = ref_weights(kind, method, logits.double())
        assert_close_at_magnitude(m.weights, want, 1.0, torch.float32, 4)
    per_channel = sumto.WeightedSum(channels=2, init_logits=logits)
    assert torch.equal(pre_weights(per_channel).detach(), logits.unsqueeze(1).expand(3, 2))
    full = torch.randn(3, 2)
    assert torch.equal(pre_weights(sumto.WeightedSum(channels=2, init_logits=full)).detach(), full)


def test_trainable_false_keeps_weights_fixed_in_buffers_and_state_dict() -> None:
    logits = torch.tensor([0.3, -0.2, 1.0])
    frozen = sumto.WeightedSum(init_logits=logits, trainable=False, scale=True)
    names = [name for name, _ in frozen.named_parameters()]
    assert names == ["scale"]
    assert "parametrizations.weights.original" in dict(frozen.named_buffers())
    assert "parametrizations.weights.original" in frozen.state_dict()
    assert not frozen.weights.requires_grad
    xs = [torch.randn(2, 3, requires_grad=True) for _ in range(3)]
    frozen(xs).sum().backward()
    assert pre_weights(frozen).grad is None and frozen.scale is not None
    assert frozen.scale.grad is not None and all(x.grad is not None for x in xs)
    opt = torch.optim.SGD(frozen.parameters(), lr=1.0)
    opt.step()
    assert torch.equal(pre_weights(frozen), logits)
    # Masks and subsets still renormalise; dtype conversions keep the buffer.
    doubled = frozen.double()
    assert pre_weights(doubled).dtype == torch.float64
    out = doubled([x.double() for x in xs], mask=torch.tensor([True, False, True]))
    w = torch.softmax(logits.double()[[0, 2]], 0) * doubled.scale.detach()
    expected = w[0] * xs[0].double() + w[1] * xs[2].double()
    assert_close_at_magnitude(out, expected, 10.0, torch.float32, 8)
    lazy = sumto.WeightedSum(trainable=False)
    lazy([torch.ones(2)] * 4)
    assert lazy.num_inputs == 4 and list(lazy.parameters()) == []
    assert torch.allclose(lazy.weights, torch.full((4,), 0.25))


def test_trainable_and_frozen_checkpoints_load_into_each_other() -> None:
    gen = torch.Generator().manual_seed(25)
    trained = sumto.WeightedSum(names=["a", "b", "c"], dropout=0.2)
    randomise(trained, gen)
    frozen = sumto.WeightedSum(names=["c", "a", "b"], trainable=False)
    frozen.load_state_dict(save_and_load(trained.state_dict()))
    for name in "abc":
        assert torch.equal(
            frozen.weights[frozen.names.index(name)],  # type: ignore[union-attr]
            trained.weights["abc".index(name)],
        )
    assert list(frozen.parameters()) == []
    back = sumto.WeightedSum(names=["c", "a", "b"])
    back.load_state_dict(save_and_load(frozen.state_dict()))
    assert torch.equal(back.weights, frozen.weights)
    assert pre_weights(back).requires_grad


def test_checkpoint_metadata_records_the_options_and_refuses_another_layer_norm() -> None:
    source = sumto.WeightedSum(3, layer_norm=True, dropout=0.25, trainable=False)
    state = save_and_load(source.state_dict())
    metadata = state._metadata[""]  # type: ignore[attr-defined]
    assert metadata["sumto_layer_norm"] is True
    assert metadata["sumto_dropout"] == 0.25 and metadata["sumto_trainable"] is False
    plain = sumto.WeightedSum(3, init_logits=[1.0, 2.0, 3.0])
    before = _tensors(plain)
    with pytest.raises(ValueError, match="layer_norm=False, got layer_norm=True"):
        plain.load_state_dict(state)
    assert all(torch.equal(v, _tensors(plain)[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="layer_norm=True, got layer_norm=False"):
        sumto.WeightedSum(3, layer_norm=True).load_state_dict(plain.state_dict())
    # Dropout and trainability do not change what the weights mean: they load across.
    sumto.WeightedSum(3, layer_norm=True).load_state_dict(state)


def _effective_weights(module: sumto.WeightedSum, **kwargs: Any) -> Tensor:
    """The weights one call applies: the output for one-hot inputs e_k."""
    k = module.num_inputs
    assert k is not None
    return module(list(torch.eye(k)), **kwargs).detach()


def test_dropout_drops_inputs_at_rate_p_and_renormalises() -> None:
    torch.manual_seed(26)
    logits = torch.randn(10)
    module = sumto.WeightedSum(init_logits=logits, dropout=0.3)
    dropped = 0
    calls = 2000
    for _ in range(calls):
        w = _effective_weights(module)
        kept = w > 0
        dropped += int((~kept).sum())
        assert kept.any()
        assert abs(float(w.sum()) - 1.0) < 1e-6
        # The masked softmax of the kept pre-weights.
        want = torch.softmax(logits.double()[kept], 0)
        assert torch.allclose(w[kept].double(), want, atol=1e-6)
    # 20000 Bernoulli(0.3) draws: standard deviation of the rate 0.0032.
    assert abs(dropped / (10 * calls) - 0.3) < 0.015
    module.eval()
    assert torch.equal(_effective_weights(module), torch.softmax(logits, 0).detach())


def test_dropout_keeps_one_input_when_all_are_dropped_and_respects_the_mask() -> None:
    torch.manual_seed(27)
    module = sumto.WeightedSum(2, dropout=0.9)
    counts = torch.zeros(2)
    for _ in range(400):
        w = _effective_weights(module)
        assert int((w > 0).sum()) >= 1 and abs(float(w.sum()) - 1.0) < 1e-6
        counts += (w > 0).float()
    # Mostly one input kept (0.81 of the calls drop both), either one as often.
    assert 150 < float(counts[0]) < 250 and 150 < float(counts[1]) < 250
    rows = torch.tensor([[True, False, True, False], [False, True, False, False]])
    masked = sumto.WeightedSum(4, dropout=0.7)
    eye = torch.eye(4).reshape(4, 1, 4).expand(4, 2, 4)  # input k: e_k for both samples
    for _ in range(200):
        w = masked(list(eye), mask=rows).detach()  # row b: the weights of sample b
        assert bool(((w > 0) <= rows).all()), w  # only present inputs are kept
        assert torch.allclose(w.sum(-1), torch.ones(2))


def test_dropout_is_identity_in_eval_and_with_p_zero() -> None:
    gen = torch.Generator().manual_seed(28)
    a = sumto.WeightedSum(3, dropout=0.5, bias=True)
    randomise(a, gen)
    b = sumto.WeightedSum(3, bias=True)
    b.load_state_dict(a.state_dict())
    xs = [torch.randn(4, 2, generator=gen) for _ in range(3)]
    a.eval()
    assert torch.equal(a(xs), b(xs))


def test_no_grad_forward_equals_the_recorded_forward() -> None:
    gen = torch.Generator().manual_seed(29)
    for kwargs in ({}, {"channels": 2, "bias": True, "scale": True}, {"layer_norm": True}):
        module = sumto.WeightedSum(3, **kwargs)
        randomise(module, gen)
        xs = [torch.randn(5, 2, generator=gen) for _ in range(3)]
        recorded = module(xs)
        assert recorded.requires_grad
        with torch.no_grad():
            assert torch.equal(module(xs), recorded)
        with torch.inference_mode():
            assert torch.equal(module(torch.stack(xs)), module(xs))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"init": [0.5, 0.5], "init_logits": [0.0, 0.0]},
            ValueError,
            "at most one of init .* and init_logits .*, got both",
        ),
        ({"init_logits": [0.0, float("inf")]}, ValueError, "finite init_logits"),
        ({"init_logits": [[0.0, 1.0]]}, ValueError, r"init_logits of shape \(K,\)"),
        ({"init_logits": "ab"}, TypeError, "init_logits to be a sequence"),
        ({"num_inputs": 3, "init_logits": [0.0, 1.0]}, ValueError, r"len\(init_logits\)"),
        ({"trainable": 0}, TypeError, "trainable to be a bool"),
        ({"layer_norm": "yes"}, TypeError, "layer_norm to be a bool"),
        ({"dropout": 1.0}, ValueError, r"dropout in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, ValueError, r"dropout in \[0, 1\)"),
        ({"dropout": float("nan")}, ValueError, r"dropout in \[0, 1\)"),
        ({"dropout": True}, TypeError, "dropout to be a float"),
        ({"dropout": "0.1"}, TypeError, "dropout to be a float"),
    ],
)
def test_scalar_mix_option_errors(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        sumto.WeightedSum(**kwargs)


def test_layer_norm_mask_errors() -> None:
    xs = [torch.randn(2, 3, 4) for _ in range(2)]
    plain = sumto.WeightedSum(2)
    with pytest.raises(ValueError, match="layer_norm_mask only with layer_norm=True"):
        plain(xs, layer_norm_mask=torch.ones(2, 3, dtype=torch.bool))
    normed = sumto.WeightedSum(2, layer_norm=True)
    with pytest.raises(TypeError, match="layer_norm_mask to be a bool tensor, got dtype"):
        normed(xs, layer_norm_mask=torch.ones(2, 3))
    with pytest.raises(
        ValueError, match=r"layer_norm_mask of shape \(2, 3\) .* got shape \(2, 3, 4\)"
    ):
        normed(xs, layer_norm_mask=torch.ones(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 1 dim for layer_norm_mask"):
        normed([torch.tensor(1.0)] * 2, layer_norm_mask=torch.tensor(True))
    with pytest.raises(TypeError, match="got list"):
        normed(xs, layer_norm_mask=[[True] * 3] * 2)  # type: ignore[arg-type]


def test_compile_fullgraph_layer_norm_dropout_and_masks() -> None:
    torch._dynamo.reset()
    xs, mask, logits, _ = _scalar_mix_case(torch.float32, 30)
    module = sumto.WeightedSum(init_logits=logits, layer_norm=True, dropout=0.3, bias=True)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    rows = torch.tensor([[True, False, True, True], [False, True, True, False]])
    module.eval()
    for kwargs in ({"layer_norm_mask": mask}, {"layer_norm_mask": mask, "mask": rows}, {}):
        assert_close_at_magnitude(
            compiled(xs, **kwargs), module(xs, **kwargs), 10.0, torch.float32, 8
        )
    dropping = torch.compile(
        sumto.WeightedSum(init_logits=logits, dropout=0.5), backend="aot_eager", fullgraph=True
    )
    torch.manual_seed(31)
    kept = torch.zeros(4)
    for _ in range(20):
        w = dropping(list(torch.eye(4))).detach()
        assert abs(float(w.sum()) - 1.0) < 1e-5
        kept += (w > 0).float()
    assert 20 <= float(kept.sum()) < 80  # some inputs dropped, at least one kept per call


class _LinearThenMix(torch.nn.Module):
    """A WeightedSum fed by a Linear: the case inductor got wrong through ``unbind``."""

    def __init__(self, method: str, stacked: bool) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)
        self.mix = sumto.WeightedSum(2, method=method)
        self.stacked = stacked

    def forward(self, x: Tensor) -> Tensor:
        parts = [self.lin(x), x[:, :4]]
        return self.mix(torch.stack(parts) if self.stacked else parts)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(("method", "stacked"), [("sparsemax", False), ("softmax", True)])
def test_inductor_gradients_of_a_mix_fed_by_a_linear_equal_eager(
    method: str, stacked: bool
) -> None:
    torch.manual_seed(0)
    module, x = _LinearThenMix(method, stacked), torch.randn(8, 6)
    grads = []
    for fn in (module, torch.compile(module, backend="inductor")):
        module.zero_grad()
        fn(x).square().mean().backward()
        grads.append([p.grad.clone() for p in module.parameters() if p.grad is not None])
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager)
