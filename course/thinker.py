"""ThinkerLM: a tiny decoder-only language model, readable top to bottom.

The architecture is the one of Llama-style models, shrunk to a few hundred
thousand parameters so it trains on a laptop CPU in a minute:

    token ids (B, T)
      -> embed_tokens                        (B, T, d_model)
      -> n_layers x Block:
             x = x + Attention(RMSNorm(x))   causal self-attention with RoPE
             x = x + SwiGLU(RMSNorm(x))      gated feed-forward network
      -> norm (a final RMSNorm)
      -> lm_head, whose weight IS embed_tokens.weight (tied)
    logits (B, T, vocab_size)

Instead of token ids, ``forward`` also takes ``inputs_embeds`` (B, T, d_model),
for example image or audio features projected to d_model and concatenated
with text embeddings. Positions are not added to the embeddings: rotary
position embeddings (RoPE) rotate queries and keys inside attention.

Example::

    model = ThinkerLM(vocab_size=1024, n_layers=2, d_model=128, n_heads=4, d_ff=384)
    logits = model(torch.randint(0, 1024, (2, 16)))     # (2, 16, 1024)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / rms(x) * weight, without centring or bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x / rms * self.weight


def rope_cos_sin(head_dim: int, ctx_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotary angles, each (ctx_len, head_dim).

    Channel pair (i, i + head_dim/2) at position p is rotated by the angle
    p * theta^(-2i/head_dim): fast rotations for the first pairs, slow ones
    for the last.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (head_dim/2,)
    angles = torch.outer(torch.arange(ctx_len, dtype=torch.float32), inv_freq)  # (ctx_len, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (ctx_len, head_dim)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair of x (B, H, T, head_dim) by its position's angle.

    A rotation keeps the length of every pair, so the norm of each query and
    key vector is unchanged; the dot product of a rotated query at position m
    and a rotated key at position n depends only on m - n.
    """
    return x * cos + rotate_half(x) * sin


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t only sees positions <= t."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # (B, T, D) -> (B, n_heads, T, head_dim)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # softmax(q k^T / sqrt(head_dim) + causal mask) v, fused by PyTorch.
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(B, T, D)  # heads back side by side
        return self.o_proj(out)


class SwiGLU(nn.Module):
    """Gated feed-forward network: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm transformer block: attention, then feed-forward, each on a residual path."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.attn_norm = RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.mlp_norm = RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, d_ff)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cos, sin))
        x = x + self.resid_dropout(self.mlp(self.mlp_norm(x)))
        return x


class ThinkerLM(nn.Module):
    """A decoder-only language model: ``model(input_ids)`` or ``model(inputs_embeds=x)`` -> logits.

    Attributes: ``config`` (a plain dict of the constructor arguments, what a
    checkpoint stores), ``vocab_size``, ``d_model``, ``ctx_len`` (the longest
    sequence it accepts), ``embed_tokens`` (nn.Embedding), ``layers``
    (nn.ModuleList of Block), ``norm`` (the final RMSNorm) and ``lm_head``
    (nn.Linear without bias, whose weight is ``embed_tokens.weight``).
    """

    def __init__(
        self,
        vocab_size: int,
        n_layers: int,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        rope_theta: float = 10000.0,
        ctx_len: int = 256,
    ):
        super().__init__()
        self.config = dict(
            vocab_size=int(vocab_size), n_layers=int(n_layers), d_model=int(d_model), n_heads=int(n_heads),
            d_ff=int(d_ff), dropout=float(dropout), rope_theta=float(rope_theta), ctx_len=int(ctx_len),
        )
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.ctx_len = ctx_len

        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.embed_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList([Block(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)])
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied: one matrix, two uses

        # RoPE tables: derived from the config, so not saved in the state dict.
        cos, sin = rope_cos_sin(d_model // n_heads, ctx_len, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        # Initialisation (GPT-2 style): weights ~ N(0, 0.02^2); the two projections
        # that write into the residual stream are scaled down by sqrt(2 * n_layers)
        # so the stream's variance does not grow with depth. Small logits at
        # initialisation make the first loss close to ln(vocab_size).
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    @classmethod
    def from_config(cls, config: dict) -> ThinkerLM:
        """Build an (untrained) model from a config dict, e.g. ``checkpoint["config"]``."""
        return cls(**config)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) from token ids (B, T) or from embeddings (B, T, d_model)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, d_model)")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
            x = self.embed_tokens(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.d_model:
                raise ValueError(
                    f"inputs_embeds must be (batch, time, {self.d_model}), got shape {tuple(inputs_embeds.shape)}"
                )
            x = inputs_embeds
        T = x.shape[1]
        if T > self.ctx_len:
            raise ValueError(f"sequence length {T} exceeds the model's context length ctx_len={self.ctx_len}")

        cos, sin = self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype)
        x = self.embed_dropout(x)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))
