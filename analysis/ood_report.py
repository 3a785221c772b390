"""OUT/report.md and the figures of `stepnet analyze --study ood` (analysis/ood.py).

markdown() renders the report from results.json alone, so a committed report can be rendered
again from its committed results; the verdicts (where the stiffness score beats MSP and energy,
and where it loses) are computed here from the numbers, never written by hand. The score
distributions need the raw scores, which only the run has: figures() draws them then.
"""

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from analysis.plots import COLOURS, _log_axis
from analysis.report import chance_margin, number, percent

FIGURES = {"auroc": "auroc.png", **{f"scores_{family}": f"scores_{family}.png" for family in COLOURS}}
NAMES = {"stiffness": "stiffness", "msp": "1 − MSP", "energy": "energy"}
AXES = {"stiffness": "stiffness score (log)", "msp": "1 − max softmax probability (log)",
        "energy": "energy, −logsumexp(logits)"}
SCORE_COLOURS = {"stiffness": "#55a868", "msp": "#4c72b0", "energy": "#c44e52"}
GROUP_COLOURS = {"test": "#bbbbbb", "other data set": "#8172b3", "synthetic": "#dd8452", "corrupted": "#64b5cd"}
DPI = 100


def write(out: Path, results: dict) -> None:
    (out / "report.md").write_text(markdown(results))


# ---------------------------------------------------------------- numbers and verdicts

def _label(r: dict, run: dict) -> str:
    """A run as the report names it: its family, or its family and seed where there are several."""
    return run["family"] if len(r["seeds"]) == 1 else run["name"]


def _ci(bounds: list[float], digits: int = 3) -> str:
    return f"[{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def _signed(difference: dict) -> str:
    return f"{difference['difference']:+.3f} {_ci(difference['ci95'])}"


def verdict(difference: dict) -> str:
    """'better' where the 95 % interval of stiffness's AUROC minus the other's lies above 0,
    'worse' where it lies below, 'level' where it holds 0."""
    low, high = difference["ci95"]
    return "better" if low > 0 else "worse" if high < 0 else "level"


def _listed(r: dict, run: dict, other: str, kind: str) -> list[str]:
    """The sets of one verdict, with the AUROC difference where it is not 'level'."""
    return [s["label"] + ("" if kind == "level" else f" {run['sets'][s['name']]['stiffness_minus'][other]['difference']:+.2f}")
            for s in r["sets"] if verdict(run["sets"][s["name"]]["stiffness_minus"][other]) == kind]


def _against(r: dict, run: dict, other: str) -> str:
    """'better than 1 − MSP on 3 of 13 sets (noise +0.40, ...), worse on 8 (...), level on 2 (...)'."""
    parts = []
    for kind in ("better", "worse", "level"):
        named = _listed(r, run, other, kind)
        what = f"{kind} than {NAMES[other]}" if kind != "level" else "level"
        if kind == "better":
            parts.append(f"{what} on {len(named)} of {len(r['sets'])} sets" + (f" ({', '.join(named)})" if named else ""))
        elif named:
            parts.append(f"{what} on {len(named)} ({', '.join(named)})")
        else:
            parts.append(f"{what} on none")
    return ", ".join(parts)


def _mean_auroc(r: dict, run: dict, score: str, group: str | None = None) -> float:
    values = [run["sets"][s["name"]][score]["auroc"] for s in r["sets"] if group in (None, s["group"])]
    return float(np.mean(values))


def _groups(r: dict) -> list[str]:
    return list(dict.fromkeys(s["group"] for s in r["sets"]))


def summary(r: dict) -> list[str]:
    """The summary's bullet lines, every verdict computed from the results."""
    runs, n = r["runs"], len(r["sets"])
    lines = ["Test accuracy: " + ", ".join(f"{_label(r, run)} {percent(run['accuracy'])}" for run in runs)
             + f" on {r['test_images']} test images.",
             f"On the {r['test_images']} test images the stiffness score flags "
             + ", ".join(f"{percent(run['test']['flag_rate'])} {_ci([100 * v for v in run['test']['flag_rate_wilson95']], 2)} "
                         f"({_label(r, run)})" for run in runs)
             + " as `unusual` (95 % Wilson intervals, points): the threshold is the 99th percentile of "
               "out-of-fold calibration scores, so about 1 % is what it aims at."]
    for run in runs:
        means = " / ".join(f"{_mean_auroc(r, run, s):.3f}" for s in ("stiffness", "msp", "energy"))
        groups = "; ".join(f"{g} " + " / ".join(f"{_mean_auroc(r, run, s, g):.2f}" for s in ("stiffness", "msp", "energy"))
                           for g in _groups(r))
        lines.append(f"**{_label(r, run)}**: mean AUROC over the {n} sets, stiffness / 1 − MSP / energy: "
                     f"{means} ({groups}). By the paired AUROC difference, the stiffness score is "
                     f"{_against(r, run, 'msp')}; and {_against(r, run, 'energy')}.")
    both_better = [(run, s) for run in runs for s in r["sets"]
                   if all(verdict(run["sets"][s["name"]]["stiffness_minus"][o]) == "better" for o in ("msp", "energy"))]
    both_worse = [(run, s) for run in runs for s in r["sets"]
                  if all(verdict(run["sets"][s["name"]]["stiffness_minus"][o]) == "worse" for o in ("msp", "energy"))]
    lines.append(f"**Over all {len(runs) * n} model and set pairs, the stiffness score beats both MSP and "
                 f"energy on {len(both_better)} and loses to both on {len(both_worse)}**"
                 + "".join(f"; {what} both on {_by_run(r, pairs)}" for what, pairs in
                           (("beats", both_better), ("loses to", both_worse)) if pairs) + ".")
    return [f"- {line}" for line in lines]


def _by_run(r: dict, pairs: list[tuple[dict, dict]]) -> str:
    """'resnet: noise, shapes; se: noise' from (run, set) pairs."""
    runs = dict.fromkeys(_label(r, run) for run, _ in pairs)
    return "; ".join(f"{label}: " + ", ".join(s["label"] for run, s in pairs if _label(r, run) == label)
                     for label in runs)


# ---------------------------------------------------------------- the report

def markdown(r: dict) -> str:
    return "\n".join([*_introduction(r), *_method(r), *_per_run(r), *_runs(r)])


def _warnings(r: dict) -> list[str]:
    chance = 1 / r["classes"]
    low = [f"{_label(r, run)} {percent(run['accuracy'])}" for run in r["runs"]
           if run["accuracy"] < chance + chance_margin(r["classes"], r["test_images"])]
    lines = []
    if low:
        lines += [f"**Warning**: {', '.join(low)} at chance level ({percent(chance)} for {r['classes']} "
                  "classes): a model there has learned next to nothing, and its scores say little.", ""]
    for s in (s for s in r["sets"] if s["stand_in"]):
        lines += [f"**Warning**: the `{s['name']}` set is a synthetic stand-in ({s['description']}), not "
                  "the real data set, which was absent: a test's run, not a measurement.", ""]
    return lines


def _introduction(r: dict) -> list[str]:
    m = r["machine"]
    return [
        f"# The stiffness score as an out-of-distribution detector: resnet, se and stepnet on {r['dataset']}",
        "",
        f"Generated by `{r['command']}`: {r['seconds'] / 60:.1f} minutes of wall time and "
        f"{r['cpu_seconds'] / 60:.1f} CPU minutes on {m['cores']} cores ({m['cpu']}; {m['platform']}; "
        f"Python {m['python']}, torch {m['torch']}), {r['jobs']} model(s) trained at once, with a load "
        f"average of {r['load_average'][0]:.1f} at the start and {r['load_average'][1]:.1f} at the end "
        f"(other work shared the machine where it exceeds {m['cores']}). Depth {r['depth']}, "
        f"{r['layers']} blocks ({r['nsi_layers']} with an NSI), epochs {r['epochs']}, batch size "
        f"{r['batch_size']}, peak learning rate {r['lr']}, seeds {', '.join(map(str, r['seeds']))}; "
        f"{r['train_images']} training images, {r['calibration_images']} calibration images and "
        f"{r['test_images']} test images" + (f" ({r['split']})" if r.get("split") else "")
        + ". Every number below is in `results.json` beside this file.",
        "",
        "The question: does the per-request stiffness score of the service (docs/design.md section "
        "1.6), computed from the step sizes and NSI a request already returns, tell inputs unlike the "
        "training data from test images, and better than the classifier's own confidence?",
        "",
        *_warnings(r),
        "## Summary",
        "",
        *summary(r),
        "",
        "Better or worse means that the 95 % bootstrap interval of the difference of AUROC (stiffness "
        "minus the other score, on the same resampled images) lies above or below 0; level, that it holds 0.",
        "",
    ]


def _method(r: dict) -> list[str]:
    b = r["bootstrap"]
    return [
        "## What was measured",
        "",
        f"- **Calibration**: per model, on {r['calibration_images']} held-out training images: the last "
        f"{r['calibration_images']} of the fixed permutation of the {r['train_split_images']}-image "
        f"training split (seed 0) whose first {r['train_images']} train the models. No model saw them "
        "and none is a test image. As the export does: per image the features of "
        "`stepnet.stiffness_score.features` (each block's step size, mean, min and max over channels, "
        "and ln NSI of the blocks with an NSI), then `stiffness_score.calibrate`: z-scores, the "
        "Ledoit-Wolf shrunk covariance, and the threshold at the 99th percentile of out-of-fold scores.",
        "- **Scores**, higher meaning more unusual: the stiffness score z^T P z / D; 1 − the maximum "
        "softmax probability (MSP); energy, −logsumexp(logits). MSP and energy need only the logits.",
        f"- **In distribution**: all {r['test_images']} test images. **Out of distribution**: the sets "
        "below (the corrupted ones made from "
        + f"{next((s['images'] for s in r['sets'] if s['group'] == 'corrupted'), 0)} test images evenly "
        "spread over the split, the synthetic ones at the test images' size), each through the model's "
        "own pre-processing, the test images' transforms ("
        + ("ink normalization, " if r["dataset"] == "digits" else "") + "resize, centre crop, normalization)."
        + (" Ink normalization stretches every image's levels from its background to its ink, so it "
           "undoes a contrast reduction up to rounding: for a digits model the contrast sets are nearly "
           "the test images themselves, a check that no score flags them." if r["dataset"] == "digits" else ""),
        f"- **Metrics**, out-of-distribution the positive class: AUROC (sklearn `roc_auc_score`) and the "
        f"false positive rate at {100 * r['tpr']:.0f} % true positive rate (FPR95: the share of test "
        f"images flagged at the threshold that catches {100 * r['tpr']:.0f} % of the set; sklearn "
        f"`roc_curve`), with {100 * b['confidence']:.0f} % {b['method']} bootstrap intervals "
        f"(`scipy.stats.bootstrap`, {b['resamples']} resamples, seed {b['seed']}; test and set images "
        "resampled independently, the same resamples for all three scores). **Flagged**: the share "
        "of a set above the calibrated threshold, the service's `unusual` flag.",
        "",
        "| set | group | images | what |",
        "|---|---|---|---|",
        *(f"| {s['label']} | {s['group']} | {s['images']} | {s['description']} |" for s in r["sets"]),
        "",
        *_nonfinite(r),
    ]


def _nonfinite(r: dict) -> list[str]:
    counts = [(run, s, k, v) for run in r["runs"] for s in r["sets"]
              for k, v in run["sets"][s["name"]]["nonfinite"].items() if v]
    if not counts:
        return ["Every score of every image is finite.", ""]
    return ["Non-finite scores (ranked above every finite one; the service does not flag them): "
            + ", ".join(f"{v} {k} of {s['label']} ({_label(r, run)})" for run, s, k, v in counts) + ".", ""]


def _per_run(r: dict) -> list[str]:
    lines = ["## Results per model", ""]
    for run in r["runs"]:
        t = run["test"]
        lines += [
            f"### {_label(r, run)}: test accuracy {percent(run['accuracy'])}",
            "",
            f"Calibrated on {run['calibration']['images']} images, {run['calibration']['features']} features, "
            f"threshold {run['calibration']['threshold']:.3g}; flagged on the test images: {t['flagged']} of "
            f"{t['images']} ({percent(t['flag_rate'])}).",
            "",
            "| set | AUROC stiffness | AUROC 1 − MSP | AUROC energy | stiffness − MSP | stiffness − energy |",
            "|---|---|---|---|---|---|",
            *(f"| {s['label']} | " + " | ".join(f"{m[k]['auroc']:.3f} {_ci(m[k]['auroc_ci95'])}" for k in NAMES)
              + f" | {_signed(m['stiffness_minus']['msp'])} | {_signed(m['stiffness_minus']['energy'])} |"
              for s in r["sets"] for m in [run["sets"][s["name"]]]),
            "",
            "| set | FPR95 stiffness | FPR95 1 − MSP | FPR95 energy | flagged unusual |",
            "|---|---|---|---|---|",
            f"| test images | - | - | - | {percent(t['flag_rate'])} |",
            *(f"| {s['label']} | " + " | ".join(f"{100 * m[k]['fpr95']:.1f}% {_ci([100 * v for v in m[k]['fpr95_ci95']], 1)}"
                                               for k in NAMES)
              + f" | {percent(m['flag_rate'])} |" for s in r["sets"] for m in [run["sets"][s["name"]]]),
            "",
        ]
        if run["seed"] == r["seeds"][0]:
            lines += [f"![Score distributions of {_label(r, run)}]({FIGURES['scores_' + run['family']]})", ""]
    return lines + ["AUROC with 95 % intervals, the three scores per set, one panel per model:", "",
                    f"![AUROC per set, score and model]({FIGURES['auroc']})", ""]


def _runs(r: dict) -> list[str]:
    return ["## Runs", "",
            "| run | test accuracy | trained here | training seconds | checkpoint |", "|---|---|---|---|---|",
            *(f"| {run['name']} | {percent(run['accuracy'])} | {'yes' if run['trained_here'] else 'no'} | "
              f"{number(run['train_seconds'], 4)} | `{run['checkpoint']}` |" for run in r["runs"]),
            "",
            f"The last model finished training {r['training_seconds'] / 60:.1f} minutes into the "
            f"{r['seconds'] / 60:.1f}; the scoring, the bootstrap and the figures ran beside and after the training.",
            ""]


# ---------------------------------------------------------------- figures

def figures(out: Path, results: dict, raw: dict) -> None:
    """raw: per family (first seed), (its scores per set name and "test", its threshold)."""
    auroc_figure(results, out / FIGURES["auroc"])
    for family, (scores, threshold) in raw.items():
        score_figure(results, family, scores, threshold, out / FIGURES[f"scores_{family}"])


def score_figure(r: dict, family: str, scores: dict, threshold: float, path: Path) -> None:
    """One panel per score: a box per set (quartiles, whiskers at the 1st and 99th percentiles),
    the test images first; the stiffness panel shows the calibrated threshold."""
    names = ["test", *(s["name"] for s in r["sets"])]
    labels = ["test images", *(s["label"] for s in r["sets"])]
    colours = [GROUP_COLOURS["test"], *(GROUP_COLOURS[s["group"]] for s in r["sets"])]
    fig = Figure(figsize=(11, 8.5), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    for ax, score in zip(axes, NAMES):
        values = [scores[name][score][np.isfinite(scores[name][score])] for name in names]
        if score != "energy":
            values = [np.maximum(v, 1e-12) for v in values]
            shown = [np.percentile(v, (1, 99)) for v in values if len(v)] + [[threshold] if score == "stiffness" else []]
            _log_axis(ax, "y", np.concatenate(shown))
        boxes = ax.boxplot(values, whis=(1, 99), showfliers=False, patch_artist=True, widths=0.6,
                           medianprops={"color": "black"})
        for box, colour in zip(boxes["boxes"], colours):
            box.set_facecolor(colour)
        if score == "stiffness":
            ax.axhline(threshold, color="#c44e52", linestyle="--", linewidth=1,
                       label=f"calibrated threshold {threshold:.3g}")
            ax.legend(fontsize=8, loc="upper left")
        ax.set_ylabel(AXES[score], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(1, len(labels) + 1), labels, rotation=35, ha="right")
    fig.suptitle(f"{family} on {r['dataset']}: scores per set (box: quartiles; whiskers: 1st to 99th "
                 "percentile); higher means more unusual", fontsize=11)
    fig.savefig(path, dpi=DPI)


def auroc_figure(r: dict, path: Path) -> None:
    """AUROC with its 95 % interval per set, the three scores side by side, one panel per model."""
    runs, sets = r["runs"], r["sets"]
    fig = Figure(figsize=(3.6 * len(runs) + 1.6, 0.36 * len(sets) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    y = np.arange(len(sets))
    for ax, run in zip(axes, runs):
        for k, score in enumerate(NAMES):
            m = [run["sets"][s["name"]][score] for s in sets]
            auc = np.array([v["auroc"] for v in m])
            err = np.array([[a - v["auroc_ci95"][0], v["auroc_ci95"][1] - a] for a, v in zip(auc, m)]).T
            ax.errorbar(auc, y + (k - 1) * 0.25, xerr=np.maximum(err, 0), fmt="o", markersize=4, capsize=2,
                        color=SCORE_COLOURS[score], label=NAMES[score])
        ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("AUROC (OOD positive)")
        ax.set_title(f"{_label(r, run)} ({percent(run['accuracy'])})", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [s["label"] for s in sets])
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"AUROC against the {r['dataset']} test images, 95 % bootstrap intervals", fontsize=11)
    fig.savefig(path, dpi=DPI)
