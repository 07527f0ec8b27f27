"""``pipeoptim.compile``: a model and its optimizer become a pipeline-parallel trainer."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from pipeoptim import microbatch
from pipeoptim.batchnorm import BATCH_NORMS, defer_batch_norm, plain_batch_norm
from pipeoptim.compiler import plan_model
from pipeoptim.compiler.costmodel import CostConfig, optimizer_state_factor
from pipeoptim.compiler.hooks import compiled_modules_warning, dropped_hooks_warning
from pipeoptim.compiler.plan import Plan
from pipeoptim.compiler.profile import load_or_measure_update_cost
from pipeoptim.compiler.shapes import plan_length
from pipeoptim.compiler.trace import TracedModel, trace
from pipeoptim.errors import PipelineError, PipeoptimError, PlanError, PredictorError
from pipeoptim.methods import METHODS, get_method
from pipeoptim.runtime import replicas, spmd
from pipeoptim.runtime.build import PipelineSpec, aliases_of, build_stage
from pipeoptim.runtime.clipping import check_clipping
from pipeoptim.runtime.distributed import check_devices
from pipeoptim.runtime.executor import LocalExecutor, MiniBatch
from pipeoptim.runtime.optim import (
    UpdateCostError,
    hyperparameters,
    param_group_names,
)
from pipeoptim.runtime.precision import autocast_context, check_autocast
from pipeoptim.runtime.predictors import VARIANTS as PREDICTOR_VARIANTS
from pipeoptim.runtime.predictors import get_predictor
from pipeoptim.units import parse_bandwidth, parse_bytes

_OPTIMIZER_STATE = "pipeoptim-optimizer/1"


class Loss:
    """The loss of one mini-batch, known once the last stage has computed it.

    ``float(loss)``, ``loss.item()`` and ``loss.wait()`` block until then (and re-raise a
    failure of the pipeline); ``loss.done()`` does not block. Losses complete in the order
    the mini-batches were given.
    """

    def __init__(self, index: int, waiter: Callable[[int], None] | None = None) -> None:
        self.index = index
        self._future: torch.futures.Future = torch.futures.Future()
        self._waiter = waiter

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> float:
        if not self._future.done() and self._waiter is not None:
            self._waiter(self.index)  # drives the receive that completes the future
        return float(self._future.wait())

    item = wait

    def __float__(self) -> float:
        return self.wait()

    def __repr__(self) -> str:
        if self.done():
            try:
                return f"Loss(mini_batch={self.index}, value={self.wait():.6g})"
            except Exception as exc:  # a failed future
                return f"Loss(mini_batch={self.index}, failed: {type(exc).__name__})"
        return f"Loss(mini_batch={self.index}, pending)"

    def _set(self, value: float) -> None:
        self._future.set_result(value)

    def _fail(self, exc: BaseException) -> None:
        if not self._future.done():
            self._future.set_exception(exc)


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


class Pipeline:
    """A compiled pipeline; build it with :func:`compile`.

    Attributes:
        plan: the partition (``print(pipe.plan.table())`` shows one row per stage).
        method: the pipeline method name.
        num_stages: number of stages.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        traced: TracedModel,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        static_batch: bool,
        executor: str,
        device: torch.device,
        timeout: float,
        owns_group: bool = False,
    ) -> None:
        self.spec = spec
        self.plan: Plan = spec.plan
        self.method = spec.method
        self.num_stages = spec.num_stages
        self.micro_batches = spec.micro_batches
        self.replicas = spec.data_parallel
        self.batch_size = batch_size
        self._static_batch = static_batch
        self._traced = traced
        self._optimizer = optimizer
        # structure and constants for to_module(), with the user's BatchNorm classes
        self._template = plain_batch_norm(copy.deepcopy(spec.model))
        self._next = 0
        self._pending: dict[int, list[Any]] = {}
        self._losses: dict[int, Loss] = {}
        self._scales: dict[int, list[float]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._error: BaseException | None = None
        self.executor_kind = executor
        self.device = device
        self.timeout = timeout
        self._owns_group = owns_group
        self._executor = self._start_executor()

    # -- executors -------------------------------------------------------------------

    def _start_executor(self) -> Any:
        if self.executor_kind == "local" and self.replicas > 1:
            return replicas.local_executor(self.spec, self._traced, self.device, self._on_loss)
        if self.executor_kind == "local":
            stages = [build_stage(self.spec, self._traced, k, self.device) for k in range(self.num_stages)]
            return LocalExecutor(stages, self.spec.schedule(), self._on_loss)
        if self.executor_kind == "torchrun":
            from pipeoptim.runtime.spmd import SPMDExecutor

            return SPMDExecutor(self.spec, self._on_loss, self.timeout, self._owns_group)
        from pipeoptim.runtime.distributed import ProcessExecutor

        return ProcessExecutor(self.spec, self._on_loss, self._on_error, timeout=self.timeout)

    def _on_loss(self, micro_batch: int, value: torch.Tensor, replica: int = 0) -> None:
        mini, j = divmod(micro_batch, self.micro_batches)
        with self._lock:
            scales = self._scales[mini]
            parts = self._pending.setdefault(mini, [])
            parts.append((replica * (len(scales) // self.replicas) + j, float(value)))
            if len(parts) < len(scales):
                return
            total = sum(v * scales[i] for i, v in sorted(parts))
            del self._pending[mini], self._scales[mini]
            loss = self._losses.pop(mini)
        loss._set(total)

    def _on_error(self, exc: BaseException) -> None:
        self._error = exc
        with self._lock:
            losses = list(self._losses.values())
            self._losses.clear()
        for loss in losses:
            loss._fail(exc)

    # -- training --------------------------------------------------------------------

    def _check_batch(self, inputs: tuple[torch.Tensor, ...]) -> int:
        examples = self.spec.example_inputs
        if len(inputs) != len(examples):
            raise PipelineError(
                f"step() got {len(inputs)} input tensor(s), the model was compiled with {len(examples)}"
            )
        batch = None
        for i, (x, ex) in enumerate(zip(inputs, examples)):
            if not isinstance(x, torch.Tensor):
                raise PipelineError(f"input {i} is a {type(x).__name__}, not a tensor")
            if x.dtype != ex.dtype or not microbatch.same_shape(x, ex, i, self.spec.length):
                dims = [
                    "length≤" + str(ex.shape[1]) if d == 0 and self._varies(i) else str(n)
                    for d, n in enumerate(ex.shape[1:])
                ]
                raise PipelineError(
                    f"input {i} has shape {tuple(x.shape)} {x.dtype}; the plan expects "
                    f"[batch, {', '.join(dims)}] {ex.dtype}: give inputs shaped "
                    "like example_inputs, or compile again for the new shape"
                )
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise PipelineError(f"inputs disagree on the batch size ({batch} vs {x.shape[0]})")
        assert batch is not None
        return microbatch.Rows(batch, self._length_of(inputs))

    def _varies(self, i: int) -> bool:
        """Whether input ``i`` has the plan's dynamic sequence length (dim 1)."""
        return self.spec.length is not None and microbatch.has_length(self.spec.example_inputs, i)

    def _length_of(self, inputs: tuple[torch.Tensor, ...]) -> int | None:
        lengths = {int(x.shape[1]) for i, x in enumerate(inputs) if self._varies(i)}
        if len(lengths) > 1:
            raise PipelineError(f"inputs disagree on the sequence length (dim 1: {sorted(lengths)})")
        return lengths.pop() if lengths else None

    def _shared_rows(self, batch: microbatch.Rows | None, what: str) -> microbatch.Rows:
        """Rows (and sequence length) of the batch given to ``what`` (step, predict); under
        torchrun rank 0's, as the other ranks may have been given no inputs."""
        share = getattr(self._executor, "share_batch_size", None)
        if share is not None:
            return share(batch)
        if batch is None:
            raise PipelineError(f"{what}() needs the inputs (only torchrun ranks other than 0 may pass None)")
        return batch

    def _check_rows(self, batch: int) -> None:
        if batch > self.batch_size:
            raise PipelineError(
                f"mini-batch of {batch} is larger than the {self.batch_size} the plan was made for "
                "(its memory estimate would not hold): compile with a larger example batch"
            )
        if batch < self.micro_batches * self.replicas and self.method == "2bw":
            raise PipelineError(
                f"mini-batch of {batch} cannot be split into {self.micro_batches * self.replicas} "
                "micro-batches (M per replica), and "
                "PipeDream-2BW steps every M micro-batches: drop the last incomplete batch "
                "(DataLoader(drop_last=True))"
            )
        if batch != self.batch_size and self._static_batch:
            raise PipelineError(
                f"this model's graph runs mini-batches of exactly {self.batch_size} rows (torch.export "
                f"fixed the batch size) but got {batch}: drop the last incomplete batch (drop_last=True)"
            )

    def step(self, inputs: Any, targets: Any) -> Loss:
        """Feed one mini-batch; returns its :class:`Loss` at once (a future).

        Asynchronous methods keep up to N mini-batches in flight, so the loss may still be
        pending; flushing methods (gpipe, 1f1b) finish the mini-batch before returning.

        Args:
            inputs: tensor or tuple of tensors, ``[batch, ...]`` like ``example_inputs``; a
                batch smaller than M runs as ``batch`` micro-batches of one row. Under
                torchrun only rank 0 (the first stage) needs them; others may pass ``None``.
            targets: whatever ``loss_fn`` takes as its second argument (tensors are split
                along dim 0 into micro-batches). Under torchrun only the last rank needs
                them; others may pass ``None``.

        Raises:
            PipelineError: wrong shapes or dtypes, a batch larger than planned, a closed
                pipeline, or a failure of a stage.
        """
        self._check_open()
        inputs = None if inputs is None else _as_tuple(inputs)
        batch = self._shared_rows(None if inputs is None else self._check_batch(inputs), "step")
        self._check_rows(batch)
        # a smaller last batch runs fewer; with R replicas each runs m of the R·m micro-batches
        m = replicas.micro_batch_count(batch, self.micro_batches, self.replicas)
        parts = m * self.replicas
        micro_inputs = [] if inputs is None else microbatch.split(inputs, parts)
        micro_targets = microbatch.split(targets, parts)
        sizes = [microbatch.Rows(n, batch.length) for n in microbatch.sizes(batch, parts)]
        scales = microbatch.scales(
            sizes, self.spec.loss_reduction, None if targets is None else micro_targets
        )
        self._throttle()
        index = self._next
        self._next += 1
        waiter = getattr(self._executor, "wait_loss", None)
        last_micro = index * self.micro_batches + m - 1
        loss = Loss(index, None if waiter is None else lambda _i: waiter(last_micro))
        with self._lock:
            self._losses[index] = loss
            self._scales[index] = scales
        device = self.device if self.executor_kind == "local" else torch.device("cpu")
        batch_ = MiniBatch(
            index=index,
            inputs=[tuple(x.to(device) for x in xs) for xs in micro_inputs],
            targets=[
                pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, y)
                for y in micro_targets
            ],
            scales=scales,
            sizes=sizes,
            hyper=hyperparameters(self._optimizer),
        )
        # The stages step their own optimizers; mark the user's as stepped so that an LR
        # scheduler attached to it does not warn that its step() came first.
        self._optimizer._opt_called = True  # type: ignore[attr-defined]
        try:
            self._executor.submit(batch_)
        except PipeoptimError as exc:
            self._on_error(exc)
            raise
        return loss

    @property
    def max_in_flight(self) -> int:
        """Mini-batches whose loss may be pending at once: ``2·N``. :meth:`step` blocks beyond
        it (N keep every stage busy), so a loop that never reads its losses does not queue the
        whole data set in the workers' inboxes."""
        return 2 * self.num_stages

    def _throttle(self) -> None:
        """Wait for the oldest pending loss while :attr:`max_in_flight` are pending.

        The local executor computes everything inside :meth:`step` and never needs to wait."""
        if self.executor_kind == "local":
            return
        while True:
            with self._lock:
                if len(self._losses) < self.max_in_flight:
                    return
                oldest = self._losses[min(self._losses)]
            try:
                oldest.wait()
            except Exception:
                self._check_open()  # re-raise the pipeline's error as step() does
                raise

    def train(self, batches: Iterable[tuple[Any, Any]]) -> Iterator[float]:
        """Stream ``(inputs, targets)`` mini-batches; yields each loss in order.

        Up to N mini-batches are kept in flight; the pipeline is flushed at the end.
        """
        pending: deque[Loss] = deque()
        for inputs, targets in batches:
            pending.append(self.step(inputs, targets))
            while pending and (pending[0].done() or len(pending) > self.num_stages):
                yield pending.popleft().wait()
        self.flush()
        while pending:
            yield pending.popleft().wait()

    def flush(self) -> None:
        """Wait until every mini-batch in flight has finished its backward and step."""
        self._check_open()
        self._executor.flush()
        if self._losses:
            raise PipelineError(f"flush finished with {len(self._losses)} loss(es) missing")

    # -- evaluation and state ----------------------------------------------------------

    @torch.no_grad()
    def predict(self, inputs: Any) -> Any:
        """Forward-only pass with the current weights (evaluation mode); flushes first.

        ``inputs`` as for :meth:`step` (under torchrun only rank 0 needs them). Returns the
        model's output structure, with tensors on the CPU.
        """
        self.flush()
        inputs = None if inputs is None else _as_tuple(inputs)
        batch = self._shared_rows(None if inputs is None else self._check_eval_batch(inputs), "predict")
        size = math.ceil(self.batch_size / (self.micro_batches * self.replicas))
        sizes = [microbatch.Rows(min(size, batch - i), batch.length) for i in range(0, batch, size)]
        if self._static_batch and any(n != size for n in sizes):
            raise PipelineError(
                f"this model was traced for micro-batches of exactly {size}: give predict() a "
                f"multiple of {size} rows"
            )
        device = self.device if self.executor_kind == "local" else torch.device("cpu")
        chunks = (
            None  # under torchrun rank 0 alone reads the inputs
            if inputs is None
            else [tuple(x[i : i + size].to(device) for x in inputs) for i in range(0, batch, size)]
        )
        if self.executor_kind == "local":
            outputs = self._executor.forward_only(chunks)
        else:  # the stages allocate what they receive from the sizes (and sequence length)
            outputs = self._executor.forward_only(chunks, sizes)
        flat = [
            torch.cat([o[i] for o in outputs]) if isinstance(outputs[0][i], torch.Tensor) else outputs[0][i]
            for i in range(len(outputs[0]))
        ]
        flat = [t.cpu() if isinstance(t, torch.Tensor) else t for t in flat]
        return self._traced.unflatten_output(flat)

    __call__ = predict

    def _check_eval_batch(self, inputs: tuple[torch.Tensor, ...]) -> microbatch.Rows:
        examples = self.spec.example_inputs
        if len(inputs) != len(examples) or any(
            x.dtype != ex.dtype or not microbatch.same_shape(x, ex, i, self.spec.length)
            for i, (x, ex) in enumerate(zip(inputs, examples))
        ):
            raise PipelineError("predict() inputs must be shaped like example_inputs (any batch size)")
        if inputs[0].shape[0] == 0:
            raise PipelineError("predict() got an empty batch")
        return microbatch.Rows(int(inputs[0].shape[0]), self._length_of(inputs))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights, keyed exactly like the original model's ``state_dict()``."""
        self.flush()
        owned = self._executor.state_dict()
        aliases = aliases_of(self._traced.tied)
        result = {}
        for key, value in self._template.state_dict().items():
            source = owned.get(key)
            if source is None:
                source = next((owned[a] for a in aliases.get(key, []) if a in owned), None)
            result[key] = (source if source is not None else value).detach().cpu().clone()
        return result

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights keyed like the original model's ``state_dict()`` into the stages.

        Raises:
            PipelineError: keys differ from the model's (names the first few).
        """
        self.flush()
        expected = set(self._template.state_dict())
        missing, extra = expected - set(state), set(state) - expected
        if missing or extra:
            raise PipelineError(
                f"state dict does not belong to {type(self._template).__name__}: missing "
                f"{sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
            )
        self._template.load_state_dict(state)
        self._executor.load_state_dict(state, aliases_of(self._traced.tied))

    @property
    def mini_batches_done(self) -> int:
        """Mini-batches given to :meth:`step` so far (restored by a resume)."""
        return self._next

    def optimizer_state_dict(self) -> dict[str, Any]:
        """Optimizer state keyed by parameter name, stage step counts and the mini-batch count."""
        self.flush()
        return {"format": _OPTIMIZER_STATE, "mini_batches": self._next, **self._executor.optimizer_state()}

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`optimizer_state_dict` output.

        Raises:
            PipelineError: the state is from another format or another model.
        """
        if state.get("format") != _OPTIMIZER_STATE:
            raise PipelineError("not a pipeoptim optimizer state (format differs)")
        self.flush()
        self._executor.load_optimizer_state(state)
        self._next = int(state.get("mini_batches", self._next))
        self._executor.resume(self._next)

    def save_checkpoint(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
        """Write weights, optimizer state, position and plan to ``path`` atomically
        (:func:`pipeoptim.checkpoint.save_checkpoint`)."""
        from pipeoptim.checkpoint import save_checkpoint

        save_checkpoint(self, path, extra)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Continue from a checkpoint; returns the ``extra`` saved with it.

        Raises:
            CheckpointError: missing, corrupt, or from another model.
        """
        from pipeoptim.checkpoint import load_checkpoint

        return load_checkpoint(self, path)

    def to_module(self) -> nn.Module:
        """A new instance of the original model class holding the trained weights."""
        module = copy.deepcopy(self._template)
        module.load_state_dict(self.state_dict())
        return module

    def resident_bytes(self) -> list[int]:
        """Resident memory (RSS, bytes) of the process running each stage, now; with
        ``executor="local"`` every entry is this process. Linux only.

        Raises:
            OSError: ``/proc`` is not available.
        """
        return self._executor.resident_bytes()

    @property
    def peak_weight_versions(self) -> list[int]:
        """Per stage, the most versions of a weight held at once so far (measured)."""
        return self._executor.peak_weight_versions()

    # -- lifetime --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PipelineError("the pipeline is closed")
        if isinstance(self._error, PipeoptimError):
            raise self._error  # the original error (a failed stage, a NaN) with its details
        if self._error is not None:
            raise PipelineError(f"the pipeline failed earlier: {self._error}") from self._error

    def close(self) -> None:
        """End every worker; further calls raise :class:`PipelineError`."""
        if self._closed:
            return
        self._closed = True
        close = getattr(self._executor, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown anything may be gone
            self.close()


def compile(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    gpus: int = 4,
    *,
    example_inputs: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    loss_reduction: microbatch.Reduction = "mean",
    batch_norm: str = "micro-batch",
    method: str = "pipeoptim",
    micro_batches: int | None = None,
    memory: str | int | None = None,
    bandwidth: str | float | None = "25GB/s",
    profile_dir: str | os.PathLike[str] | None = "profiles",
    plan: Plan | str | os.PathLike[str] | None = None,
    executor: str = "auto",
    leaf_modules: Sequence[str] = (),
    seed: int = 0,
    timeout: float = 300.0,
    backward: str = "current",
    predictor: str = "paper",
    nan_check: str = "stages",
    solver: str = "cbc",
    log: Callable[[str], None] | None = None,
    max_grad_norm: float | None = None,
    autocast: torch.dtype | None = None,
    data_parallel: int = 1,
) -> Pipeline:
    """Compile ``model`` and ``optimizer`` into a pipeline of ``gpus`` stages (or of
    ``gpus / data_parallel`` stages, replicated ``data_parallel`` times).

    Args:
        model: any ``nn.Module``; it is copied, never changed.
        optimizer: a ``torch.optim`` optimizer over ``model``'s parameters; each stage runs
            one of the same class with the same per-group hyperparameters (a learning-rate
            scheduler on it keeps working).
        gpus: devices (worker processes, torchrun ranks): N stages × R replicas. With
            ``data_parallel=1`` (default) it is the number of pipeline stages N.
        example_inputs: one mini-batch of inputs (tensor or tuple), ``[batch, ...]``; the
            plan is made for this batch size (split into micro-batches where the method
            does). Dim 0 is the batch dimension.
        loss_fn: ``loss_fn(model_output, targets) -> scalar tensor`` over the rows it gets.
        loss_reduction: ``"mean"`` (default): ``loss_fn`` is the mean over its rows;
            ``"sum"``: the sum; a function ``count(targets)``: the mean over the units it counts
            (the non-padding tokens of a cross-entropy with ``ignore_index``). Micro-batch
            losses are weighted to give the loss and gradient of the whole mini-batch
            (:mod:`pipeoptim.microbatch`); a loss that is not what ``loss_reduction`` says is
            refused at the first mini-batch split into micro-batches.
        batch_norm: ``"micro-batch"`` (default): each micro-batch updates the BatchNorm
            running statistics, as gradient accumulation does; ``"deferred"`` (gpipe and
            1f1b): once per mini-batch, from all its rows (:mod:`pipeoptim.batchnorm`).
        method: ``pipeoptim`` (default), ``pipedream``, ``2bw``, ``spectrain``, ``none``,
            ``gpipe`` or ``1f1b`` (see :mod:`pipeoptim.methods`).
        micro_batches: M for gpipe, 1f1b and 2bw (default N; 2bw needs M >= N).
        memory: per-stage memory limit (``"16GiB"``, bytes) for the plan.
        bandwidth: between stages (``"25GB/s"``, bytes/s); ``None`` ignores communication.
        profile_dir: where profiles are cached (``None``: do not cache).
        plan: a :class:`~pipeoptim.compiler.plan.Plan` or plan file (``pipeoptim partition
            --save``) to use instead of planning; it must be for this model's graph, ``gpus``
            stages and ``method``.
        executor: ``"local"`` (all stages in this process, deterministic), ``"processes"``
            (one worker process per stage, torch.distributed), ``"torchrun"`` (this process is
            one rank of a torchrun job and runs its stage), or ``"auto"`` (``torchrun`` when
            started by torchrun, else ``processes``).
        leaf_modules: qualified names of modules to keep as single nodes. Hooks registered
            on a module run in training (once per micro-batch, as in the plain model) only if
            it stays a module: a leaf, or inside one; hooks that tracing drops are named in a
            ``UserWarning`` (see :mod:`pipeoptim.compiler.hooks`).
        seed: seed of the per-micro-batch random streams (dropout).
        timeout: seconds any wait between stages may take before the pipeline fails.
        backward: PipeOptim only: ``"current"`` weights (the paper) or ``"predicted"``.
        predictor: PipeOptim only: ``"paper"`` (ΔW from the optimizer's state, the paper's
            formula) or ``"next-step"`` (Adam/AdamW, RMSprop, Adagrad: the last gradient is
            folded into the moments first; the real next step when the gradient repeats).
        nan_check: ``"stages"`` (default: every stage checks its outputs, and a NaN there or
            a NaN/inf loss stops training naming the mini-batch and the stage where it
            appeared), ``"loss"`` (only the loss), ``"off"``.
        solver: ILP solver, ``cbc`` or ``highs``.
        log: receives progress messages (profiling, reuse of a saved profile).
        max_grad_norm: clip each mini-batch's gradients by their global norm over all
            stages, as ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)``
            before ``optimizer.step()``: gpipe and 1f1b (equal to plain training), or any
            method with one stage (see :mod:`pipeoptim.runtime.clipping` for why the
            asynchronous methods refuse it with more). ``None``: no clipping.
        autocast: ``torch.bfloat16``: every stage computes its forward and the loss under
            ``torch.autocast`` (as the plain model inside that context), values cross stage
            boundaries in the dtypes autocast gives them, and the plan is made from a profile
            under autocast (:mod:`pipeoptim.runtime.precision`). A caller's own ``with
            torch.autocast(...)`` does not reach worker processes: use this option.
        data_parallel: R, replicas of the pipeline (data parallelism; ``gpus`` must be a
            multiple): each mini-batch is split into R shares of M micro-batches, one per
            replica, and each stage's replicas sum their gradients before every step, so GPipe
            and 1F1B equal plain training on the whole mini-batch and the replicas stay
            bit-identical under every method (:mod:`pipeoptim.runtime.replicas`). Rank
            ``replica·N + stage`` runs ``stage`` of ``replica``.

    Raises:
        ValueError: a bad argument (the message says which and what is allowed).
        PredictorError: ``method="pipeoptim"`` with an optimizer that has no predictor, or
            ``spectrain`` without SGD momentum.
        TraceError, ProfileError, PlanError: from the compiler.
        PipelineError: more stages than GPUs on a CUDA machine, or a wrong torchrun world size.
    """
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer (the number of stages), got {gpus!r}")
    if not isinstance(data_parallel, int) or isinstance(data_parallel, bool) or data_parallel < 1:
        raise ValueError(f"data_parallel must be a positive integer (replicas), got {data_parallel!r}")
    if gpus % data_parallel:
        raise ValueError(
            f"gpus={gpus} cannot hold {data_parallel} equal replicas: use a data_parallel that "
            f"divides gpus (stages = gpus / data_parallel)"
        )
    devices, gpus = gpus, gpus // data_parallel  # from here on gpus is N, the stages
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if executor not in ("auto", "local", "processes", "torchrun"):
        raise ValueError(f"executor must be 'auto', 'local', 'processes' or 'torchrun', not {executor!r}")
    if nan_check not in ("stages", "loss", "off"):
        raise ValueError(f"nan_check must be 'stages', 'loss' or 'off', not {nan_check!r}")
    microbatch.check_reduction(loss_fn, loss_reduction)
    if batch_norm not in BATCH_NORMS:
        raise ValueError(f"batch_norm must be 'micro-batch' or 'deferred', not {batch_norm!r}")
    info = get_method(method)
    max_grad_norm = check_clipping(max_grad_norm, info.asynchronous, gpus)
    if data_parallel > 1 and max_grad_norm is not None:
        raise ValueError(
            "max_grad_norm with data_parallel > 1 is not supported yet (the global norm would need "
            "the replicas' summed gradients): leave max_grad_norm unset or use data_parallel=1"
        )
    if data_parallel > 1 and batch_norm == "deferred":
        raise ValueError(
            "batch_norm='deferred' with data_parallel > 1 is not supported yet (the running "
            "statistics would need every replica's rows): use batch_norm='micro-batch'"
        )
    autocast = check_autocast(autocast)
    m = micro_batches if micro_batches is not None else (gpus if info.micro_batched else 1)
    if m < 1:
        raise ValueError(f"micro_batches must be positive, got {m}")
    if not info.micro_batched and m != 1:
        raise ValueError(f"method {method!r} does not split mini-batches: leave micro_batches unset")
    if method == "2bw" and m < gpus:
        raise ValueError(f"PipeDream-2BW needs micro_batches >= stages ({m} < {gpus}) to keep two versions")
    if predictor not in PREDICTOR_VARIANTS:
        raise ValueError(f"predictor must be one of {', '.join(PREDICTOR_VARIANTS)}, not {predictor!r}")
    if predictor != "paper" and info.policy != "pipeoptim":
        raise ValueError(f"predictor={predictor!r} applies to method 'pipeoptim' only, not {method!r}")
    if info.policy == "pipeoptim":
        get_predictor(optimizer, predictor)
    if info.policy == "spectrain" and not (
        isinstance(optimizer, torch.optim.SGD) and all(g.get("momentum", 0) for g in optimizer.param_groups)
    ):
        raise PredictorError(
            f"SpecTrain needs torch.optim.SGD with momentum > 0, got {type(optimizer).__name__}: use "
            "SGD(..., momentum=0.9) (--optimizer sgd) or method='pipeoptim' (--method pipeoptim)"
        )
    kind = executor
    if kind == "auto":
        kind = "torchrun" if spmd.under_torchrun() else "processes"
    if kind == "processes":
        check_devices(devices)
    inputs = _as_tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs):
        raise ValueError(
            "example_inputs must be a tensor or a tuple of tensors with a batch dimension (dim 0)"
        )
    batch = int(inputs[0].shape[0])
    if batch < m * data_parallel:
        raise ValueError(
            f"example batch of {batch} cannot be split into {m} micro-batches for each of "
            f"{data_parallel} replica(s)"
        )
    micro = tuple(x[: math.ceil(batch / (m * data_parallel))].detach().cpu() for x in inputs)
    model_copy = copy.deepcopy(model).cpu()
    if batch_norm == "deferred":
        if method not in ("gpipe", "1f1b"):
            raise ValueError(
                f"batch_norm='deferred' needs a method that flushes each mini-batch (gpipe, 1f1b), not "
                f"{method!r}; the asynchronous methods run a mini-batch as one micro-batch (2bw aside), "
                "where BatchNorm already tracks the whole mini-batch"
            )
        if not defer_batch_norm(model_copy):
            raise ValueError(
                f"batch_norm='deferred' but {type(model).__name__} has no BatchNorm1d/2d/3d that tracks "
                "running statistics: leave batch_norm unset"
            )
    groups = param_group_names(optimizer, model)
    say = log or (lambda _msg: None)
    try:
        step_cost, predict_cost = load_or_measure_update_cost(
            type(optimizer),
            optimizer.defaults,
            _profile_device(kind, inputs[0].device),
            profile_dir=profile_dir,
            log=say,
        )
    except UpdateCostError as exc:
        say(f"optimizer step cost not modelled in the plan: {exc}")
        step_cost = predict_cost = 0.0
    config = CostConfig(
        num_stages=gpus,
        method=method,
        micro_batches=m,
        bandwidth=parse_bandwidth(bandwidth) if bandwidth is not None else None,
        memory_limit=parse_bytes(memory) if memory is not None else None,
        opt_state_factor=optimizer_state_factor(optimizer),
        step_s_per_byte=step_cost,
        predict_s_per_byte=predict_cost,
        data_parallel=data_parallel,
    )
    owns_group = spmd.init(devices, timeout) if kind == "torchrun" else False
    rank0 = kind != "torchrun" or dist.get_rank() == 0
    if plan is not None:
        traced = trace(model_copy, micro, leaf_modules)
        chosen = _given_plan(plan, traced, config, say)
        static_batch, dynamic_length = traced.method == "export", False  # not probed: keep shapes
    elif rank0:
        with autocast_context(autocast, _profile_device(kind, inputs[0].device)):
            planned = plan_model(
                model_copy,
                micro,
                config,
                leaf_modules=leaf_modules,
                profile_dir=profile_dir,
                device=_profile_device(kind, inputs[0].device),
                solver=solver,
                log=say,
            )
        chosen, traced = planned.plan, planned.traced
        static_batch = bool(planned.graph.info.get("static_batch"))
        dynamic_length = bool(planned.graph.info.get("dynamic_length"))
    if kind == "torchrun" and plan is None:  # rank 0 planned; every rank uses its plan
        shared = spmd.broadcast((chosen.to_dict(), static_batch, dynamic_length) if rank0 else None)
        chosen, static_batch, dynamic_length = Plan.from_dict(shared[0]), shared[1], shared[2]
        if not rank0:
            traced = trace(model_copy, micro, leaf_modules)
    for dropped in (dropped_hooks_warning(model_copy, traced), compiled_modules_warning(model_copy)):
        if dropped is not None:
            warnings.warn(dropped, stacklevel=2)
    if batch_norm == "deferred" and traced.method == "export":
        raise PlanError(
            f"batch_norm='deferred' needs a model torch.fx can trace; {type(model).__name__} was traced "
            "with torch.export, which inlines BatchNorm: use batch_norm='micro-batch'"
        )
    if static_batch and batch % (m * data_parallel):
        raise PlanError(
            f"{type(model).__name__} was traced with torch.export, which fixed the batch size: the "
            f"example batch ({batch}) must be a multiple of micro_batches × data_parallel "
            f"({m * data_parallel})"
        )
    spec = PipelineSpec(
        model=model_copy,
        example_inputs=micro,
        leaf_modules=tuple(leaf_modules),
        plan=chosen,
        method=method,
        optimizer_class=type(optimizer),
        optimizer_defaults=dict(optimizer.defaults),
        group_names=groups,
        hyper=hyperparameters(optimizer),
        loss_fn=loss_fn,
        loss_reduction=loss_reduction,
        micro_batches=m,
        seed=seed,
        policy_options=_policy_options(info.policy, backward, predictor, m),
        nan_check=nan_check,
        length=plan_length(chosen, micro, dynamic_length and not static_batch),
        max_grad_norm=max_grad_norm,
        autocast=autocast,
        data_parallel=data_parallel,
    )
    device = inputs[0].device if kind == "local" else torch.device("cpu")
    return Pipeline(spec, traced, optimizer, batch, static_batch, kind, device, timeout, owns_group)


def _policy_options(policy: str | None, backward: str, predictor: str, micro_batches: int) -> dict[str, Any]:
    """Keyword arguments of the weight policy (:func:`pipeoptim.runtime.policies.make_policy`)."""
    if policy == "pipeoptim":
        return {"backward": backward, "predictor": predictor}
    if policy == "2bw":
        return {"micro_batches": micro_batches}
    return {}


def _profile_device(kind: str, input_device: torch.device) -> torch.device:
    """Where the stages will run: the inputs' device (local), else the first GPU or the CPU."""
    if kind == "local":
        return input_device
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _given_plan(
    plan: Plan | str | os.PathLike[str], traced: TracedModel, config: CostConfig, log: Callable[[str], None]
) -> Plan:
    """Check a plan handed to :func:`compile` against the model and the request.

    Raises:
        PlanError: unreadable, or for another graph, stage count, method or micro-batch count.
    """
    chosen = plan if isinstance(plan, Plan) else Plan.load(plan)
    if chosen.profile_key.get("graph_hash") != traced.graph_hash:
        raise PlanError(
            f"the plan was made for another model graph ({chosen.model}); make it for this model "
            "(pipeoptim partition ... --save) or leave plan unset"
        )
    for what, have, want in (
        ("stages", chosen.config.num_stages, config.num_stages),
        ("method", chosen.config.method, config.method),
        ("micro-batches", chosen.config.micro_batches, config.micro_batches),
        ("data-parallel", chosen.config.data_parallel, config.data_parallel),
    ):
        if have != want:
            raise PlanError(
                f"the plan is for {what}={have!r}, this pipeline has {what}={want!r}; make a new plan"
            )
    key = chosen.profile_key
    log(f"using the given plan of {chosen.model} (profiled on {key.get('device')}, torch {key.get('torch')})")
    return chosen
