"""The weight policy base class: how a stage routes its parameters through a policy, and
how the backward finds the weights a policy names (see :mod:`pipeoptim.runtime.policies`)."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils import _pytree as pytree

from pipeoptim.storage import storage_address


@dataclass(frozen=True)
class _SavedWeight:
    """What autograd keeps instead of a weight: its name and the view's geometry."""

    name: str
    micro_batch: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class WeightPolicy:
    """Base class; see the module docstring. Subclasses set :attr:`kind` and override hooks.

    Attributes:
        kind: policy name.
        redirect_backward: whether saved weights are replaced at backward time.
        keeps_forward_weights: whether :meth:`backward_weight` gives the backward of a
            micro-batch the very values its forward used (weight stashing), kept until then.
        peak_versions: most weight versions of one parameter alive at once so far, the
            parameter itself included (measured with weak references).
    """

    kind = "base"
    redirect_backward = False
    keeps_forward_weights = False

    def __init__(self) -> None:
        self.params: dict[str, nn.Parameter] = {}
        self.optimizer: Optimizer | None = None
        self.stage = 0
        self.num_stages = 1
        self._values: dict[str, torch.Tensor] = {}
        self._copies: dict[str, list[weakref.ref]] = {}
        self.peak_versions = 1

    def attach(
        self, params: dict[str, nn.Parameter], optimizer: Optimizer, stage: int, num_stages: int
    ) -> None:
        """Bind to a stage's trainable parameters (by graph name) and its optimizer."""
        self.params = params
        self.optimizer = optimizer
        self.stage = stage
        self.num_stages = num_stages

    # -- hooks called by the stage ---------------------------------------------------

    def begin_forward(
        self, micro_batch: int, version_diff: int, step_rates: Sequence[Sequence[float]] | None = None
    ) -> None:
        """Prepare the weights the forward of ``micro_batch`` uses.

        Args:
            version_diff: optimizer steps between this forward and its backward (s).
            step_rates: per group of the stage's optimizer, the learning rates of those s
                steps, in order (``None``: not known, the current rate stands for each).
        """

    def end_forward(self, micro_batch: int) -> None:
        self._values = {}

    def begin_backward(self, micro_batch: int) -> None:
        """Prepare what the backward of ``micro_batch`` sees (redirecting policies)."""

    def end_backward(self, micro_batch: int) -> None:
        """Called after the backward of ``micro_batch``."""

    def before_step(self) -> None:
        """Called before each optimizer step."""

    def optimizer_step(self) -> None:
        """The optimizer step, between :meth:`before_step` and :meth:`after_step`."""
        assert self.optimizer is not None
        self.optimizer.step()

    def after_step(self) -> None:
        """Called after each optimizer step."""

    def reset(self) -> None:
        """Forget what was derived from the weights and the optimizer state: both were just
        loaded (a checkpoint, ``load_state_dict``; always after a flush, nothing in flight)."""

    def weights_loaded(self) -> None:
        """The weights alone were just loaded (``load_state_dict``): as :meth:`reset`."""
        self.reset()

    def saved_versions(self) -> dict[str, torch.Tensor]:
        """The weight versions besides W that the next mini-batch after a flush computes with,
        by graph name (CPU copies, kept in the optimizer state so that a resumed run goes on
        as an uninterrupted one); none here."""
        return {}

    def restore_versions(self, versions: dict[str, torch.Tensor], next_mini_batch: int) -> None:
        """Take back :meth:`saved_versions` (after :meth:`reset`); ``next_mini_batch``: the
        index of the mini-batch the pipeline runs next."""

    def forward_weights(self) -> dict[str, torch.Tensor]:
        """What the forward prepared by :meth:`begin_forward` computes with, by graph name."""
        return {name: self._values.get(name, p) for name, p in self.params.items()}

    def backward_weight(self, name: str, micro_batch: int) -> torch.Tensor:
        """The weight the backward uses in place of a saved one (default: the current W)."""
        return self.params[name].detach()

    @contextlib.contextmanager
    def saving(self, micro_batch: int, version_diff: int | None = None) -> Iterator[None]:
        """Context for the forward of ``micro_batch``: each parameter :meth:`begin_forward`
        chose another tensor for holds that tensor's data (``param.data`` is swapped, and
        swapped back on exit: no autograd node, the gradient goes to the parameter), and
        with :attr:`redirect_backward` autograd stores references to weights instead of the
        weights. A view of a parameter taken inside keeps the swapped-in data; the
        parameter object itself shows W again after the context.

        Args:
            version_diff: optimizer steps between this forward and its backward (``None``:
                not known). Where it is 0 and nothing is swapped, the backward meets the very
                weights the forward used and the saved-tensor hooks are left out (the last
                stage of PipeOptim, PipeDream and no correction: 0.2-0.7 ms per
                forward+backward of a benchmark MLP stage)."""
        swapped = [(self.params[name], value) for name, value in self._values.items()]
        originals = [p.data for p, _ in swapped]
        storages: dict[int, tuple[str, int]] = {}
        redirect = self.redirect_backward and (version_diff != 0 or bool(swapped))
        if redirect:
            for name, p in self.params.items():
                storages[p.untyped_storage().data_ptr()] = (name, p.storage_offset())
            for name, v in self._values.items():
                storages[v.untyped_storage().data_ptr()] = (name, v.storage_offset())

        def pack(t: torch.Tensor) -> torch.Tensor | _SavedWeight:
            found = storages.get(storage_address(t))  # none at 0: sparse or meta (pipeoptim.storage)
            if found is None:
                # an operation's own output, kept as it is, would hold its grad_fn, which holds
                # it: a cycle through torch's C++ graph that the garbage collector cannot
                # break, so a forward whose backward never ran (a failed or closed pipeline)
                # kept its graph and, through these hooks, its stage for good
                return t.detach() if t.grad_fn is not None else t
            name, base = found
            return _SavedWeight(name, micro_batch, t.size(), t.stride(), t.storage_offset() - base)

        def unpack(x: torch.Tensor | _SavedWeight) -> torch.Tensor:
            if not isinstance(x, _SavedWeight):
                return x
            w = self.backward_weight(x.name, x.micro_batch)
            return w.as_strided(x.size, x.stride, w.storage_offset() + x.offset)

        hooks = (
            torch.autograd.graph.saved_tensors_hooks(pack, unpack) if redirect else contextlib.nullcontext()
        )
        try:
            for p, value in swapped:
                p.data = value
            with hooks:
                yield
        finally:
            for (p, _), original in zip(swapped, originals):
                p.data = original

    def pin_parameters(self, values: Any) -> Any:
        """``values`` (a forward's outputs, inside :meth:`saving`) with every parameter returned
        as it is (a weight sent on) replaced by a view of it, which keeps the data the forward
        used after the parameter's own data is swapped back; as they are when nothing is
        swapped (no walk over the outputs then)."""
        if not self._values:
            return values
        return pytree.tree_map(lambda v: v.view_as(v) if isinstance(v, nn.Parameter) else v, values)

    def overwritten_storages(self) -> set[int]:
        """Storage addresses of copies the next forward overwrites in place (none here)."""
        return set()

    # -- measurement -------------------------------------------------------------------

    def copy_storages(self) -> set[int]:
        """Storage addresses of the weight copies alive now (stashed versions, predictions)."""
        return {
            t.untyped_storage().data_ptr()
            for refs in self._copies.values()
            for r in refs
            if (t := r()) is not None
        }

    def _track(self, name: str, value: torch.Tensor) -> None:
        """Count ``value`` among the versions of ``name`` alive (weak references): the peak
        changes only when a version is added, so it is updated here alone."""
        alive = [r for r in self._copies.get(name, ()) if r() is not None]
        if not any(r() is value for r in alive):
            alive.append(weakref.ref(value))
            self.peak_versions = max(self.peak_versions, 1 + len(alive))
        self._copies[name] = alive


class NoCorrection(WeightPolicy):
    """``none``: forward with the current weights, backward with the weights at that time."""

    kind = "none"
    redirect_backward = True
