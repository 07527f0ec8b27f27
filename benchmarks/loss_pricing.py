"""The loss priced on the last stage against left out, side by side in one run.

A language model whose cross-entropy is over a large vocabulary (token and position
embeddings, ``--blocks`` pre-norm blocks of d=256, an untied head over ``--vocabulary``
tokens, mini-batch 8 x 64 tokens, SGD with momentum), PipeOptim at 2 stages with the processes
executor, one thread per rank: compiled once without example targets (the plan leaves the loss
out) and once with them (:mod:`pipeoptim.loss_cost`: the loss's forward and backward priced on
the last stage), from one profile. The two pipelines' windows take turns; each row gives the
plan's cut (the last stage's nodes), its predicted rate, the measured rate (median of the
windows), measured / predicted, and the ratio priced / left out (the median of the windows'
ratios, with their range).

    python benchmarks/loss_pricing.py [--quick] [--vocabulary 16384] [--blocks 8] [--windows 6]
        [--out DIR]

Writes ``loss_pricing.md`` into ``--out``: ``benchmarks/results`` for the full run, a new
temporary folder for ``--quick`` or other options.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from outputs import OUT_HELP, host, positive_int, results_dir, run_kind, write_result

import pipeoptim
from pipeoptim.examples import Block

DIM, HEADS, SEQ, ROWS = 256, 4, 64, 8
QUICK = {"vocabulary": 2048, "blocks": 2, "windows": 2, "steps": 4}


class LanguageModel(nn.Module):
    """Input ``[B, T]`` token ids, output ``[B, T, vocabulary]`` logits."""

    def __init__(self, vocabulary: int, blocks: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocabulary, DIM)
        self.pos = nn.Embedding(SEQ, DIM)
        self.blocks = nn.Sequential(*(Block(DIM, HEADS) for _ in range(blocks)))
        self.ln_f = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, vocabulary)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln_f(self.blocks(self.tok(idx) + self.pos(pos))))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over ``[B, T]`` positions."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def compiled(vocabulary: int, blocks: int, targets: torch.Tensor | None, x: torch.Tensor, folder: Path):
    torch.manual_seed(0)
    model = LanguageModel(vocabulary, blocks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return pipeoptim.compile(
        model,
        optimizer,
        2,
        example_inputs=x,
        example_targets=targets,
        loss_fn=lm_loss,
        executor="processes",
        profile_dir=folder,
        log=lambda msg: print(msg, file=sys.stderr),
    )


def window_rate(pipe: Any, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Mini-batches per second over ``steps`` after a flushed warm-up of 2."""
    for _ in range(2):
        pipe.step(x, y)
    pipe.flush()
    start = time.perf_counter()
    losses = [pipe.step(x, y) for _ in range(steps)]
    pipe.flush()
    float(losses[-1])
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, few windows (a smoke test)")
    parser.add_argument("--vocabulary", type=positive_int, default=16384)
    parser.add_argument("--blocks", type=positive_int, default=8)
    parser.add_argument("--windows", type=positive_int, default=6, help="windows per pipeline, taking turns")
    parser.add_argument("--out", type=Path, help=OUT_HELP)
    args = parser.parse_args()
    scope = ("vocabulary", "blocks", "windows")
    kind = run_kind(parser, args, scope)
    out = results_dir(parser, args, "loss-pricing", scope=scope)
    torch.set_num_threads(1)
    given = {name: getattr(args, name) for name in scope if getattr(args, name) != parser.get_default(name)}
    setting = {**{name: getattr(args, name) for name in scope}, "steps": 20}
    if args.quick:
        setting = {**setting, **QUICK, **given}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, setting["vocabulary"], (ROWS, SEQ + 1), generator=g)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    names = ("left out", "priced")
    rates: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="loss-pricing-profiles-") as folder:
        pipes = {
            name: compiled(setting["vocabulary"], setting["blocks"], targets, x, Path(folder))
            for name, targets in zip(names, (None, y))
        }
        try:
            for w in range(setting["windows"]):
                for name in names if w % 2 == 0 else names[::-1]:
                    rates[name].append(window_rate(pipes[name], x, y, setting["steps"]))
        finally:
            for pipe in pipes.values():
                pipe.close()
    rows = []
    for name in names:
        plan = pipes[name].plan
        last = [node for node, stage in plan.stage_of.items() if stage == 1]
        measured, predicted = statistics.median(rates[name]), plan.summary["throughput_per_s"]
        loss = plan.summary["loss"]
        priced = "-" if loss is None else f"{loss['fwd_s'] * 1e3:.1f} + {loss['bwd_s'] * 1e3:.1f}"
        rows.append(
            [
                name,
                priced,
                f"{len(last)} ({last[0]} ..)",
                f"{predicted:.2f}",
                f"{measured:.2f}",
                f"{measured / predicted:.3f}",
            ]
        )
    ratios = [p / o for p, o in zip(rates["priced"], rates["left out"])]
    ratio = statistics.median(ratios)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"# The loss priced on the last stage against left out ({kind} run, {when}, {host()})\n\n"
        f"Language model: vocabulary {setting['vocabulary']}, {setting['blocks']} blocks of d={DIM}, "
        f"mini-batch {ROWS} x {SEQ} tokens, cross-entropy over the vocabulary; PipeOptim, 2 stages, "
        f"processes executor, one thread per rank; {setting['windows']} windows of {setting['steps']} "
        "mini-batches per pipeline taking turns, rates the medians of the windows.\n\n"
        + tabulate(
            rows,
            headers=[
                "loss",
                "loss fwd + bwd ms",
                "last stage's nodes",
                "predicted /s",
                "measured /s",
                "measured / predicted",
            ],
            tablefmt="github",
        )
        + f"\n\npriced / left out: {ratio:.3f} (windows {min(ratios):.3f}-{max(ratios):.3f})\n"
    )
    print(text)
    print(f"pipeoptim on a vocabulary-{setting['vocabulary']} LM, loss priced / left out: {ratio:.3f}x")
    write_result(out / "loss_pricing.md", text)
    print(f"results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
