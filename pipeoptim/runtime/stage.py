"""One pipeline stage at run time: forward, backward and optimizer step of its submodule.

A :class:`StageRuntime` keeps, for every micro-batch between its forward and its backward,
the inputs it received (as leaves that collect their gradients) and the outputs it sent.
The same class runs in the deterministic local executor and in each distributed worker, so
both compute the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.optim import Optimizer

from pipeoptim.errors import NonFiniteLossError
from pipeoptim.loss_check import CheckedLoss, check_scalar_loss
from pipeoptim.runtime.async_norms import AsyncNorms
from pipeoptim.runtime.clipping import clip_coefficient, scale_grads_, squared_grad_norm
from pipeoptim.runtime.held_bytes import saved_bytes
from pipeoptim.runtime.leaves import flatten
from pipeoptim.runtime.nan_check import any_nan, nan_cause
from pipeoptim.runtime.optim import apply_hyperparameters
from pipeoptim.runtime.randomness import Draws, draws_random_numbers, seeded
from pipeoptim.runtime.scaler import LossScaler
from pipeoptim.runtime.shared import SharedParams
from pipeoptim.runtime.staleness import PredictionErrorMeter, backward_weights, used_weights
from pipeoptim.runtime.weight_policy import WeightPolicy
from pipeoptim.storage import storage_address

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class _InFlight:
    inputs: list[Any]
    outputs: list[Any]


class StageRuntime:
    """Stage ``index`` of ``num_stages``.

    Args:
        index: k, 0-based.
        num_stages: N.
        module: the stage's graph module (weight policy already inserted).
        optimizer: its mirrored optimizer (``None`` without trainable parameters).
        group_map: user group index of each optimizer group.
        policy: the weight policy (``None`` for flushing schedules).
        input_grad_mask: per flat input leaf, whether a gradient flows back to it.
        loss_fn: ``loss_fn(model_output, targets) -> scalar`` (last stage only).
        unflatten_output: rebuilds the model's output structure (last stage only).
        seed: base seed; each forward reseeds the RNG from (seed, stage, micro-batch) so that
            dropout draws the same masks in every executor.
        nan_check: ``"stages"`` (each stage checks its outputs for NaN, so an error names
            the stage where it appeared), ``"loss"`` (only the loss), or ``"off"``.
        max_grad_norm: clip the gradients by the global norm over all stages before each
            step (:mod:`pipeoptim.runtime.clipping`); ``None``: no clipping.
        scaler: float16 loss scaling over all stages (:mod:`pipeoptim.runtime.scaler`).
        prediction_error_every: sample one micro-batch in this many for the prediction error
            (:mod:`pipeoptim.runtime.staleness`); 0: none.
    """

    def __init__(
        self,
        index: int,
        num_stages: int,
        module: fx.GraphModule,
        optimizer: Optimizer | None,
        group_map: Sequence[int],
        policy: WeightPolicy | None,
        input_grad_mask: Sequence[bool],
        loss_fn: LossFn | None = None,
        unflatten_output: Callable[[Sequence[Any]], Any] | None = None,
        seed: int = 0,
        nan_check: str = "stages",
        max_grad_norm: float | None = None,
        scaler: LossScaler | None = None,
        prediction_error_every: int = 64,
    ) -> None:
        if nan_check not in ("stages", "loss", "off"):
            raise ValueError(f"nan_check must be 'stages', 'loss' or 'off', not {nan_check!r}")
        self.nan_check = nan_check
        self.max_grad_norm = max_grad_norm
        self.scaler = scaler
        self.measure_memory = False
        self.peak_activation_bytes = 0
        self._activation_bytes: dict[int, int] = {}
        self.index = index
        self.num_stages = num_stages
        self.module = module
        self.optimizer = optimizer
        self.group_map = list(group_map)
        self.policy = policy
        self.input_grad_mask = list(input_grad_mask)
        self.loss_fn = loss_fn
        self.unflatten_output = unflatten_output
        self.seed = seed
        self.steps = 0
        self.prediction_error = PredictionErrorMeter(prediction_error_every)
        #: sums the gradients over the stage's data-parallel replicas before each step, and
        #: before the shared parameters' sum over holders (:func:`pipeoptim.runtime.executor.
        #: run_action`; :mod:`pipeoptim.runtime.replicas`); ``None`` with one replica
        self.reduce_gradients: Callable[[Sequence[torch.Tensor]], None] | None = None
        self._in_flight: dict[int, _InFlight] = {}
        self._module_storages: set[int] | None = None
        self._grads_stale = False
        self._hyper: dict[int, list[dict]] = {}
        self._newest_forward: int | None = None  # the newest micro-batch forwarded with its own
        #: the last stage's loss where mini-batches are split: it checks their reduction
        #: (:func:`pipeoptim.runtime.executor.run_action` runs the checks)
        self.loss_check: CheckedLoss | None = None
        #: copies of shared parameters this stage holds (set by the builder)
        self.shared: SharedParams | None = None
        #: asynchronous clipping and loss scaling (:mod:`pipeoptim.runtime.async_norms`)
        self.async_norms: AsyncNorms | None = None
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        self._rng_devices = [device] if device.type == "cuda" else []
        #: what a forward may draw from: nothing, and it is neither seeded nor forked
        self._draws = draws_random_numbers(module)

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def in_flight(self) -> int:
        """Micro-batches forwarded but not yet backwarded."""
        return len(self._in_flight)

    def discard_in_flight(self) -> None:
        """Drop the forwards whose backward will not run (a closed or failed pipeline)."""
        self._in_flight.clear()
        self._activation_bytes.clear()
        if self.loss_check is not None:
            self.loss_check.pending.clear()

    def set_hyperparameters(self, micro_batch: int, hyper: list[dict]) -> None:
        """Remember the user's hyperparameters for ``micro_batch`` (applied at its step)."""
        self._hyper[micro_batch] = hyper

    def forward(
        self,
        micro_batch: int,
        inputs: Sequence[Any],
        targets: Any = None,
        version_diff: int = 0,
        loss_scale: float = 1.0,
        mini_batch: int | None = None,
    ) -> Any:
        """Forward of one micro-batch.

        Args:
            inputs: the values received (stage 0: the model inputs).
            targets: the targets (last stage).
            version_diff: optimizer steps before this micro-batch's backward.
            loss_scale: factor on the loss for the backward (micro-batch share of the batch).
            mini_batch: index reported if the loss is not finite.

        Returns:
            The values to send to the next stage (detached), or on the last stage the loss
            (unscaled, detached scalar).

        Raises:
            NonFiniteLossError: the loss is NaN or infinite.
            PipelineError: ``loss_fn`` does not return a real floating-point scalar tensor
                (:func:`pipeoptim.loss_check.check_scalar_loss`).
        """
        leaves, rebuild = flatten(tuple(inputs))
        mask = self.input_grad_mask or [False] * len(leaves)
        leaf_inputs = [
            v.detach().requires_grad_(True)
            if need and isinstance(v, torch.Tensor) and v.is_floating_point()
            else v
            for v, need in zip(leaves, mask)
        ]
        args = rebuild(leaf_inputs)
        if self.policy is not None:
            self._apply_latest_hyper(micro_batch)
            self.policy.begin_forward(micro_batch, version_diff, self._step_rates(micro_batch, version_diff))
        if self.prediction_error.sampled(micro_batch):  # most forwards skip the weight lookup
            trainable = self.trainable()
            kept = self.policy is not None and self.policy.keeps_forward_weights
            self.prediction_error.forward(
                micro_batch, used_weights(self.policy, trainable), trainable, version_diff, kept
            )
        try:
            seed = self.seed * 1_000_003 + micro_batch * 7919 + self.index
            with seeded(seed if self._draws else None, self._rng_devices, self._draws is Draws.ANY):
                if self.policy is not None:
                    with self.policy.saving(micro_batch, version_diff):
                        out = self.policy.pin_parameters(self.module(*args))
                else:
                    out = self.module(*args)
        finally:
            if self.policy is not None:
                self.policy.end_forward(micro_batch)
        step = micro_batch if mini_batch is None else mini_batch
        if not self.is_last:
            leaves, rebuild = flatten(out)
            weights = self._weight_storages()
            if any(isinstance(v, torch.Tensor) and storage_address(v) in weights for v in leaves):
                # a weight sent on (a tied weight a later stage uses too) is sent as a snapshot of
                # the version this forward used: the optimizer (or the next prediction) changes the
                # weight in place, possibly before the send or the next stage's forward has read it
                leaves = [
                    v.clone() if isinstance(v, torch.Tensor) and storage_address(v) in weights else v
                    for v in leaves
                ]
            if self.nan_check == "stages" and any_nan(leaves):
                cause = nan_cause(leaf_inputs if self.index == 0 else None)
                raise NonFiniteLossError(
                    f"NaN in the activations stage {self.index} computed for mini-batch {step} "
                    f"({cause}): lower the learning rate, check the data, or pass "
                    "nan_check='off' (--nan-check off) to train on",
                    step=step,
                    stage=self.index,
                )
            self._in_flight[micro_batch] = _InFlight(leaf_inputs, leaves)
            self._measure_activations(micro_batch, leaves)
            # the leaves are in hand: detach them rather than walk ``out`` once more
            return rebuild([v.detach() if isinstance(v, torch.Tensor) else v for v in leaves])
        assert self.loss_fn is not None and self.unflatten_output is not None
        loss = self.loss_fn(self.unflatten_output(out), targets)
        check_scalar_loss(loss)
        if self.nan_check != "off" and not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at mini-batch {step} (computed by stage {self.index}, the last): "
                "lower the learning rate, check the data, or pass nan_check='off' "
                "(--nan-check off) to train on",
                step=step,
                stage=self.index,
            )
        scaled = loss.reshape(()) * loss_scale
        if self.scaler is not None:
            scaled = scaled * self.scaler.scale
        self._in_flight[micro_batch] = _InFlight(leaf_inputs, [scaled])
        self._measure_activations(micro_batch, self._in_flight[micro_batch].outputs)
        return loss.detach().reshape(())

    def _weight_storages(self) -> set[int]:
        """Storage addresses of tensors changed in place between forwards: the parameters and
        buffers, and the policy's reused copies (PipeOptim's Ŵ buffers)."""
        if self._module_storages is None:
            self._module_storages = {
                storage_address(t) for t in (*self.module.parameters(), *self.module.buffers())
            } - {0}  # 0: meta, or sparse (pipeoptim.storage)
        if self.policy is None:
            return self._module_storages
        return self._module_storages | self.policy.overwritten_storages()

    def _measure_activations(self, micro_batch: int, outputs: Sequence[Any]) -> None:
        """With :attr:`measure_memory`: bytes autograd keeps for this micro-batch, and the peak
        over the micro-batches in flight (weights and their copies excluded)."""
        if not self.measure_memory:
            return
        exclude = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
        if self.policy is not None:
            exclude |= self.policy.copy_storages()
        self._activation_bytes[micro_batch] = saved_bytes(outputs, exclude)
        self.peak_activation_bytes = max(self.peak_activation_bytes, sum(self._activation_bytes.values()))

    def memory_report(self) -> dict[str, int]:
        """Measured peak bytes of this stage: weights (all versions), optimizer state, activations."""
        params = sum(p.numel() * p.element_size() for p in self.module.parameters() if p.requires_grad)
        state = 0
        if self.optimizer is not None:
            for s in self.optimizer.state.values():
                state += sum(
                    v.numel() * v.element_size()
                    for v in s.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0
                )
        versions = self.policy.peak_versions if self.policy is not None else 1
        return {
            "param_bytes": params,
            "weight_versions": versions,
            "weight_bytes": versions * params,
            "optimizer_state_bytes": state,
            "activation_bytes": self.peak_activation_bytes,
        }

    def backward(self, micro_batch: int, grads: Sequence[torch.Tensor | None] | None = None) -> list[Any]:
        """Backward of one micro-batch.

        Args:
            grads: gradient of each flat output leaf (``None`` where none flows); ignored on
                the last stage, which starts from its loss.

        Returns:
            The gradient of each flat input leaf; ``None`` where none flows back, also where
            one could but this micro-batch's outputs did not depend on the input (a branch not
            taken): as in plain PyTorch, the parameters that produced it then get no gradient
            (``grad is None``) and the optimizer skips them, where a zero gradient would still
            move them under momentum, Adam or weight decay.
        """
        state = self._in_flight.pop(micro_batch)
        self._activation_bytes.pop(micro_batch, None)
        if self.prediction_error.sampled(micro_batch):
            trainable, policy = self.trainable(), self.policy
            used = None if policy is None else lambda: backward_weights(policy, trainable, micro_batch)
            self.prediction_error.backward(micro_batch, trainable, used)
        if self._grads_stale and self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self._grads_stale = False
        if self.is_last:
            tensors, grad_tensors = state.outputs, [None]
        else:
            assert grads is not None
            pairs = [
                (o, g)
                for o, g in zip(state.outputs, grads)
                if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
            ]
            tensors = [o for o, _ in pairs]
            grad_tensors = [g for _, g in pairs]
        if self.policy is not None:
            self.policy.begin_backward(micro_batch)
        if tensors:
            torch.autograd.backward(tensors, grad_tensors)
        if self.policy is not None:
            self.policy.end_backward(micro_batch)
        result = []
        mask = self.input_grad_mask or [False] * len(state.inputs)
        for v, need in zip(state.inputs, mask):
            if not need or not isinstance(v, torch.Tensor):
                result.append(None)
            else:
                result.append(v.grad)
        return result

    @property
    def steps_together(self) -> bool:
        """Whether all stages step together, after an all-reduce (synchronous clipping, scaling)."""
        return (self.max_grad_norm is not None or self.scaler is not None) and self.async_norms is None

    def trainable(self) -> list[torch.Tensor]:
        """The parameters this stage's optimizer steps."""
        if self.optimizer is None:
            return []
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def squared_grad_norm(self) -> float:
        """Σ ‖grad‖² over this stage's parameters (its share of the global norm; a shared
        parameter counts at its first holder only)."""
        outside = self.shared.outside_norm() if self.shared is not None else set()
        return squared_grad_norm(p for p in self.trainable() if id(p) not in outside)

    def clip_gradients(self, total_squared: float) -> None:
        """Scale this stage's gradients by ``min(1, max_grad_norm / (‖g‖ + 1e-6))``, ``‖g‖²``
        being ``total_squared``, the sum of every stage's :meth:`squared_grad_norm`."""
        assert self.max_grad_norm is not None
        scale_grads_(self.trainable(), clip_coefficient(total_squared, self.max_grad_norm))

    def step(self, micro_batch: int | None = None, skip: bool = False) -> None:
        """Optimizer step with the hyperparameters recorded for ``micro_batch`` (``skip``:
        none, as a loss scaler does after an inf; the gradients are cleared all the same). The
        replicas' gradients are summed before (:func:`pipeoptim.runtime.executor.run_action`)."""
        if micro_batch is not None:
            hyper = self._hyper.pop(micro_batch, None)
            for key in [k for k in self._hyper if k < micro_batch]:
                del self._hyper[key]
            if hyper is not None and self.optimizer is not None:
                apply_hyperparameters(self.optimizer, self.group_map, hyper)
        if self.policy is not None:
            self.policy.before_step()
        if self.optimizer is not None and not skip:
            step = self.optimizer.step if self.policy is None else self.policy.optimizer_step
            step()
        self.steps += 1
        self._grads_stale = True
        if self.policy is not None:
            self.policy.after_step()
            newest = self._newest_forward
            if micro_batch is not None and newest is not None and newest > micro_batch:
                # the rate current at a prediction is the newest mini-batch's, not the one
                # stepped: SpecTrain's backward predicts in the cool-down with no forward after
                self._apply_latest_hyper(newest)

    def _step_rates(self, micro_batch: int, steps: int) -> list[list[float]] | None:
        """Per optimizer group, the learning rates of the ``steps`` steps between the forward
        of ``micro_batch`` and its backward: in asynchronous 1F1B with a step after every
        backward, those of micro-batches ``micro_batch − steps .. micro_batch − 1``, known
        before this forward. ``None`` where they were not recorded."""
        hypers = [self._hyper.get(m) for m in range(micro_batch - steps, micro_batch)]
        if not steps or self.optimizer is None or any(h is None for h in hypers):
            return None
        return [[h[index]["lr"] for h in hypers if h is not None] for index in self.group_map]

    def _apply_latest_hyper(self, micro_batch: int) -> None:
        """Predictions read the newest known hyperparameters (those of ``micro_batch``)."""
        hyper = self._hyper.get(micro_batch)
        if hyper is not None and self.optimizer is not None:
            apply_hyperparameters(self.optimizer, self.group_map, hyper)
            self._newest_forward = micro_batch
