"""Pipelined training against plain training, executors against each other, state and resume."""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim import training
from pipeoptim.errors import CheckpointError
from pipeoptim.examples import TinyGPT
from pipeoptim.records import StepLog, epoch_line
from pipeoptim.runtime.optim import hyperparameters

from .conftest import ctrl_c_delivered


class SmallCNN(nn.Module):
    """Conv + BatchNorm + residual + dropout: everything the executors must agree on."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.2)
        self.fc1 = nn.Linear(6 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x)))
        h = F.relu(self.bn2(self.c2(h)) + h)
        h = F.max_pool2d(h, 2).flatten(1)
        return self.fc2(self.drop(F.relu(self.fc1(h))))


def data(n: int, batch: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(n)
    ]


def plain_training(model, make_opt, batches, micro: int, scheduler=None, clip: float | None = None):
    """Single-device training with gradient accumulation over the same micro-batches (plain
    PyTorch semantics: ``zero_grad()`` sets gradients to ``None``), optionally clipped by the
    global norm (``clip_grad_norm_``) before each step."""
    model = copy.deepcopy(model)
    opt = make_opt(model)
    sched = scheduler(opt) if scheduler else None
    losses = []
    for x, y in batches:
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(torch.tensor_split(x, micro), torch.tensor_split(y, micro)):
            loss = F.cross_entropy(model(xs), ys) * (xs.shape[0] / x.shape[0])
            loss.backward()
            total += loss.item()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched:
            sched.step()
        losses.append(total)
    return losses, model


SGD_MOMENTUM = (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), "sgd-momentum")
ADAMW = (lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01), "adamw")


def no_dropout_cnn() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN()
    model.drop.p = 0.0  # plain training draws other dropout masks than the pipeline's streams
    return model


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("make_opt", [SGD_MOMENTUM, ADAMW], ids=lambda p: p[1])
def test_flushing_methods_equal_plain_training(method: str, stages: int, make_opt) -> None:
    model = no_dropout_cnn()
    batches = data(6)
    expected, reference = plain_training(model, make_opt[0], batches, micro=4)
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        make_opt[0](net),
        stages,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        micro_batches=4,
        executor="local",
        profile_dir=None,
    ) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches]
        state = pipe.state_dict()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["pipeoptim", "pipedream", "spectrain", "none"])
def test_async_with_one_stage_equals_plain_training(method: str) -> None:
    model = no_dropout_cnn()
    batches = data(6)
    micro = 1
    expected, _ = plain_training(model, SGD_MOMENTUM[0], batches, micro=micro)
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        SGD_MOMENTUM[0](net),
        1,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        executor="local",
        profile_dir=None,
    ) as pipe:
        got = list(pipe.train(batches))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loop", ["step", "train"])
def test_learning_rate_scheduler_on_the_users_optimizer_is_followed(loop: str) -> None:
    """Stepped after each step(), or given to train() as after_step: a scheduler stepped in the
    loop over train()'s losses lagged by N mini-batches (3e-2 off plain training)."""
    model = no_dropout_cnn()
    batches = data(6)

    def schedule(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    expected, _ = plain_training(model, SGD_MOMENTUM[0], batches, micro=2, scheduler=schedule)
    net = copy.deepcopy(model)
    opt = SGD_MOMENTUM[0](net)
    sched = schedule(opt)
    with pipeoptim.compile(
        net,
        opt,
        2,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method="1f1b",
        micro_batches=2,
        executor="local",
        profile_dir=None,
    ) as pipe:
        if loop == "train":
            got = list(pipe.train(batches, after_step=sched.step))
        else:
            got = []
            for x, y in batches:
                got.append(pipe.step(x, y).item())
                sched.step()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, stages",
    [
        ("pipeoptim", 4),
        ("pipedream", 3),
        ("2bw", 2),
        ("spectrain", 2),
        ("none", 2),
        ("gpipe", 2),
        ("1f1b", 3),
    ],
)
def test_processes_equal_local_for_twenty_steps(method: str, stages: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN()  # with dropout: both executors draw the same masks
    batches = data(20)
    results = {}
    for executor in ("local", "processes"):
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        # one profile for both, hence the same plan: the stage of a layer decides its staleness
        with pipeoptim.compile(
            net,
            opt,
            stages,
            example_inputs=batches[0][0],
            loss_fn=F.cross_entropy,
            method=method,
            executor=executor,
            profile_dir=tmp_path,
            timeout=120,
        ) as pipe:
            results[executor] = (list(pipe.train(batches)), pipe.state_dict(), pipe.plan.stage_of)
    assert results["processes"][2] == results["local"][2]
    assert results["processes"][0] == pytest.approx(results["local"][0], rel=1e-6, abs=1e-7)
    for key, value in results["local"][1].items():
        torch.testing.assert_close(results["processes"][1][key], value, rtol=1e-6, atol=1e-7)


def test_state_dict_predict_and_to_module() -> None:
    torch.manual_seed(0)
    model = TinyGPT(vocab=32, dim=16, heads=2, layers=2, context=16)
    ids = torch.randint(0, 32, (4, 12))

    def loss_fn(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pipeoptim.compile(
        model, opt, 3, example_inputs=ids, loss_fn=loss_fn, executor="local", profile_dir=None
    ) as pipe:
        for _ in range(5):
            pipe.step(ids, torch.roll(ids, -1, 1))
        state = pipe.state_dict()
        assert list(state) == list(model.state_dict())  # same keys, same order, tied names too
        trained = pipe.to_module()
        assert type(trained) is TinyGPT and trained.head.weight is trained.tok.weight
        trained.eval()
        torch.testing.assert_close(pipe.predict(ids), trained(ids), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pipe.predict(ids[:3]), trained(ids[:3]), rtol=1e-5, atol=1e-6)
        assert not torch.equal(state["tok.weight"], model.tok.weight)  # the user's model is untouched


@pytest.mark.parametrize(
    "method, executor", [(m, "local") for m in pipeoptim.METHODS] + [("2bw", "processes")]
)
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path: Path, method: str, executor: str) -> None:
    """Every method. 2BW's shadow W(t−1), which the first mini-batch after a flush runs on, is
    part of the optimizer state: before, a resumed 2BW run used W there, and its losses left
    the uninterrupted run's at that mini-batch."""
    torch.manual_seed(0)
    model = SmallCNN()
    batches = data(12)

    def fresh():
        net = copy.deepcopy(model)
        if method == "spectrain":  # its prediction follows SGD's momentum
            opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
        else:
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        return pipeoptim.compile(
            net,
            opt,
            3,
            example_inputs=batches[0][0],
            loss_fn=F.cross_entropy,
            method=method,
            executor=executor,
            profile_dir=tmp_path / "profiles",  # one profile, one plan: the same staleness in each run
        )

    with fresh() as pipe:
        whole = list(pipe.train(batches[:6])) + list(pipe.train(batches[6:]))
    with fresh() as pipe:
        first = list(pipe.train(batches[:6]))
        pipe.save_checkpoint(tmp_path / "ckpt.pt", extra={"epoch": 3})
    with fresh() as pipe:
        assert pipe.load_checkpoint(tmp_path / "ckpt.pt") == {"epoch": 3}
        assert pipe.mini_batches_done == 6
        second = list(pipe.train(batches[6:]))
    assert first + second == whole


class Bottleneck(nn.Module):
    """The same parameter names at every width, shapes that broadcast into the wider one."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, width), nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def _bottleneck_pipeline(
    width: int, optimizer=torch.optim.SGD, executor: str = "local", method: str = "pipeoptim"
):
    torch.manual_seed(width)
    model = Bottleneck(width)
    opt = optimizer(model.parameters(), lr=0.01)
    return pipeoptim.compile(
        model,
        opt,
        2,
        example_inputs=torch.randn(4, 8),
        loss_fn=F.cross_entropy,
        executor=executor,
        profile_dir=None,
        method=method,
    )


@pytest.mark.parametrize("executor", ["local", "processes"])
def test_weights_or_optimizer_state_that_do_not_fit_are_refused_before_loading(
    tmp_path: Path, executor: str
) -> None:
    """helper-119: weights of another shape were copied into the stages (broadcast: every row
    of the wider layer became the narrow one's), then torch's RuntimeError came from the model's
    template, and the pipeline trained on; Adam's state loaded into an SGD pipeline and gave the
    user's SGD Adam's betas and rate. Now each is refused naming the misfit, nothing loaded."""
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
    with _bottleneck_pipeline(1, torch.optim.Adam) as narrow:
        narrow.step(x, y)
        narrow.save_checkpoint(tmp_path / "narrow.pt")
        narrow_weights, adam_state = narrow.state_dict(), narrow.optimizer_state_dict()
    with _bottleneck_pipeline(4, executor=executor) as pipe:
        pipe.step(x, y)
        weights, groups = pipe.state_dict(), hyperparameters(pipe._optimizer)
        shapes = r"shapes differ: l1\.weight \[1, 8\] \(the model's \[4, 8\]\), l1\.bias \[1\]"
        with pytest.raises(pipeoptim.PipelineError, match="does not belong to Bottleneck: " + shapes):
            pipe.load_state_dict(narrow_weights)
        with pytest.raises(CheckpointError, match="do not match this Bottleneck .*" + shapes):
            pipe.load_checkpoint(tmp_path / "narrow.pt")
        with _bottleneck_pipeline(4, torch.optim.Adam) as wide:
            wide.save_checkpoint(tmp_path / "adam.pt")
        adam = "holds the state of Adam, and this pipeline steps with SGD: compile it with Adam"
        with pytest.raises(CheckpointError, match=f"adam.pt {adam}"):
            pipe.load_checkpoint(tmp_path / "adam.pt")
        with pytest.raises(pipeoptim.PipelineError, match=f"optimizer state {adam}"):
            pipe.load_optimizer_state_dict(adam_state)
        other = {**pipe.optimizer_state_dict(), "optimizer": None}
        other["grads"] = {f"encoder.{name}": value for name, value in other["grads"].items()}
        with pytest.raises(
            pipeoptim.PipelineError, match=r"parameters Bottleneck does not have \(\['encoder"
        ):
            pipe.load_optimizer_state_dict(other)
        sequential = {  # a sequential run's: torch's own optimizer state (helper-125: "another model")
            "model_class": "Bottleneck",
            "method": "sequential",
            "state_dict": weights,
            "optimizer": torch.optim.SGD(Bottleneck(4).parameters(), lr=0.1).state_dict(),
            "mini_batches": 1,
            "plan": None,
            "extra": {},
        }
        pipeoptim.checkpoint.save_checkpoint(tmp_path / "sequential.pt", sequential)
        other_format = r"holds optimizer state a pipeline does not read \(a sequential run's is torch's own\)"
        with pytest.raises(CheckpointError, match=other_format):
            pipe.load_checkpoint(tmp_path / "sequential.pt")
        after = pipe.state_dict()
        assert all(torch.equal(after[name], weights[name]) for name in weights)
        assert hyperparameters(pipe._optimizer) == groups  # no betas, the same rate
        assert pipe.step(x, y).item() > 0  # still trains


@pytest.mark.parametrize("order", ["weights first", "optimizer state first"])
def test_2bw_goes_on_from_its_state_dicts_loaded_in_either_order(order: str) -> None:
    """helper-180: load_state_dict after load_optimizer_state_dict dropped the shadow W(t−1)
    the optimizer state had brought (the weights alone loaded reset it)."""
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
    with _bottleneck_pipeline(4, torch.optim.Adam, method="2bw") as pipe:
        for _ in range(3):
            pipe.step(x, y)
        weights, state = pipe.state_dict(), pipe.optimizer_state_dict()
        want = [float(pipe.step(x, y)) for _ in range(3)]
    with _bottleneck_pipeline(4, torch.optim.Adam, method="2bw") as pipe:
        loads = [lambda: pipe.load_state_dict(weights), lambda: pipe.load_optimizer_state_dict(state)]
        for load in loads if order == "weights first" else loads[::-1]:
            load()
        assert [float(pipe.step(x, y)) for _ in range(3)] == want


def test_2bws_previous_weights_of_other_shapes_are_refused_before_loading() -> None:
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
    with _bottleneck_pipeline(4, method="2bw") as pipe:
        for _ in range(2):
            pipe.step(x, y)
        state = pipe.optimizer_state_dict()
        assert sorted(state["shadow"]) == ["l1.bias", "l1.weight", "l2.bias", "l2.weight"]
        before = pipe.state_dict()
        state["shadow"]["l1.weight"] = state["shadow"]["l1.weight"][:1]
        with pytest.raises(
            pipeoptim.PipelineError, match=r"2BW's previous weights of other shapes .*l1\.weight"
        ):
            pipe.load_optimizer_state_dict(state)
        assert all(torch.equal(pipe.state_dict()[n], v) for n, v in before.items())
        assert pipe.step(x, y).item() > 0


def test_checkpoint_errors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 1, 8, 8)
    with pipeoptim.compile(
        model, opt, 2, example_inputs=x, loss_fn=F.cross_entropy, executor="local", profile_dir=None
    ) as pipe:
        with pytest.raises(CheckpointError) as missing:
            pipe.load_checkpoint(tmp_path / "missing.pt")
        # the command line's fix is not the Python API's (helper-100: "start without --resume")
        assert str(missing.value) == (
            f"no checkpoint at {tmp_path / 'missing.pt'}: give the path of a file save_checkpoint wrote"
        )
        with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file: give the path"):
            pipe.load_checkpoint(tmp_path)
        (tmp_path / "notes.md").write_text("# a README given as the checkpoint\n")  # helper-157
        with pytest.raises(
            CheckpointError, match=r"notes.md is not a checkpoint \(not a file torch.save wrote\)"
        ):
            pipe.load_checkpoint(tmp_path / "notes.md")
        torch.save(model.state_dict(), tmp_path / "weights.pt")  # helper-103: a plain state dict
        with pytest.raises(CheckpointError, match=r"plain state dict; load it with pipe.load_state_dict"):
            pipe.load_checkpoint(tmp_path / "weights.pt")
        pipe.save_checkpoint(tmp_path / "ok.pt")
        # tensors and plain data only, as the README says: a user's own torch.load reads it
        # (helper-98: the plan's torch version was a TorchVersion, "Unsupported global")
        assert (
            torch.load(tmp_path / "ok.pt", weights_only=True)["plan"]["profile_key"]["torch"]
            == torch.__version__
        )
        good = (tmp_path / "ok.pt").read_bytes()
        for bad in (np.float64(0.9), np.zeros(2), object()):  # saved, but would never load back
            with pytest.raises(CheckpointError, match="extra holds objects a checkpoint cannot load back"):
                pipe.save_checkpoint(tmp_path / "ok.pt", extra={"best": [bad]})
        assert (tmp_path / "ok.pt").read_bytes() == good  # the good one was not replaced
        pipe.save_checkpoint(tmp_path / "ok.pt", extra={"best": 0.9, "seen": torch.ones(2)})
        assert pipe.load_checkpoint(tmp_path / "ok.pt")["best"] == 0.9
        (tmp_path / "half.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:200])
        with pytest.raises(CheckpointError, match=r"unreadable .* delete it or load an older one"):
            pipe.load_checkpoint(tmp_path / "half.pt")
        other = TinyGPT(vocab=16, dim=8, heads=2, layers=1, context=8)
        ids = torch.randint(0, 16, (4, 8))
        with (
            pipeoptim.compile(
                other,
                torch.optim.SGD(other.parameters(), lr=0.1),
                2,
                example_inputs=ids,
                loss_fn=lambda o, y: o.mean(),
                executor="local",
                profile_dir=None,
            ) as p2,
            pytest.raises(
                CheckpointError, match=r"do not match .*: load it into a pipeline of the same model"
            ),
        ):
            p2.load_checkpoint(tmp_path / "ok.pt")


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on a marker file: code run by a load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_with_the_format_tag_but_missing_fields_is_named(tmp_path: Path) -> None:
    """Only the format tag was checked: `pipeoptim train --resume` of such a file died with
    KeyError: 'extra' in a traceback."""
    from pipeoptim.checkpoint import read_checkpoint

    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "pipeoptim-checkpoint/1", "state_dict": {}}, path)
    with pytest.raises(
        CheckpointError, match="lacks model_class, method, optimizer, mini_batches, plan, extra"
    ):
        read_checkpoint(path)
    config = training.TrainConfig(task="digits", out=str(tmp_path / "run"), resume=str(path))
    with pytest.raises(CheckpointError, match="not written by pipeoptim's save_checkpoint"):
        training.train(config, log=lambda _msg: None)


@pytest.mark.parametrize("how", ["api", "cli"])
def test_a_crafted_checkpoint_runs_no_code(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "run" / "checkpoint.pt"
    crafted.parent.mkdir()
    torch.save({"format": "pipeoptim-checkpoint/1", "payload": _RunsCode(marker)}, crafted)
    if how == "api":
        model = SmallCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with (
            pipeoptim.compile(
                model,
                opt,
                2,
                example_inputs=torch.randn(8, 1, 8, 8),
                loss_fn=F.cross_entropy,
                executor="local",
                profile_dir=None,
            ) as pipe,
            pytest.raises(CheckpointError, match=r"other than tensors and plain data.*nothing in it was run"),
        ):
            pipe.load_checkpoint(crafted)
    else:
        from click.testing import CliRunner

        from pipeoptim.cli.main import cli

        result = CliRunner().invoke(
            cli,
            [
                "train",
                "digits",
                "--gpus",
                "2",
                "--stages",
                "2",
                "--executor",
                "local",
                "--out",
                str(tmp_path / "new"),
                "--resume",
                str(crafted.parent),
                "--quiet",
            ],
        )
        assert result.exit_code == 1, result.output
        assert "nothing in it was run" in result.output and "Traceback" not in result.output
    assert not marker.exists()


def test_a_second_ctrl_c_while_the_run_is_recorded_waits_for_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A terminal's Ctrl-C and the one `timeout` forwards arrive together: the second came
    while metrics.json was being written and left none, or an earlier epoch's "running"."""
    run = training._Run(config=None, task=None, trainer=None, out=tmp_path)  # type: ignore[arg-type]
    run.steps = StepLog(tmp_path / "train.csv", every=1)
    run.steps.add(0, 0, 2.5, 0.1)
    monkeypatch.setattr(training, "run_metrics", lambda *_args: {"epochs": []})
    write = training.write_json

    def interrupted_write(path: Path, data: dict) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, as the record is written
        time.sleep(0.05)
        write(path, data)

    monkeypatch.setattr(training, "write_json", interrupted_write)
    with ctrl_c_delivered(), pytest.raises(KeyboardInterrupt):  # still stops, once the record is on disk
        run.stop(KeyboardInterrupt(), 1.0)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "interrupted"
    assert (tmp_path / "train.csv").read_text().splitlines()[1].startswith("0,0,2.5")


def test_resuming_with_the_pytorch_recipe_restores_the_learning_rate(tmp_path: Path) -> None:
    """load_checkpoint then scheduler.load_state_dict, as with plain PyTorch: the checkpoint kept
    no group hyperparameters, so StepLR's lr restarted at 0.5 instead of 0.005 and the resumed
    losses left the uninterrupted run's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    data = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(8)]

    def run(batches, checkpoint_in=None, checkpoint_out=None):
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
        with pipeoptim.compile(
            net, opt, 2, example_inputs=data[0][0], loss_fn=F.cross_entropy, method="gpipe",
            executor="local", profile_dir=None,
        ) as pipe:  # fmt: skip
            if checkpoint_in is not None:
                scheduler.load_state_dict(pipe.load_checkpoint(checkpoint_in)["scheduler"])
            losses = []
            for x, y in batches:
                losses.append(pipe.step(x, y).item())
                scheduler.step()
            if checkpoint_out is not None:
                pipe.save_checkpoint(checkpoint_out, extra={"scheduler": scheduler.state_dict()})
        return losses

    straight = run(data)
    run(data[:4], checkpoint_out=tmp_path / "c.pt")
    assert run(data[4:], checkpoint_in=tmp_path / "c.pt") == straight[4:]


def test_epoch_line_names_the_plan_and_other_processes_work() -> None:
    """The rate against the plan's, and other processes' share of the cores where it is over
    a quarter: a test suite beside a run slowed its epochs to 0.54-0.71 of the plan unsaid."""
    record = {"epoch": 2, "train_loss": 0.1234, "accuracy": 0.975, "mini_batches_per_s": 95.5}
    head = "epoch 2/10: train loss 0.1234, test accuracy 0.9750, 95.5 mini-batches/s"
    assert epoch_line({**record, "of_plan": 0.58, "other_cpu": 0.45}, 10, "accuracy", 165.0) == (
        f"{head} (0.58 of the plan's 165, other processes used 45% of the CPU time)"
    )
    assert epoch_line({**record, "of_plan": 0.58, "other_cpu": 0.1}, 10, "accuracy", 165.0) == (
        f"{head} (0.58 of the plan's 165)"
    )
    assert epoch_line({**record, "of_plan": None, "other_cpu": 0.3}, 10, "accuracy", None) == (
        f"{head} (other processes used 30% of the CPU time)"
    )
    assert epoch_line({**record, "of_plan": None, "other_cpu": None}, 10, "accuracy", None) == head


@pytest.mark.parametrize("layout", [{}, {"data_parallel": "auto"}])
def test_compile_leaves_the_callers_random_state(tmp_path: Path, layout: dict) -> None:
    """helper-100: compiling drew random numbers where it measured the optimizer's update cost,
    only where no cached figure existed (under torchrun on some ranks): a loader shuffled with
    the global generator fed the first and the last rank different orders, and the quick start
    trained on mismatched inputs and labels (accuracy 0.0976)."""
    model = SmallCNN()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    pipe = pipeoptim.compile(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 2,
        example_inputs=torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
        loss_fn=F.cross_entropy, executor="local", profile_dir=tmp_path / "fresh", **layout,
    )  # fmt: skip
    pipe.close()
    assert (tmp_path / "fresh").is_dir()  # it measured: nothing was cached there
    assert torch.equal(torch.get_rng_state(), before)
