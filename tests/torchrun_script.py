"""Run by test_torchrun.py under ``torchrun``: train a few mini-batches, write results."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pipeoptim
from tests.test_training import SmallCNN, data


def main(out: str, stages: int, method: str, profile_dir: str, only_needed: bool) -> None:
    rank = int(os.environ["RANK"])
    torch.manual_seed(rank)  # ranks start from different weights on purpose
    model = SmallCNN()
    batches = data(10)
    if only_needed:  # the first stage alone gets inputs, the last alone targets; a last batch of 1
        batches += data(1, batch=1, seed=9)
        batches = [(x if rank == 0 else None, y if rank == stages - 1 else None) for x, y in batches]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pipe = pipeoptim.compile(
        model,
        opt,
        stages,
        example_inputs=data(1)[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        profile_dir=profile_dir,
        timeout=60,
    )
    losses = [float(loss) for loss in pipe.train(batches)]
    result = {
        "losses": losses,
        "plan": pipe.plan.stage_of,
        "predict": pipe.predict(batches[0][0] if not only_needed or rank == 0 else None).tolist(),
        "state": {k: v.tolist() for k, v in pipe.state_dict().items()},
    }
    # losses never read: what a rank keeps for the losses of other ranks stays within N
    # mini-batches (the receives of those in flight)
    # with the user's own collective between the steps: stage 0 may have left its last backward
    # and step to the next call (StageProcess.submit), which no other rank waits on
    # and predicting (so flushing) in the caller's inference mode or autocast, which the
    # stage's actions do not take on (runtime/grad_modes.py); stats() runs nothing of them
    receives, unresolved, left = [], [], []
    callers = {1: torch.inference_mode, 3: lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    for i in range(3 * stages):
        pipe.step(*batches[0])
        receives.append(len(pipe._executor.mail._pending))
        unresolved.append(len(pipe._losses))
        left.append([str(a) for a in pipe._executor.process._deferred])
        pipe.stats()
        assert [str(a) for a in pipe._executor.process._deferred] == left[-1]
        dist.barrier()
        if i in callers:
            with callers[i]():
                pipe.predict(batches[0][0])
    pipe.flush()
    result |= {"receives": max(receives), "unresolved": max(unresolved), "left": left}
    result["state after"] = {k: v.tolist() for k, v in pipe.state_dict().items()}
    if rank == 0:
        pipe.plan.save(f"{out}.plan.json")  # the local run replays this plan (plans follow timings)
    if hasattr(os, "sched_getaffinity"):  # each rank bound to its cores (runtime.affinity)
        result["cores"] = sorted(os.sched_getaffinity(0))
    pipe.close()
    if hasattr(os, "sched_getaffinity"):  # given back by close(): the script goes on
        result["cores after close"] = sorted(os.sched_getaffinity(0))
    with open(f"{out}.{os.environ['RANK']}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:] == ["only-needed"])
