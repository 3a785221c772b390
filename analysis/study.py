"""`stepnet analyze`: what the diagnostics of docs/design.md 1.3 mean, measured on trained models (issue 8).

Trains (or loads) resnet, se and stepnet at one depth over several seeds, runs each over the test
split with diagnostics, and computes:

1. accuracy (mean and std over seeds, 95 % intervals over seeds and over test images, paired
   tests seed by seed), parameters and FLOPs per family;
2. per-block NSI (and step size) profiles with min/max envelopes over the test samples, laid out
   as the paper's figure (per-sample curves, mean, envelope), and NSI times the previous
   block's step size, since x_t - x_(t-1) = h_(t-1) ⊙ f_(t-1) makes NSI's level follow 1/h;
3. step size against NSI: Spearman rank correlation across layers and within each layer;
4. stage stiffness ratios (docs/design.md 1.1);
5. sparse adaptors: StepNet with an adaptor only at the k blocks of highest reference NSI, where
   the reference is resnet's NSI on training images (the network the adaptors would be added to),
   against all blocks (stepnet) and none (resnet: a stepnet without adaptors is the same network).

The runs that were not given train side by side in worker processes (--jobs), resnet first, so
that the reference NSI of the sparse runs is measured while the other families still train.
`analyze` writes OUT/results.json; analysis/report.py draws the figures and OUT/report.md.
"""

import json
import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

from analysis.defaults import DEFAULT_DEPTH, DEFAULT_EPOCHS, DEFAULT_SEEDS, DEFAULT_SPARSE_K
from models import checkpoint, data
from models.net import DEPTHS, FAMILIES, StepNet, build
from models.train import TrainConfig, fixed_subset, train
from stepnet import statistics
from stepnet.errors import UserError
from stepnet.repository import STEP_MEAN

REFERENCE_IMAGES = 2000        # training images the reference NSI profile is measured on
SAMPLE_CURVES = 40             # test images whose own NSI profiles the paper-style figure draws
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000


@dataclass(frozen=True)
class AnalysisConfig:
    out: Path
    dataset: str | None = None             # None: digits, or the data set of --checkpoints
    data_dir: Path | None = None
    depth: int | None = None               # None: DEFAULT_DEPTH, or the depth of --checkpoints
    seeds: int | None = None               # None: DEFAULT_SEEDS; seeds 0 .. seeds-1
    epochs: int | None = None              # None: DEFAULT_EPOCHS
    sparse_k: tuple[int, ...] = DEFAULT_SPARSE_K
    checkpoints: tuple[Path, ...] = ()     # given checkpoints replace training of the three families
    checkpoint_dir: Path | None = None     # where trained checkpoints go; None: OUT/checkpoints
    train_images: int | None = None        # train on a fixed subset of this many images; None: all
    batch_size: int = 64
    lr: float = 0.1
    jobs: int | None = None                # models trained at once; None: one per CPU core
    adaptor_bias: float | None = None      # also se and stepnet with h starting near sigmoid(bias)
    force: bool = False


@dataclass(frozen=True)
class Recipe:
    """How every compared model is trained: the same for all runs of one analysis."""
    dataset: str
    depth: int
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float
    train_images: int | None


@dataclass(frozen=True)
class RunKey:
    family: str
    seed: int
    blocks: tuple[str, ...] | None = None  # adaptor blocks of a sparse stepnet; None: all
    bias: float | None = None              # models.net.NetConfig.adaptor_bias

    @property
    def label(self) -> str:
        """The family as the report names it: "stepnet", "stepnet-top3", "se+bias3"."""
        kind = self.family if self.blocks is None else f"stepnet-top{len(self.blocks)}"
        return kind if self.bias is None else f"{kind}+bias{self.bias:g}"

    @property
    def name(self) -> str:
        return f"{self.label}-seed{self.seed}"


# ---------------------------------------------------------------- inputs: recipe and given checkpoints

def _unique(configs: list[dict], what: str, get) -> object:
    values = {json.dumps(get(c)) for c in configs}
    if len(values) != 1:
        raise UserError(f"the checkpoints disagree on {what} ({', '.join(sorted(values))}); "
                        "give checkpoints of one training recipe")
    return get(configs[0])


def _run_key(config: dict) -> RunKey:
    blocks = config["model"].get("adaptor_blocks")
    return RunKey(config["model"]["family"], int(config["seed"]), None if blocks is None else tuple(blocks),
                  config["model"].get("adaptor_bias"))


def _given_runs(cfg: AnalysisConfig) -> tuple[Recipe, dict[RunKey, Path]]:
    if cfg.seeds is not None or cfg.epochs is not None:
        raise UserError("--seeds and --epochs come from the checkpoints; leave them out with --checkpoints")
    configs, given = [], {}
    for folder in cfg.checkpoints:
        config = checkpoint.read_config(folder)
        if "seed" not in config or "epochs" not in config:
            raise UserError(f"{folder}: not written by `stepnet train` (no seed or epochs in its config)")
        key = _run_key(config)
        if key in given:
            raise UserError(f"{folder} and {given[key]} are both {key.name}")
        configs.append(config)
        given[key] = Path(folder)
    recipe = Recipe(
        dataset=_unique(configs, "the data set", lambda c: c.get("dataset")),
        depth=_unique(configs, "the depth", lambda c: c["model"]["depth"]),
        seeds=(), epochs=_unique(configs, "epochs", lambda c: c["epochs"]),
        batch_size=_unique(configs, "batch size", lambda c: c.get("batch_size", 64)),
        lr=_unique(configs, "learning rate", lambda c: c.get("lr", 0.1)),
        train_images=_unique(configs, "training images", lambda c: c.get("train_images")))
    for name, value in (("--dataset", cfg.dataset), ("--depth", cfg.depth)):
        if value is not None and value != getattr(recipe, name[2:]):
            raise UserError(f"{name} {value} differs from the checkpoints' {getattr(recipe, name[2:])}")
    seeds = {f: sorted(k.seed for k in given if k.family == f and k.blocks is None and k.bias is None)
             for f in FAMILIES}
    if not all(seeds.values()) or len({tuple(s) for s in seeds.values()}) != 1:
        have = "; ".join(f"{f}: {', '.join(map(str, s)) or 'none'}" for f, s in seeds.items())
        raise UserError(f"--checkpoints must hold resnet, se and stepnet for the same seeds ({have})")
    return replace(recipe, seeds=tuple(seeds["stepnet"])), given


def _recipe(cfg: AnalysisConfig) -> Recipe:
    seeds = DEFAULT_SEEDS if cfg.seeds is None else cfg.seeds
    epochs = DEFAULT_EPOCHS if cfg.epochs is None else cfg.epochs
    depth = DEFAULT_DEPTH if cfg.depth is None else cfg.depth
    if seeds < 1 or epochs < 1:
        raise UserError("--seeds and --epochs must be at least 1")
    if depth not in DEPTHS:
        raise UserError(f"unknown depth {depth}; choose from {', '.join(map(str, DEPTHS))}")
    return Recipe(cfg.dataset or "digits", depth, tuple(range(seeds)), epochs, cfg.batch_size, cfg.lr,
                  cfg.train_images)


def _check_out(cfg: AnalysisConfig) -> None:
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(f"{cfg.out} is not a folder")
    if cfg.out.is_dir() and any(cfg.out.iterdir()) and not cfg.force:
        raise UserError(f"{cfg.out} already exists and is not empty (use --force to write into it)")


# ---------------------------------------------------------------- measurements

def model_cost(model: StepNet, info: data.DataInfo) -> dict:
    """Parameters, and FLOPs of one forward pass of one image as torch's FlopCounterMode counts
    them (2 per multiply-add of convolutions and matrix products; element-wise ops not counted)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, info.in_channels, info.input_size, info.input_size))
    return {"params": sum(p.numel() for p in model.parameters()), "flops": counter.get_total_flops()}


@torch.no_grad()
def diagnose(model: StepNet, dataset, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per test sample: correct (N,), logits (N, K), step_size (N, L, 3: mean, min, max over
    channels), nsi (N, L)."""
    model.eval()
    correct, logits_, steps, nsis = [], [], [], []
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        logits, step_size, nsi = model(images, diagnostics=True)
        correct.append((logits.argmax(1) == labels).numpy())
        logits_.append(logits.numpy())
        steps.append(step_size.numpy())
        nsis.append(nsi.numpy())
    return {"correct": np.concatenate(correct), "logits": np.concatenate(logits_),
            "step_size": np.concatenate(steps), "nsi": np.concatenate(nsis)}


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the training workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation; None where it is undefined (a constant, as resnet's h = 1)."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.spearmanr(x, y).statistic)


def compare(a: list[float], b: list[float]) -> dict:
    """Accuracy a minus accuracy b over seeds: the difference of the means in points, and the
    p-value of Welch's t-test (None with fewer than two seeds on a side or no spread at all)."""
    p_value = None
    if min(len(a), len(b)) > 1 and max(np.ptp(a), np.ptp(b)) > 0:
        p_value = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return {"difference": 100 * float(np.mean(a) - np.mean(b)), "p_value": p_value}


def paired(a: list[float], b: list[float]) -> dict:
    """Accuracy a minus b, seed by seed (the same seed trains both on the same data order and
    initial backbone weights): the mean difference in points, its 95 % t-interval and the
    p-value of the paired t-test (None with fewer than two pairs or no spread)."""
    diff = 100 * (np.asarray(a, float) - np.asarray(b, float))
    out = {"difference": float(diff.mean()), "ci95": None, "p_value": None}
    if len(diff) > 1 and np.ptp(diff) > 0:
        half = float(stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)))
        out.update(ci95=[out["difference"] - half, out["difference"] + half],
                   p_value=float(stats.ttest_rel(a, b).pvalue))
    return out


def accuracy_ci(accuracy: list[float]) -> list[float] | None:
    """95 % t-interval of the mean accuracy over seeds (what another set of seeds would give)."""
    if len(accuracy) < 2:
        return None
    mean, std = _mean_std(accuracy)
    half = float(stats.t.ppf(0.975, len(accuracy) - 1) * std / np.sqrt(len(accuracy)))
    return [mean - half, mean + half]


def wilson_ci(correct: int, total: int) -> list[float]:
    """95 % Wilson interval of one run's test accuracy (what another test set would give)."""
    interval = stats.binomtest(correct, total).proportion_ci(0.95, method="wilson")
    return [float(interval.low), float(interval.high)]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _layer_means(nsi: np.ndarray) -> np.ndarray:
    """Mean over samples per layer of (N, L) NSI; NaN for the layers where it is undefined."""
    means = np.full(nsi.shape[1], np.nan)
    defined = ~np.isnan(nsi).all(0)
    means[defined] = np.nanmean(nsi[:, defined], 0)
    return means


def _none_if_nan(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def summarize_family(runs: list[dict], layers: list[dict]) -> dict:
    """The items 1-4 of one family from its runs (one per seed, each with diagnose()'s arrays)."""
    defined = np.array([row["nsi_defined"] for row in layers])
    stages = [row["stage"] for row in layers]
    nsi = np.concatenate([r["nsi"][:, defined] for r in runs])        # (seeds * N, L defined)
    step = np.concatenate([r["step_size"][:, :, STEP_MEAN] for r in runs])    # (seeds * N, L)
    nsi_means = np.stack([r["nsi"][:, defined].mean(0) for r in runs])          # (seeds, L defined)
    step_means = np.stack([r["step_size"][:, defined, STEP_MEAN].mean(0) for r in runs])
    within = [_spearman(r["nsi"][:, i], r["step_size"][:, i, STEP_MEAN])
              for r in runs for i in np.flatnonzero(defined)]
    within = [v for v in within if v is not None]
    ratios = np.array([statistics.median_stage_stiffness_ratio(r["nsi"], stages) for r in runs],
                      dtype=float)                                    # (seeds, S); NaN: no ratio

    def per_layer(values: np.ndarray) -> list[float | None]:          # None where NSI is undefined
        full = np.full(len(layers), np.nan)
        full[defined] = values
        return _none_if_nan(full)

    # NSI times the step that made x_t - x_(t-1) = h_(t-1) ⊙ f_(t-1): h_(t-1) (mean over channels)
    # of the block before, which is in the same stage wherever NSI is defined. That takes out NSI's
    # 1/h: it is ||f_t - f_(t-1)|| / ||f_(t-1)|| where h is the same over channels
    previous = np.flatnonzero(defined) - 1
    times_h = np.concatenate([r["nsi"][:, defined] * r["step_size"][:, previous, STEP_MEAN] for r in runs])
    times_h_means = np.stack([(r["nsi"][:, defined] * r["step_size"][:, previous, STEP_MEAN]).mean(0)
                              for r in runs])
    curves = runs[0]["nsi"][:SAMPLE_CURVES]                                 # (samples, L), NaN: undefined

    accuracy = [float(r["correct"].mean()) for r in runs]
    acc_mean, acc_std = _mean_std(accuracy)
    return {
        "accuracy": accuracy, "accuracy_mean": acc_mean, "accuracy_std": acc_std,
        "accuracy_ci95": accuracy_ci(accuracy),
        "accuracy_wilson95": [wilson_ci(int(r["correct"].sum()), len(r["correct"])) for r in runs],
        "nsi_samples": [_none_if_nan(curve) for curve in curves],
        "nsi_times_h_mean": per_layer(times_h_means.mean(0)), "nsi_times_h_min": per_layer(times_h.min(0)),
        "nsi_times_h_max": per_layer(times_h.max(0)),
        "params": runs[0]["params"], "flops": runs[0]["flops"],
        "nsi_mean": per_layer(nsi_means.mean(0)), "nsi_min": per_layer(nsi.min(0)),
        "nsi_max": per_layer(nsi.max(0)),
        "step_size_mean": step.mean(0).tolist(), "step_size_min": step.min(0).tolist(),
        "step_size_max": step.max(0).tolist(),
        "spearman_across_layers": _spearman(nsi_means.ravel(), step_means.ravel()),
        "spearman_within_layers": float(np.mean(within)) if within else None,
        "stage_stiffness_ratio": [{"stage": stage, **dict(zip(("mean", "std"), _mean_std(col.tolist())))}
                                  for stage, col in zip(dict.fromkeys(stages), ratios.T)],
    }


def top_k_blocks(reference_nsi: list[float | None], layers: list[dict], k: int) -> tuple[str, ...]:
    """The k blocks of highest reference NSI, in network order."""
    ranked = sorted((v, i) for i, v in enumerate(reference_nsi) if v is not None)[::-1]
    return tuple(layers[i]["name"] for i in sorted(i for _, i in ranked[:k]))


# ---------------------------------------------------------------- the analysis

def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


@contextmanager
def _training_pool(jobs: int):
    """`jobs` worker processes with an equal share of the cores each, or None for jobs < 2. Small
    CPU models train faster side by side on one core each than one at a time on all cores (above
    all on a shared machine, where idle OpenMP threads spin); this process takes the same share."""
    if jobs < 2:
        yield None
        return
    threads, before = max(1, len(os.sched_getaffinity(0)) // jobs), torch.get_num_threads()
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(threads,))
    torch.set_num_threads(threads)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(before)


class _Runner:
    """Trains each run that was not given (in the pool, or here without one), then loads and
    measures it on the test split."""

    def __init__(self, recipe: Recipe, cfg: AnalysisConfig, given: dict[RunKey, Path], total: int,
                 log: Callable[[str], None]):
        self.recipe, self.cfg, self.given, self.total, self.log = recipe, cfg, given, total, log
        self.biases = () if cfg.adaptor_bias is None else (cfg.adaptor_bias,)   # the variant runs
        self.test_set, self.info = data.load(recipe.dataset, "test", cfg.data_dir)
        self.folder = cfg.checkpoint_dir or cfg.out / "checkpoints"
        self.pool: ProcessPoolExecutor | None = None
        self.futures: dict[RunKey, Future] = {}
        self.costs: dict[tuple, dict] = {}
        self.started = time.perf_counter()
        self.training_seconds = 0.0   # wall time from the start until the last training ended
        self.done = 0

    def checkpoint(self, key: RunKey) -> Path:
        return self.given.get(key) or self.folder / key.name

    def submit(self, key: RunKey) -> None:
        """Start training `key` unless it was given (without a pool: train it now)."""
        if key in self.given:
            self._finished(key, None)
            return
        r = self.recipe
        job = TrainConfig(out=self.folder / key.name, dataset=r.dataset, data_dir=self.cfg.data_dir,
                          family=key.family, depth=r.depth, epochs=r.epochs, batch_size=r.batch_size,
                          lr=r.lr, seed=key.seed, adaptor_blocks=key.blocks, adaptor_bias=key.bias,
                          train_images=r.train_images,
                          workers=0, test_every=0,       # measure() tests it, with everything else
                          force=True, progress=False)   # the pool's processes share the cores
        if self.pool is None:
            self._finished(key, train(job))
            return
        self.futures[key] = self.pool.submit(train, job)
        self.futures[key].add_done_callback(lambda future: self._trained(key, future))

    def _trained(self, key: RunKey, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:   # errors surface in measure()
            self._finished(key, future.result())

    def _finished(self, key: RunKey, config: dict | None) -> None:
        self.done += 1
        if config is None:
            what = f"loaded ({self.given[key]})"
        else:
            self.training_seconds = time.perf_counter() - self.started
            what = f"trained in {config['train_seconds']:.0f} s ({self.folder / key.name})"
        self.log(f"[{self.done}/{self.total}] {key.name}: {what}")

    def model(self, key: RunKey) -> tuple[StepNet, dict]:
        """The run's trained model and its checkpoint config. Waits for its training; raises its error."""
        if key in self.futures:
            self.futures[key].result()
        model, _, config = checkpoint.load(self.checkpoint(key), expect_classes=len(self.info.classes))
        return model, config

    def measure(self, key: RunKey, reference_set=None) -> dict:
        """diagnose()'s arrays on the test split, the model's cost, and with a reference_set the
        model's mean NSI per layer on it. Waits for the run's training; raises its error."""
        model, config = self.model(key)
        arch = (key.family, key.blocks)
        if arch not in self.costs:
            self.costs[arch] = model_cost(model, self.info)
        run = {**diagnose(model, self.test_set), **self.costs[arch], "key": key,
               "checkpoint": str(self.checkpoint(key)), "train_seconds": config.get("train_seconds")}
        if reference_set is not None:
            run["reference_nsi"] = _layer_means(diagnose(model, reference_set)["nsi"])
        return run


def cifar_estimate(results: dict) -> dict:
    """What the same analysis would cost on CIFAR-10/100 (50,000 training and 10,000 test images),
    scaled from this run by the images one epoch processes, a test image (forward pass only)
    counted as a third of a training image. An estimate: it assumes the same depth and recipe."""
    scale = (CIFAR_TRAIN + CIFAR_TEST / 3) / (results["train_images"] + results["test_images"] / 3)
    model_epochs = len(results["runs"]) * results["epochs"]
    return {"scale": scale,
            "model_epoch_cpu_seconds": results["cpu_seconds"] / model_epochs * scale,
            "idle_seconds": results["cpu_seconds"] / results["cores"] * scale,
            "wall_seconds": results["seconds"] * scale}


def _plan(cfg: AnalysisConfig) -> tuple[Recipe, dict[RunKey, Path], list[dict], list[int]]:
    """The recipe, the given runs, the layers and the sparse k values, checked before anything
    trains."""
    _check_out(cfg)
    recipe, given = _given_runs(cfg) if cfg.checkpoints else (_recipe(cfg), {})
    _, info = data.load(recipe.dataset, "test", cfg.data_dir)
    layers = build("resnet", recipe.depth, len(info.classes), info.input_size, info.in_channels).layers()
    candidates = sum(row["nsi_defined"] for row in layers)
    sparse_k = sorted(set(cfg.sparse_k))
    if any(not 1 <= k <= candidates for k in sparse_k):
        raise UserError(f"--sparse-k values must be between 1 and {candidates}, the number of blocks "
                        f"of depth {recipe.depth} with a defined NSI")
    if cfg.jobs is not None and cfg.jobs < 1:
        raise UserError("--jobs must be at least 1")
    if cfg.adaptor_bias is not None and not abs(cfg.adaptor_bias) < 30:
        raise UserError("--adaptor-init-bias must be between -30 and 30 (3 starts h near 0.95)")
    return recipe, given, layers, sparse_k


def _reference_set(cfg: AnalysisConfig, recipe: Recipe) -> tuple[int, Subset]:
    """(the size of the training split, the training images the reference NSI is measured on)."""
    train_set, _ = data.load(recipe.dataset, "train", cfg.data_dir)
    if recipe.train_images is not None and not 1 <= recipe.train_images <= len(train_set):
        raise UserError(f"--train-images must be between 1 and {len(train_set)}")
    return len(train_set), fixed_subset(train_set, min(REFERENCE_IMAGES, recipe.train_images or len(train_set)))


def _train_and_measure(runner: _Runner, jobs: int, layers: list[dict], sparse_k: list[int],
                       reference_set) -> tuple[dict[str, list[dict]], dict[int, list[dict]], list[float | None]]:
    """Trains and measures every run, resnet first: the sparse runs' blocks come from its
    reference NSI, measured while the other families still train. Returns the runs per family,
    the sparse runs per k, and the reference NSI."""
    seeds = runner.recipe.seeds
    with _training_pool(jobs) as runner.pool:
        for family in FAMILIES:
            for seed in seeds:
                runner.submit(RunKey(family, seed))
        resnet = [runner.measure(RunKey("resnet", seed), reference_set) for seed in seeds]
        reference_nsi = _none_if_nan(np.mean([run["reference_nsi"] for run in resnet], 0))
        sparse_keys = {k: [RunKey("stepnet", seed, top_k_blocks(reference_nsi, layers, k)) for seed in seeds]
                       for k in sparse_k}
        for key in (key for keys in sparse_keys.values() for key in keys):
            runner.submit(key)
        variants = [RunKey(family, seed, bias=bias) for bias in runner.biases for family in FAMILIES[1:]
                    for seed in seeds]
        for key in variants:
            runner.submit(key)
        runs = {"resnet": resnet, **{family: [runner.measure(RunKey(family, seed)) for seed in seeds]
                                     for family in FAMILIES[1:]}}
        for key in variants:
            runs.setdefault(key.label, []).append(runner.measure(key))
        sparse_runs = {k: [runner.measure(key) for key in keys] for k, keys in sparse_keys.items()}
    return runs, sparse_runs, reference_nsi


def _sparse_rows(runs: dict[str, list[dict]], sparse_runs: dict[int, list[dict]], layers: list[dict],
                 families: dict[str, dict]) -> list[dict]:
    """Item 5: no adaptor (resnet), adaptors at the top-k blocks, adaptors at all (stepnet)."""
    rows = [("none (resnet)", [], runs["resnet"]),
            *((f"top-{k}", list(rs[0]["key"].blocks), rs) for k, rs in sparse_runs.items()),
            ("all (stepnet)", [row["name"] for row in layers], runs["stepnet"])]
    sparse = []
    for label, blocks, rs in rows:
        accuracy = [float(r["correct"].mean()) for r in rs]
        mean, std = _mean_std(accuracy)
        sparse.append({"label": label, "k": len(blocks), "blocks": blocks, "accuracy": accuracy,
                       "accuracy_mean": mean, "accuracy_std": std, "params": rs[0]["params"],
                       "flops": rs[0]["flops"],
                       "vs_none": compare(accuracy, families["resnet"]["accuracy"])})
    return sparse


def _summarize(layers: list[dict], runs: dict[str, list[dict]], sparse_runs: dict[int, list[dict]],
               reference_nsi: list[float | None]) -> dict:
    """Items 1-5 of the module docstring from the measured runs."""
    families = {family: summarize_family(rs, layers) for family, rs in runs.items()}
    return {"layers": layers, "families": families, "reference_nsi": reference_nsi,
            "sparse": _sparse_rows(runs, sparse_runs, layers, families),
            "comparisons": [{"a": a, "b": b, **compare(families[a]["accuracy"], families[b]["accuracy"]),
                             "paired": paired(families[a]["accuracy"], families[b]["accuracy"])}
                            for a, b in _comparisons(families)]}


def _comparisons(families: dict) -> list[tuple[str, str]]:
    """The three families against each other; each variant (se+biasB, stepnet+biasB) against its
    family, and the two variants against each other and against resnet."""
    pairs = [("stepnet", "resnet"), ("stepnet", "se"), ("se", "resnet")]
    for label in (f for f in families if f.startswith("stepnet+bias")):
        se = "se" + label[len("stepnet"):]
        pairs += [(label, "stepnet"), (se, "se"), (label, se), (label, "resnet"), (se, "resnet")]
    return [(a, b) for a, b in pairs if a in families and b in families]


def _run_rows(runs: list[dict], given: dict[RunKey, Path]) -> list[dict]:
    return [{"name": r["key"].name, "family": r["key"].family, "seed": r["key"].seed,
             "adaptor_blocks": r["key"].blocks, "adaptor_bias": r["key"].bias, "accuracy": float(r["correct"].mean()),
             "train_seconds": r["train_seconds"], "checkpoint": r["checkpoint"],
             "trained_here": r["key"] not in given} for r in runs]


def analyze(cfg: AnalysisConfig, log: Callable[[str], None] = lambda message: None) -> dict:
    """Run the whole analysis; writes OUT/results.json, OUT/report.md and the figures; returns the results."""
    from analysis import report     # matplotlib: not in the training workers, which import this module

    started, cpu_started, load_started = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
    recipe, given, layers, sparse_k = _plan(cfg)
    train_size, reference_set = _reference_set(cfg, recipe)
    total = len(recipe.seeds) * (len(FAMILIES) + len(sparse_k) + (2 if cfg.adaptor_bias is not None else 0))
    jobs = min(cfg.jobs or len(os.sched_getaffinity(0)), max(1, total - len(given)))
    runner = _Runner(recipe, cfg, given, total, log)
    runs, sparse_runs, reference_nsi = _train_and_measure(runner, jobs, layers, sparse_k, reference_set)
    all_runs = [r for rs in [*runs.values(), *sparse_runs.values()] for r in rs]
    for key in given.keys() - {run["key"] for run in all_runs}:
        log(f"not used: {given[key]} ({key.name}, adaptor blocks {key.blocks})")

    train_images = recipe.train_images or train_size
    results = {
        "dataset": recipe.dataset, "depth": recipe.depth, "seeds": list(recipe.seeds),
        "epochs": recipe.epochs, "batch_size": recipe.batch_size, "lr": recipe.lr,
        "adaptor_bias": cfg.adaptor_bias,
        "split": data.split_description(recipe.dataset, cfg.data_dir),
        "train_images": train_images, "train_subset": train_images < train_size,
        "test_images": len(runner.test_set), "classes": len(runner.info.classes),
        "reference_images": len(reference_set),
        **_summarize(layers, runs, sparse_runs, reference_nsi),
        "runs": _run_rows(all_runs, given),
        "jobs": jobs, "cores": len(os.sched_getaffinity(0)),
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    report.figures(cfg.out, results, {f: [{k: r[k] for k in ("nsi", "step_size")} for r in rs]
                                      for f, rs in runs.items()})
    results["training_seconds"] = round(runner.training_seconds, 1)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["cpu_seconds"] = round(_cpu_seconds() - cpu_started, 1)
    results["load_average"] = [load_started, os.getloadavg()[0]]   # 1-minute, at start and end
    if not recipe.dataset.startswith("cifar") and not given:
        results["cifar_estimate"] = cifar_estimate(results)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report.write(cfg.out, results)
    return results
