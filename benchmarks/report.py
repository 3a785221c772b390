"""The human side of a results file: markdown tables and PNG plots (matplotlib, Agg)."""

from pathlib import Path

RUNTIMES = (("torch_eager", "PyTorch eager"), ("ort_fp32", "ORT fp32"), ("ort_int8", "ORT int8"))
MODEL_NAMES = {"stepnet50": "StepNet-50 (224x224)", "digits": "digits StepNet-20 (32x32)"}
SHORT_NAMES = {"stepnet50": "StepNet-50", "digits": "digits"}


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _value(row: dict) -> str:
    value = row["value"]
    if value is None:
        return "not measured"
    if row["key"].endswith("_ms") or row["key"].endswith("_points"):
        return f"{value:.2f}"
    if "cost" in row["key"]:
        return f"{100 * value:+.1f}%"
    return f"{value:.3f}"


def markdown(results: dict, plots: list[str]) -> str:
    lines = _introduction(results) + _targets(results["targets"])
    for model in results["model"].values():
        lines += _model_level(model)
    if results.get("int8_quality"):
        lines += _int8_quality(results["int8_quality"])
    if results["diagnostics"]:
        lines += _diagnostics(results["diagnostics"])
    for name, svc in results["service"].items():
        lines += _service_level(name, svc)
    if results.get("instances"):
        lines += _instances(results["instances"])
    if results.get("tracing"):
        lines += _tracing(results["tracing"])
    if results.get("http"):
        lines += _http_layer(results["http"])
    if results.get("train"):
        lines += _training(results["train"])
    if results["profiles"]:
        lines += _profiles(results["profiles"])
    if results.get("gpu"):
        lines += ["", "## GPU", "", results["gpu"]["message"] + "."] + _gpu(results["gpu"])
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _introduction(results: dict) -> list[str]:
    """The title, the machine, the settings and load, and how the figures are read."""
    m = results["machine"]
    settings = results["settings"]
    return [f"# StepNet benchmark: {m['cpu']}, {m['cores']} cores, {results['started'][:10]}", "",
            f"Mode `{settings['mode']}`; {settings['threads']} ONNX Runtime / PyTorch threads; "
            f"CPU flags {', '.join(m['cpu_flags']) or 'none of note'}; GPU: "
            f"{', '.join(m['gpu'].get('devices', [])) or 'none'}. Load average (1, 5, 15 min) "
            f"{results['load_average_start']} at the start, {results['load_average_end']} at the "
            f"end; the run took {results['seconds']:.0f} s. Packages: "
            + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v) + ".", "",
            "Latencies are medians (p50) and 95th percentiles of repeated runs after warm-up; "
            "throughput is items per second at the median latency.", ""]


def _targets(targets: list[dict]) -> list[str]:
    return ["## Targets", ""] + _table(
        ["target", "model", "measured", "limit", "met"],
        [[t["what"], t["model"], _value(t), t["limit"],
          "n/a" if t["met"] is None else "yes" if t["met"] else "**no**"] for t in targets])


def _model_level(model: dict) -> list[str]:
    """Per batch and runtime: latency, throughput, and both against PyTorch eager and ORT fp32."""
    rows = []
    for batch, row in model["batches"].items():
        torch_p50 = row["torch_eager"]["p50_ms"]
        for key, label in RUNTIMES:
            if key in row:
                r = row[key]
                rows.append([batch, label, _ms(r["p50_ms"]), _ms(r["p95_ms"]),
                             f"{r['throughput']:.1f}", f"{r['p50_ms'] / torch_p50:.2f}",
                             f"{r['throughput'] / row['ort_fp32']['throughput']:.2f}",
                             str(r["reps"])])
    return (["", f"## Model level: {model['label']}", ""]
            + _table(["batch", "runtime", "p50 ms", "p95 ms", "items/s", "p50 / eager",
                      "throughput / ORT fp32", "reps"], rows)
            + ["", f"PyTorch threads: {model['torch_threads']['chosen']} (batch-1 probe, p50 ms "
                   f"by thread count: {model['torch_threads']['probe_p50_ms_batch1']}). "
                   f"fp16: {model['fp16']}. int8 calibration: {model['int8_calibration']}."])


def _int8_quality(q: dict) -> list[str]:
    return ["", "## int8 accuracy (default digits model)", "",
            f"On the {q['samples']} images of the digits test split: fp32 top-1 "
            f"{q['fp32_top1']:.4f}, int8 top-1 {q['int8_top1']:.4f} (change "
            f"{q['accuracy_change_points']:+.2f} points), top-1 agreement "
            f"{100 * q['top1_agreement']:.2f}%; calibrated on {q['calibration']}."]


def _diagnostics(diagnostics: dict) -> list[str]:
    rows = []
    for name, diag in diagnostics.items():
        for batch, row in diag["batches"].items():
            rows.append([MODEL_NAMES.get(name, name), batch, _ms(row["with"]["p50_ms"]),
                         _ms(row["without"]["p50_ms"]), f"{100 * row['cost']:+.1f}%",
                         f"{diag['nodes_inlined']['with']} / {diag['nodes_inlined']['without']}"])
    return (["", "## Diagnostics cost (same graph, with and without step_size / nsi)", ""]
            + _table(["model", "batch", "with p50 ms", "without p50 ms", "cost",
                      "nodes (inlined) with / without"], rows))


def _transports(svc: dict) -> list[str]:
    """REST /predict, REST v2 binary and gRPC on the same image, one per request."""
    if not svc.get("transports"):
        return []
    rows = []
    for c, rest in svc["load"].items():
        v2, grpc = (svc["transports"][t][c] for t in ("rest_v2_binary", "grpc"))
        rows.append([c] + [f"{r['throughput']:.1f} ({r['throughput_vs_raw']:.2f})" for r in (rest, v2, grpc)]
                    + [f"{grpc['throughput'] / v2['throughput']:.2f}", f"{_cpu(v2)} / {_cpu(grpc)}",
                       f"{v2['errors']} / {grpc['errors']}"])
    return (["", "Transports, the same image one per request: req/s (and service / raw, against "
                 f"the reference of the table above); {svc['settings'].get('transports', '')}.", ""]
            + _table(["concurrency", "REST /predict", "REST v2 binary", "gRPC", "gRPC / REST v2 binary",
                      "server CPU ms/request v2 / gRPC", "errors v2 / gRPC"], rows))


def _cpu(row: dict) -> str:
    return f"{sum(row.get('cpu_ms_per_request', {}).values()):.2f}"


def cpu_split(row: dict) -> str:
    """The server's CPU per request, by thread name, largest first."""
    split = sorted(row.get("cpu_ms_per_request", {}).items(), key=lambda kv: -kv[1])
    return f"{_cpu(row)} (" + ", ".join(f"{k} {v:.2f}" for k, v in split) + ")"


def service_rows(svc: dict) -> list[list[str]]:
    """Per concurrency: req/s, p50, the raw reference and its items/s, the ratio, p50 against
    raw end to end (concurrency 1) and the mean batch the service formed."""
    rows = []
    for c, row in svc["load"].items():
        mean_batch = row.get("mean_batch_size")
        over = row.get("p50_minus_raw_p50_ms")
        rows.append([c, f"{row['throughput']:.1f}", _ms(row["p50_ms"]), row["raw_reference"],
                     f"{row['raw_throughput']:.1f}", f"{row['throughput_vs_raw']:.3f}",
                     "-" if over is None else f"{over:+.1f}",
                     "-" if mean_batch is None else f"{mean_batch:.2f}"])
    return rows


SERVICE_HEADER = ["concurrency", "req/s", "p50 ms", "raw reference", "raw items/s", "service / raw",
                  "p50 - raw p50 ms", "mean batch"]


def served_as(svc: dict) -> str:
    """The service's instances and threads, and the raw session's, in words."""
    served = svc.get("served_as")
    if not served:
        return f"raw session {svc['settings'].get('raw_threads', '?')} intra-op threads"
    groups = {}
    for instance in served["instances"]:
        key = (instance["device"], instance["threads"], instance.get("solo", False))
        groups[key] = groups.get(key, 0) + 1
    instances = ", ".join(f"{n} x {device}" + (f" ({threads} intra-op threads)" if threads else "")
                          + (" solo" if solo else "") for (device, threads, solo), n in groups.items())
    serving = served["serving"]
    return (f"service {instances}, max batch {serving['max_batch_size']}, queue delay "
            f"{serving['max_queue_delay_ms']:g} ms; raw session {svc['settings'].get('raw_threads', '?')} "
            f"intra-op threads; intra-op spinning {svc['settings'].get('spinning', 'off')} in both")


def _service_level(name: str, svc: dict) -> list[str]:
    """Per concurrency: the served figures against their raw reference, and the server's own timing."""
    raw = svc["raw"]
    timing_rows = []
    for c, row in svc["load"].items():
        timing_rows.append([c, str(row["requests"]), f"{row['errors']} / {row.get('errors_5xx', '-')}",
                            _ms(row["p99_ms"]), f"{row.get('throughput_vs_end_to_end', float('nan')):.2f}",
                            cpu_split(row)])
    end_to_end = raw.get("end_to_end")
    return (["", f"## Service level: {MODEL_NAMES.get(name, name)}", "",
             f"`stepnet serve` on loopback ({svc['settings']['server']}; {served_as(svc)}); client: "
             f"{svc['settings']['client']}. Pre-processing (service code) per image: JPEG "
             f"{raw['preprocess']['jpeg']['per_image_ms']:.2f} ms, PNG "
             f"{raw['preprocess']['png']['per_image_ms']:.2f} ms.", ""]
            + _table(SERVICE_HEADER, service_rows(svc))
            + ["", "The raw reference at concurrency 1 is what the service does for a request, in one "
                   "thread and no HTTP; above it, session.run at the batch size the batcher formed, on "
                   "inputs pre-processed beforehand. Each is measured a few seconds from its load, the "
                   "server idle." + (f" Raw end to end: p50 {_ms(end_to_end['p50_ms'])} ms, p95 "
                                     f"{_ms(end_to_end['p95_ms'])} ms." if end_to_end else ""), ""]
            + _table(["concurrency", "requests", "errors / 5xx", "p99 ms", "req/s / raw end to end",
                      "server CPU ms/request (by thread)"], timing_rows)
            + ["", "`req/s / raw end to end` divides by the one-thread decode, pre-process and "
                   "session.run at batch 1 at every concurrency (the serving path's figure). Errors "
                   "are the server's 4xx and 5xx answers during the load (its own counters) and the "
                   "client's socket errors; CPU is the server process's, from /proc, by thread name."]
            + _transports(svc))


def _ab_rows(part: dict) -> tuple[list[str], list[list[str]]]:
    """One row per concurrency: each configuration's median req/s and p50, and their ratio."""
    labels = list(part["configs"])
    rows = []
    for c, by_config in part["results"].items():
        cells = [f"{by_config[k]['throughput']:.1f} / {_ms(by_config[k]['p50_ms'])}" for k in labels]
        ratio = (f"{by_config[labels[-1]]['throughput'] / by_config[labels[0]]['throughput']:.2f}"
                 if len(labels) > 1 else "-")
        rows.append([c, *cells, ratio, str(sum(by_config[k]["errors"] for k in labels))])
    header = ["concurrency", *(f"{k}: req/s / p50 ms" for k in labels),
              f"req/s {labels[-1]} / {labels[0]}", "errors"]
    return header, rows


def _instances(part: dict) -> list[str]:
    lines = ["", "## CPU instances (STEPNET_INSTANCES x STEPNET_INTRA_OP_THREADS)", "",
             "One `stepnet serve` process per configuration, side by side, loaded in turn; medians "
             "over the rounds. `1 x N`: one session with N intra-op threads; `N x 1`: N sessions of "
             "one thread, batches running concurrently; `+ solo`: with one more session of N "
             "threads, which takes a batch only while no other runs (STEPNET_CPU_SOLO)."]
    for name, result in part.items():
        header, rows = _ab_rows(result)
        lines += ["", f"{MODEL_NAMES.get(name, name)}: {result['rounds']} round(s) of "
                      f"{result['seconds_per_load']:.0f} s per load.", ""] + _table(header, rows)
    return lines


def _tracing(part: dict) -> list[str]:
    header, rows = _ab_rows(part)
    return (["", "## Tracing cost (digits)", "",
             f"Off: `STEPNET_TRACING=off`; on: every span exported over OTLP/HTTP to a loopback collector "
             f"that drops them ({part['exports_received']} exports received). When off, the checks one "
             f"request makes cost {part['off_checks_ns_per_request']:.0f} ns (timeit).", ""]
            + _table(header, rows))


def _http_layer(http: dict) -> list[str]:
    rows = [[label, str(row["reps"]), _ms(row["p50_ms"]), _ms(row["p95_ms"]), _ms(row["p99_ms"])]
            for label, row in http.items() if isinstance(row, dict)]
    return (["", "## HTTP layer: the connection limits' cost (digits, concurrency 1)", "",
             "Three servers on one repository, requests taking turns between them "
             "(benchmarks/http_layer.py).", ""]
            + _table(["server", "requests", "p50 ms", "p95 ms", "p99 ms"], rows)
            + ["", f"p50 with the limits minus plain httptools: {http['limits_minus_plain_p50_ms']:+.2f} ms; "
                   f"h11 minus httptools: {http['h11_minus_plain_p50_ms']:+.2f} ms."])


def _profiles(profiles: dict) -> list[str]:
    lines = ["", "## Where ONNX Runtime spends its time (profiler, batch 8, kernel time "
                 "share per op type)", ""]
    for name, variants in profiles.items():
        for variant, prof in variants.items():
            ops = ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in prof["ops"][:8])
            lines.append(f"- {MODEL_NAMES.get(name, name)} {variant} "
                         f"({prof['run_ms']:.0f} ms per run): {ops}")
    return lines


def _training(part: dict) -> list[str]:
    lines = ["", f"## Training throughput ({part['device']}, {part['threads']} threads; synthetic data)", "",
             f"Full SGD steps, steps taking turns between the models (benchmarks/training.py); batch "
             f"{part['batch_224']} at 224x224, 64 for digits.", ""]
    rows = []
    for precision, row in part["models"].items():
        rows.append([precision, f"{row['stepnet50']['throughput']:.1f}", f"{row['resnet50']['throughput']:.1f}",
                     f"{row['stepnet50_vs_resnet50']:.2f}", f"{row['digits']['throughput']:.0f}",
                     f"{row.get('peak_memory_bytes', 0) / 2**30:.1f}" if "peak_memory_bytes" in row else "-"])
    lines += _table(["precision", "StepNet-50 img/s", "ResNet-50 img/s", "StepNet / ResNet",
                     "digits img/s", "peak GPU memory GiB"], rows)
    ddp = part["ddp_cpu"]
    lines += ["", "`stepnet train` on digits, global batch 64, CPU (real data loading): "
              + "; ".join(f"{n} process(es) {row['images_per_s']:.0f} img/s (data wait "
                          f"{100 * row['data_wait_fraction']:.0f} %)" for n, row in ddp.items()) + "."]
    return lines


def _gpu(part: dict) -> list[str]:
    """Per model: ORT fp32 / fp16 with IO binding against PyTorch eager, and fp16 parity."""
    lines = []
    for name, result in part.get("models", {}).items():
        lines += ["", f"### {MODEL_NAMES.get(name, name)}", ""]
        if "error" in result:
            lines.append(f"Failed: {result['error']}")
            continue
        torch_key = result["torch"]
        rows = []
        for batch, row in result["batches"].items():
            fp16, eager = row["ort_fp16"], row[torch_key]
            rows.append([batch, _ms(row["ort_fp32"]["p50_ms"]), _ms(fp16["p50_ms"]),
                         _ms(eager["p50_ms"]), f"{fp16['throughput']:.0f}",
                         f"{fp16['p50_ms'] / eager['p50_ms']:.2f}",
                         f"{row['ort_fp32']['p50_ms'] / fp16['p50_ms']:.2f}"])
        label = torch_key.removeprefix("torch_")
        lines += _table(["batch", "ORT fp32 p50 ms", "ORT fp16 p50 ms",
                         f"PyTorch {label} channels_last p50 ms", "ORT fp16 items/s",
                         "ORT fp16 / PyTorch (latency)", "fp32 / fp16 (latency)"], rows)
        par = result["fp16_parity"]
        top1 = (f"; top-1 fp32 {par['fp32_top1']:.4f}, fp16 {par['fp16_top1']:.4f}"
                if "fp16_top1" in par else "")
        lines += ["", f"Provider {result['provider']}. fp16 against fp32 on the same device, "
                      f"{par['samples']} images: top-1 agreement {100 * par['top1_agreement']:.2f}%"
                      f"{top1}; max abs diff logits {par['logits_max_abs_diff']:.2e}, step size "
                      f"{par['step_size_max_abs_diff']:.2e}; nsi max rel diff "
                      f"{par['nsi_max_rel_diff']:.2e}; within the export's fp16 tolerances: "
                      f"{'yes' if par['within_export_tolerances'] else 'no'}."]
    return lines


def plots(results: dict, out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for part, draw in (("model", _model_plot), ("service", _service_plot),
                       ("diagnostics", _diagnostics_plot)):
        if results[part]:
            written.append(_save(draw(results), out_dir / f"{stem}-{part}.png"))
    return written


def _model_plot(results: dict):
    """Per model: throughput per batch size, one bar per runtime."""
    import matplotlib.pyplot as plt

    names = list(results["model"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        batches = list(results["model"][name]["batches"])
        width = 0.8 / len(RUNTIMES)
        top = max(results["model"][name]["batches"][b][key]["throughput"]
                  for b in batches for key, _ in RUNTIMES)
        ax.set_ylim(0, 1.3 * top)                 # room for the legend above the bars
        for i, (key, label) in enumerate(RUNTIMES):
            values = [results["model"][name]["batches"][b][key]["throughput"] for b in batches]
            bars = ax.bar([j + i * width for j in range(len(batches))], values, width,
                          label=label)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks([j + width for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_ylabel("images / s (median latency)")
        ax.set_title(MODEL_NAMES.get(name, name))
        ax.legend(loc="upper left", ncol=3, fontsize=9)
    fig.suptitle(f"Model level throughput, {results['machine']['cpu']}, "
                 f"{results['machine']['cores']} cores (higher is better)")
    fig.tight_layout()
    return fig


def _service_plot(results: dict):
    """Per model: throughput (top) and latency percentiles (bottom) against concurrency."""
    import matplotlib.pyplot as plt

    names = list(results["service"])
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 8), squeeze=False)
    for col, name in enumerate(names):
        svc = results["service"][name]
        conc = list(svc["load"])
        ax = axes[0][col]
        ax.plot(conc, [svc["load"][c]["throughput"] for c in conc], "o-", label="service")
        ax.plot(conc, [svc["load"][c]["raw_throughput"] for c in conc], "s--",
                label="raw reference (c1 end to end, else session.run at the batch formed)")
        ax.set_ylabel("requests / s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{MODEL_NAMES.get(name, name)}: throughput")
        ax.legend()
        ax = axes[1][col]
        for q in ("p50", "p99"):
            ax.plot(conc, [svc["load"][c][f"{q}_ms"] for c in conc], "o-", label=f"service {q}")
        if "end_to_end" in svc["raw"]:
            ax.axhline(svc["raw"]["end_to_end"]["p50_ms"], color="grey", linestyle="--",
                       label="raw end to end p50, batch 1")
        ax.set_xlabel("concurrency")
        ax.set_yscale("log")
        ax.set_ylabel("latency ms (log scale)")
        ax.set_title(f"{MODEL_NAMES.get(name, name)}: latency")
        ax.legend()
    fig.suptitle("Service level: stepnet serve on loopback vs raw ONNX Runtime")
    fig.tight_layout()
    return fig


def _diagnostics_plot(results: dict):
    """The cost of the diagnostics outputs per model and batch, against the 5% target."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels, values = [], []
    for name, diag in results["diagnostics"].items():
        for batch, row in diag["batches"].items():
            labels.append(f"{SHORT_NAMES.get(name, name)}\nbatch {batch}")
            values.append(100 * row["cost"])
    bars = ax.bar(labels, values, color=["tab:red" if v > 5 else "tab:green" for v in values])
    ax.bar_label(bars, fmt="%+.1f%%")
    ax.axhline(5, color="grey", linestyle="--", label="target: 5%")
    ax.set_ylim(min(0, 1.2 * min(values)), 1.2 * max(max(values), 5))
    ax.set_ylabel("latency with diagnostics / without - 1 (%)")
    ax.set_title("Cost of the diagnostics outputs")
    ax.legend()
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
