"""Clipping and float16 loss scaling for the asynchronous methods (issue 18) against the
independent reference (``tests/reference_async_norms.py`` on ``tests/reference_sim.py``)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pipeoptim
from pipeoptim.errors import PlanError
from pipeoptim.runtime.spawning import free_port
from tests.reference_async_norms import Recorder, grad_rule
from tests.reference_sim import simulate
from tests.test_reference_sim import (
    LAYERS,
    MINI_BATCHES,
    OPTIMIZERS,
    SCHEDULES,
    TOL,
    gap,
    make_batches,
    make_model,
    param_names,
)

CLIP = 0.05  # below the global norms of the tanh MLP's first mini-batches: every stage clips


def run(
    method: str, stages: int, optimizer: str, schedule: str, profiles, inject=None, overflow=False, **options
):
    """Train through the public API (``inject``: ``(stage, mini-batch)`` whose first weight's
    gradient is made +inf, local executor; ``overflow``: in float32, the first targets ×1e3);
    returns losses, weights, layer stages, rates and stage 0's final loss scale (or ``None``)."""
    model = make_model()
    batches = make_batches()
    if overflow:
        model = model.float()
        batches = [(x.float(), y.float() * (1e3 if i == 0 else 1.0)) for i, (x, y) in enumerate(batches)]
    opt = OPTIMIZERS[optimizer][0](model.parameters())
    sched = SCHEDULES[schedule](opt) if SCHEDULES[schedule] else None
    options.setdefault("executor", "local")
    options.setdefault("timeout", 180)  # generous: worker start-up on 2 shared cores can take a minute
    with pipeoptim.compile(
        model,
        opt,
        stages,
        example_inputs=batches[0][0],
        loss_fn=F.mse_loss,
        method=method,
        profile_dir=profiles,
        **options,
    ) as pipe:
        layer_stages = [pipe.plan.stage_of[f"_{2 * i}_weight"] for i in range(LAYERS)]
        if inject is not None:
            poison(pipe._executor.stages[inject[0]], inject[1])
        pending, lrs = [], []
        for x, y in batches:
            lrs.append(opt.param_groups[0]["lr"])
            pending.append(pipe.step(x, y))
            if sched is not None:
                sched.step()
        pipe.flush()
        losses = [float(loss) for loss in pending]
        state = pipe.state_dict()
        scale = None
        if options["executor"] == "local" and pipe._executor.stages[0].scaler is not None:
            scale = pipe._executor.stages[0].scaler.scale
    return losses, [state[name] for name in param_names()], layer_stages, lrs, scale


def poison(stage, mini_batch: int) -> None:
    """Make the gradient of the stage's first weight +inf in ``mini_batch`` (one micro-batch each)."""
    weight = next(p for name, p in stage.module.named_parameters() if name.endswith("weight"))
    calls = []

    def hook(p: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == mini_batch + 1:
            p.grad.fill_(math.inf)

    weight.register_post_accumulate_grad_hook(hook)


def reference(method, stages, optimizer, layer_stages, lrs, micro_batches=1, inject=None, **rule):
    initial = make_model().state_dict()
    stage_of_param = [s for s in layer_stages for _ in range(2)]
    where = None if inject is None else {inject[1]: 2 * layer_stages.index(inject[0])}
    record = Recorder()
    result = simulate(
        method,
        [initial[name] for name in param_names()],
        layer_stages,
        stages,
        make_batches(),
        lrs,
        OPTIMIZERS[optimizer][1],
        grad_rule=grad_rule(
            stage_of_param, stages, MINI_BATCHES, micro_batches, inject=where, record=record, **rule
        ),
    )
    return result, record


CASES = [
    ("pipeoptim", 2, "adam", "lambda"),
    ("pipeoptim", 3, "sgd", "cosine"),
    ("pipeoptim", 4, "adamw", "constant"),
    ("pipedream", 3, "sgd", "cosine"),
    ("none", 4, "adam", "constant"),
    ("spectrain", 3, "sgd", "constant"),
]


@pytest.mark.parametrize(("method", "stages", "optimizer", "schedule"), CASES)
def test_clipping_equals_reference(method, stages, optimizer, schedule, profiles) -> None:
    *got, _ = run(method, stages, optimizer, schedule, profiles, max_grad_norm=CLIP)
    losses, weights, layer_stages, lrs = got
    (expected, _) = reference(method, stages, optimizer, layer_stages, lrs, max_norm=CLIP)
    assert gap((losses, weights), expected) <= TOL
    # the test can fail: without the earlier stages' parts, or without clipping, it is another run
    (known_only, _) = reference(method, stages, optimizer, layer_stages, lrs, max_norm=CLIP, older=False)
    assert gap((losses, weights), known_only) > 100 * TOL
    (plain, _) = reference(method, stages, optimizer, layer_stages, lrs)
    assert gap((losses, weights), plain) > 100 * TOL


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("profiles")


def test_worker_processes_equal_reference(profiles) -> None:
    """The same rule with one worker process per stage (clipping and the float16 machinery)."""
    options = dict(max_grad_norm=CLIP, autocast=torch.float16, executor="processes")
    *got, _ = run("pipedream", 3, "adam", "lambda", profiles, **options)
    losses, weights, layer_stages, lrs = got
    expected, _ = reference("pipedream", 3, "adam", layer_stages, lrs, max_norm=CLIP, float16=True)
    assert gap((losses, weights), expected) <= TOL


@pytest.mark.parametrize(
    ("method", "optimizer", "inject"),
    [("pipeoptim", "sgd", (1, 3)), ("pipedream", "adam", (0, 2)), ("none", "sgd", (2, 1))],
    ids=["stage1-overflows", "stage0-alone", "last-stage"],
)
def test_float16_skips_where_a_later_stage_overflowed(method, optimizer, inject, profiles) -> None:
    """An inf in stage j's gradient of mini-batch t: stages 0..j skip t, the later ones step it
    (they stepped before j's gradient existed), and stage 0 halves S. float64 model: autocast
    leaves it in float64, so the loss scale changes no number but the skipped steps."""
    options = dict(max_grad_norm=CLIP, autocast=torch.float16)
    *got, scale = run(method, 3, optimizer, "cosine", profiles, inject=inject, **options)
    losses, weights, layer_stages, lrs = got
    expected, record = reference(
        method, 3, optimizer, layer_stages, lrs, inject=inject, max_norm=CLIP, float16=True
    )
    assert record.skipped == {inject[1]: list(range(inject[0] + 1))}
    assert scale == record.scale == 2.0**15
    assert gap((losses, weights), expected) <= TOL
    clean, _ = reference(method, 3, optimizer, layer_stages, lrs, max_norm=CLIP, float16=True)
    assert gap((losses, weights), clean) > 100 * TOL


@pytest.mark.parametrize(("stages", "micro_batches"), [(2, 2), (3, 3)])
def test_2bw_clipping_equals_reference(stages: int, micro_batches: int, profiles) -> None:
    """PipeDream-2BW: a mini-batch of M micro-batches, its parts sent with the last one's gradient."""
    *got, _ = run("2bw", stages, "adamw", "cosine", profiles, max_grad_norm=CLIP, micro_batches=micro_batches)
    losses, weights, layer_stages, lrs = got
    expected, _ = reference("2bw", stages, "adamw", layer_stages, lrs, micro_batches, max_norm=CLIP)
    assert gap((losses, weights), expected) <= TOL
    known_only, _ = reference(
        "2bw", stages, "adamw", layer_stages, lrs, micro_batches, max_norm=CLIP, older=False
    )
    assert gap((losses, weights), known_only) > 100 * TOL


def test_worker_processes_equal_local_executor_bit_for_bit(profiles) -> None:
    """A float32 model under float16 autocast with clipping, 3 stages, whose first mini-batch
    overflows (targets ×1e3: the last stage's float16 input gradient is over 65,504): worker
    processes compute the very numbers of the local executor (whose rule the other tests check
    against the reference)."""
    options = dict(max_grad_norm=CLIP, autocast=torch.float16, overflow=True)
    local = run("pipeoptim", 3, "adam", "lambda", profiles, **options)
    procs = run("pipeoptim", 3, "adam", "lambda", profiles, executor="processes", **options)
    assert local[4] == 2.0**15  # stage 0 found the inf of mini-batch 0 and halved S
    assert local[0] == procs[0] and all(map(math.isfinite, local[0]))
    assert all(torch.equal(a, b) for a, b in zip(local[1], procs[1]))


def test_a_resumed_run_clips_as_one_that_flushed(tmp_path, profiles) -> None:
    """Checkpoints keep stage 0's S and the parts it sends forward: after a reload the stages
    clip as after a plain flush at the same mini-batch (bit for bit)."""
    model = make_model().float()
    batches = [(x.float(), y.float() * (1e3 if i == 0 else 1.0)) for i, (x, y) in enumerate(make_batches())]
    options = dict(
        method="pipeoptim",
        executor="local",
        max_grad_norm=CLIP,
        autocast=torch.float16,
        loss_fn=F.mse_loss,
        example_inputs=batches[0][0],
        profile_dir=profiles,
    )

    def compiled(net):
        return pipeoptim.compile(net, torch.optim.Adam(net.parameters(), lr=0.01), 3, **options)

    with compiled(copy.deepcopy(model)) as pipe:
        first = [pipe.step(x, y) for x, y in batches[:3]]
        pipe.flush()
        second = [pipe.step(x, y) for x, y in batches[3:]]
        pipe.flush()
        expected = ([float(v) for v in first + second], pipe.state_dict())
    with compiled(copy.deepcopy(model)) as pipe:
        first = [float(pipe.step(x, y)) for x, y in batches[:3]]
        pipe.save_checkpoint(tmp_path / "ckpt.pt")
        scale = pipe._executor.stages[0].scaler.scale
    with compiled(copy.deepcopy(model)) as pipe:
        pipe.load_checkpoint(tmp_path / "ckpt.pt")
        assert pipe._executor.stages[0].scaler.scale == scale == 2.0**15
        assert pipe._executor.stages[0].async_norms.known[0] == 2
        got = (first + [float(pipe.step(x, y)) for x, y in batches[3:]], pipe.state_dict())
    assert got[0] == expected[0]
    assert all(torch.equal(got[1][key], value) for key, value in expected[1].items())


@pytest.mark.slow
def test_torchrun_ranks_equal_local_executor_bit_for_bit(tmp_path) -> None:
    """The same float16 run with clipping under ``torchrun`` (2 ranks): the numbers of the
    local executor on the job's plan, bit for bit (planned again, the local run could put a
    layer elsewhere: the plan follows timings measured again, and once did)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    cmd += [str(root / "tests" / "torchrun_norms_script.py"), str(tmp_path / "out"), str(tmp_path / "p")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    options = dict(max_grad_norm=CLIP, autocast=torch.float16, overflow=True, plan=tmp_path / "out.plan.json")
    losses, weights, layer_stages, *_ = run("pipeoptim", 2, "adam", "constant", tmp_path / "p", **options)
    assert layer_stages == [ranks[0]["plan"][f"_{2 * i}_weight"] for i in range(LAYERS)]
    assert ranks[0]["losses"] == ranks[1]["losses"] == losses
    for name, value in zip(param_names(), weights):
        assert torch.equal(torch.tensor(ranks[0]["state"][name], dtype=value.dtype), value), name


def test_weights_shared_between_stages_are_refused(profiles) -> None:
    """Tied weights sum their copies' gradients at the step, after the parts have been sent."""
    from tests.test_tied_weights import TiedEmbedding

    model = TiedEmbedding()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 10, (8,))
    with pytest.raises(
        PlanError, match="stage 0 shares weights with another stage: max_grad_norm and float16"
    ):
        pipeoptim.compile(
            model, opt, 2, example_inputs=ids, loss_fn=F.cross_entropy, executor="local", max_grad_norm=1.0
        )
