"""The profiles ``pipeoptim partition`` plans each layout from: a MODEL's example inputs cut or
repeated to the layout's micro-batch, with the loss priced on the last stage where the
factory gave example targets and a loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pipeoptim.cli.loading import LoadedModel, rows_of, with_rows
from pipeoptim.compiler import profile_model
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.loss_cost import LossPricing
from pipeoptim.microbatch import Reduction


def factory_loss(
    loaded: LoadedModel,
    reduction: Reduction,
    mini_batch: int,
    device: torch.device,
    profile_dir: str | None,
    log: Callable[[str], None],
) -> LossPricing | None:
    """The pricing of the loss ``loaded``'s factory returned, on ``mini_batch`` rows of its
    targets (cut or repeated, as ``compile``'s ``example_targets``); ``None``, said in ``log``,
    where it returned no targets or loss: the plans then leave the loss out."""
    if loaded.loss_fn is None or loaded.targets is None:  # as compile's example_targets=None
        log(
            "the plan leaves the loss out (its time on the last stage): a factory returning "
            "(model, example_inputs, example_targets, loss_fn) prices it"
        )
        return None
    targets = with_rows(loaded.targets, mini_batch)
    return LossPricing(loaded.loss_fn, reduction, targets, mini_batch, device, profile_dir, log)


class Profiles:
    """A :data:`~pipeoptim.compiler.layouts.Profiler` of ``net``: ``examples`` (``[b, ...]``
    each) cut or repeated to the rows asked for, each size profiled once (and cached in
    ``profile_dir``) and, with ``loss``, its output node timed as the loss
    (:class:`pipeoptim.loss_cost.LossPricing`, as ``compile`` prices it)."""

    def __init__(
        self,
        net: nn.Module,
        examples: Sequence[torch.Tensor],
        leaf: Sequence[str],
        profile_dir: str | None,
        device: torch.device | None,
        log: Callable[[str], None],
        loss: LossPricing | None = None,
    ) -> None:
        self.net, self.examples, self.leaf = net, tuple(examples), list(leaf)
        self.profile_dir, self.device, self.log, self.loss = profile_dir, device, log, loss
        self.graphs: dict[int, CostGraph] = {}
        #: whether every profile so far came from the cache
        self.reused = True

    def profile(self, rows: int) -> CostGraph:
        """The (priced) profile of a micro-batch of ``rows`` rows.

        Raises:
            ProfileError, PipelineError: profiling fails, or the loss does (as ``compile``).
        """
        if rows not in self.graphs:
            inputs = tuple(rows_of(x, rows) for x in self.examples)
            graph, reused = profile_model(
                self.net,
                inputs,
                leaf_modules=self.leaf,
                profile_dir=self.profile_dir,
                device=self.device,
                log=self.log,
            )
            self.reused &= reused
            self.graphs[rows] = graph if self.loss is None else self.loss(self.net, inputs, graph)
        return self.graphs[rows]
