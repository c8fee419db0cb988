"""RigL in a Hugging Face `Trainer` script: one callback, nothing else changes.

    pip install 'rigl[integrations]'
    python examples/huggingface_rigl.py          # under a minute on a CPU

Any `nn.Module` returning a loss trains with the `Trainer`; a `PreTrainedModel` works the
same way (the sparsifier takes every Linear/Conv weight by default; `include`/`exclude`
patterns of `rigl.create` narrow that down). The sparsifier's state is saved as
`rigl_sparsifier.pt` in every checkpoint folder and restored by
`trainer.train(resume_from_checkpoint=...)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from rigl.integrations.huggingface import RigLTrainerCallback


class Synthetic(Dataset):
    """The class of a 16-feature vector is the index of its largest first-4 feature."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 16, generator=g)
        self.y = self.x[:, :4].argmax(dim=1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)
        )

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def main() -> None:
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir="runs/huggingface_rigl",
        per_device_train_batch_size=64,
        num_train_epochs=4,
        lr_scheduler_type="cosine",
        save_strategy="no",
        logging_steps=100,
        report_to="none",
    )
    callback = RigLTrainerCallback("rigl", sparsity=0.9, distribution="erk", update_interval=25)
    model = Classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Synthetic(4096, 0),
        optimizers=(optimizer, None),  # None: the Trainer builds the cosine schedule
        callbacks=[callback],
    )
    trainer.train()

    test = Synthetic(2048, 1)
    with torch.no_grad():
        accuracy = (
            (model(test.x.to(trainer.args.device))["logits"].argmax(dim=1).cpu() == test.y)
            .float()
            .mean()
        )
    sparsifier = callback.sparsifier
    print(sparsifier.summary_table())
    print(
        f"{sparsifier.update_count} topology updates in {sparsifier.step_count} steps; test accuracy {accuracy:.3f}"
    )


if __name__ == "__main__":
    main()
