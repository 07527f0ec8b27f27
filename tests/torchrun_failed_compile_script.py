"""Run by test_torchrun.py under ``torchrun``: a compile that fails on rank 0 (inputs the model
cannot take), then a good one in the same job; writes each rank's error and the good
pipeline's losses."""

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
    result: dict = {}
    torch.manual_seed(rank)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kwargs = {"loss_fn": F.cross_entropy, "profile_dir": profile_dir, "timeout": 60}
    try:  # 7x7 images: the flattened features do not fit the first linear layer
        pipeoptim.compile(model, opt, gpus, example_inputs=torch.randn(8, 1, 7, 7), **kwargs)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    with pipeoptim.compile(model, opt, gpus, example_inputs=data(1)[0][0], **kwargs) as pipe:
        result["losses"] = [float(pipe.step(x, y)) for x, y in data(3)]
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
