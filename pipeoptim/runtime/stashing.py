"""Weight stashing: PipeDream's ``stash`` (every in-flight version kept) and PipeDream-2BW's
``2bw`` (two versions, double-buffered); see :mod:`pipeoptim.runtime.policies`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pipeoptim.runtime.weight_policy import WeightPolicy


class Stash(WeightPolicy):
    """``stash`` (weight stashing, PipeDream, Narayanan et al. SOSP 2019).

    The backward of a micro-batch uses the weight version its forward used. Versions are
    copied lazily: the forward uses W itself, and only when the optimizer is about to step
    while a micro-batch forwarded on the current version is still in flight is W copied
    (copy-on-step). Stage k of N (0-based) thus keeps ``N - k`` versions: W and up to
    ``N - k - 1`` copies. A copy that no micro-batch needs any more is kept and overwritten by
    the next one: once those copies exist a step allocates nothing (a fresh copy of each step
    took 1.7x the time of copying into a reused one, 8 MiB on one CPU thread, and the cost
    model prices the copy into a reused buffer, :func:`pipeoptim.update_cost.measure_update_cost`).
    """

    kind = "stash"
    redirect_backward = True
    keeps_forward_weights = True

    def __init__(self) -> None:
        super().__init__()
        self.version = 0
        self._version_of: dict[int, int] = {}
        self._stashed: dict[int, dict[str, torch.Tensor]] = {}
        self._free: list[dict[str, torch.Tensor]] = []  # copies no micro-batch needs, to reuse

    def begin_forward(
        self, micro_batch: int, version_diff: int, step_rates: Sequence[Sequence[float]] | None = None
    ) -> None:
        self._version_of[micro_batch] = self.version

    def before_step(self) -> None:
        if self.version in self._version_of.values() and self.version not in self._stashed:
            with torch.no_grad():
                if self._free:
                    copies = self._free.pop()
                    torch._foreach_copy_([copies[n] for n in self.params], list(self.params.values()))
                else:
                    copies = {n: p.detach().clone() for n, p in self.params.items()}
            self._stashed[self.version] = copies
            for name, value in copies.items():
                self._track(name, value)

    def after_step(self) -> None:
        self.version += 1

    def backward_weight(self, name: str, micro_batch: int) -> torch.Tensor:
        version = self._version_of[micro_batch]
        if version == self.version:
            return self.params[name].detach()
        return self._stashed[version][name]

    def end_backward(self, micro_batch: int) -> None:
        self._version_of.pop(micro_batch)
        live = set(self._version_of.values())
        for version in [v for v in self._stashed if v not in live]:
            self._free.append(self._stashed.pop(version))
        super().end_backward(micro_batch)


class TwoBW(WeightPolicy):
    """``2bw`` (PipeDream-2BW, Narayanan et al. ICML 2021, double-buffered weight updates).

    The paper's update is ``W(t+1) = W(t) − ν·∇f(W(t−1))``: every micro-batch of mini-batch
    t, at every stage (the last one included), runs its forward and its backward on
    ``W(t−1)``, the weights before the update of mini-batch ``t − 1``; the gradients of the M
    micro-batches are accumulated and applied to the current ``W(t)``. A stage therefore
    keeps two versions: the current weights, and a *shadow* copy taken just before each
    update, which the micro-batches of the next mini-batch use once the update is applied
    (those that ran their forward before it use W itself, and the shadow in their backward).
    The shadow of update t−1 is overwritten at update t, when no micro-batch needs it any
    more, so at most two versions exist at any stage and no allocation follows the first.

    The shadow is part of the optimizer state (:meth:`saved_versions`), so a run resumed from
    a checkpoint goes on with it as an uninterrupted one does (before 2026-12-07 a checkpoint
    held only W, and the first mini-batch after a resume used it).

    Args:
        micro_batches: M, micro-batches per mini-batch (the stage steps after every M-th
            backward).

    Raises:
        ValueError: ``micro_batches`` is not positive.
    """

    kind = "2bw"
    redirect_backward = True
    keeps_forward_weights = True

    def __init__(self, micro_batches: int = 1) -> None:
        super().__init__()
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be positive, got {micro_batches}")
        self.micro_batches = micro_batches
        self._shadow: dict[str, torch.Tensor] = {}
        self._updated: int | None = None  # mini-batch whose update produced W (None: not seen)
        self._updating: int | None = None  # mini-batch of the last backward
        self._updates = 0
        self._used: dict[int, tuple[bool, int]] = {}  # micro-batch: (used the shadow, updates then)
        self._restored = False  # the shadow came with the optimizer state loaded since the last update

    def begin_forward(
        self, micro_batch: int, version_diff: int, step_rates: Sequence[Sequence[float]] | None = None
    ) -> None:
        mini_batch = micro_batch // self.micro_batches
        shadow = self._updated is not None and self._updated >= mini_batch - 1
        self._used[micro_batch] = (shadow, self._updates)
        self._values = self._shadow if shadow else {}

    def begin_backward(self, micro_batch: int) -> None:
        self._updating = micro_batch // self.micro_batches

    def before_step(self) -> None:
        self._take(self.params)

    def _take(self, values: Mapping[str, torch.Tensor]) -> None:
        """The shadow becomes a copy of ``values`` (by graph name), on the weights' devices."""
        with torch.no_grad():
            if not self._shadow:
                self._shadow = {n: values[n].detach().to(p.device, copy=True) for n, p in self.params.items()}
                for name, value in self._shadow.items():
                    self._track(name, value)
            else:
                torch._foreach_copy_([self._shadow[n] for n in self.params], [values[n] for n in self.params])

    def after_step(self) -> None:
        self._updated = self._updating
        self._updates += 1
        self._restored = False

    def reset(self) -> None:
        """The shadow holds weights from before the load: the next mini-batch uses the loaded
        ones, unless the loaded optimizer state holds a shadow (:meth:`restore_versions`; it
        used the stale shadow when loaded into a trained pipeline)."""
        self._updated = None
        self._restored = False

    def weights_loaded(self) -> None:
        """A shadow loaded with the optimizer state since the last update stays (a checkpoint's
        two parts loaded in either order: the weights after it dropped it, helper-180)."""
        if not self._restored:
            self.reset()

    def saved_versions(self) -> dict[str, torch.Tensor]:
        """The shadow ``W(t−1)`` the next mini-batch ``t`` runs on (after a flush, the weights
        before the last update); none before the first update."""
        if self._updated is None:
            return {}
        return {n: v.detach().cpu().clone() for n, v in self._shadow.items()}

    def restore_versions(self, versions: dict[str, torch.Tensor], next_mini_batch: int) -> None:
        if versions and all(n in versions for n in self.params):  # else the loaded W, as before
            self._take(versions)
            self._updated, self._restored = next_mini_batch - 1, True

    def backward_weight(self, name: str, micro_batch: int) -> torch.Tensor:
        shadow, updates = self._used[micro_batch]
        if not shadow and updates == self._updates:
            return self.params[name].detach()
        if updates + (0 if shadow else 1) != self._updates:
            raise RuntimeError(
                f"PipeDream-2BW: micro-batch {micro_batch} saw {self._updates - updates} updates between "
                "its forward and backward; the double buffer holds one (it needs micro_batches >= stages)"
            )
        return self._shadow[name]

    def end_backward(self, micro_batch: int) -> None:
        self._used.pop(micro_batch)
        super().end_backward(micro_batch)

    def overwritten_storages(self) -> set[int]:
        """The shadow buffers (overwritten at the next update)."""
        return {t.untyped_storage().data_ptr() for t in self._shadow.values()}
