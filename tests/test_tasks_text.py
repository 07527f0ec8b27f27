"""The text tasks on the real SST-2 and Multi30K files: data, tracing, pipelined training, metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.nn.functional as F

import pipeoptim
from pipeoptim.compiler.trace import trace
from pipeoptim.tasks import make_task
from pipeoptim.tasks.text import SST2_LENGTH, Vocabulary
from pipeoptim.tasks.translation import (
    BOS,
    EOS,
    SPECIALS,
    SRC_LENGTH,
    TGT_LENGTH,
    UNKNOWN,
    bleu,
    detokenize,
    encode_targets,
    greedy_bleu_evaluator,
    load_multi30k,
    tokenize,
)


def _data(shared: Path, name: str) -> str:
    folder = shared / "data" / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    return str(folder)


@pytest.fixture
def sst2_dir(shared_dir: Path) -> str:
    return _data(shared_dir, "sst2")


@pytest.fixture
def multi30k_dir(shared_dir: Path) -> str:
    return _data(shared_dir, "multi30k")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("name", ["sst2", "multi30k"])
def test_missing_files_name_the_folder(name: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*--data-dir.*PIPEOPTIM_SHARED"):
        make_task(name, batch_size=8, data_dir=str(tmp_path))


def test_sst2_batches_and_vocabulary(sst2_dir: str) -> None:
    task = make_task("sst2", batch_size=16, limit=2000, data_dir=sst2_dir)
    assert task.metric == "accuracy" and task.steps_per_epoch == 125
    assert task.info["train_examples"] == 2000 and task.info["test_examples"] == 872
    vocab = task.info["vocabulary"]
    assert 1000 < vocab < 5000
    batches = list(task.batches(0))
    assert len(batches) == 125
    (x,), y = batches[0]
    assert x.shape == (16, SST2_LENGTH) and x.dtype == torch.int64
    assert y.shape == (16,) and y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    assert (x[:, 0] != 0).all() and int(x.max()) < vocab  # no empty row, ids in range
    assert torch.equal(next(task.batches(0))[0][0], x)
    assert not torch.equal(next(task.batches(1))[0][0], x)


def test_multi30k_batches_and_vocabulary(multi30k_dir: str) -> None:
    task = make_task("multi30k", batch_size=16, limit=3000, data_dir=multi30k_dir)
    assert task.metric == "bleu" and task.info["test_examples"] == 1000
    assert 1000 < task.info["vocabulary_en"] < 5000 and 1000 < task.info["vocabulary_de"] < 5000
    (src, tgt_in), tgt_out = next(task.batches(0))
    assert src.shape == (16, SRC_LENGTH) and tgt_in.shape == tgt_out.shape == (16, TGT_LENGTH)
    assert src.dtype == tgt_in.dtype == tgt_out.dtype == torch.int64
    assert (tgt_in[:, 0] == BOS).all()
    shifted = tgt_out[:, :-1].masked_fill(tgt_out[:, :-1] == EOS, 0)
    assert torch.equal(tgt_in[:, 1:], shifted)  # tgt_out is tgt_in one position on, plus <eos>
    lengths = tgt_out.ne(0).sum(1)
    short = lengths < TGT_LENGTH
    assert short.sum() > 10 and (tgt_out[short, lengths[short] - 1] == EOS).all()
    # evaluate() decodes all 1,000 test sentences in chunks of the batch size, stopping at <eos>.
    calls = []

    def always_eos(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        calls.append(inputs[0].shape[0])
        return F.one_hot(torch.full_like(inputs[1], EOS), task.info["vocabulary_de"]).float()

    assert task.evaluate(always_eos) == 0.0
    assert len(calls) == 63 and sum(calls) == 1000 and calls[-1] == 8


@pytest.mark.parametrize("name", ["sst2", "multi30k"])
def test_models_trace_with_fx(name: str, shared_dir: Path) -> None:
    task = make_task(name, batch_size=8, limit=500, data_dir=_data(shared_dir, name))
    traced = trace(task.model, task.example_inputs)
    assert traced.method == "fx"
    task.model.eval()
    traced.gm.eval()
    with torch.no_grad():
        expected = task.model(*task.example_inputs)
        (got,) = traced.gm(*task.example_inputs)
    torch.testing.assert_close(got, expected)


def test_sst2_pipelined_training_learns(sst2_dir: str) -> None:
    task = make_task("sst2", batch_size=32, limit=3000, data_dir=sst2_dir)
    opt = torch.optim.Adam(task.model.parameters(), lr=1e-3)
    with pipeoptim.compile(
        task.model,
        opt,
        4,
        example_inputs=task.example_inputs,
        loss_fn=task.loss_fn,
        executor="local",
        profile_dir=None,
    ) as pipe:
        losses = [loss for epoch in range(2) for loss in pipe.train(task.batches(epoch))]
        accuracy = task.evaluate(pipe.predict)
    assert _mean(losses[-30:]) < _mean(losses[:30]) - 0.05
    assert accuracy > 0.6


def test_multi30k_pipelined_training_and_decoding(multi30k_dir: str) -> None:
    limit = 640
    task = make_task("multi30k", batch_size=32, limit=limit, data_dir=multi30k_dir)
    opt = torch.optim.Adam(task.model.parameters(), lr=1e-3)
    with pipeoptim.compile(
        task.model,
        opt,
        3,
        example_inputs=task.example_inputs,
        loss_fn=task.loss_fn,
        executor="local",
        profile_dir=None,
    ) as pipe:
        losses = list(pipe.train(task.batches(0)))
        assert _mean(losses[-5:]) < _mean(losses[:5]) - 1.0
        data = load_multi30k(multi30k_dir, limit)  # the task's vocabulary; decode a prefix only
        evaluate = greedy_bleu_evaluator(
            data.src_test[:40], data.references[:40], data.vocab_de, 32, TGT_LENGTH
        )
        score = evaluate(pipe.predict)
    assert isinstance(score, float) and 0.0 <= score <= 100.0


def test_bleu_plumbing_on_known_answers(multi30k_dir: str) -> None:
    references = load_multi30k(multi30k_dir, limit=1).references
    # Space-joined tokens score exactly like the raw text: 100 against itself.
    assert bleu([" ".join(tokenize(r)) for r in references], references) == pytest.approx(100.0)
    assert bleu(["x y z w"] * len(references), references) == 0.0
    # Greedy decoding of an oracle that copies the encoded reference reproduces it exactly.
    words = [tokenize(r) for r in references[:70]]
    vocab = Vocabulary(words, SPECIALS, min_count=1)
    _, tgt_out = encode_targets(words, vocab, TGT_LENGTH)
    seen = []

    def oracle(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        src, tgt = inputs
        assert tgt.shape == src.shape and (tgt[:, 0] == BOS).all()
        seen.append(src.shape[0])
        return F.one_hot(src, len(vocab)).float()  # src is tgt_out: predicts the next word

    evaluate = greedy_bleu_evaluator(tgt_out, references[:70], vocab, 32, TGT_LENGTH)
    assert evaluate(oracle) == pytest.approx(100.0)
    assert set(seen) == {32, 6}  # chunks of the batch size, the last one smaller
    # Dropping each hypothesis's last word (a period) lowers the score below 100.
    assert bleu([" ".join(w[:-1]) for w in words], references[:70]) < 100.0


def test_an_unknown_word_is_one_wrong_token_to_bleu() -> None:
    """helper-124: ``<unk>`` was written out as is, which 13a splits into ``< unk >``: three
    wrong tokens per unknown word, a longer hypothesis and no brevity penalty (BLEU 0.31 where
    one token each gives 0.41)."""
    vocab = Vocabulary([["ein", "mann"]], SPECIALS, min_count=1)
    ids = [vocab.encode(["ein"])[0], 1, vocab.encode(["mann"])[0], BOS, EOS, 5]
    text = detokenize(ids, vocab)
    assert text == f"ein {UNKNOWN} mann {UNKNOWN}" and tokenize(text) == text.split()
    score = sacrebleu.corpus_bleu([text], [["ein alter mann ."]], force=True)
    assert score.sys_len == 4  # each unknown one token


def test_the_shared_folder_is_the_one_pipeoptim_shared_names(monkeypatch, tmp_path: Path) -> None:
    """From a clone elsewhere than beside ``shared/`` (``/tmp``) the benchmarks and tests
    skipped the GPU cost graphs with no way to point them at the folder (helper-86)."""
    from pipeoptim.shared_folder import shared_folder

    monkeypatch.setenv("PIPEOPTIM_SHARED", str(tmp_path))
    assert shared_folder() == tmp_path
    monkeypatch.delenv("PIPEOPTIM_SHARED")
    assert shared_folder() == Path(__file__).resolve().parents[1].parent / "shared"
