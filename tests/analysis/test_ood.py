"""`stepnet analyze --study ood`: the metrics on constructed scores, the image sets, and a tiny run
(1 epoch, 32 training images, a 60-image test split, 40 images per set) with its report and figures.
Nothing here downloads: without Fashion-MNIST in data/, the tiny run's other data set is a synthetic
stand-in, and its results say so."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import ood, ood_report, ood_sets, study
from analysis.defaults import DEFAULT_SPARSE_K
from models import checkpoint, data, fashion_mnist
from stepnet import stiffness_score
from stepnet.cli import main
from stepnet.errors import UserError

pytestmark = pytest.mark.timeout(120)
TINY = ["--study", "ood", "--epochs", "1", "--train-images", "32", "--batch-size", "32", "--jobs", "1"]
SMALL_TRAIN, SMALL_TEST, SET_IMAGES = 96, 60, 40
FASHION_PRESENT = (fashion_mnist.DEFAULT_FOLDER / fashion_mnist.FILE).exists()


# ---------------------------------------------------------------- metrics

def test_perfect_separation_gives_auroc_1_and_no_false_positives():
    rng = np.random.default_rng(0)
    low, high = rng.uniform(0, 1, 200), rng.uniform(2, 3, 150)
    assert ood.auroc(low, high) == 1.0 and ood.fpr_at_tpr(low, high) == 0.0
    assert ood.auroc(high, low) == 0.0 and ood.fpr_at_tpr(high, low) == 1.0
    result = ood.compare({s: low for s in ood.SCORES}, {s: high for s in ood.SCORES}, resamples=200)
    for score in ood.SCORES:
        assert result[score]["auroc_ci95"] == [1.0, 1.0] and result[score]["fpr95_ci95"] == [0.0, 0.0]
    assert result["stiffness_minus"]["msp"] == {"difference": 0.0, "ci95": [0.0, 0.0]}


def test_identical_distributions_give_about_one_half():
    rng = np.random.default_rng(1)
    x = rng.normal(size=400)
    assert ood.auroc(x, x) == 0.5                      # the same values: every pair a tie
    result = ood.compare({s: rng.normal(size=2000) for s in ood.SCORES},
                         {s: rng.normal(size=2000) for s in ood.SCORES}, resamples=200)
    for score in ood.SCORES:
        assert result[score]["auroc"] == pytest.approx(0.5, abs=0.03)
        low, high = result[score]["auroc_ci95"]
        assert low < 0.5 < high and high - low < 0.08
        assert result[score]["fpr95"] == pytest.approx(0.95, abs=0.03)


def test_fpr_at_95_tpr_by_hand():
    id_scores = np.arange(100.0)                       # 0 .. 99
    ood_scores = np.r_[np.full(19, 200.0), 50.0]       # 95 % of them at 200, one at 50
    assert ood.fpr_at_tpr(id_scores, ood_scores) == 0.0          # 200 catches 19 of 20: 95 %
    # 19 of 20 need the threshold down at 80, which flags the 20 ID scores 80 .. 99
    assert ood.fpr_at_tpr(id_scores, np.r_[np.full(18, 200.0), 50.0, 80.0]) == pytest.approx(0.2)


def test_the_bootstraps_counting_matches_sklearn_on_each_resample():
    rng = np.random.default_rng(2)
    for n, m in ((7, 5), (60, 40), (361, 500)):
        x, y = rng.integers(0, 6, n).astype(float), rng.integers(2, 8, m).astype(float)   # many ties
        i, j = rng.integers(0, n, (25, n)), rng.integers(0, m, (25, m))
        auroc, fpr = ood.resampled(x, y, i, j)
        assert auroc == pytest.approx([ood.auroc(x[a], y[b]) for a, b in zip(i, j)], abs=1e-12)
        assert fpr == pytest.approx([ood.fpr_at_tpr(x[a], y[b]) for a, b in zip(i, j)], abs=1e-12)


def test_scores_and_flags():
    logits = np.array([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    d = {"logits": logits, "step_size": np.ones((2, 2, 3)), "nsi": np.array([[np.nan, 2.0], [np.nan, 3.0]])}
    calibration = stiffness_score.Calibration(np.r_[np.ones(6), np.log(2.0)], np.ones(7), np.eye(7), 0.5)
    s = ood.scores(d, calibration, [False, True])
    assert s["msp"] == pytest.approx([1 - np.exp(10) / (np.exp(10) + 2), 2 / 3])
    assert s["energy"] == pytest.approx([-np.log(np.exp(10) + 2), -np.log(3 * np.e)])
    assert s["stiffness"] == pytest.approx([0.0, np.log(1.5) ** 2 / 7])
    flags = ood.flagged(np.array([0.1, 0.6, np.nan, 2.0]), 0.5)     # NaN is not flagged, as in the service
    assert flags["flagged"] == 2 and flags["flag_rate"] == 0.5 and flags["images"] == 4
    id_scores, ood_scores = ood._rankable(np.array([1.0, np.nan]), np.array([2.0, np.inf]))
    assert id_scores.tolist() == [1.0, 3.0] and ood_scores.tolist() == [2.0, 3.0]


# ---------------------------------------------------------------- the sets

def test_synthetic_sets_have_the_in_distribution_size_and_range():
    sets = {s.name: s for s in ood_sets.synthetic(30, 8)}
    assert list(sets) == ["noise", "blank", "shapes"]
    for s in sets.values():
        assert s.images.shape == (30, 8, 8) and s.images.dtype == np.uint8 and s.group == "synthetic"
    noise = sets["noise"].images
    assert noise.min() < 20 and noise.max() > 235 and 100 < noise.mean() < 155
    blank = sets["blank"].images
    assert (blank == blank[:, :1, :1]).all() and len(np.unique(blank[:, 0, 0])) > 10
    shapes = ood_sets.shapes(20, 28, np.random.default_rng(0))
    assert shapes.shape == (20, 28, 28) and (shapes[:, 0, 0] == 0).mean() > 0.5
    assert all(0 < (x > 0).mean() < 0.95 and x.max() >= 96 for x in shapes)     # some ink, not all


def test_corruptions_keep_shape_and_range_and_grow_with_strength():
    images, _ = data.digits_split("test")
    images = images[:50]
    sets = ood_sets.corrupted(images)
    assert [s.name for s in sets] == [f"{kind}-{k}" for kind in ("blur", "contrast", "rotation") for k in (1, 2, 3)]
    for s in sets:
        assert s.images.shape == images.shape and s.images.dtype == np.uint8 and s.group == "corrupted"
    by_name = {s.name: s.images.astype(float) for s in sets}
    sharpness = [np.abs(np.diff(by_name[f"blur-{k}"], axis=2)).mean() for k in (1, 2, 3)]
    assert np.abs(np.diff(images.astype(float), axis=2)).mean() > sharpness[0] > sharpness[1] > sharpness[2]
    spread = [by_name[f"contrast-{k}"].std((1, 2)).mean() / images.std((1, 2)).mean() for k in (1, 2, 3)]
    assert spread == pytest.approx(list(ood_sets.CONTRASTS), abs=0.02)
    assert ood_sets.ROTATIONS[-1] == 90
    assert (by_name["rotation-3"] == np.rot90(images, 1, axes=(1, 2))).all()


def test_the_other_data_set_of_a_fashion_model_is_the_digits():
    other = ood_sets.other_dataset("fashion-mnist", None, 30)
    assert other.name == "digits" and other.images.shape == (30, 8, 8) and not other.stand_in


def test_missing_fashion_mnist_is_one_line_naming_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_FOLDER", tmp_path / "nothing")
    assert main(["analyze", *TINY, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "stepnet data fashion-mnist" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--sparse-k", "1"], "--sparse-k and --adaptor-init-bias are for --study stiffness"),
    (["--dataset", "cifar10", "--data-dir", "."], "--study ood is for digits and fashion-mnist"),
    (["--train-images", "1437"], "leaves 0 of the 1437 training images"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert main(["analyze", "--study", "ood", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ---------------------------------------------------------------- a tiny run

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The study on the first 96 training and 60 test digits, 40 images per set, in one thread."""
    full = data.digits_split

    def small(split):
        images, labels = full(split)
        n = SMALL_TRAIN if split == "train" else SMALL_TEST
        return images[:n], labels[:n]

    def stand_in(dataset, data_dir, n):
        images = ood_sets.shapes(n, 28, np.random.default_rng(5))
        return ood_sets.ImageSet("fashion-mnist", "fashion-mnist", "other data set",
                                 f"{n} synthetic shapes standing in for Fashion-MNIST, absent from data/",
                                 images, stand_in=True)

    out = tmp_path_factory.mktemp("ood") / "report"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "digits_split", small)
        patch.setattr(ood, "SET_IMAGES", SET_IMAGES)
        if not FASHION_PRESENT:
            patch.setattr(ood_sets, "other_dataset", stand_in)
        torch.set_num_threads(1)
        try:
            assert main(["analyze", *TINY, "--quiet", "--out", str(out)]) == 0
        finally:
            torch.set_num_threads(threads)
    return out, json.loads((out / "results.json").read_text())


def test_tiny_run_writes_results_report_and_figures(tiny):
    out, results = tiny
    report = (out / "report.md").read_text()
    assert report == ood_report.markdown(results)
    for name in ood_report.FIGURES.values():
        assert f"]({name})" in report
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300
    assert results["study"] == "ood" and "--study ood" in results["command"]
    assert [run["family"] for run in results["runs"]] == ["resnet", "se", "stepnet"]
    assert results["train_images"] == 32 and results["calibration_images"] == SMALL_TRAIN - 32
    assert results["test_images"] == SMALL_TEST and results["seconds"] > 0
    other = results["sets"][0]
    assert other["name"] == "fashion-mnist" and other["stand_in"] is not FASHION_PRESENT
    assert ("synthetic stand-in" in report) is not FASHION_PRESENT
    assert [s["images"] for s in results["sets"]] == [SET_IMAGES] * 4 + [SET_IMAGES] * 9
    for run in results["runs"]:
        assert checkpoint.read_config(run["checkpoint"])["train_images"] == 32
        assert run["calibration"]["images"] == SMALL_TRAIN - 32
        for s in results["sets"]:
            m = run["sets"][s["name"]]
            for score in ood.SCORES:
                assert 0 <= m[score]["auroc_ci95"][0] <= m[score]["auroc"] <= m[score]["auroc_ci95"][1] <= 1
                assert 0 <= m[score]["fpr95"] <= 1
            assert m["stiffness_minus"]["msp"]["difference"] == pytest.approx(
                m["stiffness"]["auroc"] - m["msp"]["auroc"])


def test_the_summary_says_where_stiffness_wins_and_loses(tiny):
    _, results = tiny
    run, s = results["runs"][0], results["sets"][1]
    diff = run["sets"][s["name"]]["stiffness_minus"]
    diff["msp"] = {"difference": 0.25, "ci95": [0.1, 0.4]}
    diff["energy"] = {"difference": -0.125, "ci95": [-0.2, -0.05]}
    line = ood_report.summary(results)[2]
    assert line.startswith("- **resnet**: mean AUROC")
    assert f"{s['label']} +0.25" in line.split("than 1 − MSP")[1] and f"{s['label']} -0.12" in line


def test_the_stiffness_study_stays_the_default(tmp_path, monkeypatch):
    seen = {}

    def analyze(cfg, log):
        seen["cfg"] = cfg
        raise UserError("stop here")

    monkeypatch.setattr(study, "analyze", analyze)
    assert main(["analyze", "--out", str(tmp_path / "out")]) == 2
    assert seen["cfg"].sparse_k == DEFAULT_SPARSE_K and seen["cfg"].seeds is None
