"""Machine translation: Multi30K English to German (Elliott et al. 2016) with a small
encoder-decoder transformer (Vaswani et al. 2017), scored by corpus BLEU (Papineni et al. 2002)
as computed by sacrebleu (Post 2018)."""

from __future__ import annotations

import gzip
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sacrebleu
import torch
import torch.nn.functional as F
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from torch import nn

from pipeoptim.tasks.base import Predict, Task, full_batches, shuffled_batches
from pipeoptim.tasks.text import (
    PAD,
    SHARED_DATA,
    Attention,
    EncoderBlock,
    Vocabulary,
    data_folder,
    mlp,
    pad,
    shrink_embeddings,
)

MULTI30K_DIR = SHARED_DATA / "multi30k"
SPLITS = {"train": "train", "test": "test_2016_flickr"}
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
BOS, EOS = 2, 3
SRC_LENGTH = 32  # source tokens; longer sentences are cut
TGT_LENGTH = 32  # decoder positions: <bos> + 31 words in, 31 words + <eos> out

_TOKENIZER = Tokenizer13a()


def tokenize(text: str) -> list[str]:
    """Lowercase, then split with the mteval-v13a regular expressions (sacrebleu's default
    BLEU tokenizer): punctuation becomes a token of its own, except hyphens and apostrophes
    (left attached) and periods or commas between digits. Joined with spaces the tokens
    tokenize to themselves again, so BLEU of space-joined output sees exactly these tokens."""
    return _TOKENIZER(text.lower()).split()


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU in [0, 100] of space-joined hypotheses against the lowercased raw references
    (sacrebleu's 13a tokenization, one reference per sentence). ``force``: the hypotheses are
    tokenized on purpose (13a gives back the same tokens), so sacrebleu's warning is moot."""
    return sacrebleu.corpus_bleu(list(hypotheses), [[r.lower() for r in references]], force=True).score


def encode_targets(
    sentences: Sequence[Sequence[str]], vocab: Vocabulary, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs ``<bos> w1 .. wn`` and outputs ``w1 .. wn <eos>``, each ``[N, length]``
    int64, cut to ``length`` (dropping ``<eos>`` from a long sentence) and padded with 0."""
    full = [[BOS, *vocab.encode(s), EOS] for s in sentences]
    return pad([ids[:-1] for ids in full], length), pad([ids[1:] for ids in full], length)


#: how an unknown word (or a stray ``<bos>``) is written out: one token to 13a, as BLEU should
#: count it, and one no reference holds; ``<unk>`` tokenizes to ``< unk >``, three wrong
#: tokens, which lengthened the hypothesis and hid the brevity penalty
UNKNOWN = "\u2047"


def detokenize(ids: Sequence[int], vocab: Vocabulary) -> str:
    """The words of ``ids`` up to the first ``<eos>`` or padding, joined with spaces (an
    unknown word is written :data:`UNKNOWN`, which BLEU counts as one wrong token)."""
    words = []
    for i in ids:
        if i in (EOS, PAD):
            break
        words.append(UNKNOWN if i < len(SPECIALS) else vocab.words[i])
    return " ".join(words)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-padding tokens; ``logits`` ``[B, T, V]``, ``targets`` ``[B, T]``."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD)


def count_tokens(targets: torch.Tensor) -> torch.Tensor:
    """Non-padding tokens of ``targets`` ``[B, T]``: what :func:`token_cross_entropy` averages over."""
    return (targets != PAD).sum()


def greedy_bleu_evaluator(
    sources: torch.Tensor, references: Sequence[str], vocab: Vocabulary, batch_size: int, length: int
) -> Callable[[Predict], float]:
    """BLEU of greedy decoding of ``sources`` ``[N, S]`` against ``references`` (raw text).

    Per chunk of ``batch_size`` sources the decoder input starts as ``<bos>`` and padding,
    ``[n, length]``; step ``t`` calls ``predict((sources, decoder_input))`` on the whole
    fixed-shape input and writes the argmax word at position ``t`` into position ``t + 1``.
    A sentence ends at its first ``<eos>``; decoding stops when all of the chunk have ended.
    """

    def evaluate(predict: Predict) -> float:
        hypotheses = []
        for start in range(0, sources.shape[0], batch_size):
            src = sources[start : start + batch_size]
            tgt = torch.full((src.shape[0], length), PAD, dtype=torch.int64)
            tgt[:, 0] = BOS
            ended = torch.zeros(src.shape[0], dtype=torch.bool)
            for t in range(length - 1):
                word = predict((src, tgt))[:, t].argmax(-1)
                tgt[:, t + 1] = word.masked_fill(ended, PAD)
                ended |= word.eq(EOS)
                if bool(ended.all()):
                    break
            hypotheses += [detokenize(row[1:], vocab) for row in tgt.tolist()]
        return bleu(hypotheses, references)

    return evaluate


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: masked self-attention, attention over the encoder output, MLP,
    each with a residual connection.

    ``x`` ``[B, T, D]``, ``memory`` ``[B, S, D]``, ``future`` ``[1, T, T]`` (True above the
    diagonal), ``padding`` ``[B, 1, S]`` (True at source padding); output ``[B, T, D]``.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads)
        self.drop = nn.Dropout(dropout)
        self.ln3 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, dropout)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, future: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.self_attn(h, h, future))
        x = x + self.drop(self.cross_attn(self.ln2(x), memory, padding))
        return x + self.mlp(self.ln3(x))


class Translator(nn.Module):
    """Encoder-decoder transformer with pre-norm blocks and learned position embeddings.

    Inputs ``src`` ``[B, S]`` and ``tgt_in`` ``[B, T]`` int64 token ids (0 = padding); output
    ``[B, T, tgt_vocab]`` logits of the next target word at every position.
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        src_length: int,
        tgt_length: int,
        dim: int = 128,
        heads: int = 4,
        layers: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.src_tok = nn.Embedding(src_vocab, dim, padding_idx=PAD)
        self.src_pos = nn.Embedding(src_length, dim)
        self.tgt_tok = nn.Embedding(tgt_vocab, dim, padding_idx=PAD)
        self.tgt_pos = nn.Embedding(tgt_length, dim)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(EncoderBlock(dim, heads, dropout) for _ in range(layers))
        self.enc_ln = nn.LayerNorm(dim)
        self.decoder = nn.ModuleList(DecoderBlock(dim, heads, dropout) for _ in range(layers))
        self.dec_ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, tgt_vocab)
        shrink_embeddings(self)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        padding = src.eq(PAD).unsqueeze(1)  # [B, 1, S]
        src_pos = torch.arange(src.size(1), device=src.device)
        memory = self.drop(self.src_tok(src) + self.src_pos(src_pos))
        for block in self.encoder:
            memory = block(memory, padding)
        memory = self.enc_ln(memory)
        tgt_pos = torch.arange(tgt_in.size(1), device=tgt_in.device)
        future = (tgt_pos.unsqueeze(0) > tgt_pos.unsqueeze(1)).unsqueeze(0)  # [1, T, T]
        x = self.drop(self.tgt_tok(tgt_in) + self.tgt_pos(tgt_pos))
        for block in self.decoder:
            x = block(x, memory, future, padding)
        return self.head(self.dec_ln(x))


def _read_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


@dataclass
class Multi30kData:
    """Multi30K encoded for :class:`Translator`.

    Attributes:
        src_train, tgt_in, tgt_out: training sources ``[N, SRC_LENGTH]``, decoder inputs and
            outputs ``[N, TGT_LENGTH]`` (int64, see :func:`encode_targets`).
        src_test: test sources ``[1000, SRC_LENGTH]``.
        references: the raw German test sentences.
        vocab_en, vocab_de: vocabularies of the training pairs.
        folder: where the files were read.
    """

    src_train: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    src_test: torch.Tensor
    references: list[str]
    vocab_en: Vocabulary
    vocab_de: Vocabulary
    folder: Path


def load_multi30k(data_dir: str | None = None, limit: int | None = None) -> Multi30kData:
    """Read, tokenize (:func:`tokenize`) and encode Multi30K task 1, English to German.

    ``limit`` keeps the first ``limit`` training pairs. Each language gets its own vocabulary
    from those training pairs only: words seen twice or more; 0 = padding, 1 = unknown,
    2 = ``<bos>``, 3 = ``<eos>``. Sources are cut or padded to :data:`SRC_LENGTH` tokens.

    Raises:
        FileNotFoundError: a ``.en.gz``/``.de.gz`` file is not in the data folder (``data_dir``,
            else ``$MULTI30K_DIR``, else ``../shared/data/multi30k`` beside the checkout).
    """
    folder = data_folder(data_dir, "MULTI30K_DIR", MULTI30K_DIR)
    names = [f"{stem}.{lang}.gz" for stem in SPLITS.values() for lang in ("en", "de")]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Multi30K file(s) {', '.join(missing)} not found in {folder}: pass --data-dir (or set "
            "MULTI30K_DIR) with the raw task-1 files of github.com/multi30k/dataset (data/task1/raw), "
            "or PIPEOPTIM_SHARED to the shared folder holding data/multi30k"
        )
    text = {
        (split, lang): _read_lines(folder / f"{stem}.{lang}.gz")
        for split, stem in SPLITS.items()
        for lang in ("en", "de")
    }
    train_en = [tokenize(s) for s in text["train", "en"][: limit or None]]
    train_de = [tokenize(s) for s in text["train", "de"][: limit or None]]
    vocab_en = Vocabulary(train_en, SPECIALS, min_count=2)
    vocab_de = Vocabulary(train_de, SPECIALS, min_count=2)
    tgt_in, tgt_out = encode_targets(train_de, vocab_de, TGT_LENGTH)
    return Multi30kData(
        src_train=pad([vocab_en.encode(s) for s in train_en], SRC_LENGTH),
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        src_test=pad([vocab_en.encode(tokenize(s)) for s in text["test", "en"]], SRC_LENGTH),
        references=text["test", "de"],
        vocab_en=vocab_en,
        vocab_de=vocab_de,
        folder=folder,
    )


def multi30k(
    batch_size: int = 32,
    seed: int = 0,
    limit: int | None = None,
    data_dir: str | None = None,
    test_limit: int | None = None,
) -> Task:
    """English-to-German Multi30K (task 1): 29,000 training pairs (the first ``limit``); BLEU
    of greedy decoding on the 1,000 pairs of ``test_2016_flickr`` (the first ``test_limit``).

    Data as :func:`load_multi30k` encodes it: inputs ``(src, tgt_in)``, targets ``tgt_out``.

    Raises:
        FileNotFoundError: the Multi30K files are missing (see :func:`load_multi30k`).
    """
    data = load_multi30k(data_dir, limit)
    torch.manual_seed(seed)
    model = Translator(len(data.vocab_en), len(data.vocab_de), SRC_LENGTH, TGT_LENGTH)
    n_train = int(data.tgt_out.shape[0])
    return Task(
        name="multi30k",
        metric="bleu",
        model=model,
        example_inputs=(data.src_train[:batch_size], data.tgt_in[:batch_size]),
        example_targets=data.tgt_out[:batch_size],
        loss_fn=token_cross_entropy,
        loss_reduction=count_tokens,
        batches=shuffled_batches((data.src_train, data.tgt_in), data.tgt_out, batch_size, seed),
        evaluate=greedy_bleu_evaluator(
            data.src_test[:test_limit], data.references[:test_limit], data.vocab_de, batch_size, TGT_LENGTH
        ),
        steps_per_epoch=full_batches(n_train, batch_size),
        info={
            "train_examples": n_train,
            "test_examples": len(data.references[:test_limit]),
            "vocabulary_en": len(data.vocab_en),
            "vocabulary_de": len(data.vocab_de),
            "source_length": SRC_LENGTH,
            "target_length": TGT_LENGTH,
            "source": f"Multi30K raw task-1 files in {data.folder}",
        },
    )
