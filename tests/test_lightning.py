"""Lightning: examples/lightning_constrained.py's module under a real ``Trainer`` on CPU.

Shown: the constraints hold after training and after a resume from a checkpoint; the
resumed run starts from exactly the saved weights; ``project_on_step``, registered in
``configure_optimizers``, projects after every optimizer step Lightning takes; the
checkpoint carries the constraint configuration, which a load into another constraint
refuses and ``sumto inspect`` reads.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import sumto
from reference import assert_report_within, load_example, run_inspect
from sumto.constraints import CONFIG_METADATA_KEY

L = pytest.importorskip(
    "lightning", reason="needs lightning, in the dev extra: pip install -e '.[dev]'"
)

example = load_example("lightning_constrained")
EPOCHS, SAMPLES, BATCH = 2, 96, 32


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The example, small: fit, save, resume for as many epochs again."""
    folder = tmp_path_factory.mktemp("lightning")
    return example.main(["--epochs", str(EPOCHS), "--samples", str(SAMPLES), "--dir", str(folder)])


def _on_simplex(weights: list[float]) -> None:
    w = torch.tensor(weights, dtype=torch.float64)
    assert float(w.min()) >= 0.0, weights
    assert abs(float(w.sum()) - 1.0) <= 1e-6, weights


def test_constraints_hold_after_training_and_after_resume(run: dict[str, Any]) -> None:
    assert_report_within(run["violation_first"], names=2)  # mix.weight and sparse_mix.weight
    assert_report_within(run["violation_resumed"], names=2)
    _on_simplex(run["soft"])
    _on_simplex(run["sparse"])
    # The resumed fit continued where the first stopped.
    assert run["epochs"] == 2 * EPOCHS
    assert run["global_step"] == 2 * EPOCHS * (SAMPLES // BATCH)


def test_resume_starts_from_exactly_the_saved_weights(run: dict[str, Any]) -> None:
    assert run["restored_identical"] is True


def test_checkpoint_carries_the_constraint_config(run: dict[str, Any]) -> None:
    checkpoint = torch.load(run["checkpoint"], weights_only=True)
    state = checkpoint["state_dict"]
    assert sorted(state) == ["mix.parametrizations.weight.original", "sparse_mix.weight"]
    saved = state._metadata["mix"][CONFIG_METADATA_KEY]["parametrizations.weight.0"]
    assert saved["class"] == "Simplex"
    assert saved["config"]["method"] == "softmax" and saved["config"]["total"] == 1.0

    fresh = example.Mixture()
    fresh.load_state_dict(state)
    original = fresh.mix.parametrizations.weight.original
    assert torch.equal(original, state["mix.parametrizations.weight.original"])

    other = nn.Module()
    other.mix = sumto.sum_to(nn.Linear(5, 1, bias=False))
    other.sparse_mix = nn.Linear(5, 1, bias=False)
    with pytest.raises(ValueError, match="expected a checkpoint saved with AffineSum"):
        other.load_state_dict(state)


def test_sumto_inspect_reads_the_lightning_checkpoint(
    run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_inspect(Path(run["checkpoint"]), capsys)
    assert status == 0, err
    assert "state_dict/mix.weight: shape (1, 5)" in out
    assert "Simplex(total=1, dim=None, method='softmax')" in out


class _Watch(L.Callback):
    """The projected weight's distance to the simplex after every training batch."""

    def __init__(self) -> None:
        self.violations: list[float] = []
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        w = module.sparse_mix.weight.detach().double()
        self.weights.append(w.clone())
        off = max(float((w.sum(1) - 1).abs().max()), float((-w).clamp(min=0).max()))
        self.violations.append(off)


def test_projection_follows_every_step_lightning_takes(tmp_path: Path) -> None:
    example._quiet_lightning()
    L.seed_everything(0, verbose=False)
    watch = _Watch()
    model = example.Mixture()
    with torch.no_grad():  # far off the simplex: only a projection brings it back
        model.sparse_mix.weight.fill_(3.0)
    loader = torch.utils.data.DataLoader(example.make_data(64), batch_size=16)
    trainer = example.make_trainer(1, tmp_path, callbacks=[watch])
    trainer.fit(model, train_dataloaders=loader)
    assert len(watch.violations) == trainer.global_step == 4
    assert max(watch.violations) <= 1e-6, watch.violations
    # Each step moved the weights, and each time back onto the set.
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(watch.weights))
