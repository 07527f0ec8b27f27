"""A pipeline takes over the optimizer state it is given, and loading state into a pipeline
that has trained equals loading it into a fresh one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim

ADAM = (torch.optim.Adam, {"lr": 1e-2})
SGD_MOMENTUM = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 8, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)]


def plain_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("optimizer", [ADAM, SGD_MOMENTUM], ids=["adam", "sgd-momentum"])
@pytest.mark.parametrize("method, executor", [("gpipe", "local"), ("1f1b", "processes")])
def test_a_model_trained_before_compile_continues_with_its_optimizers_state(
    optimizer, method: str, executor: str, tmp_path
) -> None:
    """Three plain steps, then compile: the stages' optimizers started empty, so Adam's
    moments, its step count and SGD's momentum restarted (weights 6e-2 and 1.2e-1 off plain
    training after five more steps). They now continue from the optimizer's state."""
    cls, kwargs = optimizer
    data = batches(8)
    reference = mlp()
    ref_opt = cls(reference.parameters(), **kwargs)
    for x, y in data[:3]:
        plain_step(reference, ref_opt, x, y)
    model = copy.deepcopy(reference)
    opt = cls(model.parameters(), **kwargs)
    opt.load_state_dict(ref_opt.state_dict())  # as a user resuming plain training would
    for p, q in zip(reference.parameters(), model.parameters()):
        q.grad = p.grad.clone()
    with pipeoptim.compile(
        model,
        opt,
        gpus=2,
        method=method,
        micro_batches=1,
        executor=executor,
        example_inputs=data[0][0],
        loss_fn=F.cross_entropy,
        profile_dir=tmp_path,
    ) as pipe:
        for x, y in data[3:]:
            plain_step(reference, ref_opt, x, y)
            pipe.step(x, y)
        state = pipe.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_2bw_loaded_into_a_trained_pipeline_equals_loaded_into_a_fresh_one(tmp_path) -> None:
    """The first mini-batch after a load used the shadow weights (W(t-1)) left from training
    before it: neither the loaded weights nor those the documented resume uses."""
    data = batches(9)

    def compiled() -> pipeoptim.Pipeline:
        model = mlp()
        return pipeoptim.compile(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            gpus=2,
            method="2bw",
            executor="local",
            example_inputs=data[0][0],
            loss_fn=F.cross_entropy,
            profile_dir=tmp_path,
        )

    with compiled() as source:
        for x, y in data[:3]:
            source.step(x, y)
        source.save_checkpoint(tmp_path / "ck.pt")
    losses = []
    for trained_first in (False, True):
        with compiled() as pipe:
            if trained_first:
                for x, y in data[3:6]:
                    pipe.step(x, y)
            pipe.load_checkpoint(tmp_path / "ck.pt")
            losses.append([float(pipe.step(x, y)) for x, y in data[6:]])
    assert losses[0] == losses[1]


def _compiled(
    opt_kind, method: str, executor: str = "local", stages: int = 2, **options
) -> pipeoptim.Pipeline:
    model = mlp()
    cls, kwargs = opt_kind
    x = batches(1)[0][0]
    micro = {"micro_batches": 2} if method in ("gpipe", "1f1b") else {}
    return pipeoptim.compile(
        model, cls(model.parameters(), **kwargs), stages, example_inputs=x, loss_fn=F.cross_entropy,
        method=method, executor=executor, profile_dir=None, **micro, **options,
    )  # fmt: skip


@pytest.mark.parametrize(
    "opt_kind, method, executor, target_options",
    [
        (SGD_MOMENTUM, "gpipe", "local", {}),
        (ADAM, "1f1b", "processes", {}),
        (ADAM, "pipeoptim", "local", {"max_grad_norm": 0.05, "stages": 3}),
    ],
    ids=["gpipe-sgd-momentum", "1f1b-adam-processes", "pipeoptim-clipping-3-stages"],
)
def test_what_a_checkpoint_does_not_hold_starts_afresh_when_loaded_into_a_trained_pipeline(
    opt_kind, method: str, executor: str, target_options: dict, tmp_path
) -> None:
    """A checkpoint saved before any step holds no optimizer state: loaded into a pipeline that
    had trained, the momentum buffers, Adam's moments and the clipping norm parts of that
    training were kept (loss 1e-2 and 1.9e-2 off plain training that loads the same state,
    helper-135), where torch's load_state_dict replaces the whole state. gpipe is checked
    against plain training too; the others against the same checkpoint loaded into a fresh
    pipeline, bit for bit (stage 0 of a pipeline clipping with max_grad_norm keeps the norm
    parts the source, which did not clip, never saved)."""
    data = batches(7)
    stages = target_options.pop("stages", 2)
    with _compiled(opt_kind, method, executor, stages) as source:
        source.save_checkpoint(tmp_path / "ck.pt")
    losses, plan = [], None
    for trained_first in (False, True):
        # the second replays the first's plan: PipeOptim's numbers depend on the cut
        with _compiled(opt_kind, method, executor, stages, plan=plan, **target_options) as pipe:
            plan = pipe.plan
            if trained_first:
                for x, y in data[:4]:
                    pipe.step(x, y)
            pipe.load_checkpoint(tmp_path / "ck.pt")
            losses.append([float(pipe.step(x, y)) for x, y in data[4:]])
    assert losses[0] == losses[1]
    if method == "gpipe":
        reference = mlp()
        cls, kwargs = opt_kind
        opt = cls(reference.parameters(), **kwargs)
        expected = []
        for x, y in data[4:]:
            expected.append(F.cross_entropy(reference(x), y).item())
            plain_step(reference, opt, x, y)
        assert losses[1] == pytest.approx(expected, abs=1e-6)


def test_a_checkpoint_without_a_loss_scale_resets_a_trained_pipelines_scale(tmp_path) -> None:
    """A float32 run's checkpoint holds no loss scale: loaded into a float16 pipeline whose scale
    had backed off after an overflow, that scale stayed (helper-135)."""
    with _compiled(SGD_MOMENTUM, "gpipe") as source:
        source.save_checkpoint(tmp_path / "ck.pt")
    with _compiled(SGD_MOMENTUM, "gpipe", autocast=torch.float16, nan_check="off") as pipe:
        x, y = batches(1)[0]
        pipe.step(x * 1e6, y)  # float16 overflows: the step is skipped, the scale backs off
        assert pipe.optimizer_state_dict()["loss_scale"]["scale"] == 2.0**15
        pipe.load_checkpoint(tmp_path / "ck.pt")
        assert pipe.optimizer_state_dict()["loss_scale"] == {
            "scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
            "growth_tracker": 0,
        }  # fmt: skip


def _weights(pipe: pipeoptim.Pipeline) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in pipe.state_dict().items()}


@pytest.mark.parametrize("saved", ["reordered", "two groups"])
def test_a_checkpoint_with_other_parameter_groups_is_refused_before_anything_is_loaded(
    saved, tmp_path
) -> None:
    """Groups listed in another order took each other's learning rates, silently; another
    number of groups was refused only after the weights and optimizer state were loaded (the
    error said nothing was; helper-135)."""
    first = lambda m: [p for n, p in m.named_parameters() if n.startswith("0.")]  # noqa: E731
    rest = lambda m: [p for n, p in m.named_parameters() if not n.startswith("0.")]  # noqa: E731
    model = mlp()
    opt = torch.optim.SGD([{"params": first(model), "lr": 0.5}, {"params": rest(model), "lr": 0.05}])
    with _pipeline(model, opt) as source:
        source.step(*batches(1)[0])
        source.save_checkpoint(tmp_path / "ck.pt")
    model = mlp()
    groups = (
        [{"params": rest(model), "lr": 0.05}, {"params": first(model), "lr": 0.5}]
        if saved == "reordered"
        else [{"params": model.parameters(), "lr": 0.05}]
    )
    with _pipeline(model, torch.optim.SGD(groups)) as pipe:
        before = _weights(pipe)
        expected = (
            "other parameters in group 0 .0.weight, 0.bias; this optimizer's: 2.weight"
            if saved == "reordered"
            else "2 parameter groups, and this optimizer has 1"
        )
        with pytest.raises(pipeoptim.CheckpointError, match=expected):
            pipe.load_checkpoint(tmp_path / "ck.pt")
        with pytest.raises(pipeoptim.PipelineError, match=expected):
            pipe.load_optimizer_state_dict(torch.load(tmp_path / "ck.pt", weights_only=False)["optimizer"])
        after = _weights(pipe)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert pipe.mini_batches_done == 0 and "momentum_buffer" not in str(
            pipe.optimizer_state_dict()["state"]
        )


def _pipeline(model: nn.Module, opt: torch.optim.Optimizer, method: str = "1f1b") -> pipeoptim.Pipeline:
    x = batches(1)[0][0]
    options = {"loss_fn": F.cross_entropy, "method": method, "executor": "local", "profile_dir": None}
    return pipeoptim.compile(model, opt, 2, example_inputs=x, **options)


@pytest.mark.parametrize("change", ["add_param_group", "group params", "step hook", "unfreeze", "freeze"])
def test_an_optimizer_changed_after_compile_is_refused(change: str) -> None:
    """The stages build their optimizers at compile: a group added later never trained, a step
    hook never ran (weights 0.21 and 0.38 off plain training, silently; helper-128). They take
    which parameters train at compile too: a layer unfrozen later never trained, one frozen
    later kept training (weights 1.7e-2 and 2.0e-2 off plain training, helper-135)."""
    model = mlp()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    if change == "unfreeze":
        model[0].requires_grad_(False)
    opt = torch.optim.SGD(weights, lr=0.1)
    with _pipeline(model, opt) as pipe:
        x, y = batches(1)[0]
        pipe.step(x, y).item()
        if change == "add_param_group":
            opt.add_param_group({"params": biases, "lr": 0.5})
            expected = "2 groups at compile, 1 now|1 groups at compile, 2 now"
        elif change == "group params":
            opt.param_groups[0]["params"] = weights[:2]
            expected = "the parameters of group 0 changed"
        elif change == "step hook":
            opt.register_step_post_hook(lambda *_: None)
            expected = "step hooks"
        else:
            model[0].requires_grad_(change == "unfreeze")
            expected = f"requires_grad of 0.weight in group 0 changed: {change.replace('eeze', 'ozen')}"
        with pytest.raises(pipeoptim.PipelineError, match=expected):
            pipe.step(x, y)


def test_step_hooks_are_refused_at_compile() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.register_step_pre_hook(lambda *_: None)
    with pytest.raises(pipeoptim.PipelineError, match=r"Adam has step hooks .* subclass's step\(\)"):
        _pipeline(model, opt)


class SignSGD(torch.optim.SGD):
    """A subclass with its own update rule, ``W ← W − lr · sign(g)``."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad.sign(), alpha=-group["lr"])


def test_compile_warns_where_a_subclass_step_is_predicted_with_its_bases_rule() -> None:
    model = mlp()
    opt = SignSGD(model.parameters(), lr=0.1)
    expected = r"SignSGD writes its own step\(\), but pipeoptim predicts .* SGD's"
    with pytest.warns(UserWarning, match=expected), _pipeline(model, opt, "pipeoptim"):
        pass


def test_a_group_added_mid_run_continues_as_the_refusal_says_and_as_plain_training() -> None:
    """The refusal of add_param_group after compile says to compile again from to_module()
    with the groups and load the optimizer state; the load refused a state of fewer groups
    (helper-161). Groups added after the saved ones start without state, as torch's
    add_param_group does: the run equals plain training that adds the group at that step."""
    model = mlp()
    weights = lambda m: [p for n, p in m.named_parameters() if n.endswith("weight")]  # noqa: E731
    biases = lambda m: [p for n, p in m.named_parameters() if n.endswith("bias")]  # noqa: E731
    data = batches(4)
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(weights(plain), lr=0.1, momentum=0.9)
    for i, (x, y) in enumerate(data):
        if i == 2:
            opt.add_param_group({"params": biases(plain), "lr": 0.5})
        plain_step(plain, opt, x, y)
    opt = torch.optim.SGD(weights(model), lr=0.1, momentum=0.9)
    with _pipeline(model, opt, method="gpipe") as pipe:
        for x, y in data[:2]:
            pipe.step(x, y).item()
        opt.add_param_group({"params": biases(model), "lr": 0.5})
        with pytest.raises(pipeoptim.PipelineError, match=r"new_pipe.load_optimizer_state_dict"):
            pipe.step(*data[2])
        state, again = pipe.optimizer_state_dict(), pipe.to_module()
    opt = torch.optim.SGD(weights(again), lr=0.1, momentum=0.9)
    opt.add_param_group({"params": biases(again), "lr": 0.5})
    with _pipeline(again, opt, method="gpipe") as pipe:
        pipe.load_optimizer_state_dict(state)
        for x, y in data[2:]:
            pipe.step(x, y).item()
        trained = pipe.state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6)


def test_a_state_that_cannot_show_its_groups_is_refused_where_groups_were_added() -> None:
    """helper-162: a state saved without group names was told to add groups after the saved
    ones (which it had done), and an added group took over state its groups did not hold."""
    model = mlp()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD(weights, lr=0.1, momentum=0.9)
    with _pipeline(model, opt, method="gpipe") as pipe:
        pipe.step(*batches(1)[0]).item()
        state = pipe.optimizer_state_dict()
    opt = torch.optim.SGD(weights, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": biases, "lr": 0.5})
    with _pipeline(model, opt, method="gpipe") as pipe:
        old = {k: v for k, v in state.items() if k != "param_group_names"}
        with pytest.raises(pipeoptim.PipelineError, match="without their parameters' names"):
            pipe.load_optimizer_state_dict(old)
        edited = {**state, "state": {**state["state"], "0.bias": {"momentum_buffer": torch.ones(16)}}}
        with pytest.raises(pipeoptim.PipelineError, match=r"outside its groups \(0\.bias\)"):
            pipe.load_optimizer_state_dict(edited)
        pipe.load_optimizer_state_dict(state)  # the saved groups, then the added one: loads
