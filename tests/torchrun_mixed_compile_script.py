"""Run by test_torchrun.py under ``torchrun``: compiles whose arguments differ between ranks
(rank 1 another method, rank 2 another learning rate; then rank 1 another example input shape),
then a good one in the same job; writes each rank's errors and the good pipeline's losses."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

import pipeoptim
from tests.test_training import SmallCNN, data


def main(out: str, gpus: int, profile_dir: str) -> None:
    rank = int(os.environ["RANK"])
    result: dict = {"errors": []}
    torch.manual_seed(0)
    model = SmallCNN()
    kwargs = {"loss_fn": F.cross_entropy, "profile_dir": profile_dir, "timeout": 60}
    example = data(1)[0][0]
    tries = [
        ({1: "1f1b"}.get(rank, "pipeoptim"), {2: 0.5}.get(rank, 0.05), example),
        ("pipeoptim", 0.05, example[:4] if rank == 1 else example),
    ]
    for method, lr, inputs in tries:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        try:
            pipeoptim.compile(model, opt, gpus, example_inputs=inputs, method=method, **kwargs)
        except Exception as exc:
            result["errors"].append(f"{type(exc).__name__}: {exc}")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pipeoptim.compile(model, opt, gpus, example_inputs=example, **kwargs) as pipe:
        result["losses"] = [float(pipe.step(x, y)) for x, y in data(3)]
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
