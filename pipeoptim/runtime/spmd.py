"""SPMD execution under ``torchrun``: every rank runs the user's script and its own stage.

Launch one process per stage (``torchrun --nproc-per-node N train.py``, or across machines
with ``--nnodes``; N·R processes with ``data_parallel=R``, rank ``replica·N + stage``, where
every replica's first and last stage read the inputs and targets); each rank calls
``pipeoptim.compile`` and ``pipe.step(inputs, targets)`` with the same data. Rank 0 profiles
and plans, then broadcasts the plan and every stage's initial weights, so all ranks agree even
if their models were initialised differently. Stage 0 alone needs the inputs and the last
stage alone the targets; other ranks may pass ``None``. Rank 0 sends every other rank the size
of each mini-batch (and of each batch given to ``predict``), so all split it into the same
micro-batches, and marks the start of every gather (:mod:`pipeoptim.runtime.call_starts`).
The last stage sends every other rank the losses of each mini-batch (one
message, once the last is computed), so ``float(loss)`` works everywhere. Each pipeline sends
its messages on a process group of its own (all ranks, created at compile), so that two
pipelines in one job, or the user's own messages between ranks, never take one another's:
receives are matched by sender and tag in the order they were posted, and a flush of one
pipeline posts its cool-down's receives while the other's messages may come first.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from pipeoptim.errors import PeerLostError, PipelineError, first_line
from pipeoptim.microbatch import Rows
from pipeoptim.runtime.affinity import cores_to_spare, pin_rank, unpin_rank
from pipeoptim.runtime.build import PipelineSpec
from pipeoptim.runtime.call_starts import CallStarts
from pipeoptim.runtime.executor import MiniBatch
from pipeoptim.runtime.initial_state import share_initial_state
from pipeoptim.runtime.loss_mail import LossMail
from pipeoptim.runtime.procmem import resident_bytes
from pipeoptim.runtime.rank_calls import RankCalls
from pipeoptim.runtime.rank_settings import together
from pipeoptim.runtime.replicas import replica_part
from pipeoptim.runtime.stage_state import merge_optimizer_states
from pipeoptim.runtime.staleness import PredictionError
from pipeoptim.runtime.worker import StageProcess


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` where CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


#: whether :func:`init` created this process's default group (then destroyed at exit)
_created = False
#: the pipelines of this process open on the default group (:class:`SPMDExecutor`)
_open = 0


def join(timeout: float) -> None:
    """Join the process group torchrun describes, creating it where no one has (``timeout``
    seconds for its collectives; torch's default where it is not a positive number). A group
    created here lives until the process exits (``atexit``), not until the pipeline that
    created it closes: other pipelines may be open on it, and one compiled later would have
    to create it again, which under torchrun's store failed or hung. On the CPU this rank's
    thread is bound to its cores (:func:`pipeoptim.runtime.affinity.pin_rank`) while any of
    its pipelines is open."""
    global _created
    device = local_device()
    local_world = _local_world()
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) % local_world
    if dist.is_initialized():
        if _created and _open == 0 and device.type == "cpu":
            pin_rank(local_rank, local_world)  # unbound when the last pipeline closed
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // local_world))
        pin_rank(local_rank, local_world)  # before gloo's threads
    given = isinstance(timeout, (int, float)) and 0 < timeout < float("inf")
    try:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout) if given else None,
        )
    except dist.DistStoreError as exc:  # a rank's key never came within the timeout
        raise PeerLostError(
            f"rank {os.environ.get('RANK', '?')}: the other ranks did not join the process group "
            f"({first_line(exc)}): under torchrun every rank calls pipeoptim.compile, and one has "
            "not (it stopped, or its script took another path)"
        ) from exc
    _created = True
    atexit.register(_destroy_default_group)


def _local_world() -> int:
    """The ranks torchrun starts on this host (``LOCAL_WORLD_SIZE``; 1 where unset)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def check_world(num_stages: int) -> None:
    """Check torchrun's world size against ``num_stages`` (``gpus``: N stages × R replicas),
    before joining the group: too few or too many ranks never join it.

    Raises:
        PipelineError: the world size differs.
    """
    world = int(os.environ["WORLD_SIZE"])
    if world != num_stages:
        raise PipelineError(
            f"torchrun started {world} processes but gpus={num_stages}: launch one process per stage "
            f"and replica (torchrun --nproc-per-node {num_stages} ...) or compile with gpus={world}"
        )


def _destroy_default_group() -> None:
    """At exit: the default group :func:`init` created, unless the script destroyed it."""
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: Any) -> Any:
    """``value`` of rank 0 on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class SPMDExecutor:
    """The executor of one torchrun rank (same interface as the other executors)."""

    def __init__(
        self,
        spec: PipelineSpec,
        on_loss: Callable[[int, torch.Tensor], None],
        timeout: float,
        traced: torch.nn.Module,
    ) -> None:
        global _open
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.on_loss = on_loss
        self.timeout = datetime.timedelta(seconds=timeout)
        self.device = local_device()
        #: this pipeline's own process group (every rank) for its messages between ranks: a
        #: receive posted on the shared default group took another pipeline's message where
        #: two ran in one job (flushing one while the other had mini-batches in flight), and
        #: could take the user's own
        self.group = dist.new_group(timeout=self.timeout)
        self.num_stages = spec.num_stages
        self.replicas = spec.data_parallel
        self.calls = RankCalls(self.group)  # the gathers every rank makes at the same point
        try:
            with together("build its stage", "torchrun", self.group):
                self._build(spec, on_loss)
            stage = self.process.stage.module
            share_initial_state(stage, traced, spec.model, self.rank, self.world, self.group, self.device)
            dist.barrier(group=self.group)
        except BaseException:  # nothing of this pipeline is left: its groups, the binding
            self._release()
            raise
        _open += 1  # once built: close() counts it off

    def _build(self, spec: PipelineSpec, on_loss: Callable[[int, torch.Tensor], None]) -> None:
        """This rank's stage and the mail of its losses."""
        self.process = StageProcess(spec, self.rank, self.device, self.timeout.total_seconds(), self.group)
        self.process.may_defer = cores_to_spare(_local_world())
        self.mail = LossMail(
            self.process.channel,
            self.rank,
            self.world,
            self.num_stages,
            self.replicas,
            self.process.replica,
            spec.micro_batches,
            on_loss,
            self.timeout,
        )
        self.starts = CallStarts(self.process.channel, self.rank, self.world, self.timeout, self.calls)

    # -- training -------------------------------------------------------------------

    @property
    def needs_inputs(self) -> bool:
        """Whether this rank runs a first stage (of any replica; the only ones that read inputs)."""
        return self.process.rank == 0

    @property
    def needs_targets(self) -> bool:
        """Whether this rank runs a last stage (of any replica; the only ones that read targets)."""
        return self.process.rank == self.num_stages - 1

    def share_batch_size(
        self, batch: Rows | None, refused: bool = False, call: str = "step", settings: object = None
    ) -> Rows | None:
        """Rank 0's ``batch`` on every rank (:meth:`CallStarts.share_batch_size`)."""
        return self.starts.share_batch_size(batch, refused, call, settings)

    def submit(self, batch: MiniBatch) -> None:
        stages, rank = self.num_stages, self.process.rank
        share = replica_part(batch, self.process.replica, self.replicas)
        if rank == 0 and not share.inputs:
            raise PipelineError(
                f"rank {self.rank} runs the first stage of replica {self.process.replica} and needs the "
                "inputs: pass the whole mini-batch to step() there (it takes its share)"
            )
        inputs, targets = share.inputs if rank == 0 else [], share.targets if rank == stages - 1 else []
        part = replace(share, inputs=inputs, targets=targets)
        per = self.process.spec.micro_batches
        first, count = batch.index * per, len(share.sizes)
        if rank == stages - 1:
            self.mail.expect(batch.index, count)
        side_work = lambda: self.mail.post(first, count, self.device)  # noqa: E731
        try:
            self.mail.deliver(self.process.submit(part, side_work=side_work), self.device)
        except Exception as exc:
            if rank == stages - 1 and all(t is None for t in share.targets):
                raise PipelineError(
                    f"rank {self.rank} runs the last stage of replica {self.process.replica}, whose loss "
                    f"function failed on targets None ({type(exc).__name__}: {first_line(exc)}): pass the "
                    "targets to step() there (other ranks may pass None)"
                ) from exc
            raise

    def wait_loss(self, micro_batch: int) -> None:  # until its loss has arrived on this rank
        self.mail.poll(block=False, until=micro_batch)

    def poll_losses(self) -> None:
        self.mail.poll(block=False, asking=True)

    def flush(self) -> None:
        try:
            self.mail.deliver(self.process.flush(), self.device)
        except BaseException:  # the losses that have arrived keep their values (helper-154)
            with contextlib.suppress(Exception):
                self.mail.poll(block=False)
            raise
        self.mail.poll(block=True)

    # -- evaluation and state -----------------------------------------------------------

    def same_call(self, call: str, failure: BaseException | None = None) -> None:
        self.calls.same_call(call, failure)

    def forward_only(self, chunks: list[tuple[Any, ...]] | None, sizes: list[int]) -> list[Any]:
        outputs = self.process.forward_only(chunks if self.rank == 0 else None, sizes)
        last = self.num_stages - 1  # replica 0's last stage
        return self.calls.gather("the outputs (predict)", outputs if self.rank == last else None)[last]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.replica_state_dicts()[0]

    def replica_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every replica's parameters and buffers (replica 0's is :meth:`state_dict`)."""
        parts = self.calls.gather(
            "the weights (state_dict, to_module, save_checkpoint)", self.process.state_dict()
        )
        merged: list[dict[str, torch.Tensor]] = [{} for _ in range(self.replicas)]
        for rank, part in enumerate(parts):
            merged[rank // self.num_stages].update(part)
        return merged

    def load_state_dict(self, state: dict[str, torch.Tensor], aliases: dict[str, list[str]]) -> None:
        self.calls.same_everywhere("weights (load_state_dict, load_checkpoint)", state)
        self.process.load_state_dict(state)

    def optimizer_state(self) -> dict[str, Any]:
        what = "the optimizer state (optimizer_state_dict, save_checkpoint)"
        return merge_optimizer_states(self._per_stage(what, self.process.optimizer_state()))

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.calls.same_everywhere("optimizer state (load_optimizer_state_dict, load_checkpoint)", state)
        self.process.load_optimizer_state(state)

    def resume(self, mini_batches: int) -> None:
        self.process.resume(mini_batches)

    def resident_bytes(self) -> list[int]:  # every rank's process's, now, in bytes (stage order)
        return self.calls.gather("the memory in use (resident_bytes)", resident_bytes())

    def _per_stage(self, what: str, value: Any) -> list[Any]:
        """Every rank's ``value``, replica 0's ranks' in stage order (the replicas are alike; with
        replicas ``stats()`` listed one prediction error per rank, helper-138)."""
        return self.calls.gather(what, value)[: self.num_stages]

    def peak_weight_versions(self) -> list[int]:
        return self._per_stage(
            "the weight versions (stats, peak_weight_versions)", self.process.peak_versions()
        )

    def prediction_errors(self) -> list[PredictionError]:
        return self._per_stage("the prediction errors (stats)", self.process.stage.prediction_error.result())

    def stage_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return self._per_stage("the stages' weights (stage_state_dicts)", self.process.state_dict())

    def sent_bytes(self) -> list[int]:
        """Per stage, the tensor bytes it has sent to its neighbours (activations, gradients)."""
        return self._per_stage("the bytes sent (sent_bytes)", self.process.channel.sent_bytes)

    def abort(self) -> None:
        """:meth:`close` without waiting for the sends: the closed connections stop the others
        within a second (a lost peer)."""
        self._shut(wait=False)

    def close(self) -> None:
        """Wait for this rank's sends, destroy the process groups of this pipeline (its own,
        its replicas', its shared weights' holders'); once this process's last pipeline is
        closed, give the rank's thread back its cores (the script goes on)."""
        self._shut(wait=True)

    def _shut(self, wait: bool) -> None:
        global _open
        if self.group is None:  # closed or aborted already
            return
        try:
            if wait:  # a peer gone (it stopped at an error) has nothing left to receive
                with contextlib.suppress(PeerLostError):
                    self.process.channel.wait_sends()
        finally:
            _open -= 1
            self._release()

    def _release(self) -> None:
        """Destroy this pipeline's process groups (its stage's too) and drop the references (a
        group's connections and threads end with the last one); unbind the thread where no
        pipeline of this process is open."""
        process = getattr(self, "process", None)  # absent where building the stage failed
        if dist.is_initialized():
            if process is not None:
                process.destroy_groups()
            dist.destroy_process_group(self.group)
        self.group = self.calls.group = None
        mail = getattr(self, "mail", None)  # absent where building the stage failed
        if mail is not None:
            mail.clear()  # loss receives: their requests hold the group too
        if process is not None:
            process.channel.group = None
            process.channel.drop_pending()
            process.stage.discard_in_flight()
        if _open == 0:
            unpin_rank()
