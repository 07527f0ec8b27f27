"""Run by test_async_norms.py under ``torchrun``: asynchronous clipping and float16 loss
scaling (2 stages, an overflow in the first mini-batch); each rank writes its results."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

import pipeoptim
from tests.test_reference_sim import OPTIMIZERS, make_batches, make_model


def main(out: str, profile_dir: str) -> None:
    model = make_model().float()
    batches = [(x.float(), y.float() * (1e3 if i == 0 else 1.0)) for i, (x, y) in enumerate(make_batches())]
    pipe = pipeoptim.compile(
        model,
        OPTIMIZERS["adam"][0](model.parameters()),
        2,
        example_inputs=batches[0][0],
        loss_fn=F.mse_loss,
        method="pipeoptim",
        max_grad_norm=0.05,
        autocast=torch.float16,
        profile_dir=profile_dir,
        timeout=180,
    )
    pending = [pipe.step(x, y) for x, y in batches]
    pipe.flush()
    result = {
        "losses": [float(v) for v in pending],
        "plan": pipe.plan.stage_of,
        "state": {k: v.tolist() for k, v in pipe.state_dict().items()},
    }
    if os.environ["RANK"] == "0":
        pipe.plan.save(f"{out}.plan.json")  # the local run replays this plan (plans follow timings)
    with open(f"{out}.{os.environ['RANK']}", "w") as f:
        json.dump(result, f)
    pipe.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
