"""`stepnet bench --quick` on the default digits model: every part runs (a real `stepnet serve`
included) and writes the JSON, markdown and plots a reader expects. No speed is asserted: the
figures belong to the machine; benchmarks/results/ holds a real run."""

import json
from pathlib import Path

import pytest

from benchmarks import readme as bench_readme
from benchmarks.machine import slug
from stepnet.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # every part but train (27 s: StepNet-50 SGD steps and `stepnet train` in 1 and 2 processes, which
    # tests/models runs on its own)
    parts = "model,diagnostics,service,instances,tracing,http,gpu"
    assert main(["bench", "--quick", "--models", "digits", "--parts", parts, "--out", str(out)]) == 0
    (json_path,) = out.glob("*-quick.json")
    return out, json.loads(json_path.read_text()), json_path


def test_results_record_the_machine_settings_and_load(quick_run):
    _, results, path = quick_run
    started = results["started"]        # one new file per run: machine, date, hour and minute
    assert path.stem == f"{slug()}-{started[:10]}-{started[11:13]}{started[14:16]}-quick"
    machine = results["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["packages"]["onnxruntime-gpu"]
    assert results["settings"]["mode"] == "quick" and results["settings"]["models"] == ["digits"]
    assert len(results["load_average_start"]) == 3 and len(results["load_average_end"]) == 3
    assert results["gpu"]["skipped"] is True and "GPU part skipped" in results["gpu"]["message"]


def test_model_level_has_every_runtime_and_batch(quick_run):
    _, results, _ = quick_run
    model = results["model"]["digits"]
    assert set(model["batches"]) == {"1", "8"}
    for batch, row in model["batches"].items():
        assert set(row) == {"torch_eager", "ort_fp32", "ort_int8"}
        for figures in row.values():
            assert figures["reps"] >= 2 and 0 < figures["p50_ms"] <= figures["p95_ms"]
            assert figures["throughput"] == pytest.approx(int(batch) * 1e3 / figures["p50_ms"])
    assert "GPU" in model["fp16"]
    quality = results["int8_quality"]
    assert quality["samples"] == 360 and 0 <= quality["top1_agreement"] <= 1


def test_diagnostics_and_service_parts(quick_run):
    _, results, _ = quick_run
    diag = results["diagnostics"]["digits"]
    assert diag["nodes_inlined"]["without"] < diag["nodes_inlined"]["with"]
    row = diag["batches"]["1"]
    assert row["cost"] == pytest.approx(row["with"]["p50_ms"] / row["without"]["p50_ms"] - 1)
    service = results["service"]["digits"]
    assert set(service["load"]) == {"1", "4"}
    assert service["load_upload"].endswith(".png")            # wrk sends one body: a PNG digit
    for c, load in service["load"].items():
        assert load["errors"] == 0 and load["errors_5xx"] == 0 and load["requests"] >= 8
        # the server's CPU per request, by thread name: HTTP, decoding and ONNX Runtime apart
        assert {"event-loop", "preprocess"} <= set(load["cpu_ms_per_request"]), load["cpu_ms_per_request"]
        assert load["throughput_vs_end_to_end"] == pytest.approx(
            load["throughput"] / service["raw"]["end_to_end"]["throughput"])
        # concurrency 1 against raw decode + pre-process + run; above, session.run at the batch
        # size the batcher formed during that load
        raw = (service["raw"]["end_to_end"] if c == "1" else
               service["raw"]["batches"][str(load["raw_batch"])])
        assert load["raw_batch" if c != "1" else "requests"] >= 1
        if c != "1":
            assert load["raw_batch"] == max(1, round(load["mean_batch_size"]))
        assert load["raw_throughput"] == raw["throughput"]
        assert load["throughput_vs_raw"] == pytest.approx(load["throughput"] / raw["throughput"])
    end_to_end = service["raw"]["end_to_end"]
    assert end_to_end["throughput"] == pytest.approx(1e3 / end_to_end["mean_ms"])
    assert service["load"]["1"]["p50_minus_raw_p50_ms"] == pytest.approx(
        service["load"]["1"]["p50_ms"] - end_to_end["p50_ms"])
    assert service["served_as"]["instances"] and service["served_as"]["serving"]["max_batch_size"] == 8
    assert {"jpeg", "png"} <= set(service["raw"]["preprocess"])
    assert set(service["transports"]) == {"rest_v2_binary", "grpc"}
    for transport, rows in service["transports"].items():
        assert set(rows) == {"1", "4"}
        for c, load in rows.items():
            assert load["errors"] == 0 and load["requests"] >= 8, (transport, c)
            assert load["throughput_vs_raw"] == pytest.approx(
                load["throughput"] / service["load"][c]["raw_throughput"])


def test_http_layer_part(quick_run):
    _, results, path = quick_run
    http = results["http"]
    servers = {label: row for label, row in http.items() if isinstance(row, dict)}
    assert set(servers) == {"stepnet serve (httptools + limits)", "uvicorn httptools", "uvicorn h11"}
    assert all(row["reps"] == 20 for row in servers.values())
    assert http["limits_minus_plain_p50_ms"] == pytest.approx(
        servers["stepnet serve (httptools + limits)"]["p50_ms"] - servers["uvicorn httptools"]["p50_ms"])
    assert "## HTTP layer" in path.with_suffix(".md").read_text()


def test_targets_and_report_files(quick_run):
    out, results, path = quick_run
    keys = {t["key"] for t in results["targets"]}
    assert {"ort_fp32_vs_torch_b1", "int8_vs_fp32_throughput_b8", "diagnostics_cost_b1",
            "service_vs_raw_throughput_c1", "service_vs_raw_throughput_c4", "service_vs_raw_throughput_c16",
            "service_p50_minus_raw_c1_ms", "serving_path_c16", "serving_path_c64", "service_5xx_c64",
            "grpc_vs_rest_v2_stepnet50", "grpc_vs_rest_v2_digits"} <= keys
    by_key = {t["key"]: t for t in results["targets"]}
    agreement = by_key["int8_top1_agreement"]                 # the digits test split, int8 vs fp32
    assert agreement["value"] == results["int8_quality"]["top1_agreement"]
    assert agreement["limit"] == ">= 0.99" and agreement["met"] is (agreement["value"] >= 0.99)
    assert by_key["ort_fp32_vs_torch_b1"]["value"] is None        # StepNet-50 not run in --quick
    transports = results["service"]["digits"]["transports"]
    assert by_key["grpc_vs_rest_v2_digits"]["value"] == pytest.approx(min(
        transports["grpc"][c]["throughput"] / transports["rest_v2_binary"][c]["throughput"] for c in ("1", "4")))
    assert by_key["serving_path_c64"]["value"] is None              # --quick loads 1 and 4 only
    markdown = path.with_suffix(".md").read_text()
    for heading in ("## Targets", "## Model level", "## Diagnostics cost", "## Service level",
                    "## GPU"):
        assert heading in markdown
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{path.stem}-{kind}.png" for kind in ("diagnostics", "model", "service")]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in markdown


def _kept_run(results: dict, folder: Path, name: str, started: str, scale: float) -> None:
    """A copy of the quick run as a full run of StepNet-50 with every figure times `scale`."""
    run = json.loads(json.dumps(results))
    run["settings"]["mode"], run["started"] = "full", started
    run["model"] = {"stepnet50": run["model"]["digits"]}
    run["service"] = {"stepnet50": run["service"]["digits"]}
    for row in run["service"]["stepnet50"]["load"].values():
        row["throughput"] *= scale
        row["throughput_vs_raw"] *= scale
    for target in run["targets"]:
        if target["key"] == "int8_top1_agreement":
            target["value"], target["met"] = scale / 10, scale / 10 >= 0.99
    (folder / name).write_text(json.dumps(run))


def test_readme_tables_come_from_the_newest_full_run(quick_run, tmp_path):
    _, results, _ = quick_run
    kept = tmp_path / "results"
    kept.mkdir()
    _kept_run(results, kept, "a.json", "2026-01-02T10:00:00", 3.0)      # the newest
    _kept_run(results, kept, "b.json", "2026-01-01T10:00:00", 5.0)
    (kept / "c-quick.json").write_text(json.dumps({**results, "started": "2027-01-01T00:00:00"}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{bench_readme.START}\nold table\n{bench_readme.END}\n\nafter\n")
    assert bench_readme.update(readme, kept)
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old table" not in text and text.count(bench_readme.START) == 1
    block = text[text.index(bench_readme.START):text.index(bench_readme.END)]
    assert "`a.json`" in block and "`b.json`" not in block and "quick" not in block
    service = results["service"]["digits"]["load"]
    assert f"| 4 | {3 * service['4']['throughput']:.1f} |" in block
    assert "| int8 top-1 agreement with fp32, digits test split | digits | 0.300 | >= 0.99 | **no** |" in block
    assert "| ONNX Runtime fp32 latency / PyTorch eager latency, batch 1 | stepnet50 |" in block

    plain = tmp_path / "plain.md"                       # no markers: left as it is
    plain.write_text("no tables here\n")
    assert not bench_readme.update(plain, kept) and plain.read_text() == "no tables here\n"


def test_the_repository_readme_has_the_generated_section():
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert text.count(bench_readme.START) == 1 and text.count(bench_readme.END) == 1
    assert text.index(bench_readme.START) < text.index(bench_readme.END)
