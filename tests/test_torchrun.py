"""Under torchrun every rank runs its stage; the numbers equal the local executor's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pipeoptim
from pipeoptim.runtime.affinity import binding_wanted, cores_to_spare, rank_cores
from pipeoptim.runtime.spawning import free_port

from .sparse_models import SparseGCN
from .test_in_place import plain_training
from .test_training import SmallCNN, data, no_dropout_cnn

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(script: str, stages: int, *args: str) -> subprocess.CompletedProcess:
    """``script`` (in tests/) under torchrun with ``stages`` ranks on this host."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(stages),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        str(ROOT / "tests" / script),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, only_needed", [("pipeoptim", False), ("1f1b", False), ("1f1b", True), ("pipeoptim", True)]
)
def test_torchrun_ranks_equal_local_executor(tmp_path: Path, method: str, only_needed: bool) -> None:
    """With ``only_needed`` the other ranks pass None for inputs and targets, and the last
    mini-batch (1 row) is smaller than M (2 for 1f1b)."""
    stages = 2
    args = [str(tmp_path / "out"), str(stages), method, str(tmp_path / "profiles")]
    done = _torchrun("torchrun_script.py", stages, *args, *(["only-needed"] if only_needed else []))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(stages)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every rank sees every loss
    # rank 0 holds the loss receives of the last N mini-batches at most; the last rank none
    assert ranks[0]["receives"] <= stages and ranks[0]["unresolved"] <= stages
    assert ranks[1]["receives"] == 0
    assert ranks[0]["state"] == ranks[1]["state"] and ranks[0]["state after"] == ranks[1]["state after"]
    # stage 0 left its last backward and step of each mini-batch to the next call (a core each;
    # an asynchronous method's warm-up after a flush has no backward to leave)
    if cores_to_spare(stages):
        kinds = [[a[0] for a in left] for left in ranks[0]["left"]]
        assert ["B", "S"] in kinds
        assert all(k == ["B", "S"] or (k == [] and method == "pipeoptim") for k in kinds)
    assert all(left == [] for left in ranks[1]["left"])
    if binding_wanted():
        mine = os.sched_getaffinity(0)
        assert [r["cores"] for r in ranks] == [rank_cores(r, stages, mine) for r in range(stages)]
        assert [r["cores after close"] for r in ranks] == [sorted(mine)] * stages

    torch.manual_seed(0)  # rank 0's initial weights, which it broadcast to the others
    model = SmallCNN()
    batches = data(10)
    if only_needed:
        batches += data(1, batch=1, seed=9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pipeoptim.compile(
        model,
        opt,
        stages,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        executor="local",
        profile_dir=tmp_path / "profiles",
        plan=tmp_path / "out.plan.json",  # the job's: planned again, timings could move a layer
    ) as pipe:
        losses = list(pipe.train(batches))
        assert pipe.plan.stage_of == ranks[0]["plan"]
        predicted = pipe.predict(batches[0][0])
        for i in range(3 * stages):  # as the job: predicting after the second and fourth
            pipe.step(*batches[0])
            if i in (1, 3):
                pipe.predict(batches[0][0])
        state_after = pipe.state_dict()
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(torch.tensor(ranks[1]["predict"]), predicted, rtol=1e-5, atol=1e-5)
    for name, value in state_after.items():
        torch.testing.assert_close(torch.tensor(ranks[0]["state after"][name]), value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_pipelines_in_one_job_keep_their_messages_and_groups_apart(tmp_path: Path) -> None:
    """Three pipelines in one torchrun job at 3 ranks (tests/torchrun_two_pipelines_script.py):
    A and B asynchronous, their mini-batches interleaved without a flush, only the first and
    last rank given data (the batch sizes and losses travel as messages), the user's own send
    between their steps; A, which created the process group, closed while B has mini-batches
    in flight; C (1 stage x 3 replicas) compiled after that. Each trains as it does alone (the
    local executor), the user's message arrives untouched, and once all are closed only the
    default group is left (their own, replica and shared-weight groups destroyed), C's gloo
    threads ended with it.

    Before each pipeline had a group of its own, rank 0's flush of A posted the receives of
    its last two micro-batches' gradients while rank 1 had sent B's in between: A trained on
    B's gradients, then hung. Before the default group outlived its creator, closing A
    destroyed B's groups, and compiling C re-created the default group, which failed or hung
    in torchrun's store; replica groups were never destroyed, and once they were, the
    gradient hooks on the parameters still held them (3 threads and 5 files more per
    pipeline, helper-78)."""
    from .torchrun_two_pipelines_script import PIPELINES, batches

    gpus = 3
    done = _torchrun(
        "torchrun_two_pipelines_script.py", gpus, str(tmp_path / "out"), str(gpus), str(tmp_path / "p")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(gpus)]
    assert [r["groups left"] for r in ranks] == [1] * gpus
    if sys.platform == "linux":
        assert [r["threads after C"] for r in ranks] == [0] * gpus
    for name, (method, seed, _, replicas, _) in PIPELINES.items():
        torch.manual_seed(seed)  # rank 0's initial weights
        model = SmallCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        given = batches(name)
        with pipeoptim.compile(
            model,
            opt,
            gpus,
            example_inputs=given[0][0],
            loss_fn=F.cross_entropy,
            method=method,
            data_parallel=replicas,
            executor="local",
            profile_dir=tmp_path / "p",
            plan=tmp_path / f"out.plan.{name}.json",  # the job's cut
        ) as pipe:
            losses = [float(loss) for loss in [pipe.step(*b) for b in given]]
            pipe.flush()
            state = pipe.state_dict()
        for r in range(gpus):
            assert ranks[r][name]["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6), (name, r)
        for key, value in state.items():
            torch.testing.assert_close(
                torch.tensor(ranks[0][name]["state"][key]), value, rtol=1e-5, atol=1e-6
            )


@pytest.mark.slow
def test_a_compile_rank_0_cannot_plan_fails_on_every_rank(tmp_path: Path) -> None:
    """Rank 0 plans for every rank: where it fails (a model that cannot take the example
    inputs), every rank raises, naming rank 0's error, and a compile after it works in the
    same job. Before, the other ranks went on waiting for a plan and took the next compile's
    as this one's: the job fell out of step (a peer lost at the first step)."""
    gpus = 2
    done = _torchrun(
        "torchrun_failed_compile_script.py", gpus, str(tmp_path / "out"), str(gpus), str(tmp_path / "p")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(gpus)]
    assert ranks[0]["error"].startswith("ProfileError: "), ranks[0]["error"]
    assert ranks[1]["error"].startswith(
        "PipelineError: rank 0 could not plan the model, so no rank compiles it: "
    )
    assert ranks[0]["error"].removeprefix("ProfileError: ") in ranks[1]["error"]
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 3


@pytest.mark.slow
def test_compile_arguments_that_differ_between_ranks_stop_every_rank_naming_them(tmp_path: Path) -> None:
    """Each rank builds its stage from its own compile call, so the ranks compare the calls
    first: another method on rank 1 and another learning rate on rank 2, another example
    input shape or an unknown method on rank 1 are refused on every rank at once, with each
    rank's value; rank 1's model computing another forward is refused on every rank after
    tracing; executor="processes" is refused under torchrun. A compile after them works in
    the same job. Before, another lr trained silently mixed, another method aborted in gloo
    mid-run, and an error on one rank alone left the others waiting for it, their next
    collective paired with its next compile's (helper-102)."""
    gpus = 3
    done = _torchrun(
        "torchrun_mixed_compile_script.py", gpus, str(tmp_path / "out"), str(gpus), str(tmp_path / "p")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(gpus)]
    differ = "PipelineError: compile was called with other arguments on different ranks: "
    for rank, result in enumerate(ranks):
        first = result["method and lr"]
        assert first.startswith(differ), first
        assert "lr of param group 0: 0.05 on ranks 0, 1; 0.5 on rank 2" in first, first
        assert "method: 'pipeoptim' on ranks 0, 2; '1f1b' on rank 1" in first, first
        shapes = (
            "example inputs: [8, 1, 8, 8] torch.float32 on ranks 0, 2; [4, 1, 8, 8] torch.float32 on rank 1"
        )
        assert result["example rows"].startswith(differ + shapes), result["example rows"]
        bogus = "method: 'pipeoptim' on ranks 0, 2; 'bogus' on rank 1"
        assert result["bad method on one rank"].startswith(differ + bogus), result["bad method on one rank"]
        forward = result["another forward"]
        if rank == 1:
            assert forward.startswith(
                "PipelineError: this rank's OwnForward traces to another graph than rank 0's"
            )
        else:
            assert forward.startswith(
                "PipelineError: rank 1 could not trace its model into rank 0's graph ("
            ), forward
        assert result["processes executor"].startswith(
            "ValueError: executor='processes' in a process torchrun started"
        )
        copied = result["uncopyable model on one rank"]
        if rank == 1:
            assert copied.startswith("ValueError: the model cannot be copied with copy.deepcopy"), copied
        else:
            assert copied.startswith(
                "PipelineError: rank 1 could not check its compile arguments (ValueError: "
            ), copied
        assert result["losses"] == ranks[0]["losses"] and len(result["losses"]) == 3


@pytest.mark.slow
def test_calls_that_gather_from_every_rank_made_in_another_order_are_refused(tmp_path: Path) -> None:
    """state_dict, to_module, save_checkpoint, predict, load_checkpoint ... gather from (or
    load on) every rank: rank 0 asking for the optimizer state while rank 1 asks for the model,
    rank 0 predicting while rank 1 asks for the weights are refused on one rank (of two ranks
    in two calls, the call more often made alone gives way: saving before predicting; of one
    kind rank 0's), naming each rank's call, and the other's call is made once that rank makes
    it; each rank loading another checkpoint is refused on both; the next call every
    rank makes works (the weights are the plain model's; a checkpoint loads back). Before, one rank's
    gather paired with another's of something else (helper-100: a to_module() returned wrong
    weights), a predict() mismatch waited out the timeout, and ranks loading other files
    trained on a mix of both (helper-102)."""
    gpus = 2
    done = _torchrun(
        "torchrun_gather_mismatch_script.py", gpus, str(tmp_path / "out"), str(gpus), str(tmp_path / "p")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(gpus)]
    said = {
        "optimizer state / model": "RanksInOtherCallsError: the ranks are in different calls (rank 0: the "
        "start of optimizer_state_dict(); rank 1: the start of to_module())",
        "predict / weights": "RanksInOtherCallsError: the ranks are in different calls (rank 0: the start "
        "of predict(); rank 1: the start of state_dict())",
        "checkpoint / weights": "RanksInOtherCallsError: the ranks are in different calls (rank 0: the "
        "start of save_checkpoint(); rank 1: the start of state_dict())",
    }
    # refused where the call is more often made alone (saving before predicting), else on rank 0
    waits = ["the start of to_module()", "the start of predict()", "the start of state_dict()"]
    for (case, start), refused, waiting in zip(said.items(), (0, 1, 0), waits):
        assert ranks[refused][case].startswith(start), (case, ranks[refused][case])
        assert ranks[refused][case].endswith(f"this rank's call is refused, the others wait in {waiting}")
        assert case not in ranks[1 - refused]
        assert ranks[0][f"{case}, then"] == ranks[1][f"{case}, then"] == "done"
    for result in ranks:
        assert result["other checkpoints"].startswith(
            "PipelineError: the ranks load different weights (rank 0: "
        )
        assert result["predict after"] == 8  # rank 0 without inputs refused that predict only
    # rank 1's file missing: rank 0 waited out the timeout in the weights' gather (helper-130)
    assert ranks[1]["one missing"].startswith("CheckpointError: "), ranks[1]["one missing"]
    assert ranks[0]["one missing"].startswith("PipelineError: rank 1 refused load_checkpoint() (Checkpoint")
    assert ranks[0]["predict without inputs"].startswith(
        "BatchRefusedError: rank 0 runs the first stage and needs"
    )
    assert ranks[1]["predict without inputs"].startswith("BatchRefusedError: rank 0 refused the inputs")
    plain = no_dropout_cnn()
    plain_training(plain, data(3), 2, lr=0.05)  # trains plain in place
    for key, values in ranks[0]["weights"].items():
        assert values == pytest.approx(plain.state_dict()[key].flatten()[:4].tolist(), abs=1e-6), key
        assert ranks[1]["weights"][key] == values
    assert all(result["reloaded equal"] for result in ranks)
    # a float64 model's losses alike on every rank (the last rank's were rounded to float32, helper-103)
    assert ranks[0]["float64 losses"] == ranks[1]["float64 losses"]
    # an optimizer stepped differently on each rank before compile: rank 0's state, as its weights
    assert all(result["rank 0's momentum"] for result in ranks)


@pytest.mark.slow
def test_a_batch_one_rank_refuses_is_refused_everywhere_or_stops_every_rank_at_once(tmp_path: Path) -> None:
    """Inputs rank 0 refuses are refused on every rank and the run goes on in step (its losses
    equal the local executor's without that batch); before, the other ranks waited for rank
    0's batch size until the timeout. Targets the last rank refuses (it alone holds them,
    after rank 0 has started the batch) stop the pipeline on every rank within seconds
    (timeout 60 s), the refusing rank alive: before, the ranks fell out of step and each
    waited out the timeout, blaming a live peer, and the next pipeline of the job failed. So do
    inputs of other rows than rank 0's on another rank."""
    done = _torchrun("torchrun_refusals_script.py", 2, str(tmp_path / "out"), str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    assert ranks[0]["errors"][0].startswith("input 0 has shape (8, 1, 7, 7) torch.float32; the plan expects")
    assert ranks[0]["errors"][0].endswith("(every rank skips this batch; the pipeline goes on)")
    assert ranks[1]["errors"] == [
        "rank 0 refused the inputs of this batch (its error says why), so every rank "
        "skips it; the pipeline goes on with the next"
    ]
    torch.manual_seed(0)
    model = SmallCNN()
    with pipeoptim.compile(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        2,
        method="1f1b",
        example_inputs=data(1)[0][0],
        loss_fn=F.cross_entropy,
        executor="local",
        profile_dir=tmp_path / "p",
        plan=tmp_path / "out.plan.json",  # the job's cut
    ) as pipe:
        expected = [float(pipe.step(x, y)) for x, y in data(5)]
    assert ranks[0]["losses"] == ranks[1]["losses"] == pytest.approx(expected, rel=1e-5)
    assert ranks[1]["stop"].startswith("PipelineError: targets"), ranks[1]["stop"]
    assert ranks[0]["stop"].startswith("PeerLostError: "), ranks[0]["stop"]
    assert max(r["stop_s"] for r in ranks) < 2.5  # the last rank stays alive 3 s after its refusal
    assert ranks[0]["after"] == ranks[1]["after"]
    assert ranks[1]["disagree"].startswith("PipelineError: rank 1 got a batch of Rows(6"), ranks[1][
        "disagree"
    ]
    assert ranks[0]["disagree"].startswith("PeerLostError: ") and ranks[0]["disagree_s"] < 2.5
    # rank 0's scheduler alone: the stages trained with two rates, every rank exiting 0 (helper-130)
    assert ranks[1]["lr"].startswith("PipelineError: rank 1's optimizer steps this step's batch with other")
    assert ranks[0]["lr"].startswith("PeerLostError: ") and max(r["lr_s"] for r in ranks) < 2.5
    # caught where it was raised, a failure stops the other rank within seconds too (it had
    # waited out the 60 s timeout, blaming a live peer)
    assert "out of bounds" in ranks[1]["loss"], ranks[1]["loss"]
    assert ranks[0]["loss"].startswith("PeerLostError: ") and ranks[0]["loss_s"] < 2.5, ranks[0]
    assert "NaN" in ranks[0]["nan"] and "hold NaN" in ranks[0]["nan"], ranks[0]["nan"]
    assert ranks[1]["nan"].startswith("PeerLostError: ") and ranks[1]["nan_s"] < 2.5, ranks[1]


def test_a_failure_a_rank_catches_stops_the_far_ranks_too(tmp_path: Path) -> None:
    """3 ranks, PipeOptim: the last rank's loss_fn raising, then a NaN in rank 0's inputs, then
    the last rank's targets missing, each caught by the script that lives on 3 s. Every other
    rank stops with PeerLostError within seconds: before, the ranks that got PeerLostError
    while waiting for a loss kept their connections open, so the far rank waited until the
    script closed the pipeline or for the timeout, and a loss receive gave gloo's raw
    RuntimeError (helper-85); and the stored error's frames held the group, so the middle
    rank's abort left it open (helper-87: the far rank waited the whole timeout in 22 of 24
    cases)."""
    done = _torchrun("torchrun_caught_failure_script.py", 3, str(tmp_path / "out"), str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(3)]
    cases = [(f"{kind}{at}", failing) for kind, failing in (("loss", 2), ("nan", 0)) for at in (1, 6)]
    said = {"loss": "out of bounds", "nan": "hold NaN"}
    # missing targets named as such, not as the loss function's TypeError alone (helper-100)
    said["targets"] = (
        "PipelineError: rank 2 runs the last stage of replica 0, whose loss function failed on targets None"
    )
    for case, failing in [*cases, ("targets6", 2)]:
        assert said[case[:-1]] in ranks[failing][case], ranks[failing]
        for rank in {0, 1, 2} - {failing}:
            assert ranks[rank][case].startswith("PeerLostError: "), (case, rank, ranks[rank])
            assert ranks[rank][f"{case}_at"] - ranks[failing][f"{case}_at"] < 2.5, (case, rank, ranks)


@pytest.mark.slow
def test_a_rank_leaving_its_with_block_by_an_exception_waits_for_none_of_its_sends(tmp_path: Path) -> None:
    """Rank 1 raises inside ``with pipe:`` while rank 0 is in the script's own barrier, which
    never receives rank 1's last gradients: rank 1 leaves at once with its own error (before,
    close() waited for that send until the pipeline's 30 s timeout, helper-148)."""
    done = _torchrun("torchrun_close_script.py", 2, str(tmp_path / "out"), str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    assert ranks[1]["error"] == "RuntimeError: the script's own bug on rank 1"
    assert ranks[1]["done_at"] - ranks[1]["raised_at"] < 5, ranks
    assert "error" in ranks[0]  # its barrier gave up (rank 1 never came)


@pytest.mark.slow
def test_a_rank_raising_through_try_finally_close_stops_every_rank_at_once(tmp_path: Path) -> None:
    """4 ranks: rank 1's own code raises mid-run inside ``try: ... finally: pipe.close()``.
    close() then closes without finishing (an exception is propagating): rank 1 keeps its own
    error, the others get PeerLostError within seconds, without gloo's source path. Before,
    close() flushed, waited for gradients the other ranks (stepping on) never sent, and every
    rank waited out the whole timeout, rank 1's error replaced by a PeerLostError (helper-100)."""
    timeout = 30
    done = _torchrun(
        "torchrun_finally_close_script.py", 4, str(tmp_path / "out"), str(tmp_path / "p"), str(timeout)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(4)]
    assert ranks[1]["error"] == "RuntimeError: the script's own bug on rank 1"
    assert ranks[1]["warnings"] == [  # said, as a close() in an unrelated except block loses them too
        "close() did not finish the mini-batches in flight: RuntimeError (the script's own bug on rank 1) "
        "is being raised or handled on this rank, whose stage cannot finish without the other ranks (as "
        "leaving a with block by an exception)"
    ]
    for rank in (0, 2, 3):
        assert ranks[rank]["error"].startswith("PeerLostError: "), ranks[rank]
        assert "third_party/gloo" not in ranks[rank]["error"] and "GLHF" not in ranks[rank]["error"], ranks[
            rank
        ]
        assert ranks[rank]["done_at"] - ranks[1]["raised_at"] < timeout / 3, ranks


def test_wrong_world_size_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(pipeoptim.PipelineError, match="nproc-per-node 2"):
        pipeoptim.compile(
            model, opt, 2, example_inputs=torch.randn(8, 1, 8, 8), loss_fn=F.cross_entropy, profile_dir=None
        )


@pytest.mark.slow
def test_rank_0s_constants_and_sparse_buffers_reach_every_rank(tmp_path: Path) -> None:
    """A plain tensor attribute (a constant to the graph) failed under torchrun with
    ``KeyError`` as rank 0 looked for it among the model's state, and a sparse buffer with
    ``NotImplementedError`` from ``recv`` (helper-89's sparse model). Now rank 0 sends both,
    so ranks whose models drew other constants train as rank 0's model does alone; with them
    a constant fx took out of a list (``_tensor_constant0``, kept each rank's own: loss 0.08
    off) and what ``state_dict()`` and ``to_module()`` read from each rank's model copy (a
    buffer no stage reads, the plain attributes: rank 1's ``to_module()`` was 0.42 off)."""
    stages = 2
    done = _torchrun("torchrun_constants_script.py", stages, str(tmp_path / "out"), str(stages), "gpipe")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(stages)]
    torch.manual_seed(0)  # rank 0's model
    model = SparseGCN()
    torch.manual_seed(100)
    batches = [(torch.randn(8, 8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    plain = plain_training(model, batches, micro=1)
    outputs = model(batches[0][0])
    for rank in ranks:
        assert rank["losses"] == pytest.approx(plain, abs=1e-6)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(torch.tensor(rank["state"][name]), value.to_dense(), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(rank["to_module"]), outputs, atol=1e-5, rtol=0)


def test_a_rank_that_never_compiles_is_named_as_the_cause(tmp_path: Path) -> None:
    """torch's DistStoreError named a store key (``/default_pg/0//cpu//0/1``), not what was
    missing (helper-130)."""
    done = _torchrun("torchrun_missing_rank_script.py", 2, str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    said = (tmp_path / "out").read_text()
    assert said.startswith("PeerLostError: rank 0: the other ranks did not join the process group"), said
    assert "every rank calls pipeoptim.compile" in said


@pytest.mark.slow
def test_an_error_of_rank_0s_deferred_backward_stops_every_rank_whichever_call_raises_it(
    tmp_path: Path,
) -> None:
    """Stage 0's backward raises for the last micro-batch of a mini-batch, which rank 0 leaves
    to its next call: raised by a flush, predict or state_dict it stopped nothing before (the
    ranks trained on with stage 0 a step short, or waited out the timeout; helper-151). Every
    rank now stops within seconds, the error raised once, then "stopped at" it; so does the
    last rank's refusal of its targets (its next step blamed the good targets again); and
    ``loss.done()`` turns True on every rank once the loss has arrived (on rank 0 it never did),
    sees a stopped last rank within the timeout (it spun for ever) but not a pause between
    steps; losses that had arrived keep their values (helper-154)."""
    done = _torchrun("torchrun_tail_error_script.py", 2, str(tmp_path / "out"), str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    calls = [{case: [(what, said, at) for what, said, at in r[case]["calls"]] for case in r} for r in ranks]
    stopped = "PipelineError: the pipeline stopped at an earlier error"
    for case in ("flush", "predict", "state_dict"):
        outcomes = [
            [said for what, said, _ in calls[r][case] if not what.startswith("loss")] for r in range(2)
        ]
        raised = [i for i, said in enumerate(outcomes[0]) if said != "ok"]  # step 2 where not deferred
        assert raised and outcomes[0][raised[0]] == "ValueError: bad gradient in Guard", outcomes
        assert all(said.startswith(stopped) for said in outcomes[0][raised[0] + 1 :]), outcomes
        first = next(i for i, said in enumerate(outcomes[1]) if said != "ok")
        assert outcomes[1][first].startswith("PeerLostError: "), outcomes
        assert all(said.startswith(stopped) for said in outcomes[1][first + 1 :]), outcomes
        assert calls[1][case][first][2] - calls[0][case][raised[0]][2] < 5, calls  # not the 30 s timeout
        # the losses that had arrived keep their values on rank 0 (they failed with the error)
        losses = [[said for what, said, _ in calls[r][case] if what.startswith("loss")] for r in range(2)]
        assert losses[0][:2] == losses[1][:2] and all(v[0].isdigit() for v in losses[0][:2]), losses
    for r in range(2):
        arrived, waited, value = ranks[r]["done"]["returned"]
        assert arrived and waited < 5 and value == ranks[0]["done"]["returned"][2], ranks
    polled, waited = ranks[0]["lost"]["returned"]  # the last rank stopped: seen within its 5 s timeout
    assert polled in ("done", "PeerLostError") and waited < 15, ranks[0]["lost"]
    assert calls[0]["lost"][0][1].startswith(("PeerLostError: ", "PipelineError: the pipeline stopped")), (
        calls
    )
    targets = [said for _, said, _ in calls[1]["targets"]]
    assert targets[1].startswith("PipelineError: targets is a tensor of shape [7]"), targets
    assert targets[2].startswith(stopped), targets
    gone = [said for what, said, _ in calls[0]["gone"] if what == "flush"]  # tried anew each time before
    assert gone[0].startswith("PeerLostError: ") and gone[1].startswith(stopped), gone
    pause = [r["pause"] for r in ranks]  # idle beyond the timeout between steps: still trains
    assert pause[0]["calls"][0][1] == pause[1]["calls"][0][1] == "ok", pause
    assert pause[0]["returned"] == pause[1]["returned"] and len(pause[0]["returned"]) == 4, pause
