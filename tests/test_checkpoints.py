"""Integration, checkpoints: state_dicts, pickling and copies of sumto-constrained models.

What is shown: resuming from model and optimizer state_dicts (saved with torch.save,
loaded with ``weights_only=True``) is bit-identical to uninterrupted training;
pickling a whole constrained model (torch.save, pickle, copy.copy) raises an error
naming ``state_dict`` and ``sumto.bake``, and works after ``sumto.bake``;
``copy.deepcopy`` gives an independent model, also inside ``parametrize.cached()``.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import sumto
from reference import legacy_state_dict, save_and_load

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


# ---------------------------------------------------------------------------
# refused loads, validated checkpoints, old checkpoints
# ---------------------------------------------------------------------------

# Twelve configurations of a constrained Linear(4, 3); every one reads any other's
# checkpoint as a configuration mismatch.
CONFIGURATIONS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "sum_to": lambda m: sumto.sum_to(m),
    "sum_to_total_2": lambda m: sumto.sum_to(m, total=2.0),
    "sum_to_dim_0": lambda m: sumto.sum_to(m, dim=0),
    "sum_to_tensor": lambda m: sumto.sum_to(m, total=torch.tensor([1.0, -2.0, 0.5])),
    "softmax": lambda m: sumto.simplex(m),
    "softmax_t2": lambda m: sumto.simplex(m, temperature=2.0),
    "sparsemax": lambda m: sumto.simplex(m, method="sparsemax"),
    "relu": lambda m: sumto.simplex(m, method="relu"),
    "simplex_tensor": lambda m: sumto.simplex(m, total=torch.tensor([1.0, 2.0, 3.0])),
    "box": lambda m: sumto.box_sum(m, lower=-0.25, upper=0.75),
    "box_01": lambda m: sumto.box_sum(m, lower=0.0, upper=1.0),
    "linear_equality": lambda m: sumto.linear_equality(
        m, A=[[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 0.0, 0.0]], b=[1.0, 0.5]
    ),
}


def configured(kind: str, seed: int) -> nn.Sequential:
    """The constrained layer followed by a plain one, visited after it when loading."""
    torch.manual_seed(seed)
    return nn.Sequential(CONFIGURATIONS[kind](nn.Linear(4, 3)), nn.Linear(3, 2))


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} was overwritten by a refused load"


@pytest.mark.parametrize("loaded", sorted(CONFIGURATIONS))
def test_a_refused_load_leaves_every_tensor_as_it_was(loaded: str) -> None:
    for saved in sorted(set(CONFIGURATIONS) - {loaded}):
        checkpoint = save_and_load(configured(saved, seed=1).state_dict())
        model = configured(loaded, seed=2)
        before = snapshot(model)
        weight = model[0].weight.detach().clone()
        for strict in (True, False):
            with pytest.raises(ValueError, match="expected a checkpoint saved with"):
                model.load_state_dict(checkpoint, strict=strict)
        assert_unchanged(model, before)
        assert torch.equal(model[0].weight, weight)
        # copy.deepcopy keeps the configuration (the state_dict's metadata) too
        with pytest.raises(ValueError, match="expected a checkpoint saved with"):
            model.load_state_dict(copy.deepcopy(checkpoint))
        assert_unchanged(model, before)


@pytest.mark.parametrize("kind", sorted(CONFIGURATIONS))
def test_the_same_configuration_loads_exactly(kind: str) -> None:
    source, model = configured(kind, seed=1), configured(kind, seed=2)
    model.load_state_dict(save_and_load(source.state_dict()))
    assert torch.equal(model[0].weight, source[0].weight)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_old_checkpoints_with_extra_state_entries_still_load() -> None:
    source, model = make_net(0), make_net(1)
    legacy = legacy_state_dict(source)
    assert sum(k.endswith("._extra_state") for k in legacy) == len(CONSTRAINED) + 3
    model.load_state_dict(save_and_load(legacy))  # type: ignore[arg-type]  # strict
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # ... and refuse another configuration, before copying anything
    other = configured("softmax_t2", seed=3)
    before = snapshot(other)
    with pytest.raises(ValueError, match="expected a checkpoint saved with"):
        other.load_state_dict(legacy_state_dict(configured("softmax", seed=4)))
    assert_unchanged(other, before)


BAD_TOTALS = [
    ("sum_to_tensor", torch.tensor([1.0, math.nan, 0.5]), "expected a finite total"),
    ("sum_to_tensor", torch.tensor([1.0, math.inf, 0.5]), "expected a finite total"),
    ("simplex_tensor", torch.tensor([1.0, -2.0, 3.0]), r"expected total > 0 for the simplex"),
    ("simplex_tensor", torch.tensor([1.0, 0.0, 3.0]), r"expected total > 0 for the simplex"),
    ("sum_to_tensor", torch.tensor([1.0, 2.0]), r"of shape \(3,\), got shape \(2,\)"),
    (
        "sum_to_tensor",
        torch.tensor([1.0, 4e38, 0.5], dtype=torch.float64),
        r"expected \|total\| <= 3.403e\+38",
    ),
]


@pytest.mark.parametrize(("kind", "total", "message"), BAD_TOTALS)
@pytest.mark.parametrize("container", ["state_dict", "plain dict"])
def test_tensor_totals_from_a_checkpoint_are_validated_as_the_constructor_does(
    kind: str, total: Tensor, message: str, container: str
) -> None:
    checkpoint = configured(kind, seed=1).state_dict()
    checkpoint["0.parametrizations.weight.0.total"] = total
    if container == "plain dict":  # no metadata, no configuration: the tensors are still checked
        checkpoint = {k: v for k, v in checkpoint.items()}  # type: ignore[assignment]
    model = configured(kind, seed=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(checkpoint)
    assert_unchanged(model, before)
    assert bool(torch.isfinite(model[0].weight).all())


@pytest.mark.parametrize(
    ("kind", "key", "value"),
    [
        ("sum_to", "total", math.nan),
        ("softmax", "total", -1.0),
        ("softmax_t2", "temperature", -2.0),
        ("softmax", "method", "bogus"),
        ("box", "lower", math.nan),
        ("box", "upper", -1.0),
        ("sum_to_dim_0", "dim", [5]),
        ("linear_equality", "b", [1.0, math.nan]),
    ],
)
def test_invalid_saved_configuration_values_are_refused(kind: str, key: str, value: object) -> None:
    checkpoint = configured(kind, seed=1).state_dict()
    checkpoint._metadata["0"]["sumto.constraints"]["parametrizations.weight.0"]["config"][key] = (
        value
    )
    model = configured(kind, seed=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match="expected a checkpoint saved with"):
        model.load_state_dict(save_and_load(checkpoint))
    assert_unchanged(model, before)


def test_pre_weights_of_another_parametrization_are_refused() -> None:
    class Double(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * x

    other = nn.Linear(4, 3)
    parametrize.register_parametrization(other, "weight", Double())
    model = sumto.simplex(nn.Linear(4, 3))
    before = snapshot(model)
    with pytest.raises(ValueError, match="got pre-weights saved without a sumto constraint"):
        model.load_state_dict(other.state_dict())
    assert_unchanged(model, before)


def test_a_checkpoint_of_another_shape_is_refused_before_copying() -> None:
    model = nn.Sequential(sumto.sum_to(nn.Linear(4, 3)), nn.Linear(3, 2))
    wide = nn.Sequential(sumto.sum_to(nn.Linear(5, 3)), nn.Linear(3, 2))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"of shape \(3, 4\), got shape \(3, 5\)"):
        model.load_state_dict(wide.state_dict())
    assert_unchanged(model, before)
    mix = sumto.WeightedSum(3)  # K is read from the checkpoint
    # WeightedSum's own check of K (its names and count travel in the metadata) comes first
    with pytest.raises(ValueError, match=r"with K=3 inputs, got K=4"):
        mix.load_state_dict(sumto.WeightedSum(4).state_dict())
    empty = sumto.WeightedSum(3).state_dict()
    empty["parametrizations.weights.original"] = torch.zeros(0)
    with pytest.raises(ValueError, match=r"with K >= 1 rows, one per input, got shape \(0,\)"):
        sumto.WeightedSum().load_state_dict(empty)


def test_a_plain_dict_copy_loads_without_the_configuration_check() -> None:
    """The documented limit: dict(state_dict) drops the metadata holding the configuration."""
    saved = configured("sum_to_total_2", seed=1).state_dict()
    model = configured("sum_to", seed=2)
    model.load_state_dict(dict(saved))
    assert torch.equal(
        model[0].parametrizations.weight.original, saved["0.parametrizations.weight.original"]
    )


# ---------------------------------------------------------------------------
# averaging, torch utilities, meta device
# ---------------------------------------------------------------------------


def test_ema_loop_over_state_dict_values_works_on_a_constrained_model() -> None:
    """timm ModelEmaV2 style: every state_dict value is treated as a tensor."""
    model = make_net(0)
    ema = copy.deepcopy(model)
    opt = make_optimizer(model)
    expected = {k: v.clone() for k, v in ema.state_dict().items()}
    decay = 0.9
    for step in range(3):
        train(model, opt, range(step, step + 1))
        with torch.no_grad():
            for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
                e.copy_(decay * e + (1 - decay) * m)
        for key, m in model.state_dict().items():
            expected[key] = decay * expected[key] + (1 - decay) * m
    for key, value in ema.state_dict().items():
        assert torch.equal(value, expected[key]), key
    report = sumto.check(ema)
    assert len(report) == len(CONSTRAINED) + 3  # the projected parameter is not managed in ema
    assert all(v <= 1e-5 for v in report.values()), report
    fresh = make_net(5)
    fresh.load_state_dict(save_and_load(ema.state_dict()))
    assert torch.equal(fresh.conv.weight, ema.conv.weight)


@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("average", ["swa", "ema"])
def test_averaged_model_works_on_a_constrained_model(use_buffers: bool, average: str) -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = make_net(0)
    opt = make_optimizer(model)
    kwargs = {"multi_avg_fn": get_ema_multi_avg_fn(0.5)} if average == "ema" else {}
    averaged = AveragedModel(model, use_buffers=use_buffers, **kwargs)
    snapshots = []
    for step in range(3):
        train(model, opt, range(step, step + 1))
        averaged.update_parameters(model)
        snapshots.append([p.detach().clone() for p in model.parameters()])
    for i, p in enumerate(averaged.module.parameters()):
        values = [snap[i].double() for snap in snapshots]
        if average == "swa":
            want = sum(values) / len(values)
        else:
            want = values[0]
            for v in values[1:]:
                want = want + 0.5 * (v - want)
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1e-6)
    report = sumto.check(averaged.module)
    assert len(report) == len(CONSTRAINED) + 3
    assert all(v <= 1e-5 for v in report.values()), report
    x, img = torch.randn(2, 5), torch.randn(2, 1, 5, 5)
    assert averaged(x, img).shape == (2, 4)


def test_transfer_parametrizations_and_params_to_a_fresh_module() -> None:
    for kind in sorted(CONFIGURATIONS):
        torch.manual_seed(0)
        source = CONFIGURATIONS[kind](nn.Linear(4, 3))
        target = parametrize.transfer_parametrizations_and_params(source, nn.Linear(4, 3))
        assert torch.equal(target.weight, source.weight), kind
        assert target.parametrizations.weight.original is source.parametrizations.weight.original
        # assignments stay checked
        with pytest.raises(ValueError, match="expected value to satisfy"):
            target.weight = torch.full((3, 4), 5.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_prepare_qat_keeps_the_constrained_weight() -> None:
    from torch.ao.nn.qat import Linear as QATLinear
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    torch.manual_seed(0)
    model = nn.Sequential(sumto.simplex(nn.Linear(4, 3), method="sparsemax"), nn.ReLU())
    model.train()
    model.qconfig = get_default_qat_qconfig("fbgemm")  # type: ignore[assignment]
    qat = prepare_qat(model, inplace=False)
    assert isinstance(qat[0], QATLinear)
    assert torch.equal(qat[0].weight, model[0].weight)
    assert qat(torch.randn(2, 4)).shape == (2, 3)
    assert sumto.check(qat)["0.weight"] <= 1e-6


META_BUILT: dict[str, Callable[[], nn.Module]] = {
    **{kind: (lambda kind=kind: CONFIGURATIONS[kind](nn.Linear(4, 3))) for kind in CONFIGURATIONS},
    "bayar": lambda: sumto.bayar(nn.Conv2d(1, 2, 3)),
    "weighted_sum": lambda: sumto.WeightedSum(3, weights="affine", scale=True),
}


@pytest.mark.parametrize("kind", sorted(META_BUILT))
def test_register_on_the_meta_device_then_to_empty_and_load(kind: str) -> None:
    torch.manual_seed(0)
    source = META_BUILT[kind]()
    with torch.device("meta"):
        model = META_BUILT[kind]()
    name = "weights" if kind == "weighted_sum" else "weight"
    assert getattr(model, name).is_meta
    model.to_empty(device="cpu")
    model.load_state_dict(source.state_dict())
    assert torch.equal(getattr(model, name), getattr(source, name))
    assert sumto.check(model) == sumto.check(source)
    # a layer built on meta, then constrained
    if kind in CONFIGURATIONS:
        layer = CONFIGURATIONS[kind](nn.Linear(4, 3, device="meta"))
        layer.to_empty(device="cpu")
        layer.load_state_dict(source.state_dict())
        assert torch.equal(layer.weight, source.weight)


def test_a_meta_linear_system_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="expected A with values, got a meta tensor"):
        sumto.LinearEquality(torch.ones(1, 3, device="meta"), [1.0])
