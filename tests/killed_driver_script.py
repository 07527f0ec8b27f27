"""Run by test_faults.py: a driver with worker processes that trains until it is killed;
prints its workers' process ids once they run."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim

if __name__ == "__main__":
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)], nn.Linear(256, 10))
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    pipe = pipeoptim.compile(
        model, opt, 3, example_inputs=x, loss_fn=F.cross_entropy, executor="processes",
        profile_dir=sys.argv[1], timeout=120,
    )  # fmt: skip
    pipe.step(x, y).wait()
    print(" ".join(str(p.pid) for p in pipe._executor.processes), flush=True)
    while True:  # killed in a step, a receive or a wait, wherever the signal finds it
        pipe.step(x, y)
