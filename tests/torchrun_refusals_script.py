"""Run by test_torchrun.py under ``torchrun``: a batch rank 0 refuses (inputs of another
shape) is refused on every rank, which go on in step; then targets only the last rank can
check (another row count) stop the pipeline there, and the other ranks within seconds, as
do a loss_fn's error on the last rank, a NaN on the first that the script catches and a
learning rate changed on rank 0 alone.
Writes each rank's errors, the losses of the good steps and how long each stop took, and
(rank 0) the plan of the first pipeline."""

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
    result: dict = {"errors": [], "losses": []}
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = data(5)

    def compile_1f1b() -> pipeoptim.Pipeline:
        return pipeoptim.compile(
            model,
            opt,
            2,
            method="1f1b",
            example_inputs=batches[0][0],
            loss_fn=F.cross_entropy,
            profile_dir=profile_dir,
            timeout=60,
        )

    with compile_1f1b() as pipe:
        for i, (x, y) in enumerate(batches):
            if i == 2:  # rank 0 refuses 7x7 images; the others learn it from rank 0
                try:
                    pipe.step(torch.randn(8, 1, 7, 7) if rank == 0 else None, y if rank == 1 else None)
                except pipeoptim.PipelineError as exc:
                    result["errors"].append(str(exc))
            result["losses"].append(float(pipe.step(x if rank == 0 else None, y if rank == 1 else None)))
        if rank == 0:  # the local reference replays it: SmallCNN's dropout draws per stage
            pipe.plan.save(f"{out}.plan.json")
        start = time.monotonic()
        try:  # targets of 7 rows for 8 inputs: only the last rank holds them
            x, y = batches[0]
            float(pipe.step(x if rank == 0 else None, y[:7] if rank == 1 else None))
        except pipeoptim.PipeoptimError as exc:
            result["stop"] = f"{type(exc).__name__}: {exc}"
        result["stop_s"] = time.monotonic() - start
        if rank == 1:
            time.sleep(3)  # alive: its closed connections, not its exit, must stop rank 0
    # a pipeline compiled after that works; inputs of other rows on rank 1 stop it on both ranks
    with compile_1f1b() as pipe:
        x, y = batches[0]
        result["after"] = float(pipe.step(x if rank == 0 else None, y if rank == 1 else None))
        start = time.monotonic()
        try:
            pipe.step(x if rank == 0 else x[:6], y if rank == 1 else None).wait()
        except pipeoptim.PipeoptimError as exc:
            result["disagree"] = f"{type(exc).__name__}: {exc}"
        result["disagree_s"] = time.monotonic() - start
    # a failure one rank catches and lives on after stops the others too: the last rank's
    # loss_fn (a label out of range), then a NaN in rank 0's inputs (its stage's NaN check)
    for case, failing in (("loss", 1), ("nan", 0)):
        with compile_1f1b() as pipe:
            x, y = batches[0]
            if case == "loss":
                y = torch.full_like(y, 99)
            else:
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            start = time.monotonic()
            try:
                float(pipe.step(x if rank == 0 else None, y if rank == 1 else None))
            except Exception as exc:
                result[case] = f"{type(exc).__name__}: {exc}"
            result[f"{case}_s"] = time.monotonic() - start
            if rank == failing:
                time.sleep(3)
    # a learning rate changed on rank 0 alone (a scheduler under `if rank == 0`): every rank stops
    with compile_1f1b() as pipe:
        x, y = batches[0]
        float(pipe.step(x if rank == 0 else None, y if rank == 1 else None))
        if rank == 0:
            opt.param_groups[0]["lr"] = 0.5
        start = time.monotonic()
        try:
            float(pipe.step(x if rank == 0 else None, y if rank == 1 else None))
        except pipeoptim.PipeoptimError as exc:
            result["lr"] = f"{type(exc).__name__}: {exc}"
        result["lr_s"] = time.monotonic() - start
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
