"""RigL on a Hugging Face GPT-2 with the `Trainer`: a tiny byte-level GPT-2 built from a
`GPT2Config` (no download) learns this repository's README.

    pip install 'rigl[integrations]'
    python examples/huggingface_gpt2_rigl.py              # about a minute of CPU time
    python examples/huggingface_gpt2_rigl.py --max-steps 20   # a smoke run

What gets sparsified in a GPT-2 (printed at the end by `summary_table()`): the attention and
MLP projections, which are Hugging Face `Conv1D` layers (a linear layer with its weight
stored (in, out)). The token embedding is tied to the output head (`lm_head.weight`): one
tensor, which follows the embedding rule and stays dense unless `sparse_embeddings=True`.
The callback logs `rigl/density`, `rigl/updates` and `rigl/drop_fraction` into the
Trainer's logs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from rigl.integrations.huggingface import RigLTrainerCallback

CONTEXT = 64


class Bytes(Dataset):
    """Windows of ``CONTEXT`` bytes of a text; token id = byte value (vocabulary 256)."""

    def __init__(self, text: str, stride: int = CONTEXT // 2) -> None:
        self.data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        self.starts = range(0, len(self.data) - CONTEXT, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[self.starts[i] : self.starts[i] + CONTEXT]
        return {"input_ids": ids, "labels": ids}  # GPT-2 shifts the labels itself


def corpus() -> str:
    """The README next to this example; generated text if the file is not there."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if readme.exists():
        return readme.read_text(encoding="utf-8")
    return " ".join(f"step {i} drops {i % 7} and grows {i % 5} weights." for i in range(2000))


def main(
    max_steps: int = 120, output_dir: str = "runs/huggingface_gpt2_rigl"
) -> RigLTrainerCallback:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    callback = RigLTrainerCallback(
        "rigl", sparsity=0.9, distribution="erk", update_interval=max(1, max_steps // 15)
    )
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=16,
        max_steps=max_steps,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        logging_steps=max(1, max_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Bytes(corpus()), callbacks=[callback])
    trainer.train()

    sparsifier = callback.sparsifier
    print(sparsifier.summary_table())
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    print(
        f"step {last['step']}: loss {last['loss']:.3f}, density {last['rigl/density']:.3f}, "
        f"{sparsifier.update_count} topology updates"
    )
    return callback


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--output-dir", default="runs/huggingface_gpt2_rigl")
    options = parser.parse_args()
    main(options.max_steps, options.output_dir)
