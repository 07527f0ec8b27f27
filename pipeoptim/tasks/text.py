"""Sentiment analysis: SST-2 (Socher et al. 2013, GLUE version) with a small transformer encoder.

Also the pieces the translation task shares: a word vocabulary, padding to a fixed length and
fx-traceable transformer layers (Vaswani et al. 2017) written with plain ``torch.nn`` layers.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeoptim.shared_folder import shared_folder
from pipeoptim.tasks.base import Task, accuracy_evaluator, full_batches, shuffled_batches

#: ``data`` in the shared folder (:func:`pipeoptim.shared_folder.shared_folder`).
SHARED_DATA = shared_folder() / "data"
SST2_DIR = SHARED_DATA / "sst2"
SST2_LENGTH = 48  # tokens per sentence; the longest dev sentence has 47
PAD, UNK = 0, 1


class Vocabulary:
    """Words of a training corpus and their ids: the special tokens first (``<pad>`` = 0,
    ``<unk>`` = 1, ...), then the words seen at least ``min_count`` times, most frequent first
    (ties alphabetical), at most ``max_size`` entries in all."""

    def __init__(
        self,
        sentences: Iterable[Sequence[str]],
        specials: Sequence[str] = ("<pad>", "<unk>"),
        min_count: int = 2,
        max_size: int | None = None,
    ) -> None:
        counts = Counter(word for sentence in sentences for word in sentence)
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        self.words = [*specials, *(w for w in ranked if w not in specials)][:max_size]
        self.ids = {word: i for i, word in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: Iterable[str]) -> list[int]:
        """Ids of ``words``, ``<unk>`` for words not in the vocabulary."""
        return [self.ids.get(word, UNK) for word in words]


def pad(rows: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """``[len(rows), length]`` int64: each row truncated to ``length`` ids, then padded with 0."""
    out = torch.full((len(rows), length), PAD, dtype=torch.int64)
    for i, row in enumerate(rows):
        row = row[:length]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out


def data_folder(data_dir: str | None, env: str, default: Path) -> Path:
    """``data_dir`` if given, else the folder in environment variable ``env``, else ``default``."""
    return Path(data_dir or os.environ.get(env) or default)


def shrink_embeddings(model: nn.Module, std: float = 0.02) -> None:
    """Draw every embedding of ``model`` from N(0, std²) as BERT does (Devlin et al. 2019), zero
    at the padding id. ``nn.Embedding``'s N(0, 1) would dwarf what the pre-norm blocks add to
    the residual stream and stall the first epoch."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017) with plain tensor ops.

    Queries ``x`` ``[B, T, D]`` attend over ``memory`` ``[B, S, D]``; ``blocked`` (bool,
    ``[B or 1, T or 1, S]``) is True where a query must not look. Output ``[B, T, D]``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        # Heads split with unflatten rather than view(B, T, ...): no sizes in the traced graph.
        q = self.query(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # [B, H, T, D/H]
        k, v = self.key_value(memory).split(self.dim, dim=2)
        k = k.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # [B, H, S, D/H]
        v = v.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # [B, H, T, S]
        # A large negative number rather than -inf: a query that may see nothing gets no NaN.
        weights = scores.masked_fill(blocked.unsqueeze(1), -1e9).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).flatten(2))


def mlp(dim: int, dropout: float) -> nn.Sequential:
    """The position-wise feed-forward network of a transformer block, ``[..., D] -> [..., D]``."""
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    """Pre-norm (Xiong et al. 2020) encoder block: self-attention and MLP, each with a residual.

    ``x`` ``[B, L, D]``, ``blocked`` ``[B, 1, L]`` (True at padding keys); output ``[B, L, D]``.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.drop = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, dropout)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, blocked))
        return x + self.mlp(self.ln2(x))


class SentimentTransformer(nn.Module):
    """Transformer encoder classifier: token and learned position embeddings, pre-norm encoder
    blocks, mean over the non-padding positions, linear head.

    Input ``[B, L]`` int64 token ids (0 = padding); output ``[B, classes]`` logits.
    """

    def __init__(
        self,
        vocab: int,
        length: int,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        classes: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.pos = nn.Embedding(length, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        shrink_embeddings(self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.size(1), device=ids.device)
        x = self.drop(self.tok(ids) + self.pos(positions))  # [B, L, D]
        padding = ids.eq(PAD)  # [B, L]
        for block in self.blocks:
            x = block(x, padding.unsqueeze(1))
        keep = (~padding).unsqueeze(-1).type_as(x)  # [B, L, 1]
        pooled = (self.ln(x) * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # [B, D]
        return self.head(pooled)


def _read_tsv(path: Path) -> tuple[list[list[str]], torch.Tensor]:
    """Whitespace tokens (lowercased) and int64 labels of a ``sentence<TAB>label`` file with a header."""
    sentences, labels = [], []
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            sentence, label = line.rstrip("\n").split("\t")
            sentences.append(sentence.lower().split())
            labels.append(int(label))
    return sentences, torch.tensor(labels, dtype=torch.int64)


def sst2(
    batch_size: int = 32,
    seed: int = 0,
    limit: int | None = None,
    data_dir: str | None = None,
    test_limit: int | None = None,
) -> Task:
    """Binary sentiment of SST-2 (GLUE): 67,349 training phrases, the 872 labelled dev sentences
    as the test split (GLUE's test labels are hidden).

    ``limit`` keeps the first ``limit`` rows of ``train.tsv`` (GLUE's order, already shuffled).
    The vocabulary comes from those training rows only: words seen twice or more, at most
    20,000 ids with 0 = padding and 1 = unknown. Sentences are cut or padded to
    :data:`SST2_LENGTH` tokens.

    Raises:
        FileNotFoundError: ``train.tsv`` or ``dev.tsv`` is not in the data folder (``data_dir``,
            else ``$SST2_DIR``, else ``../shared/data/sst2`` beside the checkout).
    """
    folder = data_folder(data_dir, "SST2_DIR", SST2_DIR)
    missing = [name for name in ("train.tsv", "dev.tsv") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"SST-2 file(s) {', '.join(missing)} not found in {folder}: pass --data-dir (or set SST2_DIR) "
            "with the GLUE SST-2 train.tsv and dev.tsv (sentence<TAB>label, one header line), or "
            "PIPEOPTIM_SHARED to the shared folder holding data/sst2"
        )
    train_words, y_train = _read_tsv(folder / "train.tsv")
    train_words, y_train = train_words[:limit], y_train[:limit]
    dev_words, y_test = _read_tsv(folder / "dev.tsv")
    dev_words, y_test = dev_words[:test_limit], y_test[:test_limit]
    vocab = Vocabulary(train_words, min_count=2, max_size=20_000)
    x_train = pad([vocab.encode(s) for s in train_words], SST2_LENGTH)
    x_test = pad([vocab.encode(s) for s in dev_words], SST2_LENGTH)
    torch.manual_seed(seed)
    return Task(
        name="sst2",
        metric="accuracy",
        model=SentimentTransformer(len(vocab), SST2_LENGTH),
        example_inputs=(x_train[:batch_size],),
        example_targets=y_train[:batch_size],
        loss_fn=F.cross_entropy,
        batches=shuffled_batches((x_train,), y_train, batch_size, seed),
        evaluate=accuracy_evaluator((x_test,), y_test, batch_size),
        steps_per_epoch=full_batches(int(y_train.shape[0]), batch_size),
        info={
            "train_examples": int(y_train.shape[0]),
            "test_examples": int(y_test.shape[0]),
            "vocabulary": len(vocab),
            "length": SST2_LENGTH,
            "source": f"GLUE SST-2 TSV files in {folder}",
        },
    )
