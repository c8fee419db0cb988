"""A small GPT-style character language model (pre-LayerNorm, tied embeddings).

The architecture of GPT-2 at CPU size: token and position embeddings, ``n_layer`` blocks
of causal self-attention and an MLP, each behind a LayerNorm with a residual connection,
a final LayerNorm and a readout that shares its weight with the token embedding. The
four projections of a block are plain ``nn.Linear`` layers (``q``, ``k``, ``v`` kept
apart, so each has its own exact count under every distribution), which is what the
sparsifier and the compressed backend work on; the tied embedding stays dense unless
``sparse_embeddings=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be a multiple of n_head={n_head}")
        self.n_head = n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        b, t, d = x.shape

        def heads(y: Tensor) -> Tensor:  # (B, T, d) -> (B, heads, T, d / heads)
            return y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, mlp_ratio * d_model)
        self.out = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """(B, T) int64 character ids -> (B, T, vocab) next-character logits; T <= context."""

    def __init__(
        self, vocab: int, context: int, d_model: int, n_layer: int, n_head: int, mlp_ratio: int
    ) -> None:
        super().__init__()
        self.context = context
        self.embedding = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, mlp_ratio) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.embedding.weight  # tied: one parameter, one target
        self.apply(self._init)
        # GPT-2's scaling of the projections that write into the residual stream
        for block in self.blocks:
            for layer in (block.attn.proj, block.out):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context {self.context}")
        x = self.embedding(tokens) + self.position(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)
