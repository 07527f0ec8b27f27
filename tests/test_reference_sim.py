"""Every method against the independent reference simulator (``tests/reference_sim.py``).

The pipeline under test is built and driven through the public API only; the simulator
shares no code with the library. Both train the same tanh MLP in float64 on the same
mini-batches, with the user's learning-rate schedule, and must agree to 1e-6 in every loss
and every final weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from tests.reference_sim import Opt, simulate

WIDTHS = (6, 8, 8, 8, 3)
LAYERS = len(WIDTHS) - 1
BATCH = 8
MINI_BATCHES = 7
TOL = 1e-6

OPTIMIZERS = {
    "sgd": (
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
        Opt("sgd", momentum=0.9, weight_decay=0.01),
    ),
    "adam": (
        lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01),
        Opt("adam", weight_decay=0.01),
    ),
    "adamw": (
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05),
        Opt("adamw", weight_decay=0.05),
    ),
}

SCHEDULES = {
    "constant": None,
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 + 0.5 * t),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=MINI_BATCHES),
    # the rate and, inversely, SGD's momentum or Adam's β1 (cycle_momentum)
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2 * opt.param_groups[0]["lr"], total_steps=MINI_BATCHES
    ),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(LAYERS):
        layers.append(nn.Linear(WIDTHS[i], WIDTHS[i + 1]))
        if i < LAYERS - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).double()


def make_batches(count: int = MINI_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, WIDTHS[0], generator=g, dtype=torch.float64),
            torch.randn(BATCH, WIDTHS[-1], generator=g, dtype=torch.float64),
        )
        for _ in range(count)
    ]


def param_names() -> list[str]:
    return [f"{2 * i}.{kind}" for i in range(LAYERS) for kind in ("weight", "bias")]


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("profiles")


def run_pipeline(
    method: str,
    stages: int,
    optimizer: str,
    schedule: str,
    profiles,
    executor: str = "local",
    flushes: Sequence[int] = (),
    seen: list[Opt] | None = None,
    **options,
) -> tuple[list[float], list[torch.Tensor], list[int], list[float]]:
    """Train through the public API; returns losses, final weights, stage of each layer, rates.
    The pipeline flushes before each mini-batch in ``flushes``; ``seen`` gets the optimizer's
    hyperparameters of each mini-batch."""
    model = make_model()
    opt = OPTIMIZERS[optimizer][0](model.parameters())
    sched = SCHEDULES[schedule](opt) if SCHEDULES[schedule] else None
    batches = make_batches()
    with pipeoptim.compile(
        model,
        opt,
        stages,
        example_inputs=batches[0][0],
        loss_fn=F.mse_loss,
        method=method,
        executor=executor,
        profile_dir=profiles,
        timeout=60,
        **options,
    ) as pipe:
        stage_of = pipe.plan.stage_of
        layer_stages = [stage_of[f"_{2 * i}_weight"] for i in range(LAYERS)]
        assert layer_stages == [stage_of[f"_{2 * i}_bias"] for i in range(LAYERS)]
        # in order and in range; a stage may hold no layer where the planner's timings say so
        # (seen on a loaded machine): the simulator takes any such assignment
        assert layer_stages == sorted(layer_stages) and set(layer_stages) <= set(range(stages))
        pending, lrs = [], []
        for t, (x, y) in enumerate(batches):
            if t in flushes:
                pipe.flush()
            lrs.append(opt.param_groups[0]["lr"])
            if seen is not None:
                group = opt.param_groups[0]
                seen.append(replace(OPTIMIZERS[optimizer][1], momentum=group.get("momentum", 0.0)))
                seen[-1].betas = group.get("betas", seen[-1].betas)
            pending.append(pipe.step(x, y))
            if sched is not None:
                sched.step()
        pipe.flush()
        losses = [float(loss) for loss in pending]
        state = pipe.state_dict()
    return losses, [state[name] for name in param_names()], layer_stages, lrs


def reference(method: str, stages: int, optimizer: str, layer_stages, lrs, opt=None, **options):
    initial = make_model().state_dict()
    return simulate(
        method,
        [initial[name] for name in param_names()],
        layer_stages,
        stages,
        make_batches(),
        lrs,
        OPTIMIZERS[optimizer][1] if opt is None else opt,
        **options,
    )


def gap(a: tuple[list[float], list[torch.Tensor]], b: tuple[list[float], list[torch.Tensor]]) -> float:
    """Largest absolute difference of losses and final weights."""
    loss_gap = max(abs(x - y) for x, y in zip(a[0], b[0]))
    weight_gap = max(float((x - y).abs().max()) for x, y in zip(a[1], b[1]))
    return max(loss_gap, weight_gap)


CASES = [("sgd", "cosine"), ("adam", "lambda"), ("adamw", "constant"), ("adamw", "cosine")]


@pytest.mark.parametrize("method", ["pipeoptim", "pipedream", "none", "gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_method_equals_reference(method: str, stages: int, case, profiles) -> None:
    optimizer, schedule = case
    losses, weights, layer_stages, lrs = run_pipeline(method, stages, optimizer, schedule, profiles)
    expected = reference(method, stages, optimizer, layer_stages, lrs)
    assert gap((losses, weights), expected) <= TOL


@pytest.mark.parametrize("stages, micro_batches", [(1, 1), (2, 2), (2, 4), (3, 3), (4, 4)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_2bw_equals_reference(stages: int, micro_batches: int, case, profiles) -> None:
    """PipeDream-2BW: every stage computes mini-batch t on W(t − 1), at most two versions."""
    optimizer, schedule = case
    losses, weights, layer_stages, lrs = run_pipeline(
        "2bw", stages, optimizer, schedule, profiles, micro_batches=micro_batches
    )
    expected = reference("2bw", stages, optimizer, layer_stages, lrs)
    assert gap((losses, weights), expected) <= TOL


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_spectrain_equals_reference(stages: int, profiles) -> None:
    """SpecTrain: the momentum buffer as the smoothed gradient in both passes (constant rate)."""
    losses, weights, layer_stages, lrs = run_pipeline("spectrain", stages, "sgd", "constant", profiles)
    expected = reference("spectrain", stages, "sgd", layer_stages, lrs)
    assert gap((losses, weights), expected) <= TOL


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("case", [("adam", "lambda"), ("adamw", "cosine")], ids=lambda c: f"{c[0]}-{c[1]}")
def test_next_step_predictor_equals_reference(stages: int, case, profiles) -> None:
    optimizer, schedule = case
    losses, weights, layer_stages, lrs = run_pipeline(
        "pipeoptim", stages, optimizer, schedule, profiles, predictor="next-step"
    )
    expected = reference("pipeoptim", stages, optimizer, layer_stages, lrs, predictor="next-step")
    assert gap((losses, weights), expected) <= TOL
    paper = reference("pipeoptim", stages, optimizer, layer_stages, lrs)
    assert gap((losses, weights), paper) > 100 * TOL  # the variant is really another rule


def test_processes_executor_equals_reference(profiles) -> None:
    losses, weights, layer_stages, lrs = run_pipeline(
        "pipeoptim", 2, "adam", "lambda", profiles, executor="processes"
    )
    expected = reference("pipeoptim", 2, "adam", layer_stages, lrs)
    assert gap((losses, weights), expected) <= TOL


def test_reference_detects_a_wrong_rule(profiles) -> None:
    """The check can fail: a version difference one too large (the reference code's N − k),
    stashing compared with no correction, each differ far beyond the tolerance."""
    losses, weights, layer_stages, lrs = run_pipeline("pipeoptim", 3, "sgd", "constant", profiles)
    right = reference("pipeoptim", 3, "sgd", layer_stages, lrs)
    shifted = reference("pipeoptim", 3, "sgd", layer_stages, lrs, version_shift=1)
    assert gap((losses, weights), right) <= TOL
    assert gap((losses, weights), shifted) > 100 * TOL
    none = run_pipeline("none", 3, "sgd", "constant", profiles)
    assert gap(none[:2], reference("pipedream", 3, "sgd", layer_stages, lrs)) > 100 * TOL


@pytest.mark.parametrize("stages", [3, 4])
@pytest.mark.parametrize(
    "method, optimizer",
    [
        ("pipeoptim", "sgd"),
        ("pipeoptim", "adam"),
        ("spectrain", "sgd"),
        ("pipedream", "sgd"),
        ("none", "sgd"),
        ("2bw", "sgd"),
    ],
)
def test_flushes_and_cycled_momentum_equal_reference(
    method: str, optimizer: str, stages: int, profiles
) -> None:
    """A flush in mid-run, as every checkpoint makes, under a schedule that moves momentum or
    β1 with the rate: after the flush, the warm-up forwards of stage k run with no step in
    between, each predicting with its own mini-batch's hyperparameters (PipeOptim read the
    first's ΔW for all of them: losses 5e-3 off with Adam at 4 stages); and in each
    cool-down SpecTrain's backward predicts with the newest forwarded mini-batch's rate (it
    used the one just stepped: weights 4e-5 off)."""
    seen: list[Opt] = []
    losses, weights, layer_stages, lrs = run_pipeline(
        method, stages, optimizer, "onecycle", profiles, flushes=(3,), seen=seen
    )
    assert len({o.momentum if optimizer == "sgd" else o.betas for o in seen}) > 2  # it cycles
    expected = reference(method, stages, optimizer, layer_stages, lrs, opt=seen, flushes=(3,))
    assert gap((losses, weights), expected) <= TOL
