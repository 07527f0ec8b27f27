"""Run by test_faults.py: a process that starts children with
:func:`pipeoptim.runtime.spawning.run_processes` (as measuring the link does) and waits on them
until it is killed; each child writes its process id into the folder ``argv[1]`` and sleeps."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeoptim.runtime.spawning import run_processes


def sleep_here(folder: str, index: int, out: Any) -> None:
    """Write this process's id to ``folder/index.pid``, then sleep (never replies on ``out``)."""
    Path(folder, f"{index}.pid").write_text(str(os.getpid()))
    time.sleep(3600)


if __name__ == "__main__":
    from tests.killed_measure_script import sleep_here as importable  # by its module's name

    run_processes(importable, [(sys.argv[1], i) for i in range(2)], "sleeping children", timeout=3600)
