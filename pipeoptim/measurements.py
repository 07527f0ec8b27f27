"""What a running pipeline can report about itself: memory, staleness, weight versions, the
stages' own state and the bytes they sent (a mixin of :class:`pipeoptim.pipeline.Pipeline`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipeoptim.runtime.launch import Executor
from pipeoptim.runtime.staleness import PipelineStats


class Measurements:
    """Per-stage figures of a :class:`~pipeoptim.pipeline.Pipeline`; each raises
    :class:`~pipeoptim.errors.PipelineError` once the pipeline is closed or failed."""

    _executor: Executor
    _check_open: Callable[[], None]  # the pipeline's: raises once closed or failed
    flush: Callable[[str], None]
    _guarded: Callable[[Callable[[], Any]], Any]  # the pipeline's: a lost peer stops it

    def resident_bytes(self) -> list[int]:
        """Resident memory (RSS, bytes) of the process running each stage, now; with
        ``executor="local"`` every entry is this process. Linux only.

        Raises:
            OSError: ``/proc`` is not available.
            PipelineError: the pipeline is closed or failed.
        """
        self._check_open()
        return self._guarded(self._executor.resident_bytes)

    def stats(self) -> PipelineStats:
        """Per stage, the prediction error and staleness so far and the weight versions held
        (:class:`~pipeoptim.runtime.staleness.PipelineStats`). Covers the backward passes run so
        far: call :meth:`flush` first to include every mini-batch submitted."""
        self._check_open()
        errors = self._guarded(self._executor.prediction_errors)
        return PipelineStats(
            prediction_error=[e.mean for e in errors],
            prediction_error_samples=[e.samples for e in errors],
            staleness=[e.staleness for e in errors],
            peak_weight_versions=self._guarded(self._executor.peak_weight_versions),
        )

    @property
    def peak_weight_versions(self) -> list[int]:
        """Per stage, the most versions of a weight held at once so far (measured); raises
        PipelineError once the pipeline is closed or failed."""
        self._check_open()
        return self._guarded(self._executor.peak_weight_versions)

    @torch.inference_mode(False)  # normal tensors also in a caller's inference mode (helper-184)
    def stage_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Per stage, its own parameters and buffers (CPU): a shared parameter is in every
        stage that holds a copy of it (:mod:`pipeoptim.runtime.shared`). Flushes first."""
        self.flush("stage_state_dicts")
        return [
            {k: v.detach().cpu().clone() for k, v in part.items()}
            for part in self._guarded(self._executor.stage_state_dicts)
        ]

    def sent_bytes(self) -> list[int]:
        """Per stage, the tensor bytes (activations and gradients) it has sent to its
        neighbouring stages so far; shared parameters' gradient sums are not included; raises
        PipelineError once the pipeline is closed or failed."""
        self._check_open()
        return self._guarded(self._executor.sent_bytes)
