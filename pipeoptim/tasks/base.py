"""What a training task of ``pipeoptim train`` provides."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Batch = tuple[tuple[torch.Tensor, ...], Any]
Predict = Callable[[tuple[torch.Tensor, ...]], Any]


@dataclass
class Task:
    """A model, its data and its metric.

    Attributes:
        name: task name (``digits``, ``fashion-mnist``, ``sst2``, ``multi30k``).
        metric: name of the evaluation metric (``accuracy`` in [0, 1], or ``bleu`` in [0, 100]).
        model: a freshly initialised model (seeded).
        example_inputs: one mini-batch of inputs, shaped like every training batch.
        loss_fn: ``loss_fn(model_output, targets) -> scalar``.
        loss_reduction: how ``loss_fn`` reduces (``compile``'s ``loss_reduction``).
        example_targets: the targets of ``example_inputs`` (``compile``'s, which prices the
            loss on the last stage with them).
        batches: ``batches(epoch)`` yields the shuffled training mini-batches of an epoch
            (same order for the same seed and epoch; incomplete last batch dropped).
        evaluate: ``evaluate(predict)`` computes the metric on the test split, where
            ``predict(inputs)`` returns the model's outputs for a batch of inputs.
        steps_per_epoch: mini-batches per epoch.
        info: sizes and sources, for the run's metrics.json.
    """

    name: str
    metric: str
    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    batches: Callable[[int], Iterator[Batch]]
    evaluate: Callable[[Predict], float]
    steps_per_epoch: int
    info: dict[str, Any] = field(default_factory=dict)
    loss_reduction: str | Callable[[Any], Any] = "mean"
    example_targets: Any = None


def full_batches(n_train: int, batch_size: int) -> int:
    """Full mini-batches of ``batch_size`` in ``n_train`` training examples (``drop_last``).

    Raises:
        ValueError: fewer examples than one mini-batch (a run would train nothing).
    """
    if n_train < batch_size:
        raise ValueError(
            f"the {n_train} training examples (after --limit, where given) give no full mini-batch of "
            f"{batch_size}: lower --batch-size, or raise --limit"
        )
    return n_train // batch_size


def shuffled_batches(
    inputs: tuple[torch.Tensor, ...], targets: torch.Tensor, batch_size: int, seed: int
) -> Callable[[int], Iterator[Batch]]:
    """Epoch-seeded shuffling into full mini-batches (``drop_last``)."""
    n = targets.shape[0]

    def batches(epoch: int) -> Iterator[Batch]:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield tuple(x[idx] for x in inputs), targets[idx]

    return batches


def accuracy_evaluator(
    inputs: tuple[torch.Tensor, ...], targets: torch.Tensor, batch_size: int
) -> Callable[[Predict], float]:
    """Top-1 accuracy of ``predict`` on a labelled split, in chunks of ``batch_size``."""

    def evaluate(predict: Predict) -> float:
        correct = 0
        for start in range(0, targets.shape[0], batch_size):
            chunk = tuple(x[start : start + batch_size] for x in inputs)
            logits = predict(chunk)
            correct += int((logits.argmax(-1) == targets[start : start + batch_size]).sum())
        return correct / targets.shape[0]

    return evaluate
