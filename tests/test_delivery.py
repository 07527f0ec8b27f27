"""The local executor hands each stage its values as the transport delivers them
(pipeoptim.runtime.delivery), so it computes the very bits of the processes executor even where
a stage boundary or the user's inputs carry a non-contiguous tensor: CPU kernels round by layout
(attention's product of its scores with v, a transposed view, gave other bits than with v's
contiguous copy in 2 of 20 draws; so did a mean over the last dimension of a transposed input)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.examples import TinyGPT
from pipeoptim.runtime.delivery import delivered
from tests.given_plans import plan_starting_at

VOCAB, SEQ, BATCH = 1024, 8, 8
#: stage boundaries inside both attention blocks, where transposed q/k/v views cross
TRANSPOSED_CUTS = ["transpose_4", "transpose_7", "floordiv_7"]


def test_delivered_values_are_fresh_contiguous_copies() -> None:
    base = torch.randn(6, 4, 5, 3)
    views = {
        "transposed": base.transpose(1, 2),
        "offset": base[2:],
        "channels last": base.contiguous(memory_format=torch.channels_last),
        "expanded": torch.randn(1, 3).expand(4, 3),
        "leaf with grad": torch.randn(3, 2, requires_grad=True),
    }
    out = delivered({"values": list(views.values()), "rows": 4, "none": None})
    assert out["rows"] == 4 and out["none"] is None
    for (name, view), copy in zip(views.items(), out["values"]):
        assert torch.equal(copy, view), name
        assert copy.is_contiguous() and copy.storage_offset() == 0, name
        assert copy.stride() == torch.empty(view.shape).stride(), name
        assert copy.untyped_storage().data_ptr() != view.untyped_storage().data_ptr(), name
        assert not copy.requires_grad, name


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab=VOCAB, dim=16, heads=2, layers=2, context=SEQ)


def tokens(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(n)]


def train(method: str, micro: int, executor: str, data, plan):
    """Losses, per-stage state and predictions of :func:`gpt` trained on ``data`` with ``plan``."""
    model = gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    options = {"method": method, "micro_batches": micro, "executor": executor, "timeout": 120, "plan": plan}
    with pipeoptim.compile(model, opt, 4, example_inputs=data[0][0], loss_fn=lm_loss, **options) as pipe:
        losses = [float(loss) for loss in pipe.train(data)]
        return losses, pipe.stage_state_dicts(), pipe.predict(data[0][0])


def assert_same_bits(a, b) -> None:
    assert a[0] == b[0]  # losses
    for own, theirs in zip(a[1], b[1]):
        assert own.keys() == theirs.keys()
        for key in own:
            assert torch.equal(own[key], theirs[key]), key
    assert torch.equal(a[2], b[2])  # predictions


def local_and_processes(model_class: type[nn.Module], lr: float, data) -> tuple[tuple, tuple]:
    """Losses, per-stage state and predictions of ``model_class()`` (AdamW, PipeOptim, 2 stages)
    trained on ``data`` by the local executor and by worker processes on the local run's plan."""

    def run(executor: str, plan=None):
        torch.manual_seed(0)
        model = model_class()
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        options = {"method": "pipeoptim", "executor": executor, "timeout": 120, "plan": plan}
        with pipeoptim.compile(
            model, opt, 2, example_inputs=data[0][0], loss_fn=F.cross_entropy, **options
        ) as pipe:
            losses = [float(loss) for loss in pipe.train(data)]
            return (losses, pipe.stage_state_dicts(), pipe.predict(data[0][0])), pipe.plan

    local, plan = run("local")
    return local, run("processes", plan)[0]


@pytest.mark.parametrize(("method", "micro"), [("pipeoptim", 1), ("gpipe", 2)])
def test_executors_agree_bit_for_bit_across_transposed_boundaries(method: str, micro: int) -> None:
    data = list(zip(tokens(6, 1), tokens(6, 2)))
    config = CostConfig(4, method=method, micro_batches=micro)
    plan = plan_starting_at(gpt(), (data[0][0][: BATCH // micro],), config, TRANSPOSED_CUTS)
    # the premise: a stage sends a non-contiguous tensor
    model = gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"method": method, "micro_batches": micro, "plan": plan, "executor": "local"}
    with pipeoptim.compile(model, opt, 4, example_inputs=data[0][0], loss_fn=lm_loss, **options) as pipe:
        values, strided = (data[0][0][: BATCH // micro],), []
        for stage in pipe._executor.stages[:-1]:
            values = stage.module(*values)
            strided += [v for v in values if isinstance(v, torch.Tensor) and not v.is_contiguous()]
    assert strided
    assert_same_bits(train(method, micro, "local", data, plan), train(method, micro, "processes", data, plan))


class Centred(nn.Module):
    """Rows centred on their mean before a layer: a reduction over the last dimension, which
    rounds otherwise on a transposed input than on its contiguous copy."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 5, 12]
        h = torch.tanh(self.proj(x - x.mean(-1, keepdim=True)))
        return self.out(h.mean(1))


def test_executors_agree_bit_for_bit_on_non_contiguous_inputs() -> None:
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(8, 12, 5, generator=g).transpose(1, 2) for _ in range(5)]  # [8, 5, 12]
    data = [(x, torch.randint(0, 3, (8,), generator=g)) for x in inputs]
    assert not data[0][0].is_contiguous()

    local, procs = local_and_processes(Centred, 1e-2, data)
    assert_same_bits(local, procs)


class Attention(nn.Module):
    """Two self-attention blocks and a head: kernels whose work (and rounding) is split by the
    thread count."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, d]
        b, t, d = x.shape
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in qkv(x).chunk(3, dim=-1))
            y = ((q @ k.transpose(-1, -2)) / 8**0.5).softmax(-1) @ v
            x = x + out(y.transpose(1, 2).reshape(b, t, d))
        return self.head(x.mean(1))


def test_executors_agree_bit_for_bit_whatever_threads_the_caller_runs() -> None:
    """Worker processes compute with one thread each; the local executor used the caller's
    threads (2 here: other bits in the last place, found by a user's check) and now runs its
    stages with a worker's, giving the caller's back after each call."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 12, 32, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(8)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        local, procs = local_and_processes(Attention, 3e-3, data)
        assert torch.get_num_threads() == 2  # the caller's own, back after every call
    finally:
        torch.set_num_threads(before)
    assert_same_bits(local, procs)
