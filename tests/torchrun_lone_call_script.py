"""Run by test_lone_calls.py under ``torchrun`` (3 ranks, PipeOptim): a run without lone
calls; the same run with rank 0 calling ``stats()`` and ``state_dict()`` alone (the rank-0
logging and saving of many scripts) while the others step; the same with rank 1 calling
``flush()`` and ``stats()`` alone while the others step; then, after the last step, rank 0
calling ``stats()`` alone before every rank asks for the weights, rank 1 asking for them alone
while the others close (then closing too). Writes each rank's losses, weights, errors and how
long each call took."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import pipeoptim
from tests.test_training import SmallCNN, data


def main(out: str, profile_dir: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    batches = data(6)
    result: dict = {"lone": []}

    def make() -> pipeoptim.Pipeline:
        torch.manual_seed(0)
        model = SmallCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return pipeoptim.compile(
            model,
            opt,
            world,
            example_inputs=batches[0][0],
            loss_fn=F.cross_entropy,
            profile_dir=profile_dir,
            timeout=60,
        )

    def feed(x: torch.Tensor, y: torch.Tensor) -> tuple:
        return (x if rank == 0 else None, y if rank == world - 1 else None)

    def timed(call, key: str) -> None:
        start = time.monotonic()
        try:
            value = call()
        except pipeoptim.PipelineError as exc:
            value = f"{type(exc).__name__}: {exc}"
        result.setdefault(key, []).append([value, time.monotonic() - start])

    with make() as pipe:
        result["plain"] = [float(pipe.step(*feed(x, y))) for x, y in batches]
        result["plain weights"] = float(sum(v.double().sum() for v in pipe.state_dict().values()))
    for lone, calls in ((0, {2: "stats", 4: "state_dict"}), (1, {2: "flush", 4: "stats"})):
        with make() as pipe:  # the other ranks step on, unaware
            losses = []
            for i, (x, y) in enumerate(batches):
                if rank == lone and i in calls:
                    call = getattr(pipe, calls[i])
                    timed(lambda: call() and None, "lone")  # noqa: B023 (called at once)
                losses.append(float(pipe.step(*feed(x, y))))
            result[f"rank {lone} alone"] = losses
    pipe = make()
    for x, y in batches:
        pipe.step(*feed(x, y))
    if rank == 0:  # rank 0 alone, then every rank, asking for something
        timed(lambda: pipe.stats() and None, "end")
    timed(lambda: float(sum(v.double().sum() for v in pipe.state_dict().values())), "end")
    if rank == 1:  # rank 1 alone asking for the weights while the others close
        timed(lambda: pipe.state_dict() and None, "end")
    timed(pipe.close, "end")
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
