"""The README's performance tables, written by `stepnet bench` from the results it keeps.

Each results file of benchmarks/results/ is one run and is never rewritten. After a full run
that writes there, the section between README's `<!-- bench:start -->` and `<!-- bench:end -->`
is made again from the newest full run that measured each figure: the model level and service
tables from the newest run with those parts, each target from the newest run that measured it.
So a run of one part (`--parts service`) updates its own rows and leaves the others' as the last
run that had them, each table saying which file, machine and date it comes from.
"""

import json
import re
from pathlib import Path

from benchmarks import report
from benchmarks.run import TARGETS

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SERVICE_MODEL = "stepnet50"


def runs(results_dir: Path) -> list[tuple[Path, dict]]:
    """Every full run kept in results_dir, newest first (by the time it started)."""
    out = []
    for path in results_dir.glob("*.json"):
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(results, dict) and results.get("settings", {}).get("mode") == "full" \
                and "started" in results and "machine" in results:
            out.append((path, results))
    return sorted(out, key=lambda run: run[1]["started"], reverse=True)


def _source(path: Path, results: dict) -> str:
    m = results["machine"]
    flags = ", ".join(m["cpu_flags"]) or "no SIMD flags of note"
    return f"`{path.name}`: {m['cpu']}, {m['cores']} cores ({flags}), {results['started'][:10]}"


def _model_table(path: Path, results: dict) -> list[str]:
    rows = []
    for name, model in results["model"].items():
        for batch, row in model["batches"].items():
            cells = [report.SHORT_NAMES.get(name, name), batch]
            cells += [f"{report._ms(row[key]['p50_ms'])} ms" if key in row else "-" for key, _ in report.RUNTIMES]
            cells.append(f"{row['ort_fp32']['p50_ms'] / row['torch_eager']['p50_ms']:.2f}")
            cells.append(f"{row['ort_int8']['throughput'] / row['ort_fp32']['throughput']:.2f}"
                         if "ort_int8" in row else "-")
            rows.append(cells)
    return ([f"Model level, p50 latency, from {_source(path, results)}:", ""]
            + report._table(["model", "batch", "PyTorch eager", "ORT fp32", "ORT int8", "fp32 / eager",
                             "int8 / fp32 throughput"], rows))


def _service_table(path: Path, results: dict) -> list[str]:
    svc = results["service"][SERVICE_MODEL]
    load = ("one 500x375 JPEG upload under wrk" if "load_upload" in svc     # runs before wrk: an httpx client
            else "500x375 JPEG and PNG uploads")
    return ([f"Service level, {report.MODEL_NAMES[SERVICE_MODEL]}, {load}, from "
             f"{_source(path, results)}; {report.served_as(svc)}:", ""]
            + report._table(report.SERVICE_HEADER, report.service_rows(svc)))


def _targets_table(kept: list[tuple[Path, dict]]) -> list[str]:
    rows = []
    for key, what, model, limit, higher in TARGETS:
        found = next(((path, t) for path, results in kept for t in results.get("targets", [])
                      if t["key"] == key and t["value"] is not None), None)
        if found is None:
            rows.append([what, model, "not measured", f"{'>=' if higher else '<='} {limit}", "n/a", "-"])
            continue
        path, target = found
        rows.append([what, model, report._value(target), target["limit"],
                     "yes" if target["met"] else "**no**", f"`{path.name}`"])
    return ["Targets, each from the newest run that measured it:", ""] + report._table(
        ["target", "model", "measured", "limit", "met", "run"], rows)


def section(results_dir: Path) -> str:
    """The generated part of the README, from the full runs kept in results_dir."""
    kept = runs(results_dir)
    lines = [START, "<!-- written by `stepnet bench` (benchmarks/readme.py) from the newest full runs in "
                    "benchmarks/results/; a hand edit here is lost at the next run -->", ""]
    model = next((run for run in kept if run[1].get("model")), None)
    if model:
        lines += _model_table(*model) + [""]
    service = next((run for run in kept if "raw_reference" in
                    next(iter(run[1].get("service", {}).get(SERVICE_MODEL, {}).get("load", {}).values()), {})),
                   None)
    if service:
        lines += _service_table(*service) + [""]
    lines += _targets_table(kept) + ["", END]
    return "\n".join(lines)


def update(readme: Path, results_dir: Path) -> bool:
    """Rewrite the section between the markers; False (the file untouched) when it has none."""
    text = readme.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: section(results_dir), text, count=1))
    return True
