"""`stepnet analyze --study ood`: does the per-request stiffness score (stepnet.stiffness_score,
docs/design.md 1.6) tell inputs unlike the training data from the test images, and better than
what the classifier's own output says?

1. Trains (or loads, --checkpoints) one model per family and seed with the stiffness study's
   machinery (analysis.study: recipe, training pool, runner), without the sparse and bias variants.
   The models train on the first images of the fixed permutation of the training split
   (models.train.fixed_subset); the last ones are held out.
2. Per model, calibrates the score on those held-out training images as the export does on its
   calibration images: features of the model's step size and NSI, stiffness_score.calibrate.
3. Scores the test images (in distribution) and each set of analysis.ood_sets (the other data
   set, synthetic images, corrupted test images), all through the model's own pre-processing,
   with three scores, higher meaning more unusual: the stiffness score, 1 - the maximum softmax
   probability (MSP), and energy, -logsumexp(logits).
4. Per set: AUROC and the false positive rate at 95 % true positive rate, out-of-distribution the
   positive class, with 95 % percentile-bootstrap intervals (ID and OOD images resampled
   independently; the same resamples for the three scores, so that the differences of AUROC are
   paired), and the share of the set above the calibrated threshold: the service's `unusual` flag.

run() writes OUT/results.json; analysis/ood_report.py draws the figures and OUT/report.md.
"""

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import special, stats
from sklearn.metrics import roc_auc_score, roc_curve
from torch.utils.data import Subset

from analysis import ood_sets, study
from analysis.defaults import OOD_SEEDS
from analysis.study import AnalysisConfig, Recipe, RunKey
from models import data
from models.net import FAMILIES, build
from models.train import fixed_subset
from stepnet import stiffness_score
from stepnet.errors import UserError
from stepnet.repository.metadata import ScoreProfile

SET_IMAGES = 500            # images per out-of-distribution set, at most
CALIBRATION_IMAGES = 2000   # held-out training images the score is calibrated on, at most (the export's number)
CALIBRATION_SHARE = 0.2     # of the training split held out when --train-images is not given
MIN_CALIBRATION = 50
RESAMPLES, BOOTSTRAP_SEED = 1000, 0
TPR = 0.95
SCORES = ("stiffness", "msp", "energy")
QUANTILES = (1, 5, 25, 50, 75, 95, 99)     # percentiles of each score recorded per set


# ---------------------------------------------------------------- scores and metrics

def scores(d: dict[str, np.ndarray], calibration: stiffness_score.Calibration,
           nsi_defined: list[bool]) -> dict[str, np.ndarray]:
    """The three OOD scores of diagnose()'s arrays, (N,) each, higher meaning more unusual."""
    logits = d["logits"].astype(np.float64)
    return {"stiffness": calibration.score(stiffness_score.features(d["step_size"], d["nsi"], nsi_defined)),
            "msp": 1 - special.softmax(logits, axis=1).max(1),
            "energy": -special.logsumexp(logits, axis=1)}


def _rankable(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scores with the non-finite ones (a stiffness score whose features are not finite) put
    above every finite one: an input whose diagnostics cannot be computed is unusual."""
    both = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    finite = np.isfinite(both)
    both[~finite] = both[finite].max() + 1 if finite.any() else 0.0
    return both[:len(id_scores)], both[len(id_scores):]


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve, out-of-distribution the positive class (sklearn)."""
    labels = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    return float(roc_auc_score(labels, np.r_[id_scores, ood_scores]))


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = TPR) -> float:
    """The share of in-distribution images flagged at the highest threshold that flags at least
    `tpr` of the out-of-distribution ones (sklearn's roc_curve, every threshold kept)."""
    labels = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    fpr, tprs, _ = roc_curve(labels, np.r_[id_scores, ood_scores], drop_intermediate=False)
    return float(fpr[np.searchsorted(tprs, tpr, side="left")])


def _needed(m: int, tpr: float) -> int:
    """The fewest of m positives whose share, computed as roc_curve computes it, reaches tpr."""
    k = max(1, math.ceil(tpr * m))
    while k > 1 and (k - 1) / m >= tpr:
        k -= 1
    while k < m and k / m < tpr:
        k += 1
    return k


def resampled(x: np.ndarray, y: np.ndarray, i: np.ndarray, j: np.ndarray,
              tpr: float = TPR) -> tuple[np.ndarray, np.ndarray]:
    """auroc() and fpr_at_tpr() of the resamples x[i] (ID) and y[j] (OOD), index arrays (B, n) and
    (B, m): (B,) each. Counts instead of sorting every resample (the bootstrap's cost with 10,000
    test images): x is sorted once, a resample of it is how often it holds each x, and the ID
    images below a value are a cumulative sum of those counts (ties count half)."""
    n, m, batch = len(x), len(y), len(i)
    order = np.argsort(x, kind="stable")
    xs, rank = x[order], np.empty(n, np.intp)
    rank[order] = np.arange(n)
    counts = np.bincount((np.arange(batch)[:, None] * n + rank[i]).ravel(), minlength=batch * n)
    below = np.zeros((batch, n + 1))
    below[:, 1:] = np.cumsum(counts.reshape(batch, n), axis=1)     # [:, k]: drawn among the k lowest x
    lt, le = np.searchsorted(xs, y, "left"), np.searchsorted(xs, y, "right")
    wins = below[:, lt] + 0.5 * (below[:, le] - below[:, lt])       # (B, m): per y, the drawn x below it
    auroc_ = np.take_along_axis(wins, j, axis=1).sum(1) / (n * m)
    threshold = np.sort(y[j], axis=1)[:, m - _needed(m, tpr)]       # the k-th highest drawn y
    fpr = 1 - below[np.arange(batch), np.searchsorted(xs, threshold, "left")] / n
    return auroc_, fpr


def compare(id_scores: dict[str, np.ndarray], ood_scores: dict[str, np.ndarray],
            resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Per score AUROC and FPR at TPR with 95 % percentile-bootstrap intervals, and the paired
    differences of AUROC, stiffness - msp and stiffness - energy, with theirs."""
    pairs = [_rankable(id_scores[s], ood_scores[s]) for s in SCORES]
    a, b = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])     # (3, n), (3, m)

    def statistic(i: np.ndarray, j: np.ndarray, axis: int = -1) -> np.ndarray:   # image indices
        rows, cols = np.atleast_2d(i).astype(np.intp), np.atleast_2d(j).astype(np.intp)
        au, fpr = zip(*(resampled(a[k], b[k], rows, cols) for k in range(len(SCORES))))
        out = np.stack([*au, *fpr, au[0] - au[1], au[0] - au[2]])               # (8, B)
        return out if i.ndim > 1 else out[:, 0]

    samples = (np.arange(a.shape[1], dtype=np.float64), np.arange(b.shape[1], dtype=np.float64))
    ci = stats.bootstrap(samples, statistic, n_resamples=resamples, vectorized=True, method="percentile",
                         batch=max(1, 4_000_000 // (a.shape[1] + b.shape[1])),
                         rng=np.random.default_rng(seed)).confidence_interval
    low, high = np.atleast_1d(ci.low).tolist(), np.atleast_1d(ci.high).tolist()
    out: dict = {s: {"auroc": auroc(a[k], b[k]), "auroc_ci95": [low[k], high[k]],
                     "fpr95": fpr_at_tpr(a[k], b[k]), "fpr95_ci95": [low[3 + k], high[3 + k]]}
                 for k, s in enumerate(SCORES)}
    out["stiffness_minus"] = {other: {"difference": out["stiffness"]["auroc"] - out[other]["auroc"],
                                      "ci95": [low[k], high[k]]} for k, other in ((6, "msp"), (7, "energy"))}
    return out


def flagged(stiffness: np.ndarray, threshold: float) -> dict:
    """How many images the service would flag `unusual` (score above the threshold; a NaN score is
    not flagged, as in the service), with the 95 % Wilson interval of the share."""
    k, n = int((stiffness > threshold).sum()), len(stiffness)
    return {"flagged": k, "images": n, "flag_rate": k / n, "flag_rate_wilson95": study.wilson_ci(k, n)}


def describe(s: dict[str, np.ndarray]) -> dict:
    """Percentiles (QUANTILES) of each score over the finite values, and the non-finite count."""
    return {"quantiles": {name: np.percentile(v[np.isfinite(v)], QUANTILES).tolist() if np.isfinite(v).any()
                          else None for name, v in s.items()},
            "nonfinite": {name: int((~np.isfinite(v)).sum()) for name, v in s.items()}}


# ---------------------------------------------------------------- the study

def _plan(cfg: AnalysisConfig) -> tuple[Recipe, dict[RunKey, Path], int, Subset]:
    """The recipe (its train_images set), the given runs, the size of the training split and the
    held-out calibration images, checked before anything trains."""
    study._check_out(cfg)
    if cfg.sparse_k or cfg.adaptor_bias is not None:
        raise UserError("--sparse-k and --adaptor-init-bias are for --study stiffness")
    if cfg.jobs is not None and cfg.jobs < 1:
        raise UserError("--jobs must be at least 1")
    if cfg.checkpoints:
        recipe, given = study._given_runs(cfg)
    else:
        recipe, given = study._recipe(replace(cfg, seeds=cfg.seeds or OOD_SEEDS)), {}
    if recipe.dataset not in ood_sets.OTHER:
        raise UserError(f"--study ood is for {' and '.join(ood_sets.OTHER)} (its sets are grayscale); "
                        f"not {recipe.dataset}")
    train_set, _ = data.load(recipe.dataset, "train", cfg.data_dir)        # the test transforms
    n = len(train_set)
    if recipe.train_images is None:
        if given:
            raise UserError(f"the checkpoints trained on all {n} training images, and the ood study "
                            "calibrates on training images the models did not see: give checkpoints "
                            "trained with --train-images")
        recipe = replace(recipe, train_images=n - min(CALIBRATION_IMAGES, round(CALIBRATION_SHARE * n)))
    elif not 1 <= recipe.train_images <= n:
        raise UserError(f"--train-images must be between 1 and {n}")
    assert recipe.train_images is not None
    held = min(CALIBRATION_IMAGES, n - recipe.train_images)
    if held < MIN_CALIBRATION:
        raise UserError(f"--train-images {recipe.train_images} leaves {n - recipe.train_images} of the "
                        f"{n} training images to calibrate the stiffness score on; it needs {MIN_CALIBRATION}")
    order = fixed_subset(train_set, n).indices            # the models train on its first train_images
    return recipe, given, n, Subset(train_set, order[n - held:])


def _measure(runner: study._Runner, key: RunKey, calibration_set: Subset, sets: list[ood_sets.ImageSet],
             log: Callable[[str], None]) -> tuple[dict, dict[str, dict[str, np.ndarray]], float]:
    """One run's row of results.json, its raw scores per set and its threshold."""
    model, config = runner.model(key)
    started = time.perf_counter()
    nsi_defined = [row["nsi_defined"] for row in model.layers()]
    test = study.diagnose(model, runner.test_set)
    cal = study.diagnose(model, calibration_set)
    fit = stiffness_score.calibrate(stiffness_score.features(cal["step_size"], cal["nsi"], nsi_defined))
    calibration = stiffness_score.Calibration.from_profile(ScoreProfile.model_validate(fit))   # as the service reads it
    raw = {"test": scores(test, calibration, nsi_defined)}
    transform = runner.test_set.transform   # type: ignore[union-attr]   # a DigitsDataset (_plan)
    rows = {}
    for s in sets:
        d = study.diagnose(model, data.DigitsDataset(s.images, np.zeros(len(s.images), np.int64), transform))
        raw[s.name] = scores(d, calibration, nsi_defined)
        rows[s.name] = {**compare(raw["test"], raw[s.name]), **flagged(raw[s.name]["stiffness"], fit["threshold"]),
                        **describe(raw[s.name])}
    row = {"name": key.name, "family": key.family, "seed": key.seed, "accuracy": float(test["correct"].mean()),
           "checkpoint": str(runner.checkpoint(key)), "trained_here": key not in runner.given,
           "train_seconds": config.get("train_seconds"),
           "calibration": {"images": fit["samples"], "features": len(fit["mean"]), "threshold": fit["threshold"],
                           "quantile": fit["quantile"], "shrinkage": fit["shrinkage"]},
           "test": {**flagged(raw["test"]["stiffness"], fit["threshold"]), **describe(raw["test"])},
           "sets": rows}
    log(f"{key.name}: scored the test images and {len(sets)} sets in {time.perf_counter() - started:.0f} s")
    return row, raw, fit["threshold"]


def machine() -> dict:
    """What ran the study: the CPU's name, the cores this process may use, the platform."""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    return {"cpu": cpu or platform.processor() or "unknown", "cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def run(cfg: AnalysisConfig, log: Callable[[str], None] = lambda message: None,
        command: str | None = None) -> dict:
    """The whole study; writes OUT/results.json, OUT/report.md and the figures; returns the results."""
    from analysis import ood_report     # matplotlib: not in the training workers

    started, cpu_started, load_started = time.perf_counter(), study._cpu_seconds(), os.getloadavg()[0]
    recipe, given, train_size, calibration_set = _plan(cfg)
    other = ood_sets.other_dataset(recipe.dataset, cfg.data_dir, SET_IMAGES)   # fails early when absent
    keys = [RunKey(family, seed) for family in FAMILIES for seed in recipe.seeds]
    jobs = min(cfg.jobs or len(os.sched_getaffinity(0)), max(1, len(keys) - len(given)))
    runner = study._Runner(recipe, cfg, given, len(keys), log)
    test_images = runner.test_set.images       # type: ignore[union-attr]   # digits or fashion-mnist
    side = test_images.shape[1]
    sets = [other, *ood_sets.synthetic(SET_IMAGES, side),
            *ood_sets.corrupted(test_images[ood_sets.spread(len(test_images), SET_IMAGES)])]
    layers = build("resnet", recipe.depth, len(runner.info.classes), runner.info.input_size,
                   runner.info.in_channels).layers()
    measured = []
    with study._training_pool(jobs) as runner.pool:
        for key in keys:
            runner.submit(key)
        for key in keys[:-1]:
            measured.append(_measure(runner, key, calibration_set, sets, log))
    measured.append(_measure(runner, keys[-1], calibration_set, sets, log))   # the pool is closed: every core

    results = {
        "study": "ood", "command": command or "analysis.ood.run() from Python",
        "dataset": recipe.dataset, "depth": recipe.depth, "seeds": list(recipe.seeds), "epochs": recipe.epochs,
        "batch_size": recipe.batch_size, "lr": recipe.lr, "split": data.split_description(recipe.dataset, cfg.data_dir),
        "train_split_images": train_size, "train_images": recipe.train_images,
        "calibration_images": len(calibration_set), "test_images": len(runner.test_set),
        "classes": len(runner.info.classes), "layers": len(layers),
        "nsi_layers": sum(row["nsi_defined"] for row in layers), "set_images": SET_IMAGES,
        "sets": [{k: getattr(s, k) for k in ("name", "label", "group", "description", "stand_in")}
                 | {"images": len(s.images)} for s in sets],
        "tpr": TPR, "bootstrap": {"resamples": RESAMPLES, "seed": BOOTSTRAP_SEED, "method": "percentile",
                                  "confidence": 0.95},
        "runs": [row for row, _, _ in measured],
        "machine": machine(), "jobs": jobs,
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    first = {row["family"]: (raw, threshold) for row, raw, threshold in measured if row["seed"] == recipe.seeds[0]}
    ood_report.figures(cfg.out, results, first)
    results["training_seconds"] = round(runner.training_seconds, 1)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["cpu_seconds"] = round(study._cpu_seconds() - cpu_started, 1)
    results["load_average"] = [load_started, os.getloadavg()[0]]
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    ood_report.write(cfg.out, results)
    return results

