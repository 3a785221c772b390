"""`stepnet analyze` at chance accuracy: the report and the command's stderr say that the
comparisons and correlations mean nothing there; the committed reports, far above chance, do not."""

import copy
import json
import math
from pathlib import Path

import pytest

from analysis import report, study
from stepnet.cli import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "analysis"
COMMITTED = [DOCS, DOCS / "fashion-mnist"]


@pytest.fixture
def at_chance() -> dict:
    """The committed digits results with every model guessing among 10 classes."""
    results = copy.deepcopy(json.loads((DOCS / "results.json").read_text()))
    results["classes"] = 10
    for accuracy, family in zip((0.1, 0.0972, 0.1111), results["families"].values()):
        family["accuracy_mean"] = accuracy
    for row in results["sparse"]:
        row["accuracy_mean"] = 0.1
    return results


def test_the_margin_is_five_points_or_three_standard_errors_of_guessing():
    assert report.chance_margin(10, 10_000) == 0.05
    assert report.chance_margin(10, 60) == pytest.approx(3 * math.sqrt(0.1 * 0.9 / 60))


def test_a_report_at_chance_says_its_comparisons_mean_nothing(at_chance):
    text = report.markdown(at_chance)
    warning = ("**Warning**: resnet 10.00%, se 9.72%, stepnet 11.11%, top-1 10.00% and top-3 10.00% are at "
               "chance level (10.00% for 10 classes; below 15.00% counts as chance on 360 test images). "
               "A model there has learned next to nothing, so the comparisons between families and the "
               "rank correlations of step size with NSI in this report mean nothing")
    assert warning in text
    assert text.index(warning) < text.index("## Summary")


def test_only_the_runs_at_chance_are_named(at_chance):
    at_chance["families"]["resnet"]["accuracy_mean"] = 0.9
    at_chance["families"]["se"]["accuracy_mean"] = 0.16
    for row in at_chance["sparse"]:
        row["accuracy_mean"] = 0.9
    assert report.chance_warning(at_chance).startswith(
        "stepnet 11.11% is at chance level (10.00% for 10 classes; below 15.00% counts as chance")
    assert "every comparison with it and its rank correlations" in report.chance_warning(at_chance)


def test_the_command_warns_on_stderr(at_chance, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "analyze", lambda cfg, log: at_chance)
    assert main(["analyze", "--quiet", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: resnet 10.00%, se 9.72%, stepnet 11.11%") and "at chance level" in err


@pytest.mark.parametrize("folder", COMMITTED, ids=lambda folder: folder.name)
def test_the_committed_reports_are_not_at_chance(folder):
    results = json.loads((folder / "results.json").read_text())
    assert report.chance_warning({**results, "classes": 10}) is None      # both data sets have 10
    assert "at chance level" not in (folder / "report.md").read_text()
