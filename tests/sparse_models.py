"""A graph model with sparse tensors (tests/test_user_models.py, tests/torchrun_constants_script.py)."""

from __future__ import annotations

import torch
from torch import nn


class SparseGCN(nn.Module):
    """Two graph convolutions over 8 nodes: a sparse adjacency matrix as a buffer, a sparse
    normalised one, a dense random projection and a random shift in a list as plain
    attributes (constants to the graph), and a buffer forward does not read; inputs
    ``[batch, 8, 6]``, outputs ``[batch, 3]``."""

    def __init__(self) -> None:
        super().__init__()
        a = (torch.rand(8, 8) > 0.6).float() + torch.eye(8)
        self.register_buffer("adj", a.to_sparse())
        self.norm = (a / a.sum(1, keepdim=True)).to_sparse()
        self.mix = torch.randn(16)
        self.shift = [torch.randn(16)]
        self.register_buffer("unused", torch.randn(2))
        self.l1, self.l2, self.l3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    @staticmethod
    def propagate(a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``a @ h`` for each row of the batch: ``[b, n, f]`` through ``[n, b·f]``."""
        b, n, f = h.shape
        out = torch.sparse.mm(a, h.permute(1, 0, 2).reshape(n, b * f))
        return out.reshape(n, b, f).permute(1, 0, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.propagate(self.adj, self.l1(x)))
        h = torch.relu(self.propagate(self.norm, self.l2(h))) * self.mix + self.shift[0]
        return self.l3(h.mean(1))
