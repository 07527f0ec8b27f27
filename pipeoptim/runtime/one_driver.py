"""What the executors driven from one process agree on with themselves."""

from __future__ import annotations

from pipeoptim.microbatch import Rows


class OneDriver:
    """What the executors driven from one process agree on with themselves (all but torchrun's
    :class:`~pipeoptim.runtime.spmd.SPMDExecutor`): this process makes every call and hands
    every stage its inputs."""

    def same_call(self, call: str, failure: BaseException | None = None) -> None:
        if failure is not None:  # nothing to tell other ranks
            raise failure

    def share_batch_size(
        self, batch: Rows | None, refused: bool = False, call: str = "step", settings: object = None
    ) -> Rows | None:
        """``batch`` itself (a refused batch reaches no stage)."""
        return batch

    def poll_losses(self) -> None:
        """Nothing to take in: each loss reaches its future as it is computed here or reported
        by a worker."""
