"""Mini-batches travel to workers as raw tensor bytes (pipeoptim.runtime.wire), and one
backward message carries every gradient of a stage boundary (pipeoptim.runtime.comm)."""

from __future__ import annotations

import pickle

import pytest
import torch

from pipeoptim.microbatch import Rows
from pipeoptim.runtime.executor import MiniBatch
from pipeoptim.runtime.layout import grad_layout
from pipeoptim.runtime.wire import dumps

TENSORS = {
    "float32": torch.randn(4, 5),
    "bfloat16": torch.randn(3, 2).to(torch.bfloat16),
    "bool": torch.tensor([True, False, True]),
    "int64": torch.arange(7),
    "zero-dim": torch.tensor(2.5, dtype=torch.float64),
    "empty": torch.empty(0, 3),
    "non-contiguous": torch.randn(4, 6)[:, ::2],
    "negative view": torch.randn(3)._neg_view(),
}


@pytest.mark.parametrize("name", list(TENSORS))
def test_tensors_come_back_equal_with_dtype_and_shape(name: str) -> None:
    t = TENSORS[name]
    back = pickle.loads(dumps(t))
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back, t)
    if back.numel():  # a writable tensor of its own, not a view of the message
        back.view(-1)[0] = back.view(-1)[1] if back.numel() > 1 else back.view(-1)[0]
        assert back.untyped_storage().nbytes() == back.numel() * back.element_size()


def test_a_mini_batch_round_trips_and_is_written_as_raw_bytes() -> None:
    x = torch.randn(64, 512)
    mini = MiniBatch(3, [(c,) for c in x.chunk(4)], list(torch.arange(64).chunk(4)), [0.25] * 4,
                     [Rows(16)] * 4, [{"lr": 0.1}])  # fmt: skip
    back = pickle.loads(dumps(mini))
    assert back.index == 3 and back.scales == mini.scales and back.hyper == mini.hyper
    assert [int(s) for s in back.sizes] == [16] * 4
    for (a,), (b,) in zip(back.inputs, mini.inputs):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(back.targets, mini.targets))
    # the tensors' bytes, plus little: no torch.serialization storage records
    assert len(dumps(mini)) < x.numel() * 4 + 64 * 8 + 2000


def test_tensors_that_need_more_than_bytes_go_through_pickle() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    back = pickle.loads(dumps(p))
    assert isinstance(back, torch.nn.Parameter) and torch.equal(back, p)


def test_a_backward_message_holds_presence_bytes_then_aligned_gradients() -> None:
    metas = [
        {"kind": "tensor", "dtype": "float32", "shape": [8, 3], "batch_dim": 0},
        {"kind": "int"},
        {"kind": "tensor", "dtype": "float64", "shape": [8], "batch_dim": 0},
        {"kind": "tensor", "dtype": "bfloat16", "shape": [8, 5], "batch_dim": 0},
    ]
    places, total = grad_layout(metas, [True, False, True, True], plan_batch=8, batch=4)
    assert [(i, offset, dtype, shape) for i, offset, dtype, shape in places] == [
        (0, 16, torch.float32, [4, 3]),  # 3 presence bytes, padded to 16
        (2, 64, torch.float64, [4]),  # 16 + 48
        (3, 96, torch.bfloat16, [4, 5]),  # 64 + 32
    ]
    assert total == 96 + 48  # 40 bytes padded to 48
    assert grad_layout(metas, [False] * 4, 8, 4) == ([], 0)
