"""float16 with loss scaling over all stages (``autocast=torch.float16``, issue 18)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeoptim.runtime.scaler import LossScaler
from tests.test_training import plain_training
from tests.test_training_features import Deep, compile_deep, deep_batches, sgd_fast


def plain_float16_training(model: nn.Module, make_opt, batches, micro: int, clip: float | None = None):
    """Plain PyTorch mixed precision: forward and loss under ``torch.autocast("cpu",
    torch.float16)``, ``torch.amp.GradScaler`` around the backward and the step (with
    ``clip_grad_norm_`` on the unscaled gradients when ``clip`` is given)."""
    model = copy.deepcopy(model)
    opt = make_opt(model)
    scaler = torch.amp.GradScaler("cpu")
    losses, scales = [], []
    for x, y in batches:
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(torch.tensor_split(x, micro), torch.tensor_split(y, micro)):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(xs), ys) * (xs.shape[0] / x.shape[0])
            scaler.scale(loss).backward()
            total += loss.item()
        scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        losses.append(total)
        scales.append(scaler.get_scale())
    return losses, model, scales


def overflowing_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first mini-batch's scaled float16 gradients overflow at the initial scale 2**16."""
    batches = deep_batches(5)
    return [(x * 100 if i == 0 else x, y) for i, (x, y) in enumerate(batches)]


@pytest.mark.parametrize(
    ("method", "stages", "executor", "clip"),
    [("gpipe", 2, "local", None), ("1f1b", 4, "local", 0.5), ("1f1b", 2, "processes", None)],
)
def test_float16_with_loss_scaling_equals_the_plain_model_with_grad_scaler(method, stages, executor, clip):
    batches = overflowing_batches()
    expected, reference, scales = plain_float16_training(Deep(), sgd_fast, batches, micro=2, clip=clip)
    assert scales[0] < 2.0**16  # the first step found an inf and was skipped
    float32, _ = plain_training(Deep(), sgd_fast, batches, micro=2, clip=clip)
    assert abs(float32[-1] - expected[-1]) > 1e-4  # float16 and the skipped steps change the numbers
    net = Deep()
    options = dict(
        method=method, micro_batches=2, executor=executor, autocast=torch.float16, max_grad_norm=clip
    )
    with compile_deep(net, stages, **options) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches]
        state = pipe.state_dict()
        boundary = [
            meta["dtype"] for name in pipe.plan.io[0].outputs for meta in pipe.plan.values[name]["meta"]
        ]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
    assert boundary == ["float16"]


def test_loss_scaler_follows_grad_scaler_rule() -> None:
    """Back-off on an inf or NaN, growth after ``growth_interval`` finite steps in a row, as
    ``torch.amp.GradScaler`` (independent of this runtime: the scaler itself, side by side)."""
    ours = LossScaler(growth_interval=3)
    theirs = torch.amp.GradScaler("cpu", growth_interval=3)
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    for norm in (float("inf"), 1.0, 1.0, 1.0, float("nan"), 1.0, 1.0, 1.0, 1.0):
        theirs.scale(torch.ones(()))  # GradScaler makes its scale lazily
        p.grad = torch.full((2,), norm * theirs.get_scale())
        theirs.step(opt)
        theirs.update()
        ours.update(norm)
        assert ours.scale == theirs.get_scale()


def test_float16_with_an_asynchronous_method_and_one_stage_equals_grad_scaler() -> None:
    """One stage: stage 0 is the last and knows everything, so the rule is GradScaler's."""
    batches = overflowing_batches()
    expected, reference, scales = plain_float16_training(Deep(), sgd_fast, batches, micro=1, clip=0.5)
    assert scales[0] < 2.0**16  # the first step found an inf and was skipped
    options = dict(method="pipeoptim", executor="local", autocast=torch.float16, max_grad_norm=0.5)
    with compile_deep(Deep(), 1, **options) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches]
        state = pipe.state_dict()
        assert pipe._executor.stages[0].scaler.scale == scales[-1]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)


def test_train_command_trains_in_float16_with_loss_scaling(tmp_path) -> None:
    from click.testing import CliRunner

    from pipeoptim.cli.main import cli

    def train(*extra: str) -> list[float]:
        out = tmp_path / ("_".join(extra) or "plain")
        args = [
            "train",
            "digits",
            "--gpus",
            "2",
            "--stages",
            "2",
            "--executor",
            "local",
            "--epochs",
            "1",
            "--limit",
            "128",
        ]
        if "sequential" in extra:  # one process, no stages to force
            args.remove("--stages")
            args.remove("2")
        args += ["--record-every", "1", "--quiet", "--profile-dir", str(tmp_path / "p"), "--out", str(out)]
        result = CliRunner().invoke(cli, [*args, *extra])
        assert result.exit_code == 0, result.stderr
        lines = (out / "train.csv").read_text().splitlines()[1:]
        return [float(line.split(",")[2]) for line in lines]

    for method in ("1f1b", "sequential"):  # the pipeline, and the plain reference trainer
        float16, float32 = train("--method", method, "--precision", "float16"), train("--method", method)
        assert len(float16) == 4 and all(map(math.isfinite, float16))
        # the forward is in float16: the first loss (before any step) differs from float32's
        # (runs on the CPU are deterministic), by how much depends on the CPU's float16 kernels
        # (6e-6 on an AMD EPYC, over 1e-5 elsewhere)
        assert float16[0] != float32[0] and abs(float16[0] - float32[0]) < 1e-2
    float16 = train("--method", "pipeoptim", "--precision", "float16", "--max-grad-norm", "1")
    assert len(float16) == 4 and all(map(math.isfinite, float16))  # asynchronous: issue 18


def test_the_loss_scale_is_saved_in_checkpoints(tmp_path) -> None:
    batches = overflowing_batches()
    expected, reference, scales = plain_float16_training(Deep(), sgd_fast, batches, micro=2)
    options = dict(method="gpipe", micro_batches=2, executor="local", autocast=torch.float16)
    with compile_deep(Deep(), 2, **options) as pipe:
        first = [pipe.step(x, y).item() for x, y in batches[:2]]
        pipe.save_checkpoint(tmp_path / "ckpt.pt")
    with compile_deep(Deep(), 2, **options) as pipe:
        pipe.load_checkpoint(tmp_path / "ckpt.pt")
        assert (
            [stage.scaler.scale for stage in pipe._executor.stages] == [scales[1], scales[1]] != [2.0**16] * 2
        )
        second = [pipe.step(x, y).item() for x, y in batches[2:]]
        state = pipe.state_dict()
    assert first + second == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)


def test_float16_loss_scaling_of_float16_parameters_is_refused_as_grad_scaler_refuses_it() -> None:
    """helper-121: model.half() under autocast=torch.float16 trained without a word, where
    torch.amp.GradScaler refuses to unscale float16 gradients (small ones flush to zero)."""
    model = Deep().half()
    with pytest.raises(
        ValueError, match=r"but \S+ is float16 .* keep the parameters in float32 \(model.float\(\)\)"
    ):
        compile_deep(model, 2, autocast=torch.float16, executor="local")
