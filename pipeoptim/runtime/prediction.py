"""Weight prediction: PipeOptim's ``pipeoptim`` (Ŵ = W − (Σ lr)·ΔW, arXiv:2312.00839) and
SpecTrain's ``spectrain`` (W − s·lr·v); see :mod:`pipeoptim.runtime.policies`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.optim import SGD, Optimizer

from pipeoptim.errors import PredictorError
from pipeoptim.methods import spectrain_steps
from pipeoptim.runtime.extrapolation import Extrapolator, per_unit_rate
from pipeoptim.runtime.predictors import VARIANTS, get_predictor
from pipeoptim.runtime.weight_policy import WeightPolicy


class _Predicting(WeightPolicy):
    graph_name = "predict"
    redirect_backward = True

    def __init__(self, predictor: str = "paper") -> None:
        super().__init__()
        if predictor not in VARIANTS:
            raise ValueError(f"predictor must be one of {', '.join(VARIANTS)}, not {predictor!r}")
        self.variant = predictor
        self._extrapolator: Extrapolator | None = None

    def attach(
        self, params: dict[str, nn.Parameter], optimizer: Optimizer, stage: int, num_stages: int
    ) -> None:
        super().attach(params, optimizer, stage, num_stages)
        self._extrapolator = Extrapolator(
            params, optimizer, per_unit_rate(get_predictor(optimizer, self.variant))
        )

    def predicted(
        self,
        steps: int,
        always_copy: bool = False,
        into: dict[str, torch.Tensor] | None = None,
        step_rates: Sequence[Sequence[float]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{name: Ŵ}`` after ``steps`` more steps, for parameters whose Ŵ differs from W
        (all of them with ``always_copy``: Ŵ is then a copy of W where nothing is predicted).
        ``into`` maps names to tensors that may be overwritten with Ŵ instead of new ones.
        With ``step_rates`` (per optimizer group, the rates of those steps) the prediction is
        ``Ŵ = W − (Σ lr_i)·ΔW``, else ``W − steps·lr·ΔW`` at the current rate. ΔW is computed
        once per optimizer step (:class:`pipeoptim.runtime.extrapolation.Extrapolator`)."""
        assert self.optimizer is not None and self._extrapolator is not None
        if step_rates is not None and any(len(rates) != steps for rates in step_rates):
            raise ValueError(f"step_rates must list the rates of all {steps} steps for every group")
        if step_rates is not None:
            coefficients = [float(sum(rates)) for rates in step_rates]
        else:
            coefficients = [steps * _scalar_lr(g) for g in self.optimizer.param_groups]
        out = self._extrapolator.predict(coefficients, into)
        if always_copy:
            out |= {n: p.detach().clone() for n, p in self.params.items() if n not in out}
        return out

    def begin_backward(self, micro_batch: int) -> None:
        if self._extrapolator is not None:
            self._extrapolator.invalidate()  # the backward brings a new gradient

    def after_step(self) -> None:
        if self._extrapolator is not None:
            self._extrapolator.invalidate()


class PipeOptimPolicy(_Predicting):
    """``pipeoptim`` (Guan et al., arXiv:2312.00839): the forward of a micro-batch uses
    ``Ŵ = W − (Σ lr_i) · ΔW``, the sum running over the learning rates of the ``s`` steps
    between this forward and its backward (``s`` its version difference; the rates are those
    of the earlier mini-batches whose steps come in between, known when the forward starts),
    and ΔW from the optimizer's update rule (:mod:`pipeoptim.runtime.predictors`). With a
    constant rate this is the paper's ``Ŵ = W − lr · s · ΔW``; under a schedule the
    paper's ``s ×`` the current rate misses the weights the backward meets, the sum does not
    (exactly so when ΔW stays constant). The backward and the optimizer step use the current
    weights. Only W and one Ŵ exist at a time (no stash).

    Args:
        backward: ``"current"`` (PipeOptim) or ``"predicted"``: the backward uses the same Ŵ
            as the forward (consistent, but each micro-batch in flight keeps its Ŵ, so memory
            grows like weight stashing) -- for ablations.
        predictor: ``"paper"`` (ΔW from the optimizer's state as it stands, the paper's) or
            ``"next-step"`` (Adam/AdamW, RMSprop, Adagrad: the last gradient is folded into
            the moments first, so that ΔW is the real next step when the gradient repeats;
            :func:`pipeoptim.runtime.predictors.get_predictor`).

    Raises:
        ValueError: unknown ``backward`` or ``predictor``.
    """

    kind = "pipeoptim"

    def __init__(self, backward: str = "current", predictor: str = "paper") -> None:
        super().__init__(predictor)
        if backward not in ("current", "predicted"):
            raise ValueError(f"backward must be 'current' or 'predicted', not {backward!r}")
        self.redirect_backward = backward == "current"
        self._buffers_hat: dict[str, torch.Tensor] = {}

    def begin_forward(
        self, micro_batch: int, version_diff: int, step_rates: Sequence[Sequence[float]] | None = None
    ) -> None:
        # autograd keeps Ŵ when the backward uses it, so it must never be W itself; when the
        # backward uses W instead, nothing holds the last forward's Ŵ and it is overwritten
        consistent = not self.redirect_backward
        if not version_diff:
            self._values = {}
        elif consistent:
            self._values = self.predicted(version_diff, always_copy=True, step_rates=step_rates)
        else:
            self._values = self._buffers_hat = self.predicted(
                version_diff, into=self._buffers_hat, step_rates=step_rates
            )
        for name, value in self._values.items():
            self._track(name, value)
        self._measure()

    def overwritten_storages(self) -> set[int]:
        """The reused Ŵ buffers (backward with the current weights)."""
        return {t.untyped_storage().data_ptr() for t in self._buffers_hat.values()}


def smoothed_gradient(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
    """SpecTrain's smoothed gradient v, its update direction per unit rate (the step is
    ``lr · v``): SGD's momentum buffer b as the optimizer holds it (the direction of its last
    step, ``W ← W − lr·b``), the buffer itself, read until the next step changes it; ``None``
    before the first step. No gradient enters it, so the forward and the backward, which runs
    after the stage has cleared its gradients, predict from the same v."""
    return state.get("momentum_buffer")


def _scalar_lr(group: dict) -> float:
    lr = group["lr"]
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


class SpecTrainPolicy(_Predicting):
    """``spectrain`` (Chen et al., arXiv:1809.02839): ``Ŵ = W − s · lr · v``, predicted
    afresh for the forward and for the backward of each micro-batch.

    The smoothed gradient v follows the paper: the moving average of the gradients that
    momentum SGD steps along (``v_t = γ·v_{t−1} + (1 − γ)·g_t``, ``W_{t+1} = W_t − η·v_t``),
    here ``torch.optim.SGD``'s momentum buffer b as it stands when the prediction is made
    (:func:`smoothed_gradient`), the same in both passes. The authors' reference code
    (``ntueclab/SpecTrain-PyTorch``, ``optimizer.py``, ``load_predicted_weights``) uses
    ``μ·b + g`` with whatever ``.grad`` holds, i.e. the last gradient counted a second time
    in the forward and a zeroed one in the backward; that is not followed.

    The version differences are the reference code's: ``s_f = ⌊k/2⌋ + N − k − 1`` in the
    forward (from the weights then) and ``s_b = ⌊k/2⌋`` in the backward (from the weights at
    backward time), for stage k of N (0-based), in the steady state and the warm-up alike, so
    both passes aim at the version ``⌊k/2⌋`` steps after the backward. ``lr`` is the rate
    current at the prediction.

    Raises:
        PredictorError: on attach, if the optimizer is not SGD with momentum.
    """

    kind = "spectrain"

    def __init__(self) -> None:
        super().__init__()
        self._backward_values: dict[int, dict[str, torch.Tensor]] = {}

    def attach(
        self, params: dict[str, nn.Parameter], optimizer: Optimizer, stage: int, num_stages: int
    ) -> None:
        if not isinstance(optimizer, SGD) or not all(g.get("momentum", 0) for g in optimizer.param_groups):
            raise PredictorError(
                f"SpecTrain predicts from SGD momentum, but the optimizer is {type(optimizer).__name__}"
                f"{' without momentum' if isinstance(optimizer, SGD) else ''}: use "
                "torch.optim.SGD(..., momentum=0.9), or method='pipeoptim' which supports "
                "SGD, Adam, AdamW, RMSprop and Adagrad"
            )
        super().attach(params, optimizer, stage, num_stages)
        self._extrapolator = Extrapolator(params, optimizer, smoothed_gradient)

    @property
    def forward_steps(self) -> int:
        return spectrain_steps(self.stage, self.num_stages)[0]

    @property
    def backward_steps(self) -> int:
        return spectrain_steps(self.stage, self.num_stages)[1]

    def begin_forward(
        self, micro_batch: int, version_diff: int, step_rates: Sequence[Sequence[float]] | None = None
    ) -> None:
        # new tensors, not reused buffers: a Ŵ sent on (a tied weight) stays with the
        # micro-batch, and only the pass that uses a Ŵ keeps it alive (two versions at most)
        self._values = self.predicted(self.forward_steps)
        for name, value in self._values.items():
            self._track(name, value)
        self._measure()

    def begin_backward(self, micro_batch: int) -> None:
        super().begin_backward(micro_batch)
        self._backward_values[micro_batch] = self.predicted(self.backward_steps)

    def end_backward(self, micro_batch: int) -> None:
        self._backward_values.pop(micro_batch, None)
        super().end_backward(micro_batch)

    def backward_weight(self, name: str, micro_batch: int) -> torch.Tensor:
        value = self._backward_values.get(micro_batch, {}).get(name)
        return value if value is not None else self.params[name].detach()
