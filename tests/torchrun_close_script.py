"""Run by test_torchrun.py under ``torchrun`` with 2 ranks (PipeDream): rank 1's own code raises
inside a ``with`` block while rank 0 waits in the script's own barrier, which never takes rank
1's last gradients; writes each rank's error and when it left the block."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pipeoptim
from tests.test_training import SmallCNN, data


def main(out: str, profile_dir: str) -> None:
    rank = int(os.environ["RANK"])
    result: dict = {}
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = data(8)
    options = {"loss_fn": F.cross_entropy, "method": "pipedream", "profile_dir": profile_dir, "timeout": 30}
    try:
        with pipeoptim.compile(model, opt, 2, example_inputs=batches[0][0], **options) as pipe:
            for i, (x, y) in enumerate(batches):
                pipe.step(x, y)
                if i == 3 and rank == 1:
                    result["raised_at"] = time.time()
                    raise RuntimeError("the script's own bug on rank 1")
                if i == 3:  # rank 1 never comes: gloo's monitored barrier gives up after 10 s
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=10))
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    result["done_at"] = time.time()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
