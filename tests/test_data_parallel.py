"""Data × pipeline parallelism: N stages × R replicas (``compile(..., data_parallel=R)``).

References: plain training on the whole mini-batch (GPipe, 1F1B), the independent simulator
of ``tests/reference_sim.py`` run on whole mini-batches (every method: the replicas' summed
gradient is the whole mini-batch's), and replica against replica, bit for bit.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.errors import PipelineError
from pipeoptim.runtime.allreduce import sum_in_memory
from pipeoptim.runtime.spawning import free_port
from tests.test_reference_sim import OPTIMIZERS, make_batches, make_model, param_names, reference
from tests.test_training import SGD_MOMENTUM, data, plain_training

ROOT = Path(__file__).resolve().parents[1]
ASYNC = ("pipeoptim", "pipedream", "2bw", "spectrain", "none")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )


def compile_mlp(model: nn.Module, make_opt, method: str, executor: str, **options) -> pipeoptim.Pipeline:
    return pipeoptim.compile(
        model,
        make_opt(model),
        4,
        data_parallel=2,
        example_inputs=data(1)[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        executor=executor,
        profile_dir=None,
        timeout=120,
        **options,
    )


def per_stage_figures(pipe: pipeoptim.Pipeline) -> dict[str, list]:
    """What the pipeline reports per stage (stats, sent bytes, each stage's weights), as JSON."""
    stats = pipe.stats()
    return {
        "stats": [stats.prediction_error_samples, stats.staleness, stats.peak_weight_versions],
        "sent_bytes": pipe.sent_bytes(),
        "stage_weights": [sorted(part) for part in pipe.stage_state_dicts()],
    }


def assert_replicas_identical(pipe: pipeoptim.Pipeline) -> dict[str, torch.Tensor]:
    """Every replica's weights equal replica 0's bit for bit; returns replica 0's."""
    states = pipe._executor.replica_state_dicts()
    assert len(states) == pipe.replicas > 1 and states[0]
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        for key, value in states[0].items():
            assert torch.equal(other[key], value), key
    return states[0]


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
def test_flushing_methods_with_replicas_equal_plain_training(method: str) -> None:
    """2 stages × 2 replicas, M = 2 per replica: plain training on the whole mini-batch (its 4
    micro-batches accumulated)."""
    model = mlp()
    batches = data(6)
    expected, reference_model = plain_training(model, SGD_MOMENTUM[0], batches, micro=4)
    with compile_mlp(copy.deepcopy(model), SGD_MOMENTUM[0], method, "local", micro_batches=2) as pipe:
        assert pipe.num_stages == 2 and pipe.replicas == 2 and pipe.plan.config.data_parallel == 2
        got = [pipe.step(x, y).item() for x, y in batches]
        assert_replicas_identical(pipe)
        state = pipe.state_dict()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for key, value in reference_model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [*ASYNC, "gpipe"])
def test_every_method_with_replicas_equals_reference_simulator(tmp_path: Path, method: str) -> None:
    """2 stages × 2 replicas train as the simulator's 2-stage pipeline on whole mini-batches
    (float64, SGD with momentum and weight decay): every loss and weight to 1e-6."""
    model = make_model()
    opt = OPTIMIZERS["sgd"][0](model.parameters())
    batches = make_batches()
    with pipeoptim.compile(
        model,
        opt,
        4,
        data_parallel=2,
        example_inputs=batches[0][0],
        loss_fn=F.mse_loss,
        method=method,
        micro_batches=2 if method in ("2bw", "gpipe") else None,
        executor="local",
        profile_dir=tmp_path,
    ) as pipe:
        stage_of = pipe.plan.stage_of
        layer_stages = [stage_of[f"_{2 * i}_weight"] for i in range(len(param_names()) // 2)]
        losses = [pipe.step(x, y) for x, y in batches]
        pipe.flush()
        losses = [float(loss) for loss in losses]
        state = assert_replicas_identical(pipe)
    lrs = [0.1] * len(batches)
    want_losses, want_weights = reference(method, 2, "sgd", layer_stages, lrs)
    assert losses == pytest.approx(want_losses, abs=1e-6)
    for name, want in zip(param_names(), want_weights):
        torch.testing.assert_close(state[name], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ASYNC)
def test_asynchronous_replicas_stay_bit_identical_over_50_steps(method: str) -> None:
    model = mlp()
    batches = data(50, seed=3)
    with compile_mlp(
        model, SGD_MOMENTUM[0], method, "local", micro_batches=2 if method == "2bw" else None
    ) as pipe:
        losses = [pipe.step(x, y) for x, y in batches]
        pipe.flush()
        assert all(torch.isfinite(torch.tensor(float(loss))) for loss in losses)
        state = assert_replicas_identical(pipe)
    assert not torch.equal(state["1.weight"], mlp().state_dict()["1.weight"])  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("method", ["1f1b", "pipeoptim"])
def test_processes_equal_local_executor_bit_for_bit(method: str) -> None:
    """4 worker processes (2 stages × 2 replicas, gloo all-reduce) compute exactly what the
    local executor does; 1F1B equals plain training too, the replicas stay identical."""
    batches = data(50 if method == "pipeoptim" else 6, seed=3)
    runs, plan = {}, None
    for executor in ("local", "processes"):  # the same plan (a plan follows the profile's timings)
        with compile_mlp(mlp(), SGD_MOMENTUM[0], method, executor, plan=plan) as pipe:
            losses = list(pipe.train(batches))
            runs[executor], plan = (losses, assert_replicas_identical(pipe)), pipe.plan
    assert runs["processes"][0] == runs["local"][0]
    for key, value in runs["local"][1].items():
        assert torch.equal(runs["processes"][1][key], value), key
    if method == "1f1b":
        expected, reference_model = plain_training(mlp(), SGD_MOMENTUM[0], batches, micro=4)
        assert runs["processes"][0] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        for key, value in reference_model.state_dict().items():
            torch.testing.assert_close(runs["processes"][1][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torchrun_replicas_equal_local_executor(tmp_path: Path) -> None:
    """4 torchrun ranks, 2 stages × 2 replicas, 1F1B; ranks other than each replica's first and
    last stages pass None for inputs and targets."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "4",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        str(ROOT / "tests" / "torchrun_replicas_script.py"),
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(4)]
    assert all(r["losses"] == ranks[0]["losses"] for r in ranks)  # every rank sees every loss
    assert ranks[0]["replicas"][0] == ranks[0]["replicas"][1]
    # the job's plan: each run profiles, and a cut moved by timings changes the per-stage
    # figures (they differed once in .ci/run on 2026-12-07, not again in 7 runs here)
    with compile_mlp(mlp(), SGD_MOMENTUM[0], "1f1b", "local", plan=tmp_path / "out.plan.json") as pipe:
        losses = list(pipe.train(data(6, seed=3)))
        state = {k: v.tolist() for k, v in pipe.state_dict().items()}
        per_stage = per_stage_figures(pipe)
    assert ranks[0]["losses"] == losses
    assert ranks[0]["replicas"][0] == state
    # one entry per stage, replica 0's (one per rank under torchrun, helper-138)
    assert all(r["per_stage"] == per_stage for r in ranks)


def test_sum_in_memory_keeps_no_gradient_where_no_replica_has_one() -> None:
    """A parameter with a gradient on one replica gets the sum (the other counts zero); one
    with a gradient on none keeps ``grad is None``, as plain training on the whole batch."""
    replicas = [[torch.zeros(2, requires_grad=True) for _ in range(3)] for _ in range(2)]
    replicas[0][0].grad = torch.tensor([1.0, 2.0])
    replicas[1][0].grad = torch.tensor([0.5, 0.25])
    replicas[1][1].grad = torch.tensor([3.0, 4.0])
    sum_in_memory(replicas)
    for params in replicas:
        assert params[0].grad.tolist() == [1.5, 2.25]
        assert params[1].grad.tolist() == [3.0, 4.0]
        assert params[2].grad is None


def test_bad_layouts_are_clear_errors() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="divides gpus"):
        pipeoptim.compile(
            model,
            SGD_MOMENTUM[0](model),
            3,
            data_parallel=2,
            example_inputs=data(1)[0][0],
            loss_fn=F.cross_entropy,
            executor="local",
            profile_dir=None,
        )
    with pytest.raises(ValueError, match="max_grad_norm with data_parallel"):
        compile_mlp(model, SGD_MOMENTUM[0], "pipeoptim", "local", max_grad_norm=1.0)
    with pytest.raises(ValueError, match="float16 with data_parallel"):
        compile_mlp(model, SGD_MOMENTUM[0], "pipeoptim", "local", autocast=torch.float16)
    with (
        compile_mlp(model, SGD_MOMENTUM[0], "pipeoptim", "local") as pipe,
        pytest.raises(PipelineError, match="cannot be split across 2 data-parallel replicas"),
    ):
        pipe.step(*data(1, batch=1)[0])


def layout_case(tied: bool):
    """``(model(seed), optimizer factory, batches, compile(model, opt, gpus, replicas, m))``: the
    MLP with AdamW, or the GPT with tied embeddings (tests/test_shared_params.py) with SGD."""
    from pipeoptim.examples import TinyGPT
    from tests import test_shared_params as tied_gpt

    if tied:

        def gpt_model(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            return TinyGPT(vocab=tied_gpt.VOCAB, dim=16, heads=2, layers=2, context=tied_gpt.SEQ)

        return gpt_model, tied_gpt.make_opt("gpipe"), tied_gpt.batches(6), tied_gpt.lm_loss

    def mlp_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
        )

    adamw = lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)  # noqa: E731
    return mlp_model, adamw, data(6, seed=5), F.cross_entropy


@pytest.mark.parametrize("tied", [False, True], ids=["mlp", "tied-gpt"])
@pytest.mark.parametrize("stages, replicas", [(4, 1), (1, 4)])
def test_checkpoint_of_2x2_loads_into_any_layout(
    tmp_path: Path, stages: int, replicas: int, tied: bool
) -> None:
    """One copy of each parameter and its optimizer state is saved; a pipeline of another
    layout resumes from it and trains on as the 2 × 2 one does (GPipe: every layout equals
    plain training). The tied GPT's embedding is held by both stages of both replicas in the
    2 × 2 layout, by stages 0 and 3 in 4 × 1 and by the single stage in 1 × 4."""
    make_model, make_opt, batches, loss_fn = layout_case(tied)

    def build(model: nn.Module, gpus: int, r: int, m: int) -> pipeoptim.Pipeline:
        return pipeoptim.compile(
            model,
            make_opt(model),
            gpus,
            data_parallel=r,
            example_inputs=batches[0][0],
            loss_fn=loss_fn,
            method="gpipe",
            micro_batches=m,
            executor="local",
            profile_dir=None,
        )

    with build(make_model(0), 4, 2, 2) as pipe:
        assert not tied or pipe.plan.shared == {"tok_weight": [0, 1]}
        for x, y in batches[:3]:
            pipe.step(x, y)
        pipe.save_checkpoint(tmp_path / "ckpt.pt")
        saved = pipe.state_dict()
        expected = [pipe.step(x, y).item() for x, y in batches[3:]]
        final = pipe.state_dict()
    with build(make_model(1), stages * replicas, replicas, 4 // replicas) as other:  # other weights
        other.load_checkpoint(tmp_path / "ckpt.pt")
        assert other.mini_batches_done == 3
        loaded = other.state_dict()
        if tied and stages == 4:
            assert other.plan.shared == {"tok_weight": [0, 3]}
            held = other.stage_state_dicts()
            assert torch.equal(held[0]["tok.weight"], saved["tok.weight"])
            assert torch.equal(held[3]["tok.weight"], saved["tok.weight"])
        got = [other.step(x, y).item() for x, y in batches[3:]]
        if replicas > 1:
            assert_replicas_identical(other)
        state = other.state_dict()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for key, value in final.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


def test_replicated_local_executor_implements_the_executor_protocol() -> None:
    """Every method of ``Executor`` with the same parameter names (as tests/test_architecture.py
    checks for the other executors)."""
    import inspect

    from pipeoptim.runtime.launch import Executor
    from pipeoptim.runtime.replicas import ReplicatedLocalExecutor

    for name, fn in vars(Executor).items():
        if inspect.isfunction(fn) and not name.startswith("_"):
            have = inspect.signature(getattr(ReplicatedLocalExecutor, name)).parameters
            assert list(have) == list(inspect.signature(fn).parameters), name
