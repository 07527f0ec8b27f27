"""Run by test_torchrun.py under ``torchrun``: rank 0 asks for the optimizer state alone while
the other ranks ask for the model (the calls that gather from every rank paired wrongly), then
every rank asks for the model, saves a checkpoint and loads it into a new pipeline; writes
each rank's error, the model's weights and whether the loaded ones equal them."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

import pipeoptim
from tests.test_training import SmallCNN, data, no_dropout_cnn


def main(out: str, gpus: int, profile_dir: str) -> None:
    rank = int(os.environ["RANK"])
    model = no_dropout_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kwargs = {"loss_fn": F.cross_entropy, "profile_dir": profile_dir, "timeout": 60}
    result: dict = {}
    with pipeoptim.compile(model, opt, gpus, example_inputs=data(1)[0][0], method="1f1b", **kwargs) as pipe:
        for x, y in data(2):
            pipe.step(x, y)
        try:
            if rank == 0:
                pipe.optimizer_state_dict()
            else:
                pipe.to_module()
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        weights = pipe.to_module().state_dict()
        pipe.save_checkpoint(f"{out}.ckpt.{rank}")
    result["weights"] = {k: v.flatten()[:4].tolist() for k, v in weights.items()}
    torch.manual_seed(rank + 5)  # other weights: the checkpoint's must come back
    fresh = SmallCNN()
    opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    with pipeoptim.compile(fresh, opt, gpus, example_inputs=data(1)[0][0], method="1f1b", **kwargs) as pipe:
        pipe.load_checkpoint(f"{out}.ckpt.{rank}")
        reloaded = pipe.to_module().state_dict()
    result["reloaded equal"] = all(torch.equal(reloaded[k], v) for k, v in weights.items())
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
