"""The model metadata of DESIGN 2.1: `model.json` beside the graph, mirrored (all but "files") in
the ONNX file's metadata_props under the key "stepnet". docs/model-repository.md is the contract;
the service reads these files and nothing else. This module imports neither torch nor onnx.
"""

import json
from importlib import metadata as package_metadata
from pathlib import Path

SCHEMA_VERSION = 1
METADATA_KEY = "stepnet"
MODEL_FILE, METADATA_FILE = "model.onnx", "model.json"
INPUT = "input"
OUTPUTS = ("logits", "step_size", "nsi")
FIELDS = ("schema_version", "name", "version", "family", "depth", "classes", "input",
          "preprocessing", "layers", "outputs", "profile", "checkpoint_sha256", "exporter_version",
          "toolchain", "opset", "accuracy", "verification")


def exporter_version() -> str:
    return package_metadata.version("stepnet")


def toolchain() -> dict:
    """Versions of the libraries that produced and checked the graph, for reproducibility."""
    return {name: package_metadata.version(name)
            for name in ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime-gpu")}


def build(*, name: str, version: int, model_cfg: dict, data: dict, layers: list[dict],
          profile: dict, checkpoint_sha256: str, opset: int, accuracy: dict,
          verification: dict) -> dict:
    """The metadata of one model version, without "files" (the repository adds those)."""
    size = model_cfg["input_size"]
    meta = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "family": model_cfg["family"],
        "depth": model_cfg["depth"],
        "classes": list(data["classes"]),
        "input": {"name": INPUT, "shape": [model_cfg["in_channels"], size, size], "dtype": "float32"},
        "preprocessing": {"colour_mode": data["colour_mode"], "resize": data["resize"],
                          "crop": data["input_size"], "mean": list(data["mean"]),
                          "std": list(data["std"])},
        "layers": [dict(row) for row in layers],
        "outputs": {name: name for name in OUTPUTS},
        "profile": profile,
        "checkpoint_sha256": checkpoint_sha256,
        "exporter_version": exporter_version(),
        "toolchain": toolchain(),
        "opset": opset,
        "accuracy": accuracy,
        "verification": verification,
    }
    return meta


def to_json(meta: dict) -> str:
    return json.dumps(meta, indent=2, allow_nan=False) + "\n"


def read_model_json(version_dir: str | Path) -> dict:
    return json.loads((Path(version_dir) / METADATA_FILE).read_text())


def from_metadata_props(props: dict[str, str]) -> dict:
    """The metadata mirrored in an ONNX file, from its metadata_props as a dict."""
    return json.loads(props[METADATA_KEY])
