"""A sequence layer fed time-first rows: the micro-batches cut across its sequences (an LSTM's
recurrence restarted at every slice of time steps; losses 4.3e-3 off plain training, silently,
helper-127). Refused at profiling, naming the layer and the fix; batch-first layouts train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeoptim.errors import ProfileError

from .test_user_models import assert_equal_training, full_batch_training, pipelined


class _Recurrent(nn.Module):
    """``[rows, time, 6]`` inputs; ``transpose``: time-first for an LSTM of torch's default
    layout, else the rows go in as they come (``batch_first`` as given)."""

    def __init__(self, batch_first: bool, transpose: bool, kind: str = "lstm") -> None:
        super().__init__()
        self.transpose = transpose
        self.inp = nn.Linear(6, 8)
        if kind == "lstm":
            self.seq = nn.LSTM(8, 8, batch_first=batch_first)
        else:
            self.seq = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.kind, self.out = kind, nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.transpose:
            h = h.transpose(0, 1)
        h = self.seq(h)[0] if self.kind == "lstm" else self.seq(h, h, h, need_weights=False)[0]
        if self.transpose:
            h = h.transpose(0, 1)
        return self.out(h.mean(1))


def _batches(rows: int = 8, time: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(rows, time, 6, generator=g), torch.randint(0, 3, (rows,), generator=g)) for _ in range(2)
    ]


@pytest.mark.parametrize("kind", ["lstm", "attention"])
def test_rows_reaching_a_layer_along_its_time_dimension_are_refused(kind: str) -> None:
    """``batch_first=False`` (torch's default) on the rows as they come: dim 0 is time to it."""
    torch.manual_seed(0)
    model = _Recurrent(batch_first=False, transpose=False, kind=kind)
    expected = r"seq \((LSTM|MultiheadAttention)\) reads dim 1 of its input \[\d+, 5, 8\] as the batch"
    with pytest.raises(ProfileError, match=expected):
        pipelined(model, _batches(), F.cross_entropy, "gpipe")


@pytest.mark.parametrize("kind", ["lstm", "attention"])
@pytest.mark.parametrize("batch_first, transpose", [(True, False), (False, True)])
def test_batch_first_layouts_train_as_the_plain_model(kind: str, batch_first: bool, transpose: bool) -> None:
    torch.manual_seed(0)
    model, batches = _Recurrent(batch_first, transpose, kind), _batches()
    expected = full_batch_training(model, batches, F.cross_entropy)
    assert_equal_training(pipelined(model, batches, F.cross_entropy, "gpipe"), expected)
