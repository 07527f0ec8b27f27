"""The loss function's time on the last stage, priced into a plan (:class:`LossPricing`).

A profile times the model's graph, whose output node is where the last stage then computes
``loss_fn(output, targets)``, its backward and, where a mini-batch is split, the check of its
reduction (:class:`pipeoptim.loss_check.CheckedLoss`: two more evaluations without gradients).
None of that is in the graph, so the planner gave the last stage as much of the model as the
others, and a loss that costs as much as a layer (a cross-entropy over a language model's
vocabulary: a softmax over ``[rows, tokens, vocabulary]`` logits, forward and backward) made it
the bottleneck unseen. Given a mini-batch's targets, the loss's forward (with the check where
the run makes it) and backward seconds on one micro-batch are measured on the profiled device,
as the profile times a node (median of repeats on the same clock), and set as the output node's
``fwd_s`` and ``bwd_s``: every plan places that node on the last stage, so its time counts in
that stage's columns, the bottleneck and the predicted throughput.

The figures are cached beside the profiles (``loss-costs.json`` in the profile folder) under the
profile's key, the loss function (:func:`loss_identity`), its reduction, the targets' shapes and
dtypes and whether the check runs, so that a later plan of the same setting gets the same
figures (a plan must not change with timing noise).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from pipeoptim.autograd_modes import profiling_modes
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.hooks import hooks_silenced
from pipeoptim.compiler.profile import Timer
from pipeoptim.errors import PipelineError, ProfileError, first_line
from pipeoptim.fileio import read_json_table, update_json_table
from pipeoptim.loss_check import CheckedLoss, check_scalar_loss
from pipeoptim.loss_identity import loss_identity
from pipeoptim.microbatch import Reduction, check_rows_split, split

#: the cache's file in the profile folder
LOSS_COSTS_FILE = "loss-costs.json"
#: untimed and timed evaluations of the loss (the median of the timed ones is kept)
WARMUP, REPEATS = 2, 9


def _meta(value: Any) -> list[Any]:
    """The shapes and dtypes of ``value``'s tensors, other leaves by type."""
    return [
        [list(x.shape), str(x.dtype).removeprefix("torch.")]
        if isinstance(x, torch.Tensor)
        else type(x).__name__
        for x in pytree.tree_leaves(value)
    ]


@dataclass(frozen=True)
class LossCost:
    """Seconds of the loss on one micro-batch: ``fwd_s`` its value (and the reduction check,
    where the mini-batch is split), ``bwd_s`` its backward to the model's output."""

    fwd_s: float
    bwd_s: float


@dataclass
class LossPricing:
    """Prices ``loss_fn`` on the last stage of the plans of one mini-batch.

    Attributes:
        loss_fn, reduction: ``compile``'s ``loss_fn`` and ``loss_reduction``.
        targets: one mini-batch's targets (``compile``'s ``example_targets``).
        batch: the mini-batch's rows: a micro-batch of fewer is checked as the run checks it.
        device: where the stages run (and the model is profiled).
        profile_dir: the cache's folder (``None``: measured every time).
        log: where to say what was measured.
    """

    loss_fn: Callable[[Any, Any], torch.Tensor]
    reduction: Reduction
    targets: Any
    batch: int
    device: torch.device
    profile_dir: str | Path | None
    log: Callable[[str], None]

    @functools.cached_property
    def identity(self) -> str:
        """:func:`loss_identity` of the loss, once per compile (a layout search prices each
        layout's profile)."""
        return loss_identity(self.loss_fn)

    def __call__(self, model: nn.Module, inputs: tuple[torch.Tensor, ...], graph: CostGraph) -> CostGraph:
        """``graph`` (profiled on the micro-batch ``inputs`` of ``model``) with its output node
        timed as the loss (:class:`LossCost`).

        Raises:
            ProfileError: ``loss_fn`` fails on the model's output and the targets.
            PipelineError: targets that ``step`` would not split like the inputs
                (:func:`pipeoptim.microbatch.check_rows_split`), a loss that is no real scalar
                tensor (:func:`pipeoptim.loss_check.check_scalar_loss`) or not the reduction
                ``loss_reduction`` says: the run's first step would stop on each.
        """
        rows = int(inputs[0].shape[0])
        # the first micro-batch's targets, as step() splits them (into the parts that give
        # micro-batches of these rows)
        parts = math.ceil(self.batch / rows)
        check_rows_split(self.targets, self.batch, parts)  # as step() refuses them
        targets = split(self.targets, parts)[0]
        checked = rows < self.batch
        key = json.dumps(
            {
                "profile": graph.key,
                "loss": self.identity,
                "reduction": self.reduction
                if isinstance(self.reduction, str)
                else loss_identity(self.reduction),
                "targets": _meta(targets),
                "checked": checked,
                "clock": f"median of {REPEATS} after {WARMUP}",
            },
            sort_keys=True,
        )
        path = None if self.profile_dir is None else Path(self.profile_dir) / LOSS_COSTS_FILE
        saved = {} if path is None else read_json_table(path, "timing the loss again", self.log)
        figures = saved.get(key)
        if _plausible(figures):
            cost, said = LossCost(*figures), f"reused from {path}"
            if checked:  # the refusals hold whatever the cache says (helper-178): checked once
                measure_loss(model, inputs, targets, self.loss_fn, self.reduction, True, self.device, 1)
        else:
            timed = measure_loss(model, inputs, targets, self.loss_fn, self.reduction, checked, self.device)
            cost, said = timed, "timed"
            if path is not None:
                try:
                    update_json_table(path, key, [cost.fwd_s, cost.bwd_s])
                except OSError as exc:
                    self.log(f"timed the loss, but could not save it in {path} ({exc})")
        check = ", with its reduction check" if checked else ""
        self.log(
            f"loss on the last stage ({said}): forward {cost.fwd_s * 1e3:.3f} ms{check}, backward "
            f"{cost.bwd_s * 1e3:.3f} ms per micro-batch of {rows} rows"
        )
        return priced(graph, cost)


def _plausible(saved: object) -> bool:
    """Whether a cache entry holds two floats of seconds from 0 to an hour (a hand edit is
    timed again)."""
    return (
        isinstance(saved, list)
        and len(saved) == 2
        and all(isinstance(v, float) and 0 <= v <= 3600 for v in saved)
    )


def priced(graph: CostGraph, cost: LossCost) -> CostGraph:
    """``graph`` with its output node's ``fwd_s`` and ``bwd_s`` set to ``cost``'s (a copy;
    ``info["loss"]`` records them)."""
    nodes = [replace(n, fwd_s=cost.fwd_s, bwd_s=cost.bwd_s) if n.op == "output" else n for n in graph.nodes]
    info = {**graph.info, "loss": {"fwd_s": cost.fwd_s, "bwd_s": cost.bwd_s}}
    return replace(graph, nodes=nodes, info=info)


@profiling_modes()  # as the stages compute it, whatever the caller's modes (helper-184)
def measure_loss(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    reduction: Reduction,
    checked: bool,
    device: torch.device,
    repeats: int = REPEATS,
) -> LossCost:
    """Time ``loss_fn`` on ``model``'s output for the micro-batch ``inputs`` and its
    ``targets`` on ``device``: the median of ``repeats`` evaluations after :data:`WARMUP`
    (none after a single one: the checks alone, where a cached timing is reused), each forward
    (with :class:`CheckedLoss`'s check where ``checked``, as a split mini-batch's last stage
    runs it) and backward to the output, on the profile's clock
    (:class:`pipeoptim.compiler.profile.Timer`). ``model`` is copied, never changed.

    Raises:
        ProfileError, PipelineError: as :meth:`LossPricing.__call__`.
    """
    model = copy.deepcopy(model).to(device)
    with torch.no_grad(), hooks_silenced(model):  # compile runs no user hook
        output = model(*(x.to(device) for x in inputs))
    output = pytree.tree_map(  # leaves that collect the gradient (complex ones too: fft outputs)
        lambda x: (
            x.detach().requires_grad_(x.is_floating_point() or x.is_complex())
            if isinstance(x, torch.Tensor)
            else x
        ),
        output,
    )
    timer = Timer(device)
    warmup = WARMUP if repeats > 1 else 0
    fwd, bwd = [], []
    for i in range(warmup + repeats):
        forward, backward = _evaluate(output, targets, loss_fn, reduction, checked, device, timer)
        if i >= warmup:
            fwd.append(forward)
            bwd.append(backward)
    return LossCost(statistics.median(fwd), statistics.median(bwd))


def _evaluate(
    output: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    reduction: Reduction,
    checked: bool,
    device: torch.device,
    timer: Timer,
) -> tuple[float, float]:
    """One evaluation of :func:`measure_loss` on the model's ``output`` (leaves taking
    gradients, cleared after): its forward and backward seconds."""
    loss_of = CheckedLoss(loss_fn, reduction) if checked else loss_fn
    # copies: a loss that changes its targets in place changed the caller's (helper-173)
    given = pytree.tree_map(lambda x: x.to(device, copy=True) if isinstance(x, torch.Tensor) else x, targets)
    # copies of the output: as a stage's output, not leaves (a loss may change it in place,
    # which autograd refuses on a leaf, helper-175), and each evaluation on the same values
    out = pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, output)
    held: list[Any] = []
    fix = "fix loss_fn where it fails, or give example_targets of one mini-batch as step() gets them"
    try:
        forward = timer(lambda: held.append(loss_of(out, given)))
    except Exception as exc:
        raise ProfileError(
            f"loss_fn fails on the model's output and example_targets ({type(exc).__name__}: "
            f"{first_line(exc)}): {fix}"
        ) from exc
    check_scalar_loss(held[0])
    try:
        backward = timer(held[0].backward)  # it needs a gradient: check_scalar_loss
    except Exception as exc:  # a custom backward that raises (helper-178)
        raise ProfileError(
            f"loss_fn's backward fails ({type(exc).__name__}: {first_line(exc)}): {fix}"
        ) from exc
    if isinstance(loss_of, CheckedLoss):
        try:
            forward += timer(loss_of.check_pending)
        except PipelineError:  # the loss is not the reduction said: its own message
            raise
        except Exception as exc:  # the loss fails on a part of the rows (helper-178)
            raise ProfileError(
                f"loss_fn fails on part of a micro-batch's rows, where the run checks its reduction "
                f"({type(exc).__name__}: {first_line(exc)}): make loss_fn take any number of rows "
                "(no batch size written in it)"
            ) from exc
    leaves = [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.requires_grad]
    if all(x.grad is None for x in leaves):  # no gradient reaches the model: it would train nothing
        raise PipelineError(
            "loss_fn's value does not depend on the model's output (its backward reaches none "
            "of it, so training would change no weight): compute the loss from the output"
        )
    for x in leaves:
        x.grad = None
    return forward, backward


def loss_pricing(
    loss_fn: Callable[[Any, Any], torch.Tensor],
    reduction: Reduction,
    targets: Any,
    batch: int,
    device: torch.device,
    profile_dir: str | Path | None,
    log: Callable[[str], None],
) -> LossPricing | None:
    """``compile``'s :class:`LossPricing` for the mini-batch ``targets`` (``example_targets``);
    ``None`` where none are given, said in ``log``: the plans then leave the loss out."""
    if targets is None:
        log("the plan leaves the loss out (its time on the last stage): pass example_targets to price it")
        return None
    return LossPricing(loss_fn, reduction, targets, batch, device, profile_dir, log)
