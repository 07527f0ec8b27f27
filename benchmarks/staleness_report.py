"""Tables and plots of the staleness study (:mod:`staleness`) from its cell results."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from outputs import write_result
from tabulate import tabulate

ORDER = [
    "sequential",
    "none",
    "pipedream",
    "2bw",
    "spectrain",
    "pipeoptim",
    "pipeoptim-buffer",
    "pipeoptim-next",
]


def _group(results: list[dict]) -> dict[str, dict[tuple[str, int], list[dict]]]:
    """``{setting: {(method, depth): [cell results over seeds]}}``."""
    out: dict[str, dict[tuple[str, int], list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        c = r["cell"]
        out[c["setting"]["name"]][(c["method"], c["depth"])].append(r)
    return out


def mean_sd(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def stale_error(r: dict, key: str = "prediction_error") -> float | None:
    """Mean of ``r[key]`` (prediction error or staleness) over the stages that hold weights and
    have a version difference (all but the last; all for 2BW); ``None`` for sequential cells."""
    errors = r.get(key)
    if not errors:
        return None
    stages = errors if r["cell"]["method"] == "2bw" else errors[:-1]  # 2BW delays the last stage too
    values = [e for e in stages if e is not None]
    return statistics.fmean(values) if values else None


def metric_cell(runs: list[dict]) -> str:
    values = [r["metric"] for r in runs if r["metric"] is not None]
    diverged = sum(r["metric"] is None for r in runs)
    text = mean_sd(values)
    if diverged:
        text += f" ({diverged}/{len(runs)} diverged)"
    return f"{text} [{len(runs)}]" if text else ""


def _methods(cells: dict[tuple[str, int], list[dict]]) -> list[str]:
    present = {m for m, _ in cells}
    return [m for m in ORDER if m in present]


def tables(results: list[dict], depths: list[int]) -> str:
    parts = []
    for name, cells in _group(results).items():
        metric = next(iter(cells.values()))[0]["metric_name"]
        rows, err_rows = [], []
        for method in _methods(cells):
            rows.append([method, *(metric_cell(cells.get((method, n), [])) for n in depths)])
            if method != "sequential":
                errs = []
                for n in depths:
                    runs = cells.get((method, n), [])
                    values = [e for r in runs if (e := stale_error(r)) is not None]
                    stale = [e for r in runs if (e := stale_error(r, "staleness")) is not None]
                    text = f"{statistics.fmean(values):.2e}" if values else ""
                    if values and len(stale) == len(values) and method not in ("none", "pipedream"):
                        text += f" ({statistics.fmean(values) / statistics.fmean(stale):.2f})"
                    errs.append(text)
                err_rows.append([method, *errs])
        walls = [r["wall_s"] for rs in cells.values() for r in rs]
        setting = next(iter(cells.values()))[0]["cell"]["setting"]
        parts.append(
            f"### {name}\n\n{setting['task']}, {setting['optimizer']}, peak lr {setting['lr']:g}, "
            f"{setting['epochs']} epoch(s) of {setting['limit']} examples, batch {setting['batch_size']}, "
            f"warm-up {setting['warmup']:.0%} then cosine; {len(walls)} cells, "
            f"{sum(walls) / 60:.1f} min of training.\n\nFinal test {metric}, mean ± sd over seeds "
            f"[runs]:\n\n"
            + tabulate(rows, headers=["method", *(f"N={n}" for n in depths)], tablefmt="github")
        )
        if err_rows:
            parts.append(
                "Prediction error ‖W_fwd − W_bwd‖ / ‖W_bwd‖, mean over mini-batches and over the stages "
                "with weights and a version difference, then over seeds; in brackets its ratio to the "
                "staleness ‖W_cur − W_bwd‖ / ‖W_bwd‖ of the weights current at the forward on the same "
                "runs (below 1: the prediction is closer to the backward's weights than W is):\n\n"
                + tabulate(err_rows, headers=["method", *(f"N={n}" for n in depths)], tablefmt="github")
            )
    return "\n\n".join(parts)


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plots(results: list[dict], out: Path, depths: list[int]) -> list[str]:
    """``staleness_metric.png``, ``staleness_loss_N{N}.png`` (the loss curves at N = 8, or at the
    largest N run: a quick run's were at 4 in a file named N8, helper-152) and
    ``staleness_prediction_error.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(results)
    names = [n for n, cells in groups.items() if any(m != "sequential" for m, _ in cells)]
    if not names:
        return []
    curve_depth = 8 if 8 in depths else depths[-1]
    files = []
    for kind in ("metric", "loss", "prediction_error"):
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
        for ax, name in zip(axes[0], names):
            cells = groups[name]
            for method in _methods(cells):
                color = f"C{ORDER.index(method)}"
                style = {"label": method, "color": color, "lw": 2 if method == "pipeoptim" else 1}
                if kind == "loss":
                    runs = cells.get((method, 1 if method == "sequential" else curve_depth), [])
                    curves = [r["losses"] for r in runs if r["losses"] and r["metric"] is not None]
                    if curves:
                        length = min(len(c) for c in curves)
                        mean = [statistics.fmean(c[j] for c in curves) for j in range(length)]
                        ax.plot(_smooth(mean, max(1, length // 25)), **style)
                    continue
                xs, ys = [], []
                for n in depths:
                    runs = cells.get((method, n), [])
                    if kind == "metric":
                        values = [r["metric"] for r in runs if r["metric"] is not None]
                    else:
                        values = [e for r in runs if (e := stale_error(r)) is not None]
                    if values:
                        xs.append(n)
                        ys.append(statistics.fmean(values))
                if method == "sequential" and ys and kind == "metric":
                    ax.axhline(ys[0], color=style["color"], ls="--", lw=1, label="sequential")
                elif xs:
                    ax.plot(xs, ys, marker="o", **style)
            metric = next(iter(cells.values()))[0]["metric_name"]
            ylabel = {
                "metric": f"final test {metric}",
                "loss": f"training loss at N={curve_depth} (smoothed)",
                "prediction_error": "‖W_fwd − W_bwd‖ / ‖W_bwd‖",
            }[kind]
            ax.set(title=name, ylabel=ylabel, xlabel="mini-batch" if kind == "loss" else "stages N")
            if kind != "loss":
                ax.set_xscale("log", base=2)
            if kind == "prediction_error":
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        file = f"staleness_{f'loss_N{curve_depth}' if kind == 'loss' else kind}.png"
        fig.savefig(out / file, dpi=90)
        plt.close(fig)
        files.append(file)
    return files


def sweep_table(sweep: list[dict]) -> str:
    """The sequential learning-rate sweep (settings named ``*-sweep-*``), one row per rate."""
    rows = [
        [r["cell"]["setting"]["lr"], f"{r['metric']:.4f}" if r["metric"] is not None else "diverged"]
        for r in sorted(sweep, key=lambda r: r["cell"]["setting"]["lr"])
    ]
    setting = sweep[0]["cell"]["setting"]
    held = setting.get("validation")
    split = "test" if not held else "validation"
    where = (
        ""
        if not held
        else f", the rate chosen on the {held} training examples after the first {setting['limit']}"
        " (held out from training; the test split stays unseen)"
    )
    return (
        f"### Learning-rate sweep\n\nSequential training, {setting['task']}, {setting['optimizer']}, "
        f"seed 0, same length as the study{where}:\n\n"
        + tabulate(rows, headers=["peak lr", f"{split} {sweep[0]['metric_name']}"], tablefmt="github")
    )


def report(results: list[dict], out: Path, kind: str, wall_s: float) -> None:
    """Write ``staleness.md`` and the plots into ``out``; print one summary line. ``kind``:
    "full", "quick" or "partial" (:func:`outputs.run_kind`)."""
    out.mkdir(parents=True, exist_ok=True)
    sweep = [r for r in results if "-sweep-" in r["cell"]["setting"]["name"]]
    results = [r for r in results if r not in sweep]
    depths = sorted({r["cell"]["depth"] for r in results})
    files = plots(results, out, depths) if results else []
    body = (sweep_table(sweep) + "\n\n" if sweep else "") + tables(results, depths)
    total = sum(r["wall_s"] for r in results + sweep)
    cells = len(results) + len(sweep)
    write_result(
        out / "staleness.md",
        f"# Staleness study ({kind} run)\n\n"
        f"{cells} cells, {total / 60:.1f} min of training in the cells ({wall_s / 60:.1f} min "
        f"for this invocation; cells an earlier one finished in the same --work are read back); "
        "deterministic local executor, uniform plans, "
        f"`benchmarks/staleness.py`.\n\n{body}\n\n" + "".join(f"![{f}]({f})\n" for f in files),
    )
    done = [r for r in results if r["cell"]["method"] == "pipeoptim" and stale_error(r) is not None]
    line = "; ".join(
        f"{r['cell']['setting']['name']} N={r['cell']['depth']} seed {r['cell']['seed']} pipeoptim "
        f"error {stale_error(r):.2e}"
        for r in done[:3]
    )
    print(f"{cells} cells; {line or 'no pipeoptim cell'}")
