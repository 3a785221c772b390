"""The committed analysis reports (docs/analysis/ for digits, docs/analysis/fashion-mnist/) are what
the current report code makes of their results.json, and every figure they show is there: a change
to analysis/report.py that is not followed by a new run shows up here."""

import json
import re
from pathlib import Path

import pytest

from analysis import report

DOCS = Path(__file__).resolve().parents[2] / "docs" / "analysis"
REPORTS = sorted(path.parent for path in DOCS.rglob("results.json") if "checkpoints" not in path.parts)


def test_both_reports_are_committed():
    assert [folder.relative_to(DOCS).as_posix() for folder in REPORTS] == [".", "fashion-mnist"]


@pytest.mark.parametrize("folder", REPORTS, ids=lambda folder: folder.name)
def test_report_is_its_results_rendered_with_every_figure(folder):
    results = json.loads((folder / "results.json").read_text())
    text = (folder / "report.md").read_text()
    assert text == report.markdown(results)
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(set(shown)) == sorted(report.FIGURES.values())
    assert all((folder / name).stat().st_size > 10_000 for name in shown)
