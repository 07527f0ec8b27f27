"""The runtime's CPU time per action (pipeoptim.action_overhead), for the cost model."""

from __future__ import annotations

import pytest

from pipeoptim.action_overhead import measure_action_overhead, overhead_per_action
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.plan import make_plan
from tests.test_cost_overheads import chain


def test_overhead_is_the_cpu_time_beyond_the_profiled_work_per_action() -> None:
    # two stages of 1 ms forward + 2 ms backward each and 4000 parameter bytes at 1e-7 s per
    # byte of optimizer step (0.4 ms): 3.4 ms profiled per stage and mini-batch
    config = CostConfig(num_stages=2, method="none", step_s_per_byte=1e-7)
    plan = make_plan(chain([1e-3, 1e-3]), config)
    assert [s.fwd_s + s.bwd_s + s.update_s for s in plan.stages] == pytest.approx([3.4e-3, 3.4e-3])
    # 100 mini-batches took 0.98 s of CPU in all: 9.8 ms each, 3 ms beyond the 6.8 ms
    # profiled, over 2 stages x 3 actions
    assert overhead_per_action(0.98, 100, plan, 3) == pytest.approx(3e-3 / 6)
    assert overhead_per_action(0.5, 100, plan, 3) == 0.0  # less than profiled: no overhead
    with pytest.raises(ValueError, match="at least one"):
        overhead_per_action(1.0, 0, plan, 3)


@pytest.mark.slow
def test_measured_overhead_is_positive_and_below_a_stage_step() -> None:
    # the runtime's own work per action: more than nothing, less than 20 ms on any machine
    # that runs this suite (0.45-0.7 ms on the 2-core CI machine)
    seconds = measure_action_overhead(stages=2, mini_batches=60, warmup=5, timeout=120)
    assert 0 < seconds < 0.02
    with pytest.raises(ValueError, match="stages >= 1"):
        measure_action_overhead(stages=0)
