"""Lightning: constrained layers, a projection after each optimizer step, checkpoint resume.

A ``LightningModule`` learns the same mixture of 5 noisy sources twice:

* ``mix``: a ``Linear`` whose weight row is a softmax simplex (``sumto.simplex``), a
  parametrization, registered in ``__init__`` so the optimizer sees its pre-weights;
* ``sparse_mix``: a plain ``Linear`` kept on the simplex by ``sumto.project_on_step``,
  registered in ``configure_optimizers`` on the optimizer it returns. Lightning calls
  that optimizer's ``step()`` (through its ``LightningOptimizer`` wrapper and precision
  plugin), which runs the projection as a step post-hook, so the projection follows
  every step Lightning takes and none it skips. The Euclidean projection can set
  weights exactly to zero, which a softmax never does.

Training stops after ``--epochs``, is saved with ``trainer.save_checkpoint`` (the
constraints' configuration travels in the state_dict's metadata, so a load into a
different constraint fails) and resumes for as many epochs again from the checkpoint
(``trainer.fit(..., ckpt_path=...)``). Lightning restores the weights before it calls
``configure_optimizers``; ``project_on_step`` leaves values already on the set
untouched, so the resumed run starts from exactly the saved weights.

Run: ``.venv/bin/python examples/lightning_constrained.py [--epochs N] [--dir DIR]``
(needs ``pip install lightning``)
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import sumto

TRUE_WEIGHTS = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0])


class Mixture(L.LightningModule):
    """Two learners of one mixture: a simplex parametrization and a projected plain layer."""

    def __init__(self, sources: int = 5, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.mix = sumto.simplex(nn.Linear(sources, 1, bias=False))
        self.sparse_mix = nn.Linear(sources, 1, bias=False)
        self.restored: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.mix(x).squeeze(-1), self.sparse_mix(x).squeeze(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        soft, sparse = self(x)
        loss = nn.functional.mse_loss(soft, y) + nn.functional.mse_loss(sparse, y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        # On the optimizer Lightning steps: projected after each of its step() calls.
        self.projection = sumto.project_on_step(optimizer, self.sparse_mix.weight, sumto.Simplex())
        return optimizer

    def on_train_start(self) -> None:
        # What training starts from: after a resume, the weights read from the checkpoint.
        self.restored = {k: v.detach().clone() for k, v in self.state_dict().items()}


def make_data(samples: int, seed: int = 0) -> TensorDataset:
    """Five noisy sources and their true mixture plus noise."""
    generator = torch.Generator().manual_seed(seed)
    sources = torch.randn(samples, len(TRUE_WEIGHTS), generator=generator)
    target = sources @ TRUE_WEIGHTS + 0.05 * torch.randn(samples, generator=generator)
    return TensorDataset(sources, target)


def make_trainer(max_epochs: int, root: Path, **options: Any) -> L.Trainer:
    """A quiet CPU trainer; checkpoints are written explicitly."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(max_epochs=max_epochs, default_root_dir=root, **(settings | options))


def _quiet_lightning() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, save, resume; returns the weights, the violations and the resume checks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs before and after resume")
    parser.add_argument("--samples", type=int, default=512, help="training samples")
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint folder (temporary)")
    args = parser.parse_args(argv)
    _quiet_lightning()
    L.seed_everything(0, verbose=False)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        loader = DataLoader(make_data(args.samples), batch_size=32, shuffle=True)

        model = Mixture()
        trainer = make_trainer(args.epochs, root)
        trainer.fit(model, train_dataloaders=loader)
        checkpoint = root / "mixture.ckpt"
        trainer.save_checkpoint(checkpoint)
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        first = sumto.check(model)

        resumed = Mixture()
        trainer = make_trainer(2 * args.epochs, root)
        trainer.fit(resumed, train_dataloaders=loader, ckpt_path=checkpoint)
        after = sumto.check(resumed)
        identical = all(torch.equal(resumed.restored[k], v) for k, v in saved.items())

    soft = resumed.mix.weight.detach().squeeze(0)
    sparse = resumed.sparse_mix.weight.detach().squeeze(0)
    print(f"true weights               {[round(w, 3) for w in TRUE_WEIGHTS.tolist()]}")
    print(f"softmax simplex (param.)   {[round(w, 4) for w in soft.tolist()]}")
    print(f"project_on_step (plain)    {[round(w, 4) for w in sparse.tolist()]}")
    print(f"max violation after fit    {max(first.values()):.1e} ({', '.join(sorted(first))})")
    print(f"max violation after resume {max(after.values()):.1e}")
    print(
        f"resumed at epoch {args.epochs} from the checkpoint with identical weights: {identical};"
        f" trained to epoch {trainer.current_epoch}, {trainer.global_step} optimizer steps"
    )
    return {
        "soft": soft.tolist(),
        "sparse": sparse.tolist(),
        "violation_first": first,
        "violation_resumed": after,
        "restored_identical": identical,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "checkpoint": str(checkpoint),
    }


if __name__ == "__main__":
    main()
