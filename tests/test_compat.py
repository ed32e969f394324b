"""sumto._compat: each shim over a private or version-specific torch name, and its fallback.

Each shim answers correctly in eager mode and under the transforms it detects; with
its private torch name removed (a torch that lacks it), it falls back to the safe
answer: "a transform may be active", so that callers take the path valid under every
transform, and "not registering", so that a value is checked like any assignment.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize

from sumto import _compat

PROBES = [
    (torch._C, "_are_functorch_transforms_active"),
    (torch._C._functorch, "is_functorch_wrapped_tensor"),
]
PROBE_IDS = ["transforms-active", "wrapped-tensor"]


def _as_tensor(flag: Callable[[Tensor], bool]) -> Callable[[Tensor], Tensor]:
    """``x -> x + flag(x)``: a flag read inside a transform, returned as a value."""

    def probe(x: Tensor) -> Tensor:
        return x + float(flag(x))

    return probe


def _in_vmap(flag: Callable[[Tensor], bool]) -> bool:
    return bool(torch.func.vmap(_as_tensor(flag))(torch.zeros(2)).eq(1).all())


def _in_grad(flag: Callable[[Tensor], bool]) -> bool:
    seen: list[bool] = []

    def f(x: Tensor) -> Tensor:
        seen.append(flag(x))
        return x.sum()

    torch.func.grad(f)(torch.zeros(2))
    return seen == [True]


def _in_compile(flag: Callable[[Tensor], bool]) -> bool:
    compiled = torch.compile(_as_tensor(flag), backend="eager", fullgraph=True)
    return bool(compiled(torch.zeros(2)).eq(1).all())


def _in_trace(flag: Callable[[Tensor], bool]) -> bool:
    x = torch.zeros(2)
    traced = torch.jit.trace(_as_tensor(flag), x, check_trace=False)  # type: ignore[no-untyped-call]
    return bool(traced(x).eq(1).all())


TRANSFORMS = [_in_vmap, _in_grad, _in_compile, _in_trace]
TRANSFORM_IDS = ["vmap", "grad", "compile", "jit-trace"]

pytestmark = [
    pytest.mark.usefixtures("fresh_dynamo"),
    pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning"),
]


# ---------------------------------------------------------------------------
# detection in eager mode and under each transform
# ---------------------------------------------------------------------------


def test_nothing_is_detected_in_eager_mode() -> None:
    x = torch.zeros(2)
    assert not _compat.is_compiling()
    assert not _compat.is_tracing()
    assert not _compat.transforms_active()
    assert not _compat.forward_ad_active()
    assert not _compat.functorch_active(x)
    assert not _compat.transforming(x)
    assert _compat.eager(x)


@pytest.mark.parametrize("inside", TRANSFORMS, ids=TRANSFORM_IDS)
def test_transforming_and_not_eager_under_every_transform(inside: Callable[..., bool]) -> None:
    assert inside(_compat.transforming)
    assert inside(lambda x: not _compat.eager(x))


def test_each_probe_sees_its_own_transform() -> None:
    assert _in_compile(lambda x: _compat.is_compiling())
    assert _in_trace(lambda x: _compat.is_tracing())
    assert _in_vmap(lambda x: _compat.transforms_active())
    assert _in_grad(lambda x: _compat.transforms_active())
    assert _in_vmap(_compat.functorch_active)
    assert _in_grad(_compat.functorch_active)
    # outside the transform again: nothing left active
    assert not _compat.transforms_active() and not _compat.functorch_active(torch.zeros(1))


def test_forward_ad_active_inside_a_dual_level_only() -> None:
    assert not _compat.forward_ad_active()
    with forward_ad.dual_level():
        assert _compat.forward_ad_active()
    assert not _compat.forward_ad_active()


def test_compiling_opaque_under_compile_only() -> None:
    assert _in_compile(_compat.compiling_opaque)
    for inside in (_in_vmap, _in_grad, _in_trace):
        assert not inside(_compat.compiling_opaque)
    assert not _compat.compiling_opaque(torch.zeros(2)) and not _compat.is_exporting()

    def vmapped_in_compile(x: Tensor) -> Tensor:
        return torch.func.vmap(_as_tensor(_compat.compiling_opaque))(x)

    compiled = torch.compile(vmapped_in_compile, backend="eager", fullgraph=True)
    assert bool(compiled(torch.zeros(2, 3)).eq(0).all())


def test_without_the_probes_compiled_code_is_traced_not_opaque(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(torch._C, "_are_functorch_transforms_active", raising=False)
    assert not _in_compile(_compat.compiling_opaque)
    monkeypatch.delattr(torch.compiler, "is_exporting", raising=False)
    assert not _compat.is_exporting()


def test_along_first_dim_gives_the_slices_as_selects() -> None:
    t = torch.arange(6.0).reshape(3, 2)
    parts = _compat.along_first_dim(t)
    assert len(parts) == 3
    assert all(torch.equal(p, u) for p, u in zip(parts, t.unbind(0), strict=True))
    assert all(p.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for p in parts)
    assert _compat.along_first_dim(torch.empty(0, 2)) == []


def test_eager_only_on_cpu() -> None:
    assert not _compat.eager(torch.zeros(2, device="meta"))


def test_wide_dtype_is_float64_except_on_mps() -> None:
    assert _compat.wide_dtype(torch.device("cpu")) == torch.float64
    assert _compat.wide_dtype(torch.device("meta")) == torch.float64
    assert _compat.wide_dtype(torch.device("mps")) == torch.float32


def test_own_parameter_reads_the_module_own_parameters_only() -> None:
    lin = nn.Linear(3, 2)
    assert _compat.own_parameter(lin, "weight") is lin.weight
    assert _compat.own_parameter(lin, "missing") is None
    lazy = nn.LazyLinear(2)
    assert isinstance(_compat.own_parameter(lazy, "weight"), nn.UninitializedParameter)
    parametrize.register_parametrization(lin, "weight", _Identity())
    assert _compat.own_parameter(lin, "weight") is None  # now held by the parametrization


class _Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class _Recording(nn.Module):
    """A parametrization that records, at each right_inverse, whether torch registers it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        return x

    def right_inverse(self, x: Tensor) -> Tensor:
        self.calls.append(_compat.registering_by_torch())
        return x


def test_registering_by_torch_at_registration_not_at_assignment() -> None:
    lin = nn.Linear(3, 2)
    recording = _Recording()
    parametrize.register_parametrization(lin, "weight", recording)
    assert recording.calls == [True]
    lin.weight = torch.zeros(2, 3)
    assert recording.calls == [True, False]
    assert not _compat.registering_by_torch()


def test_inject_property_gives_the_class_the_property_of_a_tensor() -> None:
    lin = nn.Linear(3, 2)
    parametrize.register_parametrization(lin, "weight", _Double())
    original = lin.parametrizations.weight.original
    delattr(type(lin), "weight")  # the injected class, not nn.Linear
    with pytest.raises(AttributeError):
        _ = lin.weight
    _compat.inject_property(lin, "weight")
    assert torch.equal(lin.weight, 2 * original)


class _Double(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * x


# ---------------------------------------------------------------------------
# fallbacks when the private torch name is missing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("owner", "name"), PROBES, ids=PROBE_IDS)
def test_without_a_functorch_probe_a_transform_is_assumed(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str
) -> None:
    monkeypatch.delattr(owner, name, raising=False)
    x = torch.zeros(2)
    assert _compat.functorch_active(x)
    assert _compat.transforming(x)
    assert not _compat.eager(x)


def test_without_the_transforms_probe_transforms_are_assumed_active(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(torch._C, "_are_functorch_transforms_active", raising=False)
    assert _compat.transforms_active()


@pytest.mark.parametrize("level", ["missing", None], ids=["missing", "not-an-int"])
def test_without_the_forward_ad_level_a_dual_level_is_assumed_open(
    monkeypatch: pytest.MonkeyPatch, level: str | None
) -> None:
    if level == "missing":
        monkeypatch.delattr(forward_ad, "_current_level", raising=False)
    else:
        monkeypatch.setattr(forward_ad, "_current_level", level)
    assert _compat.forward_ad_active()


def test_without_the_torch_code_object_nothing_counts_as_registering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The code object of ParametrizationList.__init__ is read once, at import; a torch
    # without it leaves None there.
    monkeypatch.setattr(_compat, "_PLIST_INIT_CODE", None)
    recording = _Recording()
    parametrize.register_parametrization(nn.Linear(3, 2), "weight", recording)
    assert recording.calls == [False]


def test_without_inject_property_the_torch_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(parametrize, "_inject_property", raising=False)
    lin = nn.Linear(3, 2)
    with pytest.raises(
        RuntimeError, match=r"expected torch\.nn\.utils\.parametrize\._inject_property"
    ):
        _compat.inject_property(lin, "weight")
