"""Run by test_torchrun.py under ``torchrun`` with 2 ranks: rank 1 ends without compiling;
rank 0's compile (timeout 3 s) writes its error, which named torch's store key only."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

import pipeoptim


def main(out: str) -> None:
    if int(os.environ["RANK"]) == 1:
        return
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        pipeoptim.compile(model, opt, 2, example_inputs=torch.randn(4, 4), loss_fn=F.mse_loss, timeout=3)
    except pipeoptim.PipelineError as exc:
        with open(out, "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main(sys.argv[1])
