"""Run by test_long_runs.py in a fresh interpreter: trains the long-run MLP with worker
processes and prints, as JSON, the mini-batch index and every worker's resident bytes at each
sample. A fresh interpreter starts its own fork server, so the allocator settings in its
environment reach the workers."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim

WIDTH, BATCH = 1024, 128  # one boundary activation: 128 x 1024 float32 = 512 KiB
# sampling starts after warm-up and after the first prediction-error sample (mini-batch 64), whose
# two copies of the stage's weights are kept for the next sample (runtime/staleness.py)
STAGES, STEPS, WARMUP, EVERY = 3, 280, 80, 5
HIDDEN = 3  # Linear(1024, 1024) layers before the head: about one per stage


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(HIDDEN):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def main(method: str, profile_dir: str) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    steps, samples = [], []
    with pipeoptim.compile(
        model,
        opt,
        STAGES,
        example_inputs=x,
        loss_fn=F.cross_entropy,
        method=method,
        executor="processes",
        profile_dir=profile_dir,
        timeout=120,
    ) as pipe:
        for i in range(STEPS):
            loss = pipe.step(x, y)  # most losses are never read: step() must bound what is pending
            pending = len(pipe._losses)
            if pending > pipe.max_in_flight:
                raise AssertionError(f"{pending} losses pending, at most {pipe.max_in_flight} in flight")
            if i >= WARMUP and i % EVERY == 0:
                loss.wait()  # the workers have got this far
                steps.append(i)
                samples.append(pipe.resident_bytes())
    print(json.dumps({"steps": steps, "samples": samples}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
