"""`stepnet export` and `stepnet graph`. Nothing heavy is imported until a command runs."""

import logging
import sys
from pathlib import Path

from export import sizes
from models.cli import DATA_DIR_HELP, DATASET_HELP


def _cmd_export(args) -> int:
    from export import variants, verify
    from export.pipeline import export_checkpoint
    from stepnet.repository import METADATA_FILE
    from stepnet.repository.metadata import parse

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("stepnet export: %(message)s"))
    logger = logging.getLogger("export")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    options = {"calibration_samples": args.calibration_samples} if args.calibration_samples else {}
    if args.int8_calibration_samples:
        options["int8_calibration_samples"] = args.int8_calibration_samples
    requested = tuple(v for v in variants.VARIANTS if getattr(args, v))
    try:
        target = export_checkpoint(
            args.checkpoint, args.repository, args.name, args.version,
            calibration_dataset=args.calibration_dataset, data_dir=args.data_dir, force=args.force,
            variant_names=requested, min_verification_images=args.min_verification_images, **options)
    except verify.VerificationError as exc:
        print(verify.format_table(exc.report))
        print(f"stepnet export: error: {exc}; nothing was written", file=sys.stderr)
        return 1
    except variants.VariantError as exc:
        print(variants.format_report(exc.variant, exc.report))
        print(f"stepnet export: error: {exc}; nothing was written", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)
    meta = parse((target / METADATA_FILE).read_bytes())
    print(verify.format_table(meta.verification))
    acc = meta.accuracy
    print(f"\n{meta.name} version {meta.version}: {meta.family}-{meta.depth}, "
          f"{len(meta.layers)} ai.stepnet step nodes, top-1 {acc.top1:.4f} on "
          f"{acc.samples} {acc.dataset} test images; written to {target}")
    for name, entry in (meta.variants or {}).items():
        print(f"  {entry['file']}: {variants.format_report(name, entry['verification'])}")
    return 0


def _cmd_graph(args) -> int:
    from export.listing import describe, load
    from stepnet.repository import MODEL_FILE
    from stepnet.errors import UserError

    path = args.path / MODEL_FILE if args.path.is_dir() else args.path
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    try:
        proto = load(path)
    except Exception as exc:   # onnx raises DecodeError, ValueError, ... for a file it cannot parse
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    print(describe(proto))
    return 0


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to the ONNX model repository (verified, calibrated)",
        description="Export a checkpoint folder to REPOSITORY/NAME/VERSION/ (model.onnx + "
                    "model.json, see docs/model-repository.md): BatchNorm folded, one ai.stepnet "
                    "node per residual block, diagnostics outputs, verified against PyTorch and "
                    "calibrated on test images. Exit codes: 0 written, 1 verification failed "
                    "(nothing written), 2 bad input or a destination that cannot take the files: "
                    "unwritable (refused before any work) or full (nothing written).")
    p.add_argument("checkpoint", type=Path, help="checkpoint folder written by `stepnet train`")
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="model repository folder (default model_repository; created if missing)")
    p.add_argument("--name", required=True, help="model name, e.g. stepnet-digits")
    p.add_argument("--version", type=_positive, help="version to write (default: the next free one)")
    p.add_argument("--calibration-dataset", help=f"{DATASET_HELP} (default: the checkpoint's own)")
    p.add_argument("--data-dir", type=Path, help=f"calibration data: {DATA_DIR_HELP}")
    p.add_argument("--calibration-samples", type=_positive,
                   help="test images for the calibration profile and accuracy (default 2000)")
    p.add_argument("--min-verification-images", type=_positive, default=sizes.MIN_SAMPLES,
                   metavar="N", help=f"fewest test images the export verifies and calibrates on "
                                     f"(default {sizes.MIN_SAMPLES}; fewer than "
                                     f"{sizes.RECOMMENDED_SAMPLES}: a warning)")
    p.add_argument("--force", action="store_true", help="replace the version if it exists")
    p.add_argument("--fp16", action="store_true",
                   help="also write model.fp16.onnx (for GPUs; float32 inputs, outputs and step "
                        "nodes), verified against model.onnx")
    p.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx (for CPUs; static QDQ quantization calibrated "
                        "on training images), verified against model.onnx: top-1 agreement >= 99%%"
                        " and accuracy drop <= 0.5 points on the test images")
    p.add_argument("--int8-calibration-samples", type=_positive,
                   help="training images that calibrate the int8 activation ranges (default 512)")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("graph", help="print the node list of an exported model",
                       description="Print the nodes of an exported ONNX graph in order, with one "
                                   "ai.stepnet node per residual block, and its functions.")
    p.add_argument("path", type=Path, help="model.onnx, or a model version folder")
    p.set_defaults(run=_cmd_graph)
