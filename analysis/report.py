"""OUT/report.md and its figures from the results of `stepnet analyze` (analysis/study.py).

Every number in the report is formatted from the results dict, which is also written to
OUT/results.json, so the two never disagree.
"""

import math
import statistics
from pathlib import Path

from analysis import plots

FIGURES = {"accuracy": "accuracy.png", "nsi": "nsi_profiles.png", "step_size": "step_size_profiles.png",
           "scatter": "step_size_vs_nsi.png", "ratios": "stage_stiffness_ratios.png",
           "sparse": "sparse_adaptors.png", "paper": "nsi_paper_layout.png", "times_h": "nsi_times_step_size.png"}


def percent(value: float, std: float | None = None) -> str:
    """An accuracy as '97.50%', with ' ± 0.40' (points) when a standard deviation is known."""
    return f"{100 * value:.2f}%" + ("" if std is None else f" ± {100 * std:.2f}")


def number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def rho(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def _defined(r: dict) -> list[int]:
    """The indices of the layers where NSI is defined."""
    return [i for i, row in enumerate(r["layers"]) if row["nsi_defined"]]


def figures(out: Path, results: dict, samples: dict) -> None:
    """Draw the figures into `out`; samples: per family, per seed, the nsi and step_size arrays."""
    plots.accuracy(results, out / FIGURES["accuracy"])
    plots.profiles(results, "nsi", out / FIGURES["nsi"])
    plots.profiles(results, "step_size", out / FIGURES["step_size"])
    plots.paper_profiles(results, out / FIGURES["paper"])
    plots.profiles(results, "nsi_times_h", out / FIGURES["times_h"])
    plots.step_size_vs_nsi(results, samples, out / FIGURES["scatter"])
    plots.stage_ratios(results, out / FIGURES["ratios"])
    plots.sparse(results, out / FIGURES["sparse"])


def write(out: Path, results: dict) -> None:
    (out / "report.md").write_text(markdown(results))


def _command(r: dict) -> str:
    if not all(run["trained_here"] for run in r["runs"]):
        return "`stepnet analyze --checkpoints ...` (given checkpoints)"
    k = ",".join(str(row["k"]) for row in r["sparse"][1:-1]) or "none"
    extra = "".join(f" --{flag} {r[key]:g}" for flag, key, default in (
        ("train-images", "train_images", None), ("batch-size", "batch_size", 64), ("lr", "lr", 0.1),
        ("adaptor-init-bias", "adaptor_bias", None))
        if r.get(key) != default and (key != "train_images" or r["train_subset"]))
    return (f"`stepnet analyze --dataset {r['dataset']} --depth {r['depth']} --seeds {len(r['seeds'])} "
            f"--epochs {r['epochs']} --sparse-k {k}{extra}`")


def _versus(c: dict, other: str) -> str:
    """A comparison of study.compare: '0.74 points below resnet (Welch's t-test over seeds:
    p = 0.08, not significant at the 5% level)'."""
    d = c["difference"]
    where = "level with" if abs(d) < 1e-9 else f"{abs(d):.2f} points {'above' if d > 0 else 'below'}"
    if c["p_value"] is None:
        return f"{where} {other} (no test: one seed, or no spread)"
    verdict = "significant" if c["p_value"] < 0.05 else "not significant"
    return f"{where} {other} (Welch's t-test over seeds: p = {c['p_value']:.2f}, {verdict} at the 5% level)"


def _range(values) -> str:
    return f"{min(values):.2f} to {max(values):.2f}"


def _mean_ratio(r: dict, family: str, key: str) -> float:
    """The mean over blocks with an NSI of family's {key}_mean over resnet's."""
    fam, defined = r["families"], _defined(r)
    return sum(fam[family][f"{key}_mean"][i] / fam["resnet"][f"{key}_mean"][i] for i in defined) / len(defined)


def _variation(profile: list, defined: list[int]) -> float:
    """The coefficient of variation, in percent, of a per-block profile over the blocks with an NSI."""
    values = [profile[i] for i in defined]
    return 100 * statistics.pstdev(values) / statistics.fmean(values)


CHANCE_MARGIN = 0.05        # the least distance above chance that counts as having learned


def chance_margin(classes: int, test_images: int) -> float:
    """How far above chance (1 / classes) a mean test accuracy must be to count as learned:
    the larger of CHANCE_MARGIN (5 points) and three standard errors of a classifier that
    guesses, sqrt(c (1 - c) / n) with c = 1 / classes on n test images (on 360 digits 4.7
    points, on 60 images 11.6). Within it, an accuracy is what guessing gives on a test set of
    that size."""
    chance = 1 / classes
    return max(CHANCE_MARGIN, 3 * math.sqrt(chance * (1 - chance) / test_images))


def chance_warning(r: dict) -> str | None:
    """One sentence naming the families (and sparse runs) whose mean test accuracy is at chance,
    or None. Chance is 1 / the number of classes: the splits are stratified, so a model that
    guesses, or always answers one class, scores about that. "At chance" means below chance plus
    chance_margin(). Such models have learned next to nothing: the comparisons of accuracy
    between them and the rank correlations of their step size with NSI are noise, whatever the
    report's numbers say. Results that do not record their number of classes get no warning."""
    if not r.get("classes"):
        return None
    chance, margin = 1 / r["classes"], chance_margin(r["classes"], r["test_images"])
    runs = {**{f: s["accuracy_mean"] for f, s in r["families"].items()},
            **{row["label"]: row["accuracy_mean"] for row in r["sparse"][1:-1]}}
    low = [(label, accuracy) for label, accuracy in runs.items() if accuracy < chance + margin]
    if not low:
        return None
    named = [f"{label} {percent(accuracy)}" for label, accuracy in low]
    names = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    what = ("the comparisons between families and the rank correlations of step size with NSI in "
            "this report mean nothing" if len(low) == len(runs) else
            f"every comparison with {'it' if len(low) == 1 else 'them'} and "
            f"{'its' if len(low) == 1 else 'their'} rank correlations of step size with NSI mean nothing")
    return (f"{names} {'is' if len(low) == 1 else 'are'} at chance level ({percent(chance)} for "
            f"{r['classes']} classes; below {percent(chance + margin)} counts as chance on "
            f"{r['test_images']} test images). A model there has learned next to nothing, so {what}; "
            "train longer or on more images.")


def summary(r: dict) -> list[str]:
    fam, defined = r["families"], _defined(r)
    ranked = sorted(fam, key=lambda f: -round(fam[f]["accuracy_mean"], 9))
    lines = [f"Mean test accuracy over {len(r['seeds'])} seed(s): "
             + ", ".join(f"{f} {percent(fam[f]['accuracy_mean'])}" for f in ranked)
             + f"; one test image is {100 / r['test_images']:.2f} points."]
    lines += [f"{c['a']} is {_versus(c, c['b'])}{_paired(c)}." for c in r["comparisons"]]
    beaten = [f for f in ("resnet", "se")
              if round(fam[f]["accuracy_mean"], 9) >= round(fam["stepnet"]["accuracy_mean"], 9)]
    if beaten:
        lines.append(f"**On this data set stepnet does not beat {' or '.join(beaten)}** with this recipe.")
    for family in [f for f in fam if f != "resnet"]:
        s = fam[family]
        lines.append(f"{family}: the adaptor's step size h, averaged over channels, ranges from "
                     f"{min(s['step_size_min']):.2f} to {max(s['step_size_max']):.2f} over all blocks "
                     f"and test samples (block means {_range(s['step_size_mean'])}).")
    for family in [f for f in fam if f != "resnet"]:
        ratio = _mean_ratio(r, family, "nsi")
        step = sum(fam[family]["step_size_mean"][i] for i in defined) / len(defined)
        times_h = fam[family].get("nsi_times_h_mean")
        without_h = "" if times_h is None else (
            f" NSI × h_(t-1), which takes the step out, is {_mean_ratio(r, family, 'nsi_times_h'):.2f} "
            f"times resnet's, and varies across blocks by {_variation(times_h, defined):.1f} % "
            f"(resnet {_variation(fam['resnet']['nsi_times_h_mean'], defined):.1f} %; coefficient of "
            "variation of the mean profile).")
        lines.append(f"{family}'s NSI is on average {ratio:.2f} times resnet's, block by block; with "
                     f"a mean step of {step:.2f}, x_t - x_(t-1) = h ⊙ f_(t-1) is about {1 / step:.2f} "
                     "times shorter for the same f, which explains most of the level: compare the "
                     f"shapes of the profiles, not their heights.{without_h}")
    for family in [f for f in fam if f != "resnet"]:
        across = fam[family]["spearman_across_layers"]
        if across is not None:
            trend = ("no clear rank relation between a block's NSI and its mean step" if abs(across) < 0.3
                     else f"blocks with higher NSI take {'smaller' if across < 0 else 'larger'} mean steps")
            lines.append(f"{family}: {trend} (Spearman {rho(across)} across blocks; "
                         f"{rho(fam[family]['spearman_within_layers'])} between samples within one block).")
    per_stage = min(sum(1 for i in defined if r["layers"][i]["stage"] == stage)
                    for stage in dict.fromkeys(row["stage"] for row in r["layers"]))
    lines.append(f"Stage stiffness ratios range from "
                 f"{_range([x['mean'] for s in fam.values() for x in s['stage_stiffness_ratio']])}"
                 + (f"; with {per_stage} blocks with an NSI per stage at depth {r['depth']}, "
                    f"a ratio compares only {per_stage} numbers." if per_stage < 4 else "."))
    rows = r["sparse"]
    lines.append("Sparse adaptors: " + ", ".join(f"{row['label']} {percent(row['accuracy_mean'])}"
                                                  for row in rows) + ". "
                 + " ".join(f"{row['label']} is {_versus(row['vs_none'], 'none')}." for row in rows[1:]))
    return [f"- {line}" for line in lines]


def markdown(r: dict) -> str:
    return "\n".join([*_introduction(r), *_accuracy_section(r), *_nsi_section(r), *_step_size_section(r),
                      *_stage_ratio_section(r), *_sparse_section(r), *_cost(r), *_runs_section(r)])


_SUBSET = (" (a fixed random subset: the first images of one permutation of the training split, "
           "seed 0, the same for every run)")


def _introduction(r: dict) -> list[str]:
    """The title, how and on what the analysis ran, what NSI and h are, and the summary."""
    return [
        f"# Stiffness analysis: resnet, se and stepnet on {r['dataset']}",
        "",
        f"Generated by {_command(r)}: {r['seconds'] / 60:.1f} minutes of wall time and "
        f"{r['cpu_seconds'] / 60:.1f} CPU minutes on {r['cores']} cores, {r['jobs']} model(s) trained at "
        f"once, with a load average of {r['load_average'][0]:.1f} at the start and "
        f"{r['load_average'][1]:.1f} at the end (other work shared the machine where it exceeds "
        f"{r['cores']}). Depth {r['depth']}, epochs {r['epochs']}, "
        f"batch size {r['batch_size']}, peak learning rate {r['lr']}, "
        f"seeds {', '.join(map(str, r['seeds']))}; "
        f"{r['train_images']} training{_SUBSET if r['train_subset'] else ''} and "
        f"{r['test_images']} test images"
        + (f" ({r['split']})" if r.get("split") else "")
        + ". Every number below is in `results.json` beside this file.",
        "",
        "NSI is the neural stiffness index of docs/design.md section 1.1: per sample and block, "
        "||f_t - f_{t-1}|| / ||x_t - x_{t-1}||, the secant estimate of the dominant Jacobian "
        "eigenvalue; undefined for the first block of a stage. The step size h is the adaptor's "
        "output averaged over channels (1 for resnet).",
        "",
        *(["**Warning**: " + warning, ""] if (warning := chance_warning(r)) else []),
        "## Summary",
        "",
        *summary(r),
        "",
    ]


def _section(heading: str, body: list[str], *figures: tuple[str, str]) -> list[str]:
    """A section of the report: its heading, its body, then each figure as (alt text, FIGURES key)."""
    return [heading, "", *body, "", *(line for alt, key in figures for line in (f"![{alt}]({FIGURES[key]})", ""))]


def interval(bounds: list[float] | None, scale: float = 100) -> str:
    """A 95 % interval as '[97.10, 98.30]' (points), or '-' where there is none."""
    return "-" if bounds is None else f"[{scale * bounds[0]:.2f}, {scale * bounds[1]:.2f}]"


def _paired(c: dict) -> str:
    """study.paired's result, for the line after _versus's."""
    p = c.get("paired")
    if p is None or p["p_value"] is None:
        return ""
    verdict = "significant" if p["p_value"] < 0.05 else "not significant"
    return (f"; paired seed by seed: {p['difference']:+.2f} points, 95 % interval "
            f"{interval(p['ci95'], 1)}, paired t-test p = {p['p_value']:.2f}, {verdict}")


def _accuracy_section(r: dict) -> list[str]:
    return _section("## 1. Accuracy, parameters and FLOPs", [
        "| family | test accuracy (mean ± std over seeds) | 95 % interval over seeds | per seed "
        "(95 % Wilson interval over its test images) | parameters | FLOPs per image |",
        "|---|---|---|---|---|---|",
        *(f"| {f} | {percent(s['accuracy_mean'], s['accuracy_std'])} | {interval(s.get('accuracy_ci95'))} | "
          + ", ".join(f"{percent(a)} {interval(w)}" for a, w in zip(s["accuracy"], s.get("accuracy_wilson95")
                                                                   or [None] * len(s["accuracy"])))
          + f" | {s['params']:,} | {s['flops']:,} |"
          for f, s in r["families"].items()),
        "",
        *(f"- {c['a']} is {_versus(c, c['b'])}{_paired(c)}." for c in r["comparisons"]),
        "",
        *([f"The +bias{r['adaptor_bias']:g} variants start their adaptors' last layer with bias "
           f"{r['adaptor_bias']:g}, so h starts near sigmoid({r['adaptor_bias']:g}) = "
           f"{1 / (1 + math.exp(-r['adaptor_bias'])):.2f}: the plain network's steps of 1. The others "
           "start at PyTorch's default, h near 0.5.", ""] if r.get("adaptor_bias") is not None else []),
        "The interval over seeds is Student's t on the seeds' accuracies: where another set of seeds "
        "would put the mean. Each run's Wilson interval is the binomial one on its test images: how "
        "far another test set of that size could move it. The paired test compares the two "
        "families seed by seed, which removes what a seed does to both.",
        "",
        f"With {len(r['seeds'])} seed(s) and {r['test_images']} test images these tests have little "
        "power, and their p-values are not corrected for the several comparisons of this report.",
        "",
        "FLOPs are those of one forward pass of one image as `torch.utils.flop_counter.FlopCounterMode` "
        "counts them: 2 per multiply-add of convolutions and matrix products; element-wise work "
        "(the stiffness norms, sigmoids) is not counted.",
    ], ("Test accuracy per family", "accuracy"))


def _profile_table(r: dict, key: str) -> list[str]:
    """One row per block with an NSI, one column per family: '{key}_mean [{key}_min, {key}_max]',
    or '-' where a family's results lack the key."""
    fam = r["families"]
    return ["| block | " + " | ".join(fam) + " |", "|---|" + "---|" * len(fam),
            *(f"| {r['layers'][i]['name']} | " + " | ".join(
                f"{number(s[key + '_mean'][i])} [{number(s[key + '_min'][i])}, {number(s[key + '_max'][i])}]"
                if s.get(key + "_mean") else "-" for s in fam.values()) + " |" for i in _defined(r))]


def _nsi_section(r: dict) -> list[str]:
    return _section("## 2. NSI profiles", [
        "Mean NSI per block over test samples and seeds, with [min, max] over the test samples of all seeds.",
        "",
        "The level of NSI depends on the step size: x_t - x_(t-1) = h_(t-1) ⊙ f_(t-1), so a family that "
        "takes steps of about h gets an NSI about 1/h times resnet's for the same residual branches. "
        "The shape of a profile (which blocks are stiffer than their neighbours) is what compares "
        "across families.",
        "",
        *_profile_table(r, "nsi"),
        "",
        "Laid out as the paper's figure (one row per family; thin lines: single test images of "
        "seed 0; black: the mean; dashed: min and max over the test images of all seeds):",
        "",
        "![NSI per block, laid out as the paper's figure](" + FIGURES["paper"] + ")",
        "",
        "The same profiles times the mean step size h of the block before. That step made "
        "x_t - x_(t-1) = h_(t-1) ⊙ f_(t-1), so NSI × h_(t-1) is ||f_t - f_(t-1)|| / ||f_(t-1)|| "
        "(exactly where h is the same over channels): the change of the residual branch, whatever "
        "the step. For resnet (h = 1) nothing changes:",
        "",
        *_profile_table(r, "nsi_times_h"),
    ], ("NSI profiles, one panel per stage", "nsi"), ("NSI × previous step size, one panel per stage", "times_h"),
       ("Step size profiles, one panel per stage", "step_size"))


def _step_size_section(r: dict) -> list[str]:
    defined = _defined(r)
    return _section("## 3. Step size against NSI", [
        "Does the adaptor shrink the step where the network is stiff? *Across blocks*: Spearman rank "
        "correlation of the per-block mean step size with the per-block mean NSI (one point per block "
        f"and seed, n = {len(defined) * len(r['seeds'])}). *Within blocks*: the correlation between "
        "the test samples of one block, averaged over blocks and seeds. Negative means smaller steps "
        "where NSI is higher. resnet's h = 1 has no correlation.",
        "",
        "| family | Spearman across blocks | Spearman within blocks | mean step size (blocks with NSI) |",
        "|---|---|---|---|",
        *(f"| {f} | {rho(s['spearman_across_layers'])} | {rho(s['spearman_within_layers'])} | "
          f"{sum(s['step_size_mean'][i] for i in defined) / len(defined):.3f} |"
          for f, s in r["families"].items()),
    ], ("Step size against NSI per family", "scatter"))


def _stage_ratio_section(r: dict) -> list[str]:
    stages = list(dict.fromkeys(row["stage"] for row in r["layers"]))
    return _section("## 4. Stage stiffness ratios", [
        "max NSI / min NSI over the blocks of a stage where NSI is defined (docs/design.md section 1.1), per test "
        "sample; the median over samples, then mean ± std over seeds.",
        "",
        "| family | " + " | ".join(f"stage {s}" for s in stages) + " |",
        "|---|" + "---|" * len(stages),
        *(f"| {f} | " + " | ".join(
            f"{x['mean']:.2f}" + ("" if x["std"] is None else f" ± {x['std']:.2f}")
            for x in s["stage_stiffness_ratio"]) + " |" for f, s in r["families"].items()),
    ], ("Stage stiffness ratios", "ratios"))


def _sparse_section(r: dict) -> list[str]:
    layers = r["layers"]
    return _section("## 5. Sparse adaptors", [
        "StepNet with an adaptor only at the k blocks of highest *reference NSI*: resnet's mean NSI on "
        f"{r['reference_images']} training images, averaged over seeds: the network the adaptors are "
        "added to, measured on training images so that the choice of blocks never sees the test "
        "split. Blocks without an adaptor take h = 1, so *none* is exactly resnet and *all* is "
        "stepnet (the same runs as in section 1).",
        "",
        "| block | reference NSI | rank |",
        "|---|---|---|",
        *(f"| {layers[i]['name']} | {number(r['reference_nsi'][i])} | {rank} |" for rank, i in enumerate(
            sorted(_defined(r), key=lambda i: -r["reference_nsi"][i]), start=1)),
        "",
        "| adaptors | blocks | test accuracy (mean ± std) | per seed | parameters | FLOPs per image |",
        "|---|---|---|---|---|---|",
        *(f"| {row['label']} | {_blocks(row, len(layers))} | "
          f"{percent(row['accuracy_mean'], row['accuracy_std'])} | "
          f"{', '.join(percent(a) for a in row['accuracy'])} | {row['params']:,} | {row['flops']:,} |"
          for row in r["sparse"]),
    ], ("Sparse adaptors", "sparse"))


def _runs_section(r: dict) -> list[str]:
    return _section("## Runs", [
        "Each model once; `results.json` names its checkpoint folder.",
        "",
        "| run | test accuracy | training seconds |",
        "|---|---|---|",
        *(f"| {run['name']} | {percent(run['accuracy'])} | {number(run['train_seconds'], 4)} |"
          for run in r["runs"]),
    ])


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    return f"{seconds / 3600:.1f} hours" if seconds >= 3600 else f"{seconds / 60:.0f} minutes"


def _cost(r: dict) -> list[str]:
    """The CIFAR estimate of study.cifar_estimate, where the results have one."""
    est = r.get("cifar_estimate")
    if est is None:
        return []
    runs, cores = len(r["runs"]), r["cores"]
    return _section("## What the same analysis costs on CIFAR-10/100 (estimate)", [
        f"Not measured: scaled from this run by the images one epoch processes (CIFAR: 50,000 "
        f"training and 10,000 test images; here {r['train_images']} and {r['test_images']}; a test "
        f"image, forward pass only, counted as a third of a training image), a factor of "
        f"{est['scale']:.0f}. Same depth, recipe and {runs} models; training runs on the CPU.",
        "",
        f"- One epoch of one depth-{r['depth']} model: about {_duration(est['model_epoch_cpu_seconds'])} "
        "of CPU time (one core).",
        f"- The whole analysis with these defaults ({runs} models x {r['epochs']} epochs): about "
        f"{_duration(est['idle_seconds'])} on {cores} idle cores (CPU time / {cores}); "
        f"{_duration(est['wall_seconds'])} at the wall-clock pace of this run.",
        f"- {r['epochs']} epochs are far too few for CIFAR: the original ResNet CIFAR schedule runs "
        f"about 180 epochs, and the cost grows linearly with epochs: about "
        f"{_duration(est['idle_seconds'] * 180 / r['epochs'])} on {cores} cores.",
    ])


def _blocks(row: dict, total: int) -> str:
    if row["k"] in (0, total):
        return "none" if row["k"] == 0 else "all"
    return ", ".join(row["blocks"])
