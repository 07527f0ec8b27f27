"""Weight policies: what the forward and the backward see, how many copies live."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.plan import Plan
from pipeoptim.compiler.trace import trace
from pipeoptim.methods import get_method
from pipeoptim.runtime import prediction
from pipeoptim.runtime.build import stage_params
from pipeoptim.runtime.policies import make_policy
from pipeoptim.runtime.predictors import get_predictor, predict
from tests.given_plans import Biases, biases_plan, plan_starting_at


def two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def expected_input_grad(x, w1, b1, w2, w1_bwd, w2_bwd):
    """dL/dx of sum(W2 relu(W1 x + b1)) with the ReLU mask of the forward and the given weights."""
    mask = (x @ w1.T + b1 > 0).float()
    return ((torch.ones(x.shape[0], 3) @ w2_bwd) * mask) @ w1_bwd


def run_policy(name: str, version_diff: int, **options):
    model = two_layer()
    gm = trace(model, torch.randn(4, 5)).gm
    policy = make_policy(name, **options)
    params = stage_params(gm)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(2):  # give the optimizer state to predict from
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    policy.attach(params, opt, stage=0, num_stages=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    predicted = {
        n: predict(p, opt.state[p], opt.param_groups[0], version_diff, get_predictor(opt))
        for n, p in model.named_parameters()
    }
    x = torch.randn(4, 5, requires_grad=True)
    policy.begin_forward(0, version_diff)
    with policy.saving(0):
        out = gm(x)[0]
    policy.end_forward(0)
    for p in model.parameters():  # version_diff steps happen before the backward
        p.grad = torch.randn_like(p)
    for _ in range(version_diff):
        policy.before_step()
        opt.step()
        policy.after_step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    policy.begin_backward(0)
    out.sum().backward()
    policy.end_backward(0)
    return gm, x, out, before, predicted, after


def test_stash_forward_and_backward_see_the_same_weights() -> None:
    _gm, x, out, before, _, after = run_policy("stash", 2)
    assert not torch.equal(before["0.weight"], after["0.weight"])
    torch.testing.assert_close(
        out,
        F.linear(
            F.relu(F.linear(x, before["0.weight"], before["0.bias"])), before["2.weight"], before["2.bias"]
        ),
    )
    expected = expected_input_grad(
        x.detach(),
        before["0.weight"],
        before["0.bias"],
        before["2.weight"],
        before["0.weight"],
        before["2.weight"],
    )
    torch.testing.assert_close(x.grad, expected)


def test_stash_reuses_the_copies_no_micro_batch_needs() -> None:
    """Stage 0 of 3 in the steady state of asynchronous 1F1B (forward t + 2, backward t, step):
    every backward sees the weights its forward saw, at most N - k - 1 = 2 copies exist and,
    once they do, a step copies into one of them instead of allocating."""
    model = two_layer()
    params = stage_params(trace(model, torch.randn(4, 5)).gm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = make_policy("stash")
    policy.attach(params, opt, stage=0, num_stages=3)
    seen, storages = {}, set()
    for mb in range(2):  # warm-up
        policy.begin_forward(mb, 2)
        seen[mb] = params["0.weight"].detach().clone()
    for t in range(12):
        policy.begin_forward(t + 2, 2)
        seen[t + 2] = params["0.weight"].detach().clone()
        policy.begin_backward(t)
        used = policy.backward_weight("0.weight", t)
        assert torch.equal(used, seen.pop(t)), t
        policy.end_backward(t)
        for p in model.parameters():
            p.grad = torch.full_like(p, float(t + 1))
        policy.before_step()
        opt.step()
        policy.after_step()
        storages |= {c["0.weight"].data_ptr() for c in policy._stashed.values()}
    assert len(storages) == 2 and policy.peak_versions == 3


@pytest.mark.parametrize("backward", ["current", "predicted"])
def test_pipeoptim_forward_uses_prediction_backward_as_asked(backward: str) -> None:
    """Ŵ in the forward; in the backward the current W (PipeOptim) or, with
    ``backward="predicted"``, the forward's Ŵ again."""
    gm, x, out, _before, predicted, after = run_policy("pipeoptim", 2, backward=backward)
    assert "predict" not in gm.code  # the graph is the model's: the policy swaps the data in
    assert all(torch.equal(p, after[n]) for n, p in gm.named_parameters())  # and W is back
    assert not torch.equal(predicted["0.weight"], after["0.weight"])
    torch.testing.assert_close(
        out,
        F.linear(
            F.relu(F.linear(x, predicted["0.weight"], predicted["0.bias"])),
            predicted["2.weight"],
            predicted["2.bias"],
        ),
    )
    in_backward = after if backward == "current" else predicted
    expected = expected_input_grad(
        x.detach(),
        predicted["0.weight"],
        predicted["0.bias"],
        predicted["2.weight"],
        in_backward["0.weight"],
        in_backward["2.weight"],
    )
    torch.testing.assert_close(x.grad, expected)


def test_a_parameter_returned_by_the_forward_keeps_the_weights_it_used() -> None:
    """The policy swaps a parameter's data for the forward only; a stage that returns the
    parameter itself sends (and differentiates) what the forward used, not W."""
    w = nn.Parameter(torch.ones(3))
    policy = make_policy("pipeoptim")
    policy.params = {"w": w}
    policy._values = {"w": torch.full((3,), 2.0)}
    with policy.saving(0):
        product, returned = policy.pin_parameters((w * 3.0, w))
    assert torch.equal(w.detach(), torch.ones(3))  # W is back
    assert torch.equal(product.detach(), torch.full((3,), 6.0))
    assert torch.equal(returned.detach(), torch.full((3,), 2.0))
    (product.sum() + returned.sum()).backward()
    assert torch.equal(w.grad, torch.full((3,), 4.0))  # the gradient reaches the parameter


def test_no_correction_backward_uses_weights_at_backward_time() -> None:
    _, x, out, before, _, after = run_policy("none", 2)
    torch.testing.assert_close(
        out,
        F.linear(
            F.relu(F.linear(x, before["0.weight"], before["0.bias"])), before["2.weight"], before["2.bias"]
        ),
    )
    expected = expected_input_grad(
        x.detach(),
        before["0.weight"],
        before["0.bias"],
        before["2.weight"],
        after["0.weight"],
        after["2.weight"],
    )
    torch.testing.assert_close(x.grad, expected)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c2(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def conv_plan(method: str) -> Plan:
    """:class:`ConvNet` in 4 stages that all hold layers (the planner's split follows the
    profile's timings and under load can leave a stage without weights)."""
    m = 4 if get_method(method).micro_batched else 1
    config = CostConfig(4, method=method, micro_batches=m)
    starts = ["c2_weight", "fc1_weight", "fc3_weight"]
    return plan_starting_at(ConvNet(), (torch.randn(8 // m, 1, 8, 8),), config, starts)


def conv_pipeline(
    method: str, model: ConvNet | None = None, opt: torch.optim.Optimizer | None = None, **options
) -> pipeoptim.Pipeline:
    """:class:`ConvNet` (``model``, or a new one) with ``opt`` (default: SGD with momentum) in
    the 4 stages of :func:`conv_plan`, local executor."""
    model = model or ConvNet()
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return pipeoptim.compile(
        model,
        opt,
        4,
        example_inputs=torch.randn(8, 1, 8, 8),
        loss_fn=F.cross_entropy,
        method=method,
        executor="local",
        plan=conv_plan(method),
        **options,
    )


@pytest.mark.parametrize("method", ["pipeoptim", "pipedream", "2bw", "spectrain", "none"])
def test_sixty_async_steps_on_conv_and_linear(method: str) -> None:
    with conv_pipeline(method) as pipe:
        losses = list(pipe.train(batches(60)))
        versions = pipe.peak_weight_versions
        with_weights = [s.policy is not None for s in pipe._executor.stages]
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    if method in ("pipeoptim", "spectrain"):
        assert max(versions) <= 2, versions
    if method == "2bw":  # the double buffer, at every stage with weights (the last one included)
        assert with_weights[-1] and sum(with_weights) >= 3, with_weights
        assert all(v == 2 for v, w in zip(versions, with_weights) if w), versions
    if method == "pipedream":
        assert all(v <= 4 - k for k, v in enumerate(versions))
        assert max(versions) >= 3  # stashing really keeps N - k versions where backward needs them


@pytest.mark.parametrize("in_step", [False, True], ids=["after-step", "in-step"])
def test_spectrain_predicts_into_one_reused_buffer_and_once_at_the_last_stage(
    monkeypatch, in_step: bool
) -> None:
    """SpecTrain's forward and backward share one Ŵ buffer per parameter (W and one Ŵ), and the
    last stage's backward, which aims at the same version from the same W as its forward,
    reuses the forward's Ŵ instead of predicting it again; so with the forward's Ŵ predicted
    inside torch's SGD step (:mod:`pipeoptim.runtime.fused_step`: one more, the last step's,
    for a forward that never comes)."""
    if in_step:
        in_step_calls: list[tuple] = []
        original = prediction.step_predicting

        def step_counted(optimizer, extrapolator, *args):
            out = original(optimizer, extrapolator, *args)
            in_step_calls.append((extrapolator, out))
            return out

        monkeypatch.setattr(prediction, "step_predicting", step_counted)
    else:
        monkeypatch.setattr(prediction, "steps_each", lambda optimizer: False)
    with conv_pipeline("spectrain") as pipe:
        stages = [s for s in pipe._executor.stages if s.policy is not None]
        assert [s.index for s in stages] == [0, 1, 2, 3]
        calls = {s.index: 0 for s in stages}
        pointers: dict[int, set[int]] = {s.index: set() for s in stages}
        for stage in stages:
            policy, predicted = stage.policy, stage.policy.predicted

            def counted(*args, k=stage.index, predicted=predicted, **kw):
                calls[k] += 1
                out = predicted(*args, **kw)
                pointers[k] |= {t.data_ptr() for t in out.values()}
                return out

            policy.predicted = counted
        list(pipe.train(batches(12)))
        versions = pipe.peak_weight_versions
    last = stages[-1]
    if in_step:  # the first forward (no state yet) predicts afresh, the others in the steps
        assert calls[3] == 1 and len(in_step_calls) == 4 * 12, (calls, len(in_step_calls))
        for extrapolator, hats in in_step_calls:
            k = next(s.index for s in stages if s.policy._extrapolator is extrapolator)
            pointers[k] |= {t.data_ptr() for t in hats.values()}
    else:
        assert calls[3] == 12, calls  # forward only: s_b = s_f there and no step comes between
    assert calls[2] > 12, calls  # stage 2 of 4: s_b = 1 after a step, predicted again
    params = {k: len(s.policy.params) for k, s in ((s.index, s) for s in stages)}
    assert all(len(pointers[k]) == params[k] for k in pointers), (pointers, params)  # no new Ŵ
    assert last.policy.peak_versions == 2 and max(versions) == 2, versions


def test_version_difference_equals_steps_taken_between_forward_and_backward() -> None:
    model = ConvNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pipe = pipeoptim.compile(
        model,
        opt,
        4,
        example_inputs=torch.randn(8, 1, 8, 8),
        loss_fn=F.cross_entropy,
        executor="local",
        plan=conv_plan("pipeoptim"),
    )
    seen: dict[tuple[int, int], list[int]] = {}
    stages = pipe._executor.stages
    assert all(s.policy is not None for s in stages)
    for stage in stages:
        policy = stage.policy
        forward, backward = policy.begin_forward, policy.begin_backward

        def on_forward(mb, s, *rates, stage=stage, forward=forward):
            seen[(stage.index, mb)] = [s, stage.steps]
            forward(mb, s, *rates)

        def on_backward(mb, stage=stage, backward=backward):
            seen[(stage.index, mb)].append(stage.steps)
            backward(mb)

        policy.begin_forward, policy.begin_backward = on_forward, on_backward
    list(pipe.train(batches(12)))
    assert len(seen) == len(stages) * 12
    for (k, mb), (s, at_forward, at_backward) in seen.items():
        assert s == at_backward - at_forward
        if 3 <= mb < 9:
            assert s == 4 - k - 1


def test_backward_predicted_option_keeps_one_copy_per_micro_batch_in_flight() -> None:
    pipe = conv_pipeline("pipeoptim", backward="predicted")
    list(pipe.train(batches(20)))
    versions = pipe.peak_weight_versions
    assert max(versions) > 2  # like weight stashing


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize(
    "schedule",
    [
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 + t),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12),
    ],
    ids=["lambda", "cosine"],
)
def test_prediction_hits_the_backward_weights_under_a_schedule(stages: int, schedule) -> None:
    """Constant gradients, plain SGD: Ŵ = W − (Σ lr_i)·ΔW over the rates of the s steps in
    between is exactly the weights the backward meets (s × the current rate misses them)."""
    model = Biases()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = schedule(opt)
    pipe = pipeoptim.compile(
        model,
        opt,
        stages,
        example_inputs=torch.randn(2, 4),
        loss_fn=lambda out, _y: out.sum(),
        executor="local",
        plan=biases_plan("pipeoptim", stages, rows=2),  # every stage holds biases
    )
    predicted: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    met: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for stage in pipe._executor.stages:
        policy = stage.policy
        forward, backward = policy.begin_forward, policy.begin_backward

        def on_forward(mb, s, *rates, k=stage.index, policy=policy, forward=forward):
            forward(mb, s, *rates)
            values = {n: policy._values.get(n, p) for n, p in policy.params.items()}
            predicted[(k, mb)] = {n: v.detach().clone() for n, v in values.items()}

        def on_backward(mb, k=stage.index, policy=policy, backward=backward):
            met[(k, mb)] = {n: p.detach().clone() for n, p in policy.params.items()}
            backward(mb)

        policy.begin_forward, policy.begin_backward = on_forward, on_backward
    for _ in range(10):
        pipe.step(torch.randn(2, 4), None)
        sched.step()
    pipe.flush()
    checked = 0
    for (k, mb), values in predicted.items():
        if mb >= stages:  # the first step has given SGD a gradient to predict from
            for name, value in values.items():
                torch.testing.assert_close(value, met[(k, mb)][name], rtol=0, atol=1e-6)
                checked += 1
    assert checked >= 6


def test_predictor_and_backward_options_are_checked() -> None:
    """``backward=`` was dropped unread for every method but pipeoptim, an unknown value
    included, where ``predictor=`` was refused."""
    model = two_layer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    common = {"example_inputs": torch.randn(4, 5), "loss_fn": F.mse_loss, "executor": "local"}
    for option in ({"predictor": "next-step"}, {"backward": "predicted"}):
        ((name, value),) = option.items()
        for method in ("pipedream", "gpipe"):
            with pytest.raises(
                ValueError, match=f"{name}='{value}' applies to method 'pipeoptim' only, not '{method}'"
            ):
                pipeoptim.compile(model, opt, 2, method=method, **option, **common)
    for method in ("pipeoptim", "gpipe"):
        with pytest.raises(ValueError, match="predictor must be one of paper, next-step, not 'newest'"):
            pipeoptim.compile(model, opt, 2, method=method, predictor="newest", **common)
        with pytest.raises(ValueError, match="backward must be one of current, predicted, not 'bogus'"):
            pipeoptim.compile(model, opt, 2, method=method, backward="bogus", **common)


@pytest.mark.parametrize("name", ["pipeoptim", "stash", "none", "spectrain", "2bw"])
def test_saved_tensor_hooks_only_where_the_backward_may_meet_other_weights(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No optimizer step between a forward and its backward (version difference 0, the last
    stage) and nothing swapped in: autograd keeps the weights themselves, the very ones the
    backward then meets, and no hook runs per saved tensor; otherwise the hooks redirect."""
    model = two_layer()
    gm = trace(model, torch.randn(4, 5)).gm
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    policy = make_policy(name)
    policy.attach(stage_params(gm), opt, stage=1, num_stages=2)
    installed: list[int] = []
    hooks = torch.autograd.graph.saved_tensors_hooks

    def counting(pack, unpack):
        installed.append(1)
        return hooks(pack, unpack)

    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", counting)
    x = torch.randn(4, 5)
    for version_diff, expected in ((0, 0), (1, 1), (None, 1)):
        installed.clear()
        policy.begin_forward(0, version_diff or 0)
        with policy.saving(0, version_diff):
            out = gm(x)[0]
        policy.end_forward(0)
        policy.begin_backward(0)
        out.sum().backward()
        policy.end_backward(0)
        assert len(installed) == expected, (version_diff, installed)
    if name != "2bw":
        return
    policy.before_step()  # the update takes 2BW's shadow copy, which the next forward uses:
    opt.step()  # swapped in, so redirected even with no step before its backward
    policy.after_step()
    installed.clear()
    policy.begin_forward(1, 0)
    assert policy._values
    with policy.saving(1, 0):
        gm(x)
    policy.end_forward(1)
    assert len(installed) == 1
