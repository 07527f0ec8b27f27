"""Built-in training tasks of ``pipeoptim train``: the three task kinds of the PipeOptim paper
(image classification, sentiment analysis, machine translation) at small scale."""

from __future__ import annotations

from collections.abc import Callable

from pipeoptim.tasks.base import Task
from pipeoptim.tasks.images import digits, fashion_mnist
from pipeoptim.tasks.text import sst2
from pipeoptim.tasks.translation import multi30k

TASKS: dict[str, Callable[..., Task]] = {
    "digits": digits,
    "fashion-mnist": fashion_mnist,
    "sst2": sst2,
    "multi30k": multi30k,
}


def make_task(
    name: str,
    *,
    batch_size: int,
    seed: int = 0,
    limit: int | None = None,
    data_dir: str | None = None,
    test_limit: int | None = None,
    validation: int | None = None,
) -> Task:
    """Build task ``name`` (``limit``: first training examples, ``test_limit``: first test ones;
    ``validation``: an image task evaluates instead on that many training examples after the
    first ``limit``, held out from training, for choosing hyperparameters without the test split).

    Raises:
        ValueError: unknown task name; a validation split that is not a positive integer, of a
            text task, with ``test_limit``, or larger than the training examples after ``limit``.
        FileNotFoundError: the task's data files are missing (the message says where to get them).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if validation is not None:
        if not isinstance(validation, int) or isinstance(validation, bool) or validation < 1:
            raise ValueError(f"validation must be a positive number of examples, got {validation!r}")
        if name not in ("digits", "fashion-mnist"):
            raise ValueError(
                f"validation splits are made for the image tasks (digits, fashion-mnist), not {name}"
            )
        if test_limit is not None:
            raise ValueError("test_limit counts test examples, which a validation split replaces: give one")
        return TASKS[name](
            batch_size=batch_size, seed=seed, limit=limit, data_dir=data_dir, validation=validation
        )
    return TASKS[name](
        batch_size=batch_size, seed=seed, limit=limit, data_dir=data_dir, test_limit=test_limit
    )


__all__ = ["TASKS", "Task", "make_task"]
