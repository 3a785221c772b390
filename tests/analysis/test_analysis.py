"""`stepnet analyze` on a tiny run (1 seed, 1 epoch, 32 training images, a 60-image test split):
the report, its figures and its numbers, the reuse of checkpoints, training in worker processes,
and one-line errors for bad input."""

import copy
import json
import os
import re

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

from analysis import report as analysis_report, study
from analysis.report import FIGURES, percent
from models import checkpoint, data
from models.net import build
from models.train import TrainConfig, evaluate, train
from stepnet import statistics
from stepnet.cli import main
from stepnet.errors import UserError
from stepnet.repository import STEP_MEAN

pytestmark = pytest.mark.timeout(120)
TINY = ["--seeds", "1", "--epochs", "1", "--train-images", "32", "--batch-size", "32", "--sparse-k", "1",
        "--jobs", "1"]
SMALL_TRAIN, SMALL_TEST = 96, 60


@pytest.fixture(scope="module", autouse=True)
def small_digits():
    """The first 96 training and 60 test images of the digits split, so that each run of this
    module takes seconds (worker processes of --jobs 2 would read the whole set)."""
    full = data.digits_split

    def small(split):
        images, labels = full(split)
        n = SMALL_TRAIN if split == "train" else SMALL_TEST
        return images[:n], labels[:n]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "digits_split", small)
        yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches this small gain nothing from a second thread, and on a shared 2-core machine the
    spinning OpenMP threads of two make these runs several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "report"
    assert main(["analyze", *TINY, "--quiet", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_report_and_readable_figures_are_written(tiny):
    out, _ = tiny
    report = (out / "report.md").read_text()
    for section in ("## 1. Accuracy", "## 2. NSI profiles", "## 3. Step size against NSI",
                    "## 4. Stage stiffness ratios", "## 5. Sparse adaptors"):
        assert section in report
    for name in FIGURES.values():
        assert f"]({name})" in report
        assert (out / name).stat().st_size > 10_000
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300


def _table_row(report: str, first_cell: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_numbers_are_the_computed_ones(tiny):
    out, results = tiny
    report = (out / "report.md").read_text()
    for family, summary in results["families"].items():
        row = _table_row(report, family)
        assert row[1] == percent(summary["accuracy_mean"])        # one seed: no std
        assert row[2] == "-"                                       # and no interval over seeds
        (low, high), = summary["accuracy_wilson95"]
        assert row[3] == f"{percent(summary['accuracy'][0])} [{100 * low:.2f}, {100 * high:.2f}]"
        assert row[4] == f"{summary['params']:,}" and row[5] == f"{summary['flops']:,}"
    for sparse in results["sparse"]:
        assert _table_row(report, sparse["label"])[2] == percent(sparse["accuracy_mean"])
    test_set, _ = data.load("digits", "test")
    for run in results["runs"]:     # the analysis' accuracy is training's evaluate(), which it skipped
        model, _, config = checkpoint.load(run["checkpoint"])
        assert config["test_accuracy"] is None
        assert run["accuracy"] == pytest.approx(evaluate(model, test_set)["accuracy"])
    assert results["train_images"] == 32 and results["test_images"] == SMALL_TEST
    assert results["split"] == "scikit-learn's bundled digits, stratified 80/20 split, seed 0"
    assert f"{SMALL_TEST} test images ({results['split']})" in report
    assert results["jobs"] == 1 and results["cpu_seconds"] > 0
    assert f"{results['seconds'] / 60:.1f} minutes" in report


def test_diagnostics_match_a_direct_computation(tiny):
    _, results = tiny
    run = next(r for r in results["runs"] if r["name"] == "stepnet-seed0")
    model, _, _ = checkpoint.load(run["checkpoint"])
    test_set, _ = data.load("digits", "test")
    images = torch.stack([test_set[i][0] for i in range(len(test_set))])
    with torch.no_grad():
        _, step_size, nsi = model(images, diagnostics=True)
    nsi = nsi.numpy()
    summary = results["families"]["stepnet"]
    defined = [row["nsi_defined"] for row in results["layers"]]
    for i, ok in enumerate(defined):
        if ok:
            assert summary["nsi_mean"][i] == pytest.approx(nsi[:, i].mean(), rel=1e-4)
            assert summary["nsi_max"][i] == pytest.approx(nsi[:, i].max(), rel=1e-4)
        else:
            assert summary["nsi_mean"][i] is None
    assert summary["step_size_mean"] == pytest.approx(step_size[:, :, STEP_MEAN].mean(0).tolist(), rel=1e-4)
    # the paper-style figure's data: the first test images' own profiles, and NSI times h_(t-1)
    assert len(summary["nsi_samples"]) == min(study.SAMPLE_CURVES, len(test_set))
    for curve, direct in zip(summary["nsi_samples"], nsi):
        assert [c is None for c in curve] == [not ok for ok in defined]
        assert [c for c in curve if c is not None] == pytest.approx(direct[np.array(defined)].tolist(), rel=1e-4)
    h = step_size[:, :, STEP_MEAN].numpy()
    for i, ok in enumerate(defined):
        if ok:
            times_h = nsi[:, i] * h[:, i - 1]      # takes out the 1/h of x_t - x_(t-1) = h ⊙ f_(t-1)
            assert summary["nsi_times_h_mean"][i] == pytest.approx(times_h.mean(), rel=1e-4)
            assert summary["nsi_times_h_min"][i] == pytest.approx(times_h.min(), rel=1e-4)
            assert results["layers"][i - 1]["stage"] == results["layers"][i]["stage"]
        else:
            assert summary["nsi_times_h_mean"][i] is None
    for stage, ratio in enumerate(summary["stage_stiffness_ratio"], start=1):
        cols = [i for i, row in enumerate(results["layers"]) if row["stage"] == stage and defined[i]]
        per_sample = nsi[:, cols].max(1) / nsi[:, cols].min(1)
        assert ratio["mean"] == pytest.approx(float(np.median(per_sample)), rel=1e-4)


def test_sparse_adaptors_sit_at_the_stiffest_reference_blocks(tiny):
    _, results = tiny
    reference = results["reference_nsi"]
    ranked = sorted((v, row["name"]) for v, row in zip(reference, results["layers"]) if v is not None)
    sparse = {row["label"]: row for row in results["sparse"]}
    assert sparse["top-1"]["blocks"] == [ranked[-1][1]]
    assert sparse["none (resnet)"]["params"] == results["families"]["resnet"]["params"]
    assert sparse["all (stepnet)"]["params"] == results["families"]["stepnet"]["params"]
    params = [row["params"] for row in results["sparse"]]
    assert params == sorted(params) and len(set(params)) == len(params)
    run = next(r for r in results["runs"] if r["name"] == "stepnet-top1-seed0")
    config = checkpoint.read_config(run["checkpoint"])
    assert config["model"]["adaptor_blocks"] == sparse["top-1"]["blocks"]


def test_stage_stiffness_ratio_is_max_over_min_of_the_defined_blocks():
    nan = float("nan")
    nsi = np.array([[nan, 2.0, 8.0, nan, 3.0, nan], [nan, 5.0, 1.0, nan, 2.0, nan]])
    stages = [1, 1, 1, 2, 2, 3]
    ratio = statistics.stage_stiffness_ratio(nsi, stages)
    expected = [[max(d) / min(d) for d in ([v for v, s in zip(row, stages) if s == stage and not np.isnan(v)]
                                           for stage in (1, 2))] for row in nsi]
    assert ratio[:, :2].tolist() == expected == [[4.0, 1.0], [5.0, 1.0]]
    assert np.isnan(ratio[:, 2]).all()                      # stage 3 has no block with an NSI
    medians = statistics.median_stage_stiffness_ratio(nsi, stages)
    assert medians == [float(np.median([row[0] for row in expected])), 1.0, None]


def test_a_stepnet_without_adaptors_is_resnet():
    torch.manual_seed(0)
    resnet = build("resnet", 20, 10, in_channels=1).state_dict()
    torch.manual_seed(0)
    bare = build("stepnet", 20, 10, in_channels=1, adaptor_blocks=()).state_dict()
    assert resnet.keys() == bare.keys() and all(torch.equal(resnet[k], bare[k]) for k in resnet)


def test_given_checkpoints_are_analyzed_without_training(tiny, tmp_path, capsys):
    out, results = tiny
    folders = sorted(str(p) for p in (out / "checkpoints").iterdir())
    assert main(["analyze", "--sparse-k", "1", "--checkpoints", *folders, "--out", str(tmp_path)]) == 0
    log = capsys.readouterr().err
    assert log.count(": loaded (") == 4 and "trained" not in log
    again = json.loads((tmp_path / "results.json").read_text())
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in results["runs"]]
    assert "(given checkpoints)" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--depth", "21"], "unknown depth 21"),
    (["--seeds", "0"], "--seeds and --epochs must be at least 1"),
    (["--sparse-k", "1,x"], "--sparse-k takes block counts"),
    (["--sparse-k", "7"], "--sparse-k values must be between 1 and 6"),
    (["--train-images", "0"], f"--train-images must be between 1 and {SMALL_TRAIN}"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--dataset", "cifar10"], "cifar10 needs --data-dir"),
    (["--checkpoints", "no-such-folder"], "not a checkpoint folder"),
    (["--adaptor-init-bias", "nan"], "--adaptor-init-bias must be between -30 and 30"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert main(["analyze", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_checkpoints_must_cover_the_three_families(tiny, tmp_path, capsys):
    out, _ = tiny
    only_stepnet = str(out / "checkpoints" / "stepnet-seed0")
    assert main(["analyze", "--checkpoints", only_stepnet, "--out", str(tmp_path)]) == 2
    assert "must hold resnet, se and stepnet for the same seeds" in capsys.readouterr().err
    assert main(["analyze", "--checkpoints", only_stepnet, "--seeds", "2", "--out", str(tmp_path)]) == 2
    assert "come from the checkpoints" in capsys.readouterr().err


def test_refuses_a_folder_that_is_not_empty(tiny, capsys):
    out, _ = tiny
    before = (out / "report.md").read_text()
    assert main(["analyze", *TINY, "--out", str(out)]) == 2
    assert "not empty (use --force" in capsys.readouterr().err
    assert (out / "report.md").read_text() == before
    assert re.search(r"stepnet analyze --dataset digits .*--train-images 32", before)


def test_report_estimates_the_cost_on_cifar(tiny):
    out, results = tiny
    estimate = results["cifar_estimate"]
    assert estimate["scale"] == pytest.approx((50_000 + 10_000 / 3) / (32 + SMALL_TEST / 3))
    assert estimate["wall_seconds"] == pytest.approx(results["seconds"] * estimate["scale"])
    assert estimate["idle_seconds"] == pytest.approx(results["cpu_seconds"] / results["cores"]
                                                     * estimate["scale"])
    assert "costs on CIFAR-10/100 (estimate)" in (out / "report.md").read_text()


def test_accuracy_differences_come_with_welch_t_test():
    a, b = [0.98, 0.975, 0.99], [0.97, 0.965, 0.975]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3
    t = (np.mean(a) - np.mean(b)) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    result = study.compare(a, b)
    assert result["difference"] == pytest.approx(100 * (np.mean(a) - np.mean(b)))
    assert result["p_value"] == pytest.approx(2 * scipy.stats.t.sf(abs(t), df))
    assert study.compare([0.9], [0.8])["p_value"] is None


def test_the_bias_variants_start_with_steps_near_one_and_are_compared(tmp_path):
    out = tmp_path / "report"
    args = ["--seeds", "1", "--epochs", "1", "--train-images", "32", "--batch-size", "32", "--sparse-k", "none",
            "--jobs", "1", "--adaptor-init-bias", "3"]
    assert main(["analyze", *args, "--quiet", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    fam = results["families"]
    assert list(fam) == ["resnet", "se", "stepnet", "se+bias3", "stepnet+bias3"]
    for family in ("se", "stepnet"):         # one epoch of one batch moves h little from its start
        assert np.mean(fam[f"{family}+bias3"]["step_size_mean"]) > 0.85 > 0.7 > np.mean(fam[family]["step_size_mean"])
    pairs = {(c["a"], c["b"]) for c in results["comparisons"]}
    assert {("stepnet+bias3", "stepnet"), ("se+bias3", "se"), ("stepnet+bias3", "se+bias3")} <= pairs
    for run in results["runs"]:
        assert run["adaptor_bias"] == (3.0 if "+bias3" in run["name"] else None)
        assert checkpoint.read_config(run["checkpoint"])["model"].get("adaptor_bias") == run["adaptor_bias"]
    report = (out / "report.md").read_text()
    assert "--adaptor-init-bias 3" in report and "sigmoid(3) = 0.95" in report
    assert _table_row(report, "stepnet+bias3")[1] == percent(fam["stepnet+bias3"]["accuracy_mean"])


def test_accuracy_intervals_match_a_direct_computation():
    accuracy = [0.90, 0.92, 0.95]
    mean, sd = np.mean(accuracy), np.std(accuracy, ddof=1)
    t_975_2 = 4.302652729911275                     # Student's t, 2 degrees of freedom, 97.5 %
    assert study.accuracy_ci(accuracy) == pytest.approx([mean - t_975_2 * sd / 3 ** 0.5,
                                                         mean + t_975_2 * sd / 3 ** 0.5])
    assert study.accuracy_ci([0.9]) is None
    z, n, p = 1.959963984540054, 360, 350 / 360     # Wilson's interval, written out
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    assert study.wilson_ci(350, 360) == pytest.approx([centre - half, centre + half], rel=1e-9)


def test_paired_differences_come_with_their_interval_and_paired_t_test():
    a, b = [0.91, 0.93, 0.92, 0.95], [0.90, 0.91, 0.91, 0.92]
    diff = 100 * (np.array(a) - np.array(b))                 # 1, 2, 1, 3 points
    half = 3.182446305284263 * diff.std(ddof=1) / 2           # t, 3 degrees of freedom, 97.5 %
    t_statistic = diff.mean() / (diff.std(ddof=1) / 2)
    result = study.paired(a, b)
    assert result["difference"] == pytest.approx(1.75)
    assert result["ci95"] == pytest.approx([1.75 - half, 1.75 + half])
    assert result["p_value"] == pytest.approx(2 * scipy.stats.t.sf(t_statistic, 3))
    assert study.paired([0.9], [0.8])["p_value"] is None
    assert study.paired([0.5, 0.75], [0.25, 0.5])["ci95"] is None       # the same gain each seed: no spread


def test_the_summary_says_when_stepnet_does_not_beat_a_baseline(tiny):
    _, results = tiny
    results = copy.deepcopy(results)
    for family, accuracy in (("resnet", 0.6), ("se", 0.4), ("stepnet", 0.5)):
        results["families"][family]["accuracy_mean"] = accuracy
    lines = analysis_report.summary(results)
    assert "- **On this data set stepnet does not beat resnet** with this recipe." in lines
    assert lines[0].startswith("- Mean test accuracy over 1 seed(s): resnet 60.00%, stepnet 50.00%, se 40.00%")


def test_the_training_pool_trains_in_worker_processes(tmp_path):
    """--jobs 2: runs train in spawned processes with one share of the cores each, and a run's
    error reaches the analysis."""
    job = TrainConfig(out=tmp_path / "resnet", family="resnet", epochs=1, train_images=16, batch_size=16,
                      progress=False)
    cores = len(os.sched_getaffinity(0))
    with study._training_pool(2) as pool:
        config = pool.submit(train, job).result()
        assert pool.submit(torch.get_num_threads).result() == max(1, cores // 2)
        with pytest.raises(UserError, match="number of training images"):
            pool.submit(train, TrainConfig(out=tmp_path / "x", train_images=10**6, progress=False)).result()
    assert checkpoint.read_config(tmp_path / "resnet") == config and config["train_images"] == 16
