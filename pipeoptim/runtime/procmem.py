"""Resident memory of a process (Linux ``/proc``), for the long-run memory checks."""

from __future__ import annotations

import os


def resident_bytes(pid: int | None = None) -> int:
    """Resident set size of process ``pid`` (default: this one), in bytes.

    Raises:
        OSError: no ``/proc/<pid>/statm`` (not Linux, or the process has ended).
    """
    with open(f"/proc/{pid or os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")
