"""``compile(..., compile_stages=...)``: every stage runs through ``torch.compile`` (issue 18)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import pipeoptim


def mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)]
    return nn.Sequential(*layers[:2], *([nn.Dropout(dropout)] if dropout else []), *layers[2:])


def batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    out = [(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]
    return [*out, (out[0][0][:5], out[0][1][:5])]  # a last, smaller mini-batch


def make_opt(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def compile_two_stages(model: nn.Module, example: torch.Tensor, compile_stages: bool | str, **options):
    """``model`` compiled into 2 stages with SGD, cross-entropy and no profile folder."""
    options = {"executor": "local", **options}
    return pipeoptim.compile(
        model,
        make_opt(model),
        2,
        example_inputs=example,
        loss_fn=F.cross_entropy,
        profile_dir=None,
        compile_stages=compile_stages,
        **options,
    )


def train(
    method: str, executor: str, compile_stages: bool | str, data, dropout: float = 0.0, plan=None
) -> tuple[list[float], dict, pipeoptim.Plan]:
    """Losses, weights and plan (given back, a run repeats the cut, on which PipeOptim's
    numbers and the stages' dropout draws depend)."""
    with compile_two_stages(
        mlp(dropout), data[0][0], compile_stages, method=method, executor=executor, plan=plan
    ) as pipe:
        losses = [pipe.step(x, y) for x, y in data]
        pipe.flush()
        return [loss.item() for loss in losses], pipe.state_dict(), pipe.plan


@pytest.mark.parametrize("method", ["1f1b", "pipeoptim"])
def test_compiled_stages_run_compiled_graphs_and_equal_eager_stages(method: str) -> None:
    data = batches()
    eager_losses, eager_state, plan = train(method, "local", False, data)
    counters.clear()
    losses, state, _ = train(method, "local", "aot_eager", data, plan=plan)
    assert counters["stats"]["unique_graphs"] >= 2  # one per stage at least: compiled frames ran
    assert not counters["graph_break"]
    assert losses == pytest.approx(eager_losses, rel=1e-6, abs=1e-7)
    for key, value in eager_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_inductor_stages_equal_eager_stages_dropout_included() -> None:
    """Inductor generates and builds C++ for each stage (about a minute on a loaded 2-core
    machine, less with its cache warm): one mini-batch shape, so each stage compiles once.
    Eager stages equal plain training (tests/test_training.py); inductor's equal them, their
    dropout masks too: inductor drew them with its own kernels (helper-121: weights 2.2e-2 off
    after 3 steps) until it was told to call torch's (``fallback_random``)."""
    data = batches(3)[:3]
    expected, reference, plan = train("1f1b", "local", False, data, dropout=0.5)
    losses, state, _ = train("1f1b", "local", True, data, dropout=0.5, plan=plan)
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


def test_compile_stages_errors(monkeypatch) -> None:
    model = mlp()
    kwargs = {"example_inputs": torch.randn(4, 8), "loss_fn": F.cross_entropy, "executor": "local"}
    with pytest.raises(ValueError, match=r"'nope' is not a torch\.compile backend"):
        pipeoptim.compile(model, make_opt(model), 2, compile_stages="nope", **kwargs)
    from torch._inductor import cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ValueError, match=r"needs a C\+\+ compiler .* compile_stages='aot_eager'"):
        pipeoptim.compile(copy.deepcopy(model), make_opt(model), 2, compile_stages=True, **kwargs)


def test_train_command_passes_compile_stages(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from pipeoptim import training
    from pipeoptim.cli.main import cli

    seen: dict = {}

    def fake_compile(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(training.pipeoptim, "compile", fake_compile)
    args = [
        "train",
        "digits",
        "--gpus",
        "2",
        "--stages",
        "2",
        "--executor",
        "local",
        "--limit",
        "64",
        "--quiet",
    ]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a"), "--compile-stages"])
    assert result.exit_code == 1 and "stop here" in result.stderr
    assert seen["compile_stages"] is True
    plain = ["train", "digits", "--executor", "local", "--limit", "64", "--quiet"]  # no stages to force
    sequential = [*plain, "--method", "sequential", "--out", str(tmp_path / "b"), "--compile-stages"]
    result = CliRunner().invoke(cli, sequential)
    assert result.exit_code == 1 and "--compile-stages compiles pipeline stages" in result.stderr


def test_checkpointed_regions_run_eagerly_inside_compiled_stages() -> None:
    from tests.test_recompute import Checkpointed

    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    results = []
    for compile_stages in (False, "aot_eager"):
        with compile_two_stages(
            Checkpointed(), data[0][0], compile_stages, method="1f1b", micro_batches=2
        ) as pipe:
            counters.clear()
            results.append(([pipe.step(x, y).item() for x, y in data], pipe.state_dict()))
            breaks = dict(counters["graph_break"])
            graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2 and breaks  # compiled graphs ran, broken around the regions ...
    assert all("torch.compiler.disable" in reason for reason in breaks)  # ... and nowhere else
    (eager, eager_state), (got, state) = results
    assert got == pytest.approx(eager, rel=1e-6, abs=1e-7)
    for key, value in eager_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)


def test_deferred_batch_norm_compiles_once_per_shape_and_equals_eager_stages() -> None:
    """helper-121: the deferred BatchNorm's row count and sums, changed at every micro-batch
    inside the compiled graph, made torch.compile compile again each time until its recompile
    limit (8), then run the stages eagerly, with only torch's warning; its accumulation now
    runs outside the graph."""
    g = torch.Generator().manual_seed(5)
    sizes = [12, 12, 9, 7, 11, 10, 8, 12, 9, 7]
    data = [(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]

    def run(compile_stages: bool | str) -> tuple[list[int], dict]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        compiled = []
        options = {"method": "gpipe", "micro_batches": 3, "batch_norm": "deferred"}
        with compile_two_stages(model, data[0][0], compile_stages, **options) as pipe:
            for x, y in data:
                pipe.step(x, y).wait()
                compiled.append(counters["stats"]["unique_graphs"])
            return compiled, pipe.state_dict()

    _, eager = run(False)
    counters.clear()
    compiled, state = run("aot_eager")
    assert not [why for why in counters["unimplemented"] if "recompile limit" in why]  # not fallen back
    assert compiled[3] == compiled[-1], compiled  # new sizes after the first two: no new graphs
    for key, value in eager.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
