"""``Pipeline``: a compiled pipeline-parallel trainer (build it with :func:`pipeoptim.compile`).

It checks each mini-batch (:mod:`pipeoptim.inputs`), splits it into micro-batches
(:mod:`pipeoptim.microbatch`), hands it to the executor that runs the stages
(:mod:`pipeoptim.runtime.launch`) and returns its :class:`~pipeoptim.loss.Loss` future.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from pipeoptim import checkpoint, microbatch
from pipeoptim import inputs as given
from pipeoptim.batchnorm import plain_batch_norm
from pipeoptim.compiler.plan import Plan
from pipeoptim.compiler.trace import TracedModel
from pipeoptim.errors import PeerLostError, PipelineError, PipeoptimError, drop_frame_locals, first_line
from pipeoptim.loss import Loss, MiniBatchLosses
from pipeoptim.measurements import Measurements
from pipeoptim.refusals import prepared_here, shared_rows
from pipeoptim.runtime.build import PipelineSpec
from pipeoptim.runtime.delivery import delivered
from pipeoptim.runtime.executor import MiniBatch
from pipeoptim.runtime.launch import Executor, start_executor
from pipeoptim.runtime.layout import output_batch_dims
from pipeoptim.runtime.optim import hyperparameters, optimizer_layout, restore_hyperparameters
from pipeoptim.runtime.replicas import micro_batch_count
from pipeoptim.streaming import Streaming

T = TypeVar("T")


class Pipeline(Measurements, checkpoint.Checkpoints, Streaming):
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
        self._optimizer, self._layout = optimizer, optimizer_layout(optimizer)
        self._next = 0
        self._losses = MiniBatchLosses(spec.micro_batches, spec.data_parallel)
        self._closed = False
        self._error: BaseException | None = None
        self._targets: given.Signature | None = None  # the first mini-batch's targets (their kind)
        self.executor_kind, self.device, self.timeout = executor, device, timeout
        self._executor: Executor = start_executor(
            executor, spec, traced, device, self._losses.on_loss, self._on_error, timeout
        )
        # to_module()'s structure and constants (torchrun: rank 0's), the user's BatchNorm classes
        self._template = plain_batch_norm(copy.deepcopy(spec.model))

    def _on_error(self, exc: BaseException) -> None:
        """Stop the pipeline at ``exc``. Under torchrun this rank's connections close at once
        (the error's frames let go of them): the others, waiting on it, stop within a second."""
        self._error = exc
        self._losses.fail_all(exc)
        if self.executor_kind == "torchrun":
            drop_frame_locals(exc)
            self._executor.abort()

    def _stop(self, exc: BaseException) -> None:
        """:meth:`_on_error`, by a call about to raise ``exc`` itself: that is its one raise as
        it is, later calls say the pipeline stopped at it (before, the next call raised it
        again, blaming good targets for the last ones refused: helper-151)."""
        self._on_error(exc)
        if isinstance(exc, PipeoptimError):
            exc.reported = True

    def _guarded(self, call: Callable[[], T], waits: bool = False) -> T:
        """``call()``, an executor call the other ranks take part in: a peer lost on the way
        stops the pipeline (the next call tried again and failed anew, helper-151). ``waits``
        (a flush, a loss's wait or poll): so does any :class:`PipeoptimError`, and any error
        where the stages run in this process (``executor="local"``; under torchrun this rank's
        stage, whose deferred backward or cool-down a flush runs: an error there left the
        ranks training on, one stage a step short, helper-151); a processes pipeline stays
        usable after a Ctrl-C while waiting."""
        try:
            return call()
        except BaseException as exc:
            in_process = self.executor_kind in ("local", "torchrun")
            if isinstance(exc, PeerLostError) or (waits and (isinstance(exc, PipeoptimError) or in_process)):
                self._stop(exc)
            raise

    # -- training --------------------------------------------------------------------

    @torch.inference_mode(False)  # its copies of the micro-batches: a caller's made them inference tensors
    def step(self, inputs: Any, targets: Any) -> Loss:
        """Feed one mini-batch; returns its :class:`Loss` at once (a future).

        Asynchronous methods keep up to N mini-batches in flight; flushing methods (gpipe, 1f1b)
        step after each mini-batch's last backward, before the next one's forwards. Either way
        the loss may still be pending on return (not with ``executor="local"``, which runs it all here),
        and under torchrun rank 0 may return before that backward and step (run at the next call).

        Args:
            inputs: tensor or tuple of tensors, ``[batch, ...]`` like ``example_inputs``; a
                batch smaller than M runs as ``batch`` micro-batches of one row. Under
                torchrun only rank 0 (the first stage) needs them; others may pass ``None``.
            targets: whatever ``loss_fn`` takes as its second argument; its tensors are
                split along dim 0 into micro-batches, so each has one row per input row
                (:func:`pipeoptim.microbatch.check_rows_split`). Under torchrun only the last
                rank needs them; others may pass ``None``.

        Raises:
            PipelineError: wrong shapes or dtypes, a batch larger than planned, targets that
                do not split like the inputs, optimizer groups or step hooks changed since
                compile, a closed pipeline, or a failure of a stage.
        """
        self._check_open()
        hyper = hyperparameters(self._optimizer, self._layout, self.spec.group_names)  # nothing started
        check = lambda xs: given.check_batch(self.spec, given.as_tuple(xs))  # noqa: E731
        batch = shared_rows(self._executor, inputs, check, "step", self.executor_kind, self._stop, hyper)
        inputs = None if inputs is None else given.as_tuple(inputs)  # accepted by check
        every = self.micro_batches * self.replicas  # M per replica
        given.check_rows(batch, self.batch_size, every, self.method, self._static_batch)
        # a smaller last batch runs fewer; with R replicas each runs m of the R·m micro-batches
        m = micro_batch_count(batch, self.micro_batches, self.replicas)
        parts = m * self.replicas
        micro_inputs = [] if inputs is None else microbatch.split(inputs, parts)
        sizes = [microbatch.Rows(n, batch.length) for n in microbatch.sizes(batch, parts)]
        given.check_traced_rows(
            self._traced.batch_rows,
            {"mini-batch": int(batch), "micro-batch": min(sizes), "larger micro-batch": max(sizes)},
        )

        def prepare() -> tuple[list[Any], list[float], given.Signature]:
            return given.split_targets(targets, int(batch), sizes, self.spec.loss_reduction, self._targets)

        micro_targets, scales, signature = prepared_here(prepare, self.executor_kind, self._stop)
        if self._targets is None and targets is not None:  # what later targets are held to
            self._targets = signature
        self._throttle()
        index = self._next
        self._next += 1
        last_micro = index * self.micro_batches + m - 1
        loss = Loss(
            index,
            lambda _i: self._guarded(lambda: self._executor.wait_loss(last_micro), waits=True),
            lambda: self._guarded(self._executor.poll_losses, waits=True),
        )
        self._losses.expect(loss, scales)
        device = self.device  # the CPU unless the stages run in this process
        # every executor's stages get them as the transport delivers them (fresh, contiguous)
        batch_ = MiniBatch(
            index=index,
            inputs=[delivered(xs, device) for xs in micro_inputs],
            targets=[delivered(y, device) for y in micro_targets],
            scales=scales,
            sizes=sizes,
            hyper=hyper,
        )
        # The stages step their own optimizers; mark the user's as stepped so that an LR
        # scheduler attached to it does not warn that its step() came first.
        self._optimizer._opt_called = True  # type: ignore[attr-defined]
        try:
            self._executor.submit(batch_)
        except BaseException as exc:  # the schedule stopped part-way: nothing may run on
            # (with executor="local" the user's loss_fn or model raises here as it is, or Ctrl-C)
            self._stop(exc)
            raise
        return loss

    @property
    def max_in_flight(self) -> int:
        """Mini-batches whose loss may be pending at once: ``2·N``. :meth:`step` blocks beyond it
        (N keep every stage busy): a loop never reading its losses queues not the whole data set."""
        return 2 * self.num_stages

    def _throttle(self) -> None:
        """Wait for the oldest loss while :attr:`max_in_flight` are pending (not local: it waits in step)."""
        if self.executor_kind == "local":
            return
        while len(self._losses) >= self.max_in_flight:
            oldest = self._losses.oldest()
            if oldest is None:
                return
            try:
                oldest.wait()
            except Exception as exc:
                if exc is not self._error:  # its own error as it is, the first time it is said
                    self._check_open()  # re-raise the pipeline's error as step() does
                raise

    def flush(self, _call: str = "flush") -> None:
        """Wait until every mini-batch in flight has finished its backward and step; a flush
        that fails (a stalled schedule, losses missing, or with ``executor="local"`` any
        exception of the cool-down it runs, the user's own included) stops the pipeline.
        Under torchrun every rank makes the same call (``_call``: the public one flushing)."""
        self._check_open()
        self._guarded(lambda: self._executor.same_call(_call))  # a peer lost there stops it too
        self._guarded(self._executor.flush, waits=True)
        if self._losses:
            error = PipelineError(f"flush finished with {len(self._losses)} loss(es) missing")
            self._stop(error)
            raise error

    # -- evaluation and state ----------------------------------------------------------

    @torch.no_grad()
    def predict(self, inputs: Any) -> Any:
        """Forward-only pass with the current weights (evaluation mode); flushes first.

        ``inputs`` as for :meth:`step` (under torchrun only rank 0 needs them). Returns the
        model's output structure, with tensors on the CPU. The rows run in pieces of a
        training micro-batch's size (``ceil(batch_size / (M·R))``), so a module whose
        eval-mode output depends on the other rows of its batch (BatchNorm without running
        statistics) sees those pieces, not the whole of ``inputs``.
        """
        self.flush("predict")
        check = lambda xs: given.check_eval_batch(self.spec, given.as_tuple(xs, "predict()"))  # noqa: E731
        batch = shared_rows(self._executor, inputs, check, "predict", self.executor_kind, self._stop)
        inputs = None if inputs is None else given.as_tuple(inputs)  # accepted by check
        size = math.ceil(self.batch_size / (self.micro_batches * self.replicas))
        sizes = [microbatch.Rows(min(size, batch - i), batch.length) for i in range(0, batch, size)]
        given.check_traced_rows(self._traced.batch_rows, {"piece of predict()'s rows": min(sizes)})
        if self._static_batch and any(n != size for n in sizes):
            raise PipelineError(
                f"this model was traced for micro-batches of exactly {size}: give predict() a "
                f"multiple of {size} rows"
            )
        device = self.device  # the CPU unless the stages run in this process
        chunks = (
            None  # under torchrun rank 0 alone reads the inputs
            if inputs is None
            else [delivered(tuple(x[i : i + size] for x in inputs), device) for i in range(0, batch, size)]
        )
        # the stages in other processes allocate what they receive from the sizes (and length)
        outputs = self._guarded(lambda: self._executor.forward_only(chunks, sizes))
        dims = output_batch_dims(self.plan, self._traced.gm, self._static_batch)
        flat = [microbatch.join([o[i] for o in outputs], size, dims[i]) for i in range(len(outputs[0]))]
        flat = [t.cpu() if isinstance(t, torch.Tensor) else t for t in flat]
        return self._traced.unflatten_output(flat)

    __call__ = predict

    @torch.inference_mode(False)  # normal tensors, as torch's state_dict() gives there
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights, keyed exactly like the original model's ``state_dict()``: a
        shared (tied) parameter's names hold one tensor, as there."""
        self.flush("state_dict")
        return checkpoint.keyed_as_template(self._guarded(self._executor.state_dict), self._template)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights keyed like the original model's ``state_dict()`` into the stages.

        Raises:
            PipelineError: keys or tensor shapes differ from the model's (names the first few);
                nothing is loaded then.
        """
        self.flush("load_state_dict")
        misfit = checkpoint.misfits(state, self._template)
        if misfit:
            raise PipelineError(f"state dict does not belong to {type(self._template).__name__}: {misfit}")
        state = checkpoint.tied_as_torch_loads(state, self._template)
        names = checkpoint.same_tensor_names(self._template)
        self._guarded(lambda: self._executor.load_state_dict(state, names))  # may refuse: first
        self._template.load_state_dict(state)

    @property
    def mini_batches_done(self) -> int:
        """Mini-batches given to :meth:`step` so far (restored by a resume)."""
        return self._next

    @torch.inference_mode(False)  # normal tensors also in a caller's inference mode
    def optimizer_state_dict(self) -> dict[str, Any]:
        """Optimizer state keyed by parameter name (2BW's shadow weights too), stage step counts, the
        mini-batch count and the user optimizer's group hyperparameters (lr, ...)."""
        self.flush("optimizer_state_dict")
        state = {
            "format": checkpoint.OPTIMIZER_FORMAT,
            "optimizer": type(self._optimizer).__qualname__,
            "mini_batches": self._next,
            **self._guarded(self._executor.optimizer_state),
        }
        groups = hyperparameters(self._optimizer)[: len(self.spec.group_names)]  # not one added since
        return state | {"param_groups": groups, "param_group_names": self.spec.group_names}

    def _continue_from(self, held: dict[str, Any]) -> None:
        """Start the stages' optimizers from ``held``, the state the user's optimizer already
        holds (:func:`pipeoptim.runtime.stage_state.held_state`; compile calls this)."""
        self.load_optimizer_state_dict({"format": checkpoint.OPTIMIZER_FORMAT, "mini_batches": 0, **held})

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`optimizer_state_dict` output.

        Raises:
            PipelineError: the state is from another format, optimizer class or model
                (:func:`pipeoptim.checkpoint.optimizer_misfit`); nothing is loaded then.
        """
        misfit = checkpoint.optimizer_misfit(state, self._optimizer, self._template, self.spec.group_names)
        if misfit:
            raise PipelineError(f"the optimizer state {misfit}")
        self.flush("load_optimizer_state_dict")
        self._guarded(lambda: self._executor.load_optimizer_state(state))  # may refuse it (torchrun): first
        restore_hyperparameters(self._optimizer, state.get("param_groups"))  # the lr a scheduler left
        self._next = int(state.get("mini_batches", self._next))
        self._executor.resume(self._next)

    def to_module(self) -> nn.Module:
        """A new instance of the original model class holding the trained weights and buffers,
        non-persistent ones too (which ``state_dict()`` leaves out, as torch's does)."""
        self.flush("to_module")
        return checkpoint.trained_module(self._template, self._guarded(self._executor.state_dict))

    # -- lifetime --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PipelineError(
                "the pipeline is closed: its stages, which held the trained weights and optimizer "
                "state, are gone (the model given to compile was not trained). Read them before "
                "close() (or the end of the with block): pipe.to_module(), pipe.state_dict(), "
                "pipe.save_checkpoint(path)"
            )
        if isinstance(self._error, PipeoptimError) and not self._error.reported:
            self._error.reported = True  # as it is once (a failed stage, a NaN), then "stopped at" it
            raise self._error
        if self._error is not None:
            error = f"{type(self._error).__name__}: {first_line(self._error)}"
            raise PipelineError(
                f"the pipeline stopped at an earlier error ({error}), its stages maybe part-way through a "
                "mini-batch: compile it again, or load the last checkpoint into a new one"
            ) from self._error

    def close(self, finish: bool = True) -> None:
        """Finish the mini-batches in flight (``finish`` and no earlier error: their losses keep
        their values), then end every worker; a loss not arrived then raises :class:`PipelineError`,
        as every later call does; a finish that fails closes as without one. Leaving a ``with``
        block by an exception, or the garbage collector, closes without finishing; so does a
        torchrun rank while an exception is raised or handled (in a ``finally`` or ``except``
        block; a warning says so): it cannot finish without the other ranks, and its
        connections, closed at once, stop them."""
        if self._closed:
            return
        raising = self.executor_kind == "torchrun" and sys.exc_info()[1] is not None
        if raising and finish and self._error is None:  # said: a close() in an except block
            exc = sys.exc_info()[1]
            warnings.warn(
                f"close() did not finish the mini-batches in flight: {type(exc).__name__} "
                f"({first_line(exc)}) is being raised or handled on this rank, whose stage cannot finish "
                "without the other ranks (as leaving a with block by an exception)",
                stacklevel=2,
            )
        finished = finish and self._error is None and not raising
        try:
            if finished:
                self.flush("close")
        except BaseException:  # refused (another rank in another call) or failed: no wait for
            finished = False  # the sends, which the other ranks may never receive (helper-169)
            raise
        finally:
            self._closed = True
            self._losses.fail_all(PipelineError("the pipeline was closed before this loss arrived"))
            if not finished and self.executor_kind == "torchrun":  # no wait for its sends (helper-148)
                self._executor.abort()
            self._executor.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        self.close(finish=exc_type is None)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown anything may be gone
            self.close(finish=False)
