"""The pipeline methods: schedule plus weight policy, and what each costs in memory.

=============  ============  ===========  ====================================================
method         schedule      weights      source
=============  ============  ===========  ====================================================
pipeoptim      async-1f1b    pipeoptim    Guan et al., PipeOptim, arXiv:2312.00839
pipedream      async-1f1b    stash        Narayanan et al., PipeDream, SOSP 2019
2bw            async-1f1b    2bw          Narayanan et al., PipeDream-2BW, ICML 2021
spectrain      async-1f1b    spectrain    Chen et al., SpecTrain, arXiv:1809.02839
none           async-1f1b    none         1F1B without flush and without correction
gpipe          gpipe         (flush)      Huang et al., GPipe, NeurIPS 2019
1f1b           1f1b          (flush)      PipeDream-Flush / Megatron-LM (Narayanan et al. 2021)
=============  ============  ===========  ====================================================
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass


def spectrain_steps(stage: int, num_stages: int) -> tuple[int, int]:
    """SpecTrain's version differences ``(s_f, s_b)`` at stage k of N (0-based), from the
    authors' reference code (Chen et al., arXiv:1809.02839): ``s_f = ⌊k/2⌋ + N − k − 1`` in
    the forward, ``s_b = ⌊k/2⌋`` in the backward (:class:`pipeoptim.runtime.prediction.SpecTrainPolicy`)."""
    return stage // 2 + num_stages - stage - 1, stage // 2


@dataclass(frozen=True)
class Method:
    """A pipeline method.

    Attributes:
        name: name used by ``compile(method=...)`` and ``--method``.
        schedule: ``"gpipe"``, ``"1f1b"`` or ``"async-1f1b"``.
        policy: weight policy of asynchronous schedules (``None`` for flushing schedules).
        micro_batched: whether a mini-batch is split into micro-batches.
        reference: paper the method comes from.
    """

    name: str
    schedule: str
    policy: str | None
    micro_batched: bool
    reference: str

    @property
    def asynchronous(self) -> bool:
        """True when the schedule never flushes (weights change between F and B)."""
        return self.schedule == "async-1f1b"

    def extra_weight_copies(self, stage: int, num_stages: int) -> int:
        """Copies of the stage's weights kept besides the weights themselves.

        PipeOptim keeps one predicted copy, except at the last stage, where a micro-batch's
        backward follows its forward with no step between (version difference 0); SpecTrain
        keeps one predicted copy at every stage (its backward predicts too), PipeDream-2BW one
        older version at every stage (every stage, the last included, computes mini-batch t
        on W(t-1)); PipeDream stashes one version per mini-batch in flight beyond
        the current one (``N - k - 1`` at stage k of N, 0-based); the others keep none.
        """
        if self.policy == "pipeoptim":
            return 1 if stage < num_stages - 1 else 0
        if self.policy in ("spectrain", "2bw"):
            return 1
        if self.policy == "stash":
            return num_stages - stage - 1
        return 0

    def weight_work(self, stage: int, num_stages: int) -> tuple[int, int]:
        """``(predictions per forward, weight copies per optimizer step)`` at stage k of N
        (0-based), in the steady state.

        PipeOptim predicts where its version difference ``N - k - 1`` is not 0 (not at the
        last stage); SpecTrain in each pass whose version difference is not 0
        (:func:`spectrain_steps`);
        PipeDream copies the weights before a step where a mini-batch forwarded on them is
        still in flight (every stage but the last: copy-on-step), 2BW its shadow version before
        every update at every stage (:mod:`pipeoptim.runtime.stashing`); the others do neither.
        """
        last = stage == num_stages - 1
        if self.policy == "pipeoptim":
            return (0 if last else 1), 0
        if self.policy == "spectrain":
            return sum(steps > 0 for steps in spectrain_steps(stage, num_stages)), 0
        if self.policy == "stash":
            return 0, (0 if last else 1)
        if self.policy == "2bw":
            return 0, 1
        return 0, 0

    def in_flight(self, stage: int, num_stages: int, micro_batches: int) -> int:
        """Micro-batches whose activations stage k holds at once (its saved activations).

        GPipe holds all ``M`` micro-batches; 1F1B with flush holds ``min(N - k, M)`` at
        stage k of N (0-based); asynchronous 1F1B holds ``N - k`` (mini-batches, or
        micro-batches for 2BW).
        """
        if self.schedule == "gpipe":
            return micro_batches
        if self.schedule == "1f1b":
            return min(num_stages - stage, micro_batches)
        return num_stages - stage


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("pipeoptim", "async-1f1b", "pipeoptim", False, "Guan et al., arXiv:2312.00839"),
        Method("pipedream", "async-1f1b", "stash", False, "Narayanan et al., SOSP 2019"),
        Method("2bw", "async-1f1b", "2bw", True, "Narayanan et al., ICML 2021"),
        Method("spectrain", "async-1f1b", "spectrain", False, "Chen et al., arXiv:1809.02839"),
        Method("none", "async-1f1b", "none", False, "1F1B without flush or correction"),
        Method("gpipe", "gpipe", None, True, "Huang et al., NeurIPS 2019"),
        Method("1f1b", "1f1b", None, True, "Narayanan et al., SC 2021 (PipeDream-Flush)"),
    )
}


def get_method(name: str) -> Method:
    """Look a method up by name.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def check_micro_batch_count(method: str, micro_batches: object) -> int:
    """``micro_batches`` as an ``int``; refused where it is not a positive integer (numpy's
    integers are), or other than 1 for a method that does not split mini-batches.

    Raises:
        ValueError: naming the value and what is allowed.
    """
    if (
        not isinstance(micro_batches, numbers.Integral)
        or isinstance(micro_batches, bool)
        or micro_batches < 1
    ):
        raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}")
    if not get_method(method).micro_batched and micro_batches != 1:
        raise ValueError(f"method {method!r} does not split mini-batches: leave micro_batches unset")
    return int(micro_batches)


def check_micro_batches(method: str, stages: int, micro_batches: int) -> None:
    """Refuse a micro-batch count the method cannot run with on ``stages`` stages.

    PipeDream-2BW keeps two weight versions, which cover a micro-batch's forward and backward
    only when a mini-batch has at least as many micro-batches as the pipeline has stages
    (Narayanan et al., ICML 2021, Sec. 3.1).

    Raises:
        ValueError: method 2bw with ``micro_batches < stages``.
    """
    if get_method(method).policy == "2bw" and micro_batches < stages:
        raise ValueError(
            f"PipeDream-2BW needs micro_batches >= stages ({micro_batches} < {stages}) to keep two "
            "versions: raise --micro-batches or use fewer stages"
        )
