"""Weight policies: which weights a stage's forward and backward use under asynchronous 1F1B.

In asynchronous 1F1B a stage steps its optimizer between a micro-batch's forward and its
backward. A policy decides what the forward computes with and what the backward sees:

==============  =======================================  ====================================
policy          forward uses                             backward uses
==============  =======================================  ====================================
``none``        current weights W                        W as it is at backward time
``stash``       W (PipeDream)                            the version the forward used
``2bw``         W(t−1) for all of mini-batch t           the version the forward used
``spectrain``   W − s_f·lr·v (SpecTrain, v = momentum)   W − s_b·lr·v at backward time
``pipeoptim``   Ŵ = W − (Σ lr_i)·ΔW (PipeOptim)          W at backward time (no stash)
==============  =======================================  ====================================

Policies that insert weights are placed in the stage's fx graph as one call per parameter,
visible in its ``.code``: ``fc_weight_hat = self.predict(fc_weight, 'fc.weight')``. The call
returns the chosen tensor with the gradient routed straight to the parameter.

The optimizer changes parameters in place between a forward and its backward, which would
trip autograd's saved-tensor version check. So the forward saves no weight:
``torch.autograd.graph.saved_tensors_hooks`` store a reference instead (a weight is found by
its storage, since ops often save a view such as ``w.t()``) and the backward rebuilds the view
from the weight the policy names (the current W, a stashed version, or a new prediction).
Only ``pipeoptim`` with ``backward="predicted"`` lets autograd keep its Ŵ.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.optim import SGD, Optimizer

from pipeoptim.errors import PredictorError
from pipeoptim.runtime.extrapolation import Extrapolator, per_unit_rate
from pipeoptim.runtime.predictors import VARIANTS, get_predictor


class _UseWeight(torch.autograd.Function):
    """Forward with ``value``; send the whole gradient to ``weight`` (a straight-through)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


@dataclass(frozen=True)
class _SavedWeight:
    """What autograd keeps instead of a weight: its name and the view's geometry."""

    name: str
    micro_batch: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class WeightPolicy(nn.Module):
    """Base class; see the module docstring. Subclasses set :attr:`kind` and override hooks.

    Attributes:
        kind: policy name.
        graph_name: name of the call in the stage graph (``None``: no call is inserted).
        redirect_backward: whether saved weights are replaced at backward time.
        peak_versions: most weight versions of one parameter alive at once so far, the
            parameter itself included (measured with weak references).
    """

    kind = "base"
    graph_name: str | None = None
    redirect_backward = False

    def __init__(self) -> None:
        super().__init__()
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

    def forward(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        value = self._values.get(name)
        if value is None:
            return weight
        return _UseWeight.apply(weight, value)

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
        self._measure()

    def begin_backward(self, micro_batch: int) -> None:
        """Prepare what the backward of ``micro_batch`` sees (redirecting policies)."""

    def end_backward(self, micro_batch: int) -> None:
        self._measure()

    def before_step(self) -> None:
        """Called before each optimizer step."""

    def after_step(self) -> None:
        """Called after each optimizer step."""

    def backward_weight(self, name: str, micro_batch: int) -> torch.Tensor:
        """The weight the backward uses in place of a saved one (default: the current W)."""
        return self.params[name].detach()

    @contextlib.contextmanager
    def saving(self, micro_batch: int) -> Iterator[None]:
        """Context for the forward: store references to weights instead of the weights."""
        if not self.redirect_backward:
            yield
            return
        storages: dict[int, tuple[str, int]] = {}
        for name, p in self.params.items():
            storages[p.untyped_storage().data_ptr()] = (name, p.storage_offset())
        for name, v in self._values.items():
            storages[v.untyped_storage().data_ptr()] = (name, v.storage_offset())

        def pack(t: torch.Tensor) -> torch.Tensor | _SavedWeight:
            found = storages.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
            if found is None:
                return t
            name, base = found
            return _SavedWeight(name, micro_batch, t.size(), t.stride(), t.storage_offset() - base)

        def unpack(x: torch.Tensor | _SavedWeight) -> torch.Tensor:
            if not isinstance(x, _SavedWeight):
                return x
            w = self.backward_weight(x.name, x.micro_batch)
            return w.as_strided(x.size, x.stride, w.storage_offset() + x.offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

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
        refs = [r for r in self._copies.get(name, []) if r() is not None and r() is not value]
        refs.append(weakref.ref(value))
        self._copies[name] = refs

    def _measure(self) -> None:
        alive = 0
        for refs in self._copies.values():
            refs[:] = [r for r in refs if r() is not None]
            alive = max(alive, len(refs))
        self.peak_versions = max(self.peak_versions, 1 + alive)


class NoCorrection(WeightPolicy):
    """``none``: forward with the current weights, backward with the weights at that time."""

    kind = "none"
    redirect_backward = True


class Stash(WeightPolicy):
    """``stash`` (weight stashing, PipeDream, Narayanan et al. SOSP 2019).

    The backward of a micro-batch uses the weight version its forward used. Versions are
    copied lazily: the forward uses W itself, and only when the optimizer is about to step
    while a micro-batch forwarded on the current version is still in flight is W copied
    (copy-on-step). Stage k of N (0-based) thus keeps ``N - k`` versions: W and up to
    ``N - k - 1`` copies.
    """

    kind = "stash"
    redirect_backward = True

    def __init__(self) -> None:
        super().__init__()
        self.version = 0
        self._version_of: dict[int, int] = {}
        self._stashed: dict[int, dict[str, torch.Tensor]] = {}

    def begin_forward(
        self, micro_batch: int, version_diff: int, step_rates: Sequence[Sequence[float]] | None = None
    ) -> None:
        self._version_of[micro_batch] = self.version

    def before_step(self) -> None:
        if self.version in self._version_of.values() and self.version not in self._stashed:
            with torch.no_grad():
                copies = {n: p.detach().clone() for n, p in self.params.items()}
            self._stashed[self.version] = copies
            for name, value in copies.items():
                self._track(name, value)
            self._measure()

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
            del self._stashed[version]
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

    Deviation: after a resume from a checkpoint (which holds only the current weights) the
    first mini-batch uses the current weights.

    Args:
        micro_batches: M, micro-batches per mini-batch (the stage steps after every M-th
            backward).

    Raises:
        ValueError: ``micro_batches`` is not positive.
    """

    kind = "2bw"
    graph_name = "double_buffer"
    redirect_backward = True

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
        with torch.no_grad():
            if not self._shadow:
                self._shadow = {n: p.detach().clone() for n, p in self.params.items()}
                for name, value in self._shadow.items():
                    self._track(name, value)
            else:
                torch._foreach_copy_([self._shadow[n] for n in self.params], list(self.params.values()))
        self._measure()

    def after_step(self) -> None:
        self._updated = self._updating
        self._updates += 1

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
        return self.stage // 2 + self.num_stages - self.stage - 1

    @property
    def backward_steps(self) -> int:
        return self.stage // 2

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


POLICIES: dict[str, type[WeightPolicy]] = {
    "none": NoCorrection,
    "stash": Stash,
    "2bw": TwoBW,
    "spectrain": SpecTrainPolicy,
    "pipeoptim": PipeOptimPolicy,
}


def make_policy(name: str, **options: object) -> WeightPolicy:
    """Build the policy ``name`` (``none``, ``stash``, ``2bw``, ``spectrain``, ``pipeoptim``).

    Raises:
        ValueError: unknown name.
    """
    try:
        return POLICIES[name](**options)  # type: ignore[arg-type]
    except KeyError:
        raise ValueError(f"unknown weight policy {name!r}; choose one of {', '.join(POLICIES)}") from None


def insert_policy(gm: fx.GraphModule, policy: WeightPolicy) -> dict[str, nn.Parameter]:
    """Route every trainable parameter of ``gm`` through ``policy`` in the graph.

    Each ``get_attr`` of a parameter gets a call ``<name>_<graph_name> =
    self.<graph_name>(<name>, '<qualified name>')`` after it, used in its place. Returns the
    stage's trainable parameters by the names used in the graph.
    """
    by_name = dict(gm.named_parameters(remove_duplicate=False))
    params = {
        str(n.target): by_name[str(n.target)]
        for n in gm.graph.nodes
        if n.op == "get_attr" and str(n.target) in by_name and by_name[str(n.target)].requires_grad
    }
    if policy.graph_name is None:
        return params
    gm.add_submodule(policy.graph_name, policy)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and str(node.target) in params:
            with gm.graph.inserting_after(node):
                new = gm.graph.create_node(
                    "call_module",
                    policy.graph_name,
                    (node, str(node.target)),
                    name=f"{node.name}_{'hat' if policy.graph_name == 'predict' else policy.graph_name}",
                )
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    gm.graph.lint()
    gm.recompile()
    return params
