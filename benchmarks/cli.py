"""`stepnet bench`. Nothing heavy is imported until the command runs."""

from pathlib import Path

PARTS = ("model", "diagnostics", "service", "instances", "tracing", "http", "train", "gpu")
MODELS = ("stepnet50", "digits")


def _cmd_bench(args) -> int:
    from benchmarks.run import BenchSettings, run

    settings = BenchSettings.quick() if args.quick else BenchSettings.full()
    paths = run(settings, models=tuple(args.models or MODELS), parts=tuple(args.parts or PARTS),
                out_dir=args.out, wait_load=args.wait_load)
    for path in paths:
        print(path)
    return 0


def _csv(choices):
    def parse(text: str) -> list[str]:
        import argparse

        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = sorted(set(values) - set(choices))
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return values
    return parse


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure model- and service-level performance and write a report",
        description="Measure PyTorch eager vs ONNX Runtime fp32 / int8 (StepNet-50 at 224x224 with "
                    "random weights, and the default digits model), the cost of the diagnostics "
                    "outputs, a real `stepnet serve` under load against raw session.run, the cost of its "
                    "connection limits against uvicorn's plain HTTP protocols, one CPU session with "
                    "every core against one per core (STEPNET_INSTANCES), tracing on against off, training images/s "
                    "(StepNet-50 against torchvision ResNet-50, fp32 and bf16, DDP 1 and 2 processes) and, on a "
                    "GPU host, the CUDA provider fp32 / fp16 against PyTorch fp16; "
                    "write RESULTS/<machine>-<date>-<HHMM>.json, .md and PNG plots (docs/performance.md).")
    p.add_argument("--quick", action="store_true",
                   help="few repetitions and short loads: checks that everything runs (seconds), "
                        "not a measurement")
    p.add_argument("--models", type=_csv(MODELS), help=f"comma-separated: {', '.join(MODELS)} "
                                                       f"(default: both)")
    p.add_argument("--parts", type=_csv(PARTS), help=f"comma-separated: {', '.join(PARTS)} "
                                                     f"(default: all)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="folder for the results (default benchmarks/results)")
    p.add_argument("--wait-load", type=float, default=0.0, metavar="LOAD",
                   help="first wait (up to 20 minutes) until the 1-minute load average is below "
                        "LOAD: other work on the machine skews the numbers (default: no wait)")
    p.set_defaults(run=_cmd_bench)
