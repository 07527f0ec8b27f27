"""Run by test_lone_calls.py under ``torchrun`` (2 ranks, PipeOptim): a run without lone
calls; the same run with rank 0 calling ``stats()`` and ``state_dict()`` alone (the rank-0
logging and saving of many scripts) while rank 1 steps; and a run where rank 1 alone calls
``flush()`` while rank 0 steps on. Writes each rank's losses, errors and how long each took
to be refused."""

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
    with make() as pipe:
        losses = []
        for i, (x, y) in enumerate(batches):
            if i in (2, 4):
                start = time.monotonic()
                try:
                    if rank == 0:
                        pipe.stats() if i == 2 else pipe.state_dict()
                    else:  # rank 0 is not stepping: refused, as rank 0's call is
                        pipe.step(*feed(x, y))
                except pipeoptim.PipelineError as exc:
                    result["lone"].append(said(exc, start))
            losses.append(float(pipe.step(*feed(x, y))))
        result["with lone calls"] = losses
    with make() as pipe:
        for x, y in batches[:2]:
            pipe.step(*feed(x, y))
        start = time.monotonic()
        try:
            if rank == 0:
                for x, y in batches[2:]:
                    pipe.step(*feed(x, y))
            pipe.flush()
        except pipeoptim.PipelineError as exc:
            result["stop"] = said(exc, start)
        start = time.monotonic()
        try:
            pipe.stats()
        except pipeoptim.PipelineError as exc:
            result["after"] = said(exc, start)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
