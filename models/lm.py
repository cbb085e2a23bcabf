"""A small byte-level causal transformer LM (decoder-only, pre-LayerNorm, untied head).

WorldLM's small-CPU model (spec ``worldlm.md`` section 4): vocabulary 256 (raw UTF-8 bytes, no
tokenizer), ``blocks`` transformer blocks of width d with ``heads`` heads, a context of T bytes,
learned positions and an untied output head (a tied head would silently move the embedding into
the key layers). The defaults (4 blocks, d = 256, 4 heads, T = 128) give 3,323,392 parameters.

Tensor names are the contract split rules rely on::

    embed.weight, pos.weight                       token and position embeddings
    blocks.<i>.ln1.*, blocks.<i>.attn.qkv.*,       block i: attention
    blocks.<i>.attn.proj.*
    blocks.<i>.ln2.*, blocks.<i>.mlp.fc.*,         block i: MLP (4d)
    blocks.<i>.mlp.proj.*
    norm.*, head.*                                 final LayerNorm and the output head

``forward(x)`` maps int64 bytes (N, T) to logits (N, T, 256). Every layer is an ``nn.Embedding``,
``nn.Linear`` or ``nn.LayerNorm``, so Opacus computes per-example gradients for DP-SGD.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 256


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"model width {d} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    def __init__(self, context: int = 128, d: int = 256, blocks: int = 4, heads: int = 4):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        for m in self.modules():  # GPT-2's initialization: small weights keep the first loss near ln 256
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape
        if t > self.context:
            raise ValueError(f"sequence of {t} bytes exceeds the model's context of {self.context}")
        # positions with a batch dimension, so DP-SGD (Opacus) finds a per-example gradient of pos too
        h = self.embed(x) + self.pos(torch.arange(t, device=x.device).expand(n, t))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def default_key_layers(blocks: int) -> list[str]:
    """WorldLM's default key layers K (spec section 4): the last max(1, round(0.3 L)) blocks, the final
    LayerNorm and the head ("30%" read as a share of blocks)."""
    last = max(1, round(0.3 * blocks))
    return [f"blocks.{i}.*" for i in range(blocks - last, blocks)] + ["norm.*", "head.*"]
