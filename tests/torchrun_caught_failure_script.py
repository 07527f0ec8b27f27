"""Run by test_torchrun.py under ``torchrun`` with 3 ranks (PipeOptim, asynchronous): a
failure one rank catches and lives on after (the last rank's loss_fn raising, a NaN in rank
0's inputs, the last rank's targets missing) must stop every other rank within seconds, the
far one too, with PeerLostError. Writes each rank's error per case and when it came (wall clock)."""

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
    rank, last = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]) - 1
    result: dict = {}
    torch.manual_seed(0)
    batches = data(10)
    cases = [
        (f"{kind}{at}", kind, failing, at) for kind, failing in (("loss", last), ("nan", 0)) for at in (1, 6)
    ]
    cases.append(("targets6", "targets", last, 6))  # the last rank forgets its targets
    for case, kind, failing, at in cases:
        model = SmallCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with pipeoptim.compile(
            model,
            opt,
            last + 1,
            example_inputs=batches[0][0],
            loss_fn=F.cross_entropy,
            profile_dir=profile_dir,
            timeout=60,
        ) as pipe:
            losses = []
            try:
                for i, (x, y) in enumerate(batches):
                    if i == at:  # at 1 in the warm-up, at 6 in the steady state
                        if kind == "loss":
                            y = torch.full_like(y, 99)
                        elif kind == "targets":
                            y = None
                        else:
                            x = x.clone()
                            x[0, 0, 0, 0] = float("nan")
                    losses.append(pipe.step(x if rank == 0 else None, y if rank == last else None))
                [float(loss) for loss in losses]
            except Exception as exc:
                result[case] = f"{type(exc).__name__}: {exc}"
                result[f"{case}_at"] = time.time()  # one host: the ranks' clocks agree
            if rank == failing:
                time.sleep(3)  # alive: its closed connections, not its exit, must stop the others
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
