"""The image tasks' validation split (``make_task(..., validation=V)``): the V training
examples after the first ``limit``, held out from training and evaluated instead of the test
split (the staleness study chose its learning rate on the test split before)."""

from __future__ import annotations

import pytest
import torch

from pipeoptim.tasks import make_task


def _rows(task, epoch: int = 0) -> torch.Tensor:
    return torch.cat([inputs[0].flatten(1) for inputs, _ in task.batches(epoch)])


def test_the_validation_split_is_the_held_out_training_examples() -> None:
    whole = make_task("digits", batch_size=1, limit=1000 + 200)
    held = make_task("digits", batch_size=1, limit=1000, validation=200)
    test = make_task("digits", batch_size=1, limit=1000)
    train_rows = {tuple(r.tolist()) for r in _rows(held)}
    assert (
        len(train_rows) == len({tuple(r.tolist()) for r in _rows(test)}) and held.info["test_examples"] == 200
    )
    seen = []
    held.evaluate(lambda inputs: seen.append(inputs[0].flatten(1)) or torch.zeros(len(inputs[0]), 10))
    validation = {tuple(r.tolist()) for r in torch.cat(seen)}
    assert len(validation) > 150 and not validation & train_rows  # none of it is trained on
    assert validation <= {tuple(r.tolist()) for r in _rows(whole)}  # all of it training data
    seen.clear()
    test.evaluate(lambda inputs: seen.append(inputs[0].flatten(1)) or torch.zeros(len(inputs[0]), 10))
    assert not validation & {tuple(r.tolist()) for r in torch.cat(seen)}  # not the test split


def test_validation_splits_refuse_what_they_cannot_hold() -> None:
    with pytest.raises(ValueError, match="give a limit of at most 1237"):
        make_task("digits", batch_size=8, limit=1300, validation=200)
    with pytest.raises(ValueError, match="give a limit of at most"):
        make_task("digits", batch_size=8, validation=200)
    with pytest.raises(ValueError, match=r"image tasks .*not sst2"):
        make_task("sst2", batch_size=8, limit=100, validation=20)
    for bad in (-5, 0, True, 1.5):  # helper-158: -5 made an empty split, True one example
        with pytest.raises(ValueError, match="validation must be a positive number of examples"):
            make_task("digits", batch_size=8, limit=1000, validation=bad)
    with pytest.raises(ValueError, match="which a validation split replaces: give one"):
        make_task("digits", batch_size=8, limit=1000, validation=200, test_limit=100)
