"""Run by test_torchrun.py under ``torchrun``: a model with a sparse buffer and constants drawn
without a common seed (tests/sparse_models.py); each rank writes its losses and state."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

import pipeoptim
from tests.sparse_models import SparseGCN


def main(out: str, stages: int, method: str) -> None:
    rank = int(os.environ["RANK"])
    torch.manual_seed(rank)  # ranks draw different weights and constants on purpose
    model = SparseGCN()
    torch.manual_seed(100)
    batches = [(torch.randn(8, 8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pipeoptim.compile(
        model, opt, stages, example_inputs=batches[0][0], loss_fn=F.cross_entropy, method=method, timeout=60
    ) as pipe:
        losses = [float(loss) for loss in pipe.train(batches)]
        state = {k: v.to_dense().tolist() for k, v in pipe.state_dict().items()}
        module = pipe.to_module()
    outputs = module(batches[0][0]).tolist()
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"losses": losses, "state": state, "to_module": outputs}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
