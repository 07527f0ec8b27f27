"""Plain single-process training behind the pipeline interface: the reference ``pipeoptim
train --method sequential`` runs, and the baseline the pipeline methods are compared with."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeoptim.checkpoint import misfits, read_checkpoint, save_checkpoint
from pipeoptim.errors import CheckpointError
from pipeoptim.loss import Loss
from pipeoptim.runtime.precision import autocast_context

SEQUENTIAL = "sequential"


class Sequential:
    """Plain single-process training with the same interface as a pipeline (the reference)."""

    plan = None
    num_stages = 1

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable,
        max_grad_norm: float | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.autocast = autocast
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.max_grad_norm = max_grad_norm
        self.scaler = torch.amp.GradScaler("cpu") if autocast is torch.float16 else None
        self.mini_batches_done = 0

    def step(self, inputs: tuple[torch.Tensor, ...], targets: Any) -> Loss:
        self.model.train()
        self.optimizer.zero_grad()
        with autocast_context(self.autocast, "cpu"):
            loss = self.loss_fn(self.model(*inputs), targets)
        if self.scaler is not None:  # float16: the loss scaling of torch.amp.GradScaler
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        result = Loss(self.mini_batches_done)
        result._set(float(loss.detach()))
        self.mini_batches_done += 1
        return result

    def flush(self) -> None:
        """Nothing is ever in flight."""

    @torch.no_grad()
    def predict(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        self.model.eval()
        try:
            with autocast_context(self.autocast, "cpu"):
                return self.model(*inputs)
        finally:
            self.model.train()

    def save_checkpoint(self, path: Path, extra: dict[str, Any]) -> None:
        state = {
            "model_class": type(self.model).__qualname__,
            "method": SEQUENTIAL,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "mini_batches": self.mini_batches_done,
            "plan": None,
            "extra": extra,
            # dropout draws from the global generator, float16 steps follow the loss scale: a
            # resumed run without them diverged at its first mini-batch
            "rng_state": torch.get_rng_state(),
            "loss_scale": self.scaler.state_dict() if self.scaler is not None else None,
        }
        save_checkpoint(path, state)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        data = read_checkpoint(path)
        misfit = misfits(data["state_dict"], self.model)  # before torch's load, which copies part
        if data["method"] != SEQUENTIAL or misfit:
            why = f" ({misfit})" if misfit else ""
            raise CheckpointError(f"checkpoint {path} is not from a sequential run of this model{why}")
        self.model.load_state_dict(data["state_dict"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.mini_batches_done = data["mini_batches"]
        if data.get("rng_state") is not None:
            torch.set_rng_state(data["rng_state"])
        if self.scaler is not None and data.get("loss_scale"):
            self.scaler.load_state_dict(data["loss_scale"])
        return data["extra"]

    def close(self, finish: bool = True) -> None:
        """Nothing to end, nor anything in flight to ``finish`` (as :meth:`Pipeline.close`)."""
