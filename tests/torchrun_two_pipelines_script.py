"""Run by test_torchrun.py under ``torchrun``: two pipelines in one job, their mini-batches
interleaved without a flush between them, and the user's own messages on the default process
group between their steps; writes each pipeline's losses and final weights."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pipeoptim
from tests.test_training import SmallCNN, data

#: the two pipelines' methods, seeds and data seeds (asynchronous: mini-batches stay in flight
#: across step() calls, with receives posted ahead)
PIPELINES = (("pipeoptim", 0, 1), ("pipedream", 5, 7))


def main(out: str, stages: int, profile_dir: str) -> None:
    rank = int(os.environ["RANK"])
    pipes, streams = [], []
    for method, seed, data_seed in PIPELINES:
        torch.manual_seed(seed + rank)  # rank 0's weights are broadcast to the others
        model = SmallCNN()
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
        pipes.append(pipe)
        # only the first stage reads inputs and the last targets: sizes and losses travel too
        batches = data(8, seed=data_seed)
        streams.append([(x if rank == 0 else None, y if rank == stages - 1 else None) for x, y in batches])
    losses: list[list[pipeoptim.Loss]] = [[], []]
    for i in range(len(streams[0])):
        for p, pipe in enumerate(pipes):
            losses[p].append(pipe.step(*streams[p][i]))
        # the user's own message between ranks 0 and 1 (tag 0, the default group)
        note = torch.full((8, 1, 8, 8), float(i))
        if rank == 0:
            dist.send(note, 1)
        elif rank == 1:
            dist.recv(note, 0)
            assert bool((note == i).all()), "the user's message was taken by a pipeline"
    result = []
    for p, pipe in enumerate(pipes):
        pipe.flush()
        result.append(
            {
                "losses": [float(loss) for loss in losses[p]],
                "state": {k: v.tolist() for k, v in pipe.state_dict().items()},
            }
        )
    for pipe in reversed(pipes):
        pipe.close()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
