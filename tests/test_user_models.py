"""Models users bring: buffers used in ``forward``, uneven batches, loss reduction, BatchNorm."""

from __future__ import annotations

import collections
import copy
import functools
import json
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim import loss_check
from pipeoptim.compiler.trace import trace
from pipeoptim.errors import PipelineError, PlanError, TraceError

from .sparse_models import SparseGCN
from .test_in_place import plain_training


class PositionalEncoding(nn.Module):
    """The classic pattern: a buffer reshaped, sliced and updated in place in ``forward``."""

    def __init__(self, length: int = 6, dim: int = 8, count_rows: bool = False) -> None:
        super().__init__()
        self.count_rows = count_rows
        self.emb = nn.Linear(4, dim)
        self.register_buffer("pe", torch.randn(length, dim))
        self.register_buffer("rows_seen", torch.zeros((), dtype=torch.long))
        self.mid = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count_rows:
            self.rows_seen.add_(x.shape[0])
        h = torch.relu(self.emb(x) + self.pe.unsqueeze(0))
        h = torch.relu(self.mid(h)) + self.pe.flip(0)  # a second use, maybe in a later stage
        return self.out(h).mean(1)


def test_buffer_views_stay_buffers_and_trace_identically() -> None:
    model = PositionalEncoding(count_rows=True)
    x = torch.randn(2, 6, 4)
    before = set(vars(model))
    first, second = trace(model, x), trace(model, x)
    assert first.method == "fx"
    assert set(vars(model)) == before  # fx put no constants on the user's module
    assert first.graph_hash == second.graph_hash
    assert dict(first.gm.named_buffers()).keys() == {"pe", "rows_seen"}
    assert not [n for n in first.gm.graph.nodes if "constant" in str(n.target)]
    uses = [n for n in first.gm.graph.nodes if n.op == "get_attr" and n.target == "pe"]
    assert len(uses) == 2 and all(len(n.users) == 1 for n in uses)  # one reference per user


@pytest.mark.slow
@pytest.mark.parametrize("count_rows", [False, True])
def test_positional_encoding_trains_across_processes_and_loads_new_buffers(tmp_path, count_rows) -> None:
    torch.manual_seed(0)
    model = PositionalEncoding(count_rows=count_rows)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 6, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    expected = []
    for x, y in batches:
        ref_opt.zero_grad()
        loss = F.cross_entropy(reference(x), y)
        loss.backward()
        ref_opt.step()
        expected.append(loss.item())
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        3,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method="gpipe",
        micro_batches=1,
        executor="processes",
        profile_dir=tmp_path,
        timeout=60,
    ) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches]
        state = pipe.state_dict()
        assert int(state["rows_seen"]) == (24 if count_rows else 0)  # updated in its stage's buffer
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
        state["pe"] = torch.randn(6, 8)
        pipe.load_state_dict(state)
        torch.testing.assert_close(pipe.state_dict()["pe"], state["pe"], rtol=0, atol=0)
        trained = pipe.to_module().eval()
        torch.testing.assert_close(pipe.predict(batches[0][0]), trained(batches[0][0]), rtol=1e-5, atol=1e-6)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


class MLP(nn.Module):
    """No batch statistics: full-batch training is the reference for any micro-batch split."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.relu(self.a(x)))))


def loader(rows: int = 50, batch: int = 16, seed: int = 5):
    """``DataLoader(TensorDataset(x, y), batch_size=16)`` of 50 rows: the last batch has 2."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(rows, 6, generator=g), torch.randint(0, 4, (rows,), generator=g)
    dataset = torch.utils.data.TensorDataset(x, y)
    return list(torch.utils.data.DataLoader(dataset, batch_size=batch))


def full_batch_training(model, batches, loss_fn, lr=0.1, make_optimizer=None):
    """Plain single-device training of a copy of ``model``, one optimizer step per whole
    mini-batch (SGD with momentum, or ``make_optimizer(model)``); the losses and weights."""
    model = copy.deepcopy(model)
    opt = (
        make_optimizer(model) if make_optimizer else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    )
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def pipelined(model, batches, loss_fn, method, executor="local", tmp_path=None, gpus=2, **kwargs):
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        gpus,
        example_inputs=batches[0][0],
        loss_fn=loss_fn,
        method=method,
        micro_batches=4,
        executor=executor,
        profile_dir=tmp_path,
        timeout=60,
        **kwargs,
    ) as pipe:
        return [pipe.step(x, y).item() for x, y in batches], pipe.state_dict()


def assert_equal_training(got, expected) -> None:
    assert got[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-6)
    for key, value in expected[1].items():
        torch.testing.assert_close(got[1][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
def test_batch_smaller_than_micro_batches_runs_with_fewer(method: str) -> None:
    torch.manual_seed(0)
    model, batches = MLP(), loader()
    assert [len(x) for x, _ in batches] == [16, 16, 16, 2]
    expected = full_batch_training(model, batches, F.cross_entropy)
    assert_equal_training(pipelined(model, batches, F.cross_entropy, method), expected)


@pytest.mark.slow
def test_batch_smaller_than_micro_batches_across_processes(tmp_path) -> None:
    torch.manual_seed(0)
    model, batches = MLP(), loader()
    expected = full_batch_training(model, batches, F.cross_entropy)
    got = pipelined(model, batches, F.cross_entropy, "1f1b", executor="processes", tmp_path=tmp_path)
    assert_equal_training(got, expected)


def sum_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
@pytest.mark.parametrize("micro_batches, data_parallel", [(4, 1), (1, 2)])
def test_sum_reduced_loss_equals_plain_training(method: str, micro_batches: int, data_parallel: int) -> None:
    """Split into micro-batches or into the replicas' shares, a summing loss still trains as
    the whole mini-batch's sum."""
    torch.manual_seed(0)
    model, batches = MLP(), loader()
    expected = full_batch_training(model, batches, sum_loss, lr=0.01)
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9),
        2,
        example_inputs=batches[0][0],
        loss_fn=sum_loss,
        loss_reduction="sum",
        method=method,
        micro_batches=micro_batches,
        data_parallel=data_parallel,
        executor="local",
        profile_dir=None,
    ) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches], pipe.state_dict()
    assert_equal_training(got, expected)


def compile_mlp(loss_fn, model=None, example=None, **kwargs):
    net = model or MLP()
    options = {"method": "gpipe", "micro_batches": 4, **kwargs}
    return pipeoptim.compile(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        2,
        example_inputs=torch.randn(16, 6) if example is None else example,
        loss_fn=loss_fn,
        executor="local",
        profile_dir=None,
        **options,
    )


def test_loss_reduction_the_loss_contradicts_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"reduction='sum' but loss_reduction='mean'.*pass loss_reduction='sum'"
    ):
        compile_mlp(nn.CrossEntropyLoss(reduction="sum"))
    with pytest.raises(ValueError, match="reduction='sum' but loss_reduction='mean'"):
        compile_mlp(functools.partial(F.cross_entropy, reduction="sum"))
    with pytest.raises(ValueError, match="loss_reduction must be 'mean', 'sum' or a function"):
        compile_mlp(F.cross_entropy, loss_reduction="avg")
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    with compile_mlp(sum_loss) as pipe, pytest.raises(PipelineError, match="pass loss_reduction='sum'"):
        pipe.step(x, y).wait()
    with (
        compile_mlp(F.cross_entropy, loss_reduction="sum") as pipe,
        pytest.raises(PipelineError, match="pass loss_reduction='mean'"),
    ):
        pipe.step(x, y).wait()
    for method in ("gpipe", "pipeoptim"):  # one micro-batch, but the replicas' shares weighed as means
        with (
            compile_mlp(sum_loss, method=method, micro_batches=1, data_parallel=2) as pipe,
            pytest.raises(PipelineError, match="pass loss_reduction='sum'"),
        ):
            pipe.step(x, y).wait()


def test_loss_that_is_neither_mean_nor_sum_is_refused() -> None:
    def over_the_largest_target(out, y):  # normalised by a statistic of the batch
        return F.cross_entropy(out, y, reduction="sum") / (1 + y.max())

    x, y = torch.randn(16, 6), torch.arange(16) % 4
    with (
        compile_mlp(over_the_largest_target) as pipe,
        pytest.raises(PipelineError, match=r"neither the mean .* nor the sum"),
    ):
        pipe.step(x, y).wait()


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
@pytest.mark.parametrize("held", ["default", 1])
def test_the_loss_checks_run_off_the_critical_path(monkeypatch, method: str, held: Any) -> None:
    """The last stage checks each micro-batch's loss reduction, every micro-batch, none left
    pending after a step: all before the optimizer step (after it the stage waits for the next
    mini-batch), and after a backward, once its gradients are sent on, only as many as hold
    more than ``HELD_BYTES`` of outputs (checked after each backward, the check of every
    micro-batch but the last delayed the next forward of our 1F1B, 1.4% of its rate on the
    benchmark MLP; a pending check holds views of its micro-batch's output). A loss that is not
    a mean is refused before the last stage steps, the note naming the check and its
    micro-batch."""
    from pipeoptim.runtime import executor

    if held != "default":
        monkeypatch.setattr(executor, "HELD_BYTES", held)
    events: list[tuple[Any, ...]] = []
    send = executor._Mailbox.send_grads
    monkeypatch.setattr(
        executor._Mailbox, "send_grads", lambda self, *a: events.append(("sent",)) or send(self, *a)
    )
    checks = []
    real_check = loss_check.CheckedLoss._check
    monkeypatch.setattr(
        loss_check.CheckedLoss,
        "_check",
        lambda self, whole, pairs, rows, *t: checks.append(rows) or real_check(self, whole, pairs, rows, *t),
    )
    real_pending = loss_check.CheckedLoss.check_pending

    def check_pending(self, keep_bytes: int = 0, *when: str) -> None:
        before = len(self.pending)
        real_pending(self, keep_bytes, *when)
        events.append(("check", keep_bytes, before, len(self.pending)))

    monkeypatch.setattr(loss_check.CheckedLoss, "check_pending", check_pending)
    x, y = torch.randn(16, 6), torch.arange(16) % 4
    with compile_mlp(F.cross_entropy, method=method) as pipe:
        last = pipe._executor.stages[-1]
        step = last.step
        monkeypatch.setattr(last, "step", lambda *a, **k: events.append(("step",)) or step(*a, **k))
        for _ in range(3):
            pipe.step(x, y).wait()
            assert not last.loss_check.pending
    assert checks == [4] * 12  # every micro-batch of 4 rows
    keep = loss_check.HELD_BYTES if held == "default" else held
    if held == "default":  # outputs of 4 x 4 rows: none checked until the step
        pending = [4, 4, 4, 4] if method == "gpipe" else [1, 2, 3, 4]  # GPipe: all forwards first
        after = pending
    else:  # each checked after the backward that follows it (GPipe: all at the first)
        pending = [4, 0, 0, 0] if method == "gpipe" else [1, 1, 1, 1]
        after = [0, 0, 0, 0]
    at_step = ("check", 0, after[-1], 0)
    expected = [e for n, m in zip(pending, after) for e in (("sent",), ("check", keep, n, m))]
    assert events == [*expected, at_step, ("step",)] * 3

    def over_the_largest_target(out, y):
        return F.cross_entropy(out, y, reduction="sum") / (1 + y.max())

    with (
        compile_mlp(over_the_largest_target, method=method) as pipe,
        pytest.raises(PipelineError, match=r"neither the mean .* nor the sum") as caught,
    ):
        before = [p.detach().clone() for p in pipe._executor.stages[-1].module.parameters()]
        pipe.step(x, y).wait()
    when = "before the optimizer step" if held == "default" else "after a backward"
    noted = "".join(caught.value.__notes__)
    assert f"stage 1's loss check ({when}) of micro-batch 0 of mini-batch 0" in noted
    after_params = list(pipe._executor.stages[-1].module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after_params))


@pytest.mark.parametrize("method", ["gpipe", "1f1b", "2bw"])
def test_pending_loss_checks_hold_no_activations(monkeypatch, method: str) -> None:
    """A pending check keeps its micro-batch's output only, not the output's graph: holding
    the graph kept the last stage's received activation and its gradient alive after the
    backward until the step, for every micro-batch of the mini-batch (helper-94: 8 of 8,
    32 MiB beside outputs of 1 KiB; ``HELD_BYTES`` counts the outputs only)."""
    import gc
    import weakref

    from pipeoptim.runtime.stage import StageRuntime

    inputs: list[weakref.ref] = []
    alive: list[tuple[int, int]] = []  # after each backward of the last stage: (pending, alive)
    backward = StageRuntime.backward

    def recording_backward(self, micro_batch, grads=None):
        if not self.is_last:
            return backward(self, micro_batch, grads)
        held = self._in_flight[micro_batch].inputs
        inputs.extend(weakref.ref(x) for x in held if isinstance(x, torch.Tensor))
        del held
        result = backward(self, micro_batch, grads)
        gc.collect()
        alive.append((len(self.loss_check.pending), sum(ref() is not None for ref in inputs)))
        return result

    monkeypatch.setattr(StageRuntime, "backward", recording_backward)
    x, y = torch.randn(16, 6), torch.arange(16) % 4
    gc.collect()
    gc.freeze()  # the suite's objects so far are not scanned by each collect (0.3 s each)
    try:
        with compile_mlp(F.cross_entropy, method=method) as pipe:
            for _ in range(3):
                pipe.step(x, y).wait()
    finally:
        gc.unfreeze()
    assert inputs and max(pending for pending, _ in alive) >= 2  # checks were pending
    assert [n for _, n in alive] == [0] * len(alive)


def test_loss_checks_hold_bounded_outputs() -> None:
    """Pending checks count the bytes of the outputs they keep (each storage once), and
    ``check_pending(keep_bytes)`` runs the oldest until at most ``keep_bytes`` are held."""
    checker = loss_check.CheckedLoss(F.cross_entropy, "mean")
    outs = [torch.randn(8, 4) for _ in range(3)]
    y = torch.arange(8) % 4
    for j, out in enumerate(outs):
        checker.where = (0, j, (8, 8, 8))
        checker(out, y)
    each = 8 * 4 * 4 + 8 * 8  # the output's float32 and the targets' int64
    assert [n for n, _, _ in checker.pending] == [each] * 3
    checker.check_pending(2 * each)
    assert [w[1] for _, w, _ in checker.pending] == [1, 2]
    checker.check_pending(each + 1)
    assert [w[1] for _, w, _ in checker.pending] == [2]
    checker.check_pending()
    assert not checker.pending


class DictHead(nn.Module):
    """A model returning a dict (and a list inside it), as many users' models do."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        logits = self.b(torch.relu(self.a(x)))
        return {"logits": logits, "extra": [logits.sum(1)]}


def popping_mean_loss(out: dict[str, Any], y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.pop("logits"), y)  # changes the dict, as the plain model allows


def test_a_dict_output_reaches_loss_fn_and_predict_as_a_dict_it_may_change() -> None:
    """loss_fn and predict() got torch.fx's immutable_dict / immutable_list, so ``out.pop(...)``
    or ``pred["probs"] = ...`` raised where the plain model's dict allowed them; and a loss_fn
    that emptied the dict hid the rows from the loss-reduction check, which then checked nothing."""
    torch.manual_seed(0)
    model = DictHead()
    x, y = torch.randn(16, 6), torch.arange(16) % 4
    plain = popping_mean_loss(model(x), y).item()
    with compile_mlp(popping_mean_loss, model=copy.deepcopy(model)) as pipe:
        pred = pipe.predict(x)
        assert type(pred) is dict and type(pred["extra"]) is list
        torch.testing.assert_close(pred["logits"], model(x)["logits"], rtol=0, atol=1e-6)
        pred["probs"] = pred.pop("logits").softmax(-1)
        assert pipe.step(x, y).item() == pytest.approx(plain, rel=1e-6)

    def popping_sum_loss(out: dict[str, Any], y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.pop("logits"), y, reduction="sum")

    with (
        compile_mlp(popping_sum_loss, model=DictHead()) as pipe,
        pytest.raises(PipelineError, match="pass loss_reduction='sum'"),
    ):
        pipe.step(x, y).wait()


Scores = collections.namedtuple("Scores", ["logits", "hidden"])


class NamedTupleHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> Scores:
        h = torch.relu(self.a(x))
        return Scores(logits=self.b(h), hidden=h)


def test_a_namedtuple_output_reaches_loss_fn_and_predict_as_that_namedtuple() -> None:
    """fx records ``Scores(...)`` as one call, so the output was one leaf that predict() could
    not join (it refused, advising a tuple; helper-127). Its fields are the outputs now."""
    torch.manual_seed(0)
    model = NamedTupleHead()
    x, y = torch.randn(16, 6), torch.arange(16) % 4

    def loss_fn(out: Scores, y: torch.Tensor) -> torch.Tensor:
        assert type(out) is Scores
        return F.cross_entropy(out.logits, y)

    plain = loss_fn(model(x), y).item()
    with compile_mlp(loss_fn, model=copy.deepcopy(model)) as pipe:
        pred, expected = pipe.predict(x), model(x)
        assert type(pred) is Scores
        for got, want in zip(pred, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert pipe.step(x, y).item() == pytest.approx(plain, rel=1e-6)


def penalised_mean(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A mean over rows that autocast leaves partly in bfloat16 (the penalty term)."""
    return F.cross_entropy(out, y) + out.pow(2).mean()


def test_a_mean_loss_under_bfloat16_autocast_passes_the_reduction_check() -> None:
    """The check compared the loss of the rows with its parts' to rtol 1e-4, below bfloat16's
    rounding (about 4e-3): a true mean, half of it computed in bfloat16, was refused as
    "neither the mean nor the sum" some mini-batches into training."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(15, 6, generator=g) * 3, torch.randint(0, 4, (15,), generator=g)) for _ in range(6)]
    model = MLP()
    with torch.autocast("cpu", torch.bfloat16):
        plain = penalised_mean(model(data[0][0]), data[0][1]).item()
    with compile_mlp(
        penalised_mean, model=copy.deepcopy(model), micro_batches=3, autocast=torch.bfloat16
    ) as pipe:
        losses = [pipe.step(x, y).item() for x, y in data]
    assert losses[0] == pytest.approx(plain, rel=2e-2)  # micro-batches of 5 rows round otherwise
    with (
        compile_mlp(
            lambda o, t: penalised_mean(o, t) * t.shape[0], micro_batches=3, autocast=torch.bfloat16
        ) as pipe,
        pytest.raises(PipelineError, match="pass loss_reduction='sum'"),
    ):
        pipe.step(*data[0]).wait()  # the check still tells a sum from a mean


def test_schedule_of_a_smaller_last_mini_batch() -> None:
    from pipeoptim.runtime.schedule import format_actions, schedule_for

    schedules = [schedule_for(k, "1f1b", 2, micro_batches=4) for k in range(2)]
    for schedule in schedules:
        schedule.on_mini_batch()
    smaller = [schedule.on_mini_batch(2) for schedule in schedules]
    assert format_actions(smaller) == "stage 0: F4 F5 B4 B5 S1\nstage 1: F4 B4 F5 B5 S1"
    assert schedules[0].on_mini_batch()[0].micro_batch == 8  # numbering stays mini_batch * M + j
    with pytest.raises(ValueError, match=r"1\.\.1 micro-batches, not 2"):
        schedule_for(0, "async-1f1b", 2).on_mini_batch(2)


class BatchNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4, momentum=None)  # cumulative average
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.c1(x)))
        h = F.max_pool2d(torch.relu(self.bn2(self.c2(h))), 2)
        return self.fc(h.flatten(1))


def deferred_reference(model, batches, micro: int):
    """Plain training, written from torchgpipe's definition: each micro-batch is normalised with
    its own statistics (gradient accumulation), while each BatchNorm's running statistics are
    updated once per mini-batch from the mean and unbiased variance of all its rows."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    seen: dict[nn.Module, list[torch.Tensor]] = {}
    for bn in norms:
        bn.register_forward_pre_hook(lambda m, args: seen.setdefault(m, []).append(args[0].detach()))
    losses = []
    for x, y in batches:
        saved = [
            (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in norms
        ]
        seen.clear()
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(torch.tensor_split(x, micro), torch.tensor_split(y, micro)):
            loss = F.cross_entropy(model(xs), ys) * (len(xs) / len(x))
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
        with torch.no_grad():
            for bn, (mean0, var0, count0) in zip(norms, saved):
                rows = torch.cat(seen[bn]).double().transpose(0, 1).flatten(1)  # [channels, values]
                count = count0 + 1
                m = 1.0 / float(count) if bn.momentum is None else bn.momentum
                bn.running_mean.copy_((1 - m) * mean0 + m * rows.mean(1).float())
                bn.running_var.copy_((1 - m) * var0 + m * rows.var(1, unbiased=True).float())
                bn.num_batches_tracked.copy_(count)
    return losses, model.state_dict()


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
def test_deferred_batch_norm_tracks_the_whole_mini_batch(method: str) -> None:
    torch.manual_seed(0)
    model = BatchNormCNN()
    g = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(n, 1, 8, 8, generator=g) * 3 + 1, torch.randint(0, 5, (n,), generator=g))
        for n in (16, 16, 16, 6)
    ]
    expected = deferred_reference(model, batches, micro=4)
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        2,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        micro_batches=4,
        batch_norm="deferred",
        executor="local",
        profile_dir=None,
    ) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches], pipe.state_dict()
        trained = pipe.to_module()
        assert type(trained.bn1) is nn.BatchNorm2d  # the user's classes come back
        torch.testing.assert_close(
            pipe.predict(batches[0][0]), trained.eval()(batches[0][0]), rtol=1e-5, atol=1e-5
        )
    assert int(got[1]["bn1.num_batches_tracked"]) == 4  # once per mini-batch, not per micro-batch
    assert_equal_training(got, expected)


def test_deferred_batch_norm_is_refused_where_it_cannot_apply() -> None:
    with pytest.raises(ValueError, match="needs a method that flushes"):
        compile_mlp(F.cross_entropy, batch_norm="deferred", method="pipeoptim", micro_batches=None)
    with pytest.raises(ValueError, match="has no BatchNorm"):
        compile_mlp(F.cross_entropy, batch_norm="deferred")
    with pytest.raises(ValueError, match="batch_norm must be"):
        compile_mlp(F.cross_entropy, batch_norm="whole")


class Tracker(nn.Module):
    """An exponential running mean of its input's features in a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ema", torch.zeros(16), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.ema.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return h - self.ema


class RunningMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.tracker, self.b = nn.Linear(8, 16), Tracker(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.tracker(torch.relu(self.a(x))))


@pytest.mark.parametrize(
    "executor, leaves",
    [("local", []), ("local", ["tracker"]), pytest.param("processes", ["tracker"], marks=pytest.mark.slow)],
)
def test_to_module_holds_the_trained_non_persistent_buffers(executor: str, leaves: list[str]) -> None:
    """A non-persistent buffer updated in forward trained right in the stages, but to_module()
    loaded state_dict() (which leaves such buffers out, as torch's does) into a copy of the
    model as given: it returned the buffer's first value, 0.063 off in eval (helper-156); a leaf
    module's kept it out of its stage's state too (helper-158)."""
    torch.manual_seed(0)
    model, x, y = RunningMean(), torch.randn(8, 8), torch.randint(0, 3, (8,))
    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        optimizer.step()
    options = dict(example_inputs=x, loss_fn=F.cross_entropy, method="gpipe", micro_batches=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pipeoptim.compile(model, optimizer, 2, **options, executor=executor, leaf_modules=leaves) as pipe:
        for _ in range(3):
            pipe.step(x, y)
        trained, state = pipe.to_module(), pipe.state_dict()
    assert "tracker.ema" not in state and plain.tracker.ema.abs().sum() > 0
    torch.testing.assert_close(trained.tracker.ema, plain.tracker.ema, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(trained.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-6)


class TextLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.emb(ids)))
        out, _ = self.lstm(h)
        scores = out @ out.transpose(1, 2)  # [batch, length, length]: both dims follow the length
        return self.head(torch.softmax(scores, -1) @ out).mean(1)


def text_batches():
    """Variable-length batches of a text task (the longest first), and a smaller last one."""
    g = torch.Generator().manual_seed(4)
    shapes = [(8, 12), (8, 9), (8, 5), (8, 12), (3, 7)]
    return [(torch.randint(0, 20, s, generator=g), torch.randint(0, 3, (s[0],), generator=g)) for s in shapes]


@pytest.mark.parametrize("executor", ["local", pytest.param("processes", marks=pytest.mark.slow)])
def test_variable_sequence_lengths_train_without_recompiling(executor: str, tmp_path) -> None:
    torch.manual_seed(0)
    model, batches = TextLSTM(), text_batches()
    expected = full_batch_training(model, batches, F.cross_entropy)
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        3,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method="1f1b",
        micro_batches=2,
        executor=executor,
        profile_dir=tmp_path,
        timeout=60,
    ) as pipe:
        assert pipe.spec.length == 12
        got = [pipe.step(x, y).item() for x, y in batches], pipe.state_dict()
        trained = pipe.to_module().eval()
        short = batches[2][0]
        torch.testing.assert_close(pipe.predict(short), trained(short), rtol=1e-5, atol=1e-6)
        with pytest.raises(PipelineError, match=r"expects \[batch, length≤12\]"):
            pipe.step(torch.randint(0, 20, (8, 13)), torch.zeros(8, dtype=torch.long))
    assert_equal_training(got, expected)


@pytest.mark.parametrize("saved_without_the_flag", [False, True])
def test_a_plan_given_back_keeps_serving_shorter_sequences(saved_without_the_flag: bool, tmp_path) -> None:
    """``plan=`` (to repeat a run, README) refused every shorter sequence in step and predict:
    the given plan's path did not know the graph ran at other lengths (helper-156). A plan file
    saved before the flag was recorded is read from its boundary values' length steps."""
    torch.manual_seed(0)
    model, batches = TextLSTM(), text_batches()
    expected = full_batch_training(model, batches, F.cross_entropy)
    options = dict(example_inputs=batches[0][0], loss_fn=F.cross_entropy, method="1f1b", micro_batches=2)
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net, torch.optim.SGD(net.parameters(), lr=0.1), 3, **options, executor="local"
    ) as pipe:
        saved = pipe.plan.to_dict()
    assert saved["summary"]["dynamic_length"] is True
    if saved_without_the_flag:
        del saved["summary"]["dynamic_length"]
    (tmp_path / "plan.json").write_text(json.dumps(saved))
    net = copy.deepcopy(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with pipeoptim.compile(
        net, optimizer, 3, **options, executor="local", plan=tmp_path / "plan.json"
    ) as pipe:
        assert pipe.spec.length == 12
        got = [pipe.step(x, y).item() for x, y in batches], pipe.state_dict()
        short = batches[2][0]
        torch.testing.assert_close(pipe.predict(short), pipe.to_module().eval()(short), rtol=1e-5, atol=1e-6)
    assert_equal_training(got, expected)


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(self.emb(ids))))


PAD = -100


def token_loss(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padding tokens (a token count, not the rows, normalises it)."""
    return F.cross_entropy(logits.flatten(0, 1), tags.flatten(), ignore_index=PAD)


def count_tokens(tags: torch.Tensor) -> torch.Tensor:
    return (tags != PAD).sum()


def padded_batches():
    g = torch.Generator().manual_seed(6)
    out = []
    for n in (16, 16, 6):
        ids = torch.randint(0, 20, (n, 7), generator=g)
        tags = torch.randint(0, 5, (n, 7), generator=g)
        lengths = torch.randint(1, 8, (n,), generator=g)
        tags[torch.arange(7) >= lengths[:, None]] = PAD  # rows of different lengths
        out.append((ids, tags))
    return out


def test_token_mean_loss_with_a_counting_reduction_equals_plain_training() -> None:
    torch.manual_seed(0)
    model, batches = Tagger(), padded_batches()
    expected = full_batch_training(model, batches, token_loss)
    got = pipelined(model, batches, token_loss, "1f1b", loss_reduction=count_tokens)
    assert_equal_training(got, expected)
    with (  # without loss_reduction the rows would weigh the micro-batches, not the tokens
        compile_mlp(token_loss, model=Tagger(), example=batches[0][0]) as pipe,
        pytest.raises(PipelineError, match=r"neither the mean .* nor the sum"),
    ):
        pipe.step(*batches[0]).wait()


@pytest.mark.parametrize("method", ["pipeoptim", "spectrain", "pipedream", "none"])
def test_an_optimizer_holding_only_the_head_trains_only_the_head(method: str) -> None:
    """Fine-tuning the head without ``requires_grad=False`` on the body: weight prediction
    raised a KeyError at compile for the parameters no optimizer group holds. They never move,
    so nothing is predicted for them; one stage equals plain training exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    head_only = lambda m: torch.optim.SGD(m[4].parameters(), lr=0.1, momentum=0.9)  # noqa: E731
    expected, _ = full_batch_training(model, [(x, y)] * 4, F.cross_entropy, make_optimizer=head_only)
    for gpus in (1, 3):
        net = copy.deepcopy(model)
        head_opt = torch.optim.SGD(net[4].parameters(), lr=0.1, momentum=0.9)
        with pipeoptim.compile(
            net, head_opt, gpus, example_inputs=x, loss_fn=F.cross_entropy, method=method, profile_dir=None
        ) as pipe:
            losses = [pipe.step(x, y).item() for _ in range(4)]
            trained = pipe.state_dict()
        if gpus == 1:
            assert losses == expected
        for name, value in model.state_dict().items():  # the body never moves, the head does
            assert torch.equal(trained[name], value) != name.startswith("4."), name


def test_padding_that_first_appears_in_a_later_mini_batch_is_caught_there() -> None:
    """The check that the loss is the mean over rows ran on the first three calls only: with
    data bucketed by length, ignore_index padding first came in mini-batch 3 and the split
    mini-batches trained silently wrong from there (weights 0.16 off plain training)."""

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, ignore_index=-100)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    batches = []
    for i in range(6):
        x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
        if i >= 3:
            y[:3] = -100
        batches.append((x, y))

    def compiled(**kwargs):
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        return pipeoptim.compile(
            net, opt, 2, example_inputs=batches[0][0], loss_fn=loss_fn, method="gpipe",
            micro_batches=2, executor="local", profile_dir=None, **kwargs,
        )  # fmt: skip

    with compiled() as pipe:
        for x, y in batches[:3]:
            pipe.step(x, y)
        with pytest.raises(PipelineError, match="loss_reduction=a function of the targets"):
            pipe.step(*batches[3])
    plain_sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.5)  # noqa: E731
    expected, _ = full_batch_training(model, batches, loss_fn, make_optimizer=plain_sgd)
    with compiled(loss_reduction=lambda y: (y != -100).sum()) as pipe:  # the documented fix
        assert [pipe.step(x, y).item() for x, y in batches] == pytest.approx(expected, abs=1e-6)


class ClippedSGD(torch.optim.SGD):
    """The common subclass pattern: a constructor argument kept as an attribute, not in defaults."""

    def __init__(self, params, lr: float, clip: float = 1.0) -> None:
        super().__init__(params, lr=lr)
        self.clip = clip

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.clamp_(-self.clip, self.clip)
        return super().step(closure)


class RequiredClipSGD(ClippedSGD):
    def __init__(self, params, lr: float, clip: float) -> None:
        super().__init__(params, lr, clip)


class HiddenClipSGD(ClippedSGD):
    def __init__(self, params, lr: float, limit: float) -> None:
        super().__init__(params, lr, limit)  # kept as self.clip: the stages cannot find 'limit'


@pytest.mark.parametrize("optimizer_class", [ClippedSGD, RequiredClipSGD])
def test_a_custom_optimizer_keeps_its_own_constructor_arguments(optimizer_class) -> None:
    """The stages rebuilt the optimizer from optimizer.defaults alone: ClippedSGD(clip=0.001)
    trained as if clip=1.0 (weights 0.39 off), and a required clip failed in the stages."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    batches = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(4)]
    clipped = lambda m: optimizer_class(m.parameters(), lr=1.0, clip=0.001)  # noqa: E731
    expected, weights = full_batch_training(model, batches, F.cross_entropy, make_optimizer=clipped)
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net, optimizer_class(net.parameters(), lr=1.0, clip=0.001), 2, example_inputs=batches[0][0],
        loss_fn=F.cross_entropy, method="gpipe", micro_batches=1, executor="local", profile_dir=None,
    ) as pipe:  # fmt: skip
        assert [pipe.step(x, y).item() for x, y in batches] == pytest.approx(expected, abs=1e-6)
        trained = pipe.state_dict()
    assert all(torch.allclose(trained[k], v, atol=1e-6) for k, v in weights.items())


def test_a_required_optimizer_argument_the_stages_cannot_find_is_named() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"'limit' is in neither: keep it in defaults .* or as self.limit"):
        pipeoptim.compile(
            model, HiddenClipSGD(model.parameters(), lr=1.0, limit=0.1), 1, example_inputs=torch.randn(8, 8),
            loss_fn=F.cross_entropy, executor="local", profile_dir=None,
        )  # fmt: skip


class WithDefaults(nn.Module):
    """Non-tensor arguments left at their defaults, as in many models' forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, temperature: float = 2.0, repeats: int = 2, mode: str = "relu"):
        h = self.a(x)
        for _ in range(repeats):
            h = torch.relu(h) if mode == "relu" else torch.tanh(h)
        return self.b(h) / temperature


def test_non_tensor_arguments_left_at_their_defaults_are_baked_in() -> None:
    """forward(x, temperature: float = 2.0) failed to compile: "argument 'temperature_1' is used
    by the graph but has no example input" (fx's guard on the specialised default)."""
    torch.manual_seed(0)
    model = WithDefaults()
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    plain = copy.deepcopy(model)
    expected = F.cross_entropy(plain(x), y).item()
    with pipeoptim.compile(
        model, torch.optim.SGD(model.parameters(), lr=0.1), 2, example_inputs=x, loss_fn=F.cross_entropy,
        executor="local", profile_dir=None,
    ) as pipe:  # fmt: skip
        assert pipe.step(x, y).item() == pytest.approx(expected, abs=1e-6)
    assert "temperature" not in trace(WithDefaults(), (x,)).gm.code  # no placeholder left for it


def test_targets_given_as_a_list_of_rows_are_refused_where_mini_batches_are_split() -> None:
    """A list of 8 labels reached every micro-batch whole: cross_entropy failed on the sizes,
    and a loss that does not check them would have been silently wrong."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, labels = torch.randn(8, 8), [0, 1, 2, 3, 0, 1, 2, 3]

    def loss_fn(out: torch.Tensor, y: dict) -> torch.Tensor:
        return F.cross_entropy(out, torch.as_tensor(y["labels"])) * y["weight"]

    def compiled() -> pipeoptim.Pipeline:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return pipeoptim.compile(
            model, opt, 2, example_inputs=x, loss_fn=loss_fn, method="gpipe", micro_batches=2,
            executor="local", profile_dir=None,
        )  # fmt: skip

    with compiled() as pipe, pytest.raises(PipelineError, match=r"targets is a list of 8 values, one per"):
        pipe.step(x, labels)
    with compiled() as pipe:
        with pytest.raises(PipelineError, match=r"targets\['labels'\] is a list of 8 values"):
            pipe.step(x, {"labels": labels, "weight": 0.5})
        assert pipe.step(x, {"labels": torch.tensor(labels), "weight": 0.5}).item() > 0  # the fix


def _weighted_loss(out: torch.Tensor, y: dict) -> torch.Tensor:
    return F.cross_entropy(out, y["labels"], weight=y["weight"])


def _multi_label_loss(out: torch.Tensor, y: list) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out[:, :2], torch.tensor(y, dtype=torch.float32))


def _dense_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y.to_dense())


@pytest.mark.parametrize(
    ("targets", "loss_fn", "message"),
    [
        (
            torch.arange(5) % 4,
            F.cross_entropy,
            r"targets is a tensor of shape \[5\], 5 along dim 0 where the inputs have 8 rows, which cannot",
        ),
        (torch.arange(16) % 4, F.cross_entropy, r"shape \[16\].*reshape flattened targets to \[8, \.\.\.\]"),
        (
            np.arange(8) % 4,
            F.cross_entropy,
            r"targets is an array of shape \[8\] \(ndarray\).*as_tensor.*functools\.partial",
        ),
        ([[0, 1]] * 8, _multi_label_loss, r"targets is a list of 8 values, one per row"),
        (
            [torch.tensor(i % 4) for i in range(8)],
            F.cross_entropy,
            r"list of 8 tensors, one per row.*torch\.stack",
        ),
        (F.one_hot(torch.arange(8) % 4).float().to_sparse(), _dense_mse, r"sparse tensor.*\.to_dense\(\)"),
        (
            {"labels": torch.arange(8) % 4, "weight": torch.ones(4)},
            _weighted_loss,
            r"targets\['weight'\] is a tensor of shape \[4\]",
        ),
    ],
    ids=["fewer-rows", "flattened", "numpy", "nested-lists", "row-tensors", "sparse", "class-weights"],
)
def test_targets_not_split_like_the_inputs_are_refused(targets: Any, loss_fn: Any, message: str) -> None:
    """Tensors in the targets are split along dim 0 and other leaves repeated in every
    micro-batch: a class-weight vector was cut in halves (cross_entropy then failed on the class
    count, a loss that does not check was silently wrong), a NumPy array or a list of per-row
    lists of labels reached every micro-batch whole, a sparse tensor failed inside
    tensor_split, labels of another row count failed inside loss_fn; none named the fix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(8, 8)
    with pipeoptim.compile(
        model, torch.optim.SGD(model.parameters(), lr=0.1), 2, example_inputs=x, loss_fn=loss_fn,
        method="gpipe", micro_batches=2, executor="local", profile_dir=None,
    ) as pipe, pytest.raises(PipelineError, match=message):  # fmt: skip
        pipe.step(x, targets)


def test_class_weights_given_to_loss_fn_as_the_error_says_train_as_the_plain_model() -> None:
    """The fix the class-weight refusal names (functools.partial) gives the plain model's loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y, weight = torch.randn(8, 8), torch.arange(8) % 4, torch.tensor([1.0, 2.0, 0.5, 1.0])
    loss_fn = functools.partial(F.cross_entropy, weight=weight, reduction="sum")
    expected = loss_fn(copy.deepcopy(model)(x), y).item()
    with pipeoptim.compile(
        model, torch.optim.SGD(model.parameters(), lr=0.1), 2, example_inputs=x, loss_fn=loss_fn,
        method="gpipe", micro_batches=2, executor="local", profile_dir=None, loss_reduction="sum",
    ) as pipe:  # fmt: skip
        assert pipe.step(x, y).item() == pytest.approx(expected, rel=1e-6)


def _first_loss_equals_plain(
    model: nn.Module, x: torch.Tensor, targets: Any, loss_fn: Any, method: str
) -> None:
    """One step of ``method`` (local executor) gives the loss of the plain model (rel 1e-6)."""
    expected = loss_fn(copy.deepcopy(model)(x), targets).item()
    with pipeoptim.compile(
        model, torch.optim.SGD(model.parameters(), lr=0.1), 2, example_inputs=x, loss_fn=loss_fn,
        method=method, executor="local", profile_dir=None,
    ) as pipe:  # fmt: skip
        assert pipe.step(x, targets).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", ["gpipe", "pipeoptim"])
def test_scalar_and_sparse_targets_train_as_the_plain_model(method: str) -> None:
    """A 0-dim tensor in the targets (a per-mini-batch scalar) failed inside tensor_split, with
    one micro-batch too, and a sparse one failed to be copied; the scalar now reaches every
    micro-batch like a Python float, and one micro-batch takes the targets as they are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(8, 8), torch.arange(8) % 4
    _first_loss_equals_plain(model, x, {"labels": y, "scale": torch.tensor(0.5)}, _scaled_loss, method)
    if method == "pipeoptim":  # one micro-batch: a sparse target passes as it is
        _first_loss_equals_plain(model, x, F.one_hot(y, 4).float().to_sparse(), _dense_mse, method)


def _scaled_loss(out: torch.Tensor, y: dict) -> torch.Tensor:
    return F.cross_entropy(out, y["labels"]) * y["scale"]


class _SignSTE(torch.autograd.Function):
    """sign(x) forward, the straight-through estimator backward (the gradient passes as is):
    differentiated as traced, sign() would pass no gradient at all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _Binarize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignSTE.apply(x)


class _BinaryNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.binarize, self.b = nn.Linear(6, 16), _Binarize(), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.binarize(self.a(x)))


class _ApplyInRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(_SignSTE.apply(x))


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
def test_a_custom_autograd_function_keeps_its_own_backward(method: str) -> None:
    """fx traced through ``_SignSTE.apply``: the graph held ``torch.sign`` and the first layer
    got no gradient (its weights never moved). The module calling the Function is now a leaf
    (with a warning naming it), and training equals plain training."""
    torch.manual_seed(0)
    model, batches = _BinaryNet(), loader()[:3]
    expected = full_batch_training(model, batches, F.cross_entropy)
    assert not torch.equal(expected[1]["a.weight"], model.a.weight)  # the STE trains layer a
    traced_warning = r"made these modules leaves.*binarize \(calls the custom autograd.Function .*_SignSTE"
    with pytest.warns(UserWarning, match=traced_warning):
        got = pipelined(model, batches, F.cross_entropy, method)
    assert_equal_training(got, expected)
    assert "binarize" in trace(model, batches[0][0]).auto_leaves


def test_a_custom_autograd_function_in_the_root_forward_is_refused_with_the_fix() -> None:
    with pytest.raises(
        TraceError, match=r"_ApplyInRoot.forward calls the custom autograd.Function .*Fix: move that code"
    ):
        trace(_ApplyInRoot(), torch.randn(4, 6))


class _Distilled(nn.Module):
    """A teacher layer under ``torch.no_grad()`` (trainable, but frozen by the forward) feeding
    a student; ``mode`` picks the switch: ``no_grad`` or ``set_grad_enabled(False)``."""

    def __init__(self, mode: str = "no_grad") -> None:
        super().__init__()
        self.mode = mode
        self.teacher, self.student = _Teacher(mode), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(self.teacher(x))


class _Teacher(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode, self.layer = mode, nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "inference_mode":
            with torch.inference_mode():
                h = torch.tanh(self.layer(x))
            return h.clone()  # an inference tensor, out of the region
        switch = torch.no_grad() if self.mode == "no_grad" else torch.set_grad_enabled(False)
        with switch:
            return torch.tanh(self.layer(x))


class _GradSwitchInRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.a(x)
        return self.b(h)


class _AutocastBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.layer(x).float()


@pytest.mark.parametrize("mode", ["no_grad", "set_grad_enabled", "inference_mode"])
def test_a_forward_under_no_grad_stays_frozen(mode: str) -> None:
    """The switch ran once at trace time and the graph had none: the teacher got gradients
    and moved. Its module is now a leaf, and training equals plain training (teacher unmoved)."""
    torch.manual_seed(0)
    model, batches = _Distilled(mode), loader()[:3]
    expected = full_batch_training(model, batches, F.cross_entropy)
    assert torch.equal(expected[1]["teacher.layer.weight"], model.teacher.layer.weight)
    with pytest.warns(
        UserWarning,
        match=r"made these modules leaves.*teacher \((switches gradients off|enters torch.inference)",
    ):
        got = pipelined(model, batches, F.cross_entropy, "1f1b")
    assert_equal_training(got, expected)


def test_autocast_in_a_forward_is_kept() -> None:
    """The bfloat16 region of ``_AutocastBlock`` ran in float32 once traced; its module is now a
    leaf, and the traced model computes exactly what the model does."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(6, 6), _AutocastBlock(), nn.Linear(6, 4)), torch.randn(8, 6)
    with pytest.warns(UserWarning, match=r"made these modules leaves.*1 \(enters or leaves torch.autocast"):
        traced = trace(model, x)
    expected = model(x)
    assert not torch.equal(expected, model[2](model[1].layer(model[0](x))))  # float32 differs
    assert torch.equal(traced.gm(x)[0], expected)


def test_a_grad_switch_in_the_root_forward_is_refused_with_the_fix() -> None:
    with pytest.raises(TraceError, match=r"_GradSwitchInRoot.forward switches gradients off .*Fix: move"):
        trace(_GradSwitchInRoot(), torch.randn(4, 6))


class _FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(torch.tanh(self.layer(x)), 0.5, self.training)


class _TrainingOnlyShift(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        if self.training:
            h = h + 1.0
        return h


class _RootReadsTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h + 1.0 if self.training else h)


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        (_FunctionalDropout, "passes self.training to an operation"),
        (_TrainingOnlyShift, "reads self.training"),
    ],
)
def test_a_module_reading_self_training_follows_eval_in_predict(block: type, reason: str) -> None:
    """fx read ``self.training`` once, at trace time: predict() kept the functional dropout
    and the training-only branch. The module now runs as written (a leaf), so predict()
    equals the model in eval mode, and training still equals plain training."""
    torch.manual_seed(0)
    model, x = nn.Sequential(block(), nn.Linear(6, 4)), torch.randn(8, 6)
    model.eval()
    expected = model(x)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.warns(UserWarning, match=rf"made these modules leaves.*0 \({reason}"),
        pipeoptim.compile(
            model, opt, 1, example_inputs=x, loss_fn=F.cross_entropy, executor="local", profile_dir=None
        ) as pipe,
    ):
        assert torch.equal(pipe.predict(x), expected)


def test_a_root_forward_reading_self_training_is_traced_with_a_warning() -> None:
    with pytest.warns(
        UserWarning, match=r"_RootReadsTraining.forward reads self.training.*predict runs it too"
    ):
        traced = trace(_RootReadsTraining(), torch.randn(4, 6))
    assert not traced.auto_leaves


class _TakesTrainingFlag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        h = self.layer(x)
        return h * 0.5 if train else h


class _PassesTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.child, self.head = _TakesTrainingFlag(), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.child(x, self.training))


def test_self_training_passed_to_a_submodule_makes_the_reader_a_leaf() -> None:
    """The child testing the flag became a leaf, then the flag given to that leaf raised at
    the child again: trace() looped for ever. The module that read ``self.training`` (here the
    root, traced at its value with a warning; nested, that module) is the one it blames."""
    with pytest.warns(UserWarning, match=r"_PassesTraining.forward passes self.training"):
        traced = trace(_PassesTraining(), torch.randn(4, 6))
    assert list(traced.auto_leaves) == ["child"]
    with pytest.warns(UserWarning, match=r"made these modules leaves.*; 1.inner \(passes self.training"):
        nested = trace(nn.Sequential(nn.Linear(6, 6), _Wrapper()), torch.randn(4, 6))
    assert sorted(nested.auto_leaves) == ["1.inner", "1.inner.child"]


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _PassesTraining()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.inner(x)] * 2, dim=1)[:, :6]


class _SharesFirstLayer(nn.Module):
    def __init__(self, shared: nn.Module) -> None:
        super().__init__()
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.shared(x))


class _TiedThroughALeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)
        self.mid = _SharesFirstLayer(self.a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.mid(self.a(x)))


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
def test_a_parameter_a_leaf_shares_with_another_stage_is_one_parameter(method: str) -> None:
    """The leaf ``mid`` reads ``a``'s weights as ``mid.shared.weight``: two get_attr nodes of one
    parameter, which on two stages trained as two parameters (weights 1e-2 off plain training).
    Every use now reads one node, so the stages hold copies whose gradients are summed."""
    torch.manual_seed(0)
    model, batches = _TiedThroughALeaf(), loader()[:3]
    expected = full_batch_training(model, batches, F.cross_entropy)
    got = pipelined(model, batches, F.cross_entropy, method, leaf_modules=["mid"], gpus=3)
    assert_equal_training(got, expected)


class _BodyWithFunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(6, 6) for _ in range(4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.layers(x), 0.0, self.training)


def test_too_many_stages_for_a_model_made_one_leaf_says_which_leaf() -> None:
    model = nn.Sequential(_BodyWithFunctionalDropout(), nn.Linear(6, 4))
    with (
        pytest.warns(UserWarning, match="made these modules leaves"),
        pytest.raises(
            PlanError,
            match=r"only \d units of nodes that do work that a stage boundary may separate; "
            r".*tracing made 0 a leaf, one node each",
        ),
    ):
        pipeoptim.compile(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            4,
            example_inputs=torch.randn(8, 6),
            loss_fn=F.cross_entropy,
            profile_dir=None,
        )


def test_a_stage_tracing_again_does_not_repeat_the_compile_warnings() -> None:
    """Each worker process traces the model again: every one printed the "made these modules
    leaves" warning that compile had given once."""
    model = _BinaryNet()
    with pytest.warns(UserWarning, match="made these modules leaves"):
        pipe = pipeoptim.compile(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            1,
            example_inputs=torch.randn(4, 6),
            loss_fn=F.cross_entropy,
            profile_dir=None,
        )
    with pipe, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "binarize" in pipe.spec.trace().auto_leaves
    assert not caught


def test_classes_of_the_main_script_reach_the_workers_and_come_back(tmp_path) -> None:
    """A model returning a dataclass, and an optimizer whose weight predictor is registered,
    both defined in the script run: the dataclass output could not be compiled (refused as a
    value crossing a stage boundary, even with 1 stage) nor pickled back from a worker
    ('not the same object as __main__.Out'), and the workers, which get the optimizer class
    by value, had no predictor for it ('no weight predictor for SignSGD ... supports ...
    SignSGD'). Local and processes executors on one plan give the same losses."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("main_classes_script.py")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok [" in done.stderr


class ScalarAux(nn.Module):
    """Logits, a 0-dim auxiliary value and a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        logits = self.b(torch.tanh(self.a(x)))
        return logits, logits.pow(2).mean(), 3


def first_of(out: tuple, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out[0], y)


def compile_gpipe_copy(model: nn.Module, x: torch.Tensor) -> pipeoptim.Pipeline:
    """A copy of ``model`` in 2 gpipe stages whose loss reads its first output."""
    copied = copy.deepcopy(model)
    return pipeoptim.compile(
        copied,
        torch.optim.SGD(copied.parameters(), lr=0.1),
        gpus=2,
        method="gpipe",
        example_inputs=x,
        loss_fn=first_of,
        executor="local",
        profile_dir=None,
    )


def test_predict_refuses_to_join_what_it_cannot_and_keeps_constants() -> None:
    """predict() runs its rows in pieces of a micro-batch: a 0-dim output (or a dataclass) of
    the first piece alone was returned as the whole batch's, silently (4 rows of 8 for a
    dataclass); now that is refused with the fix, and batch tensors and constants join."""
    torch.manual_seed(0)
    model, x = ScalarAux(), torch.randn(8, 8)
    with compile_gpipe_copy(model, x) as pipe:
        logits, aux, const = pipe.predict(x[:4])
        torch.testing.assert_close(aux, model(x[:4])[1], rtol=1e-6, atol=1e-7)
        assert const == 3 and logits.shape == (4, 4)
        with pytest.raises(
            PipelineError, match=r"pieces of 4 .* Tensor \(a 0-dim tensor\) .* at most 4 rows"
        ):
            pipe.predict(x)


class SideOutputs(nn.Module):
    """Logits, a batch-second copy of them, a tensor constant and, with ``statistic``, the
    batch's mean hidden state."""

    def __init__(self, statistic: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.statistic = statistic

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = torch.tanh(self.a(x))
        logits = self.b(h)
        out = (logits, logits.t(), self.b.bias * 2)
        return (*out, h.mean(0)) if self.statistic else out


@pytest.mark.parametrize("statistic", [False, True])
def test_predict_joins_each_output_along_its_batch_dimension(statistic: bool) -> None:
    """helper-123: every tensor of one or more dims was concatenated along dim 0, so a
    constant came back once per piece ((8,) for (4,)), a batch-second output was glued along
    its features, and a statistic of the batch became the pieces' statistics end to end."""
    torch.manual_seed(0)
    model, x = SideOutputs(statistic), torch.randn(8, 8)
    with compile_gpipe_copy(model, x) as pipe:
        for rows in (4, 8):  # one piece, two pieces of 4
            if statistic and rows == 8:
                with pytest.raises(
                    PipelineError, match=r"a tensor without a batch dimension, e\.g\. a statistic"
                ):
                    pipe.predict(x)
                continue
            got, expected = pipe.predict(x[:rows]), model(x[:rows])
            assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected]
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class FixedBatch(nn.Module):
    """Traced at a fixed batch of 4 rows (a hard-coded reshape): its profile has no batch
    dimension for any value."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).reshape(4, 2, 4).reshape(4, 8))


def test_predict_of_a_fixed_batch_model_given_its_plan_joins_its_pieces(tmp_path) -> None:
    """helper-125: given as plan=, a fixed-batch model's outputs read as having no batch
    dimension, and predict() of two pieces was refused as a statistic of the batch."""
    torch.manual_seed(0)
    model, x = FixedBatch(), torch.randn(8, 8)

    def compiled(**options):
        return pipeoptim.compile(
            model,
            torch.optim.SGD(model.parameters(), lr=0.0),
            2,
            example_inputs=x[:4],
            loss_fn=F.cross_entropy,
            executor="local",
            profile_dir=None,
            **options,
        )

    with compiled() as pipe:
        pipe.plan.save(tmp_path / "plan.json")
    expected = torch.cat([model.eval()(x[:4]), model(x[4:])])
    with compiled(plan=tmp_path / "plan.json") as pipe:
        torch.testing.assert_close(pipe.predict(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("executor", ["local", "processes"])
def test_a_graph_model_with_sparse_tensors_trains_as_the_plain_model(executor: str, tmp_path) -> None:
    """Profiling asked every tensor autograd saved for its storage, which a sparse adjacency
    matrix has not: compile failed with "Cannot access storage of SparseTensorImpl"
    (helper-89). The runtime's own storage lookups (saved-tensor hooks, activation bytes,
    outputs that are weights) had the same blind spot (``pipeoptim.storage``)."""
    torch.manual_seed(0)
    model = SparseGCN()
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 8, 6), torch.randint(0, 3, (8,))
    with pipeoptim.compile(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        2,
        example_inputs=x,
        loss_fn=F.cross_entropy,
        method="gpipe",
        executor=executor,
        profile_dir=tmp_path,
    ) as pipe:
        losses = [float(pipe.step(x, y)) for _ in range(3)]
        assert losses == pytest.approx(plain_training(reference, [(x, y)] * 3, micro=1), abs=1e-6)
        state = pipe.state_dict()
        torch.testing.assert_close(pipe.predict(x), reference(x), atol=1e-6, rtol=0)
    assert state["adj"].layout == torch.sparse_coo
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state[name].to_dense(), value.to_dense(), atol=1e-6, rtol=0)
    if executor == "local":  # PipeOptim's prediction redirects the saved tensors of the backward
        torch.manual_seed(0)
        model = SparseGCN()
        with pipeoptim.compile(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            2,
            example_inputs=x,
            loss_fn=F.cross_entropy,
            method="pipeoptim",
            executor="local",
            profile_dir=tmp_path,
        ) as pipe:
            losses = [float(pipe.step(x, y)) for _ in range(4)]
        assert losses[-1] < losses[0]


def test_sparse_tensors_compile_cannot_take_are_named_with_the_fix() -> None:
    """A sparse example input failed in slicing, and a CSR buffer in torch's deepcopy, each
    with torch's own error (helper-90)."""
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"loss_fn": F.cross_entropy, "executor": "local", "profile_dir": None}
    with pytest.raises(ValueError, match=r"example input 0 is a sparse tensor .*x\.to_dense\(\)"):
        pipeoptim.compile(model, opt, 2, example_inputs=torch.randn(8, 6).to_sparse(), **options)
    model.register_buffer("adjacency", torch.eye(6).to_sparse_csr())
    with pytest.raises(ValueError, match=r"cannot be copied with copy.deepcopy .*COO layout"):
        pipeoptim.compile(model, opt, 2, example_inputs=torch.randn(8, 6), **options)


class _SparseActivation(nn.Module):
    """An activation turned sparse while it needs a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)).to_sparse()
        return self.b(torch.sparse.mm(h, torch.eye(6)))


def test_a_sparse_activation_that_needs_a_gradient_is_named_with_the_fix() -> None:
    """Profiling failed with torch's ``fill_`` error for the sparse layout (helper-90)."""
    from pipeoptim.errors import ProfileError

    model = _SparseActivation()
    with pytest.raises(
        ProfileError, match=r"makes a sparse tensor \(torch.sparse_coo\) that needs a gradient.*to_dense"
    ):
        pipeoptim.compile(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            2,
            example_inputs=torch.randn(8, 6),
            loss_fn=F.cross_entropy,
            executor="local",
            profile_dir=None,
        )
