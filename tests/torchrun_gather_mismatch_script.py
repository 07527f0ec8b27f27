"""Run by test_torchrun.py under ``torchrun`` with 2 ranks: calls that gather from every rank
made differently on the two (rank 0 asks for the optimizer state while rank 1 asks for the
model; rank 0 predicts, or saves a checkpoint, while rank 1 asks for the weights), each refused
on one rank, whose next call is the other's; each rank loading another checkpoint, or rank 1's
missing, refused on both; then the calls every rank makes work. Writes each rank's errors,
the trained model's weights and whether a checkpoint loaded into a new pipeline equals them."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

import pipeoptim
from tests.test_training import SmallCNN, data, no_dropout_cnn


def attempt(result: dict, case: str, call) -> None:
    try:
        call()
        result[case] = "done"
    except Exception as exc:
        result[case] = f"{type(exc).__name__}: {exc}"


def main(out: str, gpus: int, profile_dir: str) -> None:
    rank = int(os.environ["RANK"])
    model = no_dropout_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kwargs = {"loss_fn": F.cross_entropy, "profile_dir": profile_dir, "timeout": 60}
    result: dict = {}
    batches = data(3)
    with pipeoptim.compile(model, opt, gpus, example_inputs=batches[0][0], method="1f1b", **kwargs) as pipe:
        for x, y in batches[:2]:
            pipe.step(x, y)
        # each rank in another call (a tie): the one of the kind more often made alone is
        # refused, of one kind rank 0's, and the other waits until that rank makes it too
        for case, refused, other, same in (
            ("optimizer state / model", 0, pipe.optimizer_state_dict, pipe.to_module),
            ("predict / weights", 1, pipe.state_dict, lambda: pipe.predict(batches[0][0])),
            ("checkpoint / weights", 0, lambda: pipe.save_checkpoint(f"{out}.ckpt0.{rank}"), pipe.state_dict),
        ):
            if rank == refused:
                attempt(result, case, other)
            attempt(result, f"{case}, then", same)
        attempt(result, "predict without inputs", lambda: pipe.predict(None))  # on every rank
        result["predict after"] = pipe.predict(batches[0][0]).shape[0]
        pipe.save_checkpoint(f"{out}.ckpt1.{rank}")
        pipe.step(*batches[2])
        weights = pipe.to_module().state_dict()
        pipe.save_checkpoint(f"{out}.ckpt2.{rank}")
    result["weights"] = {k: v.flatten()[:4].tolist() for k, v in weights.items()}
    torch.manual_seed(rank + 5)  # other weights: the checkpoint's must come back
    fresh = SmallCNN()
    opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    with pipeoptim.compile(fresh, opt, gpus, example_inputs=batches[0][0], method="1f1b", **kwargs) as pipe:
        attempt(result, "other checkpoints", lambda: pipe.load_checkpoint(f"{out}.ckpt{rank + 1}.{rank}"))
        attempt(result, "one missing", lambda: pipe.load_checkpoint(f"{out}.ckpt{2 + rank}.{rank}"))
        pipe.load_checkpoint(f"{out}.ckpt2.{rank}")
        reloaded = pipe.to_module().state_dict()
    result["reloaded equal"] = all(torch.equal(reloaded[k], v) for k, v in weights.items())
    double = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).double()
    opt = torch.optim.SGD(double.parameters(), lr=0.05)
    x, y = batches[0][0].flatten(1).double(), batches[0][1]
    with pipeoptim.compile(double, opt, gpus, example_inputs=x, method="1f1b", **kwargs) as pipe:
        result["float64 losses"] = [pipe.step(x, y).item() for _ in range(2)]
    stepped = no_dropout_cnn()  # an optimizer that stepped on each rank's own data before compile
    opt = torch.optim.SGD(stepped.parameters(), lr=0.05, momentum=0.9)
    F.cross_entropy(stepped(batches[rank][0]), batches[rank][1]).backward()
    opt.step()
    momentum = opt.state[stepped.fc2.weight]["momentum_buffer"].clone()
    momenta = [torch.zeros_like(momentum) for _ in range(gpus)]
    torch.distributed.all_gather(momenta, momentum)
    with pipeoptim.compile(stepped, opt, gpus, example_inputs=batches[0][0], method="1f1b", **kwargs) as pipe:
        held = pipe.optimizer_state_dict()["state"]["fc2.weight"]["momentum_buffer"]
    result["rank 0's momentum"] = torch.equal(held, momenta[0]) and not torch.equal(momenta[0], momenta[1])
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
