"""Run by test_lone_calls.py under ``torchrun`` (2 ranks, PipeOptim): a run without lone
calls; the same run with rank 0 calling ``stats()`` and ``state_dict()`` alone (the rank-0
logging and saving of many scripts) while rank 1 steps; the same with rank 1 calling
``flush()`` and ``stats()`` alone while rank 0 steps; and rank 0 alone asking for the weights
at the end, then every rank closing. Writes each rank's losses, errors and how long each
took."""

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
    rank = int(os.environ["RANK"])
    batches = data(6)
    result: dict = {"lone": []}

    def make() -> pipeoptim.Pipeline:
        torch.manual_seed(0)
        model = SmallCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return pipeoptim.compile(
            model,
            opt,
            2,
            example_inputs=batches[0][0],
            loss_fn=F.cross_entropy,
            profile_dir=profile_dir,
            timeout=60,
        )

    def feed(x: torch.Tensor, y: torch.Tensor) -> tuple:
        return (x if rank == 0 else None, y if rank == 1 else None)

    def said(exc: BaseException, start: float) -> list:
        return [f"{type(exc).__name__}: {exc}", time.monotonic() - start]

    with make() as pipe:
        result["plain"] = [float(pipe.step(*feed(x, y))) for x, y in batches]
    for lone, calls in ((0, {2: "stats", 4: "state_dict"}), (1, {2: "flush", 4: "stats"})):
        with make() as pipe:  # the other rank steps on, unaware
            losses = []
            for i, (x, y) in enumerate(batches):
                if rank == lone and i in calls:
                    start = time.monotonic()
                    try:
                        getattr(pipe, calls[i])()
                    except pipeoptim.PipelineError as exc:
                        result["lone"].append(said(exc, start))
                losses.append(float(pipe.step(*feed(x, y))))
            result[f"rank {lone} alone"] = losses
    pipe = make()  # rank 0 alone saving at the end, then every rank closing
    for x, y in batches[:2]:
        pipe.step(*feed(x, y))
    if rank == 0:
        start = time.monotonic()
        try:
            pipe.state_dict()
        except pipeoptim.PipelineError as exc:
            result["save"] = said(exc, start)
    start = time.monotonic()
    try:
        pipe.close()
    except pipeoptim.PipelineError as exc:
        result["close"] = said(exc, start)
    result["close_s"] = time.monotonic() - start
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
