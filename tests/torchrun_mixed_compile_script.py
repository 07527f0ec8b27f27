"""Run by test_torchrun.py under ``torchrun``: compiles whose arguments differ between ranks,
or fail on one rank alone, each refused on every rank; then a good one in the same job. Writes
each rank's error per case and the good pipeline's losses."""

from __future__ import annotations

import json
import os
import sys
import threading

import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from tests.test_training import SmallCNN, data


class OwnForward(nn.Module):
    """Rank 1's forward computes another function (same modules, options and shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.tanh if os.environ["RANK"] == "1" else torch.relu
        return self.b(act(self.a(x.flatten(1))))


def main(out: str, gpus: int, profile_dir: str) -> None:
    rank = int(os.environ["RANK"])
    result: dict = {}
    torch.manual_seed(0)
    model = SmallCNN()
    kwargs = {"loss_fn": F.cross_entropy, "profile_dir": profile_dir, "timeout": 60}
    example = data(1)[0][0]
    locked = SmallCNN()
    locked.lock = threading.Lock()  # copy.deepcopy refuses it: compile fails on rank 1 alone
    cases = {  # case: (model, lr, compile's own arguments)
        "method and lr": (model, {2: 0.5}.get(rank, 0.05), {"method": {1: "1f1b"}.get(rank, "pipeoptim")}),
        "example rows": (model, 0.05, {"example_inputs": example[:4] if rank == 1 else example}),
        "bad method on one rank": (model, 0.05, {"method": "bogus" if rank == 1 else "pipeoptim"}),
        "another forward": (OwnForward(), 0.05, {}),
        "processes executor": (model, 0.05, {"executor": "processes"}),
        "uncopyable model on one rank": (locked if rank == 1 else model, 0.05, {}),
    }
    for case, (net, lr, own) in cases.items():
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        try:
            pipeoptim.compile(net, opt, gpus, **{"example_inputs": example, **kwargs, **own})
            result[case] = "compiled"
        except Exception as exc:
            result[case] = f"{type(exc).__name__}: {exc}"
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pipeoptim.compile(model, opt, gpus, example_inputs=example, **kwargs) as pipe:
        result["losses"] = [float(pipe.step(x, y)) for x, y in data(3)]
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
