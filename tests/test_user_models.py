"""Models users bring: buffers used in ``forward``, uneven batches, loss reduction, BatchNorm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.compiler.trace import trace


class PositionalEncoding(nn.Module):
    """The classic pattern: a buffer reshaped, sliced and updated in place in ``forward``."""

    def __init__(self, length: int = 6, dim: int = 8, count_rows: bool = False) -> None:
        super().__init__()
        self.count_rows = count_rows
        self.emb = nn.Linear(4, dim)
        self.register_buffer("pe", torch.randn(length, dim))
        self.register_buffer("rows_seen", torch.zeros((), dtype=torch.long))
        self.mid = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count_rows:
            self.rows_seen.add_(x.shape[0])
        h = torch.relu(self.emb(x) + self.pe.unsqueeze(0))
        h = torch.relu(self.mid(h)) + self.pe.flip(0)  # a second use, maybe in a later stage
        return self.out(h).mean(1)


def test_buffer_views_stay_buffers_and_trace_identically() -> None:
    model = PositionalEncoding(count_rows=True)
    x = torch.randn(2, 6, 4)
    before = set(vars(model))
    first, second = trace(model, x), trace(model, x)
    assert first.method == "fx"
    assert set(vars(model)) == before  # fx put no constants on the user's module
    assert first.graph_hash == second.graph_hash
    assert dict(first.gm.named_buffers()).keys() == {"pe", "rows_seen"}
    assert not [n for n in first.gm.graph.nodes if "constant" in str(n.target)]
    uses = [n for n in first.gm.graph.nodes if n.op == "get_attr" and n.target == "pe"]
    assert len(uses) == 2 and all(len(n.users) == 1 for n in uses)  # one reference per user


@pytest.mark.slow
@pytest.mark.parametrize("count_rows", [False, True])
def test_positional_encoding_trains_across_processes_and_loads_new_buffers(tmp_path, count_rows) -> None:
    torch.manual_seed(0)
    model = PositionalEncoding(count_rows=count_rows)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 6, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    expected = []
    for x, y in batches:
        ref_opt.zero_grad()
        loss = F.cross_entropy(reference(x), y)
        loss.backward()
        ref_opt.step()
        expected.append(loss.item())
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        3,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method="gpipe",
        micro_batches=1,
        executor="processes",
        profile_dir=tmp_path,
        timeout=60,
    ) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches]
        state = pipe.state_dict()
        assert int(state["rows_seen"]) == (24 if count_rows else 0)  # updated in its stage's buffer
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
        state["pe"] = torch.randn(6, 8)
        pipe.load_state_dict(state)
        torch.testing.assert_close(pipe.state_dict()["pe"], state["pe"], rtol=0, atol=0)
        trained = pipe.to_module().eval()
        torch.testing.assert_close(pipe.predict(batches[0][0]), trained(batches[0][0]), rtol=1e-5, atol=1e-6)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
