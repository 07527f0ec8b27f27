"""Run by test_torchrun.py under ``torchrun`` with 4 ranks (PipeOptim): rank 1's own code raises
mid-run inside ``try: ... finally: pipe.close()``; writes each rank's error and how long after
rank 1's raise it came."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import pipeoptim
from tests.test_training import SmallCNN, data


def main(out: str, profile_dir: str, timeout: str) -> None:
    rank, last = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]) - 1
    result: dict = {}
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = data(12)
    pipe = pipeoptim.compile(
        model,
        opt,
        last + 1,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        profile_dir=profile_dir,
        timeout=float(timeout),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                for i, (x, y) in enumerate(batches):
                    if rank == 1 and i == 6:
                        result["raised_at"] = time.time()
                        raise RuntimeError("the script's own bug on rank 1")
                    pipe.step(x, y)
                pipe.flush()
            finally:
                pipe.close()
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
    result["warnings"] = [str(w.message) for w in caught if "close() did not finish" in str(w.message)]
    result["done_at"] = time.time()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
