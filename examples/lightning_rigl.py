"""RigL in a PyTorch Lightning script: one callback, nothing else changes.

    pip install 'rigl[integrations]'
    python examples/lightning_rigl.py            # under a minute on a CPU

The task is synthetic (no download): the class of a 16-feature vector is the index of its
largest first-4 feature. Works the same with `devices=2, strategy="ddp"`, with
`precision="bf16-mixed"` or "16-mixed" on a GPU, and with `accumulate_grad_batches`.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rigl.integrations.lightning import RigLCallback


def synthetic(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return TensorDataset(x, x[:, :4].argmax(dim=1))


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(dim=1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True)


def main() -> None:
    L.seed_everything(0)
    train = DataLoader(synthetic(4096, 0), batch_size=64, shuffle=True)
    val = DataLoader(synthetic(2048, 1), batch_size=512)
    # any registered method: "rigl", "set", "snfs", "static", "gmp", "snip", "dense"
    rigl_callback = RigLCallback(
        "rigl", sparsity=0.9, distribution="erk", update_interval=25, drop_fraction=0.3
    )
    trainer = L.Trainer(
        max_epochs=4,
        callbacks=[rigl_callback],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(), train, val)
    sparsifier = rigl_callback.sparsifier
    print(sparsifier.summary_table())
    print(
        f"{sparsifier.update_count} topology updates in {sparsifier.step_count} steps; "
        f"val accuracy {float(trainer.callback_metrics['val_acc']):.3f}"
    )


if __name__ == "__main__":
    main()
