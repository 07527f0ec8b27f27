"""Run records kept on disk as training goes: ``train.csv`` rows and progress reports.

A run's per-mini-batch records never accumulate in memory: :class:`StepLog` buffers at most
``every`` rows and appends them to ``train.csv`` (flushed and fsynced), so a run that is
killed leaves every row up to its last ``every``; :class:`Progress` shows one bar for the
whole run (tqdm, with ETA) on a terminal, and otherwise one plain line every ``every``
mini-batches, so logs are not filled with bar redraws.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeoptim.compile_layout import layout_record
from pipeoptim.fileio import atomic_write
from pipeoptim.other_work import OTHER_WORK_LIMIT
from pipeoptim.units import plural

HEADER = ("step", "epoch", "loss", "lr")


def read_rows(path: Path) -> list[list[str]]:
    """The data rows of a ``train.csv`` (a half-written last line of a killed run is skipped)."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    rows = list(csv.reader(lines))
    return [r for r in rows[1:] if len(r) == len(HEADER)]


def _rewrite(path: Path, rows: list[list[str]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(HEADER)
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


class StepLog:
    """Appends ``step, epoch, loss, lr`` rows to ``path`` every ``every`` mini-batches.

    Args:
        path: the ``train.csv`` to write.
        start: mini-batches already trained (a resumed run): rows from ``step >= start`` are
            dropped, as they are trained again; ``0`` starts a new file.
        every: rows buffered before an append (the most a killed run can lose).
        source: ``train.csv`` of the run being resumed, if it is another folder: its rows
            before ``start`` are copied first.
    """

    def __init__(self, path: Path, start: int = 0, every: int = 50, source: Path | None = None) -> None:
        self.path = path
        self.every = max(1, every)
        self._rows: list[list] = []
        kept = [r for r in read_rows(source or path) if int(r[0]) < start] if start else []
        #: rows of the resumed run kept (none where its train.csv is missing or unreadable)
        self.kept = len(kept)
        _rewrite(path, kept)

    def add(self, step: int, epoch: int, loss: float, lr: float) -> None:
        """Record one mini-batch; appends to disk when ``every`` rows are waiting."""
        self._rows.append([step, epoch, loss, lr])
        if len(self._rows) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Append the waiting rows, flushed and fsynced."""
        if not self._rows:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows(self._rows)
            f.flush()
            os.fsync(f.fileno())
        self._rows = []


class Progress:
    """Progress of a whole run of ``total`` mini-batches, from ``done``.

    On a terminal (``stream.isatty()``), one tqdm bar with rate and ETA; otherwise one plain
    line through ``log`` every ``every`` mini-batches (and at the end), with the same facts.
    ``enabled=False`` shows nothing. The rate is of training: time inside :meth:`paused`
    (evaluation, checkpoints) is left out of it, and the ETA adds that time back per mini-batch
    left.
    """

    def __init__(
        self,
        total: int,
        done: int,
        every: int,
        log: Callable[[str], None],
        enabled: bool = True,
        stream=None,
    ) -> None:
        stream = stream if stream is not None else sys.stderr
        self.total = total
        self.done = done
        self.every = max(1, every)
        self.log = log
        self.enabled = enabled
        self._start_done = done
        self._tic = time.perf_counter()
        self._paused_s = 0.0
        self._bar = None
        if enabled and stream.isatty():
            self._bar = tqdm(
                total=total, initial=done, desc="training", unit="mini-batch", mininterval=1.0, file=stream
            )

    def update(self, epoch: int, epochs: int, loss: float) -> None:
        """One more mini-batch finished with ``loss`` in (0-based) ``epoch`` of ``epochs``."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss:.4f}", refresh=False)
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            self.log(self.line(epoch, epochs, loss))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside out of the training rate (evaluation, checkpoints)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._paused_s += time.perf_counter() - started
            if self._bar is not None:
                self._bar.unpause()

    def line(self, epoch: int, epochs: int, loss: float) -> str:
        """``mini-batch 500/1875 (27%), epoch 1/1, loss 0.4123, 14.2 mini-batches/s, ETA 1m37s``:
        mini-batches per second of training; the ETA adds the paused seconds per mini-batch."""
        done = self.done - self._start_done
        seconds = time.perf_counter() - self._tic - self._paused_s
        rate = done / seconds if seconds > 0 else 0.0
        left = self.total - self.done
        eta = left / rate + left * self._paused_s / done if rate > 0 else float("nan")
        return (
            f"mini-batch {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%), "
            f"epoch {epoch + 1}/{epochs}, loss {loss:.4f}, {rate:.1f} mini-batches/s, ETA {_duration(eta)}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{s:02d}s"


def plot_curves(
    csv_path: Path, epochs: list[dict[str, Any]], metric: str, path: Path, title: str = ""
) -> None:
    """Loss per mini-batch (from ``train.csv``, with a moving average) and the metric per
    epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [int(r[0]) for r in rows]
    losses = [float(r[2]) for r in rows]
    left.plot(steps, losses, lw=0.5, alpha=0.4, label="mini-batch")
    window = max(1, len(losses) // 50)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    left.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    left.set(xlabel="mini-batch", ylabel="training loss", title=title)
    left.legend()
    right.plot([e["epoch"] for e in epochs], [e[metric] for e in epochs], marker="o")
    right.set(xlabel="epoch", ylabel=metric, title=f"test {metric}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def summary_line(metrics: dict[str, Any]) -> str:
    """One line for the end of a run."""
    metric = metrics["metric"]
    value = metrics["final"][metric]
    shown = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
    cfg = metrics["config"]
    ran = metrics.get("layout")  # sequential: none
    layout = ""
    if ran is not None:
        stages, replicas = ran["stages"], ran["data_parallel"]
        width = f" x {plural(replicas, 'replica')}" if replicas > 1 else ""
        layout = f" ({plural(stages, 'stage')}{width})"
    batches = plural(metrics["mini_batches"], "mini-batch", "mini-batches")
    return (
        f"{cfg['task']} {cfg['method']}{layout}: test {metric} {shown} after "
        f"{plural(len(metrics['epochs']), 'epoch')}, {batches}, {metrics['wall_s']:.1f} s"
    )


def epoch_line(record: dict[str, Any], epochs: int, metric: str, predicted: float | None) -> str:
    """``epoch 2/10: train loss 0.1234, test accuracy 0.9750, 95.5 mini-batches/s (0.58 of the
    plan's 165, other processes used 45% of the CPU time)``: the measured rate against the
    plan's, and other processes' share of the cores where it exceeds
    :data:`~pipeoptim.other_work.OTHER_WORK_LIMIT` (what slowed the epoch beside the plan)."""
    notes = [f"{record['of_plan']:.2f} of the plan's {predicted:.3g}"] if record.get("of_plan") else []
    other = record.get("other_cpu")
    if other is not None and other > OTHER_WORK_LIMIT:
        notes.append(f"other processes used {other:.0%} of the CPU time")
    return (
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}, test {metric} "
        f"{record[metric]:.4f}, {record['mini_batches_per_s'] or 0:.1f} mini-batches/s"
        + (f" ({', '.join(notes)})" if notes else "")
    )


def run_metrics(config: Any, task: Any, trainer: Any, epochs: list[dict], wall: float, done: int) -> dict:
    """A run's ``metrics.json``: ``config`` its settings (a dataclass), ``task`` a
    :class:`~pipeoptim.tasks.Task`, ``trainer`` its pipeline or sequential trainer (whose
    ``plan`` is ``None``), ``epochs`` the per-epoch records, ``wall`` seconds so far, ``done``
    mini-batches whose loss came back (not those in flight when a run is stopped)."""
    final = epochs[-1][task.metric] if epochs else None
    plan = trainer.plan
    return {
        "config": asdict(config),
        "task": {"name": task.name, "metric": task.metric, **task.info},
        "metric": task.metric,
        "final": {task.metric: final},
        "epochs": epochs,
        "mini_batches": done,
        "wall_s": wall,
        "plan": None
        if plan is None
        else {k: v for k, v in plan.summary.items() if isinstance(v, (int, float, str, bool)) or v is None},
        "stages": None if plan is None else [s.to_dict() for s in plan.stages],
        "layout": None if plan is None else layout_record(plan),
    }
