"""Checkpoint -> verified, calibrated model version in a model repository: the whole export.

    load checkpoint -> build graph (graph.py) -> verify (verify.py) -> calibrate (calibration.py)
    -> fp16 / int8 variants, each verified against the graph (variants.py, on request)
    -> metadata (metadata.py) -> atomic write (repository.py)

Everything the user can get wrong (names, paths, versions, checkpoint, data) is checked before
the slow steps, and nothing touches the repository until the last step.
"""

import logging
from pathlib import Path

import numpy as np
import onnx

from export import calibration, graph, metadata, runtime, samples, sizes, variants, verify
from export.repository import resolve_version, write_version
from models import checkpoint, data
from stepnet.errors import UserError
from stepnet.repository import METADATA_KEY, MODEL_FILE, VARIANT_FILES
from stepnet.repository.metadata import ModelMetadata, to_json

log = logging.getLogger(__name__)
REFERENCE_SAMPLES = 2
PREPROCESSING = ("colour_mode", "input_size", "resize", "mean", "std", "ink_margin")


def _calibration_data(info: data.DataInfo, dataset: str, data_dir: Path | None,
                      split: str = "test"):
    """The calibration dataset's test split (train: int8 calibration); it must be the checkpoint's
    task: same classes and the same preprocessing, or its profile and accuracy would describe
    another model input."""
    test_set, cal_info = data.load(dataset, split, data_dir, input_size=info.input_size,
                                   ink_margin=info.ink_margin)
    for field in ("classes", *PREPROCESSING):
        if getattr(cal_info, field) != getattr(info, field):
            raise UserError(f"calibration dataset {dataset} does not match the checkpoint's data "
                            f"{info.name}: {field} {getattr(cal_info, field)} instead of "
                            f"{getattr(info, field)}")
    return test_set


def _variants(proto: onnx.ModelProto, requested: tuple[str, ...], fp32_outputs: tuple,
              test_set, indices: np.ndarray, train_set, int8_samples: int,
              tolerances: variants.VariantTolerances) -> tuple[dict, dict]:
    """Each requested variant's graph and its model.json entry; VariantError when one fails."""
    protos, entries = {}, {}
    for name in requested:
        if name == "fp16":
            log.info("fp16 variant: converting and verifying")
            protos[name], made = variants.to_fp16(proto), variants.settings(name)
        else:
            train_indices = samples.evenly_spaced(len(train_set), int8_samples)
            log.info("int8 variant: calibrating on %d training images and verifying",
                     len(train_indices))
            protos[name] = variants.to_int8(proto, (images for images, _ in
                                                    samples.batches(train_set, train_indices, 32)))
            made = variants.settings(name, {"split": "train", "samples": int(len(train_indices))})
        report = variants.verify(name, protos[name], fp32_outputs, test_set, indices, tolerances)
        log.info(variants.format_report(name, report))
        if not report["passed"]:
            raise variants.VariantError(name, report)
        entries[name] = {"file": VARIANT_FILES[name], **made, "verification": report}
    return protos, entries


def export_checkpoint(checkpoint_dir: str | Path, repository: str | Path, name: str,
                      version: int | None = None, *, calibration_dataset: str | None = None,
                      data_dir: str | Path | None = None, force: bool = False,
                      calibration_samples: int = calibration.CALIBRATION_SAMPLES,
                      verify_samples: int = sizes.RECOMMENDED_SAMPLES,
                      min_verification_images: int = sizes.MIN_SAMPLES,
                      reference_samples: int = REFERENCE_SAMPLES,
                      tolerances: verify.Tolerances = verify.Tolerances(),
                      opset: int = graph.OPSET, variant_names: tuple[str, ...] = (),
                      int8_calibration_samples: int = variants.INT8_CALIBRATION_SAMPLES,
                      variant_tolerances: variants.VariantTolerances = variants.VariantTolerances(),
                      ) -> Path:
    """Export the checkpoint folder `checkpoint_dir` as version `version` (default: the next free
    one) of model `name` in `repository`; returns the version folder. `variant_names` adds
    model.fp16.onnx ("fp16") and model.int8.onnx ("int8"), the latter calibrated on
    `int8_calibration_samples` training images.

    Raises UserError for bad input (nothing written), and verify.VerificationError or
    variants.VariantError when the graph or a variant does not match (nothing written; the report
    is on the exception)."""
    variant_names = _requested_variants(variant_names)
    repository = Path(repository)
    version = resolve_version(repository, name, version, force)
    model, info, config = checkpoint.load(checkpoint_dir)
    dataset = calibration_dataset or config.get("dataset", info.name)
    data_dir = checkpoint.data_dir(config, dataset, Path(data_dir) if data_dir else None)
    test_set = _calibration_data(info, dataset, data_dir)
    indices = samples.evenly_spaced(len(test_set), calibration_samples)
    if len(indices) < min_verification_images:
        raise UserError(f"{dataset} test split: {len(indices)} images, verification needs at least "
                        f"{min_verification_images} (--min-verification-images)")
    verify_samples = min(verify_samples, len(indices))
    if verify_samples < sizes.RECOMMENDED_SAMPLES:
        log.warning("warning: calibration and verification run on %d %s test images, fewer than "
                    "the %d recommended: their figures rest on fewer inputs", len(indices), dataset,
                    sizes.RECOMMENDED_SAMPLES)
    train_set = _calibration_data(info, dataset, data_dir, "train") if "int8" in variant_names else None

    proto, report = _build_and_verify(model, test_set, indices, dataset, opset, verify_samples,
                                      min_verification_images, reference_samples, tolerances)
    log.info("calibrating on %d %s test images", len(indices), dataset)
    logits, step_size, nsi, labels = samples.run_graph(runtime.cpu_session(proto), test_set, indices)
    protos, entries = _variants(proto, variant_names, (logits, step_size, nsi), test_set, indices,
                                train_set, int8_calibration_samples, variant_tolerances)
    layers = model.layers()
    meta = metadata.build(
        name=name, version=version, model_cfg=config["model"], data=config["data"], layers=layers,
        profile=calibration.profile(step_size, nsi, layers, dataset),
        checkpoint_sha256=config["weights_sha256"], opset=opset,
        accuracy={"dataset": dataset, "split": "test",
                  "top1": float((logits.argmax(1) == labels).mean()), "samples": int(len(labels)),
                  "checkpoint_top1": config.get("test_accuracy")},
        verification=report, variants=entries or None)
    files = _stamped({MODEL_FILE: proto, **{VARIANT_FILES[v]: p for v, p in protos.items()}}, meta,
                     f"{model.cfg.family}-{model.cfg.depth}")
    target = write_version(repository, name, version,
                           {f: p.SerializeToString() for f, p in files.items()}, meta, force)
    log.info("wrote %s", target)
    return target


def _requested_variants(names: tuple[str, ...]) -> tuple[str, ...]:
    """The variants asked for, in the order they are made; UserError for an unknown one."""
    unknown = set(names) - set(variants.VARIANTS)
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from "
                        f"{', '.join(variants.VARIANTS)}")
    return tuple(v for v in variants.VARIANTS if v in names)


def _build_and_verify(model, test_set, indices: np.ndarray, dataset: str, opset: int, verify_samples: int,
                      min_samples: int, reference_samples: int, tolerances: verify.Tolerances) -> tuple[onnx.ModelProto, dict]:
    """The graph and its verification report; VerificationError when it does not match."""
    log.info("building the ONNX graph of %s-%d", model.cfg.family, model.cfg.depth)
    proto = graph.build_onnx(model, opset)
    log.info("verifying against PyTorch on %d %s test images", verify_samples, dataset)
    images, _ = samples.load_images(test_set, indices[samples.evenly_spaced(len(indices), verify_samples)])
    report = verify.verify(proto, model, images, reference_samples, tolerances, min_samples)
    if not report["passed"]:
        raise verify.VerificationError(report)
    return proto, report


def _stamped(files: dict[str, onnx.ModelProto], meta: ModelMetadata, architecture: str) -> dict[str, onnx.ModelProto]:
    """Each graph file with its producer, a description and the metadata mirror (all but "files")."""
    for file, proto in files.items():
        proto.producer_name = "stepnet export"
        proto.producer_version = meta.exporter_version
        proto.doc_string = (f"{meta.name} version {meta.version}: {architecture} (StepNet)"
                            + ("" if file == MODEL_FILE else f", {file}"))
        onnx.helper.set_model_props(proto, {METADATA_KEY: to_json(meta, files=False)})
    return files
