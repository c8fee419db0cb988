"""Tiny versions of the model families people train today, built from their configs (no
download): GPT-2, BERT and a Llama-style model from ``transformers``, a nanoGPT-style model
with a tied head, ``nn.TransformerEncoder``, ``nn.MultiheadAttention`` and a small ResNet.

Each :class:`Case` knows how to build its model, a batch, the loss, and what the sparsifier
must find in it by default: the sparsified tensors (in order), the tied pair left dense by
the embedding rule, and which tensors ``backend="sparse"`` compresses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, D, T, B = 100, 32, 16, 4  # vocabulary, width, tokens per sequence, batch
LAYERS = range(2)


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    targets: list[str]  # sparsified by default, in order
    compressed: list[str]  # of those, what backend="sparse" compresses
    tied: tuple[str, str] | None = None  # (embedding, head): one tensor, dense by default
    image: bool = False  # the batch is images, not token ids

    def batch(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + step)
        if self.image:
            return torch.randn(B, 3, 8, 8, generator=g)
        return torch.randint(0, VOCAB, (B, T), generator=g)


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss of a model returning logits (B, T, VOCAB)."""
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _hf_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


# -- Hugging Face models from configs ------------------------------------------------------------
def _transformers():
    return pytest.importorskip("transformers")


def gpt2() -> nn.Module:
    t = _transformers()
    config = t.GPT2Config(
        n_layer=2, n_embd=D, n_head=2, vocab_size=VOCAB, n_positions=T,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return t.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    t = _transformers()
    config = t.BertConfig(
        num_hidden_layers=2, hidden_size=D, num_attention_heads=2, intermediate_size=2 * D,
        vocab_size=VOCAB, max_position_embeddings=T, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return t.BertForMaskedLM(config)


def llama() -> nn.Module:
    t = _transformers()
    config = t.LlamaConfig(
        num_hidden_layers=2, hidden_size=D, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=2 * D, vocab_size=VOCAB, max_position_embeddings=T,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return t.LlamaForCausalLM(config)


# -- hand-written models ------------------------------------------------------------------------
class _NanoBlock(nn.Module):
    """nanoGPT's block: pre-LayerNorm, causal self-attention from one packed Linear, MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(D, 3 * D), "c_proj": nn.Linear(D, D)})
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(D, 4 * D), "c_proj": nn.Linear(4 * D, D)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        q, k, v = self.attn["c_attn"](self.ln_1(x)).split(D, dim=2)
        q, k, v = (z.reshape(*x.shape[:2], 2, D // 2).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, D / heads)
        x = x + self.attn["c_proj"](y.transpose(1, 2).reshape(x.shape))
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x))))


class NanoGPT(nn.Module):
    """karpathy/nanoGPT's layout, tiny; the token embedding is the head's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(VOCAB, D),
                "wpe": nn.Embedding(T, D),
                "h": nn.ModuleList(_NanoBlock() for _ in LAYERS),
                "ln_f": nn.LayerNorm(D),
            }
        )
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.transformer["wte"].weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, VOCAB)
        x = self.transformer["wte"](ids) + self.transformer["wpe"](torch.arange(ids.shape[1]))
        for block in self.transformer["h"]:
            x = block(x)
        return self.lm_head(self.transformer["ln_f"](x))


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (its eval fast path reads the layers' ``.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids)))


class Attention(nn.Module):
    """One ``nn.MultiheadAttention``: the packed q/k/v ``in_proj_weight`` and ``out_proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        return self.head(x + self.attn(x, x, x, need_weights=False)[0])


class _Basic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1, self.layer2 = _Basic(8, 8, 1), _Basic(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8) -> (B, 10)
        x = self.layer2(self.layer1(F.relu(self.bn(self.stem(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def _resnet_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), torch.arange(B) % 10)


# -- what each must give ------------------------------------------------------------------------
def _each(pattern: str, names: tuple[str, ...]) -> list[str]:
    return [pattern.format(i=i, n=n) for i in LAYERS for n in names]


_GPT2 = _each(
    "transformer.h.{i}.{n}.weight", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
)
_BERT = [
    *_each(
        "bert.encoder.layer.{i}.{n}.weight",
        ("attention.self.query", "attention.self.key", "attention.self.value",
         "attention.output.dense", "intermediate.dense", "output.dense"),
    ),
    "cls.predictions.transform.dense.weight",
]  # fmt: skip
_LLAMA = [
    *_each(
        "model.layers.{i}.{n}.weight",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    ),
    "lm_head.weight",
]  # fmt: skip
_NANO = _each(
    "transformer.h.{i}.{n}.weight", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
)
_ENC = _each(
    "enc.layers.{i}.{n}",
    ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"),
)
_RESNET = [
    "stem.weight", "layer1.conv1.weight", "layer1.conv2.weight", "layer2.conv1.weight",
    "layer2.conv2.weight", "layer2.shortcut.0.weight", "fc.weight",
]  # fmt: skip

CASES = {
    "gpt2": Case(gpt2, _hf_loss, _GPT2, [], tied=("transformer.wte.weight", "lm_head.weight")),
    "bert": Case(
        bert,
        _hf_loss,
        _BERT,
        _BERT,
        tied=("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
    ),
    "llama": Case(llama, _hf_loss, _LLAMA, _LLAMA),
    "nanogpt": Case(
        NanoGPT, _lm_loss, _NANO, _NANO, tied=("transformer.wte.weight", "lm_head.weight")
    ),
    "encoder": Case(
        Encoder,
        _lm_loss,
        [*_ENC, "head.weight"],
        [n for n in _ENC if "linear" in n] + ["head.weight"],
    ),
    "attention": Case(
        Attention,
        _lm_loss,
        ["attn.in_proj_weight", "attn.out_proj.weight", "head.weight"],
        ["head.weight"],
    ),
    "resnet": Case(ResNet, _resnet_loss, _RESNET, _RESNET, image=True),
}
