"""Long runs: resident memory of every stage worker over thousands of mini-batches.

Each method trains for ``--steps`` mini-batches with one worker process per stage (gloo,
one thread per rank). Each worker's resident memory (RSS) is read after a warm-up, every
``--steps / 20`` mini-batches, and at the end; the table gives, per stage, RSS at start and
end and their ratio. The target is a ratio of at most 1.05 for every stage and method.

    python benchmarks/long_run.py [--quick] [--steps 5000] [--model mlp|cnn] [--out benchmarks/results]

Writes ``long_run.md`` into ``benchmarks/results`` for the full run; ``--quick`` (200 steps of
pipeoptim) and runs with other ``--steps``, ``--stages``, ``--model`` or ``--methods`` write
into a new temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from outputs import OUT_HELP, parse_rank_args, positive_int, results_dir, stage_count, write_result
from tabulate import tabulate
from torch import nn

import pipeoptim

METHODS = ("pipeoptim", "pipedream", "2bw", "gpipe", "1f1b", "spectrain", "none")
#: what the full run takes for the options whose default ``--quick`` changes
FULL = {"steps": 5000, "methods": ["pipeoptim", "pipedream", "2bw", "gpipe"]}


class CNN(nn.Module):
    """Three 3x3 convolutions and a classifier on ``[B, 1, 28, 28]`` images."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(x.flatten(1))


def model_and_batch(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``mlp``: 8 layers of width 512, batch 64 (128 KiB per boundary: a leak of one tensor per
    mini-batch would add 640 MB over 5,000); ``cnn``: the 3-conv CNN on 32 x 1 x 28 x 28
    (1.6 MiB per boundary)."""
    torch.manual_seed(0)
    if name == "cnn":
        return CNN(), torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    layers: list[nn.Module] = []
    for _ in range(7):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10)), torch.randn(64, 512), torch.randint(0, 10, (64,))


def run(method: str, model_name: str, stages: int, steps: int, profiles: str) -> dict:
    """Train ``steps`` mini-batches; RSS per stage (bytes) after warm-up and at the end."""
    model, x, y = model_and_batch(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    warmup = max(50, steps // 20)
    with pipeoptim.compile(
        model,
        opt,
        stages,
        example_inputs=x,
        loss_fn=F.cross_entropy,
        method=method,
        executor="processes",
        profile_dir=profiles,
    ) as pipe:
        for _ in range(warmup):
            pipe.step(x, y)
        pipe.flush()
        start = pipe.resident_bytes()
        peak = list(start)
        tic = time.perf_counter()
        for i in range(steps):
            pipe.step(x, y)
            if i % max(1, steps // 20) == 0:
                peak = [max(a, b) for a, b in zip(peak, pipe.resident_bytes())]
        pipe.flush()
        seconds = time.perf_counter() - tic
        end = pipe.resident_bytes()
    return {"start": start, "end": end, "peak": [max(a, b) for a, b in zip(peak, end)], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="by default 200 steps, pipeoptim only; a temporary folder"
    )
    parser.add_argument(
        "--steps", type=positive_int, help=f"mini-batches per method (default {FULL['steps']})"
    )
    parser.add_argument("--stages", type=stage_count, default=4)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument(
        "--methods",
        type=lambda text: text.split(","),
        help=f"comma-separated (default {','.join(FULL['methods'])})",
    )
    parser.add_argument("--out", default=None, help=OUT_HELP)
    args = parse_rank_args(parser)
    steps = args.steps or (200 if args.quick else FULL["steps"])
    methods = args.methods or (["pipeoptim"] if args.quick else FULL["methods"])
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    out = results_dir(parser, args, "long_run", scope=FULL | {"stages": 4, "model": "mlp"})
    out.mkdir(parents=True, exist_ok=True)
    rows, worst = [], 0.0
    for method in methods:
        r = run(method, args.model, args.stages, steps, str(out / ".profiles"))
        for k, (a, b, p) in enumerate(zip(r["start"], r["end"], r["peak"])):
            worst = max(worst, b / a)
            rows.append([method, k, a / 2**20, b / 2**20, p / 2**20, b / a, steps / r["seconds"]])
        print(f"{method}: {steps} mini-batches in {r['seconds']:.1f} s", flush=True)
    headers = [
        "method",
        "stage",
        "RSS start MiB",
        "RSS end MiB",
        "RSS peak MiB",
        "end / start",
        "mini-batches/s",
    ]
    table = tabulate(rows, headers=headers, floatfmt=".2f", tablefmt="github")
    verdict = f"{'meets' if worst <= 1.05 else 'misses'} the target of at most 1.05"
    text = (
        f"# Long run: worker memory over {steps} mini-batches\n\n"
        f"Model `{args.model}`, {args.stages} stages, one worker process per stage (gloo, CPU), "
        "RSS read from `/proc` after a warm-up (start), every 5% of the run (peak) and after the "
        "final flush (end). Written by `python benchmarks/long_run.py"
        f"{' --quick' if args.quick else ''} --steps {steps} --stages {args.stages} --model {args.model} "
        f"--methods {','.join(methods)}`.\n\n{table}\n\n"
        f"Largest end / start ratio: {worst:.3f} ({verdict}).\n"
    )
    write_result(out / "long_run.md", text)
    print(table)
    print(f"largest RSS growth end/start over {steps} mini-batches: {worst:.3f}x ({verdict})")


if __name__ == "__main__":
    main()
