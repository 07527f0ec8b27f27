"""Run by test_data_parallel.py under ``torchrun`` (4 ranks: 2 stages × 2 replicas)."""

from __future__ import annotations

import json
import os
import sys

import pipeoptim
from tests.test_data_parallel import compile_mlp, mlp, per_stage_figures
from tests.test_training import SGD_MOMENTUM, data


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    stage = rank % 2  # rank = replica · N + stage
    batches = [(x if stage == 0 else None, y if stage == 1 else None) for x, y in data(6, seed=3)]
    with compile_mlp(mlp(), SGD_MOMENTUM[0], "1f1b", "torchrun") as pipe:
        assert isinstance(pipe, pipeoptim.Pipeline)
        losses = list(pipe.train(batches))
        replicas = [{k: v.tolist() for k, v in s.items()} for s in pipe._executor.replica_state_dicts()]
        per_stage = per_stage_figures(pipe)
        if rank == 0:  # the local run replays this plan (each run profiles: timings move a cut)
            pipe.plan.save(f"{out}.plan.json")
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"losses": losses, "replicas": replicas, "per_stage": per_stage}, f)


if __name__ == "__main__":
    main(sys.argv[1])
