"""Weight prediction: PipeOptim's ``pipeoptim`` (Ŵ = W − (Σ lr)·ΔW, arXiv:2312.00839) and
SpecTrain's ``spectrain`` (W − s·lr·v); see :mod:`pipeoptim.runtime.policies`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim import SGD, Optimizer

from pipeoptim.errors import PredictorError
from pipeoptim.methods import spectrain_steps
from pipeoptim.runtime.extrapolation import Extrapolator, Terms, per_unit_rate
from pipeoptim.runtime.fused_step import step_predicting, steps_each
from pipeoptim.runtime.optim import check_steppable
from pipeoptim.runtime.predictors import VARIANTS, borrowed_rule, get_predictor
from pipeoptim.runtime.weight_policy import WeightPolicy

#: PipeOptim's ``backward`` option: the weights its backward uses
BACKWARDS = ("current", "predicted")

#: the hyperparameters of an optimizer group that SGD's ΔW reads, besides the rate
_DIRECTION_KEYS = ("momentum", "dampening", "weight_decay", "nesterov", "maximize")

#: what a Ŵ was predicted with: c per group, and those hyperparameters per group
_Key = tuple[tuple[float, ...], tuple[tuple[object, ...], ...]]


def check_pipeoptim_options(
    method: str, policy: str | None, predictor: str, backward: str, optimizer: Optimizer, warn: bool = True
) -> None:
    """Refuse an optimizer no method can step as asked
    (:func:`pipeoptim.runtime.optim.check_steppable`, first: it is then the cause), a
    ``predictor`` or ``backward`` (:class:`PipeOptimPolicy`) that is unknown, or other than its
    default for a method whose weight policy is not PipeOptim's (it would be ignored), a
    predictor the optimizer has none for, or SpecTrain without SGD momentum (its prediction is
    the momentum's, Chen et al. 2018). Where ``warn`` (not in the layout search, whose
    ``compile`` checks again), warns where the optimizer's class writes its own ``step()`` but
    is predicted with a base class's rule (:func:`borrowed_rule`).

    Raises:
        ValueError: an unknown value, or one given to another method; an optimizer whose step
            needs a closure.
        PipelineError: an optimizer with step hooks
            (:func:`~pipeoptim.runtime.optim.check_steppable`).
        PredictorError: no predictor for the optimizer (:func:`get_predictor`); SpecTrain with
            another optimizer than SGD with momentum > 0.
    """
    for name, value, default, allowed in (
        ("predictor", predictor, "paper", VARIANTS),
        ("backward", backward, "current", BACKWARDS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if value != default and policy != "pipeoptim":
            raise ValueError(f"{name}={value!r} applies to method 'pipeoptim' only, not {method!r}")
    check_steppable(optimizer)
    if policy == "pipeoptim":
        get_predictor(optimizer, predictor)
    if policy == "spectrain" and not (
        isinstance(optimizer, SGD) and all(g.get("momentum", 0) for g in optimizer.param_groups)
    ):
        raise PredictorError(
            f"SpecTrain needs torch.optim.SGD with momentum > 0, got {type(optimizer).__name__}: use "
            "SGD(..., momentum=0.9) (--optimizer sgd) or method='pipeoptim' (--method pipeoptim)"
        )
    owner = borrowed_rule(type(optimizer), predictor) if policy in ("pipeoptim", "spectrain") else None
    if owner is not None and warn:
        name = type(optimizer).__name__
        warnings.warn(
            f"{name} writes its own step(), but {method} predicts its weights with {owner.__name__}'s "
            f"update rule: if {name}'s update differs, register its own with "
            f"pipeoptim.register_predictor({name}, fn)",
            stacklevel=3,
        )


class _Predicting(WeightPolicy):
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
        assert self._extrapolator is not None
        out = self._extrapolator.predict(self._coefficients(steps, step_rates), into)
        if always_copy:
            out |= {n: p.detach().clone() for n, p in self.params.items() if n not in out}
        return out

    def _versions(self, grads: bool) -> tuple:
        """The version of every weight (an in-place change bumps it) and, with ``grads``,
        each gradient's identity and version: a Ŵ predicted in the step is taken only while
        these are unchanged (a flush applies the shared weights' pending rounds after it,
        :meth:`pipeoptim.runtime.shared.SharedParams.drain`; the optimizer state changes only
        with the weights)."""
        if grads:
            return tuple(
                (p._version, id(p.grad), p.grad is not None and p.grad._version) for p in self.params.values()
            )
        return tuple(p._version for p in self.params.values())

    def _coefficients(self, steps: int, step_rates: Sequence[Sequence[float]] | None) -> list[float]:
        """c per optimizer group: ``Σ lr_i`` over ``step_rates``, else ``steps`` x the current rate."""
        assert self.optimizer is not None
        if step_rates is not None and any(len(rates) != steps for rates in step_rates):
            raise ValueError(f"step_rates must list the rates of all {steps} steps for every group")
        if step_rates is not None:
            return [float(sum(rates)) for rates in step_rates]
        return [steps * _scalar_lr(g) for g in self.optimizer.param_groups]

    def begin_backward(self, micro_batch: int) -> None:
        if self._extrapolator is not None:
            self._extrapolator.invalidate()  # the backward brings a new gradient

    def after_step(self) -> None:
        if self._extrapolator is not None:
            self._extrapolator.invalidate()

    def reset(self) -> None:
        if self._extrapolator is not None:
            self._extrapolator.invalidate()  # it reads the optimizer state that was replaced


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
        if backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {', '.join(BACKWARDS)}, not {backward!r}")
        self.consistent = backward == "predicted"
        self.keeps_forward_weights = self.consistent
        self._buffers_hat: dict[str, torch.Tensor] = {}
        self._kept: dict[int, dict[str, torch.Tensor]] = {}  # consistent: Ŵ of each micro-batch
        self._last_key: _Key | None = None  # what the last forward's Ŵ was predicted with
        self._ahead: tuple[_Key, tuple, dict[str, torch.Tensor]] | None = None  # Ŵ predicted in the step

    def begin_forward(
        self, micro_batch: int, version_diff: int, step_rates: Sequence[Sequence[float]] | None = None
    ) -> None:
        # the backward of a consistent run uses this Ŵ, so it must never be W itself (nor a
        # buffer the next forward overwrites); with the current weights in the backward,
        # nothing needs the last forward's Ŵ and it is overwritten
        if not version_diff:
            self._values = {}
        elif self.consistent:
            self._values = self._kept[micro_batch] = self.predicted(
                version_diff, always_copy=True, step_rates=step_rates
            )
        else:
            key = self._key(self._coefficients(version_diff, step_rates))
            ahead, self._ahead, self._last_key = self._ahead, None, key
            if ahead is not None and ahead[:2] == (key, self._versions(grads=True)):  # from the step
                self._values = self._buffers_hat = ahead[2]
            else:
                self._values = self._buffers_hat = self.predicted(
                    version_diff, into=self._buffers_hat, step_rates=step_rates
                )
        for name, value in self._values.items():
            self._track(name, value)

    def _key(self, coefficients: Sequence[float]) -> _Key:
        """c per group and the hyperparameters SGD's ΔW reads (:func:`sgd_direction`)."""
        assert self.optimizer is not None
        return tuple(coefficients), tuple(
            tuple(g.get(k) for k in _DIRECTION_KEYS) for g in self.optimizer.param_groups
        )

    def optimizer_step(self) -> None:
        """``torch.optim.SGD``'s step with the next forward's Ŵ predicted parameter by
        parameter as each is updated (:mod:`pipeoptim.runtime.fused_step`), for the c the last
        forward used; the forward takes it if its own c and hyperparameters are the same, and
        predicts afresh otherwise (a learning-rate schedule, another version difference).
        Other optimizers and settings step with ``optimizer.step()``."""
        assert self.optimizer is not None and self._extrapolator is not None
        if self.consistent or self._last_key is None or not steps_each(self.optimizer):
            self._extrapolator.pieces.clear()  # nothing of a replaced tensor kept meanwhile
            return super().optimizer_step()
        coefficients = self._last_key[0]
        hats = step_predicting(self.optimizer, self._extrapolator, coefficients, self._buffers_hat)
        self._ahead = (self._key(coefficients), self._versions(grads=True), hats)

    def backward_weight(self, name: str, micro_batch: int) -> torch.Tensor:
        kept = self._kept.get(micro_batch)
        return kept[name] if kept is not None else self.params[name].detach()

    def begin_backward(self, micro_batch: int) -> None:
        super().begin_backward(micro_batch)
        self._ahead = None  # the backward brings a new gradient

    def end_backward(self, micro_batch: int) -> None:
        self._kept.pop(micro_batch, None)
        super().end_backward(micro_batch)

    def reset(self) -> None:
        super().reset()
        self._ahead = self._last_key = None

    def overwritten_storages(self) -> set[int]:
        """The reused Ŵ buffers (backward with the current weights)."""
        return {t.untyped_storage().data_ptr() for t in self._buffers_hat.values()}


def smoothed_gradient(param: torch.Tensor, state: dict, group: dict) -> Terms | None:
    """SpecTrain's smoothed gradient v, its update direction per unit rate (the step is
    ``lr · v``): SGD's momentum buffer b as the optimizer holds it (the direction of its last
    step, ``W ← W − lr·b``), the buffer itself, read until the next step changes it; ``None``
    before the first step. No gradient enters it, so the forward and the backward, which runs
    after the stage has cleared its gradients, predict from the same v."""
    buf = state.get("momentum_buffer")
    return None if buf is None else [(1.0, buf)]


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
        self._buffers: dict[str, torch.Tensor] = {}  # Ŵ buffers, reused by every pass
        self._hat: dict[str, torch.Tensor] = {}  # Ŵ of the pass running now (some of them)
        self._hat_of: tuple | None = None  # (step count, c per group, weight versions)
        self._steps_taken = 0
        self._backward_of: int | None = None

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
        # the forward and the backward predict into the same buffers: a pass's Ŵ is used
        # only while it runs (the backward is redirected to its own Ŵ, a Ŵ sent on as a tied
        # weight is sent as a snapshot), so W and one Ŵ exist at a time, with no allocation
        self._values = self._predict(self.forward_steps)
        for name, value in self._values.items():
            self._track(name, value)

    def begin_backward(self, micro_batch: int) -> None:
        super().begin_backward(micro_batch)
        self._predict(self.backward_steps)
        self._backward_of = micro_batch

    def _predict(self, steps: int) -> dict[str, torch.Tensor]:
        """Ŵ for ``steps``, into the buffers; the Ŵ already there when no step has come since
        and the coefficients are the same (the last stage's backward, right after its forward
        with ``s_b = s_f``: W and v have not changed, so neither has Ŵ). Weights and optimizer
        state are loaded only after a flush, which ends with a step at every stage."""
        assert self.optimizer is not None
        of = (self._steps_taken, tuple(self._coefficients(steps, None)), self._versions(grads=False))
        if of != self._hat_of:
            self._hat = self.predicted(steps, into=self._buffers)
            self._buffers.update(self._hat)
            self._hat_of = of
        return self._hat

    def optimizer_step(self) -> None:
        """``torch.optim.SGD``'s step with the next forward's Ŵ (``s_f`` x the current rate)
        predicted parameter by parameter as each is updated, as PipeOptim's
        (:meth:`PipeOptimPolicy.optimizer_step`); the forward takes it if its c is the same."""
        assert self.optimizer is not None and self._extrapolator is not None
        if not self.forward_steps or not steps_each(self.optimizer):
            self._extrapolator.pieces.clear()  # nothing of a replaced tensor kept meanwhile
            return super().optimizer_step()
        coefficients = tuple(self._coefficients(self.forward_steps, None))
        self._hat = step_predicting(self.optimizer, self._extrapolator, coefficients, self._buffers)
        self._buffers.update(self._hat)
        # the forward's key once after_step has counted this step
        self._hat_of = (self._steps_taken + 1, coefficients, self._versions(grads=False))

    def after_step(self) -> None:
        super().after_step()
        self._steps_taken += 1

    def reset(self) -> None:
        super().reset()
        self._hat_of = None  # Ŵ came from the weights before the load

    def end_backward(self, micro_batch: int) -> None:
        self._backward_of = None
        super().end_backward(micro_batch)

    def backward_weight(self, name: str, micro_batch: int) -> torch.Tensor:
        value = self._hat.get(name) if micro_batch == self._backward_of else None
        return value if value is not None else self.params[name].detach()

    def overwritten_storages(self) -> set[int]:
        """The reused Ŵ buffers (overwritten by the next pass)."""
        return {t.untyped_storage().data_ptr() for t in self._buffers.values()}
