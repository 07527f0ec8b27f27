"""Built-in example models for ``pipeoptim partition`` and the tests.

Each factory returns ``(model, example_inputs)`` with a small, deterministic model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def mlp(batch: int = 32, width: int = 256, depth: int = 8, classes: int = 10):
    """A ``depth``-layer ReLU MLP; input ``[batch, width]`` float32, output ``[batch, classes]``."""
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers), (torch.randn(batch, width),)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 conv + BatchNorm, identity shortcut."""

    def __init__(self, channels_in: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for 32x32 images: input ``[B, 3, 32, 32]``, output ``[B, classes]``."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks = []
        prev = widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(prev, w, stride=1 if i == 0 else 2))
            blocks.append(BasicBlock(w, w))
            prev = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(prev, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet(batch: int = 8):
    """:class:`ResNet` with a ``[batch, 3, 32, 32]`` example input."""
    return ResNet(), (torch.randn(batch, 3, 32, 32),)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (Vaswani et al. 2017) written with plain tensor ops."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.size(0), x.size(1), x.size(2)  # (fx cannot unpack x.shape)
        q, k, v = self.qkv(x).split(d, dim=2)
        q = q.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        pos = torch.arange(t, device=x.device)
        future = pos.unsqueeze(0) > pos.unsqueeze(1)  # [t, t], True above the diagonal
        att = att.masked_fill(future, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class Block(nn.Module):
    """Pre-norm transformer block: attention and MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Decoder-only language model with input and output embeddings tied (Press & Wolf 2017).

    Input ``[B, T]`` int64 token ids, output ``[B, T, vocab]`` logits.
    """

    def __init__(
        self, vocab: int = 256, dim: int = 64, heads: int = 4, layers: int = 4, context: int = 64
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        return self.head(self.ln_f(self.blocks(x)))


def transformer(batch: int = 8, seq: int = 32):
    """:class:`TinyGPT` with a ``[batch, seq]`` int64 example input."""
    return TinyGPT(), (torch.randint(0, 256, (batch, seq)),)


class MultiIO(nn.Module):
    """Two inputs (``[B, 32]`` features, ``[B, 16]`` side information), two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(16, 64), nn.Tanh())
        self.joint = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.head_class = nn.Linear(64, 5)
        self.head_value = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.joint(self.a(x) * self.b(side))
        return self.head_class(h), self.head_value(h + self.b(side)).squeeze(-1)


def multi_io(batch: int = 16):
    """:class:`MultiIO` with example inputs ``([batch, 32], [batch, 16])``."""
    return MultiIO(), (torch.randn(batch, 32), torch.randn(batch, 16))


class LongSkip(nn.Module):
    """A chain of layers whose first activation is added back at the very end.

    Split into 3+ stages, that activation crosses two or more stage boundaries.
    """

    def __init__(self, width: int = 64, depth: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.body = nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(self.body(h) + h)


def long_skip(batch: int = 16):
    """:class:`LongSkip` with a ``[batch, 64]`` example input."""
    return LongSkip(), (torch.randn(batch, 64),)


def gpt2(batch: int = 1, seq: int = 64, n_layer: int = 12):
    """Hugging Face ``GPT2LMHeadModel(GPT2Config(n_layer=12, use_cache=False))`` (124M
    parameters, randomly initialised, nothing downloaded) with ``[batch, seq]`` token ids.

    Raises:
        ImportError: ``transformers`` is not installed (``pip install pipeoptim[hf]``).
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:
        raise ImportError("the gpt2 example needs transformers: pip install 'pipeoptim[hf]'") from exc
    config = GPT2Config(n_layer=n_layer, use_cache=False)
    return GPT2LMHeadModel(config), (torch.randint(0, config.vocab_size, (batch, seq)),)


EXAMPLES: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "mlp": mlp,
    "resnet": resnet,
    "transformer": transformer,
    "multi_io": multi_io,
    "long_skip": long_skip,
    "gpt2": gpt2,
}
