"""Train on CUDA with the local executor (part of ``gpu_check.sh``).

Every stage of a 4-stage PipeOptim pipeline runs on the one GPU; the script reports the
accuracy reached on the digits and the mini-batches per second, and checks that the CUDA
losses match a CPU run of the same schedule to float32 tolerance for the first steps.

    python benchmarks/gpu_train.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from outputs import write_result

import pipeoptim
from pipeoptim.tasks import make_task


def train(device: str, epochs: int, profile_dir: Path, plan=None) -> dict:
    task = make_task("digits", batch_size=32, seed=0)
    model = task.model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    example = tuple(x.to(device) for x in task.example_inputs)
    losses, start = [], time.perf_counter()
    with pipeoptim.compile(
        model,
        opt,
        4,
        example_inputs=example,
        loss_fn=task.loss_fn,
        executor="local",
        profile_dir=profile_dir,
        plan=plan,
    ) as pipe:
        for epoch in range(epochs):
            batches = ((tuple(x.to(device) for x in xs), y.to(device)) for xs, y in task.batches(epoch))
            losses += list(pipe.train(batches))
        seconds = time.perf_counter() - start
        accuracy = task.evaluate(lambda xs: pipe.predict(tuple(x.to(device) for x in xs)))
        plan = pipe.plan
    return {
        "device": device,
        "accuracy": accuracy,
        "losses": losses,
        "seconds": seconds,
        "mini_batches_per_s": len(losses) / seconds,
        "plan_bottleneck_s": plan.summary["bottleneck_s"],
        "plan": plan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    cuda = train("cuda", args.epochs, args.out / ".gpu-profiles")
    cpu = train("cpu", 1, args.out / ".gpu-profiles", plan=cuda["plan"])  # same plan, same staleness
    first = min(20, len(cpu["losses"]))
    diff = max(abs(a - b) for a, b in zip(cuda["losses"][:first], cpu["losses"][:first]))
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "cuda": {k: v for k, v in cuda.items() if k not in ("losses", "plan")},
        "cpu_first_epoch": {k: v for k, v in cpu.items() if k not in ("losses", "plan")},
        "max_loss_difference_first_steps": diff,
    }
    write_result(args.out / "gpu_train.json", json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
