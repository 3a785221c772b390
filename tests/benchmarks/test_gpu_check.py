"""`make gpu-check` here: the CPU dry run goes through every step a GPU host runs (bench, a real
`stepnet serve` with REST, gRPC and v2 answers, the fp16 parity) on the CPU provider, and its
report is what the device tool brings back. The offline install and a step that fails or runs
out of time are checked on their own."""

import json
import re
import subprocess
import sys
import time
import zipfile

import pytest

from benchmarks import gpu_check, wheel_chunks

pytestmark = pytest.mark.timeout(300)
STEPS = ["install", "environment", "bench", "serve", "fp16-parity"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "run", "--cpu-dry-run", "--out", str(out)],
                            cwd=gpu_check.ROOT, capture_output=True, text=True, timeout=280)
    seconds = time.monotonic() - started
    return result, out, json.loads((out / "report.json").read_text()), seconds


def test_every_step_passes_on_the_cpu(dry_run):
    result, out, report, seconds = dry_run
    assert result.returncode == 0, (out / "report.md").read_text()
    assert [(s["name"], s["status"]) for s in report["steps"]] == [
        ("install", "skipped"), ("environment", "passed"), ("bench", "passed"), ("serve", "passed"),
        ("fp16-parity", "passed")]
    assert report["passed"] is True and report["mode"] == "cpu-dry-run"
    assert all(all(s["checks"].values()) for s in report["steps"])
    assert (out / "report.md").read_text().startswith("# GPU check: passed")
    print(f"dry run: {seconds:.1f} s")


def test_the_report_holds_what_each_step_saw(dry_run):
    _, out, report, _ = dry_run
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["install"]["reason"] == "--cpu-dry-run: this environment as it is"
    assert steps["environment"]["details"]["session_providers"][0] == "CPUExecutionProvider"
    bench = steps["bench"]["details"]
    assert bench["message"].startswith("GPU part skipped")            # no GPU here, and it says why
    assert any(name.endswith(".json") for name in bench["files"])
    serve = steps["serve"]["details"]
    right = {str(d): d for d in range(10)}                            # deploy/testdata/digit-N.png
    assert serve["predict"]["answered"] == right and serve["grpc_model_infer"] == right == serve["v2_rest_infer"]
    assert serve["models"]["provider"] == "CPUExecutionProvider" and serve["stop_s"] is not None
    parity = steps["fp16-parity"]["details"]
    assert parity["test_split"]["samples"] == 360 and parity["test_split"]["top1_agreement"] >= 0.99
    assert parity["test_digits"]["fp16"] == list(range(10))
    log = (out / "steps.log").read_text()
    assert "===== serve-server.log =====" in log and "RPC ModelInfer 200" in log


def test_what_comes_back_fits_the_device_tool(dry_run):
    """At most 8 files, 16 MiB each, no deeper than two folders, names of letters, digits, . _ -."""
    _, out, _, _ = dry_run
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert {"report.md", "report.json", "steps.log"} <= {str(p) for p in files} and len(files) <= 8
    for path in files:
        assert len(path.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in path.parts)
        assert (out / path).stat().st_size <= 16 * wheel_chunks.MiB


def test_a_step_out_of_time_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STEPS", (gpu_check.Step("bench", 1, 1), gpu_check.Step("environment", 60, 1)))
    assert gpu_check.run(tmp_path, dry_run=True, budget_s=120, bench_quick=False) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    bench, environment = report["steps"][1:]
    assert bench["status"] == "failed" and bench["reason"].startswith("timed out after 1 s")
    assert environment["status"] == "passed" and report["passed"] is False
    assert (tmp_path / "report.md").read_text().startswith("# GPU check: FAILED (bench)")


def test_install_refuses_missing_parts_and_names_them(tmp_path):
    result = gpu_check.install(tmp_path / "work", tmp_path / ".gpu-wheels", 30, tmp_path / "install.log")
    assert result["status"] == "failed" and "no .gpu-wheels/part-*/manifest.json here" in result["reason"]


def test_install_puts_the_wheels_in_a_site_folder_offline_and_reuses_it(tmp_path):
    wheel = tmp_path / "gpucheckprobe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("gpucheckprobe/__init__.py", "VALUE = 42\n")
        zf.writestr("gpucheckprobe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: gpucheckprobe\nVersion: 1.0\n")
        zf.writestr("gpucheckprobe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("gpucheckprobe-1.0.dist-info/RECORD", "")
    parts, work = tmp_path / "parts", tmp_path / "work"
    wheel_chunks.pack([wheel], parts, 64 * 1024, preset=0)
    result = gpu_check.install(work, parts, 60, tmp_path / "install.log")
    assert result["status"] == "passed", (tmp_path / "install.log").read_text()
    assert (work / "site" / "gpucheckprobe" / "__init__.py").read_text() == "VALUE = 42\n"
    assert not (work / "join").exists()                            # the joined copy is not kept
    again = gpu_check.install(work, parts, 60, tmp_path / "install.log")
    assert again["status"] == "passed" and again["checks"] == {"reused": True}
