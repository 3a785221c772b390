"""The metadata of a model version, built from a checkpoint's config and what the export measured,
as stepnet.repository.metadata's model (the one the service reads): model.json, and its copy in
the graph's metadata_props (all but "files"). docs/model-repository.md is the contract."""

from importlib import metadata as package_metadata

from stepnet.repository import INPUT, OUTPUTS
from stepnet.repository.metadata import ModelMetadata


def exporter_version() -> str:
    return package_metadata.version("stepnet")


def toolchain() -> dict:
    """Versions of the libraries that produced and checked the graph, for reproducibility."""
    return {name: package_metadata.version(name)
            for name in ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime-gpu")}


def build(*, name: str, version: int, model_cfg: dict, data: dict, layers: list[dict],
          profile: dict, checkpoint_sha256: str, opset: int, accuracy: dict,
          verification: dict, variants: dict | None = None) -> ModelMetadata:
    """The metadata of one model version, without "files" (the repository adds those). Raises
    pydantic's ValidationError if it would not be readable."""
    size = model_cfg["input_size"]
    return ModelMetadata.model_validate(dict(
        name=name, version=version, family=model_cfg["family"], depth=model_cfg["depth"],
        classes=list(data["classes"]),
        input={"name": INPUT, "shape": [model_cfg["in_channels"], size, size], "dtype": "float32"},
        preprocessing={"colour_mode": data["colour_mode"], "resize": data["resize"],
                       "crop": data["input_size"], "mean": list(data["mean"]), "std": list(data["std"]),
                       "ink_normalization": (None if data.get("ink_margin") is None
                                             else {"margin": data["ink_margin"]})},
        layers=[dict(row) for row in layers], outputs={name: name for name in OUTPUTS},
        profile=profile, checkpoint_sha256=checkpoint_sha256, exporter_version=exporter_version(),
        toolchain=toolchain(), opset=opset, accuracy=accuracy, verification=verification,
        variants=variants))
