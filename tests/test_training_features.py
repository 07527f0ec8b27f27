"""Training features and user code the pipeline must keep: parameters without a gradient,
hooks, optimizer timing, global gradient clipping, mixed precision (issue 18)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.compiler.costmodel import CostConfig
from tests.given_plans import plan_starting_at
from tests.test_training import plain_training


class Gate(nn.Module):
    """Adds ``side`` only when the batch's flags say so (data-dependent: fx keeps it a leaf)."""

    def forward(self, h: torch.Tensor, side: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        if bool(flag.sum() > 0):
            return h + side
        return h


class Branchy(nn.Module):
    """``side`` is computed in stage 0 and used in stage 2 only when the gate is open."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.side = nn.Linear(4, 4)
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 4)
        self.gate = Gate()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.side(x)
        h = self.l2(torch.relu(self.l1(x)))
        return self.head(self.gate(h, s, x[:, 0]))


def gated_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Gate open in mini-batch 0, closed in 1 and 2 (column 0 of x is its flag)."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for flag in (1.0, -1.0, -1.0):
        x = torch.randn(8, 4, generator=g)
        x[:, 0] = flag
        batches.append((x, torch.randint(0, 3, (8,), generator=g)))
    return batches


def sgd_momentum_decay(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)


@pytest.mark.parametrize(
    ("method", "executor"), [("gpipe", "local"), ("1f1b", "local"), ("1f1b", "processes")]
)
def test_parameter_without_gradient_does_not_move(method: str, executor: str) -> None:
    model = Branchy()
    batches = gated_batches()
    expected, reference = plain_training(model, sgd_momentum_decay, batches, micro=2)
    assert reference.side.weight.grad is None  # the gate was closed in the last mini-batch
    config = CostConfig(3, method=method, micro_batches=2)
    micro = (batches[0][0][:4],)
    plan = plan_starting_at(model, micro, config, ["relu", "gate"], leaf_modules=["gate"])
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        sgd_momentum_decay(net),
        3,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        micro_batches=2,
        executor=executor,
        profile_dir=None,
        plan=plan,
        leaf_modules=["gate"],
    ) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches]
        state = pipe.state_dict()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)


CALLS = {"pre": 0, "tensor": 0, "forward": 0}


def count_tensor_hook(grad: torch.Tensor) -> None:
    CALLS["tensor"] += 1


def pre_hook_with_tensor_hook(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that registers a tensor hook on the block's input."""
    CALLS["pre"] += 1
    args[0].register_hook(count_tensor_hook)


def count_forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    CALLS["forward"] += 1


def halve_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * 0.5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class Hooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.block = Block()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.a(x)))


def hooked_model() -> Hooked:
    model = Hooked()
    model.block.register_forward_pre_hook(pre_hook_with_tensor_hook)
    model.head.register_forward_hook(count_forward_hook)
    return model


def plain_batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def compile_local(model: nn.Module, make_opt=sgd, **kwargs) -> pipeoptim.Pipeline:
    options = dict(method="gpipe", micro_batches=2, executor="local", profile_dir=None)
    options.update(kwargs)
    return pipeoptim.compile(
        model, make_opt(model), 2, example_inputs=plain_batches(1)[0][0], loss_fn=F.cross_entropy, **options
    )


def test_hooks_on_modules_traced_through_are_named_in_a_warning() -> None:
    """head's forward hook is named; block's pre-hook registers a gradient hook while traced,
    which makes block a leaf whose hooks run (that hook was dropped before: helper-127)."""
    with pytest.warns(UserWarning) as record:
        compile_local(hooked_model()).close()
    messages = [str(w.message) for w in record]
    hooks = next(m for m in messages if "will not run during training" in m)
    assert "hooks on head (forward hook)" in hooks and "leaf_modules=['head']" in hooks
    assert any("made these modules leaves" in m and "block (registers a gradient hook" in m for m in messages)


def test_hooks_of_leaf_modules_run_as_in_the_plain_model(recwarn) -> None:
    batches = plain_batches()
    for key in CALLS:
        CALLS[key] = 0
    plain_training(hooked_model(), sgd, batches, micro=2)
    expected = dict(CALLS)
    assert expected == {"pre": 6, "tensor": 6, "forward": 6}  # M = 2 micro-batches x 3 steps
    for key in CALLS:
        CALLS[key] = 0
    with compile_local(hooked_model(), leaf_modules=["block", "head"]) as pipe:
        assert CALLS == {"pre": 0, "tensor": 0, "forward": 0}  # compiling runs no user hook
        for x, y in batches:
            pipe.step(x, y).wait()
    assert expected == CALLS
    assert not [w for w in recwarn if "hooks on" in str(w.message)]


def test_a_hook_that_changes_the_output_runs_in_every_worker() -> None:
    model = Hooked()
    model.block.register_forward_hook(halve_output)
    batches = plain_batches()
    expected, reference = plain_training(model, sgd, batches, micro=2)
    net = copy.deepcopy(model)
    with compile_local(net, method="1f1b", executor="processes", leaf_modules=["block"]) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches]
        state = pipe.state_dict()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)


def test_a_users_torch_compile_is_named_in_a_warning() -> None:
    model = Hooked()
    model.block = torch.compile(Block())
    with pytest.warns(UserWarning, match=r"torch\.compile on block does not survive tracing") as record:
        compile_local(model).close()
    assert len(record) == 1


STEPS = {"user": 0}


class CountingSGD(torch.optim.SGD):
    """A user's optimizer subclass with its own code in ``step()``."""

    def step(self, closure=None):
        STEPS["user"] += 1
        return super().step(closure)


class OwnOptimizer(torch.optim.Optimizer):
    """An optimizer written from scratch (plain SGD)."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        STEPS["user"] += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize("optimizer_class", [CountingSGD, OwnOptimizer])
def test_compiling_runs_no_user_code_of_the_optimizer(optimizer_class) -> None:
    logs: list[str] = []
    STEPS["user"] = 0
    make_opt = lambda m: optimizer_class(m.parameters(), lr=0.1)  # noqa: E731
    with compile_local(Hooked(), make_opt=make_opt, log=logs.append) as pipe:
        assert STEPS["user"] == 0
        x, y = plain_batches(1)[0]
        pipe.step(x, y).wait()
    assert STEPS["user"] == 2  # training steps the user's class: once per stage
    untimed = [line for line in logs if "derives from no torch.optim optimizer" in line]
    assert len(untimed) == (optimizer_class is OwnOptimizer)


class Deep(nn.Module):
    """Four linear layers: one per stage."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(
            nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Linear(16, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def deep_batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 6, generator=g) * 3, torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def sgd_fast(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def compile_deep(model: nn.Module, stages: int, **kwargs) -> pipeoptim.Pipeline:
    return pipeoptim.compile(
        model,
        sgd_fast(model),
        stages,
        example_inputs=deep_batches(1)[0][0],
        loss_fn=F.cross_entropy,
        profile_dir=None,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("method", "stages", "executor"),
    [("gpipe", 2, "local"), ("1f1b", 4, "local"), ("1f1b", 2, "processes")],
)
def test_clipping_by_the_global_norm_equals_plain_training(method: str, stages: int, executor: str) -> None:
    batches = deep_batches()
    unclipped, _ = plain_training(Deep(), sgd_fast, batches, micro=2)
    expected, reference = plain_training(Deep(), sgd_fast, batches, micro=2, clip=0.1)
    assert abs(unclipped[-1] - expected[-1]) > 1e-3  # the limit binds
    net = Deep()
    options = dict(method=method, micro_batches=2, executor=executor, max_grad_norm=0.1)
    with compile_deep(net, stages, **options) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches]
        state = pipe.state_dict()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)


def test_clipping_an_asynchronous_method_with_one_stage_equals_plain_training() -> None:
    batches = deep_batches()
    expected, reference = plain_training(Deep(), sgd_fast, batches, micro=1, clip=0.1)
    with compile_deep(Deep(), 1, executor="local", max_grad_norm=0.1) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches]
        state = pipe.state_dict()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "gpipe", "max_grad_norm": -1.0}, "max_grad_norm must be a positive finite number"),
        ({"method": "pipeoptim", "max_grad_norm": math.inf}, "max_grad_norm must be a positive finite"),
    ],
)
def test_max_grad_norm_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compile_deep(Deep(), 2, executor="local", **kwargs)


def test_train_command_clips_with_max_grad_norm_and_computes_in_bfloat16(tmp_path) -> None:
    from click.testing import CliRunner

    from pipeoptim.cli.main import cli

    def train(*extra: str) -> list[float]:
        out = tmp_path / ("_".join(extra) or "plain")
        args = [
            "train",
            "digits",
            "--method",
            "1f1b",
            "--gpus",
            "2",
            "--stages",
            "2",
            "--executor",
            "local",
            "--epochs",
            "1",
        ]
        args += ["--limit", "128", "--record-every", "1", "--quiet", "--profile-dir", str(tmp_path / "p")]
        result = CliRunner().invoke(cli, [*args, "--out", str(out), *extra])
        assert result.exit_code == 0, result.stderr
        lines = (out / "train.csv").read_text().splitlines()[1:]
        return [float(line.split(",")[2]) for line in lines]

    plain, clipped = train(), train("--max-grad-norm", "0.05")
    assert len(plain) == len(clipped) == 4
    assert clipped[0] == plain[0]  # the first loss comes before any step
    assert all(abs(a - b) > 1e-4 for a, b in zip(plain[1:], clipped[1:]))
    bfloat16 = train("--precision", "bfloat16")
    assert len(bfloat16) == 4 and abs(bfloat16[0] - plain[0]) > 1e-5  # the forward is in bfloat16
    bad = ["train", "digits", "--stages", "4", "--max-grad-norm", "inf", "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(cli, bad)
    assert result.exit_code == 2 and "'inf' is not a finite number" in result.stderr  # before any work


def plain_autocast_training(model, make_opt, batches, micro: int):
    """Plain training with forward and loss inside ``torch.autocast("cpu", torch.bfloat16)``."""
    model = copy.deepcopy(model)
    opt = make_opt(model)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(torch.tensor_split(x, micro), torch.tensor_split(y, micro)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(xs), ys) * (xs.shape[0] / x.shape[0])
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return losses, model


@pytest.mark.parametrize(("method", "executor"), [("gpipe", "local"), ("1f1b", "processes")])
def test_bfloat16_autocast_in_every_stage_equals_the_plain_model_under_autocast(method, executor) -> None:
    batches = deep_batches()
    expected, reference = plain_autocast_training(Deep(), sgd_fast, batches, micro=2)
    float32, _ = plain_training(Deep(), sgd_fast, batches, micro=2)
    assert abs(float32[-1] - expected[-1]) > 1e-4  # bfloat16 changes the numbers
    net = Deep()
    options = dict(method=method, micro_batches=2, executor=executor, autocast=torch.bfloat16)
    with compile_deep(net, 2, **options) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches]
        state = pipe.state_dict()
        values = pipe.plan.values
        boundary = [meta["dtype"] for name in pipe.plan.io[0].outputs for meta in values[name]["meta"]]
        sent = pipe.plan.stages[0].send_bytes
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
    assert boundary == ["bfloat16"]  # a Linear's output under autocast
    with compile_deep(Deep(), 2, method=method, micro_batches=2, executor="local") as pipe:
        assert pipe.plan.stages[0].send_bytes == 2 * sent  # the cost model sees half the bytes
