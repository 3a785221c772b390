"""The figures of `stepnet analyze`, drawn from its results (analysis/study.py) into PNG files.

matplotlib's object API (Figure, no pyplot) renders with Agg and leaves no global state behind.
"""

from pathlib import Path

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from stepnet.repository import STEP_MEAN

COLOURS = {"resnet": "#4c72b0", "se": "#dd8452", "stepnet": "#55a868"}
VARIANT_COLOURS = {"se": "#8c3b0c", "stepnet": "#1b5e20"}     # se+biasB, stepnet+biasB: darker


def colour(label: str) -> str:
    """A family's colour; its +bias variant (analysis.study.RunKey.label) in a darker shade."""
    family, _, variant = label.partition("+")
    return (VARIANT_COLOURS if variant else COLOURS).get(family, "black")
DPI = 130


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI)


def _log_axis(ax, which: str, values) -> None:
    """A log axis labelled at 1-2-5 steps, spanning at least one labelled tick on each side of the data."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v) and v > 0])
    low, high = values.min(), values.max()
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
             for m in (1, 2, 5)]
    low = max(t for t in ticks if t <= low)
    high = min(t for t in ticks if t >= high)
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(FixedLocator([t for t in ticks if low <= t <= high]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())
    (ax.set_xlim if which == "x" else ax.set_ylim)(low / 1.1, high * 1.1)


def _accuracy_points(ax, x: int, accuracy: list[float], colour: str, first: bool) -> None:
    """Mean with a std error bar, and one small dot per seed beside it."""
    values = 100 * np.array(accuracy)
    std = values.std(ddof=1) if len(values) > 1 else None
    ax.errorbar(x, values.mean(), yerr=std, fmt="o", color=colour, markersize=9, capsize=6,
                label="mean ± std" if first else None)
    ax.scatter(x + 0.12 + 0.05 * np.arange(len(values)), values, color="black", s=12, zorder=3,
               label="one seed" if first else None)   # side by side: equal accuracies stay visible
    ax.annotate(f"{values.mean():.2f}%", (x, values.mean()), xytext=(-10, 0), textcoords="offset points",
                ha="right", va="center", fontsize=9)


def _stages(results: dict) -> list[int]:
    return list(dict.fromkeys(row["stage"] for row in results["layers"]))


def accuracy(results: dict, path: Path) -> None:
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for x, (family, summary) in enumerate(results["families"].items()):
        _accuracy_points(ax, x, summary["accuracy"], colour(family), x == 0)
    _accuracy_axis(ax, results, list(results["families"]))
    ax.set_title(f"Test accuracy, depth {results['depth']}, {len(results['seeds'])} seed(s)")
    _save(fig, path)


def _accuracy_axis(ax, results: dict, labels: list[str]) -> None:
    lows = [a for s in [*results["families"].values(), *results["sparse"]] for a in s["accuracy"]]
    ax.set_ylim(max(0.0, 100 * min(lows) - 1.5), min(100.5, 100 * max(lows) + 1))
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def profiles(results: dict, key: str, path: Path) -> None:
    """One panel per stage: per-block mean of `key` ("nsi", "nsi_times_h" or "step_size") per
    family, shaded between the min and max over the test samples."""
    stages = _stages(results)
    fig = Figure(figsize=(4.2 * len(stages), 3.8), layout="constrained")
    axes = fig.subplots(1, len(stages), squeeze=False, sharey=True)[0]
    for ax, stage in zip(axes, stages):
        rows = [i for i, row in enumerate(results["layers"]) if row["stage"] == stage]
        for family, summary in results["families"].items():
            pts = [(results["layers"][i]["block"], summary[f"{key}_mean"][i], summary[f"{key}_min"][i],
                    summary[f"{key}_max"][i]) for i in rows if summary[f"{key}_mean"][i] is not None]
            block, mean, low, high = map(np.array, zip(*pts))
            ax.plot(block, mean, "o-", color=colour(family), label=family)
            ax.fill_between(block, low, high, color=colour(family), alpha=0.15)
        channels = results["layers"][rows[0]]["channels"]
        ax.set_title(f"stage {stage} ({channels} channels)")
        ax.set_xlabel("block")
        ax.set_xticks([results["layers"][i]["block"] for i in rows])
        ax.set_xlim(0.7, len(rows) + 0.3)
        ax.grid(alpha=0.3)
    if key.startswith("nsi"):
        _log_axis(axes[0], "y", [v for s in results["families"].values() for k in (f"{key}_min", f"{key}_max")
                                 for v in s[k]])
    else:
        axes[0].set_ylim(0, 1.05)
    axes[0].set_ylabel({"nsi": "NSI (log scale)", "nsi_times_h": "NSI × h of the block before (log scale)"}.get(
        key, "step size h (mean over channels)"))
    axes[0].legend(fontsize=8)
    what = {"nsi": "NSI (block 1 of a stage has none)",
            "nsi_times_h": "NSI times the previous block's mean step size"}.get(key, "Step size")
    fig.suptitle(f"{what}: mean over test samples and seeds; band: min to max over the test samples "
                 "of all seeds", fontsize=11)
    _save(fig, path)


def paper_profiles(results: dict, path: Path) -> None:
    """The paper's NSI figure: a row per family, a panel per stage, NSI against block index with
    one thin line per test image (study.SAMPLE_CURVES of the first seed), the mean over all test
    images and seeds, and the min / max envelope over the test images of all seeds (dashed)."""
    stages, families = _stages(results), results["families"]
    fig = Figure(figsize=(4.2 * len(stages), 3.0 * len(families)), layout="constrained")
    grid = fig.subplots(len(families), len(stages), squeeze=False, sharey=True)
    for axes, (family, summary) in zip(grid, families.items()):
        shade = colour(family)
        for ax, stage in zip(axes, stages):
            rows = [i for i, row in enumerate(results["layers"])
                    if row["stage"] == stage and summary["nsi_mean"][i] is not None]
            block = [results["layers"][i]["block"] for i in rows]
            for curve in summary["nsi_samples"]:
                ax.plot(block, [curve[i] for i in rows], color=shade, alpha=0.18, linewidth=0.7)
            ax.plot(block, [summary["nsi_mean"][i] for i in rows], "o-", color="black", markersize=3,
                    linewidth=1.6, label="mean")
            for key, label in (("nsi_min", "min / max"), ("nsi_max", None)):
                ax.plot(block, [summary[key][i] for i in rows], "--", color=shade, linewidth=1.1, label=label)
            ax.set_title(f"{family}, stage {stage}", fontsize=10)
            ax.set_xticks(block)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("NSI (log scale)")
    for ax in grid[-1]:
        ax.set_xlabel("block")
    _log_axis(grid[0][0], "y", [v for s in families.values() for k in ("nsi_min", "nsi_max") for v in s[k]])
    grid[0][0].legend(fontsize=8)
    fig.suptitle(f"NSI per block: {len(families[next(iter(families))]['nsi_samples'])} test images of seed 0 "
                 "(thin), the mean over all test images and seeds, min / max over them (dashed)", fontsize=11)
    _save(fig, path)


def step_size_vs_nsi(results: dict, samples: dict, path: Path, per_layer: int = 150) -> None:
    """One panel per family: one dot per test sample and block (at most per_layer per block and
    seed), coloured by block; large markers are the block means."""
    layers = results["layers"]
    defined = [i for i, row in enumerate(layers) if row["nsi_defined"]]
    colours = [f"C{j % 10}" for j in range(len(defined))]
    rng = np.random.default_rng(0)
    fig = Figure(figsize=(4.6 * len(samples), 4.2), layout="constrained")
    axes = fig.subplots(1, len(samples), squeeze=False)[0]
    for ax, (family, runs) in zip(axes, samples.items()):
        summary = results["families"][family]
        for j, i in enumerate(defined):
            nsi = np.concatenate([r["nsi"][:, i] for r in runs])
            step = np.concatenate([r["step_size"][:, i, STEP_MEAN] for r in runs])
            pick = rng.permutation(len(nsi))[:per_layer * len(runs)]
            ax.scatter(nsi[pick], step[pick], s=5, alpha=0.25, color=colours[j], linewidths=0)
            ax.scatter(summary["nsi_mean"][i], summary["step_size_mean"][i], s=70, color=colours[j],
                       edgecolors="black", zorder=3, label=layers[i]["name"])
        _log_axis(ax, "x", np.concatenate([r["nsi"][:, defined].ravel() for r in runs]))
        ax.set_xlabel("NSI (log scale)")
        ax.set_ylabel("step size h (mean over channels)")
        ax.set_title(f"{family}\n{_rho_text(summary)}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="block mean")
    _save(fig, path)


def _rho_text(summary: dict) -> str:
    across, within = summary["spearman_across_layers"], summary["spearman_within_layers"]
    if across is None and within is None:
        return "h = 1: no correlation defined"
    fmt = lambda v: "n/a" if v is None else f"{v:+.2f}"   # noqa: E731
    return f"Spearman across blocks {fmt(across)}, within blocks {fmt(within)}"


def stage_ratios(results: dict, path: Path) -> None:
    stages = _stages(results)
    families = list(results["families"])
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(families)
    for j, family in enumerate(families):
        rows = results["families"][family]["stage_stiffness_ratio"]
        x = np.arange(len(stages)) + (j - (len(families) - 1) / 2) * width
        stds = [r["std"] for r in rows]
        ax.bar(x, [r["mean"] for r in rows], width, yerr=None if None in stds else stds, capsize=3,
               color=colour(family), label=family)
    ax.set_xticks(range(len(stages)), [f"stage {s}" for s in stages])
    ax.set_ylabel("max NSI / min NSI in the stage")
    ax.set_title("Stage stiffness ratio: median over test samples,\nmean and std over seeds")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def sparse(results: dict, path: Path) -> None:
    rows = results["sparse"]
    fig = Figure(figsize=(1.9 * len(rows) + 1, 3.8), layout="constrained")
    ax = fig.subplots()
    for x, row in enumerate(rows):
        colour = COLOURS["resnet"] if row["k"] == 0 else COLOURS["stepnet"]
        _accuracy_points(ax, x, row["accuracy"], colour, x == 0)
    labels = [f"{r['label']}\n{r['k']} adaptor(s)\n{r['params'] / 1e3:.1f}k params" for r in rows]
    _accuracy_axis(ax, results, labels)
    ax.set_title("StepNet with adaptors only at the k blocks of highest reference NSI")
    _save(fig, path)
