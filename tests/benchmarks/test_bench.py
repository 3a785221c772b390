"""`stepnet bench --quick` on the default digits model: every part runs (a real `stepnet serve`
included) and writes the JSON, markdown and plots a reader expects. No speed is asserted: the
figures belong to the machine; benchmarks/results/ holds a real run."""

import json

import pytest

from benchmarks.machine import slug
from stepnet.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--models", "digits", "--out", str(out)]) == 0
    (json_path,) = out.glob("*-quick.json")
    return out, json.loads(json_path.read_text()), json_path


def test_results_record_the_machine_settings_and_load(quick_run):
    _, results, path = quick_run
    assert path.stem == f"{slug()}-{results['started'][:10]}-quick"
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
    for c, load in service["load"].items():
        assert load["errors"] == 0 and load["requests"] >= 8
        raw = service["raw"]["batches"][str(load["raw_batch"])]
        assert load["throughput_vs_raw"] == pytest.approx(load["throughput"] / raw["throughput"])
    assert {"jpeg", "png"} <= set(service["raw"]["preprocess"])
    assert set(service["transports"]) == {"rest_v2_binary", "grpc"}
    for transport, rows in service["transports"].items():
        assert set(rows) == {"1", "4"}
        for c, load in rows.items():
            assert load["errors"] == 0 and load["requests"] >= 8, (transport, c)
            raw = service["raw"]["batches"][str(load["raw_batch"])]
            assert load["throughput_vs_raw"] == pytest.approx(load["throughput"] / raw["throughput"])


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
            "service_vs_raw_throughput_c4", "service_p50_minus_raw_c1_ms"} <= keys
    by_key = {t["key"]: t for t in results["targets"]}
    agreement = by_key["int8_top1_agreement"]                 # the digits test split, int8 vs fp32
    assert agreement["value"] == results["int8_quality"]["top1_agreement"]
    assert agreement["limit"] == ">= 0.99" and agreement["met"] is (agreement["value"] >= 0.99)
    assert by_key["ort_fp32_vs_torch_b1"]["value"] is None        # StepNet-50 not run in --quick
    markdown = path.with_suffix(".md").read_text()
    for heading in ("## Targets", "## Model level", "## Diagnostics cost", "## Service level",
                    "## GPU"):
        assert heading in markdown
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{path.stem}-{kind}.png" for kind in ("diagnostics", "model", "service")]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in markdown
