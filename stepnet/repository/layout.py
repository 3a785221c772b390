"""The files of a model version and the names inside them (docs/model-repository.md).

    <repository>/<name>/<version>/model.onnx        the graph; variants beside it
                                  model.json        the metadata (stepnet.repository.metadata)

Hidden entries (`.<version>.partial-*` being written, `.<version>.replaced-*` being swapped out)
are work in progress: readers skip them, as they skip anything that is not a version number.
"""

MODEL_FILE = "model.onnx"
METADATA_FILE = "model.json"
VARIANT_FILES = {"fp32": MODEL_FILE, "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
METADATA_KEY = "stepnet"              # metadata_props key of the graph's copy of model.json
PARTIAL, REPLACED = ".partial-", ".replaced-"

STEP_DOMAIN = "ai.stepnet"            # the fused step nodes (docs/design.md 1.4)
STEP_DOMAIN_VERSION = 1
INPUT = "input"
OUTPUTS = ("logits", "step_size", "nsi")
# step_size[..., k]: the mean, min and max over channels of the step size h_t (docs/design.md 1.3)
STEP_MEAN, STEP_MIN, STEP_MAX = 0, 1, 2
