"""Run by test_torchrun.py under ``torchrun`` with 2 ranks (1F1B; rank 0 leaves each
mini-batch's last backward and step to its next call where each rank has a core):

- ``flush``, ``predict``, ``state_dict``: stage 0's backward raises for the last micro-batch
  of mini-batch 2, and the next call is that one; the error must stop both ranks at once
  (before, raised by a flushing call it left the ranks training on, stage 0 a step short,
  or waiting out the timeout: helper-151);
- ``done``: ``loss.done()`` turns True on every rank once the loss has arrived; ``lost``
  (PipeOptim, whose step returns before the backward): on rank 0 within the (5 s) timeout once
  the last rank has stopped (it spun for ever: helper-154);
- ``targets``: the last rank refuses its targets; its next step says it stopped at that error;
- ``gone``: the last rank closes; rank 0's flush fails once, then says it stopped there;
- ``pause``: PipeOptim (losses pending across steps), every rank idle for longer than the
  timeout between two steps, rank 0 asking ``done()`` before it: the run goes on.

The flushing cases also record rank 0's losses after the error: those that had arrived keep
their values (they failed with the flush's error, helper-154).

Writes per case each call's outcome (``ok`` or the error's type and first line) and time."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim


class _Guard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.bad = bool((x.abs() > 100).any())
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if ctx.bad:
            raise ValueError("bad gradient in Guard")
        return grad


class GuardedLinear(nn.Linear):
    """The first layer (so on stage 0), whose backward raises for a batch with a huge input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Guard.apply(super().forward(x)) + 0 * x.sum()


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(GuardedLinear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    out[2][0][-1, 0] = 1e4  # the last micro-batch of mini-batch 2
    return out


def run_case(case: str, rank: int, profile_dir: str, call: Callable[[str, Callable[[], Any]], None]) -> Any:
    """One case on a pipeline of its own (closed without finishing: it may have failed);
    ``call(what, fn)`` records each call's outcome (a float's value); returns the ``done``
    and ``lost`` cases' figures."""
    data, net = batches(), model()
    pipe = pipeoptim.compile(
        net, torch.optim.SGD(net.parameters(), lr=0.01), 2, example_inputs=data[0][0],
        loss_fn=F.cross_entropy, method="pipeoptim" if case in ("lost", "pause") else "1f1b",
        profile_dir=profile_dir, timeout=5 if case in ("lost", "pause") else 30,
    )  # fmt: skip
    try:
        if case == "done":
            loss = pipe.step(*data[0])
            start = time.time()
            while not loss.done() and time.time() - start < 10:
                time.sleep(0.01)
            return [loss.done(), time.time() - start, float(loss)]
        if case == "lost":
            pipe.step(*data[0]).wait()
            x, y = data[1]
            try:
                loss = pipe.step(x, y[:7] if rank == 1 else y)
            except Exception as exc:  # the last rank: it refused them and stopped
                return [type(exc).__name__]
            start, polled = time.time(), "pending"
            while polled == "pending" and time.time() - start < 20:
                try:
                    polled = "done" if loss.done() else "pending"
                except Exception as exc:  # the lost peer, raised by the poll that found it
                    polled = type(exc).__name__
                time.sleep(0.05)
            call("float", lambda: float(loss))
            return [polled, time.time() - start]
        if case == "pause":
            losses = [pipe.step(*data[i]) for i in range(2)]
            losses[-1].done()
            time.sleep(7)  # the script's own work between steps, longer than the timeout
            losses += [pipe.step(*data[i]) for i in (0, 1)]
            call("flush", pipe.flush)
            return [float(loss) for loss in losses]
        if case == "gone":
            for i in range(2):
                call(f"step {i}", lambda i=i: pipe.step(*data[i]))
            if rank == 1:
                return None  # closes (finally), while rank 0 flushes
            time.sleep(1)
            call("flush", pipe.flush)
            call("flush", pipe.flush)
            return None
        if case == "targets":
            x, y = data[1]
            call("step 0", lambda: pipe.step(*data[0]))
            call("step 1", lambda: pipe.step(x, y[:7] if rank == 1 else y))
            call("step 2", lambda: pipe.step(*data[3]))
            return None
        losses: list = []
        for i in range(3):
            call(f"step {i}", lambda i=i: losses.append(pipe.step(*data[i])))
        flushing = {
            "flush": pipe.flush,
            "predict": lambda: pipe.predict(data[0][0]),
            "state_dict": pipe.state_dict,
        }
        call(case, flushing[case])
        call("step 3", lambda: pipe.step(*data[3]))
        for i, loss in enumerate(losses):
            call(f"loss {i}", lambda loss=loss: float(loss))
        return None
    finally:
        pipe.close(finish=False)


def main(out: str, profile_dir: str) -> None:
    rank = int(os.environ["RANK"])
    result: dict[str, list] = {}
    for case in ("flush", "predict", "state_dict", "done", "lost", "targets", "gone", "pause"):
        calls: list = []

        def call(what: str, fn: Callable[[], Any], calls: list = calls) -> None:
            try:
                value = fn()
                said = f"{value:.6f}" if isinstance(value, float) else "ok"
            except Exception as exc:
                said = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            calls.append([what, said, time.time()])

        result[case] = {"calls": calls, "returned": run_case(case, rank, profile_dir, call)}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
