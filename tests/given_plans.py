"""Plans with the stage boundaries a test needs (the planner's choice depends on timings)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeoptim.compiler.assignment import PartitionResult
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.plan import Plan, plan_from_assignment
from pipeoptim.compiler.profile_cache import load_or_profile
from pipeoptim.compiler.trace import trace
from pipeoptim.methods import get_method


def plan_starting_at(
    model: nn.Module,
    micro_batch: Sequence[torch.Tensor],
    config: CostConfig,
    starts: Sequence[str],
    leaf_modules: Sequence[str] = (),
) -> Plan:
    """The plan whose stage ``k >= 1`` begins at graph node ``starts[k - 1]`` (nodes in order)."""
    assert len(starts) == config.num_stages - 1
    traced = trace(model, tuple(micro_batch), leaf_modules)
    graph, _ = load_or_profile(traced, tuple(micro_batch), profile_dir=None)
    names = [n.name for n in graph.nodes]
    firsts = [names.index(s) for s in starts]
    stage_of = [sum(i >= f for f in firsts) for i in range(len(names))]
    stage_of[-1] = config.num_stages - 1  # the output node
    result = PartitionResult(stage_of, "given", "", "given", False, None, 0.0, len(names))
    return plan_from_assignment(graph, config, result)


class Biases(nn.Module):
    """A chain of bias additions from zero: every bias has a constant gradient (it does not
    depend on the weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(4)) for _ in range(6)])

    def forward(self, x):
        for b in self.b:
            x = x * 0.5 + b
        return x


def biases_plan(method: str, stages: int, rows: int = 6) -> Plan:
    """Every stage holds 6 / ``stages`` of :class:`Biases`' biases (mini-batches of ``rows``): a
    plan from the profile's timings left stage 1 of 3 without one under load."""
    m = stages if get_method(method).micro_batched else 1
    config = CostConfig(stages, method=method, micro_batches=m)
    starts = {2: ["mul_3"], 3: ["mul_2", "mul_4"]}[stages]
    return plan_starting_at(Biases(), (torch.randn(rows // m, 4),), config, starts)
