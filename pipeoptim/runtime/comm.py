"""Point-to-point exchange of boundary values between neighbouring stages (torch.distributed).

Shapes and dtypes come from the plan (:attr:`pipeoptim.compiler.plan.Plan.values`), scaled
along the batch dimension by the micro-batch size, so receivers allocate their buffers
without a shape handshake. Numbers crossing a boundary (a batch size computed in the graph)
travel packed into one float64 tensor. The gradients of one backward travel as one message:
a uint8 buffer holding one byte per gradient saying whether it exists ("no gradient" is not a
zero gradient) and then each gradient's bytes (:func:`pipeoptim.runtime.layout.grad_layout`),
so a backward costs one message latency, not one per gradient plus one for the flags. Sends are asynchronous
(``isend``) and receives are posted ahead of the action that needs them
(:meth:`DistChannel.prefetch`), so transfers overlap computation; every wait has a timeout.

A send's request and its tensor are kept until the request is waited on: gloo reports
``is_completed() == False`` until ``wait()`` even after the peer has received the tensor, so
completion cannot be polled. Sends are instead retired in order once more than
``send_window`` actions have passed since they were posted (:meth:`DistChannel.end_action`):
memory stays bounded by what is in flight, whatever the run length. Waiting on an old send
cannot deadlock: the peer posts the matching receive when it reaches that micro-batch, which
never depends on what this stage does after the send.
"""

from __future__ import annotations

import datetime
import math
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from pipeoptim.compiler.plan import Plan
from pipeoptim.errors import PeerLostError, PipelineError, first_line
from pipeoptim.runtime.layout import grad_layout, leaf_metas, rebuild, shape_for

_SCALARS = ("int", "float", "bool")
LOSS_TAG = 7  # loss messages from the last rank to rank 0 (torchrun mode)
#: tags of the notes of :mod:`pipeoptim.runtime.async_norms` (forward, backward)
NOTE_TAGS = {"act": 11, "grad": 12}


class DistChannel:
    """The channel of one stage process (see :class:`pipeoptim.runtime.executor.Channel`).

    Args:
        rank: this stage's rank (= stage index).
        world: number of stages.
        plan: the plan (interfaces and value metadata).
        grad_mask_in: which flat input leaves send a gradient back.
        grad_mask_out: which flat output leaves receive one (the next stage's input mask).
        timeout: seconds any receive may wait.
        device: where received tensors live.
        send_window: actions after which a send is waited on and released (default ``2·world``:
            by then the peer has long posted its receive, so the wait returns at once).
        first_rank: global rank of stage 0 of this stage's replica (data × pipeline
            parallelism, :mod:`pipeoptim.runtime.replicas`); 0 with one replica.
        group: the process group of this pipeline's messages (every rank, in rank order);
            ``None``: the default group. Under torchrun each pipeline has one of its own
            (:class:`pipeoptim.runtime.spmd.SPMDExecutor`), so that another pipeline's
            messages or the user's own never meet its receives.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        plan: Plan,
        grad_mask_in: Sequence[bool],
        grad_mask_out: Sequence[bool],
        timeout: float,
        device: torch.device,
        send_window: int | None = None,
        first_rank: int = 0,
        group: Any = None,
    ) -> None:
        self.rank = rank
        self.group = group
        self.first_rank = first_rank
        self.world = world
        self.plan = plan
        self.timeout = datetime.timedelta(seconds=timeout)
        self.device = device
        self.in_names = plan.io[rank].inputs if rank > 0 else []
        self.out_names = plan.io[rank].outputs if rank < world - 1 else []
        self.in_meta = leaf_metas(plan, self.in_names)
        self.out_meta = leaf_metas(plan, self.out_names)
        self.grad_mask_in = list(grad_mask_in)
        self.grad_mask_out = list(grad_mask_out)
        self.sizes: dict[int, int] = {}
        self.losses: list[tuple[int, float]] = []
        self.send_window = send_window if send_window is not None else 2 * world
        self._sends: deque[list[tuple[Any, torch.Tensor]]] = deque([[]])  # one group per action
        self._posted: dict[tuple[str, int], list[Any]] = {}
        self._layouts: dict[tuple[str, int, int | None], Any] = {}  # see _layout
        #: tensor bytes sent to a neighbouring stage (activations and gradients)
        self.sent_bytes = 0
        #: the process group of the shared parameters' holders (:meth:`post_shared`); ``None``
        #: where this stage holds none or alone
        self.shared_group: Any = None
        self.shared_size = 1
        self._shared: dict[int, tuple[list[Any], list[list[torch.Tensor]]]] = {}
        #: float64 values of the note that rides with every training message
        #: (:mod:`pipeoptim.runtime.async_norms`); 0: none
        self.note_size = 0
        self._notes: dict[tuple[str, int], tuple[Any, torch.Tensor]] = {}
        #: ``time.perf_counter()`` when the last awaited activations or gradients had arrived
        self.arrived_at = 0.0

    # -- micro-batch sizes ------------------------------------------------------------

    def expect(self, micro_batch: int, size: int) -> None:
        """Micro-batch ``micro_batch`` has ``size`` rows (the receive buffers' batch size)."""
        self.sizes[micro_batch] = size

    def inputs(self, micro_batch: int) -> Sequence[Any]:
        """The activations of ``micro_batch`` from the previous stage (not at stage 0)."""
        leaves = self._wait(("act", micro_batch))
        return rebuild(self.plan, self.in_names, leaves)

    def loss(self, micro_batch: int, value: torch.Tensor) -> None:
        self.losses.append((micro_batch, float(value)))

    def total_squared_grad_norm(self, own: float) -> float:
        """Σ‖g_k‖² over all stages: an all-reduce of ``own`` (every stage calls it at the same
        step; the process group's timeout bounds the wait). With R replicas every rank holds
        its stage's replica-summed gradient, so the sum over all ranks is divided by R."""
        value = torch.tensor([own], dtype=torch.float64, device=self.device)
        try:
            dist.all_reduce(value, group=self.group)
        except RuntimeError as exc:
            raise PeerLostError(
                f"stage {self.rank}: the all-reduce of the gradient norm failed "
                f"({first_line(exc)}); another stage has probably stopped"
            ) from exc
        return float(value.item()) / (dist.get_world_size() // self.world)

    def post_shared(self, round_: int, parts: list[torch.Tensor]) -> None:
        """Start the all-gather of this holder's shared-parameter gradient parts of ``round_``
        over the holders' group (asynchronous; :meth:`collect_shared` waits on it)."""
        works, gathered = [], []
        for part in parts:
            outs = [torch.empty_like(part) for _ in range(self.shared_size)]
            if self.shared_group is None:
                outs[0].copy_(part)
            else:
                works.append(dist.all_gather(outs, part, group=self.shared_group, async_op=True))
            gathered.append(outs)
        self._shared[round_] = (works, gathered)

    def collect_shared(self, round_: int) -> list[list[torch.Tensor]]:
        """Every holder's parts of ``round_``, in stage order (waits, with the timeout)."""
        works, gathered = self._shared.pop(round_)
        for work in works:
            try:
                work.wait(self.timeout)
            except RuntimeError as exc:
                raise PeerLostError(
                    f"stage {self.rank}: summing the gradients of shared parameters (round {round_}) "
                    f"failed ({first_line(exc)}); another holder has probably stopped"
                ) from exc
        return [[outs[h] for outs in gathered] for h in range(self.shared_size)]

    def done(self, micro_batch: int) -> None:
        """Forget a micro-batch's size once this stage has finished it."""
        self.sizes.pop(micro_batch, None)

    # -- sending ---------------------------------------------------------------------

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        """Post an asynchronous send of ``tensor`` to rank ``dst``; kept until retired."""
        tensor = tensor.contiguous()
        try:
            work = dist.isend(tensor, dst, group=self.group, tag=tag)
        except RuntimeError as exc:  # gloo refuses a post on a connection the peer closed
            raise self._lost("posting a send to", dst, exc) from exc
        self._sends[-1].append((work, tensor))

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> Any:
        """Post a receive of ``tensor`` from rank ``src`` on this pipeline's group."""
        try:
            return dist.irecv(tensor, src, group=self.group, tag=tag)
        except RuntimeError as exc:
            raise self._lost("posting a receive from", src, exc) from exc

    def _lost(self, what: str, peer: int, exc: RuntimeError) -> PeerLostError:
        return PeerLostError(
            f"stage {self.rank}: {what} rank {peer} failed ({first_line(exc)}); rank "
            f"{peer} has probably stopped"
        )

    def end_action(self) -> None:
        """Close the current action's group of sends; wait on and release groups older than
        :attr:`send_window` actions."""
        self._sends.append([])
        while len(self._sends) > self.send_window + 1:
            self._wait_group(self._sends.popleft())

    def _wait_group(self, group: list[tuple[Any, torch.Tensor]]) -> None:
        for work, _ in group:
            try:
                work.wait(self.timeout)
            except RuntimeError as exc:
                raise PeerLostError(
                    f"stage {self.rank}: a send did not complete ({first_line(exc)}); "
                    "a neighbouring stage has probably stopped"
                ) from exc

    @property
    def pending_sends(self) -> int:
        """Send requests not yet waited on (bounded by :attr:`send_window` actions)."""
        return sum(len(group) for group in self._sends)

    def _send_activations(self, leaves: Sequence[Any], dst: int) -> None:
        """Numbers packed into one float64 tensor (if any), then each tensor leaf."""
        scalars = [float(v) for v, m in zip(leaves, self.out_meta) if m["kind"] in _SCALARS]
        if scalars:
            self.isend(torch.tensor(scalars, dtype=torch.float64), dst)
        for v, m in zip(leaves, self.out_meta):
            if m["kind"] != "tensor":
                continue
            if not isinstance(v, torch.Tensor):
                raise PipelineError(
                    f"stage {self.rank}: expected a tensor for a boundary value, got {type(v).__name__}"
                )
            self.isend(v.detach(), dst)
            self.sent_bytes += v.numel() * v.element_size()

    def send_activations(self, micro_batch: int, values: Any) -> None:
        leaves = pytree.tree_leaves(tuple(values))
        if len(leaves) != len(self.out_meta):
            raise PipelineError(
                f"stage {self.rank} produced {len(leaves)} values, the plan has {len(self.out_meta)}"
            )
        self._send_activations(leaves, self.first_rank + self.rank + 1)

    def send_note(self, op: str, micro_batch: int, note: torch.Tensor) -> None:
        """Send the note of ``micro_batch`` with its activations (``op`` "act") or gradients."""
        dst = self.first_rank + self.rank + (1 if op == "act" else -1)
        self.isend(note.to(self.device), dst, tag=NOTE_TAGS[op])

    def note(self, op: str, micro_batch: int) -> torch.Tensor:
        """The note that came with the activations (``op`` "act") or gradients of ``micro_batch``."""
        if (op, micro_batch) not in self._notes:
            self._post_note(op, micro_batch)
        work, buf = self._notes.pop((op, micro_batch))
        try:
            work.wait(self.timeout)
        except RuntimeError as exc:
            peer = self.rank - 1 if op == "act" else self.rank + 1
            raise PeerLostError(
                f"stage {self.rank}: receiving the norm note of micro-batch {micro_batch} from stage "
                f"{peer} failed ({first_line(exc)}); stage {peer} has probably stopped"
            ) from exc
        return buf.cpu()

    def _post_note(self, op: str, micro_batch: int) -> None:
        src = self.first_rank + self.rank + (-1 if op == "act" else 1)
        buf = torch.empty(self.note_size, dtype=torch.float64, device=self.device)
        self._notes[(op, micro_batch)] = (self.irecv(buf, src, tag=NOTE_TAGS[op]), buf)

    def send_grads(self, micro_batch: int, grads: Sequence[Any]) -> None:
        """Send the gradients of the masked input leaves back as one message (:func:`grad_layout`;
        a missing gradient's bytes are left as they are and its presence byte is 0).

        Raises:
            PipelineError: a gradient's dtype or shape differs from the plan's for its leaf.
        """
        places, total = self._layout("in", self.sizes[micro_batch])
        if not places:
            return
        message = torch.empty(total, dtype=torch.uint8, device=self.device)
        present = [grads[i] is not None for i, *_ in places]
        if all(present):  # the common case, without building a tensor of the flags
            message[: len(places)].fill_(1)
        else:
            message[: len(places)].copy_(torch.tensor(present, dtype=torch.uint8))
        for (i, offset, dtype, shape), here in zip(places, present):
            if not here:
                continue
            g = grads[i].detach()
            if g.dtype != dtype or list(g.shape) != shape:
                raise PipelineError(
                    f"stage {self.rank}: the gradient of input {i} is {g.dtype} {list(g.shape)}, the plan "
                    f"has {dtype} {shape} for it"
                )
            message[offset : offset + g.numel() * g.element_size()].view(dtype).view(shape).copy_(g)
        self.sent_bytes += sum(math.prod(shape) * dtype.itemsize for _, _, dtype, shape in places)
        self.isend(message, self.first_rank + self.rank - 1)

    def _layout(self, side: str, batch: int) -> tuple[list[tuple[int, int, torch.dtype, list[int]]], int]:
        """:func:`grad_layout` of the gradients this stage sends (``side`` "in": of its inputs)
        or receives ("out"), at ``batch`` rows; computed once per batch size and length (at
        most 64 kept)."""
        key = (side, int(batch), getattr(batch, "length", None))
        if key not in self._layouts:
            if len(self._layouts) >= 64:
                self._layouts.clear()
            metas, mask = (
                (self.in_meta, self.grad_mask_in) if side == "in" else (self.out_meta, self.grad_mask_out)
            )
            self._layouts[key] = grad_layout(metas, mask, self.plan.batch_size, batch)
        return self._layouts[key]

    def drop_pending(self) -> None:
        """Forget every posted send and receive (a closed or aborted pipeline): their requests
        hold the process group, whose connections close only once nothing does."""
        self._sends = deque([[]])
        self._posted, self._shared, self._notes = {}, {}, {}

    def wait_sends(self) -> None:
        """Block until every send has completed (before a flush answers)."""
        while self._sends:
            self._wait_group(self._sends.popleft())
        self._sends.append([])

    # -- receiving -------------------------------------------------------------------

    def _buffers(self, metas: Sequence[dict], batch: int) -> list[Any]:
        """Empty receive buffers (and placeholders for scalars) for ``metas``."""
        leaves: list[Any] = []
        for m in metas:
            if m["kind"] == "tensor":
                shape = shape_for(m, self.plan.batch_size, batch)
                leaves.append(torch.empty(shape, dtype=getattr(torch, m["dtype"]), device=self.device))
            else:
                leaves.append(None)
        return leaves

    def prefetch(self, op: str, micro_batch: int) -> None:
        """Post the receives an action will need (``op`` "act" or "grad"), if not posted."""
        key = (op, micro_batch)
        if (
            key in self._posted
            or (op == "act" and self.rank == 0)
            or (op == "grad" and self.rank == self.world - 1)
        ):
            return
        if self.note_size and micro_batch >= 0:  # evaluation micro-batches carry none
            self._post_note(op, micro_batch)
        batch = self.sizes[micro_batch]
        if op == "grad":  # one message: presence bytes, then the gradients (grad_layout)
            places, total = self._layout("out", batch)
            message = torch.empty(total, dtype=torch.uint8, device=self.device) if places else None
            works = [self.irecv(message, self.first_rank + self.rank + 1)] if places else []
            self._posted[key] = [works, [None] * len(self.out_meta), places, message]
            return
        metas, src = self.in_meta, self.first_rank + self.rank - 1
        leaves = self._buffers(metas, batch)
        n_scalars = sum(m["kind"] in _SCALARS for m in metas)
        scalar_buf = torch.empty(n_scalars, dtype=torch.float64) if n_scalars else None
        works = [self.irecv(scalar_buf, src)] if scalar_buf is not None else []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                works.append(self.irecv(leaf, src))
        self._posted[key] = [works, leaves, metas, scalar_buf]

    def _wait(self, key: tuple[str, int]) -> list[Any]:
        if key not in self._posted:
            self.prefetch(*key)
        works, leaves, metas, scalar_buf = self._posted.pop(key)
        for work in works:
            try:
                work.wait(self.timeout)
            except RuntimeError as exc:
                peer = self.rank - 1 if key[0] == "act" else self.rank + 1
                raise PeerLostError(
                    f"stage {self.rank}: receiving {'activations' if key[0] == 'act' else 'gradients'} "
                    f"of micro-batch {key[1]} from stage {peer} failed ({first_line(exc)}); "
                    f"stage {peer} has probably stopped"
                ) from exc
        self.arrived_at = time.perf_counter()
        if key[0] == "grad":
            places, message = metas, scalar_buf
            present = message[: len(places)].tolist() if places else []
            for (i, offset, dtype, shape), here in zip(places, present):
                if here:
                    nbytes = math.prod(shape) * dtype.itemsize
                    leaves[i] = message[offset : offset + nbytes].view(dtype).view(shape)
        elif scalar_buf is not None:
            values = iter(scalar_buf.tolist())
            for i, m in enumerate(metas):
                if m["kind"] in _SCALARS:
                    v = next(values)
                    leaves[i] = int(v) if m["kind"] == "int" else bool(v) if m["kind"] == "bool" else v
        return leaves

    def grads(self, micro_batch: int) -> Sequence[Any]:
        return self._wait(("grad", micro_batch))
