"""Convergence: the PipeOptim paper's comparison at small scale.

Four stages, the three task kinds of the paper -- image classification (Fashion-MNIST where
its files are installed, else the scikit-learn digits), sentiment analysis (SST-2) and
machine translation (Multi30K, BLEU) -- for the methods sequential (no pipeline), GPipe,
PipeDream, PipeDream-2BW, SpecTrain (SGD only), no correction and PipeOptim, over several
seeds. The image CNN is trained with SGD with momentum and with AdamW; the two text
transformers with AdamW only (SGD with momentum left them at chance level or diverging
here). Runs use the deterministic local executor, which computes exactly what the
multi-process one does (see the tests), so this fits on a 2-core machine. Tasks whose data
is absent (``../shared``) are skipped with a note.

    python benchmarks/convergence.py [--quick] [--seeds 3] [--out benchmarks/results] [--work DIR]

Writes ``convergence.md`` and one ``convergence_<task>_<optimizer>.png`` of loss curves per
task and optimizer into ``--out`` (default: ``benchmarks/results`` for the full run, a new
temporary folder for ``--quick`` or other ``--seeds``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from outputs import OUT_HELP, missing_tasks, positive_int, results_dir, run_kind, work_folder, write_result
from tabulate import tabulate

from pipeoptim.tasks import make_task
from pipeoptim.training import TrainConfig, train

METHODS = ["sequential", "gpipe", "pipedream", "2bw", "spectrain", "none", "pipeoptim"]


@dataclass
class Setting:
    """How one task is trained in this benchmark."""

    task: str
    epochs: int
    batch_size: int
    limit: int | None
    lr: dict[str, float]
    test_limit: int | None = None

    @property
    def optimizers(self) -> list[str]:
        return list(self.lr)


#: the tasks of the full run (one of them missing: a partial run, outputs.results_dir)
FULL_TASKS = ("fashion-mnist", "sst2", "multi30k")
#: what the full run takes for the options that narrow it (outputs.is_full_run)
FULL = {"seeds": 3}


def settings(quick: bool) -> list[Setting]:
    image = "fashion-mnist"
    try:
        make_task(image, batch_size=64, limit=64)
    except FileNotFoundError as exc:
        print(f"using digits instead of Fashion-MNIST: {str(exc).splitlines()[0]}", file=sys.stderr)
        image = "digits"
    if quick:
        return [
            # the text tasks' data loading and decoding alone take a minute: their smoke tests
            # are in tests/test_tasks_text.py
            Setting("digits", 2, 32, 640, {"sgd": 0.05}),
        ]
    return [
        Setting(
            image,
            3 if image == "fashion-mnist" else 10,
            64 if image == "fashion-mnist" else 32,
            12000 if image == "fashion-mnist" else None,
            {"sgd": 0.02, "adamw": 2e-3},
            test_limit=2000 if image == "fashion-mnist" else None,
        ),
        # SGD with momentum (lr 0.05 to 0.5, tried) leaves these small transformers at chance level
        # or diverging within this budget, so the text tasks compare the methods under AdamW.
        Setting("sst2", 2, 32, 8000, {"adamw": 1e-3}),
        Setting("multi30k", 3, 32, 3000, {"adamw": 1e-3}, test_limit=300),
    ]


def run(setting: Setting, optimizer: str, method: str, seed: int, work: Path) -> dict | None:
    config = TrainConfig(
        task=setting.task,
        out=str(work / f"{setting.task}-{optimizer}-{method}-{seed}"),
        gpus=4,
        method=method,
        optimizer=optimizer,
        epochs=setting.epochs,
        batch_size=setting.batch_size,
        lr=setting.lr[optimizer],
        weight_decay=0.01 if optimizer == "adamw" else 0.0,
        seed=seed,
        limit=setting.limit,
        test_limit=setting.test_limit,
        executor="local",
        progress=False,
        profile_dir=str(work / "profiles"),
    )
    done = Path(config.out) / "metrics.json"
    earlier = json.loads(done.read_text()) if done.exists() else {}
    # finished by an earlier, interrupted invocation with the same --work and settings; one
    # stopped midway ("running") or made with other settings was read back as this run's
    # (helper-137)
    if earlier.get("status") == "completed" and earlier.get("config") == json.loads(
        json.dumps(asdict(config))
    ):
        metrics = earlier
    else:
        try:
            metrics = train(config, log=lambda _msg: None)
        except FileNotFoundError as exc:
            print(f"  skipping {setting.task}: {str(exc).splitlines()[0]}", file=sys.stderr)
            return None
    curve = [
        float(row.split(",")[2]) for row in (Path(config.out) / "train.csv").read_text().splitlines()[1:]
    ]
    return {
        "metric": metrics["metric"],
        "final": metrics["final"][metrics["metric"]],
        "curve": curve,
        "wall": metrics["wall_s"],
    }


def tail_loss(curve: list[float]) -> float:
    """Mean training loss over the last tenth of the mini-batches."""
    tail = curve[-max(1, len(curve) // 10) :]
    return statistics.fmean(tail)


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(curves: dict[str, list[list[float]]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (method, runs) in enumerate(curves.items()):
        length = min(len(c) for c in runs)
        mean = [statistics.fmean(c[j] for c in runs) for j in range(length)]
        ax.plot(
            smooth(mean, max(1, length // 40)),
            label=method,
            color=f"C{i}",
            lw=1.5 if method == "pipeoptim" else 1,
        )
    ax.set(xlabel="mini-batch", ylabel="training loss (smoothed, mean over seeds)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="digits only, 2 epochs of 640 rows (40 mini-batches: enough to tell the methods "
        "apart), one seed (seconds)",
    )
    parser.add_argument("--seeds", type=positive_int, help="seeds per setting (default 3, quick 1)")
    parser.add_argument("--out", type=Path, help=OUT_HELP)
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep every run's folder here (default: a temporary folder); runs already finished "
        "there are read back, so an interrupted benchmark continues where it stopped",
    )
    args = parser.parse_args()
    work_folder(parser, args.work)
    needs = lambda: missing_tasks(FULL_TASKS)  # noqa: E731
    args.out = results_dir(parser, args, "convergence", scope=FULL, needs=needs)
    torch.set_num_threads(2)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    methods = ["sequential", "pipedream", "none", "pipeoptim"] if args.quick else METHODS
    args.out.mkdir(parents=True, exist_ok=True)
    rows, findings = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for setting in settings(args.quick):
            for optimizer in setting.optimizers:
                results: dict[str, list[dict]] = {}
                runs = [(m, s) for m in methods if m != "spectrain" or optimizer == "sgd" for s in seeds]
                for method, seed in runs:
                    print(f"  {setting.task} {optimizer} {method} seed {seed} ...", file=sys.stderr)
                    result = run(setting, optimizer, method, seed, work)
                    if result is None:  # the task's data is missing
                        break
                    results.setdefault(method, []).append(result)
                if not results:
                    continue
                metric = next(iter(results.values()))[0]["metric"]
                stats = {m: [r["final"] for r in rs] for m, rs in results.items()}
                for method, values in stats.items():
                    sd = statistics.stdev(values) if len(values) > 1 else 0.0
                    rows.append(
                        [
                            setting.task,
                            optimizer,
                            method,
                            metric,
                            f"{statistics.fmean(values):.4f}",
                            f"{sd:.4f}",
                            f"{statistics.fmean(tail_loss(r['curve']) for r in results[method]):.4f}",
                            len(values),
                            f"{statistics.fmean(r['wall'] for r in results[method]):.1f}",
                        ]
                    )
                plot(
                    {m: [r["curve"] for r in rs] for m, rs in results.items()},
                    f"{setting.task}, {optimizer}, 4 stages",
                    args.out / f"convergence_{setting.task}_{optimizer}.png",
                )
                mean = {m: statistics.fmean(v) for m, v in stats.items()}
                if {"pipeoptim", "sequential", "pipedream", "none"} <= mean.keys():
                    findings.append(
                        f"{setting.task}/{optimizer}: pipeoptim {mean['pipeoptim']:.4f} vs sequential "
                        f"{mean['sequential']:.4f} ({mean['pipeoptim'] - mean['sequential']:+.4f}), "
                        f"pipedream {mean['pipedream']:.4f} ({mean['pipeoptim'] - mean['pipedream']:+.4f}), "
                        f"none {mean['none']:.4f} ({mean['pipeoptim'] - mean['none']:+.4f})"
                    )
    headers = [
        "task",
        "optimizer",
        "method",
        "metric",
        "final mean",
        "sd",
        "last 10% train loss",
        "seeds",
        "seconds per run",
    ]
    table = tabulate(rows, headers=headers, tablefmt="github")
    print(table)
    summary = "; ".join(findings) or "no complete comparison (data missing?)"
    write_result(
        args.out / "convergence.md",
        f"# Convergence ({run_kind(parser, args, FULL)} run: 4 stages, local executor, "
        f"seeds {seeds})\n\n"
        f"Final test metric (accuracy in [0, 1], BLEU in [0, 100]) after training; mean and standard "
        f"deviation over seeds; the training loss is averaged over the last tenth of the mini-batches "
        f"and over seeds.\n\n{table}\n\nPipeOptim minus the others: {summary}\n",
    )
    print(summary)


if __name__ == "__main__":
    main()
