"""Checkpoints, pickling and copies of sumto-constrained models.

What is shown: resuming from model and optimizer state_dicts (saved with torch.save,
loaded with ``weights_only=True``) is bit-identical to uninterrupted training;
pickling a whole constrained model (torch.save, pickle, copy.copy) raises an error
naming ``state_dict`` and ``sumto.bake``, and works after ``sumto.bake``;
``copy.deepcopy`` gives an independent model, also inside ``parametrize.cached()``.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import sumto

# One constrained module per constraint; each maps (B, 4) -> (B, 3).
CONSTRAINED: dict[str, Callable[[], nn.Module]] = {
    "sum_to": lambda: sumto.sum_to(nn.Linear(4, 3), total=torch.tensor([1.0, -2.0, 0.5])),
    "softmax": lambda: sumto.simplex(nn.Linear(4, 3), temperature=2.0),
    "sparsemax": lambda: sumto.simplex(nn.Linear(4, 3), method="sparsemax", dim=(0, 1)),
    "relu": lambda: sumto.simplex(nn.Linear(4, 3), method="relu", total=3.0),
    "box_sum": lambda: sumto.box_sum(nn.Linear(4, 3), lower=-0.25, upper=0.75),
    "linear_equality": lambda: sumto.linear_equality(
        nn.Linear(4, 3), A=[[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 0.0, 0.0]], b=[1.0, 0.5]
    ),
}


class Net(nn.Module):
    """Every constraint in one model, chained."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 4)
        self.parts = nn.ModuleList(
            [nn.Sequential(make(), nn.Tanh(), nn.Linear(3, 4)) for make in CONSTRAINED.values()]
        )
        self.mix = sumto.WeightedSum(len(CONSTRAINED), method="relu", scale=True)
        self.bayar = sumto.bayar(nn.Conv2d(1, 2, 3))
        self.conv = sumto.sum_to(nn.Conv2d(2, 2, 3, padding=1), dim=(1, 2, 3))
        self.projected = nn.Linear(4, 4)  # kept on the simplex by project_on_step

    def forward(self, x: Tensor, img: Tensor) -> Tensor:
        h = self.first(x)
        h = h + self.mix([part(h) for part in self.parts])
        h = self.projected(torch.tanh(h))
        return h + self.conv(self.bayar(img)).mean((2, 3)).sum(1, keepdim=True)


def make_net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, img, y = (
            torch.randn(6, 5, generator=g),
            torch.randn(6, 1, 5, 5, generator=g),
            torch.randn(6, 4, generator=g),
        )
        opt.zero_grad()
        (net(x, img) - y).square().mean().backward()
        opt.step()


def make_optimizer(net: Net) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(net.parameters(), lr=0.02, weight_decay=1e-3)
    sumto.project_on_step(opt, net.projected.weight, sumto.Simplex())
    return opt


def test_resume_from_state_dicts_is_bit_identical_to_uninterrupted_training() -> None:
    reference = make_net(0)
    opt_ref = make_optimizer(reference)
    train(reference, opt_ref, range(100))

    first = make_net(0)
    opt_first = make_optimizer(first)
    train(first, opt_first, range(50))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = make_net(123)  # a fresh model with other values: all of them must be loaded
    opt_resumed = make_optimizer(resumed)
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed.load_state_dict(checkpoint["optimizer"])
    train(resumed, opt_resumed, range(50, 100))

    got, want = resumed.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key
    for (name, p), (_, q) in zip(
        resumed.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    x, img = torch.randn(3, 5), torch.randn(3, 1, 5, 5)
    assert torch.equal(resumed(x, img), reference(x, img))
    report = sumto.check(resumed)
    assert {"projected.weight", "mix.weights", "bayar.weight", "conv.weight"} <= set(report)
    assert len(report) == len(CONSTRAINED) + 4
    assert all(v <= 1e-5 for v in report.values()), report


@pytest.mark.parametrize("save", ["torch.save", "pickle", "copy.copy"])
def test_pickling_a_constrained_model_names_state_dict_and_bake(save: str) -> None:
    net = make_net(0)
    targets: dict[str, Callable[[nn.Module], object]] = {
        "torch.save": lambda m: torch.save(m, io.BytesIO()),
        "pickle": pickle.dumps,
        "copy.copy": copy.copy,
    }
    # copy.copy of the plain parent is shallow (shares the children) and works.
    modules = (net.parts[1][0],) if save == "copy.copy" else (net, net.parts[1][0])
    for module in modules:
        with pytest.raises(RuntimeError, match=r"state_dict.*sumto\.bake"):
            targets[save](module)


def test_baked_model_pickles_and_keeps_its_values() -> None:
    net = make_net(0)
    x, img = torch.randn(3, 5), torch.randn(3, 1, 5, 5)
    with torch.no_grad():
        expected = net(x, img)
    sumto.bake(net)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not any(parametrize.is_parametrized(m) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x, img), expected)


# Every kind of constrained tensor: (factory, name of the constrained tensor).
COPYABLE: dict[str, tuple[Callable[[], nn.Module], str]] = {
    **{kind: (make, "weight") for kind, make in CONSTRAINED.items()},
    "bayar": (lambda: sumto.bayar(nn.Conv2d(1, 2, 3)), "weight"),
    "weighted_sum": (lambda: sumto.WeightedSum(3, weights="affine"), "weights"),
}


def make_copyable(kind: str) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    make, name = COPYABLE[kind]
    return make(), name


@pytest.mark.parametrize("kind", sorted(COPYABLE))
def test_deepcopy_is_independent_of_the_source(kind: str) -> None:
    source, name = make_copyable(kind)
    before = getattr(source, name).detach().clone()
    clone = copy.deepcopy(source)
    assert torch.equal(getattr(clone, name), before)
    assert clone.state_dict().keys() == source.state_dict().keys()
    original = clone.parametrizations[name].original
    with torch.no_grad():
        original.add_(torch.randn(original.shape))
    assert torch.equal(getattr(source, name), before)
    assert not torch.equal(getattr(clone, name), before)
    # Baking the copy must leave the source parametrized and readable.
    sumto.bake(clone)
    assert not parametrize.is_parametrized(clone, name)
    assert parametrize.is_parametrized(source, name)
    assert torch.equal(getattr(source, name), before)
    assert list(sumto.check(source)) == [name]


@pytest.mark.parametrize("kind", sorted(COPYABLE))
@pytest.mark.parametrize("first", ["source", "copy"])
@pytest.mark.parametrize("copy_inside", [True, False])
def test_deepcopy_inside_cached_reads_its_own_weight(
    kind: str, first: str, copy_inside: bool
) -> None:
    """parametrize.cached() keys its cache per module: a copy must not read the source's entry."""
    source, name = make_copyable(kind)
    clone = None if copy_inside else copy.deepcopy(source)
    with parametrize.cached():
        if clone is None:
            _ = getattr(source, name)  # the source's entry exists before the copy is made
            clone = copy.deepcopy(source)
        with torch.no_grad():
            original = clone.parametrizations[name].original
            original.add_(torch.arange(original.numel()).reshape(original.shape))
        want_source = source.parametrizations[name]()  # uncached evaluations
        want_clone = clone.parametrizations[name]()
        assert not torch.equal(want_source, want_clone)
        order = [(source, want_source), (clone, want_clone)]
        for module, want in order if first == "source" else order[::-1]:
            got = getattr(module, name)
            assert torch.equal(got, want)
            assert getattr(module, name) is got  # served from this module's own cache entry


def test_deepcopy_of_a_copy_and_registering_on_a_copy_stay_separate() -> None:
    torch.manual_seed(0)
    source = sumto.simplex(nn.Linear(4, 3))
    clone = copy.deepcopy(source)
    sumto.sum_to(clone, "bias", total=2.0)
    assert not parametrize.is_parametrized(source, "bias")
    assert isinstance(source.bias, nn.Parameter)
    grandchild = copy.deepcopy(clone)
    assert torch.allclose(grandchild.bias.sum(), torch.tensor(2.0))
    with parametrize.cached():
        assert grandchild.weight is not clone.weight
        assert grandchild.bias is not clone.bias


def test_plain_checkpoint_loads_into_a_deep_copy() -> None:
    torch.manual_seed(0)
    source = sumto.simplex(nn.Linear(4, 3))
    clone = copy.deepcopy(source)
    value = torch.full((3, 4), 0.25)
    clone.load_state_dict({"weight": value, "bias": torch.zeros(3)})
    assert torch.allclose(clone.weight, value, atol=1e-6)
    assert not torch.allclose(source.weight, value, atol=1e-6)
