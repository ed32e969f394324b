"""Integration, distributed: DDP, FSDP2 and FSDP1 on CPU with gloo, 2 processes on loopback.

One ``torch.multiprocessing`` spawn runs every scenario (starting processes is the
expensive part); each rank saves what it saw, and the tests compare it with
single-process training on the concatenated batch, run here.

What is shown:

* DDP: a model with ``sum_to``, ``simplex`` (softmax and sparsemax), ``box_sum``,
  ``linear_equality`` and ``WeightedSum`` trains with identical parameters on both
  ranks, equal to single-process training within 1e-5, constraints holding.
* FSDP2 (``fully_shard``): constraints whose sums run *across* the sharded dim 0
  are computed on the full tensor (inside forward the module sees the unsharded
  weight; outside forward ``sumto.check`` evaluates the full tensor), and training
  equals single-process training within 1e-5.
* FSDP1 (``use_orig_params=True``): outside forward the pre-weights are a flat
  shard; reading the constrained weight there raises ValueError (it would silently
  be the constraint of the shard) instead of returning a wrong value. Training and
  ``summon_full_params`` are correct.
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import sumto
from reference import assert_params_match, assert_report_within

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 5
BATCH = 8  # global batch; each rank gets BATCH // WORLD rows
MATCH = 1e-5  # distributed vs single-process training, absolute on unit-scale weights
TIMEOUT_S = 240.0


# ---------------------------------------------------------------------------
# models and data, shared by the workers and the single-process references
# ---------------------------------------------------------------------------


class DataParallelNet(nn.Module):
    """sum_to, simplex (softmax, sparsemax), box_sum, linear_equality and WeightedSum."""

    def __init__(self) -> None:
        super().__init__()
        self.affine = sumto.sum_to(nn.Linear(6, 8), total=2.0)
        # Started inside the simplex (every weight positive): projecting Linear's
        # init puts weights exactly on the face of the support, where the rounding
        # of a distributed gradient decides whether an entry enters the support and
        # the comparison with single-process training would measure that coin toss.
        interior = torch.softmax(torch.randn(8, 8), dim=1)
        self.sparsemax = sumto.simplex(nn.Linear(8, 8), method="sparsemax", init=interior)
        self.box = sumto.box_sum(nn.Linear(8, 8), lower=-0.3, upper=0.6)
        self.linear_eq = sumto.linear_equality(
            nn.Linear(8, 8), A=[[1.0] * 8, [1.0, -1.0] * 4], b=[1.0, 0.0]
        )
        self.mix = sumto.WeightedSum(3, method="softmax")
        self.head = sumto.simplex(nn.Linear(8, 3), dim=0)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.affine(x))
        mixed = self.mix(
            [torch.tanh(self.sparsemax(h)), torch.tanh(self.box(h)), self.linear_eq(h)]
        )
        return self.head(mixed)


class ShardedNet(nn.Module):
    """Sums over dim 0, the dim FSDP shards, so a per-shard constraint would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.affine = sumto.sum_to(nn.Linear(6, 8), total=2.0, dim=0)
        self.softmax = sumto.simplex(nn.Linear(8, 8), dim=0)
        self.sparsemax = sumto.simplex(nn.Linear(8, 3), method="sparsemax", dim=(0, 1), total=3.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.sparsemax(torch.tanh(self.softmax(torch.tanh(self.affine(x)))))


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return DataParallelNet() if kind == "ddp" else ShardedNet()


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # SGD: a distributed gradient differs from the single-process one by rounding
    # only, and SGD keeps that difference at rounding size (Adam can amplify it
    # where a second moment is near zero).
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def global_batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x) - y).square().mean()


def train_single_process(kind: str) -> dict[str, Tensor]:
    model = make_model(kind)
    opt = make_optimizer(model)
    for step in range(STEPS):
        x, y = global_batch(step)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------------------
# the worker: every scenario in one process group
# ---------------------------------------------------------------------------


def _train_local(model: nn.Module, forward: nn.Module, rank: int) -> None:
    opt = make_optimizer(model)
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for step in range(STEPS):
        x, y = global_batch(step)
        opt.zero_grad()
        loss_of(forward, x[rows], y[rows]).backward()
        opt.step()


def _ddp(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    model = make_model("ddp")
    _train_local(model, DistributedDataParallel(model), rank)
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "check": sumto.check(model),
    }


def _fsdp2(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = make_model("fsdp2")
    for sub in (model.affine, model.softmax, model.sparsemax):
        fully_shard(sub)
    fully_shard(model)
    local_shape = tuple(model.affine.parametrizations.weight.original.to_local().shape)
    seen: list[tuple[str, tuple[int, ...], Tensor]] = []

    def record(module: nn.Module, args: Any) -> None:
        w = module.weight
        seen.append((type(w).__name__, tuple(w.shape), w.detach().sum(0).clone()))

    model.affine.register_forward_pre_hook(record)
    _train_local(model, model, rank)
    # Outside forward: the pre-weights are DTensors; the sum over the sharded dim of
    # the affine weight is computed on the full tensor.
    outside = model.affine.weight
    assert isinstance(outside, DTensor)
    # (The (3, 8) sparsemax weight over dims (0, 1) is sharded unevenly: reading it
    # outside forward raises DTensor's "Cannot flatten unevenly sharded tensor".)
    outside_errors = {}
    for name in ("affine", "softmax"):
        plist = getattr(model, name).parametrizations.weight
        read = getattr(model, name).weight.full_tensor().detach()
        with torch.no_grad():
            full = plist[0](plist.original.full_tensor())
        outside_errors[name] = float((read - full).abs().max())
    full_params = {
        k: v.full_tensor().detach().clone() if isinstance(v, DTensor) else v.detach().clone()
        for k, v in model.named_parameters()
    }
    return {
        "local_shape": local_shape,
        "seen": seen,
        "outside_sums": outside.full_tensor().detach().sum(0),
        "outside_errors": outside_errors,
        "params": full_params,
        "check": sumto.check(model),
    }


def _fsdp1(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = make_model("fsdp1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = FullyShardedDataParallel(
            model, use_orig_params=True, device_id=torch.device("cpu")
        )
    _train_local(wrapped, wrapped, rank)
    inner = wrapped.module
    assert isinstance(inner, ShardedNet)
    flat_shape = tuple(inner.affine.parametrizations.weight.original.shape)
    try:
        _ = inner.affine.weight
        outside_error = ""
    except ValueError as err:
        outside_error = str(err)
    with FullyShardedDataParallel.summon_full_params(wrapped):
        params = {k: v.detach().clone() for k, v in inner.named_parameters()}
        check = sumto.check(inner)
    return {
        "flat_shape": flat_shape,
        "outside_error": outside_error,
        "params": params,
        "check": check,
    }


def _worker(rank: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD
    )
    try:
        for name, scenario in (("ddp", _ddp), ("fsdp2", _fsdp2), ("fsdp1", _fsdp1)):
            try:
                result: dict[str, Any] = scenario(rank)
            except Exception as err:  # recorded, so that one scenario cannot hide the others
                result = {"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"}
            torch.save(result, Path(out_dir) / f"{name}_{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out_dir = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        _worker, args=(str(out_dir),), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    out: dict[str, list[dict[str, Any]]] = {}
    for name in ("ddp", "fsdp2", "fsdp1"):
        out[name] = [
            torch.load(out_dir / f"{name}_{rank}.pt", weights_only=False) for rank in range(WORLD)
        ]
    return out


def scenario(results: dict[str, list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    ranks = results[name]
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"rank {rank}: {result['error']}"
    return ranks


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


def test_ddp_ranks_hold_identical_parameters(results: dict[str, list[dict[str, Any]]]) -> None:
    ranks = scenario(results, "ddp")
    first, second = ranks[0]["params"], ranks[1]["params"]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_ddp_equals_single_process_training_on_the_whole_batch(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    ranks = scenario(results, "ddp")
    reference = train_single_process("ddp")
    assert_params_match(ranks[0]["params"], reference, MATCH)
    # Training moved the parameters: the comparison is not between two initialisations.
    init = dict(make_model("ddp").named_parameters())
    assert any(not torch.allclose(reference[k], init[k]) for k in reference)
    for rank in ranks:
        assert_report_within(rank["check"], names=6)


def test_fsdp2_computes_constraints_on_the_full_tensor(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    ranks = scenario(results, "fsdp2")
    for rank in ranks:
        assert rank["local_shape"] == (8 // WORLD, 6)  # the pre-weights really are sharded
        assert len(rank["seen"]) == STEPS
        for kind, shape, sums in rank["seen"]:
            # Inside forward: the whole (8, 6) weight, every column summing to 2.
            assert kind == "Tensor" and shape == (8, 6)
            assert float((sums - 2.0).abs().max()) <= 1e-5
        assert float((rank["outside_sums"] - 2.0).abs().max()) <= 1e-5
        # Every weight read outside forward equals the constraint of the full tensor.
        for name, err in rank["outside_errors"].items():
            assert err <= 1e-6, f"{name}: {err:.3g}"
        assert_report_within(rank["check"], names=3)


def test_fsdp2_equals_single_process_training(results: dict[str, list[dict[str, Any]]]) -> None:
    ranks = scenario(results, "fsdp2")
    reference = train_single_process("fsdp2")
    for rank in ranks:
        assert_params_match(rank["params"], reference, MATCH)


def test_fsdp1_refuses_to_constrain_a_flat_shard_outside_forward(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    ranks = scenario(results, "fsdp1")
    reference = train_single_process("fsdp1")
    for rank in ranks:
        assert len(rank["flat_shape"]) == 1  # outside forward: a 1-D slice of the flat shard
        assert "registered shape (8, 6)" in rank["outside_error"]
        assert "summon_full_params" in rank["outside_error"]
        assert_params_match(rank["params"], reference, MATCH)
        assert_report_within(rank["check"], names=3)
