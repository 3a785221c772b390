"""The committed analysis reports (docs/analysis/ for digits, docs/analysis/fashion-mnist/, and the
out-of-distribution studies in their ood/ folders) are what the current report code makes of their
results.json, and every figure they show is there: a change to analysis/report.py or
analysis/ood_report.py that is not followed by a new run shows up here."""

import json
import re
from pathlib import Path

import pytest

from analysis import ood_report, report

DOCS = Path(__file__).resolve().parents[2] / "docs" / "analysis"
FOLDERS = sorted(path.parent for path in DOCS.rglob("results.json") if "checkpoints" not in path.parts)
STUDIES = {folder: json.loads((folder / "results.json").read_text()).get("study", "stiffness") for folder in FOLDERS}
REPORTS = [folder for folder in FOLDERS if STUDIES[folder] == "stiffness"]
OOD_REPORTS = [folder for folder in FOLDERS if STUDIES[folder] == "ood"]


def _name(folder: Path) -> str:
    return folder.relative_to(DOCS).as_posix()


def test_the_reports_are_committed():
    assert [_name(folder) for folder in REPORTS] == [".", "fashion-mnist"]
    assert [_name(folder) for folder in OOD_REPORTS] == ["fashion-mnist/ood", "ood"]


def _check(folder: Path, markdown, figures: dict[str, str]) -> None:
    results = json.loads((folder / "results.json").read_text())
    text = (folder / "report.md").read_text()
    assert text == markdown(results)
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(set(shown)) == sorted(figures.values())
    assert all((folder / name).stat().st_size > 10_000 for name in shown)


@pytest.mark.parametrize("folder", REPORTS, ids=_name)
def test_report_is_its_results_rendered_with_every_figure(folder):
    _check(folder, report.markdown, report.FIGURES)


@pytest.mark.parametrize("folder", OOD_REPORTS, ids=_name)
def test_ood_report_is_its_results_rendered_with_every_figure(folder):
    results = json.loads((folder / "results.json").read_text())
    assert not any(s["stand_in"] for s in results["sets"])       # measured on the real data sets
    _check(folder, ood_report.markdown, ood_report.FIGURES)
