"""Run by test_shared_params.py under ``torchrun``: a tied GPT, 2 stages, writes results."""

from __future__ import annotations

import json
import os
import sys

import torch

from tests.test_shared_params import batches, compile_gpt, gpt


def main(out: str, method: str, profile_dir: str) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    pipe = compile_gpt(gpt(), method, stages=2, executor="torchrun", profile_dir=profile_dir)
    losses = [float(loss) for loss in pipe.train(batches(6))]
    stages = pipe.stage_state_dicts()
    result = {
        "losses": losses,
        "tok": [s["tok.weight"].tolist() for s in stages],
        "shared": pipe.plan.shared,
        "plan": pipe.plan.stage_of,
    }
    if rank == 0:
        pipe.plan.save(f"{out}.plan.json")  # the local run replays this plan (plans follow timings)
    pipe.close()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
