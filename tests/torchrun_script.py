"""Run by test_torchrun.py under ``torchrun``: train a few mini-batches, write results."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

import pipeoptim
from tests.test_training import SmallCNN, data


def main(out: str, stages: int, method: str, profile_dir: str) -> None:
    torch.manual_seed(int(os.environ["RANK"]))  # ranks start from different weights on purpose
    model = SmallCNN()
    batches = data(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pipe = pipeoptim.compile(
        model,
        opt,
        stages,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        profile_dir=profile_dir,
        timeout=60,
    )
    losses = [float(loss) for loss in pipe.train(batches)]
    result = {
        "losses": losses,
        "plan": pipe.plan.stage_of,
        "predict": pipe.predict(batches[0][0]).tolist(),
        "state": {k: v.tolist() for k, v in pipe.state_dict().items()},
    }
    with open(f"{out}.{os.environ['RANK']}", "w") as f:
        json.dump(result, f)
    pipe.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
