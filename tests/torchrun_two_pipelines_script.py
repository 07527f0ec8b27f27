"""Run by test_torchrun.py under ``torchrun``: several pipelines in one job. A and B have
their mini-batches interleaved without a flush, the user's own messages on the default group
between their steps; A (which created the process group) is closed while B has mini-batches
in flight, B goes on; C (1 stage x 3 replicas: replica groups) is compiled after A was
closed, and closed before B. Writes each pipeline's losses, final weights and (rank 0) plan,
the threads C left behind, and the process groups left once all are closed."""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pipeoptim
from tests.test_training import SmallCNN, data

#: name: method, model seed, data seed, replicas, mini-batches (of 8 rows; C: 6)
PIPELINES = {
    "A": ("pipeoptim", 0, 1, 1, 8),
    "B": ("pipedream", 5, 7, 1, 10),
    "C": ("pipeoptim", 9, 3, 3, 4),
}


def batches(name: str) -> list:
    _, _, data_seed, replicas, steps = PIPELINES[name]
    return data(steps, batch=8 if replicas == 1 else 6, seed=data_seed)


def compile_(name: str, gpus: int, profile_dir: str, rank: int) -> pipeoptim.Pipeline:
    method, seed, _, replicas, _ = PIPELINES[name]
    torch.manual_seed(seed + rank)  # rank 0's weights are broadcast to the others
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return pipeoptim.compile(
        model,
        opt,
        gpus,
        example_inputs=batches(name)[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        data_parallel=replicas,
        profile_dir=profile_dir,
        timeout=60,
    )


def _threads() -> int:
    """This process's threads (Linux), once nothing unreachable is left."""
    gc.collect()
    return len(os.listdir("/proc/self/task"))


def main(out: str, gpus: int, profile_dir: str) -> None:
    rank = int(os.environ["RANK"])
    pipes = {name: compile_(name, gpus, profile_dir, rank) for name in "AB"}
    # only the first stage reads inputs and the last targets: sizes and losses travel too
    streams = {
        name: [(x if rank == 0 else None, y if rank == gpus - 1 else None) for x, y in batches(name)]
        for name in "AB"
    }
    losses: dict[str, list[pipeoptim.Loss]] = {name: [] for name in PIPELINES}
    result = {}
    for i in range(PIPELINES["A"][4]):
        for name in "AB":
            losses[name].append(pipes[name].step(*streams[name][i]))
        # the user's own message between ranks 0 and 1 (tag 0, the default group)
        note = torch.full((8, 1, 8, 8), float(i))
        if rank == 0:
            dist.send(note, 1)
        elif rank == 1:
            dist.recv(note, 0)
            assert bool((note == i).all()), "the user's message was taken by a pipeline"

    def finish(name: str) -> None:
        pipe = pipes.pop(name)
        pipe.flush()
        if rank == 0:  # the local reference replays it: PipeOptim's numbers depend on the cut
            pipe.plan.save(f"{out}.plan.{name}.json")
        result[name] = {
            "losses": [float(loss) for loss in losses[name]],
            "state": {k: v.tolist() for k, v in pipe.state_dict().items()},
        }
        pipe.close()

    finish("A")  # B has mini-batches in flight
    for x, y in streams["B"][PIPELINES["A"][4] :]:
        losses["B"].append(pipes["B"].step(x, y))
    threads = _threads()
    pipes["C"] = compile_("C", gpus, profile_dir, rank)  # every replica's rank reads the data
    for x, y in batches("C"):
        losses["C"].append(pipes["C"].step(x, y))
    finish("C")
    result["threads after C"] = _threads() - threads  # its groups' gloo threads ended
    finish("B")
    result["groups left"] = len(dist.distributed_c10d._world.pg_map)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
